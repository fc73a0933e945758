//! The socket transport: one connection's read side (read-ahead buffer,
//! `recvmsg` with `SCM_RIGHTS` descriptors, whole-message framing) and the
//! readiness polls the waiters use. No routing: that is [`crate::mux`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ukvmi_wire::{read_zext, MsgHdr};

/// One message read from the socket.
pub(crate) struct Message {
    pub(crate) hdr: MsgHdr,
    pub(crate) body: Vec<u8>,
}

/// Bytes the read side takes in ahead: one `recvmsg` brings in every
/// message that has arrived (bulk replies come in bursts), and they are cut
/// out of the buffer one at a time. Larger than the largest message.
const READ_AHEAD: usize = 64 * 1024;

/// The socket's read side: the stream and its read-ahead buffer.
pub(crate) struct ReadSide {
    pub(crate) stream: UnixStream,
    buf: Vec<u8>,
    /// `buf[start..end]` holds bytes received but not yet cut into messages.
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]` (bytes consumed so far).
    consumed: u64,
    /// Descriptors received, each with the stream offset just past the read
    /// that brought it: it belongs to the message holding the byte before.
    fds: Vec<(u64, OwnedFd)>,
    /// Why reading stopped, when it was not a clean end (EOF between
    /// messages): a read error, or EOF in the middle of a message.
    failure: Option<io::Error>,
}

impl ReadSide {
    pub(crate) fn new(stream: UnixStream) -> ReadSide {
        ReadSide { stream, buf: vec![0; READ_AHEAD], start: 0, end: 0, consumed: 0, fds: Vec::new(), failure: None }
    }

    /// Whether received bytes wait in the buffer (then reading does not block
    /// for long: at most for the rest of a message already on its way).
    pub(crate) fn buffered(&self) -> bool {
        self.start < self.end
    }

    /// Until `n` bytes are buffered (n <= READ_AHEAD): one `recvmsg` per round.
    fn need(&mut self, n: usize) -> std::io::Result<()> {
        while self.end - self.start < n {
            if self.buf.len() - self.start < n {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let mut got = Vec::new();
            let room = self.buf.get_mut(self.end..).unwrap_or_default();
            let k = match recv_some(&self.stream, room, &mut got) {
                Ok(k) => k,
                Err(e) => {
                    let clean = e.kind() == io::ErrorKind::UnexpectedEof && self.start == self.end;
                    if !clean && self.failure.is_none() {
                        let mid = e.kind() == io::ErrorKind::UnexpectedEof;
                        self.failure =
                            Some(if mid { io::Error::new(e.kind(), "connection closed inside a message") } else { e });
                    }
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            };
            self.end += k;
            let past = self.consumed + (self.end - self.start) as u64;
            self.fds.extend(got.into_iter().map(|fd| (past, fd)));
        }
        Ok(())
    }

    /// Why reading stopped, if it was not a clean end (taken once).
    pub(crate) fn take_failure(&mut self) -> Option<io::Error> {
        self.failure.take()
    }

    /// The next whole message and the descriptors that came with it; `None`
    /// at EOF or on a read error (the connection is then over; see
    /// [`ReadSide::take_failure`]).
    pub(crate) fn next_message(&mut self) -> Option<(Message, Vec<OwnedFd>)> {
        self.need(8).ok()?;
        let hdr: MsgHdr = read_zext(self.buf.get(self.start..self.start + 8)?);
        let total = 8 + usize::from(hdr.size);
        self.need(total).ok()?;
        let body = self.buf.get(self.start + 8..self.start + total)?.to_vec();
        self.start += total;
        self.consumed += total as u64;
        let (end, mut mine) = (self.consumed, Vec::new());
        let mut i = 0;
        while i < self.fds.len() {
            if self.fds.get(i).is_some_and(|(past, _)| *past <= end) {
                mine.push(self.fds.remove(i).1);
            } else {
                i += 1;
            }
        }
        Some((Message { hdr, body }, mine))
    }
}

/// How long a waiter polls the socket without sleeping before it blocks:
/// a reply that comes within it costs no wake-up (tens of µs on a nested
/// host). Bounded, so a waiter never burns a core for long.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// Polls without sleeping, for at most `budget`; true once readable.
pub(crate) fn spin_until_readable(stream: &UnixStream, budget: Duration) -> bool {
    if budget.is_zero() {
        return false;
    }
    let t0 = Instant::now();
    loop {
        if readable(stream, Duration::ZERO) {
            return true;
        }
        if t0.elapsed() >= budget {
            return false;
        }
        // Let a thread woken on this CPU run (two cores are common here).
        std::thread::yield_now();
    }
}

/// Waits up to `timeout` for the socket to become readable (or hung up).
pub(crate) fn readable(stream: &UnixStream, timeout: Duration) -> bool {
    let mut pfd = [libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    poll_fds(&mut pfd, Some(timeout));
    pfd[0].revents != 0
}

/// Blocks until the socket is readable (or hung up), `wake` is readable,
/// or `timeout` (`None`: no limit); returns (socket ready, woken). A
/// signal may end it early with neither: callers look again and loop.
pub(crate) fn wait_readable(stream: &UnixStream, wake: RawFd, timeout: Option<Duration>) -> (bool, bool) {
    let mut pfd = [
        libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: wake, events: libc::POLLIN, revents: 0 },
    ];
    poll_fds(&mut pfd, timeout);
    (pfd[0].revents != 0, pfd[1].revents != 0)
}

/// One `poll` over `fds` for at most `timeout` (rounded up to whole
/// milliseconds, so a short deadline is not a busy loop; `None`: no limit).
pub(crate) fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) {
    let ms = timeout.map_or(-1, |t| {
        let ms = t.as_nanos().div_ceil(1_000_000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `fds` is a live slice of valid pollfds whose descriptors are
    // owned by the caller for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}

/// Most descriptors taken from one `recvmsg`; more are closed by the kernel
/// (`MSG_CTRUNC`). KVMI sends at most one per message.
const MAX_FDS: usize = 8;

/// One `recvmsg` into `buf` (at least one byte unless `buf` is empty; as
/// many as have arrived, up to its length), collecting any descriptors that
/// arrive with them into `fds` (close-on-exec). `UnexpectedEof` if the peer
/// has closed. The kernel ends a read right after the bytes that carried
/// descriptors, so they belong to the message holding the last byte read.
fn recv_some(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let int = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(int * MAX_FDS as u32) } as usize;
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = [0u64; 32];
    let control = control.get_mut(..space.div_ceil(8)).ok_or_else(|| io::Error::other("control buffer too small"))?;
    loop {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: msghdr is a plain C struct for which all zeros is valid.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: `mh` points at `buf` (writable, `iov_len` bytes) and at
        // `control` (at least `space` bytes), both alive for the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        take_fds(&mh, fds);
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        return Ok(n as usize);
    }
}

/// Moves every `SCM_RIGHTS` descriptor of a received message into `fds`,
/// so that each is owned (and closed) by someone.
fn take_fds(mh: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    let int = std::mem::size_of::<libc::c_int>();
    // SAFETY: `mh` was filled by recvmsg: its control pointer and (updated)
    // length describe the control messages the kernel wrote into our
    // buffer, which the CMSG_* macros walk without leaving it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                for i in 0..bytes / int {
                    let raw = std::ptr::read_unaligned(data.add(i * int).cast::<libc::c_int>());
                    if raw >= 0 {
                        // The kernel installed this descriptor for us; we own it.
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(mh, c);
        }
    }
}
