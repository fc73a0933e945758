//! The real kvmi-v7 clients, unmodified, against `ukvmi run --kvmi-dialect
//! v7`: libkvmi's `hookguest-libkvmi`, LibVMI's KVM driver through its
//! example programs, and a small libkvmi harness of ours. `scripts/peers`
//! (run by `scripts/test`) builds them from the pinned archives into
//! `target/peers/`; a missing build fails these tests, it never skips them.
//!
//! Each case checks the tool's exit status and output, that the VMM logged
//! the connection, and that the guest still runs afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{RunningVm, Scratch};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// Where `scripts/peers` put the clients.
struct Peers {
    bin: PathBuf,
    lib: PathBuf,
    stub: PathBuf,
}

impl Peers {
    fn find() -> Peers {
        let top = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let from_env = |var: &str, default: PathBuf| std::env::var_os(var).map_or(default, PathBuf::from);
        let root = top.join("target/peers");
        let prefix = from_env("UKVMI_PEERS_PREFIX", root.join("prefix"));
        let peers = Peers {
            bin: from_env("UKVMI_PEERS_BIN", root.join("bin")),
            lib: prefix.join("lib"),
            stub: from_env("UKVMI_PEERS_STUB", root.join("stub")),
        };
        for tool in [
            "hookguest-libkvmi",
            "vmi-dump-memory",
            "vmi-rwmem",
            "msr-event-example",
            "singlestep-event-example",
            "interrupt-event-example",
            "ukvmi-v7-harness",
        ] {
            assert!(
                peers.bin.join(tool).is_file(),
                "the third-party KVMI clients are not built ({} is missing): run scripts/peers \
                 (scripts/test does), which builds libkvmi and LibVMI from the pinned archives",
                peers.bin.join(tool).display()
            );
        }
        assert!(peers.stub.join("libvirt.so.0").is_file(), "the libvirt stand-in is not built: run scripts/peers");
        peers
    }

    /// Starts `tool ARGS` in `dir` with the libvirt stand-in and the
    /// peers' libraries first on the library path; its stdout and stderr
    /// both go to `dir/NAME.out`.
    fn spawn(&self, dir: &Scratch, name: &str, tool: &str, args: &[&str]) -> Tool {
        let out = dir.path(&format!("{name}.out"));
        let file = std::fs::File::create(&out).unwrap();
        // Line-buffered: the examples print through stdio, which would keep
        // a pipe's or file's lines until exit.
        let child = Command::new("stdbuf")
            .args(["-oL", "-eL"])
            .arg(self.bin.join(tool))
            .args(args)
            .current_dir(&dir.0)
            .env("LD_LIBRARY_PATH", format!("{}:{}", self.stub.display(), self.lib.display()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {tool}: {e}"));
        Tool { child, out, name: tool.to_string() }
    }
}

/// A running third-party tool, killed on drop.
struct Tool {
    child: Child,
    out: PathBuf,
    name: String,
}

impl Tool {
    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    fn count(&self, needle: &str) -> usize {
        self.output().matches(needle).count()
    }

    /// Waits until the output holds `needle` at least `n` times.
    fn wait_for(&mut self, needle: &str, n: usize, vm: &RunningVm) {
        let t0 = Instant::now();
        while self.count(needle) < n {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({st}) before printing {n}× {needle:?}:\n{}\nVMM stderr:\n{}",
                    self.name,
                    self.output(),
                    vm.stderr_text()
                );
            }
            assert!(
                t0.elapsed() < T,
                "{} printed {needle:?} only {}× of {n} within {T:?}:\n{}\nVMM stderr:\n{}",
                self.name,
                self.count(needle),
                self.output(),
                vm.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self, vm: &RunningVm) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t0.elapsed() < T,
                "{} did not exit within {T:?}:\n{}\nVMM stderr:\n{}",
                self.name,
                self.output(),
                vm.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ctrl-C, as a user stops LibVMI's event examples; they exit 0.
    fn interrupt(&mut self, vm: &RunningVm) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.wait(vm)
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} printed:\n{}", self.name, self.output());
        }
    }
}

/// The VM, connecting to `sock` every 0.2 s until a tool is there.
fn vm(dir: &Scratch, guest: &str, vcpus: &str, dialect: Option<&str>) -> RunningVm {
    let sock = dir.path("kvmi.sock");
    let sock = format!("unix:{}", sock.display());
    let mut args = vec!["--guest", guest, "--vcpus", vcpus, "--introspect", &sock, "--reconnect", "0.2"];
    if let Some(d) = dialect {
        args.extend(["--kvmi-dialect", d]);
    }
    RunningVm::start(dir, &args)
}

/// The guest still runs: its serial console keeps growing. Shown first
/// that it printed something at all, then that it prints more.
fn assert_guest_runs(vm: &RunningVm) {
    let lines = || vm.serial_text().lines().count();
    let t0 = Instant::now();
    let before = lines();
    while lines() < before + 2 {
        assert!(
            t0.elapsed() < T,
            "the guest stopped printing ({before} serial lines, none since)\nstderr:\n{}",
            vm.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(vm.stderr_text().lines().all(|l| !l.contains("VM failed") && !l.contains("VM crashed")));
}

/// The VMM logged a v7 connection that came and went.
fn assert_connection_logged(vm: &RunningVm) {
    vm.wait_stderr("introspector connected at", T);
    vm.wait_stderr("introspector disconnected", T);
}

/// Events of one kind (`PAUSE`, `PF`, ...) the VMM sent on the first
/// connection, from its disconnect line ("after 3 events (PAUSE 2, PF 1)").
fn events_sent(vm: &RunningVm, kind: &str) -> u32 {
    let text = vm.stderr_text();
    let line = text.lines().find(|l| l.contains("introspector disconnected")).unwrap_or("");
    let kinds = line.split(" events (").nth(1).and_then(|s| s.split(')').next()).unwrap_or("");
    kinds.split(", ").find_map(|k| k.strip_prefix(kind)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0)
}

// 1. A v7 tool on a v12 VM fails cleanly at its second command.
#[test]
fn hookguest_on_the_default_dialect_fails_cleanly_and_the_vm_runs_on() {
    let peers = Peers::find();
    let dir = Scratch::new("v7-default");
    let mut tool = peers.spawn(&dir, "hookguest", "hookguest-libkvmi", &[dir.path("kvmi.sock").to_str().unwrap()]);
    let vm = vm(&dir, "demo", "2", None);
    let st = tool.wait(&vm);
    assert_eq!(st.code(), Some(1), "hookguest:\n{}", tool.output());
    assert!(tool.output().contains("Invalid argument"), "hookguest:\n{}", tool.output());
    assert_connection_logged(&vm);
    assert_guest_runs(&vm);
}

// 2. hookguest-libkvmi on the demo OS with two vCPUs, up to the CONTROL_CR
//    it must be refused.
#[test]
fn hookguest_pauses_both_vcpus_reads_max_gfn_sets_page_access_and_is_refused_cr() {
    let peers = Peers::find();
    let dir = Scratch::new("v7-hookguest");
    let mut tool = peers.spawn(&dir, "hookguest", "hookguest-libkvmi", &[dir.path("kvmi.sock").to_str().unwrap()]);
    let vm = vm(&dir, "demo", "2", Some("v7"));
    let st = tool.wait(&vm);
    let out = tool.output();
    for needle in [
        "New handshake: name 'demo'",
        "We should receive 2 pause events",
        "Max gfn: 0x4000",
        "PAUSE (vcpu",
        "Set page access gpa",
        "Enabling CR, MSR and PF events",
    ] {
        assert!(out.contains(needle), "hookguest did not print {needle:?}:\n{out}");
    }
    // vCPU 0 asks for CR3 first, any other vCPU for CR4; whichever vCPU's
    // PAUSE event came first decides.
    assert!(
        ["kvmi_control_cr(3): Operation not supported", "kvmi_control_cr(4): Operation not supported"]
            .iter()
            .any(|n| out.contains(n)),
        "hookguest's CONTROL_CR was not refused:\n{out}"
    );
    // The documented end: CONTROL_CR is refused and hookguest gives up.
    assert_eq!(st.code(), Some(1), "hookguest:\n{out}");
    assert_connection_logged(&vm);
    // hookguest gives up while handling the first PAUSE event; the VMM sent
    // one per vCPU.
    assert_eq!(events_sent(&vm, "PAUSE"), 2, "stderr:\n{}", vm.stderr_text());
    vm.wait_stderr("the introspector enabled CR events; none can be delivered on this host", T);
    assert_guest_runs(&vm);
}

// 3. vmi-dump-memory: the whole of RAM, with the guest's image where it
//    was loaded.
#[test]
fn vmi_dump_memory_dumps_all_of_ram() {
    let peers = Peers::find();
    let dir = Scratch::new("v7-dump");
    let out = dir.path("ram.bin");
    let mut tool = peers.spawn(
        &dir,
        "dump",
        "vmi-dump-memory",
        &["-k", dir.path("kvmi.sock").to_str().unwrap(), "demo", out.to_str().unwrap()],
    );
    let vm = vm(&dir, "demo", "2", Some("v7"));
    let st = tool.wait(&vm);
    assert!(st.success(), "vmi-dump-memory: {st}\n{}", tool.output());
    let ram = std::fs::read(&out).unwrap();
    assert_eq!(ram.len(), 64 << 20, "the dump is not the VM's 64 MiB");
    let demo = ukvmi_guests::find("demo").unwrap();
    let at = usize::try_from(demo.load_addr).unwrap();
    // The first page of the kernel is code, which nothing rewrites.
    assert_eq!(&ram[at..at + 4096], &demo.image[..4096], "the demo kernel is not at its load address in the dump");
    assert_connection_logged(&vm);
    assert_guest_runs(&vm);
}

// 4. vmi-rwmem writes 16 bytes; a second run reads them back.
#[test]
fn vmi_rwmem_writes_and_reads_back() {
    let peers = Peers::find();
    let dir = Scratch::new("v7-rwmem");
    let sock = dir.path("kvmi.sock");
    let sock = sock.to_str().unwrap();
    let data: Vec<u8> = (0..16u8).map(|i| 0xa0 ^ i.wrapping_mul(37)).collect();
    std::fs::write(dir.path("in.bin"), &data).unwrap();
    // A page of RAM the spin guest never touches.
    let gpa = "0x2000000";
    let mut w = peers.spawn(
        &dir,
        "write",
        "vmi-rwmem",
        &["--domid", "1", "--kvmi", sock, "--write", gpa, "--limit", "16", "--file", "in.bin", "--pagetable", "-1"],
    );
    let vm = vm(&dir, "spin", "1", Some("v7"));
    let st = w.wait(&vm);
    assert!(st.success(), "vmi-rwmem --write: {st}\n{}", w.output());
    let mut r = peers.spawn(
        &dir,
        "read",
        "vmi-rwmem",
        &["--domid", "1", "--kvmi", sock, "--read", gpa, "--limit", "16", "--file", "out.bin", "--pagetable", "-1"],
    );
    let st = r.wait(&vm);
    assert!(st.success(), "vmi-rwmem --read: {st}\n{}", r.output());
    assert_eq!(std::fs::read(dir.path("out.bin")).unwrap(), data);
    // Two connections came and went.
    let t0 = Instant::now();
    while vm.stderr_text().matches("introspector disconnected").count() < 2 {
        assert!(t0.elapsed() < T, "stderr:\n{}", vm.stderr_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_guest_runs(&vm);
}

/// Runs one of LibVMI's event examples (`example NAME SOCK`) against
/// `guest` until it printed `needle` `n` times, stops it with Ctrl-C and
/// checks it exited 0 after a clean start and finish. Returns the VM and
/// what the example printed.
fn event_example(example: &str, guest: &str, needle: &str, n: usize) -> (Scratch, RunningVm, String) {
    let peers = Peers::find();
    let dir = Scratch::new(example);
    let sock = dir.path("kvmi.sock");
    let mut tool = peers.spawn(&dir, example, example, &[guest, sock.to_str().unwrap()]);
    let vm = vm(&dir, guest, "1", Some("v7"));
    tool.wait_for(needle, n, &vm);
    // The guest runs while the tool answers its events.
    assert_guest_runs(&vm);
    let st = tool.interrupt(&vm);
    let out = tool.output();
    assert!(st.success(), "{example}: {st}\n{out}");
    assert!(out.contains("LibVMI init succeeded!"), "{out}");
    assert!(out.contains("Finished with test."), "{out}");
    assert_connection_logged(&vm);
    assert_guest_runs(&vm);
    (dir, vm, out)
}

/// The hex numbers that follow `key` on the lines that have it.
fn hex_after(out: &str, key: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.split(key).nth(1))
        .filter_map(|s| s.split_whitespace().next())
        .map(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).unwrap())
        .collect()
}

// 5. msr-event-example: LSTAR writes reported; the MSRs this host cannot
//    watch are refused and LibVMI carries on.
#[test]
fn msr_event_example_sees_lstar_writes() {
    let (_dir, _vm, out) = event_example("msr-event-example", "msr", "MSR write happened: MSR=0xc0000082", 10);
    assert!(out.contains("Operation not supported"), "no MSR was refused:\n{out}");
    // The msr guest writes LSTAR with a rising value.
    let values = hex_after(&out, "Value=");
    assert!(values.len() >= 10 && values.windows(2).all(|w| w[0] < w[1]), "{values:x?}");
}

// 6. singlestep-event-example: every step lands in the guest's code.
#[test]
fn singlestep_event_example_steps_through_the_guest() {
    let (_dir, _vm, out) = event_example("singlestep-event-example", "spin", "Single-step event: VCPU:0", 100);
    let spin = ukvmi_guests::find("spin").unwrap();
    let glas = hex_after(&out, "GLA ");
    assert!(glas.len() >= 100, "{out}");
    for gla in &glas {
        assert!((spin.load_addr..spin.end()).contains(gla), "a step outside the guest's code: {gla:#x}");
    }
    // Stepping, not one address reported over and over.
    let distinct: std::collections::BTreeSet<_> = glas.iter().collect();
    assert!(distinct.len() >= 5, "only {} distinct addresses", distinct.len());
}

// 7. interrupt-event-example on the traps guest: its int3s reported, and
//    CONTINUE hands each to the guest, which keeps running.
#[test]
fn interrupt_event_example_sees_the_guests_int3s() {
    let (_dir, _vm, out) = event_example("interrupt-event-example", "traps", "Int 3 happened", 10);
    let traps = ukvmi_guests::find("traps").unwrap();
    let rips = hex_after(&out, "RIP=");
    assert!(rips.len() >= 10, "{out}");
    for rip in rips {
        assert!((traps.load_addr..traps.end()).contains(&rip), "int3 outside the guest: {rip:#x}");
    }
}

// 8. The v7-only commands (EPT views, GFN allocation, SPP) are refused with
//    EOPNOTSUPP, and the connection stays usable.
#[test]
fn v7_only_commands_are_refused_and_the_connection_stays_usable() {
    let peers = Peers::find();
    let dir = Scratch::new("v7-harness");
    let mut tool = peers.spawn(&dir, "harness", "ukvmi-v7-harness", &[dir.path("kvmi.sock").to_str().unwrap()]);
    let vm = vm(&dir, "spin", "2", Some("v7"));
    let st = tool.wait(&vm);
    let out = tool.output();
    assert!(st.success(), "ukvmi-v7-harness: {st}\n{out}");
    assert!(out.matches("Operation not supported").count() >= 3, "{out}");
    assert!(out.contains("usable: vcpus=2"), "{out}");
    assert_connection_logged(&vm);
    assert_guest_runs(&vm);
}
