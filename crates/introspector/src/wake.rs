//! Wake-up descriptors: how one thread ends another's blocking `poll`
//! (a non-blocking socket pair used as a self-pipe).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};

/// A self-pipe: [`Waker::wake`] makes [`Waker::fd`] readable until
/// [`Waker::drain`]. Waking twice before a drain is one wake-up.
pub(crate) struct Waker {
    tx: UnixStream,
    rx: UnixStream,
}

impl Waker {
    pub(crate) fn new() -> Result<Waker> {
        let (tx, rx) = UnixStream::pair().map_err(Error::io("creating a wake-up socket pair"))?;
        tx.set_nonblocking(true).map_err(Error::io("making the wake-up socket non-blocking"))?;
        rx.set_nonblocking(true).map_err(Error::io("making the wake-up socket non-blocking"))?;
        Ok(Waker { tx, rx })
    }

    /// Makes [`Waker::fd`] readable (a full buffer means it already is).
    pub(crate) fn wake(&self) {
        let _ = (&self.tx).write(&[1]);
    }

    /// The descriptor to poll for `POLLIN`.
    pub(crate) fn fd(&self) -> RawFd {
        self.rx.as_raw_fd()
    }

    /// Takes every pending wake-up (only the thread that polls it calls this).
    pub(crate) fn drain(&self) {
        let mut sink = [0u8; 64];
        while matches!((&self.rx).read(&mut sink), Ok(n) if n > 0) {}
    }
}
