//! Dumping a 64 MiB VM: LibVMI's `vmi-dump-memory` over the kvmi-v7
//! dialect, beside ukvmi's own `ukvmi dump` over v12, in the same run.
//!
//! * `vmi-dump-memory -k SOCK demo out.bin` (LibVMI's KVM driver on
//!   libkvmi, built by `scripts/peers`; run with the libvirt stand-in first
//!   on `LD_LIBRARY_PATH`) against `ukvmi run --guest demo --vcpus 2
//!   --memory 64 --introspect unix:SOCK --kvmi-dialect v7 --reconnect 0.2`.
//!   The VMM is started first and the tool once the VMM has tried to
//!   connect (its "retrying" line), so the guest has booted. Timed: the
//!   tool's whole life (spawn → exit), split at the moments LibVMI's socket
//!   appears (its start-up: process, libvirt stand-in, libkvmi), the VMM logs
//!   the connection (after the handshake; up to 0.2 s of that wait is the
//!   VMM's reconnect period) and the disconnection. "Session" = connected →
//!   disconnected as the VMM's stderr tells it (lines timestamped as they
//!   arrive): LibVMI's set-up commands, the 64 MiB of READ_PHYSICAL, the
//!   close. MB/s = 64 MiB / session, and 64 MiB / whole life.
//! * `ukvmi dump --via socket -o FILE` (and `--via map` for context)
//!   against `ukvmi run --guest demo --vcpus 2 --memory 64 --introspect
//!   unix:SOCK` (v12): `ukvmi info` first starts the tool's daemon and waits
//!   for the VMM's connection (timed too: the tool's fixed cost), then each
//!   dump is timed as a process (wall) and by its own "dumped ... in X s"
//!   line. `--via socket` reads one page per READ_PHYSICAL, as libkvmi
//!   does, and hands each page to the command's process over the daemon's
//!   control socket.
//!
//! * The bench's own raw client (`raw/mod.rs`, the one `dialects` uses)
//!   doing what LibVMI does on the same VM, in each dialect: one
//!   READ_PHYSICAL per 4 KiB page, each page written to a file with its own
//!   write; timed from the first request to the last write. This is the
//!   floor a per-page v7 client can reach here, so it separates LibVMI's
//!   own costs from the VMM's.
//!
//! Each dump is checked: 64 MiB, with the demo kernel's first page at its
//! load address. `RUNS` runs of each, interleaved (LibVMI, raw v7, ukvmi
//! dump, raw v12); min and median are printed.
//!
//! The peers are found through `UKVMI_PEERS_BIN`, `UKVMI_PEERS_PREFIX` and
//! `UKVMI_PEERS_STUB` (what `scripts/peers --print-env` prints), else under
//! target/peers of the workspace; missing, the LibVMI part says n/a.
//!
//! Run: `cargo bench -p ukvmi --bench dump` (needs /dev/kvm), or
//! `scripts/bench dump` (builds the peers first if needed).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;
mod raw;

use common::{num, Scratch};
use raw::Dialect;
use std::io::Write;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs of each dump.
const RUNS: usize = 5;
const MIB64: u64 = 64 << 20;
/// Longest wait for a VMM line or a tool.
const T: Duration = Duration::from_secs(60);
const UKVMI: &str = env!("CARGO_BIN_EXE_ukvmi");

/// A `ukvmi run` child whose stderr lines are kept with their arrival time.
struct Vmm {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    fn start(dir: &Scratch, sock: &Path, dialect: &str) -> Vmm {
        let mut child = Command::new(UKVMI)
            .args(["run", "--guest", "demo", "--vcpus", "2", "--memory", "64", "--reconnect", "0.2"])
            .args(["--kvmi-dialect", dialect])
            .arg("--serial")
            .arg(format!("file:{}", dir.path("serial").display()))
            .arg("--introspect")
            .arg(format!("unix:{}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ukvmi run");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                sink.lock().unwrap().push((Instant::now(), l));
            }
        });
        Vmm { child, lines }
    }

    /// When the first line containing `pat` (at or after `since`, if given)
    /// arrived.
    fn wait_line(&self, pat: &str, since: Option<Instant>) -> Instant {
        let t0 = Instant::now();
        loop {
            if let Some((t, _)) =
                self.lines.lock().unwrap().iter().find(|(t, l)| since.is_none_or(|s| *t >= s) && l.contains(pat))
            {
                return *t;
            }
            assert!(t0.elapsed() < T, "the VMM never said `{pat}`:\n{}", self.text());
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }
}

/// Waits for `child` to exit (at most `T`), polling every 100 µs;
/// returns its status and when it was seen to exit.
fn wait_exit(child: &mut Child, what: &str) -> (std::process::ExitStatus, Instant) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, Instant::now());
        }
        if t0.elapsed() > T {
            let _ = child.kill();
            panic!("{what} did not finish within {T:?}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// A dump must be the VM's 64 MiB with the demo kernel where it was loaded.
fn check_dump(path: &Path, what: &str) {
    let ram = std::fs::read(path).unwrap_or_else(|e| panic!("{what}: {}: {e}", path.display()));
    assert_eq!(ram.len() as u64, MIB64, "{what}: the dump is not the VM's 64 MiB");
    let demo = ukvmi_guests::find("demo").unwrap();
    let at = usize::try_from(demo.load_addr).unwrap();
    assert_eq!(&ram[at..at + 4096], &demo.image[..4096], "{what}: the demo kernel is not at its load address");
}

struct Peers {
    bin: PathBuf,
    lib: PathBuf,
    stub: PathBuf,
}

fn find_peers() -> Result<Peers, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/peers");
    let from = |var: &str, dflt: PathBuf| std::env::var_os(var).map_or(dflt, PathBuf::from);
    let peers = Peers {
        bin: from("UKVMI_PEERS_BIN", root.join("bin")),
        lib: from("UKVMI_PEERS_PREFIX", root.join("prefix")).join("lib"),
        stub: from("UKVMI_PEERS_STUB", root.join("stub")),
    };
    for f in [peers.bin.join("vmi-dump-memory"), peers.stub.join("libvirt.so.0")] {
        if !f.is_file() {
            return Err(format!("{} is missing (build the peers with scripts/peers)", f.display()));
        }
    }
    Ok(peers)
}

/// One vmi-dump-memory run's moments, in seconds from its spawn.
struct LibvmiRun {
    listen: f64,
    connected: f64,
    disconnected: f64,
    exit: f64,
}

fn libvmi_run(peers: &Peers, i: usize) -> LibvmiRun {
    let dir = Scratch::new(&format!("ukvmi-bench-dump-{}-libvmi-{i}", std::process::id()));
    let sock = dir.path("kvmi.sock");
    let out = dir.path("out.bin");
    let vmm = Vmm::start(&dir, &sock, "v7");
    // Booted, every vCPU started (v7), nothing listening yet.
    vmm.wait_line("retrying every", None);
    let log = std::fs::File::create(dir.path("tool.out")).unwrap();
    let t0 = Instant::now();
    let mut tool = Command::new(peers.bin.join("vmi-dump-memory"))
        .arg("-k")
        .arg(&sock)
        .arg("demo")
        .arg(&out)
        .current_dir(&dir.0)
        .env("LD_LIBRARY_PATH", format!("{}:{}", peers.stub.display(), peers.lib.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start vmi-dump-memory");
    // LibVMI's listening socket appears.
    let mut listen = None;
    while listen.is_none() {
        if sock.exists() {
            listen = Some(Instant::now());
        } else if let Some(st) = tool.try_wait().unwrap() {
            panic!(
                "vmi-dump-memory exited early ({st}):\n{}",
                std::fs::read_to_string(dir.path("tool.out")).unwrap_or_default()
            );
        } else {
            assert!(t0.elapsed() < T, "vmi-dump-memory never listened");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let (st, exit) = wait_exit(&mut tool, "vmi-dump-memory");
    assert!(
        st.success(),
        "vmi-dump-memory: {st}\n{}\nVMM:\n{}",
        std::fs::read_to_string(dir.path("tool.out")).unwrap_or_default(),
        vmm.text()
    );
    let conn = vmm.wait_line("introspector connected", Some(t0));
    let disc = vmm.wait_line("introspector disconnected", Some(t0));
    check_dump(&out, "vmi-dump-memory");
    let s = |t: Instant| (t - t0).as_secs_f64();
    LibvmiRun { listen: s(listen.unwrap()), connected: s(conn), disconnected: s(disc), exit: s(exit) }
}

/// Runs `ukvmi --vm SOCK ARGS`; returns its wall time (s) and stderr.
fn ukvmi_tool(sock: &Path, args: &[&str]) -> (f64, String) {
    let t0 = Instant::now();
    let o = Command::new(UKVMI).arg("--vm").arg(sock).args(args).stdin(Stdio::null()).output().unwrap();
    let wall = t0.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "ukvmi {args:?}: {}\n{err}", o.status);
    (wall, err)
}

/// The seconds in `ukvmi dump`'s "dumped N bytes from A in X s" line.
fn dumped_secs(stderr: &str) -> f64 {
    let l = stderr.lines().find(|l| l.contains("dumped ")).unwrap_or_else(|| panic!("no `dumped` line in:\n{stderr}"));
    let after = l.split(" in ").nth(1).unwrap();
    after.split(" s").next().unwrap().trim().parse().unwrap()
}

/// One `ukvmi dump` series against a fresh v12 VM: (daemon start + connect,
/// socket wall, socket own, map wall, map own), seconds.
fn ukvmi_run(i: usize) -> [f64; 5] {
    let dir = Scratch::new(&format!("ukvmi-bench-dump-{}-ukvmi-{i}", std::process::id()));
    let sock = dir.path("vm.sock");
    let vmm = Vmm::start(&dir, &sock, "v12");
    vmm.wait_line("retrying every", None);
    let (attach, _) = ukvmi_tool(&sock, &["info"]);
    let out = dir.path("ram.bin");
    let o = out.to_str().unwrap();
    let (sw, se) = ukvmi_tool(&sock, &["dump", "--via", "socket", "-o", o]);
    check_dump(&out, "ukvmi dump --via socket");
    std::fs::remove_file(&out).unwrap();
    let (mw, me) = ukvmi_tool(&sock, &["dump", "--via", "map", "-o", o]);
    check_dump(&out, "ukvmi dump --via map");
    // Not timed, and not fatal: under load `ukvmi detach` was once seen to
    // lose its reply (the daemon exited first); the VM is killed next anyway.
    let o = Command::new(UKVMI).arg("--vm").arg(&sock).arg("detach").stdin(Stdio::null()).output().unwrap();
    if !o.status.success() {
        println!(
            "note: run {}: `ukvmi detach` failed ({}): {}daemon log:\n{}",
            i + 1,
            o.status,
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(dir.path("vm.sock.log")).unwrap_or_default()
        );
    }
    drop(vmm);
    [attach, sw, dumped_secs(&se), mw, dumped_secs(&me)]
}

/// The bench's own raw client (`raw`) dumping the same VM as LibVMI does:
/// one READ_PHYSICAL per 4 KiB page, each page written to a file with its
/// own write. Seconds from the first request to the last write.
fn raw_run(d: Dialect, i: usize) -> f64 {
    let (sess, mut c) = raw::start(d, &format!("dump-{}-{i}", d.name()), "demo", 2, 64);
    let out = sess.dir.join("out.bin");
    let mut f = std::fs::File::create(&out).unwrap();
    let t0 = Instant::now();
    for gpa in (0..MIB64).step_by(4096) {
        f.write_all(&c.read_physical(gpa, 4096)).unwrap();
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(f);
    check_dump(&out, &format!("raw {} client", d.name()));
    secs
}

/// (min, median) of `v`.
fn min_med(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2])
}

/// "min / median" of seconds, as ms.
fn ms_cell(v: &[f64]) -> String {
    let (a, m) = min_med(v);
    format!("{} / {}", num(a * 1e3), num(m * 1e3))
}

/// "best / median" MB/s of moving 64 MiB in each of `v` seconds.
fn mbps_cell(v: &[f64]) -> String {
    let (a, m) = min_med(v);
    format!("{:.0} / {:.0}", MIB64 as f64 / a / 1e6, MIB64 as f64 / m / 1e6)
}

fn main() {
    if !common::is_bench_run("dump") {
        return;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("the benchmark starts real VMs and needs /dev/kvm, which cannot be opened: {e}");
    }
    let t_start = Instant::now();
    // Interleaved: LibVMI run i, then ukvmi run i.
    let peers = find_peers();
    let mut lib: Vec<LibvmiRun> = Vec::new();
    let mut ours: Vec<[f64; 5]> = Vec::new();
    let mut raw7: Vec<f64> = Vec::new();
    let mut raw12: Vec<f64> = Vec::new();
    for i in 0..RUNS {
        if let Ok(p) = &peers {
            lib.push(libvmi_run(p, i));
        }
        raw7.push(raw_run(Dialect::V7, i));
        ours.push(ukvmi_run(i));
        raw12.push(raw_run(Dialect::V12, i));
    }

    println!("Dumping a 64 MiB VM (`ukvmi run --guest demo --vcpus 2 --memory 64`), {RUNS} runs each, interleaved.");
    println!("Times in ms, min / median; MB/s = 64 MiB (67.1 MB) / time, best / median.");
    println!();
    println!("| what | time (ms) | MB/s |");
    println!("|---|---|---|");
    match &peers {
        Err(why) => println!("| vmi-dump-memory (LibVMI, kvmi-v7) | n/a: {why} | |"),
        Ok(_) => {
            let col = |f: &dyn Fn(&LibvmiRun) -> f64| lib.iter().map(f).collect::<Vec<f64>>();
            let total = col(&|r| r.exit);
            let session = col(&|r| r.disconnected - r.connected);
            println!("| vmi-dump-memory, whole run (spawn → exit) | {} | {} |", ms_cell(&total), mbps_cell(&total));
            println!("| of which: start-up until LibVMI listens | {} | |", ms_cell(&col(&|r| r.listen)));
            println!(
                "| of which: listening → VMM connected (VMM's reconnect period ≤ 200 ms, handshake) | {} | |",
                ms_cell(&col(&|r| r.connected - r.listen))
            );
            println!(
                "| of which: session, connected → disconnected (set-up + 64 MiB of READ_PHYSICAL) | {} | {} |",
                ms_cell(&session),
                mbps_cell(&session)
            );
            println!(
                "| of which: disconnected → exit (≈ 0: the VMM logs the close as the tool exits) | {} | |",
                ms_cell(&col(&|r| r.exit - r.disconnected))
            );
            let own = col(&|r| r.exit - (r.connected - r.listen));
            println!(
                "| LibVMI's own time: whole run minus listening → connected | {} | {} |",
                ms_cell(&own),
                mbps_cell(&own)
            );
        }
    }
    println!(
        "| the bench's raw client, kvmi-v7: one READ_PHYSICAL per page, each page written (first request → last write) | {} | {} |",
        ms_cell(&raw7),
        mbps_cell(&raw7)
    );
    println!("| the same, v12 | {} | {} |", ms_cell(&raw12), mbps_cell(&raw12));
    let col = |k: usize| ours.iter().map(|r| r[k]).collect::<Vec<f64>>();
    println!(
        "| ukvmi (v12): `ukvmi info` starting the daemon + VMM connecting (fixed cost) | {} | |",
        ms_cell(&col(0))
    );
    println!("| `ukvmi dump --via socket`, wall (process) | {} | {} |", ms_cell(&col(1)), mbps_cell(&col(1)));
    println!("| `ukvmi dump --via socket`, its own figure | {} | {} |", ms_cell(&col(2)), mbps_cell(&col(2)));
    println!("| `ukvmi dump --via map`, wall (process) | {} | {} |", ms_cell(&col(3)), mbps_cell(&col(3)));
    println!("| `ukvmi dump --via map`, its own figure | {} | {} |", ms_cell(&col(4)), mbps_cell(&col(4)));
    println!();
    println!("Per run (ms):");
    println!();
    println!(
        "| run | vmi-dump-memory whole / listen / connected / session / exit after disconnect | raw v7 / raw v12 | \
         ukvmi dump --via socket wall / own |"
    );
    println!("|---|---|---|---|");
    for (i, o) in ours.iter().enumerate() {
        let l = lib.get(i).map_or_else(
            || "n/a".to_string(),
            |r| {
                format!(
                    "{} / {} / {} / {} / {}",
                    num(r.exit * 1e3),
                    num(r.listen * 1e3),
                    num(r.connected * 1e3),
                    num((r.disconnected - r.connected) * 1e3),
                    num((r.exit - r.disconnected) * 1e3)
                )
            },
        );
        println!(
            "| {} | {l} | {} / {} | {} / {} |",
            i + 1,
            num(raw7[i] * 1e3),
            num(raw12[i] * 1e3),
            num(o[1] * 1e3),
            num(o[2] * 1e3)
        );
    }
    println!();
    println!("ok   every dump is 64 MiB with the demo kernel's first page at its load address");
    println!("({:.1} s)", t_start.elapsed().as_secs_f64());
}
