/*
 * Guest ABI constants shared by every guest image. The Rust side mirrors
 * these in `ukvmi_guest_abi::layout`; a unit test parses this file and checks
 * that both agree, so change them together.
 */
#define LOAD_ADDR        0x100000   /* flat image base, _start is first   */
/* Entry: RDI = vCPU index, RSI = vCPU count, RDX = TSC kHz (0 = unknown). */
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

/* Exceptions (guests that call idt_init): a 32-vector IDT at IDT_ADDR whose
 * handlers count vector v at EXC_COUNT_BASE + v*8 and store, for vCPU i at
 * EXC_INFO_BASE + i*32: vector, error code (0 if none), return RIP, CR2. */
#define IDT_ADDR         0x3fc000
#define EXC_COUNT_BASE   0x3fd000
#define EXC_INFO_BASE    0x3fd100
#define EXC_INFO_SIZE    32

/* traps guest: each iteration vCPU i executes `incq BP_TARGET_RUNS(,i,8)` at
 * bp_target (a place for a tool's breakpoint), every INT3_EVERY iterations
 * its own int3 at guest_int3 (then counts INT3_DONE), and every HC_EVERY
 * iterations the hypercall doorbell (result RAX at HC_RESULT_BASE + i*8,
 * count at HC_COUNT_BASE + i*8). */
#define BP_TARGET_RUNS   0x300800
#define INT3_DONE        0x300900
#define HC_RESULT_BASE   0x3fd500
#define HC_COUNT_BASE    0x3fd600
#define INT3_EVERY       8
#define HC_EVERY         4

/* The hypercall doorbell: `out %eax,%dx` to this port with KVMI's register
 * convention (RAX = 34, RDI = 24, RSI = 0); the result comes back in RAX
 * (0 when the introspector answered, -1000 = -KVM_ENOSYS when nobody did). */
#define PORT_HYPERCALL   0x610
#define HC_KVMI_NR       34
#define HC_KVMI_SUBFN    24

/* bench guest: vCPU 0 reads the mode word at BENCH_MODE (the tool changes it
 * with WRITE_PHYSICAL) and runs the matching tight loop, counting iterations
 * in the u64 at BENCH_COUNT; each loop re-reads the mode every iteration.
 * Modes: 0 idle (hlt), 1 `out %al,%dx` to PORT_BENCH (a port nobody
 * handles), 2 wrmsr LSTAR (LSTAR_TAG | count), 3 int3 (the guest's own #BP
 * handler returns after it), 4 write the count to BENCH_PF_PAGE, 5 spin
 * (no exits). Only 0x300c00-0x300cff and the page BENCH_PF_PAGE are used. */
#define BENCH_MODE       0x300c00
#define BENCH_COUNT      0x300c08
#define BENCH_PF_PAGE    0x320000
#define PORT_BENCH       0x620
#define BENCH_IDLE       0
#define BENCH_OUT        1
#define BENCH_WRMSR      2
#define BENCH_INT3       3
#define BENCH_PF         4
#define BENCH_SPIN       5
/* mode 6: per iteration BENCH_SYSCALL_WORK multiply-adds and a `syscall` into
 * the guest's own handler (which counts it in the u64 at BENCH_SYSCALLS), and
 * an `out` to PORT_BENCH every BENCH_SYSCALL_OUT_EVERY iterations */
#define BENCH_SYSCALL           6
#define BENCH_SYSCALLS          0x300c10
#define BENCH_SYSCALL_WORK      16
#define BENCH_SYSCALL_OUT_EVERY 16
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
