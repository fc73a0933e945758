//! Every KVMI command against a real VM (`ukvmi run --guest spin|smp`) on
//! /dev/kvm, through the introspector library over a real socket; values
//! are checked against what the guest really did.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{code, start, Scratch};
use std::time::Duration;
use ukvmi_guests::layout;
use ukvmi_introspector::wire::{event, msg, IntoBytes, VcpuHdr};
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};

const T: Duration = Duration::from_secs(20);

fn pause(tool: &Vm, vcpu: u16) -> PendingEvent {
    tool.pause_vcpu(vcpu, true).unwrap();
    match tool.next_event(Some(T)).unwrap() {
        Some(Event::Vcpu(ev)) if ev.payload == EventPayload::Pause && ev.vcpu.raw() == vcpu => ev,
        other => panic!("expected PAUSE of vCPU {vcpu}, got {other:?}"),
    }
}

#[test]
fn handshake_info_and_vm_commands() {
    let dir = Scratch::new("vmcmd");
    let (vm, _l, tool) = start(&dir, "spin", 2, &["--name", "itest", "--uuid", "00112233-4455-6677-8899-aabbccddeeff"]);
    let info = tool.info();
    assert_eq!(info.name, "itest");
    assert_eq!(
        info.uuid,
        [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]
    );
    assert_eq!(info.max_gpa, 64 << 20);
    assert_eq!((info.version, info.max_msg_size), (1, 8184));
    assert_eq!(tool.vcpu_count().unwrap(), 2);
    vm.wait_serial("vcpu 1 up", 1, T);
    // The guest filled one pattern page per vCPU.
    for v in 0..2u16 {
        let page = tool.read_physical(layout::PATTERN_BASE + u64::from(v) * 0x1000, 4096).unwrap();
        for (j, b) in page.iter().enumerate() {
            assert_eq!(*b, layout::pattern_byte(v, j), "vCPU {v} pattern byte {j}");
        }
    }
    // Counters grow while the guest runs.
    let c0 = u64::from_le_bytes(tool.read_physical(layout::COUNTER_BASE, 8).unwrap().try_into().unwrap());
    vm.assert_guest_runs();
    let c1 = u64::from_le_bytes(tool.read_physical(layout::COUNTER_BASE, 8).unwrap().try_into().unwrap());
    assert!(c1 > c0, "counter {c0} -> {c1}");
    // Writes land in guest memory (a page the guest does not touch).
    let gpa = 0x0100_0000;
    tool.write_physical(gpa, &[0xa5; 4096]).unwrap();
    assert_eq!(tool.read_physical(gpa, 4096).unwrap(), vec![0xa5; 4096]);
    // Unbacked gpa: ENOENT, never a crash.
    assert_eq!(code(tool.read_physical(64 << 20, 1)), -2);
    assert_eq!(code(tool.write_physical(u64::MAX - 4095, &[1])), -2);
    assert_eq!(code(tool.read_physical(gpa + 4000, 200)), -22);
    // Honest about the host.
    assert_eq!(code(tool.check_command(msg::VM_GET_INFO)), 0);
    assert_eq!(code(tool.check_command(msg::VCPU_CONTROL_CR)), -95, "no CR exits on stock KVM");
    assert_eq!(code(tool.check_event(event::PAUSE)), 0);
    assert_eq!(code(tool.check_event(event::CR)), -95);
    assert_eq!(code(tool.control_events(0, event::DESCRIPTOR, true)), -95);
    vm.assert_guest_runs();
}

#[test]
fn vcpu_commands_on_a_paused_and_a_running_vcpu() {
    let dir = Scratch::new("vcpucmd");
    let (vm, _l, tool) = start(&dir, "spin", 2, &["--name", "itest", "--name", "itest"]);
    vm.wait_serial("vcpu 1 up", 1, T);
    // Running vCPU: registers are the guest's.
    let r = tool.get_registers(1, &[0xc000_0080]).unwrap();
    assert_eq!(r.mode, 8, "64-bit");
    assert_eq!(r.regs.r12, layout::R12_TAG | 1);
    assert_eq!(r.regs.r13, 1);
    assert_eq!(r.regs.r15, layout::R15_MAGIC);
    assert_eq!(r.msrs[0].index, 0xc000_0080);
    assert_eq!(r.msrs[0].data & 0x500, 0x500, "EFER.LME|LMA");
    assert_eq!(r.sregs.cr3, layout::PML4_ADDR);
    // Paused vCPU: the event's state, the memory counter agrees with R14.
    let ev = pause(&tool, 0);
    let p = tool.get_registers(0, &[]).unwrap();
    assert_eq!(p.regs, ev.regs);
    assert_eq!(p.regs.r13, 0);
    let mem = u64::from_le_bytes(tool.read_physical(layout::COUNTER_BASE, 8).unwrap().try_into().unwrap());
    assert!(mem == p.regs.r14 || mem + 1 == p.regs.r14, "memory counter {mem}, r14 {}", p.regs.r14);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(tool.get_registers(0, &[]).unwrap().regs.r14, p.regs.r14, "paused: no progress");
    // SET_REGISTERS, applied at the reply; the guest carries on with it.
    let mut regs = p.regs;
    regs.r15 = 0x0bad_cafe;
    tool.set_registers(0, &regs).unwrap();
    tool.reply(&ev, EventReply::Continue).unwrap();
    assert_eq!(tool.get_registers(0, &[]).unwrap().regs.r15, 0x0bad_cafe);
    vm.assert_guest_runs();
    assert!(tool.get_registers(0, &[]).unwrap().regs.r14 > p.regs.r14, "resumed");
    assert_eq!(code(tool.set_registers(0, &regs)), -95, "outside an event");
    // TSC, CPUID (the host's vendor), XCR0, XSAVE, MTRR, translation.
    assert!(tool.tsc_frequency(0).unwrap() > 100_000_000, "TSC in Hz");
    let leaf0 = tool.get_cpuid(0, 0, 0).unwrap();
    let host = std::arch::x86_64::__cpuid(0);
    assert_eq!((leaf0.ebx, leaf0.edx, leaf0.ecx), (host.ebx, host.edx, host.ecx), "vendor string");
    assert_eq!(code(tool.get_cpuid(0, 0x4fff_ffff, 0)), -2);
    assert_eq!(tool.get_xcr(0, 0).unwrap() & 1, 1, "x87 state always on");
    assert_eq!(code(tool.get_xcr(0, 1)), -22);
    let xs = tool.get_xsave(1).unwrap();
    tool.set_xsave(1, &xs).unwrap();
    assert_eq!(tool.get_mtrr_type(0, layout::PATTERN_BASE).unwrap(), 6, "write-back");
    assert_eq!(
        tool.translate_gva(0, layout::PATTERN_BASE + 0x123).unwrap().map(u64::from),
        Some(layout::PATTERN_BASE + 0x123)
    );
    // Through the non-identity alias: translate, then read what the guest wrote there.
    let gva = layout::ALIAS_GVA + (layout::PATTERN_BASE - layout::ALIAS_GPA) + 0x1000 + 0x42;
    let gpa = tool.translate_gva(1, gva).unwrap().expect("the alias is mapped");
    assert_eq!(gpa, layout::PATTERN_BASE + 0x1000 + 0x42);
    assert_eq!(tool.read_physical(gpa, 1).unwrap(), [layout::pattern_byte(1, 0x42)]);
    assert_eq!(tool.translate_gva(0, layout::ALIAS_GVA + (2 << 20)).unwrap().map(u64::from), None, "past the alias");
    assert_eq!(tool.translate_gva(0, 1 << 40).unwrap().map(u64::from), None);
    assert_eq!(tool.translate_gva(0, u64::MAX).unwrap().map(u64::from), None);
    vm.assert_guest_runs();
}

#[test]
fn dispatch_errors_on_a_real_vm() {
    let dir = Scratch::new("dispatch");
    let (vm, _l, tool) = start(
        &dir,
        "smp",
        2,
        &["--allow-command", "KVMI_VM_GET_INFO", "--allow-command", "7", "--allow-command", "KVMI_VM_PAUSE_VCPU"],
    );
    // Hold vCPU 0 first, so that the guest cannot start vCPU 1 while the
    // checks below run, however slow this machine is.
    let held = pause(&tool, 0);
    assert_eq!(code(tool.vcpu_count()), 0);
    assert_eq!(code(tool.read_physical(0, 8)), -1, "not in --allow-command");
    assert_eq!(code(tool.tsc_frequency(0)), -1);
    assert_eq!(code(tool.check_command(msg::VCPU_GET_INFO)), -1);
    assert_eq!(code(tool.check_command(msg::VCPU_GET_REGISTERS)), 0);
    // Padding and index.
    let bad = VcpuHdr { vcpu: 0, padding1: 0, padding2: 7 };
    let body: Vec<u8> = bad.as_bytes().iter().chain(&[0u8; 8]).copied().collect();
    assert_eq!(tool.raw().request_raw(msg::VCPU_GET_REGISTERS, &body).unwrap().err, -22);
    assert_eq!(code(tool.get_registers(2, &[])), -22);
    // vCPU 1 is not started by the smp guest yet: EAGAIN, then it works.
    assert!(!vm.serial_text().contains("starting vcpus"), "the test must run before the guest starts vCPU 1");
    assert_eq!(code(tool.get_registers(1, &[])), -11);
    tool.reply(&held, EventReply::Continue).unwrap();
    vm.wait_serial("vcpu 1 up", 1, T);
    let r = tool.get_registers(1, &[]).unwrap();
    assert_eq!(r.regs.r13, 1);
    vm.assert_guest_runs();
}

#[test]
fn pause_with_several_vcpus_and_disconnect_during_pause() {
    let dir = Scratch::new("pause");
    let (vm, l, tool) = start(&dir, "spin", 2, &["--name", "itest", "--reconnect", "0.2"]);
    vm.wait_serial("vcpu 1 up", 1, T);
    let e0 = pause(&tool, 0);
    let e1 = pause(&tool, 1);
    let ticks = vm.serial_text().matches("tick").count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.serial_text().matches("tick").count(), ticks, "vCPU 0 prints ticks; it is paused");
    tool.reply(&e1, EventReply::Continue).unwrap();
    // The tool dies holding vCPU 0 in its PAUSE event (detached: no
    // automatic CONTINUE when it is dropped).
    let _held = e0.detach();
    drop(tool);
    vm.assert_guest_runs();
    vm.wait_stderr("introspector disconnected", T);
    // It comes back: fresh session, pauses again.
    let tool = l.accept().unwrap();
    let ev = pause(&tool, 0);
    assert_eq!(ev.seq, 1, "a new session starts from scratch");
    tool.reply(&ev, EventReply::Continue).unwrap();
    vm.assert_guest_runs();
}
