//! Who reads the socket: a waiter reads for itself while it waits (for a
//! reply or an event), the standby reader thread while nobody waits; how
//! each of them blocks and is woken without timer slices.

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use super::{lock, Mux, Pending};
use crate::event_channel::Channel;
use crate::transport::{readable, spin_until_readable, wait_readable, Message, ReadSide, SPIN};

/// Reads one whole message; `None` at EOF or on a read error (the
/// connection is then over). A descriptor (`SCM_RIGHTS`) that arrives with
/// a message goes to that message's request if it is a
/// `UKVMI_VM_MAP_MEMORY` waiting for one, and is closed otherwise.
fn read_message(inner: &Mux, rd: &mut ReadSide) -> Option<Message> {
    let (m, fds) = rd.next_message()?;
    inner.keep_fds(&m.hdr, fds);
    Some(m)
}

/// While a thread waits for a reply or an event it reads the socket
/// itself; this thread only reads when nobody does, so events and replies
/// nobody waits for are still taken in and a closed connection is noticed.
/// It never wakes on a timer: it blocks in `poll` (the socket and its
/// wake-up descriptor) while nobody waits, and on a condvar while somebody
/// does, so an idle connection costs no wake-ups.
pub(crate) fn reader_loop(inner: &Mux) {
    loop {
        if inner.is_closed() {
            break;
        }
        if inner.waiters.load(Ordering::SeqCst) > 0 {
            inner.stand_by();
            continue;
        }
        // Messages a waiter left in the read-ahead buffer come first.
        match inner.try_read_side() {
            Some(rd) if rd.buffered() => {
                if inner.read_one(rd) {
                    continue;
                }
                break;
            }
            Some(rd) => inner.let_go(rd),
            None => {
                inner.stand_by();
                continue;
            }
        }
        // Poll without holding the read side, so a caller can always take it.
        let (data, woken) = wait_readable(&inner.stream, inner.reader_wake.fd(), None);
        if woken {
            inner.reader_wake.drain();
        }
        if !data || inner.waiters.load(Ordering::SeqCst) > 0 {
            continue;
        }
        let alive = match inner.try_read_side() {
            Some(rd) => inner.read_one(rd),
            None => {
                inner.stand_by();
                true
            }
        };
        if !alive {
            break;
        }
    }
    inner.mark_closed();
}

impl Mux {
    /// The read side if nobody holds it (recovered if a holder panicked).
    fn try_read_side(&self) -> Option<MutexGuard<'_, ReadSide>> {
        match self.rd.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// The reader thread, while others read: first a short plain sleep (a
    /// burst of messages then costs it no wake-up each), then asleep until
    /// nobody waits (the last waiter to leave wakes it) or the connection
    /// closes.
    fn stand_by(&self) {
        /// The plain sleep.
        const STANDBY: Duration = Duration::from_millis(10);
        std::thread::sleep(STANDBY);
        let mut p = lock(&self.pending);
        self.reader_parked.store(true, Ordering::SeqCst);
        while self.waiters.load(Ordering::SeqCst) > 0 && !p.closed {
            p = self.reader_cv.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
        self.reader_parked.store(false, Ordering::SeqCst);
    }

    /// A waiter is done: the last one to go hands reading back to the
    /// reader thread (woken from its condvar, or from its `poll` when
    /// messages wait in the read-ahead buffer).
    fn leave(&self) {
        if self.waiters.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        if self.reader_parked.load(Ordering::SeqCst) {
            let _p = lock(&self.pending);
            self.reader_cv.notify_all();
        } else if let Some(rd) = self.try_read_side() {
            let left = rd.buffered();
            self.let_go(rd);
            if left {
                self.reader_wake.wake();
            }
        }
        // Else a thread holds the read side: a new waiter (whose own
        // `leave` looks again) or the reader itself.
    }

    /// Lets go of the read side without reading, waking the waiters that
    /// found it busy (they sleep until it is let go).
    fn let_go(&self, rd: MutexGuard<'_, ReadSide>) {
        drop(rd);
        let mut p = lock(&self.pending);
        p.read_releases += 1;
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.replies_cv.notify_all();
        }
        drop(p);
    }

    /// Reads and dispatches one message with the read side held, then lets
    /// go of it. False when the connection is over.
    fn read_one(&self, mut rd: MutexGuard<'_, ReadSide>) -> bool {
        let m = read_message(self, &mut rd);
        if m.is_none() {
            if let Some(e) = rd.take_failure() {
                *lock(&self.failure) = Some(e);
            }
        }
        drop(rd);
        let alive = match m {
            Some(m) => {
                self.dispatch(m);
                true
            }
            None => {
                self.mark_closed();
                false
            }
        };
        let mut p = lock(&self.pending);
        p.read_releases += 1;
        // Sleepers count themselves under this lock before they sleep, so
        // none is missed; with none, no wake-up call at all.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.replies_cv.notify_all();
        }
        drop(p);
        alive
    }

    /// Waits, reading the socket itself whenever nobody else does, until
    /// `done` returns `Some` (checked after every message), or `deadline`.
    pub(crate) fn wait_reading<T>(&self, deadline: Option<Instant>, done: impl FnMut(&Mux) -> Option<T>) -> Option<T> {
        self.wait_reading_for(deadline, false, done)
    }

    /// [`Mux::wait_reading`]; with `ring`, an event posted in the channel
    /// also ends a spin or a sleep (so `done` sees it at once).
    ///
    /// No timer slices: a waiter holding the read side blocks in `poll`
    /// (socket, holder wake-up, and with `ring` the channel's pipe) until
    /// something comes or `deadline`; the others sleep on `replies_cv`
    /// until the read side is let go (every release bumps
    /// `read_releases`), the connection closes, or `deadline`.
    pub(super) fn wait_reading_for<T>(
        &self,
        deadline: Option<Instant>,
        ring: bool,
        mut done: impl FnMut(&Mux) -> Option<T>,
    ) -> Option<T> {
        let ring = if ring { self.channel.get() } else { None };
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut spin = if ring.is_some() { RING_SPIN } else { SPIN };
        let out = loop {
            if let Some(v) = done(self) {
                break Some(v);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                break None;
            }
            let gen = lock(&self.pending).read_releases;
            match self.rd.try_lock() {
                Ok(rd) => {
                    // Someone may have delivered ours just before we got it.
                    if let Some(v) = done(self) {
                        self.let_go(rd);
                        break Some(v);
                    }
                    let ready = match ring {
                        None => rd.buffered() || spin_until_readable(&rd.stream, spin) || self.block(&rd, left),
                        Some(ch) => {
                            rd.buffered()
                                || spin_ring(ch, &rd.stream, spin)
                                || ch.wait(&rd.stream, &self.holder_wake, left)
                        }
                    };
                    // Spin once per wait, right after the request went out.
                    spin = Duration::ZERO;
                    if ready {
                        self.read_one(rd);
                    } else {
                        self.let_go(rd);
                    }
                }
                Err(TryLockError::Poisoned(e)) => {
                    self.read_one(e.into_inner());
                }
                Err(TryLockError::WouldBlock) => {
                    // Another thread reads: it delivers and then lets go.
                    // A channel event wakes nobody here, so with the
                    // channel the sleep is short (see `RING_SLICE`).
                    let limit =
                        if ring.is_some() { Some(left.map_or(RING_SLICE, |l| l.min(RING_SLICE))) } else { left };
                    let p = lock(&self.pending);
                    self.sleepers.fetch_add(1, Ordering::SeqCst);
                    let busy = |p: &mut Pending| p.read_releases == gen && !p.closed;
                    let p = match limit {
                        Some(t) => {
                            self.replies_cv.wait_timeout_while(p, t, busy).map_or_else(|e| e.into_inner().0, |r| r.0)
                        }
                        None => self.replies_cv.wait_while(p, busy).unwrap_or_else(PoisonError::into_inner),
                    };
                    self.sleepers.fetch_sub(1, Ordering::SeqCst);
                    drop(p);
                }
            }
        };
        self.leave();
        out
    }

    /// Blocks the holder of the read side until the socket is readable, a
    /// wake-up ([`Mux::wake_event_waiter`]), or `left` runs out; true when
    /// the socket is readable.
    fn block(&self, rd: &ReadSide, left: Option<Duration>) -> bool {
        let (data, woken) = wait_readable(&rd.stream, self.holder_wake.fd(), left);
        if woken {
            self.holder_wake.drain();
        }
        data
    }
}

/// How long an event waiter spins, with the channel on, before it sleeps
/// (once per wait, right after it was called). Longer than the socket's
/// [`SPIN`]: with the hand-offs gone, the next event of a vCPU that the
/// tool just answered typically comes one exit and the event's register
/// reads later (40 to 150 µs on a nested host), and a sleeping tool costs
/// a wake-up (25 to 30 µs there) per event. Bounded, and only while the
/// tool itself waits for an event; the VMM does not spin for it.
const RING_SPIN: Duration = Duration::from_micros(200);

/// Longest sleep of an event waiter, with the channel on, while another
/// thread holds the socket's read side: that thread's `poll` is the one the
/// channel's pipe wakes, so this waiter looks at the slots at least this
/// often (only while both wait).
const RING_SLICE: Duration = Duration::from_millis(1);

/// Polls the socket and the channel without sleeping, for at most
/// `budget`; true once the socket is readable, false at the end of the
/// budget or as soon as the channel holds an event.
fn spin_ring(ch: &Channel, stream: &UnixStream, budget: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if ch.has_event() {
            return false;
        }
        if readable(stream, Duration::ZERO) {
            return true;
        }
        if t0.elapsed() >= budget {
            return false;
        }
        std::thread::yield_now();
    }
}
