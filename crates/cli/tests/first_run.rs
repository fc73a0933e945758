//! A new user's first commands (issue 13), end to end: `ukvmi run` checks
//! a built-in guest's needs up front and explains a `--kernel` that is no
//! image for it, SIGUSR1 lists the restricted pages `run --help` promises,
//! and `ukvmi demo` reports a VMM that cannot start at once and leaves
//! nothing behind when it is interrupted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::os::unix::{
    fs::PermissionsExt,
    process::{CommandExt, ExitStatusExt},
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{code, start, RunningVm, Scratch};
use ukvmi_introspector::wire::access::{R, RWX, X};

const UKVMI: &str = env!("CARGO_BIN_EXE_ukvmi");
const T: Duration = Duration::from_secs(20);

fn ukvmi(args: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let o = Command::new(UKVMI).args(args).stdin(Stdio::null()).output().unwrap();
    (o, t0.elapsed())
}

/// The demo OS runs on: its shell says hello twice more.
fn demo_runs(vm: &RunningVm) {
    let n = vm.serial_text().matches("shell: hello").count();
    vm.wait_serial("shell: hello", n + 2, T);
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What is left in `dir` (a private TMPDIR).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect()
}

#[test]
fn a_builtin_guest_is_refused_less_ram_than_it_needs() {
    common::require_kvm();
    let (o, took) = ukvmi(&["run", "--guest", "demo", "--memory", "16"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("ukvmi run: --memory 16 is too little for guest demo: it needs at least 32 MiB"),
        "the refusal names the need: {err}"
    );
    assert!(!err.contains("VM failed") && !err.contains("INTERNAL_ERROR"), "{err}");
    assert!(took < Duration::from_secs(2), "refused up front, in {took:?}");
    // The stated need is enough: the same guest boots in exactly 32 MiB.
    let dir = Scratch::new("first-run-mem");
    let vm = RunningVm::start(&dir, &["--guest", "demo", "--memory", "32"]);
    vm.wait_serial("ukos: boot done", 1, T);
    demo_runs(&vm);
    // And `run --help` says what each guest needs.
    let (o, _) = ukvmi(&["run", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("    demo         needs 32 MiB, uses 2 vCPUs"), "{help}");
}

#[test]
fn vcpus_a_builtin_guest_never_starts_are_warned_about_and_stay_idle() {
    let dir = Scratch::new("first-run-vcpus");
    let (vm, _l, tool) = start(&dir, "demo", 3, &[]);
    vm.wait_serial("ukos: kernel booting on 2 vCPU(s)", 1, T);
    vm.wait_stderr(
        "ukvmi run: warning: guest demo uses at most 2 vCPUs (--vcpus 3): vCPU 2 is created but never started; \
         it stays idle and KVMI vCPU commands to it answer -KVM_EAGAIN",
        T,
    );
    vm.wait_serial("vcpu 1 up", 1, T);
    // What the warning says happens: vCPU 1 answers, vCPU 2 never will.
    assert_eq!(code(tool.get_registers(1, &[])), 0);
    assert_eq!(code(tool.get_registers(2, &[])), -11, "vCPU 2 was never started: -KVM_EAGAIN");
    demo_runs(&vm);
    assert_eq!(code(tool.get_registers(2, &[])), -11, "and it still is not, while the guest runs");
    // `ukvmi demo` cannot use a third vCPU either: it says so up front
    // (it used to attach, then fail on the idle vCPU's events).
    let (o, took) = ukvmi(&["demo", "--vcpus", "3"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.starts_with("ukvmi demo: --vcpus takes 1 to 2 (the demo OS uses at most 2 vCPUs), not `3`"), "{err}");
    assert!(o.stdout.is_empty() && took < Duration::from_secs(2), "{took:?}");
    // A guest that uses every vCPU it is given gets no warning.
    let dir = Scratch::new("first-run-vcpus-spin");
    let spin = RunningVm::start(&dir, &["--guest", "spin", "--vcpus", "3"]);
    spin.wait_serial("vcpu 2 up", 1, T);
    assert!(!spin.stderr_text().contains("warning"), "{}", spin.stderr_text());
}

/// A flat binary: `mov $0x3f8,%dx; mov $'x',%al; out %al,%dx; mov $'\n',%al;
/// out %al,%dx; ud2`: it prints "x" on the VMM's serial port, then faults
/// with no IDT (a triple fault).
const SPEAKS_THEN_FAULTS: [u8; 12] = [0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee, 0xb0, b'\n', 0xee, 0x0f, 0x0b];

#[test]
fn a_kernel_that_is_no_image_for_ukvmi_fails_with_a_hint() {
    common::require_kvm();
    let (o, took) = ukvmi(&["run", "--kernel", "/etc/passwd"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("ukvmi: VM failed: vCPU 0:"), "{err}");
    let hint = err.lines().find(|l| l.starts_with("ukvmi: hint:")).unwrap_or_else(|| panic!("no hint: {err}"));
    for needle in ["/etc/passwd", "64-bit", "ring 0", "1 MiB (0x100000)", "ELF64", "crates/guests/README.md"] {
        assert!(hint.contains(needle), "the hint lacks `{needle}`: {hint}");
    }
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A kernel that got as far as talking to the VMM follows the ABI: its
    // later failure is its own, and gets no hint.
    let dir = Scratch::new("first-run-kernel");
    let k = dir.path("speaks.bin");
    std::fs::write(&k, SPEAKS_THEN_FAULTS).unwrap();
    let serial = dir.path("serial.log");
    let (o, _) = ukvmi(&["run", "--kernel", k.to_str().unwrap(), "--serial", &format!("file:{}", serial.display())]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("ukvmi: VM failed: vCPU 0:"), "{err}");
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), "x\n", "it did speak");
    assert!(!err.contains("hint:"), "{err}");
}

#[test]
fn sigusr1_lists_the_restricted_pages() {
    let dir = Scratch::new("first-run-usr1");
    let (vm, _l, tool) = start(&dir, "spin", 1, &[]);
    vm.wait_serial("vcpu 0 up", 1, T);
    let report = vm.interceptions();
    assert!(report.ends_with("restricted-pages=none"), "{report}");
    tool.set_page_access(&[(0x50_0000, R | X), (0x50_1000, 0), (0x20_3000, R)]).unwrap();
    let report = vm.interceptions();
    assert!(
        report.ends_with("restricted-pages=0x203000:r--,0x500000:r-x,0x501000:---"),
        "every restricted page, by address, with what the guest may still do: {report}"
    );
    assert!(report.contains("msr-writes=none guest-debug=none"), "{report}");
    tool.set_page_access(&[(0x50_0000, RWX), (0x50_1000, RWX), (0x20_3000, RWX)]).unwrap();
    let report = vm.interceptions();
    assert!(report.ends_with("restricted-pages=none"), "{report}");
}

/// A copy of the binary that `nobody` can run (the build tree may sit below
/// a directory only we can enter).
fn runnable_by_nobody(dir: &Scratch) -> PathBuf {
    let copy = dir.path("ukvmi");
    std::fs::copy(UKVMI, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

#[test]
fn the_demo_reports_a_vmm_that_cannot_start_at_once() {
    common::require_kvm();
    let dir = Scratch::new("first-run-nokvm");
    let exe = runnable_by_nobody(&dir);
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut cmd = Command::new(&exe);
    cmd.arg("demo").env("TMPDIR", &tmp).stdin(Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls setgroups/setgid/setuid, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t0 = Instant::now();
    let o = cmd.output().unwrap();
    let took = t0.elapsed();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{err}\n{out}");
    assert!(
        err.contains("ukvmi demo: the VMM (`ukvmi run`) exited (exit status: 1) before the guest booted:"),
        "{err}"
    );
    assert!(err.contains("ukvmi run: cannot use /dev/kvm: Permission denied"), "its own words: {err}");
    assert!(!out.contains("booted demo guest"), "{out}");
    assert!(took < Duration::from_secs(3), "noticed at once, not after 15 s: {took:?}");
    assert_eq!(leftovers(&tmp), Vec::<PathBuf>::new());
}

/// The pid in "VMM pid N" of the demo's output.
fn vmm_pid(out: &str) -> Option<i32> {
    out.split("VMM pid ").nth(1)?.split_whitespace().next()?.parse().ok()
}

#[test]
fn an_interrupted_demo_leaves_no_files_and_no_vm() {
    common::require_kvm();
    // SIGKILL cannot be caught: the directory stays, but the VM does not
    // run on alone (the VMM gets SIGTERM when the demo dies).
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGKILL] {
        let dir = Scratch::new("first-run-demo-sig");
        let tmp = dir.path("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let log = dir.path("out.log");
        let child = Command::new(UKVMI)
            .args(["demo", "--duration", "60"])
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        let out = loop {
            let out = std::fs::read_to_string(&log).unwrap_or_default();
            if out.contains("watching") {
                break out;
            }
            assert!(t0.elapsed() < T, "the demo never got to its watch:\n{out}");
            std::thread::sleep(Duration::from_millis(50));
        };
        let pid = vmm_pid(&out).unwrap_or_else(|| panic!("no VMM pid:\n{out}"));
        assert!(Path::new(&format!("/proc/{pid}")).exists(), "the VMM runs");
        assert_eq!(leftovers(&tmp), [tmp.join(format!("ukvmi-demo-{}", child.id()))], "the demo's directory");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        let t1 = Instant::now();
        let o = child.wait_with_output().unwrap();
        assert!(t1.elapsed() < Duration::from_secs(5), "{:?}", t1.elapsed());
        let err = stderr(&o);
        if sig == libc::SIGKILL {
            assert_eq!(o.status.signal(), Some(sig), "{err}");
            // Gone, or a zombie its new parent has not reaped yet.
            let gone = || {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map_or(true, |st| st.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')))
            };
            let t2 = Instant::now();
            while !gone() && t2.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(gone(), "the VMM (pid {pid}) stopped when the demo was killed");
            continue;
        }
        assert_eq!(o.status.code(), Some(128 + sig), "{err}");
        assert!(err.contains(&format!("ukvmi demo: stopped by signal {sig}")), "{err}");
        assert_eq!(leftovers(&tmp), Vec::<PathBuf>::new(), "nothing left in TMPDIR after signal {sig}");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "the VMM (pid {pid}) is gone too");
    }
}

#[test]
fn the_first_commands_leave_nothing_in_tmpdir() {
    common::require_kvm();
    let dir = Scratch::new("first-run-tmp");
    let tmp = dir.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let run = |args: &[&str]| Command::new(UKVMI).args(args).env("TMPDIR", &tmp).stdin(Stdio::null()).output().unwrap();
    let o = run(&["demo", "--vcpus", "1", "--duration", "1"]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
    assert!(String::from_utf8_lossy(&o.stdout).contains("never crashed"));
    assert_eq!(run(&["run", "--help"]).status.code(), Some(0));
    assert_eq!(run(&["run", "--kernel", "/etc/passwd"]).status.code(), Some(1));
    assert_eq!(run(&["run", "--guest", "demo", "--memory", "16"]).status.code(), Some(1));
    assert_eq!(run(&["demo", "--bogus"]).status.code(), Some(2));
    assert_eq!(leftovers(&tmp), Vec::<PathBuf>::new());
}
