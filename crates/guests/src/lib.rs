#![doc = include_str!("../README.md")]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

use std::fmt;

mod built {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));
}

pub mod demo;

/// One guest image: a flat binary to copy to [`load_addr`](Self::load_addr)
/// in guest physical memory, entered at [`entry`](Self::entry) on every vCPU
/// (see the crate documentation for the register and memory ABI).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    /// Short name, e.g. `"spin"`; also printed in vCPU 0's banner.
    pub name: &'static str,
    /// One line for `--help` listings.
    pub summary: &'static str,
    /// The flat image (the linked `.text` section).
    pub image: &'static [u8],
    /// Guest physical (= virtual) address of `image[0]`: [`layout::LOAD_ADDR`].
    pub load_addr: u64,
    /// Address of `_start`, where every vCPU begins (equals `load_addr`).
    pub entry: u64,
    /// Text symbols (`nm`), sorted by address.
    pub symbols: &'static [(&'static str, u64)],
    /// The least guest RAM, in MiB, this guest runs in (its tables, stacks
    /// and data all lie below it).
    pub min_memory_mib: u64,
    /// The most vCPUs this guest uses: a VM with more creates the others,
    /// but the guest never starts them (they stay idle, never "ready" for
    /// KVMI vCPU commands).
    pub max_vcpus: u16,
}

impl Guest {
    /// Address of a symbol, e.g. `guest.symbol("iterate")`.
    #[must_use]
    pub fn symbol(&self, name: &str) -> Option<u64> {
        self.symbols.iter().find(|(n, _)| *n == name).map(|&(_, a)| a)
    }

    /// The symbol containing `addr` (the last one at or below it inside the
    /// image) and the offset from it, e.g. to name a vCPU's RIP.
    #[must_use]
    pub fn symbolize(&self, addr: u64) -> Option<(&'static str, u64)> {
        if addr < self.load_addr || addr >= self.end() {
            return None;
        }
        self.symbols.iter().rev().find(|(_, a)| *a <= addr).map(|&(n, a)| (n, addr - a))
    }

    /// One past the image's last byte in guest memory.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.load_addr + self.image.len() as u64
    }
}

impl fmt::Debug for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guest")
            .field("name", &self.name)
            .field("summary", &self.summary)
            .field("image_len", &self.image.len())
            .field("load_addr", &format_args!("{:#x}", self.load_addr))
            .field("entry", &format_args!("{:#x}", self.entry))
            .field("symbols", &self.symbols.len())
            .field("min_memory_mib", &self.min_memory_mib)
            .field("max_vcpus", &self.max_vcpus)
            .finish()
    }
}

/// [`layout::MIN_MEM_SIZE`] in MiB: what every guest's layout needs.
const ABI_MIN_MIB: u64 = layout::MIN_MEM_SIZE >> 20;

macro_rules! guest {
    ($name:ident, $summary:expr) => {
        guest!($name, $summary, ABI_MIN_MIB, layout::MAX_VCPUS)
    };
    ($name:ident, $summary:expr, $min_mib:expr, $max_vcpus:expr) => {
        Guest {
            name: stringify!($name),
            summary: $summary,
            image: built::$name::IMAGE,
            load_addr: layout::LOAD_ADDR,
            entry: built::$name::ENTRY,
            symbols: built::$name::SYMBOLS,
            min_memory_mib: $min_mib,
            max_vcpus: $max_vcpus,
        }
    };
}

static GUESTS: [Guest; 9] = [
    guest!(spin, "every vCPU started at once, loops forever at ring 0 (idles with hlt)"),
    guest!(
        smp,
        "vCPU 0 loops alone for 200 iterations (~0.2 s), prints \"starting vcpus\", then starts the others"
    ),
    guest!(
        msr,
        "like spin; every 16 iterations each vCPU writes LSTAR and records what its own rdmsr then sees"
    ),
    guest!(
        traps,
        "like spin, with an IDT; runs a breakpoint target, its own int3 every 8 and the hypercall doorbell every 4 iterations"
    ),
    guest!(
        bench,
        "for benchmarks, with an IDT: vCPU 0 runs the tight loop (out, wrmsr, int3, page write, spin or hlt) that the mode word at BENCH_MODE selects"
    ),
    guest!(
        pf,
        "like spin; every 4 iterations each vCPU stores, loads, straddles two data pages and calls a function on its own code page"
    ),
    guest!(poweroff, "vCPU 0 prints \"bye\" and powers off with exit status 0 (port 0xf4)", ABI_MIN_MIB, 1),
    guest!(poweroff7, "vCPU 0 prints \"bye\" and powers off with exit status 7 (port 0xf4)", ABI_MIN_MIB, 1),
    guest!(
        demo,
        "ukos, a tiny OS: a ring-0 kernel with syscalls and 4 ring-3 processes (init, shell, worker, rootkit) on up to 2 vCPUs; needs 32 MiB",
        ukvmi_guest_abi::demo::DEMO_MIN_MEM >> 20,
        ukvmi_guest_abi::demo::MAX_CPUS as u16
    ),
];

/// Every guest, in a fixed order (`spin` first).
#[must_use]
pub fn all() -> &'static [Guest] {
    &GUESTS
}

/// The guest called `name`.
#[must_use]
pub fn find(name: &str) -> Option<&'static Guest> {
    GUESTS.iter().find(|g| g.name == name)
}

/// Addresses, ports and register values of the guest ABI, declared in
/// `ukvmi-guest-abi` (re-exported here for the VMM). `asm/layout.h` holds the
/// same values for the guests (a unit test checks they agree).
pub use ukvmi_guest_abi::layout;

#[cfg(test)]
mod tests {
    use super::layout::*;
    use super::*;

    const NAMES: [&str; 9] = ["spin", "smp", "msr", "traps", "bench", "pf", "poweroff", "poweroff7", "demo"];

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn all_and_find() {
        let names: Vec<_> = all().iter().map(|g| g.name).collect();
        assert_eq!(names, NAMES);
        for name in NAMES {
            let g = find(name).unwrap();
            assert_eq!(g.name, name);
            assert!(std::ptr::eq(g, all().iter().find(|a| a.name == name).unwrap()));
            assert!(!g.summary.is_empty() && !g.summary.contains('\n'), "{name}: summary");
        }
        assert!(find("nope").is_none());
        assert!(find("").is_none());
        assert!(find("Spin").is_none());
    }

    #[test]
    fn needs_are_declared() {
        for g in all() {
            assert!(g.min_memory_mib >= MIN_MEM_SIZE >> 20, "{}: below the ABI's RAM", g.name);
            assert!((1..=MAX_VCPUS).contains(&g.max_vcpus), "{}: {} vCPUs", g.name, g.max_vcpus);
            assert!(g.end() <= g.min_memory_mib << 20, "{}: the image does not fit its own minimum", g.name);
        }
        let demo = find("demo").unwrap();
        assert_eq!((demo.min_memory_mib, demo.max_vcpus), (32, 2));
        assert!(demo.summary.contains("needs 32 MiB") && demo.summary.contains("up to 2 vCPUs"));
        assert_eq!((find("spin").unwrap().min_memory_mib, find("spin").unwrap().max_vcpus), (4, MAX_VCPUS));
        assert_eq!(find("poweroff").unwrap().max_vcpus, 1);
        assert_eq!(find("poweroff7").unwrap().max_vcpus, 1);
    }

    #[test]
    fn images_are_sane() {
        for g in all() {
            assert!(g.image.len() > 16, "{}: image too small", g.name);
            assert!((g.image.len() as u64) < MAX_IMAGE_SIZE, "{}", g.name);
            assert_eq!(g.load_addr, LOAD_ADDR);
            assert_eq!(g.entry, g.load_addr, "{}: _start must be the first byte", g.name);
            assert_eq!(g.symbol("_start"), Some(g.entry));
            assert!(g.end() > g.entry);
            // Every _start begins with `call setup` (e8 rel32).
            assert_eq!(g.image[0], 0xe8, "{}: _start should begin with a call", g.name);
            let banner = format!("ukvmi guest {}: vcpu 0 up\n", g.name);
            assert!(contains(g.image, banner.as_bytes()), "{}: banner", g.name);
            // Ports above 0xff must go through %dx: `mov $0x3f8,%dx` = 66 ba f8 03.
            assert!(contains(g.image, &[0x66, 0xba, 0xf8, 0x03]), "{}: serial port", g.name);
            assert!(contains(g.image, &[0x66, 0xba, 0xf4, 0x00]) == g.name.starts_with("poweroff"));
        }
        assert!(contains(find("smp").unwrap().image, b"starting vcpus\n"));
        assert!(contains(find("poweroff").unwrap().image, b"bye\n"));
    }

    #[test]
    fn symbols_are_sorted_and_inside_the_image() {
        for g in all() {
            for name in ["_start", "setup", "announce", "iterate", "start_others", "puts", "putdec", "lock_print"] {
                assert!(g.symbol(name).is_some(), "{}: no symbol {name}", g.name);
            }
            assert!(g.symbols.windows(2).all(|w| w[0].1 <= w[1].1), "{}: unsorted", g.name);
            for &(name, addr) in g.symbols {
                assert!(addr >= g.load_addr && addr < g.end(), "{}: {name} at {addr:#x}", g.name);
            }
            let iterate = g.symbol("iterate").unwrap();
            assert_eq!(g.symbolize(iterate + 3), Some(("iterate", 3)));
            assert_eq!(g.symbolize(g.entry), Some(("_start", 0)));
            assert_eq!(g.symbolize(g.end()), None);
            assert_eq!(g.symbolize(g.load_addr - 1), None);
        }
        assert!(find("spin").unwrap().symbol("spin_loop").is_some());
        let smp = find("smp").unwrap();
        assert!(smp.symbol("smp_warmup").unwrap() < smp.symbol("smp_loop").unwrap());
    }

    #[test]
    fn pf_guest_function_has_its_own_page() {
        let g = find("pf").unwrap();
        let f = g.symbol("pf_func").unwrap();
        assert_eq!(f % 4096, 0);
        assert!(g.symbol("pf_func_ret").unwrap() < f + 4096);
        assert!(g.symbols.iter().all(|&(n, a)| a < f || a >= f + 4096 || n.starts_with("pf_func")));
        assert!(g.end() >= f + 4096, "the page is padded to its end");
        assert_eq!(g.symbolize(g.symbol("pf_store").unwrap()), Some(("pf_store", 0)));
        assert_eq!(pf_straddle_value(0x1234), 0xb000_1234_a000_1234);
        assert_eq!(pf_straddle_value(0x1000_0001), 0xb000_0001_a000_0001);
        assert_eq!(pf_data_addr(1), 0x31_2000);
    }

    #[test]
    fn exit_status_bytes() {
        for (name, status) in [("poweroff", 0u8), ("poweroff7", 7)] {
            let g = find(name).unwrap();
            let at = g.symbol("exit_status").unwrap() - g.load_addr;
            assert_eq!(g.image[at as usize], status, "{name}");
            assert!(g.symbol("halt_forever").is_some());
        }
    }

    #[test]
    fn bench_loops() {
        let g = find("bench").unwrap();
        let at = |name: &str| g.symbol(name).unwrap_or_else(|| panic!("bench: no {name}"));
        let int3 = at("bench_int3_insn");
        assert_eq!(g.image[(int3 - g.load_addr) as usize], 0xcc, "a one-byte int3");
        assert_eq!(at("bench_after_int3"), int3 + 1);
        let wrmsr = (at("bench_wrmsr_insn") - g.load_addr) as usize;
        assert_eq!(&g.image[wrmsr..wrmsr + 2], &[0x0f, 0x30]);
        // `mov $PORT_BENCH,%dx` = 66 ba 20 06, then `out %al,%dx` = ee.
        let out = (at("bench_out_loop") - g.load_addr) as usize;
        assert_eq!(&g.image[out - 4..=out], &[0x66, 0xba, 0x20, 0x06, 0xee]);
        for name in ["bench_dispatch", "bench_idle", "bench_pf_write", "bench_wrmsr_loop"] {
            at(name);
        }
    }

    /// `asm/layout.h` and [`layout`] must agree.
    #[test]
    fn layout_h_matches_rust() {
        let header = include_str!("../asm/layout.h");
        let define = |name: &str| -> u64 {
            let line = header
                .lines()
                .find(|l| l.split_whitespace().take(2).eq(["#define", name]))
                .unwrap_or_else(|| panic!("layout.h: no {name}"));
            let v = line.split_whitespace().nth(2).unwrap();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).unwrap(),
                None => v.parse().unwrap(),
            }
        };
        assert_eq!(define("LOAD_ADDR"), LOAD_ADDR);
        assert_eq!(define("STACK_TOP"), STACK_TOP);
        assert_eq!(define("STACK_SIZE"), STACK_SIZE);
        assert_eq!(define("MAX_VCPUS"), u64::from(MAX_VCPUS));
        assert_eq!(define("PATTERN_BASE"), PATTERN_BASE);
        assert_eq!(define("PATTERN_SIZE"), PATTERN_SIZE);
        assert_eq!(define("COUNTER_BASE"), COUNTER_BASE);
        assert_eq!(define("PRINT_LOCK"), PRINT_LOCK);
        assert_eq!(define("PORT_SERIAL"), u64::from(PORT_SERIAL));
        assert_eq!(define("PORT_POWEROFF"), u64::from(PORT_POWEROFF));
        assert_eq!(define("PORT_START_VCPU"), u64::from(PORT_START_VCPU));
        assert_eq!(define("R12_TAG"), R12_TAG);
        assert_eq!(define("R15_MAGIC"), R15_MAGIC);
        assert_eq!(define("TICK_EVERY"), TICK_EVERY);
        assert_eq!(define("SMP_WARMUP"), SMP_WARMUP_ITERATIONS);
        assert_eq!(define("MSR_LSTAR"), u64::from(MSR_LSTAR));
        assert_eq!(define("LSTAR_TAG"), LSTAR_TAG);
        assert_eq!(define("MSR_EVERY"), MSR_EVERY);
        assert_eq!(define("MSR_TRIED_BASE"), MSR_TRIED_BASE);
        assert_eq!(define("MSR_SEEN_BASE"), MSR_SEEN_BASE);
        for (name, v) in [
            ("IDT_ADDR", IDT_ADDR),
            ("EXC_COUNT_BASE", EXC_COUNT_BASE),
            ("EXC_INFO_BASE", EXC_INFO_BASE),
            ("EXC_INFO_SIZE", EXC_INFO_SIZE),
            ("BP_TARGET_RUNS", BP_TARGET_RUNS),
            ("INT3_DONE", INT3_DONE),
            ("HC_RESULT_BASE", HC_RESULT_BASE),
            ("HC_COUNT_BASE", HC_COUNT_BASE),
            ("INT3_EVERY", INT3_EVERY),
            ("HC_EVERY", HC_EVERY),
            ("PORT_HYPERCALL", u64::from(PORT_HYPERCALL)),
            ("HC_KVMI_NR", HC_KVMI_NR),
            ("HC_KVMI_SUBFN", HC_KVMI_SUBFN),
            ("BENCH_MODE", BENCH_MODE),
            ("BENCH_COUNT", BENCH_COUNT),
            ("BENCH_PF_PAGE", BENCH_PF_PAGE),
            ("PORT_BENCH", u64::from(PORT_BENCH)),
            ("BENCH_IDLE", BENCH_IDLE),
            ("BENCH_OUT", BENCH_OUT),
            ("BENCH_WRMSR", BENCH_WRMSR),
            ("BENCH_INT3", BENCH_INT3),
            ("BENCH_PF", BENCH_PF),
            ("BENCH_SPIN", BENCH_SPIN),
            ("BENCH_SYSCALL", BENCH_SYSCALL),
            ("BENCH_SYSCALLS", BENCH_SYSCALLS),
            ("BENCH_SYSCALL_WORK", BENCH_SYSCALL_WORK),
            ("BENCH_SYSCALL_OUT_EVERY", BENCH_SYSCALL_OUT_EVERY),
        ] {
            assert_eq!(define(name), v, "{name}");
        }
        assert_eq!(define("PF_DATA_BASE"), PF_DATA_BASE);
        assert_eq!(define("PF_DATA_STRIDE"), PF_DATA_STRIDE);
        assert_eq!(define("PF_MAX_VCPUS"), u64::from(PF_MAX_VCPUS));
        assert_eq!(define("PF_EVERY"), PF_EVERY);
        assert_eq!(define("PF_TAG"), PF_TAG);
        assert_eq!(define("PF_STRADDLE_TAG"), PF_STRADDLE_TAG);
        assert_eq!(define("PF_TRIED_BASE"), PF_TRIED_BASE);
        assert_eq!(define("PF_SEEN_BASE"), PF_SEEN_BASE);
        assert_eq!(define("PF_STRADDLE_TRIED_BASE"), PF_STRADDLE_TRIED_BASE);
        assert_eq!(define("PF_STRADDLE_SEEN_BASE"), PF_STRADDLE_SEEN_BASE);
        assert_eq!(define("PF_EXEC_COUNT_BASE"), PF_EXEC_COUNT_BASE);
        assert_eq!(define("PF_ROUNDS_BASE"), PF_ROUNDS_BASE);
    }
}
