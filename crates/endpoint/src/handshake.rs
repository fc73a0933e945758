//! The device manager's side of the QEMU ⇄ introspector handshake
//! (`handshake.md`): connect to the tool, send `qemu_vmi_to_introspector`,
//! read and check `qemu_vmi_from_introspector`. On success the same socket
//! carries KVMI: hand it to [`crate::Endpoint::hook`].

use sha1::{Digest, Sha1};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use ukvmi_wire::handshake::{FromIntrospector, ToIntrospector, FROM_INTROSPECTOR_MIN};
use ukvmi_wire::IntoBytes;

/// Why the handshake failed. The VM keeps running either way.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Nobody listens at the path (yet).
    #[error("cannot connect to the introspector at {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The tool did not answer within the timeout.
    #[error("the introspector did not answer the handshake within {0:?}")]
    Timeout(Duration),
    /// Reading or writing the socket failed (the tool went away).
    #[error("handshake I/O failed: {0}")]
    Io(#[source] std::io::Error),
    /// The reply's `struct_size` is below 24.
    #[error("the introspector's handshake reply is too short ({0} bytes, need 24)")]
    ShortReply(u32),
    /// The cookie hash is not SHA-1 of our key.
    #[error("the introspector's cookie hash does not match the key (wrong or missing --key on the tool side)")]
    BadCookie,
}

/// What the device manager tells the tool about the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmIdentity {
    /// VM UUID.
    pub uuid: [u8; 16],
    /// VM name (truncated to 63 bytes on the wire).
    pub name: String,
    /// Start time, host clock, seconds.
    pub start_time: i64,
    /// End of the highest guest RAM range.
    pub max_gpa: u64,
}

/// SHA-1 of a shared secret, as the tool must send it.
pub fn cookie_hash(secret: &[u8]) -> [u8; 20] {
    Sha1::digest(secret).into()
}

/// Connects to the tool listening at `path` and runs the handshake. With
/// `key`, the tool must prove it knows the secret. Returns the socket, ready
/// for KVMI.
pub fn connect(path: &Path, id: &VmIdentity, key: Option<&[u8]>, timeout: Duration) -> Result<UnixStream, HandshakeError> {
    let stream = UnixStream::connect(path)
        .map_err(|source| HandshakeError::Connect { path: path.display().to_string(), source })?;
    handshake(stream, id, key, timeout)
}

/// Runs the handshake on a connected socket.
pub fn handshake(mut s: UnixStream, id: &VmIdentity, key: Option<&[u8]>, timeout: Duration) -> Result<UnixStream, HandshakeError> {
    let timed = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => HandshakeError::Timeout(timeout),
        _ => HandshakeError::Io(e),
    };
    s.set_read_timeout(Some(timeout)).map_err(HandshakeError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(HandshakeError::Io)?;
    let ours = ToIntrospector::new(id.uuid, id.start_time, &id.name, id.max_gpa);
    s.write_all(ours.as_bytes()).map_err(timed)?;
    let mut size = [0u8; 4];
    s.read_exact(&mut size).map_err(timed)?;
    let struct_size = u32::from_le_bytes(size);
    if struct_size < FROM_INTROSPECTOR_MIN {
        return Err(HandshakeError::ShortReply(struct_size));
    }
    // Read exactly what was announced (anything after it is KVMI and stays
    // in the socket for the endpoint), keeping only the part we know.
    let mut hash = [0u8; 20];
    s.read_exact(&mut hash).map_err(timed)?;
    let reply = FromIntrospector { struct_size, cookie_hash: hash };
    let extra = u64::from(struct_size) - core::mem::size_of::<FromIntrospector>() as u64;
    let skipped = std::io::copy(&mut (&mut s).take(extra), &mut std::io::sink()).map_err(timed)?;
    if skipped != extra {
        return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if let Some(k) = key {
        if reply.cookie_hash != cookie_hash(k) {
            return Err(HandshakeError::BadCookie);
        }
    }
    s.set_read_timeout(None).map_err(HandshakeError::Io)?;
    s.set_write_timeout(None).map_err(HandshakeError::Io)?;
    Ok(s)
}
