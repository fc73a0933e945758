//! Subscriptions: who wants which records, and the bounded stream each reader gets.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
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

/// One subscription's records on their way to its reader.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when a record comes, the stream ends, or a waker wakes.
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    records: VecDeque<Record>,
    /// Records dropped because the reader fell behind, not yet reported.
    lost: u64,
    /// The monitor forgot the subscription: nothing comes after `records`.
    closed: bool,
    /// A [`SubWaker`] woke the reader: its next wait returns at once.
    woken: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `r` without waiting: a full backlog drops it (and counts it,
    /// reported as [`Record::Lost`] before the next record that fits).
    fn push(&self, r: &Record) {
        let mut q = self.lock();
        if q.lost > 0 {
            if q.records.len() >= SUB_BACKLOG {
                q.lost += 1;
                return;
            }
            let count = std::mem::take(&mut q.lost);
            q.records.push_back(Record::Lost { count });
        }
        if q.records.len() >= SUB_BACKLOG {
            q.lost += 1;
            return;
        }
        q.records.push_back(r.clone());
        drop(q);
        self.ready.notify_all();
    }

    /// Ends the stream: its reader gets what is queued, then `Closed`.
    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn wake(&self) {
        self.lock().woken = true;
        self.ready.notify_all();
    }
}

struct Sub {
    id: SubId,
    kinds: Kinds,
    queue: Arc<Queue>,
}

#[derive(Default)]
struct SubList {
    subs: Vec<Sub>,
    next_id: SubId,
    /// The monitor has stopped: a subscription made now is over at once.
    ended: bool,
}

/// Every live subscription. Its lock is the innermost of the monitor's
/// (each queue's own lock is taken inside it, and alone by readers):
/// taken for a record's delivery or a list change, never around anything else.
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

    /// A new subscriber for `kinds`: its id and its queue.
    fn add(&self, kinds: Kinds) -> (SubId, Arc<Queue>) {
        let queue = Arc::new(Queue::default());
        let mut l = self.lock();
        l.next_id += 1;
        let id = l.next_id;
        if l.ended {
            queue.close();
        } else {
            l.subs.push(Sub { id, kinds, queue: Arc::clone(&queue) });
        }
        (id, queue)
    }

    /// Forgets subscriber `id`.
    pub(crate) fn remove(&self, id: SubId) {
        self.lock().subs.retain(|s| {
            if s.id == id {
                s.queue.close();
            }
            s.id != id
        });
    }

    /// Gives `r` to every subscriber that wants it, without waiting (see
    /// `Queue::push`).
    pub(crate) fn emit(&self, r: &Record) {
        for s in self.lock().subs.iter().filter(|s| s.kinds.wants(r)) {
            s.queue.push(r);
        }
    }

    /// Sends `last` to everyone and then forgets every subscriber (their
    /// streams end once read), for good: the monitor has stopped.
    pub(crate) fn close_all(&self, last: &Record) {
        let mut l = self.lock();
        for s in l.subs.drain(..) {
            if s.kinds.wants(last) {
                s.queue.push(last);
            }
            s.queue.close();
        }
        l.ended = true;
    }
}

/// A tool's stream of records; dropping it undoes its interceptions.
pub struct Subscription {
    pub(crate) id: SubId,
    queue: Arc<Queue>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscription({})", self.id)
    }
}

impl Subscription {
    pub(crate) fn new(inner: &Arc<Inner>, kinds: Kinds) -> Subscription {
        let (id, queue) = inner.subs.add(kinds);
        Subscription { id, queue, inner: Arc::clone(inner) }
    }

    /// The next record, waiting up to `timeout`; `Ok(None)` when none came
    /// (or a [`SubWaker`] woke the wait). `Err` once the monitor has
    /// stopped and every record was taken.
    pub fn next(&self, timeout: Duration) -> std::result::Result<Option<Record>, MonitorError> {
        self.next_until(Instant::now().checked_add(timeout))
    }

    /// The next record, waiting until `deadline` (`None`: as long as it
    /// takes), without waking in between: `Ok(None)` when the deadline
    /// passed or a [`SubWaker`] of this subscription woke the wait (a wake
    /// that finds no wait ends the next one). `Err` once the monitor has
    /// stopped and every record was taken.
    pub fn next_until(&self, deadline: Option<Instant>) -> std::result::Result<Option<Record>, MonitorError> {
        let mut q = self.queue.lock();
        loop {
            if let Some(r) = q.records.pop_front() {
                return Ok(Some(r));
            }
            if q.closed {
                return Err(MonitorError::Closed);
            }
            if std::mem::take(&mut q.woken) {
                return Ok(None);
            }
            q = match deadline {
                None => self.queue.ready.wait(q).unwrap_or_else(PoisonError::into_inner),
                Some(at) => {
                    let left = at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.queue.ready.wait_timeout(q, left).map_or_else(|e| e.into_inner().0, |r| r.0)
                }
            };
        }
    }

    /// A handle that ends this subscription's wait from another thread
    /// (a reader that must also stop for something else than a record).
    pub fn waker(&self) -> SubWaker {
        SubWaker { queue: Arc::clone(&self.queue) }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

/// Wakes a [`Subscription`]'s reader: see [`Subscription::waker`].
#[derive(Clone)]
pub struct SubWaker {
    queue: Arc<Queue>,
}

impl std::fmt::Debug for SubWaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubWaker")
    }
}

impl SubWaker {
    /// Makes the subscription's current wait, or else its next one, return
    /// `Ok(None)` (records already queued come first).
    pub fn wake(&self) {
        self.queue.wake();
    }
}
