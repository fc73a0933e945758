//! The multiplexer's blocking waits against a scripted peer: messages a
//! waiter leaves in the read-ahead buffer are still taken in with nobody
//! waiting (the reader thread, which has no timer any more, must be woken
//! for them), and `wake_event_waiter` ends waits that have no timeout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ukvmi_wire::{frame, msg, read_zext, ErrorCode, IntoBytes, MsgHdr};

use crate::{Event, Vm};

const T: Duration = Duration::from_secs(5);

fn pair() -> (Vm, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(T)).unwrap();
    let vm = Vm::connect_raw(a).unwrap();
    vm.set_timeout(T);
    (vm, b)
}

fn read_hdr(s: &mut UnixStream) -> MsgHdr {
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    let hdr: MsgHdr = read_zext(&h);
    let mut body = vec![0u8; usize::from(hdr.size)];
    s.read_exact(&mut body).unwrap();
    hdr
}

fn reply(id: u16, seq: u32, data: &[u8]) -> Vec<u8> {
    frame(id, seq, &[ErrorCode { err: 0, padding: 0 }.as_bytes(), data]).unwrap()
}

#[test]
fn a_reply_left_in_the_read_ahead_buffer_is_taken_in_with_nobody_waiting() {
    let (vm, mut peer) = pair();
    thread::scope(|sc| {
        sc.spawn(|| {
            let hdr = read_hdr(&mut peer);
            // The reply and a stray one in one write: the waiter's single
            // `recvmsg` takes both, reads its own, and leaves.
            let mut both = reply(hdr.id, hdr.seq, &7u64.to_le_bytes());
            both.extend(reply(msg::VCPU_GET_INFO, 0xdead, &9u64.to_le_bytes()));
            peer.write_all(&both).unwrap();
        });
        assert_eq!(vm.tsc_frequency(0).unwrap(), 7);
    });
    // Nothing else comes on the socket: the stray reply is only taken in
    // (into the unmatched store) if the reader thread is woken for it.
    let end = Instant::now() + T;
    while vm.mux.unmatched_count() == 0 {
        assert!(Instant::now() < end, "the buffered reply was never read");
        thread::sleep(Duration::from_millis(5));
    }
    let u = vm.mux.take_unmatched();
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].hdr.seq, 0xdead);
    drop(peer);
}

/// `vm.next_event(None)` on another thread; its result comes on the receiver.
fn wait_forever(vm: &std::sync::Arc<Vm>) -> mpsc::Receiver<crate::Result<Option<Event>>> {
    let (tx, rx) = mpsc::channel();
    let vm = std::sync::Arc::clone(vm);
    thread::spawn(move || {
        let _ = tx.send(vm.next_event(None));
    });
    rx
}

#[test]
fn wake_event_waiter_ends_waits_without_a_timeout() {
    let (vm, peer) = pair();
    let vm = std::sync::Arc::new(vm);
    // One waiter (it holds the read side and blocks in poll).
    let rx = wait_forever(&vm);
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "no event, no wake-up: it still waits");
    vm.wake_event_waiter();
    assert!(matches!(rx.recv_timeout(T).expect("woken"), Ok(None)));
    // Two waiters (one of them asleep on the condvar), two wake-ups.
    let (a, b) = (wait_forever(&vm), wait_forever(&vm));
    thread::sleep(Duration::from_millis(100));
    vm.wake_event_waiter();
    vm.wake_event_waiter();
    assert!(matches!(a.recv_timeout(T).expect("first woken"), Ok(None)));
    assert!(matches!(b.recv_timeout(T).expect("second woken"), Ok(None)));
    // A wake-up with nobody waiting ends the next wait at once, once.
    vm.wake_event_waiter();
    assert!(matches!(vm.next_event(None), Ok(None)));
    assert!(matches!(vm.next_event(Some(Duration::from_millis(50))), Ok(None)));
    // The connection closing still ends a wait without a timeout.
    let rx = wait_forever(&vm);
    drop(peer);
    assert!(matches!(rx.recv_timeout(T).expect("the close woke it"), Err(crate::Error::Closed)));
}
