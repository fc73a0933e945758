//! Seed inputs: a few valid messages of every kind, per target. Written to
//! `fuzz/seeds/<target>/` by `cargo run --example gen_seeds` (the files are
//! committed; scripts/fuzz hands them to libFuzzer beside the working corpus).

use crate::endpoint::guest;
use crate::handshake::KEY;
use ukvmi_endpoint::handshake::cookie_hash;
use ukvmi_wire::handshake::{FromIntrospector, ToIntrospector};
use ukvmi_wire::v7;
use ukvmi_wire::*;

/// A stream of framed messages with rising seqs.
#[derive(Default)]
struct Stream {
    seq: u32,
    bytes: Vec<u8>,
}

impl Stream {
    fn msg(mut self, id: u16, parts: &[&[u8]]) -> Stream {
        self.seq += 1;
        self.bytes.extend(frame(id, self.seq, parts).expect("a seed message fits"));
        self
    }

    fn vcpu(self, id: u16, vcpu: u16, parts: &[&[u8]]) -> Stream {
        let h = VcpuHdr { vcpu, padding1: 0, padding2: 0 };
        let mut all: Vec<&[u8]> = vec![h.as_bytes()];
        all.extend_from_slice(parts);
        self.msg(id, &all)
    }

    /// An endpoint input: guest byte, reply byte, the stream.
    fn input(self, guest_byte: u8, reply_byte: u8) -> Vec<u8> {
        let mut v = vec![guest_byte, reply_byte];
        v.extend(self.bytes);
        v
    }
}

fn s() -> Stream {
    Stream::default()
}

fn ctl(event_id: u16, enable: bool) -> ControlEvents {
    ControlEvents { event_id, enable: u8::from(enable), padding1: 0, padding2: 0 }
}

fn phys(gpa: u64, size: u16) -> VmPhysical {
    VmPhysical { gpa, size, padding1: 0, padding2: 0 }
}

fn check(id: u16) -> VmCheck {
    VmCheck { id, padding1: 0, padding2: 0 }
}

fn pae(gpa: u64, access: u8) -> PageAccessEntry {
    PageAccessEntry { gpa, access, padding: [0; 7] }
}

const LSTAR: u32 = 0xc000_0082;

/// Seeds of `endpoint_v12`, by name.
pub fn endpoint_v12() -> Seeds {
    use msg::*;
    let regs = KvmRegs { rip: 0x1000, rflags: 2, ..Default::default() };
    let xsave = KvmXsave::default();
    let msrs = [LSTAR.to_le_bytes(), 0xc000_0080u32.to_le_bytes()].concat();
    vec![
        ("get_version", s().msg(GET_VERSION, &[]).input(0, 0)),
        (
            "vm_commands",
            s().msg(VM_CHECK_COMMAND, &[check(VCPU_GET_REGISTERS).as_bytes()])
                .msg(VM_CHECK_EVENT, &[check(event::PF).as_bytes()])
                .msg(VM_GET_INFO, &[])
                .msg(VM_CONTROL_EVENTS, &[ctl(event::UNHOOK, true).as_bytes()])
                .msg(VM_CONTROL_CLEANUP, &[VmControlCleanup { enable: 1, padding: [0; 7] }.as_bytes()])
                .input(0, 0),
        ),
        (
            "physical",
            s().msg(VM_WRITE_PHYSICAL, &[phys(0x3000, 4).as_bytes(), &[1, 2, 3, 4]])
                .msg(VM_READ_PHYSICAL, &[phys(0x3000, 16).as_bytes()])
                .msg(VM_READ_PHYSICAL, &[phys(0x3ff8, 8).as_bytes()])
                .msg(UKVMI_VM_MAP_MEMORY, &[VmMapMemory { flags: 0, padding: 0 }.as_bytes()])
                .input(0, 0),
        ),
        (
            "vcpu_queries",
            s().vcpu(VCPU_GET_INFO, 0, &[])
                .vcpu(
                    VCPU_GET_REGISTERS,
                    0,
                    &[VcpuGetRegisters { nmsrs: 2, padding1: 0, padding2: 0 }.as_bytes(), &msrs],
                )
                .vcpu(VCPU_GET_CPUID, 0, &[VcpuGetCpuid { function: 1, index: 0 }.as_bytes()])
                .vcpu(VCPU_GET_XCR, 1, &[VcpuGetXcr { xcr: 0, padding: [0; 7] }.as_bytes()])
                .vcpu(VCPU_GET_XSAVE, 0, &[])
                .vcpu(VCPU_GET_MTRR_TYPE, 0, &[VcpuGetMtrrType { gpa: 0xa0000 }.as_bytes()])
                .vcpu(VCPU_TRANSLATE_GVA, 0, &[VcpuTranslateGva { gva: 0xffff_8000_0000_1000 }.as_bytes()])
                .vcpu(VCPU_GET_INFO, 2, &[])
                .input(0, 0),
        ),
        (
            "pause_and_set",
            s().msg(VM_PAUSE_VCPU, &[VmPauseVcpu { vcpu: 0, wait: 1, padding1: 0, padding2: 0 }.as_bytes()])
                .vcpu(VCPU_SET_REGISTERS, 0, &[regs.as_bytes()])
                .vcpu(VCPU_SET_XSAVE, 0, &[xsave.as_bytes()])
                .vcpu(
                    VCPU_INJECT_EXCEPTION,
                    0,
                    &[VcpuInjectException { nr: 14, padding1: 0, padding2: 0, error_code: 2, address: 0x1000 }
                        .as_bytes()],
                )
                .vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::TRAP, true).as_bytes()])
                .input(0, 0),
        ),
        (
            "breakpoint",
            s().vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::BREAKPOINT, true).as_bytes()]).input(guest::INT3, 0),
        ),
        (
            "breakpoint_retry",
            s().vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::BREAKPOINT, true).as_bytes()]).input(guest::INT3, 1),
        ),
        (
            "hypercall_crash",
            s().vcpu(VCPU_CONTROL_EVENTS, 1, &[ctl(event::HYPERCALL, true).as_bytes()])
                .input(guest::HYPERCALL | guest::ON_VCPU1, 2),
        ),
        (
            "msr",
            s().vcpu(
                VCPU_CONTROL_MSR,
                0,
                &[VcpuControlMsr { enable: 1, padding1: 0, padding2: 0, msr: LSTAR }.as_bytes()],
            )
            .vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::MSR, true).as_bytes()])
            .input(guest::WRMSR, 16),
        ),
        (
            "cr",
            s().vcpu(VCPU_CONTROL_CR, 0, &[VcpuControlCr { cr: 4, enable: 1, padding1: 0, padding2: 0 }.as_bytes()])
                .vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::CR, true).as_bytes()])
                .input(guest::WRCR, 0),
        ),
        (
            "xsetbv_descriptor",
            s().vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::XSETBV, true).as_bytes()])
                .vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::DESCRIPTOR, true).as_bytes()])
                .input(guest::XSETBV | guest::LGDT, 0),
        ),
        (
            "pf",
            s().msg(
                VM_SET_PAGE_ACCESS,
                &[
                    VmSetPageAccess { count: 1, padding1: 0, padding2: 0 }.as_bytes(),
                    pae(0x2000, access::R | access::X).as_bytes(),
                ],
            )
            .vcpu(VCPU_CONTROL_EVENTS, 0, &[ctl(event::PF, true).as_bytes()])
            .input(guest::WRITE, 0),
        ),
        (
            "singlestep",
            s().vcpu(VCPU_CONTROL_EVENTS, 1, &[ctl(event::SINGLESTEP, true).as_bytes()])
                .vcpu(VCPU_CONTROL_SINGLESTEP, 1, &[VcpuControlSinglestep { enable: 1, padding: [0; 7] }.as_bytes()])
                .input(guest::INT3 | guest::ON_VCPU1, 0),
        ),
        (
            "pause_unstarted",
            s().msg(VM_PAUSE_VCPU, &[VmPauseVcpu { vcpu: 2, wait: 0, padding1: 0, padding2: 0 }.as_bytes()])
                .vcpu(VCPU_GET_REGISTERS, 2, &[VcpuGetRegisters::default().as_bytes()])
                .input(0, 0),
        ),
        ("truncated", {
            let mut v = s().msg(GET_VERSION, &[]).input(0, 0);
            v.extend_from_slice(MsgHdr { id: VM_READ_PHYSICAL, size: 16, seq: 9 }.as_bytes());
            v.extend_from_slice(&[0; 5]);
            v
        }),
    ]
}

/// Seeds of `endpoint_v7`, by name.
pub fn endpoint_v7() -> Seeds {
    use v7::msg::*;
    let regs = KvmRegs { rip: 0x1000, rflags: 2, ..Default::default() };
    let ctl7 = |e: u16| ctl(e, true);
    vec![
        ("get_version", s().msg(GET_VERSION, &[]).input(0, 0)),
        (
            "vm_commands",
            s().msg(CHECK_COMMAND, &[check(GET_REGISTERS).as_bytes()])
                .msg(CHECK_COMMAND, &[check(GET_MAX_GFN).as_bytes()])
                .msg(CHECK_COMMAND, &[check(CONTROL_VE).as_bytes()])
                .msg(CHECK_EVENT, &[check(v7::event::PF).as_bytes()])
                .msg(CHECK_EVENT, &[check(v7::event::CPUID).as_bytes()])
                .msg(GET_GUEST_INFO, &[])
                .msg(GET_MAX_GFN, &[])
                .vcpu(GET_EPT_VIEW, 0, &[])
                .msg(CONTROL_VM_EVENTS, &[ctl(v7::event::UNHOOK, true).as_bytes()])
                .input(0, 0),
        ),
        (
            "physical",
            s().msg(WRITE_PHYSICAL, &[phys(0x3000, 4).as_bytes(), &[1, 2, 3, 4]])
                .msg(READ_PHYSICAL, &[phys(0x3000, 16).as_bytes()])
                .input(0, 0),
        ),
        (
            "vcpu_queries",
            s().vcpu(GET_VCPU_INFO, 0, &[])
                .vcpu(
                    GET_REGISTERS,
                    0,
                    &[VcpuGetRegisters { nmsrs: 1, padding1: 0, padding2: 0 }.as_bytes(), &LSTAR.to_le_bytes()],
                )
                .vcpu(GET_CPUID, 0, &[VcpuGetCpuid { function: 0, index: 0 }.as_bytes()])
                .vcpu(VCPU_GET_XCR, 0, &[VcpuGetXcr { xcr: 0, padding: [0; 7] }.as_bytes()])
                .vcpu(GET_XSAVE, 1, &[])
                .vcpu(GET_MTRR_TYPE, 0, &[VcpuGetMtrrType { gpa: 0x1000 }.as_bytes()])
                .vcpu(VCPU_TRANSLATE_GVA, 0, &[VcpuTranslateGva { gva: 0xffff_8000_0000_1000 }.as_bytes()])
                .input(0, 0),
        ),
        (
            "pause_and_set",
            s().vcpu(PAUSE_VCPU, 0, &[v7::V7PauseVcpu { wait: 1, ..Default::default() }.as_bytes()])
                .vcpu(SET_REGISTERS, 0, &[regs.as_bytes()])
                .vcpu(
                    INJECT_EXCEPTION,
                    0,
                    &[VcpuInjectException { nr: 3, padding1: 0, padding2: 0, error_code: 0, address: 0 }.as_bytes()],
                )
                .vcpu(CONTROL_EVENTS, 0, &[ctl7(v7::event::TRAP).as_bytes()])
                .input(0, 0),
        ),
        (
            "batch_quiet",
            s().msg(
                CONTROL_CMD_RESPONSE,
                &[v7::V7ControlCmdResponse { enable: 0, now: 1, ..Default::default() }.as_bytes()],
            )
            .vcpu(GET_REGISTERS, 0, &[VcpuGetRegisters::default().as_bytes()])
            .msg(READ_PHYSICAL, &[phys(0x1000, 8).as_bytes()])
            .msg(
                CONTROL_CMD_RESPONSE,
                &[v7::V7ControlCmdResponse { enable: 1, now: 1, ..Default::default() }.as_bytes()],
            )
            .input(0, 0),
        ),
        ("breakpoint", s().vcpu(CONTROL_EVENTS, 0, &[ctl7(v7::event::BREAKPOINT).as_bytes()]).input(guest::INT3, 0)),
        (
            "msr",
            s().vcpu(CONTROL_MSR, 0, &[VcpuControlMsr { enable: 1, padding1: 0, padding2: 0, msr: LSTAR }.as_bytes()])
                .vcpu(CONTROL_EVENTS, 0, &[ctl7(v7::event::MSR).as_bytes()])
                .input(guest::WRMSR, 0),
        ),
        (
            "cr_class",
            s().vcpu(CONTROL_EVENTS, 0, &[ctl7(v7::event::CR).as_bytes()])
                .vcpu(CONTROL_CR, 0, &[v7::V7ControlCr { enable: 1, cr: 3, ..Default::default() }.as_bytes()])
                .input(guest::WRCR, 0),
        ),
        (
            "pf_emulation",
            s().msg(
                SET_PAGE_ACCESS,
                &[v7::V7SetPageAccess { view: 0, count: 1, padding: 0 }.as_bytes(), pae(0x2000, access::R).as_bytes()],
            )
            .vcpu(CONTROL_EVENTS, 0, &[ctl7(v7::event::PF).as_bytes()])
            .input(guest::WRITE, 64),
        ),
        (
            "hypercall_singlestep",
            s().vcpu(CONTROL_EVENTS, 1, &[ctl7(v7::event::HYPERCALL).as_bytes()])
                .vcpu(CONTROL_EVENTS, 1, &[ctl7(v7::event::SINGLESTEP).as_bytes()])
                .vcpu(VCPU_CONTROL_SINGLESTEP, 1, &[VcpuControlSinglestep { enable: 1, padding: [0; 7] }.as_bytes()])
                .input(guest::HYPERCALL | guest::ON_VCPU1, 0),
        ),
        ("refused", s().msg(CONTROL_SPP, &[&[0; 8]]).vcpu(CREATE_EPT_VIEW, 0, &[]).msg(EVENT, &[]).input(0, 0)),
    ]
}

/// Seeds of `handshake`: flags byte, then the stream.
pub fn handshake() -> Seeds {
    let with = |flags: u8, parts: &[&[u8]]| -> Vec<u8> {
        let mut v = vec![flags];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let reply = FromIntrospector::new([0; 20]);
    let keyed = FromIntrospector::new(cookie_hash(KEY));
    let to = ToIntrospector::new([1; 16], 1_700_000_000, "fuzz-vm", 1 << 30);
    let version =
        GetVersionReply { version: KVMI_VERSION, max_msg_size: MAX_MSG_SIZE as u32, features: Features::default() };
    let ok = ErrorCode { err: 0, padding: 0 };
    // The tool's first command is KVMI_GET_VERSION with seq 1.
    let get_version_reply = frame(msg::GET_VERSION, 1, &[ok.as_bytes(), version.as_bytes()]).expect("fits");
    let mut bigger = to;
    bigger.struct_size = 120;
    vec![
        ("vmm_no_key", with(0, &[reply.as_bytes()])),
        ("vmm_key", with(1, &[keyed.as_bytes()])),
        ("vmm_then_kvmi", with(0, &[reply.as_bytes(), &frame(msg::GET_VERSION, 1, &[]).expect("fits")])),
        ("tool", with(0, &[to.as_bytes(), &get_version_reply])),
        ("tool_key_larger_struct", with(1, &[bigger.as_bytes(), &[0; 16], &get_version_reply])),
    ]
}

/// Seeds of `wire_decode`: messages of both dialects, events, handshake
/// structures.
pub fn wire_decode() -> Seeds {
    let mut out: Seeds = Vec::new();
    // Every endpoint seed's stream is a run of valid messages.
    for (name, v) in endpoint_v12() {
        if name != "truncated" {
            out.push((name, v.get(2..).unwrap_or_default().to_vec()));
        }
    }
    for (name, v) in endpoint_v7() {
        let name: &'static str = match name {
            "get_version" | "vm_commands" | "physical" | "vcpu_queries" | "pause_and_set" => continue,
            other => other,
        };
        out.push((name, v.get(2..).unwrap_or_default().to_vec()));
    }
    let ev = VcpuEvent { size: 544, vcpu: 1, ..Default::default() };
    let pf = EventPayload::Pf { gva: 0xffff_8000_0000_2000, gpa: 0x2000, access: access::W }.encode();
    let v12_event =
        frame(msg::VCPU_EVENT, 3, &[EventHdr { event: event::PF, padding: [0; 3] }.as_bytes(), ev.as_bytes(), &pf])
            .expect("fits");
    out.push(("v12_pf_event", v12_event));
    let mut v7_event = frame(
        v7::msg::EVENT,
        3,
        &[ev.as_bytes(), &EventPayload::Msr { msr: LSTAR, old_value: 1, new_value: 2 }.encode()],
    )
    .expect("fits");
    if let Some(b) = v7_event.get_mut(MSG_HDR_SIZE + v7::EVENT_ID_OFFSET) {
        *b = v7::event::MSR as u8;
    }
    out.push(("v7_msr_event", v7_event));
    let pf_reply =
        v7::V7EventPfReply { ctx_addr: 0, ctx_size: 0, singlestep: 1, rep_complete: 0, padding: 0, ctx_data: [0; 256] };
    let r = VcpuEventReply { action: 0, event: v7::event::PF as u8, padding1: 0, padding2: 0 };
    out.push((
        "v7_pf_reply",
        frame(v7::msg::EVENT_REPLY, 3, &[VcpuHdr::default().as_bytes(), r.as_bytes(), pf_reply.as_bytes()])
            .expect("fits"),
    ));
    out.push(("to_introspector", ToIntrospector::new([1; 16], 5, "vm", 1 << 20).as_bytes().to_vec()));
    out
}

/// Named seed inputs of one target.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// Every target's seeds.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("wire_decode", wire_decode()),
        ("handshake", handshake()),
        ("endpoint_v12", endpoint_v12()),
        ("endpoint_v7", endpoint_v7()),
    ]
}
