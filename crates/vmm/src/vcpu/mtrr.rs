//! The memory type of a guest-physical address from the MTRR MSRs (SDM
//! 11.11), for `KVMI_VCPU_GET_MTRR_TYPE`.

use ukvmi_endpoint::{BackendError, BackendResult};

pub(super) const MSR_MTRR_CAP: u32 = 0xfe;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
const MTRR_FIX_64K: u32 = 0x250;
const MTRR_FIX_16K: [u32; 2] = [0x258, 0x259];
const MTRR_FIX_4K: [u32; 8] = [0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f];

/// The memory type of `gpa`; `read` reads MSRs by index (all or an error).
pub(super) fn memory_type(gpa: u64, read: &mut dyn FnMut(&[u32]) -> BackendResult<Vec<u64>>) -> BackendResult<u8> {
    let [cap, def] = <[u64; 2]>::try_from(read(&[MSR_MTRR_CAP, MSR_MTRR_DEF_TYPE])?)
        .map_err(|_| BackendError::Failed("MTRR MSRs".into()))?;
    if def & (1 << 11) == 0 {
        return Ok(0); // MTRRs disabled: everything uncacheable.
    }
    // Fixed ranges cover the first MiB.
    if def & (1 << 10) != 0 && cap & (1 << 8) != 0 && gpa < 0x10_0000 {
        let (msr, byte) = if gpa < 0x8_0000 {
            (MTRR_FIX_64K, gpa >> 16)
        } else if gpa < 0xc_0000 {
            let k = (gpa - 0x8_0000) >> 14;
            (MTRR_FIX_16K.get((k / 8) as usize).copied().unwrap_or(MTRR_FIX_16K[0]), k % 8)
        } else {
            let k = (gpa - 0xc_0000) >> 12;
            (MTRR_FIX_4K.get((k / 8) as usize).copied().unwrap_or(MTRR_FIX_4K[0]), k % 8)
        };
        let v = read(&[msr])?.first().copied().unwrap_or(0);
        return Ok((v >> (byte * 8)) as u8);
    }
    // Variable ranges: UC wins, then WT over WB (SDM 11.11.4.1).
    let count = (cap & 0xff) as u32;
    let idx: Vec<u32> =
        (0..count.min(16)).flat_map(|i| [MSR_MTRR_PHYS_BASE0 + 2 * i, MSR_MTRR_PHYS_BASE0 + 2 * i + 1]).collect();
    let vals = read(&idx)?;
    let mut found: Option<u8> = None;
    for pair in vals.chunks_exact(2) {
        let (base, mask) = (pair.first().copied().unwrap_or(0), pair.get(1).copied().unwrap_or(0));
        if mask & (1 << 11) == 0 {
            continue;
        }
        let m = mask & !0xfff;
        if gpa & m == base & m & !0xfff {
            let t = base as u8;
            found = Some(match (found, t) {
                (_, 0) | (Some(0), _) => 0,
                (Some(4), 6) | (Some(6), 4) => 4,
                (_, t) => t,
            });
        }
    }
    Ok(found.unwrap_or(def as u8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// MTRRs enabled (E), fixed ranges enabled (FE), default type `def`.
    const E: u64 = 1 << 11;
    const FE: u64 = 1 << 10;
    /// MTRRCAP: 8 variable ranges, fixed ranges supported.
    const CAP: u64 = 8 | 1 << 8;
    const UC: u64 = 0;
    const WT: u64 = 4;
    const WB: u64 = 6;

    fn run(msrs: &[(u32, u64)], gpa: u64) -> BackendResult<u8> {
        let map: BTreeMap<u32, u64> = msrs.iter().copied().collect();
        memory_type(gpa, &mut |idx| Ok(idx.iter().map(|i| map.get(i).copied().unwrap_or(0)).collect()))
    }

    /// A valid variable range `n` of `size` bytes (a power of two) at `base`.
    fn var(n: u32, base: u64, size: u64, t: u64) -> [(u32, u64); 2] {
        let mask = !(size - 1) & ((1 << 52) - 1);
        [(MSR_MTRR_PHYS_BASE0 + 2 * n, base | t), (MSR_MTRR_PHYS_BASE0 + 2 * n + 1, mask | 1 << 11)]
    }

    #[test]
    fn disabled_mtrrs_make_everything_uncacheable() {
        let msrs = [(MSR_MTRR_CAP, CAP), (MSR_MTRR_DEF_TYPE, WB)];
        assert_eq!(run(&msrs, 0x1234_5000).unwrap(), 0);
    }

    #[test]
    fn without_a_range_the_default_type_applies() {
        let msrs = [(MSR_MTRR_CAP, CAP), (MSR_MTRR_DEF_TYPE, E | WB)];
        assert_eq!(run(&msrs, 0x4000_0000).unwrap(), WB as u8);
    }

    #[test]
    fn fixed_ranges_pick_the_byte_of_their_msr() {
        let msrs = [
            (MSR_MTRR_CAP, CAP),
            (MSR_MTRR_DEF_TYPE, E | FE | WB),
            // 64K: byte 2 covers 0x20000..0x30000.
            (MTRR_FIX_64K, 0x0000_0000_0005_0000),
            // 16K: the second MSR's byte 1 covers 0xa4000..0xa8000.
            (0x259, 0x0000_0000_0000_0100),
            // 4K: the last MSR's byte 7 covers 0xff000..0x100000.
            (0x26f, 0x0400_0000_0000_0000),
        ];
        assert_eq!(run(&msrs, 0x2_1000).unwrap(), 5);
        assert_eq!(run(&msrs, 0x1_0000).unwrap(), 0);
        assert_eq!(run(&msrs, 0xa_4000).unwrap(), 1);
        assert_eq!(run(&msrs, 0xf_f800).unwrap(), 4);
        // Above 1 MiB the fixed ranges do not apply.
        assert_eq!(run(&msrs, 0x10_0000).unwrap(), WB as u8);
    }

    #[test]
    fn fixed_ranges_need_both_the_enable_and_the_capability() {
        let fixed = (MTRR_FIX_64K, 0x05);
        let no_fe = [(MSR_MTRR_CAP, CAP), (MSR_MTRR_DEF_TYPE, E | WB), fixed];
        assert_eq!(run(&no_fe, 0x1000).unwrap(), WB as u8);
        let no_cap = [(MSR_MTRR_CAP, 8), (MSR_MTRR_DEF_TYPE, E | FE | WB), fixed];
        assert_eq!(run(&no_cap, 0x1000).unwrap(), WB as u8);
    }

    #[test]
    fn a_variable_range_applies_inside_it_only() {
        let mut msrs = vec![(MSR_MTRR_CAP, CAP), (MSR_MTRR_DEF_TYPE, E | UC)];
        msrs.extend(var(0, 0x8000_0000, 0x1000_0000, WB));
        assert_eq!(run(&msrs, 0x8000_0000).unwrap(), WB as u8);
        assert_eq!(run(&msrs, 0x8fff_f000).unwrap(), WB as u8);
        assert_eq!(run(&msrs, 0x9000_0000).unwrap(), UC as u8);
    }

    #[test]
    fn overlapping_ranges_uc_wins_then_wt_over_wb() {
        let mut msrs = vec![(MSR_MTRR_CAP, CAP), (MSR_MTRR_DEF_TYPE, E | WB)];
        msrs.extend(var(0, 0, 0x4000_0000, WB));
        msrs.extend(var(1, 0, 0x1000_0000, WT));
        msrs.extend(var(2, 0, 0x100_0000, UC));
        assert_eq!(run(&msrs, 0x200_0000).unwrap(), WT as u8);
        assert_eq!(run(&msrs, 0x80_0000).unwrap(), UC as u8);
        assert_eq!(run(&msrs, 0x2000_0000).unwrap(), WB as u8);
    }

    #[test]
    fn ranges_beyond_the_reported_count_are_ignored() {
        let mut msrs = vec![(MSR_MTRR_CAP, 1), (MSR_MTRR_DEF_TYPE, E | WB)];
        msrs.extend(var(1, 0, 0x4000_0000, UC));
        assert_eq!(run(&msrs, 0x1000).unwrap(), WB as u8);
    }

    #[test]
    fn a_failed_msr_read_is_an_error() {
        let r = memory_type(0, &mut |_| Err(BackendError::Invalid("MSR cannot be read".into())));
        assert!(matches!(r, Err(BackendError::Invalid(_))));
    }
}
