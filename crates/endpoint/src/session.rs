//! One introspection connection: the socket, the VM-wide state the tool set
//! up, and one job queue per vCPU. Everything here is fresh for each
//! connection and dropped when it is unhooked.

use crate::backend::{HostCaps, IdSet, VmBackend};
use crate::dialect::{self, Dialect, Log};
use crate::event_channel::EventChannel;
use crate::permissions::Permissions;
use crate::vcpu::Local;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::Shutdown;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use thiserror::Error;
use ukvmi_wire::{event, frame, ErrorCode, IntoBytes, KvmErrno, KvmRegs, KvmSregs, MsgHdr, TooLarge, VcpuEvent};

/// Why a connection ended. The first hard error wins.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Disconnect {
    /// The tool closed its end (EOF between messages).
    #[error("the introspector closed the connection")]
    PeerClosed,
    /// Reading the socket failed.
    #[error("reading from the introspector failed: {0}")]
    ReadFailed(String),
    /// The socket ended inside a message.
    #[error("message id {id} truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Message id (0 if the header itself was cut).
        id: u16,
        /// Bytes announced.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A header announced a body larger than `KVMI_MAX_MSG_SIZE`.
    #[error("message id {id} announces {size} body bytes, more than 8184")]
    Oversize {
        /// Message id.
        id: u16,
        /// Announced size.
        size: u16,
    },
    /// Writing a reply or an event failed.
    #[error("writing to the introspector failed: {0}")]
    WriteFailed(String),
    /// VM_WRITE_PHYSICAL announced more data than its body holds.
    #[error("VM_WRITE_PHYSICAL announces {size} data bytes but only {available} arrived")]
    WritePhysicalOverflow {
        /// Announced data bytes.
        size: u16,
        /// Data bytes present.
        available: usize,
    },
    /// VM_SET_PAGE_ACCESS announced more entries than its body holds.
    #[error("VM_SET_PAGE_ACCESS announces {count} entries but the body has {body} bytes")]
    PageAccessOverflow {
        /// Announced entries.
        count: u16,
        /// Body bytes.
        body: usize,
    },
    /// An event reply broke a rule of spec §7.3.
    #[error("invalid event reply for vCPU {vcpu}: {why}")]
    BadEventReply {
        /// The vCPU it named.
        vcpu: u16,
        /// The rule it broke.
        why: &'static str,
    },
    /// An event was answered with an action it does not accept.
    #[error("vCPU {vcpu}: action {action} is not accepted by {event}")]
    UnsupportedAction {
        /// The vCPU.
        vcpu: u16,
        /// The action byte.
        action: u8,
        /// The event's name.
        event: &'static str,
    },
    /// The tool ended more v7 reply-suppressed batches than the vCPUs could
    /// complete: their final replies piled up.
    #[error("{0} batch replies wait for suppressed vCPU commands; the introspector does not wait for them")]
    BatchRepliesPiledUp(usize),
    /// The tool queued too many commands on one vCPU.
    #[error("the introspector queued {jobs} commands on vCPU {vcpu}, which got through none of them for 5 s (are its replies read?)")]
    QueueFull {
        /// The vCPU.
        vcpu: u16,
        /// Jobs waiting.
        jobs: usize,
    },
    /// A write to the tool could not finish in time.
    #[error("the introspector has not read its socket for 10 s")]
    NotReading,
    /// The device manager unhooked the VM.
    #[error("unhooked by the device manager")]
    Unhooked,
    /// A bug in the endpoint (it should never happen; the guest is safe anyway).
    #[error("internal error: {0}")]
    Internal(String),
}

/// A message as received: header plus exactly `size` body bytes. The
/// receiving thread allocates it; a vCPU job owns it until it has run.
///
/// `hdr.id` and `body` are what the handlers serve, always in v12 terms;
/// `wire` says how the tool is answered (for a v7 message: its own id,
/// possibly no reply at all; see `dialect`).
#[derive(Debug)]
pub(crate) struct Message {
    pub hdr: MsgHdr,
    pub body: Vec<u8>,
    pub wire: Wire,
}

/// How a message is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Wire {
    /// The id the reply carries: the id as received.
    pub id: u16,
    /// The reply is suppressed (v7 `CONTROL_CMD_RESPONSE`); the command
    /// still runs.
    pub quiet: bool,
    /// v7: the tool enables the CR event *class*, which by itself watches
    /// nothing; it succeeds (logged once) though no CR event can come.
    pub cr_class: bool,
}

impl Wire {
    /// A message answered as it came (v12).
    pub fn plain(id: u16) -> Wire {
        Wire { id, quiet: false, cr_class: false }
    }
}

/// Suppressed vCPU jobs still queued or running, and the replies that wait
/// for them (v7 `CONTROL_CMD_RESPONSE`: the batch's final reply goes out
/// only once every suppressed command before it has completed).
#[derive(Debug, Default)]
struct QuietJobs {
    outstanding: usize,
    deferred: Vec<Vec<u8>>,
}

#[derive(Debug)]
pub(crate) enum Job {
    /// A vCPU command or an event reply, already validated by the receiving thread.
    Message(Message),
    /// The connection is gone: drop pauses, end any wait as if CONTINUE.
    Release,
}

#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub jobs: VecDeque<Job>,
    pub pauses: u32,
    /// Registers and special registers as the waiting event captured them;
    /// valid while the vCPU waits in that event and nothing ran that could
    /// change them (see `Ctx::deliver`).
    pub snapshot: Option<Box<(KvmRegs, KvmSregs)>>,
}

/// `VcpuSession::awaiting` when the vCPU waits for no event.
pub(crate) const NO_EVENT: u16 = u16::MAX;

/// Per-vCPU part of a session.
pub(crate) struct VcpuSession {
    /// Filled by the receiving thread, drained by the vCPU thread.
    pub queue: Mutex<Queue>,
    /// Signalled whenever a job is queued (wakes a vCPU waiting for a reply).
    pub wake: Condvar,
    /// Signalled when a full queue gets room (wakes the receiving thread).
    pub room: Condvar,
    /// The vCPU is blocked in an event, waiting for its reply.
    pub waiting: AtomicBool,
    /// The id of that event ([`NO_EVENT`] when none): lets the receiving
    /// thread decode a reply by the event it answers, not by what the tool
    /// says it answers.
    pub awaiting: AtomicU16,
    /// State only the vCPU thread touches.
    pub local: Mutex<Local>,
    /// The port's "has requests" flag (shared with `VcpuPort`).
    pub request: Arc<AtomicBool>,
    /// The vCPU sleeps on its event-channel bell (ours, not the tool's hint).
    pub ring_sleeping: AtomicBool,
}

pub(crate) struct Session {
    pub vm: Arc<dyn VmBackend>,
    pub perms: Arc<Permissions>,
    pub caps: HostCaps,
    pub vcpus: Vec<VcpuSession>,
    /// VM events the tool enabled.
    pub vm_events: AtomicU32,
    /// CONTROL_CLEANUP flag: undo interceptions on unhook (default on).
    pub cleanup: AtomicBool,
    /// The dialect this connection speaks.
    pub dialect: Dialect,
    /// Where one-line notices go (the VMM's log).
    log: Log,
    /// Notices already logged this session (bits of `dialect::Notice`).
    noted: AtomicU8,
    quiet: Mutex<QuietJobs>,
    /// Bytes written with `UKVMI_VM_WRITE_PHYSICAL_UNDO`: gpa → (the byte
    /// before the tool's first write, the tool's last byte).
    undo: Mutex<BTreeMap<u64, (u8, u8)>>,
    /// vCPU events sent, per v12 event id.
    sent: [AtomicU32; event::NUM_EVENTS as usize],
    /// The shared-memory event channel, once the tool asked for it.
    pub channel: OnceLock<EventChannel>,
    socket: UnixStream,
    writer: Mutex<UnixStream>,
    seq: AtomicU32,
    end: Mutex<End>,
    ended: Condvar,
}

#[derive(Debug, Default)]
struct End {
    reason: Option<Disconnect>,
    receiver_done: bool,
}

/// Locks a mutex, recovering the data if another thread panicked with it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Session {
    pub fn new(
        vm: Arc<dyn VmBackend>,
        perms: Arc<Permissions>,
        requests: &[Arc<AtomicBool>],
        socket: UnixStream,
        dialect: Dialect,
        log: Log,
    ) -> std::io::Result<Session> {
        let writer = socket.try_clone()?;
        // SO_SNDTIMEO belongs to the socket: every clone's writes time out.
        writer.set_write_timeout(Some(WRITE_TIMEOUT))?;
        let caps = vm.caps();
        let vcpus = requests
            .iter()
            .map(|r| VcpuSession {
                queue: Mutex::new(Queue::default()),
                wake: Condvar::new(),
                room: Condvar::new(),
                waiting: AtomicBool::new(false),
                awaiting: AtomicU16::new(NO_EVENT),
                local: Mutex::new(Local::default()),
                request: Arc::clone(r),
                ring_sleeping: AtomicBool::new(false),
            })
            .collect();
        Ok(Session {
            vm,
            perms,
            caps,
            vcpus,
            vm_events: AtomicU32::new(0),
            cleanup: AtomicBool::new(true),
            dialect,
            log,
            noted: AtomicU8::new(0),
            quiet: Mutex::new(QuietJobs::default()),
            undo: Mutex::new(BTreeMap::new()),
            sent: std::array::from_fn(|_| AtomicU32::new(0)),
            channel: OnceLock::new(),
            socket,
            writer: Mutex::new(writer),
            seq: AtomicU32::new(0),
            end: Mutex::new(End::default()),
            ended: Condvar::new(),
        })
    }

    pub fn reader(&self) -> std::io::Result<UnixStream> {
        self.socket.try_clone()
    }

    /// The next event sequence number: VM-wide, pre-incremented, so the
    /// first event of a session has seq 1.
    pub fn next_seq(&self) -> u32 {
        self.seq.fetch_add(1, Ordering::SeqCst).wrapping_add(1)
    }

    /// Counts one vCPU event `id` as sent.
    pub fn count_event(&self, id: u16) {
        if let Some(n) = self.sent.get(usize::from(id)) {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// vCPU events sent so far, per event id (ids with none left out).
    pub fn events_sent(&self) -> Vec<(u16, u32)> {
        (0..event::NUM_EVENTS)
            .zip(&self.sent)
            .map(|(id, n)| (id, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    pub fn vm_event_enabled(&self, id: u16) -> bool {
        IdSet::from_bits(self.vm_events.load(Ordering::SeqCst)).contains(id)
    }

    /// Writes one whole message with a single write under the write lock.
    pub fn send(&self, bytes: &[u8]) -> Result<(), Disconnect> {
        let mut w = lock(&self.writer);
        w.write_all(bytes).map_err(write_failed)
    }

    /// Answers `m` as its dialect wants: with the id it came with, not at
    /// all while replies are suppressed, and with the v7 CR-class rule.
    pub fn answer(&self, m: &Message, res: Result<&[u8], KvmErrno>) -> Result<(), Disconnect> {
        let res = self.adjust(m, res);
        if m.wire.quiet {
            return Ok(());
        }
        self.send(&reply_bytes(m.wire.id, m.hdr.seq, res)?)
    }

    /// Answers `m` once every suppressed vCPU job queued before it has
    /// completed (at once if none is left): the final reply of a v7 batch.
    pub fn answer_after_quiet_jobs(&self, m: &Message, res: Result<&[u8], KvmErrno>) -> Result<(), Disconnect> {
        let res = self.adjust(m, res);
        if m.wire.quiet {
            return Ok(());
        }
        let bytes = reply_bytes(m.wire.id, m.hdr.seq, res)?;
        let mut q = lock(&self.quiet);
        if q.outstanding == 0 {
            drop(q);
            return self.send(&bytes);
        }
        if q.deferred.len() >= MAX_DEFERRED_REPLIES {
            return Err(Disconnect::BatchRepliesPiledUp(q.deferred.len()));
        }
        q.deferred.push(bytes);
        Ok(())
    }

    /// A suppressed vCPU job has completed; sends the replies that waited
    /// for the last one.
    pub fn quiet_job_done(&self) {
        let ready = {
            let mut q = lock(&self.quiet);
            q.outstanding = q.outstanding.saturating_sub(1);
            if q.outstanding == 0 {
                std::mem::take(&mut q.deferred)
            } else {
                Vec::new()
            }
        };
        for bytes in ready {
            if let Err(why) = self.send(&bytes) {
                self.hard_error(why);
                return;
            }
        }
    }

    fn adjust<'a>(&self, m: &Message, res: Result<&'a [u8], KvmErrno>) -> Result<&'a [u8], KvmErrno> {
        if m.wire.cr_class && res == Err(KvmErrno::Eopnotsupp) {
            self.notice_once(dialect::Notice::CrClass);
            return Ok(&[]);
        }
        res
    }

    /// Logs one line.
    pub fn log(&self, line: &str) {
        (self.log)(line);
    }

    /// Logs `n`'s line the first time it happens in this session.
    pub fn notice_once(&self, n: dialect::Notice) {
        let bit = n.bit();
        if self.noted.fetch_or(bit, Ordering::SeqCst) & bit == 0 {
            self.log(n.line());
        }
    }

    /// One vCPU event, framed for this connection's dialect.
    pub fn frame_event(&self, seq: u32, id: u16, ev: &VcpuEvent, payload: &[u8]) -> Result<Vec<u8>, TooLarge> {
        dialect::frame_event(self.dialect, seq, id, ev, payload)
    }

    /// Sends a successful command reply carrying `data` and, as `SCM_RIGHTS`
    /// ancillary data, the descriptors `fds`. Written under the writer lock,
    /// so the descriptors and their reply go out together.
    pub fn reply_with_fds(&self, m: &Message, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Disconnect> {
        let bytes = reply_bytes(m.wire.id, m.hdr.seq, Ok(data))?;
        let w = lock(&self.writer);
        crate::shared_memory::send_with_fds(&w, &bytes, fds).map_err(write_failed)
    }

    /// The event channel, when the tool enabled it (v12 only).
    pub fn ring(&self) -> Option<&EventChannel> {
        self.channel.get().filter(|_| self.dialect == Dialect::V12)
    }

    /// A hard error: remember why, and shut the socket down so the tool sees
    /// EOF and the receiving thread stops.
    pub fn hard_error(&self, why: Disconnect) {
        {
            let mut end = lock(&self.end);
            if end.reason.is_none() {
                end.reason = Some(why);
            }
        }
        let _ = self.socket.shutdown(Shutdown::Both);
    }

    /// Queues a job on a vCPU and kicks it. While [`MAX_QUEUED_JOBS`]
    /// messages wait on the vCPU, the receiving thread waits for room
    /// (backpressure: it reads nothing more from the tool meanwhile); no
    /// room within [`QUEUE_WAIT`] is a hard error: the vCPU is not getting
    /// through its commands (typically because the tool does not read
    /// their replies), and the queue must not grow without bound.
    pub fn queue_job(&self, vcpu: u16, job: Job) -> Result<(), Disconnect> {
        let Some(vs) = self.vcpus.get(usize::from(vcpu)) else { return Ok(()) };
        if matches!(job, Job::Message(_)) && lock(&vs.queue).jobs.len() >= MAX_QUEUED_JOBS {
            // Make sure the vCPU is working on them (kicked without the
            // queue's lock held, as always).
            self.poke(vcpu, vs, false);
        }
        {
            let mut q = lock(&vs.queue);
            if let Job::Message(m) = &job {
                if q.jobs.len() >= MAX_QUEUED_JOBS {
                    let (g, timeout) = vs
                        .room
                        .wait_timeout_while(q, QUEUE_WAIT, |q| q.jobs.len() >= MAX_QUEUED_JOBS)
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    if timeout.timed_out() {
                        return Err(Disconnect::QueueFull { vcpu, jobs: q.jobs.len() });
                    }
                }
                if m.wire.quiet {
                    lock(&self.quiet).outstanding += 1;
                }
            }
            q.jobs.push_back(job);
        }
        self.poke(vcpu, vs, false);
        Ok(())
    }

    /// Records a write the connection's end undoes: `old` are the bytes at
    /// `gpa` before it, `new` the bytes written. A byte written again keeps
    /// its first original; a byte written back to its original is
    /// forgotten. Fails (nothing recorded) past [`MAX_UNDO_BYTES`].
    pub fn record_undo(&self, gpa: u64, old: &[u8], new: &[u8]) -> Result<(), KvmErrno> {
        let mut log = lock(&self.undo);
        let fresh = (0u64..).zip(new).filter(|(i, _)| !log.contains_key(&(gpa + i))).count();
        if log.len() + fresh > MAX_UNDO_BYTES {
            return Err(KvmErrno::Enomem);
        }
        for ((i, o), n) in (0u64..).zip(old).zip(new) {
            let at = gpa + i;
            let first = log.get(&at).map_or(*o, |&(first, _)| first);
            if first == *n {
                log.remove(&at);
            } else {
                log.insert(at, (first, *n));
            }
        }
        Ok(())
    }

    /// Puts back every byte of the undo log that still holds what the tool
    /// wrote (a byte the guest changed since is the guest's and stays).
    /// Returns (restored, left).
    pub fn undo_writes(&self) -> (usize, usize) {
        let log = std::mem::take(&mut *lock(&self.undo));
        let (mut restored, mut left) = (0, 0);
        for (gpa, (first, written)) in log {
            let mut now = [0u8; 1];
            let ours = self.vm.read_physical(gpa, &mut now).is_ok() && now[0] == written;
            if ours && self.vm.write_physical(gpa, &[first]).is_ok() {
                restored += 1;
            } else {
                left += 1;
            }
        }
        (restored, left)
    }

    /// Forgets the commands and pauses queued for a vCPU. Its release job
    /// stays: a vCPU thread that serves requests before the guest started
    /// it (a backend may) can be waiting in an event, and only that job
    /// ends the wait.
    pub fn drop_vcpu_jobs(&self, vcpu: u16) {
        if let Some(vs) = self.vcpus.get(usize::from(vcpu)) {
            let mut q = lock(&vs.queue);
            q.jobs.retain(|j| matches!(j, Job::Release));
            q.pauses = 0;
        }
    }

    /// Raises the vCPU's request flag, wakes it if it waits for a reply, and
    /// kicks it out of guest mode.
    pub fn poke(&self, vcpu: u16, vs: &VcpuSession, wait: bool) {
        vs.request.store(true, Ordering::SeqCst);
        vs.wake.notify_all();
        if vs.ring_sleeping.load(Ordering::SeqCst) {
            if let Some(ch) = self.channel.get() {
                ch.ring(vcpu);
            }
        }
        self.vm.kick(vcpu, wait);
    }

    /// Called by the receiving thread as it exits: release every vCPU.
    /// The session counts as closed before the first release job is
    /// queued, so a vCPU that took one never sends an event and then
    /// waits for another.
    pub fn receiver_finished(&self) {
        {
            let mut end = lock(&self.end);
            end.receiver_done = true;
            self.ended.notify_all();
        }
        for i in 0..self.vcpus.len() {
            // vcpus.len() came from a u16 vCPU count; a release job is
            // always queued.
            let _ = self.queue_job(i as u16, Job::Release);
        }
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.end).receiver_done
    }

    /// Waits until the receiving thread has ended, at most `timeout`.
    pub fn wait_closed(&self, timeout: Option<std::time::Duration>) -> bool {
        let end = lock(&self.end);
        match timeout {
            None => {
                let _g = self.ended.wait_while(end, |e| !e.receiver_done);
                true
            }
            Some(t) => {
                let (g, _) =
                    self.ended.wait_timeout_while(end, t, |e| !e.receiver_done).unwrap_or_else(|e| e.into_inner());
                g.receiver_done
            }
        }
    }

    pub fn reason(&self) -> Option<Disconnect> {
        lock(&self.end).reason.clone()
    }
}

/// Jobs that may wait on one vCPU. A tool that waits for its replies has a
/// handful queued; one that never reads them fills this.
pub(crate) const MAX_QUEUED_JOBS: usize = 1024;

/// How long the receiving thread waits for room in a full job queue.
const QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a write to the tool may wait for it to read its socket before
/// the connection is given up (a blocked write also blocks every vCPU that
/// wants to send an event).
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes one connection may have in its undo log (`UKVMI_VM_WRITE_PHYSICAL_UNDO`).
pub(crate) const MAX_UNDO_BYTES: usize = 64 * 1024;

/// Batch replies that may wait for suppressed jobs at once (libkvmi waits
/// for each before it sends the next batch: it never has more than one).
const MAX_DEFERRED_REPLIES: usize = 64;

/// A failed write; the write timeout has its own reason.
fn write_failed(e: std::io::Error) -> Disconnect {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Disconnect::NotReading,
        _ => Disconnect::WriteFailed(e.to_string()),
    }
}

/// A reply framed: `id`, `seq`, the error code, and `data` only on success.
fn reply_bytes(id: u16, seq: u32, res: Result<&[u8], KvmErrno>) -> Result<Vec<u8>, Disconnect> {
    let (err, data): (i32, &[u8]) = match res {
        Ok(d) => (0, d),
        Err(e) => (e.wire(), &[]),
    };
    let ec = ErrorCode { err, padding: 0 };
    frame(id, seq, &[ec.as_bytes(), data]).map_err(|e| Disconnect::WriteFailed(e.to_string()))
}
