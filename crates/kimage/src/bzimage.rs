//! The bzImage boot protocol header (Documentation/arch/x86/boot.rst).

use crate::bytes::{u16_at, u32_at};

/// Offset of the `HdrS` signature.
const HEADER_MAGIC_AT: usize = 0x202;

/// The fields of a bzImage's setup header that say how to boot it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImage {
    /// Boot protocol version (`0x020f` = 2.15).
    pub version: u16,
    /// Number of 512-byte setup sectors (0 means 4).
    pub setup_sects: u8,
    /// `xloadflags` (bit 0: `XLF_KERNEL_64`, a 64-bit entry at +0x200).
    pub xloadflags: u16,
    /// Offset of the compressed payload from the protected-mode code
    /// (protocol 2.08+; 0 before).
    pub payload_offset: u32,
    /// Length of the compressed payload (protocol 2.08+; 0 before).
    pub payload_length: u32,
}

impl BzImage {
    /// `XLF_KERNEL_64`: the kernel has the 64-bit entry point.
    pub const XLF_KERNEL_64: u16 = 1;

    /// The header, if `bytes` carry the `HdrS` signature.
    pub fn parse(bytes: &[u8]) -> Option<BzImage> {
        if bytes.get(HEADER_MAGIC_AT..HEADER_MAGIC_AT + 4)? != b"HdrS" {
            return None;
        }
        let version = u16_at(bytes, 0x206)?;
        let new = version >= 0x0208;
        Some(BzImage {
            version,
            setup_sects: *bytes.get(0x1f1)?,
            xloadflags: if version >= 0x020c { u16_at(bytes, 0x236)? } else { 0 },
            payload_offset: if new { u32_at(bytes, 0x248)? } else { 0 },
            payload_length: if new { u32_at(bytes, 0x24c)? } else { 0 },
        })
    }

    /// Whether the kernel has a 64-bit entry (boot protocol 2.12+).
    pub fn has_64bit_entry(&self) -> bool {
        self.xloadflags & Self::XLF_KERNEL_64 != 0
    }
}
