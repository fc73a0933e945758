//! ukvmi beside QEMU's gdbstub and the baselines, all measured in one run:
//!
//! * baselines: the bare UNIX-socket round trip (two threads), the bare KVM
//!   exit (a `KVM_RUN` loop on an `out`, no VMM), memcpy of the sizes read;
//! * QEMU's gdbstub (Debian's `qemu-system-x86_64 -enable-kvm -S -gdb`,
//!   spoken to over TCP with the GDB remote protocol): `g`, `m` (2 KiB per
//!   packet), `s`, interrupt + `g` + `c` on a running vCPU, interrupt + `c`
//!   (stop and resume all vCPUs);
//! * ukvmi (`ukvmi run --guest bench --vcpus 2` and `ukvmi-introspector`
//!   over the real socket): GET_REGISTERS on a paused and on a running vCPU,
//!   READ_PHYSICAL of 4 KiB, 1 MiB and 64 MiB (one command at a time and
//!   pipelined), single steps (CONTROL_SINGLESTEP + SINGLESTEP events), and
//!   pausing and resuming both vCPUs (PAUSE_VCPU each + the PAUSE events +
//!   CONTINUE replies).
//!
//! Every figure is printed as p50 / p99 µs, with ratios against the same
//! run's baselines and gdbstub. QEMU missing is reported as n/a with the
//! reason (scripts/bench installs it).
//!
//! Run: `cargo bench -p ukvmi --bench vs_gdbstub` (needs /dev/kvm), or
//! `scripts/bench`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{gdb, mbps, measure, next_vcpu_event, set_mode, Fig};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::event;
use ukvmi_introspector::{EventPayload, EventReply, Vm};

/// Samples for small round trips.
const N: usize = 2000;
const WARMUP: usize = 200;
/// Where the memory reads start (both VMs have RAM from 1 MiB to 65 MiB).
const READ_AT: u64 = 0x10_0000;
const KIB4: usize = 4096;
const MIB1: usize = 1 << 20;
const MIB64: usize = 64 << 20;
/// Longest wait for any single event.
const T: Duration = Duration::from_secs(20);

/// Samples per memory-read size: (size, warm-up, timed).
const READS: [(usize, usize, usize); 3] = [(KIB4, 200, 2000), (MIB1, 3, 30), (MIB64, 1, 5)];

/// What gdbstub gave, or why it could not be measured.
struct GdbFigs {
    version: String,
    g: Fig,
    m: Vec<Fig>,
    s: Fig,
    running_g: Fig,
    stop_resume: Fig,
    regs_len: usize,
}

fn gdbstub() -> Result<GdbFigs, String> {
    let version = gdb::qemu_version()?;
    let (_qemu, mut g) = gdb::start(2, 128)?;
    let regs_len = g.read_regs()?.len();
    let fig_g = measure(WARMUP, N, || {
        g.read_regs().unwrap();
    });
    // Memory: check the first read against what a second read gives (the
    // VM is stopped, so it must not change), then time.
    let mut m = Vec::new();
    for (size, warmup, n) in READS {
        let mut a = vec![0u8; size];
        let mut b = vec![0u8; size];
        g.read_mem(READ_AT, &mut a)?;
        g.read_mem(READ_AT, &mut b)?;
        if a != b {
            return Err("gdbstub: two reads of a stopped VM differ".into());
        }
        m.push(measure(warmup, n, || g.read_mem(READ_AT, &mut b).unwrap()));
    }
    let s = measure(WARMUP, N, || g.step().unwrap());
    // Running vCPU: `c`, then (the target running) interrupt, `g`, `c`.
    g.cont()?;
    std::thread::sleep(Duration::from_millis(200));
    let running_g = measure(50, 500, || {
        g.interrupt().unwrap();
        g.read_regs().unwrap();
        g.cont().unwrap();
    });
    let stop_resume = measure(50, 500, || {
        g.interrupt().unwrap();
        g.cont().unwrap();
    });
    g.interrupt()?;
    Ok(GdbFigs { version, g: fig_g, m, s, running_g, stop_resume, regs_len })
}

struct UkvmiFigs {
    regs_paused: Fig,
    regs_idle: Fig,
    regs_spin: Fig,
    read_one: Vec<Fig>,
    read_pipe: Vec<Fig>,
    /// Reads through `Vm::map_memory()`, or why it is not available.
    read_map: Result<Vec<Fig>, String>,
    steps: Fig,
    step_checks: String,
    /// The same through the event channel, or why it could not be enabled.
    steps_channel: Result<(Fig, String), String>,
    pause_all: Fig,
}

fn ukvmi(vm: &Vm) -> UkvmiFigs {
    assert_eq!(vm.vcpu_count().unwrap(), 2, "two vCPUs");
    // vCPU 1 must have been started by the guest (it idles with hlt).
    let t0 = Instant::now();
    while vm.get_registers(1, &[]).is_err() {
        assert!(t0.elapsed() < T, "vCPU 1 never started");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Registers on a paused vCPU (waiting in a PAUSE event).
    vm.pause_vcpu(0, true).unwrap();
    let ev = next_vcpu_event(vm, T);
    assert_eq!(ev.event, event::PAUSE);
    let rip = ev.regs.rip;
    let regs_paused = measure(WARMUP, N, || {
        let r = vm.get_registers(0, &[]).unwrap();
        assert_eq!(r.regs.rip, rip, "a paused vCPU does not move");
    });

    // Memory, with vCPU 0 still paused (both stubs read a stopped VM).
    let mut read_one = Vec::new();
    let mut read_pipe = Vec::new();
    for (size, warmup, n) in READS {
        let mut a = vec![0u8; size];
        let mut b = vec![0u8; size];
        for (i, c) in a.chunks_mut(KIB4).enumerate() {
            vm.read_physical_into(READ_AT + (i * KIB4) as u64, c).unwrap();
        }
        vm.read_physical_range(READ_AT, &mut b).unwrap();
        assert!(a == b, "pipelined and one-by-one reads agree ({size} bytes)");
        read_one.push(measure(warmup, n, || {
            for (i, c) in a.chunks_mut(KIB4).enumerate() {
                vm.read_physical_into(READ_AT + (i * KIB4) as u64, c).unwrap();
            }
        }));
        read_pipe.push(measure(warmup, n, || vm.read_physical_range(READ_AT, &mut b).unwrap()));
    }
    // The mapped view (UKVMI_VM_MAP_MEMORY): the guest RAM mapped into this
    // process; each read is a copy out of the mapping.
    let read_map = vm.map_memory().map_err(|e| e.to_string()).map(|map| {
        READS
            .iter()
            .map(|&(size, warmup, n)| {
                let mut a = vec![0u8; size];
                let mut b = vec![0u8; size];
                vm.read_physical_range(READ_AT, &mut a).unwrap();
                map.read(READ_AT, &mut b).unwrap();
                assert!(a == b, "the mapped view and READ_PHYSICAL agree ({size} bytes)");
                measure(warmup, n.max(20), || map.read(READ_AT, &mut b).unwrap())
            })
            .collect()
    });
    vm.reply(&ev, EventReply::Continue).unwrap();

    // Registers on a running vCPU: idle (hlt) and spinning.
    let regs_idle = measure(WARMUP, N, || {
        vm.get_registers(0, &[]).unwrap();
    });
    set_mode(vm, layout::BENCH_SPIN);
    std::thread::sleep(Duration::from_millis(50));
    let regs_spin = measure(WARMUP, N, || {
        vm.get_registers(0, &[]).unwrap();
    });

    // Single steps through the spinning loop: event to event is one step.
    let (steps, step_checks) = single_steps(vm);
    set_mode(vm, layout::BENCH_IDLE);
    std::thread::sleep(Duration::from_millis(50));

    // Pause both vCPUs (wait=1 each: the VM is stopped when the last reply
    // comes), take both PAUSE events, answer CONTINUE to both.
    let pause_all = measure(50, 500, || {
        vm.pause_vcpu(0, true).unwrap();
        vm.pause_vcpu(1, true).unwrap();
        let a = next_vcpu_event(vm, T);
        let b = next_vcpu_event(vm, T);
        assert!(a.event == event::PAUSE && b.event == event::PAUSE && a.vcpu != b.vcpu);
        vm.reply(&a, EventReply::Continue).unwrap();
        vm.reply(&b, EventReply::Continue).unwrap();
    });
    // The same steps with events through the shared-memory event channel
    // (a ukvmi extension the monitor turns on by itself), last: from here
    // on every event of this connection takes the channel.
    set_mode(vm, layout::BENCH_SPIN);
    std::thread::sleep(Duration::from_millis(50));
    let steps_channel = vm.enable_event_channel().map_err(|e| e.to_string()).map(|()| single_steps(vm));
    set_mode(vm, layout::BENCH_IDLE);
    UkvmiFigs {
        regs_paused,
        regs_idle,
        regs_spin,
        read_one,
        read_pipe,
        read_map,
        steps,
        step_checks,
        steps_channel,
        pause_all,
    }
}

/// Single steps of vCPU 0 through the bench guest's spinning loop, event to
/// event, and what the checks on the way saw.
fn single_steps(vm: &Vm) -> (Fig, String) {
    let bench = ukvmi_guests::find("bench").expect("the bench guest");
    let (lo, hi) = (bench.symbol("bench_spin").unwrap(), bench.symbol("bench_others").unwrap());
    vm.control_singlestep(0, true).unwrap();
    let mut v = Vec::with_capacity(N);
    let mut last: Option<Instant> = None;
    let (mut outside, mut failed) = (0u32, 0u32);
    let mut rips = std::collections::BTreeSet::new();
    for i in 0..=WARMUP + N {
        let ev = next_vcpu_event(vm, T);
        let now = Instant::now();
        let EventPayload::Singlestep { failed: f } = ev.payload else {
            panic!("expected SINGLESTEP, got {:?}", ev.payload)
        };
        failed += u32::from(f);
        if !(lo..hi).contains(&ev.regs.rip) {
            outside += 1;
        }
        rips.insert(ev.regs.rip);
        if i > WARMUP {
            v.push(now - last.unwrap());
        }
        last = Some(now);
        if i == WARMUP + N {
            vm.control_singlestep(0, false).unwrap();
        }
        vm.reply(&ev, EventReply::Continue).unwrap();
    }
    let checks = format!(
        "{} steps, {} distinct RIPs, {outside} outside bench_spin..bench_others, {failed} failed",
        WARMUP + N + 1,
        rips.len()
    );
    assert!(outside == 0 && failed == 0 && rips.len() >= 3, "single steps: {checks}");
    (Fig::from_samples(v), checks)
}

fn main() {
    if !common::is_bench_run("vs_gdbstub") {
        return;
    }
    let t_start = Instant::now();
    let sock0 = common::socket_rtt(WARMUP, N);
    let bare = common::bare::exit_loop(WARMUP, 20_000).map(Fig::from_samples);
    let memcpy: Vec<Fig> = READS.iter().map(|&(size, w, n)| common::memcpy(size, w, n.max(20))).collect();

    let (proc_, vm) = common::start_vm("gdbstub", "bench", 2, 80);
    std::thread::sleep(Duration::from_millis(300));
    let u = ukvmi(&vm);
    drop(vm);
    drop(proc_);

    let gdb = gdbstub();
    let sock1 = common::socket_rtt(WARMUP, N);

    // ----------------------------------------------------------------- report
    println!("ukvmi vs QEMU's gdbstub, one run ({:.0} s)", t_start.elapsed().as_secs_f64());
    match &gdb {
        Ok(g) => println!(
            "gdbstub: {} ({}), register block {} bytes",
            g.version,
            gdb::qemu_args(0, 2, 128).join(" ").replace("tcp:127.0.0.1:0", "tcp:127.0.0.1:PORT"),
            g.regs_len
        ),
        Err(e) => println!("gdbstub: n/a ({e})"),
    }
    println!(
        "p50 / p99 in µs; \"x gdb\" = gdbstub p50 / ukvmi p50 (how many times faster ukvmi is); \
         \"x socket\" = ukvmi p50 / the better bare-socket p50; \"/ memcpy\" = p50 / memcpy p50 of the same size"
    );
    println!();
    println!("-- baselines");
    println!("{:<52} {:>22}", "bare UNIX socket round trip (start)", sock0.cell());
    println!("{:<52} {:>22}", "bare UNIX socket round trip (end)", sock1.cell());
    match &bare {
        Ok(f) => println!("{:<52} {:>22}", "bare KVM exit (KVM_RUN -> KVM_EXIT_IO, no VMM)", f.cell()),
        Err(e) => println!("bare KVM exit: n/a ({e})"),
    }
    for ((size, _, _), f) in READS.iter().zip(&memcpy) {
        println!(
            "{:<52} {:>22}   {:>8.0} MB/s",
            format!("memcpy {}", size_name(*size)),
            f.cell(),
            mbps(*size, f.key())
        );
    }
    let gd = gdb.as_ref().ok();
    let vs = |ours: &Fig, theirs: Option<&Fig>| {
        theirs.map_or("n/a".to_string(), |t| format!("{:.2}x", t.key() / ours.key()))
    };
    let gcell = |f: Option<&Fig>| f.map_or("n/a".to_string(), Fig::cell);
    // The socket's p50 depends on whether both threads share a CPU: the
    // better of the two runs is the baseline (ratios come out larger).
    let sock = sock0.key().min(sock1.key());
    println!();
    println!("{:<44} {:>22} {:>22} {:>8} {:>9}", "what", "ukvmi p50 / p99", "gdbstub p50 / p99", "x gdb", "x socket");
    let row = |name: &str, ours: &Fig, theirs: Option<&Fig>| {
        println!(
            "{name:<44} {:>22} {:>22} {:>8} {:>8.2}x",
            ours.cell(),
            gcell(theirs),
            vs(ours, theirs),
            ours.key() / sock
        );
    };
    row("registers, paused vCPU (GET_REGISTERS | g)", &u.regs_paused, gd.map(|g| &g.g));
    row("registers, running vCPU, idle guest", &u.regs_idle, gd.map(|g| &g.running_g));
    row("registers, running vCPU, spinning guest", &u.regs_spin, gd.map(|g| &g.running_g));
    println!("  (gdbstub on a running vCPU: interrupt 0x03 + stop reply, g, c)");
    row("single step, event to event (| s)", &u.steps, gd.map(|g| &g.s));
    println!("  ({})", u.step_checks);
    match &u.steps_channel {
        Ok((f, checks)) => {
            row("single step, events through the channel", f, gd.map(|g| &g.s));
            println!("  ({checks})");
        }
        Err(e) => println!("single step, events through the channel: n/a ({e})"),
    }
    row("pause + resume both vCPUs (| 0x03, c)", &u.pause_all, gd.map(|g| &g.stop_resume));
    println!();
    println!(
        "{:<44} {:>22} {:>22} {:>8} {:>10} {:>10}",
        "memory read", "ukvmi p50 / p99", "gdbstub p50 / p99", "x gdb", "MB/s", "/ memcpy"
    );
    for (i, (size, _, _)) in READS.iter().enumerate() {
        let theirs = gd.map(|g| &g.m[i]);
        for (how, f) in [("one READ_PHYSICAL at a time", &u.read_one[i]), ("pipelined READ_PHYSICAL", &u.read_pipe[i])]
        {
            println!(
                "{:<44} {:>22} {:>22} {:>8} {:>10.0} {:>9.1}x",
                format!("{} {how}", size_name(*size)),
                f.cell(),
                gcell(theirs),
                vs(f, theirs),
                mbps(*size, f.key()),
                f.key() / memcpy[i].key()
            );
        }
        match &u.read_map {
            Ok(figs) => {
                let f = &figs[i];
                println!(
                    "{:<44} {:>22} {:>22} {:>8} {:>10.0} {:>9.1}x",
                    format!("{} mapped view (map_memory + read)", size_name(*size)),
                    f.cell(),
                    gcell(theirs),
                    vs(f, theirs),
                    mbps(*size, f.key()),
                    f.key() / memcpy[i].key()
                );
            }
            Err(e) => println!("{} mapped view: n/a ({e})", size_name(*size)),
        }
        if let Some(t) = theirs {
            println!(
                "{:<44} {:>22} {:>22} {:>8} {:>10.0}",
                format!("  (gdbstub m: {})", size_name(*size)),
                "",
                "",
                "",
                mbps(*size, t.key())
            );
        }
    }
    if let Some(g) = gd {
        println!();
        println!("-- goals");
        let goal = |what: &str, x: f64, want: f64| {
            println!("{:<60} {:>8.1}x  (goal >= {want}x: {})", what, x, if x >= want { "met" } else { "NOT met" })
        };
        goal("registers, paused vCPU: gdbstub g / GET_REGISTERS", g.g.key() / u.regs_paused.key(), 5.0);
        goal(
            "registers, running vCPU (idle): gdbstub 0x03+g+c / GET_REGISTERS",
            g.running_g.key() / u.regs_idle.key(),
            5.0,
        );
        goal("single step: gdbstub s / SINGLESTEP event to event", g.s.key() / u.steps.key(), 20.0);
        if let Ok((f, _)) = &u.steps_channel {
            goal("single step, event channel: gdbstub s / event to event", g.s.key() / f.key(), 20.0);
        }
        let i = READS.len() - 1;
        goal("64 MiB: gdbstub m / pipelined READ_PHYSICAL", g.m[i].key() / u.read_pipe[i].key(), 50.0);
        if let Ok(m) = &u.read_map {
            println!(
                "{:<60} {:>8.2}x  (goal: close to 1)",
                "64 MiB: mapped view / memcpy",
                m[i].key() / memcpy[i].key()
            );
        }
    }
}

fn size_name(size: usize) -> String {
    if size >= MIB1 {
        format!("{} MiB", size / MIB1)
    } else {
        format!("{} KiB", size / 1024)
    }
}
