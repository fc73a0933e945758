//! `endpoint_v12` / `endpoint_v7`: the endpoint over the conformance fake VM,
//! driven by a byte stream.
//!
//! Each input gets a fresh fake VM (three vCPUs: 0 and 1 running, 2 never
//! started), its endpoint, and one connection:
//!
//! ```text
//! input = [guest byte] [reply byte] [stream ...]
//! ```
//!
//! 1. The stream goes to the tool's end of a socket pair as it is, one framed
//!    message at a time (cut where the endpoint's own framing cuts it), while
//!    everything the endpoint sends back is read and checked.
//! 2. Then the fake guest on vCPU 0 (or 1) performs the actions the guest
//!    byte selects (`int3`, hypercall, MSR/CR write, XSETBV, LGDT, a memory
//!    write), so that whatever the stream enabled raises events.
//! 3. Events are answered, between two messages of the stream or after it,
//!    as the reply byte says: action, reply payload (right size, none, too
//!    long), a wrong seq, bad padding, or no answer at all.
//! 4. The tool closes its end; the endpoint must close too (EOF within 5 s),
//!    then it is unhooked and the guest must keep running.
//!
//! Checked: no panic anywhere (endpoint threads and fake vCPUs: libFuzzer's
//! panic hook aborts on any thread), no hang (the bounds above, and
//! libFuzzer's `-timeout` for anything else), every message the endpoint
//! sends is framed, at most 8184 bytes of body, either an event of a vCPU
//! that exists (of a vCPU the guest never started: PAUSE or TRAP only), with
//! the payload size of its kind, or a reply to a message the
//! tool sent (same id and seq, no more replies than requests, an error reply
//! carries only a known `KVM_E*` code), the connection never ends as an
//! internal error, after the unhook no page restriction is left and both
//! running vCPUs make progress, and then every vCPU thread stops within 5 s
//! (none is left blocked in an event).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use ukvmi_conformance::{FakeConfig, GuestAction, Observed, Setup};
use ukvmi_endpoint::{Dialect, Disconnect, HostCaps};
use ukvmi_wire::v7;
use ukvmi_wire::*;

/// vCPUs of the fake VM.
pub const VCPUS: u16 = 3;
/// vCPUs the guest starts (0 and 1); vCPU 2 never runs (`-KVM_EAGAIN`).
pub const STARTED: u16 = 2;
/// Guest RAM of the fake VM.
pub const MEMORY: usize = 1 << 20;

/// The stream must be consumed within this (the endpoint keeps reading).
const WRITE_BOUND: Duration = Duration::from_secs(10);
/// Replies to the barrier after the stream must come within this while
/// the connection is up.
const BARRIER_BOUND: Duration = Duration::from_secs(5);
/// How long the guest actions may take before the tool closes anyway.
const GUEST_BOUND: Duration = Duration::from_millis(100);
/// After the tool closed its end, the endpoint must close within this.
const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// Bits of the guest byte: one guest action each, in this order.
pub mod guest {
    /// `int3`.
    pub const INT3: u8 = 1;
    /// The agent hypercall.
    pub const HYPERCALL: u8 = 2;
    /// `wrmsr` of LSTAR.
    pub const WRMSR: u8 = 4;
    /// `mov cr4`.
    pub const WRCR: u8 = 8;
    /// `xsetbv`.
    pub const XSETBV: u8 = 16;
    /// `lgdt`.
    pub const LGDT: u8 = 32;
    /// A one-byte write at gpa 0x2000.
    pub const WRITE: u8 = 64;
    /// The actions run on vCPU 1 instead of vCPU 0.
    pub const ON_VCPU1: u8 = 128;
}

/// Bits of the reply byte: how events are answered.
pub mod reply {
    /// Mask of the action byte (0 CONTINUE, 1 RETRY, 2 CRASH, 3 invalid).
    pub const ACTION: u8 = 3;
    /// Payload: 0 the event's reply size, 1 none, 2 eight bytes too many,
    /// 3 the right size with non-zero reply padding.
    pub const PAYLOAD_SHIFT: u8 = 2;
    /// CR/MSR replies write 0xdead_beef instead of the guest's value.
    pub const OTHER_VALUE: u8 = 16;
    /// Answer with the event's seq + 1.
    pub const WRONG_SEQ: u8 = 32;
    /// v7 PF replies ask for emulation (context size 1).
    pub const PF_EMULATION: u8 = 64;
    /// Never answer events.
    pub const SILENT: u8 = 128;
}

fn config(dialect: Dialect) -> FakeConfig {
    FakeConfig { vcpus: VCPUS, started: STARTED, memory: MEMORY, caps: HostCaps::full(), memfd: true, dialect }
}

/// Runs one input against the endpoint serving `dialect`, on a fresh fake
/// VM: an input's outcome depends on nothing before it, so a crash or hang
/// reproduces from the input alone.
pub fn run(dialect: Dialect, data: &[u8]) {
    crate::init_process();
    let _watch = crate::Watch::start();
    let setup = Setup::new(&config(dialect));
    assert_eq!(setup.endpoint.dialect(), dialect);
    one(&setup, dialect, data);
    stop(setup);
}

/// Stops the fake VM (unhook, every vCPU thread joined: Setup's drop, which
/// also fails if one of them panicked), within a bound: a vCPU thread that
/// does not stop is stuck, typically in an event nobody will end.
fn stop(setup: Setup) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fuzz-stop".into())
        .spawn(move || {
            drop(setup);
            let _ = tx.send(());
        })
        .expect("a thread to stop the fake VM");
    if rx.recv_timeout(CLOSE_BOUND).is_err() {
        crate::dump_stacks("the fake VM did not stop");
        panic!(
            "the fake VM's vCPU threads did not stop within {CLOSE_BOUND:?} of the unhook: one is stuck (stacks above)"
        );
    }
}

/// The stream cut into framed messages as the endpoint will read them:
/// whole messages (header and body), then whatever is left (a truncated or
/// oversize message) as one last piece. Returns the pieces and the (id, seq)
/// of every whole message.
pub fn split(stream: &[u8]) -> (Vec<&[u8]>, Vec<(u16, u32)>) {
    let mut pieces = Vec::new();
    let mut whole = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let hdr: MsgHdr = read_zext(rest);
        let size = usize::from(hdr.size);
        let len = MSG_HDR_SIZE + size;
        if rest.len() < MSG_HDR_SIZE || size > MAX_MSG_SIZE || rest.len() < len {
            pieces.push(rest);
            break;
        }
        let (msg, more) = rest.split_at(len);
        pieces.push(msg);
        whole.push((hdr.id, hdr.seq));
        rest = more;
    }
    (pieces, whole)
}

/// The guest actions a guest byte selects.
pub fn guest_actions(byte: u8) -> Vec<GuestAction> {
    let all = [
        (guest::INT3, GuestAction::Int3),
        (guest::HYPERCALL, GuestAction::Hypercall),
        (guest::WRMSR, GuestAction::WriteMsr { msr: 0xc000_0082, value: 0x10_3000 }),
        (guest::WRCR, GuestAction::WriteCr { cr: 4, value: 0x20 | 0x80 }),
        (guest::XSETBV, GuestAction::Xsetbv { value: 7 }),
        (guest::LGDT, GuestAction::Gdt { write: true }),
        (guest::WRITE, GuestAction::Write { gpa: 0x2000, value: 0xcc }),
    ];
    all.iter().filter(|(bit, _)| byte & bit != 0).map(|&(_, a)| a).collect()
}

/// The barrier after a well-framed stream: a VM command, answered on the
/// receiving thread, and a vCPU command for each running vCPU, answered by
/// that vCPU after every job queued before it. v7 first turns replies back
/// on (CONTROL_CMD_RESPONSE, answered after every suppressed job).
fn markers(dialect: Dialect) -> Vec<Vec<u8>> {
    const SEQ: u32 = 0xfffe_0000;
    let h = |vcpu: u16| VcpuHdr { vcpu, padding1: 0, padding2: 0 };
    let m = |id: u16, seq: u32, parts: &[&[u8]]| frame(id, seq, parts).expect("a marker fits");
    match dialect {
        Dialect::V12 => vec![
            m(msg::GET_VERSION, SEQ, &[]),
            m(msg::VCPU_GET_INFO, SEQ + 1, &[h(0).as_bytes()]),
            m(msg::VCPU_GET_INFO, SEQ + 2, &[h(1).as_bytes()]),
        ],
        Dialect::V7 => {
            let on = v7::V7ControlCmdResponse { enable: 1, now: 1, padding1: 0, padding2: 0 };
            vec![
                m(v7::msg::CONTROL_CMD_RESPONSE, SEQ + 3, &[on.as_bytes()]),
                m(v7::msg::GET_VERSION, SEQ, &[]),
                m(v7::msg::GET_VCPU_INFO, SEQ + 1, &[h(0).as_bytes()]),
                m(v7::msg::GET_VCPU_INFO, SEQ + 2, &[h(1).as_bytes()]),
            ]
        }
    }
}

/// The tool's end of one connection.
struct Tool {
    dialect: Dialect,
    policy: u8,
    sock: UnixStream,
    /// Bytes received and not parsed yet.
    inbuf: Vec<u8>,
    /// (id, seq) of every whole message sent and not answered yet.
    sent: HashMap<(u16, u32), u32>,
    /// Event replies waiting for a message boundary.
    replies: VecDeque<Vec<u8>>,
    /// The endpoint closed its end (EOF or a failed write).
    closed: bool,
    /// Events received.
    events: u32,
}

impl Tool {
    /// Reads whatever is there without blocking, checks it, queues replies.
    fn drain(&mut self) {
        let mut buf = [0u8; 65536];
        while !self.closed {
            match self.sock.read(&mut buf) {
                Ok(0) => self.closed = true,
                Ok(n) => self.inbuf.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => self.closed = true,
            }
        }
        let mut at = 0;
        while let Some(rest) = self.inbuf.get(at..).filter(|r| r.len() >= MSG_HDR_SIZE) {
            let hdr: MsgHdr = read_zext(rest);
            let size = usize::from(hdr.size);
            assert!(size <= MAX_MSG_SIZE, "the endpoint sent a {size}-byte body (id {}, seq {})", hdr.id, hdr.seq);
            let Some(body) = rest.get(MSG_HDR_SIZE..MSG_HDR_SIZE + size) else { break };
            let body = body.to_vec();
            at += MSG_HDR_SIZE + size;
            self.received(hdr, &body);
        }
        self.inbuf.drain(..at);
    }

    fn received(&mut self, hdr: MsgHdr, body: &[u8]) {
        match self.dialect {
            Dialect::V12 if hdr.id == msg::VCPU_EVENT && body.len() >= VCPU_EVENT_BODY_BASE => {
                let h: EventHdr = read_zext(body);
                let ev: VcpuEvent = read_zext(tail(body, core::mem::size_of::<EventHdr>()));
                assert_eq!(h.padding, [0; 3], "event header padding");
                self.event(hdr.seq, h.event, h.event, ev.vcpu, ev.size, tail(body, VCPU_EVENT_BODY_BASE));
            }
            Dialect::V7 if hdr.id == v7::msg::EVENT && body.len() >= core::mem::size_of::<v7::V7Event>() => {
                let ev: v7::V7Event = read_zext(body);
                let id = v7::event_to_v12(u16::from(ev.event));
                let id = id.unwrap_or_else(|| panic!("v7 event with unknown event id {}", ev.event));
                let payload = tail(body, core::mem::size_of::<v7::V7Event>());
                self.event(hdr.seq, id, u16::from(ev.event), ev.vcpu, ev.size, payload);
            }
            _ => self.reply(hdr, body),
        }
    }

    /// An event: `id` in v12 numbering, `wire_id` as it travelled.
    fn event(&mut self, seq: u32, id: u16, wire_id: u16, vcpu: u16, size: u16, payload: &[u8]) {
        self.events += 1;
        let info = event::info(id).unwrap_or_else(|| panic!("event {id} is no vCPU event"));
        assert!(vcpu < VCPUS, "{} from vCPU {vcpu}, which does not exist", info.name);
        // A vCPU the guest never started runs no guest code: only the
        // endpoint's own events (a pause is accepted for it, as in the
        // kernel, and the fake's idle vCPU still serves its requests).
        if vcpu >= STARTED {
            assert!(
                matches!(id, event::PAUSE | event::TRAP),
                "{} from vCPU {vcpu}, which never ran guest code",
                info.name
            );
        }
        assert_eq!(usize::from(size), core::mem::size_of::<VcpuEvent>(), "{}: kvmi_vcpu_event.size", info.name);
        assert_eq!(payload.len(), info.payload_size, "{} payload size", info.name);
        if self.policy & reply::SILENT != 0 {
            return;
        }
        let p = self.policy;
        let action = p & reply::ACTION;
        let mut data = match EventPayload::decode(id, payload) {
            EventPayload::Cr { new_value, .. } | EventPayload::Msr { new_value, .. } => {
                let v = if p & reply::OTHER_VALUE != 0 { 0xdead_beef } else { new_value };
                v.to_le_bytes().to_vec()
            }
            _ => vec![0u8; info.reply_size],
        };
        if self.dialect == Dialect::V7 && id == event::PF {
            let mut r = v7::V7EventPfReply {
                ctx_addr: 0,
                ctx_size: 0,
                singlestep: 0,
                rep_complete: 0,
                padding: 0,
                ctx_data: [0; 256],
            };
            if p & reply::PF_EMULATION != 0 {
                r.ctx_size = 1;
            }
            data = r.as_bytes().to_vec();
        }
        let mut padding1 = 0;
        match (p >> reply::PAYLOAD_SHIFT) & 3 {
            1 => data.clear(),
            2 => data.extend_from_slice(&[0; 8]),
            3 => padding1 = 1,
            _ => {}
        }
        let seq = if p & reply::WRONG_SEQ != 0 { seq.wrapping_add(1) } else { seq };
        let h = VcpuHdr { vcpu, padding1: 0, padding2: 0 };
        // The event byte: v12 or v7 numbering, as the event came.
        let r = VcpuEventReply { action, event: wire_id as u8, padding1, padding2: 0 };
        let id = match self.dialect {
            Dialect::V12 => msg::VCPU_EVENT,
            Dialect::V7 => v7::msg::EVENT_REPLY,
        };
        let bytes = frame(id, seq, &[h.as_bytes(), r.as_bytes(), &data]).expect("an event reply fits");
        self.replies.push_back(bytes);
    }

    /// A reply: to a message sent and not answered yet.
    fn reply(&mut self, hdr: MsgHdr, body: &[u8]) {
        let left = self.sent.get_mut(&(hdr.id, hdr.seq));
        match left {
            Some(n) if *n > 0 => *n -= 1,
            _ => panic!("reply id {} seq {} ({} bytes) answers no message the tool sent", hdr.id, hdr.seq, body.len()),
        }
        assert!(
            body.len() >= core::mem::size_of::<ErrorCode>(),
            "reply id {} seq {}: {} bytes",
            hdr.id,
            hdr.seq,
            body.len()
        );
        let ec: ErrorCode = read_zext(body);
        assert_eq!(ec.padding, 0, "reply error code padding");
        if ec.err != 0 {
            assert!(KvmErrno::from_wire(ec.err).is_some(), "reply id {}: unknown error {}", hdr.id, ec.err);
            assert_eq!(body.len(), 8, "error reply id {} ({}) carries data", hdr.id, ec.err);
        }
    }

    /// Writes `bytes` whole, reading meanwhile. False if the endpoint closed.
    fn write_piece(&mut self, bytes: &[u8], deadline: Instant) -> bool {
        let mut off = 0;
        while off < bytes.len() {
            if self.closed {
                return false;
            }
            match self.sock.write(bytes.get(off..).unwrap_or_default()) {
                Ok(n) => off += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the endpoint stopped reading the stream ({WRITE_BOUND:?})");
                    self.wait(libc::POLLIN | libc::POLLOUT, Duration::from_millis(10));
                }
                // EPIPE/ECONNRESET: the endpoint is gone.
                Err(_) => {
                    self.closed = true;
                    return false;
                }
            }
            self.drain();
        }
        true
    }

    /// Sends the queued event replies (at a message boundary).
    fn flush_replies(&mut self, deadline: Instant) {
        while let Some(r) = self.replies.pop_front() {
            let hdr: MsgHdr = read_zext(&r);
            *self.sent.entry((hdr.id, hdr.seq)).or_default() += 1;
            if !self.write_piece(&r, deadline) {
                return;
            }
        }
    }

    fn wait(&self, events: libc::c_short, timeout: Duration) {
        let mut pfd = libc::pollfd { fd: self.sock.as_raw_fd(), events, revents: 0 };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for a descriptor `self.sock` owns, count 1.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

/// `UKVMI_FUZZ_DEBUG=1`: one line per input on stderr (what the endpoint did).
fn debug() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("UKVMI_FUZZ_DEBUG").is_some_and(|v| v == "1"))
}

fn one(setup: &Setup, dialect: Dialect, data: &[u8]) {
    let guest_byte = data.first().copied().unwrap_or(0);
    let policy = data.get(1).copied().unwrap_or(0);
    let (pieces, whole) = split(tail(data, 2));
    let pieces: Vec<Vec<u8>> = pieces.into_iter().map(<[u8]>::to_vec).collect();
    let vm = &setup.vm;
    for v in 0..VCPUS {
        vm.take_log(v);
    }

    let sock = setup.connect();
    sock.set_nonblocking(true).expect("non-blocking socket");
    let mut sent = HashMap::new();
    for k in whole {
        *sent.entry(k).or_insert(0u32) += 1;
    }
    let mut t =
        Tool { dialect, policy, sock, inbuf: Vec::new(), sent, replies: VecDeque::new(), closed: false, events: 0 };

    // 1. The stream, one message at a time, events answered in between.
    let deadline = Instant::now() + WRITE_BOUND;
    for piece in &pieces {
        t.flush_replies(deadline);
        if !t.write_piece(piece, deadline) {
            break;
        }
    }
    // A piece that is not a whole message leaves the framing broken: only
    // whole messages may be followed by event replies.
    let framed = pieces.last().is_none_or(|p| {
        let hdr: MsgHdr = read_zext(p);
        p.len() >= MSG_HDR_SIZE
            && p.len() == MSG_HDR_SIZE + usize::from(hdr.size)
            && usize::from(hdr.size) <= MAX_MSG_SIZE
    });

    // Then, with the framing intact, a barrier: once these are answered,
    // every VM command and every job of vCPUs 0 and 1 before them has run
    // (each vCPU runs its jobs in order), so the events the stream enabled
    // are on when the guest acts.
    let mut barrier = String::new();
    if framed && !t.closed {
        let markers = markers(dialect);
        let until = Instant::now() + BARRIER_BOUND;
        for m in &markers {
            t.flush_replies(until);
            let hdr: MsgHdr = read_zext(m);
            *t.sent.entry((hdr.id, hdr.seq)).or_default() += 1;
            t.write_piece(m, until);
        }
        let keys: Vec<(u16, u32)> = markers.iter().map(|m| read_zext::<MsgHdr>(m)).map(|h| (h.id, h.seq)).collect();
        loop {
            let left: Vec<_> = keys.iter().filter(|k| t.sent.get(k).is_some_and(|&n| n > 0)).collect();
            if left.is_empty() || t.closed {
                break;
            }
            assert!(
                Instant::now() < until,
                "no reply to {left:?} within {BARRIER_BOUND:?} (the connection is up; {} events)",
                t.events
            );
            t.flush_replies(until);
            t.wait(libc::POLLIN, Duration::from_millis(1));
            t.drain();
        }
        if debug() {
            barrier = format!("barrier passed{}", if t.closed { " (closed)" } else { "" });
        }
    }

    // 2. The guest acts; 3. events are answered.
    let actions = guest_actions(guest_byte);
    let on = if guest_byte & guest::ON_VCPU1 != 0 { 1 } else { 0 };
    let mut done = 0;
    if !actions.is_empty() {
        for &a in &actions {
            vm.guest_does(on, a);
        }
        let until = Instant::now() + GUEST_BOUND;
        while done < actions.len() && Instant::now() < until {
            if framed {
                t.flush_replies(deadline.max(until));
            }
            t.wait(libc::POLLIN, Duration::from_millis(1));
            t.drain();
            done += vm.take_log(on).iter().filter(|o| matches!(o, Observed::Event { .. })).count();
        }
    }
    if framed {
        t.drain();
        t.flush_replies(Instant::now() + WRITE_BOUND);
    }

    // 4. The tool closes; the endpoint must close too.
    let _ = t.sock.shutdown(Shutdown::Write);
    let until = Instant::now() + CLOSE_BOUND;
    while !t.closed {
        assert!(
            Instant::now() < until,
            "the endpoint did not close the connection within {CLOSE_BOUND:?} of the tool closing its end \
             ({} events, guest actions {done}/{})",
            t.events,
            actions.len()
        );
        t.wait(libc::POLLIN, Duration::from_millis(10));
        t.drain();
    }
    assert!(setup.endpoint.wait_disconnected(Some(CLOSE_BOUND)), "the connection did not end");
    let reason = setup.endpoint.disconnect_reason();
    assert!(reason.is_some(), "the endpoint closed without a recorded reason");
    if let Some(Disconnect::Internal(why)) = &reason {
        panic!("the connection ended with an internal error: {why}");
    }
    if debug() {
        let answered: u32 = t.sent.values().sum();
        eprintln!(
            "endpoint: {} bytes in, {barrier}, {} events, {} messages unanswered, guest actions {done}/{}, events sent {:?}, ended: {}",
            data.len(),
            t.events,
            answered,
            actions.len(),
            setup.endpoint.events_sent(),
            reason.as_ref().map_or_else(String::new, ToString::to_string),
        );
    }
    setup.endpoint.unhook();
    assert!(vm.page_restrictions().is_empty(), "page restrictions left after the unhook: {:?}", vm.page_restrictions());
    for v in 0..STARTED {
        assert!(vm.wait_progress(v, 2, CLOSE_BOUND), "vCPU {v} stopped running guest code after the unhook");
    }
    for v in 0..VCPUS {
        vm.take_log(v);
    }
}
