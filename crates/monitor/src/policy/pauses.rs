//! Held pauses: every vCPU kept in a PAUSE event until the tool lets them go.
//!
//! The state lock is taken to mark which vCPUs should be held and to hold
//! or release them; pausing a vCPU (up to 10 s while the guest starts it)
//! and answering the held events happen without it.

use std::{
    collections::{BTreeMap, BTreeSet},
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
    /// vCPUs a tool wants held.
    want: BTreeSet<u16>,
    /// vCPUs held, with the PAUSE event they are stopped in.
    held: BTreeMap<u16, PendingEvent>,
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
    pub(crate) fn wake(&self) {
        self.cond.notify_all();
    }

    /// vCPUs held now.
    pub(crate) fn held(&self) -> Vec<u16> {
        self.lock().held.keys().copied().collect()
    }

    /// Holds every vCPU paused, waiting up to `timeout` for all of them.
    pub(crate) fn pause_all(&self, inner: &Inner, timeout: Duration) -> Result<Vec<u16>> {
        let to_pause: Vec<u16> = {
            let mut st = self.lock();
            (0..inner.vcpus).filter(|&v| st.want.insert(v) && !st.held.contains_key(&v)).collect()
        };
        for v in to_pause {
            if let Err(e) = cmd(|| format!("KVMI_VM_PAUSE_VCPU {v}"), on_vcpu(|| inner.vm.pause_vcpu(v, false))) {
                self.resume_all(inner);
                return Err(e);
            }
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.held.len() < usize::from(inner.vcpus) {
            if inner.stop.load(Ordering::SeqCst) {
                return Err(MonitorError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let msg = format!(
                    "only vCPUs {:?} paused within {timeout:?}; all let go again",
                    st.held.keys().collect::<Vec<_>>()
                );
                drop(st);
                self.resume_all(inner);
                return Err(MonitorError::Timeout(msg));
            }
            st = self
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        Ok(st.held.keys().copied().collect())
    }

    /// Lets every held vCPU go (and wants none held). Returns the ones that were held.
    pub(crate) fn resume_all(&self, inner: &Inner) -> Vec<u16> {
        let held = {
            let mut st = self.lock();
            st.want.clear();
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
        if st.want.contains(&v) && !inner.stop.load(Ordering::SeqCst) {
            // Emitted under the lock, so that Paused precedes its Resumed.
            inner.subs.emit(&Record::Paused { vcpu: v });
            st.held.insert(v, ev);
            self.cond.notify_all();
            return None;
        }
        Some(ev)
    }
}
