//! The daemon process's guards: one daemon per path (a lock file held for
//! its life) and the stop signals (taken by one thread).

use std::{
    path::Path,
    sync::{atomic::Ordering, Arc},
};

use super::{log::log, Daemon};
use crate::control;

/// Takes the daemon lock for `vm` (see `control::lock_path`).
/// On failure: the exit status (`ALREADY_SERVED` when another daemon holds
/// the lock) and why.
pub(super) fn take_daemon_lock(vm: &Path) -> Result<std::fs::File, (u8, String)> {
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

/// SIGINT, SIGTERM and SIGHUP are blocked in every thread and taken by one
/// waiter, which asks the daemon to undo everything and exit.
pub(super) fn catch_stop_signals(d: &Arc<Daemon>) {
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
