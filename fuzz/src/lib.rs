//! The harnesses behind the fuzz targets in `fuzz_targets/` (one module per
//! target family), and the seed inputs (`seeds`). See `README.md`.
//!
//! Built by `cargo fuzz` with libFuzzer's coverage instrumentation on stable
//! Rust (`--sanitizer none`), debug assertions and overflow checks on.
//! libfuzzer-sys installs a panic hook that aborts the process, so a panic
//! on any thread (an endpoint thread, a fake vCPU) is a crash, even where
//! the code would catch it.

pub mod btf;
pub mod endpoint;
pub mod handshake;
pub mod kimage;
pub mod seeds;
pub mod wire;

/// Once per process: ignore SIGPIPE, as every Rust `main` does.
///
/// The fuzz targets have libFuzzer's C `main`, so Rust's runtime never set
/// SIGPIPE to ignored; the endpoint and the introspector library write to
/// sockets whose peer may be gone (a tool that closed early) and rely on
/// getting `EPIPE` instead of being killed, like the `ukvmi` binary that
/// embeds them.
pub fn init_process() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN has no
        // preconditions; no handler code is involved.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// A watchdog for hangs: when one input has run longer than
/// `UKVMI_FUZZ_WATCHDOG_SECS` (default 45 s, below scripts/fuzz's 60 s
/// libFuzzer `-timeout`), it prints every thread's stack once (through gdb,
/// when it is installed), so that a timeout report says where it hung;
/// libFuzzer without a sanitizer prints no stack of its own.
pub struct Watch(());

impl Watch {
    /// Starts watching the current input.
    pub fn start() -> Watch {
        use std::sync::atomic::Ordering;
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let limit = std::env::var("UKVMI_FUZZ_WATCHDOG_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(45u64);
            let _ = std::thread::Builder::new().name("fuzz-watchdog".into()).spawn(move || watchdog(limit));
        });
        STARTED.store(now_ms(), Ordering::SeqCst);
        Watch(())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        STARTED.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

static STARTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn watchdog(limit_s: u64) {
    use std::sync::atomic::Ordering;
    let mut reported = 0;
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let started = STARTED.load(Ordering::SeqCst);
        if started == 0 || started == reported || now_ms().saturating_sub(started) < limit_s * 1000 {
            continue;
        }
        reported = started;
        dump_stacks(&format!("this input has run for {limit_s} s"));
    }
}

/// Prints every thread's stack (through gdb, when it is installed), with
/// `why` first. `UKVMI_FUZZ_STACKS=0` skips the stacks (scripts/fuzz's
/// replay of the known bugs).
pub fn dump_stacks(why: &str) {
    if std::env::var_os("UKVMI_FUZZ_STACKS").is_some_and(|v| v == "0") {
        eprintln!("fuzz watchdog: {why}");
        return;
    }
    eprintln!("fuzz watchdog: {why}; every thread's stack:");
    // SAFETY: prctl(PR_SET_PTRACER) with integer arguments: lets gdb attach
    // to this process under Yama's ptrace restrictions.
    unsafe { libc::prctl(libc::PR_SET_PTRACER, libc::PR_SET_PTRACER_ANY, 0, 0, 0) };
    let pid = std::process::id().to_string();
    let out = std::process::Command::new("gdb")
        .args(["-p", &pid, "-batch", "-nx", "-ex", "set pagination off", "-ex", "thread apply all bt"])
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) => eprintln!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => eprintln!("fuzz watchdog: cannot run gdb ({e}); install it for stacks"),
    }
}
