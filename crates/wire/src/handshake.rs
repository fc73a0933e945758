//! The QEMU ⇄ introspector handshake that precedes KVMI on the socket
//! (`handshake.md`). The device manager sends [`ToIntrospector`] first, the
//! tool answers with [`FromIntrospector`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `qemu_vmi_to_introspector` as sent by KVM-VMI QEMU `kvmi-v12` (104 bytes).
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ToIntrospector {
    /// Size of the structure as sent.
    pub struct_size: u32,
    /// VM UUID.
    pub uuid: [u8; 16],
    /// Zero.
    pub padding: u32,
    /// VM start time, host clock, seconds.
    pub start_time: i64,
    /// VM name, NUL-terminated, at most 63 characters.
    pub name: [u8; 64],
    /// Highest end address of guest RAM.
    pub max_gpa: u64,
}
const _: () = assert!(core::mem::size_of::<ToIntrospector>() == 104);

/// `qemu_vmi_from_introspector` (24 bytes).
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FromIntrospector {
    /// Size of the structure as sent (24).
    pub struct_size: u32,
    /// SHA-1 of the shared secret.
    pub cookie_hash: [u8; 20],
}
const _: () = assert!(core::mem::size_of::<FromIntrospector>() == 24);

/// Smallest `ToIntrospector::struct_size` a tool accepts: everything before `name`.
pub const TO_INTROSPECTOR_MIN: u32 = 32;
/// Largest `ToIntrospector::struct_size` a tool accepts (libkvmi's bound).
pub const TO_INTROSPECTOR_MAX: u32 = 65536;
/// Smallest `FromIntrospector::struct_size` the device manager accepts.
pub const FROM_INTROSPECTOR_MIN: u32 = 24;

impl ToIntrospector {
    /// Builds the structure, truncating `name` to 63 bytes.
    pub fn new(uuid: [u8; 16], start_time: i64, name: &str, max_gpa: u64) -> Self {
        let mut s = ToIntrospector {
            struct_size: core::mem::size_of::<Self>() as u32,
            uuid,
            padding: 0,
            start_time,
            name: [0; 64],
            max_gpa,
        };
        // Keep the last byte as the terminating NUL.
        for (d, c) in s.name.iter_mut().take(63).zip(name.bytes()) {
            *d = c;
        }
        s
    }

    /// The name up to its first NUL, lossily decoded.
    pub fn name_str(&self) -> String {
        let bytes: Vec<u8> = self.name.iter().copied().take_while(|&b| b != 0).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl FromIntrospector {
    /// Builds a reply carrying `cookie_hash`.
    pub fn new(cookie_hash: [u8; 20]) -> Self {
        FromIntrospector { struct_size: core::mem::size_of::<Self>() as u32, cookie_hash }
    }
}
