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
