//! `ukvmi run` against hostile or broken tools and surroundings (issue 11):
//! the key never on the command line, a listener run by another user,
//! tools that never accept, never answer or trickle their handshake, a
//! closed stderr, and options that would wrap, spin or always fail.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{RunningVm, Scratch};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ukvmi_introspector::Listener;

const T: Duration = Duration::from_secs(20);

fn ukvmi() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ukvmi"))
}

/// `ukvmi run ARGS` fails at once with status 1 and `needle` on stderr.
fn refused(args: &[&str], needle: &str) {
    let out = ukvmi().arg("run").args(args).stdin(Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: expected {needle:?} in:\n{err}");
}

#[test]
fn options_that_would_wrap_spin_or_always_fail_are_refused() {
    // 2^44 + 4 MiB: `<< 20` wrapped this to a 4 MiB VM.
    refused(&["--guest", "spin", "--memory", "17592186044420"], "--memory takes a size in MiB, at least 4 MiB and at most");
    refused(&["--guest", "spin", "--memory", "2"], "--memory takes a size in MiB, at least 4 MiB and at most");
    refused(&["--guest", "spin", "--introspect", "unix:/nonexistent/s", "--reconnect", "0"], "--reconnect must be at least");
    refused(&["--guest", "spin", "--introspect", "unix:/nonexistent/s", "--handshake-timeout", "0"], "--handshake-timeout must be more than 0");
    // The secret is never taken from the command line.
    refused(&["--guest", "spin", "--introspect", "unix:/nonexistent/s", "--key", "s3cret"], "use --key-file PATH or the UKVMI_KEY");
}

#[test]
fn the_key_comes_from_the_environment_and_never_shows_in_the_process_arguments() {
    let dir = Scratch::new("key-env");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let listener = Listener::bind(&sock).unwrap().with_key(b"from-env");
    let child = ukvmi()
        .args(["run", "--guest", "spin", "--introspect", &intro, "--reconnect", "0.2", "--serial", "file:/dev/null"])
        .env("UKVMI_KEY", "from-env")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = scopeguard(child);
    let tool = listener.accept().unwrap();
    assert_eq!(tool.get_info().unwrap(), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.0.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("from-env"));
    drop(tool);
    let _ = child.0.kill();
}

/// Kills the child on drop.
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn scopeguard(c: std::process::Child) -> Guard {
    Guard(c)
}

/// A listener run by uid 65534 (nobody): it accepts one connection, reports
/// how many handshake bytes the VMM sent, and exits.
fn listener_as_nobody(sock: &Path) -> Guard {
    let script = r#"
        use IO::Socket::UNIX; $| = 1;
        my $l = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $ARGV[0], Listen => 1) or die "bind: $!";
        print "listening\n";
        my $c = $l->accept() or die "accept: $!";
        $c->blocking(1);
        my $buf = ''; my $got = 0;
        local $SIG{ALRM} = sub { print "got $got\n"; exit 0 };
        alarm 2;
        while (1) { my $n = sysread($c, $buf, 104 - $got, $got); last if !$n; $got += $n; last if $got >= 104; }
        alarm 0;
        print "got $got\n";
    "#;
    let out = sock.with_extension("out");
    let child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "perl", "-e", script])
        .arg(sock)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let g = Guard(child);
    let t0 = Instant::now();
    while !std::fs::read_to_string(&out).unwrap_or_default().contains("listening") {
        assert!(t0.elapsed() < T, "the listener run as nobody did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    g
}

fn wait_for_text(path: &Path, needle: &str) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(t0.elapsed() < T, "{} never showed {needle:?}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_listener_run_by_another_user_is_refused_before_it_learns_anything() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test runs a listener as another user (nobody) and needs root, as CI has");
    }
    let dir = Scratch::new("peercred");
    // Let nobody create its socket here.
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let _nobody = listener_as_nobody(&sock);
    let vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--reconnect", "0.2"]);
    vm.wait_stderr("runs as uid 65534, which may not introspect this VM", T);
    // The VMM hung up before sending its handshake (the VM's name, uuid, size).
    let said = wait_for_text(&sock.with_extension("out"), "got ");
    assert!(said.contains("got 0"), "the VMM told a stranger about the VM: {said}");
    vm.wait_stderr("writable by every user", T);
    vm.assert_guest_runs();
    drop(vm);

    // Allowed by name, the same listener gets the handshake.
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(sock.with_extension("out"));
    let _nobody = listener_as_nobody(&sock);
    let vm = RunningVm::start(
        &dir,
        &["--guest", "spin", "--introspect", &intro, "--reconnect", "0.2", "--introspector-uid", "65534"],
    );
    let said = wait_for_text(&sock.with_extension("out"), "got ");
    assert!(said.contains("got 104"), "{said}");
    vm.assert_guest_runs();
}

/// A listening socket with the smallest backlog that never accepts: once
/// its backlog is full, a blocking `connect` waits for ever.
fn never_accepting(sock: &Path) -> OwnedFd {
    let l = UnixListener::bind(sock).unwrap();
    // SAFETY: listen(2) on the socket we own, to shrink its backlog.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // Fill the backlog ourselves, with non-blocking connects (a blocking
    // one would wait here for ever, which is the point).
    let mut fillers = Vec::new();
    while let Some(fd) = nonblocking_connect(sock) {
        fillers.push(fd);
        assert!(fillers.len() < 64, "the backlog never filled");
    }
    std::mem::forget(fillers);
    // SAFETY: into_raw_fd hands us sole ownership of the descriptor.
    unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(l)) }
}

/// A non-blocking connect to `sock`; `None` once the backlog is full.
fn nonblocking_connect(sock: &Path) -> Option<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: socket(2) with constant arguments; checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; zeroes are valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(sock.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: a valid address of `len` bytes, our socket.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    (r == 0).then_some(fd)
}

#[test]
fn sigterm_is_not_held_up_by_a_tool_that_never_accepts_or_never_answers() {
    for tool in ["never accepts", "never answers"] {
        let dir = Scratch::new("stuck");
        let sock = dir.path("kvmi.sock");
        let intro = format!("unix:{}", sock.display());
        let _hold: Box<dyn std::any::Any> = if tool == "never accepts" {
            Box::new(never_accepting(&sock))
        } else {
            let l = UnixListener::bind(&sock).unwrap();
            let t = std::thread::spawn(move || {
                let (c, _) = l.accept().unwrap();
                std::thread::sleep(Duration::from_secs(60));
                drop(c);
            });
            Box::new(t)
        };
        let mut vm = RunningVm::start(
            &dir,
            &["--guest", "spin", "--introspect", &intro, "--reconnect", "0.2", "--handshake-timeout", "600"],
        );
        vm.wait_serial("tick", 2, T);
        let t0 = Instant::now();
        vm.signal(libc::SIGTERM);
        let st = vm.wait_exit(T);
        assert_eq!(st.code(), Some(0), "{tool}: {}", vm.stderr_text());
        // A bound for a hang, far below the 600 s the handshake could take.
        assert!(t0.elapsed() < Duration::from_secs(10), "{tool}: SIGTERM took {:?}", t0.elapsed());
    }
}

#[test]
fn a_trickled_or_oversized_handshake_ends_at_the_deadline() {
    for (announce, needle) in [(u32::MAX, "claims 4294967295 bytes"), (65_536, "did not answer the handshake within 1s")] {
        let dir = Scratch::new("trickle");
        let sock = dir.path("kvmi.sock");
        let intro = format!("unix:{}", sock.display());
        let l = UnixListener::bind(&sock).unwrap();
        let tool = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut hello = [0u8; 104];
            c.read_exact(&mut hello).unwrap();
            c.write_all(&announce.to_le_bytes()).unwrap();
            // One byte every 50 ms, for 10 s at most, until the VMM hangs up.
            for _ in 0..200 {
                if c.write_all(&[0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let vm = RunningVm::start(
            &dir,
            &["--guest", "spin", "--introspect", &intro, "--reconnect", "5", "--handshake-timeout", "1"],
        );
        vm.wait_stderr(needle, T);
        vm.assert_guest_runs();
        tool.join().unwrap();
    }
}

#[test]
fn a_closed_stderr_neither_ends_introspection_nor_the_signal_thread() {
    let dir = Scratch::new("epipe");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let serial = dir.path("serial.log");
    let mut child = ukvmi()
        .args(["run", "--guest", "spin", "--introspect", &intro, "--reconnect", "0.1"])
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader leaves at once, as `| grep -m1 boot` does: every later
    // write to stderr fails with EPIPE.
    drop(child.stderr.take());
    let mut child = Guard(child);
    wait_for_text(&serial, "tick");
    // Let the connection thread log "cannot connect" a few times into the
    // broken pipe, then listen: the thread must still be there.
    std::thread::sleep(Duration::from_millis(500));
    let l = Listener::bind(&sock).unwrap();
    let tool = l.accept().unwrap();
    assert_eq!(tool.get_info().unwrap(), 1);
    drop(tool);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < T, "SIGTERM did not stop the VM with a closed stderr");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));
}
