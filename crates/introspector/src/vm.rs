//! One KVMI connection: the reader thread, request/reply matching, the event
//! queue and the raw send paths.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ukvmi_wire::{frame, msg, read_zext, tail, ErrorCode, MsgHdr, VCPU_EVENT_BODY_BASE};

use crate::error::{Error, Result};
use crate::event::{self, Event, EventReply, VcpuEventMsg};
use crate::memory;

/// Default time a command waits for its reply.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// Requests [`Vm::pipeline`] keeps in flight: enough to keep the socket
/// busy, few enough that the replies (4 KiB pages for bulk reads) fit in the
/// socket buffers.
const PIPELINE_WINDOW: usize = 32;

/// How many unmatched replies are kept for [`Vm::take_unmatched`].
const UNMATCHED_KEEP: usize = 64;

/// What the handshake and `KVMI_GET_VERSION` told us about the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmInfo {
    /// VM UUID.
    pub uuid: [u8; 16],
    /// VM name (empty if unset or the handshake structure was too short).
    pub name: String,
    /// VM start time, host clock, seconds.
    pub start_time: i64,
    /// Highest end address of guest RAM; 0 if the structure was too short to carry it.
    pub max_gpa: u64,
    /// `struct_size` the device manager announced.
    pub handshake_size: u32,
    /// `KVMI_GET_VERSION.version`.
    pub version: u32,
    /// `KVMI_GET_VERSION.max_msg_size`.
    pub max_msg_size: u32,
    /// Whether the host can single-step (`features.singlestep`).
    pub singlestep: bool,
}

/// A reply as received, for the raw request paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    /// The message header (id and seq echoed from the request).
    pub hdr: MsgHdr,
    /// `kvmi_error_code.err` (zero-extended if the body was shorter than 8).
    pub err: i32,
    /// The bytes after `kvmi_error_code`.
    pub data: Vec<u8>,
}

impl RawReply {
    fn from_msg(m: &Message) -> RawReply {
        let ec: ErrorCode = read_zext(&m.body);
        RawReply { hdr: m.hdr, err: ec.err, data: tail(&m.body, 8).to_vec() }
    }
}

/// One message read from the socket.
pub(crate) struct Message {
    pub(crate) hdr: MsgHdr,
    pub(crate) body: Vec<u8>,
}

/// Requests waiting for their replies.
#[derive(Default)]
struct Pending {
    closed: bool,
    /// seq → (request id, the reply once it came).
    map: HashMap<u32, (u16, Option<Message>)>,
    /// Bumped (with `replies_cv` notified) whenever a thread lets go of the
    /// socket's read side, so a waiter that found it busy can take over.
    read_releases: u64,
}

#[derive(Default)]
struct EventQueue {
    closed: bool,
    queue: VecDeque<Event>,
}

/// State shared by the `Vm` handle and its reader thread.
struct Inner {
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
    write_lock: Mutex<()>,
    seq: AtomicU32,
    timeout_ns: AtomicU64,
    pending: Mutex<Pending>,
    events: Mutex<EventQueue>,
    unmatched: Mutex<VecDeque<RawReply>>,
    unmatched_count: AtomicU64,
    /// Requests (by seq) that accept a descriptor with their reply
    /// (`UKVMI_VM_MAP_MEMORY`), and the descriptor once it has come.
    fd_slots: Mutex<HashMap<u32, Option<OwnedFd>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    fn dispatch(&self, m: Message) {
        match m.hdr.id {
            msg::VM_EVENT if !self.is_id0_error_reply(&m) => {
                self.push_event(event::parse_vm_event(m.hdr.seq, &m.body));
            }
            msg::VCPU_EVENT if m.body.len() >= VCPU_EVENT_BODY_BASE => {
                self.push_event(Event::Vcpu(Box::new(event::parse_vcpu_event(m.hdr.seq, &m.body))));
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
        u.push_back(RawReply::from_msg(&m));
    }

    /// Keeps the first descriptor that came with the reply to a request
    /// that opened a slot for one ([`Vm::expect_fd`]); every other one is
    /// closed (dropped) here. A request that gave up has removed its slot,
    /// so a late descriptor is closed too.
    fn keep_fds(&self, hdr: &MsgHdr, fds: Vec<OwnedFd>) {
        if fds.is_empty() || hdr.id != msg::UKVMI_VM_MAP_MEMORY {
            return;
        }
        if let Some(slot @ None) = lock(&self.fd_slots).get_mut(&hdr.seq) {
            *slot = fds.into_iter().next();
        }
    }

    fn mark_closed(&self) {
        lock(&self.events).closed = true;
        let mut p = lock(&self.pending);
        p.closed = true;
        // Every waiter wakes: replies and events already delivered are still
        // taken, the others end with `Error::Closed`.
        self.replies_cv.notify_all();
    }

    fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }

    fn write(&self, bytes: &[u8]) -> Result<()> {
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

/// Bytes the read side takes in ahead: one `recvmsg` brings in every
/// message that has arrived (bulk replies come in bursts), and they are cut
/// out of the buffer one at a time. Larger than the largest message.
const READ_AHEAD: usize = 64 * 1024;

/// The socket's read side: the stream and its read-ahead buffer.
struct ReadSide {
    stream: UnixStream,
    buf: Vec<u8>,
    /// `buf[start..end]` holds bytes received but not yet cut into messages.
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]` (bytes consumed so far).
    consumed: u64,
    /// Descriptors received, each with the stream offset just past the read
    /// that brought it: it belongs to the message holding the byte before.
    fds: Vec<(u64, OwnedFd)>,
}

impl ReadSide {
    fn new(stream: UnixStream) -> ReadSide {
        ReadSide { stream, buf: vec![0; READ_AHEAD], start: 0, end: 0, consumed: 0, fds: Vec::new() }
    }

    /// Whether received bytes wait in the buffer (then reading does not block
    /// for long: at most for the rest of a message already on its way).
    fn buffered(&self) -> bool {
        self.start < self.end
    }

    /// Until `n` bytes are buffered (n <= READ_AHEAD): one `recvmsg` per round.
    fn need(&mut self, n: usize) -> std::io::Result<()> {
        while self.end - self.start < n {
            if self.buf.len() - self.start < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let mut got = Vec::new();
            let room = self.buf.get_mut(self.end..).unwrap_or_default();
            let k = memory::recv_some(&self.stream, room, &mut got)?;
            self.end += k;
            let past = self.consumed + (self.end - self.start) as u64;
            self.fds.extend(got.into_iter().map(|fd| (past, fd)));
        }
        Ok(())
    }

    /// The next whole message and the descriptors that came with it; `None`
    /// at EOF or on a read error (the connection is then over).
    fn next_message(&mut self) -> Option<(Message, Vec<OwnedFd>)> {
        self.need(8).ok()?;
        let hdr: MsgHdr = read_zext(self.buf.get(self.start..self.start + 8)?);
        let total = 8 + usize::from(hdr.size);
        self.need(total).ok()?;
        let body = self.buf.get(self.start + 8..self.start + total)?.to_vec();
        self.start += total;
        self.consumed += total as u64;
        let (end, mut mine) = (self.consumed, Vec::new());
        let mut i = 0;
        while i < self.fds.len() {
            if self.fds.get(i).is_some_and(|(past, _)| *past <= end) {
                mine.push(self.fds.remove(i).1);
            } else {
                i += 1;
            }
        }
        Some((Message { hdr, body }, mine))
    }
}

/// Reads one whole message; `None` at EOF or on a read error (the
/// connection is then over). A descriptor (`SCM_RIGHTS`) that arrives with
/// a message goes to that message's request if it is a
/// `UKVMI_VM_MAP_MEMORY` waiting for one, and is closed otherwise.
fn read_message(inner: &Inner, rd: &mut ReadSide) -> Option<Message> {
    let (m, fds) = rd.next_message()?;
    inner.keep_fds(&m.hdr, fds);
    Some(m)
}

/// How long a waiter polls the socket without sleeping before it blocks:
/// a reply that comes within it costs no wake-up (tens of µs on a nested
/// host). Bounded, so a waiter never burns a core for long.
const SPIN: Duration = Duration::from_micros(50);

/// Polls without sleeping, for at most `budget`; true once readable.
fn spin_until_readable(stream: &UnixStream, budget: Duration) -> bool {
    if budget.is_zero() {
        return false;
    }
    let t0 = Instant::now();
    loop {
        if readable(stream, Duration::ZERO) {
            return true;
        }
        if t0.elapsed() >= budget {
            return false;
        }
        // Let a thread woken on this CPU run (two cores are common here).
        std::thread::yield_now();
    }
}

/// Waits up to `timeout` for the socket to become readable (or hung up).
fn readable(stream: &UnixStream, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for a descriptor the stream owns, count 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n > 0
}

/// While a thread waits for a reply or an event it reads the socket
/// itself; this thread only reads when nobody does, so events and replies
/// nobody waits for are still taken in and a closed connection is noticed.
fn reader_loop(inner: &Inner) {
    /// How long the reader stands by while others read (whoever waits reads
    /// for itself, so nobody waits on this thread).
    const STANDBY: Duration = Duration::from_millis(10);
    /// Longest poll while nobody waits (data or a hang-up end it sooner).
    const IDLE_POLL: Duration = Duration::from_millis(100);
    loop {
        if inner.is_closed() {
            break;
        }
        if inner.waiters.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(STANDBY);
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
            Some(_) => {}
            None => {
                std::thread::sleep(STANDBY);
                continue;
            }
        }
        // Poll without holding the read side, so a caller can always take it.
        if !readable(&inner.stream, IDLE_POLL) || inner.waiters.load(Ordering::SeqCst) > 0 {
            continue;
        }
        let alive = match inner.try_read_side() {
            Some(rd) => inner.read_one(rd),
            None => {
                std::thread::sleep(STANDBY);
                true
            }
        };
        if !alive {
            break;
        }
    }
    inner.mark_closed();
}

impl Inner {
    /// The read side if nobody holds it (recovered if a holder panicked).
    fn try_read_side(&self) -> Option<MutexGuard<'_, ReadSide>> {
        match self.rd.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Reads and dispatches one message with the read side held, then lets
    /// go of it. False when the connection is over.
    fn read_one(&self, mut rd: MutexGuard<'_, ReadSide>) -> bool {
        let m = read_message(self, &mut rd);
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
    fn wait_reading<T>(&self, deadline: Option<Instant>, mut done: impl FnMut(&Inner) -> Option<T>) -> Option<T> {
        /// Longest single poll or wait. The reader polling wakes for any
        /// message and hands it on, and waiters are woken whenever the read
        /// side is let go, so this only bounds how often an idle waiter
        /// looks around.
        const SLICE: Duration = Duration::from_millis(20);
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut spin = SPIN;
        let out = loop {
            if let Some(v) = done(self) {
                break Some(v);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                break None;
            }
            let slice = left.map_or(SLICE, |l| l.min(SLICE));
            let gen = lock(&self.pending).read_releases;
            match self.rd.try_lock() {
                Ok(rd) => {
                    // Someone may have delivered ours just before we got it.
                    if let Some(v) = done(self) {
                        break Some(v);
                    }
                    if rd.buffered() || spin_until_readable(&rd.stream, spin) || readable(&rd.stream, slice) {
                        self.read_one(rd);
                    }
                    // Spin once per wait, right after the request went out.
                    spin = Duration::ZERO;
                }
                Err(TryLockError::Poisoned(e)) => {
                    self.read_one(e.into_inner());
                }
                Err(TryLockError::WouldBlock) => {
                    // Another thread reads: it delivers and then lets go.
                    let p = lock(&self.pending);
                    self.sleepers.fetch_add(1, Ordering::SeqCst);
                    let (p, _) = self
                        .replies_cv
                        .wait_timeout_while(p, slice, |p| p.read_releases == gen && !p.closed)
                        .unwrap_or_else(PoisonError::into_inner);
                    self.sleepers.fetch_sub(1, Ordering::SeqCst);
                    drop(p);
                }
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

/// One introspected VM: a KVMI connection and its reader thread.
///
/// All methods take `&self`; a `Vm` can be shared between threads (wrap it
/// in an `Arc` or use scoped threads) and commands from several threads are
/// in flight at once.
pub struct Vm {
    inner: Arc<Inner>,
    reader: Mutex<Option<JoinHandle<()>>>,
    pub(crate) info: VmInfo,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("info", &self.info).field("closed", &self.is_closed()).finish()
    }
}

impl Vm {
    /// Wraps an already-connected stream on which KVMI messages flow (no
    /// handshake, no `KVMI_GET_VERSION`): only starts the reader thread.
    /// [`Vm::info`] is all zeros. Meant for tests over `UnixStream::pair()`.
    pub fn connect_raw(stream: UnixStream) -> Result<Vm> {
        Vm::start(stream, VmInfo::default(), DEFAULT_REPLY_TIMEOUT)
    }

    pub(crate) fn start(stream: UnixStream, info: VmInfo, timeout: Duration) -> Result<Vm> {
        let read_half = stream.try_clone().map_err(Error::io("cloning the KVMI socket"))?;
        let inner = Arc::new(Inner {
            stream,
            rd: Mutex::new(ReadSide::new(read_half)),
            waiters: AtomicUsize::new(0),
            replies_cv: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            write_lock: Mutex::new(()),
            seq: AtomicU32::new(1),
            timeout_ns: AtomicU64::new(duration_ns(timeout)),
            pending: Mutex::new(Pending::default()),
            events: Mutex::new(EventQueue::default()),
            unmatched: Mutex::new(VecDeque::new()),
            unmatched_count: AtomicU64::new(0),
            fd_slots: Mutex::new(HashMap::new()),
        });
        let for_thread = Arc::clone(&inner);
        let handle = std::thread::Builder::new()
            .name("ukvmi-reader".into())
            .spawn(move || reader_loop(&for_thread))
            .map_err(Error::io("spawning the reader thread"))?;
        Ok(Vm { inner, reader: Mutex::new(Some(handle)), info })
    }

    /// What the handshake and `KVMI_GET_VERSION` reported (all zeros after
    /// [`Vm::connect_raw`]).
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// Sets how long each command waits for its reply (default 15 s).
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner.timeout_ns.store(duration_ns(timeout), Ordering::Relaxed);
    }

    /// The current reply timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_nanos(self.inner.timeout_ns.load(Ordering::Relaxed))
    }

    /// Takes a fresh sequence number (a process-wide counter per `Vm`, from 1).
    pub fn next_seq(&self) -> u32 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Sends a message with `id` and `body` (framed, fresh seq) and waits for
    /// the reply with the same seq and id, whatever its `err`.
    pub fn request_raw(&self, id: u16, body: &[u8]) -> Result<RawReply> {
        let seq = self.next_seq();
        let bytes = frame(id, seq, &[body]).map_err(|e| Error::Refused(e.to_string()))?;
        self.request_bytes(id, seq, &bytes)
    }

    /// Writes `bytes` as they are (the caller framed them, possibly wrongly)
    /// and waits for a reply carrying `id` and `seq`.
    pub fn request_bytes(&self, id: u16, seq: u32, bytes: &[u8]) -> Result<RawReply> {
        let m = self.roundtrip(id, seq, command_name(id), bytes)?;
        Ok(RawReply::from_msg(&m))
    }

    /// Writes `bytes` as they are, with no framing and no reply expected.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.inner.write(bytes)
    }

    /// Replies that matched no pending request (taken: the store is emptied).
    /// At most the last 64 are kept; see [`Vm::unmatched_count`].
    pub fn take_unmatched(&self) -> Vec<RawReply> {
        lock(&self.inner.unmatched).drain(..).collect()
    }

    /// How many replies matched no pending request since the connection began.
    pub fn unmatched_count(&self) -> u64 {
        self.inner.unmatched_count.load(Ordering::Relaxed)
    }

    /// Waits for the next event. `None` waits forever. `Ok(None)` on timeout;
    /// `Err(Error::Closed)` once the connection has ended and every queued
    /// event has been taken.
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        // `None` (wait forever) also when the deadline is too far to represent.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let got = self.inner.wait_reading(deadline, |inner| {
            let mut q = lock(&inner.events);
            match q.queue.pop_front() {
                Some(ev) => Some(Ok(ev)),
                None if q.closed => Some(Err(Error::Closed)),
                None => None,
            }
        });
        got.transpose()
    }

    /// A blocking iterator over events; it ends when the connection ends.
    pub fn events(&self) -> Events<'_> {
        Events { vm: self }
    }

    /// Answers a vCPU event. Refuses (sends nothing) an action the event does
    /// not accept, a value for an event that takes none, or an unknown event.
    /// Fire-and-forget: the hypervisor sends no reply to it.
    pub fn reply(&self, ev: &VcpuEventMsg, reply: EventReply) -> Result<()> {
        let body = event::reply_body(ev, reply)?;
        let bytes = frame(msg::VCPU_EVENT, ev.seq, &[&body]).map_err(|e| Error::Refused(e.to_string()))?;
        self.inner.write(&bytes)
    }

    /// Sends an event reply built from raw parts, unchecked: vCPU header
    /// (`vcpu`), `kvmi_vcpu_event_reply` (`action`, `event`), then `payload`.
    pub fn reply_raw(&self, seq: u32, vcpu: u16, action: u8, event: u8, payload: &[u8]) -> Result<()> {
        let body = event::build_reply_body(vcpu, action, event, payload);
        let bytes = frame(msg::VCPU_EVENT, seq, &[&body]).map_err(|e| Error::Refused(e.to_string()))?;
        self.inner.write(&bytes)
    }

    /// Shuts the socket down (both directions) without waiting; the reader
    /// thread then ends and every waiter gets [`Error::Closed`].
    pub fn shutdown(&self) {
        let _ = self.inner.stream.shutdown(Shutdown::Both);
    }

    /// Shuts the socket down and waits for the reader thread to end.
    pub fn close(&self) {
        self.shutdown();
        let handle = lock(&self.reader).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.inner.mark_closed();
    }

    // ------------------------------------------------------------ internals

    /// Lets the reply to request `seq` bring one descriptor (before sending).
    pub(crate) fn expect_fd(&self, seq: u32) {
        lock(&self.inner.fd_slots).insert(seq, None);
    }

    /// Closes the slot of request `seq` and returns the descriptor that came
    /// with its reply, if any.
    pub(crate) fn take_received_fd(&self, seq: u32) -> Option<OwnedFd> {
        lock(&self.inner.fd_slots).remove(&seq).flatten()
    }

    fn register(&self, seq: u32, id: u16) -> Result<()> {
        let mut p = lock(&self.inner.pending);
        if p.closed {
            return Err(Error::Closed);
        }
        p.map.insert(seq, (id, None));
        Ok(())
    }

    fn unregister(&self, seq: u32) {
        lock(&self.inner.pending).map.remove(&seq);
    }

    /// Registers `seq`, writes `bytes`, waits for the reply.
    fn roundtrip(&self, id: u16, seq: u32, command: &'static str, bytes: &[u8]) -> Result<Message> {
        self.register(seq, id)?;
        if let Err(e) = self.inner.write(bytes) {
            self.unregister(seq);
            return Err(e);
        }
        self.wait_reply(seq, command)
    }

    /// Waits for the reply registered as `seq` (at most the reply timeout),
    /// reading the socket itself while nobody else does; unregisters it.
    fn wait_reply(&self, seq: u32, command: &'static str) -> Result<Message> {
        let deadline = Instant::now().checked_add(self.timeout());
        let got = self.inner.wait_reading(deadline, |inner| {
            let mut p = lock(&inner.pending);
            let have = p.map.get(&seq).is_none_or(|(_, r)| r.is_some());
            if have {
                return Some(p.map.remove(&seq).and_then(|(_, r)| r).ok_or(Error::Closed));
            }
            p.closed.then_some(Err(Error::Closed))
        });
        got.unwrap_or_else(|| {
            // Timed out; the reply may have slipped in just now.
            lock(&self.inner.pending).map.remove(&seq).and_then(|(_, r)| r).ok_or(Error::Timeout { command })
        })
    }

    /// Sends command `id` with a body made of `parts` and returns the reply
    /// data after a successful `kvmi_error_code`.
    pub(crate) fn command(&self, id: u16, parts: &[&[u8]]) -> Result<Vec<u8>> {
        let name = command_name(id);
        let seq = self.next_seq();
        let bytes = frame(id, seq, parts).map_err(|e| Error::Refused(format!("{name}: {e}")))?;
        let m = self.roundtrip(id, seq, name, &bytes)?;
        reply_data(name, &m).map(<[u8]>::to_vec)
    }

    /// Sends command `id` once per body that `bodies` yields, keeping up to
    /// [`PIPELINE_WINDOW`] requests in flight (written in batches, one write
    /// each), and hands each reply's data, after a successful
    /// `kvmi_error_code`, to `take` together with the body's tag, in request
    /// order. Meant for VM commands, which the receiving thread answers in
    /// order. The first error stops sending; replies already owed are still
    /// collected (unless the connection failed or timed out) so none is
    /// left to arrive unmatched, then that error is returned.
    pub(crate) fn pipeline<T>(
        &self,
        id: u16,
        bodies: impl Iterator<Item = (Vec<u8>, T)>,
        mut take: impl FnMut(T, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let name = command_name(id);
        let mut bodies = bodies;
        let mut inflight: VecDeque<(u32, T)> = VecDeque::with_capacity(PIPELINE_WINDOW);
        let mut failed: Option<Error> = None;
        let mut batch = Vec::new();
        loop {
            if failed.is_none() && inflight.len() <= PIPELINE_WINDOW / 2 {
                batch.clear();
                let sent_from = inflight.len();
                while inflight.len() < PIPELINE_WINDOW {
                    let Some((body, tag)) = bodies.next() else { break };
                    let seq = self.next_seq();
                    match frame(id, seq, &[&body]).map_err(|e| Error::Refused(format!("{name}: {e}"))) {
                        Ok(bytes) => batch.extend_from_slice(&bytes),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                    match self.register(seq, id) {
                        Ok(()) => inflight.push_back((seq, tag)),
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                if failed.is_some() {
                    // What was framed but not written will never be answered.
                    batch.clear();
                    while inflight.len() > sent_from {
                        if let Some((seq, _)) = inflight.pop_back() {
                            self.unregister(seq);
                        }
                    }
                }
                if !batch.is_empty() {
                    if let Err(e) = self.inner.write(&batch) {
                        failed = Some(e);
                        while inflight.len() > sent_from {
                            if let Some((seq, _)) = inflight.pop_back() {
                                self.unregister(seq);
                            }
                        }
                    }
                }
            }
            let Some((seq, tag)) = inflight.pop_front() else { break };
            if matches!(failed, Some(Error::Closed | Error::Timeout { .. })) {
                self.unregister(seq);
                continue;
            }
            let res = self.wait_reply(seq, name).and_then(|m| take(tag, reply_data(name, &m)?));
            if let Err(e) = res {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// [`Vm::command`], then checks the reply data is exactly `len` bytes.
    pub(crate) fn command_exact(&self, id: u16, parts: &[&[u8]], len: usize) -> Result<Vec<u8>> {
        let data = self.command(id, parts)?;
        expect_len(id, &data, len)?;
        Ok(data)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.close();
    }
}

/// The data of a command reply after a successful `kvmi_error_code`.
fn reply_data<'m>(name: &'static str, m: &'m Message) -> Result<&'m [u8]> {
    if m.body.len() < 8 {
        return Err(Error::Protocol(format!(
            "{name}: reply body of {} bytes is shorter than kvmi_error_code",
            m.body.len()
        )));
    }
    let ec: ErrorCode = read_zext(&m.body);
    if ec.err != 0 {
        return Err(Error::from_reply(name, ec.err));
    }
    Ok(tail(&m.body, 8))
}

/// Checks a reply's data length.
pub(crate) fn expect_len(id: u16, data: &[u8], len: usize) -> Result<()> {
    if data.len() == len {
        Ok(())
    } else {
        Err(Error::Protocol(format!(
            "{}: reply carries {} bytes of data, expected {len}",
            command_name(id),
            data.len()
        )))
    }
}

/// The kernel's name of a message id, or a placeholder.
pub(crate) fn command_name(id: u16) -> &'static str {
    msg::name(id).unwrap_or("KVMI_UNKNOWN_MESSAGE")
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Blocking iterator over a [`Vm`]'s events; see [`Vm::events`].
#[derive(Debug)]
pub struct Events<'a> {
    vm: &'a Vm,
}

impl Iterator for Events<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.vm.next_event(None).ok().flatten()
    }
}
