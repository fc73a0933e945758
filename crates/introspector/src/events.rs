//! Typed events (spec §9): parsing what the hypervisor sends, and encoding
//! event replies (spec §5.5).

use ukvmi_wire::{
    event, read_zext, tail, Action, EventHdr, EventId, EventMsrs, EventPayload, IntoBytes, KvmRegs, KvmSregs,
    VcpuEvent, VcpuEventReply, VcpuHdr, VcpuId,
};

use crate::error::{Error, Result};
use crate::pending::PendingEvent;

/// One message the hypervisor sent on its own initiative.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// `KVMI_VM_EVENT_UNHOOK`: the VM is about to be paused, suspended or
    /// migrated. Remove in-guest hooks, then close the connection (that is the
    /// only "reply").
    Unhook {
        /// The event's sequence number.
        seq: u32,
    },
    /// A VM event (message id 0) whose event id is not UNHOOK.
    UnknownVm {
        /// The event's sequence number.
        seq: u32,
        /// The event id from `kvmi_event_hdr`.
        event: u16,
        /// The body after `kvmi_event_hdr`.
        payload: Vec<u8>,
    },
    /// A vCPU event; the vCPU waits until it gets a reply
    /// ([`Vm::reply`](crate::Vm::reply)). Dropping it unanswered answers
    /// CONTINUE (see [`PendingEvent`]).
    Vcpu(PendingEvent),
}

impl Event {
    /// The event's sequence number.
    pub fn seq(&self) -> u32 {
        match self {
            Event::Unhook { seq } | Event::UnknownVm { seq, .. } => *seq,
            Event::Vcpu(v) => v.seq,
        }
    }
}

/// A vCPU event: the vCPU state captured right before it was sent, plus the
/// event-specific data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuEventMsg {
    /// Sequence number; the reply must carry it.
    pub seq: u32,
    /// Event id (`event::*`).
    pub event: EventId,
    /// vCPU index.
    pub vcpu: VcpuId,
    /// `kvmi_vcpu_event.size` as sent (544 in v12).
    pub size: u16,
    /// Operand size in bytes: 2, 4 or 8.
    pub mode: u8,
    /// General registers.
    pub regs: KvmRegs,
    /// Special registers.
    pub sregs: KvmSregs,
    /// The nine MSRs every event carries.
    pub msrs: EventMsrs,
    /// The decoded event-specific data.
    pub payload: EventPayload,
    /// The raw event-specific bytes (body from offset 8 + `size` on).
    pub raw_payload: Vec<u8>,
}

/// How to answer a vCPU event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventReply {
    /// `CONTINUE`. For CR and MSR events the guest's value (`new_value`) is
    /// written, i.e. the write is let through unchanged.
    Continue,
    /// `RETRY` (BREAKPOINT, DESCRIPTOR and PF only).
    Retry,
    /// `CRASH`: the VM is stopped as for a guest shutdown.
    Crash,
    /// `CONTINUE` with this value written instead of the guest's (CR and MSR
    /// events only; reply the old value to block the change).
    ContinueWith(u64),
}

impl VcpuEventMsg {
    /// The event's name, e.g. `"KVMI_VCPU_EVENT_BREAKPOINT"` (`None` if unknown).
    pub fn name(&self) -> Option<&'static str> {
        self.event.name()
    }

    /// The value a plain CONTINUE writes for CR and MSR events: the guest's.
    fn guest_value(&self) -> u64 {
        self.payload.guest_value().unwrap_or(0)
    }
}

/// Parses a VM event body (message id 0).
pub(crate) fn parse_vm_event(seq: u32, body: &[u8]) -> Event {
    let hdr: EventHdr = read_zext(body);
    if hdr.event == event::UNHOOK {
        Event::Unhook { seq }
    } else {
        Event::UnknownVm { seq, event: hdr.event, payload: tail(body, 8).to_vec() }
    }
}

/// Parses a vCPU event body (message id 1, body ≥ 552 bytes). Never panics:
/// the payload starts at 8 + `kvmi_vcpu_event.size`, clamped to the body.
pub(crate) fn parse_vcpu_event(seq: u32, body: &[u8]) -> VcpuEventMsg {
    let hdr: EventHdr = read_zext(body);
    let ev: VcpuEvent = read_zext(tail(body, 8));
    let raw_payload = tail(body, 8 + usize::from(ev.size)).to_vec();
    let decoded = EventPayload::decode(hdr.event, &raw_payload);
    VcpuEventMsg {
        seq,
        event: EventId(hdr.event),
        vcpu: VcpuId(ev.vcpu),
        size: ev.size,
        mode: ev.arch.mode,
        regs: ev.arch.regs,
        sregs: ev.arch.sregs,
        msrs: ev.arch.msrs,
        payload: decoded,
        raw_payload,
    }
}

/// Builds the body of the reply to `ev`, refusing what the event does not take.
pub(crate) fn reply_body(ev: &VcpuEventMsg, reply: EventReply) -> Result<Vec<u8>> {
    let Some(info) = event::info(ev.event.raw()) else {
        return Err(Error::Refused(format!("{} is not a known vCPU event; use reply_raw", ev.event)));
    };
    let (action, value) = match reply {
        EventReply::Continue => (Action::Continue, ev.guest_value()),
        EventReply::Retry => (Action::Retry, ev.guest_value()),
        EventReply::Crash => (Action::Crash, ev.guest_value()),
        EventReply::ContinueWith(v) => {
            if info.reply_size == 0 {
                return Err(Error::Refused(format!(
                    "{} takes no reply value (ContinueWith is for CR and MSR events)",
                    info.name
                )));
            }
            (Action::Continue, v)
        }
    };
    if !info.actions.contains(action) {
        return Err(Error::Refused(format!("{} does not accept {}", info.name, action.name())));
    }
    Ok(build_reply_body(ev.vcpu.raw(), action as u8, ev.event.raw() as u8, &value_bytes(value, info.reply_size)))
}

/// `value` as `len` little-endian bytes (zero-extended or truncated).
fn value_bytes(value: u64, len: usize) -> Vec<u8> {
    value.to_le_bytes().iter().copied().chain(std::iter::repeat(0)).take(len).collect()
}

/// vCPU header + `kvmi_vcpu_event_reply` + `payload`.
pub(crate) fn build_reply_body(vcpu: u16, action: u8, event: u8, payload: &[u8]) -> Vec<u8> {
    let hdr = VcpuHdr { vcpu, ..Default::default() };
    let rep = VcpuEventReply { action, event, ..Default::default() };
    let mut body = Vec::with_capacity(16 + payload.len());
    body.extend_from_slice(hdr.as_bytes());
    body.extend_from_slice(rep.as_bytes());
    body.extend_from_slice(payload);
    body
}
