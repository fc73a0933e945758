//! The monitor and the shared-memory event channel, against the fake VM:
//! the monitor turns the channel on where the VM offers it and keeps
//! events on the socket when asked not to, and either way an MSR guard
//! answers every write; an idle monitor (its event thread waiting without
//! a timeout) still stops when told.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ukvmi_conformance::{FakeConfig, GuestAction, Setup};
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
