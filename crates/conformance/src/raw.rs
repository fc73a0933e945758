//! A raw KVMI peer over a real socket pair: sends arbitrary bytes and reads
//! framed messages, for tests that must send what a well-behaved library
//! never would.

use crate::fake::{FakeConfig, FakeVm};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use ukvmi_endpoint::Endpoint;
use ukvmi_wire::{frame, read_zext, v7, IntoBytes, MsgHdr, VcpuHdr};

/// A fake VM with its endpoint hooked to one end of a socket pair.
pub struct Setup {
    /// The fake VM.
    pub vm: Arc<FakeVm>,
    /// Its endpoint.
    pub endpoint: Endpoint,
}

impl std::fmt::Debug for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setup").finish_non_exhaustive()
    }
}

impl Setup {
    /// Starts a fake VM.
    pub fn new(cfg: &FakeConfig) -> Setup {
        let (vm, endpoint) = FakeVm::start(cfg);
        Setup { vm, endpoint }
    }

    /// Hooks a fresh socket pair (unhooking any previous connection) and
    /// returns the tool's end.
    pub fn connect(&self) -> UnixStream {
        self.endpoint.unhook();
        let (vmm, tool) = UnixStream::pair().unwrap();
        self.endpoint.hook(vmm).unwrap();
        tool
    }

    /// A raw peer on a fresh connection.
    pub fn raw(&self) -> RawPeer {
        RawPeer::new(self.connect())
    }

    /// Asserts the guest still runs on every vCPU that was started.
    pub fn assert_guest_runs(&self, vcpus: &[u16]) {
        for &i in vcpus {
            assert!(self.vm.wait_progress(i, 5, Duration::from_secs(5)), "vCPU {i} stopped running guest code");
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.endpoint.unhook();
        let ok = self.vm.stop();
        if !std::thread::panicking() {
            assert!(ok, "a fake vCPU thread panicked");
        }
    }
}

/// One received message.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its header.
    pub hdr: MsgHdr,
    /// Its body.
    pub body: Vec<u8>,
}

impl Received {
    /// The `err` of a command reply.
    pub fn err(&self) -> i32 {
        let ec: ukvmi_wire::ErrorCode = read_zext(&self.body);
        ec.err
    }

    /// The event id of an event.
    pub fn event_id(&self) -> u16 {
        let h: ukvmi_wire::EventHdr = read_zext(&self.body);
        h.event
    }

    /// kvmi-v7: whether this is an event (message id 1 carrying a whole
    /// `struct kvmi_event`) rather than a command reply.
    pub fn is_v7_event(&self) -> bool {
        self.hdr.id == v7::msg::EVENT && self.body.len() >= core::mem::size_of::<v7::V7Event>()
    }

    /// kvmi-v7: the `struct kvmi_event` at the start of an event's body.
    pub fn v7_event(&self) -> v7::V7Event {
        read_zext(&self.body)
    }

    /// kvmi-v7: what follows `struct kvmi_event` in an event's body.
    pub fn v7_payload(&self) -> &[u8] {
        ukvmi_wire::tail(&self.body, core::mem::size_of::<v7::V7Event>())
    }

    /// The data of a successful command reply (after the error code).
    pub fn data(&self) -> &[u8] {
        ukvmi_wire::tail(&self.body, core::mem::size_of::<ukvmi_wire::ErrorCode>())
    }
}

/// What reading gave.
#[derive(Debug)]
pub enum ReadOutcome {
    /// A whole message.
    Msg(Received),
    /// EOF: the endpoint closed the connection.
    Closed,
    /// Nothing within the timeout.
    Timeout,
}

/// The tool's end of a connection, spoken to byte by byte.
#[derive(Debug)]
pub struct RawPeer {
    /// The socket.
    pub stream: UnixStream,
    seq: u32,
}

impl RawPeer {
    /// Wraps a connected socket.
    pub fn new(stream: UnixStream) -> RawPeer {
        RawPeer { stream, seq: 1000 }
    }

    /// The next seq this peer will use.
    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    /// Writes raw bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        // The endpoint may already have closed; tests look at what it did.
        let _ = self.stream.write_all(bytes);
    }

    /// Sends a framed message and returns its seq.
    pub fn send(&mut self, id: u16, body: &[u8]) -> u32 {
        let seq = self.next_seq();
        self.send_bytes(&frame(id, seq, &[body]).unwrap());
        seq
    }

    /// Sends several framed messages in one write (a libkvmi-style batch)
    /// and returns their seqs.
    pub fn send_batch(&mut self, msgs: &[(u16, Vec<u8>)]) -> Vec<u32> {
        let mut bytes = Vec::new();
        let mut seqs = Vec::with_capacity(msgs.len());
        for (id, body) in msgs {
            let seq = self.next_seq();
            bytes.extend(frame(*id, seq, &[body]).unwrap());
            seqs.push(seq);
        }
        self.send_bytes(&bytes);
        seqs
    }

    /// Sends a vCPU message: vCPU header then `args`.
    pub fn send_vcpu(&mut self, id: u16, vcpu: u16, args: &[u8]) -> u32 {
        let h = VcpuHdr { vcpu, padding1: 0, padding2: 0 };
        let body: Vec<u8> = h.as_bytes().iter().chain(args).copied().collect();
        self.send(id, &body)
    }

    /// Reads one message, waiting at most `timeout`.
    pub fn read(&mut self, timeout: Duration) -> ReadOutcome {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut hb = [0u8; 8];
        match self.stream.read(&mut hb[..1]) {
            Ok(0) => return ReadOutcome::Closed,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return ReadOutcome::Timeout,
            Err(_) => return ReadOutcome::Closed,
        }
        self.stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if self.stream.read_exact(&mut hb[1..]).is_err() {
            return ReadOutcome::Closed;
        }
        let hdr: MsgHdr = read_zext(&hb);
        let mut body = vec![0u8; usize::from(hdr.size)];
        if self.stream.read_exact(&mut body).is_err() {
            return ReadOutcome::Closed;
        }
        ReadOutcome::Msg(Received { hdr, body })
    }

    /// Reads one message, failing the test if none comes within 10 s.
    pub fn recv(&mut self) -> Received {
        match self.read(Duration::from_secs(10)) {
            ReadOutcome::Msg(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Reads the reply to `seq`, failing on anything else.
    pub fn reply_to(&mut self, seq: u32) -> Received {
        let m = self.recv();
        assert_eq!(m.hdr.seq, seq, "unexpected message {:?}", m.hdr);
        m
    }

    /// Sends a command and returns its reply's `err`.
    pub fn err_of(&mut self, id: u16, body: &[u8]) -> i32 {
        let seq = self.send(id, body);
        self.reply_to(seq).err()
    }

    /// Sends a vCPU command and returns its reply's `err`.
    pub fn vcpu_err_of(&mut self, id: u16, vcpu: u16, args: &[u8]) -> i32 {
        let seq = self.send_vcpu(id, vcpu, args);
        self.reply_to(seq).err()
    }

    /// Pauses vCPU `vcpu` (with `wait`) and returns its PAUSE event. The
    /// event may arrive before or after the command's reply.
    pub fn pause(&mut self, vcpu: u16, wait: bool) -> Received {
        let p = ukvmi_wire::VmPauseVcpu { vcpu, wait: u8::from(wait), padding1: 0, padding2: 0 };
        let seq = self.send(ukvmi_wire::msg::VM_PAUSE_VCPU, p.as_bytes());
        let (mut reply, mut ev) = (None, None);
        while reply.is_none() || ev.is_none() {
            let m = self.recv();
            if m.hdr.id == ukvmi_wire::msg::VCPU_EVENT && usize::from(m.hdr.size) >= ukvmi_wire::VCPU_EVENT_BODY_BASE {
                assert_eq!(m.event_id(), ukvmi_wire::event::PAUSE);
                assert!(ev.is_none(), "two events for one pause");
                ev = Some(m);
            } else {
                assert_eq!(m.hdr.seq, seq, "unexpected message {:?}", m.hdr);
                assert_eq!(m.err(), 0, "VM_PAUSE_VCPU failed");
                reply = Some(m);
            }
        }
        ev.unwrap()
    }

    /// Asserts the endpoint closes the connection (EOF within 10 s),
    /// ignoring whatever it sent before.
    pub fn expect_closed(&mut self) {
        loop {
            match self.read(Duration::from_secs(10)) {
                ReadOutcome::Closed => return,
                ReadOutcome::Timeout => panic!("the endpoint did not close the connection"),
                ReadOutcome::Msg(_) => continue,
            }
        }
    }

    /// Answers a vCPU event.
    pub fn reply_event(&mut self, ev: &Received, action: u8, payload: &[u8]) {
        let vev: ukvmi_wire::VcpuEvent = read_zext(ukvmi_wire::tail(&ev.body, 8));
        let h = VcpuHdr { vcpu: vev.vcpu, padding1: 0, padding2: 0 };
        let r = ukvmi_wire::VcpuEventReply { action, event: ev.event_id() as u8, padding1: 0, padding2: 0 };
        let bytes = frame(ukvmi_wire::msg::VCPU_EVENT, ev.hdr.seq, &[h.as_bytes(), r.as_bytes(), payload]).unwrap();
        self.send_bytes(&bytes);
    }

    /// kvmi-v7: the bytes of an event reply (message id 0, the event's seq,
    /// vCPU header, `{action, v7 event id, 0, 0}`, then `payload`).
    pub fn v7_event_reply_bytes(ev: &Received, action: u8, payload: &[u8]) -> Vec<u8> {
        let e = ev.v7_event();
        let h = VcpuHdr { vcpu: e.vcpu, padding1: 0, padding2: 0 };
        let r = ukvmi_wire::VcpuEventReply { action, event: e.event, padding1: 0, padding2: 0 };
        frame(v7::msg::EVENT_REPLY, ev.hdr.seq, &[h.as_bytes(), r.as_bytes(), payload]).unwrap()
    }

    /// kvmi-v7: answers a vCPU event.
    pub fn v7_reply_event(&mut self, ev: &Received, action: u8, payload: &[u8]) {
        self.send_bytes(&Self::v7_event_reply_bytes(ev, action, payload));
    }
}
