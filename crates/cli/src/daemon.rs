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

use std::{
    io::{Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use ukvmi_introspector::Listener;
use ukvmi_monitor::{Monitor, SymbolMap};

use crate::{
    control::{self, ctl_path},
    tools::{self, Ctx, Out},
};

#[derive(Default)]
struct Attached {
    mon: Option<Arc<Monitor>>,
    syms: Option<Arc<SymbolMap>>,
    gone: bool,
}

struct Daemon {
    vm_path: PathBuf,
    map: Option<Arc<SymbolMap>>,
    state: Mutex<Attached>,
    cond: Condvar,
    quit: AtomicBool,
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
    fn wait_attached(&self, out: &mut dyn Out, wait: Duration) -> Result<(Arc<Monitor>, Option<Arc<SymbolMap>>), String> {
        let deadline = Instant::now() + wait;
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut told = false;
        loop {
            if let Some(m) = &st.mon {
                return Ok((Arc::clone(m), st.syms.clone()));
            }
            if st.gone {
                return Err("the VM went away".into());
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
            st = self.cond.wait_timeout(st, left.min(Duration::from_millis(200))).map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }

    fn serve(self: &Arc<Self>, mut sock: UnixStream) {
        let Ok((flags, args)) = control::read_request(&mut sock) else {
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
        let mut out = SockOut { sock: wsock, stderr_tty: flags & 1 != 0, gone };
        let status = self.run(&args, &mut out);
        let _ = control::write_frame(&mut sock, control::EXIT, &[status]);
        let _ = sock.flush();
    }

    fn run(self: &Arc<Self>, args: &[String], out: &mut SockOut) -> u8 {
        if args.first().map(String::as_str) == Some("detach") {
            let mon = self.state.lock().ok().and_then(|s| s.mon.clone());
            if let Some(m) = mon {
                m.stop();
            }
            let _ = out.line("detached: interceptions undone, vCPUs running, connection closed");
            self.quit.store(true, Ordering::SeqCst);
            self.cond.notify_all();
            return 0;
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

fn log(msg: &str) {
    eprintln!("[ukvmi daemon {}] {msg}", std::process::id());
}

/// `ukvmi daemon --vm PATH [--map FILE]` (normally started by a tool command).
pub fn main(args: &[String]) -> ExitCode {
    let mut vm: Option<PathBuf> = None;
    let mut map_path: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--vm" => vm = it.next().map(PathBuf::from),
            "--map" => map_path = it.next().cloned(),
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
    let map = match map_path.map(|p| std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}")).and_then(|t| SymbolMap::parse(&t).map_err(|e| format!("{p}: {e}")))) {
        Some(Ok(m)) => Some(Arc::new(m)),
        Some(Err(e)) => {
            log(&format!("cannot use the symbol map: {e}"));
            return ExitCode::FAILURE;
        }
        None => None,
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
    match run_daemon(&vm, map) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(&e);
            ExitCode::FAILURE
        }
    }
}

/// Takes the daemon lock for `vm` (see `control::lock_path`).
/// On failure: the exit status (`ALREADY_SERVED` when another daemon holds
/// the lock) and why.
fn take_daemon_lock(vm: &Path) -> Result<std::fs::File, (u8, String)> {
    use std::os::fd::AsRawFd;
    let path = crate::control::lock_path(vm);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| (1, format!("opening the daemon lock {}: {e}", path.display())))?;
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

fn run_daemon(vm_path: &Path, map: Option<Arc<SymbolMap>>) -> Result<(), String> {
    let ctl = ctl_path(vm_path);
    if UnixStream::connect(&ctl).is_ok() {
        return Err(format!("a daemon already serves {}", ctl.display()));
    }
    let _ = std::fs::remove_file(&ctl);
    let ctl_sock = UnixListener::bind(&ctl).map_err(|e| format!("binding {}: {e}", ctl.display()))?;
    let listener = Listener::bind(vm_path).map_err(|e| format!("listening on {}: {e}", vm_path.display()))?;
    log(&format!("listening for the VMM on {}, commands on {}", vm_path.display(), ctl.display()));
    let d = Arc::new(Daemon { vm_path: vm_path.to_path_buf(), map, state: Mutex::new(Attached::default()), cond: Condvar::new(), quit: AtomicBool::new(false) });
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
            // A connection that fails its handshake (a stray client) does
            // not end the wait: the next one may be the VMM.
            let mut attached = None;
            for vm in listener.incoming() {
                match vm.map_err(|e| e.to_string()).and_then(|vm| Monitor::start(vm).map_err(|e| e.to_string())) {
                    Ok(mon) => {
                        attached = Some(mon);
                        break;
                    }
                    Err(e) => log(&format!("a connection on the KVMI socket failed: {e}")),
                }
            }
            let mut st = att.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match attached {
                Some(mon) => {
                    let name = mon.vm().info().name.clone();
                    log(&format!("VM `{name}` attached: {} vCPUs", mon.vcpus()));
                    st.syms = symbols_for_vm(&mon, att.map.as_ref());
                    st.mon = Some(Arc::new(mon));
                }
                None => st.gone = true,
            }
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
    log("exiting");
    Ok(())
}
