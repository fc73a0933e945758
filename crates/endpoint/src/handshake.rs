//! The device manager's side of the QEMU ⇄ introspector handshake
//! (`handshake.md`): connect to the tool, send `qemu_vmi_to_introspector`,
//! read and check `qemu_vmi_from_introspector`. On success the same socket
//! carries KVMI: hand it to [`crate::Endpoint::hook`].

use sha1::{Digest, Sha1};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use thiserror::Error;
use ukvmi_wire::handshake::{FromIntrospector, ToIntrospector, FROM_INTROSPECTOR_MIN};
use ukvmi_wire::IntoBytes;

/// Why the handshake failed. The VM keeps running either way.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Nobody listens at the path (yet).
    #[error("cannot connect to the introspector at {path}: {source}")]
    Connect {
        /// The socket path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Connecting and the handshake did not finish within the timeout.
    #[error("the introspector did not answer the handshake within {0:?} (connecting included)")]
    Timeout(Duration),
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Cancelled,
    /// The listening tool runs as a user that is not allowed.
    #[error(
        "the process listening at the socket (pid {pid}) runs as uid {uid}, which may not introspect this VM \
         (allowed: this VMM's uid and root, or --introspector-uid)"
    )]
    PeerNotAllowed {
        /// Its uid.
        uid: u32,
        /// Its pid.
        pid: i32,
    },
    /// The reply's `struct_size` is implausibly large.
    #[error("the introspector's handshake reply claims {0} bytes (at most 65536)")]
    LongReply(u32),
    /// The tool accepted the connection and closed it without answering:
    /// a ukvmi daemon does so when it already serves another VM or does not
    /// serve this VMM's user.
    #[error(
        "the introspector closed the connection before answering the handshake (it may already serve \
         another VM or refuse this VMM's user: see the tool's log, e.g. PATH.log of `ukvmi`'s daemon)"
    )]
    ClosedUnanswered,
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

/// How the device manager connects ([`connect_with`]).
#[derive(Clone, Copy)]
pub struct ConnectOptions<'a> {
    /// The tool must prove it knows this secret (SHA-1 cookie).
    pub key: Option<&'a [u8]>,
    /// Connecting and the whole handshake must be done within this.
    pub timeout: Duration,
    /// User ids the listening tool may run as (checked with `SO_PEERCRED`);
    /// empty: this process's effective uid and root.
    pub allowed_uids: &'a [u32],
    /// Polled at least every 50 ms while waiting: true gives up at once
    /// (the VM is stopping).
    pub cancel: &'a (dyn Fn() -> bool + Sync),
}

impl std::fmt::Debug for ConnectOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("key", &self.key.map(|_| "<secret>"))
            .field("timeout", &self.timeout)
            .field("allowed_uids", &self.allowed_uids)
            .finish_non_exhaustive()
    }
}

/// Connects to the tool listening at `path` and runs the handshake. With
/// `key`, the tool must prove it knows the secret. Returns the socket, ready
/// for KVMI. The listener must run as this process's uid or root; the whole
/// exchange must be done within `timeout`. See [`connect_with`].
pub fn connect(
    path: &Path,
    id: &VmIdentity,
    key: Option<&[u8]>,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    connect_with(path, id, &ConnectOptions { key, timeout, allowed_uids: &[], cancel: &|| false })
}

/// Connects to the tool listening at `path`, checks who it is, and runs
/// the handshake, all within `opts.timeout` and giving up as soon as
/// `opts.cancel` says so. A tool that listens but never accepts (a full
/// backlog makes `connect` block), one that never answers, and one that
/// trickles a huge reply byte by byte all end at the deadline.
pub fn connect_with(path: &Path, id: &VmIdentity, opts: &ConnectOptions<'_>) -> Result<UnixStream, HandshakeError> {
    let dl = Deadline { at: Instant::now() + opts.timeout, timeout: opts.timeout, cancel: opts.cancel };
    let s = connect_nonblocking(path, &dl)?;
    check_peer(&s, opts.allowed_uids)?;
    exchange(s, id, opts.key, &dl)
}

/// Runs the handshake on a connected socket (blocking or not), within
/// `timeout` as a whole.
pub fn handshake(
    s: UnixStream,
    id: &VmIdentity,
    key: Option<&[u8]>,
    timeout: Duration,
) -> Result<UnixStream, HandshakeError> {
    let dl = Deadline { at: Instant::now() + timeout, timeout, cancel: &|| false };
    exchange(s, id, key, &dl)
}

/// Replies claiming more than this are refused (libkvmi refuses the same on
/// its side).
pub const MAX_REPLY_SIZE: u32 = 64 * 1024;

fn exchange(
    mut s: UnixStream,
    id: &VmIdentity,
    key: Option<&[u8]>,
    dl: &Deadline<'_>,
) -> Result<UnixStream, HandshakeError> {
    s.set_nonblocking(true).map_err(HandshakeError::Io)?;
    let ours = ToIntrospector::new(id.uuid, id.start_time, &id.name, id.max_gpa);
    write_all(&mut s, ours.as_bytes(), dl)?;
    let mut size = [0u8; 4];
    read_exact(&mut s, &mut size, dl).map_err(|e| match e {
        HandshakeError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => HandshakeError::ClosedUnanswered,
        e => e,
    })?;
    let struct_size = u32::from_le_bytes(size);
    if struct_size < FROM_INTROSPECTOR_MIN {
        return Err(HandshakeError::ShortReply(struct_size));
    }
    if struct_size > MAX_REPLY_SIZE {
        return Err(HandshakeError::LongReply(struct_size));
    }
    // Read exactly what was announced (anything after it is KVMI and stays
    // in the socket for the endpoint), keeping only the part we know.
    let mut hash = [0u8; 20];
    read_exact(&mut s, &mut hash, dl)?;
    let reply = FromIntrospector { struct_size, cookie_hash: hash };
    let mut extra = (struct_size as usize).saturating_sub(core::mem::size_of::<FromIntrospector>());
    let mut sink = [0u8; 512];
    while extra > 0 {
        let n = extra.min(sink.len());
        read_exact(&mut s, sink.get_mut(..n).unwrap_or_default(), dl)?;
        extra -= n;
    }
    if let Some(k) = key {
        if reply.cookie_hash != cookie_hash(k) {
            return Err(HandshakeError::BadCookie);
        }
    }
    s.set_nonblocking(false).map_err(HandshakeError::Io)?;
    Ok(s)
}

/// The deadline of one connection attempt, and the way to call it off.
struct Deadline<'a> {
    at: Instant,
    timeout: Duration,
    cancel: &'a (dyn Fn() -> bool + Sync),
}

impl Deadline<'_> {
    /// How long the next wait may be (at most 50 ms, so `cancel` is seen).
    fn slice(&self) -> Result<Duration, HandshakeError> {
        if (self.cancel)() {
            return Err(HandshakeError::Cancelled);
        }
        let left = self.at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(self.timeout));
        }
        Ok(left.min(Duration::from_millis(50)))
    }
}

/// Waits until `fd` is ready for `events`, or the deadline.
fn wait(fd: &impl AsRawFd, events: libc::c_short, dl: &Deadline<'_>) -> Result<(), HandshakeError> {
    loop {
        let slice = dl.slice()?;
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        let ms = libc::c_int::try_from(slice.as_millis().max(1)).unwrap_or(50);
        // SAFETY: one valid pollfd for a descriptor the caller owns, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return Ok(());
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(HandshakeError::Io(e));
            }
        }
    }
}

fn write_all(s: &mut UnixStream, mut buf: &[u8], dl: &Deadline<'_>) -> Result<(), HandshakeError> {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => return Err(HandshakeError::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait(s, libc::POLLOUT, dl)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
    Ok(())
}

fn read_exact(s: &mut UnixStream, mut buf: &mut [u8], dl: &Deadline<'_>) -> Result<(), HandshakeError> {
    while !buf.is_empty() {
        match s.read(buf) {
            Ok(0) => return Err(HandshakeError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => buf = std::mem::take(&mut buf).get_mut(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait(s, libc::POLLIN, dl)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HandshakeError::Io(e)),
        }
    }
    Ok(())
}

/// A non-blocking `connect`. On a UNIX socket it either completes at once
/// or fails with `EAGAIN` while the listener's backlog is full (a tool that
/// never accepts): then it is retried until the deadline.
fn connect_nonblocking(path: &Path, dl: &Deadline<'_>) -> Result<UnixStream, HandshakeError> {
    let fail = |source: std::io::Error| HandshakeError::Connect { path: path.display().to_string(), source };
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a UNIX socket path must be 1 to {} bytes without NUL", addr.sun_path.len() - 1),
        )));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(fail(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor we own and nothing else holds.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = core::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    loop {
        // SAFETY: a valid sockaddr_un of `len` bytes and our own socket.
        let r = unsafe { libc::connect(owned.as_raw_fd(), (&raw const addr).cast(), len) };
        if r == 0 {
            return Ok(UnixStream::from(owned));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN) => std::thread::sleep(dl.slice()?.min(Duration::from_millis(10))),
            // Completes in the background (not seen on UNIX sockets, but
            // allowed): wait until writable, then read the outcome.
            Some(libc::EINPROGRESS) => {
                wait(&owned, libc::POLLOUT, dl)?;
                let mut err: libc::c_int = 0;
                let mut elen = core::mem::size_of::<libc::c_int>() as libc::socklen_t;
                // SAFETY: SO_ERROR into a c_int of the size we pass.
                let r = unsafe {
                    libc::getsockopt(
                        owned.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&raw mut err).cast(),
                        &mut elen,
                    )
                };
                if r != 0 || err != 0 {
                    let e =
                        if r != 0 { std::io::Error::last_os_error() } else { std::io::Error::from_raw_os_error(err) };
                    return Err(fail(e));
                }
                return Ok(UnixStream::from(owned));
            }
            _ => return Err(fail(e)),
        }
    }
}

/// `SO_PEERCRED` of the listening tool against the allowed uids.
fn check_peer(s: &UnixStream, allowed: &[u32]) -> Result<(), HandshakeError> {
    let (pid, uid) = peer_cred(s).map_err(HandshakeError::Io)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let ok = if allowed.is_empty() { uid == me || uid == 0 } else { allowed.contains(&uid) };
    if ok {
        Ok(())
    } else {
        Err(HandshakeError::PeerNotAllowed { uid, pid })
    }
}

/// The pid and uid of a UNIX socket's peer.
pub fn peer_cred(s: &UnixStream) -> std::io::Result<(i32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = core::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED into a ucred of the size we pass, on our socket.
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid))
}
