//! An idle introspector costs no wake-ups (issue 14), end to end through
//! the real `ukvmi` binary: the tool daemon attached to a running `ukvmi
//! run` with no command running, and then with a guard's stream open
//! (`ukvmi watch-msr LSTAR`, which the guest never writes), leaves every
//! thread of the daemon and of the stream's client process asleep, while
//! the guest provably runs in the same window. What must still wake them
//! still does: a `--duration` ends a stream when it is due, a client that
//! dies ends its command at once, and a stop signal to the daemon or the VM
//! going away ends the stream and the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use common::{daemon_pids, RunningVm, Scratch};

const UKVMI: &str = env!("CARGO_BIN_EXE_ukvmi");
const T: Duration = Duration::from_secs(20);
/// The window in which the threads are watched.
const WINDOW: Duration = Duration::from_secs(3);
/// Most voluntary context switches a thread may make in the window. A
/// thread blocked on something that does not happen makes none; anything
/// periodic at 1/s or more makes at least 3 in 3 s (the daemon's old
/// 200 ms main loop 15, its stream's 100 ms wait 30). The slack of 2 is for
/// one-off wake-ups that are events, not a clock (a page fault on a
/// swapped-in page, a signal to the process).
const BOUND: u64 = 2;

/// Every thread of process `pid`: tid → (name, voluntary context switches).
fn threads(pid: u32) -> BTreeMap<u32, (String, u64)> {
    let mut m = BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let tid: u32 = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(dir.join("comm")), std::fs::read_to_string(dir.join("status")))
        else {
            continue; // ended meanwhile
        };
        let n = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse::<u64>().unwrap())
            .unwrap();
        m.insert(tid, (comm.trim_end().to_string(), n));
    }
    m
}

/// The thread names of process `pid`, sorted.
fn names(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = threads(pid).into_values().map(|(n, _)| n).collect();
    v.sort();
    v
}

/// Watches every thread of each process in `procs` for [`WINDOW`], in which
/// the guest provably runs (its ticks keep coming), and asserts that none
/// woke more than [`BOUND`] times and that no thread started or ended.
fn assert_asleep(vm: &RunningVm, procs: &[(&str, u32)], what: &str) {
    let before: Vec<_> = procs.iter().map(|&(_, pid)| threads(pid)).collect();
    let t0 = Instant::now();
    vm.assert_guest_runs();
    while t0.elapsed() < WINDOW {
        vm.assert_guest_runs();
    }
    let after: Vec<_> = procs.iter().map(|&(_, pid)| threads(pid)).collect();
    let took = t0.elapsed();
    for ((&(who, _), b), a) in procs.iter().zip(&before).zip(&after) {
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            a.keys().collect::<Vec<_>>(),
            "{what}: the {who}'s threads changed in the window: {b:?} -> {a:?}"
        );
        for (tid, (name, n0)) in b {
            let woke = a[tid].1 - n0;
            eprintln!("{what}: {who} thread {name} ({tid}): {woke} voluntary context switches in {took:?}");
            assert!(
                woke <= BOUND,
                "{what}: the {who}'s thread {name} ({tid}) woke {woke} times in {took:?} (at most {BOUND})"
            );
        }
    }
}

fn ukvmi(sock: &Path) -> Command {
    let mut c = Command::new(UKVMI);
    c.env_remove("UKVMI_VM").env_remove("UKVMI_KEY").arg("--vm").arg(sock);
    c
}

/// A streaming command whose stdout bytes are counted as they come.
struct Stream {
    child: Child,
    bytes: Arc<AtomicU64>,
}

impl Stream {
    /// Starts `ukvmi ARGS` and returns once it says it is set up (its
    /// "Ctrl-C to stop" note on stderr).
    fn start(sock: &Path, args: &[&str]) -> Stream {
        let mut child = ukvmi(sock).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let err = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in err.lines() {
                let _ = tx.send(l.unwrap_or_default());
            }
        });
        let mut said = String::new();
        while !said.contains("Ctrl-C to stop") {
            match rx.recv_timeout(T) {
                Ok(l) => said.push_str(&format!("{l}\n")),
                Err(_) => {
                    let _ = child.kill();
                    panic!("ukvmi {args:?} was not set up within {T:?} (or ended): {said}");
                }
            }
        }
        let bytes = Arc::new(AtomicU64::new(0));
        let (mut out, b) = (child.stdout.take().unwrap(), Arc::clone(&bytes));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                b.fetch_add(n as u64, Ordering::SeqCst);
            }
        });
        Stream { child, bytes }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the client to exit.
    fn wait_exit(&mut self, within: Duration, what: &str) -> std::process::ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "{what}: the stream's client did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the daemon `pid` has exactly the threads `want` (by name).
fn wait_threads(pid: u32, want: &[String], within: Duration, what: &str) -> Duration {
    let t0 = Instant::now();
    while names(pid) != want {
        assert!(t0.elapsed() < within, "{what}: the daemon's threads are {:?}, not {want:?}", names(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
    t0.elapsed()
}

/// Asserts that the stream `s` and the daemon serving `sock` both end
/// within 5 s of `since`, when `what` happened.
fn assert_both_end(mut s: Stream, sock: &Path, since: Instant, what: &str) {
    let within = Duration::from_secs(5);
    let status = s.wait_exit(within, what);
    eprintln!("the stream's client exited ({status}) {:?} after {what}", since.elapsed());
    while !daemon_pids(sock).is_empty() {
        assert!(since.elapsed() < within, "the daemon did not exit within {within:?} of {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("the daemon exited {:?} after {what}", since.elapsed());
}

#[test]
fn an_attached_daemon_and_a_guards_stream_do_not_wake_while_the_guest_runs() {
    let dir = Scratch::new("daemon-idle");
    let sock = dir.path("vm.sock");
    let intro = format!("unix:{}", sock.display());
    let mut vm = RunningVm::start(&dir, &["--guest", "traps", "--vcpus", "1", "--introspect", &intro]);
    vm.wait_serial("tick", 1, T);

    // Attached, idle: `info` started the daemon, which holds the VM.
    let o = ukvmi(&sock).arg("info").output().unwrap();
    assert!(o.status.success(), "info: {}", String::from_utf8_lossy(&o.stderr));
    let pids = daemon_pids(&sock);
    assert_eq!(pids.len(), 1, "one daemon serves {}", sock.display());
    let daemon = pids[0];
    // The command's own threads end with it.
    std::thread::sleep(Duration::from_millis(500));
    let idle = names(daemon);
    assert!(idle.iter().any(|n| n == "ukvmi-monitor"), "the daemon is attached: {idle:?}");
    assert_asleep(&vm, &[("daemon", daemon)], "attached, idle");

    // A guard's stream open, never triggered.
    let mut s = Stream::start(&sock, &["watch-msr", "LSTAR"]);
    std::thread::sleep(Duration::from_millis(300));
    let printed = s.bytes.load(Ordering::SeqCst);
    assert_asleep(&vm, &[("daemon", daemon), ("stream client", s.pid())], "watch-msr LSTAR open");
    assert_eq!(s.bytes.load(Ordering::SeqCst), printed, "the guard reported something: the window had events");

    // A client that dies ends its command at once (the guard is undone and
    // the command's threads go), not at the next slice of a wait.
    s.child.kill().unwrap();
    let took = wait_threads(daemon, &idle, Duration::from_secs(2), "after the stream's client was killed");
    eprintln!("the daemon's command ended {took:?} after its client was killed");

    // A stream with a deadline ends when it is due.
    let t0 = Instant::now();
    let o = ukvmi(&sock).args(["watch-msr", "LSTAR", "--duration", "1"]).output().unwrap();
    let took = t0.elapsed();
    assert!(o.status.success(), "watch-msr --duration 1: {}", String::from_utf8_lossy(&o.stderr));
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "--duration 1 took {took:?}");

    // A stop signal to the daemon ends the open stream and the daemon, and
    // the guest runs on.
    let s = Stream::start(&sock, &["watch-msr", "LSTAR"]);
    let signalled = Instant::now();
    // SAFETY: kill(2) on the daemon's pid, found by its command line above.
    unsafe { libc::kill(i32::try_from(daemon).unwrap(), libc::SIGTERM) };
    assert_both_end(s, &sock, signalled, "SIGTERM to the daemon");
    vm.assert_guest_runs();
    // The VMM connects again, to the next daemon.
    let o = ukvmi(&sock).args(["--wait", "10", "info"]).output().unwrap();
    assert!(o.status.success(), "info after the daemon's exit: {}", String::from_utf8_lossy(&o.stderr));

    // The VM going away ends the open stream and the daemon.
    let s = Stream::start(&sock, &["watch-msr", "LSTAR"]);
    let gone = Instant::now();
    vm.child.kill().unwrap();
    vm.child.wait().unwrap();
    assert_both_end(s, &sock, gone, "the VM was killed");
}
