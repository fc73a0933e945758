//! Held pauses: every vCPU kept in a PAUSE event until the tool lets them go.
//!
//! Two kinds of holder keep the vCPUs paused: the tool's own pause
//! ([`Pauses::pause_all`] until [`Pauses::resume_all`]) and scoped holds
//! ([`Pauses::hold`] until [`Pauses::unhold`], e.g. for a write that must
//! not be half-seen). The vCPUs are let go when the last holder is gone, so
//! one holder ending never lets go of vCPUs another still needs held.
//!
//! The state lock is taken to mark which vCPUs should be held and to hold
//! or release them; pausing a vCPU (up to 10 s while the guest starts it)
//! and answering the held events happen without it.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use ukvmi_introspector::{EventReply, PendingEvent};

use crate::{
    engine::Inner,
    error::{cmd, on_vcpu, MonitorError, Result},
    record::Record,
};

#[derive(Debug, Default)]
struct State {
    /// vCPUs held, with the PAUSE event they are stopped in.
    held: BTreeMap<u16, PendingEvent>,
    /// The tool's own pause is on (`pause_all` until `resume_all`).
    tool: bool,
    /// Scoped holds alive (`hold` until `unhold`).
    holds: usize,
}

impl State {
    /// Nobody wants the vCPUs held any more.
    fn unwanted(&self) -> bool {
        !self.tool && self.holds == 0
    }
}

/// Who asks for the vCPUs to be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// The tool's own pause.
    Tool,
    /// A scoped hold.
    Scoped,
}

/// The pause policy.
#[derive(Debug, Default)]
pub(crate) struct Pauses {
    state: Mutex<State>,
    /// Signalled when a vCPU is held or the monitor stops.
    cond: Condvar,
}

impl Pauses {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes everyone waiting for vCPUs to be held (the monitor stopped).
    /// The lock is taken first: a waiter that saw `stop` still clear is
    /// then already waiting, so it cannot miss this.
    pub(crate) fn wake(&self) {
        drop(self.lock());
        self.cond.notify_all();
    }

    /// Who holds the vCPUs: the tool's pause, and the scoped holds.
    pub(crate) fn holders(&self) -> crate::PauseHolders {
        let st = self.lock();
        crate::PauseHolders { tool: st.tool, scoped: st.holds }
    }

    /// vCPUs held now.
    pub(crate) fn held(&self) -> Vec<u16> {
        self.lock().held.keys().copied().collect()
    }

    /// The tool's pause: holds every vCPU paused, waiting up to `timeout`
    /// for all of them, until [`resume_all`](Self::resume_all).
    pub(crate) fn pause_all(&self, inner: &Inner, timeout: Duration) -> Result<Vec<u16>> {
        self.acquire(inner, timeout, Holder::Tool)
    }

    /// A scoped hold: every vCPU held paused until the matching
    /// [`unhold`](Self::unhold), whatever the tool's pause does meanwhile.
    pub(crate) fn hold(&self, inner: &Inner, timeout: Duration) -> Result<Vec<u16>> {
        self.acquire(inner, timeout, Holder::Scoped)
    }

    /// Ends one scoped hold; lets the vCPUs go if nobody else holds them.
    pub(crate) fn unhold(&self, inner: &Inner) -> Vec<u16> {
        {
            let mut st = self.lock();
            st.holds = st.holds.saturating_sub(1);
        }
        self.release_unwanted(inner)
    }

    fn acquire(&self, inner: &Inner, timeout: Duration, who: Holder) -> Result<Vec<u16>> {
        let (to_pause, had_tool) = {
            let mut st = self.lock();
            let had_tool = st.tool;
            let first = st.unwanted();
            match who {
                Holder::Tool => st.tool = true,
                Holder::Scoped => st.holds += 1,
            }
            // The first holder pauses them; later ones wait for that.
            let to_pause: Vec<u16> =
                if first { (0..inner.vcpus).filter(|v| !st.held.contains_key(v)).collect() } else { Vec::new() };
            (to_pause, had_tool)
        };
        // Undoes this holder's claim (the vCPUs go if nobody else holds them).
        let give_up = || {
            {
                let mut st = self.lock();
                match who {
                    Holder::Tool => st.tool = had_tool,
                    Holder::Scoped => st.holds = st.holds.saturating_sub(1),
                }
            }
            self.release_unwanted(inner);
        };
        for v in to_pause {
            if let Err(e) = cmd(|| format!("KVMI_VM_PAUSE_VCPU {v}"), on_vcpu(|| inner.vm.pause_vcpu(v, false))) {
                give_up();
                return Err(e);
            }
        }
        // No deadline where the timeout is too long for the clock.
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.lock();
        while st.held.len() < usize::from(inner.vcpus) {
            if inner.stop.load(Ordering::SeqCst) {
                return Err(MonitorError::Closed);
            }
            let left = deadline.map_or(Duration::MAX, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                let msg = format!(
                    "only vCPUs {:?} paused within {timeout:?}; let go again unless another holder keeps them",
                    st.held.keys().collect::<Vec<_>>()
                );
                drop(st);
                give_up();
                return Err(MonitorError::Timeout(msg));
            }
            st = match deadline {
                Some(_) => self.cond.wait_timeout(st, left).map_or_else(|e| e.into_inner().0, |r| r.0),
                None => self.cond.wait(st).unwrap_or_else(PoisonError::into_inner),
            };
        }
        Ok(st.held.keys().copied().collect())
    }

    /// Ends the tool's pause. Returns the vCPUs let go: none while a
    /// scoped hold still keeps them (they go when it ends).
    pub(crate) fn resume_all(&self, inner: &Inner) -> Vec<u16> {
        self.lock().tool = false;
        self.release_unwanted(inner)
    }

    /// Lets every held vCPU go whoever holds them (the monitor stops).
    pub(crate) fn release_everything(&self, inner: &Inner) -> Vec<u16> {
        {
            let mut st = self.lock();
            st.tool = false;
            st.holds = 0;
        }
        self.release_unwanted(inner)
    }

    /// Lets the held vCPUs go when nobody wants them held.
    fn release_unwanted(&self, inner: &Inner) -> Vec<u16> {
        let held = {
            let mut st = self.lock();
            if !st.unwanted() {
                return Vec::new();
            }
            std::mem::take(&mut st.held)
        };
        let mut out = Vec::new();
        for (v, ev) in held {
            let _ = inner.vm.reply(&ev, EventReply::Continue);
            inner.subs.emit(&Record::Resumed { vcpu: v });
            out.push(v);
        }
        out
    }

    /// A PAUSE event: held when a tool wants this vCPU held; else given
    /// back, to be answered with CONTINUE.
    pub(crate) fn on_pause(&self, inner: &Inner, ev: PendingEvent) -> Option<PendingEvent> {
        let v = ev.vcpu.raw();
        let mut st = self.lock();
        // Checked under the lock: the shutdown sets `stop` before it lets
        // every held vCPU go, so none is held after that.
        if !st.unwanted() && !inner.stop.load(Ordering::SeqCst) {
            // Emitted under the lock, so that Paused precedes its Resumed.
            inner.subs.emit(&Record::Paused { vcpu: v });
            st.held.insert(v, ev);
            self.cond.notify_all();
            return None;
        }
        Some(ev)
    }
}
