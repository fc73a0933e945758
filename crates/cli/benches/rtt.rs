//! Round trips, printed as ratios against a baseline measured in the same run:
//!
//! * bare UNIX-socket round trip (two threads, 24-byte ping-pong);
//! * KVMI GET_REGISTERS on a running vCPU (kick out of KVM_RUN, run the job, reply);
//! * KVMI GET_REGISTERS on a paused vCPU (already waiting in a PAUSE event).
//!
//! Run: `cargo bench -p ukvmi --bench rtt` (needs /dev/kvm).
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ukvmi_introspector::{Event, EventReply, Listener};

const N: usize = 2000;

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(v[v.len() * 99 / 100]))
}

fn measure(mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..N / 10 {
        f();
    }
    let mut v = Vec::with_capacity(N);
    for _ in 0..N {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    stats(v)
}

fn socket_rtt() -> (f64, f64) {
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 24];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 24];
    let r = measure(|| {
        a.write_all(&buf.clone()).unwrap();
        a.read_exact(&mut buf).unwrap();
    });
    drop(a);
    echo.join().unwrap();
    r
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches/--all-targets`
    // runs this binary without it (or with --list): do nothing then.
    if !std::env::args().any(|a| a == "--bench") || std::env::args().any(|a| a == "--list") {
        println!("rtt: benchmark skipped (run it with `cargo bench -p ukvmi --bench rtt`)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("ukvmi-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("kvmi.sock");
    let listener = Listener::bind(&sock).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ukvmi"))
        .args(["run", "--guest", "spin", "--vcpus", "1", "--serial", &format!("file:{}", dir.join("serial").display())])
        .arg("--introspect")
        .arg(format!("unix:{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ukvmi run (needs /dev/kvm)");
    let vm = listener.accept().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let sock_rtt = socket_rtt();
    let running = measure(|| {
        vm.get_registers(0, &[]).unwrap();
    });
    vm.pause_vcpu(0, true).unwrap();
    let Some(Event::Vcpu(ev)) = vm.next_event(Some(Duration::from_secs(10))).unwrap() else { panic!("no PAUSE") };
    let paused = measure(|| {
        vm.get_registers(0, &[]).unwrap();
    });
    vm.reply(&ev, EventReply::Continue).unwrap();
    let sock_again = socket_rtt();

    println!("ukvmi round trips, {N} samples each (p50 / p99, microseconds)");
    println!("{:<44} {:>9} {:>9} {:>12}", "what", "p50 us", "p99 us", "p50 ratio");
    let row = |name: &str, (p50, p99): (f64, f64)| {
        println!("{name:<44} {p50:>9.1} {p99:>9.1} {:>11.2}x", p50 / sock_rtt.0);
    };
    row("bare UNIX socket round trip (baseline)", sock_rtt);
    row("KVMI GET_REGISTERS, running vCPU", running);
    row("KVMI GET_REGISTERS, paused vCPU", paused);
    row("bare UNIX socket round trip (again, at end)", sock_again);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
