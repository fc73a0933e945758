//! Serving one control client: checking who it is, reading its request,
//! waiting for a VM (and for departed commands to finish undoing), running
//! the command with its output framed back ([`SockOut`]), and the exit
//! status.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use ukvmi_monitor::{Monitor, SubWaker, SymbolMap};

use super::{in_flight::ClientGone, load_map, log::log, Daemon, REFUSAL_FRESH};
use crate::{
    control,
    tools::{self, Ctx, Out},
};

/// A command's output, as frames on its control connection.
#[derive(Debug)]
struct SockOut {
    sock: UnixStream,
    stderr_tty: bool,
    gone: Arc<ClientGone>,
}

impl Out for SockOut {
    fn line(&mut self, s: &str) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(b'\n');
        control::write_frame(&mut self.sock, control::STDOUT, &b)
    }
    fn raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        control::write_frame(&mut self.sock, control::STDOUT, b)
    }
    fn note(&mut self, s: &str) -> std::io::Result<()> {
        control::write_frame(&mut self.sock, control::STDERR, format!("{s}\n").as_bytes())
    }
    fn progress(&mut self, s: &str) -> std::io::Result<()> {
        control::write_frame(&mut self.sock, control::PROGRESS, s.as_bytes())
    }
    fn stderr_tty(&self) -> bool {
        self.stderr_tty
    }
    fn gone(&self) -> bool {
        self.gone.get()
    }
    fn wake_when_gone(&mut self, waker: SubWaker) {
        self.gone.wake_on_leaving(waker);
    }
}

/// How long a command waits for a VM to connect unless told (`--wait`):
/// a VMM already running retries every second (`ukvmi run --reconnect`).
const DEFAULT_WAIT: Duration = Duration::from_secs(2);

/// The longest a handshake under way when the wait ends is waited for.
const HANDSHAKE_GRACE: Duration = Duration::from_secs(10);

impl Daemon {
    fn wait_attached(
        &self,
        out: &mut dyn Out,
        wait: Duration,
    ) -> Result<(Arc<Monitor>, Option<Arc<SymbolMap>>), String> {
        let started = Instant::now();
        let deadline = started + wait;
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut told = false;
        loop {
            if let Some(m) = &st.mon {
                return Ok((Arc::clone(m), st.syms.clone()));
            }
            if st.gone {
                return Err("the VM went away".into());
            }
            if out.gone() {
                // Ctrl-C while waiting: nobody to answer, nothing to undo.
                return Err("the command was interrupted".into());
            }
            if let Some((key, why, at)) = &st.refused {
                // One with this command's key, since it began waiting or
                // recent enough that the VMM is still retrying (a refusal
                // from a VM long gone says nothing about the next one).
                if *key == st.key && (*at >= started || at.elapsed() < REFUSAL_FRESH) {
                    let hint = if key.is_some() {
                        "Is the key right? Give the one the VM was started with: --key-file FILE or $UKVMI_KEY"
                    } else {
                        "A VM started with a key needs the same key here: --key-file FILE or $UKVMI_KEY"
                    };
                    return Err(format!(
                        "the handshake with the VM at {} failed: {why}. {hint}",
                        self.vm_path.display()
                    ));
                }
            }
            let mut left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() && st.handshaking {
                // A VMM is connecting right now: let it finish (its end,
                // either way, wakes this wait).
                left = (deadline + HANDSHAKE_GRACE).saturating_duration_since(Instant::now());
            }
            if left.is_zero() {
                let p = self.vm_path.display();
                let waited = if wait.as_millis() % 1000 == 0 {
                    format!("{} s", wait.as_secs())
                } else {
                    format!("{:.1} s", wait.as_secs_f64())
                };
                return Err(format!(
                    "no VM connected to {p} within {waited}. Start one with \
                     `ukvmi run --guest demo --introspect unix:{p}` (or your VM with --introspect unix:{p}), \
                     or give --wait SECS to wait longer for one that is starting"
                ));
            }
            if !told {
                let _ = out.note(&format!("waiting for the VM to connect to {} ...", self.vm_path.display()));
                told = true;
            }
            // Until the deadline, or until woken: the VM attaching, a
            // handshake ending, the client leaving.
            st = self.cond.wait_timeout(st, left).map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }

    /// Refuses a control client that runs as another user: logged, and
    /// told so once its request is in (bounded by a short timeout).
    fn refuse(&self, mut sock: UnixStream, who: Result<(u32, i32), std::io::Error>) {
        let me = control::my_uid();
        let served = control::served_users(me);
        let (said, told) = match who {
            Ok((uid, _)) => (
                format!("refused a control connection from uid {uid}: this daemon serves {served}"),
                format!("ukvmi: the daemon for {} refuses uid {uid}: it serves {served}\n", self.vm_path.display()),
            ),
            Err(e) => (
                format!("refused a control connection whose user is unknown ({e}): this daemon serves {served}"),
                format!(
                    "ukvmi: the daemon for {} refuses a client whose user it cannot tell\n",
                    self.vm_path.display()
                ),
            ),
        };
        log(&said);
        let _ = sock.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = sock.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = control::read_request(&mut sock);
        let _ = control::write_frame(&mut sock, control::STDERR, told.as_bytes());
        let _ = control::write_frame(&mut sock, control::EXIT, &[1]);
    }

    pub(super) fn serve(self: &Arc<Self>, mut sock: UnixStream) {
        match control::peer_cred(&sock) {
            Ok((uid, _)) if control::trusted_uid(uid) => {}
            who => return self.refuse(sock, who),
        }
        let Ok(req) = control::read_request(&mut sock) else {
            return;
        };
        let Ok(wsock) = sock.try_clone() else { return };
        {
            let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if st.leaving {
                // Closed without a word: the client starts a new daemon.
                return;
            }
            st.clients += 1;
        }
        let gone = Arc::new(ClientGone::default());
        // The client sends nothing more: a read that returns means it left.
        // Whatever the command waits on is woken: its stream, its wait for
        // a VM, another command's wait for it to finish undoing.
        if let Ok(mut watch) = sock.try_clone() {
            let (g, d) = (Arc::clone(&gone), Arc::clone(self));
            let _ = std::thread::Builder::new().name("ctl-watch".into()).spawn(move || {
                let mut b = [0u8; 1];
                let _ = watch.read(&mut b);
                g.set();
                d.wake();
                d.in_flight.left();
            });
        }
        let me = self.in_flight.start(&sock, &gone);
        let mut out = SockOut { sock: wsock, stderr_tty: req.flags & control::FLAG_TTY != 0, gone };
        // A stream stopped with Ctrl-C just before this command: its undo
        // (int3s put back, interceptions off) is finished first.
        self.in_flight.settle(me);
        // A command that panics (a bug) fails alone: its client still gets
        // its exit status, and the daemon's books (in flight, clients) stay
        // right for the commands after it.
        let status = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(&req, &mut out)))
            .unwrap_or_else(|_| {
                log(&format!("the command {:?} failed inside the daemon (a bug: a panic)", req.args.first()));
                let _ = out.note("ukvmi: this command failed inside the daemon (a bug); the daemon carries on");
                1
            });
        self.in_flight.finish(me);
        let _ = control::write_frame(&mut sock, control::EXIT, &[status]);
        let _ = sock.flush();
        {
            let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.clients = st.clients.saturating_sub(1);
            st.served += 1;
            self.cond.notify_all();
        }
        let args = &req.args;
        if self.detaching.load(Ordering::SeqCst) && args.first().map(String::as_str) == Some("detach") {
            // Only now, with the client's reply written, may the daemon go.
            self.quit.store(true, Ordering::SeqCst);
            self.wake();
        }
    }

    /// Applies `--map FILE` if the command gives one this daemon does not
    /// use yet (it started with another, or none); says so either way.
    fn apply_map(&self, path: &str, out: &mut SockOut) -> Result<(), String> {
        let same = self.state.lock().ok().is_some_and(|st| st.map.as_ref().is_some_and(|(p, _)| p == path));
        if same {
            return Ok(());
        }
        let map = load_map(path).map_err(|e| format!("--map {e} (the daemon keeps the symbols it had)"))?;
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if st.mon.is_some() {
            st.syms = Some(Arc::clone(&map));
        }
        let n = map.len();
        st.map = Some((path.to_string(), map));
        drop(st);
        log(&format!("symbols now from {path} ({n})"));
        let _ = out.note(&format!("ukvmi: the daemon for {} now uses {path} ({n} symbols)", self.vm_path.display()));
        Ok(())
    }

    fn run(self: &Arc<Self>, req: &control::Request, out: &mut SockOut) -> u8 {
        let args = &req.args[..];
        let key = req.key.clone();
        if args.first().map(String::as_str) == Some("detach") {
            // The main loop must not take the monitor stopped here for the
            // VM going away and exit before this client has its reply.
            self.detaching.store(true, Ordering::SeqCst);
            let mon = self.state.lock().ok().and_then(|s| s.mon.clone());
            if let Some(m) = mon {
                m.stop();
            }
            let _ = out.line(&if args.iter().any(|a| a == "--json") {
                ukvmi_monitor::json::Obj::new().str("event", "detached").build()
            } else {
                "detached: interceptions undone, vCPUs running, connection closed".into()
            });
            return 0;
        }
        // Until a VM is attached, the key of the latest command is the one
        // the next handshake answers with.
        {
            let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if st.mon.is_none() && st.key != key {
                st.key = key;
            }
        }
        if let Some(path) = &req.map {
            if let Err(e) = self.apply_map(path, out) {
                let _ = out.note(&format!("ukvmi: {e}"));
                return 1;
            }
        }
        let wait = req.wait_ms.map_or(DEFAULT_WAIT, |ms| Duration::from_millis(u64::from(ms)));
        let (mon, syms) = match self.wait_attached(out, wait) {
            Ok(a) => a,
            Err(e) => {
                let _ = out.note(&format!("ukvmi: {e}"));
                return 1;
            }
        };
        let notice = self.state.lock().ok().and_then(|mut st| st.notice.take());
        if let Some(n) = notice {
            let _ = out.note(&n);
        }
        let ctx = Ctx { mon: &mon, syms: syms.as_deref() };
        match tools::run(&ctx, args, req.data.as_deref(), out) {
            Ok(()) => 0,
            Err(f) => {
                let _ = out.note(&format!("ukvmi {}: {}", args.first().map_or("", String::as_str), f.msg));
                f.status
            }
        }
    }
}
