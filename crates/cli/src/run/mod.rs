//! `ukvmi run`: builds the VM its options ask for (see `options.rs`), runs
//! it with the stop signals taken by one thread, and maps the outcome to an
//! exit status with a one-line reason.

mod help;
mod options;

use std::process::ExitCode;
use std::sync::Arc;

use ukvmi_vmm::{Exit, FailureCause, Image, Vm};

pub(crate) use help::help;
use options::parse;

/// A warning when the socket's directory lets other users create files:
/// one of them could listen at the path before the tool does (the VMM then
/// refuses it by its uid, but the real tool cannot attach either).
fn shared_directory_warning(sock: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dir = sock.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let meta = std::fs::metadata(dir).ok()?;
    (meta.mode() & 0o002 != 0).then(|| {
        format!(
            "warning: {} is writable by every user: another user could listen at {} first. \
             ukvmi only talks to a listener running as its own user or root, but prefer a private directory",
            dir.display(),
            sock.display()
        )
    })
}

/// What to check when a `--kernel` image fails before it ever talked to the
/// VMM: most likely it is not an image for ukvmi's guest ABI at all.
fn kernel_hint(kernel: &std::path::Path) -> String {
    format!(
        "ukvmi: hint: the guest failed in its first instructions, before it wrote to any ukvmi port. \
         Check that {} is a 64-bit x86 image that runs in ring 0: a flat binary linked to run at \
         1 MiB (0x100000) or an ELF64 executable, entered in long mode with identity-mapped paging \
         (the ABI: crates/guests/README.md, \"Machine state at entry\"; `ukvmi run --help`)",
        kernel.display()
    )
}

/// One line to stderr. Never panics: a closed or broken stderr (a pipe whose
/// reader left) must not take a thread down with it.
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// SIGINT/SIGTERM (stop) and SIGUSR1 (report the interceptions in force)
/// are blocked in every thread and taken by one waiter thread.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain signal-set manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

pub(crate) fn main(args: &[String]) -> ExitCode {
    let cfg = match parse(args) {
        Ok(Some(c)) => c,
        Ok(None) => {
            // A reader that went away (`| head`) ends it quietly.
            return match crate::tools::write_stdout(&help()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Err(e) => {
            say(&format!("ukvmi run: {e}"));
            return ExitCode::from(1);
        }
    };
    if let Some(w) = cfg.introspect.as_ref().and_then(|i| shared_directory_warning(&i.path)) {
        say(&format!("ukvmi: {w}"));
    }
    let builtin = match &cfg.image {
        Image::Builtin(b) => ukvmi_guests::find(b.name),
        Image::Kernel(_) | Image::Linux { .. } => None,
    };
    if let Some(w) = builtin.and_then(|g| options::idle_vcpus_warning(g, cfg.vcpus)) {
        say(&format!("ukvmi run: {w}"));
    }
    let kernel = match &cfg.image {
        Image::Kernel(p) => Some(p.clone()),
        Image::Builtin(_) | Image::Linux { .. } => None,
    };
    let set = block_stop_signals();
    let log: Arc<dyn Fn(&str) + Send + Sync> = Arc::new(|m: &str| say(&format!("ukvmi: {m}")));
    let vm = match Vm::new(cfg, Arc::clone(&log)) {
        Ok(vm) => vm,
        Err(e) => {
            say(&format!("ukvmi run: {}", crate::vmm_errors::describe(&e)));
            return ExitCode::from(1);
        }
    };
    let stop = vm.stop_handle();
    let spoke = vm.stop_handle();
    let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: sigwait on a valid set, writing the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            if sig == libc::SIGUSR1 {
                say(&format!("ukvmi: {}", stop.interceptions()));
                continue;
            }
            // Stop first: nothing said afterwards can keep the VM running.
            stop.stop();
            say(&format!("ukvmi: signal {sig}: stopping the VM"));
            return;
        }
    });
    match vm.run() {
        Exit::PowerOff(s) => {
            if s != 0 {
                say(&format!("ukvmi: the guest powered off with status {s}"));
            }
            ExitCode::from(s)
        }
        Exit::Stopped => ExitCode::SUCCESS,
        Exit::Reset => {
            say("ukvmi: the guest reset the machine (i8042 or 0xcf9): the VM ends");
            ExitCode::SUCCESS
        }
        Exit::Crashed(why) => {
            say(&format!("ukvmi: VM crashed: {why}"));
            ExitCode::from(2)
        }
        Exit::Failed(why) => {
            say(&format!("ukvmi: VM failed: {why}"));
            if let Some(k) = kernel.filter(|_| !spoke.guest_spoke() && matches!(why.cause, FailureCause::Fatal { .. }))
            {
                say(&kernel_hint(&k));
            }
            ExitCode::from(1)
        }
    }
}
