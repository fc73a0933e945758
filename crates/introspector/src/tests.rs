//! Unit tests against a scripted peer on the other end of a socket; no
//! hypervisor needed.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use ukvmi_wire::handshake::ToIntrospector;
use ukvmi_wire::{
    event, frame, msg, read_zext, EventBreakpoint, EventHdr, EventMsr, GetVersionReply, IntoBytes, KvmErrno, MsgHdr,
    VcpuEvent, VcpuHdr,
};

use crate::{Error, Event, EventPayload, EventReply, Listener, Vm};

const PEER_TIMEOUT: Duration = Duration::from_secs(2);

fn pair() -> (Vm, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    let vm = Vm::connect_raw(a).unwrap();
    vm.set_timeout(PEER_TIMEOUT);
    (vm, b)
}

fn read_msg(s: &mut UnixStream) -> (MsgHdr, Vec<u8>) {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let hdr: MsgHdr = read_zext(&h);
    let mut body = vec![0u8; hdr.size as usize];
    s.read_exact(&mut body).unwrap();
    (hdr, body)
}

fn write_reply(s: &mut UnixStream, id: u16, seq: u32, err: i32, data: &[u8]) {
    let ec = ukvmi_wire::ErrorCode { err, padding: 0 };
    s.write_all(&frame(id, seq, &[ec.as_bytes(), data]).unwrap()).unwrap();
}

/// A vCPU event body: event header, `kvmi_vcpu_event` (with garbage in its
/// padding, as the kernel leaves it), payload.
fn vcpu_event_body(ev: u16, vcpu: u16, size: u16, payload: &[u8]) -> Vec<u8> {
    let mut ve = VcpuEvent { size, vcpu, padding: 0xdead_beef, ..Default::default() };
    ve.arch.mode = 8;
    ve.arch.padding = [0x5a; 7];
    ve.arch.regs.rip = 0xffff_8000_0000_1000;
    ve.arch.sregs.cr3 = 0x1234_5000;
    ve.arch.msrs.lstar = 0xffff_ffff_8100_0000;
    let mut body = EventHdr { event: ev, padding: [0; 3] }.as_bytes().to_vec();
    body.extend_from_slice(ve.as_bytes());
    body.extend_from_slice(payload);
    body
}

fn no_data_pending(s: &UnixStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let r = (&*s).read(&mut b);
    s.set_nonblocking(false).unwrap();
    matches!(r, Err(ref e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn replies_are_matched_by_seq_out_of_order() {
    let (vm, mut peer) = pair();
    thread::scope(|sc| {
        let p = sc.spawn(move || {
            let a = read_msg(&mut peer);
            let b = read_msg(&mut peer);
            // Answer in reverse order; each reply echoes the request's vCPU.
            for (hdr, body) in [b, a] {
                assert_eq!(hdr.id, msg::VCPU_GET_INFO);
                let vh: VcpuHdr = read_zext(&body);
                write_reply(&mut peer, hdr.id, hdr.seq, 0, &(1000 + u64::from(vh.vcpu)).to_le_bytes());
            }
            peer
        });
        let t0 = sc.spawn(|| vm.tsc_frequency(0).unwrap());
        let t1 = sc.spawn(|| vm.tsc_frequency(1).unwrap());
        assert_eq!(t0.join().unwrap(), 1000);
        assert_eq!(t1.join().unwrap(), 1001);
        drop(p.join().unwrap());
    });
    assert_eq!(vm.raw().unmatched_count(), 0);
}

#[test]
fn error_reply_becomes_kvm_error() {
    let (vm, mut peer) = pair();
    let p = thread::spawn(move || {
        let (hdr, body) = read_msg(&mut peer);
        assert_eq!(hdr.id, msg::VCPU_GET_REGISTERS);
        assert_eq!(body.len(), 8 + 8 + 4);
        write_reply(&mut peer, hdr.id, hdr.seq, KvmErrno::Einval.wire(), &[]);
        let (hdr, _) = read_msg(&mut peer);
        write_reply(&mut peer, hdr.id, hdr.seq, -3, &[]);
        peer
    });
    let e = vm.get_registers(0, &[0x174]).unwrap_err();
    assert_eq!(e.errno(), Some(KvmErrno::Einval));
    assert_eq!(e.raw_err(), Some(-22));
    let text = e.to_string();
    assert!(text.starts_with("KVMI_VCPU_GET_REGISTERS failed: -KVM_EINVAL ("), "{text}");
    let e = vm.check_command(99).unwrap_err();
    assert!(matches!(e, Error::KvmUnknown { command: "KVMI_VM_CHECK_COMMAND", err: -3 }), "{e:?}");
    assert_eq!(e.errno(), None);
    drop(p.join().unwrap());
}

#[test]
fn wrong_reply_size_is_a_protocol_error() {
    let (vm, mut peer) = pair();
    let p = thread::spawn(move || {
        // GET_INFO with 8 bytes of data instead of 16.
        let (hdr, _) = read_msg(&mut peer);
        write_reply(&mut peer, hdr.id, hdr.seq, 0, &[0; 8]);
        // A body shorter than kvmi_error_code.
        let (hdr, _) = read_msg(&mut peer);
        peer.write_all(&frame(hdr.id, hdr.seq, &[&[0u8; 4]]).unwrap()).unwrap();
        // GET_REGISTERS for one MSR answered without the MSR entry.
        let (hdr, _) = read_msg(&mut peer);
        write_reply(&mut peer, hdr.id, hdr.seq, 0, &[0; 472]);
        // A well-formed GET_REGISTERS reply.
        let (hdr, body) = read_msg(&mut peer);
        let mut r = ukvmi_wire::VcpuGetRegistersReply { mode: 8, ..Default::default() };
        r.regs.rip = 0x4000;
        r.msrs.nmsrs = 1;
        let entry = ukvmi_wire::KvmMsrEntry { index: read_zext::<u32>(&body[16..]), reserved: 0, data: 77 };
        write_reply(&mut peer, hdr.id, hdr.seq, 0, &[r.as_bytes(), entry.as_bytes()].concat());
        peer
    });
    assert!(matches!(vm.vcpu_count(), Err(Error::Protocol(_))));
    assert!(matches!(vm.vcpu_count(), Err(Error::Protocol(_))));
    assert!(matches!(vm.get_registers(0, &[0x174]), Err(Error::Protocol(_))));
    let regs = vm.get_registers(1, &[0xc000_0080]).unwrap();
    assert_eq!((regs.mode, regs.regs.rip), (8, 0x4000));
    assert_eq!(regs.msrs.len(), 1);
    assert_eq!((regs.msrs[0].index, regs.msrs[0].data), (0xc000_0080, 77));
    drop(p.join().unwrap());
}

#[test]
fn events_interleaved_with_replies_are_queued_and_parsed() {
    let (vm, mut peer) = pair();
    let p = thread::spawn(move || {
        let (hdr, body) = read_msg(&mut peer);
        assert_eq!(hdr.id, msg::VCPU_GET_XCR);
        assert_eq!(body.len(), 16);
        let bp = EventBreakpoint { gpa: 0x1000_0ff0, insn_len: 1, padding: [0; 7] };
        let ev = vcpu_event_body(event::BREAKPOINT, 2, 544, bp.as_bytes());
        peer.write_all(&frame(msg::VCPU_EVENT, 1, &[&ev]).unwrap()).unwrap();
        // A VM event between them, then the reply.
        peer.write_all(&frame(msg::VM_EVENT, 2, &[EventHdr::default().as_bytes()]).unwrap()).unwrap();
        write_reply(&mut peer, hdr.id, hdr.seq, 0, &7u64.to_le_bytes());
        // A larger kvmi_vcpu_event than ours: the payload starts at 8 + size.
        let mut big = vcpu_event_body(event::BREAKPOINT, 0, 560, &[0xee; 16]);
        big.extend_from_slice(EventBreakpoint { gpa: 0x2000, insn_len: 3, padding: [0; 7] }.as_bytes());
        peer.write_all(&frame(msg::VCPU_EVENT, 3, &[&big]).unwrap()).unwrap();
        // A lying size that points past the body, and an unknown event id.
        let liar = vcpu_event_body(event::PF, 0, 0xffff, &[1; 24]);
        peer.write_all(&frame(msg::VCPU_EVENT, 4, &[&liar]).unwrap()).unwrap();
        let odd = vcpu_event_body(41, 0, 544, &[9, 9]);
        peer.write_all(&frame(msg::VCPU_EVENT, 5, &[&odd]).unwrap()).unwrap();
        peer
    });
    assert_eq!(vm.get_xcr(2, 0).unwrap(), 7);
    let t = Some(PEER_TIMEOUT);
    let Some(Event::Vcpu(ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    assert_eq!((ev.seq, ev.event.raw(), ev.vcpu.raw(), ev.mode, ev.size), (1, event::BREAKPOINT, 2, 8, 544));
    assert_eq!(ev.payload, EventPayload::Breakpoint { gpa: 0x1000_0ff0, insn_len: 1 });
    assert_eq!(ev.regs.rip, 0xffff_8000_0000_1000);
    assert_eq!(ev.sregs.cr3, 0x1234_5000);
    assert_eq!(ev.msrs.lstar, 0xffff_ffff_8100_0000);
    assert_eq!(ev.name(), Some("KVMI_VCPU_EVENT_BREAKPOINT"));
    assert!(matches!(vm.next_event(t).unwrap(), Some(Event::Unhook { seq: 2 })));
    let Some(Event::Vcpu(ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    assert_eq!(ev.payload, EventPayload::Breakpoint { gpa: 0x2000, insn_len: 3 });
    let Some(Event::Vcpu(ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    assert_eq!((ev.seq, ev.raw_payload.len()), (4, 0));
    assert_eq!(ev.payload, EventPayload::Pf { gva: 0, gpa: 0, access: 0 });
    let Some(Event::Vcpu(ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    assert_eq!(ev.payload, EventPayload::Unknown { event: 41, payload: vec![9, 9] });
    assert!(matches!(vm.reply(&ev, EventReply::Continue), Err(Error::Refused(_))));
    assert!(vm.next_event(Some(Duration::from_millis(10))).unwrap().is_none());
    drop(p.join().unwrap());
}

#[test]
fn event_replies_have_the_exact_layout() {
    let (vm, mut peer) = pair();
    let bp = EventBreakpoint { gpa: 0x1000, insn_len: 1, padding: [0; 7] };
    let msr = EventMsr { msr: 0xc000_0082, padding: 0, old_value: 0x10, new_value: 0x20 };
    peer.write_all(&frame(msg::VCPU_EVENT, 11, &[&vcpu_event_body(event::BREAKPOINT, 3, 544, bp.as_bytes())]).unwrap())
        .unwrap();
    peer.write_all(&frame(msg::VCPU_EVENT, 12, &[&vcpu_event_body(event::MSR, 1, 544, msr.as_bytes())]).unwrap())
        .unwrap();
    let t = Some(PEER_TIMEOUT);
    let Some(Event::Vcpu(bp_ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    let Some(Event::Vcpu(msr_ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };

    vm.reply(&bp_ev, EventReply::Continue).unwrap();
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.id, hdr.size, hdr.seq), (msg::VCPU_EVENT, 16, 11));
    assert_eq!(body, [3, 0, 0, 0, 0, 0, 0, 0, 0, event::BREAKPOINT as u8, 0, 0, 0, 0, 0, 0]);

    vm.reply(&bp_ev, EventReply::Retry).unwrap();
    let (_, body) = read_msg(&mut peer);
    assert_eq!(body[8], 1);

    vm.reply(&msr_ev, EventReply::ContinueWith(0x1234)).unwrap();
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.id, hdr.size, hdr.seq), (msg::VCPU_EVENT, 24, 12));
    assert_eq!(&body[..16], &[1, 0, 0, 0, 0, 0, 0, 0, 0, event::MSR as u8, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&body[16..], &0x1234u64.to_le_bytes());

    // A plain CONTINUE lets the guest's value through.
    vm.reply(&msr_ev, EventReply::Continue).unwrap();
    let (_, body) = read_msg(&mut peer);
    assert_eq!(&body[16..], &0x20u64.to_le_bytes());

    // Refused locally, nothing written.
    assert!(matches!(vm.reply(&msr_ev, EventReply::Retry), Err(Error::Refused(_))));
    assert!(matches!(vm.reply(&bp_ev, EventReply::ContinueWith(1)), Err(Error::Refused(_))));
    assert!(no_data_pending(&peer));

    // The raw path sends whatever it is given.
    vm.raw().reply_raw(12, 1, 1, 15, &[0xab; 3]).unwrap();
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.size, body[8], body[9], &body[16..]), (19, 1, 15, &[0xab; 3][..]));
}

#[test]
fn eof_wakes_waiting_commands_and_ends_events() {
    let (vm, mut peer) = pair();
    let p = thread::spawn(move || {
        let (hdr, _) = read_msg(&mut peer);
        assert_eq!(hdr.id, msg::VM_GET_INFO);
        drop(peer);
    });
    assert!(matches!(vm.vcpu_count(), Err(Error::Closed)));
    p.join().unwrap();
    assert!(matches!(vm.next_event(None), Err(Error::Closed)));
    assert!(matches!(vm.get_version(), Err(Error::Closed)));
    assert!(vm.is_closed());
    assert_eq!(vm.events().count(), 0);
}

#[test]
fn close_from_our_side_wakes_waiters() {
    let (vm, peer) = pair();
    thread::scope(|sc| {
        let waiter = sc.spawn(|| vm.vcpu_count());
        let events = sc.spawn(|| vm.next_event(None));
        thread::sleep(Duration::from_millis(20));
        vm.close();
        assert!(matches!(waiter.join().unwrap(), Err(Error::Closed)));
        assert!(matches!(events.join().unwrap(), Err(Error::Closed)));
    });
    drop(peer);
}

#[test]
fn timeout_then_late_reply_is_recorded_as_unmatched() {
    let (vm, mut peer) = pair();
    vm.set_timeout(Duration::from_millis(50));
    let (hdr_tx, hdr_rx) = std::sync::mpsc::channel();
    let p = thread::spawn(move || {
        let (late, _) = read_msg(&mut peer);
        hdr_tx.send(()).unwrap();
        let (next, _) = read_msg(&mut peer);
        write_reply(&mut peer, late.id, late.seq, 0, &[0; 16]);
        write_reply(&mut peer, next.id, next.seq, 0, &[0; 16]);
        peer
    });
    assert!(matches!(vm.vcpu_count(), Err(Error::Timeout { command: "KVMI_VM_GET_INFO" })));
    hdr_rx.recv().unwrap();
    vm.set_timeout(PEER_TIMEOUT);
    assert_eq!(vm.vcpu_count().unwrap(), 0);
    assert_eq!(vm.raw().unmatched_count(), 1);
    let u = vm.raw().take_unmatched();
    assert_eq!((u.len(), u[0].hdr.id, u[0].hdr.seq, u[0].data.len()), (1, msg::VM_GET_INFO, 1, 16));
    drop(p.join().unwrap());
}

#[test]
fn raw_requests_and_id_zero_replies() {
    let (vm, mut peer) = pair();
    let p = thread::spawn(move || {
        // The kernel answers a message with id 0 by an 8-byte -KVM_ENOSYS reply with id 0.
        let (hdr, body) = read_msg(&mut peer);
        assert_eq!((hdr.id, body.as_slice()), (0, &[1u8, 2, 3][..]));
        write_reply(&mut peer, 0, hdr.seq, KvmErrno::Enosys.wire(), &[]);
        // A short event reply (id 1, 8 bytes) is answered by an id-1 error reply.
        let (hdr, _) = read_msg(&mut peer);
        write_reply(&mut peer, 1, hdr.seq, KvmErrno::Einval.wire(), &[]);
        // Hand-framed bytes with a size that lies.
        let (hdr, _) = read_msg(&mut peer);
        write_reply(&mut peer, hdr.id, hdr.seq, KvmErrno::Enosys.wire(), &[]);
        peer
    });
    let r = vm.raw().request_raw(0, &[1, 2, 3]).unwrap();
    assert_eq!((r.hdr.id, r.err, r.data.len()), (0, -1000, 0));
    let r = vm.raw().request_raw(1, &[0; 8]).unwrap();
    assert_eq!((r.hdr.id, r.err), (1, -22));
    let seq = vm.raw().next_seq();
    let bytes = MsgHdr { id: 0x77, size: 2, seq }.as_bytes().iter().chain(&[0, 0]).copied().collect::<Vec<_>>();
    let r = vm.raw().request_bytes(0x77, seq, &bytes).unwrap();
    assert_eq!(r.err, -1000);
    assert_eq!(vm.raw().unmatched_count(), 0);
    drop(p.join().unwrap());
}

// ------------------------------------------------------------- handshake

/// Aborts the test process if a test is still running after 10 s: a fake VMM
/// that panicked would otherwise leave `accept` blocked forever.
struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

fn watchdog() -> Watchdog {
    use std::sync::atomic::Ordering;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    thread::spawn(move || {
        for _ in 0..200 {
            if d.load(Ordering::Relaxed) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("handshake test hung; aborting");
        std::process::abort();
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ukvmi-introspector-{}-{name}.sock", std::process::id()))
}

/// The fake VMM: connects, sends `to` (possibly with a tail), reads the reply.
fn vmm_connect(path: &std::path::Path, to: &[u8]) -> (UnixStream, [u8; 24]) {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
    s.write_all(to).unwrap();
    let mut reply = [0u8; 24];
    s.read_exact(&mut reply).unwrap();
    (s, reply)
}

fn answer_get_version(s: &mut UnixStream, version: u32) {
    let (hdr, _) = read_msg(s);
    assert_eq!(hdr.id, msg::GET_VERSION);
    let mut r = GetVersionReply { version, max_msg_size: 8184, ..Default::default() };
    r.features.singlestep = 1;
    write_reply(s, hdr.id, hdr.seq, 0, r.as_bytes());
}

#[test]
fn handshake_sends_the_cookie_hash_then_get_version() {
    let _w = watchdog();
    let path = sock_path("key");
    let listener = Listener::bind(&path).unwrap().with_key(b"secret").with_reply_timeout(PEER_TIMEOUT);
    assert_eq!(listener.local_path(), path);
    let uuid = [7u8; 16];
    let to = ToIntrospector::new(uuid, 1_700_000_000, "guest-1", 0x1_4000_0000);
    let p2 = path.clone();
    let vmm = thread::spawn(move || {
        let (mut s, reply) = vmm_connect(&p2, to.as_bytes());
        assert_eq!(u32::from_ne_bytes(reply[..4].try_into().unwrap()), 24);
        // SHA-1("secret")
        let expected: [u8; 20] = [
            0xe5, 0xe9, 0xfa, 0x1b, 0xa3, 0x1e, 0xcd, 0x1a, 0xe8, 0x4f, 0x75, 0xca, 0xaa, 0x47, 0x4f, 0x3a, 0x66, 0x3f,
            0x05, 0xf4,
        ];
        assert_eq!(reply[4..], expected);
        answer_get_version(&mut s, 1);
        s
    });
    let vm = listener.incoming().next().unwrap().unwrap();
    let info = vm.info();
    assert_eq!((info.uuid, info.name.as_str(), info.start_time), (uuid, "guest-1", 1_700_000_000));
    assert_eq!((info.max_gpa, info.handshake_size), (0x1_4000_0000, 104));
    assert_eq!((info.version, info.max_msg_size, info.singlestep), (1, 8184, true));
    let s = vmm.join().unwrap();
    drop(vm);
    drop(s);
    drop(listener);
    assert!(!path.exists(), "the socket file is removed on drop");
}

#[test]
fn handshake_without_key_sends_zeros_and_accepts_short_structs() {
    let _w = watchdog();
    let path = sock_path("nokey");
    let listener = Listener::bind(&path).unwrap().with_reply_timeout(PEER_TIMEOUT);
    let mut to = ToIntrospector::new([1; 16], 5, "old-qemu", 0xffff);
    to.struct_size = 96;
    let p2 = path.clone();
    let vmm = thread::spawn(move || {
        let (mut s, reply) = vmm_connect(&p2, &to.as_bytes()[..96]);
        assert_eq!(reply[4..], [0u8; 20]);
        answer_get_version(&mut s, 1);
        s
    });
    let vm = listener.accept().unwrap();
    assert_eq!((vm.info().name.as_str(), vm.info().max_gpa), ("old-qemu", 0));
    drop(vmm.join().unwrap());
}

#[test]
fn handshake_discards_the_tail_of_a_longer_struct() {
    let _w = watchdog();
    let path = sock_path("long");
    let listener = Listener::bind(&path).unwrap().with_reply_timeout(PEER_TIMEOUT);
    let mut to = ToIntrospector::new([2; 16], 9, "future-qemu", 0x8000_0000);
    to.struct_size = 200;
    let mut bytes = to.as_bytes().to_vec();
    bytes.resize(200, 0xaa);
    let p2 = path.clone();
    let vmm = thread::spawn(move || {
        let (mut s, _) = vmm_connect(&p2, &bytes);
        answer_get_version(&mut s, 1);
        s
    });
    let vm = listener.accept().unwrap();
    assert_eq!((vm.info().max_gpa, vm.info().handshake_size, vm.info().version), (0x8000_0000, 200, 1));
    drop(vmm.join().unwrap());
}

#[test]
fn handshake_rejects_bad_sizes_eof_old_versions_and_silence() {
    let _w = watchdog();
    let path = sock_path("bad");
    let listener = Listener::bind(&path)
        .unwrap()
        .with_reply_timeout(PEER_TIMEOUT)
        .with_handshake_timeout(Duration::from_millis(100));
    let p2 = path.clone();
    let vmm = thread::spawn(move || {
        // struct_size 20: rejected before any reply.
        let mut s = UnixStream::connect(&p2).unwrap();
        s.write_all(&[20u32.to_ne_bytes().as_slice(), &[0u8; 16]].concat()).unwrap();
        let mut b = [0u8; 1];
        s.set_read_timeout(Some(PEER_TIMEOUT)).unwrap();
        // Closed unread: EOF, or ECONNRESET because our 16 bytes were left unread.
        let r = s.read(&mut b);
        assert!(matches!(r, Ok(0)) || matches!(r, Err(ref e) if e.kind() == ErrorKind::ConnectionReset), "{r:?}");
        // struct_size above 64 KiB.
        let mut s = UnixStream::connect(&p2).unwrap();
        s.write_all(&65537u32.to_ne_bytes()).unwrap();
        // Cookie rejected: the VMM closes instead of answering GET_VERSION.
        let to = ToIntrospector::new([3; 16], 0, "x", 0);
        let (s3, _) = vmm_connect(&p2, to.as_bytes());
        drop(s3);
        // Version 0.
        let (mut s4, _) = vmm_connect(&p2, to.as_bytes());
        answer_get_version(&mut s4, 0);
        // Connects and says nothing.
        let s5 = UnixStream::connect(&p2).unwrap();
        (s, s4, s5)
    });
    let e = listener.accept().unwrap_err();
    assert!(matches!(e, Error::Handshake(ref m) if m.contains("20-byte")), "{e:?}");
    assert!(matches!(listener.accept(), Err(Error::Handshake(_))));
    let e = listener.accept().unwrap_err();
    assert!(matches!(e, Error::Handshake(ref m) if m.contains("invalid authentication token")), "{e:?}");
    assert!(matches!(listener.accept(), Err(Error::Handshake(ref m)) if m.contains("version 0")));
    assert!(matches!(listener.accept(), Err(Error::Timeout { command: "handshake" })));
    drop(vmm.join().unwrap());
}

#[test]
fn bind_replaces_a_stale_socket_but_not_a_regular_file() {
    let path = sock_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let l = Listener::bind(&path).unwrap();
    drop(l);
    let file = sock_path("regular");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(Listener::bind(&file), Err(Error::Io { .. })));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn vm_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Vm>();
    check::<Listener>();
    check::<Error>();
    check::<crate::PendingEvent>();
    check::<crate::GuestMemoryMap>();
}

#[test]
fn a_vcpu_event_dropped_unanswered_answers_continue_once() {
    let (vm, mut peer) = pair();
    let msr = EventMsr { msr: 0xc000_0082, padding: 0, old_value: 0x10, new_value: 0x20 };
    let bp = EventBreakpoint { gpa: 0x1000, insn_len: 1, padding: [0; 7] };
    peer.write_all(&frame(msg::VCPU_EVENT, 21, &[&vcpu_event_body(event::MSR, 2, 544, msr.as_bytes())]).unwrap())
        .unwrap();
    peer.write_all(&frame(msg::VCPU_EVENT, 22, &[&vcpu_event_body(event::BREAKPOINT, 1, 544, bp.as_bytes())]).unwrap())
        .unwrap();
    peer.write_all(&frame(msg::VCPU_EVENT, 23, &[&vcpu_event_body(41, 0, 544, &[])]).unwrap()).unwrap();
    let t = Some(PEER_TIMEOUT);
    let Some(Event::Vcpu(forgotten)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    assert!(!forgotten.is_answered());
    drop(forgotten);
    // CONTINUE with the guest's value, for the event's seq and vCPU.
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.id, hdr.size, hdr.seq), (msg::VCPU_EVENT, 24, 21));
    assert_eq!(&body[..16], &[2, 0, 0, 0, 0, 0, 0, 0, 0, event::MSR as u8, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&body[16..], &0x20u64.to_le_bytes());

    // Answered: dropping it sends nothing more.
    let Some(Event::Vcpu(answered)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    vm.reply(&answered, EventReply::Retry).unwrap();
    assert!(answered.is_answered());
    drop(answered);
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.seq, body[8]), (22, 1), "the RETRY");

    // An event the library does not know gets a bare CONTINUE; a detached
    // one gets nothing.
    let Some(Event::Vcpu(unknown)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    assert!(matches!(vm.reply(&unknown, EventReply::Continue), Err(Error::Refused(_))));
    assert!(!unknown.is_answered(), "a refused reply does not count");
    drop(unknown);
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.seq, hdr.size, body[8], body[9]), (23, 16, 0, 41));
    peer.write_all(&frame(msg::VCPU_EVENT, 24, &[&vcpu_event_body(event::PAUSE, 0, 544, &[])]).unwrap()).unwrap();
    let Some(Event::Vcpu(ev)) = vm.next_event(t).unwrap() else { panic!("expected a vCPU event") };
    let msg = ev.detach();
    assert_eq!(msg.seq, 24);
    thread::sleep(Duration::from_millis(50));
    assert!(no_data_pending(&peer));
    // ... until the caller answers it.
    assert!(matches!(vm.reply_detached(&msg, EventReply::Retry), Err(Error::Refused(_))), "PAUSE takes no RETRY");
    vm.reply_detached(&msg, EventReply::Continue).unwrap();
    let (hdr, body) = read_msg(&mut peer);
    assert_eq!((hdr.seq, hdr.size, body[8], body[9]), (24, 16, 0, event::PAUSE as u8));
}

#[test]
fn events_end_cleanly_at_eof_and_with_an_error_when_cut_inside_a_message() {
    let (vm, mut peer) = pair();
    peer.write_all(&frame(msg::VM_EVENT, 1, &[EventHdr { event: event::UNHOOK, padding: [0; 3] }.as_bytes()]).unwrap())
        .unwrap();
    drop(peer);
    let items: Vec<_> = vm.events().collect();
    assert_eq!(items.len(), 1, "{items:?}");
    assert!(matches!(items.first(), Some(Ok(Event::Unhook { seq: 1 }))));

    let (vm, mut peer) = pair();
    // A header announcing 100 bytes, then only 10 of them.
    let hdr = MsgHdr { id: msg::VM_EVENT, size: 100, seq: 1 };
    peer.write_all(hdr.as_bytes()).unwrap();
    peer.write_all(&[0; 10]).unwrap();
    drop(peer);
    let mut events = vm.events();
    let last = events.next();
    assert!(matches!(last, Some(Err(Error::Io { .. }))), "{last:?}");
    assert!(events.next().is_none(), "and then it ends");
}
