//! What this host's KVM offers: probing a VM for the [`HostFeatures`] the
//! endpoint turns into KVMI capabilities, and registering guest RAM as
//! memslot 0.

use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::msr_filter;
use crate::page_access;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use ukvmi_endpoint::{HostCaps, HostFeatures};

/// Probes `vm` (a VM of `kvm`): capabilities, and the MSR filter's exit
/// reason, which it enables on `vm` as a side effect. Page restrictions are
/// left out (`page_access: false`): they are probed on guest RAM
/// (`page_access::probe`).
pub(super) fn probe(kvm: &Kvm, vm: &VmFd) -> HostFeatures {
    let cap = |c: u32| kvm.check_extension_raw(u64::from(c)) > 0;
    HostFeatures {
        msr_events: msr_filter::probe(kvm, vm),
        guest_debug: cap(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG),
        vcpu_events: cap(kvm_bindings::KVM_CAP_VCPU_EVENTS),
        page_access: false,
    }
}

/// Registers all of `ram` as memslot 0 of `vm`; returns its host address.
/// The caller keeps `ram` mapped for as long as `vm` exists.
pub(super) fn register_ram(vm: &VmFd, ram: &GuestRam) -> Result<u64> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size(),
        userspace_addr: ram.host_base()?,
    };
    // SAFETY: the region is `ram`'s own mapping, which the caller keeps
    // alive while `vm` (the only user of the slot) exists: `VmShared`
    // declares `vm` before `ram`, and `host_capabilities` drops them in
    // that order.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    Ok(region.userspace_addr)
}

/// What KVMI commands and events this host serves: probes `/dev/kvm` with a
/// throwaway VM, exactly as [`Vm::new`](super::Vm::new) does for a real one.
pub fn host_capabilities() -> Result<HostCaps> {
    let kvm = Kvm::new().map_err(Error::NoKvm)?;
    let vm = kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
    let mut probed = probe(&kvm, &vm);
    // Page restrictions are probed by really splitting a memslot of RAM.
    let ram = GuestRam::new(1 << 20)?;
    // `vm` is dropped (with its memslots) below, before `ram`.
    let host_base = register_ram(&vm, &ram)?;
    probed.page_access = page_access::probe(&kvm, &vm, host_base, ram.size())?.is_some();
    drop(vm);
    drop(ram);
    Ok(HostCaps::from(probed))
}

/// What kind of KVM this host has: it decides which kernel command-line
/// switches and CPUID edits a Linux guest needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostKind {
    /// VMX or SVM (`kvm_intel`/`kvm_amd`): ring 0 runs on the CPU.
    Hardware,
    /// `kvm_pvm`: ring-0 guest code runs in KVM's instruction emulator.
    Pvm,
    /// None of the modules is visible in /sys/module.
    Unknown,
}

impl HostKind {
    /// Looks at /sys/module for the KVM module that is loaded.
    pub fn probe() -> HostKind {
        let has = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
        if has("kvm_pvm") {
            HostKind::Pvm
        } else if has("kvm_intel") || has("kvm_amd") {
            HostKind::Hardware
        } else {
            HostKind::Unknown
        }
    }
}
