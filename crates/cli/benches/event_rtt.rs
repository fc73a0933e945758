//! Event round trips beside the raw KVM exit, all measured in the same run:
//!
//! * baselines: a bare `KVM_RUN` loop in this process (a 1-vCPU real-mode
//!   VM doing `out %al,%dx; jmp .-1`, each `KVM_RUN` timed), the `bench`
//!   guest's `out` loop under `ukvmi run` (iterations/s read from guest
//!   memory → µs per exit), the same guest's exit-free spin loop (the cost of
//!   the loop's own emulated instructions), and the bare UNIX-socket round
//!   trip (all from the shared `common` module);
//! * event round trips through `ukvmi run` and `ukvmi-introspector` over the
//!   real socket, with the guest raising the event in a tight loop, so the
//!   time from one event to the next is one full round trip (event out →
//!   tool answers → guest resumed → next event): MSR (wrmsr LSTAR) with
//!   CONTINUE, BREAKPOINT (int3) with CONTINUE (#BP re-injected into the
//!   guest's own handler) and with SET_REGISTERS (rip + 1) + RETRY (through
//!   the channel: the registers in the reply, `Vm::reply_with_registers`,
//!   and beside it the two-message way), PAUSE
//!   (PAUSE_VCPU, event, CONTINUE) on a spinning and on an idle vCPU, and PF
//!   (a write to a W-restricted page, CONTINUE) where the build and the host
//!   have it.
//!
//! * the same event round trips over both dialects, v12 and kvmi-v7, through
//!   one raw client on the socket (`rtt_dialects`; the library speaks v12
//!   only), each dialect in its own VM.
//!
//! Ratios divide a figure's p50 (or its mean, where only a rate is
//! measurable) by the baseline's.
//!
//! Run: `cargo bench -p ukvmi --bench event_rtt` (needs /dev/kvm).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;
mod raw;
mod rtt_dialects;

use common::{bare, next_vcpu_event, read_u64, set_mode, Fig};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::{access, event, msg};
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};

/// Timed samples per round-trip figure (after `WARMUP` untimed ones).
const N: usize = 3000;
const WARMUP: usize = 300;
/// Samples of the bare KVM_RUN loop.
const BARE_N: usize = 20_000;
/// How long each guest loop rate is measured.
const RATE: Duration = Duration::from_secs(2);
/// Longest wait for any single event or command.
const T: Duration = Duration::from_secs(20);

fn measure(f: impl FnMut()) -> Fig {
    common::measure(WARMUP, N, f)
}

fn socket_rtt() -> Fig {
    common::socket_rtt(WARMUP, N)
}

fn count(vm: &Vm) -> u64 {
    read_u64(vm, layout::BENCH_COUNT)
}

/// Runs guest loop `mode` without any event enabled for `RATE` and returns
/// the mean time per iteration, from the guest's own counter.
fn rate(vm: &Vm, mode: u64) -> Fig {
    set_mode(vm, mode);
    std::thread::sleep(Duration::from_millis(200));
    let (c0, t0) = (count(vm), Instant::now());
    std::thread::sleep(RATE);
    let (c1, t1) = (count(vm), Instant::now());
    set_mode(vm, layout::BENCH_IDLE);
    assert!(c1 > c0, "mode {mode}: the guest loop did not run ({c0} → {c1})");
    Fig::mean_only((t1 - t0).as_secs_f64() * 1e6 / (c1 - c0) as f64)
}

/// What one served event loop gave: the figure, events answered and guest
/// iterations counted meanwhile.
struct Served {
    fig: Fig,
    events: u64,
    iterations: u64,
    /// Seqs of the first and last timed event (to pick them out of a trace).
    first_seq: u32,
    last_seq: u32,
}

/// Switches the guest to `mode` with `id` enabled (by the caller) and
/// answers every event with `answer`; the time between consecutive events is
/// one round trip. Afterwards: guest idle, `id` disabled, nothing pending.
fn serve(vm: &Vm, mode: u64, id: u16, mut answer: impl FnMut(&Vm, &PendingEvent)) -> Served {
    let c0 = count(vm);
    set_mode(vm, mode);
    let mut v = Vec::with_capacity(N);
    let mut last: Option<Instant> = None;
    let mut events = 0u64;
    let (mut first_seq, mut last_seq) = (0, 0);
    for i in 0..=WARMUP + N {
        let ev = next_vcpu_event(vm, T);
        let now = Instant::now();
        assert_eq!(ev.event, id, "expected event {:?}, got {:?}", event::name(id), ev.name());
        if i > WARMUP {
            v.push(now - last.unwrap());
            last_seq = ev.seq;
        } else {
            first_seq = ev.seq;
        }
        last = Some(now);
        answer(vm, &ev);
        events += 1;
    }
    set_mode(vm, layout::BENCH_IDLE);
    vm.control_events(0, id, false).unwrap();
    while let Some(e) = vm.next_event(Some(Duration::from_millis(300))).unwrap() {
        if let Event::Vcpu(ev) = e {
            vm.reply(&ev, EventReply::Continue).unwrap();
            events += 1;
        }
    }
    std::thread::sleep(Duration::from_millis(20));
    Served { fig: Fig::from_samples(v), events, iterations: count(vm) - c0, first_seq, last_seq }
}

/// The event figures of one path (socket, or the shared-memory channel).
struct Figures {
    msr: Served,
    bp_cont: Served,
    bp_retry: Served,
    /// With the channel on: BREAKPOINT answered by `reply_with_registers`
    /// (registers and RETRY in one slot write).
    bp_regs: Option<Served>,
    pause_spin: Fig,
    pause_idle: Fig,
    pf: Result<Served, String>,
    /// (label, first seq, last seq) of each served loop, for the trace.
    seqs: Vec<(String, u32, u32)>,
}

/// Every event round trip once, through whatever path `vm` uses now.
fn events(vm: &Vm, path: &str, int3: u64, check: &mut dyn FnMut(bool, String)) -> Figures {
    let mut seqs = Vec::new();
    // MSR: wrmsr LSTAR, CONTINUE (the guest's value is written).
    vm.control_events(0, event::MSR, true).unwrap();
    vm.control_msr(0, layout::MSR_LSTAR, true).unwrap();
    let msr = serve(vm, layout::BENCH_WRMSR, event::MSR, |vm, ev| {
        match ev.payload {
            EventPayload::Msr { msr, new_value, .. } => {
                assert_eq!(msr, layout::MSR_LSTAR);
                assert_eq!(new_value >> 32, layout::LSTAR_TAG >> 32);
            }
            ref k => panic!("MSR event with {k:?}"),
        }
        vm.reply(ev, EventReply::Continue).unwrap();
    });
    vm.control_msr(0, layout::MSR_LSTAR, false).unwrap();
    let lstar = vm.get_registers(0, &[layout::MSR_LSTAR]).unwrap().msrs[0].data;
    let last_count = count(vm);
    check(
        msr.events == msr.iterations,
        format!("{path} MSR: {} events, {} guest iterations", msr.events, msr.iterations),
    );
    check(
        lstar == layout::LSTAR_TAG | (last_count & 0xffff_ffff),
        format!("{path} MSR: LSTAR is {lstar:#x} after CONTINUE (count {last_count})"),
    );

    // BREAKPOINT, CONTINUE: #BP re-injected into the guest's handler.
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    let bp0 = read_u64(vm, layout::EXC_COUNT_BASE + 3 * 8);
    let bp_cont = serve(vm, layout::BENCH_INT3, event::BREAKPOINT, |vm, ev| {
        assert_eq!(ev.regs.rip, int3, "BREAKPOINT at the bench int3");
        vm.reply(ev, EventReply::Continue).unwrap();
    });
    let handled = read_u64(vm, layout::EXC_COUNT_BASE + 3 * 8) - bp0;
    check(
        bp_cont.events == bp_cont.iterations && handled == bp_cont.events,
        format!(
            "{path} BREAKPOINT CONTINUE: {} events, {} iterations, the guest's #BP handler ran {handled} times",
            bp_cont.events, bp_cont.iterations
        ),
    );

    // BREAKPOINT, SET_REGISTERS (rip + 1) + RETRY: stepping over, as a
    // debugger does; the guest never sees the #BP. (The drain in `serve`
    // answers CONTINUE, so at most one straggler reaches the handler.)
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    let bp0 = read_u64(vm, layout::EXC_COUNT_BASE + 3 * 8);
    let bp_retry = serve(vm, layout::BENCH_INT3, event::BREAKPOINT, |vm, ev| {
        let mut regs = ev.regs;
        regs.rip += 1;
        vm.set_registers(0, &regs).unwrap();
        vm.reply(ev, EventReply::Retry).unwrap();
    });
    let handled = read_u64(vm, layout::EXC_COUNT_BASE + 3 * 8) - bp0;
    check(
        bp_retry.events == bp_retry.iterations && handled <= 1,
        format!(
            "{path} BREAKPOINT RETRY: {} events, {} iterations, the guest's #BP handler ran {handled} times",
            bp_retry.events, bp_retry.iterations
        ),
    );

    // The same, answered by one channel reply that carries the registers.
    let bp_regs = vm.event_channel_enabled().then(|| {
        vm.control_events(0, event::BREAKPOINT, true).unwrap();
        let bp0 = read_u64(vm, layout::EXC_COUNT_BASE + 3 * 8);
        let s = serve(vm, layout::BENCH_INT3, event::BREAKPOINT, |vm, ev| {
            let mut regs = ev.regs;
            regs.rip += 1;
            vm.reply_with_registers(ev, EventReply::Retry, &regs).unwrap();
        });
        let handled = read_u64(vm, layout::EXC_COUNT_BASE + 3 * 8) - bp0;
        check(
            s.events == s.iterations && handled <= 1,
            format!(
                "{path} BREAKPOINT RETRY, registers in the reply: {} events, {} iterations, the guest's #BP handler \
                 ran {handled} times",
                s.events, s.iterations
            ),
        );
        s
    });

    // PAUSE: PAUSE_VCPU(wait), the PAUSE event, CONTINUE; spinning and idle.
    let mut pause = |mode: u64, label: &str| {
        set_mode(vm, mode);
        std::thread::sleep(Duration::from_millis(100));
        let mut seen = Vec::with_capacity(WARMUP + N);
        let f = measure(|| {
            vm.pause_vcpu(0, true).unwrap();
            let ev = next_vcpu_event(vm, T);
            assert_eq!(ev.event, event::PAUSE);
            seen.push(ev.seq);
            vm.reply(&ev, EventReply::Continue).unwrap();
        });
        set_mode(vm, layout::BENCH_IDLE);
        if let (Some(a), Some(b)) = (seen.get(WARMUP), seen.last()) {
            seqs.push((format!("{path} {label}"), *a, *b));
        }
        f
    };
    let pause_spin = pause(layout::BENCH_SPIN, "PAUSE spinning");
    let pause_idle = pause(layout::BENCH_IDLE, "PAUSE idle");

    // PF: a write to a page whose W access was removed, CONTINUE applies it.
    let pf_avail = vm.check_event(event::PF).and_then(|()| vm.check_command(msg::VM_SET_PAGE_ACCESS));
    let pf = match pf_avail {
        Err(e) => Err(e.raw_err().map_or_else(|| e.to_string(), |c| c.to_string())),
        Ok(()) => {
            let page = layout::BENCH_PF_PAGE;
            vm.control_events(0, event::PF, true).unwrap();
            vm.set_page_access(&[(page, access::R | access::X)]).unwrap();
            let s = serve(vm, layout::BENCH_PF, event::PF, |vm, ev| {
                match ev.payload {
                    EventPayload::Pf { gpa, access: a, .. } => {
                        assert_eq!(gpa & !0xfff, page, "PF on the bench page");
                        assert_eq!(a, access::W, "a write");
                    }
                    ref k => panic!("PF event with {k:?}"),
                }
                vm.reply(ev, EventReply::Continue).unwrap();
            });
            vm.set_page_access(&[(page, access::RWX)]).unwrap();
            let (on_page, last) = (read_u64(vm, page), count(vm));
            check(
                s.events == s.iterations,
                format!("{path} PF: {} events, {} guest iterations", s.events, s.iterations),
            );
            check(
                on_page == last,
                format!("{path} PF: the page holds {on_page}, the last count is {last} (CONTINUE applied the writes)"),
            );
            Ok(s)
        }
    };

    for (label, s) in [("MSR", &msr), ("BREAKPOINT CONTINUE", &bp_cont), ("BREAKPOINT RETRY", &bp_retry)] {
        seqs.push((format!("{path} {label}"), s.first_seq, s.last_seq));
    }
    if let Some(s) = &bp_regs {
        seqs.push((format!("{path} BP RETRY +regs"), s.first_seq, s.last_seq));
    }
    if let Ok(s) = &pf {
        seqs.push((format!("{path} PF"), s.first_seq, s.last_seq));
    }
    Figures { msr, bp_cont, bp_retry, bp_regs, pause_spin, pause_idle, pf, seqs }
}

/// How long the idle cost is measured.
const IDLE: Duration = Duration::from_secs(2);

/// CPU time (user + system, ms) of this run's `ukvmi run` process, found
/// by its scratch directory in the command line; `f64::NAN` if not found.
fn vmm_cpu_ms() -> f64 {
    let tag = format!("ukvmi-bench-events-{}", std::process::id());
    let Ok(dir) = std::fs::read_dir("/proc") else { return f64::NAN };
    for e in dir.flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmd).contains(&tag) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        if let (Some(u), Some(s)) = (f.get(10), f.get(11)) {
            return (u + s) * 1000.0 / hz;
        }
    }
    f64::NAN
}

/// The VMM's CPU time over [`IDLE`] with the guest idle and no event enabled.
fn idle_cpu(vm: &Vm) -> f64 {
    set_mode(vm, layout::BENCH_IDLE);
    std::thread::sleep(Duration::from_millis(200));
    let c0 = vmm_cpu_ms();
    std::thread::sleep(IDLE);
    vmm_cpu_ms() - c0
}

fn main() {
    if !common::is_bench_run("event_rtt") {
        return;
    }
    let bench = ukvmi_guests::find("bench").expect("the bench guest");
    let sym = |s: &str| bench.symbol(s).unwrap_or_else(|| panic!("bench guest: no {s}"));

    let sock_rtt = socket_rtt();
    let bare = bare::exit_loop(WARMUP, BARE_N).map(Fig::from_samples);

    let (_proc, vm) = common::start_vm("events", "bench", 1, 64);
    std::thread::sleep(Duration::from_millis(300));

    // Guest loops without events: the exit through our VMM, and the loop's
    // own cost (no exits).
    let spin = rate(&vm, layout::BENCH_SPIN);
    let out = rate(&vm, layout::BENCH_OUT);
    let wrmsr_free = rate(&vm, layout::BENCH_WRMSR);
    let bp0 = read_u64(&vm, layout::EXC_COUNT_BASE + 3 * 8);
    let c0 = count(&vm);
    let int3_free = rate(&vm, layout::BENCH_INT3);
    let (bp_free_handled, int3_free_iter) = (read_u64(&vm, layout::EXC_COUNT_BASE + 3 * 8) - bp0, count(&vm) - c0);

    let mut checks: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| checks.push(format!("{} {what}", if ok { "ok  " } else { "FAIL" }));
    check(
        int3_free_iter.abs_diff(bp_free_handled) <= 1,
        format!(
            "int3 without the event: {int3_free_iter} iterations, the guest's #BP handler ran {bp_free_handled} times"
        ),
    );

    let int3 = sym("bench_int3_insn");
    let idle_socket = idle_cpu(&vm);
    let socket = events(&vm, "socket", int3, &mut check);
    vm.enable_event_channel().expect("the shared-memory event channel");
    let idle_channel = idle_cpu(&vm);
    let channel = events(&vm, "channel", int3, &mut check);

    let pf_here = channel.pf.is_ok();
    let (raw_v12, raw_v7) = rtt_dialects::run(int3, pf_here, &mut check);

    let sock_again = socket_rtt();

    // ----------------------------------------------------------------- report
    let ukvmi_exit = out.mean;
    println!("ukvmi event round trips beside the raw KVM exit, one run; each event through the socket and through the");
    println!("shared-memory event channel (UKVMI_VM_EVENT_CHANNEL), same VM, same connection");
    println!("(microseconds; p50/p99 where every sample was timed, mean always; ratio = p50, or the mean where only a rate exists, / baseline)");
    println!("{:<58} {:>8} {:>8} {:>8} {:>10} {:>10}", "what", "p50", "p99", "mean", "x exit", "x bare KVM");
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"));
    let bare_key = bare.as_ref().ok().map(Fig::key);
    let row = |name: &str, f: &Fig| {
        let vs_bare = bare_key.map_or_else(|| "-".to_owned(), |b| format!("{:.2}x", f.key() / b));
        println!(
            "{name:<58} {:>8} {:>8} {:>8.1} {:>9.2}x {:>10}",
            opt(f.p50),
            opt(f.p99),
            f.mean,
            f.key() / ukvmi_exit,
            vs_bare
        );
    };
    println!("-- baselines");
    match &bare {
        Ok(f) => row(&format!("bare KVM_RUN, out exit, no VMM ({BARE_N} timed)"), f),
        Err(e) => println!("bare KVM_RUN loop: not available here ({e})"),
    }
    row("out exit through ukvmi run (guest loop, iterations/s)", &out);
    row("  guest loop alone, no exit (spin, iterations/s)", &spin);
    row("  out exit minus the loop (out - spin)", &Fig::mean_only(out.mean - spin.mean));
    row("wrmsr LSTAR, not watched (no exit; iterations/s)", &wrmsr_free);
    row("int3, event off: #BP via VMM into guest handler (it/s)", &int3_free);
    row("bare UNIX socket round trip (24 bytes)", &sock_rtt);
    row("bare UNIX socket round trip (again, at end)", &sock_again);
    for (path, f) in [("socket", &socket), ("channel", &channel)] {
        println!("-- event round trips through the {path} ({N} timed each, event to event as the tool sees it)");
        row("MSR (wrmsr LSTAR) + CONTINUE", &f.msr.fig);
        row("BREAKPOINT (int3) + CONTINUE (#BP into the guest)", &f.bp_cont.fig);
        match &f.bp_regs {
            // With the channel: the registers ride in the reply (one slot
            // write); the old two-message way beside it.
            Some(r) => {
                row("BREAKPOINT + SET_REGISTERS(rip+1) + RETRY", &r.fig);
                row("  the same, two messages (SET_REGISTERS on the socket)", &f.bp_retry.fig);
            }
            None => row("BREAKPOINT + SET_REGISTERS(rip+1) + RETRY", &f.bp_retry.fig),
        }
        row("PAUSE_VCPU(wait) + PAUSE event + CONTINUE, spinning vCPU", &f.pause_spin);
        row("PAUSE_VCPU(wait) + PAUSE event + CONTINUE, idle vCPU", &f.pause_idle);
        match &f.pf {
            Ok(s) => row("PF (write to a W-restricted page) + CONTINUE", &s.fig),
            Err(code) => println!("PF: not available on this build/host ({code})"),
        }
    }
    rtt_dialects::report(&raw_v12, &raw_v7, &row);
    // The goals of issue 14, per path.
    println!("-- goals (p50; bare = the bare KVM exit p50; BP CONTINUE: extra exits over the int3 with the event off)");
    println!("{:<44} {:>14} {:>14} {:>8}", "what", "socket", "channel", "goal");
    if let Some(b) = bare_key {
        let x = |f: &Fig| format!("{:.2}x", f.key() / b);
        let goal = |name: &str, s: &Fig, c: &Fig, g: &str| println!("{name:<44} {:>14} {:>14} {g:>8}", x(s), x(c));
        goal("MSR + CONTINUE", &socket.msr.fig, &channel.msr.fig, "<= 3x");
        if let (Ok(s), Ok(c)) = (&socket.pf, &channel.pf) {
            goal("PF + CONTINUE", &s.fig, &c.fig, "<= 3x");
        }
        goal("PAUSE, spinning vCPU", &socket.pause_spin, &channel.pause_spin, "<= 3x");
        goal("PAUSE, idle vCPU", &socket.pause_idle, &channel.pause_idle, "<= 3x");
        let bp_regs = channel.bp_regs.as_ref().map_or(&channel.bp_retry.fig, |s| &s.fig);
        goal("BREAKPOINT + SET_REGISTERS + RETRY", &socket.bp_retry.fig, bp_regs, "<= 4x");
        let extra = |f: &Fig| format!("{:+.1} exits", (f.key() - int3_free.mean) / b);
        println!(
            "{:<44} {:>14} {:>14} {:>8}",
            "BREAKPOINT + CONTINUE over int3, event off",
            extra(&socket.bp_cont.fig),
            extra(&channel.bp_cont.fig),
            "<= +2"
        );
    }
    println!(
        "(socket: the vCPU thread writes the event, the tool's waiting caller reads it off the socket itself, writes \
         the reply, the VMM's receiving thread queues it for the vCPU thread, which re-enters KVM. channel: the vCPU \
         thread posts the event in its slot, the tool's caller (spinning, bounded) copies it out and writes the reply \
         into the slot, the vCPU thread (spinning, bounded) validates it and re-enters KVM; no socket message, no \
         thread hand-off when both spins catch their message; for BREAKPOINT + SET_REGISTERS + RETRY the registers \
         ride in that same slot write (Vm::reply_with_registers), the two-message row sends SET_REGISTERS on the \
         socket first)"
    );
    println!(
        "-- idle: the VMM's CPU time while attached, no event enabled, guest idle (hlt), over {} s: \
         {idle_socket:.1} ms with events on the socket, {idle_channel:.1} ms with the channel on",
        IDLE.as_secs()
    );
    println!("-- checks (what the guest saw)");
    for c in &checks {
        println!("{c}");
    }
    if let Ok(prefix) = std::env::var("UKVMI_EVENT_TRACE") {
        // The VMM writes its records when the connection ends.
        drop(vm);
        std::thread::sleep(Duration::from_millis(500));
        drop(_proc);
        let phases: Vec<_> = socket.seqs.iter().chain(&channel.seqs).cloned().collect();
        trace_report(&prefix, &phases);
    }
}

/// Per-hand-off p50s from the trace files the VMM and the library wrote
/// (`UKVMI_EVENT_TRACE=<prefix>`): points 7 vCPU starts building the event,
/// 8 and 9 its KVM_GET_REGS and KVM_GET_SREGS returned, 0 vCPU sends, 1 tool receives, 2 tool replies, 3 receiving thread read
/// the reply, 4 reply queued, 5 vCPU has the reply, 6 vCPU resumes the
/// guest; "resume -> next build" is the guest, its exit and the VMM's
/// handling of it up to the endpoint.
fn trace_report(prefix: &str, phases: &[(String, u32, u32)]) {
    use std::collections::BTreeMap;
    let mut at: BTreeMap<u32, [Option<u64>; 10]> = BTreeMap::new();
    for file in ["vmm", "tool"] {
        let text = std::fs::read_to_string(format!("{prefix}.{file}")).unwrap_or_default();
        for line in text.lines() {
            let f: Vec<u64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
            if let [seq, point, t, _] = f[..] {
                if let Some(slot) = at.entry(seq as u32).or_default().get_mut(point as usize) {
                    *slot = Some(t);
                }
            }
        }
    }
    let hops: [(&str, usize, usize); 12] = [
        ("vCPU reads registers, frames (build -> sends)", 7, 0),
        ("  of which KVM_GET_REGS", 7, 8),
        ("  KVM_GET_SREGS", 8, 9),
        ("  KVM_GET_MSRS (9 MSRs) + framing", 9, 0),
        ("vCPU sends -> tool has the event", 0, 1),
        ("tool has it -> tool replies", 1, 2),
        ("tool replies -> receiving thread read it", 2, 3),
        ("receiving thread read -> queued", 3, 4),
        ("queued -> vCPU has the reply", 4, 5),
        ("tool replies -> vCPU has the reply", 2, 5),
        ("vCPU has the reply -> resumes the guest", 5, 6),
        ("vCPU sends -> resumes the guest", 0, 6),
    ];
    println!("-- trace: p50 per hand-off, µs (UKVMI_EVENT_TRACE; recording adds ~0.1 µs per point)");
    print!("{:<28}", "phase");
    for (name, ..) in hops {
        print!(" | {name}");
    }
    println!(" | resume -> next build (guest, exit, VMM)");
    for (label, first, last) in phases {
        let (first, last) = (*first, *last);
        print!("{label:<28}");
        let p50 = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
        };
        for (_, a, b) in hops {
            let v: Vec<f64> =
                at.range(first..=last).filter_map(|(_, p)| Some((p[b]?.checked_sub(p[a]?)?) as f64 / 1e3)).collect();
            print!(" | {}", p50(v));
        }
        let v: Vec<f64> = at
            .range(first..=last)
            .zip(at.range(first + 1..=last))
            .filter_map(|((_, p), (_, q))| Some((q[7]?.checked_sub(p[6]?)?) as f64 / 1e3))
            .collect();
        println!(" | {}", p50(v));
    }
}
