//! The public facade of one introspected VM: [`Vm`] (connection lifetime,
//! timeouts, events and their replies, typed command plumbing) and
//! [`VmInfo`].

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ukvmi_wire::{frame, msg, read_zext, tail, ErrorCode};

use crate::error::{Error, ProtocolError, Result};
use crate::events::{self, Event, EventReply, VcpuEventMsg};
use crate::mux::{lock, reader_loop, Mux};
use crate::pending::PendingEvent;
use crate::transport::Message;

/// Default time a command waits for its reply.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(15);

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

/// One introspected VM: a KVMI connection and its standby reader thread.
///
/// All methods take `&self`; a `Vm` can be shared between threads (wrap it
/// in an `Arc` or use scoped threads) and commands from several threads are
/// in flight at once.
pub struct Vm {
    pub(crate) mux: Arc<Mux>,
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
        let mux = Mux::new(stream, timeout)?;
        let for_thread = Arc::clone(&mux);
        let handle = std::thread::Builder::new()
            .name("ukvmi-reader".into())
            .spawn(move || reader_loop(&for_thread))
            .map_err(Error::io("spawning the reader thread"))?;
        Ok(Vm { mux, reader: Mutex::new(Some(handle)), info })
    }

    /// What the handshake and `KVMI_GET_VERSION` reported (all zeros after
    /// [`Vm::connect_raw`]).
    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// Sets how long each command waits for its reply (default 15 s).
    pub fn set_timeout(&self, timeout: Duration) {
        self.mux.set_timeout(timeout);
    }

    /// The current reply timeout.
    pub fn timeout(&self) -> Duration {
        self.mux.timeout()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.mux.is_closed()
    }

    /// Waits for the next event. `None` waits forever. `Ok(None)` on timeout;
    /// `Err(Error::Closed)` once the connection has ended and every queued
    /// event has been taken.
    pub fn next_event(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        // `None` (wait forever) also when the deadline is too far to represent.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        self.mux.next_event(deadline)
    }

    /// Makes a thread blocked in [`Vm::next_event`] return `Ok(None)` at
    /// once (as if it had timed out); if none waits, the next call does.
    /// With several threads waiting, one of them returns per call. For a thread that
    /// waits without a timeout (an idle wait costs no wake-ups) and must be
    /// told to look at something else, e.g. to stop.
    pub fn wake_event_waiter(&self) {
        self.mux.wake_event_waiter();
    }

    /// A blocking iterator over events. It ends when the connection ends
    /// cleanly; if it broke (a read error, or EOF inside a message) the last
    /// item is that error.
    pub fn events(&self) -> Events<'_> {
        Events { vm: self, done: false }
    }

    /// Answers a vCPU event. Refuses (sends nothing) an action the event does
    /// not accept, a value for an event that takes none, or an unknown event.
    /// Fire-and-forget: the hypervisor sends no reply to it. Once a reply is
    /// sent, dropping `ev` sends nothing more.
    pub fn reply(&self, ev: &PendingEvent, reply: EventReply) -> Result<()> {
        self.reply_detached(ev, reply)?;
        ev.mark_answered();
        Ok(())
    }

    /// [`Vm::reply`] for an event taken out of its [`PendingEvent`] with
    /// [`PendingEvent::detach`]: same checks, same bytes, but nothing
    /// answers for the caller if this is never called.
    pub fn reply_detached(&self, ev: &VcpuEventMsg, reply: EventReply) -> Result<()> {
        let body = events::reply_body(ev, reply)?;
        let bytes = frame(msg::VCPU_EVENT, ev.seq, &[&body]).map_err(|e| Error::Refused(e.to_string()))?;
        self.mux.send_event_reply(ev.vcpu.raw(), ev.seq, &bytes)
    }

    /// Shuts the socket down (both directions) without waiting; the reader
    /// thread then ends and every waiter gets [`Error::Closed`].
    pub fn shutdown(&self) {
        self.mux.shutdown();
    }

    /// Shuts the socket down and waits for the reader thread to end.
    pub fn close(&self) {
        self.shutdown();
        let handle = lock(&self.reader).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.mux.mark_closed();
        crate::TRACE.flush();
    }

    /// Sends command `id` with a body made of `parts` and returns the reply
    /// data after a successful `kvmi_error_code`.
    pub(crate) fn command(&self, id: u16, parts: &[&[u8]]) -> Result<Vec<u8>> {
        let name = command_name(id);
        let seq = self.mux.next_seq();
        let bytes = frame(id, seq, parts).map_err(|e| Error::Refused(format!("{name}: {e}")))?;
        let m = self.mux.roundtrip(id, seq, name, &bytes)?;
        reply_data(name, &m).map(<[u8]>::to_vec)
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
pub(crate) fn reply_data<'m>(name: &'static str, m: &'m Message) -> Result<&'m [u8]> {
    if m.body.len() < 8 {
        return Err(ProtocolError::ShortReply { command: name, len: m.body.len() }.into());
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
        Err(ProtocolError::ReplyLength { command: command_name(id), got: data.len(), expected: len }.into())
    }
}

/// The kernel's name of a message id, or a placeholder.
pub(crate) fn command_name(id: u16) -> &'static str {
    msg::name(id).unwrap_or("KVMI_UNKNOWN_MESSAGE")
}

/// Blocking iterator over a [`Vm`]'s events; see [`Vm::events`].
#[derive(Debug)]
pub struct Events<'a> {
    vm: &'a Vm,
    done: bool,
}

impl Iterator for Events<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        while !self.done {
            match self.vm.next_event(None) {
                Ok(Some(ev)) => return Some(Ok(ev)),
                // Waiting forever only ends with an event or an error.
                Ok(None) => {}
                Err(Error::Closed) => {
                    self.done = true;
                    let broke = self.vm.mux.take_failure();
                    return broke.map(|source| Err(Error::Io { context: "reading from the KVMI socket", source }));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl std::iter::FusedIterator for Events<'_> {}
