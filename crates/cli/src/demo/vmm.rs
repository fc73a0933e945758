//! The demo's VMM, a `ukvmi run` child process: starting it, noticing at
//! once that it exited, and stopping it (and removing the demo's directory)
//! when the demo is interrupted.

use std::{
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicI32, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

/// Starts `ukvmi run --guest demo` with `vcpus` vCPUs, introspected at
/// `sock`, its serial console and stderr piped to us.
pub(super) fn spawn(vcpus: u32, sock: &Path) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the ukvmi binary: {e}"))?;
    let mut vmm = Command::new(exe);
    vmm.args(["run", "--guest", "demo", "--name", "demo", "--vcpus", &vcpus.to_string(), "--introspect"])
        .arg(format!("unix:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the child between fork and exec and only calls
    // prctl, which is async-signal-safe: should this process die without
    // a word (SIGKILL), the VMM gets SIGTERM instead of running on alone.
    unsafe {
        vmm.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    vmm.spawn().map_err(|e| format!("starting `ukvmi run`: {e}"))
}

/// The VMM child, killed (and reaped) on drop if it still runs.
pub(super) struct VmChild(pub(super) Child);

impl Drop for VmChild {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The child's exit status once it ends, within `limit`.
pub(super) fn wait_child(c: &mut Child, limit: Duration) -> Option<String> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s.to_string());
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The VMM's connection to our listener; an error as soon as the VMM
/// exits first (no /dev/kvm, a bad option), with what it said.
pub(super) fn wait_for_vmm(
    rx: &mpsc::Receiver<ukvmi_introspector::Result<ukvmi_introspector::Vm>>,
    child: &mut Child,
    said: &mpsc::Receiver<String>,
) -> Result<ukvmi_introspector::Vm, String> {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(Ok(vm)) => return Ok(vm),
            Ok(Err(e)) => return Err(format!("the VMM's connection failed: {e}")),
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err("the listener thread died".into()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Its stderr to the end (the reader's sender goes when the pipe closes).
            let words: Vec<String> = std::iter::from_fn(|| said.recv_timeout(Duration::from_secs(2)).ok()).collect();
            let why = if words.is_empty() { "it said nothing".to_string() } else { words.join("\n    ") };
            return Err(format!("the VMM (`ukvmi run`) exited ({status}) before the guest booted:\n    {why}"));
        }
        if Instant::now() > end {
            return Err("the VMM did not connect within 15 s".into());
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP (Ctrl-C, `kill`, a closed terminal) stop the
/// VMM and remove the demo's directory before exiting with 128 + the
/// signal, as the default action would, minus the leftovers.
pub(super) fn on_stop_signal(dir: PathBuf, vmm: Arc<AtomicI32>) {
    // SAFETY: plain signal-set manipulation on a local set, then blocking
    // it in this thread (every thread started later inherits the mask).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let waiter = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on a valid set, writing the signal number to `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        let pid = vmm.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill and waitpid take plain integers and touch no
            // memory of ours. The pid is our child's: the main thread sets
            // it to 0 once it has reaped the child (should it reap it
            // first here, waitpid just fails with ECHILD).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        let _ = writeln!(
            std::io::stderr(),
            "ukvmi demo: stopped by signal {sig}; the VM is gone and {} removed",
            dir.display()
        );
        std::process::exit(128 + sig);
    });
    if waiter.is_err() {
        // Nobody would take them: let the signals act as they always do.
        // SAFETY: unblocking the same valid set in this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    }
}

/// A directory removed on drop.
pub(super) struct DirGuard(pub(super) PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
