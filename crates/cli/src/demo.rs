//! `ukvmi demo`: the whole product in one command. Boots the demo guest OS
//! in a `ukvmi run` child process, attaches the event engine over a real
//! KVMI socket, and walks through what an introspector does: a live syscall
//! trace, a blocked LSTAR overwrite, a refused write to a protected kernel
//! table, an answered hypercall, a process list read from memory, and a
//! clean detach — then checks, from the outside, that the guest was
//! protected and kept running.

use std::{
    io::{BufRead, BufReader, Write},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use ukvmi_introspector::wire::access;
use ukvmi_introspector::Listener;
use ukvmi_monitor::{
    guestos::{ProcessTable, PROC_TABLE},
    json::{self, Obj},
    Kinds, Monitor, Record, SymbolMap,
};

mod vmm;

use vmm::{on_stop_signal, wait_child, wait_for_vmm, DirGuard, VmChild};

use crate::{
    args::{MissingValue, Style, Word, Words},
    tools::{self, Out},
};

pub const HELP: &str = "\
ukvmi demo: the demo guest OS under an introspector, start to finish

USAGE:
    ukvmi demo [--vcpus N] [--duration SECS] [--json]

WHAT IT DOES:
    1. boots the built-in demo OS (`ukvmi run --guest demo`) with N vCPUs (1 or 2,
       default 2: the most it uses)
    2. attaches an introspector over a KVMI v12 socket in a private directory
    3. traces syscalls live: an int3 on the kernel's syscall entry, stepped over
       (original byte back, one single-step, int3 again) so the guest never notices
    4. blocks the rootkit's LSTAR overwrite (MSR event; the old value is kept)
    5. refuses the rootkit's write to the protected syscall table (PF event; the
       instruction is skipped)
    6. answers the guest agent's hypercall doorbell
    7. lists the processes, read from the kernel's process table in memory
    8. undoes every hook, stops the VM, and checks from outside that LSTAR and
       the syscall table are intact, the rootkit hijacked nothing, and the
       guest kept running

    The guest's serial console is shown with a `guest |` prefix. Events are
    watched for SECS seconds (default 6), longer if a step has not been seen
    yet (at most 15 s more). Exit status 0 when every check passes.

    --json prints one JSON object per line instead: the records
    (`syscall`, `msr`, `page`, `hypercall`), `serial` lines, `step` markers,
    `ps`, `check` results and a final `summary`.
";

/// Demo output: text for people, or JSON lines.
struct Printer {
    json: bool,
    lock: Arc<Mutex<()>>,
    /// The reader of stdout went away (`ukvmi demo | head`): the demo ends
    /// early and quietly, status 0.
    closed: Arc<AtomicBool>,
}

/// Notes in `closed` a write that found the reader gone (EPIPE).
fn note_closed(r: std::io::Result<()>, closed: &AtomicBool) {
    if r.as_ref().is_err_and(tools::reader_gone) {
        closed.store(true, Ordering::Relaxed);
    }
}

impl Printer {
    fn emit(&self, text: &str, json_obj: String) {
        let _g = self.lock.lock();
        let mut o = std::io::stdout().lock();
        let r = if self.json { writeln!(o, "{json_obj}") } else { writeln!(o, "{text}") };
        note_closed(r.and_then(|()| o.flush()), &self.closed);
    }
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
    fn step(&self, n: u32, what: &str) {
        self.emit(
            &format!("\n== {n}. {what}"),
            Obj::new().str("event", "step").num("step", u64::from(n)).str("what", what).build(),
        );
    }
    fn info(&self, text: &str) {
        self.emit(text, Obj::new().str("event", "info").str("text", text).build());
    }
}

/// Lines for `tools::print_ps`, through the printer.
struct PsOut<'a>(&'a Printer);

impl Out for PsOut<'_> {
    fn line(&mut self, s: &str) -> std::io::Result<()> {
        let p = self.0;
        let _g = p.lock.lock();
        let mut o = std::io::stdout().lock();
        note_closed(writeln!(o, "{}{s}", if p.json { "" } else { "    " }), &p.closed);
        Ok(())
    }
    fn raw(&mut self, _b: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn note(&mut self, s: &str) -> std::io::Result<()> {
        self.line(s)
    }
    fn progress(&mut self, _s: &str) -> std::io::Result<()> {
        Ok(())
    }
    fn stderr_tty(&self) -> bool {
        false
    }
    fn gone(&self) -> bool {
        false
    }
}

fn host_kind() -> &'static str {
    let m = |n: &str| std::path::Path::new("/sys/module").join(n).exists();
    if m("kvm_pvm") {
        "KVM, PVM backend"
    } else if m("kvm_intel") {
        "KVM, Intel VMX"
    } else if m("kvm_amd") {
        "KVM, AMD SVM"
    } else {
        "KVM"
    }
}

struct Opts {
    vcpus: u32,
    duration: Duration,
    json: bool,
}

fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts { vcpus: 2, duration: Duration::from_secs(6), json: false };
    let valued = crate::commands::find("demo").map(crate::commands::valued_options).unwrap_or_default();
    for w in Words::new(args, &valued, Style::Options) {
        let (a, value) = match w {
            Ok(Word::Opt(a, v)) => (a, v),
            Ok(Word::Operand(a)) => (a, None),
            Err(MissingValue("--vcpus")) => return Err("--vcpus needs a number".into()),
            Err(MissingValue(_)) => return Err("--duration needs seconds".into()),
        };
        match a {
            "--json" => o.json = true,
            "--vcpus" => {
                let v = value.ok_or("--vcpus needs a number")?;
                // The demo OS starts at most this many; more would stay idle
                // and fail the per-vCPU steps.
                let most = ukvmi_guests::find("demo").map_or(1, |g| u32::from(g.max_vcpus));
                o.vcpus = v.parse().ok().filter(|n| (1..=most).contains(n)).ok_or_else(|| {
                    format!("--vcpus takes 1 to {most} (the demo OS uses at most {most} vCPUs), not `{v}`")
                })?;
            }
            "--duration" => {
                let v = value.ok_or("--duration needs seconds")?;
                let s: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| format!("--duration takes seconds, not `{v}`"))?;
                o.duration = Duration::from_secs_f64(s);
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown option `{other}`")),
        }
    }
    Ok(Some(o))
}

pub fn main(args: &[String]) -> ExitCode {
    let opts = match parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            return match tools::write_stdout(HELP) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        }
        Err(e) => {
            eprintln!("ukvmi demo: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    match demo(&opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ukvmi demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn demo_symbols() -> Result<SymbolMap, String> {
    let m = crate::daemon::symbols_for("demo", None).ok_or("the demo guest is not built in")?;
    Ok((*m).clone())
}

fn sym(m: &SymbolMap, name: &str) -> Result<u64, String> {
    m.addr(name).ok_or_else(|| format!("the demo kernel has no symbol `{name}`"))
}

fn demo(o: &Opts) -> Result<bool, String> {
    let started = Instant::now();
    let p = Printer { json: o.json, lock: Arc::new(Mutex::new(())), closed: Arc::new(AtomicBool::new(false)) };
    let syms = demo_symbols()?;
    let entry = sym(&syms, "syscall_entry")?;
    let table = sym(&syms, "syscall_table")?;
    let sys_write = sym(&syms, "sys_write")?;
    let hijacked = sym(&syms, "hijacked_syscalls")?;
    let hooked = sym(&syms, "hooked_writes")?;
    let agent_buf = sym(&syms, "agent_buf")?;

    let dir = std::env::temp_dir().join(format!("ukvmi-demo-{}", std::process::id()));
    // Before any thread starts, so that every thread inherits the mask.
    let vmm_pid = Arc::new(AtomicI32::new(0));
    on_stop_signal(dir.clone(), Arc::clone(&vmm_pid));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let _cleanup = DirGuard(dir.clone());
    let sock = dir.join("vm.sock");
    let listener = Listener::bind(&sock).map_err(|e| format!("listening on {}: {e}", sock.display()))?;

    // 1. Boot.
    p.step(1, "boot the demo guest OS");
    let mut child = vmm::spawn(o.vcpus, &sock)?;
    vmm_pid.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
    let serial = child.stdout.take();
    let vmm_err = child.stderr.take();
    let mut child = VmChild(child);
    let lines = Arc::new(Mutex::new(0u64));
    if let Some(s) = serial {
        let (lock, json_mode, count, closed) = (Arc::clone(&p.lock), o.json, Arc::clone(&lines), Arc::clone(&p.closed));
        std::thread::spawn(move || {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if let Ok(mut c) = count.lock() {
                    *c += 1;
                }
                let _g = lock.lock();
                let mut out = std::io::stdout().lock();
                let r = if json_mode {
                    writeln!(out, "{}", Obj::new().str("event", "serial").str("line", &line).build())
                } else {
                    writeln!(out, "    guest | {line}")
                };
                note_closed(r, &closed);
            }
        });
    }
    let (said, vmm_said) = mpsc::channel();
    if let Some(s) = vmm_err {
        let (lock, json_mode, closed) = (Arc::clone(&p.lock), o.json, Arc::clone(&p.closed));
        std::thread::spawn(move || {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                let _ = said.send(line.clone());
                let _g = lock.lock();
                let mut out = std::io::stdout().lock();
                let r = if json_mode {
                    writeln!(out, "{}", Obj::new().str("event", "vmm").str("line", &line).build())
                } else {
                    writeln!(out, "    vmm   | {line}")
                };
                note_closed(r, &closed);
            }
        });
    }
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept());
    });
    let vm = wait_for_vmm(&rx, &mut child.0, &vmm_said)?;
    p.info(&format!(
        "booted demo guest: {} vCPU{}, 64 MiB, VMM pid {}",
        o.vcpus,
        if o.vcpus == 1 { "" } else { "s" },
        child.0.id()
    ));

    // 2. Attach.
    p.step(2, "attach the introspector");
    let info = vm.info().clone();
    let mon = Monitor::start(vm).map_err(|e| e.to_string())?;
    p.emit(
        &format!(
            "introspector attached (KVMI v12 protocol {}, host: {}, vCPUs: {}, single-step: {}, breakpoints: int3 at ring 0)",
            info.version,
            host_kind(),
            mon.vcpus(),
            if info.singlestep { "yes" } else { "no" }
        ),
        Obj::new()
            .str("event", "attached")
            .num("kvmi_version", u64::from(info.version))
            .str("host", host_kind())
            .num("vcpus", u64::from(mon.vcpus()))
            .bool("singlestep", info.singlestep)
            .build(),
    );
    let vm = mon.vm();
    let booted = wait_for(Duration::from_secs(15), || ProcessTable::read(&mon).ok().filter(|t| t.procs.len() >= 4));
    let first =
        booted.ok_or_else(|| format!("the demo OS's process table at {PROC_TABLE:#x} never showed 4 processes"))?;
    p.info(&format!("the kernel is up: {} processes, process table at {PROC_TABLE:#x}", first.procs.len()));

    // 3-6. Hooks, all at once; the guest does its thing.
    let sub = mon.subscribe(Kinds::ALL);
    p.step(3, &format!("live syscall trace: int3 on syscall_entry ({entry:#x}), stepped over"));
    mon.trace_syscalls(&sub, entry).map_err(|e| e.to_string())?;
    p.step(4, "guard LSTAR: guest writes are refused, the old value kept");
    mon.watch_msr(&sub, 0xc000_0082, true).map_err(|e| e.to_string())?;
    p.step(5, &format!("write-protect the syscall table ({table:#x}): writes are refused"));
    mon.protect(&sub, table, 8, access::W, true).map_err(|e| e.to_string())?;
    p.step(6, "answer the guest agent's hypercall doorbell");
    mon.hypercalls(&sub, Some(("hello from ukvmi".into(), agent_buf))).map_err(|e| e.to_string())?;
    p.info("watching (the rootkit attacks about every 2 s) ...");

    let (mut n_sys, mut n_msr, mut n_page, mut n_hc) = (0u64, 0u64, 0u64, 0u64);
    let watch_start = Instant::now();
    let (mut last_text, mut repeats) = (String::new(), 0u64);
    // Until every step was seen and SECS passed; give up 15 s later.
    let max = o.duration + Duration::from_secs(15);
    loop {
        if p.closed() {
            // Nobody reads on: undo the hooks and stop the VM (on drop).
            mon.stop();
            return Ok(true);
        }
        let all = n_sys > 0 && n_msr > 0 && n_page > 0 && n_hc > 0;
        let el = watch_start.elapsed();
        if (el >= o.duration && all) || el >= max {
            break;
        }
        match sub.next(Duration::from_millis(100)) {
            Ok(Some(r)) => {
                match &r {
                    Record::Syscall { .. } => n_sys += 1,
                    Record::Msr { blocked: true, .. } => n_msr += 1,
                    Record::Page { blocked: true, .. } => n_page += 1,
                    Record::Hypercall { reply: Some(_), .. } => n_hc += 1,
                    _ => {}
                }
                let text = format!("  {}", r.text(Some(&syms)));
                // People get repeats folded (the worker yields a lot);
                // JSON gets every record.
                if !o.json && text == last_text {
                    repeats += 1;
                    continue;
                }
                if repeats > 0 {
                    p.info(&format!(
                        "    (the line above {} more time{})",
                        repeats,
                        if repeats == 1 { "" } else { "s" }
                    ));
                    repeats = 0;
                }
                p.emit(&text, r.json());
                last_text = text;
                if matches!(r, Record::Detached { .. } | Record::Unhook) {
                    break;
                }
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }

    // 7. Processes.
    p.step(7, "processes, read from the kernel's process table");
    let last = ProcessTable::read(&mon).map_err(|e| e.to_string())?;
    let mut ps_out = PsOut(&p);
    tools::print_ps(&last, o.json, &mut ps_out).map_err(|e| e.to_string())?;

    // Checks from outside, while still attached.
    let mut checks: Vec<(String, bool)> = Vec::new();
    for v in 0..mon.vcpus() {
        let lstar = vm.get_registers(v, &[0xc000_0082]).ok().and_then(|r| r.msrs.first().map(|m| m.data));
        checks.push((
            format!("LSTAR on vCPU {v} is still syscall_entry ({:#x})", lstar.unwrap_or(0)),
            lstar == Some(entry),
        ));
    }
    let read_u64 = |gpa: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        vm.read_physical_into(gpa, &mut b).ok().map(|()| u64::from_le_bytes(b))
    };
    let slot = read_u64(table + 8);
    checks
        .push((format!("syscall_table[write] is still sys_write ({:#x})", slot.unwrap_or(0)), slot == Some(sys_write)));
    let exc = |v: u64| read_u64(ukvmi_guests::layout::EXC_COUNT_BASE + 8 * v);
    checks.push(("the guest took no #BP or #DB from the tracing".into(), exc(3) == Some(0) && exc(1) == Some(0)));
    checks.push(("the rootkit hijacked no syscall".into(), read_u64(hijacked) == Some(0)));
    checks.push(("the rootkit hooked no write".into(), read_u64(hooked) == Some(0)));
    let total = |t: &ProcessTable| t.procs.iter().map(|p| p.syscalls).sum::<u64>();
    checks.push((
        format!("the guest kept running ({} → {} syscalls)", total(&first), total(&last)),
        total(&last) > total(&first),
    ));
    checks.push((format!("syscalls traced ({n_sys})"), n_sys > 0));
    checks.push((format!("LSTAR overwrites blocked ({n_msr})"), n_msr > 0));
    checks.push((format!("writes to the syscall table refused ({n_page})"), n_page > 0));
    checks.push((format!("hypercalls answered ({n_hc})"), n_hc > 0));

    // 8. Detach and stop.
    p.step(8, "detach (hooks undone) and stop the VM");
    drop(sub);
    let mut byte = [0u8; 1];
    let restored = vm.read_physical_into(entry, &mut byte).is_ok() && byte[0] != 0xcc;
    checks.push(("the int3 on syscall_entry is gone after detach".into(), restored));
    // Syscalls go on after the hooks are gone, and still no #BP reaches the guest.
    let before = ProcessTable::read(&mon).map(|t| total(&t)).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(600));
    let after = ProcessTable::read(&mon).map(|t| total(&t)).unwrap_or(0);
    let exc_after = |v: u64| {
        let mut b = [0u8; 8];
        vm.read_physical_into(ukvmi_guests::layout::EXC_COUNT_BASE + 8 * v, &mut b).ok().map(|()| u64::from_le_bytes(b))
    };
    checks.push((
        format!("unhooked, the guest runs on ({before} → {after} syscalls) with no #BP or #DB"),
        after > before && exc_after(3) == Some(0) && exc_after(1) == Some(0),
    ));
    let events = mon.stats().events;
    mon.stop();
    // SAFETY: kill sends SIGTERM to our own child, whose pid we hold.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = wait_child(&mut child.0, Duration::from_secs(15));
    if status.is_some() {
        vmm_pid.store(0, Ordering::SeqCst); // reaped: the pid is no longer ours
    }
    checks.push((
        format!("the VM shut down cleanly ({})", status.as_deref().unwrap_or("still running")),
        status.as_deref() == Some("exit status: 0"),
    ));

    for (what, ok) in &checks {
        p.emit(
            &format!("  {} {what}", if *ok { "ok  " } else { "FAIL" }),
            Obj::new().str("event", "check").str("what", what).bool("ok", *ok).build(),
        );
    }
    let all_ok = checks.iter().all(|c| c.1);
    let secs = started.elapsed().as_secs_f64();
    let names = json::array(last.procs.iter().map(|p| json::quote(&p.name)));
    p.emit(
        &format!(
            "done: {events} events in {secs:.1} s, {} serial lines; {}",
            lines.lock().map_or(0, |c| *c),
            if all_ok { "the guest was protected and never crashed" } else { "SOME CHECKS FAILED" }
        ),
        Obj::new()
            .str("event", "summary")
            .num("events", events)
            .int("millis", (secs * 1000.0) as i64)
            .raw("processes", &names)
            .bool("ok", all_ok)
            .build(),
    );
    Ok(all_ok)
}

fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
