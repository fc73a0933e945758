//! Sizes and field offsets checked against the tables of `spec.md` and
//! `handshake.md`, and the id/event tables checked against spec §4.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use core::mem::{offset_of, size_of};
use ukvmi_wire::handshake::{FromIntrospector, ToIntrospector};
use ukvmi_wire::*;

#[test]
fn sizes_match_the_spec() {
    assert_eq!(size_of::<MsgHdr>(), 8);
    assert_eq!(size_of::<ErrorCode>(), 8);
    assert_eq!(size_of::<VcpuHdr>(), 8);
    assert_eq!(size_of::<EventHdr>(), 8);
    assert_eq!(size_of::<KvmRegs>(), 144);
    assert_eq!(size_of::<KvmSegment>(), 24);
    assert_eq!(size_of::<KvmDtable>(), 16);
    assert_eq!(size_of::<KvmSregs>(), 312);
    assert_eq!(size_of::<KvmMsrEntry>(), 16);
    assert_eq!(size_of::<KvmXsave>(), 4096);
    assert_eq!(size_of::<VcpuEventArch>(), 536);
    assert_eq!(size_of::<VcpuEvent>(), 544);
    assert_eq!(size_of::<VcpuEventReply>(), 8);
    assert_eq!(size_of::<VcpuGetRegistersReply>(), 472);
    for n in [0usize, 1, 9, 481] {
        assert_eq!(get_registers_reply_size(n), 472 + 16 * n);
    }
    // The largest GET_REGISTERS reply that fits next to the error code.
    assert!(8 + get_registers_reply_size(481) <= MAX_MSG_SIZE);
    assert!(8 + get_registers_reply_size(482) > MAX_MSG_SIZE);
    assert_eq!(size_of::<ToIntrospector>(), 104);
    assert_eq!(size_of::<FromIntrospector>(), 24);
    assert_eq!(size_of::<GetVersionReply>(), 16);
    assert_eq!(size_of::<VmGetInfoReply>(), 16);
    assert_eq!(size_of::<VmPhysical>(), 16);
    assert_eq!(size_of::<PageAccessEntry>(), 16);
    assert_eq!(size_of::<VcpuInjectException>(), 16);
    assert_eq!(size_of::<VcpuGetCpuidReply>(), 16);
    for s in [
        size_of::<VmCheck>(),
        size_of::<ControlEvents>(),
        size_of::<VmPauseVcpu>(),
        size_of::<VmControlCleanup>(),
        size_of::<VmSetPageAccess>(),
        size_of::<VcpuGetRegisters>(),
        size_of::<VcpuGetCpuid>(),
        size_of::<VcpuControlCr>(),
        size_of::<VcpuGetXcr>(),
        size_of::<VcpuGetMtrrType>(),
        size_of::<VcpuControlMsr>(),
        size_of::<VcpuControlSinglestep>(),
        size_of::<VcpuTranslateGva>(),
        size_of::<VcpuGetInfoReply>(),
        size_of::<VcpuGetXcrReply>(),
        size_of::<VcpuGetMtrrTypeReply>(),
        size_of::<VcpuTranslateGvaReply>(),
        size_of::<Features>(),
    ] {
        assert_eq!(s, 8);
    }
}

#[test]
fn kvm_regs_offsets() {
    let order = [
        offset_of!(KvmRegs, rax),
        offset_of!(KvmRegs, rbx),
        offset_of!(KvmRegs, rcx),
        offset_of!(KvmRegs, rdx),
        offset_of!(KvmRegs, rsi),
        offset_of!(KvmRegs, rdi),
        offset_of!(KvmRegs, rsp),
        offset_of!(KvmRegs, rbp),
        offset_of!(KvmRegs, r8),
        offset_of!(KvmRegs, r9),
        offset_of!(KvmRegs, r10),
        offset_of!(KvmRegs, r11),
        offset_of!(KvmRegs, r12),
        offset_of!(KvmRegs, r13),
        offset_of!(KvmRegs, r14),
        offset_of!(KvmRegs, r15),
        offset_of!(KvmRegs, rip),
        offset_of!(KvmRegs, rflags),
    ];
    for (i, off) in order.iter().enumerate() {
        assert_eq!(*off, 8 * i);
    }
}

#[test]
fn kvm_segment_and_sregs_offsets() {
    assert_eq!(offset_of!(KvmSegment, limit), 8);
    assert_eq!(offset_of!(KvmSegment, selector), 12);
    assert_eq!(offset_of!(KvmSegment, type_), 14);
    assert_eq!(offset_of!(KvmSegment, present), 15);
    assert_eq!(offset_of!(KvmSegment, dpl), 16);
    assert_eq!(offset_of!(KvmSegment, db), 17);
    assert_eq!(offset_of!(KvmSegment, s), 18);
    assert_eq!(offset_of!(KvmSegment, l), 19);
    assert_eq!(offset_of!(KvmSegment, g), 20);
    assert_eq!(offset_of!(KvmSegment, avl), 21);
    assert_eq!(offset_of!(KvmSegment, unusable), 22);
    assert_eq!(offset_of!(KvmSegment, padding), 23);
    assert_eq!(offset_of!(KvmDtable, limit), 8);
    assert_eq!(offset_of!(KvmDtable, padding), 10);

    assert_eq!(offset_of!(KvmSregs, cs), 0);
    assert_eq!(offset_of!(KvmSregs, ds), 24);
    assert_eq!(offset_of!(KvmSregs, es), 48);
    assert_eq!(offset_of!(KvmSregs, fs), 72);
    assert_eq!(offset_of!(KvmSregs, gs), 96);
    assert_eq!(offset_of!(KvmSregs, ss), 120);
    assert_eq!(offset_of!(KvmSregs, tr), 144);
    assert_eq!(offset_of!(KvmSregs, ldt), 168);
    assert_eq!(offset_of!(KvmSregs, gdt), 192);
    assert_eq!(offset_of!(KvmSregs, idt), 208);
    assert_eq!(offset_of!(KvmSregs, cr0), 224);
    assert_eq!(offset_of!(KvmSregs, cr2), 232);
    assert_eq!(offset_of!(KvmSregs, cr3), 240);
    assert_eq!(offset_of!(KvmSregs, cr4), 248);
    assert_eq!(offset_of!(KvmSregs, cr8), 256);
    assert_eq!(offset_of!(KvmSregs, efer), 264);
    assert_eq!(offset_of!(KvmSregs, apic_base), 272);
    assert_eq!(offset_of!(KvmSregs, interrupt_bitmap), 280);
}

#[test]
fn vcpu_event_offsets() {
    assert_eq!(offset_of!(VcpuEvent, size), 0);
    assert_eq!(offset_of!(VcpuEvent, vcpu), 2);
    assert_eq!(offset_of!(VcpuEvent, padding), 4);
    assert_eq!(offset_of!(VcpuEvent, arch), 8);
    assert_eq!(offset_of!(VcpuEventArch, mode), 0);
    assert_eq!(offset_of!(VcpuEventArch, regs), 8);
    assert_eq!(offset_of!(VcpuEventArch, sregs), 152);
    assert_eq!(offset_of!(VcpuEventArch, msrs), 464);
    // MSR block, relative to `arch`.
    let base = offset_of!(VcpuEventArch, msrs);
    assert_eq!(base + offset_of!(EventMsrs, sysenter_cs), 464);
    assert_eq!(base + offset_of!(EventMsrs, sysenter_esp), 472);
    assert_eq!(base + offset_of!(EventMsrs, sysenter_eip), 480);
    assert_eq!(base + offset_of!(EventMsrs, efer), 488);
    assert_eq!(base + offset_of!(EventMsrs, star), 496);
    assert_eq!(base + offset_of!(EventMsrs, lstar), 504);
    assert_eq!(base + offset_of!(EventMsrs, cstar), 512);
    assert_eq!(base + offset_of!(EventMsrs, pat), 520);
    assert_eq!(base + offset_of!(EventMsrs, shadow_gs), 528);
    // Offsets from the start of the event body (after the message header).
    // Spec erratum: spec.md §5.3 says regs 16 / sregs 160 / msrs 472 "from the
    // event body", but its own tables (8-byte event header, arch at 8 inside
    // kvmi_vcpu_event, regs at 8 inside arch) give 24 / 168 / 480; those are
    // the offsets relative to `kvmi_vcpu_event` + 8. The 544 total agrees with
    // the tables, so the tables win.
    let ev = size_of::<EventHdr>();
    assert_eq!(ev + offset_of!(VcpuEvent, arch) + offset_of!(VcpuEventArch, regs), 24);
    assert_eq!(ev + offset_of!(VcpuEvent, arch) + offset_of!(VcpuEventArch, sregs), 168);
    assert_eq!(ev + offset_of!(VcpuEvent, arch) + offset_of!(VcpuEventArch, msrs), 480);
    assert_eq!(VCPU_EVENT_BODY_BASE, 552);
}

#[test]
fn reply_and_payload_offsets() {
    assert_eq!(offset_of!(VcpuEventReply, action), 0);
    assert_eq!(offset_of!(VcpuEventReply, event), 1);
    assert_eq!(offset_of!(VcpuEventReply, padding1), 2);
    assert_eq!(offset_of!(VcpuEventReply, padding2), 4);
    assert_eq!(EVENT_REPLY_BODY_BASE, 16);

    assert_eq!(offset_of!(EventBreakpoint, insn_len), 8);
    assert_eq!(offset_of!(EventCr, old_value), 8);
    assert_eq!(offset_of!(EventCr, new_value), 16);
    assert_eq!(offset_of!(EventTrap, error_code), 4);
    assert_eq!(offset_of!(EventTrap, address), 8);
    assert_eq!(offset_of!(EventXsetbv, old_value), 8);
    assert_eq!(offset_of!(EventDescriptor, write), 1);
    assert_eq!(offset_of!(EventMsr, old_value), 8);
    assert_eq!(offset_of!(EventMsr, new_value), 16);
    assert_eq!(offset_of!(EventPf, gpa), 8);
    assert_eq!(offset_of!(EventPf, access), 16);
    assert_eq!(offset_of!(EventPf, padding3), 20);

    assert_eq!(offset_of!(GetVersionReply, max_msg_size), 4);
    assert_eq!(offset_of!(GetVersionReply, features), 8);
    assert_eq!(offset_of!(ControlEvents, enable), 2);
    assert_eq!(offset_of!(ControlEvents, padding1), 3);
    assert_eq!(offset_of!(VmPhysical, size), 8);
    assert_eq!(offset_of!(VmPhysical, padding1), 10);
    assert_eq!(offset_of!(VmPhysical, padding2), 12);
    assert_eq!(offset_of!(VmPauseVcpu, wait), 2);
    assert_eq!(offset_of!(PageAccessEntry, access), 8);
    assert_eq!(offset_of!(VcpuGetRegistersReply, regs), 8);
    assert_eq!(offset_of!(VcpuGetRegistersReply, sregs), 152);
    assert_eq!(offset_of!(VcpuGetRegistersReply, msrs), 464);
    assert_eq!(offset_of!(VcpuControlCr, enable), 1);
    assert_eq!(offset_of!(VcpuControlCr, padding1), 2);
    assert_eq!(offset_of!(VcpuInjectException, error_code), 4);
    assert_eq!(offset_of!(VcpuInjectException, address), 8);
    assert_eq!(offset_of!(VcpuControlMsr, padding2), 2);
    assert_eq!(offset_of!(VcpuControlMsr, msr), 4);
}

#[test]
fn handshake_offsets() {
    assert_eq!(offset_of!(ToIntrospector, uuid), 4);
    assert_eq!(offset_of!(ToIntrospector, padding), 20);
    assert_eq!(offset_of!(ToIntrospector, start_time), 24);
    assert_eq!(offset_of!(ToIntrospector, name), 32);
    assert_eq!(offset_of!(ToIntrospector, max_gpa), 96);
    assert_eq!(offset_of!(FromIntrospector, cookie_hash), 4);
    let t = ToIntrospector::new([7; 16], 5, &"x".repeat(100), 1 << 30);
    assert_eq!(t.struct_size, 104);
    assert_eq!(t.name_str().len(), 63);
    assert_eq!(t.name[63], 0);
}

#[test]
fn message_ids_match_spec_4_1() {
    let table: [(u16, &str); 25] = [
        (2, "KVMI_GET_VERSION"),
        (4, "KVMI_VM_CHECK_COMMAND"),
        (6, "KVMI_VM_CHECK_EVENT"),
        (8, "KVMI_VM_GET_INFO"),
        (10, "KVMI_VM_CONTROL_EVENTS"),
        (12, "KVMI_VM_READ_PHYSICAL"),
        (14, "KVMI_VM_WRITE_PHYSICAL"),
        (16, "KVMI_VM_PAUSE_VCPU"),
        (18, "KVMI_VM_CONTROL_CLEANUP"),
        (20, "KVMI_VM_SET_PAGE_ACCESS"),
        (1, "KVMI_VCPU_EVENT"),
        (3, "KVMI_VCPU_GET_INFO"),
        (5, "KVMI_VCPU_CONTROL_EVENTS"),
        (7, "KVMI_VCPU_GET_REGISTERS"),
        (9, "KVMI_VCPU_SET_REGISTERS"),
        (11, "KVMI_VCPU_GET_CPUID"),
        (13, "KVMI_VCPU_CONTROL_CR"),
        (15, "KVMI_VCPU_INJECT_EXCEPTION"),
        (17, "KVMI_VCPU_GET_XCR"),
        (19, "KVMI_VCPU_GET_XSAVE"),
        (21, "KVMI_VCPU_SET_XSAVE"),
        (23, "KVMI_VCPU_GET_MTRR_TYPE"),
        (25, "KVMI_VCPU_CONTROL_MSR"),
        (27, "KVMI_VCPU_CONTROL_SINGLESTEP"),
        (29, "KVMI_VCPU_TRANSLATE_GVA"),
    ];
    for (id, name) in table {
        assert_eq!(msg::name(id), Some(name), "id {id}");
        assert_eq!(msg::is_known_command(id), id != 1, "id {id}");
    }
    assert_eq!(msg::NEXT_VM_MESSAGE, 21);
    assert_eq!(msg::NEXT_VCPU_MESSAGE, 30);
    assert_eq!(msg::NUM_COMMANDS, 30);
    for id in [0u16, 1, 22, 30, 31, 0xffff] {
        assert!(!msg::is_known_command(id), "id {id}");
    }
    let known = (0..=u16::MAX).filter(|&i| msg::is_known_command(i)).count();
    assert_eq!(known, msg::VM_COMMANDS.len() + msg::VCPU_COMMANDS.len());
}

#[test]
fn events_match_spec_4_2_and_9() {
    assert_eq!(event::NUM_EVENTS, 20);
    let known: Vec<u16> = (0..=u16::MAX).filter(|&i| event::is_known(i)).collect();
    assert_eq!(known, vec![0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]);
    // (id, total event body, total reply body, RETRY accepted)
    let table = [
        (event::PAUSE, 552, 16, false),
        (event::HYPERCALL, 552, 16, false),
        (event::BREAKPOINT, 568, 16, true),
        (event::CR, 576, 24, false),
        (event::TRAP, 568, 16, false),
        (event::XSETBV, 576, 16, false),
        (event::DESCRIPTOR, 560, 16, true),
        (event::MSR, 576, 24, false),
        (event::PF, 576, 16, true),
        (event::SINGLESTEP, 560, 16, false),
    ];
    for (id, body, reply, retry) in table {
        let i = event::info(id).unwrap();
        assert_eq!(VCPU_EVENT_BODY_BASE + i.payload_size, body, "{}", i.name);
        assert_eq!(EVENT_REPLY_BODY_BASE + i.reply_size, reply, "{}", i.name);
        assert!(i.actions.contains(Action::Continue));
        assert!(i.actions.contains(Action::Crash));
        assert_eq!(i.actions.contains(Action::Retry), retry, "{}", i.name);
    }
    assert!(event::info(event::UNHOOK).is_none());
    assert_eq!(event::name(event::UNHOOK), Some("KVMI_VM_EVENT_UNHOOK"));
    assert_eq!(Action::from_u8(3), None);
}

#[test]
fn the_map_memory_extension_sits_outside_v12() {
    let id = msg::UKVMI_VM_MAP_MEMORY;
    assert_eq!(id, 0x4000);
    assert_eq!(id & 1, 0, "a VM command");
    assert!(!msg::is_vcpu_message(id));
    assert!(!msg::is_known_command(id), "is_known_command stays exactly v12");
    assert!(msg::is_extension_command(id) && msg::is_command(id));
    assert!((msg::EXT_FIRST..msg::EXT_END).contains(&id) && msg::EXT_FIRST > msg::NUM_COMMANDS);
    assert_eq!(msg::name(id), Some("UKVMI_VM_MAP_MEMORY"));
    let ext: Vec<u16> = (0..=u16::MAX).filter(|&i| msg::is_extension_command(i)).collect();
    assert_eq!(ext, msg::EXTENSION_COMMANDS);
    for i in 0..=u16::MAX {
        assert_eq!(msg::is_command(i), msg::is_known_command(i) || ext.contains(&i), "id {i}");
    }
    assert_eq!(size_of::<VmMapMemory>(), 8);
    assert_eq!((offset_of!(VmMapMemory, flags), offset_of!(VmMapMemory, padding)), (0, 4));
    assert_eq!(size_of::<VmMapMemoryReply>(), 24);
    assert_eq!(
        [
            offset_of!(VmMapMemoryReply, gpa),
            offset_of!(VmMapMemoryReply, size),
            offset_of!(VmMapMemoryReply, flags),
            offset_of!(VmMapMemoryReply, padding)
        ],
        [0, 8, 16, 20]
    );
    assert_eq!((map_flags::WRITABLE, map_flags::ALL), (1, 1));
}
