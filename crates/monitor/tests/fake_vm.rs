//! The monitor against the conformance crate's fake VM (no KVM): MSR
//! guards, subscriptions that undo what they set up, the backlog limit for
//! a reader that stops reading, and what ends a reader's wait.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::time::{Duration, Instant};

use ukvmi_conformance::{FakeConfig, GuestAction, Setup};
use ukvmi_introspector::Vm;
use ukvmi_monitor::{Kinds, Monitor, Record};

const LSTAR: u32 = 0xc000_0082;
const T: Duration = Duration::from_secs(10);

fn attach(s: &Setup) -> Monitor {
    Monitor::start(Vm::connect_raw(s.connect()).unwrap()).unwrap()
}

/// A monitor on `s` and a subscription watching (not refusing) LSTAR writes.
fn watching_lstar(s: &Setup) -> (Monitor, ukvmi_monitor::Subscription) {
    let mon = attach(s);
    let sub = mon.subscribe(Kinds { msr: true, ..Kinds::default() });
    mon.watch_msr(&sub, LSTAR, false).unwrap();
    (mon, sub)
}

fn next(sub: &ukvmi_monitor::Subscription) -> Record {
    sub.next(T).unwrap().expect("a record within the timeout")
}

#[test]
fn an_msr_guard_keeps_the_old_value_and_goes_away_with_its_subscription() {
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s);
    let before = s.vm.msr(0, LSTAR);
    let sub = mon.subscribe(Kinds { msr: true, ..Kinds::default() });
    mon.watch_msr(&sub, LSTAR, true).unwrap();
    s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x4141 });
    match next(&sub) {
        Record::Msr { who, msr, old, new, blocked } => {
            assert_eq!((who.vcpu, msr, old, new, blocked), (0, LSTAR, before, 0x4141, true));
        }
        r => panic!("{r:?}"),
    }
    let end = Instant::now() + T;
    while s.vm.msr(0, LSTAR) != before || !s.vm.intercepts(0).msrs.contains(&LSTAR) {
        assert!(Instant::now() < end, "the refused write changed LSTAR");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Dropping the subscription unwatches the MSR: the next write goes through.
    drop(sub);
    assert!(!s.vm.intercepts(0).msrs.contains(&LSTAR), "still watched after the subscription went");
    s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x4242 });
    let end = Instant::now() + T;
    while s.vm.msr(0, LSTAR) != 0x4242 {
        assert!(Instant::now() < end, "the unwatched write did not land");
        std::thread::sleep(Duration::from_millis(10));
    }
    mon.stop();
}

#[test]
fn a_reader_that_falls_behind_loses_records_and_is_told_how_many() {
    let s = Setup::new(&FakeConfig::default());
    let (mon, slow) = watching_lstar(&s);
    const BACKLOG: u64 = 10_000;
    const EXTRA: u64 = 25;
    for i in 0..BACKLOG + EXTRA {
        s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: i + 1 });
    }
    // Every write was answered (the guest ran on) although nobody read.
    let end = Instant::now() + Duration::from_secs(60);
    while s.vm.msr(0, LSTAR) != BACKLOG + EXTRA {
        assert!(Instant::now() < end, "the guest got stuck behind a slow reader");
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 0..BACKLOG {
        match slow.next(Duration::ZERO).unwrap() {
            Some(Record::Msr { new, .. }) => assert_eq!(new, i + 1),
            r => panic!("record {i}: {r:?}"),
        }
    }
    assert!(slow.next(Duration::from_millis(50)).unwrap().is_none(), "no more than the backlog is kept");
    // The next record comes after a note of what was lost.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 7 });
    assert_eq!(next(&slow), Record::Lost { count: EXTRA });
    assert!(matches!(next(&slow), Record::Msr { new: 7, .. }));
    mon.stop();
}

#[test]
fn a_wait_without_deadline_ends_with_a_record_a_wake_or_the_monitor_stopping() {
    let s = Setup::new(&FakeConfig::default());
    let (mon, sub) = watching_lstar(&s);
    // A record ends the wait.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x4141 });
    assert!(matches!(sub.next_until(None).unwrap(), Some(Record::Msr { new: 0x4141, .. })));
    // A deadline ends it, not before.
    let t0 = Instant::now();
    assert!(sub.next_until(Some(t0 + Duration::from_millis(200))).unwrap().is_none());
    assert!(t0.elapsed() >= Duration::from_millis(200), "back after {:?}", t0.elapsed());
    // A waker ends it, from another thread, while it waits.
    let w = sub.waker();
    let waking = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        w.wake();
    });
    let t0 = Instant::now();
    assert!(sub.next_until(None).unwrap().is_none());
    assert!(t0.elapsed() >= Duration::from_millis(200), "back after {:?}", t0.elapsed());
    waking.join().unwrap();
    // A wake that finds no wait ends the next one, after the queued records.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x4242 });
    let end = Instant::now() + T;
    while s.vm.msr(0, LSTAR) != 0x4242 {
        assert!(Instant::now() < end, "the write was not answered");
        std::thread::sleep(Duration::from_millis(10));
    }
    sub.waker().wake();
    assert!(matches!(sub.next_until(None).unwrap(), Some(Record::Msr { new: 0x4242, .. })));
    assert!(sub.next_until(None).unwrap().is_none());
    // The monitor stopping ends it: the reason, then the end of the stream.
    let stopping = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        mon.stop();
        mon
    });
    assert!(matches!(sub.next_until(None).unwrap(), Some(Record::Detached { .. })));
    assert!(sub.next_until(None).is_err());
    // A subscription made after the stop is over at once.
    let mon = stopping.join().unwrap();
    assert!(mon.subscribe(Kinds::ALL).next_until(None).is_err());
}
