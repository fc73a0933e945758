//! `ukvmi daemon`: holds the KVMI connection for one-shot tool commands.
//!
//! With KVMI the introspector listens and the VMM connects (as QEMU does),
//! and whatever a tool enables lasts only as long as its connection. So a
//! `ukvmi regs 0` cannot simply connect, ask and leave. The first tool
//! command for a socket path starts this daemon in the background (its log
//! goes to `PATH.log`); it listens on `PATH` for the VMM, attaches the event
//! engine ([`Monitor`]) when the VMM connects, and serves commands on the
//! control socket `PATH.ctl` (see `control/`), each in its own thread.
//! Long-running commands (`trace`, `watch-msr`, `protect`) own what they set
//! up: when their client goes away (Ctrl-C), it is undone before the next
//! command runs. The daemon exits when the VM goes away, on `ukvmi detach`,
//! or, when no VM ever connected, as soon as no command waits for one; then
//! it leaves no file behind. It serves one VM and refuses any other that
//! connects meanwhile; `PATH.lock` keeps the record of the VM last served,
//! so that the next daemon can say when the VM at the path changed.
//!
//! Everything it makes is private: it runs with umask 0177 (so `PATH` and
//! `PATH.ctl` are bound 0600, with no window), opens `PATH.lock` 0600 (its
//! client does the same for `PATH.log`), and serves only peers running as
//! its own uid or root, on either socket (`SO_PEERCRED`). The handshake key
//! comes from its environment (`UKVMI_KEY`, set by the client that starts
//! it) and, while no VM is attached, from each command's request.

mod guards;
mod in_flight;
mod kvmi_socket;
mod log;
mod serve;
pub(crate) mod symbols;
mod vmm_peer;

use std::{
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use ukvmi_monitor::{Monitor, SymbolMap};

use self::{
    guards::{catch_stop_signals, take_daemon_lock, DaemonLock},
    in_flight::InFlight,
    kvmi_socket::{accept_vm, remove_if_ours, KvmiSocket},
    log::{flush_log_repeats, log},
    symbols::symbols_for_vm,
    vmm_peer::{change_notice, refuse_others, set_served, uuid_hex, ServedVm},
};
use crate::{
    args::{MissingValue, Style, Word, Words},
    control::{self, ctl_path, log_path},
};
pub(crate) use symbols::symbols_for;
pub(crate) use vmm_peer::served_vm;

#[derive(Default)]
struct Attached {
    mon: Option<Arc<Monitor>>,
    syms: Option<Arc<SymbolMap>>,
    /// The attached VM went away (the monitor stopped).
    gone: bool,
    /// The key the next handshake answers with.
    key: Option<Vec<u8>>,
    /// The last failed handshake: the key it was answered with, why, when.
    refused: Option<(Option<Vec<u8>>, String, Instant)>,
    /// Something connected to the KVMI socket (a VMM, perhaps refused).
    vmm_seen: bool,
    /// A connection's handshake is under way: waiting commands wait for it.
    handshaking: bool,
    /// Commands being served, and how many were.
    clients: usize,
    served: u64,
    /// What the next command is told first (the VM at the path changed).
    notice: Option<String>,
    /// The symbol map: `--map` (its path and symbols), as last given.
    map: Option<(String, Arc<SymbolMap>)>,
    /// The daemon is leaving with no VM: a command that comes now is closed
    /// unanswered, and its client starts a new daemon.
    leaving: bool,
}

/// Never shows the key, only whether there is one.
impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("attached", &self.mon.is_some())
            .field("symbols", &self.syms.as_ref().map(|s| s.len()))
            .field("gone", &self.gone)
            .field("key", &self.key.as_ref().map(|_| "(set)"))
            .field("refused", &self.refused.as_ref().map(|(_, why, at)| (why, at)))
            .field("vmm_seen", &self.vmm_seen)
            .field("handshaking", &self.handshaking)
            .field("clients", &self.clients)
            .field("served", &self.served)
            .field("notice", &self.notice)
            .field("map", &self.map.as_ref().map(|(p, _)| p))
            .field("leaving", &self.leaving)
            .finish()
    }
}

#[derive(Debug)]
struct Daemon {
    vm_path: PathBuf,
    state: Mutex<Attached>,
    cond: Condvar,
    quit: AtomicBool,
    /// A `detach` is under way; `quit` follows once its client has its reply.
    detaching: AtomicBool,
    /// The commands being served (a new one waits for departed ones).
    in_flight: InFlight,
    /// The path's lock, held for the daemon's life; it keeps the record of
    /// the VM served.
    lock: DaemonLock,
}

impl Daemon {
    /// Wakes every wait on `cond` after a change made outside `state` (a
    /// flag): taking the lock first means a waiter that checked the flag
    /// before the change is already waiting, so it cannot miss this.
    fn wake(&self) {
        drop(self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        self.cond.notify_all();
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
                // A reader that went away (`| head`) ends it quietly.
                return match crate::tools::write_stdout(crate::TOOL_HELP) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(_) => ExitCode::FAILURE,
                };
            }
            other => {
                eprintln!("ukvmi daemon: unknown argument `{other}`");
                return ExitCode::from(2);
            }
        }
    }
    let vm = vm.unwrap_or_else(crate::default_vm_path);
    let map = match map_path.map(|p| load_map(&p).map(|m| (p, m))) {
        Some(Ok(m)) => Some(m),
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
    let lock = match take_daemon_lock(&vm) {
        Ok(f) => f,
        Err((code, e)) => {
            log(&e);
            return ExitCode::from(code);
        }
    };
    let r = run_daemon(&vm, map, key, lock);
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

/// How long a failed handshake counts against a command that comes after
/// it with the same key (the VMM retries every second by default).
pub(super) const REFUSAL_FRESH: Duration = Duration::from_secs(5);

/// How long the daemon waits for a VM before it gives up and exits.
const NO_VM_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a daemon that no VM connected to waits for its first command.
const NO_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a symbol map: a System.map, or a Linux vmlinux's symbols.
fn load_map(path: &str) -> Result<Arc<SymbolMap>, String> {
    symbols::load_map(path)
}

/// The VM just attached: remembered (for `info`, and in the lock file for
/// the next daemon), announced to the next command if the path served
/// another VM before, and given its symbols.
fn attached(d: &Arc<Daemon>, mon: Monitor, vmm: Option<vmm_peer::VmmPeer>, before: Option<&ServedVm>) {
    let i = mon.vm().info();
    let served = ServedVm { name: i.name.clone(), uuid: uuid_hex(&i.uuid), vmm };
    log(&format!("VM {} attached: {} vCPUs", served.describe(), mon.vcpus()));
    let notice = change_notice(before, &served, &d.vm_path.display().to_string());
    if let Some(n) = &notice {
        log(n.trim_start_matches("ukvmi: "));
    }
    d.lock.set_record(&served.to_record());
    set_served(served);
    watch_for_the_end(d, &mon);
    let map = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map.as_ref().map(|m| Arc::clone(&m.1));
    let syms = symbols_for_vm(&mon, map.as_ref());
    let mut st = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    st.syms = syms;
    st.mon = Some(Arc::new(mon));
    st.refused = None;
    st.handshaking = false;
    st.notice = notice;
    d.cond.notify_all();
}

/// Marks the VM gone (and wakes the main loop) when `mon` stops: the VM or
/// its connection went away, the VMM unhooked, or `detach`. A thread
/// waits for that on a subscription to no records, whose stream ends only
/// then: nothing wakes it before.
fn watch_for_the_end(d: &Arc<Daemon>, mon: &Monitor) {
    let sub = mon.subscribe(ukvmi_monitor::Kinds::default());
    let d = Arc::clone(d);
    let started = std::thread::Builder::new().name("vm-watch".into()).spawn(move || {
        while sub.next_until(None).is_ok() {}
        d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).gone = true;
        d.cond.notify_all();
    });
    if let Err(e) = started {
        // The main loop sees the monitor stopped once `attached` wakes it.
        log(&format!("cannot watch for the VM going away ({e}): detaching"));
        mon.stop();
    }
}

/// How the daemon's log ends: what a daemon that saw no VM leaves behind.
#[derive(Debug)]
struct LogStart {
    path: PathBuf,
    /// Its length before this daemon wrote to it.
    len: u64,
}

impl LogStart {
    /// Takes back what this daemon wrote (nothing in it is worth reading
    /// when no VM ever connected); a log that held nothing else goes.
    fn take_back(&self) {
        if self.len == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            use std::os::unix::fs::OpenOptionsExt;
            // The log as it is (not created again, never through a symlink).
            let f = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NOFOLLOW).open(&self.path);
            if let Ok(f) = f {
                let _ = f.set_len(self.len);
            }
        }
    }
}

fn run_daemon(
    vm_path: &Path,
    map: Option<(String, Arc<SymbolMap>)>,
    key: Option<Vec<u8>>,
    lock: DaemonLock,
) -> Result<(), String> {
    let log_start =
        LogStart { path: log_path(vm_path), len: std::fs::metadata(log_path(vm_path)).map_or(0, |m| m.len()) };
    let before = ServedVm::from_record(&lock.record());
    let ctl = ctl_path(vm_path);
    if UnixStream::connect(&ctl).is_ok() {
        return Err(format!("a daemon already serves {}", ctl.display()));
    }
    let _ = std::fs::remove_file(&ctl);
    let ctl_sock = UnixListener::bind(&ctl).map_err(|e| {
        lock.remove();
        format!("binding {}: {e}", ctl.display())
    })?;
    let listener = KvmiSocket::bind(vm_path).map_err(|e| {
        let _ = std::fs::remove_file(&ctl);
        lock.remove();
        format!("listening on {}: {e}", vm_path.display())
    })?;
    let sock_id = listener.id;
    log(&format!("listening for the VMM on {}, commands on {}", vm_path.display(), ctl.display()));
    let state = Attached { key, map, ..Attached::default() };
    let d = Arc::new(Daemon {
        vm_path: vm_path.to_path_buf(),
        state: Mutex::new(state),
        cond: Condvar::new(),
        quit: AtomicBool::new(false),
        detaching: AtomicBool::new(false),
        in_flight: InFlight::default(),
        lock,
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
            let (mon, vmm) = accept_vm(&att, &listener);
            attached(&att, mon, vmm, before.as_ref());
            // The socket stays: another VM that connects is refused in words.
            if let Some(served) = served_vm() {
                refuse_others(&listener, served);
            }
        })
        .map_err(|e| format!("starting the accept thread: {e}"))?;

    // Run until the VM goes away, `detach`, a stop signal, or no VM came.
    // Nothing here runs on a clock: whatever may end the loop wakes it (a
    // command ending, a handshake ending, the VM attaching or going away,
    // `detach`, a signal), and its only deadlines, while no VM is
    // attached, are waited for exactly.
    let started = Instant::now();
    let mut no_vm = false;
    let mut st = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if d.quit.load(Ordering::SeqCst) {
            break;
        }
        let mut deadline = None;
        // While a `detach` is under way, only `quit` ends the loop.
        if !d.detaching.load(Ordering::SeqCst) {
            if st.mon.is_none() {
                if started.elapsed() >= NO_VM_TIMEOUT {
                    log(&format!("no VM connected within {NO_VM_TIMEOUT:?}"));
                    no_vm = !st.vmm_seen;
                    break;
                }
                deadline = Some(started + NO_VM_TIMEOUT);
            }
            // No VM ever came and nobody waits: its command was answered (or
            // the client that started it left before asking).
            let unwanted = st.mon.is_none() && !st.vmm_seen && !st.handshaking && st.clients == 0;
            if unwanted && (st.served > 0 || started.elapsed() >= NO_CLIENT_TIMEOUT) {
                // Nothing here worth keeping: no file stays behind.
                log("no VM ever connected and no command waits for one");
                no_vm = true;
                st.leaving = true;
                break;
            }
            if unwanted {
                let at = started + NO_CLIENT_TIMEOUT;
                deadline = Some(deadline.map_or(at, |d: Instant| d.min(at)));
            }
            if st.gone || st.mon.as_ref().is_some_and(|m| !m.is_running()) {
                log("the VM went away");
                break;
            }
        }
        st = match deadline {
            None => d.cond.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner),
            Some(at) => d
                .cond
                .wait_timeout(st, at.saturating_duration_since(Instant::now()))
                .map_or_else(|e| e.into_inner().0, |r| r.0),
        };
    }
    drop(st);
    let mon = d.state.lock().ok().and_then(|mut s| s.mon.take());
    let served = mon.is_some() || served_vm().is_some();
    if let Some(m) = mon {
        m.stop();
    }
    let _ = std::fs::remove_file(&ctl);
    remove_if_ours(vm_path, sock_id);
    if !served {
        // Nothing to remember: the lock file goes (still locked).
        d.lock.remove();
    }
    // Give clients a moment to read their last frames.
    std::thread::sleep(Duration::from_millis(100));
    flush_log_repeats();
    log("exiting");
    if no_vm {
        log_start.take_back();
    }
    Ok(())
}
