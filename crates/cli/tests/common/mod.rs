//! Starting `ukvmi run` for tests, and reading what its guest printed.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod introspected;
pub mod walkthrough;

#[allow(unused_imports)] // not every test binary uses every helper
pub use introspected::{assert_no_event_while_running, code, read_u32, read_u64, start, start_all_up};

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Fails with a clear reason when KVM is missing: these tests never skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("these tests start real VMs and need /dev/kvm, which cannot be opened: {e}");
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("ukvmi-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ukvmi run`, killed on drop.
pub struct RunningVm {
    pub child: Child,
    pub serial: PathBuf,
    pub stderr: PathBuf,
}

impl RunningVm {
    /// Starts `ukvmi run ARGS --serial file:...` in `dir`.
    pub fn start(dir: &Scratch, args: &[&str]) -> RunningVm {
        require_kvm();
        let serial = dir.path("serial.log");
        let stderr = dir.path("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_ukvmi"))
            .arg("run")
            .args(args)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        RunningVm { child, serial, stderr }
    }

    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle` (at least `count` times).
    pub fn wait_serial(&self, needle: &str, count: usize, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.serial_text().matches(needle).count() >= count {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "serial never showed {count}× {needle:?} within {timeout:?}\nserial:\n{}\nstderr:\n{}",
            self.serial_text(),
            self.stderr_text()
        );
    }

    /// Asserts the guest keeps printing ticks.
    pub fn assert_guest_runs(&self) {
        let before = self.serial_text().matches("tick").count();
        self.wait_serial("tick", before + 2, Duration::from_secs(20));
    }

    /// The VMM's report of the interceptions in force (SIGUSR1), e.g.
    /// `interceptions: msr-writes=none guest-debug=vcpu0:singlestep`.
    #[allow(dead_code)] // not every test binary uses it
    pub fn interceptions(&self) -> String {
        let lines =
            |s: String| s.lines().filter(|l| l.contains("interceptions:")).map(str::to_string).collect::<Vec<_>>();
        let before = lines(self.stderr_text()).len();
        self.signal(libc::SIGUSR1);
        let t0 = Instant::now();
        loop {
            let now = lines(self.stderr_text());
            if now.len() > before {
                return now[before].clone();
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no interception report:\n{}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.stderr_text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("stderr never showed {needle:?}:\n{}", self.stderr_text());
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the process to end.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > timeout {
                panic!("ukvmi did not exit within {timeout:?}; stderr:\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the VMM said (why a connection closed,
        // how a vCPU failed) and what the guest printed last, which its own
        // message rarely can.
        if std::thread::panicking() {
            for (what, text) in [("stderr", self.stderr_text()), ("serial output", self.serial_text())] {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- the VMM's {what} (last {} lines):", tail.len());
                for l in tail.iter().rev() {
                    eprintln!("    {l}");
                }
            }
        }
    }
}

/// The pids of the `ukvmi daemon` processes serving `sock`.
pub fn daemon_pids(sock: &std::path::Path) -> Vec<u32> {
    let want = sock.to_string_lossy().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = c.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).to_string()).collect();
            (args.get(1).is_some_and(|a| a == "daemon") && args.contains(&want)).then_some(pid)
        })
        .collect()
}
