//! The monitor's shared core: the connection, guest memory access, the policies, and undoing them.
//!
//! # Locks
//!
//! - `setup` orders configuration changes (a tool asking for an
//!   interception, a subscription going, the shutdown) and holds the event
//!   reference counts. It may be held across KVMI round trips, including
//!   the up-to-10 s wait for a vCPU the guest has not started; the event
//!   thread never takes it.
//! - Each policy's state lock (breakpoints, MSRs, pages, hypercalls,
//!   pauses) is taken to copy out or record that policy's state, never
//!   across a round trip, except the breakpoint policy's one-byte code
//!   writes (see [`crate::policy`]).
//! - The subscribers' lock is the innermost: a channel send or a list change.
//! - The guest OS may keep a cache behind its own lock; it is never held
//!   across a guest memory read.
//!
//! Order: `setup` → a policy lock → the subscribers' lock. No lock is held
//! while taking one earlier in that order.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant},
};

use ukvmi_introspector::wire::event;
use ukvmi_introspector::{Event, EventPayload, EventReply, GuestMemoryMap, PendingEvent, Vm};

use crate::{
    error::MonitorError,
    events::EventRefs,
    guestos::{GuestMemory, GuestOs, PhysRead, ReadError},
    policy::{breakpoints::Breakpoints, hypercalls::Hypercalls, msr::MsrGuard, pages::PageGuard, pauses::Pauses},
    record::Record,
    subs::{SubId, Subscribers},
};

/// Everything the `Monitor`, its subscriptions and its event thread share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) vm: Arc<Vm>,
    /// The zero-copy view of guest RAM, when the VM grants one
    /// (`UKVMI_VM_MAP_MEMORY`); reads fall back to READ_PHYSICAL.
    pub(crate) map: Option<GuestMemoryMap>,
    /// The VM keeps an undo record of our code writes
    /// (`UKVMI_VM_WRITE_PHYSICAL_UNDO`): a monitor that dies leaves no int3.
    pub(crate) undo: bool,
    pub(crate) vcpus: u16,
    /// The guest OS: who runs where, what syscalls and agent calls mean.
    pub(crate) os: Arc<dyn GuestOs>,
    /// Orders configuration changes; holds the event reference counts.
    setup: Mutex<EventRefs>,
    pub(crate) subs: Subscribers,
    pub(crate) bps: Breakpoints,
    pub(crate) msrs: MsrGuard,
    pub(crate) pages: PageGuard,
    pub(crate) hypercalls: Hypercalls,
    pub(crate) pauses: Pauses,
    /// Set once the monitor has shut down (or the connection ended).
    pub(crate) stop: AtomicBool,
    /// Asks the event thread to shut down (it owns the last reads).
    pub(crate) stopping: AtomicBool,
    pub(crate) events: AtomicU64,
}

impl PhysRead for Inner {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        match &self.map {
            Some(m) => Ok(m.read(gpa, buf)?),
            None => self.vm.read_phys(gpa, buf),
        }
    }
}

impl GuestMemory for Inner {
    fn translate(&self, vcpu: u16, gva: u64) -> Option<u64> {
        self.vm.translate(vcpu, gva)
    }
}

impl Inner {
    pub(crate) fn new(vm: Arc<Vm>, vcpus: u16, os: Arc<dyn GuestOs>) -> Inner {
        let map = vm.map_memory().ok();
        let undo = vm.check_command(ukvmi_introspector::wire::msg::UKVMI_VM_WRITE_PHYSICAL_UNDO).is_ok();
        Inner {
            vm,
            map,
            undo,
            vcpus,
            os,
            setup: Mutex::new(EventRefs::default()),
            subs: Subscribers::default(),
            bps: Breakpoints::default(),
            msrs: MsrGuard::default(),
            pages: PageGuard::default(),
            hypercalls: Hypercalls::default(),
            pauses: Pauses::default(),
            stop: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            events: AtomicU64::new(0),
        }
    }

    /// The setup lock (see the module documentation).
    pub(crate) fn setup(&self) -> MutexGuard<'_, EventRefs> {
        self.setup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The setup lock, for a new interception: refused once the monitor has
    /// stopped (the shutdown undid everything under this lock; a hook set
    /// after it would outlive the monitor).
    pub(crate) fn setup_open(&self) -> Result<MutexGuard<'_, EventRefs>, MonitorError> {
        let refs = self.setup();
        if self.stop.load(Ordering::SeqCst) {
            return Err(MonitorError::Closed);
        }
        Ok(refs)
    }

    /// Writes one byte of guest code (an int3 or the byte it replaced): with
    /// the VM's undo record where it has one, so the VMM puts the original
    /// back if this monitor dies.
    pub(crate) fn write_code(&self, gpa: u64, byte: u8) -> ukvmi_introspector::Result<()> {
        if self.undo {
            self.vm.write_physical_undo(gpa, &[byte])
        } else {
            self.vm.write_physical(gpa, &[byte])
        }
    }

    /// Undoes what subscription `id` asked for.
    pub(crate) fn release(&self, id: SubId) {
        let mut refs = self.setup();
        self.subs.remove(id);
        self.release_owners(&mut refs, &|o| o == id);
    }

    fn release_owners(&self, refs: &mut EventRefs, gone: &dyn Fn(SubId) -> bool) {
        self.bps.release(self, refs, gone);
        self.msrs.release(self, refs, gone);
        self.pages.release(self, refs, gone);
        self.hypercalls.release(self, refs, gone);
    }

    /// Undoes every interception, lets held vCPUs go, answers the events
    /// already on their way, and closes the connection. Runs once.
    pub(crate) fn shutdown(&self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        {
            let mut refs = self.setup();
            self.release_owners(&mut refs, &|_| true);
            self.pauses.release_everything(self);
            self.bps.stop_stepping(self);
            refs.disable(&self.vm, self.vcpus, event::PAUSE);
            self.subs.close_all(&Record::Detached { reason: "the monitor stopped; every hook was removed".into() });
        }
        // Events already on their way were raised under the hooks just
        // removed: answer them here rather than leave them to the VMM's
        // "as if CONTINUE" at close, which would hand a breakpoint hit to
        // the guest as a #BP.
        const QUIET: Duration = Duration::from_millis(50);
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && !self.vm.is_closed() {
            let asked = Instant::now();
            match self.vm.next_event(Some(QUIET)) {
                Ok(Some(Event::Vcpu(ev))) => self.answer_stray(&ev),
                Ok(Some(_)) => {}
                // Back early: the wake-up `Monitor::stop` sent the event
                // thread, not a quiet connection.
                Ok(None) if asked.elapsed() < QUIET => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.vm.close();
        self.pauses.wake();
    }

    /// Answers an event no interception claims: a breakpoint whose `int3`
    /// is no longer in memory was one of ours (removed since): RETRY runs
    /// the real instruction; a live `int3` is the guest's own (CONTINUE
    /// gives it its #BP). Anything else: CONTINUE.
    pub(crate) fn answer_stray(&self, ev: &PendingEvent) {
        let action = match ev.payload {
            EventPayload::Breakpoint { gpa, .. } => {
                let mut b = [0u8];
                if self.read_phys(gpa, &mut b).is_ok() && b[0] != 0xcc {
                    EventReply::Retry
                } else {
                    EventReply::Continue
                }
            }
            _ => EventReply::Continue,
        };
        let _ = self.vm.reply(ev, action);
    }
}
