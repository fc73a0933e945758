//! The kvmi-v7 dialect: what libkvmi master, LibVMI's KVM driver,
//! libmicrovmi and the other existing KVMI tools speak.
//!
//! Framing, the handshake, error codes, the vCPU header and event actions are
//! the same as in v12; message ids, event ids and a few layouts differ
//! (`shared/kvmi-spec/v7-dialect.md`). This module holds the v7 numbers, the
//! structures that differ from v12, and the maps between the two numberings.
//! Everything else in a v7 message has the v12 layout.

// zerocopy's KnownLayout derive (inside `wire!`) adds helper types without
// Debug; every struct declared with `wire!` derives Debug itself.
#![allow(missing_debug_implementations)]

use crate::structs::{wire, EventMsrs, KvmRegs, KvmSregs};
use crate::{event as v12e, msg as v12};

/// v7 message ids (`enum { KVMI_EVENT_REPLY = 0, ... }` in libkvmi's `kvmi.h`).
pub mod msg {
    /// Event reply (tool → hypervisor). In v12 an even id is a VM command.
    pub const EVENT_REPLY: u16 = 0;
    /// Event (hypervisor → tool).
    pub const EVENT: u16 = 1;
    /// `KVMI_GET_VERSION`.
    pub const GET_VERSION: u16 = 2;
    /// `KVMI_CHECK_COMMAND` (the id inside is a v7 id).
    pub const CHECK_COMMAND: u16 = 3;
    /// `KVMI_CHECK_EVENT` (the id inside is a v7 event id).
    pub const CHECK_EVENT: u16 = 4;
    /// `KVMI_GET_GUEST_INFO`.
    pub const GET_GUEST_INFO: u16 = 5;
    /// `KVMI_GET_VCPU_INFO`.
    pub const GET_VCPU_INFO: u16 = 6;
    /// `KVMI_PAUSE_VCPU` (vCPU header + `V7PauseVcpu`).
    pub const PAUSE_VCPU: u16 = 7;
    /// `KVMI_CONTROL_VM_EVENTS`.
    pub const CONTROL_VM_EVENTS: u16 = 8;
    /// `KVMI_CONTROL_EVENTS` (the event id inside is a v7 event id).
    pub const CONTROL_EVENTS: u16 = 9;
    /// `KVMI_CONTROL_CR` (vCPU header + `V7ControlCr`).
    pub const CONTROL_CR: u16 = 10;
    /// `KVMI_CONTROL_MSR`.
    pub const CONTROL_MSR: u16 = 11;
    /// `KVMI_CONTROL_VE` (#VE: refused).
    pub const CONTROL_VE: u16 = 12;
    /// `KVMI_GET_REGISTERS`.
    pub const GET_REGISTERS: u16 = 13;
    /// `KVMI_SET_REGISTERS`.
    pub const SET_REGISTERS: u16 = 14;
    /// `KVMI_GET_CPUID`.
    pub const GET_CPUID: u16 = 15;
    /// `KVMI_GET_XSAVE`.
    pub const GET_XSAVE: u16 = 16;
    /// `KVMI_READ_PHYSICAL` (`{u64 gpa; u64 size}`).
    pub const READ_PHYSICAL: u16 = 17;
    /// `KVMI_WRITE_PHYSICAL` (`{u64 gpa; u64 size}` + data).
    pub const WRITE_PHYSICAL: u16 = 18;
    /// `KVMI_INJECT_EXCEPTION`.
    pub const INJECT_EXCEPTION: u16 = 19;
    /// `KVMI_GET_PAGE_ACCESS` (refused).
    pub const GET_PAGE_ACCESS: u16 = 20;
    /// `KVMI_SET_PAGE_ACCESS` (`V7SetPageAccess` + entries).
    pub const SET_PAGE_ACCESS: u16 = 21;
    /// `KVMI_GET_MAP_TOKEN` (remote mapping: refused).
    pub const GET_MAP_TOKEN: u16 = 22;
    /// `KVMI_GET_MTRR_TYPE`.
    pub const GET_MTRR_TYPE: u16 = 23;
    /// `KVMI_CONTROL_SPP` (refused).
    pub const CONTROL_SPP: u16 = 24;
    /// `KVMI_GET_PAGE_WRITE_BITMAP` (SPP: refused).
    pub const GET_PAGE_WRITE_BITMAP: u16 = 25;
    /// `KVMI_SET_PAGE_WRITE_BITMAP` (SPP: refused).
    pub const SET_PAGE_WRITE_BITMAP: u16 = 26;
    /// `KVMI_CONTROL_CMD_RESPONSE`: reply suppression (v7 only).
    pub const CONTROL_CMD_RESPONSE: u16 = 27;
    /// `KVMI_SET_VE_INFO_PAGE` (refused).
    pub const SET_VE_INFO_PAGE: u16 = 28;
    /// `KVMI_GET_MAX_GFN` (v7 only).
    pub const GET_MAX_GFN: u16 = 29;
    /// `KVMI_GET_NEXT_AVAILABLE_GFN` (refused).
    pub const GET_NEXT_AVAILABLE_GFN: u16 = 31;
    /// `KVMI_SWITCH_EPT_VIEW` (refused).
    pub const SWITCH_EPT_VIEW: u16 = 32;
    /// `KVMI_DISABLE_VE` (refused).
    pub const DISABLE_VE: u16 = 33;
    /// `KVMI_GET_EPT_VIEW`: always view 0.
    pub const GET_EPT_VIEW: u16 = 34;
    /// `KVMI_VCPU_TRANSLATE_GVA`.
    pub const VCPU_TRANSLATE_GVA: u16 = 35;
    /// `KVMI_CONTROL_EPT_VIEW` (refused).
    pub const CONTROL_EPT_VIEW: u16 = 36;
    /// `KVMI_VCPU_GET_XCR`.
    pub const VCPU_GET_XCR: u16 = 37;
    /// `KVMI_VCPU_SET_XSAVE`.
    pub const VCPU_SET_XSAVE: u16 = 38;
    /// `KVMI_QUERY_PHYSICAL` (refused).
    pub const QUERY_PHYSICAL: u16 = 39;
    /// `KVMI_VCPU_ALLOC_GFN` (refused).
    pub const VCPU_ALLOC_GFN: u16 = 41;
    /// `KVMI_VCPU_FREE_GFN` (refused).
    pub const VCPU_FREE_GFN: u16 = 42;
    /// `KVMI_CREATE_EPT_VIEW` (refused).
    pub const CREATE_EPT_VIEW: u16 = 43;
    /// `KVMI_DESTROY_EPT_VIEW` (refused).
    pub const DESTROY_EPT_VIEW: u16 = 44;
    /// `KVMI_VCPU_CHANGE_GFN` (refused).
    pub const VCPU_CHANGE_GFN: u16 = 60;
    /// `KVMI_VCPU_CONTROL_SINGLESTEP`.
    pub const VCPU_CONTROL_SINGLESTEP: u16 = 63;

    /// The v7 commands that need #VE, EPT views, SPP, remote mapping, GFN
    /// allocation or page-access queries: refused with `-KVM_EOPNOTSUPP`.
    pub const REFUSED: [u16; 17] = [
        CONTROL_VE,
        GET_PAGE_ACCESS,
        GET_MAP_TOKEN,
        CONTROL_SPP,
        GET_PAGE_WRITE_BITMAP,
        SET_PAGE_WRITE_BITMAP,
        SET_VE_INFO_PAGE,
        GET_NEXT_AVAILABLE_GFN,
        SWITCH_EPT_VIEW,
        DISABLE_VE,
        CONTROL_EPT_VIEW,
        QUERY_PHYSICAL,
        VCPU_ALLOC_GFN,
        VCPU_FREE_GFN,
        CREATE_EPT_VIEW,
        DESTROY_EPT_VIEW,
        VCPU_CHANGE_GFN,
    ];

    /// libkvmi's name of a v7 message id.
    pub const fn name(id: u16) -> Option<&'static str> {
        Some(match id {
            EVENT_REPLY => "KVMI_EVENT_REPLY",
            EVENT => "KVMI_EVENT",
            GET_VERSION => "KVMI_GET_VERSION",
            CHECK_COMMAND => "KVMI_CHECK_COMMAND",
            CHECK_EVENT => "KVMI_CHECK_EVENT",
            GET_GUEST_INFO => "KVMI_GET_GUEST_INFO",
            GET_VCPU_INFO => "KVMI_GET_VCPU_INFO",
            PAUSE_VCPU => "KVMI_PAUSE_VCPU",
            CONTROL_VM_EVENTS => "KVMI_CONTROL_VM_EVENTS",
            CONTROL_EVENTS => "KVMI_CONTROL_EVENTS",
            CONTROL_CR => "KVMI_CONTROL_CR",
            CONTROL_MSR => "KVMI_CONTROL_MSR",
            CONTROL_VE => "KVMI_CONTROL_VE",
            GET_REGISTERS => "KVMI_GET_REGISTERS",
            SET_REGISTERS => "KVMI_SET_REGISTERS",
            GET_CPUID => "KVMI_GET_CPUID",
            GET_XSAVE => "KVMI_GET_XSAVE",
            READ_PHYSICAL => "KVMI_READ_PHYSICAL",
            WRITE_PHYSICAL => "KVMI_WRITE_PHYSICAL",
            INJECT_EXCEPTION => "KVMI_INJECT_EXCEPTION",
            GET_PAGE_ACCESS => "KVMI_GET_PAGE_ACCESS",
            SET_PAGE_ACCESS => "KVMI_SET_PAGE_ACCESS",
            GET_MAP_TOKEN => "KVMI_GET_MAP_TOKEN",
            GET_MTRR_TYPE => "KVMI_GET_MTRR_TYPE",
            CONTROL_SPP => "KVMI_CONTROL_SPP",
            GET_PAGE_WRITE_BITMAP => "KVMI_GET_PAGE_WRITE_BITMAP",
            SET_PAGE_WRITE_BITMAP => "KVMI_SET_PAGE_WRITE_BITMAP",
            CONTROL_CMD_RESPONSE => "KVMI_CONTROL_CMD_RESPONSE",
            SET_VE_INFO_PAGE => "KVMI_SET_VE_INFO_PAGE",
            GET_MAX_GFN => "KVMI_GET_MAX_GFN",
            GET_NEXT_AVAILABLE_GFN => "KVMI_GET_NEXT_AVAILABLE_GFN",
            SWITCH_EPT_VIEW => "KVMI_SWITCH_EPT_VIEW",
            DISABLE_VE => "KVMI_DISABLE_VE",
            GET_EPT_VIEW => "KVMI_GET_EPT_VIEW",
            VCPU_TRANSLATE_GVA => "KVMI_VCPU_TRANSLATE_GVA",
            CONTROL_EPT_VIEW => "KVMI_CONTROL_EPT_VIEW",
            VCPU_GET_XCR => "KVMI_VCPU_GET_XCR",
            VCPU_SET_XSAVE => "KVMI_VCPU_SET_XSAVE",
            QUERY_PHYSICAL => "KVMI_QUERY_PHYSICAL",
            VCPU_ALLOC_GFN => "KVMI_VCPU_ALLOC_GFN",
            VCPU_FREE_GFN => "KVMI_VCPU_FREE_GFN",
            CREATE_EPT_VIEW => "KVMI_CREATE_EPT_VIEW",
            DESTROY_EPT_VIEW => "KVMI_DESTROY_EPT_VIEW",
            VCPU_CHANGE_GFN => "KVMI_VCPU_CHANGE_GFN",
            VCPU_CONTROL_SINGLESTEP => "KVMI_VCPU_CONTROL_SINGLESTEP",
            _ => return None,
        })
    }
}

/// v7 event ids (a separate number space from v12's).
pub mod event {
    /// `KVMI_EVENT_UNHOOK` (0 in both dialects).
    pub const UNHOOK: u16 = 0;
    /// `KVMI_EVENT_CR`.
    pub const CR: u16 = 1;
    /// `KVMI_EVENT_MSR`.
    pub const MSR: u16 = 2;
    /// `KVMI_EVENT_XSETBV`.
    pub const XSETBV: u16 = 3;
    /// `KVMI_EVENT_BREAKPOINT`.
    pub const BREAKPOINT: u16 = 4;
    /// `KVMI_EVENT_HYPERCALL`.
    pub const HYPERCALL: u16 = 5;
    /// `KVMI_EVENT_PF`.
    pub const PF: u16 = 6;
    /// `KVMI_EVENT_TRAP`.
    pub const TRAP: u16 = 7;
    /// `KVMI_EVENT_DESCRIPTOR`.
    pub const DESCRIPTOR: u16 = 8;
    /// `KVMI_EVENT_CREATE_VCPU` (no v12 counterpart; never sent).
    pub const CREATE_VCPU: u16 = 9;
    /// `KVMI_EVENT_PAUSE_VCPU`.
    pub const PAUSE_VCPU: u16 = 10;
    /// `KVMI_EVENT_SINGLESTEP`.
    pub const SINGLESTEP: u16 = 11;
    /// `KVMI_EVENT_CPUID` (no v12 counterpart; never sent).
    pub const CPUID: u16 = 13;
}

/// The event ids of both dialects, side by side (`v7-dialect.md` §4);
/// [`event_to_v12`] and [`event_from_v12`] agree with it (tested).
pub const EVENT_MAP: [(u16, u16); 11] = [
    (event::UNHOOK, v12e::UNHOOK),
    (event::CR, v12e::CR),
    (event::MSR, v12e::MSR),
    (event::XSETBV, v12e::XSETBV),
    (event::BREAKPOINT, v12e::BREAKPOINT),
    (event::HYPERCALL, v12e::HYPERCALL),
    (event::PF, v12e::PF),
    (event::TRAP, v12e::TRAP),
    (event::DESCRIPTOR, v12e::DESCRIPTOR),
    (event::PAUSE_VCPU, v12e::PAUSE),
    (event::SINGLESTEP, v12e::SINGLESTEP),
];

/// The v12 event id of v7 event `id` (`None`: no v12 counterpart or unknown).
pub const fn event_to_v12(id: u16) -> Option<u16> {
    Some(match id {
        event::UNHOOK => v12e::UNHOOK,
        event::CR => v12e::CR,
        event::MSR => v12e::MSR,
        event::XSETBV => v12e::XSETBV,
        event::BREAKPOINT => v12e::BREAKPOINT,
        event::HYPERCALL => v12e::HYPERCALL,
        event::PF => v12e::PF,
        event::TRAP => v12e::TRAP,
        event::DESCRIPTOR => v12e::DESCRIPTOR,
        event::PAUSE_VCPU => v12e::PAUSE,
        event::SINGLESTEP => v12e::SINGLESTEP,
        _ => return None,
    })
}

/// The v7 event id of v12 event `id`.
pub const fn event_from_v12(id: u16) -> Option<u16> {
    Some(match id {
        v12e::UNHOOK => event::UNHOOK,
        v12e::CR => event::CR,
        v12e::MSR => event::MSR,
        v12e::XSETBV => event::XSETBV,
        v12e::BREAKPOINT => event::BREAKPOINT,
        v12e::HYPERCALL => event::HYPERCALL,
        v12e::PF => event::PF,
        v12e::TRAP => event::TRAP,
        v12e::DESCRIPTOR => event::DESCRIPTOR,
        v12e::PAUSE => event::PAUSE_VCPU,
        v12e::SINGLESTEP => event::SINGLESTEP,
        _ => return None,
    })
}

/// True for the v7 events that exist in v7 but have no v12 counterpart
/// (CREATE_VCPU, CPUID): known, never delivered.
pub const fn is_v7_only_event(id: u16) -> bool {
    matches!(id, event::CREATE_VCPU | event::CPUID)
}

/// How a v7 message is served (`v7-dialect.md` §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Same body as this v12 message id: served as that command.
    Same(u16),
    /// An event reply: v12 `KVMI_VCPU_EVENT` reply after the event byte is
    /// mapped (and a PF reply's 272-byte payload taken off).
    EventReply,
    /// GET_VERSION, answered with the v7 reply.
    GetVersion,
    /// CHECK_COMMAND with a v7 id inside.
    CheckCommand,
    /// CHECK_EVENT with a v7 event id inside.
    CheckEvent,
    /// CONTROL_EVENTS with a v7 event id inside (v12 `VCPU_CONTROL_EVENTS`).
    ControlEvents,
    /// PAUSE_VCPU: a vCPU message in v7, v12's VM command `VM_PAUSE_VCPU`.
    PauseVcpu,
    /// CONTROL_CR: the v12 command with its fields in another order.
    ControlCr,
    /// SET_PAGE_ACCESS: `{view, count}` header instead of v12's `{count}`.
    SetPageAccess,
    /// CONTROL_CMD_RESPONSE: reply suppression.
    ControlCmdResponse,
    /// GET_MAX_GFN: from the VM's size.
    GetMaxGfn,
    /// GET_EPT_VIEW: view 0.
    GetEptView,
    /// A v7 command this server cannot honour: `-KVM_EOPNOTSUPP`.
    Refused,
    /// Not a v7 command: `-KVM_ENOSYS`.
    Unknown,
}

/// How v7 message `id` is served.
pub const fn route(id: u16) -> Route {
    match id {
        msg::EVENT_REPLY => Route::EventReply,
        msg::GET_VERSION => Route::GetVersion,
        msg::CHECK_COMMAND => Route::CheckCommand,
        msg::CHECK_EVENT => Route::CheckEvent,
        msg::GET_GUEST_INFO => Route::Same(v12::VM_GET_INFO),
        msg::GET_VCPU_INFO => Route::Same(v12::VCPU_GET_INFO),
        msg::PAUSE_VCPU => Route::PauseVcpu,
        msg::CONTROL_VM_EVENTS => Route::Same(v12::VM_CONTROL_EVENTS),
        msg::CONTROL_EVENTS => Route::ControlEvents,
        msg::CONTROL_CR => Route::ControlCr,
        msg::CONTROL_MSR => Route::Same(v12::VCPU_CONTROL_MSR),
        msg::GET_REGISTERS => Route::Same(v12::VCPU_GET_REGISTERS),
        msg::SET_REGISTERS => Route::Same(v12::VCPU_SET_REGISTERS),
        msg::GET_CPUID => Route::Same(v12::VCPU_GET_CPUID),
        msg::GET_XSAVE => Route::Same(v12::VCPU_GET_XSAVE),
        msg::READ_PHYSICAL => Route::Same(v12::VM_READ_PHYSICAL),
        msg::WRITE_PHYSICAL => Route::Same(v12::VM_WRITE_PHYSICAL),
        msg::INJECT_EXCEPTION => Route::Same(v12::VCPU_INJECT_EXCEPTION),
        msg::SET_PAGE_ACCESS => Route::SetPageAccess,
        msg::GET_MTRR_TYPE => Route::Same(v12::VCPU_GET_MTRR_TYPE),
        msg::CONTROL_CMD_RESPONSE => Route::ControlCmdResponse,
        msg::GET_MAX_GFN => Route::GetMaxGfn,
        msg::GET_EPT_VIEW => Route::GetEptView,
        msg::VCPU_TRANSLATE_GVA => Route::Same(v12::VCPU_TRANSLATE_GVA),
        msg::VCPU_GET_XCR => Route::Same(v12::VCPU_GET_XCR),
        msg::VCPU_SET_XSAVE => Route::Same(v12::VCPU_SET_XSAVE),
        msg::VCPU_CONTROL_SINGLESTEP => Route::Same(v12::VCPU_CONTROL_SINGLESTEP),
        msg::CONTROL_VE
        | msg::GET_PAGE_ACCESS
        | msg::GET_MAP_TOKEN
        | msg::CONTROL_SPP
        | msg::GET_PAGE_WRITE_BITMAP
        | msg::SET_PAGE_WRITE_BITMAP
        | msg::SET_VE_INFO_PAGE
        | msg::GET_NEXT_AVAILABLE_GFN
        | msg::SWITCH_EPT_VIEW
        | msg::DISABLE_VE
        | msg::CONTROL_EPT_VIEW
        | msg::QUERY_PHYSICAL
        | msg::VCPU_ALLOC_GFN
        | msg::VCPU_FREE_GFN
        | msg::CREATE_EPT_VIEW
        | msg::DESTROY_EPT_VIEW
        | msg::VCPU_CHANGE_GFN => Route::Refused,
        _ => Route::Unknown,
    }
}

/// The v12 command that serves v7 command `id`, for CHECK_COMMAND (`None`
/// for v7-only commands and for ids that are not commands).
pub const fn command_to_v12(id: u16) -> Option<u16> {
    match route(id) {
        Route::Same(v12id) => Some(v12id),
        Route::GetVersion => Some(v12::GET_VERSION),
        Route::CheckCommand => Some(v12::VM_CHECK_COMMAND),
        Route::CheckEvent => Some(v12::VM_CHECK_EVENT),
        Route::ControlEvents => Some(v12::VCPU_CONTROL_EVENTS),
        Route::PauseVcpu => Some(v12::VM_PAUSE_VCPU),
        Route::ControlCr => Some(v12::VCPU_CONTROL_CR),
        Route::SetPageAccess => Some(v12::VM_SET_PAGE_ACCESS),
        Route::EventReply
        | Route::ControlCmdResponse
        | Route::GetMaxGfn
        | Route::GetEptView
        | Route::Refused
        | Route::Unknown => None,
    }
}

/// `KVMI_VERSION` as v7 tools expect it.
pub const VERSION: u32 = 1;

wire!(
    /// v7 `struct kvmi_features`: EPT-related feature bytes (all 0 here).
    V7Features, 8, {
    /// Sub-page write protection.
    spp: u8, /// VMFUNC.
    vmfunc: u8, /// EPTP switching.
    eptp: u8, /// #VE.
    ve: u8, /// Zero.
    padding: [u8; 4],
});

wire!(
    /// v7 GET_VERSION reply (v12 has `max_msg_size` and `singlestep` here).
    V7GetVersionReply, 16, {
    /// `KVMI_VERSION` (1).
    version: u32, /// Zero.
    padding: u32, /// Feature bytes.
    features: V7Features,
});

wire!(
    /// v7 PAUSE_VCPU body after the vCPU header.
    V7PauseVcpu, 8, {
    /// 1: reply once the vCPU is out of guest mode.
    wait: u8, /// Zero.
    padding1: u8, /// Zero.
    padding2: u16, /// Zero.
    padding3: u32,
});

wire!(
    /// v7 CONTROL_CR body after the vCPU header (v12: `{u8 cr; u8 enable; ...}`).
    V7ControlCr, 8, {
    /// 1 to enable.
    enable: u8, /// Zero.
    padding1: u8, /// Zero.
    padding2: u16, /// Control register number.
    cr: u32,
});

wire!(
    /// v7 SET_PAGE_ACCESS header (v12: `{u16 count; u16; u32}`).
    V7SetPageAccess, 8, {
    /// EPT view (only 0 exists here).
    view: u16, /// Entries that follow (v12 `PageAccessEntry`).
    count: u16, /// Zero.
    padding: u32,
});

wire!(
    /// CONTROL_CMD_RESPONSE body.
    V7ControlCmdResponse, 8, {
    /// 1: send replies; 0: suppress them.
    enable: u8, /// 1: the setting applies to this command too; 0: from the next one.
    now: u8, /// Zero.
    padding1: u16, /// Zero.
    padding2: u32,
});

wire!(
    /// GET_MAX_GFN reply.
    V7GetMaxGfnReply, 8, {
    /// One past the highest guest frame number: `ceil(max_gpa / 4096)`.
    gfn: u64,
});

wire!(
    /// GET_EPT_VIEW reply.
    V7GetEptViewReply, 8, {
    /// The current EPT view (always 0).
    view: u16, /// Zero.
    padding: [u8; 6],
});

wire!(
    /// v7 `struct kvmi_event_arch`: v12's `kvmi_vcpu_event_arch` with a
    /// `view` where v12 has padding.
    V7EventArch, 536, {
    /// Operand size in bytes: 2, 4 or 8.
    mode: u8, /// Zero.
    padding1: u8, /// EPT view (0).
    view: u16, /// Zero.
    padding2: [u8; 4], /// General registers.
    regs: KvmRegs, /// Special registers.
    sregs: KvmSregs, /// The nine MSRs, in v12's order.
    msrs: EventMsrs,
});

wire!(
    /// v7 `struct kvmi_event`: the whole body of a v7 event before its
    /// payload (v12 sends an 8-byte `kvmi_event_hdr` first instead, and has
    /// padding where v7 has the event id).
    V7Event, 544, {
    /// 544.
    size: u16, /// vCPU index.
    vcpu: u16, /// v7 event id.
    event: u8, /// Zero.
    padding: [u8; 3], /// Architectural state.
    arch: V7EventArch,
});

wire!(
    /// v7 PF event reply payload (v12 has none): a request to emulate with
    /// context data, which this server cannot honour.
    V7EventPfReply, 272, {
    /// Guest address of the context data.
    ctx_addr: u64, /// Bytes of context data (0: none).
    ctx_size: u32, /// 1: single-step the faulting instruction.
    singlestep: u8, /// REP prefix handling.
    rep_complete: u8, /// Zero.
    padding: u16, /// Context data.
    ctx_data: [u8; 256],
});

/// Byte offset of the event id in a v7 event body (v12: padding).
pub const EVENT_ID_OFFSET: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_that_serves_a_command_names_a_v12_command_or_a_local_answer() {
        for id in 0..=u16::from(u8::MAX) {
            match route(id) {
                Route::Same(v) => assert!(v12::is_known_command(v), "v7 {id} -> v12 {v}"),
                // KVMI_EVENT goes the other way: from a tool it is no command.
                Route::Unknown => assert!(id == msg::EVENT || msg::name(id).is_none(), "v7 {id} is named but unknown"),
                _ => assert!(msg::name(id).is_some(), "v7 {id} is routed but has no name"),
            }
        }
    }

    #[test]
    fn event_maps_are_inverse() {
        for (v7, v12) in EVENT_MAP {
            assert_eq!(event_to_v12(v7), Some(v12));
            assert_eq!(event_from_v12(v12), Some(v7));
        }
        for v12 in v12e::VCPU_EVENTS {
            assert!(event_from_v12(v12).is_some(), "v12 event {v12} has no v7 id");
        }
        assert_eq!(event_to_v12(event::CREATE_VCPU), None);
        assert_eq!(event_to_v12(event::CPUID), None);
        assert_eq!(event_to_v12(12), None);
    }
}
