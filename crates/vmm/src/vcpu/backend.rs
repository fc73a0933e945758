//! The endpoint's `VcpuBackend` for one vCPU: registers, MSRs, CPUID,
//! XSAVE, translation, interception switches, single-step and injection,
//! all as vCPU ioctls on the vCPU's own thread.

use super::mtrr;
use super::KvmVcpu;
use crate::convert::{regs_from_wire, regs_to_wire, sregs_to_wire};
use crate::trap_flag;
use kvm_bindings::{kvm_msr_entry, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use ukvmi_endpoint::{
    BackendError, BackendResult, CpuidOps, Exception, InjectOps, InterceptOps, MtrrOps, SinglestepOps, TranslateOps,
    VcpuBackend, VmBackend, XstateOps,
};
use ukvmi_wire::msg;
use ukvmi_wire::{KvmRegs, KvmSregs, KvmXsave};

fn io_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BackendError {
    move |e| BackendError::Failed(format!("{what}: {e}"))
}

impl KvmVcpu {
    /// `KVM_GET_MSRS` of `indices` (all or an error), unless every one
    /// was read since the last exit.
    pub(super) fn read_msrs(&mut self, indices: &[u32]) -> BackendResult<Vec<u64>> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(values) = self.regs_cache.msrs(indices) {
            return Ok(values);
        }
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| BackendError::Failed(format!("{e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(io_err("KVM_GET_MSRS"))?;
        if n != indices.len() {
            let bad = indices.get(n).copied().unwrap_or(0);
            return Err(BackendError::Invalid(format!("MSR {bad:#x} cannot be read")));
        }
        let values: Vec<u64> = msrs.as_slice().iter().map(|e| e.data).collect();
        self.regs_cache.keep_msrs(indices, &values);
        Ok(values)
    }
}

impl VcpuBackend for KvmVcpu {
    fn regs(&mut self) -> BackendResult<KvmRegs> {
        self.get_regs().map(|r| regs_to_wire(&r)).map_err(io_err("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &KvmRegs) -> BackendResult<()> {
        self.pf.regs_set = true;
        // KVM_SET_REGS must not meet an instruction half done: finish a
        // pending MMIO read (with the RAM's data) before the tool's
        // registers replace the result; `mmio_read` then knows it is done.
        if let Some((gpa, len)) = self.pf.read_pending.take() {
            self.supply_read(gpa, len);
            self.complete_pending_io();
        }
        self.put_regs(&regs_from_wire(regs)).map_err(io_err("KVM_SET_REGS"))
    }
    fn sregs(&mut self) -> BackendResult<KvmSregs> {
        self.get_sregs().map(|s| sregs_to_wire(&s)).map_err(io_err("KVM_GET_SREGS"))
    }
    fn msrs(&mut self, indices: &[u32], out: &mut [u64]) -> BackendResult<()> {
        for (o, v) in out.iter_mut().zip(self.read_msrs(indices)?) {
            *o = v;
        }
        Ok(())
    }
    fn tsc_khz(&mut self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }
    fn support_cpuid(&mut self) -> Option<&mut dyn CpuidOps> {
        Some(self)
    }
    fn support_xstate(&mut self) -> Option<&mut dyn XstateOps> {
        Some(self)
    }
    fn support_mtrr(&mut self) -> Option<&mut dyn MtrrOps> {
        Some(self)
    }
    fn support_translate(&mut self) -> Option<&mut dyn TranslateOps> {
        Some(self)
    }
    fn support_intercepts(&mut self) -> Option<&mut dyn InterceptOps> {
        Some(self)
    }
    fn support_singlestep(&mut self) -> Option<&mut dyn SinglestepOps> {
        self.shared.caps().singlestep.then_some(self as &mut dyn SinglestepOps)
    }
    fn support_inject(&mut self) -> Option<&mut dyn InjectOps> {
        self.shared.caps().commands.contains(msg::VCPU_INJECT_EXCEPTION).then_some(self as &mut dyn InjectOps)
    }
}

impl SinglestepOps for KvmVcpu {
    fn set_singlestep(&mut self, enable: bool) -> BackendResult<()> {
        let before = self.debug;
        self.debug.singlestep = enable;
        self.sync_debug().map_err(|e| {
            self.debug = before;
            BackendError::Failed(format!("KVM_SET_GUEST_DEBUG: {e}"))
        })
    }
}

impl InjectOps for KvmVcpu {
    fn inject(&mut self, exc: Exception) -> BackendResult<Exception> {
        self.inject_exception(exc).map_err(io_err("KVM_SET_VCPU_EVENTS"))
    }
}

impl InterceptOps for KvmVcpu {
    fn set_event_intercept(&mut self, event: u16, enable: bool) -> BackendResult<()> {
        // BREAKPOINT needs int3 exits where KVM runs the guest natively
        // (hardware KVM). Where ring 0 is emulated (PVM) an int3 exits as an
        // emulation failure anyway, and asking for SW_BP changes nothing.
        // The MSR filter is driven by CONTROL_MSR; the others need nothing.
        // (`caps().singlestep` is set exactly when KVM_SET_GUEST_DEBUG works.)
        if event == ukvmi_wire::event::BREAKPOINT && self.shared.caps().singlestep {
            let before = self.debug;
            self.debug.sw_bp = enable;
            return self.sync_debug().map_err(|e| {
                self.debug = before;
                BackendError::Failed(format!("KVM_SET_GUEST_DEBUG: {e}"))
            });
        }
        Ok(())
    }
    fn set_cr_intercept(&mut self, _cr: u8, _enable: bool) -> BackendResult<()> {
        Err(BackendError::NotSupported)
    }
    fn set_msr_intercept(&mut self, msr: u32, enable: bool) -> BackendResult<()> {
        let filter = self.shared.msr_filter.as_ref().ok_or(BackendError::NotSupported)?;
        filter.watch(&self.shared.vm, self.index, msr, enable)
    }
}

impl CpuidOps for KvmVcpu {
    fn cpuid(&mut self, function: u32, index: u32) -> BackendResult<Option<[u32; 4]>> {
        Ok(self
            .cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == index))
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx]))
    }
}

impl XstateOps for KvmVcpu {
    fn xcr0(&mut self) -> BackendResult<u64> {
        let x = self.fd.get_xcrs().map_err(io_err("KVM_GET_XCRS"))?;
        let n = (x.nr_xcrs as usize).min(x.xcrs.len());
        Ok(x.xcrs.iter().take(n).find(|e| e.xcr == 0).map_or(1, |e| e.value))
    }
    fn xsave(&mut self) -> BackendResult<Box<KvmXsave>> {
        let x = self.fd.get_xsave().map_err(io_err("KVM_GET_XSAVE"))?;
        Ok(Box::new(KvmXsave { region: x.region }))
    }
    fn set_xsave(&mut self, area: &KvmXsave) -> BackendResult<()> {
        self.before_vcpu_write().map_err(io_err("KVM_SET_REGS"))?;
        let x = kvm_bindings::kvm_xsave { region: area.region, ..Default::default() };
        // SAFETY: `x` is a whole legacy kvm_xsave; KVM reads exactly its 4096
        // bytes (no XSAVE2 tail is passed, so none is read).
        unsafe { self.fd.set_xsave(&x) }.map_err(|e| BackendError::Invalid(format!("KVM_SET_XSAVE: {e}")))
    }
}

impl trap_flag::ReadVirt for KvmVcpu {
    fn read_u64(&self, gva: u64) -> Option<u64> {
        KvmVcpu::read_virt_u64(self, gva)
    }
}

impl TranslateOps for KvmVcpu {
    fn translate_gva(&mut self, gva: u64) -> BackendResult<Option<u64>> {
        if let Some(s) = self.cached_sregs() {
            return Ok(self.walk(&s, gva));
        }
        // Not while memslots change (the walk would see holes).
        let t = match &self.shared.page_access {
            Some(pa) => pa.stable(|_| self.fd.translate_gva(gva)),
            None => self.fd.translate_gva(gva),
        }
        .map_err(io_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }
}

impl MtrrOps for KvmVcpu {
    fn mtrr_type(&mut self, gpa: u64) -> BackendResult<u8> {
        mtrr::memory_type(gpa, &mut |indices| self.read_msrs(indices))
    }
}
