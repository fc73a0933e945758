//! Equivalents of the kernel self-test `kvmi_test.c` (spec `tests.md`), run
//! through the introspector library against the endpoint and a fake VM over a
//! real socket pair. Numbers in the test names follow `tests.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;
use ukvmi_conformance::fake::{KERNEL_BASE, TSC_KHZ};
use ukvmi_conformance::{FakeConfig, GuestAction, Observed, Setup};
use ukvmi_endpoint::{Disconnect, HookError, HostCaps, PermissionError, PreUnhookError};
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};
use ukvmi_wire::*;

mod common;
use common::{code, connect};

const T: Duration = Duration::from_secs(10);

fn setup(cfg: FakeConfig) -> (Setup, Vm) {
    connect(&cfg)
}

fn one_vcpu() -> (Setup, Vm) {
    setup(FakeConfig::default())
}

/// The reply code of a command: 0 or a negative `KVM_E*`.
fn next_vcpu_event(vm: &Vm) -> PendingEvent {
    match vm.next_event(Some(T)).unwrap() {
        Some(Event::Vcpu(ev)) => ev,
        other => panic!("expected a vCPU event, got {other:?}"),
    }
}

/// Receives the next vCPU event and checks its id and total body size.
fn expect_event(vm: &Vm, id: u16, body_size: usize) -> PendingEvent {
    let ev = next_vcpu_event(vm);
    assert_eq!(ev.event, id, "got {:?}", ev.payload);
    assert_eq!(ev.size, 544);
    assert_eq!(VCPU_EVENT_BODY_BASE + ev.raw_payload.len(), body_size);
    ev
}

fn pause(vm: &Vm, vcpu: u16) -> PendingEvent {
    vm.pause_vcpu(vcpu, true).unwrap();
    let ev = expect_event(vm, event::PAUSE, 552);
    assert_eq!(ev.vcpu, vcpu);
    ev
}

#[test]
fn t01_hook_and_permission_semantics() {
    let (s, _vm) = one_vcpu();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(matches!(s.endpoint.hook(a), Err(HookError::AlreadyHooked)));
    let p = s.endpoint.permissions();
    for id in msg::ALWAYS_ALLOWED {
        assert_eq!(p.set_command(i32::from(id), false), Err(PermissionError::AlwaysAllowed(id)));
    }
    assert_eq!(p.set_command(msg::NUM_COMMANDS.into(), true), Err(PermissionError::OutOfRange(30)));
    assert_eq!(p.set_event(event::NUM_EVENTS.into(), true), Err(PermissionError::OutOfRange(20)));
    assert_eq!(p.set_command(-1, false), Ok(()));
    assert_eq!(p.set_command(-1, true), Ok(()));
    assert_eq!(p.set_event(-1, false), Ok(()));
    assert_eq!(p.set_event(-1, true), Ok(()));
}

#[test]
fn t02_invalid_command() {
    let (_s, vm) = one_vcpu();
    let r = vm.raw().request_raw(0xffff, &[]).unwrap();
    assert_eq!((r.err, r.data.len()), (-1000, 0));
}

#[test]
fn t03_get_version() {
    let (_s, vm) = one_vcpu();
    let v = vm.get_version().unwrap();
    assert_eq!((v.version, v.max_msg_size, v.singlestep), (1, 8184, true));
    let caps = HostCaps::full().without_command(msg::VCPU_CONTROL_SINGLESTEP);
    let (_s, vm) = setup(FakeConfig { caps, ..Default::default() });
    assert!(!vm.get_version().unwrap().singlestep);
}

#[test]
fn t04_vm_check_command() {
    let caps = HostCaps::full().without_command(msg::VCPU_GET_CPUID);
    let (s, vm) = setup(FakeConfig { caps, ..Default::default() });
    assert_eq!(code(vm.check_command(msg::VM_GET_INFO)), 0);
    assert_eq!(code(vm.check_command(msg::VCPU_TRANSLATE_GVA)), 0, "vCPU commands are known too");
    for id in [0xffff, 0, 1, 22, 31] {
        assert_eq!(code(vm.check_command(id)), -2, "id {id}");
    }
    s.endpoint.permissions().set_command(msg::VM_GET_INFO.into(), false).unwrap();
    assert_eq!(code(vm.check_command(msg::VM_GET_INFO)), -1);
    s.endpoint.permissions().set_command(msg::VM_GET_INFO.into(), true).unwrap();
    assert_eq!(code(vm.check_command(msg::VM_GET_INFO)), 0);
    // What the host cannot do is said up front, and on use.
    assert_eq!(code(vm.check_command(msg::VCPU_GET_CPUID)), -95);
    assert_eq!(code(vm.get_cpuid(0, 0, 0)), -95);
    let bad = VmCheck { id: msg::VM_GET_INFO, padding1: 1, padding2: 0 };
    assert_eq!(vm.raw().request_raw(msg::VM_CHECK_COMMAND, bad.as_bytes()).unwrap().err, -22);
}

#[test]
fn t05_vm_check_event() {
    let caps = HostCaps::full().without_event(event::DESCRIPTOR);
    let (s, vm) = setup(FakeConfig { caps, ..Default::default() });
    assert_eq!(code(vm.check_event(0xffff)), -2);
    assert_eq!(code(vm.check_event(2)), -2, "even ids other than 0 are not events");
    assert_eq!(code(vm.check_event(event::UNHOOK)), 0);
    s.endpoint.permissions().set_event(event::UNHOOK.into(), false).unwrap();
    assert_eq!(code(vm.check_event(event::UNHOOK)), -1);
    s.endpoint.permissions().set_event(event::UNHOOK.into(), true).unwrap();
    assert_eq!(code(vm.check_event(event::DESCRIPTOR)), -95);
    assert_eq!(code(vm.control_events(0, event::DESCRIPTOR, true)), -95);
    assert_eq!(code(vm.control_events(0, event::DESCRIPTOR, false)), 0);
}

#[test]
fn t06_vm_get_info() {
    let (_s, vm) = one_vcpu();
    assert_eq!(vm.vcpu_count().unwrap(), 1);
    let (_s, vm) = setup(FakeConfig { vcpus: 3, started: 1, ..Default::default() });
    assert_eq!(vm.vcpu_count().unwrap(), 3, "online vCPUs, started or not");
}

#[test]
fn t07_event_unhook() {
    let (s, vm) = one_vcpu();
    assert_eq!(s.endpoint.pre_unhook(Duration::from_millis(10)), Err(PreUnhookError::NotEnabled));
    vm.control_vm_events(event::UNHOOK, true).unwrap();
    let endpoint = &s.endpoint;
    std::thread::scope(|sc| {
        let waiter = sc.spawn(|| endpoint.pre_unhook(T));
        match vm.next_event(Some(T)).unwrap() {
            Some(Event::Unhook { seq }) => assert_eq!(seq, 1),
            other => panic!("expected UNHOOK, got {other:?}"),
        }
        vm.close();
        assert_eq!(waiter.join().unwrap(), Ok(true), "pre-unhook sees the tool close");
    });
    assert_eq!(s.endpoint.unhook(), Some(Disconnect::PeerClosed));
    s.assert_guest_runs(&[0]);
}

#[test]
fn t07b_unhook_waits_at_most_the_timeout() {
    let (s, vm) = one_vcpu();
    vm.control_vm_events(event::UNHOOK, true).unwrap();
    assert_eq!(s.endpoint.pre_unhook(Duration::from_millis(100)), Ok(false));
    assert_eq!(s.endpoint.unhook(), Some(Disconnect::Unhooked));
    assert!(matches!(vm.next_event(Some(T)).unwrap(), Some(Event::Unhook { .. })));
    s.assert_guest_runs(&[0]);
}

#[test]
fn t08_vm_control_events() {
    let (s, vm) = one_vcpu();
    assert_eq!(code(vm.control_vm_events(event::UNHOOK, true)), 0);
    assert_eq!(code(vm.control_vm_events(event::UNHOOK, false)), 0);
    let bad = ControlEvents { event_id: 0, enable: 2, padding1: 0, padding2: 0 };
    assert_eq!(vm.raw().request_raw(msg::VM_CONTROL_EVENTS, bad.as_bytes()).unwrap().err, -22);
    assert_eq!(code(vm.control_vm_events(0xffff, true)), -22);
    assert_eq!(code(vm.control_vm_events(event::PAUSE, true)), -22, "a vCPU event is not a VM event");
    s.endpoint.permissions().set_event(event::UNHOOK.into(), false).unwrap();
    assert_eq!(code(vm.control_vm_events(event::UNHOOK, true)), -1);
}

#[test]
fn t09_memory_access() {
    let (s, vm) = one_vcpu();
    let gpa = 0x5000;
    vm.write_physical(gpa, &[0x01; 4096]).unwrap();
    assert_eq!(s.vm.peek(gpa, 4096), vec![0x01; 4096], "the guest sees the bytes");
    s.vm.poke_mem(gpa + 100, b"guest wrote this");
    let page = vm.read_physical(gpa, 4096).unwrap();
    assert_eq!(&page[100..116], b"guest wrote this");
    assert_eq!(page[0], 1);
    assert_eq!(code(vm.read_physical(gpa, 0)), -22);
    let w0 = VmPhysical { gpa, size: 0, padding1: 0, padding2: 0 };
    assert_eq!(vm.raw().request_raw(msg::VM_WRITE_PHYSICAL, w0.as_bytes()).unwrap().err, -22);
    assert_eq!(code(vm.read_physical(gpa + 4095, 2)), -22, "crosses a page");
    let big = VmPhysical { gpa, size: 4097, padding1: 0, padding2: 0 };
    assert_eq!(vm.raw().request_raw(msg::VM_READ_PHYSICAL, big.as_bytes()).unwrap().err, -22);
    let pad = VmPhysical { gpa, size: 8, padding1: 0, padding2: 1 };
    assert_eq!(vm.raw().request_raw(msg::VM_READ_PHYSICAL, pad.as_bytes()).unwrap().err, -22);
    let past = 1 << 20;
    assert_eq!(code(vm.write_physical(past, &[1])), -2);
    assert_eq!(code(vm.read_physical(past, 1)), -2);
    assert_eq!(code(vm.read_physical(u64::MAX - 10, 1)), -2);
}

#[test]
fn t10_tsc_frequency() {
    let (_s, vm) = one_vcpu();
    assert_eq!(vm.tsc_frequency(0).unwrap(), u64::from(TSC_KHZ) * 1000);
    assert_eq!(code(vm.tsc_frequency(99)), -22);
}

#[test]
fn t11_pause() {
    let (s, vm) = one_vcpu();
    for _ in 0..2 {
        let ev = pause(&vm, 0);
        assert_eq!(ev.payload, EventPayload::Pause);
        let held = s.vm.progress(0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.vm.progress(0), held, "the vCPU runs no guest code while paused");
        vm.reply(&ev, EventReply::Continue).unwrap();
        s.assert_guest_runs(&[0]);
    }
    let bad = VmPauseVcpu { vcpu: 0, wait: 2, padding1: 0, padding2: 0 };
    assert_eq!(vm.raw().request_raw(msg::VM_PAUSE_VCPU, bad.as_bytes()).unwrap().err, -22);
    assert_eq!(code(vm.pause_vcpu(5, false)), -22);
    s.endpoint.permissions().set_event(event::PAUSE.into(), false).unwrap();
    assert_eq!(code(vm.pause_vcpu(0, false)), -1);
}

#[test]
fn t12_vcpu_control_events() {
    let (s, vm) = one_vcpu();
    assert_eq!(code(vm.control_events(0, event::PAUSE, true)), 0);
    assert_eq!(code(vm.control_events(0, event::PAUSE, false)), 0);
    let bad = ControlEvents { event_id: event::PAUSE, enable: 2, padding1: 0, padding2: 0 };
    let body: Vec<u8> = VcpuHdr::default().as_bytes().iter().chain(bad.as_bytes()).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_CONTROL_EVENTS, &body).unwrap().err, -22);
    assert_eq!(code(vm.control_events(0, 0xffff, true)), -22);
    assert_eq!(code(vm.control_events(0, event::UNHOOK, true)), -22, "UNHOOK is a VM event");
    s.endpoint.permissions().set_event(event::PAUSE.into(), false).unwrap();
    assert_eq!(code(vm.control_events(0, event::PAUSE, true)), -1);
}

#[test]
fn t13_vcpu_get_registers() {
    let (s, vm) = one_vcpu();
    let ev = pause(&vm, 0);
    let r = vm.get_registers(0, &[]).unwrap();
    assert_eq!(r.regs, ev.regs, "a paused vCPU reports the state its event carried");
    assert_eq!(r.mode, 8);
    assert!(r.regs.rip > KERNEL_BASE);
    vm.reply(&ev, EventReply::Continue).unwrap();
    // MSRs come back in request order with the guest's values.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr: 0xc000_0082, value: 0xffff_8000_0010_0000 });
    std::thread::sleep(Duration::from_millis(20));
    let r = vm.get_registers(0, &[0xc000_0082, 0x174]).unwrap();
    assert_eq!(r.msrs.len(), 2);
    assert_eq!((r.msrs[0].index, r.msrs[0].data), (0xc000_0082, 0xffff_8000_0010_0000));
    assert_eq!((r.msrs[1].index, r.msrs[1].data), (0x174, 0));
    assert_eq!(code(vm.get_registers(0, &[0xffff_ffff])), -22);
    assert_eq!(code(vm.get_registers(0, &[0; 482])), -22, "reply would not fit in 8184 bytes");
    assert_eq!(vm.get_registers(0, &[0; 481]).unwrap().msrs.len(), 481);
    // nmsrs larger than the indices present: soft error.
    let lying = VcpuGetRegisters { nmsrs: 4, padding1: 0, padding2: 0 };
    let body: Vec<u8> =
        VcpuHdr::default().as_bytes().iter().chain(lying.as_bytes()).chain(&[0u8; 8]).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_GET_REGISTERS, &body).unwrap().err, -22);
}

#[test]
fn t14_vcpu_set_registers() {
    let (_s, vm) = one_vcpu();
    let regs = vm.get_registers(0, &[]).unwrap().regs;
    assert_eq!(code(vm.set_registers(0, &regs)), -95, "only while the vCPU waits in an event");
    let ev = pause(&vm, 0);
    let mut new = ev.regs;
    new.rip = KERNEL_BASE + 0x7000;
    new.rbx = 0x1234_5678;
    vm.set_registers(0, &new).unwrap();
    assert_eq!(vm.get_registers(0, &[]).unwrap().regs, ev.regs, "applied only when the reply comes");
    vm.reply(&ev, EventReply::Continue).unwrap();
    let after = vm.get_registers(0, &[]).unwrap().regs;
    assert_eq!(after.rbx, 0x1234_5678);
    assert!(after.rip >= KERNEL_BASE + 0x7000 && after.rip < KERNEL_BASE + 0x8000, "rip {:#x}", after.rip);
    // Short body: soft error.
    let body: Vec<u8> = VcpuHdr::default().as_bytes().iter().chain(&[0u8; 100]).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_SET_REGISTERS, &body).unwrap().err, -22);
}

#[test]
fn t15_vcpu_get_cpuid() {
    let (_s, vm) = one_vcpu();
    let r = vm.get_cpuid(0, 0, 0).unwrap();
    assert_eq!(r.eax, 0xd);
    assert_eq!(code(vm.get_cpuid(0, 0x4000_0000, 0)), -2, "missing leaf");
}

#[test]
fn t16_event_hypercall() {
    let (s, vm) = one_vcpu();
    s.vm.guest_does(0, GuestAction::Hypercall);
    let o = s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::Hypercall, .. })).unwrap();
    assert_eq!(o, Observed::Event { cause: GuestAction::Hypercall, outcome: None }, "disabled: no event");
    vm.control_events(0, event::HYPERCALL, true).unwrap();
    s.vm.guest_does(0, GuestAction::Hypercall);
    let ev = expect_event(&vm, event::HYPERCALL, 552);
    vm.reply(&ev, EventReply::Continue).unwrap();
    vm.control_events(0, event::HYPERCALL, false).unwrap();
    s.assert_guest_runs(&[0]);
}

#[test]
fn t17_event_breakpoint() {
    let (s, vm) = one_vcpu();
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    assert!(s.vm.intercepts(0).breakpoint, "enabling asks the backend for #BP exits");
    s.vm.guest_does(0, GuestAction::Int3);
    let ev = expect_event(&vm, event::BREAKPOINT, 568);
    let EventPayload::Breakpoint { gpa, insn_len } = ev.payload else { panic!() };
    assert_eq!(gpa, ev.regs.rip - KERNEL_BASE);
    assert_eq!(insn_len, 1);
    let mut regs = ev.regs;
    regs.rip += u64::from(insn_len);
    vm.set_registers(0, &regs).unwrap();
    vm.reply(&ev, EventReply::Retry).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::Int3, .. })).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!s.vm.take_log(0).iter().any(|o| matches!(o, Observed::Injected(_))), "RETRY injects nothing");
    // CONTINUE hands the #BP to the guest.
    s.vm.guest_does(0, GuestAction::Int3);
    let ev = expect_event(&vm, event::BREAKPOINT, 568);
    vm.reply(&ev, EventReply::Continue).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Injected(e) if e.nr == 3)).unwrap();
    // Disabled: the guest gets its own #BP without an event.
    vm.control_events(0, event::BREAKPOINT, false).unwrap();
    assert!(!s.vm.intercepts(0).breakpoint);
    s.vm.guest_does(0, GuestAction::Int3);
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Injected(e) if e.nr == 3)).unwrap();
    assert!(vm.next_event(Some(Duration::from_millis(50))).unwrap().is_none());
}

#[test]
fn t18_vm_control_cleanup() {
    let (_s, vm) = one_vcpu();
    let bad = VmControlCleanup { enable: 2, padding: [0; 7] };
    assert_eq!(vm.raw().request_raw(msg::VM_CONTROL_CLEANUP, bad.as_bytes()).unwrap().err, -22);
    let pad = VmControlCleanup { enable: 1, padding: [0, 0, 1, 0, 0, 0, 0] };
    assert_eq!(vm.raw().request_raw(msg::VM_CONTROL_CLEANUP, pad.as_bytes()).unwrap().err, -22);
    assert_eq!(code(vm.control_cleanup(true)), 0);
    assert_eq!(code(vm.control_cleanup(false)), 0);
}

/// A vCPU busy elsewhere while two connections end in a row still undoes
/// what the first one set up (each finished session's cleanup is kept,
/// not just the last).
#[test]
fn every_finished_session_is_cleaned_up_even_two_in_a_row() {
    let s = Setup::new(&FakeConfig::default());
    let a = Vm::connect_raw(s.connect()).unwrap();
    a.control_events(0, event::BREAKPOINT, true).unwrap();
    assert!(s.vm.intercepts(0).breakpoint);
    s.vm.hold(0, true);
    drop(a);
    let b = Vm::connect_raw(s.connect()).unwrap(); // unhooks A first
    drop(b);
    s.endpoint.unhook(); // and B, before vCPU 0 got to A's cleanup
    assert!(s.vm.intercepts(0).breakpoint, "held: nothing undone yet");
    s.vm.hold(0, false);
    let t0 = std::time::Instant::now();
    while s.vm.intercepts(0).breakpoint {
        assert!(t0.elapsed() < T, "the first session's BREAKPOINT interception was never undone");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.assert_guest_runs(&[0]);
}

#[test]
fn t19_vcpu_control_cr() {
    let (s, vm) = one_vcpu();
    vm.control_events(0, event::CR, true).unwrap();
    vm.control_cr(0, 4, true).unwrap();
    let old = s.vm.cr(0, 4);
    s.vm.guest_does(0, GuestAction::WriteCr { cr: 4, value: old | (1 << 18) });
    let ev = expect_event(&vm, event::CR, 576);
    let EventPayload::Cr { cr, old_value, new_value } = ev.payload else { panic!() };
    assert_eq!((cr, old_value, new_value), (4, old, old | (1 << 18)));
    vm.reply(&ev, EventReply::ContinueWith(old_value)).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::WriteCr { .. }, .. })).unwrap();
    assert_eq!(s.vm.cr(0, 4), old, "the tool blocked the change");
    // A CR not selected sends nothing.
    s.vm.guest_does(0, GuestAction::WriteCr { cr: 0, value: 0x8005_0033 });
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { outcome: None, .. })).unwrap();
    assert_eq!(s.vm.cr(0, 0), 0x8005_0033);
    vm.control_cr(0, 4, false).unwrap();
    vm.control_events(0, event::CR, false).unwrap();
    let bad = VcpuControlCr { cr: 0, enable: 2, padding1: 0, padding2: 0 };
    let body: Vec<u8> = VcpuHdr::default().as_bytes().iter().chain(bad.as_bytes()).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_CONTROL_CR, &body).unwrap().err, -22);
    assert_eq!(code(vm.control_cr(0, 99, true)), -22);
    let (_s2, vm2) = setup(FakeConfig { caps: HostCaps::full().without_event(event::CR), ..Default::default() });
    assert_eq!(code(vm2.control_cr(0, 3, true)), -95);
}

#[test]
fn t20_vcpu_inject_exception() {
    let (s, vm) = one_vcpu();
    s.endpoint.permissions().set_event(event::TRAP.into(), false).unwrap();
    assert_eq!(code(vm.inject_exception(0, 6, 0, 0)), -1);
    s.endpoint.permissions().set_event(event::TRAP.into(), true).unwrap();
    // Success: the TRAP event reports what went in.
    vm.inject_exception(0, 6, 0, 0).unwrap();
    let ev = expect_event(&vm, event::TRAP, 568);
    assert_eq!(ev.payload, EventPayload::Trap { nr: 6, error_code: 0, address: 0 });
    vm.reply(&ev, EventReply::Continue).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Injected(e) if e.nr == 6)).unwrap();
    // Overridden: the #BP re-injected by CONTINUE wins over the #UD.
    vm.control_events(0, event::BREAKPOINT, true).unwrap();
    s.vm.guest_does(0, GuestAction::Int3);
    let bp = expect_event(&vm, event::BREAKPOINT, 568);
    let mut regs = bp.regs;
    regs.rip += 1;
    vm.set_registers(0, &regs).unwrap();
    vm.inject_exception(0, 6, 0, 0).unwrap();
    assert_eq!(code(vm.inject_exception(0, 13, 0, 0)), -16, "one injection at a time");
    vm.reply(&bp, EventReply::Continue).unwrap();
    let trap = expect_event(&vm, event::TRAP, 568);
    let EventPayload::Trap { nr, .. } = trap.payload else { panic!() };
    assert_eq!(nr, 3, "#BP won");
    vm.reply(&trap, EventReply::Continue).unwrap();
    vm.control_events(0, event::BREAKPOINT, false).unwrap();
    // Error codes are kept only for vectors that have one.
    vm.inject_exception(0, 14, 0x2, 0xdead_b000).unwrap();
    let pf = expect_event(&vm, event::TRAP, 568);
    assert_eq!(pf.payload, EventPayload::Trap { nr: 14, error_code: 2, address: 0xdead_b000 });
    vm.reply(&pf, EventReply::Continue).unwrap();
    vm.inject_exception(0, 6, 0x55, 0).unwrap();
    let ud = expect_event(&vm, event::TRAP, 568);
    assert_eq!(ud.payload, EventPayload::Trap { nr: 6, error_code: 0, address: 0 });
    vm.reply(&ud, EventReply::Continue).unwrap();
}

#[test]
fn t22_event_xsetbv() {
    let (s, vm) = one_vcpu();
    vm.control_events(0, event::XSETBV, true).unwrap();
    s.vm.guest_does(0, GuestAction::Xsetbv { value: 0x7 });
    let ev = expect_event(&vm, event::XSETBV, 576);
    assert_eq!(ev.payload, EventPayload::Xsetbv { xcr: 0, old_value: 1, new_value: 7 });
    vm.reply(&ev, EventReply::Continue).unwrap();
    assert_eq!(vm.get_xcr(0, 0).unwrap(), 7);
    vm.control_events(0, event::XSETBV, false).unwrap();
}

#[test]
fn t23_vcpu_get_xcr() {
    let (_s, vm) = one_vcpu();
    assert_eq!(vm.get_xcr(0, 0).unwrap(), 1);
    assert_eq!(code(vm.get_xcr(0, 1)), -22);
}

#[test]
fn t24_vcpu_xsave() {
    let (_s, vm) = one_vcpu();
    let mut area = vm.get_xsave(0).unwrap();
    assert_eq!(area.region[0], 0x037f);
    area.region[1] = 0xabcd;
    vm.set_xsave(0, &area).unwrap();
    assert_eq!(vm.get_xsave(0).unwrap().region[1], 0xabcd);
    area.region[128] = 0x8000_0000;
    assert_eq!(code(vm.set_xsave(0, &area)), -22, "the host rejects the area");
    let short: Vec<u8> = VcpuHdr::default().as_bytes().iter().chain(&[0u8; 4095]).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_SET_XSAVE, &short).unwrap().err, -22);
}

#[test]
fn t25_vcpu_get_mtrr_type() {
    let (_s, vm) = one_vcpu();
    assert_eq!(vm.get_mtrr_type(0, 0x5000).unwrap(), 6);
    assert_eq!(vm.get_mtrr_type(0, 0xa0000).unwrap(), 0);
}

#[test]
fn t26_event_descriptor() {
    let (s, vm) = one_vcpu();
    vm.control_events(0, event::DESCRIPTOR, true).unwrap();
    s.vm.guest_does(0, GuestAction::Gdt { write: false });
    s.vm.guest_does(0, GuestAction::Gdt { write: true });
    for write in [false, true] {
        let ev = expect_event(&vm, event::DESCRIPTOR, 560);
        assert_eq!(ev.payload, EventPayload::Descriptor { descriptor: desc::GDTR, write });
        vm.reply(&ev, EventReply::Continue).unwrap();
    }
    vm.control_events(0, event::DESCRIPTOR, false).unwrap();
}

#[test]
fn t27_vcpu_control_msr() {
    let (s, vm) = one_vcpu();
    let msr = 0x140; // MSR_MISC_FEATURES_ENABLES
    vm.control_events(0, event::MSR, true).unwrap();
    vm.control_msr(0, msr, true).unwrap();
    assert!(s.vm.intercepts(0).msrs.contains(&msr));
    s.vm.guest_does(0, GuestAction::WriteMsr { msr, value: 1 });
    let ev = expect_event(&vm, event::MSR, 576);
    assert_eq!(ev.payload, EventPayload::Msr { msr, old_value: 0, new_value: 1 });
    vm.reply(&ev, EventReply::ContinueWith(0)).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::WriteMsr { .. }, .. })).unwrap();
    assert_eq!(s.vm.msr(0, msr), 0, "the tool blocked the write");
    // CONTINUE lets it through.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr, value: 1 });
    let ev = expect_event(&vm, event::MSR, 576);
    vm.reply(&ev, EventReply::Continue).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { cause: GuestAction::WriteMsr { .. }, .. })).unwrap();
    assert_eq!(s.vm.msr(0, msr), 1);
    // Writing the current value again sends nothing.
    s.vm.guest_does(0, GuestAction::WriteMsr { msr, value: 1 });
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { outcome: None, .. })).unwrap();
    vm.control_msr(0, msr, false).unwrap();
    vm.control_events(0, event::MSR, false).unwrap();
    let bad = VcpuControlMsr { enable: 2, padding1: 0, padding2: 0, msr };
    let body: Vec<u8> = VcpuHdr::default().as_bytes().iter().chain(bad.as_bytes()).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_CONTROL_MSR, &body).unwrap().err, -22);
    assert_eq!(code(vm.control_msr(0, 0xffff_ffff, true)), -22);
    assert_eq!(code(vm.control_msr(0, 0x2000, true)), -22);
    assert_eq!(code(vm.control_msr(0, 0xc000_2000, true)), -22);
    assert_eq!(code(vm.control_msr(0, 0xc000_1fff, true)), 0);
    assert_eq!(code(vm.control_msr(0, 0x10, true)), -1, "filtered by the VMM");
}

#[test]
fn t28_vm_set_page_access() {
    let (s, vm) = one_vcpu();
    vm.set_page_access(&[(0, 0)]).unwrap();
    assert_eq!(s.vm.page_restrictions().get(&0), Some(&0));
    vm.set_page_access(&[(0, access::RWX)]).unwrap();
    assert!(s.vm.page_restrictions().is_empty(), "RWX forgets the page");
    // Every entry is attempted; the first error is reported.
    let r = vm.set_page_access(&[(0x1000, 8), (0x2000, access::R), (1 << 30, access::R)]);
    assert_eq!(code(r), -22);
    assert_eq!(s.vm.page_restrictions().get(&2), Some(&access::R), "valid entries applied");
    let head = VmSetPageAccess { count: 0, padding1: 1, padding2: 0 };
    assert_eq!(vm.raw().request_raw(msg::VM_SET_PAGE_ACCESS, head.as_bytes()).unwrap().err, -22);
    let h = VmSetPageAccess { count: 1, padding1: 0, padding2: 0 };
    let e = PageAccessEntry { gpa: 0x3000, access: 1, padding: [0, 1, 0, 0, 0, 0, 0] };
    let body: Vec<u8> = h.as_bytes().iter().chain(e.as_bytes()).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VM_SET_PAGE_ACCESS, &body).unwrap().err, -22);
    let caps = HostCaps::full().without_command(msg::VM_SET_PAGE_ACCESS);
    let (_s2, vm2) = setup(FakeConfig { caps, ..Default::default() });
    assert_eq!(code(vm2.set_page_access(&[(0, 0)])), -95);
}

#[test]
fn t29_event_pf() {
    let (s, vm) = one_vcpu();
    let gpa = 0x6010;
    s.vm.poke_mem(gpa, &[0xee]);
    vm.set_page_access(&[(gpa & !0xfff, access::R)]).unwrap();
    vm.control_events(0, event::PF, true).unwrap();
    s.vm.guest_does(0, GuestAction::Write { gpa, value: 0x42 });
    let ev = expect_event(&vm, event::PF, 576);
    assert_eq!(ev.payload, EventPayload::Pf { gva: KERNEL_BASE + gpa, gpa, access: access::W });
    assert_eq!(s.vm.peek(gpa, 1), [0xee], "the write has not happened");
    vm.set_page_access(&[(gpa & !0xfff, access::R | access::W)]).unwrap();
    vm.reply(&ev, EventReply::Retry).unwrap();
    s.vm.wait_log(0, T, |o| matches!(o, Observed::Event { outcome: None, .. })).unwrap_or_else(|| {
        panic!("the retried write ran without a new event");
    });
    assert_eq!(s.vm.peek(gpa, 1), [0x42], "the retried write landed");
    vm.control_events(0, event::PF, false).unwrap();
    vm.set_page_access(&[(gpa & !0xfff, access::RWX)]).unwrap();
}

#[test]
fn t30_vcpu_control_singlestep() {
    let (s, vm) = one_vcpu();
    assert!(vm.get_version().unwrap().singlestep);
    vm.control_events(0, event::SINGLESTEP, true).unwrap();
    vm.control_singlestep(0, true).unwrap();
    let ev = expect_event(&vm, event::SINGLESTEP, 560);
    assert_eq!(ev.payload, EventPayload::Singlestep { failed: false });
    assert_eq!(code(vm.inject_exception(0, 6, 0, 0)), -16, "no injection while stepping");
    vm.control_singlestep(0, false).unwrap();
    vm.reply(&ev, EventReply::Continue).unwrap();
    vm.control_events(0, event::SINGLESTEP, false).unwrap();
    assert!(!s.vm.intercepts(0).singlestep);
    let bad = VcpuControlSinglestep { enable: 2, padding: [0; 7] };
    let body: Vec<u8> = VcpuHdr::default().as_bytes().iter().chain(bad.as_bytes()).copied().collect();
    assert_eq!(vm.raw().request_raw(msg::VCPU_CONTROL_SINGLESTEP, &body).unwrap().err, -22);
    // Drain stray steps taken before the switch-off reached the vCPU.
    while let Some(Event::Vcpu(ev)) = vm.next_event(Some(Duration::from_millis(50))).unwrap() {
        vm.reply(&ev, EventReply::Continue).unwrap();
    }
    let caps = HostCaps::full().without_command(msg::VCPU_CONTROL_SINGLESTEP);
    let (_s2, vm2) = setup(FakeConfig { caps, ..Default::default() });
    assert_eq!(code(vm2.control_singlestep(0, true)), -95);
    s.endpoint.permissions().set_event(event::SINGLESTEP.into(), false).unwrap();
    assert_eq!(code(vm.control_singlestep(0, true)), -1);
}

#[test]
fn t31_vcpu_translate_gva() {
    let (_s, vm) = one_vcpu();
    assert_eq!(vm.translate_gva(0, KERNEL_BASE + 0x5123).unwrap(), Some(Gpa(0x5123)));
    assert_eq!(vm.translate_gva(0, u64::MAX).unwrap(), None);
    assert_eq!(vm.translate_gva(0, 0x1000).unwrap(), None);
}

#[test]
fn t32_unhook_undoes_interceptions() {
    for cleanup in [true, false] {
        let (s, vm) = setup(FakeConfig { vcpus: 2, ..Default::default() });
        vm.control_cleanup(cleanup).unwrap();
        vm.control_events(1, event::BREAKPOINT, true).unwrap();
        vm.control_events(1, event::MSR, true).unwrap();
        vm.control_msr(1, 0xc000_0082, true).unwrap();
        vm.control_events(1, event::CR, true).unwrap();
        vm.control_cr(1, 3, true).unwrap();
        vm.control_singlestep(1, true).unwrap();
        vm.set_page_access(&[(0x7000, access::R)]).unwrap();
        let ev = expect_event(&vm, event::SINGLESTEP, 560);
        assert_eq!(ev.vcpu, 1);
        let ic = s.vm.intercepts(1);
        assert!(ic.breakpoint && ic.singlestep && ic.msrs.contains(&0xc000_0082) && ic.crs.contains(&3));
        assert_eq!(s.endpoint.unhook(), Some(Disconnect::Unhooked));
        assert!(matches!(vm.next_event(Some(T)), Err(ukvmi_introspector::Error::Closed) | Ok(Some(_))));
        s.assert_guest_runs(&[0, 1]);
        let ic = s.vm.intercepts(1);
        assert!(!ic.singlestep, "single-step always ends with the connection");
        assert!(s.vm.page_restrictions().is_empty(), "page restrictions always go");
        if cleanup {
            assert!(!ic.breakpoint && ic.msrs.is_empty() && ic.crs.is_empty(), "{ic:?}");
        } else {
            assert!(ic.breakpoint && ic.msrs.contains(&0xc000_0082) && ic.crs.contains(&3), "{ic:?}");
        }
        // A new session starts with everything disabled.
        let vm = Vm::connect_raw(s.connect()).unwrap();
        s.vm.guest_does(1, GuestAction::Int3);
        s.vm.wait_log(1, T, |o| matches!(o, Observed::Event { cause: GuestAction::Int3, outcome: None })).unwrap();
        assert!(vm.next_event(Some(Duration::from_millis(50))).unwrap().is_none());
    }
}

#[test]
fn several_vcpus_with_events_outstanding_at_once() {
    let (s, vm) = setup(FakeConfig { vcpus: 4, ..Default::default() });
    let vm = Arc::new(vm);
    for v in 0..4 {
        vm.control_events(v, event::BREAKPOINT, true).unwrap();
        vm.control_events(v, event::MSR, true).unwrap();
        vm.control_msr(v, 0x140, true).unwrap();
    }
    // Two kinds of events from four vCPUs, all outstanding together.
    for v in 0..4u16 {
        if v % 2 == 0 {
            s.vm.guest_does(v, GuestAction::Int3);
        } else {
            s.vm.guest_does(v, GuestAction::WriteMsr { msr: 0x140, value: u64::from(v) });
        }
    }
    let mut evs: Vec<PendingEvent> = (0..4).map(|_| next_vcpu_event(&vm)).collect();
    evs.sort_by_key(|e| e.vcpu);
    let mut seqs: Vec<u32> = evs.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 2, 3, 4], "one VM-wide seq counter");
    // While all four wait: commands to each, from four threads at once.
    std::thread::scope(|sc| {
        for ev in &evs {
            let vm = Arc::clone(&vm);
            sc.spawn(move || {
                for _ in 0..20 {
                    let r = vm.get_registers(ev.vcpu, &[]).unwrap();
                    assert_eq!(r.regs, ev.regs, "vCPU {} is held", ev.vcpu);
                    assert_eq!(r.regs.rax, u64::from(ev.vcpu.raw()));
                }
            });
        }
    });
    // Answer in reverse order, each independently.
    for ev in evs.iter().rev() {
        let reply = if ev.event == event::MSR { EventReply::ContinueWith(0x99) } else { EventReply::Retry };
        vm.reply(ev, reply).unwrap();
    }
    for v in [1u16, 3] {
        s.vm.wait_log(v, T, |o| matches!(o, Observed::Event { cause: GuestAction::WriteMsr { .. }, .. })).unwrap();
        assert_eq!(s.vm.msr(v, 0x140), 0x99);
    }
    s.assert_guest_runs(&[0, 1, 2, 3]);
}

#[test]
fn crash_action_reaches_the_vmm() {
    let (s, vm) = one_vcpu();
    let ev = pause(&vm, 0);
    vm.reply(&ev, EventReply::Crash).unwrap();
    s.vm.wait_log(0, T, |o| *o == Observed::Crashed).unwrap();
    assert!(s.endpoint.is_connected(), "CRASH is a valid answer, not a protocol error");
}

#[test]
fn the_library_refuses_actions_an_event_does_not_take() {
    let (_s, vm) = one_vcpu();
    let ev = pause(&vm, 0);
    assert!(matches!(vm.reply(&ev, EventReply::Retry), Err(ukvmi_introspector::Error::Refused(_))));
    assert!(matches!(vm.reply(&ev, EventReply::ContinueWith(1)), Err(ukvmi_introspector::Error::Refused(_))));
    vm.reply(&ev, EventReply::Continue).unwrap();
}
