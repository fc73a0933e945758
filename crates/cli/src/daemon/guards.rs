//! The daemon process's guards: one daemon per path (a lock file held for
//! its life, which also keeps the record of the VM last served there) and
//! the stop signals (taken by one thread).

use std::{
    fs::File,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, Arc},
};

use super::{log::log, Daemon};
use crate::control;

/// The daemon lock for a path, held (flock) while the daemon runs.
#[derive(Debug)]
pub(super) struct DaemonLock {
    file: File,
    path: PathBuf,
}

/// The longest record read back from a lock file.
const MAX_RECORD: usize = 4096;

impl DaemonLock {
    /// What the file holds: the record of the VM last served at this path.
    pub(super) fn record(&self) -> String {
        let mut buf = vec![0u8; MAX_RECORD];
        let n = self.file.read_at(&mut buf, 0).unwrap_or(0);
        String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned()
    }

    /// Replaces the record.
    pub(super) fn set_record(&self, text: &str) {
        if let Err(e) = self.file.set_len(0).and_then(|()| self.file.write_all_at(text.as_bytes(), 0)) {
            log(&format!("recording the VM in {}: {e}", self.path.display()));
        }
    }

    /// Removes the lock file, still holding the lock (a daemon that takes
    /// the lock of a removed file sees that and opens the path again).
    pub(super) fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// (device, inode) of an open file, or of a path (not following a symlink).
fn file_id(f: &File) -> Option<(u64, u64)> {
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// Takes the daemon lock for `vm` (see `control::lock_path`).
/// On failure: the exit status (`ALREADY_SERVED` when another daemon holds
/// the lock) and why.
pub(super) fn take_daemon_lock(vm: &Path) -> Result<DaemonLock, (u8, String)> {
    use std::os::fd::AsRawFd;
    let path = crate::control::lock_path(vm);
    // A daemon leaving without a VM removes the file while it holds the
    // lock; whoever got the lock of that removed file tries the path again.
    for _ in 0..20 {
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
        let at_path = std::fs::symlink_metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        if at_path.is_some() && at_path == file_id(&f) {
            return Ok(DaemonLock { file: f, path });
        }
    }
    Err((1, format!("{} keeps changing under the daemon", path.display())))
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
            d.wake();
        }
    });
}
