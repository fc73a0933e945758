//! One vCPU: its thread's run loop and the `VcpuBackend` the endpoint uses
//! on that thread. All KVM vCPU ioctls happen here, on the owning thread.

use crate::convert::{regs_from_wire, regs_to_wire, sregs_to_wire};
use crate::error::{Error, Result};
use crate::kick;
use crate::page_access::ExecToken;
use crate::trap_flag;
use crate::vm::{Exit, VmShared};
use kvm_bindings::{kvm_msr_entry, kvm_segment, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use ukvmi_endpoint::{
    BackendError, BackendResult, CpuidOps, EventPayload, Exception, Flow, InjectOps, InterceptOps, MtrrOps,
    SinglestepOps, TranslateOps, VcpuBackend, VcpuPort, VmBackend, XstateOps,
};
use ukvmi_guests::layout;
use ukvmi_wire::{access, msg, Action};
use ukvmi_wire::{KvmRegs, KvmSregs, KvmXsave};

const MSR_MTRR_CAP: u32 = 0xfe;
/// Re-entries allowed at one RIP whose emulation failed with no int3 there
/// at the time of the read (see `internal_error`): a tool that restores and
/// plants the same int3 in a tight loop while several vCPUs hit it can
/// make a few of those reads in a row see the original byte. A real
/// failure fails every time and is fatal after this many (microseconds).
const EMUL_RETRIES: u32 = 64;
/// DR6.BS: the #DB came from a single step.
const DR6_BS: u64 = 1 << 14;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_MTRR_PHYS_BASE0: u32 = 0x200;
const MTRR_FIX_64K: u32 = 0x250;
const MTRR_FIX_16K: [u32; 2] = [0x258, 0x259];
const MTRR_FIX_4K: [u32; 8] = [0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f];

/// What a vCPU exit asks the loop to do, copied out of `kvm_run`.
enum Step {
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
    Fatal(String),
}

impl Step {
    /// Whether the guest ran at all (a kick returns before any instruction).
    fn ran_guest(&self) -> bool {
        !matches!(self, Step::Kicked | Step::Reenter)
    }
}

/// Guest-debug switches of one vCPU, combined into one `KVM_SET_GUEST_DEBUG`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Debug {
    /// The tool's single-stepping (`KVMI_VCPU_CONTROL_SINGLESTEP`).
    pub singlestep: bool,
    /// `int3` exits (`KVM_GUESTDBG_USE_SW_BP`) for BREAKPOINT events.
    pub sw_bp: bool,
    /// One internal step (the VMM stepping over something by itself).
    pub step_over: bool,
    /// Silent steps after stepping stopped, until the guest has returned
    /// through every exception frame that holds KVM's TF (`trap_flag`).
    pub drain: bool,
}

impl Debug {
    fn control(self) -> u32 {
        use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_SW_BP};
        let mut c = 0;
        if self.singlestep || self.step_over || self.drain {
            c |= KVM_GUESTDBG_SINGLESTEP;
        }
        if self.sw_bp {
            c |= KVM_GUESTDBG_USE_SW_BP;
        }
        if c != 0 {
            c |= KVM_GUESTDBG_ENABLE;
        }
        c
    }
}

/// This vCPU's part of page-access handling (the PF event).
#[derive(Default)]
pub(crate) struct PfState {
    /// An MMIO read that KVM still waits for: (gpa, length).
    read_pending: Option<(u64, usize)>,
    /// SET_REGISTERS was applied during the current event (PF, HYPERCALL;
    /// cleared before each).
    regs_set: bool,
    /// An exit that came out of `KVM_RUN` while completing a pending read
    /// early (in `set_regs`); handled before the next guest entry.
    deferred: Option<Step>,
    /// Pages mapped back for the current step over a fetch fault.
    exec: Vec<ExecToken>,
    /// The memslot layout's generation during the last `KVM_RUN`.
    generation: u64,
}

/// The vCPU thread's own state.
pub(crate) struct KvmVcpu {
    pub fd: VcpuFd,
    pub index: u16,
    pub shared: Arc<VmShared>,
    pub cpuid: CpuId,
    /// What guest debugging is switched on.
    pub debug: Debug,
    /// Page-access (PF) handling state.
    pub pf: PfState,
    /// RIP of the last emulation failure re-entered, and how many times in
    /// a row (`internal_error`);
    /// cleared by any other exit.
    pub emul_retry: Option<(u64, u32)>,
    /// Exception frames pushed with KVM's single-step TF (see `trap_flag`),
    /// cleaned when stepping stops.
    pub tf_frames: Vec<trap_flag::LeakedFrame>,
    /// Silent steps taken so far while draining them (`Debug::drain`).
    pub drain_steps: u32,
    /// RSP at the last exit while KVM stepped (to notice exceptions KVM
    /// delivered by itself in between).
    pub last_step: Option<u64>,
    /// An exception injected for the next entry to deliver.
    pub pending_exception: Option<u8>,
}

fn io_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BackendError {
    move |e| BackendError::Failed(format!("{what}: {e}"))
}

impl KvmVcpu {
    /// The thread body: run until the VM stops; returns how this vCPU ended it.
    pub fn run(mut self, port: VcpuPort) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        shared.register_thread(self.index, true);
        let kicks = kick::register(self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run);
        let end = self.run_loop(&port);
        drop(kicks);
        if let Some(pa) = &shared.page_access {
            pa.remove_vcpu(self.index);
        }
        shared.register_thread(self.index, false);
        end
    }

    fn run_loop(&mut self, port: &VcpuPort) -> Option<Exit> {
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
                if let Err(e) = self.enter_long_mode() {
                    return Some(Exit::Failed(format!("vCPU {}: {e}", self.index)));
                }
                booted = true;
                // Page restrictions now check this vCPU's own tables.
                if let Some(pa) = &shared.page_access {
                    pa.add_vcpu(self.index, shared.vcpu_count(), &self.fd);
                }
            }
            if port.has_requests() {
                if let Flow::Crash(ev) = port.handle_requests(self) {
                    let name = ukvmi_wire::event::name(ev).unwrap_or("an event");
                    return Some(Exit::Crashed(format!(
                        "the introspector answered CRASH to {name} on vCPU {}",
                        self.index
                    )));
                }
            }
            me.in_guest.store(true, Ordering::SeqCst);
            let step = self.enter();
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
                    return Some(Exit::Failed(format!(
                        "vCPU {}: ending the steps after single-stepping: {e}",
                        self.index
                    )));
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
    fn handle(&mut self, port: &VcpuPort, step: Step) -> Option<Exit> {
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
                        return Some(Exit::Failed(format!("vCPU {}: re-injecting #DB: {e}", self.index)));
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
                    return Some(Exit::Failed(format!(
                        "vCPU {}: unexpected debug exit, exception {exception} at {pc:#x}",
                        self.index
                    )))
                }
                Step::Int3 { rip, gpa } => return self.breakpoint(port, rip, gpa, true),
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
                Step::Fatal(why) => return Some(Exit::Failed(format!("vCPU {}: {why}", self.index))),
            }
        }
        None
    }

    /// One `KVM_RUN`, with the exit copied out.
    fn enter(&mut self) -> Step {
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
        drop(inside);
        let step = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                for (d, s) in v.iter_mut().zip(data.iter()) {
                    *d = *s;
                }
                Step::Out(port, u32::from_le_bytes(v))
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                // Serial LSR says "transmitter empty"; everything else reads as all ones.
                let v = if port == layout::PORT_SERIAL + 5 { 0x60 } else { 0xff };
                data.fill(v);
                Step::In
            }
            Ok(VcpuExit::Hlt) => Step::Hlt,
            Ok(VcpuExit::X86Wrmsr(w)) => {
                *w.error = 0;
                Step::Wrmsr(w.index, w.data)
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => Step::MmioRead(gpa, data.len()),
            Ok(VcpuExit::MmioWrite(gpa, data)) => {
                let mut v = [0u8; 8];
                for (d, s) in v.iter_mut().zip(data.iter()) {
                    *d = *s;
                }
                Step::MmioWrite(gpa, v, data.len().min(8))
            }
            Ok(VcpuExit::Debug(_)) if self.debug.step_over => Step::SteppedOver,
            Ok(VcpuExit::Debug(arch)) => Step::Debug { exception: arch.exception, pc: arch.pc, dr6: arch.dr6 },
            Ok(VcpuExit::Shutdown) => {
                Step::Fatal(format!("the guest triple-faulted (KVM_EXIT_SHUTDOWN{})", self.unmapped_table_note()))
            }
            Ok(VcpuExit::InternalError) => self.internal_error(),
            Ok(other) => Step::Fatal(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Kicked,
            Err(e) => Step::Fatal(format!("KVM_RUN failed: {e}")),
        };
        if matches!(step, Step::Kicked) {
            // Nothing was delivered either.
            self.pending_exception = delivering;
        }
        // A kick ran no guest code: it neither confirms nor clears a retry.
        if !matches!(step, Step::Reenter | Step::Kicked) {
            self.emul_retry = None;
        }
        if let Step::Fatal(why) = step {
            let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
            let mut bytes = [0u8; 8];
            let _ = self.shared.ram.read(rip, &mut bytes);
            return Step::Fatal(format!("{why} at rip {rip:#x} (code bytes {bytes:02x?})"));
        }
        step
    }

    /// Classifies `KVM_EXIT_INTERNAL_ERROR`: an emulation failure on a 0xCC
    /// is a ring-0 int3 (PVM hosts); anything else is fatal.
    /// Emulation failures are how two things show up where KVM emulates
    /// ring 0 (PVM): a fetch from a page without a memslot (PF, see
    /// `fetch_fault`) and an `int3` (0xCC at RIP). Anything else is fatal.
    fn internal_error(&mut self) -> Step {
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the member of the exit union KVM filled in; it stays valid
        // until the next KVM_RUN, and a u32 has no invalid bit patterns.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror == kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            if let Ok(regs) = self.fd.get_regs() {
                if let Some(step) = self.fetch_fault(regs.rip) {
                    return step;
                }
                if let Some(gpa) = self.translate(regs.rip) {
                    let mut b = [0u8; 1];
                    if self.shared.ram.read(gpa, &mut b).is_ok() && b[0] == 0xcc {
                        return Step::Int3 { rip: regs.rip, gpa };
                    }
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
            }
        }
        Step::Fatal(format!("KVM_EXIT_INTERNAL_ERROR (suberror {suberror})"))
    }

    /// The gpa of `gva` through the vCPU's paging, if mapped.
    fn translate(&self, gva: u64) -> Option<u64> {
        self.fd.translate_gva(gva).ok().filter(|t| t.valid != 0).map(|t| t.physical_address)
    }

    /// `KVM_SET_REGS`, then guest debugging again: hardware KVM forgets its
    /// single-step flag when RIP changes under it (`singlestep_rip`).
    fn put_regs(&mut self, regs: &kvm_bindings::kvm_regs) -> std::result::Result<(), kvm_ioctls::Error> {
        self.fd.set_regs(regs)?;
        if self.stepping() {
            self.sync_debug()?;
        }
        Ok(())
    }

    /// Applies [`KvmVcpu::debug`] with `KVM_SET_GUEST_DEBUG`.
    pub(crate) fn sync_debug(&mut self) -> std::result::Result<(), kvm_ioctls::Error> {
        if !self.debug.singlestep && !self.debug.step_over && !self.debug.drain && !self.tf_frames.is_empty() {
            // Stepping stops: not while a frame with KVM's TF is still to
            // be returned through.
            self.forget_returned_frames();
            self.debug.drain = !self.tf_frames.is_empty();
            self.drain_steps = 0;
        }
        if !self.stepping() {
            self.last_step = None;
        }
        let dbg = kvm_bindings::kvm_guest_debug { control: self.debug.control(), ..Default::default() };
        self.fd.set_guest_debug(&dbg)?;
        if let Some(me) = self.shared.vcpu(self.index) {
            me.debug_control.store(dbg.control, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Whether KVM is single-stepping the guest (the tool's or our own).
    fn stepping(&self) -> bool {
        self.debug.singlestep || self.debug.step_over || self.debug.drain
    }

    /// Drops the recorded frames the guest has returned through.
    fn forget_returned_frames(&mut self) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else { return };
        self.tf_frames.retain(|f| !f.returned(regs.rsp, sregs.cs.selector));
    }

    /// One silent step while draining: once every frame is returned
    /// through, stepping really stops (and KVM takes its TF back, which
    /// the guest's return restored). A guest that does not return within
    /// `DRAIN_LIMIT` steps (it switched tasks) gets TF cleared in the
    /// frames instead, where they are still intact.
    fn drain_step(&mut self) -> std::result::Result<(), kvm_ioctls::Error> {
        self.forget_returned_frames();
        self.drain_steps = self.drain_steps.saturating_add(1);
        if !self.tf_frames.is_empty() && self.drain_steps < trap_flag::DRAIN_LIMIT {
            return Ok(());
        }
        if !self.tf_frames.is_empty() {
            self.clear_leaked_tf();
        }
        self.debug.drain = false;
        self.sync_debug()
    }

    /// After an exit while KVM steps: if the guest looks like it took an
    /// exception since the last one (one KVM delivered by itself, such as
    /// a fault of the stepped instruction), finds its frame on the stack
    /// and remembers it, as for the exceptions the VMM injects.
    fn watch_for_delivery(&mut self) {
        let Ok(regs) = self.fd.get_regs() else { return };
        let Some(before) = self.last_step.replace(regs.rsp) else { return };
        if !trap_flag::maybe_delivered(before, regs.rsp) {
            return;
        }
        let mut stack = [0u64; trap_flag::SEARCH_BYTES / 8];
        let n = self.read_virt_qwords(regs.rsp, &mut stack);
        if let Some(f) = trap_flag::find_frame(stack.get(..n).unwrap_or_default(), regs.rsp, before) {
            self.remember_frame(f);
        }
    }

    fn remember_frame(&mut self, f: trap_flag::LeakedFrame) {
        if self.tf_frames.contains(&f) {
            return;
        }
        if self.tf_frames.len() >= trap_flag::MAX_FRAMES {
            self.tf_frames.remove(0);
        }
        self.tf_frames.push(f);
    }

    /// Reads quadwords from guest-virtual `gva` on, translating once per
    /// page; returns how many it read before an unmapped page.
    fn read_virt_qwords(&self, gva: u64, out: &mut [u64]) -> usize {
        let mut page: Option<(u64, u64)> = None;
        for (i, q) in out.iter_mut().enumerate() {
            let at = gva.wrapping_add(8 * i as u64);
            let value = if at & 0xfff > 0xff8 {
                // Straddles two pages (a misaligned stack).
                self.read_virt_u64(at)
            } else {
                let (va_page, pa_page) = match page {
                    Some(p) if p.0 == at & !0xfff => p,
                    _ => {
                        let Some(pa) = self.translate(at & !0xfff) else { return i };
                        (at & !0xfff, pa)
                    }
                };
                page = Some((va_page, pa_page));
                let mut b = [0u8; 8];
                self.shared.ram.read(pa_page + (at & 0xfff), &mut b).ok().map(|()| u64::from_le_bytes(b))
            };
            match value {
                Some(v) => *q = v,
                None => return i,
            }
        }
        out.len()
    }

    /// Reads a guest-virtual u64 through this vCPU's page tables.
    fn read_virt_u64(&self, gva: u64) -> Option<u64> {
        let gpa = self.translate(gva)?;
        let mut b = [0u8; 8];
        self.shared.ram.read(gpa, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Remembers where exception `nr`, about to be delivered while KVM
    /// steps, will push RFLAGS with TF in it.
    fn note_leaked_frame(&mut self, nr: u8) {
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else { return };
        let cpu = trap_flag::CpuState {
            efer: sregs.efer,
            rsp: regs.rsp,
            cs_selector: sregs.cs.selector,
            idt_base: sregs.idt.base,
            idt_limit: sregs.idt.limit,
            tss_base: sregs.tr.base,
        };
        if let Some(f) = trap_flag::frame_for(nr, &cpu, self) {
            // (The frame's place only matters if the guest never returns.)
            self.remember_frame(f);
        }
    }

    /// Clears TF in every recorded frame that is still intact on the
    /// guest's stack, so it does not come back as the guest's own (an
    /// endless #DB in the guest). Only right for a handler that returns
    /// through its frame as the CPU pushed it.
    fn clear_leaked_tf(&mut self) {
        let frames = std::mem::take(&mut self.tf_frames);
        let Ok(regs) = self.fd.get_regs() else { return };
        for f in frames {
            // CS, RFLAGS, RSP: three quadwords in a row.
            let mut slots = [0u64; 3];
            if self.read_virt_qwords(f.cs_at(), &mut slots) < 3 {
                continue;
            }
            let [cs, rflags, rsp] = slots;
            if f.still_live(regs.rsp, rsp, cs, rflags) {
                if let Some(gpa) = self.translate(f.rflags_at) {
                    let _ = self.shared.ram.write_u64(gpa, rflags & !trap_flag::TF);
                }
            }
        }
    }

    /// Lets KVM finish an I/O instruction the last exit left pending without
    /// running any further guest code (`immediate_exit`: KVM completes
    /// pending I/O first, then returns `EINTR`). Afterwards RIP is past the
    /// instruction on every kind of host.
    /// If finishing the instruction produced another exit instead (the
    /// write half of a read-modify-write, a single step), that exit is kept
    /// and handled before the next entry.
    fn complete_pending_io(&mut self) {
        kick::set_immediate_exit(1);
        let step = self.enter();
        kick::set_immediate_exit(0);
        if !matches!(step, Step::Kicked) {
            self.pf.deferred = Some(step);
        }
    }

    /// An int3 at `rip`. With the BREAKPOINT event enabled the tool decides:
    /// CONTINUE delivers #BP to the guest, RETRY re-enters without it (the
    /// tool normally moved RIP or removed its 0xCC). Otherwise the guest gets
    /// its own #BP, as on bare hardware. `emulated`: the int3 came as an
    /// emulation failure (PVM), where RIP still points at the 0xCC and KVM
    /// pushes the current RIP, so RIP is moved past the int3 first.
    fn breakpoint(&mut self, port: &VcpuPort, rip: u64, gpa: u64, emulated: bool) -> Option<Exit> {
        let outcome = port.raise(self, EventPayload::Breakpoint { gpa, insn_len: 1 });
        match outcome {
            Some(o) if o.action == Action::Crash => {
                return Some(Exit::Crashed(format!(
                    "the introspector answered CRASH to a breakpoint at {rip:#x} on vCPU {}",
                    self.index
                )));
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
            return Some(Exit::Failed(format!("vCPU {}: delivering #BP at {rip:#x}: {e}", self.index)));
        }
        None
    }

    /// Delivers #BP for the int3 at `rip` to the guest.
    fn deliver_bp(&mut self, rip: u64, emulated: bool) -> std::result::Result<(), kvm_ioctls::Error> {
        if emulated {
            let mut regs = self.fd.get_regs()?;
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
    fn inject_exception(&mut self, exc: Exception) -> std::result::Result<Exception, kvm_ioctls::Error> {
        let mut ev = self.fd.get_vcpu_events()?;
        if ev.exception.injected != 0 || ev.exception.pending != 0 {
            let nr = ev.exception.nr;
            let error_code = if ev.exception.has_error_code != 0 { ev.exception.error_code } else { 0 };
            let address = if nr == 14 { self.fd.get_sregs()?.cr2 } else { 0 };
            return Ok(Exception { nr, error_code, address });
        }
        if exc.nr == 14 {
            let mut s = self.fd.get_sregs()?;
            s.cr2 = exc.address;
            self.fd.set_sregs(&s)?;
        }
        let has_error_code = Exception::has_error_code(exc.nr);
        ev.exception.injected = 1;
        ev.exception.pending = 0;
        ev.exception.nr = exc.nr;
        ev.exception.has_error_code = u8::from(has_error_code);
        ev.exception.error_code = if has_error_code { exc.error_code } else { 0 };
        self.fd.set_vcpu_events(&ev)?;
        self.pending_exception = Some(exc.nr);
        Ok(Exception {
            nr: exc.nr,
            error_code: ev.exception.error_code,
            address: if exc.nr == 14 { exc.address } else { 0 },
        })
    }

    /// A single step ended (`failed`: another exit interrupted it).
    fn singlestep_event(&mut self, port: &VcpuPort, failed: bool) -> Option<Exit> {
        match port.raise(self, EventPayload::Singlestep { failed }) {
            Some(o) if o.action == Action::Crash => {
                Some(Exit::Crashed(format!("the introspector answered CRASH to a single step on vCPU {}", self.index)))
            }
            _ => None,
        }
    }

    /// The hypercall doorbell: KVMI's convention (RAX = 34, RDI = 24,
    /// RSI = 0) sends HYPERCALL; the guest gets 0 in RAX when the tool
    /// answered, -1000 (`-KVM_ENOSYS`) when no event was sent. A tool that
    /// sent SET_REGISTERS during the event chose the result itself: its
    /// RAX stands (the demo guest's agent call reads a reply length there).
    fn hypercall(&mut self, port: &VcpuPort) -> Option<Exit> {
        self.complete_pending_io();
        let Ok(regs) = self.fd.get_regs() else { return None };
        let kvmi = regs.rax & 0xffff_ffff == layout::HC_KVMI_NR && regs.rdi == layout::HC_KVMI_SUBFN && regs.rsi == 0;
        self.pf.regs_set = false;
        let outcome = if kvmi { port.raise(self, EventPayload::Hypercall) } else { None };
        if outcome.is_some_and(|o| o.action == Action::Crash) {
            return Some(Exit::Crashed(format!(
                "the introspector answered CRASH to a hypercall on vCPU {}",
                self.index
            )));
        }
        if outcome.is_some() && self.pf.regs_set {
            return None;
        }
        if let Ok(mut regs) = self.fd.get_regs() {
            regs.rax = if outcome.is_some() { 0 } else { (-1000i64) as u64 };
            let _ = self.put_regs(&regs);
        }
        None
    }

    /// A guest MSR write stopped by the filter: report it if this vCPU's tool
    /// watches it, then write the value the tool chose (or the guest's). A
    /// value KVM refuses raises #GP in the guest, as the write itself would.
    fn wrmsr(&mut self, port: &VcpuPort, msr: u32, data: u64) -> Option<Exit> {
        let old = self.read_msrs(&[msr]).ok().and_then(|v| v.first().copied()).unwrap_or(0);
        let value = match port.raise(self, EventPayload::Msr { msr, old_value: old, new_value: data }) {
            None => data,
            Some(o) if o.action == Action::Crash => {
                return Some(Exit::Crashed(format!(
                    "the introspector answered CRASH to an MSR {msr:#x} write on vCPU {}",
                    self.index
                )));
            }
            Some(o) => o.new_val.unwrap_or(data),
        };
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

    // ---- Page access (PF event). Restrictions live in `page_access` as a
    // memslot layout; these handlers serve the exits it causes. ----

    /// `KVM_EXIT_MMIO` read. Outside RAM: all ones. A page whose reads are
    /// allowed (or a page between two memslot updates): its RAM. A page
    /// whose reads are removed: the PF event first. CONTINUE supplies the
    /// RAM's current value; RETRY supplies it if the tool has allowed reads
    /// meanwhile, else the event comes again (re-executing would fault
    /// again). SET_REGISTERS during the event completes the read first (see
    /// `set_regs`); the tool's registers then replace the result.
    fn mmio_read(&mut self, port: &VcpuPort, gpa: u64, len: usize) -> Option<Exit> {
        self.pf.read_pending = Some((gpa, len));
        let shared = Arc::clone(&self.shared);
        if let Some(pa) = &shared.page_access {
            while pa.allowed(gpa) & access::R == 0 {
                self.pf.regs_set = false;
                let outcome = port.raise(self, EventPayload::Pf { gva: u64::MAX, gpa, access: access::R });
                if self.pf.read_pending.is_none() {
                    break; // completed by set_regs
                }
                match outcome.map(|o| o.action) {
                    None | Some(Action::Continue) => break,
                    Some(Action::Crash) => return Some(self.pf_crash(gpa, "read")),
                    Some(_) => {} // RETRY: check again
                }
            }
        }
        if let Some((gpa, len)) = self.pf.read_pending.take() {
            self.supply_read(gpa, len);
        }
        None
    }

    /// `KVM_EXIT_MMIO` write: the instruction has retired (RIP is past it),
    /// only its memory effect is held. Outside RAM: ignored. A page whose
    /// writes are allowed: written. Writes removed: the PF event first
    /// (`gva` unknown, all ones). CONTINUE writes. RETRY cannot re-execute
    /// a retired instruction, so: if the tool sent SET_REGISTERS during the
    /// event it has redirected the vCPU and the write is dropped (RIP was
    /// already past the store, so writing the registers back unchanged
    /// "skips" it); else if the page now allows writes, the write is done
    /// (what re-executing would do); else the event comes again.
    fn mmio_write(&mut self, port: &VcpuPort, gpa: u64, data: &[u8; 8], len: usize) -> Option<Exit> {
        let bytes = data.get(..len).unwrap_or(data);
        let shared = Arc::clone(&self.shared);
        if let Some(pa) = &shared.page_access {
            while pa.allowed(gpa) & access::W == 0 {
                self.pf.regs_set = false;
                match port.raise(self, EventPayload::Pf { gva: u64::MAX, gpa, access: access::W }).map(|o| o.action) {
                    None | Some(Action::Continue) => break,
                    Some(Action::Crash) => return Some(self.pf_crash(gpa, "write")),
                    Some(_) if self.pf.regs_set => return None, // RETRY after SET_REGISTERS: dropped
                    Some(_) => {}                               // RETRY: check again
                }
            }
        }
        // Outside RAM (real MMIO) the write goes nowhere.
        let _ = shared.ram.write(gpa, bytes);
        None
    }

    /// After a triple fault: "; its page or descriptor tables include gpa
    /// …" when a page this vCPU's CPU reads by itself has no memslot
    /// because of a restriction (the likely cause: tables the guest took
    /// into use after the restriction was checked, see `page_access`),
    /// else nothing.
    fn unmapped_table_note(&self) -> String {
        let (Some(pa), Ok(sregs)) = (&self.shared.page_access, self.fd.get_sregs()) else { return String::new() };
        pa.unmapped_table(&*self.shared, crate::page_tables::CpuTables::from_sregs(&sregs)).map_or_else(String::new, |gpa| {
            format!("; its page or descriptor tables include gpa {gpa:#x}, which SET_PAGE_ACCESS left without a memslot")
        })
    }

    /// An emulation failure: ours if the instruction at RIP (which may
    /// cross into the next page) touches a RAM page that has no memslot, or
    /// had none when the vCPU ran (the layout changed since: `fetch` then
    /// simply re-enters).
    fn fetch_fault(&self, rip: u64) -> Option<Step> {
        let pa = self.shared.page_access.as_ref()?;
        // An instruction is at most 15 bytes long.
        let next_page = (rip | 0xfff).wrapping_add(1);
        let pages = [Some(rip), (rip.wrapping_add(14) >= next_page).then_some(next_page)];
        let entered = self.pf.generation;
        let fd = &self.fd;
        // Translate with no memslot update in flight: a page-table walk
        // through a hole would fail.
        let gpa = pa.stable(|state| {
            // The layout changed since the vCPU ran: the fault may be from
            // the old one; `fetch` looks again and re-enters if need be.
            let stale = pa.generation() != entered;
            pages.into_iter().flatten().find_map(|gva| {
                let t = fd.translate_gva(gva).ok().filter(|t| t.valid != 0)?;
                state(t.physical_address).filter(|s| !s.mapped || stale).map(|_| t.physical_address)
            })
        })?;
        Some(Step::Fetch { gva: rip, gpa })
    }

    /// A fetch from a page without a memslot. Fetches removed: the PF event
    /// (gva = RIP). CONTINUE (or no event) maps the page back, lets exactly
    /// one instruction run (guest single-step), then restores the
    /// protection (`step_over_done`). RETRY re-enters: unless the tool
    /// relaxed the page or moved RIP, the fetch faults again and so the
    /// event comes again. A page that only lost reads executes the same way
    /// without an event; a page that has its slot again (an update just
    /// finished) simply runs.
    fn fetch(&mut self, port: &VcpuPort, gva: u64, gpa: u64) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        let pa = shared.page_access.as_ref()?;
        let state = pa.state(gpa)?;
        if state.mapped {
            return None;
        }
        if state.allowed & access::X == 0 {
            match port.raise(self, EventPayload::Pf { gva, gpa, access: access::X }).map(|o| o.action) {
                None | Some(Action::Continue) => {}
                Some(Action::Crash) => return Some(self.pf_crash(gpa, "fetch")),
                Some(_) => return None, // RETRY
            }
            // The tool made the page executable and readable meanwhile:
            // it has a slot of its own now. (Merely mapped is not enough:
            // another vCPU may be stepping over it for a moment.)
            if pa.state(gpa).is_none_or(|s| s.allowed & (access::R | access::X) == access::R | access::X) {
                return None;
            }
        }
        match pa.begin_exec(&*shared, gpa) {
            Ok(token) => self.pf.exec.push(token),
            Err(e) => return Some(Exit::Failed(format!("vCPU {}: mapping gpa {gpa:#x} back: {e}", self.index))),
        }
        self.debug.step_over = true;
        if let Err(e) = self.sync_debug() {
            return Some(Exit::Failed(format!("vCPU {}: KVM_SET_GUEST_DEBUG: {e}", self.index)));
        }
        None
    }

    /// The instruction stepped over a fetch fault has run: stop stepping
    /// and unmap the page(s) again.
    fn step_over_done(&mut self) -> Option<Exit> {
        self.debug.step_over = false;
        let synced = self.sync_debug();
        let shared = Arc::clone(&self.shared);
        if let Some(pa) = &shared.page_access {
            for token in self.pf.exec.drain(..) {
                if let Err(e) = pa.end_exec(&*shared, token) {
                    return Some(Exit::Failed(format!("vCPU {}: restoring a page restriction: {e}", self.index)));
                }
            }
        }
        synced.err().map(|e| Exit::Failed(format!("vCPU {}: KVM_SET_GUEST_DEBUG: {e}", self.index)))
    }

    fn pf_crash(&self, gpa: u64, what: &str) -> Exit {
        Exit::Crashed(format!(
            "the introspector answered CRASH to a PF event ({what} at gpa {gpa:#x}) on vCPU {}",
            self.index
        ))
    }

    /// Gives KVM the data of the pending MMIO read: RAM, or all ones
    /// outside RAM.
    fn supply_read(&mut self, gpa: u64, len: usize) {
        let mut buf = [0xffu8; 8];
        let n = len.min(8);
        if let Some(b) = buf.get_mut(..n) {
            if self.shared.ram.read(gpa, b).is_err() {
                b.fill(0xff);
            }
        }
        // The last exit was KVM_EXIT_MMIO (a read is pending), so `mmio` is
        // the active member of the exit union until the next KVM_RUN.
        self.fd.get_kvm_run().__bindgen_anon_1.mmio.data = buf;
    }

    fn io_out(&mut self, vport: &VcpuPort, port: u16, value: u32) -> Option<Exit> {
        match port {
            layout::PORT_HYPERCALL => return self.hypercall(vport),
            layout::PORT_SERIAL => self.shared.serial_byte(value as u8),
            layout::PORT_POWEROFF => return Some(Exit::PowerOff(value as u8)),
            layout::PORT_START_VCPU => {
                if let Ok(i) = u16::try_from(value) {
                    self.shared.start_vcpu(i);
                }
            }
            _ => {}
        }
        None
    }

    /// Enters the guest ABI's starting state: 64-bit ring 0, identity paging.
    fn enter_long_mode(&mut self) -> Result<()> {
        let mut s = self.fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
        let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db,
            s: 1,
            l,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        s.cs = seg(0x08, 11, 1, 0);
        let d = seg(0x10, 3, 0, 1);
        (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
        s.gdt.base = layout::GDT_ADDR;
        s.gdt.limit = 39;
        s.idt.base = 0;
        s.idt.limit = 0;
        s.cr0 = 0x8005_0033;
        s.cr3 = layout::PML4_ADDR;
        s.cr4 = 0x20;
        s.efer = 0x500;
        self.fd.set_sregs(&s).map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
        // RDX = the TSC frequency in kHz (0 if KVM cannot tell), so a guest
        // without a timer can turn rdtsc into time (see the guest ABI).
        let tsc_khz = self.fd.get_tsc_khz().map_or(0, u64::from);
        let regs = kvm_bindings::kvm_regs {
            rip: self.shared.entry,
            rdi: u64::from(self.index),
            rsi: u64::from(self.shared.vcpu_count()),
            rdx: tsc_khz,
            rsp: layout::STACK_TOP - u64::from(self.index) * layout::STACK_SIZE,
            rflags: 2,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
        // As firmware would: MTRRs enabled, default write-back.
        let msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: 0xc06, ..Default::default() }])
            .map_err(|e| Error::Config(format!("MSR list: {e:?}")))?;
        self.fd.set_msrs(&msrs).map_err(|e| Error::kvm("KVM_SET_MSRS", e))?;
        Ok(())
    }

    fn read_msrs(&self, indices: &[u32]) -> BackendResult<Vec<u64>> {
        if indices.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<kvm_msr_entry> =
            indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| BackendError::Failed(format!("{e:?}")))?;
        let n = self.fd.get_msrs(&mut msrs).map_err(io_err("KVM_GET_MSRS"))?;
        if n != indices.len() {
            let bad = indices.get(n).copied().unwrap_or(0);
            return Err(BackendError::Invalid(format!("MSR {bad:#x} cannot be read")));
        }
        Ok(msrs.as_slice().iter().map(|e| e.data).collect())
    }
}

impl VcpuBackend for KvmVcpu {
    fn regs(&mut self) -> BackendResult<KvmRegs> {
        self.fd.get_regs().map(|r| regs_to_wire(&r)).map_err(io_err("KVM_GET_REGS"))
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
        self.fd.get_sregs().map(|s| sregs_to_wire(&s)).map_err(io_err("KVM_GET_SREGS"))
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
        let x = kvm_bindings::kvm_xsave { region: area.region, ..Default::default() };
        // SAFETY: `x` is a whole legacy kvm_xsave; KVM reads exactly its 4096
        // bytes (no XSAVE2 tail is passed, so none is read).
        unsafe { self.fd.set_xsave(&x) }.map_err(|e| BackendError::Invalid(format!("KVM_SET_XSAVE: {e}")))
    }
}

impl MtrrOps for KvmVcpu {
    fn mtrr_type(&mut self, gpa: u64) -> BackendResult<u8> {
        let [cap, def] = <[u64; 2]>::try_from(self.read_msrs(&[MSR_MTRR_CAP, MSR_MTRR_DEF_TYPE])?)
            .map_err(|_| BackendError::Failed("MTRR MSRs".into()))?;
        if def & (1 << 11) == 0 {
            return Ok(0); // MTRRs disabled: everything uncacheable.
        }
        // Fixed ranges cover the first MiB.
        if def & (1 << 10) != 0 && cap & (1 << 8) != 0 && gpa < 0x10_0000 {
            let (msr, byte) = if gpa < 0x8_0000 {
                (MTRR_FIX_64K, gpa >> 16)
            } else if gpa < 0xc_0000 {
                let k = (gpa - 0x8_0000) >> 14;
                (MTRR_FIX_16K.get((k / 8) as usize).copied().unwrap_or(MTRR_FIX_16K[0]), k % 8)
            } else {
                let k = (gpa - 0xc_0000) >> 12;
                (MTRR_FIX_4K.get((k / 8) as usize).copied().unwrap_or(MTRR_FIX_4K[0]), k % 8)
            };
            let v = self.read_msrs(&[msr])?.first().copied().unwrap_or(0);
            return Ok((v >> (byte * 8)) as u8);
        }
        // Variable ranges: UC wins, then WT over WB (SDM 11.11.4.1).
        let count = (cap & 0xff) as u32;
        let idx: Vec<u32> =
            (0..count.min(16)).flat_map(|i| [MSR_MTRR_PHYS_BASE0 + 2 * i, MSR_MTRR_PHYS_BASE0 + 2 * i + 1]).collect();
        let vals = self.read_msrs(&idx)?;
        let mut found: Option<u8> = None;
        for pair in vals.chunks_exact(2) {
            let (base, mask) = (pair.first().copied().unwrap_or(0), pair.get(1).copied().unwrap_or(0));
            if mask & (1 << 11) == 0 {
                continue;
            }
            let m = mask & !0xfff;
            if gpa & m == base & m & !0xfff {
                let t = base as u8;
                found = Some(match (found, t) {
                    (_, 0) | (Some(0), _) => 0,
                    (Some(4), 6) | (Some(6), 4) => 4,
                    (_, t) => t,
                });
            }
        }
        Ok(found.unwrap_or(def as u8))
    }
}

impl trap_flag::ReadVirt for KvmVcpu {
    fn read_u64(&self, gva: u64) -> Option<u64> {
        KvmVcpu::read_virt_u64(self, gva)
    }
}

impl TranslateOps for KvmVcpu {
    fn translate_gva(&mut self, gva: u64) -> BackendResult<Option<u64>> {
        // Not while memslots change (the walk would see holes).
        let t = match &self.shared.page_access {
            Some(pa) => pa.stable(|_| self.fd.translate_gva(gva)),
            None => self.fd.translate_gva(gva),
        }
        .map_err(io_err("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }
}
