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
//!   guest's own handler) and with SET_REGISTERS (rip + 1) + RETRY, PAUSE
//!   (PAUSE_VCPU, event, CONTINUE) on a spinning and on an idle vCPU, and PF
//!   (a write to a W-restricted page, CONTINUE) where the build and the host
//!   have it.
//!
//! Ratios divide a figure's p50 (or its mean, where only a rate is
//! measurable) by the baseline's.
//!
//! Run: `cargo bench -p ukvmi --bench event_rtt` (needs /dev/kvm).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

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
    for i in 0..=WARMUP + N {
        let ev = next_vcpu_event(vm, T);
        let now = Instant::now();
        assert_eq!(ev.event, id, "expected event {:?}, got {:?}", event::name(id), ev.name());
        if i > WARMUP {
            v.push(now - last.unwrap());
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
    Served { fig: Fig::from_samples(v), events, iterations: count(vm) - c0 }
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

    // MSR: wrmsr LSTAR, CONTINUE (the guest's value is written).
    vm.control_events(0, event::MSR, true).unwrap();
    vm.control_msr(0, layout::MSR_LSTAR, true).unwrap();
    let msr = serve(&vm, layout::BENCH_WRMSR, event::MSR, |vm, ev| {
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
    let last_count = count(&vm);
    check(msr.events == msr.iterations, format!("MSR: {} events, {} guest iterations", msr.events, msr.iterations));
    check(
        lstar == layout::LSTAR_TAG | (last_count & 0xffff_ffff),
        format!("MSR: LSTAR is {lstar:#x} after CONTINUE (count {last_count})"),
    );

    // BREAKPOINT, CONTINUE: #BP re-injected into the guest's handler.
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    let bp0 = read_u64(&vm, layout::EXC_COUNT_BASE + 3 * 8);
    let int3 = sym("bench_int3_insn");
    let bp_cont = serve(&vm, layout::BENCH_INT3, event::BREAKPOINT, |vm, ev| {
        assert_eq!(ev.regs.rip, int3, "BREAKPOINT at the bench int3");
        vm.reply(ev, EventReply::Continue).unwrap();
    });
    let handled = read_u64(&vm, layout::EXC_COUNT_BASE + 3 * 8) - bp0;
    check(
        bp_cont.events == bp_cont.iterations && handled == bp_cont.events,
        format!(
            "BREAKPOINT CONTINUE: {} events, {} iterations, the guest's #BP handler ran {handled} times",
            bp_cont.events, bp_cont.iterations
        ),
    );

    // BREAKPOINT, SET_REGISTERS (rip + 1) + RETRY: stepping over, as a
    // debugger does; the guest never sees the #BP. (The drain in `serve`
    // answers CONTINUE, so at most one straggler reaches the handler.)
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    let bp0 = read_u64(&vm, layout::EXC_COUNT_BASE + 3 * 8);
    let bp_retry = serve(&vm, layout::BENCH_INT3, event::BREAKPOINT, |vm, ev| {
        let mut regs = ev.regs;
        regs.rip += 1;
        vm.set_registers(0, &regs).unwrap();
        vm.reply(ev, EventReply::Retry).unwrap();
    });
    let handled = read_u64(&vm, layout::EXC_COUNT_BASE + 3 * 8) - bp0;
    check(
        bp_retry.events == bp_retry.iterations && handled <= 1,
        format!(
            "BREAKPOINT RETRY: {} events, {} iterations, the guest's #BP handler ran {handled} times",
            bp_retry.events, bp_retry.iterations
        ),
    );

    // PAUSE: PAUSE_VCPU(wait), the PAUSE event, CONTINUE; spinning and idle.
    let pause = |mode: u64| {
        set_mode(&vm, mode);
        std::thread::sleep(Duration::from_millis(100));
        let f = measure(|| {
            vm.pause_vcpu(0, true).unwrap();
            let ev = next_vcpu_event(&vm, T);
            assert_eq!(ev.event, event::PAUSE);
            vm.reply(&ev, EventReply::Continue).unwrap();
        });
        set_mode(&vm, layout::BENCH_IDLE);
        f
    };
    let pause_spin = pause(layout::BENCH_SPIN);
    let pause_idle = pause(layout::BENCH_IDLE);

    // PF: a write to a page whose W access was removed, CONTINUE applies it.
    let pf_avail = vm.check_event(event::PF).and_then(|()| vm.check_command(msg::VM_SET_PAGE_ACCESS));
    let pf = match pf_avail {
        Err(e) => Err(e.raw_err().map_or_else(|| e.to_string(), |c| c.to_string())),
        Ok(()) => {
            let page = layout::BENCH_PF_PAGE;
            vm.control_events(0, event::PF, true).unwrap();
            vm.set_page_access(&[(page, access::R | access::X)]).unwrap();
            let s = serve(&vm, layout::BENCH_PF, event::PF, |vm, ev| {
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
            let (on_page, last) = (read_u64(&vm, page), count(&vm));
            check(s.events == s.iterations, format!("PF: {} events, {} guest iterations", s.events, s.iterations));
            check(
                on_page == last,
                format!("PF: the page holds {on_page}, the last count is {last} (CONTINUE applied the writes)"),
            );
            Ok(s)
        }
    };

    let sock_again = socket_rtt();

    // ----------------------------------------------------------------- report
    let ukvmi_exit = out.mean;
    println!("ukvmi event round trips beside the raw KVM exit, one run");
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
    println!("-- event round trips ({N} timed each, event to event as the tool sees it)");
    row("MSR (wrmsr LSTAR) + CONTINUE", &msr.fig);
    row("BREAKPOINT (int3) + CONTINUE (#BP into the guest)", &bp_cont.fig);
    row("BREAKPOINT + SET_REGISTERS(rip+1) + RETRY", &bp_retry.fig);
    row("PAUSE_VCPU(wait) + PAUSE event + CONTINUE, spinning vCPU", &pause_spin);
    row("PAUSE_VCPU(wait) + PAUSE event + CONTINUE, idle vCPU", &pause_idle);
    match &pf {
        Ok(s) => row("PF (write to a W-restricted page) + CONTINUE", &s.fig),
        Err(code) => println!("PF: not available on this build/host ({code})"),
    }
    row("bare UNIX socket round trip (again, at end)", &sock_again);
    // The socket's p50 depends on whether both threads share a CPU: the
    // better of the two runs is the baseline.
    let sock_best = sock_rtt.key().min(sock_again.key());
    println!("-- in socket round trips (p50 / the better socket p50)");
    let in_sockets = |name: &str, f: &Fig| println!("{name:<58} {:>8.1}", f.key() / sock_best);
    in_sockets("MSR + CONTINUE", &msr.fig);
    in_sockets("BREAKPOINT + CONTINUE", &bp_cont.fig);
    in_sockets("BREAKPOINT + SET_REGISTERS + RETRY", &bp_retry.fig);
    if let Ok(s) = &pf {
        in_sockets("PF + CONTINUE", &s.fig);
    }
    println!(
        "(one event = the vCPU thread writes the event, the tool's waiting caller reads it off the socket itself, \
         writes the reply, the VMM's receiving thread queues it for the vCPU thread, which re-enters KVM: two socket \
         messages and up to three thread wake-ups, fewer when a bounded spin catches the next message, on top of \
         the exit itself)"
    );
    println!("-- checks (what the guest saw)");
    for c in &checks {
        println!("{c}");
    }
}
