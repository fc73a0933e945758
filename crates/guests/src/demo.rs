//! The `demo` guest ("ukos"): its System.map, and its ABI re-exported from
//! `ukvmi-guest-abi`. `asm/demo.h` holds the same values for the guest (a
//! unit test checks they agree); the crate README's "The demo guest" section
//! describes the OS.

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

/// The demo OS's ABI (process table, syscalls, agent call, memory),
/// declared in `ukvmi-guest-abi`.
pub use ukvmi_guest_abi::demo::*;

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
            ("CURRENT_PID_SLOTS", CURRENT_PID_SLOTS),
            ("PH_TICKS", PH_TICKS),
            ("PE_PID", PE_PID),
            ("PE_STATE", PE_STATE),
            ("PE_CPU", PE_CPU),
            ("PE_EXIT_CODE", PE_EXIT_CODE),
            ("PE_CR3", PE_CR3),
            ("PE_SYSCALLS", PE_SYSCALLS),
            ("PE_NAME", PE_NAME),
            ("NAME_LEN", NAME_LEN),
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
