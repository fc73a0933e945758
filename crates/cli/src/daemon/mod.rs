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
//! up: when their client goes away (Ctrl-C), it is undone. The daemon exits
//! when the VM goes away, or on `ukvmi detach`.
//!
//! Everything it makes is private: it runs with umask 0177 (so `PATH` and
//! `PATH.ctl` are bound 0600, with no window), opens `PATH.lock` 0600 (its
//! client does the same for `PATH.log`), and serves only peers running as
//! its own uid or root, on either socket (`SO_PEERCRED`). The handshake key
//! comes from its environment (`UKVMI_KEY`, set by the client that starts
//! it) and, while no VM is attached, from each command's request.

mod guards;
mod kvmi_socket;
mod log;
mod serve;
mod symbols;

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
    guards::{catch_stop_signals, take_daemon_lock},
    kvmi_socket::{accept_vm, KvmiSocket},
    log::{flush_log_repeats, log},
    symbols::symbols_for_vm,
};
use crate::{
    args::{MissingValue, Style, Word, Words},
    control::{self, ctl_path},
};
pub(crate) use symbols::symbols_for;

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

/// Never shows the key, only whether there is one.
impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("attached", &self.mon.is_some())
            .field("symbols", &self.syms.as_ref().map(|s| s.len()))
            .field("gone", &self.gone)
            .field("key", &self.key.as_ref().map(|_| "(set)"))
            .field("refused", &self.refused.as_ref().map(|(_, why, at)| (why, at)))
            .finish()
    }
}

#[derive(Debug)]
struct Daemon {
    vm_path: PathBuf,
    map: Option<Arc<SymbolMap>>,
    state: Mutex<Attached>,
    cond: Condvar,
    quit: AtomicBool,
    /// A `detach` is under way; `quit` follows once its client has its reply.
    detaching: AtomicBool,
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

/// How long a failed handshake counts against a command that comes after
/// it with the same key (the VMM retries every second by default).
pub(super) const REFUSAL_FRESH: Duration = Duration::from_secs(5);

/// How long the daemon waits for a VM before it gives up and exits.
const NO_VM_TIMEOUT: Duration = Duration::from_secs(300);

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
