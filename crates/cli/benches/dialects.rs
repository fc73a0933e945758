//! kvmi-v7 beside KVMI v12: the same raw client, the same guest, only the
//! VMM's `--kvmi-dialect` differs.
//!
//! The bench is its own minimal introspector (no `ukvmi-introspector`): it
//! listens on a UNIX socket in a private temporary directory, accepts the
//! VMM's connection, answers the QEMU-style handshake (reads
//! `qemu_vmi_to_introspector`, answers `qemu_vmi_from_introspector` with
//! `struct_size` 24 and a zero cookie), and then speaks whichever dialect the
//! VMM was started with. Both dialects go through one code path; what
//! differs is a table of ids and the two bodies whose layout differs
//! (READ/WRITE_PHYSICAL's size field, PAUSE_VCPU's vCPU header). The client
//! waits for a message as `ukvmi-introspector` does: it polls the socket
//! without sleeping for up to 50 µs, then blocks.
//!
//! One *session* is one `ukvmi run --guest bench --vcpus 1 --memory 64
//! --introspect unix:SOCK --kvmi-dialect D` and one connection. Sessions
//! alternate in an ABBA order (v12 v7, v7 v12, v12 v7, ...) so that drift in
//! the machine's load hits both dialects alike. Each session measures, one
//! request at a time (no pipelining), guest idle (`hlt`) unless said:
//!
//! * READ_PHYSICAL of one 4 KiB page, request → reply (v12 id 12 `{u64 gpa;
//!   u16 size; u16; u32}`, v7 id 17 `{u64 gpa; u64 size}`);
//! * GET_REGISTERS (v12 id 7, v7 id 13; no MSRs) on a running vCPU, the guest
//!   idle (`hlt`), then spinning. With the guest spinning, a session whose
//!   tool, receiving thread and vCPU thread the scheduler put on one CPU
//!   answers every request in one scheduler tick (4 ms here) instead of
//!   ~60-100 µs, whatever the dialect (reproduced with `taskset`; see
//!   BENCHMARKS.md);
//! * GET_REGISTERS on a paused vCPU: the vCPU waits in a PAUSE event (v12
//!   VM_PAUSE_VCPU id 16, v7 PAUSE_VCPU id 7, wait = 1) while it is asked;
//! * the PAUSE round trip, guest spinning: PAUSE_VCPU(wait = 1) sent → its
//!   reply → the PAUSE event (v12 event 1, v7 event 10) → CONTINUE sent
//!   (v12 message id 1, v7 id 0); the sample is one whole cycle, from one
//!   PAUSE_VCPU's send to the next's, so consecutive samples tile the time;
//! * the MSR round trip: the guest writes LSTAR in a tight loop with the MSR
//!   event on (v12 VCPU_CONTROL_EVENTS id 5 with event 15, v7 CONTROL_EVENTS
//!   id 9 with event 2; CONTROL_MSR id 25 / 11 for 0xc0000082); each event is
//!   answered CONTINUE with the guest's value, and the time from one event's
//!   arrival to the next one's is one full round trip;
//! * 64 MiB read one 4 KiB READ_PHYSICAL at a time (what libkvmi-based dumps
//!   do), after one untimed pass.
//!
//! Samples of the same dialect are pooled over the sessions; the table gives
//! p50 / p99 per dialect and v7 p50 / v12 p50 against the goal (≤ 1.10).
//! Several ops are bimodal per session (per VM): a session is fast or slow
//! as a whole, by where the scheduler put its threads, so the pooled p50
//! follows how many sessions of each dialect drew the slow mode. The table
//! therefore also counts the sessions in a slow mode (p50 over 1.5x the best
//! session's) and gives the ratio over the fast-mode sessions alone, and a
//! second table gives every session's p50.
//! A bare UNIX-socket round trip (two threads, 24 bytes) is measured at the
//! start and at the end for context. Checks on the way: GET_VERSION tells
//! the dialects apart (v12 has `max_msg_size` where v7 has padding), the
//! page read is the guest's image, a paused vCPU's RIP does not move, MSR
//! events = guest iterations.
//!
//! Run: `cargo bench -p ukvmi --bench dialects` (needs /dev/kvm), or
//! `scripts/bench dialects`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;
mod raw;

use common::{num, Fig};
use raw::{Client, Dialect, Ev, CONTINUE};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::{EventMsr, EventMsrReply, IntoBytes, PAGE_SIZE};

/// Sessions per dialect (one VM each), in ABBA order (even: each dialect
/// goes first as often as the other).
const ROUNDS: usize = 6;
/// Timed samples per round-trip figure and session, after `WARMUP`.
const N: usize = 2000;
const WARMUP: usize = 200;
/// Timed 64 MiB passes per session (after one untimed one).
const DUMP_N: usize = 2;
const MIB64: u64 = 64 << 20;
/// The goal: v7 p50 within 10 % of v12 p50.
const GOAL: f64 = 1.10;

/// Times `f` `n` times after `warmup` untimed calls.
fn samples(warmup: usize, n: usize, mut f: impl FnMut()) -> Vec<Duration> {
    for _ in 0..warmup {
        f();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

/// The operations measured, in table order.
const OPS: [&str; 7] = [
    "READ_PHYSICAL 4 KiB",
    "GET_REGISTERS, running vCPU, guest idle (hlt)",
    "GET_REGISTERS, running vCPU, guest spinning",
    "GET_REGISTERS, paused vCPU (in a PAUSE event)",
    "PAUSE round trip: PAUSE_VCPU → reply → event → CONTINUE (spinning)",
    "MSR round trip: event → CONTINUE → next event",
    "64 MiB, one READ_PHYSICAL of 4 KiB at a time (p50 / max)",
];
const DUMP_OP: usize = 6;
/// A session whose p50 for an op is above this many times the best
/// session's (either dialect) is in a slow mode: thread placement, not the
/// dialect (BENCHMARKS.md).
const SLOW: f64 = 1.5;

/// One session's samples, per op, and what the checks saw.
struct Measured {
    ops: Vec<Vec<Duration>>,
    checks: Vec<String>,
}

fn session(d: Dialect, tag: usize) -> Measured {
    // `start` checks with GET_VERSION that the VMM speaks `d`.
    let (sess, mut c) = raw::start(d, &format!("dialects-{tag}"), "bench", 1, 64);
    let ids = d.ids();
    let mut checks = vec![format!("GET_VERSION and the vCPU count say {}, 1 vCPU", d.name())];

    let mut ops: Vec<Vec<Duration>> = Vec::new();

    // READ_PHYSICAL of the guest's first image page, guest idle.
    let bench = ukvmi_guests::find("bench").expect("the bench guest");
    let at = bench.load_addr;
    let page = c.read_physical(at, PAGE_SIZE);
    let n = bench.image.len().min(PAGE_SIZE);
    assert_eq!(page[..n], bench.image[..n], "{}: the page read is not the guest's image", d.name());
    ops.push(samples(WARMUP, N, || {
        c.read_physical(at, PAGE_SIZE);
    }));

    // GET_REGISTERS on the running vCPU: guest idle (`hlt`), then spinning.
    ops.push(samples(WARMUP, N, || {
        c.get_registers(0);
    }));
    c.set_mode(layout::BENCH_SPIN);
    std::thread::sleep(Duration::from_millis(50));
    ops.push(samples(WARMUP, N, || {
        c.get_registers(0);
    }));

    // GET_REGISTERS on the vCPU waiting in a PAUSE event.
    let pause = d.pause_vcpu(0, 1);
    c.request(ids.pause_vcpu, &[&pause]);
    let ev = c.next_event();
    assert_eq!(ev.event, ids.ev_pause, "{}: expected PAUSE", d.name());
    let rip = ev.rip;
    ops.push(samples(WARMUP, N, || {
        assert_eq!(c.get_registers(0).regs.rip, rip, "a paused vCPU does not move");
    }));
    c.reply(&ev, CONTINUE, &[]);

    // PAUSE round trips, guest spinning: one whole cycle per sample.
    ops.push(samples(WARMUP, N, || {
        c.request(ids.pause_vcpu, &[&pause]);
        let ev = c.next_event();
        assert_eq!(ev.event, ids.ev_pause);
        c.reply(&ev, CONTINUE, &[]);
    }));

    // MSR round trips: event to event.
    c.set_mode(layout::BENCH_IDLE);
    std::thread::sleep(Duration::from_millis(20));
    c.control_events(0, ids.ev_msr, true);
    c.control_msr(0, layout::MSR_LSTAR, true);
    let c0 = c.count();
    c.set_mode(layout::BENCH_WRMSR);
    let mut v = Vec::with_capacity(N);
    let mut last: Option<Instant> = None;
    let mut events = 0u64;
    let answer = |c: &mut Client, ev: &Ev| {
        assert_eq!(ev.event, ids.ev_msr, "{}: expected MSR", d.name());
        let m: EventMsr = ukvmi_introspector::wire::read_zext(&ev.payload);
        assert_eq!(m.msr, layout::MSR_LSTAR);
        c.reply(ev, CONTINUE, EventMsrReply { new_val: m.new_value }.as_bytes());
    };
    for i in 0..=WARMUP + N {
        let ev = c.next_event();
        let now = Instant::now();
        if i > WARMUP {
            v.push(now - last.unwrap());
        }
        last = Some(now);
        answer(&mut c, &ev);
        events += 1;
    }
    ops.push(v);
    c.set_mode(layout::BENCH_IDLE);
    while let Some(ev) = c.next_event_within(Duration::from_millis(300)) {
        answer(&mut c, &ev);
        events += 1;
    }
    c.control_msr(0, layout::MSR_LSTAR, false);
    c.control_events(0, ids.ev_msr, false);
    let iterations = c.count() - c0;
    assert_eq!(events, iterations, "{}: MSR events against guest iterations", d.name());
    checks.push(format!("MSR: {events} events = {iterations} guest iterations"));

    // 64 MiB, a page at a time (guest idle).
    let pass = |c: &mut Client| {
        for gpa in (0..MIB64).step_by(PAGE_SIZE) {
            c.read_physical(gpa, PAGE_SIZE);
        }
    };
    ops.push(samples(1, DUMP_N, || pass(&mut c)));
    assert_eq!(ops.len(), OPS.len());
    drop(c);
    drop(sess);
    Measured { ops, checks }
}

/// p50 of a set of samples, µs.
fn p50(v: &[Duration]) -> f64 {
    Fig::from_samples(v.to_vec()).key()
}

fn main() {
    if !common::is_bench_run("dialects") {
        return;
    }
    let t_start = Instant::now();
    let sock0 = common::socket_rtt(WARMUP, N);

    // ABBA: round r runs v12 first when r is even. Per session: its
    // dialect (0 = v12, 1 = v7), its round and its samples per op.
    let mut sessions: Vec<(usize, usize, Vec<Vec<Duration>>)> = Vec::new();
    let mut checks: Vec<String> = Vec::new();
    for r in 0..ROUNDS {
        let order = if r % 2 == 0 { [Dialect::V12, Dialect::V7] } else { [Dialect::V7, Dialect::V12] };
        for (k, d) in order.into_iter().enumerate() {
            let m = session(d, 2 * r + k);
            checks.extend(m.checks.into_iter().map(|c| format!("round {} {}: {c}", r + 1, d.name())));
            sessions.push((usize::from(d == Dialect::V7), r, m.ops));
        }
    }
    let sock1 = common::socket_rtt(WARMUP, N);

    // Pools op `i`'s samples of dialect `slot` over the sessions `keep` accepts.
    let pool = |i: usize, slot: usize, keep: &dyn Fn(f64) -> bool| -> Option<Fig> {
        let v: Vec<Duration> = sessions
            .iter()
            .filter(|(sl, _, ops)| *sl == slot && keep(p50(&ops[i])))
            .flat_map(|(_, _, ops)| ops[i].iter().copied())
            .collect();
        (!v.is_empty()).then(|| Fig::from_samples(v))
    };
    // Per op: the p50 above which a session is in a slow mode.
    let slow_above: Vec<f64> = (0..OPS.len())
        .map(|i| SLOW * sessions.iter().map(|(_, _, ops)| p50(&ops[i])).fold(f64::INFINITY, f64::min))
        .collect();

    println!("kvmi-v7 beside v12: the same raw client, `ukvmi run --guest bench --vcpus 1 --memory 64 --kvmi-dialect v12|v7`");
    println!(
        "{ROUNDS} rounds, ABBA order (v12 v7, v7 v12, ...), one VM per dialect per round; {N} samples per op and session \
         after {WARMUP} warm-up ({DUMP_N} for 64 MiB after 1), pooled per dialect. p50 / p99 in µs."
    );
    println!();
    println!("| baseline | p50 / p99 |");
    println!("|---|---|");
    println!("| bare UNIX socket round trip (24 B, two threads), start / end | {}, {} |", sock0.cell(), sock1.cell());
    println!();
    println!(
        "| op | v12 | v7 | v7 / v12 (p50) | goal ≤ {GOAL:.2} | sessions in a slow mode (p50 > {SLOW}x the best session's), \
         v12, v7 | fast-mode sessions only: v12 p50, v7 p50, v7 / v12 |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut fails = Vec::new();
    for (i, op) in OPS.iter().enumerate() {
        let f12 = pool(i, 0, &|_| true).unwrap();
        let f7 = pool(i, 1, &|_| true).unwrap();
        let ratio = f7.key() / f12.key();
        let met = ratio <= GOAL;
        if !met {
            fails.push(*op);
        }
        let cell = |f: &Fig| {
            if i == DUMP_OP {
                // The p99 of a dozen passes is their max; MB/s from the p50.
                format!(
                    "{} / {} ({:.0} MB/s)",
                    num(f.p50.unwrap()),
                    num(f.p99.unwrap()),
                    common::mbps(MIB64 as usize, f.key())
                )
            } else {
                f.cell()
            }
        };
        let slow =
            |slot: usize| sessions.iter().filter(|(sl, _, ops)| *sl == slot && p50(&ops[i]) > slow_above[i]).count();
        let fast = |slot: usize| pool(i, slot, &|x| x <= slow_above[i]);
        let fast_cell = match (fast(0), fast(1)) {
            (Some(a), Some(b)) => format!("{}, {}, {:.3}", num(a.key()), num(b.key()), b.key() / a.key()),
            _ => "n/a (one dialect has no fast-mode session)".to_string(),
        };
        println!(
            "| {op} | {} | {} | {ratio:.3} | {} | {}/{ROUNDS}, {}/{ROUNDS} | {fast_cell} |",
            cell(&f12),
            cell(&f7),
            if met { "met" } else { "NOT met" },
            slow(0),
            slow(1),
        );
    }
    println!();
    println!("Per-session p50 (µs), v12 / v7, and v7 / v12:");
    println!();
    let head: Vec<String> = (1..=ROUNDS).map(|r| format!("round {r}")).collect();
    println!("| op | {} |", head.join(" | "));
    println!("|---|{}", "---|".repeat(ROUNDS));
    for (i, op) in OPS.iter().enumerate() {
        let cells: Vec<String> = (0..ROUNDS)
            .map(|r| {
                let at = |slot: usize| {
                    sessions.iter().find(|(sl, rr, _)| *sl == slot && *rr == r).map(|(_, _, ops)| p50(&ops[i])).unwrap()
                };
                let (a, b) = (at(0), at(1));
                format!("{} / {} ({:.2})", num(a), num(b), b / a)
            })
            .collect();
        println!("| {op} | {} |", cells.join(" | "));
    }
    println!();
    for c in &checks {
        println!("ok   {c}");
    }
    if fails.is_empty() {
        println!("goal v7 within 10 % of v12 (pooled p50): met on every op");
    } else {
        println!("goal v7 within 10 % of v12 (pooled p50): NOT met on: {}", fails.join("; "));
    }
    println!("({:.1} s)", t_start.elapsed().as_secs_f64());
}
