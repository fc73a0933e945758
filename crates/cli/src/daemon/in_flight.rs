//! The commands in flight, so that a command whose client left (Ctrl-C of a
//! `trace`) has finished undoing what it set up before the next command
//! runs: a `read` right after sees the guest's own byte, not the int3.

use std::{
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use ukvmi_monitor::SubWaker;

/// The longest a new command waits for departed ones to finish undoing
/// (a stream is woken when its reader leaves; undoing takes a few round
/// trips to the VMM).
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Whether a command's client has left, and the waits to end when it does
/// (a stream's: it sleeps until a record, its deadline or this).
#[derive(Debug, Default)]
pub(super) struct ClientGone {
    gone: AtomicBool,
    wakers: Mutex<Vec<SubWaker>>,
}

impl ClientGone {
    pub(super) fn get(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// The client left: the command is told, and woken where it waits.
    pub(super) fn set(&self) {
        self.gone.store(true, Ordering::SeqCst);
        for w in self.wakers.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            w.wake();
        }
    }

    /// Wakes `waker` when the client leaves. (A command checks [`get`]
    /// after this and before each wait: a client that left before is seen
    /// there, one that leaves after wakes it.)
    ///
    /// [`get`]: ClientGone::get
    pub(super) fn wake_on_leaving(&self, waker: SubWaker) {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner).push(waker);
    }
}

/// One command being served.
#[derive(Debug)]
struct Running {
    id: u64,
    /// Its control connection (a clone), to see whether the client left.
    sock: UnixStream,
    /// Set when the client left; the command stops when it sees it.
    gone: Arc<ClientGone>,
}

/// Every command being served.
#[derive(Debug, Default)]
pub(super) struct InFlight {
    running: Mutex<(u64, Vec<Running>)>,
    done: Condvar,
}

/// Whether the client at the other end of `sock` has closed it: it sends
/// nothing after its request, so anything readable is its end (or junk).
fn hung_up(sock: &UnixStream) -> bool {
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: poll on one pollfd that lives on this stack frame, timeout 0;
    // the descriptor is open (borrowed from `sock`) for the call.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

impl InFlight {
    /// Registers a command; `gone` is its "the client left" flag.
    pub(super) fn start(&self, sock: &UnixStream, gone: &Arc<ClientGone>) -> Option<u64> {
        let sock = sock.try_clone().ok()?;
        let mut r = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        r.0 += 1;
        let id = r.0;
        r.1.push(Running { id, sock, gone: Arc::clone(gone) });
        Some(id)
    }

    /// The command `id` has returned (and dropped what it held).
    pub(super) fn finish(&self, id: Option<u64>) {
        let mut r = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        r.1.retain(|c| Some(c.id) != id);
        self.done.notify_all();
    }

    /// A command's client left: a `settle` under way waits for it too.
    pub(super) fn left(&self) {
        drop(self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.done.notify_all();
    }

    /// Waits until every other command whose client has left has returned:
    /// what it set up is undone by then. Clients that left are told to
    /// stop here, not only when their watcher thread gets to it. Woken by
    /// a command returning or another client leaving (`left`).
    pub(super) fn settle(&self, me: Option<u64>) {
        let end = Instant::now() + SETTLE_LIMIT;
        let mut r = self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            let mut waiting = false;
            for c in r.1.iter().filter(|c| Some(c.id) != me) {
                if c.gone.get() {
                    waiting = true;
                } else if hung_up(&c.sock) {
                    c.gone.set();
                    waiting = true;
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            if !waiting || left.is_zero() {
                return;
            }
            r = self.done.wait_timeout(r, left).map_or_else(|e| e.into_inner().0, |x| x.0);
        }
    }
}
