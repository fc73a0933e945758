//! `UKVMI_VM_WRITE_PHYSICAL_UNDO`, the ukvmi extension whose writes the VMM
//! undoes when the connection ends: what is put back and what is not, the
//! bound on the record, permissions, and a vCPU held in an event released
//! only after the bytes are back — against the fake VM over a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::time::Duration;
use ukvmi_conformance::{FakeConfig, GuestAction, Observed, Setup};
use ukvmi_introspector::{Event, Vm};
use ukvmi_wire::{event, msg};

mod common;
use common::{code, connect};

const UNDO: u16 = msg::UKVMI_VM_WRITE_PHYSICAL_UNDO;
const T: Duration = Duration::from_secs(5);

fn setup() -> (Setup, Vm) {
    connect(&FakeConfig { memory: 1 << 20, ..Default::default() })
}

fn closed(s: &Setup, vm: Vm) {
    vm.close();
    assert!(s.endpoint.wait_disconnected(Some(T)));
    // The receiving thread has ended (the undo runs before it does).
    s.endpoint.unhook();
}

#[test]
fn undone_writes_go_back_when_the_connection_ends() {
    let (s, vm) = setup();
    assert_eq!(code(vm.check_command(UNDO)), 0);
    s.vm.poke_mem(0x1000, &[1, 2, 3, 4]);
    s.vm.poke_mem(0x2000, &[9]);
    vm.write_physical_undo(0x1000, &[0xcc, 0xcc]).unwrap();
    // Written twice: the first original is what comes back.
    vm.write_physical_undo(0x1001, &[0xdd]).unwrap();
    // Written back to its original: forgotten.
    vm.write_physical_undo(0x2000, &[0xcc]).unwrap();
    vm.write_physical_undo(0x2000, &[9]).unwrap();
    assert_eq!(s.vm.peek(0x1000, 4), [0xcc, 0xdd, 3, 4]);
    closed(&s, vm);
    assert_eq!(s.vm.peek(0x1000, 4), [1, 2, 3, 4]);
    assert_eq!(s.vm.peek(0x2000, 1), [9]);
    assert!(s.vm.notices().iter().any(|n| n.contains("put back 2 byte(s)")), "{:?}", s.vm.notices());
}

#[test]
fn a_byte_the_guest_changed_since_stays_the_guests() {
    let (s, vm) = setup();
    s.vm.poke_mem(0x3000, &[1, 2]);
    vm.write_physical_undo(0x3000, &[0xcc, 0xcc]).unwrap();
    // The guest rewrites one of them.
    s.vm.poke_mem(0x3001, &[0x42]);
    closed(&s, vm);
    assert_eq!(s.vm.peek(0x3000, 2), [1, 0x42]);
    assert!(s.vm.notices().iter().any(|n| n.contains("put back 1 byte(s)") && n.contains("1 changed by the guest")));
}

#[test]
fn plain_writes_are_not_undone_and_the_record_is_bounded() {
    let (s, vm) = setup();
    s.vm.poke_mem(0x4000, &[7]);
    vm.write_physical(0x4000, &[0xcc]).unwrap();
    // 64 KiB may be recorded; one byte more is refused, and nothing of the
    // refused write lands.
    let page = vec![0xabu8; 4096];
    for p in 0..16u64 {
        vm.write_physical_undo(0x10000 + p * 4096, &page).unwrap();
    }
    s.vm.poke_mem(0x20000, &[5]);
    assert_eq!(code(vm.write_physical_undo(0x20000, &[0xcc])), -12);
    assert_eq!(s.vm.peek(0x20000, 1), [5]);
    // Rewriting a recorded byte needs no room.
    vm.write_physical_undo(0x10000, &[0xac]).unwrap();
    closed(&s, vm);
    assert_eq!(s.vm.peek(0x4000, 1), [0xcc], "a plain write is the tool's for good");
    assert!(s.vm.peek(0x10000, 16 * 4096).iter().all(|&b| b == 0));
}

#[test]
fn it_is_allowed_like_any_command() {
    let (s, vm) = setup();
    s.endpoint.permissions().set_command(UNDO.into(), false).unwrap();
    assert_eq!(code(vm.check_command(UNDO)), -1);
    assert_eq!(code(vm.write_physical_undo(0x1000, &[0xcc])), -1);
    assert_eq!(s.vm.peek(0x1000, 1), [0]);
    // Bad gpa/size are refused as WRITE_PHYSICAL's are.
    s.endpoint.permissions().set_command(UNDO.into(), true).unwrap();
    assert_eq!(code(vm.write_physical_undo(0xfff, &[1, 2])), -22);
}

#[test]
fn a_tool_that_dies_in_an_event_leaves_its_bytes_undone_and_the_vcpu_released() {
    let (s, vm) = setup();
    s.vm.poke_mem(0x5000, &[0x90]);
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    vm.write_physical_undo(0x5000, &[0xcc]).unwrap();
    s.vm.guest_does(0, GuestAction::Int3);
    // Held, not dropped: dropping a pending event answers CONTINUE.
    let Some(Event::Vcpu(_held)) = vm.next_event(Some(T)).unwrap() else { panic!("no BREAKPOINT") };
    // The tool dies without answering (its connection is gone, so the held
    // event cannot answer either).
    drop(vm);
    let o = s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::Int3, .. })).unwrap();
    let Observed::Event { outcome: Some(out), .. } = o else { panic!("{o:?}") };
    assert!(!out.answered);
    assert_eq!(s.vm.peek(0x5000, 1), [0x90]);
    s.assert_guest_runs(&[0]);
}
