//! Typed events (spec §9) and event replies (spec §5.5).

use ukvmi_wire::{
    event, read_zext, tail, Action, EventBreakpoint, EventCr, EventDescriptor, EventHdr, EventMsr,
    EventMsrs, EventPf, EventSinglestep, EventTrap, EventXsetbv, IntoBytes, KvmRegs, KvmSregs,
    VcpuEvent, VcpuEventReply, VcpuHdr,
};

use crate::error::{Error, Result};

/// One message the hypervisor sent on its own initiative.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// A vCPU event; the vCPU waits until it gets a reply ([`Vm::reply`](crate::Vm::reply)).
    Vcpu(Box<VcpuEventMsg>),
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
    /// Event id (`ukvmi_wire::event::*`).
    pub event: u16,
    /// vCPU index.
    pub vcpu: u16,
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
    pub kind: EventKind,
    /// The raw event-specific bytes (body from offset 8 + `size` on).
    pub payload: Vec<u8>,
}

/// The event-specific part of a vCPU event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// `KVMI_VCPU_EVENT_PAUSE`.
    Pause,
    /// `KVMI_VCPU_EVENT_HYPERCALL`.
    Hypercall,
    /// `KVMI_VCPU_EVENT_BREAKPOINT`.
    Breakpoint {
        /// Guest physical address of the INT3.
        gpa: u64,
        /// Instruction length.
        insn_len: u8,
    },
    /// `KVMI_VCPU_EVENT_CR`.
    Cr {
        /// 0, 3 or 4.
        cr: u8,
        /// Current value.
        old_value: u64,
        /// Value the guest wants to write.
        new_value: u64,
    },
    /// `KVMI_VCPU_EVENT_TRAP`.
    Trap {
        /// Vector actually injected.
        nr: u8,
        /// Error code.
        error_code: u32,
        /// CR2 for #PF.
        address: u64,
    },
    /// `KVMI_VCPU_EVENT_XSETBV`.
    Xsetbv {
        /// XCR index.
        xcr: u8,
        /// Previous value.
        old_value: u64,
        /// New value.
        new_value: u64,
    },
    /// `KVMI_VCPU_EVENT_DESCRIPTOR`.
    Descriptor {
        /// `ukvmi_wire::desc::*`.
        descriptor: u8,
        /// True for a load (LIDT...), false for a store (SIDT...).
        write: bool,
    },
    /// `KVMI_VCPU_EVENT_MSR`.
    Msr {
        /// MSR index.
        msr: u32,
        /// Current value.
        old_value: u64,
        /// Value the guest wants to write.
        new_value: u64,
    },
    /// `KVMI_VCPU_EVENT_PF`.
    Pf {
        /// Guest virtual address, all ones if unknown.
        gva: u64,
        /// Guest physical address.
        gpa: u64,
        /// Attempted access (`ukvmi_wire::access::*`).
        access: u8,
    },
    /// `KVMI_VCPU_EVENT_SINGLESTEP`.
    Singlestep {
        /// True when another VM exit interrupted the step.
        failed: bool,
    },
    /// An event id this crate does not know.
    Unknown {
        /// The event id.
        event: u16,
        /// The event-specific bytes.
        payload: Vec<u8>,
    },
}

/// How to answer a vCPU event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
        event::name(self.event)
    }

    /// The value a plain CONTINUE writes for CR and MSR events: the guest's.
    fn guest_value(&self) -> u64 {
        match self.kind {
            EventKind::Cr { new_value, .. } | EventKind::Msr { new_value, .. } => new_value,
            _ => 0,
        }
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
    let payload = tail(body, 8 + usize::from(ev.size)).to_vec();
    let kind = parse_kind(hdr.event, &payload);
    VcpuEventMsg {
        seq,
        event: hdr.event,
        vcpu: ev.vcpu,
        size: ev.size,
        mode: ev.arch.mode,
        regs: ev.arch.regs,
        sregs: ev.arch.sregs,
        msrs: ev.arch.msrs,
        kind,
        payload,
    }
}

/// Decodes the event-specific bytes (zero-extended if short, padding ignored).
fn parse_kind(id: u16, p: &[u8]) -> EventKind {
    match id {
        event::PAUSE => EventKind::Pause,
        event::HYPERCALL => EventKind::Hypercall,
        event::BREAKPOINT => {
            let e: EventBreakpoint = read_zext(p);
            EventKind::Breakpoint { gpa: e.gpa, insn_len: e.insn_len }
        }
        event::CR => {
            let e: EventCr = read_zext(p);
            EventKind::Cr { cr: e.cr, old_value: e.old_value, new_value: e.new_value }
        }
        event::TRAP => {
            let e: EventTrap = read_zext(p);
            EventKind::Trap { nr: e.nr, error_code: e.error_code, address: e.address }
        }
        event::XSETBV => {
            let e: EventXsetbv = read_zext(p);
            EventKind::Xsetbv { xcr: e.xcr, old_value: e.old_value, new_value: e.new_value }
        }
        event::DESCRIPTOR => {
            let e: EventDescriptor = read_zext(p);
            EventKind::Descriptor { descriptor: e.descriptor, write: e.write != 0 }
        }
        event::MSR => {
            let e: EventMsr = read_zext(p);
            EventKind::Msr { msr: e.msr, old_value: e.old_value, new_value: e.new_value }
        }
        event::PF => {
            let e: EventPf = read_zext(p);
            EventKind::Pf { gva: e.gva, gpa: e.gpa, access: e.access }
        }
        event::SINGLESTEP => {
            let e: EventSinglestep = read_zext(p);
            EventKind::Singlestep { failed: e.failed != 0 }
        }
        other => EventKind::Unknown { event: other, payload: p.to_vec() },
    }
}

/// Builds the body of the reply to `ev`, refusing what the event does not take.
pub(crate) fn reply_body(ev: &VcpuEventMsg, reply: EventReply) -> Result<Vec<u8>> {
    let Some(info) = event::info(ev.event) else {
        return Err(Error::Refused(format!(
            "event id {} is not a known vCPU event; use reply_raw",
            ev.event
        )));
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
    Ok(build_reply_body(ev.vcpu, action as u8, ev.event as u8, &value_bytes(value, info.reply_size)))
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
