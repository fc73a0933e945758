//! The event-specific part of a vCPU event, typed (spec §9): what the
//! hypervisor encodes after `kvmi_vcpu_event` and the tool decodes.

use crate::codec::read_zext;
use crate::ids::event;
use crate::structs::{
    EventBreakpoint, EventCr, EventDescriptor, EventMsr, EventPf, EventSinglestep, EventTrap, EventXsetbv,
};
use zerocopy::IntoBytes;

/// One vCPU event's own data.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EventPayload {
    /// `KVMI_VCPU_EVENT_PAUSE`.
    Pause,
    /// `KVMI_VCPU_EVENT_HYPERCALL`: the agent hypercall.
    Hypercall,
    /// `KVMI_VCPU_EVENT_BREAKPOINT`: an `int3`.
    Breakpoint {
        /// Guest physical address of the instruction (CS.base + RIP translated).
        gpa: u64,
        /// Instruction length.
        insn_len: u8,
    },
    /// `KVMI_VCPU_EVENT_CR`: a write of CR0, CR3 or CR4.
    Cr {
        /// 0, 3 or 4.
        cr: u8,
        /// Current value.
        old_value: u64,
        /// Value being written.
        new_value: u64,
    },
    /// `KVMI_VCPU_EVENT_TRAP`: what an INJECT_EXCEPTION really injected.
    Trap {
        /// Vector.
        nr: u8,
        /// Error code.
        error_code: u32,
        /// CR2 for #PF.
        address: u64,
    },
    /// `KVMI_VCPU_EVENT_XSETBV`: XCR0 changed (already in place).
    Xsetbv {
        /// XCR index.
        xcr: u8,
        /// Previous value.
        old_value: u64,
        /// New value.
        new_value: u64,
    },
    /// `KVMI_VCPU_EVENT_DESCRIPTOR`: a descriptor-table instruction.
    Descriptor {
        /// `desc::*`.
        descriptor: u8,
        /// A load (LIDT...) rather than a store (SIDT...).
        write: bool,
    },
    /// `KVMI_VCPU_EVENT_MSR`: a guest MSR write.
    Msr {
        /// MSR index.
        msr: u32,
        /// Current value.
        old_value: u64,
        /// Value being written.
        new_value: u64,
    },
    /// `KVMI_VCPU_EVENT_PF`: an access to a restricted page.
    Pf {
        /// Guest virtual address, all ones if unknown.
        gva: u64,
        /// Guest physical address.
        gpa: u64,
        /// The attempted access (`access::*`).
        access: u8,
    },
    /// `KVMI_VCPU_EVENT_SINGLESTEP`: one instruction stepped.
    Singlestep {
        /// Another exit interrupted the step.
        failed: bool,
    },
    /// An event id this crate does not know, with its raw bytes.
    Unknown {
        /// The event id.
        event: u16,
        /// The event-specific bytes.
        payload: Vec<u8>,
    },
}

impl EventPayload {
    /// The event id.
    pub fn id(&self) -> u16 {
        match self {
            EventPayload::Pause => event::PAUSE,
            EventPayload::Hypercall => event::HYPERCALL,
            EventPayload::Breakpoint { .. } => event::BREAKPOINT,
            EventPayload::Cr { .. } => event::CR,
            EventPayload::Trap { .. } => event::TRAP,
            EventPayload::Xsetbv { .. } => event::XSETBV,
            EventPayload::Descriptor { .. } => event::DESCRIPTOR,
            EventPayload::Msr { .. } => event::MSR,
            EventPayload::Pf { .. } => event::PF,
            EventPayload::Singlestep { .. } => event::SINGLESTEP,
            EventPayload::Unknown { event, .. } => *event,
        }
    }

    /// The bytes that follow `kvmi_vcpu_event`, padding zeroed.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            EventPayload::Pause | EventPayload::Hypercall => Vec::new(),
            EventPayload::Breakpoint { gpa, insn_len } => {
                EventBreakpoint { gpa, insn_len, padding: [0; 7] }.as_bytes().to_vec()
            }
            EventPayload::Cr { cr, old_value, new_value } => {
                EventCr { cr, padding: [0; 7], old_value, new_value }.as_bytes().to_vec()
            }
            EventPayload::Trap { nr, error_code, address } => {
                EventTrap { nr, padding1: 0, padding2: 0, error_code, address }.as_bytes().to_vec()
            }
            EventPayload::Xsetbv { xcr, old_value, new_value } => {
                EventXsetbv { xcr, padding: [0; 7], old_value, new_value }.as_bytes().to_vec()
            }
            EventPayload::Descriptor { descriptor, write } => {
                EventDescriptor { descriptor, write: u8::from(write), padding: [0; 6] }.as_bytes().to_vec()
            }
            EventPayload::Msr { msr, old_value, new_value } => {
                EventMsr { msr, padding: 0, old_value, new_value }.as_bytes().to_vec()
            }
            EventPayload::Pf { gva, gpa, access } => {
                EventPf { gva, gpa, access, padding1: 0, padding2: 0, padding3: 0 }.as_bytes().to_vec()
            }
            EventPayload::Singlestep { failed } => {
                EventSinglestep { failed: u8::from(failed), padding: [0; 7] }.as_bytes().to_vec()
            }
            EventPayload::Unknown { ref payload, .. } => payload.clone(),
        }
    }

    /// Decodes the bytes of event `id`: a short payload is zero-extended,
    /// padding ignored; never fails.
    pub fn decode(id: u16, p: &[u8]) -> EventPayload {
        match id {
            event::PAUSE => EventPayload::Pause,
            event::HYPERCALL => EventPayload::Hypercall,
            event::BREAKPOINT => {
                let e: EventBreakpoint = read_zext(p);
                EventPayload::Breakpoint { gpa: e.gpa, insn_len: e.insn_len }
            }
            event::CR => {
                let e: EventCr = read_zext(p);
                EventPayload::Cr { cr: e.cr, old_value: e.old_value, new_value: e.new_value }
            }
            event::TRAP => {
                let e: EventTrap = read_zext(p);
                EventPayload::Trap { nr: e.nr, error_code: e.error_code, address: e.address }
            }
            event::XSETBV => {
                let e: EventXsetbv = read_zext(p);
                EventPayload::Xsetbv { xcr: e.xcr, old_value: e.old_value, new_value: e.new_value }
            }
            event::DESCRIPTOR => {
                let e: EventDescriptor = read_zext(p);
                EventPayload::Descriptor { descriptor: e.descriptor, write: e.write != 0 }
            }
            event::MSR => {
                let e: EventMsr = read_zext(p);
                EventPayload::Msr { msr: e.msr, old_value: e.old_value, new_value: e.new_value }
            }
            event::PF => {
                let e: EventPf = read_zext(p);
                EventPayload::Pf { gva: e.gva, gpa: e.gpa, access: e.access }
            }
            event::SINGLESTEP => {
                let e: EventSinglestep = read_zext(p);
                EventPayload::Singlestep { failed: e.failed != 0 }
            }
            other => EventPayload::Unknown { event: other, payload: p.to_vec() },
        }
    }

    /// For CR and MSR writes: the value the guest wants to write (what a
    /// plain CONTINUE writes).
    pub fn guest_value(&self) -> Option<u64> {
        match *self {
            EventPayload::Cr { new_value, .. } | EventPayload::Msr { new_value, .. } => Some(new_value),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_known_payload_round_trips_at_its_spec_size() {
        let all = [
            EventPayload::Pause,
            EventPayload::Hypercall,
            EventPayload::Breakpoint { gpa: 0x1234, insn_len: 1 },
            EventPayload::Cr { cr: 4, old_value: 1, new_value: 2 },
            EventPayload::Trap { nr: 14, error_code: 2, address: 0xdead },
            EventPayload::Xsetbv { xcr: 0, old_value: 1, new_value: 7 },
            EventPayload::Descriptor { descriptor: 2, write: true },
            EventPayload::Msr { msr: 0xc000_0082, old_value: 3, new_value: 4 },
            EventPayload::Pf { gva: u64::MAX, gpa: 0x5000, access: 2 },
            EventPayload::Singlestep { failed: true },
        ];
        for p in all {
            let bytes = p.encode();
            let info = event::info(p.id()).unwrap();
            assert_eq!(bytes.len(), info.payload_size, "{}", info.name);
            assert_eq!(EventPayload::decode(p.id(), &bytes), p);
        }
        assert_eq!(EventPayload::decode(41, &[9]), EventPayload::Unknown { event: 41, payload: vec![9] });
        assert_eq!(EventPayload::decode(event::PF, &[]), EventPayload::Pf { gva: 0, gpa: 0, access: 0 });
    }
}
