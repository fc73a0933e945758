//! Subscriptions: who wants which records, and the bounded stream each reader gets.

use std::{
    sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use crate::{engine::Inner, error::MonitorError, record::Record};

/// Which records a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kinds {
    /// Syscalls and other breakpoints.
    pub breakpoints: bool,
    /// MSR writes.
    pub msr: bool,
    /// Page accesses.
    pub pages: bool,
    /// Hypercalls.
    pub hypercalls: bool,
    /// Pause and resume.
    pub pauses: bool,
}

impl Kinds {
    /// Everything.
    pub const ALL: Kinds = Kinds { breakpoints: true, msr: true, pages: true, hypercalls: true, pauses: true };

    fn wants(&self, r: &Record) -> bool {
        match r {
            Record::Syscall { .. } | Record::Breakpoint { .. } => self.breakpoints,
            Record::Msr { .. } => self.msr,
            Record::Page { .. } => self.pages,
            Record::Hypercall { .. } => self.hypercalls,
            Record::Paused { .. } | Record::Resumed { .. } => self.pauses,
            Record::Unhook | Record::Detached { .. } | Record::Lost { .. } => true,
        }
    }
}

/// A subscription's id: interceptions record it as their owner.
pub(crate) type SubId = u64;

/// Records a subscription may have waiting before newer ones are dropped
/// (and counted): a reader that stops must not grow the monitor forever.
pub(crate) const SUB_BACKLOG: usize = 10_000;

struct Sub {
    id: SubId,
    kinds: Kinds,
    tx: mpsc::SyncSender<Record>,
    /// Records dropped because the reader fell behind, not yet reported.
    lost: u64,
}

#[derive(Default)]
struct SubList {
    subs: Vec<Sub>,
    next_id: SubId,
}

/// Every live subscription. Its lock is the innermost of the monitor's:
/// taken for a channel send or a list change, never around anything else.
#[derive(Default)]
pub(crate) struct Subscribers {
    list: Mutex<SubList>,
}

impl std::fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscribers({})", self.lock().subs.len())
    }
}

impl Subscribers {
    fn lock(&self) -> MutexGuard<'_, SubList> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new subscriber for `kinds`: its id and the receiving end.
    pub(crate) fn add(&self, kinds: Kinds) -> (SubId, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::sync_channel(SUB_BACKLOG);
        let mut l = self.lock();
        l.next_id += 1;
        let id = l.next_id;
        l.subs.push(Sub { id, kinds, tx, lost: 0 });
        (id, rx)
    }

    /// Forgets subscriber `id`.
    pub(crate) fn remove(&self, id: SubId) {
        self.lock().subs.retain(|s| s.id != id);
    }

    /// Sends `r` to every subscriber that wants it, without waiting: a full
    /// backlog drops it (and counts it, reported as [`Record::Lost`] before
    /// the next record that fits); a reader that is gone is forgotten.
    pub(crate) fn emit(&self, r: &Record) {
        self.lock().subs.retain_mut(|s| {
            if !s.kinds.wants(r) {
                return true;
            }
            if s.lost > 0 {
                match s.tx.try_send(Record::Lost { count: s.lost }) {
                    Ok(()) => s.lost = 0,
                    Err(mpsc::TrySendError::Full(_)) => {
                        s.lost += 1;
                        return true;
                    }
                    Err(mpsc::TrySendError::Disconnected(_)) => return false,
                }
            }
            match s.tx.try_send(r.clone()) {
                Ok(()) => true,
                Err(mpsc::TrySendError::Full(_)) => {
                    s.lost += 1;
                    true
                }
                Err(mpsc::TrySendError::Disconnected(_)) => false,
            }
        });
    }

    /// Sends `last` to everyone and then forgets every subscriber (their
    /// streams end once read).
    pub(crate) fn close_all(&self, last: &Record) {
        self.emit(last);
        self.lock().subs.clear();
    }
}

/// A tool's stream of records; dropping it undoes its interceptions.
pub struct Subscription {
    pub(crate) id: SubId,
    rx: mpsc::Receiver<Record>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscription({})", self.id)
    }
}

impl Subscription {
    pub(crate) fn new(inner: &Arc<Inner>, kinds: Kinds) -> Subscription {
        let (id, rx) = inner.subs.add(kinds);
        Subscription { id, rx, inner: Arc::clone(inner) }
    }

    /// The next record, waiting up to `timeout`. `Err` once the monitor
    /// has stopped and every record was taken.
    pub fn next(&self, timeout: Duration) -> std::result::Result<Option<Record>, MonitorError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Ok(Some(r)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(MonitorError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}
