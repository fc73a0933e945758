//! The `demo` guest ("ukos"): the contract tools rely on. `asm/demo.h` holds
//! the same values for the guest (a unit test checks they agree); the crate
//! README's "The demo guest" section describes the OS.

/// `System.map` of the demo kernel: `%016x T name` per line, sorted by
/// address, every symbol (code, data, absolute). Labels of the user image
/// (`u_*`, `rk_*`, ...) are given at the virtual address every process runs
/// them at ([`USER_BASE`] + offset).
pub const SYSTEM_MAP: &str = include_str!(concat!(env!("OUT_DIR"), "/demo.map"));

/// Address of `name` in [`SYSTEM_MAP`].
#[must_use]
pub fn symbol(name: &str) -> Option<u64> {
    symbols().find(|&(n, _)| n == name).map(|(_, a)| a)
}

/// Every `(name, address)` of [`SYSTEM_MAP`], sorted by address.
pub fn symbols() -> impl Iterator<Item = (&'static str, u64)> {
    SYSTEM_MAP.lines().filter_map(|l| {
        let mut w = l.split_whitespace();
        let addr = u64::from_str_radix(w.next()?, 16).ok()?;
        let name = w.nth(1)?;
        Some((name, addr))
    })
}

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
/// u32\[8\]: the pid running on vCPU i, 0 when it idles.
pub const PH_CURRENT_PID: usize = 24;
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
/// char\[16\] name, NUL-padded.
pub const PE_NAME: usize = 32;
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
/// agent(msg, len, reply_buf, reply_cap): the hypercall doorbell.
pub const SYS_AGENT: u64 = 202;
/// Entries of `syscall_table` (one 4 KiB page of u64).
pub const NR_SYSCALLS: u64 = 512;
/// Size of `agent_buf`.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn define(name: &str) -> u64 {
        let header = include_str!("../asm/demo.h");
        let line = header
            .lines()
            .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
            .unwrap_or_else(|| panic!("demo.h: no {name}"));
        let v = line.split_whitespace().nth(2).unwrap();
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse().unwrap(),
        }
    }

    #[test]
    fn demo_h_matches_rust() {
        let usize_defs = [
            ("MAX_PROCS", MAX_PROCS),
            ("PROC_HEADER_SIZE", PROC_HEADER_SIZE),
            ("PROC_ENTRY_SIZE", PROC_ENTRY_SIZE),
            ("MAX_CPUS", MAX_CPUS),
            ("PH_MAGIC", PH_MAGIC),
            ("PH_VERSION", PH_VERSION),
            ("PH_MAX_PROCS", PH_MAX_PROCS),
            ("PH_ENTRY_SIZE", PH_ENTRY_SIZE),
            ("PH_NCPUS", PH_NCPUS),
            ("PH_CURRENT_PID", PH_CURRENT_PID),
            ("PH_TICKS", PH_TICKS),
            ("PE_PID", PE_PID),
            ("PE_STATE", PE_STATE),
            ("PE_CPU", PE_CPU),
            ("PE_EXIT_CODE", PE_EXIT_CODE),
            ("PE_CR3", PE_CR3),
            ("PE_SYSCALLS", PE_SYSCALLS),
            ("PE_NAME", PE_NAME),
            ("PE_WAKE_TICK", PE_WAKE_TICK),
            ("PE_USER_RIP", PE_USER_RIP),
            ("AGENT_BUF_SIZE", AGENT_BUF_SIZE),
        ];
        for (name, v) in usize_defs {
            assert_eq!(define(name), v as u64, "{name}");
        }
        let u64_defs = [
            ("PROC_TABLE", PROC_TABLE),
            ("PROC_MAGIC", PROC_MAGIC),
            ("PROC_VERSION", u64::from(PROC_VERSION)),
            ("PS_READY", u64::from(PS_READY)),
            ("PS_RUNNING", u64::from(PS_RUNNING)),
            ("PS_SLEEPING", u64::from(PS_SLEEPING)),
            ("PS_EXITED", u64::from(PS_EXITED)),
            ("SYS_WRITE", SYS_WRITE),
            ("SYS_YIELD", SYS_YIELD),
            ("SYS_SLEEP", SYS_SLEEP),
            ("SYS_GETPID", SYS_GETPID),
            ("SYS_EXIT", SYS_EXIT),
            ("SYS_DEBUG_WRMSR", SYS_DEBUG_WRMSR),
            ("SYS_DEBUG_POKE", SYS_DEBUG_POKE),
            ("SYS_AGENT", SYS_AGENT),
            ("NR_SYSCALLS", NR_SYSCALLS),
            ("USER_BASE", USER_BASE),
            ("USER_STACK_TOP", USER_STACK_TOP),
            ("USER_FRAMES_BASE", USER_FRAMES_BASE),
            ("USER_FRAMES_SIZE", USER_FRAMES_SIZE),
            ("PBLK_BASE", PBLK_BASE),
            ("PBLK_SIZE", PBLK_SIZE),
            ("DEMO_MIN_MEM", DEMO_MIN_MEM),
            ("NPROCS", PROCESSES.len() as u64),
        ];
        for (name, v) in u64_defs {
            assert_eq!(define(name), v, "{name}");
        }
        assert_eq!(&PROC_MAGIC.to_le_bytes(), b"UKOSPROC");
        assert_eq!(PROC_TABLE_SIZE, 576);
        // The frames of the last process end inside the RAM the demo asks for.
        assert!(USER_FRAMES_BASE + PROCESSES.len() as u64 * USER_FRAMES_SIZE <= DEMO_MIN_MEM);
        // Kernel blocks stay below the table, and the kernel below USER_BASE.
        assert!(PBLK_BASE + MAX_PROCS as u64 * PBLK_SIZE <= PROC_TABLE);
        assert!(PROC_TABLE + PROC_TABLE_SIZE as u64 <= crate::layout::IDT_ADDR);
    }

    #[test]
    fn system_map_has_the_contract_symbols() {
        let text_end = crate::find("demo").unwrap().end();
        for name in [
            "syscall_entry",
            "syscall_table",
            "sys_write",
            "agent_buf",
            "hijacked_syscalls",
            "hooked_writes",
            "module_area",
        ] {
            let a = symbol(name).unwrap_or_else(|| panic!("no {name}"));
            assert!((crate::layout::LOAD_ADDR..text_end).contains(&a), "{name} at {a:#x}");
            // Kernel symbols in the map are where Guest.symbols has them.
            assert_eq!(crate::find("demo").unwrap().symbol(name), Some(a), "{name}");
        }
        assert_eq!(symbol("proc_table"), Some(PROC_TABLE));
        // syscall_table: page-aligned, exactly one page, nothing else on it.
        let table = symbol("syscall_table").unwrap();
        assert_eq!(table % 4096, 0);
        assert_eq!(symbol("syscall_table_end"), Some(table + NR_SYSCALLS * 8));
        assert!(
            symbols().all(|(n, a)| a < table || a >= table + 4096 || n == "syscall_table"),
            "a symbol shares the table's page"
        );
        // The table's write entry is sys_write, in the image.
        let g = crate::find("demo").unwrap();
        let at = (table + SYS_WRITE * 8 - g.load_addr) as usize;
        let entry = u64::from_le_bytes(g.image[at..at + 8].try_into().unwrap());
        assert_eq!(entry, symbol("sys_write").unwrap());
        let at = (table + 7 * 8 - g.load_addr) as usize;
        let nosys = u64::from_le_bytes(g.image[at..at + 8].try_into().unwrap());
        assert_eq!(Some(nosys), g.symbol("sys_nosys"));
        // agent_buf: AGENT_BUF_SIZE bytes before anything else.
        let buf = symbol("agent_buf").unwrap();
        assert!(symbols().all(|(_, a)| a <= buf || a >= buf + AGENT_BUF_SIZE as u64));
        // User programs at their user addresses; map sorted, one format.
        for name in ["u_init", "u_shell", "u_worker", "u_rootkit"] {
            let a = symbol(name).unwrap();
            assert!((USER_BASE..USER_BASE + 0x1_0000).contains(&a), "{name} at {a:#x}");
        }
        let all: Vec<_> = symbols().collect();
        assert_eq!(all.len(), SYSTEM_MAP.lines().count());
        assert!(all.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(SYSTEM_MAP.lines().all(|l| l.len() > 19 && &l[16..19] == " T "));
    }
}
