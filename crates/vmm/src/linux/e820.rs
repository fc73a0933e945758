//! The guest's memory map for a Linux boot (e820 types), pure.

/// Usable RAM.
pub(crate) const E820_RAM: u32 = 1;
/// Reserved (EBDA, the BIOS area).
pub(crate) const E820_RESERVED: u32 = 2;

/// One memory-map entry: `[addr, addr + size)` of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map of `ram` bytes of RAM from gpa 0: low RAM below the EBDA, the
/// EBDA and BIOS areas reserved, RAM from 1 MiB up. Entries are clipped to
/// `ram` and empty ones dropped, so none overlaps another or crosses the
/// end of RAM.
pub(crate) fn e820(ram: u64) -> Vec<E820Entry> {
    let table = [
        (0, 0x9_fc00, E820_RAM),
        (0x9_fc00, 0xa_0000, E820_RESERVED),
        (0xf_0000, 0x10_0000, E820_RESERVED),
        (0x10_0000, ram, E820_RAM),
    ];
    table
        .iter()
        .filter_map(|&(start, end, kind)| {
            let end = end.min(ram);
            (end > start).then(|| E820Entry { addr: start, size: end - start, kind })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(ram: u64) -> Vec<E820Entry> {
        let m = e820(ram);
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{m:?} overlaps");
        }
        for e in &m {
            assert!(e.size > 0 && e.addr + e.size <= ram, "{e:?} crosses {ram:#x}");
        }
        m
    }

    #[test]
    fn the_map_has_low_ram_the_bios_holes_and_high_ram() {
        for mib in [64u64, 256, 3072] {
            let ram = mib << 20;
            let m = check(ram);
            assert_eq!(
                m,
                vec![
                    E820Entry { addr: 0, size: 0x9_fc00, kind: E820_RAM },
                    E820Entry { addr: 0x9_fc00, size: 0x400, kind: E820_RESERVED },
                    E820Entry { addr: 0xf_0000, size: 0x1_0000, kind: E820_RESERVED },
                    E820Entry { addr: 0x10_0000, size: ram - 0x10_0000, kind: E820_RAM },
                ]
            );
        }
    }

    #[test]
    fn tiny_ram_is_clipped() {
        let m = check(0x8_0000);
        assert_eq!(m, vec![E820Entry { addr: 0, size: 0x8_0000, kind: E820_RAM }]);
        assert_eq!(check(0xf_8000).len(), 3);
    }
}
