//! The vCPU side: what a vCPU thread calls between guest entries.
//!
//! A [`VcpuPort`] belongs to one vCPU thread. The VMM calls
//! [`VcpuPort::handle_requests`] whenever [`VcpuPort::has_requests`] is set
//! (after every exit and after a kick), and [`VcpuPort::raise`] where the
//! guest did something an event reports. Both run jobs (vCPU commands and
//! event replies) on this thread, so the handlers see the vCPU's own state.

use crate::backend::{Exception, IdSet, VcpuBackend};
use crate::endpoint::Shared;
use crate::session::{lock, Disconnect, Job, Message, Session, VcpuSession, MAX_QUEUED_JOBS, NO_EVENT};
use crate::vcpu_commands;
use crate::TRACE;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ukvmi_event_trace::Point;
use ukvmi_wire::{
    event, msg, read_zext, tail, Action, EventMsrs, EventPayload, KvmRegs, KvmSregs, VcpuEvent, VcpuEventArch,
    VcpuEventReply, EVENT_REPLY_BODY_BASE,
};

/// How the tool answered an event. When the connection failed during the
/// event the outcome is CONTINUE with the guest's own value, as the spec asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventOutcome {
    /// What to do.
    pub action: Action,
    /// For CR and MSR events: the value to write.
    pub new_val: Option<u64>,
    /// True when the tool really answered (false: released or failed).
    pub answered: bool,
}

/// What the VMM should do after [`VcpuPort::handle_requests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Enter the guest.
    Continue,
    /// A PAUSE or TRAP event (the id) was answered CRASH: stop the VM as a
    /// guest shutdown.
    Crash(u16),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Expected {
    pub seq: u32,
    pub reply_size: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyData {
    pub action: u8,
    pub payload: [u8; 8],
}

/// Per-vCPU, per-session state that only the vCPU thread touches.
#[derive(Debug, Default)]
pub(crate) struct Local {
    /// vCPU events the tool enabled.
    pub enabled: IdSet,
    /// Events for which we asked the backend to intercept something.
    pub intercepts: IdSet,
    /// CRs selected with CONTROL_CR (bit n = CRn).
    pub crs: u8,
    /// MSRs selected with CONTROL_MSR.
    pub msrs: BTreeSet<u32>,
    pub singlestep: bool,
    /// The event being waited for.
    pub expect: Option<Expected>,
    /// Its reply, once it came (`None` inside: released or invalid).
    pub reply: Option<Option<ReplyData>>,
    /// SET_REGISTERS, applied when the reply comes.
    pub delayed_regs: Option<KvmRegs>,
    /// INJECT_EXCEPTION, performed before the next guest entry.
    pub pending_inject: Option<Exception>,
}

impl Local {
    pub fn waiting(&self) -> bool {
        self.expect.is_some()
    }
}

/// The handle a vCPU thread uses. Cheap to clone.
#[derive(Clone)]
pub struct VcpuPort {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: u16,
}

impl std::fmt::Debug for VcpuPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuPort").field("index", &self.index).finish()
    }
}

impl VcpuPort {
    /// The vCPU index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Whether [`VcpuPort::handle_requests`] has work: queued jobs, pauses,
    /// a pending injection, or cleanup after unhook. One atomic load.
    pub fn has_requests(&self) -> bool {
        self.shared.port(self.index).is_some_and(|p| p.request.load(Ordering::SeqCst))
    }

    /// Whether the tool enabled vCPU event `id` on this vCPU (a hint for the
    /// VMM to skip work; [`VcpuPort::raise`] decides for itself).
    pub fn event_enabled(&self, id: u16) -> bool {
        let Some(s) = self.shared.current() else { return false };
        let Some(vs) = s.vcpus.get(usize::from(self.index)) else { return false };
        let local = lock(&vs.local);
        !s.is_closed() && (local.enabled.contains(id) || (id == event::SINGLESTEP && local.singlestep))
    }

    /// Runs everything the introspector asked of this vCPU: cleanup left by
    /// a previous connection, queued jobs in FIFO order, one PAUSE event per
    /// pending pause (only once the queue is empty), then a requested
    /// exception injection followed by its TRAP event. Call it with the vCPU
    /// out of guest mode, before entering the guest, whenever
    /// [`VcpuPort::has_requests`] is set.
    ///
    /// Never call a `VcpuPort` method from inside a backend callback.
    pub fn handle_requests(&self, vcpu: &mut dyn VcpuBackend) -> Flow {
        if let Some(p) = self.shared.port(self.index) {
            p.request.store(false, Ordering::SeqCst);
        }
        let Some(sess) = self.current(vcpu) else { return Flow::Continue };
        let Some(vs) = sess.vcpus.get(usize::from(self.index)) else { return Flow::Continue };
        let mut local = lock(&vs.local);
        let mut cx = Ctx { sess: &sess, vs, vcpu, index: self.index };
        loop {
            cx.run_jobs(&mut local);
            let pause = {
                let mut q = lock(&vs.queue);
                if !q.jobs.is_empty() {
                    // A job arrived after the drain: run it first, and never
                    // enter the guest with a PAUSE still owed.
                    continue;
                }
                let take = q.pauses > 0;
                if take {
                    q.pauses -= 1;
                }
                take
            };
            if !pause {
                break;
            }
            if cx.deliver(&mut local, &EventPayload::Pause).action == Action::Crash {
                return Flow::Crash(event::PAUSE);
            }
        }
        if let Some(exc) = local.pending_inject.take() {
            let injected = cx.vcpu.support_inject().map(|i| i.inject(exc));
            if let Some(Ok(done)) = injected {
                let trap = EventPayload::Trap { nr: done.nr, error_code: done.error_code, address: done.address };
                if cx.deliver(&mut local, &trap).action == Action::Crash {
                    return Flow::Crash(event::TRAP);
                }
            }
        }
        Flow::Continue
    }

    /// Reports something the guest did. Returns `None` when no event was
    /// sent (nobody is connected, the tool did not ask for it, or a CR/MSR/
    /// XSETBV value did not change): the VMM then behaves as if not
    /// introspected. Otherwise the vCPU blocks here, running its jobs, until
    /// the tool answers or the connection ends. PAUSE and TRAP are the
    /// endpoint's own events and are never sent from here.
    pub fn raise(&self, vcpu: &mut dyn VcpuBackend, ev: EventPayload) -> Option<EventOutcome> {
        let sess = self.current(vcpu)?;
        if sess.is_closed() {
            return None;
        }
        let vs = sess.vcpus.get(usize::from(self.index))?;
        let mut local = lock(&vs.local);
        let id = ev.id();
        let wanted = match ev {
            EventPayload::Pause | EventPayload::Trap { .. } | EventPayload::Unknown { .. } => false,
            EventPayload::Singlestep { .. } => local.singlestep,
            EventPayload::Cr { cr, old_value, new_value } => {
                local.enabled.contains(id) && cr < 8 && local.crs & (1 << cr) != 0 && old_value != new_value
            }
            EventPayload::Msr { msr, old_value, new_value } => {
                local.enabled.contains(id) && local.msrs.contains(&msr) && old_value != new_value
            }
            EventPayload::Xsetbv { xcr, old_value, new_value } => {
                local.enabled.contains(id) && xcr == 0 && old_value != new_value
            }
            _ => local.enabled.contains(id),
        };
        if !wanted {
            return None;
        }
        let mut cx = Ctx { sess: &sess, vs, vcpu, index: self.index };
        Some(cx.deliver(&mut local, &ev))
    }

    /// The current session, after finishing any cleanup the previous one left.
    fn current(&self, vcpu: &mut dyn VcpuBackend) -> Option<Arc<Session>> {
        self.finish_cleanup(vcpu);
        self.shared.current()
    }

    /// After unhook: for each finished session, oldest first, drop its jobs,
    /// stop single-stepping, and (with the cleanup flag) undo every
    /// interception the tool set up.
    fn finish_cleanup(&self, vcpu: &mut dyn VcpuBackend) {
        let Some(p) = self.shared.port(self.index) else { return };
        let owed = std::mem::take(&mut *lock(&p.cleanup));
        for (old, restore) in owed {
            self.cleanup_one(vcpu, &old, restore);
        }
    }

    fn cleanup_one(&self, vcpu: &mut dyn VcpuBackend, old: &Session, restore: bool) {
        let Some(vs) = old.vcpus.get(usize::from(self.index)) else { return };
        {
            let mut q = lock(&vs.queue);
            q.jobs.clear();
            q.pauses = 0;
        }
        let mut local = lock(&vs.local);
        if local.singlestep {
            if let Some(ss) = vcpu.support_singlestep() {
                let _ = ss.set_singlestep(false);
            }
        }
        if restore {
            if let Some(ic) = vcpu.support_intercepts() {
                for id in event::VCPU_EVENTS.into_iter().filter(|id| local.intercepts.contains(*id)) {
                    let _ = ic.set_event_intercept(id, false);
                }
                for cr in [0u8, 3, 4].into_iter().filter(|cr| local.crs & (1 << cr) != 0) {
                    let _ = ic.set_cr_intercept(cr, false);
                }
                for msr in &local.msrs {
                    let _ = ic.set_msr_intercept(*msr, false);
                }
            }
        }
        *local = Local::default();
    }
}

/// Everything a job or an event needs on the vCPU thread.
pub(crate) struct Ctx<'a> {
    pub sess: &'a Session,
    pub vs: &'a VcpuSession,
    pub vcpu: &'a mut dyn VcpuBackend,
    pub index: u16,
}

impl Ctx<'_> {
    /// Pops and runs jobs until the queue is empty.
    pub fn run_jobs(&mut self, local: &mut Local) {
        self.run_jobs_until(local, false);
    }

    /// Pops and runs jobs until the queue is empty or, with
    /// `stop_at_reply`, until the awaited event reply has been consumed:
    /// commands queued behind a reply then run after the delayed registers
    /// and the action took effect, so a tool sees the state it asked for
    /// (the spec leaves this order open; we pick the useful one).
    fn run_jobs_until(&mut self, local: &mut Local, stop_at_reply: bool) {
        let ring = if stop_at_reply { self.sess.ring() } else { None };
        loop {
            if stop_at_reply && local.expect.is_none() {
                return;
            }
            // A reply in the channel was written before any command the
            // tool queued after it: take it first, so that command sees
            // the reply's registers and action applied, as on the socket.
            if let (Some(ch), Some(exp)) = (ring, local.expect) {
                if self.ring_reply(ch, local, exp.seq) {
                    return;
                }
            }
            let job = {
                let mut q = lock(&self.vs.queue);
                let job = q.jobs.pop_front();
                if q.jobs.len() + 1 == MAX_QUEUED_JOBS {
                    // It was full: the receiving thread may be waiting.
                    self.vs.room.notify_all();
                }
                job
            };
            match job {
                None => return,
                Some(Job::Release) => self.release(local),
                Some(Job::Message(m)) => {
                    self.run_message(local, &m);
                    if m.wire.quiet {
                        self.sess.quiet_job_done();
                    }
                }
            }
        }
    }

    fn run_message(&mut self, local: &mut Local, m: &Message) {
        if m.hdr.id == msg::VCPU_EVENT {
            if let Err(why) = self.event_reply(local, m) {
                self.sess.hard_error(why);
            }
            return;
        }
        if !matches!(
            m.hdr.id,
            msg::VCPU_GET_INFO
                | msg::VCPU_GET_REGISTERS
                | msg::VCPU_GET_CPUID
                | msg::VCPU_GET_XCR
                | msg::VCPU_GET_XSAVE
                | msg::VCPU_GET_MTRR_TYPE
                | msg::VCPU_TRANSLATE_GVA
                | msg::VCPU_CONTROL_EVENTS
                | msg::VCPU_CONTROL_CR
                | msg::VCPU_CONTROL_MSR
        ) {
            // Anything that might touch the vCPU's state: stop trusting the
            // event's snapshot (SET_REGISTERS is delayed, but be strict).
            lock(&self.vs.queue).snapshot = None;
        }
        let res = vcpu_commands::handle(self, local, m);
        let sent = match &res {
            Ok(data) => self.sess.answer(m, Ok(data)),
            Err(e) => self.sess.answer(m, Err(*e)),
        };
        if let Err(why) = sent {
            self.sess.hard_error(why);
        }
    }

    /// The connection is gone: drop pauses, end the wait as if CONTINUE,
    /// stop single-stepping.
    fn release(&mut self, local: &mut Local) {
        lock(&self.vs.queue).pauses = 0;
        if local.expect.take().is_some() {
            local.reply = Some(None);
        }
        if local.singlestep {
            if let Some(ss) = self.vcpu.support_singlestep() {
                let _ = ss.set_singlestep(false);
            }
            local.singlestep = false;
        }
    }

    /// Spec §7.3. Any violation is a hard error and ends the wait.
    pub(crate) fn event_reply(&mut self, local: &mut Local, m: &Message) -> Result<(), Disconnect> {
        let vcpu = self.index;
        let Some(exp) = local.expect else {
            return Err(Disconnect::BadEventReply { vcpu, why: "the vCPU is not waiting for an event reply" });
        };
        TRACE.mark(m.hdr.seq, Point::VcpuWakes, 0);
        let body = m.body.as_slice();
        let why = if m.hdr.seq != exp.seq {
            Some("sequence number does not match the event")
        } else if body.len() < EVENT_REPLY_BODY_BASE {
            Some("body shorter than 16 bytes")
        } else if body.len() - EVENT_REPLY_BODY_BASE > exp.reply_size {
            Some("payload larger than the event's reply structure")
        } else {
            let r: VcpuEventReply = read_zext(tail(body, 8));
            if r.padding1 != 0 || r.padding2 != 0 {
                Some("non-zero padding in kvmi_vcpu_event_reply")
            } else {
                let payload: [u8; 8] = read_zext(tail(body, EVENT_REPLY_BODY_BASE));
                local.expect = None;
                local.reply = Some(Some(ReplyData { action: r.action, payload }));
                None
            }
        };
        match why {
            None => Ok(()),
            Some(why) => {
                local.expect = None;
                local.reply = Some(None);
                Err(Disconnect::BadEventReply { vcpu, why })
            }
        }
    }

    /// Sends one vCPU event and blocks until it is answered, running this
    /// vCPU's jobs meanwhile. Failures behave as CONTINUE with the guest's value.
    pub fn deliver(&mut self, local: &mut Local, ev: &EventPayload) -> EventOutcome {
        let (id, guest_value) = (ev.id(), ev.guest_value());
        let fallback = EventOutcome { action: Action::Continue, new_val: guest_value, answered: false };
        let Some(info) = event::info(id) else { return fallback };
        if self.sess.is_closed() {
            return fallback;
        }
        let built = ukvmi_event_trace::stamp();
        let (body, snapshot, reads) = self.event_state();
        lock(&self.vs.queue).snapshot = snapshot.map(Box::new);
        let seq = self.sess.next_seq();
        local.expect = Some(Expected { seq, reply_size: info.reply_size });
        local.reply = None;
        self.vs.awaiting.store(id, Ordering::SeqCst);
        self.vs.waiting.store(true, Ordering::SeqCst);
        let ring = self.sess.ring();
        TRACE.mark_at(seq, Point::VcpuBuilds, built);
        TRACE.mark_at(seq, Point::RegsRead, reads[0]);
        TRACE.mark_at(seq, Point::SregsRead, reads[1]);
        TRACE.mark(seq, Point::VcpuSends, id);
        let sent = self
            .sess
            .frame_event(seq, id, &body, &ev.encode())
            .map_err(|e| Disconnect::WriteFailed(e.to_string()))
            .and_then(|bytes| match ring {
                // Through the channel when it is on and the event fits.
                Some(ch) if ch.post(self.index, seq, &bytes) => Ok(()),
                _ => self.sess.send(&bytes),
            });
        // A failed send shuts the connection down; the receiving thread
        // then ends (undoing the tool's writes) and releases this vCPU,
        // which ends the wait below.
        match sent {
            Ok(()) => self.sess.count_event(id),
            Err(why) => self.sess.hard_error(why),
        }
        while local.expect.is_some() {
            self.run_jobs_until(local, true);
            if local.expect.is_none() {
                break;
            }
            if let Some(ch) = ring {
                // Replies come through the channel or, as ever, as jobs.
                self.wait_ring(ch, local, seq);
                continue;
            }
            if spin_for_job(self.vs) {
                continue;
            }
            let q = lock(&self.vs.queue);
            drop(self.vs.wake.wait_while(q, |q| q.jobs.is_empty()).unwrap_or_else(|e| e.into_inner()));
        }
        lock(&self.vs.queue).snapshot = None;
        self.vs.waiting.store(false, Ordering::SeqCst);
        self.vs.awaiting.store(NO_EVENT, Ordering::SeqCst);
        let delayed = local.delayed_regs.take();
        let Some(Some(reply)) = local.reply.take() else { return fallback };
        let action = Action::from_u8(reply.action).filter(|a| info.actions.contains(*a));
        let Some(action) = action else {
            self.sess.hard_error(Disconnect::UnsupportedAction {
                vcpu: self.index,
                action: reply.action,
                event: info.name,
            });
            return fallback;
        };
        if let Some(regs) = delayed {
            let _ = self.vcpu.set_regs(&regs);
        }
        TRACE.mark(seq, Point::VcpuResumes, id);
        EventOutcome { action, new_val: guest_value.map(|_| u64::from_le_bytes(reply.payload)), answered: true }
    }

    /// `kvmi_vcpu_event` with the vCPU's current state, that state when it
    /// was read without error, and (tracing) when the registers and the
    /// special registers had been read.
    fn event_state(&mut self) -> (VcpuEvent, Option<(KvmRegs, KvmSregs)>, [u64; 2]) {
        let regs = self.vcpu.regs();
        let t_regs = ukvmi_event_trace::stamp();
        let sregs = self.vcpu.sregs();
        let t_sregs = ukvmi_event_trace::stamp();
        let snapshot = match (&regs, &sregs) {
            (Ok(r), Ok(s)) => Some((*r, *s)),
            _ => None,
        };
        let (regs, sregs) = (regs.unwrap_or_default(), sregs.unwrap_or_default());
        let mut vals = [0u64; 9];
        if self.vcpu.msrs(&EventMsrs::INDICES, &mut vals).is_err() {
            // Read one by one; an MSR the host cannot read reports 0.
            for (i, idx) in EventMsrs::INDICES.iter().enumerate() {
                let mut one = [0u64; 1];
                if self.vcpu.msrs(&[*idx], &mut one).is_ok() {
                    if let Some(v) = vals.get_mut(i) {
                        *v = one[0];
                    }
                }
            }
        }
        let ev = VcpuEvent {
            size: core::mem::size_of::<VcpuEvent>() as u16,
            vcpu: self.index,
            padding: 0,
            arch: VcpuEventArch {
                mode: cpu_mode(&sregs),
                padding: [0; 7],
                regs,
                sregs,
                msrs: EventMsrs::from_values(vals),
            },
        };
        (ev, snapshot, [t_regs, t_sregs])
    }
}

/// How long a vCPU waiting in an event checks its queue without sleeping
/// before it parks: a reply or command that comes within it costs no
/// wake-up (tens of µs on a nested host). Bounded, so a vCPU waiting for a
/// slow tool never burns a core.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// Spins (bounded by [`SPIN`]) until a job is queued; true if one was.
fn spin_for_job(vs: &VcpuSession) -> bool {
    let t0 = Instant::now();
    loop {
        if !lock(&vs.queue).jobs.is_empty() {
            return true;
        }
        if t0.elapsed() >= SPIN {
            return false;
        }
        // Let a thread woken on this CPU run (two cores are common here).
        std::thread::yield_now();
    }
}

/// Operand size in bytes from CS and EFER.LMA (spec §5.3).
pub(crate) fn cpu_mode(sregs: &KvmSregs) -> u8 {
    const EFER_LMA: u64 = 1 << 10;
    if sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0 {
        8
    } else if sregs.cs.db == 0 {
        2
    } else {
        4
    }
}
