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
use ukvmi_wire::{event, msg, read_zext, Action, ControlEvents, EventBreakpoint, IntoBytes, VCPU_EVENT_BODY_BASE};

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
