//! The monitor and the shared-memory event channel, against the fake VM:
//! the monitor turns the channel on where the VM offers it and keeps
//! events on the socket when asked not to, and either way an MSR guard
//! answers every write; an idle monitor (its event thread waiting without
//! a timeout) still stops when told; a channel the VMM grants but this
//! side cannot set up is an error, a refused one is not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ukvmi_conformance::{FakeConfig, GuestAction, Setup};
use ukvmi_introspector::wire::event_channel::{VmEventChannelReply, VERSION};
use ukvmi_introspector::wire::{frame, msg, read_zext, ErrorCode, IntoBytes, MsgHdr};
use ukvmi_introspector::Vm;
use ukvmi_monitor::{DemoOs, Kinds, Monitor, Record};

const LSTAR: u32 = 0xc000_0082;
const T: Duration = Duration::from_secs(10);

fn attach(s: &Setup, channel: bool) -> Monitor {
    let vm = Vm::connect_raw(s.connect()).unwrap();
    Monitor::start_with_event_channel(vm, Arc::new(DemoOs::new()), channel).unwrap()
}

/// Refused writes: each one is reported with the old value kept, so every
/// event went out and its reply came back (whichever way they travel).
fn guard_answers_every_write(s: &Setup, mon: &Monitor) {
    let before = s.vm.msr(0, LSTAR);
    let sub = mon.subscribe(Kinds { msr: true, ..Kinds::default() });
    mon.watch_msr(&sub, LSTAR, true).unwrap();
    for i in 1..=50u64 {
        s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x4100 + i });
        match sub.next(T).unwrap().expect("a record within the timeout") {
            Record::Msr { who, msr, old, new, blocked } => {
                assert_eq!((who.vcpu, msr, old, new, blocked), (0, LSTAR, before, 0x4100 + i, true), "write {i}");
            }
            r => panic!("write {i}: {r:?}"),
        }
    }
    let end = Instant::now() + T;
    while s.vm.msr(0, LSTAR) != before {
        assert!(Instant::now() < end, "a refused write changed LSTAR");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(sub);
}

/// Stops `mon` on another thread; fails if that does not return within `T`
/// (an event thread that never wakes would hang it for good).
fn stop_returns(mon: Monitor) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        mon.stop();
        let _ = tx.send(());
    });
    rx.recv_timeout(T).expect("Monitor::stop did not return: the idle event thread was not woken");
}

#[test]
fn the_monitor_turns_the_channel_on_where_the_vm_offers_it() {
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s, true);
    assert!(mon.event_channel(), "the fake VM offers UKVMI_VM_EVENT_CHANNEL (v12)");
    guard_answers_every_write(&s, &mon);
    stop_returns(mon);
}

#[test]
fn asked_not_to_the_monitor_keeps_events_on_the_socket() {
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s, false);
    assert!(!mon.event_channel());
    guard_answers_every_write(&s, &mon);
    stop_returns(mon);
}

#[test]
fn an_idle_monitor_stops_when_told() {
    for channel in [true, false] {
        let s = Setup::new(&FakeConfig::default());
        let mon = attach(&s, channel);
        // Long enough for the event thread to be asleep in its wait.
        std::thread::sleep(Duration::from_millis(300));
        stop_returns(mon);
        // The stop undid the PAUSE events and closed the connection: the
        // guest's next write is not intercepted by anyone.
        s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x77 });
        let end = Instant::now() + T;
        while s.vm.msr(0, LSTAR) != 0x77 {
            assert!(Instant::now() < end, "channel {channel}: the write after the stop did not land");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Reads one request off `peer`: (id, seq).
fn request(peer: &mut UnixStream) -> (u16, u32) {
    let mut h = [0u8; 8];
    peer.read_exact(&mut h).unwrap();
    let hdr: MsgHdr = read_zext(&h);
    let mut body = vec![0u8; usize::from(hdr.size)];
    peer.read_exact(&mut body).unwrap();
    (hdr.id, hdr.seq)
}

fn answer(peer: &mut UnixStream, id: u16, seq: u32, err: i32, data: &[u8]) {
    let ec = ErrorCode { err, padding: 0 };
    peer.write_all(&frame(id, seq, &[ec.as_bytes(), data]).unwrap()).unwrap();
}

#[test]
fn a_channel_granted_without_its_descriptors_fails_the_start() {
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let script = std::thread::spawn(move || {
        let (id, seq) = request(&mut peer);
        assert_eq!(id, msg::VM_CHECK_COMMAND);
        answer(&mut peer, id, seq, 0, &[]);
        let (id, seq) = request(&mut peer);
        assert_eq!(id, msg::UKVMI_VM_EVENT_CHANNEL);
        // Success, but no file and no pipe come with it.
        let r = VmEventChannelReply { size: 4096, nr_vcpus: 1, version: VERSION };
        answer(&mut peer, id, seq, 0, r.as_bytes());
        peer
    });
    let err = Monitor::start_with_event_channel(Vm::connect_raw(a).unwrap(), Arc::new(DemoOs::new()), true)
        .expect_err("a channel that cannot be set up must not be ignored");
    assert!(err.to_string().contains("event channel"), "{err}");
    // The monitor closed the connection (the VMM then drops the channel).
    let mut peer = script.join().unwrap();
    let mut rest = Vec::new();
    assert_eq!(peer.read_to_end(&mut rest).unwrap(), 0, "closed, nothing more sent");
}

#[test]
fn a_refused_channel_leaves_events_on_the_socket() {
    // The VM reports the command but refuses it (e.g. not allowed to this
    // tool): the monitor goes on without it.
    let (a, mut peer) = UnixStream::pair().unwrap();
    peer.set_read_timeout(Some(T)).unwrap();
    let script = std::thread::spawn(move || {
        let (id, seq) = request(&mut peer);
        assert_eq!(id, msg::VM_CHECK_COMMAND);
        answer(&mut peer, id, seq, 0, &[]);
        let (id, seq) = request(&mut peer);
        assert_eq!(id, msg::UKVMI_VM_EVENT_CHANNEL);
        answer(&mut peer, id, seq, -1, &[]);
        // Then the monitor asks for the vCPU count: end it there.
        let (id, _) = request(&mut peer);
        assert_eq!(id, msg::VM_GET_INFO);
    });
    let err = Monitor::start_with_event_channel(Vm::connect_raw(a).unwrap(), Arc::new(DemoOs::new()), true)
        .expect_err("the script ends the connection at GET_INFO");
    assert!(!err.to_string().contains("event channel"), "the refusal itself is not an error: {err}");
    script.join().unwrap();
}
