//! The multiplexer: "whoever waits reads". Routes each message read from
//! the transport to the request waiting for it (by seq and id), to the
//! event queue, or to the unmatched store, and runs the standby reader
//! thread that reads while nobody waits.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use ukvmi_wire::{msg, read_zext, ErrorCode, KvmRegs, MsgHdr, VCPU_EVENT_BODY_BASE};

use crate::error::{Error, Result};
use crate::event_channel::Channel;
use crate::events::{self, Event};
use crate::pending::PendingEvent;
use crate::transport::{Message, ReadSide};
use crate::wake::Waker;
use crate::TRACE;
use ukvmi_event_trace::Point;

mod reading;
pub(crate) use reading::reader_loop;
#[cfg(test)]
mod tests;

/// How many unmatched replies are kept (the raw API's `take_unmatched`).
const UNMATCHED_KEEP: usize = 64;

/// Requests waiting for their replies.
#[derive(Default)]
struct Pending {
    closed: bool,
    /// seq → (request id, the reply once it came).
    map: HashMap<u32, (u16, Option<Message>)>,
    /// Bumped (with `replies_cv` notified) whenever a thread lets go of the
    /// socket's read side, so a waiter that found it busy can take over,
    /// and by [`Mux::wake_event_waiter`].
    read_releases: u64,
}

#[derive(Default)]
struct EventQueue {
    closed: bool,
    queue: VecDeque<Event>,
}

/// State shared by the `Vm` handle and its reader thread.
pub(crate) struct Mux {
    /// This multiplexer, for the events it hands out (their automatic reply).
    me: Weak<Mux>,
    /// Used for writing and shutting down; reading goes through `rd`.
    stream: UnixStream,
    /// The read side. Whoever holds it reads whole messages and dispatches
    /// them: a caller waiting for its reply or an event reads for itself
    /// (no hand-off through another thread), the reader thread reads only
    /// while nobody waits.
    rd: Mutex<ReadSide>,
    /// Threads waiting for a reply or an event (they read for themselves).
    waiters: AtomicUsize,
    /// Signalled when the read side is released (after each message read)
    /// and when the connection closes; waiters for replies and events sleep
    /// on it.
    replies_cv: Condvar,
    /// Threads asleep on `replies_cv` (no wake-up call when there are none).
    sleepers: AtomicUsize,
    /// Ends the `poll` of the thread holding the read side (a wake-up for
    /// [`Mux::next_event`]); only a holder of the read side drains it.
    holder_wake: Waker,
    /// Ends the reader thread's `poll` (a waiter left unread messages in
    /// the read-ahead buffer); only the reader thread drains it.
    reader_wake: Waker,
    /// The reader thread sleeps on `reader_cv` (with `pending` locked)
    /// until nobody waits; the last waiter to leave wakes it.
    reader_cv: Condvar,
    reader_parked: AtomicBool,
    /// Wake-ups asked for by [`Mux::wake_event_waiter`] and not taken yet:
    /// each makes one current or next [`Mux::next_event`] return `Ok(None)`.
    wakes: AtomicU32,
    write_lock: Mutex<()>,
    seq: AtomicU32,
    timeout_ns: AtomicU64,
    pending: Mutex<Pending>,
    events: Mutex<EventQueue>,
    unmatched: Mutex<VecDeque<Message>>,
    unmatched_count: AtomicU64,
    /// Why the connection broke, if it did not end cleanly (taken once).
    failure: Mutex<Option<std::io::Error>>,
    /// Requests (by seq) that accept descriptors with their reply
    /// (`UKVMI_VM_MAP_MEMORY`, `UKVMI_VM_EVENT_CHANNEL`), and the
    /// descriptors once they have come.
    fd_slots: Mutex<HashMap<u32, Option<Vec<OwnedFd>>>>,
    /// The shared-memory event channel, once enabled.
    pub(crate) channel: OnceLock<Channel>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Mux {
    /// A multiplexer over a connected stream (a clone of it is the read side).
    pub(crate) fn new(stream: UnixStream, timeout: Duration) -> Result<Arc<Mux>> {
        let read_half = stream.try_clone().map_err(Error::io("cloning the KVMI socket"))?;
        let (holder_wake, reader_wake) = (Waker::new()?, Waker::new()?);
        Ok(Arc::new_cyclic(|me| Mux {
            me: me.clone(),
            stream,
            rd: Mutex::new(ReadSide::new(read_half)),
            waiters: AtomicUsize::new(0),
            replies_cv: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            holder_wake,
            reader_wake,
            reader_cv: Condvar::new(),
            reader_parked: AtomicBool::new(false),
            wakes: AtomicU32::new(0),
            write_lock: Mutex::new(()),
            seq: AtomicU32::new(1),
            timeout_ns: AtomicU64::new(duration_ns(timeout)),
            pending: Mutex::new(Pending::default()),
            events: Mutex::new(EventQueue::default()),
            unmatched: Mutex::new(VecDeque::new()),
            unmatched_count: AtomicU64::new(0),
            failure: Mutex::new(None),
            fd_slots: Mutex::new(HashMap::new()),
            channel: OnceLock::new(),
        }))
    }

    /// Takes a fresh sequence number (a counter per connection, from 1).
    pub(crate) fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// How long a request waits for its reply.
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_nanos(self.timeout_ns.load(Ordering::Relaxed))
    }

    /// Sets how long a request waits for its reply.
    pub(crate) fn set_timeout(&self, timeout: Duration) {
        self.timeout_ns.store(duration_ns(timeout), Ordering::Relaxed);
    }

    /// Shuts the socket down (both directions) without waiting.
    pub(crate) fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    #[cfg(any(test, feature = "raw"))]
    /// Replies that matched no pending request (taken: the store is emptied).
    pub(crate) fn take_unmatched(&self) -> Vec<Message> {
        lock(&self.unmatched).drain(..).collect()
    }

    #[cfg(any(test, feature = "raw"))]
    /// How many replies matched no pending request since the connection began.
    pub(crate) fn unmatched_count(&self) -> u64 {
        self.unmatched_count.load(Ordering::Relaxed)
    }

    /// Lets the reply to request `seq` bring descriptors (before sending).
    pub(crate) fn expect_fd(&self, seq: u32) {
        lock(&self.fd_slots).insert(seq, None);
    }

    /// Closes the slot of request `seq` and returns the descriptors that
    /// came with its reply, if any.
    pub(crate) fn take_received_fds(&self, seq: u32) -> Vec<OwnedFd> {
        lock(&self.fd_slots).remove(&seq).flatten().unwrap_or_default()
    }

    /// Registers request `seq` (message `id`) to receive its reply.
    pub(crate) fn register(&self, seq: u32, id: u16) -> Result<()> {
        let mut p = lock(&self.pending);
        if p.closed {
            return Err(Error::Closed);
        }
        p.map.insert(seq, (id, None));
        Ok(())
    }

    /// Forgets request `seq` (a reply that still comes is unmatched).
    pub(crate) fn unregister(&self, seq: u32) {
        lock(&self.pending).map.remove(&seq);
    }

    /// Registers `seq`, writes `bytes`, waits for the reply.
    pub(crate) fn roundtrip(&self, id: u16, seq: u32, command: &'static str, bytes: &[u8]) -> Result<Message> {
        self.register(seq, id)?;
        if let Err(e) = self.write(bytes) {
            self.unregister(seq);
            return Err(e);
        }
        self.wait_reply(seq, command)
    }

    /// Waits for the reply registered as `seq` (at most the reply timeout),
    /// reading the socket itself while nobody else does; unregisters it.
    pub(crate) fn wait_reply(&self, seq: u32, command: &'static str) -> Result<Message> {
        let deadline = Instant::now().checked_add(self.timeout());
        let got = self.wait_reading(deadline, |mux| {
            let mut p = lock(&mux.pending);
            let have = p.map.get(&seq).is_none_or(|(_, r)| r.is_some());
            if have {
                return Some(p.map.remove(&seq).and_then(|(_, r)| r).ok_or(Error::Closed));
            }
            p.closed.then_some(Err(Error::Closed))
        });
        got.unwrap_or_else(|| {
            // Timed out; the reply may have slipped in just now.
            lock(&self.pending).map.remove(&seq).and_then(|(_, r)| r).ok_or(Error::Timeout { command })
        })
    }

    /// Why the connection broke (a read error, or EOF inside a message), if
    /// it did not end cleanly; taken once.
    pub(crate) fn take_failure(&self) -> Option<std::io::Error> {
        lock(&self.failure).take()
    }

    /// Waits for the next event until `deadline` (`None`: forever).
    /// `Ok(None)` on timeout; `Err(Error::Closed)` once the connection has
    /// ended and every queued event has been taken.
    /// [`Mux::wake_event_waiter`] also ends it with `Ok(None)`.
    pub(crate) fn next_event(&self, deadline: Option<Instant>) -> Result<Option<Event>> {
        let ring = self.channel.get().is_some();
        let got = self.wait_reading_for(deadline, ring, |mux| {
            let mut q = lock(&mux.events);
            match q.queue.pop_front() {
                Some(ev) => Some(Ok(Some(ev))),
                None if q.closed => Some(Err(Error::Closed)),
                None => match mux.take_ring_event() {
                    Some(ev) => Some(Ok(Some(ev))),
                    None => mux.take_wake().then_some(Ok(None)),
                },
            }
        });
        got.unwrap_or(Ok(None))
    }

    /// Takes one pending wake-up, if there is one.
    fn take_wake(&self) -> bool {
        self.wakes.load(Ordering::SeqCst) > 0
            && self.wakes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// Makes a thread waiting in [`Mux::next_event`] return `Ok(None)`
    /// now, wherever it sleeps; with none waiting, the next call returns
    /// `Ok(None)` at once. (With several waiting, one of them per call.)
    pub(crate) fn wake_event_waiter(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        let mut p = lock(&self.pending);
        p.read_releases += 1;
        self.replies_cv.notify_all();
        drop(p);
        self.holder_wake.wake();
    }

    /// The next event posted in the channel, parsed as if read off the socket.
    fn take_ring_event(&self) -> Option<Event> {
        let bytes = self.channel.get()?.take_event()?;
        let hdr: MsgHdr = read_zext(&bytes);
        let body = bytes.get(ukvmi_wire::MSG_HDR_SIZE..).unwrap_or_default();
        if hdr.id != msg::VCPU_EVENT || body.len() < VCPU_EVENT_BODY_BASE {
            // Not an event: nothing the VMM would post; ignore it.
            return None;
        }
        TRACE.mark(hdr.seq, Point::ToolReceives, 0);
        let ev = events::parse_vcpu_event(hdr.seq, body);
        Some(Event::Vcpu(PendingEvent::new(ev, self.me.clone())))
    }

    /// Sends reply message `bytes` to event `seq` of `vcpu`: through the
    /// channel if the event came through it, else on the socket.
    pub(crate) fn send_event_reply(&self, vcpu: u16, seq: u32, bytes: &[u8]) -> Result<()> {
        TRACE.mark(seq, Point::ToolReplies, 0);
        if let Some(ch) = self.channel.get() {
            if self.is_closed() {
                return Err(Error::Closed);
            }
            if ch.reply(vcpu, seq, bytes, None) {
                return Ok(());
            }
        }
        self.write(bytes)
    }

    /// Puts event reply `bytes` with `regs` in the event's channel slot (one
    /// write); `Ok(false)` when that cannot be done (the channel is off, the
    /// event did not come through it, or the VMM does not take registers
    /// with a reply): nothing was sent.
    pub(crate) fn send_event_reply_with_regs(&self, vcpu: u16, seq: u32, bytes: &[u8], regs: &KvmRegs) -> Result<bool> {
        let Some(ch) = self.channel.get() else { return Ok(false) };
        if self.is_closed() {
            return Err(Error::Closed);
        }
        // (If this returns false, the socket way marks the point again.)
        TRACE.mark(seq, Point::ToolReplies, 0);
        Ok(ch.reply(vcpu, seq, bytes, Some(regs)))
    }

    fn dispatch(&self, m: Message) {
        match m.hdr.id {
            msg::VM_EVENT if !self.is_id0_error_reply(&m) => {
                self.push_event(events::parse_vm_event(m.hdr.seq, &m.body));
            }
            msg::VCPU_EVENT if m.body.len() >= VCPU_EVENT_BODY_BASE => {
                TRACE.mark(m.hdr.seq, Point::ToolReceives, 0);
                let ev = events::parse_vcpu_event(m.hdr.seq, &m.body);
                self.push_event(Event::Vcpu(PendingEvent::new(ev, self.me.clone())));
            }
            _ => self.deliver_reply(m),
        }
    }

    /// The kernel answers a message with id 0 by an 8-byte error reply with
    /// id 0; an UNHOOK event is also 8 bytes but starts with event id 0 and
    /// zero padding. Only a non-zero `err` for a pending id-0 request counts.
    fn is_id0_error_reply(&self, m: &Message) -> bool {
        let ec: ErrorCode = read_zext(&m.body);
        m.body.len() == 8
            && ec.err != 0
            && lock(&self.pending).map.get(&m.hdr.seq).is_some_and(|(id, _)| *id == msg::VM_EVENT)
    }

    fn push_event(&self, ev: Event) {
        let mut q = lock(&self.events);
        q.queue.push_back(ev);
        // Waiters wake when the reader lets go of the read side (`read_one`).
    }

    /// Hands a reply to the request with the same seq *and* id (event and
    /// command seqs are separate counters, so seq alone can collide).
    fn deliver_reply(&self, m: Message) {
        let mut p = lock(&self.pending);
        let slot = p.map.get_mut(&m.hdr.seq).filter(|(id, r)| *id == m.hdr.id && r.is_none());
        if let Some((_, reply)) = slot {
            // Its waiter wakes when the reader lets go of the read side.
            *reply = Some(m);
            return;
        }
        drop(p);
        self.unmatched_count.fetch_add(1, Ordering::Relaxed);
        let mut u = lock(&self.unmatched);
        if u.len() >= UNMATCHED_KEEP {
            u.pop_front();
        }
        u.push_back(m);
    }

    /// Keeps the first descriptor that came with the reply to a request
    /// that opened a slot for one ([`Vm::expect_fd`]); every other one is
    /// closed (dropped) here. A request that gave up has removed its slot,
    /// so a late descriptor is closed too.
    fn keep_fds(&self, hdr: &MsgHdr, fds: Vec<OwnedFd>) {
        if fds.is_empty() || !matches!(hdr.id, msg::UKVMI_VM_MAP_MEMORY | msg::UKVMI_VM_EVENT_CHANNEL) {
            return;
        }
        if let Some(slot @ None) = lock(&self.fd_slots).get_mut(&hdr.seq) {
            *slot = Some(fds);
        }
    }

    pub(crate) fn mark_closed(&self) {
        lock(&self.events).closed = true;
        let mut p = lock(&self.pending);
        p.closed = true;
        // Every waiter wakes: replies and events already delivered are still
        // taken, the others end with `Error::Closed`.
        self.replies_cv.notify_all();
        self.reader_cv.notify_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }

    pub(crate) fn write(&self, bytes: &[u8]) -> Result<()> {
        let _guard = lock(&self.write_lock);
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if let Err(e) = (&self.stream).write_all(bytes) {
            // A partial write would desynchronise the framing: end the connection.
            let _ = self.stream.shutdown(Shutdown::Both);
            if self.is_closed() || e.kind() == std::io::ErrorKind::BrokenPipe {
                return Err(Error::Closed);
            }
            return Err(Error::Io { context: "writing to the KVMI socket", source: e });
        }
        Ok(())
    }
}

/// A duration in nanoseconds, saturating.
fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
