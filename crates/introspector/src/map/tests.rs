//! Tests of the zero-copy map: descriptor handling against a scripted VMM on the other end of a
//! socket pair. Leaks are seen through pipes: the peer sends the write
//! end of a pipe and closes its own copy, so the read end reports
//! hang-up exactly when the library has closed what it received.

use super::*;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use ukvmi_wire::{ErrorCode, GetVersionReply, MsgHdr};

fn pair() -> (Vm, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let vm = Vm::connect_raw(a).unwrap();
    vm.set_timeout(Duration::from_secs(5));
    (vm, b)
}

fn read_msg(s: &mut UnixStream) -> (MsgHdr, Vec<u8>) {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let hdr: MsgHdr = read_zext(&h);
    let mut body = vec![0u8; usize::from(hdr.size)];
    s.read_exact(&mut body).unwrap();
    (hdr, body)
}

/// Writes `bytes` with `fd` attached (SCM_RIGHTS).
fn send_fd(s: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
    // SAFETY: all-zero msghdr is valid; pointers set to live buffers; the
    // control buffer (32 bytes) holds one cmsg with one int.
    unsafe {
        let mut mh: libc::msghdr = std::mem::zeroed();
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.as_mut_ptr().cast();
        mh.msg_controllen = libc::CMSG_SPACE(4) as _;
        let c = libc::CMSG_FIRSTHDR(&mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd.as_raw_fd());
        assert_eq!(libc::sendmsg(s.as_raw_fd(), &mh, 0), bytes.len() as isize);
    }
}

fn reply_bytes(id: u16, seq: u32, err: i32, data: &[u8]) -> Vec<u8> {
    frame(id, seq, &[ErrorCode { err, padding: 0 }.as_bytes(), data]).unwrap()
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// Whether every write end of the pipe is closed within `t`.
fn hung_up(rd: &OwnedFd, t: Duration) -> bool {
    let mut p = libc::pollfd { fd: rd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
    n == 1 && p.revents & libc::POLLHUP != 0
}

/// A sealed memfd of `len` bytes (sealed only if `seal`).
fn memfd(len: u64, seal: bool) -> std::fs::File {
    // SAFETY: a NUL-terminated name and flags; checked.
    let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    if seal {
        // SAFETY: F_ADD_SEALS with an int argument on our memfd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) }, 0);
    }
    f
}

fn map_reply(size: u64, flags: u32) -> Vec<u8> {
    VmMapMemoryReply { gpa: 0, size, flags, padding: 0 }.as_bytes().to_vec()
}

#[test]
fn descriptors_on_other_messages_are_closed() {
    let (vm, mut peer) = pair();
    std::thread::scope(|sc| {
        let (rd, wr) = pipe();
        let (rd2, wr2) = pipe();
        let p = sc.spawn(move || {
            let (h, _) = read_msg(&mut peer);
            let v = GetVersionReply { version: 1, max_msg_size: 8184, ..Default::default() };
            // An unsolicited id-MAP reply nobody waits for, then the real one.
            send_fd(&peer, &reply_bytes(MAP, 9999, 0, &map_reply(4096, 0)), wr2.as_fd());
            drop(wr2);
            send_fd(&peer, &reply_bytes(h.id, h.seq, 0, v.as_bytes()), wr.as_fd());
            drop(wr);
            peer
        });
        assert_eq!(vm.get_version().unwrap().version, 1);
        assert!(hung_up(&rd, Duration::from_secs(5)), "the descriptor sent with GET_VERSION's reply leaked");
        assert!(hung_up(&rd2, Duration::from_secs(5)), "the descriptor of an unmatched reply leaked");
        let peer = p.join().unwrap();
        // An event with a descriptor: queued as usual, the descriptor closed.
        let (rd3, wr3) = pipe();
        let body = ukvmi_wire::EventHdr { event: ukvmi_wire::event::UNHOOK, padding: [0; 3] };
        send_fd(&peer, &frame(msg::VM_EVENT, 1, &[body.as_bytes()]).unwrap(), wr3.as_fd());
        drop(wr3);
        assert!(vm.next_event(Some(Duration::from_secs(5))).unwrap().is_some());
        assert!(hung_up(&rd3, Duration::from_secs(5)), "the descriptor sent with an event leaked");
    });
}

const MAP: u16 = msg::UKVMI_VM_MAP_MEMORY;

/// Answers one MAP request with `data` and, if given, `fd`.
fn answer_map(
    vm: &Vm,
    mut peer: UnixStream,
    data: Vec<u8>,
    fd: Option<OwnedFd>,
    writable: bool,
) -> Result<GuestMemoryMap> {
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let (h, body) = read_msg(&mut peer);
            assert_eq!(h.id, MAP);
            let req: VmMapMemory = read_zext(&body);
            assert_eq!((body.len(), req.flags), (8, u32::from(writable)));
            let bytes = reply_bytes(h.id, h.seq, 0, &data);
            match &fd {
                Some(f) => send_fd(&peer, &bytes, f.as_fd()),
                None => peer.write_all(&bytes).unwrap(),
            }
        });
        if writable {
            vm.map_memory_writable()
        } else {
            vm.map_memory()
        }
    })
}

#[test]
fn a_good_reply_maps_and_the_map_outlives_the_connection() {
    let (vm, peer) = pair();
    let f = memfd(3 * 4096, true);
    (&f).write_all(b"hello").unwrap();
    let map = answer_map(&vm, peer, map_reply(3 * 4096, 0), Some(f.try_clone().unwrap().into()), false).unwrap();
    assert_eq!((map.len(), map.is_writable()), (3 * 4096, false));
    let mut b = [0u8; 5];
    map.read(0, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    vm.close();
    drop(vm);
    std::os::unix::fs::FileExt::write_all_at(&f, &42u64.to_le_bytes(), 8192).unwrap();
    assert_eq!(map.read_u64(8192).unwrap(), 42, "still mapped, still live");
}

#[test]
fn a_descriptor_reaches_its_reply_among_messages_read_ahead_together() {
    // The library reads ahead: several messages may come in one
    // recvmsg. Messages before and after the reply that carries the
    // descriptor, already waiting in the socket, must not take it.
    let (vm, mut peer) = pair();
    let f = memfd(4096, true);
    (&f).write_all(b"mine").unwrap();
    let unhook = ukvmi_wire::EventHdr { event: ukvmi_wire::event::UNHOOK, padding: [0; 3] };
    let map = std::thread::scope(|sc| {
        sc.spawn(|| {
            let (h, _) = read_msg(&mut peer);
            let mut before = Vec::new();
            for seq in 1..=5 {
                before.extend_from_slice(&frame(msg::VM_EVENT, seq, &[unhook.as_bytes()]).unwrap());
                before.extend_from_slice(&reply_bytes(msg::GET_VERSION, 7000 + seq, 0, &[0; 16]));
            }
            peer.write_all(&before).unwrap();
            send_fd(&peer, &reply_bytes(h.id, h.seq, 0, &map_reply(4096, 0)), f.as_fd());
            peer.write_all(&frame(msg::VM_EVENT, 6, &[unhook.as_bytes()]).unwrap()).unwrap();
        });
        vm.map_memory()
    })
    .unwrap();
    let mut b = [0u8; 4];
    map.read(0, &mut b).unwrap();
    assert_eq!(&b, b"mine");
    for seq in 1..=6 {
        let ev = vm.next_event(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ev.map(|e| e.seq()), Some(seq), "events in order");
    }
    assert_eq!(vm.raw().unmatched_count(), 5, "the replies nobody asked for");
}

#[test]
fn bad_replies_are_protocol_errors_and_close_the_descriptor() {
    // No descriptor at all.
    let (vm, peer) = pair();
    assert!(matches!(answer_map(&vm, peer, map_reply(4096, 0), None, false), Err(Error::Protocol(_))));
    // Not sealed, so the VMM could shrink it under us.
    let (vm, peer) = pair();
    let r = answer_map(&vm, peer, map_reply(4096, 0), Some(memfd(4096, false).into()), false);
    assert!(matches!(r, Err(Error::Protocol(ProtocolError::Map { problem: MapProblem::NotSealed, .. }))), "{r:?}");
    // Shorter than announced.
    let (vm, peer) = pair();
    let r = answer_map(&vm, peer, map_reply(8192, 0), Some(memfd(4096, true).into()), false);
    assert!(
        matches!(
            r,
            Err(Error::Protocol(ProtocolError::Map {
                problem: MapProblem::TooShort { file: 4096, announced: 8192 },
                ..
            }))
        ),
        "{r:?}"
    );
    // Writable asked, read-only descriptor given.
    let (vm, peer) = pair();
    let rw = memfd(4096, true);
    let ro: OwnedFd = std::fs::File::open(format!("/proc/self/fd/{}", rw.as_raw_fd())).unwrap().into();
    let r = answer_map(&vm, peer, map_reply(4096, map_flags::WRITABLE), Some(ro), true);
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    // Flags that do not match the request; zero size.
    let (vm, peer) = pair();
    let r = answer_map(&vm, peer, map_reply(4096, map_flags::WRITABLE), Some(memfd(4096, true).into()), false);
    assert!(matches!(r, Err(Error::Protocol(_))), "{r:?}");
    let (vm, peer) = pair();
    assert!(matches!(
        answer_map(&vm, peer, map_reply(0, 0), Some(memfd(0, true).into()), false),
        Err(Error::Protocol(_))
    ));
    // A pipe instead of a memfd: refused, and closed.
    let (vm, peer) = pair();
    let (rd, wr) = pipe();
    assert!(matches!(answer_map(&vm, peer, map_reply(4096, 0), Some(wr), false), Err(Error::Protocol(_))));
    assert!(hung_up(&rd, Duration::from_secs(5)), "a refused descriptor leaked");
}

fn no_slots_left(vm: &Vm) -> bool {
    (0..4).all(|seq| vm.mux.take_received_fds(seq).is_empty())
}

#[test]
fn a_raw_request_never_keeps_a_descriptor() {
    // request_raw opens no slot: the descriptor is closed on arrival.
    let (vm, mut peer) = pair();
    let (rd, wr) = pipe();
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let (h, _) = read_msg(&mut peer);
            send_fd(&peer, &reply_bytes(h.id, h.seq, 0, &map_reply(4096, 0)), wr.as_fd());
        });
        let r = vm.raw().request_raw(MAP, VmMapMemory::default().as_bytes()).unwrap();
        assert_eq!((r.err, r.data.len()), (0, 24));
    });
    assert!(hung_up(&rd, Duration::from_secs(5)), "the raw reply's descriptor leaked");
}

#[test]
fn a_reply_after_the_request_gave_up_has_its_descriptor_closed() {
    let (vm, mut peer) = pair();
    vm.set_timeout(Duration::from_millis(100));
    let (rd, wr) = pipe();
    std::thread::scope(|sc| {
        sc.spawn(move || {
            let (h, _) = read_msg(&mut peer);
            std::thread::sleep(Duration::from_millis(400));
            send_fd(&peer, &reply_bytes(h.id, h.seq, 0, &map_reply(4096, 0)), wr.as_fd());
        });
        assert!(matches!(vm.map_memory(), Err(Error::Timeout { .. })));
    });
    assert!(hung_up(&rd, Duration::from_secs(5)), "the late descriptor leaked");
    // The request had seq 1; nothing was kept for it.
    assert!(vm.mux.take_received_fds(1).is_empty());
    assert!(no_slots_left(&vm));
}
