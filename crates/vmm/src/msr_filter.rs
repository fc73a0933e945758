//! MSR-write events on stock KVM: `KVM_CAP_X86_USER_SPACE_MSR` with the
//! filter exit reason, and `KVM_X86_SET_MSR_FILTER` denying guest writes to
//! the watched MSRs. A denied write exits to the VMM (`KVM_EXIT_X86_WRMSR`)
//! before it takes effect; the VMM raises the MSR event and then writes the
//! value the tool chose (or the guest's) with `KVM_SET_MSRS`, which the
//! filter does not apply to.
//!
//! The filter is VM-wide while KVMI watches per vCPU, so the filter covers
//! the union of watched MSRs; a vCPU that gets an exit for an MSR it does
//! not watch simply completes the write.

use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use ukvmi_endpoint::{BackendError, BackendResult};

/// MSRs whose guest writes `KVM_SET_MSRS` cannot reproduce: for these KVM
/// treats a host write differently (it skips the guest-write validity checks
/// or side effects: TSC offsetting for TSC and TSC_ADJUST, EFER's paging
/// checks, APIC_BASE's transitions, read-only feature MSRs). Watching one
/// would change what the guest's own write does, so CONTROL_MSR answers
/// `-KVM_EOPNOTSUPP` for them rather than pretend.
pub(crate) const HOST_WRITE_DIFFERS: [u32; 11] = [
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x3a,        // IA32_FEATURE_CONTROL
    0x3b,        // IA32_TSC_ADJUST
    0x48,        // IA32_SPEC_CTRL
    0x49,        // IA32_PRED_CMD
    0x10a,       // IA32_ARCH_CAPABILITIES
    0x10b,       // IA32_FLUSH_CMD
    0x1a0,       // IA32_MISC_ENABLE
    0xda0,       // IA32_XSS
    0xc000_0080, // EFER
];

/// KVMI's two MSR ranges (spec §8.21), each 0x2000 MSRs.
const RANGES: [u32; 2] = [0, 0xc000_0000];
const RANGE_LEN: u32 = 0x2000;

/// Which vCPUs watch which MSRs, and the filter that follows from it.
#[derive(Debug, Default)]
pub(crate) struct MsrFilter {
    watched: Mutex<BTreeMap<u32, BTreeSet<u16>>>,
}

/// Whether this host can deliver MSR-write exits to userspace (enables the
/// capability on `vm` as a side effect).
pub(crate) fn probe(kvm: &Kvm, vm: &VmFd) -> bool {
    if kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR)) == 0
        || kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_X86_MSR_FILTER)) == 0
    {
        return false;
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

impl MsrFilter {
    /// The MSRs whose guest writes the filter stops now.
    pub fn watched(&self) -> Vec<u32> {
        self.watched.lock().unwrap_or_else(|e| e.into_inner()).keys().copied().collect()
    }

    /// vCPU `vcpu` starts or stops watching `msr`; the VM's filter follows.
    pub fn watch(&self, vm: &VmFd, vcpu: u16, msr: u32, enable: bool) -> BackendResult<()> {
        if enable && HOST_WRITE_DIFFERS.contains(&msr) {
            return Err(BackendError::NotSupported);
        }
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let before = w.clone();
        if enable {
            w.entry(msr).or_default().insert(vcpu);
        } else if let Some(set) = w.get_mut(&msr) {
            set.remove(&vcpu);
            if set.is_empty() {
                w.remove(&msr);
            }
        }
        if w.keys().eq(before.keys()) {
            return Ok(());
        }
        if let Err(e) = install(vm, &w) {
            *w = before;
            return Err(BackendError::Failed(format!("KVM_X86_SET_MSR_FILTER: {e}")));
        }
        Ok(())
    }
}

fn install(vm: &VmFd, watched: &BTreeMap<u32, BTreeSet<u16>>) -> Result<(), kvm_ioctls::Error> {
    let mut bitmaps = [vec![0xffu8; (RANGE_LEN / 8) as usize], vec![0xffu8; (RANGE_LEN / 8) as usize]];
    for msr in watched.keys() {
        for (base, bitmap) in RANGES.iter().zip(bitmaps.iter_mut()) {
            if let Some(bit) = msr.checked_sub(*base).filter(|b| *b < RANGE_LEN) {
                if let Some(byte) = bitmap.get_mut((bit / 8) as usize) {
                    *byte &= !(1 << (bit % 8)); // a clear bit denies the write
                }
            }
        }
    }
    if watched.is_empty() {
        return vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[]);
    }
    let ranges: Vec<MsrFilterRange<'_>> = RANGES
        .iter()
        .zip(bitmaps.iter())
        .map(|(base, bitmap)| MsrFilterRange {
            flags: MsrFilterRangeFlags::WRITE,
            base: *base,
            msr_count: RANGE_LEN,
            bitmap,
        })
        .collect();
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
}
