//! Typed vocabulary: guest addresses (`Gpa`, `Gva`, `Gfn`), vCPU indexes,
//! message and event ids, and page-access rights, so that a `u64` that is a
//! physical address cannot be passed where a virtual one is meant.
//!
//! Every newtype converts from and to its raw integer (`From`, `.raw()`), so
//! the wire structures keep their plain integer fields.

use std::fmt;

use crate::ids::{access, event, msg};

/// Defines a transparent integer newtype with conversions and formatting.
macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($int:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(transparent)]
        pub struct $name(pub $int);

        impl $name {
            /// The raw integer.
            pub const fn raw(self) -> $int {
                self.0
            }
        }

        impl From<$int> for $name {
            fn from(v: $int) -> Self {
                $name(v)
            }
        }

        impl From<$name> for $int {
            fn from(v: $name) -> $int {
                v.0
            }
        }

        impl PartialEq<$int> for $name {
            fn eq(&self, other: &$int) -> bool {
                self.0 == *other
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

newtype!(
    /// A guest-physical address.
    Gpa(u64)
);
newtype!(
    /// A guest-virtual address.
    Gva(u64)
);
newtype!(
    /// A guest frame number (a guest-physical address divided by the page size).
    Gfn(u64)
);
newtype!(
    /// A vCPU index.
    VcpuId(u16)
);
newtype!(
    /// A message id (`msg::*`): a command, or 0/1 for events and their replies.
    CommandId(u16)
);
newtype!(
    /// An event id (`event::*`).
    EventId(u16)
);

impl fmt::Debug for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpa({:#x})", self.0)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for Gva {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gva({:#x})", self.0)
    }
}

impl fmt::Display for Gva {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gfn({:#x})", self.0)
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl Gpa {
    /// The frame holding this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> 12)
    }

    /// The address `off` bytes further, `None` on overflow.
    pub const fn checked_add(self, off: u64) -> Option<Gpa> {
        match self.0.checked_add(off) {
            Some(v) => Some(Gpa(v)),
            None => None,
        }
    }
}

impl Gfn {
    /// The address of the frame's first byte.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0 << 12)
    }
}

impl fmt::Debug for VcpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VcpuId({})", self.0)
    }
}

impl fmt::Display for VcpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl CommandId {
    /// The kernel's name of the id, e.g. `"KVMI_VM_READ_PHYSICAL"`.
    pub const fn name(self) -> Option<&'static str> {
        msg::name(self.0)
    }
}

impl fmt::Debug for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "CommandId({n})"),
            None => write!(f, "CommandId({:#x})", self.0),
        }
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "message {:#x}", self.0),
        }
    }
}

impl EventId {
    /// The kernel's name of the event, e.g. `"KVMI_VCPU_EVENT_BREAKPOINT"`.
    pub const fn name(self) -> Option<&'static str> {
        event::name(self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "EventId({n})"),
            None => write!(f, "EventId({})", self.0),
        }
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "event {}", self.0),
        }
    }
}

bitflags::bitflags! {
    /// Page access rights (`KVMI_PAGE_ACCESS_*`) for `KVMI_VM_SET_PAGE_ACCESS`
    /// and the PF event: a set bit means the access is allowed (or, in a PF
    /// event, was attempted).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Access: u8 {
        /// Reads.
        const R = access::R;
        /// Writes.
        const W = access::W;
        /// Instruction fetches.
        const X = access::X;
        /// Every access (the page is forgotten).
        const RWX = access::RWX;
    }
}

impl From<u8> for Access {
    /// The bits as they are, unknown ones included (the receiver checks them).
    fn from(bits: u8) -> Access {
        Access::from_bits_retain(bits)
    }
}

impl From<Access> for u8 {
    fn from(a: Access) -> u8 {
        a.bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newtypes_round_trip_and_format() {
        let g = Gpa::from(0x1234_5678u64);
        assert_eq!(u64::from(g), 0x1234_5678);
        assert_eq!(g.raw(), 0x1234_5678);
        assert_eq!(format!("{g}"), "0x12345678");
        assert_eq!(format!("{g:?}"), "Gpa(0x12345678)");
        assert_eq!(format!("{g:x}"), "12345678");
        assert_eq!(g.gfn(), Gfn(0x12345));
        assert_eq!(g.gfn().gpa(), Gpa(0x1234_5000));
        assert_eq!(Gpa(u64::MAX).checked_add(1), None);
        assert_eq!(VcpuId::from(3u16).to_string(), "3");
        assert!(VcpuId(3) == 3 && VcpuId(3) != 4, "compares with the raw integer");
        assert_eq!(CommandId(msg::VM_READ_PHYSICAL).to_string(), "KVMI_VM_READ_PHYSICAL");
        assert_eq!(CommandId(0x7777).to_string(), "message 0x7777");
        assert_eq!(EventId(event::BREAKPOINT).name(), Some("KVMI_VCPU_EVENT_BREAKPOINT"));
        assert_eq!(EventId(99).to_string(), "event 99");
    }

    #[test]
    fn access_bits_are_the_wire_values() {
        assert_eq!((Access::R | Access::X).bits(), 5);
        assert_eq!(Access::RWX, Access::all());
        assert_eq!(Access::from(0x80).bits(), 0x80, "unknown bits travel as they are");
        assert_eq!(u8::from(Access::W), access::W);
    }
}
