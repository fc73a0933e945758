//! Where memslot changes go (`SlotSink`: KVM, or a recorder in unit tests)
//! and the guest RAM the page-table check reads (`GuestPages`).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;

/// KVM refused a memslot change: `KVM_SET_USER_MEMORY_REGION`'s errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("{0}")]
pub(crate) struct SlotError(pub kvm_ioctls::Error);

/// Guest RAM as the page-table walk reads it (`page_tables`).
pub(crate) trait GuestPages {
    /// Fills `buf` from guest-physical `gpa`; false if that is not RAM.
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

/// The VM's RAM.
impl GuestPages for crate::vm::VmShared {
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.ram.read(gpa, buf).is_ok()
    }
}

/// A bare VM fd (the probe): no guest, no tables.
impl GuestPages for VmFd {
    fn read_ram(&self, _gpa: u64, _buf: &mut [u8]) -> bool {
        false
    }
}

/// Where memslot changes go: KVM, or a recorder in unit tests; it also
/// reads the RAM of the guest whose layout it changes.
pub(crate) trait SlotSink: GuestPages {
    /// `KVM_SET_USER_MEMORY_REGION` (a size of 0 deletes the slot).
    fn set_region(&self, region: kvm_userspace_memory_region) -> Result<(), SlotError>;
    /// Called before the first change of an update: no vCPU may be in
    /// guest mode until `end_update`.
    fn begin_update(&self) {}
    /// The update is over.
    fn end_update(&self) {}
}

/// `KVM_SET_USER_MEMORY_REGION` on a VM fd.
pub(crate) fn set_region(vm: &VmFd, region: kvm_userspace_memory_region) -> Result<(), SlotError> {
    // SAFETY: every region we pass lies inside guest RAM's own mapping
    // (`host_base` + gpa, bounded by the RAM size checked in `set_with`),
    // which lives as long as the VM; a size of 0 only deletes.
    unsafe { vm.set_user_memory_region(region) }.map_err(SlotError)
}

impl SlotSink for VmFd {
    fn set_region(&self, region: kvm_userspace_memory_region) -> Result<(), SlotError> {
        set_region(self, region)
    }
}
