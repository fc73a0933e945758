//! The hypercall doorbell every guest rings, and KVMI's register convention for it.
//!
//! A guest rings the doorbell with `out %eax,%dx` to [`PORT_HYPERCALL`] and
//! KVMI's VMCALL registers: RAX = [`HC_KVMI_NR`], RDI = [`HC_KVMI_SUBFN`],
//! RSI = 0. The VMM turns that into a KVMI HYPERCALL event; the result comes
//! back in RAX: 0 when the introspector answered, [`HC_NOBODY`] (`-KVM_ENOSYS`)
//! when no event was sent.

/// The doorbell's I/O port.
pub const PORT_HYPERCALL: u16 = 0x610;
/// RAX of a KVMI hypercall.
pub const HC_KVMI_NR: u64 = 34;
/// RDI of a KVMI hypercall (64-bit mode).
pub const HC_KVMI_SUBFN: u64 = 24;
/// RAX after the doorbell when nobody listened: -1000 (`-KVM_ENOSYS`).
pub const HC_NOBODY: i64 = -1000;
