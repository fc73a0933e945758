//! The kvmi-v7 structures and numbers, checked against libkvmi master's
//! `include/linux/kvmi.h` and `x86_64/asm/kvmi.h` (as `v7-dialect.md` lists them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use core::mem::{offset_of, size_of};
use ukvmi_wire::v7::{self, Route};
use ukvmi_wire::*;

#[test]
fn v7_sizes() {
    assert_eq!(size_of::<v7::V7Features>(), 8);
    assert_eq!(size_of::<v7::V7GetVersionReply>(), 16);
    assert_eq!(size_of::<v7::V7PauseVcpu>(), 8);
    assert_eq!(size_of::<v7::V7ControlCr>(), 8);
    assert_eq!(size_of::<v7::V7SetPageAccess>(), 8);
    assert_eq!(size_of::<v7::V7ControlCmdResponse>(), 8);
    assert_eq!(size_of::<v7::V7GetMaxGfnReply>(), 8);
    assert_eq!(size_of::<v7::V7GetEptViewReply>(), 8);
    assert_eq!(size_of::<v7::V7EventArch>(), 536);
    assert_eq!(size_of::<v7::V7Event>(), 544);
    assert_eq!(size_of::<v7::V7EventPfReply>(), 272);
}

#[test]
fn v7_offsets() {
    // kvmi_get_version_reply: the feature bytes start at 8, where v12 has
    // `singlestep` (v7 reads it as `spp`).
    assert_eq!(offset_of!(v7::V7GetVersionReply, features), 8);
    assert_eq!(offset_of!(GetVersionReply, features), 8);
    assert_eq!(offset_of!(v7::V7Features, spp), 0);
    assert_eq!(offset_of!(v7::V7Features, eptp), 2);
    assert_eq!(offset_of!(v7::V7Features, ve), 3);
    // kvmi_control_cr: enable first, cr a u32 at 4 (v12: cr u8 at 0, enable at 1).
    assert_eq!(offset_of!(v7::V7ControlCr, enable), 0);
    assert_eq!(offset_of!(v7::V7ControlCr, cr), 4);
    assert_eq!(offset_of!(VcpuControlCr, cr), 0);
    assert_eq!(offset_of!(VcpuControlCr, enable), 1);
    // kvmi_set_page_access: view, then count (v12: count first).
    assert_eq!(offset_of!(v7::V7SetPageAccess, view), 0);
    assert_eq!(offset_of!(v7::V7SetPageAccess, count), 2);
    assert_eq!(offset_of!(VmSetPageAccess, count), 0);
    // kvmi_control_cmd_response.
    assert_eq!(offset_of!(v7::V7ControlCmdResponse, enable), 0);
    assert_eq!(offset_of!(v7::V7ControlCmdResponse, now), 1);
    // kvmi_event: the event id at 4, arch at 8; arch's view at 2, regs at 8,
    // sregs at 152, msrs at 464 — the same as v12's kvmi_vcpu_event.
    assert_eq!(offset_of!(v7::V7Event, event), v7::EVENT_ID_OFFSET);
    assert_eq!(offset_of!(v7::V7Event, arch), 8);
    assert_eq!(offset_of!(VcpuEvent, arch), 8);
    assert_eq!(offset_of!(v7::V7EventArch, view), 2);
    assert_eq!(offset_of!(v7::V7EventArch, regs), offset_of!(VcpuEventArch, regs));
    assert_eq!(offset_of!(v7::V7EventArch, sregs), offset_of!(VcpuEventArch, sregs));
    assert_eq!(offset_of!(v7::V7EventArch, msrs), offset_of!(VcpuEventArch, msrs));
    assert_eq!(offset_of!(v7::V7EventArch, regs), 8);
    assert_eq!(offset_of!(v7::V7EventArch, sregs), 152);
    assert_eq!(offset_of!(v7::V7EventArch, msrs), 464);
    // kvmi_event_pf_reply.
    assert_eq!(offset_of!(v7::V7EventPfReply, ctx_size), 8);
    assert_eq!(offset_of!(v7::V7EventPfReply, singlestep), 12);
    assert_eq!(offset_of!(v7::V7EventPfReply, rep_complete), 13);
    assert_eq!(offset_of!(v7::V7EventPfReply, ctx_data), 16);
    // kvmi_read_physical {u64 gpa; u64 size} is v12's VmPhysical byte for
    // byte while size < 65536: the high bytes land in v12's padding.
    assert_eq!(offset_of!(VmPhysical, size), 8);
    assert_eq!(offset_of!(VmPhysical, padding1), 10);
}

#[test]
fn v7_message_ids_match_libkvmi() {
    let table: [(u16, &str); 45] = [
        (0, "KVMI_EVENT_REPLY"),
        (1, "KVMI_EVENT"),
        (2, "KVMI_GET_VERSION"),
        (3, "KVMI_CHECK_COMMAND"),
        (4, "KVMI_CHECK_EVENT"),
        (5, "KVMI_GET_GUEST_INFO"),
        (6, "KVMI_GET_VCPU_INFO"),
        (7, "KVMI_PAUSE_VCPU"),
        (8, "KVMI_CONTROL_VM_EVENTS"),
        (9, "KVMI_CONTROL_EVENTS"),
        (10, "KVMI_CONTROL_CR"),
        (11, "KVMI_CONTROL_MSR"),
        (12, "KVMI_CONTROL_VE"),
        (13, "KVMI_GET_REGISTERS"),
        (14, "KVMI_SET_REGISTERS"),
        (15, "KVMI_GET_CPUID"),
        (16, "KVMI_GET_XSAVE"),
        (17, "KVMI_READ_PHYSICAL"),
        (18, "KVMI_WRITE_PHYSICAL"),
        (19, "KVMI_INJECT_EXCEPTION"),
        (20, "KVMI_GET_PAGE_ACCESS"),
        (21, "KVMI_SET_PAGE_ACCESS"),
        (22, "KVMI_GET_MAP_TOKEN"),
        (23, "KVMI_GET_MTRR_TYPE"),
        (24, "KVMI_CONTROL_SPP"),
        (25, "KVMI_GET_PAGE_WRITE_BITMAP"),
        (26, "KVMI_SET_PAGE_WRITE_BITMAP"),
        (27, "KVMI_CONTROL_CMD_RESPONSE"),
        (28, "KVMI_SET_VE_INFO_PAGE"),
        (29, "KVMI_GET_MAX_GFN"),
        (31, "KVMI_GET_NEXT_AVAILABLE_GFN"),
        (32, "KVMI_SWITCH_EPT_VIEW"),
        (33, "KVMI_DISABLE_VE"),
        (34, "KVMI_GET_EPT_VIEW"),
        (35, "KVMI_VCPU_TRANSLATE_GVA"),
        (36, "KVMI_CONTROL_EPT_VIEW"),
        (37, "KVMI_VCPU_GET_XCR"),
        (38, "KVMI_VCPU_SET_XSAVE"),
        (39, "KVMI_QUERY_PHYSICAL"),
        (41, "KVMI_VCPU_ALLOC_GFN"),
        (42, "KVMI_VCPU_FREE_GFN"),
        (43, "KVMI_CREATE_EPT_VIEW"),
        (44, "KVMI_DESTROY_EPT_VIEW"),
        (60, "KVMI_VCPU_CHANGE_GFN"),
        (63, "KVMI_VCPU_CONTROL_SINGLESTEP"),
    ];
    for (id, name) in table {
        assert_eq!(v7::msg::name(id), Some(name), "v7 id {id}");
    }
    for id in [30u16, 40, 45, 59, 61, 62, 64] {
        assert_eq!(v7::msg::name(id), None);
        assert_eq!(v7::route(id), Route::Unknown);
    }
}

#[test]
fn v7_routes_follow_the_dialect_table() {
    use msg as m;
    let same = [
        (5, m::VM_GET_INFO),
        (6, m::VCPU_GET_INFO),
        (8, m::VM_CONTROL_EVENTS),
        (11, m::VCPU_CONTROL_MSR),
        (13, m::VCPU_GET_REGISTERS),
        (14, m::VCPU_SET_REGISTERS),
        (15, m::VCPU_GET_CPUID),
        (16, m::VCPU_GET_XSAVE),
        (17, m::VM_READ_PHYSICAL),
        (18, m::VM_WRITE_PHYSICAL),
        (19, m::VCPU_INJECT_EXCEPTION),
        (23, m::VCPU_GET_MTRR_TYPE),
        (35, m::VCPU_TRANSLATE_GVA),
        (37, m::VCPU_GET_XCR),
        (38, m::VCPU_SET_XSAVE),
        (63, m::VCPU_CONTROL_SINGLESTEP),
    ];
    for (v7id, v12id) in same {
        assert_eq!(v7::route(v7id), Route::Same(v12id), "v7 {v7id}");
        assert_eq!(v7::command_to_v12(v7id), Some(v12id));
    }
    assert_eq!(v7::route(0), Route::EventReply);
    assert_eq!(v7::route(2), Route::GetVersion);
    assert_eq!(v7::route(7), Route::PauseVcpu);
    assert_eq!(v7::command_to_v12(7), Some(m::VM_PAUSE_VCPU));
    assert_eq!(v7::route(10), Route::ControlCr);
    assert_eq!(v7::command_to_v12(10), Some(m::VCPU_CONTROL_CR));
    assert_eq!(v7::route(21), Route::SetPageAccess);
    assert_eq!(v7::route(27), Route::ControlCmdResponse);
    assert_eq!(v7::route(29), Route::GetMaxGfn);
    assert_eq!(v7::route(34), Route::GetEptView);
    for id in [12u16, 20, 22, 24, 25, 26, 28, 31, 32, 33, 36, 39, 41, 42, 43, 44, 60] {
        assert_eq!(v7::route(id), Route::Refused, "v7 {id}");
        assert!(v7::msg::REFUSED.contains(&id));
        assert_eq!(v7::command_to_v12(id), None);
    }
}

#[test]
fn v7_event_ids_match_the_dialect_table() {
    use event as e;
    let pairs = [
        (0, e::UNHOOK),
        (1, e::CR),
        (2, e::MSR),
        (3, e::XSETBV),
        (4, e::BREAKPOINT),
        (5, e::HYPERCALL),
        (6, e::PF),
        (7, e::TRAP),
        (8, e::DESCRIPTOR),
        (10, e::PAUSE),
        (11, e::SINGLESTEP),
    ];
    for (v7id, v12id) in pairs {
        assert_eq!(v7::event_to_v12(v7id), Some(v12id));
        assert_eq!(v7::event_from_v12(v12id), Some(v7id));
    }
    assert!(v7::is_v7_only_event(9) && v7::is_v7_only_event(13));
}
