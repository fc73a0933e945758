//! In-process VMM tests on /dev/kvm with a tool on the other end of a
//! socket pair: the guest's hypercall and int3 exits become KVMI events, and
//! the tool's answers decide how the VM goes on or ends. They need /dev/kvm
//! and fail (never skip) without it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use ukvmi_conformance::RawPeer;
use ukvmi_guest_abi::layout;
use ukvmi_vmm::{Crash, CrashEvent, Exit, Image, SerialSink, Vm, VmConfig};
use ukvmi_wire::{
    event, msg, read_zext, Action, ControlEvents, EventBreakpoint, EventHdr, IntoBytes, VcpuEvent, VcpuGetRegisters,
    VcpuGetRegistersReply, VCPU_EVENT_BODY_BASE,
};

/// Calls the KVMI hypercall until a tool answers it (RAX is then no
/// longer -1000), then runs `then`.
fn hypercall_until_answered(then: &[u8]) -> Vec<u8> {
    let [lo, hi] = layout::PORT_HYPERCALL.to_le_bytes();
    let code: &[&[u8]] = &[
        // 0x00: mov eax, 34; mov edi, 24; xor esi, esi
        &[0xb8, layout::HC_KVMI_NR as u8, 0, 0, 0],
        &[0xbf, layout::HC_KVMI_SUBFN as u8, 0, 0, 0],
        &[0x31, 0xf6],
        // 0x0c: mov dx, PORT_HYPERCALL; out dx, al
        &[0x66, 0xba, lo, hi, 0xee],
        // 0x11: cmp rax, -1000; je 0x00
        &[0x48, 0x3d, 0x18, 0xfc, 0xff, 0xff, 0x74, 0xe7],
        // 0x19:
        then,
    ];
    code.concat()
}

/// Where `then` of [`hypercall_until_answered`] starts.
const THEN: u64 = layout::LOAD_ADDR + 0x19;

/// `out 0xf4, al; jmp $`.
const POWER_OFF_AL: [u8; 4] = [0xe6, layout::PORT_POWEROFF as u8, 0xeb, 0xfe];

/// A one-vCPU VM running `code`, already running, with a tool hooked to it.
fn vm_with_tool(code: &[u8]) -> (Vm, RawPeer) {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests run guest code on KVM and need /dev/kvm, which this host does not have"
    );
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "ukvmi-vmm-tool-events-{}-{}.bin",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::write(&path, code).unwrap();
    let cfg = VmConfig {
        vcpus: 1,
        memory_mib: 16,
        image: Image::Kernel(path.clone()),
        name: "tool-events".into(),
        uuid: [0; 16],
        allow_commands: None,
        allow_events: None,
        serial: SerialSink::Writer(Box::new(std::io::sink())),
        introspect: None,
        symbols: Vec::new(),
    };
    let vm = Vm::new(cfg, Arc::new(|_: &str| {})).unwrap_or_else(|e| panic!("creating a VM on /dev/kvm: {e}"));
    let _ = std::fs::remove_file(path);
    let (vmm_end, tool_end) = UnixStream::pair().unwrap();
    vm.endpoint().hook(vmm_end).unwrap();
    // A test that goes wrong ends as Stopped rather than hanging.
    let stop = vm.stop_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        stop.stop();
    });
    (vm, RawPeer::new(tool_end))
}

fn enable(peer: &mut RawPeer, id: u16) {
    let ce = ControlEvents { event_id: id, enable: 1, padding1: 0, padding2: 0 };
    assert_eq!(peer.vcpu_err_of(msg::VCPU_CONTROL_EVENTS, 0, ce.as_bytes()), 0, "enabling event {id}");
}

/// The next message, which must be event `id`.
fn expect_event(peer: &mut RawPeer, id: u16) -> ukvmi_conformance::raw::Received {
    let ev = peer.recv();
    assert_eq!(ev.hdr.id, msg::VCPU_EVENT, "{:?}", ev.hdr);
    assert_eq!(ev.event_id(), id);
    ev
}

#[test]
fn an_answered_hypercall_returns_zero_in_rax() {
    let (vm, mut peer) = vm_with_tool(&hypercall_until_answered(&POWER_OFF_AL));
    let run = std::thread::spawn(move || vm.run());
    enable(&mut peer, event::HYPERCALL);
    let ev = expect_event(&mut peer, event::HYPERCALL);
    peer.reply_event(&ev, Action::Continue as u8, &[]);
    assert_eq!(run.join().unwrap(), Exit::PowerOff(0));
}

#[test]
fn crash_in_reply_to_a_hypercall_ends_the_vm_as_crashed() {
    let (vm, mut peer) = vm_with_tool(&hypercall_until_answered(&POWER_OFF_AL));
    let run = std::thread::spawn(move || vm.run());
    enable(&mut peer, event::HYPERCALL);
    let ev = expect_event(&mut peer, event::HYPERCALL);
    peer.reply_event(&ev, Action::Crash as u8, &[]);
    assert_eq!(run.join().unwrap(), Exit::Crashed(Crash { vcpu: 0, event: CrashEvent::Hypercall }));
}

#[test]
fn an_int3_is_a_breakpoint_event_with_its_gpa() {
    // After the hypercall: int3, then power off (never reached).
    let then = [&[0xcc][..], &POWER_OFF_AL].concat();
    let (vm, mut peer) = vm_with_tool(&hypercall_until_answered(&then));
    let run = std::thread::spawn(move || vm.run());
    enable(&mut peer, event::BREAKPOINT);
    enable(&mut peer, event::HYPERCALL);
    let ev = expect_event(&mut peer, event::HYPERCALL);
    peer.reply_event(&ev, Action::Continue as u8, &[]);
    let ev = expect_event(&mut peer, event::BREAKPOINT);
    let bp: EventBreakpoint = read_zext(ukvmi_wire::tail(&ev.body, VCPU_EVENT_BODY_BASE));
    assert_eq!((bp.gpa, bp.insn_len), (THEN, 1), "identity-mapped int3");
    peer.reply_event(&ev, Action::Crash as u8, &[]);
    assert_eq!(run.join().unwrap(), Exit::Crashed(Crash { vcpu: 0, event: CrashEvent::Breakpoint { rip: THEN } }));
}

/// Spins until BL is 0x2a, then powers off with it:
/// `cmp bl, 0x2a; jne $-3; mov al, bl; out 0xf4, al; jmp $`.
const SPIN_UNTIL_BL_2A: [u8; 11] =
    [0x80, 0xfb, 0x2a, 0x75, 0xfb, 0x88, 0xd8, 0xe6, layout::PORT_POWEROFF as u8, 0xeb, 0xfe];

/// One KVMI hypercall (no loop).
fn hypercall_once() -> Vec<u8> {
    let [lo, hi] = layout::PORT_HYPERCALL.to_le_bytes();
    [
        &[0xb8, layout::HC_KVMI_NR as u8, 0, 0, 0][..],
        &[0xbf, layout::HC_KVMI_SUBFN as u8, 0, 0, 0],
        &[0x31, 0xf6],
        &[0x66, 0xba, lo, hi, 0xee],
    ]
    .concat()
}

/// VCPU_GET_REGISTERS of vCPU 0 (no MSRs), which must succeed.
fn get_registers(peer: &mut RawPeer) -> VcpuGetRegistersReply {
    let head = VcpuGetRegisters { nmsrs: 0, padding1: 0, padding2: 0 };
    let seq = peer.send_vcpu(msg::VCPU_GET_REGISTERS, 0, head.as_bytes());
    let reply = peer.reply_to(seq);
    assert_eq!(reply.err(), 0, "VCPU_GET_REGISTERS");
    read_zext(reply.data())
}

#[test]
fn events_and_commands_see_the_registers_of_this_exit_and_of_the_tools_writes() {
    // The registers an event carries and GET_REGISTERS answers come from
    // `kvm_run`'s sync area where the host offers it (`regs_cache`):
    // they must be the guest's values at this exit, and a tool's
    // SET_REGISTERS must reach the guest.
    const RBX: u64 = 0x1111_2222_3333_4444;
    const R12: u64 = 0x5555_6666_7777_8888;
    let then: Vec<u8> = [
        // mov rbx, RBX; mov r12, R12
        &[0x48, 0xbb][..],
        &RBX.to_le_bytes(),
        &[0x49, 0xbc],
        &R12.to_le_bytes(),
        &hypercall_once(),
        &SPIN_UNTIL_BL_2A,
    ]
    .concat();
    let after_out = THEN + 20 + hypercall_once().len() as u64;
    let (vm, mut peer) = vm_with_tool(&hypercall_until_answered(&then));
    let run = std::thread::spawn(move || vm.run());
    enable(&mut peer, event::HYPERCALL);
    let ev = expect_event(&mut peer, event::HYPERCALL);
    peer.reply_event(&ev, Action::Continue as u8, &[]);

    let ev = expect_event(&mut peer, event::HYPERCALL);
    let common: VcpuEvent = read_zext(ukvmi_wire::tail(&ev.body, core::mem::size_of::<EventHdr>()));
    let regs = common.arch.regs;
    assert_eq!((regs.rbx, regs.r12, regs.rip), (RBX, R12, after_out), "the event's registers");
    assert_eq!(regs.rax & 0xffff_ffff, layout::HC_KVMI_NR);
    let got = get_registers(&mut peer);
    assert_eq!(got.regs.as_bytes(), common.arch.regs.as_bytes(), "GET_REGISTERS during the event = the event's");
    assert_eq!(got.sregs.as_bytes(), common.arch.sregs.as_bytes(), "special registers likewise");
    // The special registers the VMM entered the guest with (boot.rs), which
    // this guest never changes.
    let s = common.arch.sregs;
    assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x8005_0033, layout::PML4_ADDR, 0x20, 0x500), "the event's sregs");
    assert_eq!(common.arch.msrs.efer & 0x500, 0x500, "EFER.LME|LMA in the event's MSRs");

    // SET_REGISTERS during an event applies with the reply (KVMI's
    // delayed registers); the guest then sees RBX = 0x2a and powers off
    // with it: the write reached KVM and nothing cached overwrote it.
    let mut set = got.regs;
    set.rbx = 0x2a;
    assert_eq!(peer.vcpu_err_of(msg::VCPU_SET_REGISTERS, 0, set.as_bytes()), 0, "SET_REGISTERS");
    peer.reply_event(&ev, Action::Continue as u8, &[]);
    assert_eq!(run.join().unwrap(), Exit::PowerOff(0x2a), "the guest powered off with the tool's RBX");
}
