//! The vCPU thread's run loop: enter the guest, decode the exit, dispatch it.

use super::KvmVcpu;
use crate::exit::{CrashEvent, Exit, FailureCause, FatalExit};
use crate::kick;
use kvm_ioctls::VcpuExit;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use ukvmi_endpoint::{Exception, Flow, VcpuPort};

/// Re-entries allowed at one RIP whose emulation failed with no int3 there
/// at the time of the read (see `internal_error`): a tool that restores and
/// plants the same int3 in a tight loop while several vCPUs hit it can
/// make a few of those reads in a row see the original byte. A real
/// failure fails every time and is fatal after this many (microseconds).
const EMUL_RETRIES: u32 = 64;
/// DR6.BS: the #DB came from a single step.
const DR6_BS: u64 = 1 << 14;

/// What a vCPU exit asks the loop to do, copied out of `kvm_run`.
pub(super) enum Step {
    Kicked,
    Out(u16, u32),
    In,
    Hlt,
    /// A guest write to a filtered MSR, not yet applied.
    Wrmsr(u32, u64),
    /// `KVM_EXIT_DEBUG`: exception 1 (a single step) or 3 (int3 with
    /// `KVM_GUESTDBG_USE_SW_BP`, hardware KVM), at linear address `pc`.
    Debug {
        exception: u32,
        pc: u64,
        dr6: u64,
    },
    /// An emulation failure on an `int3` (0xCC) at `rip`: how a ring-0 int3
    /// shows up where KVM emulates ring 0 (PVM). No #BP was delivered.
    Int3 {
        rip: u64,
        gpa: u64,
    },
    /// `KVM_EXIT_MMIO` read (gpa, length): the instruction waits for the
    /// data until the next `KVM_RUN`.
    MmioRead(u64, usize),
    /// `KVM_EXIT_MMIO` write (gpa, data, length): the instruction is done
    /// (RIP is past it), its memory effect is not.
    MmioWrite(u64, [u8; 8], usize),
    /// An instruction fetch from a RAM page without a memslot (emulation
    /// failure): RIP and the gpa of the page that has no slot.
    Fetch {
        gva: u64,
        gpa: u64,
    },
    /// The one-instruction step over a fetch fault is done.
    SteppedOver,
    /// An emulation failure to retry once by re-entering (see
    /// `internal_error`); nothing retired.
    Reenter,
    /// The guest cannot go on; where it was (filled in by `enter`).
    Fatal {
        why: FatalExit,
        rip: u64,
        code: [u8; 8],
    },
}

impl Step {
    /// Whether the guest ran at all (a kick returns before any instruction).
    /// A fatal exit, before `enter` adds where the guest was.
    fn fatal(why: FatalExit) -> Step {
        Step::Fatal { why, rip: 0, code: [0; 8] }
    }

    pub(super) fn ran_guest(&self) -> bool {
        !matches!(self, Step::Kicked | Step::Reenter)
    }
}

/// The value of an `out` (1, 2 or 4 bytes, little-endian), zero-extended.
fn out_value(data: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    for (d, s) in v.iter_mut().zip(data.iter()) {
        *d = *s;
    }
    u32::from_le_bytes(v)
}

/// The bytes of an MMIO write (at most 8) and how many there are.
fn mmio_write_data(data: &[u8]) -> ([u8; 8], usize) {
    let mut v = [0u8; 8];
    for (d, s) in v.iter_mut().zip(data.iter()) {
        *d = *s;
    }
    (v, data.len().min(8))
}

impl KvmVcpu {
    /// The thread body: run until the VM stops; returns how this vCPU ended it.
    pub fn run(mut self, port: VcpuPort) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        shared.register_thread(self.index, true);
        let kicks = kick::register(self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run);
        self.enable_regs_cache();
        let end = self.run_loop(&port);
        drop(kicks);
        if let Some(pa) = &shared.page_access {
            pa.remove_vcpu(self.index);
        }
        shared.register_thread(self.index, false);
        end
    }

    pub(super) fn run_loop(&mut self, port: &VcpuPort) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        let me = shared.vcpu(self.index)?;
        let mut booted = false;
        loop {
            if self.shared.stopping() {
                return None;
            }
            if !me.started.load(Ordering::SeqCst) {
                self.shared.idle(self.index, Duration::from_millis(50));
                continue;
            }
            if !booted {
                let (entry, count) = (self.shared.entry, self.shared.vcpu_count());
                let entered = match &self.shared.linux {
                    Some(l) => crate::boot::enter_linux(&self.fd, l.boot),
                    None => crate::boot::enter_long_mode(&self.fd, entry, self.index, count),
                };
                if let Err(cause) = entered {
                    return Some(self.failed(cause));
                }
                booted = true;
                // Page restrictions now check this vCPU's own tables.
                if let Some(pa) = &shared.page_access {
                    pa.add_vcpu(self.index, shared.vcpu_count(), &self.fd);
                }
            }
            if port.has_requests() {
                if let Flow::Crash(ev) = port.handle_requests(self) {
                    return Some(self.crashed(CrashEvent::Event(ev)));
                }
            }
            me.in_guest.store(true, Ordering::SeqCst);
            // A kick that found this thread outside guest mode sent no
            // signal; it left `wake` set, which is looked at only now, with
            // `in_guest` raised (see `VmShared::kick`).
            let step = if self.shared.take_wake(self.index) { Step::Kicked } else { self.enter() };
            me.in_guest.store(false, Ordering::SeqCst);
            me.exits.fetch_add(1, Ordering::SeqCst);
            // While the tool single-steps, an exit other than the step's own
            // #DB means the step was interrupted: SINGLESTEP with `failed`.
            let step_failed = self.debug.singlestep
                && step.ran_guest()
                && !matches!(step, Step::Debug { exception: 1, .. } | Step::SteppedOver);
            let ran = step.ran_guest();
            if ran && self.stepping() {
                // Before the event: the tool may stop stepping in it.
                self.watch_for_delivery();
            }
            if let Some(end) = self.handle(port, step) {
                return Some(end);
            }
            if self.debug.drain && ran {
                if let Err(e) = self.drain_step() {
                    return Some(self.failed(FailureCause::DrainSteps(e)));
                }
            }
            if step_failed {
                if let Some(end) = self.singlestep_event(port, true) {
                    return Some(end);
                }
            }
        }
    }

    /// Handles one exit; `Some` ends the VM.
    pub(super) fn handle(&mut self, port: &VcpuPort, step: Step) -> Option<Exit> {
        {
            match step {
                Step::Kicked => kick::set_immediate_exit(0),
                Step::Out(p, v) => return self.io_out(port, p, v),
                Step::In => {}
                Step::Hlt => {
                    if !port.has_requests() {
                        self.shared.idle(self.index, Duration::from_millis(1));
                    }
                }
                Step::Wrmsr(msr, data) => return self.wrmsr(port, msr, data),
                Step::Debug { exception: 3, pc, .. } => {
                    let gpa = self.translate(pc).unwrap_or(u64::MAX);
                    return self.breakpoint(port, pc, gpa, false);
                }
                Step::Debug { exception: 1, dr6, .. } if dr6 & DR6_BS == 0 => {
                    // Not a single step: the guest's own #DB (a hardware
                    // breakpoint, icebp) goes back to the guest.
                    if let Err(e) = self.inject_exception(Exception { nr: 1, error_code: 0, address: 0 }) {
                        return Some(self.failed(FailureCause::ReinjectDb(e)));
                    }
                }
                Step::Debug { exception: 1, .. } => {
                    // (The VMM's own step over a fetch fault arrives as
                    // SteppedOver, see `enter`.)
                    if self.debug.singlestep {
                        return self.singlestep_event(port, false);
                    }
                }
                Step::Debug { exception, pc, .. } => {
                    return Some(self.failed(FailureCause::UnexpectedDebug { exception, pc }))
                }
                Step::Int3 { rip, gpa } => {
                    self.note_int3(rip);
                    return self.breakpoint(port, rip, gpa, true);
                }
                Step::MmioRead(gpa, len) => {
                    if let Some(end) = self.mmio_read(port, gpa, len) {
                        return Some(end);
                    }
                }
                Step::MmioWrite(gpa, data, len) => {
                    if let Some(end) = self.mmio_write(port, gpa, &data, len) {
                        return Some(end);
                    }
                }
                Step::Fetch { gva, gpa } => {
                    if let Some(end) = self.fetch(port, gva, gpa) {
                        return Some(end);
                    }
                }
                Step::SteppedOver => {
                    if let Some(end) = self.step_over_done() {
                        return Some(end);
                    }
                    // The same #DB is also the tool's step, if it steps.
                    if self.debug.singlestep {
                        return self.singlestep_event(port, false);
                    }
                }
                Step::Reenter => {}
                Step::Fatal { why, rip, code } => return Some(self.failed(FailureCause::Fatal { why, rip, code })),
            }
        }
        None
    }

    /// One `KVM_RUN`, with the exit copied out.
    pub(super) fn enter(&mut self) -> Step {
        if let Some(step) = self.pf.deferred.take() {
            return step;
        }
        // An exception delivered while KVM steps pushes its TF.
        let delivering = self.pending_exception.take();
        if let (Some(nr), true) = (delivering, self.stepping()) {
            self.note_leaked_frame(nr);
        }
        // Never in guest mode while memslots change (see page_access).
        let inside = self.shared.gate.enter();
        if let Some(pa) = &self.shared.page_access {
            self.pf.generation = pa.generation();
        }
        let exit = self.fd.run();
        self.regs_cache.exited();
        drop(inside);
        let step = match exit {
            Ok(VcpuExit::IoOut(port, data)) => Step::Out(port, out_value(data)),
            Ok(VcpuExit::IoIn(port, data)) => {
                super::ports::port_in(&self.shared, port, data);
                Step::In
            }
            Ok(VcpuExit::Hlt) => Step::Hlt,
            Ok(VcpuExit::X86Wrmsr(w)) => {
                *w.error = 0;
                Step::Wrmsr(w.index, w.data)
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => Step::MmioRead(gpa, data.len()),
            Ok(VcpuExit::MmioWrite(gpa, data)) => {
                let (v, len) = mmio_write_data(data);
                Step::MmioWrite(gpa, v, len)
            }
            Ok(VcpuExit::Debug(_)) if self.debug.step_over => Step::SteppedOver,
            Ok(VcpuExit::Debug(arch)) => Step::Debug { exception: arch.exception, pc: arch.pc, dr6: arch.dr6 },
            Ok(VcpuExit::Shutdown) => Step::fatal(FatalExit::TripleFault { unmapped_table: self.unmapped_table() }),
            Ok(VcpuExit::InternalError) => self.internal_error(),
            Ok(other) => Step::fatal(FatalExit::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Kicked,
            Err(e) => Step::fatal(FatalExit::RunFailed(e)),
        };
        self.reapply_unloaded_regs();
        if matches!(step, Step::Kicked) {
            // Nothing was delivered either.
            self.pending_exception = delivering;
        }
        // A kick ran no guest code: it neither confirms nor clears a retry.
        if !matches!(step, Step::Reenter | Step::Kicked) {
            self.emul_retry = None;
        }
        if let Step::Fatal { why, .. } = step {
            let rip = self.get_regs().map(|r| r.rip).unwrap_or(0);
            let mut code = [0u8; 8];
            // RIP is linear: through the guest's tables (identity where
            // paging is off, as for the ABI guests' first instructions).
            if let Some(gpa) = self.translate(rip) {
                let _ = self.shared.ram.read(gpa, &mut code);
            }
            return Step::Fatal { why, rip, code };
        }
        step
    }

    /// Classifies `KVM_EXIT_INTERNAL_ERROR`: an emulation failure on a 0xCC
    /// is a ring-0 int3 (PVM hosts); anything else is fatal.
    /// Emulation failures are how two things show up where KVM emulates
    /// ring 0 (PVM): a fetch from a page without a memslot (PF, see
    /// `fetch_fault`) and an `int3` (0xCC at RIP). Anything else is fatal.
    pub(super) fn internal_error(&mut self) -> Step {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the member of the exit union KVM filled in; it stays valid
        // until the next KVM_RUN, and a u32 has no invalid bit patterns.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            if let Ok(regs) = self.get_regs() {
                if let Some(step) = self.fetch_fault(regs.rip) {
                    return step;
                }
                if let Some(gpa) = self.translate(regs.rip) {
                    let mut b = [0u8; 1];
                    if self.shared.ram.read(gpa, &mut b).is_ok() && b[0] == 0xcc {
                        return Step::Int3 { rip: regs.rip, gpa };
                    }
                }
                // A Linux guest: an instruction the emulator lacks that the
                // VMM can complete (vcpu/complete.rs).
                if let Some(step) = self.complete(&regs) {
                    return step;
                }
                // No int3 there (any more): a tool may have removed it
                // between the guest hitting it and this read (another vCPU
                // stepping over the same breakpoint), which looks like an
                // instruction the emulator cannot do. Re-enter: a removed
                // int3 then runs the original instruction (or, planted
                // again meanwhile, comes back as an int3); a real failure
                // comes back at the same RIP every time and is fatal after
                // `EMUL_RETRIES`.
                let tries = match self.emul_retry {
                    Some((rip, n)) if rip == regs.rip => n,
                    _ => 0,
                };
                if tries < EMUL_RETRIES {
                    self.emul_retry = Some((regs.rip, tries + 1));
                    if tries > 0 {
                        // Let the tool finish what it is doing to that byte.
                        std::thread::yield_now();
                    }
                    return Step::Reenter;
                }
                if let Some(why) = self.unemulated(&regs) {
                    return Step::fatal(why);
                }
            }
        }
        Step::fatal(FatalExit::InternalError { suberror })
    }

    /// Lets KVM finish an I/O instruction the last exit left pending without
    /// running any further guest code (`immediate_exit`: KVM completes
    /// pending I/O first, then returns `EINTR`). Afterwards RIP is past the
    /// instruction on every kind of host.
    /// If finishing the instruction produced another exit instead (the
    /// write half of a read-modify-write, a single step), that exit is kept
    /// and handled before the next entry.
    pub(super) fn complete_pending_io(&mut self) {
        kick::set_immediate_exit(1);
        let step = self.enter();
        kick::set_immediate_exit(0);
        if !matches!(step, Step::Kicked) {
            self.pf.deferred = Some(step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_values_are_little_endian_and_zero_extended() {
        assert_eq!(out_value(&[0x2a]), 0x2a);
        assert_eq!(out_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(out_value(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(out_value(&[]), 0);
    }

    #[test]
    fn mmio_writes_keep_at_most_eight_bytes() {
        assert_eq!(mmio_write_data(&[1, 2]), ([1, 2, 0, 0, 0, 0, 0, 0], 2));
        assert_eq!(mmio_write_data(&[9; 8]), ([9; 8], 8));
        assert_eq!(mmio_write_data(&[7; 16]), ([7; 8], 8));
    }

    #[test]
    fn only_kicks_and_reentries_ran_no_guest_code() {
        assert!(!Step::Kicked.ran_guest());
        assert!(!Step::Reenter.ran_guest());
        assert!(Step::Hlt.ran_guest());
        assert!(Step::Out(0x3f8, 0).ran_guest());
        assert!(Step::Debug { exception: 1, pc: 0, dr6: 0 }.ran_guest());
        assert!(Step::fatal(FatalExit::InternalError { suberror: 1 }).ran_guest());
    }
}
