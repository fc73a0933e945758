//! `GuestGate`: keeps every vCPU out of guest mode while memslots change.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Keeps vCPUs out of guest mode while memslots change. vCPU threads wrap
/// each `KVM_RUN` in [`GuestGate::enter`]; an updater calls
/// [`GuestGate::close`] with a function that kicks every vCPU, and
/// [`GuestGate::open`] when done. Updaters are serialised by the caller
/// (the page-access lock).
#[derive(Debug, Default)]
pub(crate) struct GuestGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// vCPU threads inside `KVM_RUN`.
    inside: u32,
    /// Closed: nobody may enter.
    closed: bool,
}

/// A vCPU thread inside `KVM_RUN`; leaves on drop.
#[derive(Debug)]
pub(crate) struct Inside<'a>(&'a GuestGate);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.inside = s.inside.saturating_sub(1);
        if s.inside == 0 {
            self.0.changed.notify_all();
        }
    }
}

impl GuestGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the gate is closed, then counts the caller in.
    pub fn enter(&self) -> Inside<'_> {
        let mut s = self.lock();
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.inside += 1;
        Inside(self)
    }

    /// Closes the gate and returns once no vCPU is in guest mode; `kick`
    /// pulls them out (called again every millisecond while some remain,
    /// in case a kick raced with an entry).
    pub fn close(&self, kick: &dyn Fn()) {
        self.lock().closed = true;
        loop {
            kick();
            let s = self.lock();
            if s.inside == 0 {
                return;
            }
            let (s, _) = self.changed.wait_timeout(s, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner());
            if s.inside == 0 {
                return;
            }
        }
    }

    /// Lets vCPUs enter again.
    pub fn open(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }
}
