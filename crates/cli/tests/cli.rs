//! The command line: help, errors, exit status.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{RunningVm, Scratch};
use std::process::Command;
use std::time::Duration;

fn ukvmi(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ukvmi")).args(args).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn help_lists_the_builtin_guests_and_host_limits() {
    let (code, out, _) = ukvmi(&["run", "--help"]);
    assert_eq!(code, 0);
    for g in ukvmi_guests::all() {
        assert!(out.contains(g.name), "{} missing from --help", g.name);
    }
    assert!(out.contains("--introspect unix:PATH"));
    assert!(out.contains("EOPNOTSUPP"));
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    for (args, needle) in [
        (vec!["run"], "give --guest NAME or --kernel PATH"),
        (vec!["run", "--guest", "nope"], "no built-in guest `nope`"),
        (vec!["run", "--kernel", "/nonexistent/k.bin"], "no such file"),
        (vec!["run", "--guest", "spin", "--vcpus", "x"], "--vcpus takes a number"),
        (vec!["run", "--guest", "spin", "--vcpus", "0"], "at least 1"),
        (vec!["run", "--guest", "spin", "--vcpus", "32"], "more than the guest ABI's 31"),
        (vec!["run", "--guest", "spin", "--memory", "2"], "at least 4 MiB"),
        (vec!["run", "--guest", "spin", "--introspect", "/tmp/x"], "unix:PATH"),
        (vec!["run", "--guest", "spin", "--bogus"], "unknown option `--bogus`"),
        (vec!["run", "--guest", "spin", "--allow-command", "KVMI_NOPE"], "unknown command"),
        (vec!["run", "--guest", "spin", "--uuid", "123"], "bad --uuid"),
        (vec!["frobnicate"], "unknown command"),
    ] {
        let (code, _, err) = ukvmi(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn power_off_sets_the_exit_status() {
    for (guest, status) in [("poweroff", 0), ("poweroff7", 7)] {
        let dir = Scratch::new(guest);
        let mut vm = RunningVm::start(&dir, &["--guest", guest]);
        let s = vm.wait_exit(Duration::from_secs(30));
        assert_eq!(s.code(), Some(status), "{guest}: {}", vm.stderr_text());
        assert!(vm.serial_text().contains("bye"), "{}", vm.serial_text());
    }
}

#[test]
fn an_unreachable_socket_does_not_stop_the_vm() {
    let dir = Scratch::new("unreach");
    let mut vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", "unix:/nonexistent/dir/kvmi.sock", "--reconnect", "0.2"]);
    vm.wait_serial("tick", 2, Duration::from_secs(20));
    vm.wait_stderr("cannot connect to the introspector", Duration::from_secs(10));
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(Duration::from_secs(20)).code(), Some(0));
}
