//! `ukvmi daemon`: holds the KVMI connection for one-shot tool commands.
//!
//! With KVMI the introspector listens and the VMM connects (as QEMU does),
//! and whatever a tool enables lasts only as long as its connection. So a
//! `ukvmi regs 0` cannot simply connect, ask and leave. The first tool
//! command for a socket path starts this daemon in the background (its log
//! goes to `PATH.log`); it listens on `PATH` for the VMM, attaches the event
//! engine ([`Monitor`]) when the VMM connects, and serves commands on the
//! control socket `PATH.ctl` (see `control.rs`), each in its own thread.
//! Long-running commands (`trace`, `watch-msr`, `protect`) own what they set
//! up: when their client goes away (Ctrl-C), it is undone. The daemon exits
//! when the VM goes away, or on `ukvmi detach`.
//!
//! Everything it makes is private: it runs with umask 0177 (so `PATH` and
//! `PATH.ctl` are bound 0600, with no window), opens `PATH.lock` 0600 (its
//! client does the same for `PATH.log`), and serves only peers running as
//! its own uid or root, on either socket (`SO_PEERCRED`). The handshake key
//! comes from its environment (`UKVMI_KEY`, set by the client that starts
//! it) and, while no VM is attached, from each command's request.

use std::{
    io::{Read, Write},
    os::unix::{
        fs::{FileTypeExt, MetadataExt},
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use ukvmi_introspector::{Error as KvmiError, Handshake};
use ukvmi_monitor::{Monitor, SymbolMap};

use crate::{
    args::{MissingValue, Style, Word, Words},
    control::{self, ctl_path},
    tools::{self, Ctx, Out},
};

#[derive(Default)]
struct Attached {
    mon: Option<Arc<Monitor>>,
    syms: Option<Arc<SymbolMap>>,
    gone: bool,
    /// The key the next handshake answers with.
    key: Option<Vec<u8>>,
    /// The last failed handshake: the key it was answered with, why, when.
    refused: Option<(Option<Vec<u8>>, String, Instant)>,
}

struct Daemon {
    vm_path: PathBuf,
    map: Option<Arc<SymbolMap>>,
    state: Mutex<Attached>,
    cond: Condvar,
    quit: AtomicBool,
    /// A `detach` is under way; `quit` follows once its client has its reply.
    detaching: AtomicBool,
}

/// Whether the VM runs the built-in guest `name`: the first page of its
/// image is in guest memory at the load address, but for at most a few
/// bytes (int3s a tool may have planted).
fn runs_builtin(mon: &Monitor, name: &str) -> bool {
    const PLANTED: usize = 16;
    let Some(g) = ukvmi_guests::find(name) else { return false };
    // The first page: code (data the guest writes comes after it).
    let len = g.image.len().min(4096);
    let mut mem = vec![0u8; len];
    if mon.read(g.load_addr, &mut mem).is_err() {
        return false;
    }
    let differ = mem.iter().zip(g.image).filter(|(a, b)| a != b).count();
    differ <= PLANTED
}

/// The symbols for an attached VM: `--map`, else those of the built-in
/// guest its name names, if it really runs that guest (checked against its
/// memory; a VM merely named like one gets none).
fn symbols_for_vm(mon: &Monitor, map: Option<&Arc<SymbolMap>>) -> Option<Arc<SymbolMap>> {
    let name = &mon.vm().info().name;
    if map.is_none() && ukvmi_guests::find(name).is_some() && !runs_builtin(mon, name) {
        log(&format!("VM `{name}` does not run the built-in `{name}` guest: no symbols (give --map FILE)"));
        return None;
    }
    symbols_for(name, map)
}

/// The symbol map for a VM: `--map`, else the built-in guest of that name.
pub fn symbols_for(vm_name: &str, map: Option<&Arc<SymbolMap>>) -> Option<Arc<SymbolMap>> {
    if let Some(m) = map {
        return Some(Arc::clone(m));
    }
    if vm_name == "demo" {
        // The demo kernel's System.map from its build: every symbol, user
        // program labels at their user addresses.
        return SymbolMap::parse(ukvmi_guests::demo::SYSTEM_MAP).ok().map(Arc::new);
    }
    let g = ukvmi_guests::find(vm_name)?;
    let text: String = g.symbols.iter().map(|(n, a)| format!("{a:016x} T {n}\n")).collect();
    SymbolMap::parse(&text).ok().map(Arc::new)
}

struct SockOut {
    sock: UnixStream,
    stderr_tty: bool,
    gone: Arc<AtomicBool>,
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
        self.gone.load(Ordering::Relaxed)
    }
}

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
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "no VM connected to {} within {wait:?}: start one with `ukvmi run --guest demo --introspect unix:{}`",
                    self.vm_path.display(),
                    self.vm_path.display()
                ));
            }
            if !told {
                let _ = out.note(&format!("waiting for the VM to connect to {} ...", self.vm_path.display()));
                told = true;
            }
            st = self
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(200)))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
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

    fn serve(self: &Arc<Self>, mut sock: UnixStream) {
        match control::peer_cred(&sock) {
            Ok((uid, _)) if control::trusted_uid(uid) => {}
            who => return self.refuse(sock, who),
        }
        let Ok(control::Request { flags, args, key }) = control::read_request(&mut sock) else {
            return;
        };
        let gone = Arc::new(AtomicBool::new(false));
        // The client sends nothing more: a read that returns means it left.
        if let Ok(mut watch) = sock.try_clone() {
            let g = Arc::clone(&gone);
            let _ = std::thread::Builder::new().name("ctl-watch".into()).spawn(move || {
                let mut b = [0u8; 1];
                let _ = watch.read(&mut b);
                g.store(true, Ordering::Relaxed);
            });
        }
        let Ok(wsock) = sock.try_clone() else { return };
        let mut out = SockOut { sock: wsock, stderr_tty: flags & control::FLAG_TTY != 0, gone };
        let status = self.run(&args, key, &mut out);
        let _ = control::write_frame(&mut sock, control::EXIT, &[status]);
        let _ = sock.flush();
        if self.detaching.load(Ordering::SeqCst) && args.first().map(String::as_str) == Some("detach") {
            // Only now, with the client's reply written, may the daemon go.
            self.quit.store(true, Ordering::SeqCst);
            self.cond.notify_all();
        }
    }

    fn run(self: &Arc<Self>, args: &[String], key: Option<Vec<u8>>, out: &mut SockOut) -> u8 {
        if args.first().map(String::as_str) == Some("detach") {
            // The main loop must not take the monitor stopped here for the
            // VM going away and exit before this client has its reply.
            self.detaching.store(true, Ordering::SeqCst);
            let mon = self.state.lock().ok().and_then(|s| s.mon.clone());
            if let Some(m) = mon {
                m.stop();
            }
            let _ = out.line("detached: interceptions undone, vCPUs running, connection closed");
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
        let (mon, syms) = match self.wait_attached(out, Duration::from_secs(15)) {
            Ok(a) => a,
            Err(e) => {
                let _ = out.note(&format!("ukvmi: {e}"));
                return 1;
            }
        };
        let ctx = Ctx { mon: &mon, syms: syms.as_deref() };
        match tools::run(&ctx, args, out) {
            Ok(()) => 0,
            Err(f) => {
                let _ = out.note(&format!("ukvmi {}: {}", args.first().map_or("", String::as_str), f.msg));
                f.status
            }
        }
    }
}

/// A line repeated within this long of its last showing is only counted.
const LOG_REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// At most this many distinct lines are tracked for repeats.
const LOG_TRACKED: usize = 64;

/// Recent log lines: (line, when last shown, repeats not shown since).
static LOG_SEEN: Mutex<Vec<(String, Instant, u32)>> = Mutex::new(Vec::new());

fn emit(msg: &str) {
    // Never panics: a log that cannot be written is no reason to stop.
    let _ = writeln!(std::io::stderr().lock(), "[ukvmi daemon {}] {msg}", std::process::id());
}

/// Logs a line; the same line again within `LOG_REPEAT_WINDOW` is counted,
/// not shown (a VMM retrying a refused handshake every second would
/// otherwise fill the log), and the count comes with its next showing or
/// at exit (`flush_log_repeats`).
fn log(msg: &str) {
    let now = Instant::now();
    let mut seen = LOG_SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = seen.iter_mut().find(|e| e.0 == msg) {
        let since = now.duration_since(e.1);
        if since < LOG_REPEAT_WINDOW {
            e.2 = e.2.saturating_add(1);
            return;
        }
        if e.2 > 0 {
            emit(&format!("{msg} (repeated {} times in the last {} s)", e.2.saturating_add(1), since.as_secs()));
        } else {
            emit(msg);
        }
        e.1 = now;
        e.2 = 0;
        return;
    }
    seen.retain(|e| e.2 > 0 || now.duration_since(e.1) < LOG_REPEAT_WINDOW);
    if seen.len() < LOG_TRACKED {
        seen.push((msg.to_string(), now, 0));
    }
    emit(msg);
}

/// Shows the count of every line repeated since it was last shown.
fn flush_log_repeats() {
    let now = Instant::now();
    let mut seen = LOG_SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for e in seen.iter_mut().filter(|e| e.2 > 0) {
        emit(&format!("{} (repeated {} more times in the last {} s)", e.0, e.2, now.duration_since(e.1).as_secs()));
        e.1 = now;
        e.2 = 0;
    }
}

/// `ukvmi daemon --vm PATH [--map FILE] [--key-file FILE]` (normally
/// started by a tool command, which passes the key in `UKVMI_KEY`).
pub fn main(args: &[String]) -> ExitCode {
    // Before any socket or file exists (and before any thread): whatever
    // the caller's umask, what this process creates is 0600 at most.
    // SAFETY: umask(2) only changes this process's file mode mask.
    unsafe { libc::umask(0o177) };
    let mut vm: Option<PathBuf> = None;
    let mut map_path: Option<String> = None;
    let mut key_file: Option<String> = None;
    let valued = crate::commands::find("daemon").map(crate::commands::valued_options).unwrap_or_default();
    for w in Words::new(args, &valued, Style::Options) {
        // A valued option without its value (the last word) leaves it unset.
        let (a, value) = match w {
            Ok(Word::Opt(a, v)) => (a, v),
            Ok(Word::Operand(a)) => (a, None),
            Err(MissingValue(a)) => (a, None),
        };
        match a {
            "--vm" => vm = value.map(PathBuf::from),
            "--map" => map_path = value.map(str::to_string),
            "--key-file" => key_file = value.map(str::to_string),
            "-h" | "--help" => {
                print!("{}", crate::TOOL_HELP);
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("ukvmi daemon: unknown argument `{other}`");
                return ExitCode::from(2);
            }
        }
    }
    let vm = vm.unwrap_or_else(crate::default_vm_path);
    let map = match map_path.map(|p| {
        std::fs::read_to_string(&p)
            .map_err(|e| format!("{p}: {e}"))
            .and_then(|t| SymbolMap::parse(&t).map_err(|e| format!("{p}: {e}")))
    }) {
        Some(Ok(m)) => Some(Arc::new(m)),
        Some(Err(e)) => {
            log(&format!("cannot use the symbol map: {e}"));
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let key = match control::load_key(key_file.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            log(&format!("cannot use the key: {e}"));
            return ExitCode::FAILURE;
        }
    };
    // One daemon per path: two first commands at the same moment each
    // start one, and the loser leaves (its client uses the winner). The
    // lock goes with the process, however it ends.
    let _lock = match take_daemon_lock(&vm) {
        Ok(f) => f,
        Err((code, e)) => {
            log(&e);
            return ExitCode::from(code);
        }
    };
    let r = run_daemon(&vm, map, key);
    if let Err(e) = &r {
        log(e);
    }
    flush_log_repeats();
    if r.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Takes the daemon lock for `vm` (see `control::lock_path`).
/// On failure: the exit status (`ALREADY_SERVED` when another daemon holds
/// the lock) and why.
fn take_daemon_lock(vm: &Path) -> Result<std::fs::File, (u8, String)> {
    use std::os::fd::AsRawFd;
    let path = crate::control::lock_path(vm);
    let f = control::open_private(&path, false).map_err(|e| (1, format!("the daemon lock: {e}")))?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            let why = format!("another daemon already serves {}; leaving it to that one", vm.display());
            return Err((crate::control::ALREADY_SERVED, why));
        }
        return Err((1, format!("locking {}: {e}", path.display())));
    }
    Ok(f)
}

/// How long a failed handshake counts against a command that comes after
/// it with the same key (the VMM retries every second by default).
const REFUSAL_FRESH: Duration = Duration::from_secs(5);

/// How long the daemon waits for a VM before it gives up and exits.
const NO_VM_TIMEOUT: Duration = Duration::from_secs(300);

/// SIGINT, SIGTERM and SIGHUP are blocked in every thread and taken by one
/// waiter, which asks the daemon to undo everything and exit.
fn catch_stop_signals(d: &Arc<Daemon>) {
    // SAFETY: plain signal-set manipulation on a local set, then blocking it
    // in this thread (inherited by the threads started after).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let d = Arc::clone(d);
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing the signal number to `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            log(&format!("signal {sig}: undoing every hook and exiting"));
            d.quit.store(true, Ordering::SeqCst);
            d.cond.notify_all();
        }
    });
}

/// The listening KVMI socket. Like the library's `Listener`, but the
/// daemon accepts the connections itself to check who is connecting
/// before the handshake.
struct KvmiSocket {
    sock: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to unlink only our own.
    id: Option<(u64, u64)>,
}

impl KvmiSocket {
    /// Binds `path`, first removing a stale socket file there (any other
    /// kind of file is left alone and the bind fails). The mode comes from
    /// the daemon's umask: 0600.
    fn bind(path: &Path) -> std::io::Result<KvmiSocket> {
        if std::fs::symlink_metadata(path).is_ok_and(|md| md.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        let sock = UnixListener::bind(path)?;
        let id = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(KvmiSocket { sock, path: path.to_path_buf(), id })
    }
}

impl Drop for KvmiSocket {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Accepts connections on the KVMI socket until one is a VMM that passes
/// the handshake. A peer of another user is dropped before the handshake; a
/// connection that fails its handshake (a stray client, a wrong key) does
/// not end the wait: the next one may be the VMM.
fn accept_vm(d: &Daemon, listener: &KvmiSocket) -> Monitor {
    loop {
        let stream = match listener.sock.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log(&format!("accepting on the KVMI socket: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match control::peer_cred(&stream) {
            Ok((uid, _)) if control::trusted_uid(uid) => {}
            Ok((uid, _)) => {
                log(&format!(
                    "refused a KVMI connection from uid {uid}: only a VMM running as {} may attach",
                    match control::my_uid() {
                        0 => "root".to_string(),
                        me => format!("uid {me} or root"),
                    }
                ));
                continue;
            }
            Err(e) => {
                log(&format!("refused a KVMI connection whose user is unknown: {e}"));
                continue;
            }
        }
        let key = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).key.clone();
        let hs = key.as_deref().map_or_else(Handshake::new, |k| Handshake::new().with_key(k));
        let vm = match hs.run(stream) {
            Ok(vm) => vm,
            Err(e) => {
                log(&format!("a connection on the KVMI socket failed: {e}"));
                if let KvmiError::Handshake(why) = e {
                    let mut st = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    st.refused = Some((key, why, Instant::now()));
                    d.cond.notify_all();
                }
                continue;
            }
        };
        match Monitor::start(vm) {
            Ok(mon) => return mon,
            Err(e) => log(&format!("a connection on the KVMI socket failed: {e}")),
        }
    }
}

fn run_daemon(vm_path: &Path, map: Option<Arc<SymbolMap>>, key: Option<Vec<u8>>) -> Result<(), String> {
    let ctl = ctl_path(vm_path);
    if UnixStream::connect(&ctl).is_ok() {
        return Err(format!("a daemon already serves {}", ctl.display()));
    }
    let _ = std::fs::remove_file(&ctl);
    let ctl_sock = UnixListener::bind(&ctl).map_err(|e| format!("binding {}: {e}", ctl.display()))?;
    let listener = KvmiSocket::bind(vm_path).map_err(|e| format!("listening on {}: {e}", vm_path.display()))?;
    log(&format!("listening for the VMM on {}, commands on {}", vm_path.display(), ctl.display()));
    let state = Attached { key, ..Attached::default() };
    let d = Arc::new(Daemon {
        vm_path: vm_path.to_path_buf(),
        map,
        state: Mutex::new(state),
        cond: Condvar::new(),
        quit: AtomicBool::new(false),
        detaching: AtomicBool::new(false),
    });
    catch_stop_signals(&d);

    let acc = Arc::clone(&d);
    std::thread::Builder::new()
        .name("ctl-accept".into())
        .spawn(move || {
            for s in ctl_sock.incoming().flatten() {
                let d = Arc::clone(&acc);
                let _ = std::thread::Builder::new().name("ctl-client".into()).spawn(move || d.serve(s));
            }
        })
        .map_err(|e| format!("starting the control thread: {e}"))?;

    let att = Arc::clone(&d);
    std::thread::Builder::new()
        .name("kvmi-accept".into())
        .spawn(move || {
            let mon = accept_vm(&att, &listener);
            // The socket file goes once a VM is attached (only one is served).
            drop(listener);
            let name = mon.vm().info().name.clone();
            log(&format!("VM `{name}` attached: {} vCPUs", mon.vcpus()));
            let syms = symbols_for_vm(&mon, att.map.as_ref());
            let mut st = att.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.syms = syms;
            st.mon = Some(Arc::new(mon));
            st.refused = None;
            att.cond.notify_all();
        })
        .map_err(|e| format!("starting the accept thread: {e}"))?;

    // Run until the VM goes away, `detach`, a stop signal, or no VM came.
    let started = Instant::now();
    loop {
        if d.quit.load(Ordering::SeqCst) {
            break;
        }
        let st = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if d.detaching.load(Ordering::SeqCst) {
            drop(d.cond.wait_timeout(st, Duration::from_millis(200)));
            continue;
        }
        if st.mon.is_none() && started.elapsed() > NO_VM_TIMEOUT {
            log(&format!("no VM connected within {NO_VM_TIMEOUT:?}"));
            break;
        }
        if st.gone || st.mon.as_ref().is_some_and(|m| !m.is_running()) {
            log("the VM went away");
            break;
        }
        drop(d.cond.wait_timeout(st, Duration::from_millis(200)));
    }
    let mon = d.state.lock().ok().and_then(|mut s| s.mon.take());
    if let Some(m) = mon {
        m.stop();
    }
    let _ = std::fs::remove_file(&ctl);
    // Give clients a moment to read their last frames.
    std::thread::sleep(Duration::from_millis(100));
    flush_log_repeats();
    log("exiting");
    Ok(())
}
