//! The KVMI events a vCPU exit raises by itself: BREAKPOINT (with #BP
//! delivery), SINGLESTEP, HYPERCALL and MSR, and exception injection.

use super::KvmVcpu;
use crate::exit::{CrashEvent, Exit, FailureCause};
use kvm_bindings::{kvm_msr_entry, Msrs};
use ukvmi_endpoint::{EventPayload, Exception, VcpuPort};
use ukvmi_guest_abi::layout;
use ukvmi_wire::{Action, EventMsrs};

impl KvmVcpu {
    /// An int3 at `rip`. With the BREAKPOINT event enabled the tool decides:
    /// CONTINUE delivers #BP to the guest, RETRY re-enters without it (the
    /// tool normally moved RIP or removed its 0xCC). Otherwise the guest gets
    /// its own #BP, as on bare hardware. `emulated`: the int3 came as an
    /// emulation failure (PVM), where RIP still points at the 0xCC and KVM
    /// pushes the current RIP, so RIP is moved past the int3 first.
    pub(super) fn breakpoint(&mut self, port: &VcpuPort, rip: u64, gpa: u64, emulated: bool) -> Option<Exit> {
        let outcome = port.raise(self, EventPayload::Breakpoint { gpa, insn_len: 1 });
        match outcome {
            Some(o) if o.action == Action::Crash => {
                return Some(self.crashed(CrashEvent::Breakpoint { rip }));
            }
            Some(o) if o.action == Action::Retry => return None,
            _ => {}
        }
        // Nobody answered (no tool, or it went away while this vCPU waited)
        // and the int3 is gone: it was a tool's, undone when its
        // connection ended. The instruction now there runs; the guest gets
        // no #BP it never planted.
        if !outcome.is_some_and(|o| o.answered) {
            let mut byte = [0u8; 1];
            if self.shared.ram.read(gpa, &mut byte).is_ok() && byte[0] != 0xcc {
                return None;
            }
        }
        if let Err(e) = self.deliver_bp(rip, emulated) {
            return Some(self.failed(FailureCause::DeliverBp { rip, source: e }));
        }
        None
    }

    /// Delivers #BP for the int3 at `rip` to the guest.
    pub(super) fn deliver_bp(&mut self, rip: u64, emulated: bool) -> std::result::Result<(), kvm_ioctls::Error> {
        if emulated {
            let mut regs = self.get_regs()?;
            if regs.rip == rip {
                regs.rip = rip.wrapping_add(1);
                self.put_regs(&regs)?;
            }
        }
        // Hardware KVM adds the int3's length itself (soft exception).
        self.inject_exception(Exception { nr: 3, error_code: 0, address: 0 }).map(|_| ())
    }

    /// Makes `exc` the exception delivered at the next entry, unless one is
    /// already being delivered; returns the one that will be.
    pub(super) fn inject_exception(&mut self, exc: Exception) -> std::result::Result<Exception, kvm_ioctls::Error> {
        let mut ev = self.fd.get_vcpu_events()?;
        if ev.exception.injected != 0 || ev.exception.pending != 0 {
            let nr = ev.exception.nr;
            let error_code = if ev.exception.has_error_code != 0 { ev.exception.error_code } else { 0 };
            let address = if nr == 14 { self.get_sregs()?.cr2 } else { 0 };
            return Ok(Exception { nr, error_code, address });
        }
        if exc.nr == 14 {
            let mut s = self.get_sregs()?;
            s.cr2 = exc.address;
            self.before_vcpu_write()?;
            self.fd.set_sregs(&s)?;
        }
        let has_error_code = Exception::has_error_code(exc.nr);
        ev.exception.injected = 1;
        ev.exception.pending = 0;
        ev.exception.nr = exc.nr;
        ev.exception.has_error_code = u8::from(has_error_code);
        ev.exception.error_code = if has_error_code { exc.error_code } else { 0 };
        self.before_vcpu_write()?;
        self.fd.set_vcpu_events(&ev)?;
        self.pending_exception = Some(exc.nr);
        Ok(Exception {
            nr: exc.nr,
            error_code: ev.exception.error_code,
            address: if exc.nr == 14 { exc.address } else { 0 },
        })
    }

    /// A single step ended (`failed`: another exit interrupted it).
    pub(super) fn singlestep_event(&mut self, port: &VcpuPort, failed: bool) -> Option<Exit> {
        match port.raise(self, EventPayload::Singlestep { failed }) {
            Some(o) if o.action == Action::Crash => Some(self.crashed(CrashEvent::Singlestep)),
            _ => None,
        }
    }

    /// The hypercall doorbell: KVMI's convention (RAX = 34, RDI = 24,
    /// RSI = 0) sends HYPERCALL; the guest gets 0 in RAX when the tool
    /// answered, -1000 (`-KVM_ENOSYS`) when no event was sent. A tool that
    /// sent SET_REGISTERS during the event chose the result itself: its
    /// RAX stands (the demo guest's agent call reads a reply length there).
    pub(super) fn hypercall(&mut self, port: &VcpuPort) -> Option<Exit> {
        self.complete_pending_io();
        let Ok(regs) = self.get_regs() else { return None };
        let kvmi = regs.rax & 0xffff_ffff == layout::HC_KVMI_NR && regs.rdi == layout::HC_KVMI_SUBFN && regs.rsi == 0;
        self.pf.regs_set = false;
        let outcome = if kvmi { port.raise(self, EventPayload::Hypercall) } else { None };
        if outcome.is_some_and(|o| o.action == Action::Crash) {
            return Some(self.crashed(CrashEvent::Hypercall));
        }
        if outcome.is_some() && self.pf.regs_set {
            return None;
        }
        if let Ok(mut regs) = self.get_regs() {
            regs.rax = if outcome.is_some() { 0 } else { (-1000i64) as u64 };
            let _ = self.put_regs(&regs);
        }
        None
    }

    /// The value `msr` has before the guest's write. Read in one
    /// `KVM_GET_MSRS` with the MSRs every event reports, which the event
    /// then takes from the cache instead of asking KVM again.
    fn old_msr_value(&mut self, msr: u32) -> u64 {
        let mut indices = EventMsrs::INDICES.to_vec();
        if !indices.contains(&msr) {
            indices.push(msr);
        }
        if self.read_msrs(&indices).is_err() {
            // One of the event's MSRs is unreadable here: just this one.
            let _ = self.read_msrs(&[msr]);
        }
        // Either read kept what it read.
        self.regs_cache.msrs(&[msr]).and_then(|v| v.first().copied()).unwrap_or(0)
    }

    /// A guest MSR write stopped by the filter: report it if this vCPU's tool
    /// watches it, then write the value the tool chose (or the guest's). A
    /// value KVM refuses raises #GP in the guest, as the write itself would.
    pub(super) fn wrmsr(&mut self, port: &VcpuPort, msr: u32, data: u64) -> Option<Exit> {
        let old = self.old_msr_value(msr);
        let value = match port.raise(self, EventPayload::Msr { msr, old_value: old, new_value: data }) {
            None => data,
            Some(o) if o.action == Action::Crash => {
                return Some(self.crashed(CrashEvent::MsrWrite { msr }));
            }
            Some(o) => o.new_val.unwrap_or(data),
        };
        // (Registers a tool set in the event go to KVM first.)
        let _ = self.before_vcpu_write();
        let ok = Msrs::from_entries(&[kvm_msr_entry { index: msr, data: value, ..Default::default() }])
            .ok()
            .and_then(|m| self.fd.set_msrs(&m).ok())
            == Some(1);
        if !ok {
            // The last exit was KVM_EXIT_X86_WRMSR, so `msr` is the active
            // member of the exit union until the next KVM_RUN.
            self.fd.get_kvm_run().__bindgen_anon_1.msr.error = 1;
        }
        None
    }
}
