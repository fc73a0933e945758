//! The QEMU-style handshake between the VMM side (`ukvmi_endpoint::handshake`)
//! and the introspector library's `Listener`, then KVMI on the same socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_endpoint::handshake::{connect, cookie_hash, HandshakeError, VmIdentity};
use ukvmi_introspector::Listener;

/// `kvmi.sock` in a directory of its own, removed (socket and all) when the
/// test ends, passed or failed: a failing test unwinds through the drop.
struct Sock {
    dir: PathBuf,
    path: PathBuf,
}

impl std::ops::Deref for Sock {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Sock {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sock(name: &str) -> Sock {
    let dir = std::env::temp_dir().join(format!("ukvmi-hs-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Sock { path: dir.join("kvmi.sock"), dir }
}

fn id() -> VmIdentity {
    VmIdentity { uuid: *b"0123456789abcdef", name: "test-vm".into(), start_time: 1_700_000_000, max_gpa: 1 << 20 }
}

const T: Duration = Duration::from_secs(5);

#[test]
fn keyed_handshake_then_kvmi_on_the_same_socket() {
    let path = sock("ok");
    let listener = Listener::bind(&path).unwrap().with_key(b"s3cret");
    let s = Setup::new(&FakeConfig { vcpus: 2, ..Default::default() });
    std::thread::scope(|sc| {
        let vmm = sc.spawn(|| {
            let stream = connect(&path, &id(), Some(b"s3cret"), T).unwrap();
            s.endpoint.hook(stream).unwrap();
        });
        let vm = listener.accept().unwrap();
        vmm.join().unwrap();
        let info = vm.info();
        assert_eq!(info.uuid, *b"0123456789abcdef");
        assert_eq!(info.name, "test-vm");
        assert_eq!((info.start_time, info.max_gpa, info.handshake_size), (1_700_000_000, 1 << 20, 104));
        assert_eq!((info.version, info.max_msg_size, info.singlestep), (1, 8184, true));
        assert_eq!(vm.vcpu_count().unwrap(), 2);
    });
}

#[test]
fn wrong_key_closes_before_any_kvmi_message() {
    let path = sock("badkey");
    let listener = Listener::bind(&path).unwrap().with_key(b"wrong");
    std::thread::scope(|sc| {
        let vmm = sc.spawn(|| connect(&path, &id(), Some(b"right"), T));
        // The tool's GET_VERSION finds the connection closed.
        let err = listener.accept().unwrap_err();
        assert!(err.to_string().contains("authentication"), "{err}");
        assert!(matches!(vmm.join().unwrap(), Err(HandshakeError::BadCookie)));
    });
}

#[test]
fn without_a_key_any_cookie_is_accepted() {
    let path = sock("nokey");
    let listener = Listener::bind(&path).unwrap().with_key(b"whatever");
    std::thread::scope(|sc| {
        let vmm = sc.spawn(|| connect(&path, &id(), None, T).map(|_| ()));
        // Nobody serves KVMI on the VMM side here: the tool's GET_VERSION
        // fails, but the handshake itself succeeded.
        let _ = listener.accept();
        vmm.join().unwrap().unwrap();
    });
}

#[test]
fn absent_tool_is_a_clear_error() {
    let path = sock("absent");
    let _ = std::fs::remove_file(&path);
    let err = connect(&path, &id(), None, T).unwrap_err();
    assert!(matches!(err, HandshakeError::Connect { .. }));
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[test]
fn silent_tool_times_out() {
    let path = sock("silent");
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    std::thread::scope(|sc| {
        let tool = sc.spawn(|| {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = [0u8; 104];
            c.read_exact(&mut buf).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let t0 = std::time::Instant::now();
        let err = connect(&path, &id(), None, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout(_)), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        tool.join().unwrap();
    });
}

#[test]
fn short_and_long_replies() {
    for (size, ok) in [(20u32, false), (24, true), (40, true)] {
        let path = sock(&format!("size{size}"));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        std::thread::scope(|sc| {
            let tool = sc.spawn(|| {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 104];
                c.read_exact(&mut buf).unwrap();
                let mut reply = size.to_le_bytes().to_vec();
                reply.extend(cookie_hash(b"k"));
                reply.resize(size.max(24) as usize, 0xee);
                // KVMI bytes right behind the handshake must stay for KVMI.
                reply.extend_from_slice(b"KVMI");
                c.write_all(&reply).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            });
            let r = connect(&path, &id(), Some(b"k"), T);
            match (r, ok) {
                (Ok(mut s), true) => {
                    let mut next = [0u8; 4];
                    s.read_exact(&mut next).unwrap();
                    assert_eq!(&next, b"KVMI", "the handshake read exactly struct_size bytes");
                }
                (Err(HandshakeError::ShortReply(20)), false) => {}
                (other, _) => panic!("size {size}: {other:?}"),
            }
            tool.join().unwrap();
        });
    }
}

/// Fails on purpose after making its socket directory, to show that a
/// failing test cleans up too; run only by `the_tests_leave_nothing_in_tmpdir`.
#[test]
#[ignore = "fails on purpose; run by the_tests_leave_nothing_in_tmpdir"]
fn fails_after_binding() {
    let path = sock("fails");
    let _l = UnixListener::bind(&path).unwrap();
    panic!("failing on purpose with {} bound", path.display());
}

/// The other tests of this file, run again in a child process with a
/// private TMPDIR (the failing one as well), leave nothing in it.
#[test]
fn the_tests_leave_nothing_in_tmpdir() {
    let private = sock("tmpdir");
    let tmp = private.dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let me = std::env::current_exe().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(&me)
            .args(args)
            .args(["--skip", "the_tests_leave_nothing_in_tmpdir", "--test-threads", "2"])
            .env("TMPDIR", &tmp)
            .output()
            .unwrap()
    };
    let all = run(&[]);
    let text = String::from_utf8_lossy(&all.stdout);
    assert!(all.status.success() && !text.contains(" 0 passed"), "{text}{}", String::from_utf8_lossy(&all.stderr));
    let failing = run(&["--ignored", "--exact", "fails_after_binding"]);
    let text = String::from_utf8_lossy(&failing.stdout);
    assert!(!failing.status.success() && text.contains("1 failed"), "{text}");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
