//! `event_rtt`'s rows over both dialects: the same event round trips as the
//! library rows (MSR, BREAKPOINT + CONTINUE, BREAKPOINT + SET_REGISTERS +
//! RETRY, PAUSE spinning and idle, PF), through one raw client (`raw`, the
//! bench's own, one code path for v12 and kvmi-v7: `ukvmi-introspector`
//! speaks v12 only) on the socket, each dialect in its own `ukvmi run
//! --kvmi-dialect D` session. Sessions go v12 v7 v7 v12 (drift in the
//! machine's load hits both alike); samples of a dialect are pooled.
//! Whatever the dialect, the VMM serves an event through the same path (the
//! v7 codec only renames ids and reframes headers on the receiving thread
//! and when the event is framed).

use std::time::{Duration, Instant};

use crate::common::Fig;
use crate::raw::{self, Client, Dialect, Ev, CONTINUE, RETRY};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::{access, read_zext, EventMsr, EventMsrReply, IntoBytes};

/// Sessions per dialect (ABBA order).
const ROUNDS: usize = 2;
/// Timed samples per figure and session, after `WARMUP`.
const N: usize = 1500;
const WARMUP: usize = 200;

/// One dialect's figures, pooled over its sessions.
pub struct Rows {
    pub d: Dialect,
    pub msr: Fig,
    pub bp_cont: Fig,
    pub bp_retry: Fig,
    pub pause_spin: Fig,
    pub pause_idle: Fig,
    pub pf: Option<Fig>,
}

/// One session's samples, in `Rows` order (PF last, possibly empty).
type Samples = [Vec<Duration>; 6];

/// Both dialects: (v12, v7). `int3` is the bench guest's int3 address;
/// `pf` whether the host has PF (the library rows found out).
pub fn run(int3: u64, pf: bool, check: &mut dyn FnMut(bool, String)) -> (Rows, Rows) {
    let mut pooled: [Samples; 2] = Default::default();
    let order = [Dialect::V12, Dialect::V7, Dialect::V7, Dialect::V12];
    for (i, d) in order.into_iter().enumerate().take(2 * ROUNDS) {
        let s = session(d, i, int3, pf, check);
        let slot = usize::from(d == Dialect::V7);
        for (all, mine) in pooled[slot].iter_mut().zip(s) {
            all.extend(mine);
        }
    }
    let rows = |d: Dialect, s: &mut Samples| Rows {
        d,
        msr: Fig::from_samples(std::mem::take(&mut s[0])),
        bp_cont: Fig::from_samples(std::mem::take(&mut s[1])),
        bp_retry: Fig::from_samples(std::mem::take(&mut s[2])),
        pause_spin: Fig::from_samples(std::mem::take(&mut s[3])),
        pause_idle: Fig::from_samples(std::mem::take(&mut s[4])),
        pf: (!s[5].is_empty()).then(|| Fig::from_samples(std::mem::take(&mut s[5]))),
    };
    let [mut a, mut b] = pooled;
    (rows(Dialect::V12, &mut a), rows(Dialect::V7, &mut b))
}

fn bp_handled(c: &mut Client) -> u64 {
    u64::from_le_bytes(c.read_physical(layout::EXC_COUNT_BASE + 3 * 8, 8).try_into().unwrap())
}

/// Switches the guest to `mode` (event `id` enabled by the caller) and
/// answers every event with `answer`, timing event to event; then: guest
/// idle, `id` disabled, stragglers answered. Returns the samples, the
/// events answered and the guest iterations meanwhile.
fn serve(c: &mut Client, mode: u64, id: u16, answer: &dyn Fn(&mut Client, &Ev)) -> (Vec<Duration>, u64, u64) {
    let c0 = c.count();
    c.set_mode(mode);
    let mut v = Vec::with_capacity(N);
    let mut last: Option<Instant> = None;
    let mut events = 0u64;
    for i in 0..=WARMUP + N {
        let ev = c.next_event();
        let now = Instant::now();
        assert_eq!(ev.event, id, "{}: expected event {id}, got {}", c.d.name(), ev.event);
        if i > WARMUP {
            v.push(now - last.unwrap());
        }
        last = Some(now);
        answer(c, &ev);
        events += 1;
    }
    c.set_mode(layout::BENCH_IDLE);
    c.control_events(0, id, false);
    while let Some(ev) = c.next_event_within(Duration::from_millis(300)) {
        answer(c, &ev);
        events += 1;
    }
    std::thread::sleep(Duration::from_millis(20));
    let iterations = c.count() - c0;
    (v, events, iterations)
}

fn session(d: Dialect, tag: usize, int3: u64, pf: bool, check: &mut dyn FnMut(bool, String)) -> Samples {
    let (_sess, mut c) = raw::start(d, &format!("rtt-{tag}"), "bench", 1, 64);
    let ids = d.ids();
    let name = d.name();
    std::thread::sleep(Duration::from_millis(200));

    // MSR: wrmsr LSTAR, CONTINUE with the guest's value.
    c.control_events(0, ids.ev_msr, true);
    c.control_msr(0, layout::MSR_LSTAR, true);
    let (msr, ev_n, it) = serve(&mut c, layout::BENCH_WRMSR, ids.ev_msr, &|c, ev| {
        let m: EventMsr = read_zext(&ev.payload);
        assert_eq!(m.msr, layout::MSR_LSTAR);
        c.reply(ev, CONTINUE, EventMsrReply { new_val: m.new_value }.as_bytes());
    });
    c.control_msr(0, layout::MSR_LSTAR, false);
    check(ev_n == it, format!("{name} raw MSR: {ev_n} events, {it} guest iterations"));

    // BREAKPOINT, CONTINUE: the #BP goes to the guest's own handler.
    c.control_events(0, ids.ev_breakpoint, true);
    let h0 = bp_handled(&mut c);
    let (bp_cont, ev_n, it) = serve(&mut c, layout::BENCH_INT3, ids.ev_breakpoint, &|c, ev| {
        assert_eq!(ev.rip, int3, "BREAKPOINT at the bench int3");
        c.reply(ev, CONTINUE, &[]);
    });
    let handled = bp_handled(&mut c) - h0;
    check(
        ev_n == it && handled == ev_n,
        format!(
            "{name} raw BREAKPOINT CONTINUE: {ev_n} events, {it} iterations, the guest's handler ran {handled} times"
        ),
    );

    // BREAKPOINT, SET_REGISTERS (rip + 1) + RETRY: the guest never sees it.
    c.control_events(0, ids.ev_breakpoint, true);
    let h0 = bp_handled(&mut c);
    let (bp_retry, ev_n, it) = serve(&mut c, layout::BENCH_INT3, ids.ev_breakpoint, &|c, ev| {
        let mut regs = ev.regs;
        regs.rip += 1;
        c.set_registers(ev.vcpu, &regs);
        c.reply(ev, RETRY, &[]);
    });
    let handled = bp_handled(&mut c) - h0;
    check(
        ev_n == it && handled == 0,
        format!("{name} raw BREAKPOINT RETRY: {ev_n} events, {it} iterations, the guest's handler ran {handled} times"),
    );

    // PAUSE: PAUSE_VCPU(wait), the PAUSE event, CONTINUE; spinning, idle.
    let pause = d.pause_vcpu(0, 1);
    let pause_loop = |c: &mut Client, mode: u64| {
        c.set_mode(mode);
        std::thread::sleep(Duration::from_millis(100));
        let mut v = Vec::with_capacity(N);
        for i in 0..WARMUP + N {
            let t = Instant::now();
            c.request(ids.pause_vcpu, &[&pause]);
            let ev = c.next_event();
            assert_eq!(ev.event, ids.ev_pause, "{name}: expected PAUSE");
            c.reply(&ev, CONTINUE, &[]);
            if i >= WARMUP {
                v.push(t.elapsed());
            }
        }
        c.set_mode(layout::BENCH_IDLE);
        v
    };
    let pause_spin = pause_loop(&mut c, layout::BENCH_SPIN);
    let pause_idle = pause_loop(&mut c, layout::BENCH_IDLE);

    // PF: a write to a page without W, CONTINUE applies it.
    let mut pf_v = Vec::new();
    if pf {
        let page = layout::BENCH_PF_PAGE;
        c.control_events(0, ids.ev_pf, true);
        c.set_page_access(page, access::R | access::X);
        let (v, ev_n, it) = serve(&mut c, layout::BENCH_PF, ids.ev_pf, &|c, ev| c.reply(ev, CONTINUE, &[]));
        c.set_page_access(page, access::RWX);
        let on_page = u64::from_le_bytes(c.read_physical(page, 8).try_into().unwrap());
        let last = c.count();
        check(
            ev_n == it && on_page == last,
            format!("{name} raw PF: {ev_n} events, {it} iterations; the page holds {on_page}, the count is {last}"),
        );
        pf_v = v;
    }
    [msr, bp_cont, bp_retry, pause_spin, pause_idle, pf_v]
}

/// Prints both dialects' rows (with `row`, the table's row printer) and
/// v7 / v12 per figure.
pub fn report(v12: &Rows, v7: &Rows, row: &dyn Fn(&str, &Fig)) {
    println!(
        "-- both dialects, socket, one raw client (the bench's own; sessions v12 v7 v7 v12, {} timed per figure \
         and dialect)",
        N * ROUNDS
    );
    for r in [v12, v7] {
        let n = r.d.name();
        row(&format!("{n}: MSR (wrmsr LSTAR) + CONTINUE"), &r.msr);
        row(&format!("{n}: BREAKPOINT + CONTINUE (#BP into the guest)"), &r.bp_cont);
        row(&format!("{n}: BREAKPOINT + SET_REGISTERS(rip+1) + RETRY"), &r.bp_retry);
        row(&format!("{n}: PAUSE_VCPU + PAUSE + CONTINUE, spinning vCPU"), &r.pause_spin);
        row(&format!("{n}: PAUSE_VCPU + PAUSE + CONTINUE, idle vCPU"), &r.pause_idle);
        match &r.pf {
            Some(f) => row(&format!("{n}: PF (write to a W-restricted page) + CONTINUE"), f),
            None => println!("{n}: PF: not available on this build/host"),
        }
    }
    let ratio = |what: &str, a: &Fig, b: &Fig| println!("  v7 / v12, {what:<42} {:>6.2}", b.key() / a.key());
    ratio("MSR + CONTINUE", &v12.msr, &v7.msr);
    ratio("BREAKPOINT + CONTINUE", &v12.bp_cont, &v7.bp_cont);
    ratio("BREAKPOINT + SET_REGISTERS + RETRY", &v12.bp_retry, &v7.bp_retry);
    ratio("PAUSE, spinning vCPU", &v12.pause_spin, &v7.pause_spin);
    ratio("PAUSE, idle vCPU", &v12.pause_idle, &v7.pause_idle);
    if let (Some(a), Some(b)) = (&v12.pf, &v7.pf) {
        ratio("PF + CONTINUE", a, b);
    }
}
