//! The shared-memory event channel (`UKVMI_VM_EVENT_CHANNEL`) end to end:
//! `ukvmi run` on /dev/kvm, the test as the tool. What the tool answers
//! through the channel is what the guest sees; SET_REGISTERS + RETRY work
//! on a vCPU waiting in a channel event, and so does one channel reply that
//! carries the registers; `--allow-command` covers it; a tool
//! that dies with a channel event unanswered leaves the guest running and
//! the next connection starts without the channel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{code, read_u64, start, start_all_up, Scratch};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::{event, msg};
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};

const T: Duration = Duration::from_secs(20);
const CH: u16 = msg::UKVMI_VM_EVENT_CHANNEL;

fn vcpu_event(tool: &Vm) -> PendingEvent {
    match tool.next_event(Some(T)).unwrap() {
        Some(Event::Vcpu(ev)) => ev,
        other => panic!("expected a vCPU event, got {other:?}"),
    }
}

fn msr_values(ev: &PendingEvent) -> (u64, u64) {
    match ev.payload {
        EventPayload::Msr { msr, old_value, new_value } => {
            assert_eq!(msr, layout::MSR_LSTAR);
            (old_value, new_value)
        }
        ref other => panic!("expected an MSR event, got {other:?}"),
    }
}

#[test]
fn msr_replies_through_the_channel_are_what_the_guest_sees() {
    let dir = Scratch::new("evch-msr");
    let (vm, _l, tool) = start(&dir, "msr", 2, &[]);
    vm.wait_serial("vcpu 1 up", 1, T);
    assert_eq!(code(tool.check_command(CH)), 0);
    tool.enable_event_channel().unwrap();
    assert!(tool.event_channel_enabled());
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, layout::MSR_LSTAR, true).unwrap();

    // Block the first write (reply the old value).
    let ev = vcpu_event(&tool);
    let (old, new) = msr_values(&ev);
    assert_eq!(read_u64(&tool, layout::MSR_TRIED_BASE), new, "the guest is in the middle of writing this");
    tool.reply(&ev, EventReply::ContinueWith(old)).unwrap();
    // The guest's own rdmsr saw the old value; let the next one through.
    let ev2 = vcpu_event(&tool);
    let (old2, new2) = msr_values(&ev2);
    assert_eq!(old2, old, "the blocked write left the old value");
    assert_eq!(read_u64(&tool, layout::MSR_SEEN_BASE), old, "as the guest's rdmsr saw");
    tool.reply(&ev2, EventReply::Continue).unwrap();
    let ev3 = vcpu_event(&tool);
    assert_eq!(msr_values(&ev3).0, new2, "CONTINUE applied the guest's value");
    assert_eq!(read_u64(&tool, layout::MSR_SEEN_BASE), new2);
    // Many more, answered as fast as they come.
    tool.reply(&ev3, EventReply::Continue).unwrap();
    let mut last = new2;
    for _ in 0..200 {
        let ev = vcpu_event(&tool);
        let (o, n) = msr_values(&ev);
        assert!(o > last && n > o, "in order: {last:#x} {o:#x} {n:#x}");
        last = o;
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    tool.control_msr(0, layout::MSR_LSTAR, false).unwrap();
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(300))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    vm.assert_guest_runs();
    let before = read_u64(&tool, layout::MSR_TRIED_BASE);
    vm.assert_guest_runs();
    assert!(read_u64(&tool, layout::MSR_TRIED_BASE) > before, "vCPU 0 writes LSTAR unwatched");
}

/// The bench guest's int3 loop with BREAKPOINT on and the channel on: `n`
/// hits, each answered by `answer` (RIP past the int3, then RETRY); every
/// answer completes a loop iteration, none reaches the guest's #BP handler,
/// and the guest runs on.
fn int3_loop_answered_with_retry(name: &str, answer: impl Fn(&Vm, &PendingEvent)) {
    let dir = Scratch::new(name);
    let (vm, _l, tool) = start_all_up(&dir, "bench", 1, &[]);
    tool.enable_event_channel().unwrap();
    tool.control_events(0, event::BREAKPOINT, true).unwrap();
    let bp_handled = layout::EXC_COUNT_BASE + 3 * 8;
    let (h0, c0) = (read_u64(&tool, bp_handled), read_u64(&tool, layout::BENCH_COUNT));
    tool.write_physical(layout::BENCH_MODE, &layout::BENCH_INT3.to_le_bytes()).unwrap();
    let n = 100;
    for _ in 0..n {
        let ev = vcpu_event(&tool);
        assert_eq!(ev.event, event::BREAKPOINT);
        answer(&tool, &ev);
        assert!(ev.is_answered());
    }
    tool.write_physical(layout::BENCH_MODE, &layout::BENCH_IDLE.to_le_bytes()).unwrap();
    tool.control_events(0, event::BREAKPOINT, false).unwrap();
    let mut stragglers = 0;
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(300))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
        stragglers += 1;
    }
    let (h1, c1) = (read_u64(&tool, bp_handled), read_u64(&tool, layout::BENCH_COUNT));
    assert!(c1 - c0 >= n, "every RETRY past the int3 completed an iteration ({c0} -> {c1})");
    assert!(h1 - h0 <= stragglers, "RETRY never reached the guest's #BP handler ({h0} -> {h1})");
    // The guest runs on (this guest counts its loop instead of printing).
    tool.write_physical(layout::BENCH_MODE, &layout::BENCH_SPIN.to_le_bytes()).unwrap();
    let t0 = Instant::now();
    while read_u64(&tool, layout::BENCH_COUNT) < c1 + 1000 {
        assert!(t0.elapsed() < T, "the guest stopped counting");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(tool.vcpu_count().is_ok(), "the connection is still up");
    drop(vm);
}

#[test]
fn set_registers_and_retry_on_a_vcpu_waiting_in_a_channel_event() {
    int3_loop_answered_with_retry("evch-bp", |tool, ev| {
        let mut regs = tool.get_registers(0, &[]).unwrap().regs;
        assert_eq!(regs, ev.regs, "GET_REGISTERS through the socket while the vCPU waits");
        regs.rip += 1;
        tool.set_registers(0, &regs).unwrap();
        tool.reply(ev, EventReply::Retry).unwrap();
    });
}

#[test]
fn a_breakpoint_answered_with_registers_and_retry_in_one_channel_reply() {
    int3_loop_answered_with_retry("evch-bp-regs", |tool, ev| {
        let mut regs = ev.regs;
        regs.rip += 1;
        tool.reply_with_registers(ev, EventReply::Retry, &regs).unwrap();
    });
}

#[test]
fn the_allow_list_covers_the_channel() {
    let dir = Scratch::new("evch-allow");
    // Only READ_PHYSICAL (and what is always allowed): no channel.
    let (vm, _l, tool) = start_all_up(&dir, "spin", 1, &["--allow-command", "KVMI_VM_READ_PHYSICAL"]);
    assert_eq!(code(tool.check_command(CH)), -1);
    assert_eq!(code(tool.enable_event_channel()), -1);
    assert!(!tool.event_channel_enabled());
    vm.assert_guest_runs();
}

#[test]
fn a_tool_that_dies_mid_channel_event_leaves_the_guest_running() {
    let dir = Scratch::new("evch-die");
    let (vm, listener, tool) = start(&dir, "msr", 1, &[]);
    vm.wait_serial("vcpu 0 up", 1, T);
    tool.enable_event_channel().unwrap();
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, layout::MSR_LSTAR, true).unwrap();
    let ev = vcpu_event(&tool);
    let (_, new) = msr_values(&ev);
    // The tool "dies": the event is never answered, the connection ends.
    let _ = ev.detach();
    drop(tool);
    // The vCPU resumed as if CONTINUE: the guest's write landed and it runs on.
    let tool = listener.accept().unwrap();
    assert!(!tool.event_channel_enabled(), "a new connection starts without the channel");
    let t0 = Instant::now();
    while read_u64(&tool, layout::MSR_SEEN_BASE) < new {
        assert!(t0.elapsed() < T, "the unanswered write never landed");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.assert_guest_runs();
    // Its events come over the socket until it asks for the channel.
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, layout::MSR_LSTAR, true).unwrap();
    let ev = vcpu_event(&tool);
    tool.reply(&ev, EventReply::Continue).unwrap();
    tool.enable_event_channel().unwrap();
    let ev = vcpu_event(&tool);
    tool.reply(&ev, EventReply::Continue).unwrap();
    tool.control_msr(0, layout::MSR_LSTAR, false).unwrap();
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(300))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    vm.assert_guest_runs();
}
