//! A minimal raw KVMI introspector for the benchmarks, speaking v12 or
//! kvmi-v7 through one code path: what differs is a table of ids and the two
//! bodies whose layout differs (READ/WRITE_PHYSICAL's size field,
//! PAUSE_VCPU's vCPU header). It listens on a UNIX socket in a private
//! temporary directory, starts `ukvmi run --kvmi-dialect D`, accepts the
//! VMM's connection and answers the QEMU-style handshake (reads
//! `qemu_vmi_to_introspector`, struct_size first; answers
//! `qemu_vmi_from_introspector` with struct_size 24 and a zero cookie). A
//! waiting client polls the socket without sleeping for up to 50 µs, then
//! blocks, as `ukvmi-introspector` does.
//!
//! Bench binaries include it with `mod raw;` and use part of it, hence the
//! `dead_code` allowance.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::handshake::{FromIntrospector, TO_INTROSPECTOR_MAX, TO_INTROSPECTOR_MIN};
use ukvmi_introspector::wire::v7::{self, V7Event, V7PauseVcpu, V7SetPageAccess};
use ukvmi_introspector::wire::{
    event, frame, msg, read_zext, tail, ControlEvents, EventHdr, GetVersionReply, IntoBytes, KvmRegs, MsgHdr,
    PageAccessEntry, VcpuControlMsr, VcpuEvent, VcpuEventReply, VcpuGetRegisters, VcpuGetRegistersReply, VcpuHdr,
    VmPauseVcpu, VmPhysical, VmSetPageAccess, MAX_MSG_SIZE, MSG_HDR_SIZE,
};

/// Longest wait for any message.
pub const T: Duration = Duration::from_secs(20);
/// How long a waiting client polls before it sleeps (as the library does).
pub const SPIN: Duration = Duration::from_micros(50);
/// `KVMI_EVENT_ACTION_CONTINUE`.
pub const CONTINUE: u8 = 0;
/// `KVMI_EVENT_ACTION_RETRY`.
pub const RETRY: u8 = 1;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dialect {
    V12,
    V7,
}

/// What a dialect numbers differently. Everything else is shared.
pub struct Ids {
    pub name: &'static str,
    pub get_info: u16,
    pub read_physical: u16,
    pub write_physical: u16,
    pub pause_vcpu: u16,
    pub get_registers: u16,
    pub set_registers: u16,
    pub set_page_access: u16,
    pub control_events: u16,
    pub control_msr: u16,
    /// The message id of an event reply.
    pub event_reply: u16,
    pub ev_pause: u16,
    pub ev_msr: u16,
    pub ev_breakpoint: u16,
    pub ev_pf: u16,
}

pub const IDS_V12: Ids = Ids {
    name: "v12",
    get_info: msg::VM_GET_INFO,
    read_physical: msg::VM_READ_PHYSICAL,
    write_physical: msg::VM_WRITE_PHYSICAL,
    pause_vcpu: msg::VM_PAUSE_VCPU,
    get_registers: msg::VCPU_GET_REGISTERS,
    set_registers: msg::VCPU_SET_REGISTERS,
    set_page_access: msg::VM_SET_PAGE_ACCESS,
    control_events: msg::VCPU_CONTROL_EVENTS,
    control_msr: msg::VCPU_CONTROL_MSR,
    event_reply: msg::VCPU_EVENT,
    ev_pause: event::PAUSE,
    ev_msr: event::MSR,
    ev_breakpoint: event::BREAKPOINT,
    ev_pf: event::PF,
};

pub const IDS_V7: Ids = Ids {
    name: "v7",
    get_info: v7::msg::GET_GUEST_INFO,
    read_physical: v7::msg::READ_PHYSICAL,
    write_physical: v7::msg::WRITE_PHYSICAL,
    pause_vcpu: v7::msg::PAUSE_VCPU,
    get_registers: v7::msg::GET_REGISTERS,
    set_registers: v7::msg::SET_REGISTERS,
    set_page_access: v7::msg::SET_PAGE_ACCESS,
    control_events: v7::msg::CONTROL_EVENTS,
    control_msr: v7::msg::CONTROL_MSR,
    event_reply: v7::msg::EVENT_REPLY,
    ev_pause: v7::event::PAUSE_VCPU,
    ev_msr: v7::event::MSR,
    ev_breakpoint: v7::event::BREAKPOINT,
    ev_pf: v7::event::PF,
};

impl Dialect {
    pub fn ids(self) -> &'static Ids {
        match self {
            Dialect::V12 => &IDS_V12,
            Dialect::V7 => &IDS_V7,
        }
    }

    pub fn name(self) -> &'static str {
        self.ids().name
    }

    /// READ_PHYSICAL's body, and WRITE_PHYSICAL's head: v12 has a u16 size
    /// and padding where v7 has a u64 size.
    pub fn physical(self, gpa: u64, size: usize) -> Vec<u8> {
        match self {
            Dialect::V12 => VmPhysical { gpa, size: size as u16, ..Default::default() }.as_bytes().to_vec(),
            Dialect::V7 => [gpa.to_le_bytes(), (size as u64).to_le_bytes()].concat(),
        }
    }

    /// PAUSE_VCPU's body: a VM command naming the vCPU in v12, a vCPU
    /// command in v7.
    pub fn pause_vcpu(self, vcpu: u16, wait: u8) -> Vec<u8> {
        match self {
            Dialect::V12 => VmPauseVcpu { vcpu, wait, ..Default::default() }.as_bytes().to_vec(),
            Dialect::V7 => [vcpu_hdr(vcpu).as_bytes(), V7PauseVcpu { wait, ..Default::default() }.as_bytes()].concat(),
        }
    }
}

impl Dialect {
    /// SET_PAGE_ACCESS's header for `count` entries: v12 `{u16 count; ...}`,
    /// v7 `{u16 view; u16 count; u32}` (view 0); the entries are the same.
    pub fn page_access_head(self, count: u16) -> Vec<u8> {
        match self {
            Dialect::V12 => VmSetPageAccess { count, ..Default::default() }.as_bytes().to_vec(),
            Dialect::V7 => V7SetPageAccess { view: 0, count, padding: 0 }.as_bytes().to_vec(),
        }
    }
}

pub fn vcpu_hdr(vcpu: u16) -> VcpuHdr {
    VcpuHdr { vcpu, ..Default::default() }
}

/// A vCPU event as both dialects deliver it.
#[derive(Debug)]
pub struct Ev {
    pub seq: u32,
    pub vcpu: u16,
    /// The dialect's event id.
    pub event: u16,
    pub rip: u64,
    /// The general registers the event carries.
    pub regs: KvmRegs,
    pub payload: Vec<u8>,
}

/// The raw introspector: one connection, one dialect.
pub struct Client {
    pub d: Dialect,
    s: UnixStream,
    /// Read-ahead: `buf[lo..hi]` has arrived and is not consumed yet.
    buf: Vec<u8>,
    lo: usize,
    hi: usize,
    seq: u32,
    /// Events that arrived while a reply was awaited.
    events: VecDeque<Ev>,
}

impl Client {
    pub fn new(d: Dialect, s: UnixStream) -> Client {
        Client { d, s, buf: vec![0; 64 * 1024], lo: 0, hi: 0, seq: 0, events: VecDeque::new() }
    }

    /// Waits until the socket is readable: polls without sleeping for up to
    /// `SPIN`, then sleeps in poll until `timeout`. False on timeout.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            let spinning = t0.elapsed() < SPIN;
            let ms = if spinning { 0 } else { timeout.saturating_sub(t0.elapsed()).as_millis().max(1) as i32 };
            let mut pfd = libc::pollfd { fd: self.s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for a descriptor `self.s` owns, count
            // 1; poll writes only `revents`.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return true;
            }
            if r < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                panic!("poll: {}", std::io::Error::last_os_error());
            }
            if !spinning && t0.elapsed() >= timeout {
                return false;
            }
            if spinning {
                std::thread::yield_now();
            }
        }
    }

    /// Makes `n` bytes available in the read-ahead; false on timeout.
    pub fn fill(&mut self, n: usize, timeout: Duration) -> bool {
        if self.hi - self.lo >= n {
            return true;
        }
        if self.buf.len() - self.lo < n {
            self.buf.copy_within(self.lo..self.hi, 0);
            self.hi -= self.lo;
            self.lo = 0;
        }
        while self.hi - self.lo < n {
            if !self.wait_readable(timeout) {
                return false;
            }
            match self.s.read(&mut self.buf[self.hi..]) {
                Ok(0) => panic!("{}: the VMM closed the connection", self.d.name()),
                Ok(got) => self.hi += got,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("{}: read: {e}", self.d.name()),
            }
        }
        true
    }

    /// The next message, or None if none begins within `timeout`.
    pub fn read_msg(&mut self, timeout: Duration) -> Option<(MsgHdr, Vec<u8>)> {
        if !self.fill(MSG_HDR_SIZE, timeout) {
            return None;
        }
        let h: MsgHdr = read_zext(&self.buf[self.lo..self.hi]);
        let size = usize::from(h.size);
        assert!(size <= MAX_MSG_SIZE, "{}: message of {size} bytes", self.d.name());
        assert!(self.fill(MSG_HDR_SIZE + size, T), "{}: a message was cut short", self.d.name());
        let at = self.lo + MSG_HDR_SIZE;
        let body = self.buf[at..at + size].to_vec();
        self.lo = at + size;
        Some((h, body))
    }

    pub fn send(&mut self, id: u16, seq: u32, parts: &[&[u8]]) {
        let m = frame(id, seq, parts).unwrap();
        self.s.write_all(&m).unwrap();
    }

    /// A vCPU event (message id 1 in both dialects), or None.
    pub fn as_event(&self, h: &MsgHdr, body: &[u8]) -> Option<Ev> {
        if h.id != msg::VCPU_EVENT {
            return None;
        }
        let (vcpu, event, regs, at) = match self.d {
            Dialect::V12 => {
                let hdr: EventHdr = read_zext(body);
                let ev: VcpuEvent = read_zext(tail(body, size_of::<EventHdr>()));
                (ev.vcpu, hdr.event, ev.arch.regs, size_of::<EventHdr>() + size_of::<VcpuEvent>())
            }
            Dialect::V7 => {
                let ev: V7Event = read_zext(body);
                (ev.vcpu, u16::from(ev.event), ev.arch.regs, size_of::<V7Event>())
            }
        };
        assert!(body.len() >= at, "{}: an event of {} bytes", self.d.name(), body.len());
        Some(Ev { seq: h.seq, vcpu, event, rip: regs.rip, regs, payload: tail(body, at).to_vec() })
    }

    /// Sends a command and returns its reply's data (after the error code),
    /// which must say success. Events that arrive meanwhile are kept.
    pub fn request(&mut self, id: u16, parts: &[&[u8]]) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.send(id, seq, parts);
        loop {
            let Some((h, body)) = self.read_msg(T) else {
                panic!("{}: no reply to message {id} within {T:?}", self.d.name())
            };
            if let Some(ev) = self.as_event(&h, &body) {
                self.events.push_back(ev);
                continue;
            }
            assert!(h.id == id && h.seq == seq, "{}: reply {}/{} to {id}/{seq}", self.d.name(), h.id, h.seq);
            let err = i32::from_le_bytes(body[..4].try_into().unwrap());
            assert_eq!(err, 0, "{}: message {id} failed", self.d.name());
            return body[8..].to_vec();
        }
    }

    pub fn next_event_within(&mut self, timeout: Duration) -> Option<Ev> {
        if let Some(ev) = self.events.pop_front() {
            return Some(ev);
        }
        let (h, body) = self.read_msg(timeout)?;
        match self.as_event(&h, &body) {
            Some(ev) => Some(ev),
            None => panic!("{}: expected an event, got message {}/{}", self.d.name(), h.id, h.seq),
        }
    }

    pub fn next_event(&mut self) -> Ev {
        match self.next_event_within(T) {
            Some(ev) => ev,
            None => panic!("{}: no event within {T:?}", self.d.name()),
        }
    }

    /// Answers an event: vCPU header, `{action, event}`, then `payload`.
    pub fn reply(&mut self, ev: &Ev, action: u8, payload: &[u8]) {
        let r = VcpuEventReply { action, event: ev.event as u8, ..Default::default() };
        self.send(self.d.ids().event_reply, ev.seq, &[vcpu_hdr(ev.vcpu).as_bytes(), r.as_bytes(), payload]);
    }

    pub fn read_physical(&mut self, gpa: u64, size: usize) -> Vec<u8> {
        let body = self.d.physical(gpa, size);
        let data = self.request(self.d.ids().read_physical, &[&body]);
        assert_eq!(data.len(), size);
        data
    }

    pub fn write_physical(&mut self, gpa: u64, data: &[u8]) {
        let head = self.d.physical(gpa, data.len());
        self.request(self.d.ids().write_physical, &[&head, data]);
    }

    pub fn get_registers(&mut self, vcpu: u16) -> VcpuGetRegistersReply {
        let r = self
            .request(self.d.ids().get_registers, &[vcpu_hdr(vcpu).as_bytes(), VcpuGetRegisters::default().as_bytes()]);
        assert_eq!(r.len(), size_of::<VcpuGetRegistersReply>());
        read_zext(&r)
    }

    pub fn set_registers(&mut self, vcpu: u16, regs: &KvmRegs) {
        self.request(self.d.ids().set_registers, &[vcpu_hdr(vcpu).as_bytes(), regs.as_bytes()]);
    }

    /// Sets the access allowed on the page at `gpa` (`access::*`).
    pub fn set_page_access(&mut self, gpa: u64, access: u8) {
        let head = self.d.page_access_head(1);
        let entry = PageAccessEntry { gpa, access, ..Default::default() };
        self.request(self.d.ids().set_page_access, &[&head, entry.as_bytes()]);
    }

    pub fn control_events(&mut self, vcpu: u16, event_id: u16, enable: bool) {
        let c = ControlEvents { event_id, enable: u8::from(enable), ..Default::default() };
        self.request(self.d.ids().control_events, &[vcpu_hdr(vcpu).as_bytes(), c.as_bytes()]);
    }

    pub fn control_msr(&mut self, vcpu: u16, msr: u32, enable: bool) {
        let c = VcpuControlMsr { enable: u8::from(enable), msr, ..Default::default() };
        self.request(self.d.ids().control_msr, &[vcpu_hdr(vcpu).as_bytes(), c.as_bytes()]);
    }

    pub fn set_mode(&mut self, mode: u64) {
        self.write_physical(layout::BENCH_MODE, &mode.to_le_bytes());
    }

    pub fn count(&mut self) -> u64 {
        u64::from_le_bytes(self.read_physical(layout::BENCH_COUNT, 8).try_into().unwrap())
    }
}

/// A `ukvmi run` child, its scratch directory and the connection it made:
/// killed and removed on every path out (panics included).
pub struct Session {
    pub child: Child,
    pub dir: PathBuf,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Session {
    pub fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(self.dir.join("vmm.stderr")).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// Starts `ukvmi run --guest GUEST --vcpus N --memory MIB --kvmi-dialect D`
/// connecting to a fresh listener, accepts its connection, does the
/// introspector's half of the handshake, and checks with GET_VERSION (id 2
/// in both) that the VMM speaks `d`: v12's reply has `max_msg_size` (8184)
/// where v7's has padding.
pub fn start(d: Dialect, tag: &str, guest: &str, vcpus: u16, memory_mib: u64) -> (Session, Client) {
    let dir = crate::common::vm_scratch(&format!("ukvmi-bench-raw-{}-{tag}", std::process::id()));
    let sock = dir.join("kvmi.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ukvmi"))
        .args(["run", "--guest", guest, "--kvmi-dialect", d.name()])
        .args(["--vcpus", &vcpus.to_string(), "--memory", &memory_mib.to_string()])
        .arg("--serial")
        .arg(format!("file:{}", dir.join("serial").display()))
        .arg("--introspect")
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.stderr")).unwrap())
        .spawn()
        .expect("start ukvmi run");
    let sess = Session { child, dir };
    let t0 = Instant::now();
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < T, "{}: the VMM did not connect:\n{}", d.name(), sess.stderr_tail());
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    // qemu_vmi_to_introspector: struct_size first, then the rest (ignored).
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let size = u32::from_le_bytes(size);
    assert!((TO_INTROSPECTOR_MIN..=TO_INTROSPECTOR_MAX).contains(&size), "handshake struct_size {size}");
    let mut rest = vec![0u8; size as usize - 4];
    s.read_exact(&mut rest).unwrap();
    s.write_all(FromIntrospector::new([0; 20]).as_bytes()).unwrap();
    s.set_read_timeout(None).unwrap();
    let mut c = Client::new(d, s);
    let v: GetVersionReply = read_zext(&c.request(msg::GET_VERSION, &[]));
    let want = if d == Dialect::V12 { MAX_MSG_SIZE as u32 } else { 0 };
    assert!(
        v.version >= 1 && v.max_msg_size == want,
        "{}: the VMM does not speak it ({v:?})\n{}",
        d.name(),
        sess.stderr_tail()
    );
    let n = u32::from_le_bytes(c.request(d.ids().get_info, &[])[..4].try_into().unwrap());
    assert_eq!(n, u32::from(vcpus), "{}: vCPU count", d.name());
    (sess, c)
}
