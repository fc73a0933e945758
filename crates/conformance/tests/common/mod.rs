//! Helpers shared by the conformance tests that drive the fake VM through
//! the introspector library: connecting, error codes, KVM_E* values.
#![allow(dead_code)]

use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_introspector::Vm;

/// `-KVM_EPERM`.
pub const EPERM: i32 = -1;
/// `-KVM_ENOENT`.
pub const ENOENT: i32 = -2;
/// `-KVM_EAGAIN`.
pub const EAGAIN: i32 = -11;
/// `-KVM_EINVAL`.
pub const EINVAL: i32 = -22;
/// `-KVM_EOPNOTSUPP`.
pub const EOPNOTSUPP: i32 = -95;
/// `-KVM_ENOSYS`.
pub const ENOSYS: i32 = -1000;

/// Starts a fake VM with `cfg` and connects the library to it (no handshake).
pub fn connect(cfg: &FakeConfig) -> (Setup, Vm) {
    let s = Setup::new(cfg);
    let vm = Vm::connect_raw(s.connect()).unwrap();
    (s, vm)
}

/// 0 for `Ok`, the raw `err` of a failed reply; panics on any other error.
pub fn code<X>(r: ukvmi_introspector::Result<X>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_err().unwrap_or_else(|| panic!("not a KVM error: {e}")),
    }
}
