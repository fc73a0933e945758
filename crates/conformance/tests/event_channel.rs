//! `UKVMI_VM_EVENT_CHANNEL`, the shared-memory event channel, against the
//! fake VM: CHECK_COMMAND and the request's checks; events posted in the
//! vCPU's slot instead of the socket and answered through it; the socket
//! kept as the fallback (a reply there still ends the wait; commands run on
//! the waiting vCPU); hostile slot contents (impossible lengths, replies
//! naming another vCPU or event, a bell rung with nothing behind it); and
//! the connection ending while a vCPU waits in a channel event.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use ukvmi_conformance::fake::{GuestAction, Observed};
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_endpoint::{Dialect, Disconnect};
use ukvmi_introspector::{Event, EventReply, Vm};
use ukvmi_wire::event_channel::*;
use ukvmi_wire::*;

const _: () = assert!(REPLY_MAX + REPLY_REGS_SIZE < SLOT_SIZE);

mod common;
use common::{code, request_with_fds, EINVAL, ENOSYS, EPERM};

const CH: u16 = msg::UKVMI_VM_EVENT_CHANNEL;
const T: Duration = Duration::from_secs(10);

/// The test's own mapping of a channel, as a raw (possibly hostile) tool.
struct RawChannel {
    base: *mut u8,
    len: usize,
    _file: OwnedFd,
    pipe: OwnedFd,
}

impl Drop for RawChannel {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl RawChannel {
    /// Asks for the channel on `sock` and maps it.
    fn open(sock: &UnixStream, seq: u32) -> RawChannel {
        let (hdr, body, mut fds) = request_with_fds(sock, seq, CH, &[0u8; 8]);
        assert_eq!((hdr.id, hdr.seq), (CH, seq));
        assert_eq!(read_zext::<ErrorCode>(&body).err, 0);
        let r: VmEventChannelReply = read_zext(&body[8..]);
        assert_eq!(body.len(), 8 + 16);
        assert_eq!(r.version, VERSION);
        assert_eq!(fds.len(), 2, "the file and the pipe");
        let pipe = fds.pop().unwrap();
        let file = fds.pop().unwrap();
        // SAFETY: F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW), libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
        // SAFETY: a shared mapping of the sealed file's announced length.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let ch = RawChannel { base: p.cast(), len: r.size as usize, _file: file, pipe };
        assert_eq!(ch.word(HDR_MAGIC).load(Ordering::SeqCst), MAGIC);
        assert_eq!(ch.word(HDR_NR_VCPUS).load(Ordering::SeqCst), r.nr_vcpus);
        ch
    }

    fn word(&self, off: usize) -> &AtomicU32 {
        assert!(off + 4 <= self.len);
        // SAFETY: in bounds, aligned, alive as long as self.
        unsafe { &*self.base.add(off).cast::<AtomicU32>() }
    }

    fn slot(&self, vcpu: u16, off: usize) -> &AtomicU32 {
        self.word(slot_offset(usize::from(vcpu)) + off)
    }

    /// Waits for an event seq other than `after` in `vcpu`'s slot; returns
    /// (seq, the message bytes).
    fn wait_event(&self, vcpu: u16, after: u32) -> (u32, Vec<u8>) {
        let t0 = Instant::now();
        loop {
            let s = self.slot(vcpu, EV_SEQ).load(Ordering::SeqCst);
            if s != 0 && s != after {
                let len = self.slot(vcpu, EV_LEN).load(Ordering::SeqCst) as usize;
                let at = slot_offset(usize::from(vcpu)) + EV_DATA;
                // SAFETY: within the slot's event area.
                let bytes = unsafe { std::slice::from_raw_parts(self.base.add(at), len.min(EV_MAX)) }.to_vec();
                return (s, bytes);
            }
            assert!(t0.elapsed() < T, "no event in slot {vcpu}");
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Writes `bytes` as the reply to `seq` (announcing `len` bytes) and
    /// rings the bell, as a tool does.
    fn reply(&self, vcpu: u16, seq: u32, bytes: &[u8], len: u32) {
        let at = slot_offset(usize::from(vcpu)) + REPLY_DATA;
        // SAFETY: within the slot's reply area (the tests keep to REPLY_MAX).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at), bytes.len().min(REPLY_MAX)) };
        self.slot(vcpu, REPLY_LEN).store(len, Ordering::SeqCst);
        self.slot(vcpu, REPLY_SEQ).store(seq, Ordering::SeqCst);
        self.ring(vcpu);
    }

    fn ring(&self, vcpu: u16) {
        let bell = self.slot(vcpu, BELL);
        bell.fetch_add(1, Ordering::SeqCst);
        // SAFETY: FUTEX_WAKE on an aligned word of the shared mapping.
        unsafe {
            libc::syscall(libc::SYS_futex, bell.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
        }
    }
}

/// A framed event reply for the event message `ev` (as posted).
fn reply_bytes(ev: &[u8], vcpu: u16, action: u8, payload: &[u8]) -> Vec<u8> {
    let hdr: MsgHdr = read_zext(ev);
    let eh: EventHdr = read_zext(&ev[8..]);
    let h = VcpuHdr { vcpu, padding1: 0, padding2: 0 };
    let r = VcpuEventReply { action, event: eh.event as u8, padding1: 0, padding2: 0 };
    frame(msg::VCPU_EVENT, hdr.seq, &[h.as_bytes(), r.as_bytes(), payload]).unwrap()
}

fn control_events(sock: &UnixStream, seq: u32, vcpu: u16, id: u16) {
    let h = VcpuHdr { vcpu, padding1: 0, padding2: 0 };
    let c = ControlEvents { event_id: id, enable: 1, padding1: 0, padding2: 0 };
    let body: Vec<u8> = h.as_bytes().iter().chain(c.as_bytes()).copied().collect();
    let (_, reply, _) = request_with_fds(sock, seq, msg::VCPU_CONTROL_EVENTS, &body);
    assert_eq!(read_zext::<ErrorCode>(&reply).err, 0);
}

fn socket_readable(sock: &UnixStream, ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// A raw tool with the channel on and the HYPERCALL event enabled on vCPU 0.
fn raw_with_channel(s: &Setup) -> (UnixStream, RawChannel) {
    let sock = s.connect();
    let ch = RawChannel::open(&sock, 1);
    control_events(&sock, 2, 0, event::HYPERCALL);
    (sock, ch)
}

fn hypercall_outcome(s: &Setup) -> Option<ukvmi_endpoint::EventOutcome> {
    let o = s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::Hypercall, .. }));
    match o {
        Some(Observed::Event { outcome, .. }) => outcome,
        other => panic!("no hypercall outcome: {other:?}"),
    }
}

#[test]
fn check_command_reports_it_and_the_request_is_checked() {
    let s = Setup::new(&FakeConfig::default());
    let vm = Vm::connect_raw(s.connect()).unwrap();
    assert_eq!(code(vm.check_command(CH)), 0);
    let bad = vm.raw().request_raw(CH, &[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    assert_eq!(bad.err, EINVAL, "unknown flag");
    assert_eq!(vm.raw().request_raw(CH, &[0u8; 4]).unwrap().err, EINVAL, "short body");
    s.endpoint.permissions().set_command(CH.into(), false).unwrap();
    assert_eq!(code(vm.check_command(CH)), EPERM);
    assert_eq!(code(vm.enable_event_channel()), EPERM);
    assert!(!vm.event_channel_enabled());
    s.endpoint.permissions().set_command(CH.into(), true).unwrap();
    vm.enable_event_channel().unwrap();
    assert!(vm.event_channel_enabled());
}

#[test]
fn v7_connections_do_not_offer_it() {
    let s = Setup::new(&FakeConfig { dialect: Dialect::V7, ..Default::default() });
    let sock = s.connect();
    let (_, body, fds) = request_with_fds(&sock, 1, CH, &[0u8; 8]);
    // v7 knows no ukvmi extension id: -KVM_ENOSYS, no descriptor.
    assert_eq!(read_zext::<ErrorCode>(&body).err, ENOSYS);
    assert!(fds.is_empty());
}

#[test]
fn an_event_is_posted_in_the_slot_not_on_the_socket_and_a_slot_reply_ends_it() {
    let s = Setup::new(&FakeConfig::default());
    let (sock, ch) = raw_with_channel(&s);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq, ev) = ch.wait_event(0, 0);
    let hdr: MsgHdr = read_zext(&ev);
    assert_eq!((hdr.id, hdr.seq, usize::from(hdr.size) + 8), (msg::VCPU_EVENT, seq, ev.len()));
    assert_eq!(read_zext::<EventHdr>(&ev[8..]).event, event::HYPERCALL);
    assert!(!socket_readable(&sock, 50), "nothing on the socket");
    let b = reply_bytes(&ev, 0, Action::Continue as u8, &[]);
    ch.reply(0, seq, &b, b.len() as u32);
    let out = hypercall_outcome(&s).expect("an event was sent");
    assert!(out.answered && out.action == Action::Continue, "{out:?}");
    // The next one reuses the slot with a new seq.
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq2, ev2) = ch.wait_event(0, seq);
    assert!(seq2 > seq);
    ch.reply(0, seq2, &reply_bytes(&ev2, 0, Action::Continue as u8, &[]), 24);
    assert!(hypercall_outcome(&s).unwrap().answered);
    s.assert_guest_runs(&[0]);
    assert!(s.endpoint.disconnect_reason().is_none());
}

#[test]
fn a_reply_on_the_socket_still_ends_a_channel_event_and_commands_run_meanwhile() {
    use std::io::Write;
    let s = Setup::new(&FakeConfig::default());
    let (sock, ch) = raw_with_channel(&s);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (_, ev) = ch.wait_event(0, 0);
    // A vCPU command on the socket runs on the waiting vCPU.
    let h = VcpuHdr { vcpu: 0, padding1: 0, padding2: 0 };
    let get = VcpuGetRegisters { nmsrs: 0, padding1: 0, padding2: 0 };
    let body: Vec<u8> = h.as_bytes().iter().chain(get.as_bytes()).copied().collect();
    let (_, reply, _) = request_with_fds(&sock, 3, msg::VCPU_GET_REGISTERS, &body);
    assert_eq!(read_zext::<ErrorCode>(&reply).err, 0, "GET_REGISTERS while the vCPU waits in a channel event");
    (&sock).write_all(&reply_bytes(&ev, 0, Action::Continue as u8, &[])).unwrap();
    let out = hypercall_outcome(&s).unwrap();
    assert!(out.answered, "the socket reply ended the wait: {out:?}");
    s.assert_guest_runs(&[0]);
}

/// Posts one hypercall event, lets `hostile` answer it, and checks the
/// connection ended with a `BadEventReply` (or `UnsupportedAction`), the vCPU resumed as if
/// CONTINUE, and the guest runs on.
fn hostile(what: &str, hostile: impl FnOnce(&RawChannel, u32, &[u8])) {
    let s = Setup::new(&FakeConfig::default());
    let (_sock, ch) = raw_with_channel(&s);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq, ev) = ch.wait_event(0, 0);
    hostile(&ch, seq, &ev);
    let out = hypercall_outcome(&s).unwrap();
    assert!(!out.answered && out.action == Action::Continue, "{what}: {out:?}");
    assert!(s.endpoint.wait_disconnected(Some(T)), "{what}: the connection ends");
    let why = s.endpoint.disconnect_reason().unwrap();
    assert!(
        matches!(why, Disconnect::BadEventReply { vcpu: 0, .. } | Disconnect::UnsupportedAction { vcpu: 0, .. }),
        "{what}: {why}"
    );
    s.assert_guest_runs(&[0]);
}

#[test]
fn hostile_slot_replies_end_the_connection_and_the_guest_runs_on() {
    hostile("a length past the reply area", |ch, seq, ev| {
        ch.reply(0, seq, &reply_bytes(ev, 0, 0, &[]), 0xffff_fff0);
    });
    hostile("a length that cuts the message", |ch, seq, ev| {
        ch.reply(0, seq, &reply_bytes(ev, 0, 0, &[]), 12);
    });
    hostile("a reply naming another vCPU", |ch, seq, ev| {
        ch.reply(0, seq, &reply_bytes(ev, 1, 0, &[]), 24);
    });
    hostile("a reply whose header has another seq", |ch, seq, ev| {
        let mut b = reply_bytes(ev, 0, 0, &[]);
        b[4..8].copy_from_slice(&(seq + 7).to_le_bytes());
        ch.reply(0, seq, &b, 24);
    });
    hostile("a message that is not an event reply", |ch, seq, ev| {
        let mut b = reply_bytes(ev, 0, 0, &[]);
        b[0..2].copy_from_slice(&msg::VCPU_GET_INFO.to_le_bytes());
        ch.reply(0, seq, &b, 24);
    });
    hostile("an action the event does not accept", |ch, seq, ev| {
        ch.reply(0, seq, &reply_bytes(ev, 0, Action::Retry as u8, &[]), 24);
    });
}

#[test]
fn a_bell_rung_with_nothing_behind_it_neither_ends_nor_hangs_the_wait() {
    let s = Setup::new(&FakeConfig::default());
    let (_sock, ch) = raw_with_channel(&s);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq, ev) = ch.wait_event(0, 0);
    // Ring and scribble on the bell and the reply seq for a while.
    for i in 0..200u32 {
        ch.ring(0);
        ch.slot(0, BELL).store(i.wrapping_mul(7919), Ordering::SeqCst);
        ch.slot(0, REPLY_SEQ).store(seq.wrapping_add(1 + i), Ordering::SeqCst);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !s.vm.take_log(0).iter().any(|o| matches!(o, Observed::Event { cause: GuestAction::Hypercall, .. })),
        "the vCPU still waits for its reply"
    );
    // A real reply, even without ringing, is seen within the bounded sleep.
    let b = reply_bytes(&ev, 0, Action::Continue as u8, &[]);
    ch.slot(0, REPLY_LEN).store(b.len() as u32, Ordering::SeqCst);
    let at = slot_offset(0) + REPLY_DATA;
    // SAFETY: within the reply area.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), ch.base.add(at), b.len()) };
    ch.slot(0, REPLY_SEQ).store(seq, Ordering::SeqCst);
    let out = hypercall_outcome(&s).unwrap();
    assert!(out.answered, "{out:?}");
    assert!(s.endpoint.disconnect_reason().is_none());
    s.assert_guest_runs(&[0]);
}

#[test]
fn a_connection_that_ends_mid_event_releases_the_vcpu() {
    let s = Setup::new(&FakeConfig::default());
    let (sock, ch) = raw_with_channel(&s);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let _ = ch.wait_event(0, 0);
    drop(sock);
    let out = hypercall_outcome(&s).unwrap();
    assert!(!out.answered && out.action == Action::Continue, "{out:?}");
    assert!(s.endpoint.wait_disconnected(Some(T)));
    s.assert_guest_runs(&[0]);
    drop(ch);
}

#[test]
fn the_library_uses_the_channel_transparently() {
    let s = Setup::new(&FakeConfig { vcpus: 2, started: 2, ..Default::default() });
    let vm = Vm::connect_raw(s.connect()).unwrap();
    vm.enable_event_channel().unwrap();
    vm.enable_event_channel().unwrap();
    let msr = 0xc000_0082;
    for v in 0..2 {
        vm.control_events(v, event::MSR, true).unwrap();
        vm.control_msr(v, msr, true).unwrap();
    }
    // MSR events from both vCPUs; CONTINUE with a value of the tool's.
    for round in 0..20u64 {
        for v in 0..2u16 {
            s.vm.guest_does(v, GuestAction::WriteMsr { msr, value: 0x1000 + round });
        }
        for _ in 0..2 {
            let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no vCPU event") };
            assert_eq!(ev.event, event::MSR);
            vm.reply(&ev, EventReply::ContinueWith(0x2000 + round)).unwrap();
        }
        for v in 0..2u16 {
            let want = 0x2000 + round;
            let t0 = Instant::now();
            while s.vm.msr(v, msr) != want {
                assert!(t0.elapsed() < T, "vCPU {v}: MSR not written");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    // A PAUSE event: commands while it waits, SET_REGISTERS applied at the reply.
    vm.pause_vcpu(1, true).unwrap();
    let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no PAUSE") };
    assert_eq!(ev.event, event::PAUSE);
    assert_eq!(ev.vcpu.raw(), 1);
    let mut regs = vm.get_registers(1, &[]).unwrap().regs;
    assert_eq!(regs, ev.regs);
    regs.rbx = 0xfeed;
    vm.set_registers(1, &regs).unwrap();
    vm.reply(&ev, EventReply::Continue).unwrap();
    assert_eq!(vm.get_registers(1, &[]).unwrap().regs.rbx, 0xfeed);
    // Dropped unanswered: answered CONTINUE through the channel.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr, value: 0x7777 });
    drop(vm.next_event(Some(T)).unwrap().expect("an event"));
    let t0 = Instant::now();
    while s.vm.msr(0, msr) != 0x7777 {
        assert!(t0.elapsed() < T, "the dropped event's CONTINUE was not applied");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(vm.raw().unmatched_count(), 0);
    assert!(s.endpoint.disconnect_reason().is_none());
    // Closing with an event outstanding releases its vCPU.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr, value: 0x8888 });
    let pending = vm.next_event(Some(T)).unwrap().expect("an event");
    std::mem::forget(pending);
    vm.close();
    s.assert_guest_runs(&[0, 1]);
}

#[test]
fn channel_events_reach_a_waiter_while_another_thread_reads_the_socket() {
    let s = Setup::new(&FakeConfig::default());
    let vm = Vm::connect_raw(s.connect()).unwrap();
    vm.enable_event_channel().unwrap();
    vm.control_events(0, event::HYPERCALL, true).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        // Commands from another thread, back to back: it holds the socket's
        // read side most of the time.
        let busy = sc.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                vm.vcpu_count().unwrap();
                n += 1;
            }
            n
        });
        for _ in 0..50 {
            s.vm.guest_does(0, GuestAction::Hypercall);
            let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no event") };
            assert_eq!(ev.event, event::HYPERCALL);
            vm.reply(&ev, EventReply::Continue).unwrap();
            assert!(hypercall_outcome(&s).unwrap().answered);
        }
        stop.store(true, Ordering::SeqCst);
        assert!(busy.join().unwrap() > 0, "the other thread's commands ran meanwhile");
    });
    assert_eq!(vm.raw().unmatched_count(), 0);
}

#[test]
fn a_tool_that_never_drains_its_wake_up_pipe_does_not_block_the_vcpu() {
    let s = Setup::new(&FakeConfig::default());
    let (_sock, ch) = raw_with_channel(&s);
    // Claim a sleeper forever, make the pipe as small as it gets, never read it.
    ch.word(TOOL_SLEEPERS).store(u32::MAX, Ordering::SeqCst);
    // SAFETY: F_SETPIPE_SZ on the pipe's read end the test owns.
    let size = unsafe { libc::fcntl(ch.pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
    let mut last = 0;
    // More events than the pipe holds wake-up bytes.
    for _ in 0..size + 500 {
        s.vm.guest_does(0, GuestAction::Hypercall);
        let (seq, ev) = ch.wait_event(0, last);
        let b = reply_bytes(&ev, 0, Action::Continue as u8, &[]);
        ch.reply(0, seq, &b, b.len() as u32);
        assert!(hypercall_outcome(&s).unwrap().answered);
        last = seq;
    }
    assert!(s.endpoint.disconnect_reason().is_none());
    s.assert_guest_runs(&[0]);
}

// ---- A channel reply that carries the tool's registers (REPLY_WITH_REGS) ----

impl RawChannel {
    /// Writes `regs` and `flags`, then the reply (as [`RawChannel::reply`]).
    fn reply_regs(&self, vcpu: u16, seq: u32, bytes: &[u8], len: u32, flags: u32, regs: &KvmRegs) {
        let at = slot_offset(usize::from(vcpu)) + REPLY_REGS;
        let r = regs.as_bytes();
        assert_eq!(r.len(), REPLY_REGS_SIZE);
        // SAFETY: within the slot's register area.
        unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), self.base.add(at), r.len()) };
        self.slot(vcpu, REPLY_FLAGS).store(flags, Ordering::SeqCst);
        self.reply(vcpu, seq, bytes, len);
    }
}

/// GET_REGISTERS of `vcpu` on a raw socket.
fn get_regs(sock: &UnixStream, seq: u32, vcpu: u16) -> KvmRegs {
    let h = VcpuHdr { vcpu, padding1: 0, padding2: 0 };
    let get = VcpuGetRegisters { nmsrs: 0, padding1: 0, padding2: 0 };
    let body: Vec<u8> = h.as_bytes().iter().chain(get.as_bytes()).copied().collect();
    let (_, reply, _) = request_with_fds(sock, seq, msg::VCPU_GET_REGISTERS, &body);
    assert_eq!(read_zext::<ErrorCode>(&reply).err, 0);
    read_zext::<VcpuGetRegistersReply>(&reply[8..]).regs
}

/// The fake guest's RIP moves on by one per slice of guest time: a jump
/// this far tells set registers apart from that drift.
const JUMP: u64 = 0x10_0000;

/// `got` is `want` but for RIP, which has drifted by fewer than `JUMP / 16`.
fn assert_regs(got: &KvmRegs, want: &KvmRegs, what: &str) {
    assert!(got.rip.wrapping_sub(want.rip) < JUMP / 16, "{what}: RIP {:#x}, want {:#x}", got.rip, want.rip);
    assert_eq!(KvmRegs { rip: 0, ..*got }, KvmRegs { rip: 0, ..*want }, "{what}");
}

fn outcome_of(s: &Setup, cause: GuestAction) -> ukvmi_endpoint::EventOutcome {
    match s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: c, .. } if *c == cause)) {
        Some(Observed::Event { outcome: Some(o), .. }) => o,
        other => panic!("no {cause:?} outcome: {other:?}"),
    }
}

#[test]
fn registers_in_a_channel_reply_are_set_with_retry_and_with_continue() {
    let s = Setup::new(&FakeConfig::default());
    let (sock, ch) = raw_with_channel(&s);
    assert_eq!(ch.word(HDR_FEATURES).load(Ordering::SeqCst) & FEATURE_REPLY_REGS, FEATURE_REPLY_REGS);
    control_events(&sock, 3, 0, event::BREAKPOINT);
    // BREAKPOINT answered RETRY with RIP moved past the int3.
    s.vm.guest_does(0, GuestAction::Int3);
    let (seq, ev) = ch.wait_event(0, 0);
    assert_eq!(read_zext::<EventHdr>(&ev[8..]).event, event::BREAKPOINT);
    let mut regs = get_regs(&sock, 4, 0);
    regs.rip += JUMP;
    regs.rax = 0x1234;
    let b = reply_bytes(&ev, 0, Action::Retry as u8, &[]);
    ch.reply_regs(0, seq, &b, b.len() as u32, REPLY_WITH_REGS, &regs);
    let out = outcome_of(&s, GuestAction::Int3);
    assert!(out.answered && out.action == Action::Retry, "{out:?}");
    assert_regs(&get_regs(&sock, 5, 0), &regs, "set with the RETRY");
    assert!(!s.vm.take_log(0).iter().any(|o| matches!(o, Observed::Injected(_))), "no #BP for a RETRY");
    // HYPERCALL answered CONTINUE with registers; they replace a
    // SET_REGISTERS sent on the socket during the same event.
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq2, ev2) = ch.wait_event(0, seq);
    let mut other = regs;
    other.rcx = 0x5555;
    let h = VcpuHdr { vcpu: 0, padding1: 0, padding2: 0 };
    let body: Vec<u8> = h.as_bytes().iter().chain(other.as_bytes()).copied().collect();
    let (_, r, _) = request_with_fds(&sock, 6, msg::VCPU_SET_REGISTERS, &body);
    assert_eq!(read_zext::<ErrorCode>(&r).err, 0);
    regs.rbx = 0xfeed;
    let b = reply_bytes(&ev2, 0, Action::Continue as u8, &[]);
    ch.reply_regs(0, seq2, &b, b.len() as u32, REPLY_WITH_REGS, &regs);
    let out = hypercall_outcome(&s).unwrap();
    assert!(out.answered && out.action == Action::Continue, "{out:?}");
    assert_regs(&get_regs(&sock, 7, 0), &regs, "the channel's registers, set with the CONTINUE");
    // A reply without the flag leaves the registers alone, whatever the
    // register area still holds.
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq3, ev3) = ch.wait_event(0, seq2);
    let mut junk = regs;
    junk.rip += JUMP;
    junk.rdx = 0xdead;
    let b = reply_bytes(&ev3, 0, Action::Continue as u8, &[]);
    ch.reply_regs(0, seq3, &b, b.len() as u32, 0, &junk);
    assert!(hypercall_outcome(&s).unwrap().answered);
    assert_regs(&get_regs(&sock, 8, 0), &regs, "no flag, no registers");
    assert!(s.endpoint.disconnect_reason().is_none());
    s.assert_guest_runs(&[0]);
}

/// Posts one hypercall event, lets `hostile` answer it with registers
/// (`regs`: the vCPU's with RIP and RAX changed), and checks the whole reply
/// was refused: the connection ended with `BadEventReply` (or
/// `UnsupportedAction`), the vCPU resumed as if CONTINUE, its registers are
/// what they were, and the guest runs on.
fn hostile_regs(what: &str, hostile: impl FnOnce(&Setup, &RawChannel, u32, &[u8], &KvmRegs)) {
    let s = Setup::new(&FakeConfig::default());
    let (sock, ch) = raw_with_channel(&s);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let (seq, ev) = ch.wait_event(0, 0);
    let before = get_regs(&sock, 3, 0);
    let mut regs = before;
    regs.rip += JUMP;
    regs.rax = 0xbad;
    hostile(&s, &ch, seq, &ev, &regs);
    let out = hypercall_outcome(&s).unwrap();
    assert!(!out.answered && out.action == Action::Continue, "{what}: {out:?}");
    assert!(s.endpoint.wait_disconnected(Some(T)), "{what}: the connection ends");
    let why = s.endpoint.disconnect_reason().unwrap();
    assert!(
        matches!(why, Disconnect::BadEventReply { vcpu: 0, .. } | Disconnect::UnsupportedAction { vcpu: 0, .. }),
        "{what}: {why}"
    );
    s.endpoint.permissions().set_command(-1, true).unwrap();
    let vm = Vm::connect_raw(s.connect()).unwrap();
    assert_regs(&vm.get_registers(0, &[]).unwrap().regs, &before, &format!("{what}: no register was set"));
    s.assert_guest_runs(&[0]);
}

#[test]
fn malformed_replies_with_registers_are_refused_whole() {
    let ok = |ev: &[u8]| reply_bytes(ev, 0, Action::Continue as u8, &[]);
    hostile_regs("an unknown flag bit besides REPLY_WITH_REGS", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &ok(ev), 24, REPLY_WITH_REGS | 2, regs);
    });
    hostile_regs("only an unknown flag bit", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &ok(ev), 24, 0x8000_0000, regs);
    });
    hostile_regs("registers with a length past the reply area", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &ok(ev), (REPLY_MAX + 1) as u32, REPLY_WITH_REGS, regs);
    });
    hostile_regs("registers with a length running into the register area", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &ok(ev), (REPLY_MAX + REPLY_REGS_SIZE) as u32, REPLY_WITH_REGS, regs);
    });
    hostile_regs("registers with a length that cuts the message", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &ok(ev), 12, REPLY_WITH_REGS, regs);
    });
    hostile_regs("registers with a reply naming another vCPU", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &reply_bytes(ev, 1, 0, &[]), 24, REPLY_WITH_REGS, regs);
    });
    hostile_regs("registers with a payload the event does not take", |_, ch, seq, ev, regs| {
        let b = reply_bytes(ev, 0, Action::Continue as u8, &[0u8; 8]);
        ch.reply_regs(0, seq, &b, b.len() as u32, REPLY_WITH_REGS, regs);
    });
    hostile_regs("registers with an action the event does not accept", |_, ch, seq, ev, regs| {
        ch.reply_regs(0, seq, &reply_bytes(ev, 0, Action::Retry as u8, &[]), 24, REPLY_WITH_REGS, regs);
    });
}

#[test]
fn registers_in_a_channel_reply_are_refused_where_set_registers_is_not_allowed() {
    hostile_regs("SET_REGISTERS not allowed", |s, ch, seq, ev, regs| {
        s.endpoint.permissions().set_command(msg::VCPU_SET_REGISTERS.into(), false).unwrap();
        ch.reply_regs(0, seq, &reply_bytes(ev, 0, Action::Continue as u8, &[]), 24, REPLY_WITH_REGS, regs);
    });
}

/// The library's `reply_with_registers` for a BREAKPOINT (RETRY, RIP moved
/// on) then a HYPERCALL (CONTINUE, RBX changed), then a plain reply after a
/// socket SET_REGISTERS; the outcomes and the registers after each (checked
/// against what was asked, then RIP left out: it drifts).
fn library_with_registers(channel: bool) -> Vec<(Action, bool, KvmRegs)> {
    let s = Setup::new(&FakeConfig::default());
    let vm = Vm::connect_raw(s.connect()).unwrap();
    if channel {
        vm.enable_event_channel().unwrap();
    }
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    vm.control_events(0, event::HYPERCALL, true).unwrap();
    let mut seen = Vec::new();
    s.vm.guest_does(0, GuestAction::Int3);
    let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no BREAKPOINT") };
    let mut regs = ev.regs;
    regs.rip += JUMP;
    vm.reply_with_registers(&ev, EventReply::Retry, &regs).unwrap();
    assert!(ev.is_answered());
    let o = outcome_of(&s, GuestAction::Int3);
    let mut look = |o: ukvmi_endpoint::EventOutcome, want: &KvmRegs| {
        let got = vm.get_registers(0, &[]).unwrap().regs;
        assert_regs(&got, want, &format!("channel {channel}"));
        seen.push((o.action, o.answered, KvmRegs { rip: 0, ..got }));
    };
    look(o, &regs);
    s.vm.guest_does(0, GuestAction::Hypercall);
    let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no HYPERCALL") };
    assert_regs(&ev.regs, &regs, "the next event");
    regs = ev.regs;
    regs.rbx = 0xfeed;
    vm.reply_with_registers(&ev, EventReply::Continue, &regs).unwrap();
    look(hypercall_outcome(&s).unwrap(), &regs);
    // A plain reply afterwards applies no left-over registers.
    s.vm.guest_does(0, GuestAction::Hypercall);
    let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no HYPERCALL") };
    regs = ev.regs;
    regs.rbx = 0x3333;
    vm.set_registers(0, &regs).unwrap();
    vm.reply(&ev, EventReply::Continue).unwrap();
    look(hypercall_outcome(&s).unwrap(), &regs);
    assert!(s.endpoint.disconnect_reason().is_none());
    assert_eq!(vm.raw().unmatched_count(), 0);
    s.assert_guest_runs(&[0]);
    seen
}

#[test]
fn the_library_replies_with_registers_the_same_through_the_channel_and_the_socket() {
    let through_channel = library_with_registers(true);
    let on_socket = library_with_registers(false);
    assert_eq!(through_channel, on_socket);
    let [(a0, ans0, r0), (a1, ans1, r1), (a2, ans2, r2)] = &through_channel[..] else { panic!("three events") };
    assert_eq!((*a0, *a1, *a2), (Action::Retry, Action::Continue, Action::Continue));
    assert!(ans0 & ans1 & ans2);
    assert_eq!((r0.rbx, r1.rbx, r2.rbx), (0, 0xfeed, 0x3333));
}

#[test]
fn the_library_channel_way_sends_one_slot_write_and_the_socket_way_two_messages() {
    // Told apart by what a disallowed SET_REGISTERS does: on the socket the
    // command fails (-KVM_EPERM) and the event stays unanswered; through the
    // channel the VMM refuses the whole reply and ends the connection.
    for channel in [false, true] {
        let s = Setup::new(&FakeConfig::default());
        let vm = Vm::connect_raw(s.connect()).unwrap();
        if channel {
            vm.enable_event_channel().unwrap();
        }
        vm.control_events(0, event::HYPERCALL, true).unwrap();
        s.endpoint.permissions().set_command(msg::VCPU_SET_REGISTERS.into(), false).unwrap();
        s.vm.guest_does(0, GuestAction::Hypercall);
        let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no HYPERCALL") };
        let mut regs = ev.regs;
        regs.rax = 0xbad;
        let r = vm.reply_with_registers(&ev, EventReply::Continue, &regs);
        if channel {
            r.unwrap();
            assert!(s.endpoint.wait_disconnected(Some(T)));
            let why = s.endpoint.disconnect_reason().unwrap();
            assert!(matches!(why, Disconnect::BadEventReply { vcpu: 0, .. }), "{why}");
            assert!(!hypercall_outcome(&s).unwrap().answered);
        } else {
            assert_eq!(code(r), EPERM);
            assert!(!ev.is_answered());
            drop(ev);
            assert!(hypercall_outcome(&s).unwrap().answered, "the drop answered CONTINUE");
            assert!(s.endpoint.disconnect_reason().is_none());
        }
        s.endpoint.permissions().set_command(-1, true).unwrap();
        vm.close();
        let vm = Vm::connect_raw(s.connect()).unwrap();
        assert_ne!(vm.get_registers(0, &[]).unwrap().regs.rax, 0xbad, "channel {channel}: not set");
        s.assert_guest_runs(&[0]);
    }
}
