//! `wire_decode`: both dialects' message decoding in `ukvmi-wire`, on
//! arbitrary bytes. Nothing may panic, and the tables must agree with each
//! other (the maps between v7 and v12 ids invert, every route names a real
//! command, a decoded payload re-encodes to itself).

use ukvmi_wire::handshake::{FromIntrospector, ToIntrospector};
use ukvmi_wire::v7::{self, Route};
use ukvmi_wire::*;

/// `read_zext` of `T` keeps the bytes it has room for and zero-fills the rest.
fn zext<T: FromBytes + IntoBytes + Immutable>(bytes: &[u8]) -> T {
    let v: T = read_zext(bytes);
    let out = v.as_bytes();
    let n = out.len().min(bytes.len());
    assert_eq!(out.get(..n), bytes.get(..n), "read_zext::<{}> changed the bytes", core::any::type_name::<T>());
    assert!(
        out.get(n..).unwrap_or(&[]).iter().all(|&b| b == 0),
        "read_zext::<{}> did not zero-extend",
        core::any::type_name::<T>()
    );
    v
}

macro_rules! every_struct {
    ($bytes:expr; $($t:ty),* $(,)?) => { $( let _: $t = zext::<$t>($bytes); )* };
}

/// Reads `bytes` as every wire structure of both dialects.
fn every_structure(b: &[u8]) {
    every_struct!(b;
        MsgHdr, ErrorCode, VcpuHdr, EventHdr, KvmRegs, KvmSegment, KvmDtable, KvmSregs, KvmMsrEntry,
        KvmMsrsHdr, KvmXsave, EventMsrs, VcpuEventArch, VcpuEvent, VcpuEventReply, EventBreakpoint, EventCr,
        EventCrReply, EventTrap, EventXsetbv, EventDescriptor, EventMsr, EventMsrReply, EventPf,
        EventSinglestep, Features, GetVersionReply, VmCheck, VmGetInfoReply, ControlEvents, VmPhysical,
        VmMapMemory, VmMapMemoryReply, VmPauseVcpu, VmControlCleanup, VmSetPageAccess, PageAccessEntry,
        VcpuGetInfoReply, VcpuGetRegisters, VcpuGetRegistersReply, VcpuGetCpuid, VcpuGetCpuidReply,
        VcpuControlCr, VcpuInjectException, VcpuGetXcr, VcpuGetXcrReply, VcpuGetMtrrType,
        VcpuGetMtrrTypeReply, VcpuControlMsr, VcpuControlSinglestep, VcpuTranslateGva,
        VcpuTranslateGvaReply,
        ToIntrospector, FromIntrospector,
        v7::V7Features, v7::V7GetVersionReply, v7::V7PauseVcpu, v7::V7ControlCr, v7::V7SetPageAccess,
        v7::V7ControlCmdResponse, v7::V7GetMaxGfnReply, v7::V7GetEptViewReply, v7::V7EventArch,
        v7::V7Event, v7::V7EventPfReply,
    );
}

/// The v12 id tables agree with each other for `id`.
fn v12_ids(id: u16) {
    let named = msg::name(id).is_some();
    if msg::is_known_command(id) {
        assert!(named, "v12 command {id} has no name");
        assert!(msg::is_command(id));
        let list: &[u16] = if msg::is_vcpu_message(id) { &msg::VCPU_COMMANDS } else { &msg::VM_COMMANDS };
        assert!(list.contains(&id), "v12 command {id} is missing from its list");
    }
    if msg::is_extension_command(id) {
        assert!(named && msg::is_command(id) && !msg::is_known_command(id));
        assert!((msg::EXT_FIRST..msg::EXT_END).contains(&id));
    }
    if named {
        assert!(msg::is_command(id) || id == msg::VM_EVENT || id == msg::VCPU_EVENT, "{id} is named but no command");
    }
    assert_eq!(msg::is_vcpu_message(id), id & 1 == 1);

    // Event ids.
    if let Some(info) = event::info(id) {
        assert!(event::is_vcpu_event(id), "event {id} has info but is no vCPU event");
        assert!(info.actions.contains(Action::Continue) && info.actions.contains(Action::Crash));
        assert_eq!(event::name(id), Some(info.name));
    }
    assert_eq!(event::is_vcpu_event(id), event::VCPU_EVENTS.contains(&id), "vCPU event {id}");
    assert_eq!(event::is_known(id), event::name(id).is_some(), "event {id}");
}

/// The v7 tables agree with each other and with v12 for `id`.
fn v7_ids(id: u16) {
    let route = v7::route(id);
    let to_v12 = v7::command_to_v12(id);
    match route {
        Route::Same(v) => {
            assert!(msg::is_known_command(v), "v7 {id} routes to v12 {v}, which is no command");
            assert_eq!(to_v12, Some(v));
        }
        Route::GetVersion => assert_eq!(to_v12, Some(msg::GET_VERSION)),
        Route::CheckCommand => assert_eq!(to_v12, Some(msg::VM_CHECK_COMMAND)),
        Route::CheckEvent => assert_eq!(to_v12, Some(msg::VM_CHECK_EVENT)),
        Route::ControlEvents => assert_eq!(to_v12, Some(msg::VCPU_CONTROL_EVENTS)),
        Route::PauseVcpu => assert_eq!(to_v12, Some(msg::VM_PAUSE_VCPU)),
        Route::ControlCr => assert_eq!(to_v12, Some(msg::VCPU_CONTROL_CR)),
        Route::SetPageAccess => assert_eq!(to_v12, Some(msg::VM_SET_PAGE_ACCESS)),
        Route::Refused => {
            assert!(v7::msg::REFUSED.contains(&id), "v7 {id} is refused but not listed");
            assert_eq!(to_v12, None);
        }
        Route::EventReply | Route::ControlCmdResponse | Route::GetMaxGfn | Route::GetEptView => {
            assert_eq!(to_v12, None);
        }
        Route::Unknown => {
            assert_eq!(to_v12, None);
            assert!(id == v7::msg::EVENT || v7::msg::name(id).is_none(), "v7 {id} is named but unknown");
        }
    }
    if route != Route::Unknown {
        assert!(v7::msg::name(id).is_some(), "v7 {id} is routed ({route:?}) but has no name");
    }
    if v7::msg::REFUSED.contains(&id) {
        assert_eq!(route, Route::Refused);
    }
    // A served v7 command keeps the vCPU/VM nature of its body, except
    // PAUSE_VCPU (a vCPU message in v7, a VM command in v12).
    if let Some(v) = to_v12 {
        assert!(msg::is_known_command(v), "v7 {id} -> {v}");
    }

    // Event ids: the two maps invert each other on every id.
    if let Some(e12) = v7::event_to_v12(id) {
        assert_eq!(v7::event_from_v12(e12), Some(id), "v7 event {id} -> v12 {e12} -> back");
        assert!(event::is_known(e12), "v7 event {id} maps to unknown v12 event {e12}");
        assert!(v7::EVENT_MAP.contains(&(id, e12)));
        assert!(!v7::is_v7_only_event(id));
    }
    if let Some(e7) = v7::event_from_v12(id) {
        assert_eq!(v7::event_to_v12(e7), Some(id), "v12 event {id} -> v7 {e7} -> back");
        assert!(v7::EVENT_MAP.contains(&(e7, id)));
    }
    assert_eq!(v7::event_from_v12(id).is_some(), event::is_known(id), "v12 event {id} has no v7 id");
}

/// The event payload codec: decode never fails, and a known payload
/// re-encodes at its spec size and decodes to the same value.
fn payloads(id: u16, p: &[u8]) {
    let d = EventPayload::decode(id, p);
    assert_eq!(d.id(), id);
    let bytes = d.encode();
    match &d {
        EventPayload::Unknown { payload, .. } => {
            assert!(event::info(id).is_none(), "known event {id} decoded as unknown");
            assert_eq!(payload.as_slice(), p);
        }
        _ => {
            let info = event::info(id).expect("a known payload has event info");
            assert_eq!(bytes.len(), info.payload_size, "{} encodes at the wrong size", info.name);
            assert_eq!(EventPayload::decode(id, &bytes), d, "{} does not round-trip", info.name);
        }
    }
    if let Some(v) = d.guest_value() {
        assert!(
            matches!(d, EventPayload::Cr { new_value, .. } | EventPayload::Msr { new_value, .. } if new_value == v)
        );
    }
}

/// One message's body, read the way each dialect's handlers read it.
fn message(hdr: MsgHdr, body: &[u8]) {
    // The header frames the body back to the same bytes.
    if let Ok(again) = frame(hdr.id, hdr.seq, &[body]) {
        let h: MsgHdr = read_zext(&again);
        assert_eq!((h.id, usize::from(h.size), h.seq), (hdr.id, body.len(), hdr.seq));
        assert_eq!(tail(&again, MSG_HDR_SIZE), body);
    } else {
        assert!(body.len() > MAX_MSG_SIZE);
    }
    let vcpu_args = tail(body, core::mem::size_of::<VcpuHdr>());
    // v12: vCPU messages start with a vCPU header.
    if msg::is_vcpu_message(hdr.id) {
        let _: VcpuHdr = zext(body);
    }
    match hdr.id {
        msg::VM_READ_PHYSICAL | msg::VM_WRITE_PHYSICAL => {
            let p: VmPhysical = zext(body);
            let data = tail(body, core::mem::size_of::<VmPhysical>());
            let _ = data.get(..usize::from(p.size));
        }
        msg::VM_SET_PAGE_ACCESS => {
            let h: VmSetPageAccess = zext(body);
            let entries = tail(body, core::mem::size_of::<VmSetPageAccess>());
            for e in entries.chunks(core::mem::size_of::<PageAccessEntry>()).take(usize::from(h.count)) {
                let _: PageAccessEntry = zext(e);
            }
        }
        msg::VCPU_GET_REGISTERS => {
            let h: VcpuGetRegisters = zext(vcpu_args);
            let idx = tail(vcpu_args, core::mem::size_of::<VcpuGetRegisters>());
            let n = usize::from(h.nmsrs);
            let size = get_registers_reply_size(n);
            assert_eq!(size, 472 + 16 * n);
            let _: Vec<u32> =
                idx.chunks_exact(4).take(n).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        }
        msg::VCPU_EVENT => {
            // An event reply: vCPU header, kvmi_vcpu_event_reply, payload.
            let r: VcpuEventReply = zext(vcpu_args);
            let _ = Action::from_u8(r.action).map(Action::name);
            let _ = tail(body, EVENT_REPLY_BODY_BASE);
        }
        _ => {}
    }
    // v7, the same bytes: the layouts that differ.
    match v7::route(hdr.id) {
        Route::PauseVcpu => {
            let _: v7::V7PauseVcpu = zext(vcpu_args);
        }
        Route::ControlCr => {
            let c: v7::V7ControlCr = zext(vcpu_args);
            let _ = u8::try_from(c.cr);
        }
        Route::SetPageAccess => {
            let h: v7::V7SetPageAccess = zext(body);
            let entries = tail(body, core::mem::size_of::<v7::V7SetPageAccess>());
            for e in entries.chunks(core::mem::size_of::<PageAccessEntry>()).take(usize::from(h.count)) {
                let _: PageAccessEntry = zext(e);
            }
        }
        Route::ControlCmdResponse => {
            let _: v7::V7ControlCmdResponse = zext(body);
        }
        Route::EventReply => {
            let r: VcpuEventReply = zext(vcpu_args);
            let e12 = v7::event_to_v12(u16::from(r.event));
            if u16::from(r.event) == v7::event::PF {
                let _: v7::V7EventPfReply = zext(tail(body, EVENT_REPLY_BODY_BASE));
            }
            if let Some(e) = e12 {
                assert!(e < 20, "a v12 event id fits the reply's event byte");
            }
        }
        Route::CheckCommand | Route::CheckEvent => {
            let c: VmCheck = zext(body);
            v7_ids(c.id);
            v12_ids(c.id);
        }
        Route::ControlEvents => {
            let c: ControlEvents = zext(vcpu_args);
            v7_ids(c.event_id);
        }
        _ => {}
    }
    // As the tool side reads them: a v12 event, a v7 event.
    if body.len() >= VCPU_EVENT_BODY_BASE {
        let h: EventHdr = zext(body);
        let ev: VcpuEvent = zext(tail(body, core::mem::size_of::<EventHdr>()));
        let _ = ev.vcpu;
        payloads(h.event, tail(body, VCPU_EVENT_BODY_BASE));
    }
    if body.len() >= core::mem::size_of::<v7::V7Event>() {
        let ev: v7::V7Event = zext(body);
        if let Some(e12) = v7::event_to_v12(u16::from(ev.event)) {
            payloads(e12, tail(body, core::mem::size_of::<v7::V7Event>()));
        }
    }
}

/// The whole check, for one input.
pub fn check(data: &[u8]) {
    every_structure(data);
    for w in data.chunks(2) {
        let id = u16::from_le_bytes([w.first().copied().unwrap_or(0), w.get(1).copied().unwrap_or(0)]);
        v12_ids(id);
        v7_ids(id);
    }
    for w in data.chunks(4) {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(w) {
            *d = *s;
        }
        let v = i32::from_le_bytes(b);
        if let Some(e) = KvmErrno::from_wire(v) {
            assert_eq!(e.wire(), v);
            assert!(!e.name().is_empty() && !e.meaning().is_empty());
            assert_eq!(KvmErrno::from_code(e.code()), Some(e));
        }
    }
    // The handshake structures (tool side: name, announced size).
    let to: ToIntrospector = zext(data);
    let name = to.name_str();
    assert!(!name.contains('\0'));
    let again = ToIntrospector::new(to.uuid, to.start_time, &name, to.max_gpa);
    assert_eq!(again.struct_size as usize, core::mem::size_of::<ToIntrospector>());
    assert_eq!(again.name[63], 0, "the name keeps its NUL");
    if name.len() < 64 && !name.contains('\u{fffd}') {
        assert_eq!(again.name_str(), name);
    }

    // The bytes as a stream of messages, framed as the endpoint reads them.
    let mut rest = data;
    while rest.len() >= MSG_HDR_SIZE {
        let hdr: MsgHdr = zext(rest);
        let size = usize::from(hdr.size);
        let body_all = tail(rest, MSG_HDR_SIZE);
        let body = body_all.get(..size).unwrap_or(body_all);
        message(hdr, body);
        if size > MAX_MSG_SIZE || body.len() < size {
            break;
        }
        rest = tail(body_all, size);
    }
    // Every event payload codec on the input itself.
    if let Some((&id, p)) = data.split_first() {
        payloads(u16::from(id), p);
    }
}
