//! What this host's KVM offers: probing a VM for capabilities, and
//! registering guest RAM as memslot 0.

use crate::error::{Error, Result};
use crate::memory::GuestRam;
use crate::msr_filter;
use crate::page_access;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use ukvmi_endpoint::HostCaps;
use ukvmi_wire::{event, msg};

/// What the probe found on this host.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Probed {
    /// MSR-write exits through the MSR filter.
    pub msr_events: bool,
    /// `KVM_SET_GUEST_DEBUG` (single-step, int3 exits).
    pub guest_debug: bool,
    /// `KVM_GET/SET_VCPU_EVENTS` (exception injection, #BP re-injection).
    pub vcpu_events: bool,
    /// Page restrictions by memslot surgery work (`page_access::probe`).
    pub page_access: bool,
}

/// Probes `vm` (a VM of `kvm`): capabilities, and the MSR filter's exit
/// reason, which it enables on `vm` as a side effect.
pub(super) fn probe(kvm: &Kvm, vm: &VmFd) -> Probed {
    let cap = |c: u32| kvm.check_extension_raw(u64::from(c)) > 0;
    Probed {
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
    let kvm = Kvm::new().map_err(|e| Error::NoKvm(e.to_string()))?;
    let vm = kvm.create_vm().map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
    let mut probed = probe(&kvm, &vm);
    // Page restrictions are probed by really splitting a memslot of RAM.
    let ram = GuestRam::new(1 << 20)?;
    // `vm` is dropped (with its memslots) below, before `ram`.
    let host_base = register_ram(&vm, &ram)?;
    probed.page_access = page_access::probe(&kvm, &vm, host_base, ram.size()).map_err(Error::Config)?.is_some();
    drop(vm);
    drop(ram);
    Ok(host_caps(probed))
}

/// What this host can do through stock KVM, decided by probing. What is
/// missing answers `-KVM_EOPNOTSUPP` up front, never failing later.
///
/// CR, XSETBV and DESCRIPTOR events (and CONTROL_CR) have no exit to
/// userspace on a stock kernel. BREAKPOINT needs #BP re-injection
/// (VCPU_EVENTS); HYPERCALL is the VMM's own doorbell and always works.
pub(super) fn host_caps(p: Probed) -> HostCaps {
    let mut caps = HostCaps::full().without_command(msg::VCPU_CONTROL_CR);
    if !p.vcpu_events {
        caps = caps.without_command(msg::VCPU_INJECT_EXCEPTION);
    }
    if !p.guest_debug {
        caps = caps.without_command(msg::VCPU_CONTROL_SINGLESTEP);
    }
    if !p.msr_events {
        caps = caps.without_command(msg::VCPU_CONTROL_MSR);
    }
    if !p.page_access {
        caps = caps.without_command(msg::VM_SET_PAGE_ACCESS);
    }
    for id in event::VCPU_EVENTS {
        let have = match id {
            event::PAUSE | event::HYPERCALL => true,
            event::MSR => p.msr_events,
            event::BREAKPOINT | event::TRAP => p.vcpu_events,
            event::SINGLESTEP => p.guest_debug,
            event::PF => p.page_access,
            _ => false,
        };
        if !have {
            caps = caps.without_event(id);
        }
    }
    caps
}
