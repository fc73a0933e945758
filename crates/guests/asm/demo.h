/*
 * ukos, the demo guest OS: the contract tools rely on. `ukvmi_guest_abi::demo`
 * mirrors every value here; a unit test parses this file and checks that
 * both agree, so change them together.
 */

/* Process table (kernel-owned, read by tools) at a fixed guest-physical
 * address. Header (PROC_HEADER_SIZE bytes), then MAX_PROCS entries. */
#define PROC_TABLE          0x3e0000
#define PROC_MAGIC          0x434f5250534f4b55  /* "UKOSPROC" little-endian */
#define PROC_VERSION        1
#define MAX_PROCS           8
#define PROC_HEADER_SIZE    64
#define PROC_ENTRY_SIZE     64
#define MAX_CPUS            2          /* vCPUs the kernel schedules on */
/* header fields */
#define PH_MAGIC            0          /* u64 */
#define PH_VERSION          8          /* u32 */
#define PH_MAX_PROCS        12         /* u32 */
#define PH_ENTRY_SIZE       16         /* u32 */
#define PH_NCPUS            20         /* u32 */
#define PH_CURRENT_PID      24         /* u32[CURRENT_PID_SLOTS]: pid running on vCPU i, 0 = idle */
#define CURRENT_PID_SLOTS   8
#define PH_TICKS            56         /* u64: ms since boot (approx.) */
/* entry fields */
#define PE_PID              0          /* u32, 0 = free slot */
#define PE_STATE            4          /* u32, PS_* */
#define PE_CPU              8          /* u32 */
#define PE_EXIT_CODE        12         /* u32 */
#define PE_CR3              16         /* u64 */
#define PE_SYSCALLS         24         /* u64 */
#define PE_NAME             32         /* char[NAME_LEN], NUL-padded */
#define NAME_LEN            16
#define PE_WAKE_TICK        48         /* u64 */
#define PE_USER_RIP         56         /* u64, at the last kernel entry */
#define PS_READY            1
#define PS_RUNNING          2
#define PS_SLEEPING         3
#define PS_EXITED           4

/* Syscall numbers (RAX); args RDI, RSI, RDX, R10; result RAX. */
#define SYS_WRITE           1
#define SYS_YIELD           24
#define SYS_SLEEP           35
#define SYS_GETPID          39
#define SYS_EXIT            60
#define SYS_DEBUG_WRMSR     200
#define SYS_DEBUG_POKE      201
#define SYS_AGENT           202
#define NR_SYSCALLS         512        /* syscall_table: 512 u64 = one page */
#define ENOSYS              38
#define EFAULT              14
#define EBADF               9
#define EIO                 5

/* The agent doorbell: the message goes to agent_buf (AGENT_BUF_SIZE bytes);
 * the kernel rings PORT_HYPERCALL with R8 = agent_buf, R9 = length. */
#define AGENT_BUF_SIZE      256

/* Per-process memory. Each process has its own page tables (CR3 = its block)
 * and its own 4 MiB of frames: a 2 MiB user page at USER_BASE (code, data)
 * and a 2 MiB user page below USER_STACK_TOP (stack). The kernel is mapped
 * supervisor-only below USER_BASE (GVA == GPA). */
#define USER_BASE           0x400000
#define USER_STACK_TOP      0x800000
#define USER_FRAMES_BASE    0x1000000  /* process in slot s: + s*USER_FRAMES_SIZE */
#define USER_FRAMES_SIZE    0x400000
#define PBLK_BASE           0x340000   /* slot s: PML4 at + s*PBLK_SIZE */
#define PBLK_SIZE           0x8000     /* PML4, PDPT, PD, private page, 16 KiB kernel stack */
#define PB_PDPT             0x1000
#define PB_PD               0x2000
#define PB_SAVED_RSP        0x3000     /* kernel RSP while switched out */
#define PB_KSTACK_TOP       0x8000
#define DEMO_MIN_MEM        0x2000000  /* 32 MiB: frames of 4 processes */

/* GDT of the kernel (STAR's user half must give CS 0x33: PVM insists on the
 * host's __USER_CS) */
#define KERNEL_CS           0x08
#define KERNEL_DS           0x10
#define USER_CS32           0x23
#define USER_DS             0x2b
#define USER_CS             0x33
#define TSS_SEL0            0x38       /* vCPU i: TSS_SEL0 + 16*i */

/* MSRs */
#define MSR_EFER            0xc0000080
#define MSR_STAR            0xc0000081
#define MSR_LSTAR_DEMO      0xc0000082
#define MSR_SFMASK          0xc0000084
#define SFMASK_VALUE        0x47700

/* Processes: pid, name, vCPU with 2 vCPUs (all on vCPU 0 with 1) */
#define NPROCS              4
#define INIT_PERIOD_MS      2000
#define SHELL_PERIOD_MS     500
#define ROOTKIT_DELAY_MS    1000
#define ROOTKIT_PERIOD_MS   2000
#define ASSUMED_TSC_KHZ     1000000    /* when the VMM passes RDX = 0 */
