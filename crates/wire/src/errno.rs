//! The `KVM_E*` error codes that KVMI replies carry, negated, in
//! `kvmi_error_code.err` (spec §3).

use core::fmt;

/// One `KVM_E*` error code. On the wire a reply carries its negation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
#[non_exhaustive]
pub enum KvmErrno {
    /// Command or event disallowed by the device manager.
    Eperm = 1,
    /// Missing page, CPUID leaf, or unknown id in CHECK_*.
    Enoent = 2,
    /// Defined, unused by KVMI.
    E2big = 7,
    /// vCPU not yet initialised.
    Eagain = 11,
    /// Allocation failure.
    Enomem = 12,
    /// Defined, unused by KVMI replies.
    Efault = 14,
    /// Busy (too many pending pauses, injection already pending).
    Ebusy = 16,
    /// Bad padding, argument or vCPU index.
    Einval = 22,
    /// Not supported in this context or on this host.
    Eopnotsupp = 95,
    /// Unknown message id.
    Enosys = 1000,
}

impl KvmErrno {
    /// Every code, in value order.
    pub const ALL: [KvmErrno; 10] = [
        KvmErrno::Eperm,
        KvmErrno::Enoent,
        KvmErrno::E2big,
        KvmErrno::Eagain,
        KvmErrno::Enomem,
        KvmErrno::Efault,
        KvmErrno::Ebusy,
        KvmErrno::Einval,
        KvmErrno::Eopnotsupp,
        KvmErrno::Enosys,
    ];

    /// The positive code (`KVM_EPERM` = 1, ...).
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The value a reply's `err` field carries: the negated code.
    pub const fn wire(self) -> i32 {
        -(self as i32)
    }

    /// Decodes a reply's `err` field (a negative value). `None` for 0 and for
    /// values KVM does not define.
    pub const fn from_wire(err: i32) -> Option<KvmErrno> {
        match err.checked_neg() {
            Some(v) => Self::from_code(v),
            None => None,
        }
    }

    /// Decodes a positive code.
    pub const fn from_code(code: i32) -> Option<KvmErrno> {
        Some(match code {
            1 => KvmErrno::Eperm,
            2 => KvmErrno::Enoent,
            7 => KvmErrno::E2big,
            11 => KvmErrno::Eagain,
            12 => KvmErrno::Enomem,
            14 => KvmErrno::Efault,
            16 => KvmErrno::Ebusy,
            22 => KvmErrno::Einval,
            95 => KvmErrno::Eopnotsupp,
            1000 => KvmErrno::Enosys,
            _ => return None,
        })
    }

    /// The constant's name, e.g. `"KVM_EINVAL"`.
    pub const fn name(self) -> &'static str {
        match self {
            KvmErrno::Eperm => "KVM_EPERM",
            KvmErrno::Enoent => "KVM_ENOENT",
            KvmErrno::E2big => "KVM_E2BIG",
            KvmErrno::Eagain => "KVM_EAGAIN",
            KvmErrno::Enomem => "KVM_ENOMEM",
            KvmErrno::Efault => "KVM_EFAULT",
            KvmErrno::Ebusy => "KVM_EBUSY",
            KvmErrno::Einval => "KVM_EINVAL",
            KvmErrno::Eopnotsupp => "KVM_EOPNOTSUPP",
            KvmErrno::Enosys => "KVM_ENOSYS",
        }
    }

    /// What the code generally means in KVMI (spec §3).
    pub const fn meaning(self) -> &'static str {
        match self {
            KvmErrno::Eperm => "not allowed by the device manager",
            KvmErrno::Enoent => "no such page, leaf or id",
            KvmErrno::E2big => "argument list too long",
            KvmErrno::Eagain => "vCPU not initialised yet",
            KvmErrno::Enomem => "out of memory",
            KvmErrno::Efault => "bad address",
            KvmErrno::Ebusy => "busy",
            KvmErrno::Einval => "invalid argument, padding or vCPU index",
            KvmErrno::Eopnotsupp => "not supported on this host or in this state",
            KvmErrno::Enosys => "unknown message id",
        }
    }
}

impl fmt::Display for KvmErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-{} ({})", self.name(), self.meaning())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_the_wire() {
        for e in KvmErrno::ALL {
            assert_eq!(KvmErrno::from_wire(e.wire()), Some(e));
            assert!(e.wire() < 0);
        }
        assert_eq!(KvmErrno::from_wire(0), None);
        assert_eq!(KvmErrno::from_wire(i32::MIN), None);
        assert_eq!(KvmErrno::from_wire(-3), None);
    }

    #[test]
    fn values_match_kvm_para_h() {
        assert_eq!(KvmErrno::Eperm.wire(), -1);
        assert_eq!(KvmErrno::Enoent.wire(), -2);
        assert_eq!(KvmErrno::Eagain.wire(), -11);
        assert_eq!(KvmErrno::Enomem.wire(), -12);
        assert_eq!(KvmErrno::Ebusy.wire(), -16);
        assert_eq!(KvmErrno::Einval.wire(), -22);
        assert_eq!(KvmErrno::Eopnotsupp.wire(), -95);
        assert_eq!(KvmErrno::Enosys.wire(), -1000);
    }
}
