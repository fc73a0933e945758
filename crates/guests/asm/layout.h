/*
 * Guest ABI constants shared by every guest image. The Rust side mirrors
 * these in `ukvmi_guests::layout`; a unit test parses this file and checks
 * that both agree, so change them together.
 */
#define LOAD_ADDR        0x100000   /* flat image base, _start is first   */
#define STACK_TOP        0x80000    /* vCPU i: RSP = STACK_TOP - i*STACK_SIZE */
#define STACK_SIZE       0x4000
#define MAX_VCPUS        31         /* stacks reach down to 0x4000        */
#define PATTERN_BASE     0x200000   /* vCPU i fills PATTERN_BASE + i*0x1000 */
#define PATTERN_SIZE     0x1000
#define COUNTER_BASE     0x300000   /* u64 loop counter of vCPU i at +i*8 */
#define PRINT_LOCK       0x3ff000   /* u32 spinlock serialising serial output */
#define PORT_SERIAL      0x3f8
#define PORT_POWEROFF    0xf4
#define PORT_START_VCPU  0x600
#define R12_TAG          0x5a5a000000000000
#define R15_MAGIC        0x123456789abcdef0
#define TICK_EVERY       64         /* vCPU 0 prints "tick <n>" when n % 64 == 0 */
#define SMP_WARMUP       200        /* smp: iterations before vCPU 0 starts the others */

/* msr guest: every MSR_EVERY iterations vCPU i writes MSR_LSTAR with
 * LSTAR_TAG | counter (stored first at MSR_TRIED_BASE + i*8), reads it back
 * with rdmsr and stores what it saw at MSR_SEEN_BASE + i*8. */
#define MSR_LSTAR        0xc0000082
#define LSTAR_TAG        0xffff800000000000
#define MSR_EVERY        16
#define MSR_TRIED_BASE   0x300400
#define MSR_SEEN_BASE    0x300600

/* pf guest: every PF_EVERY iterations vCPU i < PF_MAX_VCPUS stores, loads,
 * does a page-straddling store and load on its data pages A = PF_DATA_BASE +
 * i*PF_DATA_STRIDE and B = A + 0x1000, then calls pf_func (own code page);
 * what it tried and saw goes to the u64 arrays below, at +i*8. */
#define PF_DATA_BASE            0x310000
#define PF_DATA_STRIDE          0x2000
#define PF_MAX_VCPUS            8
#define PF_EVERY                4
#define PF_TAG                  0x5046000000000000
#define PF_STRADDLE_TAG         0xb0000000a0000000
#define PF_TRIED_BASE           0x300a00
#define PF_SEEN_BASE            0x300a40
#define PF_STRADDLE_TRIED_BASE  0x300a80
#define PF_STRADDLE_SEEN_BASE   0x300ac0
#define PF_EXEC_COUNT_BASE      0x300b00
#define PF_ROUNDS_BASE          0x300b40
