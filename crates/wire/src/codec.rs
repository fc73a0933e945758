//! Reading structures out of message bodies and framing messages.
//!
//! The kernel reads every body into a zero-filled buffer, so a body shorter
//! than the structure a handler expects reads as if zero-extended, and a
//! longer one has its tail ignored. [`read_zext`] does exactly that, and never
//! panics, whatever the input.

use crate::structs::MsgHdr;
use crate::MSG_HDR_SIZE;
use zerocopy::{FromBytes, IntoBytes};

/// Reads a `T` from the start of `bytes`, zero-extending a short input and
/// ignoring anything past `size_of::<T>()`.
pub fn read_zext<T: FromBytes + IntoBytes>(bytes: &[u8]) -> T {
    let mut v = T::new_zeroed();
    for (d, s) in v.as_mut_bytes().iter_mut().zip(bytes) {
        *d = *s;
    }
    v
}

/// The bytes of `bytes` from `offset` on (empty when `offset` is past the end).
pub fn tail(bytes: &[u8], offset: usize) -> &[u8] {
    bytes.get(offset..).unwrap_or(&[])
}

/// Why a message could not be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The body size that was asked for.
    pub size: usize,
}

impl core::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "message body of {} bytes exceeds KVMI_MAX_MSG_SIZE ({})", self.size, crate::MAX_MSG_SIZE)
    }
}

impl std::error::Error for TooLarge {}

/// Builds one message: header (`id`, `seq`, size = the parts' total) followed
/// by the parts, ready for a single `send`.
pub fn frame(id: u16, seq: u32, parts: &[&[u8]]) -> Result<Vec<u8>, TooLarge> {
    let size: usize = parts.iter().map(|p| p.len()).sum();
    if size > crate::MAX_MSG_SIZE {
        return Err(TooLarge { size });
    }
    let mut out = Vec::with_capacity(MSG_HDR_SIZE + size);
    // `size` ≤ 8184 was checked above, so it fits in u16.
    let hdr = MsgHdr { id, size: size as u16, seq };
    out.extend_from_slice(hdr.as_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::structs::{VcpuHdr, VmPhysical};

    #[test]
    fn short_bodies_are_zero_extended() {
        let v: VmPhysical = read_zext(&[1, 2, 3]);
        assert_eq!(v.gpa, 0x030201);
        assert_eq!(v.size, 0);
        let h: VcpuHdr = read_zext(&[]);
        assert_eq!(h, VcpuHdr::default());
    }

    #[test]
    fn long_bodies_are_truncated() {
        let bytes = [0xffu8; 100];
        let h: VcpuHdr = read_zext(&bytes);
        assert_eq!(h.vcpu, 0xffff);
        assert_eq!(h.padding2, 0xffff_ffff);
    }

    #[test]
    fn frame_rejects_oversize_bodies() {
        let big = vec![0u8; crate::MAX_MSG_SIZE + 1];
        assert_eq!(frame(2, 0, &[&big]), Err(TooLarge { size: crate::MAX_MSG_SIZE + 1 }));
        let ok = frame(2, 7, &[&big[..crate::MAX_MSG_SIZE]]).expect("max size fits");
        let hdr: MsgHdr = read_zext(&ok);
        assert_eq!((hdr.id, hdr.size as usize, hdr.seq), (2, crate::MAX_MSG_SIZE, 7));
    }

    #[test]
    fn tail_past_the_end_is_empty() {
        assert_eq!(tail(&[1, 2, 3], 2), &[3]);
        assert!(tail(&[1, 2, 3], 9).is_empty());
    }
}
