//! Events on a stock kernel, end to end on /dev/kvm: what the tool answers
//! is what the guest then sees.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{assert_no_event_while_running, read_u64, start, Scratch};
use std::time::Duration;
use ukvmi_guests::layout;
use ukvmi_introspector::wire::event;
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};

const T: Duration = Duration::from_secs(20);

fn msr_event(tool: &Vm) -> (PendingEvent, u32, u64, u64) {
    match tool.next_event(Some(T)).unwrap() {
        Some(Event::Vcpu(ev)) => match ev.payload {
            EventPayload::Msr { msr, old_value, new_value } => {
                let (m, o, n) = (msr, old_value, new_value);
                (ev, m, o, n)
            }
            ref other => panic!("expected an MSR event, got {other:?}"),
        },
        other => panic!("expected an MSR event, got {other:?}"),
    }
}

#[test]
fn msr_writes_blocked_and_allowed_as_the_guest_sees_them() {
    let dir = Scratch::new("msr");
    let (vm, _l, tool) = start(&dir, "msr", 2, &[]);
    vm.wait_serial("vcpu 1 up", 1, T);
    assert_eq!(tool.check_event(event::MSR).map_err(|e| e.to_string()), Ok(()));
    let lstar = layout::MSR_LSTAR;
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, lstar, true).unwrap();

    // First write: block it (reply the old value).
    let (ev, msr, old, new) = msr_event(&tool);
    assert_eq!((ev.vcpu.raw(), msr), (0, lstar));
    assert_eq!(new & layout::LSTAR_TAG, layout::LSTAR_TAG);
    assert_eq!(read_u64(&tool, layout::MSR_TRIED_BASE), new, "the guest is in the middle of writing this");
    tool.reply(&ev, EventReply::ContinueWith(old)).unwrap();

    // Next write: the guest's own rdmsr saw the old value; let this one through.
    let (ev2, _, old2, new2) = msr_event(&tool);
    assert_eq!(old2, old, "the blocked write left the old value");
    assert_eq!(read_u64(&tool, layout::MSR_SEEN_BASE), old, "and the guest's rdmsr saw the old value");
    assert!(new2 > new);
    tool.reply(&ev2, EventReply::Continue).unwrap();

    let (ev3, _, old3, _) = msr_event(&tool);
    assert_eq!(old3, new2, "CONTINUE applied the guest's value");
    assert_eq!(read_u64(&tool, layout::MSR_SEEN_BASE), new2, "as the guest's rdmsr saw");
    // vCPU 1 is not watched: its writes go through without events.
    let seen1 = read_u64(&tool, layout::MSR_SEEN_BASE + 8);
    assert_eq!(seen1 & layout::LSTAR_TAG, layout::LSTAR_TAG, "vCPU 1 wrote LSTAR itself");
    // vCPU 1 runs on: what it saw is its latest write, or the one before if
    // it is between storing the next value and writing it.
    let tried1 = read_u64(&tool, layout::MSR_TRIED_BASE + 8);
    assert!(seen1 == tried1 || seen1 + layout::MSR_EVERY == tried1, "vCPU 1 tried {tried1:#x}, saw {seen1:#x}");
    tool.reply(&ev3, EventReply::Continue).unwrap();

    // Unwatched again: no more events, and the guest's writes land.
    tool.control_msr(0, lstar, false).unwrap();
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(300))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    vm.assert_guest_runs();
    let tried = read_u64(&tool, layout::MSR_TRIED_BASE);
    vm.assert_guest_runs();
    let seen = read_u64(&tool, layout::MSR_SEEN_BASE);
    assert!(seen >= tried, "unwatched writes apply: tried {tried:#x}, seen {seen:#x}");
    // Both vCPUs keep writing LSTAR meanwhile, and no event comes.
    assert_no_event_while_running(&tool, Duration::from_millis(200), "unwatched MSR writes", |t| {
        vec![read_u64(t, layout::MSR_TRIED_BASE), read_u64(t, layout::MSR_TRIED_BASE + 8)]
    });
}

#[test]
fn msr_control_validation_and_crash() {
    let dir = Scratch::new("msrcrash");
    let (mut vm, _l, tool) = start(&dir, "msr", 1, &[]);
    let code = |r: ukvmi_introspector::Result<()>| r.err().and_then(|e| e.raw_err()).unwrap_or(0);
    assert_eq!(code(tool.control_msr(0, 0x2000, true)), -22, "outside KVMI's MSR ranges");
    assert_eq!(code(tool.control_msr(0, 0xc000_2000, true)), -22);
    // MSRs whose guest write KVM_SET_MSRS cannot reproduce are refused up front.
    assert_eq!(code(tool.control_msr(0, 0xc000_0080, true)), -95, "EFER");
    assert_eq!(code(tool.control_msr(0, 0x3b, true)), -95, "TSC_ADJUST");
    assert_eq!(code(tool.control_msr(0, 0xc000_0081, true)), 0, "STAR is fine");
    tool.control_msr(0, 0xc000_0081, false).unwrap();
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, layout::MSR_LSTAR, true).unwrap();
    let (ev, ..) = msr_event(&tool);
    tool.reply(&ev, EventReply::Crash).unwrap();
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(2), "{}", vm.stderr_text());
    assert!(vm.stderr_text().contains("CRASH"), "{}", vm.stderr_text());
}

#[test]
fn disconnect_while_watching_msrs_leaves_the_guest_writing_freely() {
    let dir = Scratch::new("msrdrop");
    let (vm, l, tool) = start(&dir, "msr", 1, &[]);
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, layout::MSR_LSTAR, true).unwrap();
    let (_ev, ..) = msr_event(&tool);
    assert!(vm.interceptions().contains("msr-writes=0xc0000082"), "{}", vm.interceptions());
    drop(tool); // dies holding vCPU 0 in the event
    vm.assert_guest_runs();
    let tool = l.accept().unwrap();
    vm.assert_guest_runs();
    let tried = u64::from_le_bytes(tool.read_physical(layout::MSR_TRIED_BASE, 8).unwrap().try_into().unwrap());
    vm.assert_guest_runs();
    let seen = u64::from_le_bytes(tool.read_physical(layout::MSR_SEEN_BASE, 8).unwrap().try_into().unwrap());
    assert!(seen >= tried, "writes apply once nobody watches: tried {tried:#x}, seen {seen:#x}");
    assert_no_event_while_running(&tool, Duration::from_millis(300), "the new session watches nothing", |t| {
        vec![read_u64(t, layout::MSR_TRIED_BASE)]
    });
    let report = vm.interceptions();
    assert!(report.contains("msr-writes=none"), "the filter is gone: {report}");
}
