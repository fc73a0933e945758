//! An idle introspector costs no wake-ups: a monitor attached to a
//! running `ukvmi run` with no events enabled (beyond PAUSE, which nothing
//! raises) leaves its event thread and the connection's reader thread
//! asleep, with the shared-memory event channel on and off, while the
//! guest provably runs in the same window; and stopping it still works.
//! (The one test in this binary: the threads are found by name in
//! /proc/self/task, so no other monitor may run alongside.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{start_all_up, Scratch};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use ukvmi_monitor::{DemoOs, Monitor};

/// The library's threads, by name.
const THREADS: [&str; 2] = ["ukvmi-monitor", "ukvmi-reader"];
/// The window in which the threads are watched.
const WINDOW: Duration = Duration::from_secs(2);
/// Most voluntary context switches a thread may make in the window. A
/// blocked thread makes none; waiting in 20 ms slices (as the library used
/// to) makes about 100 in 2 s, 10 ms sleeps about 200.
const BOUND: u64 = 6;

/// Voluntary context switches of this process's thread named `name`
/// (exactly one must exist).
fn switches(name: &str) -> u64 {
    let mut found = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else { continue };
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap();
        found.push(n);
    }
    assert_eq!(found.len(), 1, "expected one thread named {name}, found {}", found.len());
    found[0]
}

#[test]
fn an_idle_monitor_and_its_reader_do_not_wake_while_the_guest_runs() {
    for channel in [true, false] {
        let dir = Scratch::new(if channel { "idle-ch" } else { "idle-sock" });
        let (vm, _l, tool) = start_all_up(&dir, "traps", 1, &[]);
        let mon = Monitor::start_with_event_channel(tool, Arc::new(DemoOs::new()), channel).unwrap();
        assert_eq!(mon.event_channel(), channel, "the VMM offers the event channel (v12)");
        // Let the attach's own traffic settle (the reader's short standby).
        std::thread::sleep(Duration::from_millis(300));
        let before: Vec<u64> = THREADS.iter().map(|n| switches(n)).collect();
        let t0 = Instant::now();
        // The guest runs in the window: ticks keep coming, and at least WINDOW passes.
        vm.assert_guest_runs();
        while t0.elapsed() < WINDOW {
            vm.assert_guest_runs();
        }
        let after: Vec<u64> = THREADS.iter().map(|n| switches(n)).collect();
        for ((name, b), a) in THREADS.iter().zip(&before).zip(&after) {
            let woke = a - b;
            eprintln!("channel {channel}: {name}: {woke} voluntary context switches in {:?}", t0.elapsed());
            assert!(
                woke <= BOUND,
                "channel {channel}: {name} woke {woke} times in {:?} of an idle connection (at most {BOUND})",
                t0.elapsed()
            );
        }
        assert!(mon.is_running());
        // Stopping wakes the idle event thread.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            mon.stop();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(20)).expect("Monitor::stop did not return");
        vm.assert_guest_runs();
    }
}
