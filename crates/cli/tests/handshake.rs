//! The QEMU-style connection of `ukvmi run --introspect`: keys, restarts,
//! silent tools, absent tools, and shutdown by signal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{RunningVm, Scratch};
use std::io::Read;
use std::os::unix::net::UnixListener;
use std::time::Duration;
use ukvmi_introspector::wire::event;
use ukvmi_introspector::{Event, EventReply, Listener};

const T: Duration = Duration::from_secs(20);

#[test]
fn wrong_key_is_refused_and_the_vm_goes_on() {
    let dir = Scratch::new("key");
    let sock = dir.path("kvmi.sock");
    let bad = Listener::bind(&sock).unwrap().with_key(b"wrong");
    let intro = format!("unix:{}", sock.display());
    let key = dir.path("key");
    std::fs::write(&key, "right\n").unwrap();
    let key = key.to_str().unwrap();
    let vm =
        RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--key-file", key, "--reconnect", "0.2"]);
    let err = bad.accept().unwrap_err();
    assert!(err.to_string().contains("authentication"), "{err}");
    vm.wait_stderr("cookie hash does not match", T);
    vm.assert_guest_runs();
    drop(bad);
    // The right key is accepted on the next attempt.
    let good = Listener::bind(&sock).unwrap().with_key(b"right");
    let tool = good.accept().unwrap();
    assert_eq!(tool.vcpu_count().unwrap(), 1);
}

#[test]
fn a_restarted_tool_gets_a_fresh_session() {
    let dir = Scratch::new("restart");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let l = Listener::bind(&sock).unwrap();
    let vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--reconnect", "0.2"]);
    let tool = l.accept().unwrap();
    tool.control_vm_events(event::UNHOOK, true).unwrap();
    tool.pause_vcpu(0, true).unwrap();
    // The tool goes away holding vCPU 0 in its PAUSE event (detached: no
    // automatic CONTINUE).
    let Some(Event::Vcpu(ev)) = tool.next_event(Some(T)).unwrap() else { panic!("expected the PAUSE event") };
    let _held = ev.detach();
    drop(tool);
    drop(l);
    vm.assert_guest_runs();
    let l = Listener::bind(&sock).unwrap();
    let tool = l.accept().unwrap();
    tool.pause_vcpu(0, true).unwrap();
    let Some(Event::Vcpu(ev)) = tool.next_event(Some(T)).unwrap() else { panic!() };
    assert_eq!(ev.seq, 1);
    tool.reply(&ev, EventReply::Continue).unwrap();
}

#[test]
fn a_silent_tool_times_out_and_an_absent_one_is_retried() {
    let dir = Scratch::new("silent");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    // Nobody listens yet: the VM boots anyway.
    let vm = RunningVm::start(
        &dir,
        &["--guest", "spin", "--introspect", &intro, "--reconnect", "0.2", "--handshake-timeout", "0.5"],
    );
    vm.wait_serial("tick", 1, T);
    vm.wait_stderr("cannot connect", T);
    // A tool that accepts and never answers.
    let raw = UnixListener::bind(&sock).unwrap();
    let (mut c, _) = raw.accept().unwrap();
    let mut hello = [0u8; 104];
    c.read_exact(&mut hello).unwrap();
    assert_eq!(u32::from_le_bytes(hello[..4].try_into().unwrap()), 104);
    vm.wait_stderr("did not answer the handshake", T);
    vm.assert_guest_runs();
    drop(c);
    drop(raw);
    let _ = std::fs::remove_file(&sock);
    let l = Listener::bind(&sock).unwrap();
    let tool = l.accept().unwrap();
    assert_eq!(tool.vcpu_count().unwrap(), 1);
}

#[test]
fn sigterm_unhooks_the_tool_and_exits_cleanly() {
    let dir = Scratch::new("sigterm");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let l = Listener::bind(&sock).unwrap();
    let mut vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--unhook-timeout", "5"]);
    let tool = l.accept().unwrap();
    tool.control_vm_events(event::UNHOOK, true).unwrap();
    vm.wait_serial("tick", 1, T);
    vm.signal(libc::SIGTERM);
    match tool.next_event(Some(T)).unwrap() {
        Some(Event::Unhook { .. }) => {}
        other => panic!("expected UNHOOK, got {other:?}"),
    }
    tool.close();
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{}", vm.stderr_text());
    assert!(vm.stderr_text().contains("introspector closed after UNHOOK"), "{}", vm.stderr_text());
}

#[test]
fn a_tool_that_stops_reading_cannot_hang_shutdown() {
    use std::io::Write;
    let dir = Scratch::new("noread");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let raw = UnixListener::bind(&sock).unwrap();
    let mut vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--unhook-timeout", "1"]);
    let (mut s, _) = raw.accept().unwrap();
    // The handshake by hand: read the VMM's structure, answer with no cookie.
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut rest = vec![0u8; u32::from_le_bytes(size) as usize - 4];
    s.read_exact(&mut rest).unwrap();
    let mut reply = vec![0u8; 24];
    reply[..4].copy_from_slice(&24u32.to_le_bytes());
    s.write_all(&reply).unwrap();
    // Enable UNHOOK, then send commands and never read a reply, until the
    // VMM's writes back to us block.
    let enable = [event::UNHOOK.to_le_bytes()[0], event::UNHOOK.to_le_bytes()[1], 1, 0, 0, 0, 0, 0];
    s.write_all(
        &ukvmi_introspector::wire::frame(ukvmi_introspector::wire::msg::VM_CONTROL_EVENTS, 1, &[&enable]).unwrap(),
    )
    .unwrap();
    s.set_write_timeout(Some(Duration::from_millis(500))).unwrap();
    let get_version = ukvmi_introspector::wire::frame(ukvmi_introspector::wire::msg::GET_VERSION, 2, &[]).unwrap();
    let mut sent = 0;
    while s.write_all(&get_version).is_ok() {
        sent += 1;
        assert!(sent < 1_000_000, "the VMM never stopped reading");
    }
    vm.wait_serial("tick", 1, T);
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(0), "{}", vm.stderr_text());
    assert!(vm.stderr_text().contains("not reading its socket"), "{}", vm.stderr_text());
    drop(s);
}
