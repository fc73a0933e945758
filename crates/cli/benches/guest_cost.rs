//! What introspection costs the guest: the `bench` guest's own work rate
//! (mode `BENCH_SYSCALL`: multiply-adds, a `syscall` into its own ring-0
//! handler every iteration, a port-I/O exit every 16th) under `ukvmi run`,
//! measured in one run under four conditions, driven with the `ukvmi` tool
//! commands as a user types them:
//!
//! 1. **no introspector**: after `ukvmi detach` (the VMM runs on alone; it
//!    only retries its connect every `--reconnect` seconds);
//! 2. **attached, idle**: the daemon attached (`ukvmi info` started it), no
//!    command running, no event enabled;
//! 3. **guards armed, never triggered**: `ukvmi trace --msr LSTAR --page
//!    BENCH_PF_PAGE` running (an MSR guard on LSTAR, which the loop never
//!    writes, and a W-restricted page it never writes);
//! 4. **tracing every syscall**: `ukvmi trace --syscalls` running (the
//!    monitor's syscall tracer: a breakpoint on the guest's `syscall_entry`,
//!    stepped over at each hit), its records counted as they arrive;
//! 5. **the same tracer without the tools**: `ukvmi_monitor::Monitor` in
//!    this process (daemon detached), the same `trace_syscalls`, records
//!    counted and dropped — what the daemon, the control socket and the
//!    client add to condition 4.
//!
//! The guest's progress is read from its RAM through the VMM's memfd (see
//! `common::guest_ram`), never over the KVMI connection, so measuring adds
//! nothing to what is measured. Each round takes every condition once, in
//! an order rotated from round to round so drift hits all alike; a
//! condition's figure is its rate divided by the rate without an
//! introspector in the same round. CPU time and wake-ups (voluntary context
//! switches) of the VMM's threads, the daemon and the tool during each
//! window come from /proc; in conditions 2 and 3, where nothing happens,
//! the daemon and the tool are checked to sleep through the window.
//!
//! Run: `cargo bench -p ukvmi --bench guest_cost` (needs /dev/kvm). To
//! look closer: `UKVMI_GUEST_COST_ROUNDS=N`, `UKVMI_GUEST_COST_WINDOW=SECS`,
//! `UKVMI_GUEST_COST_CONDS=2,3` (which conditions besides 1) and
//! `UKVMI_GUEST_COST_ARMED="--page 0x320000"` (condition 3's `ukvmi trace`
//! arguments).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::guest_ram::GuestRam;
use common::procfs::{cpu_steal, daemon_pids, loadavg, thread_cpu};
use common::{median, vmm_events};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::Listener;
use ukvmi_monitor::{Kinds, Monitor, Record};

/// Rounds (each condition once per round); `UKVMI_GUEST_COST_ROUNDS` overrides.
const ROUNDS: usize = 6;
/// How long each condition's rate is measured (s); `UKVMI_GUEST_COST_WINDOW` overrides.
const WINDOW_SECS: u64 = 3;
/// Pause after a change of condition before the window opens.
const SETTLE: Duration = Duration::from_millis(500);
/// Longest wait for a tool command or a state change.
const T: Duration = Duration::from_secs(20);
/// The VMM's reconnect interval while nobody listens.
const RECONNECT: &str = "0.5";
/// Most wake-ups of the daemon (all its threads) and of the tool process in
/// a window of conditions 2 and 3, where nothing happens: 1/s of anything
/// periodic would be 3 (the daemon used to make 15 and, with a stream
/// open, 45 in 3 s).
const IDLE_WAKES: f64 = 2.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cond {
    Alone,
    Idle,
    Armed,
    Tracing,
    Library,
}

const CONDS: [Cond; 5] = [Cond::Alone, Cond::Idle, Cond::Armed, Cond::Tracing, Cond::Library];

impl Cond {
    fn label(self) -> &'static str {
        match self {
            Cond::Alone => "1. no introspector (after `ukvmi detach`)",
            Cond::Idle => "2. attached, idle (daemon, no events)",
            Cond::Armed => "3. MSR + page guard armed, not triggered",
            Cond::Tracing => "4. tracing every syscall (`trace --syscalls`)",
            Cond::Library => "5. the same tracer, library only (no daemon)",
        }
    }
}

/// One measured window.
#[derive(Clone, Copy, Debug)]
struct Window {
    /// Guest loop iterations per second.
    rate: f64,
    /// Syscalls the guest's handler counted, per second.
    syscalls: f64,
    /// Records the running tool printed, per second.
    records: f64,
    /// CPU (cores) of the VMM's vCPU thread, its other threads, the daemon.
    vcpu_cpu: f64,
    vmm_other_cpu: f64,
    daemon_cpu: f64,
    /// CPU (cores) of the tool process (see `cpu_ns`).
    tool_cpu: f64,
    /// Wake-ups per second of the VMM's other threads, of the daemon and
    /// of the tool process.
    vmm_wakes: f64,
    daemon_wakes: f64,
    tool_wakes: f64,
    /// Iterations per second of CPU time the vCPU thread got: the guest's
    /// speed with the host's other load (time the thread waited for a
    /// core) taken out.
    per_cpu: f64,
    /// Iterations and handler runs in the window (checked equal ±1).
    iterations: u64,
    handled: u64,
}

/// A streaming tool command (`ukvmi trace ...`) whose stdout lines are
/// counted as they come; stopped with SIGINT as Ctrl-C would.
struct Stream {
    child: Child,
    lines: Arc<AtomicU64>,
    first: Arc<std::sync::Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

/// The monitor's syscall tracer in this process, records counted.
struct LibTracer {
    mon: Monitor,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl LibTracer {
    /// Waits for the VMM's next connect at `sock` and traces syscalls at `entry`.
    fn start(sock: &Path, entry: u64) -> LibTracer {
        let listener = Listener::bind(sock).unwrap().with_handshake_timeout(T);
        let vm = listener.accept().unwrap();
        drop(listener);
        let mon = Monitor::start(vm).unwrap();
        let sub = mon.subscribe(Kinds { breakpoints: true, ..Kinds::default() });
        mon.trace_syscalls(&sub, entry).unwrap();
        let (stop, count) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s2, c2) = (Arc::clone(&stop), Arc::clone(&count));
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                match sub.next(Duration::from_millis(100)) {
                    Ok(Some(Record::Syscall { .. })) => {
                        c2.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Dropping the subscription takes the breakpoint out.
        });
        LibTracer { mon, stop, count, thread }
    }

    /// Stops tracing and detaches; returns the records counted.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.mon.stop();
        self.count.load(Ordering::Relaxed)
    }
}

/// The `ukvmi` tool commands against one VM's socket.
struct Tools {
    /// The guest's syscall entry (for the library tracer).
    entry: u64,
    lib: Option<LibTracer>,
    sock: PathBuf,
    /// `ukvmi trace` arguments of condition 3.
    armed_args: Vec<String>,
    attached: bool,
    stream: Option<Stream>,
}

impl Tools {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ukvmi")).arg("--vm").arg(&self.sock).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(o.status.success(), "ukvmi {args:?}: {}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Starts `ukvmi trace ARGS` and returns once it says it is set up
    /// (its "Ctrl-C to stop" note on stderr).
    fn start_stream(&mut self, args: &[&str]) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
        cmd.arg("--vm").arg(&self.sock).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: runs in the child between fork and exec and only calls
        // signal(2), which is async-signal-safe: SIGINT must stop the
        // client even where the bench runs with it ignored.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        loop {
            let mut l = String::new();
            if err.read_line(&mut l).unwrap() == 0 {
                panic!("ukvmi {args:?} ended before it was set up: {said}");
            }
            said.push_str(&l);
            if l.contains("Ctrl-C to stop") {
                break;
            }
        }
        let drain = std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut std::io::sink());
        });
        let lines = Arc::new(AtomicU64::new(0));
        let first = Arc::new(std::sync::Mutex::new(String::new()));
        let mut out = child.stdout.take().unwrap();
        let (l2, f2) = (Arc::clone(&lines), Arc::clone(&first));
        let counter = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut head: Vec<u8> = Vec::new();
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let chunk = &buf[..n];
                l2.fetch_add(chunk.iter().filter(|&&b| b == b'\n').count() as u64, Ordering::Relaxed);
                if head.len() < 200 {
                    head.extend_from_slice(chunk);
                    let text = String::from_utf8_lossy(&head);
                    *f2.lock().unwrap() = text.lines().next().unwrap_or("").to_owned();
                }
            }
        });
        self.stream = Some(Stream { child, lines, first, readers: vec![drain, counter] });
    }

    /// Stops the running stream (SIGINT); returns its line count and first line.
    fn stop_stream(&mut self) -> Option<(u64, String)> {
        let mut s = self.stream.take()?;
        // SAFETY: signals our own child.
        unsafe { libc::kill(s.child.id() as i32, libc::SIGINT) };
        s.child.wait().unwrap();
        for r in s.readers {
            r.join().unwrap();
        }
        let first = s.first.lock().unwrap().clone();
        Some((s.lines.load(Ordering::Relaxed), first))
    }

    /// Brings the VM into condition `c`; returns what a stream that ended
    /// printed (lines, first line).
    fn enter(&mut self, c: Cond) -> Option<(u64, String)> {
        let ended = self.stop_stream();
        if let Some(lib) = self.lib.take() {
            lib.stop();
        }
        match c {
            Cond::Alone | Cond::Library => {
                if self.attached {
                    assert!(self.ok(&["detach"]).contains("detached"));
                    let ctl = self.sock.with_extension("sock.ctl");
                    let end = Instant::now() + T;
                    while ctl.exists() || !daemon_pids(&self.sock).is_empty() {
                        assert!(Instant::now() < end, "the daemon did not go away after detach");
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    self.attached = false;
                }
                if c == Cond::Library {
                    self.lib = Some(LibTracer::start(&self.sock, self.entry));
                }
            }
            _ => {
                if !self.attached {
                    // The first command starts the daemon and waits for the VM.
                    assert!(self.ok(&["info", "--json"]).contains("\"vcpus\""));
                    self.attached = true;
                }
                match c {
                    Cond::Armed => {
                        let mut args = vec!["trace".to_owned()];
                        args.extend(self.armed_args.iter().cloned());
                        self.start_stream(&args.iter().map(String::as_str).collect::<Vec<_>>());
                    }
                    Cond::Tracing => self.start_stream(&["trace", "--syscalls"]),
                    _ => {}
                }
            }
        }
        ended
    }

    /// The process that runs the current tool, if any.
    fn tool_pid(&self) -> Option<u32> {
        match (&self.stream, &self.lib) {
            (Some(s), _) => Some(s.child.id()),
            (None, Some(_)) => Some(std::process::id()),
            (None, None) => None,
        }
    }

    fn lines(&self) -> u64 {
        match (&self.stream, &self.lib) {
            (Some(s), _) => s.lines.load(Ordering::Relaxed),
            (None, Some(l)) => l.count.load(Ordering::Relaxed),
            (None, None) => 0,
        }
    }
}

/// One round's window for condition `c`.
fn get_w(round: &[(Cond, Window)], c: Cond) -> Window {
    round.iter().find(|(k, _)| *k == c).map(|&(_, w)| w).unwrap()
}

/// CPU time (ns) of the vCPU threads, the other VMM threads, the daemon
/// and the tool (`tool`: the running `ukvmi trace` client, or this process
/// when it runs the library tracer); then the wake-ups of the other VMM
/// threads, of the daemon and of the tool.
fn cpu_ns(vmm: u32, sock: &Path, tool: Option<u32>) -> ([u64; 4], [u64; 3]) {
    let (mut cpu, mut wakes) = ([0u64; 4], [0u64; 3]);
    for (_, t, w) in tool.map(thread_cpu).unwrap_or_default() {
        cpu[3] += t;
        wakes[2] += w;
    }
    for (name, t, w) in thread_cpu(vmm) {
        if name.starts_with("vcpu") {
            cpu[0] += t;
        } else {
            cpu[1] += t;
            wakes[0] += w;
        }
    }
    for (_, t, w) in daemon_pids(sock).into_iter().flat_map(thread_cpu) {
        cpu[2] += t;
        wakes[1] += w;
    }
    (cpu, wakes)
}

fn measure(ram: &GuestRam, tools: &Tools, vmm: u32, window: Duration) -> Window {
    let (c0, s0, l0, cpu0, t0) = (
        ram.u64_at(layout::BENCH_COUNT),
        ram.u64_at(layout::BENCH_SYSCALLS),
        tools.lines(),
        cpu_ns(vmm, &tools.sock, tools.tool_pid()),
        Instant::now(),
    );
    std::thread::sleep(window);
    let (c1, s1, l1, cpu1, t1) = (
        ram.u64_at(layout::BENCH_COUNT),
        ram.u64_at(layout::BENCH_SYSCALLS),
        tools.lines(),
        cpu_ns(vmm, &tools.sock, tools.tool_pid()),
        Instant::now(),
    );
    let secs = (t1 - t0).as_secs_f64();
    let cores = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e9 / secs;
    assert!(c1 > c0, "the guest loop did not run ({c0} -> {c1})");
    Window {
        rate: (c1 - c0) as f64 / secs,
        syscalls: (s1 - s0) as f64 / secs,
        records: (l1 - l0) as f64 / secs,
        vcpu_cpu: cores(cpu0.0[0], cpu1.0[0]),
        vmm_other_cpu: cores(cpu0.0[1], cpu1.0[1]),
        daemon_cpu: cores(cpu0.0[2], cpu1.0[2]),
        tool_cpu: cores(cpu0.0[3], cpu1.0[3]),
        vmm_wakes: cpu1.1[0].saturating_sub(cpu0.1[0]) as f64 / secs,
        daemon_wakes: cpu1.1[1].saturating_sub(cpu0.1[1]) as f64 / secs,
        tool_wakes: cpu1.1[2].saturating_sub(cpu0.1[2]) as f64 / secs,
        per_cpu: (c1 - c0) as f64 / (cpu1.0[0].saturating_sub(cpu0.0[0]).max(1) as f64 / 1e9),
        iterations: c1 - c0,
        handled: s1 - s0,
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if !common::is_bench_run("guest_cost") {
        return;
    }
    let rounds: usize = env_or("UKVMI_GUEST_COST_ROUNDS", ROUNDS).max(1);
    let window = Duration::from_secs(env_or("UKVMI_GUEST_COST_WINDOW", WINDOW_SECS).max(1));
    // Condition 3's `ukvmi trace` arguments (to arm one guard alone when
    // looking for where a cost comes from).
    // Which conditions (numbers 1-5; 1 is always measured), to look at a
    // few of them closely.
    let conds: Vec<Cond> = match std::env::var("UKVMI_GUEST_COST_CONDS") {
        Ok(v) => CONDS
            .iter()
            .enumerate()
            .filter(|&(i, _)| i == 0 || v.split(',').any(|n| n.trim() == (i + 1).to_string()))
            .map(|(_, &c)| c)
            .collect(),
        Err(_) => CONDS.to_vec(),
    };
    let armed_args: Vec<String> = std::env::var("UKVMI_GUEST_COST_ARMED")
        .map(|v| v.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_else(|_| {
            ["--msr", "LSTAR", "--page", &format!("{:#x}", layout::BENCH_PF_PAGE)].map(str::to_owned).to_vec()
        });
    let bench = ukvmi_guests::find("bench").expect("the bench guest");
    let entry = bench.symbol("syscall_entry").expect("bench guest: syscall_entry");
    println!("load at the start: {}", loadavg());
    let steal0 = cpu_steal();

    // The bench's own connection only switches the guest to its syscall
    // loop; it closes, and from then on the VM belongs to the tools.
    let (proc_, vm, sock) = common::start_vm_with("cost", "bench", 1, 64, &["--reconnect", RECONNECT]);
    let ram = GuestRam::of_process(proc_.pid()).expect("the VMM's guest RAM");
    let at = usize::try_from(bench.load_addr).unwrap();
    assert_eq!(ram.bytes(bench.load_addr, 64), bench.image[..64], "the memfd holds the guest image at {at:#x}");
    common::set_mode(&vm, layout::BENCH_SYSCALL);
    std::thread::sleep(Duration::from_millis(300));
    let lstar = vm.get_registers(0, &[layout::MSR_LSTAR]).unwrap().msrs[0].data;
    assert_eq!(lstar, entry, "the guest's LSTAR is its syscall_entry");
    drop(vm);
    let mut tools = Tools { entry, lib: None, sock, attached: false, stream: None, armed_args };

    let mut table: Vec<Vec<(Cond, Window)>> = Vec::new();
    let mut checks: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| checks.push(format!("{} {what}", if ok { "ok  " } else { "FAIL" }));
    let mut last: Option<Cond> = None;
    let mut armed_records = 0u64;
    let mut trace_first = String::new();
    for r in 0..rounds {
        let mut round = Vec::new();
        for k in 0..conds.len() {
            let c = conds[(r + k) % conds.len()];
            if let Some((n, first)) = tools.enter(c) {
                match last {
                    Some(Cond::Armed) => armed_records += n,
                    Some(Cond::Tracing) if trace_first.is_empty() => trace_first = first,
                    _ => {}
                }
            }
            last = Some(c);
            std::thread::sleep(SETTLE);
            let w = measure(&ram, &tools, proc_.pid(), window);
            check(
                w.iterations.abs_diff(w.handled) <= 1,
                format!("round {r}, {c:?}: {} iterations, the guest's handler ran {} times", w.iterations, w.handled),
            );
            if matches!(c, Cond::Tracing | Cond::Library) {
                // Every syscall is one record (1 vCPU: no hit is missed);
                // lines still in the pipe at the window's edges aside.
                let traced = w.records / w.syscalls;
                check(
                    (0.9..=1.1).contains(&traced),
                    format!("round {r}, {c:?}: {:.0} records/s for {:.0} syscalls/s", w.records, w.syscalls),
                );
            }
            if matches!(c, Cond::Idle | Cond::Armed) {
                // Nothing runs on a clock while nothing happens (issue 14):
                // the daemon and the stream's client sleep through the
                // window (a one-off wake-up or two, nothing periodic).
                let secs = window.as_secs_f64();
                let (d, t) = ((w.daemon_wakes * secs).round(), (w.tool_wakes * secs).round());
                check(
                    d <= IDLE_WAKES && t <= IDLE_WAKES,
                    format!(
                        "round {r}, {c:?}: the daemon woke {d:.0} times, the tool {t:.0} (at most {IDLE_WAKES} each)"
                    ),
                );
            }
            round.push((c, w));
        }
        table.push(round);
    }
    if let Some((n, first)) = tools.enter(Cond::Alone) {
        match last {
            Some(Cond::Armed) => armed_records += n,
            Some(Cond::Tracing) if trace_first.is_empty() => trace_first = first,
            _ => {}
        }
    }
    check(armed_records == 0, format!("the armed guards reported {armed_records} records (never triggered)"));
    // The VMM's own count of the events it sent, per connection ("after N
    // events (BREAKPOINT a, SINGLESTEP b)"): every traced syscall is one
    // BREAKPOINT and one SINGLESTEP, and nothing else was sent (a hit on
    // its way when a tracer goes is answered without a step: at most one
    // BREAKPOINT more per tracing window).
    std::thread::sleep(Duration::from_millis(300));
    let (bp, ss, other) = vmm_events(&proc_.stderr_text());
    let traced: f64 = table
        .iter()
        .flat_map(|round| round.iter().filter(|(c, _)| matches!(c, Cond::Tracing | Cond::Library)))
        .map(|(_, w)| w.records * window.as_secs_f64())
        .sum();
    check(
        bp >= ss && bp - ss <= 2 * rounds as u64 && other == 0 && bp as f64 >= traced,
        format!(
            "the VMM sent {bp} BREAKPOINT, {ss} SINGLESTEP and {other} other events (records in the windows: {traced:.0})"
        ),
    );
    if conds.contains(&Cond::Tracing) {
        check(trace_first.contains("syscall"), format!("a trace record: {trace_first}"));
    }
    let end_load = loadavg();
    let steal1 = cpu_steal();
    let (total, steal) = (steal1.0.saturating_sub(steal0.0), steal1.1.saturating_sub(steal0.1));

    // ----------------------------------------------------------------- report
    let get = get_w;
    println!(
        "what introspection costs the guest: the bench guest's syscall loop (mode {}), one run",
        layout::BENCH_SYSCALL
    );
    println!(
        "({rounds} rounds x {} conditions, {} s windows, order rotated per round; ratio = rate / the rate with no \
         introspector in the same round; condition 3 = `ukvmi trace {}`)",
        conds.len(),
        window.as_secs(),
        tools.armed_args.join(" ")
    );
    println!("-- per round: iterations/s (ratio)");
    for (r, round) in table.iter().enumerate() {
        let base = get(round, Cond::Alone).rate;
        let cells: Vec<String> = conds
            .iter()
            .map(|&c| {
                let w = get(round, c);
                format!("{:>8.0} ({:.3})", w.rate, w.rate / base)
            })
            .collect();
        let order: Vec<String> =
            round.iter().map(|(c, _)| format!("{}", CONDS.iter().position(|k| k == c).unwrap() + 1)).collect();
        println!("round {r} (order {}): {}", order.join(""), cells.join("  "));
    }
    println!(
        "-- summary, median over rounds. \"x none\": rate / the no-introspector rate of the same round, median \
         [min..max]; \"x none per CPU\": the same for iterations per second of CPU the vCPU thread got (the host's \
         other load taken out); CPU in cores during the window: vCPU thread / the VMM's other threads / the daemon / \
         the tool (the `ukvmi trace` client, or this process for the library tracer); \
         wake-ups per second of the VMM's other threads / the daemon / the tool"
    );
    println!(
        "{:<46} {:>8} {:>24} {:>8} {:>24} {:>26} {:>12}",
        "condition", "it/s", "x none", "slower", "x none per CPU", "CPU vcpu/vmm/daemon/tool", "wakes vmm/d/tool"
    );
    let spread = |v: Vec<f64>| {
        let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        (median(v), lo, hi)
    };
    for &c in &conds {
        let ws: Vec<Window> = table.iter().map(|round| get(round, c)).collect();
        let (m, lo, hi) = spread(table.iter().map(|round| get(round, c).rate / get(round, Cond::Alone).rate).collect());
        let (pm, plo, phi) =
            spread(table.iter().map(|round| get(round, c).per_cpu / get(round, Cond::Alone).per_cpu).collect());
        println!(
            "{:<46} {:>8.0} {:>7.4} [{:.4}..{:.4}] {:>7.2}% {:>7.4} [{:.4}..{:.4}] {:>8.3}/{:.3}/{:.3}/{:.3} {:>7.0}/{:.0}/{:.0}",
            c.label(),
            median(ws.iter().map(|w| w.rate).collect()),
            m,
            lo,
            hi,
            (1.0 - m) * 100.0,
            pm,
            plo,
            phi,
            median(ws.iter().map(|w| w.vcpu_cpu).collect()),
            median(ws.iter().map(|w| w.vmm_other_cpu).collect()),
            median(ws.iter().map(|w| w.daemon_cpu).collect()),
            median(ws.iter().map(|w| w.tool_cpu).collect()),
            median(ws.iter().map(|w| w.vmm_wakes).collect()),
            median(ws.iter().map(|w| w.daemon_wakes).collect()),
            median(ws.iter().map(|w| w.tool_wakes).collect()),
        );
    }
    let alone: Vec<Window> = table.iter().map(|round| get(round, Cond::Alone)).collect();
    for (c, what) in [(Cond::Tracing, "`ukvmi trace --syscalls`"), (Cond::Library, "library tracer")] {
        if !conds.contains(&c) {
            continue;
        }
        let tr: Vec<Window> = table.iter().map(|round| get(round, c)).collect();
        let records = median(tr.iter().map(|w| w.records).collect());
        let slow = median(table.iter().map(|round| get(round, Cond::Alone).rate / get(round, c).rate).collect());
        let extra = median(
            table.iter().map(|round| 1e6 / get(round, c).syscalls - 1e6 / get(round, Cond::Alone).syscalls).collect(),
        );
        println!(
            "-- {what}: {records:.0} records/s, one per syscall, each a BREAKPOINT and a SINGLESTEP event ({:.0} \
             events/s); the guest runs {slow:.1}x slower ({:.0} -> {:.0} syscalls/s); a traced syscall costs {extra:.1} \
             µs more than an untraced one",
            records * 2.0,
            median(alone.iter().map(|w| w.syscalls).collect()),
            median(tr.iter().map(|w| w.syscalls).collect()),
        );
    }
    println!("-- checks");
    for c in &checks {
        println!("{c}");
    }
    println!("load at the end: {end_load}");
    println!(
        "steal time during the run: {:.1} % of all CPU time (the hypervisor below ran something else)",
        steal as f64 * 100.0 / total.max(1) as f64
    );
    drop(proc_);
}
