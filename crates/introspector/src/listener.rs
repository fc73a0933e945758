//! The listening socket and the tool side of the QEMU handshake (`handshake.md`).

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha1::{Digest, Sha1};
use ukvmi_wire::handshake::{FromIntrospector, ToIntrospector, TO_INTROSPECTOR_MAX, TO_INTROSPECTOR_MIN};
use ukvmi_wire::{read_zext, IntoBytes, KVMI_VERSION};

use crate::error::{Error, Result};
use crate::vm::{Vm, VmInfo, DEFAULT_REPLY_TIMEOUT};

/// Default time allowed for the device manager's handshake data.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of the tool side of the handshake. [`Listener`] holds one; use it
/// directly to run the handshake on a stream accepted some other way.
#[derive(Debug, Clone, Copy)]
pub struct Handshake {
    cookie_hash: [u8; 20],
    timeout: Duration,
    reply_timeout: Duration,
}

impl Default for Handshake {
    fn default() -> Self {
        Handshake { cookie_hash: [0; 20], timeout: DEFAULT_HANDSHAKE_TIMEOUT, reply_timeout: DEFAULT_REPLY_TIMEOUT }
    }
}

impl Handshake {
    /// No key (the cookie hash is all zeros), 10 s handshake timeout, 15 s
    /// reply timeout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Authenticates with `secret`: the reply carries SHA-1(`secret`), which
    /// QEMU compares with SHA-1 of its own `key=` secret.
    pub fn with_key(mut self, secret: &[u8]) -> Self {
        self.cookie_hash = Sha1::digest(secret).into();
        self
    }

    /// How long to wait for the device manager's handshake data.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The reply timeout of the resulting [`Vm`] (also used for `KVMI_GET_VERSION`).
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout;
        self
    }

    /// The cookie hash the reply will carry.
    pub fn cookie_hash(&self) -> [u8; 20] {
        self.cookie_hash
    }

    /// Runs the handshake on a connected stream, then `KVMI_GET_VERSION`.
    pub fn run(&self, stream: UnixStream) -> Result<Vm> {
        let to = self.exchange(&stream)?;
        let struct_size = to.struct_size;
        let info = VmInfo {
            uuid: to.uuid,
            name: to.name_str(),
            start_time: to.start_time,
            max_gpa: to.max_gpa,
            handshake_size: struct_size,
            ..VmInfo::default()
        };
        let mut vm = Vm::start(stream, info, self.reply_timeout)?;
        let version = match vm.get_version() {
            Ok(v) => v,
            Err(Error::Closed) => {
                return Err(Error::Handshake(
                    "connection closed before KVMI_GET_VERSION was answered (invalid authentication token?)".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        if version.version < KVMI_VERSION {
            return Err(Error::Handshake(format!(
                "KVMI_GET_VERSION reports version {}, at least {KVMI_VERSION} is needed",
                version.version
            )));
        }
        vm.info.version = version.version;
        vm.info.max_msg_size = version.max_msg_size;
        vm.info.singlestep = version.singlestep;
        Ok(vm)
    }

    /// Reads the device manager's structure and writes the reply.
    fn exchange(&self, stream: &UnixStream) -> Result<ToIntrospector> {
        let timeout = (!self.timeout.is_zero()).then_some(self.timeout);
        stream.set_read_timeout(timeout).map_err(Error::io("setting the handshake timeout"))?;
        stream.set_write_timeout(timeout).map_err(Error::io("setting the handshake timeout"))?;
        let mut s = stream;

        let mut size_buf = [0u8; 4];
        read_handshake(&mut s, &mut size_buf)?;
        let struct_size = u32::from_ne_bytes(size_buf);
        if !(TO_INTROSPECTOR_MIN..=TO_INTROSPECTOR_MAX).contains(&struct_size) {
            return Err(Error::Handshake(format!(
                "device manager announced a {struct_size}-byte structure (accepted: {TO_INTROSPECTOR_MIN}..={TO_INTROSPECTOR_MAX})"
            )));
        }
        let ours = size_of::<ToIntrospector>();
        let announced = usize::try_from(struct_size).unwrap_or(ours);
        let take = announced.min(ours);
        let mut buf = size_buf.to_vec();
        buf.resize(take, 0);
        read_handshake(&mut s, buf.get_mut(size_buf.len()..).unwrap_or_default())?;
        let to: ToIntrospector = read_zext(&buf);

        // Discard the part of a larger structure that we do not know.
        let rest = u64::try_from(announced.saturating_sub(take)).unwrap_or(0);
        let skipped = io::copy(&mut (&mut s).take(rest), &mut io::sink()).map_err(handshake_io)?;
        if skipped != rest {
            return Err(Error::Handshake("connection closed during the handshake".into()));
        }

        let reply = FromIntrospector::new(self.cookie_hash);
        s.write_all(reply.as_bytes()).map_err(handshake_io)?;

        stream.set_read_timeout(None).map_err(Error::io("clearing the handshake timeout"))?;
        stream.set_write_timeout(None).map_err(Error::io("clearing the handshake timeout"))?;
        Ok(to)
    }
}

fn handshake_io(e: io::Error) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout { command: "handshake" },
        io::ErrorKind::UnexpectedEof => Error::Handshake("connection closed during the handshake".into()),
        _ => Error::Io { context: "handshake", source: e },
    }
}

fn read_handshake(s: &mut &UnixStream, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).map_err(handshake_io)
}

/// A listening UNIX socket the device manager (QEMU) connects to, one
/// connection per VM.
#[derive(Debug)]
pub struct Listener {
    sock: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to unlink only our own.
    id: Option<(u64, u64)>,
    handshake: Handshake,
}

impl Listener {
    /// Binds and listens on `path`, first removing a stale socket file there
    /// (any other kind of file is left alone and the bind fails).
    pub fn bind(path: impl AsRef<Path>) -> Result<Listener> {
        let path = path.as_ref().to_path_buf();
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(Error::io("removing a stale socket file"))?;
            }
        }
        let sock = UnixListener::bind(&path).map_err(Error::io("binding the listening socket"))?;
        let id = std::fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        Ok(Listener { sock, path, id, handshake: Handshake::default() })
    }

    /// Authenticates to QEMU with `secret` (see [`Handshake::with_key`]).
    pub fn with_key(mut self, secret: &[u8]) -> Self {
        self.handshake = self.handshake.with_key(secret);
        self
    }

    /// Sets the handshake timeout (default 10 s).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake = self.handshake.with_timeout(timeout);
        self
    }

    /// Sets the reply timeout of accepted [`Vm`]s (default 15 s).
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.handshake = self.handshake.with_reply_timeout(timeout);
        self
    }

    /// Replaces all handshake settings.
    pub fn with_handshake(mut self, handshake: Handshake) -> Self {
        self.handshake = handshake;
        self
    }

    /// The handshake settings.
    pub fn handshake(&self) -> &Handshake {
        &self.handshake
    }

    /// The socket's path.
    pub fn local_path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection, runs the handshake and `KVMI_GET_VERSION`.
    pub fn accept(&self) -> Result<Vm> {
        let (stream, _) = self.sock.accept().map_err(Error::io("accepting a connection"))?;
        self.handshake.run(stream)
    }

    /// An endless iterator of [`Listener::accept`] results; a failed
    /// handshake yields an `Err` and the next item accepts the next connection.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming { listener: self }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Iterator over accepted VMs; see [`Listener::incoming`].
#[derive(Debug)]
pub struct Incoming<'a> {
    listener: &'a Listener,
}

impl Iterator for Incoming<'_> {
    type Item = Result<Vm>;

    fn next(&mut self) -> Option<Result<Vm>> {
        Some(self.listener.accept())
    }
}
