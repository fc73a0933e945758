//! Page-access restrictions and the PF event on a stock kernel, end to end
//! on /dev/kvm with the `pf` guest: what the tool answers is what the
//! guest's own loads then see.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{assert_no_event_while_running, code, read_u32, read_u64, start, start_all_up, RunningVm, Scratch};
use std::time::{Duration, Instant};
use ukvmi_guests::layout::{self, pf_data_addr};
use ukvmi_introspector::wire::{access, event, msg};
use ukvmi_introspector::{Event, EventPayload, EventReply, Listener, PendingEvent, Vm};

const T: Duration = Duration::from_secs(20);
const R: u8 = access::R;
const W: u8 = access::W;
const X: u8 = access::X;
const RWX: u8 = access::RWX;

fn sym(name: &str) -> u64 {
    ukvmi_guests::find("pf").unwrap().symbol(name).unwrap_or_else(|| panic!("pf guest has no symbol {name}"))
}

/// One PF event: the message and its payload.
struct Pf {
    ev: PendingEvent,
    gva: u64,
    gpa: u64,
    access: u8,
}

fn pf_event(tool: &Vm) -> Pf {
    match tool.next_event(Some(T)).unwrap() {
        Some(Event::Vcpu(ev)) => match ev.payload {
            EventPayload::Pf { gva, gpa, access } => Pf { ev, gva, gpa, access },
            ref other => panic!("expected a PF event, got {other:?}"),
        },
        other => panic!("expected a PF event, got {other:?}"),
    }
}

/// The next PF event at `gpa`. A restriction may land while the guest is
/// midway through a round, so earlier events of that round are CONTINUEd.
fn pf_event_at(tool: &Vm, gpa: u64) -> Pf {
    loop {
        let e = pf_event(tool);
        if e.gpa == gpa {
            return e;
        }
        tool.reply(&e.ev, EventReply::Continue).unwrap();
    }
}

/// No event for `wait` while the `pf` guest's vCPU 0 completes rounds of
/// its accesses (store, load, straddling store, call into its function).
fn no_event(tool: &Vm, wait: Duration) {
    assert_no_event_while_running(tool, wait, "pf guest rounds", |t| vec![read_u64(t, layout::PF_ROUNDS_BASE)]);
}

/// No event for `wait` while both vCPUs of the `spin` guest loop.
fn no_event_while_spinning(tool: &Vm, wait: Duration) {
    assert_no_event_while_running(tool, wait, "spin guest loops", |t| {
        (0..2).map(|i| read_u64(t, layout::counter_addr(i))).collect()
    });
}

/// The u64 of vCPU `vcpu` in one of the guest's arrays.
fn at(base: u64, vcpu: u16) -> u64 {
    base + 8 * u64::from(vcpu)
}

/// Waits until vCPU `vcpu` has completed `n` more rounds.
fn wait_rounds(tool: &Vm, vcpu: u16, n: u64) {
    let first = read_u64(tool, at(layout::PF_ROUNDS_BASE, vcpu));
    let t0 = Instant::now();
    while read_u64(tool, at(layout::PF_ROUNDS_BASE, vcpu)) < first + n {
        assert!(t0.elapsed() < T, "vCPU {vcpu} did not complete {n} rounds of the pf guest within {T:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn page_access_is_offered_and_validated() {
    let dir = Scratch::new("pfcaps");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    assert_eq!(tool.check_command(msg::VM_SET_PAGE_ACCESS).map_err(|e| e.to_string()), Ok(()));
    assert_eq!(tool.check_event(event::PF).map_err(|e| e.to_string()), Ok(()));
    tool.control_events(0, event::PF, true).unwrap();
    assert_eq!(code(tool.set_page_access(&[(64 << 20, R)])), -22, "past the end of RAM (64 MiB)");
    assert_eq!(code(tool.set_page_access(&[(0x50_0000, 8)])), -22, "unknown access bit");
    // No restriction was applied by the failures: the guest runs without events.
    no_event(&tool, Duration::from_millis(300));
    // A restriction on a page nobody touches costs nothing visible.
    tool.set_page_access(&[(0x50_0000, 0)]).unwrap();
    tool.set_page_access(&[(0x50_0000, RWX)]).unwrap();
    no_event(&tool, Duration::from_millis(200));
    vm.assert_guest_runs();
}

#[test]
fn write_restriction_retry_drops_the_write_and_continue_applies_it() {
    let dir = Scratch::new("pfw");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let a = pf_data_addr(0);
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(a, R | X)]).unwrap();

    // The store: held, and reported with RIP already past it.
    let e = pf_event_at(&tool, a);
    assert_eq!((e.ev.vcpu.raw(), e.gpa, e.access, e.gva), (0, a, W, u64::MAX));
    assert_eq!(e.ev.regs.rip, sym("pf_load"), "RIP is past the store (documented caveat)");
    let tried = read_u64(&tool, layout::PF_TRIED_BASE);
    assert_eq!(tried & layout::PF_TAG, layout::PF_TAG);
    assert_eq!(e.ev.regs.rax, tried, "the value being stored");
    let old = read_u64(&tool, a);
    assert_ne!(old, tried, "the write is held while the tool decides");
    // Skip it: SET_REGISTERS (RIP stays past the store) + RETRY.
    tool.set_registers(0, &e.ev.regs).unwrap();
    tool.reply(&e.ev, EventReply::Retry).unwrap();

    // The straddling store's first half (4 bytes at the end of page A).
    let e2 = pf_event(&tool);
    assert_eq!((e2.gpa, e2.access), (a + 0xffc, W));
    assert_eq!(e2.ev.regs.rip, sym("pf_straddle_load"));
    assert_eq!(read_u64(&tool, layout::PF_SEEN_BASE), old, "the guest's own load saw the old value");
    assert_eq!(read_u64(&tool, a), old, "memory unchanged");
    tool.reply(&e2.ev, EventReply::Continue).unwrap();

    // Next round: let the store through.
    let e3 = pf_event(&tool);
    assert_eq!((e3.gpa, e3.access), (a, W));
    let straddled = read_u64(&tool, layout::PF_STRADDLE_TRIED_BASE);
    assert_eq!(read_u64(&tool, layout::PF_STRADDLE_SEEN_BASE), straddled, "last round's CONTINUE'd straddle landed");
    let tried3 = read_u64(&tool, layout::PF_TRIED_BASE);
    assert!(tried3 > tried);
    tool.reply(&e3.ev, EventReply::Continue).unwrap();
    let e4 = pf_event(&tool);
    assert_eq!(e4.gpa, a + 0xffc);
    assert_eq!(read_u64(&tool, layout::PF_SEEN_BASE), tried3, "CONTINUE applied the write, as the guest's load saw");
    assert_eq!(read_u64(&tool, a), tried3);

    // RETRY without SET_REGISTERS and still write-protected: the event comes again.
    tool.reply(&e4.ev, EventReply::Retry).unwrap();
    let e5 = pf_event(&tool);
    assert_eq!((e5.gpa, e5.access, e5.ev.regs.rip), (a + 0xffc, W, e4.ev.regs.rip));
    // Forget the page, then RETRY: the write is done (as re-executing would).
    tool.set_page_access(&[(a, RWX)]).unwrap();
    tool.reply(&e5.ev, EventReply::Retry).unwrap();
    no_event(&tool, Duration::from_millis(300));
    wait_rounds(&tool, 0, 1);
    let tried = read_u64(&tool, layout::PF_TRIED_BASE);
    wait_rounds(&tool, 0, 2);
    assert!(read_u64(&tool, layout::PF_SEEN_BASE) >= tried, "unrestricted writes land");
    vm.assert_guest_runs();
}

#[test]
fn read_restriction_continue_gives_the_true_value_and_set_registers_wins() {
    let dir = Scratch::new("pfr");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let a = pf_data_addr(0);
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(a, W | X)]).unwrap();

    // The load waits at its own RIP; the store before it was allowed.
    let e = pf_event_at(&tool, a);
    assert_eq!((e.gpa, e.access, e.gva), (a, R, u64::MAX));
    assert_eq!(e.ev.regs.rip, sym("pf_load"), "the load has not executed");
    let tried = read_u64(&tool, layout::PF_TRIED_BASE);
    assert_eq!(read_u64(&tool, a), tried, "writes are allowed: the store landed without an event");
    // RETRY while still read-protected: the same load faults again.
    tool.reply(&e.ev, EventReply::Retry).unwrap();
    let e2 = pf_event(&tool);
    assert_eq!((e2.gpa, e2.access, e2.ev.regs.rip), (a, R, sym("pf_load")));
    tool.reply(&e2.ev, EventReply::Continue).unwrap();

    // The straddling load reads A's last 4 bytes: another read event.
    let e3 = pf_event(&tool);
    assert_eq!((e3.gpa, e3.access, e3.ev.regs.rip), (a + 0xffc, R, sym("pf_straddle_load")));
    assert_eq!(read_u64(&tool, layout::PF_SEEN_BASE), tried, "CONTINUE gave the guest the true value");
    // The tool's own write is what a CONTINUE'd load returns.
    let straddled = read_u64(&tool, layout::PF_STRADDLE_TRIED_BASE);
    tool.write_physical(a + 0xffc, &0x1357_9bdf_u32.to_le_bytes()).unwrap();
    tool.reply(&e3.ev, EventReply::Continue).unwrap();

    // Next round: emulate the load for the guest (RIP past it, RCX chosen).
    let e4 = pf_event(&tool);
    assert_eq!((e4.gpa, e4.ev.regs.rip), (a, sym("pf_load")));
    assert_eq!(
        read_u64(&tool, layout::PF_STRADDLE_SEEN_BASE),
        (straddled & !0xffff_ffff) | 0x1357_9bdf,
        "low half from the tool's write (page A), high half from page B"
    );
    let mut regs = e4.ev.regs;
    regs.rip = sym("pf_load_done");
    regs.rcx = 0xdead_beef_0bad_f00d;
    tool.set_registers(0, &regs).unwrap();
    tool.reply(&e4.ev, EventReply::Retry).unwrap();
    let e5 = pf_event(&tool);
    assert_eq!(e5.gpa, a + 0xffc);
    assert_eq!(read_u64(&tool, layout::PF_SEEN_BASE), 0xdead_beef_0bad_f00d, "the guest stored the tool's RCX");
    assert_eq!(e5.ev.regs.rcx, 0xdead_beef_0bad_f00d);

    tool.set_page_access(&[(a, RWX)]).unwrap();
    tool.reply(&e5.ev, EventReply::Continue).unwrap();
    no_event(&tool, Duration::from_millis(300));
    vm.assert_guest_runs();
}

#[test]
fn execute_restriction_steps_one_instruction_per_continue() {
    let dir = Scratch::new("pfx");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let f = sym("pf_func");
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(f, R | W)]).unwrap();

    let e = pf_event(&tool);
    assert_eq!((e.gva, e.gpa, e.access), (f, f, X), "gva == RIP == the function (identity-mapped)");
    assert_eq!(e.ev.regs.rip, f);
    let count = read_u64(&tool, layout::PF_EXEC_COUNT_BASE);
    let rounds = read_u64(&tool, layout::PF_ROUNDS_BASE);
    tool.reply(&e.ev, EventReply::Continue).unwrap();
    // One instruction ran (the increment); the next one on the page faults.
    let e2 = pf_event(&tool);
    assert_eq!((e2.gva, e2.ev.regs.rip, e2.access), (sym("pf_func_ret"), sym("pf_func_ret"), X));
    assert_eq!(read_u64(&tool, layout::PF_EXEC_COUNT_BASE), count + 1, "exactly one instruction ran");
    tool.reply(&e2.ev, EventReply::Continue).unwrap();
    // Next call: the protection is back.
    let e3 = pf_event(&tool);
    assert_eq!((e3.gva, e3.access), (f, X));
    assert_eq!(read_u64(&tool, layout::PF_EXEC_COUNT_BASE), count + 1);
    assert_eq!(read_u64(&tool, layout::PF_ROUNDS_BASE), rounds + 1, "the call returned once");
    // RETRY without relaxing: the fetch faults again, nothing ran.
    tool.reply(&e3.ev, EventReply::Retry).unwrap();
    let e4 = pf_event(&tool);
    assert_eq!((e4.gva, e4.access), (f, X));
    assert_eq!(read_u64(&tool, layout::PF_EXEC_COUNT_BASE), count + 1);
    // The tool still reads the page as it is (the VMM's own mapping).
    let g = ukvmi_guests::find("pf").unwrap();
    let off = usize::try_from(f - g.load_addr).unwrap();
    assert_eq!(tool.read_physical(f, 16).unwrap(), g.image[off..off + 16].to_vec());
    // Relax and RETRY: it runs on its own.
    tool.set_page_access(&[(f, RWX)]).unwrap();
    tool.reply(&e4.ev, EventReply::Retry).unwrap();
    no_event(&tool, Duration::from_millis(300));
    wait_rounds(&tool, 0, 2);
    assert!(read_u64(&tool, layout::PF_EXEC_COUNT_BASE) >= count + 3);
    vm.assert_guest_runs();
}

#[test]
fn two_vcpus_in_pf_events_at_once_are_answered_independently() {
    let dir = Scratch::new("pf2");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 2, &[]);
    for i in 0..2 {
        tool.control_events(i, event::PF, true).unwrap();
    }
    tool.set_page_access(&[(pf_data_addr(0), R | X), (pf_data_addr(1), R | X)]).unwrap();
    // Hold each vCPU at its plain store (the restriction may have landed
    // midway through a round: the straddle's events are let through).
    let mut held: Vec<Pf> = Vec::new();
    while held.len() < 2 {
        let e = pf_event(&tool);
        assert_eq!(e.access, W);
        if e.gpa == pf_data_addr(e.ev.vcpu.raw()) && !held.iter().any(|h| h.ev.vcpu.raw() == e.ev.vcpu.raw()) {
            held.push(e);
        } else {
            assert_eq!(e.gpa, pf_data_addr(e.ev.vcpu.raw()) + 0xffc);
            tool.reply(&e.ev, EventReply::Continue).unwrap();
        }
    }
    // Both wait at once; the second arrived while the first was held.
    let second = held.pop().unwrap();
    let first = held.pop().unwrap();
    assert_ne!(first.ev.vcpu.raw(), second.ev.vcpu.raw());
    // Answer the later one first: drop its write.
    let v2 = second.ev.vcpu.raw();
    let old2 = read_u64(&tool, pf_data_addr(v2));
    tool.set_registers(v2, &second.ev.regs).unwrap();
    tool.reply(&second.ev, EventReply::Retry).unwrap();
    let e3 = pf_event(&tool);
    assert_eq!((e3.ev.vcpu.raw(), e3.gpa), (v2, pf_data_addr(v2) + 0xffc), "only the answered vCPU moved on");
    assert_eq!(read_u64(&tool, at(layout::PF_SEEN_BASE, v2)), old2);
    // Now the first one: let it through.
    let v1 = first.ev.vcpu.raw();
    let tried1 = read_u64(&tool, at(layout::PF_TRIED_BASE, v1));
    tool.reply(&first.ev, EventReply::Continue).unwrap();
    let e4 = pf_event(&tool);
    assert_eq!((e4.ev.vcpu.raw(), e4.gpa), (v1, pf_data_addr(v1) + 0xffc));
    assert_eq!(read_u64(&tool, at(layout::PF_SEEN_BASE, v1)), tried1);
    assert_eq!(read_u64(&tool, at(layout::PF_SEEN_BASE, v2)), old2, "vCPU {v2}'s dropped write stayed dropped");

    tool.set_page_access(&[(pf_data_addr(0), RWX), (pf_data_addr(1), RWX)]).unwrap();
    tool.reply(&e3.ev, EventReply::Continue).unwrap();
    tool.reply(&e4.ev, EventReply::Continue).unwrap();
    no_event(&tool, Duration::from_millis(300));
    for i in 0..2 {
        wait_rounds(&tool, i, 1);
        let tried = read_u64(&tool, at(layout::PF_TRIED_BASE, i));
        wait_rounds(&tool, i, 2);
        assert!(read_u64(&tool, at(layout::PF_SEEN_BASE, i)) >= tried);
    }
    vm.assert_guest_runs();
}

#[test]
fn straddling_write_gives_one_event_per_restricted_page() {
    let dir = Scratch::new("pfs");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let a = pf_data_addr(0);
    let b = a + 0x1000;
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(a, R | X), (b, R | X)]).unwrap();

    let e = pf_event_at(&tool, a);
    assert_eq!(e.access, W, "the plain store first");
    tool.reply(&e.ev, EventReply::Continue).unwrap();
    let lo = pf_event(&tool);
    let value = read_u64(&tool, layout::PF_STRADDLE_TRIED_BASE);
    assert_eq!((lo.gpa, lo.access), (a + 0xffc, W));
    assert_eq!(lo.ev.regs.rax, value);
    let old_b = read_u32(&tool, b);
    tool.reply(&lo.ev, EventReply::Continue).unwrap();
    let hi = pf_event(&tool);
    assert_eq!((hi.gpa, hi.access), (b, W), "the second page's fragment");
    assert_eq!(hi.ev.regs.rip, lo.ev.regs.rip, "same instruction");
    assert_eq!(read_u32(&tool, a + 0xffc), value as u32, "the first half landed");
    assert_eq!(read_u32(&tool, b), old_b, "the second half is held");
    // Drop the second half.
    tool.set_registers(0, &hi.ev.regs).unwrap();
    tool.reply(&hi.ev, EventReply::Retry).unwrap();
    let next = pf_event(&tool);
    assert_eq!(next.gpa, a, "next round");
    assert_eq!(
        read_u64(&tool, layout::PF_STRADDLE_SEEN_BASE),
        (u64::from(old_b) << 32) | (value & 0xffff_ffff),
        "the guest's straddling load: new low half, old high half"
    );
    tool.set_page_access(&[(a, RWX), (b, RWX)]).unwrap();
    tool.reply(&next.ev, EventReply::Continue).unwrap();
    no_event(&tool, Duration::from_millis(300));
    wait_rounds(&tool, 0, 1);
    let v = read_u64(&tool, layout::PF_STRADDLE_TRIED_BASE);
    wait_rounds(&tool, 0, 2);
    assert!(read_u64(&tool, layout::PF_STRADDLE_SEEN_BASE) >= v);
    vm.assert_guest_runs();
}

#[test]
fn disconnect_during_pf_events_resumes_all_and_lifts_the_restrictions() {
    let dir = Scratch::new("pfdrop");
    let (vm, l, tool) = start_all_up(&dir, "pf", 2, &[]);
    for i in 0..2 {
        tool.control_events(i, event::PF, true).unwrap();
    }
    let f = sym("pf_func");
    tool.set_page_access(&[(pf_data_addr(0), R | X), (pf_data_addr(1), W | X), (f, R | W)]).unwrap();
    let e1 = pf_event(&tool);
    let e2 = pf_event(&tool);
    assert_ne!(e1.ev.vcpu.raw(), e2.ev.vcpu.raw(), "both vCPUs wait in PF events");
    drop(tool); // dies holding both
    vm.wait_stderr("introspector disconnected", T);
    vm.assert_guest_runs();
    let tool = l.accept().unwrap();
    for i in 0..2 {
        let count = read_u64(&tool, at(layout::PF_EXEC_COUNT_BASE, i));
        wait_rounds(&tool, i, 1);
        let tried = read_u64(&tool, at(layout::PF_TRIED_BASE, i));
        wait_rounds(&tool, i, 2);
        assert!(read_u64(&tool, at(layout::PF_SEEN_BASE, i)) >= tried, "vCPU {i}: writes land again");
        assert!(read_u64(&tool, at(layout::PF_EXEC_COUNT_BASE, i)) >= count + 2, "vCPU {i}: the function runs");
    }
    // The new session restricts nothing: even with PF enabled, no event.
    tool.control_events(0, event::PF, true).unwrap();
    no_event(&tool, Duration::from_millis(300));
    vm.assert_guest_runs();
}

#[test]
fn crash_from_a_pf_event_ends_the_vm() {
    let dir = Scratch::new("pfcrash");
    let (mut vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(pf_data_addr(0), R | X)]).unwrap();
    let e = pf_event(&tool);
    tool.reply(&e.ev, EventReply::Crash).unwrap();
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(2), "{}", vm.stderr_text());
    let err = vm.stderr_text();
    assert!(err.contains("CRASH") && err.contains("PF event"), "{err}");
}

#[test]
fn a_disabled_pf_event_leaves_restricted_pages_working() {
    let dir = Scratch::new("pfoff");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let a = pf_data_addr(0);
    let f = sym("pf_func");
    // Every access removed, but nobody asked for the event: the guest must
    // not notice (reads, writes and fetches are served by the VMM).
    tool.set_page_access(&[(a, 0), (a + 0x1000, R | X), (f, 0)]).unwrap();
    let count = read_u64(&tool, layout::PF_EXEC_COUNT_BASE);
    wait_rounds(&tool, 0, 1);
    let tried = read_u64(&tool, layout::PF_TRIED_BASE);
    let straddle = read_u64(&tool, layout::PF_STRADDLE_TRIED_BASE);
    wait_rounds(&tool, 0, 2);
    assert!(read_u64(&tool, layout::PF_SEEN_BASE) >= tried);
    assert!(read_u64(&tool, layout::PF_STRADDLE_SEEN_BASE) >= straddle);
    assert!(read_u64(&tool, layout::PF_EXEC_COUNT_BASE) >= count + 2);
    no_event(&tool, Duration::from_millis(200));
    vm.assert_guest_runs();
}

/// Numbers for the docs, not a check: `cargo test -p ukvmi --test
/// page_access -- --ignored --nocapture measure`.
#[test]
#[ignore = "measurement; prints timings"]
fn measure_pf_round_trips_and_protect_cost() {
    fn stats(name: &str, mut v: Vec<Duration>) {
        v.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!("{name}: n={} p50 {:.1} µs, p99 {:.1} µs", v.len(), us(v[v.len() / 2]), us(v[v.len() * 99 / 100]));
    }
    // One vCPU: with two, the other one's silent steps over pf_func's
    // page map it for a moment and the X numbers mix with that race.
    let dir = Scratch::new("pfmeasure");
    let (_vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let a = pf_data_addr(0);
    let n = 300;
    tool.control_events(0, event::PF, true).unwrap();

    // Protect/unprotect an idle page: two SET_PAGE_ACCESS round trips, each
    // a memslot split or merge with the vCPU kicked out of guest mode.
    let idle = 0x60_0000;
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        tool.set_page_access(&[(idle, R | X)]).unwrap();
        tool.set_page_access(&[(idle, RWX)]).unwrap();
        v.push(t.elapsed());
    }
    stats("protect+unprotect cycle (2 commands, tool side)", v);
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        tool.vcpu_count().unwrap();
        tool.vcpu_count().unwrap();
        v.push(t.elapsed());
    }
    stats("baseline: 2 VM_GET_INFO round trips", v);

    // W: CONTINUE on the plain store, time until the straddle's event.
    tool.set_page_access(&[(a, R | X)]).unwrap();
    let mut v = Vec::new();
    let mut e = pf_event_at(&tool, a);
    for _ in 0..n {
        let t = Instant::now();
        tool.reply(&e.ev, EventReply::Continue).unwrap();
        let next = pf_event(&tool);
        v.push(t.elapsed());
        assert_eq!(next.gpa, a + 0xffc);
        tool.reply(&next.ev, EventReply::Continue).unwrap();
        e = pf_event_at(&tool, a);
    }
    stats("W event: CONTINUE -> write applied, 9 instructions, next W event", v);
    tool.set_page_access(&[(a, RWX)]).unwrap();
    tool.reply(&e.ev, EventReply::Continue).unwrap();

    // R: CONTINUE on the load, time until the straddling load's event.
    tool.set_page_access(&[(a, W | X)]).unwrap();
    let mut v = Vec::new();
    let mut e = pf_event_at(&tool, a);
    for _ in 0..n {
        let t = Instant::now();
        tool.reply(&e.ev, EventReply::Continue).unwrap();
        let next = pf_event(&tool);
        v.push(t.elapsed());
        assert_eq!(next.gpa, a + 0xffc);
        tool.reply(&next.ev, EventReply::Continue).unwrap();
        e = pf_event_at(&tool, a);
    }
    stats("R event: CONTINUE -> data supplied, 9 instructions, next R event", v);
    tool.set_page_access(&[(a, RWX)]).unwrap();
    tool.reply(&e.ev, EventReply::Continue).unwrap();

    // X: CONTINUE on pf_func's first instruction, time until the fault on its second.
    let f = sym("pf_func");
    tool.set_page_access(&[(f, R | W)]).unwrap();
    let mut v = Vec::new();
    let mut e = pf_event_at(&tool, f);
    for _ in 0..n {
        let t = Instant::now();
        tool.reply(&e.ev, EventReply::Continue).unwrap();
        let next = pf_event(&tool);
        v.push(t.elapsed());
        assert_eq!(next.gva, sym("pf_func_ret"));
        tool.reply(&next.ev, EventReply::Continue).unwrap();
        e = pf_event_at(&tool, f);
    }
    stats("X event: CONTINUE -> map back, step 1 instruction, unmap, next X event", v);
    tool.set_page_access(&[(f, RWX)]).unwrap();
    tool.reply(&e.ev, EventReply::Continue).unwrap();
}

// ---- Restrictions on what the CPU reads by itself (issue 11, #6). A page
// without a memslot cannot be walked through, nor can exception delivery
// read the IDT, GDT or TSS from it: the guest's next walk or exception
// fails and it dies. So SET_PAGE_ACCESS refuses to remove R or X from a
// page that holds a paging structure (walked from every vCPU's CR3) or a
// descriptor table of any vCPU, with -KVM_EOPNOTSUPP, and the guest never
// notices. W alone (a read-only memslot) is accepted: KVM still reads it.

/// `ukvmi run --guest GUEST --vcpus N` with a tool attached; waits until
/// every vCPU printed that it is up (`spin`) or the kernel booted (`demo`).
fn start_guest(dir: &Scratch, guest: &str, vcpus: u16) -> (RunningVm, Listener, Vm) {
    if guest != "demo" {
        return start_all_up(dir, guest, vcpus, &[]);
    }
    let (vm, listener, tool) = start(dir, guest, vcpus, &[]);
    vm.wait_serial("cr3 0x", 4, T);
    (vm, listener, tool)
}

/// Waits until every one of `vcpus` spin-guest counters has moved on by 3.
fn spin_counters_move(tool: &Vm, vcpus: u16) {
    for i in 0..vcpus {
        let c = at(layout::COUNTER_BASE, i);
        let first = read_u64(tool, c);
        let t0 = Instant::now();
        while read_u64(tool, c) < first + 3 {
            assert!(t0.elapsed() < T, "vCPU {i}'s counter stopped at {first}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The spin guest's page tables: the VMM's identity tables (PML4, PDPT,
/// PD) and the alias PD that PDPT entry 1 points to.
const SPIN_TABLES: [u64; 4] = [layout::PML4_ADDR, layout::PDPT_ADDR, layout::PD_ADDR, layout::ALIAS_PD_ADDR];

#[test]
fn removing_r_or_x_from_the_guests_page_tables_is_refused_and_the_guest_runs_on() {
    let dir = Scratch::new("pfpt");
    let (vm, _l, tool) = start_guest(&dir, "spin", 2);
    for i in 0..2 {
        tool.control_events(i, event::PF, true).unwrap();
    }
    // The report's case: gpa 0x1000 (the PML4, CR3 of both vCPUs), access 6.
    assert_eq!(code(tool.set_page_access(&[(0x1000, W | X)])), -95, "R removed from the PML4");
    for &t in &SPIN_TABLES {
        for a in [W | X, R | W, W, X, R, 0] {
            assert_eq!(code(tool.set_page_access(&[(t, a)])), -95, "gpa {t:#x} access {a}");
            // Any address inside the page is the page.
            assert_eq!(code(tool.set_page_access(&[(t + 0x7f8, a)])), -95, "gpa {:#x} access {a}", t + 0x7f8);
        }
    }
    // Nothing was applied: no event, and the guest keeps running.
    no_event_while_spinning(&tool, Duration::from_millis(300));
    spin_counters_move(&tool, 2);
    vm.assert_guest_runs();
    // Pages next to the tables, and data pages, are restricted as before.
    let data = 0x50_0000;
    for p in [layout::PD_ADDR + 0x1000, data] {
        tool.set_page_access(&[(p, W | X)]).unwrap();
        tool.set_page_access(&[(p, 0)]).unwrap();
        tool.set_page_access(&[(p, RWX)]).unwrap();
    }
    // Relaxing a table page is always fine (it is not restricted at all).
    tool.set_page_access(&[(layout::PML4_ADDR, RWX)]).unwrap();
    // One refused entry does not stop the others in the same command (the
    // first error is the answer, as in KVMI): the counters' page is
    // write-protected, each counter store is a PF event (let through).
    let counters = layout::COUNTER_BASE;
    assert_eq!(code(tool.set_page_access(&[(layout::PD_ADDR, R | W), (counters, R | X)])), -95);
    let e = pf_event_at(&tool, at(counters, 0));
    assert_eq!(e.access, W);
    tool.set_page_access(&[(counters, RWX)]).unwrap();
    tool.reply(&e.ev, EventReply::Continue).unwrap();
    // (The other vCPU may wait in one too.)
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(300))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    spin_counters_move(&tool, 2);
    vm.assert_guest_runs();
}

#[test]
fn write_protecting_the_guests_page_tables_is_accepted_and_harmless() {
    let dir = Scratch::new("pfptw");
    let (vm, _l, tool) = start_guest(&dir, "spin", 2);
    for i in 0..2 {
        tool.control_events(i, event::PF, true).unwrap();
    }
    // W removed: a read-only memslot, which page walks still read. (KVM
    // does not set accessed/dirty bits in a read-only slot; the guest's
    // own PTE writes would exit as PF W events. The spin guest makes none.)
    let entries: Vec<(u64, u8)> = SPIN_TABLES.iter().map(|&t| (t, R | X)).collect();
    tool.set_page_access(&entries).unwrap();
    no_event_while_spinning(&tool, Duration::from_millis(500));
    spin_counters_move(&tool, 2);
    vm.assert_guest_runs();
    // Now write-protected, R cannot go either.
    assert_eq!(code(tool.set_page_access(&[(layout::PML4_ADDR, X)])), -95);
    let entries: Vec<(u64, u8)> = SPIN_TABLES.iter().map(|&t| (t, RWX)).collect();
    tool.set_page_access(&entries).unwrap();
    spin_counters_move(&tool, 2);
    vm.assert_guest_runs();
}

/// The same for what exception delivery reads: the traps guest's IDT (its
/// own int3 every 8 iterations goes through it) and the VMM's GDT (page 0).
/// Without the check, R removed from the IDT's page ends the guest at its
/// next int3 (a triple fault).
#[test]
fn removing_r_or_x_from_the_guests_idt_or_gdt_is_refused() {
    let dir = Scratch::new("pfidt");
    let (vm, _l, tool) = start_guest(&dir, "traps", 1);
    let int3s = || read_u64(&tool, layout::INT3_DONE);
    let int3s_move = || {
        let first = int3s();
        let t0 = Instant::now();
        while int3s() < first + 3 {
            assert!(t0.elapsed() < T, "the guest's int3s stopped at {first}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    int3s_move();
    for page in [layout::IDT_ADDR, layout::GDT_ADDR] {
        for a in [W | X, R | W, 0] {
            assert_eq!(code(tool.set_page_access(&[(page, a)])), -95, "gpa {page:#x} access {a}");
        }
        // Write protection works: delivery only reads the tables.
        tool.set_page_access(&[(page, R | X)]).unwrap();
        int3s_move();
        tool.set_page_access(&[(page, RWX)]).unwrap();
    }
    int3s_move();
    vm.assert_guest_runs();
}

/// Holds both vCPUs in PAUSE events.
fn hold_both(tool: &Vm) -> Vec<PendingEvent> {
    let mut held = Vec::new();
    for i in 0..2 {
        tool.pause_vcpu(i, false).unwrap();
    }
    while held.len() < 2 {
        match tool.next_event(Some(T)).unwrap() {
            Some(Event::Vcpu(ev)) if ev.payload == EventPayload::Pause => held.push(ev),
            other => panic!("expected PAUSE events, got {other:?}"),
        }
    }
    held
}

/// Holds both vCPUs of the demo OS in PAUSE events at a moment when each
/// runs a process (its CR3 in the process blocks): after boot, but a vCPU
/// may also be caught in the kernel on the boot tables; then both are let
/// go and held again.
fn hold_both_in_processes(vm: &RunningVm, tool: &Vm) -> Vec<PendingEvent> {
    vm.wait_serial("shell: hello", 1, T);
    for _ in 0..100 {
        let held = hold_both(tool);
        if held.iter().all(|ev| ev.sregs.cr3 >= ukvmi_guests::demo::PBLK_BASE) {
            return held;
        }
        for ev in &held {
            tool.reply(ev, EventReply::Continue).unwrap();
        }
        std::thread::sleep(Duration::from_millis(7));
    }
    panic!("100 tries never caught both vCPUs in a process");
}

/// A demo process's page tables: PML4 (its CR3), PDPT, PD (2 MiB pages).
fn demo_tables(tool: &Vm, cr3: u64) -> [u64; 3] {
    let pml4 = cr3 & !0xfff;
    let pdpt = read_u64(tool, pml4) & 0x000f_ffff_ffff_f000;
    let pd = read_u64(tool, pdpt) & 0x000f_ffff_ffff_f000;
    assert!(pdpt != 0 && pd != 0, "PML4 {pml4:#x} maps GVA 0");
    [pml4, pdpt, pd]
}

/// Waits until the demo kernel's clock has moved on by 50 ms and it
/// printed 3 more lines.
fn demo_runs(vm: &RunningVm, tool: &Vm) {
    let ticks = ukvmi_monitor::guestos::ProcessTable::read(tool).unwrap().ticks;
    let lines = vm.serial_text().lines().count();
    let t0 = Instant::now();
    while ukvmi_monitor::guestos::ProcessTable::read(tool).unwrap().ticks < ticks + 50
        || vm.serial_text().lines().count() < lines + 3
    {
        assert!(t0.elapsed() < T, "the demo guest stopped (ticks {ticks}):\n{}", vm.stderr_text());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The demo OS gives each process its own page tables (CR3 = its block at
/// `PBLK_BASE + slot * PBLK_SIZE`: PML4, PDPT, PD). With both vCPUs held in
/// PAUSE events, the tables of the processes they run are found from their
/// CR3s and refused. Write protection of every process's tables (switched
/// to and from while protected) and of the boot tables is accepted and the
/// guest runs on.
#[test]
fn the_demo_guests_process_page_tables_in_use_are_refused() {
    let dir = Scratch::new("pfptdemo");
    let (mut vm, _l, tool) = start_guest(&dir, "demo", 2);
    let held = hold_both_in_processes(&vm, &tool);
    for ev in &held {
        let cr3 = ev.sregs.cr3;
        assert!(cr3 >= ukvmi_guests::demo::PBLK_BASE, "vCPU {} runs a process (cr3 {cr3:#x})", ev.vcpu.raw());
        for t in demo_tables(&tool, cr3) {
            for a in [W | X, R | W, 0] {
                assert_eq!(
                    code(tool.set_page_access(&[(t, a)])),
                    -95,
                    "vCPU {} cr3 {cr3:#x}: table {t:#x} access {a}",
                    ev.vcpu.raw()
                );
            }
            tool.set_page_access(&[(t, R | X)]).unwrap();
            tool.set_page_access(&[(t, RWX)]).unwrap();
        }
    }
    // Every process's tables and the boot tables, write-protected.
    let procs = ukvmi_monitor::guestos::ProcessTable::read(&tool).unwrap().procs;
    assert_eq!(procs.len(), 4);
    let mut tables: Vec<u64> = procs.iter().flat_map(|p| demo_tables(&tool, p.cr3)).collect();
    tables.extend([layout::PML4_ADDR, layout::PDPT_ADDR, layout::PD_ADDR]);
    let protect: Vec<(u64, u8)> = tables.iter().map(|&t| (t, R | X)).collect();
    tool.set_page_access(&protect).unwrap();
    for ev in &held {
        tool.reply(ev, EventReply::Continue).unwrap();
    }
    demo_runs(&vm, &tool);
    let syscalls =
        || -> u64 { ukvmi_monitor::guestos::ProcessTable::read(&tool).unwrap().procs.iter().map(|p| p.syscalls).sum() };
    let before = syscalls();
    demo_runs(&vm, &tool);
    assert!(syscalls() > before, "the processes make syscalls");
    let forget: Vec<(u64, u8)> = tables.iter().map(|&t| (t, RWX)).collect();
    tool.set_page_access(&forget).unwrap();
    demo_runs(&vm, &tool);
    assert!(vm.child.try_wait().unwrap().is_none(), "the VM ended: {}", vm.stderr_text());
}

/// The limit: tables no vCPU uses at the moment of the restriction are not
/// found. The demo kernel switches to a process whose PML4 lost its
/// memslot, its next page walk fails, and it triple-faults; the VMM says
/// which page it was.
#[test]
fn tables_the_guest_switches_to_after_the_check_are_the_documented_limit() {
    let dir = Scratch::new("pfptlimit");
    let (mut vm, _l, tool) = start_guest(&dir, "demo", 2);
    let held = hold_both_in_processes(&vm, &tool);
    let current: Vec<u64> = held.iter().map(|ev| ev.sregs.cr3 & !0xfff).collect();
    let procs = ukvmi_monitor::guestos::ProcessTable::read(&tool).unwrap().procs;
    let other = procs.iter().find(|p| !current.contains(&p.cr3)).expect("two of four processes are switched out");
    tool.set_page_access(&[(other.cr3, W | X)]).unwrap();
    for ev in &held {
        tool.reply(ev, EventReply::Continue).unwrap();
    }
    let status = vm.wait_exit(T);
    assert!(!status.success());
    let err = vm.stderr_text();
    let note = format!(
        "its page or descriptor tables include gpa {:#x}, which SET_PAGE_ACCESS left without a memslot",
        other.cr3
    );
    assert!(err.contains("triple-faulted") && err.contains(&note), "{err}");
}
