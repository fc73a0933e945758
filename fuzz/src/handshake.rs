//! `handshake`: both readers of the QEMU ⇄ introspector handshake, on a
//! socket pair whose peer has written the input and closed its end.
//!
//! ```text
//! input = [flags] [stream ...]     flags bit 0: a key on the reading side
//! ```
//!
//! * VMM side (`ukvmi_endpoint::handshake::handshake`, what `connect()`
//!   runs): reads `qemu_vmi_from_introspector`. Its result is compared with
//!   a model of the rule (a 4-byte size ≥ 24, that many bytes, the SHA-1 of
//!   the key), the 104 bytes it sent are checked, and on success every byte
//!   after the announced size must still be in the socket, unread (it is
//!   KVMI, for the endpoint).
//! * Tool side (`ukvmi_introspector::Handshake::run`, what `Listener::accept`
//!   runs): reads `qemu_vmi_to_introspector` (32..=65536 bytes announced),
//!   answers 24 bytes, then sends KVMI_GET_VERSION and reads the reply from
//!   the rest of the stream. On success the VM's identity must be what the
//!   structure said; a structure the model rejects must fail.
//!
//! Both with a 1 s timeout; the peer has closed, so nothing may wait for it.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use ukvmi_endpoint::handshake::{cookie_hash, handshake, HandshakeError, VmIdentity};
use ukvmi_wire::handshake::{
    FromIntrospector, ToIntrospector, FROM_INTROSPECTOR_MIN, TO_INTROSPECTOR_MAX, TO_INTROSPECTOR_MIN,
};
use ukvmi_wire::{read_zext, tail};

/// The shared secret when flags bit 0 is set.
pub const KEY: &[u8] = b"fuzz-secret";
const TIMEOUT: Duration = Duration::from_secs(1);
/// A VMM may refuse a reply announcing more than this without reading it.
const LONG_REPLY: u32 = 64 * 1024;

/// A socket pair whose far end has sent `stream` and closed for writing.
fn peer_sent(stream: &[u8]) -> (UnixStream, UnixStream) {
    let (near, far) = UnixStream::pair().expect("socket pair");
    // A UNIX socket buffers far more than the largest input (-max_len).
    far.set_nonblocking(true).expect("non-blocking");
    let mut written = 0;
    while written < stream.len() {
        match (&far).write(tail(stream, written)) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("the test socket took only {written} of {} bytes: {e}", stream.len()),
        }
    }
    far.shutdown(Shutdown::Write).expect("shutdown");
    (near, far)
}

/// Everything readable on `s` right now (it must not block: the writer closed).
fn read_rest(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).expect("non-blocking");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    out
}

fn vmm_side(key: Option<&[u8]>, stream: &[u8]) {
    let id = VmIdentity { uuid: [7; 16], name: "fuzz-vm".into(), start_time: 1_700_000_000, max_gpa: 1 << 30 };
    let (near, mut far) = peer_sent(stream);
    let res = handshake(near, &id, key, TIMEOUT);

    // What it sent: qemu_vmi_to_introspector, 104 bytes.
    let sent = read_rest(&mut far);
    assert_eq!(sent.len(), core::mem::size_of::<ToIntrospector>(), "the VMM sent {} handshake bytes", sent.len());
    let to: ToIntrospector = read_zext(&sent);
    assert_eq!(to, ToIntrospector::new(id.uuid, id.start_time, &id.name, id.max_gpa));

    // The model: size (4 bytes LE) >= 24, then size - 4 more bytes.
    let size = stream.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let whole = size.filter(|&s| s >= FROM_INTROSPECTOR_MIN).filter(|&s| stream.len() as u64 >= u64::from(s));
    let reply: FromIntrospector = read_zext(stream);
    let key_ok = key.is_none_or(|k| reply.cookie_hash == cookie_hash(k));
    match (&res, size, whole) {
        (Ok(_), _, Some(_)) if key_ok => {}
        (Err(HandshakeError::ShortReply(n)), Some(s), _) if s < FROM_INTROSPECTOR_MIN => assert_eq!(*n, s),
        (Err(HandshakeError::BadCookie), _, Some(_)) if !key_ok => {}
        // Closed before the 4-byte size: the tool hung up without answering.
        (Err(HandshakeError::ClosedUnanswered), None, _) => {}
        (Err(HandshakeError::Io(e)), Some(_), None) if e.kind() == ErrorKind::UnexpectedEof => {}
        // A size over 64 KiB may also be refused up front (libkvmi's bound).
        (Err(_), Some(s), _) if s > LONG_REPLY => {}
        _ => panic!("VMM handshake on {} bytes (size {size:?}, key {}): {res:?}", stream.len(), key.is_some()),
    }
    // After a success the rest of the stream is KVMI, still unread.
    if let (Ok(mut s), Some(n)) = (res, whole) {
        let rest = read_rest(&mut s);
        assert_eq!(rest.as_slice(), tail(stream, n as usize), "the handshake consumed KVMI bytes");
    }
}

fn tool_side(key: Option<&[u8]>, stream: &[u8]) {
    let mut hs = ukvmi_introspector::Handshake::new().with_timeout(TIMEOUT).with_reply_timeout(TIMEOUT);
    if let Some(k) = key {
        hs = hs.with_key(k);
    }
    let (near, mut far) = peer_sent(stream);
    let res = hs.run(near);
    let size = stream.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let acceptable = size
        .filter(|s| (TO_INTROSPECTOR_MIN..=TO_INTROSPECTOR_MAX).contains(s))
        .filter(|&s| stream.len() as u64 >= u64::from(s));
    match (&res, acceptable) {
        (Ok(vm), Some(s)) => {
            let to: ToIntrospector = read_zext(stream.get(..(s as usize).min(104)).unwrap_or_default());
            let info = vm.info();
            assert_eq!(info.uuid, to.uuid);
            assert_eq!(info.name, to.name_str());
            assert_eq!(info.start_time, to.start_time);
            assert_eq!(info.max_gpa, to.max_gpa);
            assert_eq!(info.handshake_size, s);
        }
        (Ok(_), None) => panic!("the tool accepted a handshake of {} bytes announcing {size:?}", stream.len()),
        (Err(_), _) => {}
    }
    drop(res);
    // Whenever the structure was whole, the tool answered with 24 bytes
    // carrying the key's hash, before anything else.
    let back = read_rest(&mut far);
    if acceptable.is_some() {
        assert!(back.len() >= core::mem::size_of::<FromIntrospector>(), "the tool answered {} bytes", back.len());
        let r: FromIntrospector = read_zext(&back);
        let want = key.map_or([0; 20], cookie_hash);
        assert_eq!(r, FromIntrospector::new(want));
    } else {
        assert!(back.is_empty(), "the tool answered a handshake it rejected ({} bytes)", back.len());
    }
}

/// The whole check, for one input.
pub fn check(data: &[u8]) {
    crate::init_process();
    let _watch = crate::Watch::start();
    let flags = data.first().copied().unwrap_or(0);
    let stream = tail(data, 1);
    let key = (flags & 1 != 0).then_some(KEY);
    vmm_side(key, stream);
    tool_side(key, stream);
}
