//! The demo guest OS's ("ukos") ABI: process table, syscalls, agent call, memory.
//!
//! The kernel (`crates/guests/asm/demo.S`) keeps a process table at a fixed
//! guest physical address, [`PROC_TABLE`]: a header of [`PROC_HEADER_SIZE`]
//! bytes (`PH_*` offsets) and [`MAX_PROCS`] entries of [`PROC_ENTRY_SIZE`]
//! bytes (`PE_*` offsets), all little-endian. `asm/demo.h` repeats every
//! value (a unit test of `ukvmi-guests` checks they agree).

/// Guest-physical address of the process table (kernel-owned; symbol
/// `proc_table`).
pub const PROC_TABLE: u64 = 0x3e_0000;
/// First u64 of the table: "UKOSPROC" as little-endian bytes.
pub const PROC_MAGIC: u64 = 0x434f_5250_534f_4b55;
/// Table format version.
pub const PROC_VERSION: u32 = 1;
/// Entries in the table.
pub const MAX_PROCS: usize = 8;
/// Size of the header before the entries.
pub const PROC_HEADER_SIZE: usize = 64;
/// Size of one entry.
pub const PROC_ENTRY_SIZE: usize = 64;
/// Bytes to read for the whole table.
pub const PROC_TABLE_SIZE: usize = PROC_HEADER_SIZE + MAX_PROCS * PROC_ENTRY_SIZE;
/// vCPUs the kernel schedules on (more are left halted).
pub const MAX_CPUS: usize = 2;

/// Header offsets: u64 magic.
pub const PH_MAGIC: usize = 0;
/// u32 version.
pub const PH_VERSION: usize = 8;
/// u32 entry count.
pub const PH_MAX_PROCS: usize = 12;
/// u32 entry size.
pub const PH_ENTRY_SIZE: usize = 16;
/// u32 vCPUs the kernel runs.
pub const PH_NCPUS: usize = 20;
/// u32\[[`CURRENT_PID_SLOTS`]\]: the pid running on vCPU i, 0 when it idles.
pub const PH_CURRENT_PID: usize = 24;
/// vCPUs whose current pid the header has room for (more than [`MAX_CPUS`]).
pub const CURRENT_PID_SLOTS: usize = 8;
/// u64: milliseconds since boot (approximate, from rdtsc).
pub const PH_TICKS: usize = 56;
/// Entry offsets: u32 pid, 0 for a free slot.
pub const PE_PID: usize = 0;
/// u32 state ([`PS_READY`] ...).
pub const PE_STATE: usize = 4;
/// u32 vCPU the process is pinned to.
pub const PE_CPU: usize = 8;
/// u32 exit code (128 + vector when killed by an exception).
pub const PE_EXIT_CODE: usize = 12;
/// u64 CR3 (its page tables).
pub const PE_CR3: usize = 16;
/// u64 syscalls made.
pub const PE_SYSCALLS: usize = 24;
/// char\[[`NAME_LEN`]\] name, NUL-padded.
pub const PE_NAME: usize = 32;
/// Bytes of a process name (NUL-padded, not always NUL-terminated).
pub const NAME_LEN: usize = 16;
/// u64 tick it sleeps until.
pub const PE_WAKE_TICK: usize = 48;
/// u64 user RIP at its last kernel entry.
pub const PE_USER_RIP: usize = 56;
/// Ready to run.
pub const PS_READY: u32 = 1;
/// Running on its vCPU.
pub const PS_RUNNING: u32 = 2;
/// Sleeping until its wake tick.
pub const PS_SLEEPING: u32 = 3;
/// Exited (or killed).
pub const PS_EXITED: u32 = 4;

/// Syscall numbers (RAX; args RDI, RSI, RDX, R10; result in RAX).
pub const SYS_WRITE: u64 = 1;
/// yield()
pub const SYS_YIELD: u64 = 24;
/// sleep(ms)
pub const SYS_SLEEP: u64 = 35;
/// getpid()
pub const SYS_GETPID: u64 = 39;
/// exit(code)
pub const SYS_EXIT: u64 = 60;
/// debug_wrmsr(msr, value): writes any MSR, returns the value read back.
pub const SYS_DEBUG_WRMSR: u64 = 200;
/// debug_poke(kaddr, value): writes a u64 below [`USER_BASE`], returns it read back.
pub const SYS_DEBUG_POKE: u64 = 201;
/// agent(msg, len, reply_buf, reply_cap): the hypercall doorbell (see
/// [`AGENT_BUF_SIZE`] for what the kernel passes the introspector).
pub const SYS_AGENT: u64 = 202;
/// Entries of `syscall_table` (one 4 KiB page of u64).
pub const NR_SYSCALLS: u64 = 512;
/// Size of `agent_buf`. The agent call copies the message there and rings
/// [`crate::hypercall::PORT_HYPERCALL`] with R8 = `agent_buf` (a guest
/// physical address) and R9 = the message length (at most this); an
/// introspector that answers writes its reply over `agent_buf` and sets RAX
/// to the reply's length (at most this).
pub const AGENT_BUF_SIZE: usize = 256;

/// Every process's code and data start here (a 2 MiB user page).
pub const USER_BASE: u64 = 0x40_0000;
/// Top of every process's stack (a 2 MiB user page below it).
pub const USER_STACK_TOP: u64 = 0x80_0000;
/// Frames of the process in slot s: `USER_FRAMES_BASE + s * USER_FRAMES_SIZE`.
pub const USER_FRAMES_BASE: u64 = 0x100_0000;
/// Frames per process.
pub const USER_FRAMES_SIZE: u64 = 0x40_0000;
/// Per-process kernel block (PML4 = its CR3, PDPT, PD, kernel stack) of slot s.
pub const PBLK_BASE: u64 = 0x34_0000;
/// Size of a block.
pub const PBLK_SIZE: u64 = 0x8000;
/// Guest RAM the demo needs (its frames end below this).
pub const DEMO_MIN_MEM: u64 = 0x200_0000;
/// The processes, by pid (1-based): name and vCPU when the VM has 2.
pub const PROCESSES: [(u32, &str, u32); 4] = [(1, "init", 0), (2, "shell", 0), (3, "worker", 1), (4, "rootkit", 1)];

// The header and entry fields fit where the ABI says.
const _: () = {
    assert!(PH_CURRENT_PID + 4 * CURRENT_PID_SLOTS <= PH_TICKS);
    assert!(PH_TICKS + 8 <= PROC_HEADER_SIZE);
    assert!(MAX_CPUS <= CURRENT_PID_SLOTS);
    assert!(PE_NAME + NAME_LEN <= PE_WAKE_TICK);
    assert!(PE_USER_RIP + 8 <= PROC_ENTRY_SIZE);
    assert!(PROCESSES.len() <= MAX_PROCS);
    assert!(USER_FRAMES_BASE + PROCESSES.len() as u64 * USER_FRAMES_SIZE <= DEMO_MIN_MEM);
    assert!(PBLK_BASE + MAX_PROCS as u64 * PBLK_SIZE <= PROC_TABLE);
    assert!(PROC_TABLE + PROC_TABLE_SIZE as u64 <= crate::layout::IDT_ADDR);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_magic_spells_ukosproc_and_the_table_is_576_bytes() {
        assert_eq!(&PROC_MAGIC.to_le_bytes(), b"UKOSPROC");
        assert_eq!(PROC_TABLE_SIZE, 576);
    }
}
