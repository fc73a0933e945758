//! Register reads without an ioctl: the registers KVM stores in `kvm_run`
//! at every exit (`KVM_CAP_SYNC_REGS`), and the MSRs an MSR event already
//! read, kept until anything may change them.
//!
//! A vCPU ioctl costs 8–10 µs on a nested PVM host, and building one event
//! took three (`KVM_GET_REGS`, `KVM_GET_SREGS`, `KVM_GET_MSRS`). With
//! `kvm_valid_regs` set, KVM copies the general and special registers into
//! `kvm_run.s.regs` on its way out of every `KVM_RUN`, so both reads become
//! memory copies.
//!
//! Writes: a tool's registers (SET_REGISTERS, applied with its reply) go
//! into the same area with `kvm_dirty_regs`, and KVM loads them at the
//! next `KVM_RUN` before anything else — one ioctl fewer per RETRY. Until
//! then the area is the truth for reads, and any other vCPU ioctl that
//! changes state first flushes them with `KVM_SET_REGS` ([`KvmVcpu::
//! before_vcpu_write`]), so KVM never sees writes out of order. Every such
//! ioctl also forgets what is cached; later reads go to KVM again.
//!
//! `UKVMI_SYNC_REGS=0` in the VMM's environment turns it off (for
//! comparisons in benchmarks).

use super::KvmVcpu;
use kvm_bindings::{kvm_regs, kvm_sregs, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS};
/// RFLAGS bit 1, which KVM always sets.
const RFLAGS_FIXED: u64 = 1 << 1;
use kvm_ioctls::{Cap, SyncReg, VmFd};

/// What the vCPU thread may read from memory instead of asking KVM.
#[derive(Debug, Default)]
pub(crate) struct RegsCache {
    /// KVM fills `kvm_run.s.regs` (regs and sregs) at every exit.
    enabled: bool,
    /// `kvm_run.s.regs.regs` is the vCPU's state now.
    regs: bool,
    /// `kvm_run.s.regs.sregs` is the vCPU's state now.
    sregs: bool,
    /// MSR values read since the last exit: (index, value).
    msrs: Vec<(u32, u64)>,
    /// General registers written into the area for the next `KVM_RUN` to
    /// load (a copy: should that run not load them, they are set by ioctl).
    dirty: Option<kvm_regs>,
}

/// Whether this host's KVM stores regs and sregs at exits, and the
/// environment did not turn that off.
fn sync_regs_usable(vm: &VmFd) -> bool {
    if std::env::var_os("UKVMI_SYNC_REGS").is_some_and(|v| v == "0") {
        return false;
    }
    let want = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    let offered = u32::try_from(vm.check_extension_int(Cap::SyncRegs)).unwrap_or(0);
    offered & want == want
}

impl RegsCache {
    /// Forgets everything: registers or MSRs may have changed.
    pub(crate) fn invalidate(&mut self) {
        self.regs = false;
        self.sregs = false;
        self.msrs.clear();
    }

    /// The values of `indices` if every one was read since the last exit.
    pub(crate) fn msrs(&self, indices: &[u32]) -> Option<Vec<u64>> {
        indices.iter().map(|i| self.msrs.iter().find(|(j, _)| j == i).map(|(_, v)| *v)).collect()
    }

    /// After `KVM_RUN` returned (for any reason: KVM stores the registers
    /// on every way out): the sync area holds the vCPU's state.
    pub(crate) fn exited(&mut self) {
        self.regs = self.enabled;
        self.sregs = self.enabled;
        self.msrs.clear();
    }

    /// Remembers MSR values just read from KVM.
    pub(crate) fn keep_msrs(&mut self, indices: &[u32], values: &[u64]) {
        for (&i, &v) in indices.iter().zip(values) {
            if !self.msrs.iter().any(|(j, _)| *j == i) {
                self.msrs.push((i, v));
            }
        }
    }
}

impl KvmVcpu {
    /// Asks KVM to store regs and sregs in `kvm_run` at every exit, where
    /// it can. Called once on the vCPU's thread before its first entry.
    pub(super) fn enable_regs_cache(&mut self) {
        if sync_regs_usable(&self.shared.vm) {
            self.fd.set_sync_valid_reg(SyncReg::Register);
            self.fd.set_sync_valid_reg(SyncReg::SystemRegister);
            self.regs_cache.enabled = true;
        }
    }

    /// Registers written for a `KVM_RUN` that returned without loading
    /// them (it failed, or the vCPU was not yet started) are set by ioctl:
    /// that run's exit overwrote the area. Called once the exit is decoded
    /// (such a run ran no guest code, so decoding read no registers).
    pub(super) fn reapply_unloaded_regs(&mut self) {
        let Some(regs) = self.regs_cache.dirty.take() else { return };
        let run = self.fd.get_kvm_run();
        if run.kvm_dirty_regs & u64::from(KVM_SYNC_X86_REGS) != 0 {
            run.kvm_dirty_regs &= !u64::from(KVM_SYNC_X86_REGS);
            self.regs_cache.regs = false;
            let _ = self.fd.set_regs(&regs);
        }
    }

    /// Sets the general registers: into the sync area for the next
    /// `KVM_RUN` where that is safe, else `KVM_SET_REGS`. Not while KVM
    /// single-steps (hardware KVM must see RIP change before the guest
    /// debug flags are set again, see `put_regs`).
    pub(super) fn write_regs(&mut self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        if self.regs_cache.regs && !self.stepping() {
            let mut regs = *regs;
            regs.rflags |= RFLAGS_FIXED;
            self.fd.sync_regs_mut().regs = regs;
            self.fd.set_sync_dirty_reg(SyncReg::Register);
            self.regs_cache.dirty = Some(regs);
            self.regs_cache.msrs.clear();
            return Ok(());
        }
        self.drop_dirty_regs();
        self.regs_cache.regs = false;
        self.fd.set_regs(regs)
    }

    /// Forgets registers written for the next run (a full write replaces
    /// them).
    fn drop_dirty_regs(&mut self) {
        if self.regs_cache.dirty.take().is_some() {
            self.fd.get_kvm_run().kvm_dirty_regs &= !u64::from(KVM_SYNC_X86_REGS);
        }
    }

    /// Before any vCPU ioctl that changes the vCPU's state: registers
    /// written for the next run go to KVM first (in the order they were
    /// written), and nothing cached is trusted afterwards.
    pub(super) fn before_vcpu_write(&mut self) -> Result<(), kvm_ioctls::Error> {
        let pending = self.regs_cache.dirty;
        self.drop_dirty_regs();
        self.regs_cache.invalidate();
        match pending {
            Some(regs) => self.fd.set_regs(&regs),
            None => Ok(()),
        }
    }

    /// The general registers: from `kvm_run` when they are current there,
    /// else `KVM_GET_REGS`.
    pub(super) fn get_regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        if self.regs_cache.regs {
            return Ok(self.fd.sync_regs().regs);
        }
        self.fd.get_regs()
    }

    /// The special registers if this exit's are at hand without an ioctl.
    pub(super) fn cached_sregs(&self) -> Option<kvm_sregs> {
        self.regs_cache.sregs.then(|| self.fd.sync_regs().sregs)
    }

    /// The special registers: from `kvm_run` when they are current there,
    /// else `KVM_GET_SREGS`.
    pub(super) fn get_sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        if self.regs_cache.sregs {
            return Ok(self.fd.sync_regs().sregs);
        }
        self.fd.get_sregs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_are_served_only_when_every_index_was_kept() {
        let mut c = RegsCache::default();
        assert_eq!(c.msrs(&[0x10]), None);
        c.keep_msrs(&[0x10, 0xc000_0082], &[5, 0xffff_8000]);
        assert_eq!(c.msrs(&[0xc000_0082, 0x10]), Some(vec![0xffff_8000, 5]));
        assert_eq!(c.msrs(&[0x10, 0x11]), None);
        // The first value read since the exit stands.
        c.keep_msrs(&[0x10], &[6]);
        assert_eq!(c.msrs(&[0x10]), Some(vec![5]));
        c.invalidate();
        assert_eq!(c.msrs(&[0x10]), None);
    }
}
