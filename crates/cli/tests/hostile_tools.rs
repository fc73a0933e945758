//! `ukvmi run` against hostile or broken tools and surroundings (issue 11):
//! the key never on the command line, a listener run by another user,
//! tools that never accept, never answer or trickle their handshake, a
//! closed stderr, and options that would wrap, spin or always fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

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
    refused(
        &["--guest", "spin", "--memory", "17592186044420"],
        "--memory takes a size in MiB, at least 4 MiB and at most",
    );
    refused(&["--guest", "spin", "--memory", "2"], "--memory takes a size in MiB, at least 4 MiB and at most");
    refused(
        &["--guest", "spin", "--introspect", "unix:/nonexistent/s", "--reconnect", "0"],
        "--reconnect must be at least",
    );
    refused(
        &["--guest", "spin", "--introspect", "unix:/nonexistent/s", "--handshake-timeout", "0"],
        "--handshake-timeout must be more than 0",
    );
    // The secret is never taken from the command line.
    refused(
        &["--guest", "spin", "--introspect", "unix:/nonexistent/s", "--key", "s3cret"],
        "use --key-file PATH or the UKVMI_KEY",
    );
}

#[test]
fn the_key_comes_from_the_environment_and_never_shows_in_the_process_arguments() {
    let dir = Scratch::new("key-env");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let stderr = dir.path("stderr.log");
    let child = ukvmi()
        .args(["run", "--guest", "spin", "--introspect", &intro, "--reconnect", "0.2", "--serial", "file:/dev/null"])
        .env("UKVMI_KEY", "from-env")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let child = Guard(child);
    // A tool that does not know the key is refused by the VMM...
    let wrong = Listener::bind(&sock).unwrap().with_key(b"not-it");
    assert!(wrong.accept().is_err());
    wait_for_text(&stderr, "cookie hash does not match");
    drop(wrong);
    // ...and one that does is served.
    let right = Listener::bind(&sock).unwrap().with_key(b"from-env");
    let tool = right.accept().unwrap();
    assert_eq!(tool.vcpu_count().unwrap(), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.0.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("from-env"));
}

/// Kills the child on drop.
struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    for (announce, needle) in
        [(u32::MAX, "claims 4294967295 bytes"), (65_536, "did not answer the handshake within 1s")]
    {
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
    // In a thread: with the connection thread gone, nobody would ever come.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(l.accept().map(|tool| tool.vcpu_count()));
    });
    match rx.recv_timeout(T) {
        Ok(Ok(Ok(n))) => assert_eq!(n, 1),
        other => panic!("no introspection after stderr closed: {other:?}"),
    }
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

/// A tool speaking raw KVMI on the socket the VMM connected to.
struct RawTool {
    s: UnixStream,
    seq: u32,
}

impl RawTool {
    /// Accepts the VMM on `l` and answers its handshake (no key).
    fn accept(l: &UnixListener) -> RawTool {
        let (mut s, _) = l.accept().unwrap();
        let mut hello = [0u8; 104];
        s.read_exact(&mut hello).unwrap();
        let mut reply = [0u8; 24];
        reply[..4].copy_from_slice(&24u32.to_le_bytes());
        s.write_all(&reply).unwrap();
        RawTool { s, seq: 1000 }
    }

    fn frame(&mut self, id: u16, body: &[u8]) -> (u32, Vec<u8>) {
        self.seq += 1;
        (self.seq, ukvmi_introspector::wire::frame(id, self.seq, &[body]).unwrap())
    }

    fn send(&mut self, id: u16, body: &[u8]) -> u32 {
        let (seq, bytes) = self.frame(id, body);
        self.s.write_all(&bytes).unwrap();
        seq
    }

    /// The next message: (id, seq, body), or None at the timeout.
    fn recv(&mut self, timeout: Duration) -> Option<(u16, u32, Vec<u8>)> {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let mut h = [0u8; 8];
        self.s.read_exact(&mut h).ok()?;
        let size = usize::from(u16::from_le_bytes([h[2], h[3]]));
        let mut body = vec![0u8; size];
        self.s.read_exact(&mut body).ok()?;
        Some((u16::from_le_bytes([h[0], h[1]]), u32::from_le_bytes(h[4..8].try_into().unwrap()), body))
    }

    /// The reply to `seq`'s error code.
    fn err_of(&mut self, seq: u32) -> i32 {
        loop {
            let (_, s, body) = self.recv(T).expect("no reply");
            if s == seq {
                return i32::from_le_bytes(body[..4].try_into().unwrap());
            }
        }
    }
}

fn vcpu_body(vcpu: u16, args: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b[..2].copy_from_slice(&vcpu.to_le_bytes());
    b.extend_from_slice(args);
    b
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn reconnects_leak_no_descriptors_while_a_vcpu_was_never_started() {
    let dir = Scratch::new("fdleak");
    // hlt; jmp back: vCPU 1 is never started.
    let kernel = dir.path("halt.bin");
    std::fs::write(&kernel, [0xf4, 0xeb, 0xfd]).unwrap();
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let l = UnixListener::bind(&sock).unwrap();
    let vm = RunningVm::start(
        &dir,
        &["--kernel", kernel.to_str().unwrap(), "--vcpus", "2", "--introspect", &intro, "--reconnect", "0.01"],
    );
    let pid = vm.child.id();
    let cycle = |n: usize| {
        for _ in 0..n {
            let mut t = RawTool::accept(&l);
            // A whole session: a command answered, then the tool leaves.
            let seq = t.send(ukvmi_introspector::wire::msg::GET_VERSION, &[]);
            assert_eq!(t.err_of(seq), 0);
        }
    };
    cycle(5);
    let before = fd_count(pid);
    cycle(200);
    // The last session may still be in flight.
    let t0 = Instant::now();
    while fd_count(pid) > before + 2 && t0.elapsed() < T {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = fd_count(pid);
    assert!(after <= before + 2, "{before} descriptors before 200 reconnects, {after} after");
    vm.wait_stderr("introspector disconnected", T);
}

#[test]
fn a_tool_that_never_reads_its_replies_cannot_grow_the_vmm() {
    let dir = Scratch::new("noread-jobs");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let l = UnixListener::bind(&sock).unwrap();
    let vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--reconnect", "5"]);
    let mut t = RawTool::accept(&l);
    vm.wait_serial("tick", 1, T);
    let rss0 = rss_kib(vm.child.id());
    // GET_REGISTERS for vCPU 0, never reading a reply, up to 128 MiB.
    let get_regs = vcpu_body(0, &[0u8; 8]);
    let (_, one) = t.frame(ukvmi_introspector::wire::msg::VCPU_GET_REGISTERS, &get_regs);
    let chunk: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
    t.s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sent = 0usize;
    while sent < 128 << 20 {
        match t.s.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    vm.wait_stderr("got through none of them for 5 s", T);
    let rss1 = rss_kib(vm.child.id());
    assert!(rss1 < rss0 + 16 * 1024, "RSS {rss0} KiB -> {rss1} KiB after {sent} bytes of unread commands");
    vm.assert_guest_runs();
}

#[test]
fn batched_read_replies_go_out_before_a_body_that_never_comes() {
    let dir = Scratch::new("flush");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let l = UnixListener::bind(&sock).unwrap();
    let vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--reconnect", "5"]);
    let mut t = RawTool::accept(&l);
    // READ_PHYSICAL of 8 bytes at 1 MiB, then the header of a 10-byte
    // message whose body is never sent, in one write.
    let mut read = vec![0u8; 16];
    read[..8].copy_from_slice(&0x10_0000u64.to_le_bytes());
    read[8..10].copy_from_slice(&8u16.to_le_bytes());
    let (seq, mut bytes) = t.frame(ukvmi_introspector::wire::msg::VM_READ_PHYSICAL, &read);
    bytes.extend_from_slice(&ukvmi_introspector::wire::msg::GET_VERSION.to_le_bytes());
    bytes.extend_from_slice(&10u16.to_le_bytes());
    bytes.extend_from_slice(&7u32.to_le_bytes());
    t.s.write_all(&bytes).unwrap();
    let (id, s, body) = t.recv(Duration::from_secs(2)).expect("the READ_PHYSICAL reply was held back");
    assert_eq!((id, s), (ukvmi_introspector::wire::msg::VM_READ_PHYSICAL, seq));
    let spin = ukvmi_guests::find("spin").unwrap();
    assert_eq!(&body[8..], &spin.image[..8]);
    vm.assert_guest_runs();
}

#[test]
fn inject_exception_refuses_what_is_not_an_exception() {
    let dir = Scratch::new("inject");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let l = UnixListener::bind(&sock).unwrap();
    let vm = RunningVm::start(&dir, &["--guest", "traps", "--introspect", &intro, "--reconnect", "5"]);
    let mut t = RawTool::accept(&l);
    vm.wait_serial("tick", 1, T);
    let trap = ukvmi_introspector::wire::event::TRAP;
    let mut ctl = vec![0u8; 8];
    ctl[..2].copy_from_slice(&trap.to_le_bytes());
    ctl[2] = 1;
    let seq = t.send(ukvmi_introspector::wire::msg::VCPU_CONTROL_EVENTS, &vcpu_body(0, &ctl));
    assert_eq!(t.err_of(seq), 0);
    for nr in [2u8, 15, 32, 255] {
        let mut inj = vec![0u8; 16];
        inj[0] = nr;
        let seq = t.send(ukvmi_introspector::wire::msg::VCPU_INJECT_EXCEPTION, &vcpu_body(0, &inj));
        assert_eq!(t.err_of(seq), -22, "vector {nr}");
    }
    // A real exception is injected and reported.
    let mut inj = vec![0u8; 16];
    inj[0] = 6;
    let seq = t.send(ukvmi_introspector::wire::msg::VCPU_INJECT_EXCEPTION, &vcpu_body(0, &inj));
    assert_eq!(t.err_of(seq), 0);
    let (id, _, body) = t.recv(T).expect("no TRAP event");
    assert_eq!(id, ukvmi_introspector::wire::msg::VCPU_EVENT);
    assert_eq!(u16::from_le_bytes([body[0], body[1]]), trap);
    assert_eq!(body[8 + 544], 6, "the TRAP event's vector");
    drop(t);
    vm.assert_guest_runs();
}
