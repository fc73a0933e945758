//! Message ids, event ids, actions and the other numeric constants of KVMI v12
//! (spec §4), plus the one table that says, per event, what travels with it.

/// Builds a VM message id (even): `n << 1`.
pub const fn vm_msg_id(n: u16) -> u16 {
    n << 1
}

/// Builds a vCPU message id (odd): `(n << 1) | 1`.
pub const fn vcpu_msg_id(n: u16) -> u16 {
    (n << 1) | 1
}

/// Message ids (spec §4.1, v12 numbering).
pub mod msg {
    use super::{vcpu_msg_id, vm_msg_id};

    /// VM event (hypervisor → tool only).
    pub const VM_EVENT: u16 = vm_msg_id(0);
    /// `KVMI_GET_VERSION`, always allowed.
    pub const GET_VERSION: u16 = vm_msg_id(1);
    /// `KVMI_VM_CHECK_COMMAND`, always allowed.
    pub const VM_CHECK_COMMAND: u16 = vm_msg_id(2);
    /// `KVMI_VM_CHECK_EVENT`, always allowed.
    pub const VM_CHECK_EVENT: u16 = vm_msg_id(3);
    /// `KVMI_VM_GET_INFO`.
    pub const VM_GET_INFO: u16 = vm_msg_id(4);
    /// `KVMI_VM_CONTROL_EVENTS`.
    pub const VM_CONTROL_EVENTS: u16 = vm_msg_id(5);
    /// `KVMI_VM_READ_PHYSICAL`.
    pub const VM_READ_PHYSICAL: u16 = vm_msg_id(6);
    /// `KVMI_VM_WRITE_PHYSICAL`.
    pub const VM_WRITE_PHYSICAL: u16 = vm_msg_id(7);
    /// `KVMI_VM_PAUSE_VCPU` (a VM command that names a vCPU in its body).
    pub const VM_PAUSE_VCPU: u16 = vm_msg_id(8);
    /// `KVMI_VM_CONTROL_CLEANUP`.
    pub const VM_CONTROL_CLEANUP: u16 = vm_msg_id(9);
    /// `KVMI_VM_SET_PAGE_ACCESS` (20 in v12; 22 in v11).
    pub const VM_SET_PAGE_ACCESS: u16 = vm_msg_id(10);
    /// First unused VM message number (`KVMI_NEXT_VM_MESSAGE`).
    pub const NEXT_VM_MESSAGE: u16 = vm_msg_id(11) - 1;

    /// vCPU event (hypervisor → tool) and event reply (tool → hypervisor).
    pub const VCPU_EVENT: u16 = vcpu_msg_id(0);
    /// `KVMI_VCPU_GET_INFO`.
    pub const VCPU_GET_INFO: u16 = vcpu_msg_id(1);
    /// `KVMI_VCPU_CONTROL_EVENTS`.
    pub const VCPU_CONTROL_EVENTS: u16 = vcpu_msg_id(2);
    /// `KVMI_VCPU_GET_REGISTERS`.
    pub const VCPU_GET_REGISTERS: u16 = vcpu_msg_id(3);
    /// `KVMI_VCPU_SET_REGISTERS`.
    pub const VCPU_SET_REGISTERS: u16 = vcpu_msg_id(4);
    /// `KVMI_VCPU_GET_CPUID`.
    pub const VCPU_GET_CPUID: u16 = vcpu_msg_id(5);
    /// `KVMI_VCPU_CONTROL_CR`.
    pub const VCPU_CONTROL_CR: u16 = vcpu_msg_id(6);
    /// `KVMI_VCPU_INJECT_EXCEPTION`.
    pub const VCPU_INJECT_EXCEPTION: u16 = vcpu_msg_id(7);
    /// `KVMI_VCPU_GET_XCR`.
    pub const VCPU_GET_XCR: u16 = vcpu_msg_id(8);
    /// `KVMI_VCPU_GET_XSAVE`.
    pub const VCPU_GET_XSAVE: u16 = vcpu_msg_id(9);
    /// `KVMI_VCPU_SET_XSAVE`.
    pub const VCPU_SET_XSAVE: u16 = vcpu_msg_id(10);
    /// `KVMI_VCPU_GET_MTRR_TYPE`.
    pub const VCPU_GET_MTRR_TYPE: u16 = vcpu_msg_id(11);
    /// `KVMI_VCPU_CONTROL_MSR`.
    pub const VCPU_CONTROL_MSR: u16 = vcpu_msg_id(12);
    /// `KVMI_VCPU_CONTROL_SINGLESTEP`.
    pub const VCPU_CONTROL_SINGLESTEP: u16 = vcpu_msg_id(13);
    /// `KVMI_VCPU_TRANSLATE_GVA`.
    pub const VCPU_TRANSLATE_GVA: u16 = vcpu_msg_id(14);
    /// First unused vCPU message number (`KVMI_NEXT_VCPU_MESSAGE`).
    pub const NEXT_VCPU_MESSAGE: u16 = vcpu_msg_id(15) - 1;

    /// Size of the command permission bitmap (`KVMI_NUM_COMMANDS`): ids 0..30.
    pub const NUM_COMMANDS: u16 = if NEXT_VM_MESSAGE > NEXT_VCPU_MESSAGE { NEXT_VM_MESSAGE } else { NEXT_VCPU_MESSAGE };

    /// Every VM command (even ids with a handler), in id order.
    pub const VM_COMMANDS: [u16; 10] = [
        GET_VERSION,
        VM_CHECK_COMMAND,
        VM_CHECK_EVENT,
        VM_GET_INFO,
        VM_CONTROL_EVENTS,
        VM_READ_PHYSICAL,
        VM_WRITE_PHYSICAL,
        VM_PAUSE_VCPU,
        VM_CONTROL_CLEANUP,
        VM_SET_PAGE_ACCESS,
    ];

    /// Every vCPU command (odd ids with a handler, not counting the event reply), in id order.
    pub const VCPU_COMMANDS: [u16; 14] = [
        VCPU_GET_INFO,
        VCPU_CONTROL_EVENTS,
        VCPU_GET_REGISTERS,
        VCPU_SET_REGISTERS,
        VCPU_GET_CPUID,
        VCPU_CONTROL_CR,
        VCPU_INJECT_EXCEPTION,
        VCPU_GET_XCR,
        VCPU_GET_XSAVE,
        VCPU_SET_XSAVE,
        VCPU_GET_MTRR_TYPE,
        VCPU_CONTROL_MSR,
        VCPU_CONTROL_SINGLESTEP,
        VCPU_TRANSLATE_GVA,
    ];

    /// The commands that are allowed in every session and can never be disallowed.
    pub const ALWAYS_ALLOWED: [u16; 3] = [GET_VERSION, VM_CHECK_COMMAND, VM_CHECK_EVENT];

    /// True for the ids that have a command handler: VM ids 2..=20 (even) and
    /// vCPU ids 3..=29 (odd). Ids 0 and 1 are messages, not commands.
    pub const fn is_known_command(id: u16) -> bool {
        if id & 1 == 0 {
            id != VM_EVENT && id < NEXT_VM_MESSAGE
        } else {
            id != VCPU_EVENT && id < NEXT_VCPU_MESSAGE
        }
    }

    /// First id of the ukvmi extension range (`0x4000..0x4100`): commands
    /// that KVMI v12 does not define. The range is far above every v12 id
    /// (and every id later kernel revisions used), so a tool that probes
    /// with `KVMI_VM_CHECK_COMMAND` on a kernel KVMI gets `-KVM_ENOENT`.
    /// Even ids are VM commands (handled on the receiving thread), as in v12.
    pub const EXT_FIRST: u16 = 0x4000;
    /// First id past the ukvmi extension range.
    pub const EXT_END: u16 = 0x4100;

    /// `UKVMI_VM_MAP_MEMORY` (ukvmi extension, VM command): the reply
    /// carries `VmMapMemoryReply` and, as `SCM_RIGHTS` ancillary data, a
    /// file descriptor of guest RAM that the tool maps.
    pub const UKVMI_VM_MAP_MEMORY: u16 = EXT_FIRST;

    /// `UKVMI_VM_WRITE_PHYSICAL_UNDO` (ukvmi extension, VM command): the
    /// body and reply of `KVMI_VM_WRITE_PHYSICAL`, and the VMM keeps the
    /// bytes it overwrote: when the connection ends, for any reason, it
    /// puts them back (where the guest has not changed them since) before
    /// a vCPU blocked by the connection runs on. For breakpoints a tool
    /// plants: a tool that dies leaves no `int3` behind.
    pub const UKVMI_VM_WRITE_PHYSICAL_UNDO: u16 = EXT_FIRST + 2;

    /// `UKVMI_VM_EVENT_CHANNEL` (ukvmi extension, VM command): asks for the
    /// shared-memory event channel (see `event_channel`). The reply carries
    /// `VmEventChannelReply` and, as `SCM_RIGHTS`, the channel file and the
    /// read end of its wake-up pipe; from then on vCPU events go through the
    /// channel and may be answered through it or, as ever, on the socket.
    pub const UKVMI_VM_EVENT_CHANNEL: u16 = EXT_FIRST + 6;

    /// Every extension command, in id order.
    pub const EXTENSION_COMMANDS: [u16; 3] =
        [UKVMI_VM_MAP_MEMORY, UKVMI_VM_WRITE_PHYSICAL_UNDO, UKVMI_VM_EVENT_CHANNEL];

    /// True for the ukvmi extension commands (outside the v12 numbering;
    /// [`is_known_command`] stays exactly v12).
    pub const fn is_extension_command(id: u16) -> bool {
        matches!(id, UKVMI_VM_MAP_MEMORY | UKVMI_VM_WRITE_PHYSICAL_UNDO | UKVMI_VM_EVENT_CHANNEL)
    }

    /// True for every id this implementation has a handler for: the v12
    /// commands and the ukvmi extensions.
    pub const fn is_command(id: u16) -> bool {
        is_known_command(id) || is_extension_command(id)
    }

    /// True when the message body starts with `struct kvmi_vcpu_hdr` (odd ids).
    pub const fn is_vcpu_message(id: u16) -> bool {
        id & 1 == 1
    }

    /// The kernel's name of a message id, if it has one.
    pub const fn name(id: u16) -> Option<&'static str> {
        Some(match id {
            VM_EVENT => "KVMI_VM_EVENT",
            GET_VERSION => "KVMI_GET_VERSION",
            VM_CHECK_COMMAND => "KVMI_VM_CHECK_COMMAND",
            VM_CHECK_EVENT => "KVMI_VM_CHECK_EVENT",
            VM_GET_INFO => "KVMI_VM_GET_INFO",
            VM_CONTROL_EVENTS => "KVMI_VM_CONTROL_EVENTS",
            VM_READ_PHYSICAL => "KVMI_VM_READ_PHYSICAL",
            VM_WRITE_PHYSICAL => "KVMI_VM_WRITE_PHYSICAL",
            VM_PAUSE_VCPU => "KVMI_VM_PAUSE_VCPU",
            VM_CONTROL_CLEANUP => "KVMI_VM_CONTROL_CLEANUP",
            VM_SET_PAGE_ACCESS => "KVMI_VM_SET_PAGE_ACCESS",
            VCPU_EVENT => "KVMI_VCPU_EVENT",
            VCPU_GET_INFO => "KVMI_VCPU_GET_INFO",
            VCPU_CONTROL_EVENTS => "KVMI_VCPU_CONTROL_EVENTS",
            VCPU_GET_REGISTERS => "KVMI_VCPU_GET_REGISTERS",
            VCPU_SET_REGISTERS => "KVMI_VCPU_SET_REGISTERS",
            VCPU_GET_CPUID => "KVMI_VCPU_GET_CPUID",
            VCPU_CONTROL_CR => "KVMI_VCPU_CONTROL_CR",
            VCPU_INJECT_EXCEPTION => "KVMI_VCPU_INJECT_EXCEPTION",
            VCPU_GET_XCR => "KVMI_VCPU_GET_XCR",
            VCPU_GET_XSAVE => "KVMI_VCPU_GET_XSAVE",
            VCPU_SET_XSAVE => "KVMI_VCPU_SET_XSAVE",
            VCPU_GET_MTRR_TYPE => "KVMI_VCPU_GET_MTRR_TYPE",
            VCPU_CONTROL_MSR => "KVMI_VCPU_CONTROL_MSR",
            VCPU_CONTROL_SINGLESTEP => "KVMI_VCPU_CONTROL_SINGLESTEP",
            VCPU_TRANSLATE_GVA => "KVMI_VCPU_TRANSLATE_GVA",
            UKVMI_VM_MAP_MEMORY => "UKVMI_VM_MAP_MEMORY",
            UKVMI_VM_WRITE_PHYSICAL_UNDO => "UKVMI_VM_WRITE_PHYSICAL_UNDO",
            UKVMI_VM_EVENT_CHANNEL => "UKVMI_VM_EVENT_CHANNEL",
            _ => return None,
        })
    }
}

/// Event ids (spec §4.2). VM events are even, vCPU events odd; this is a
/// separate name space from message ids.
pub mod event {
    /// `KVMI_VM_EVENT_UNHOOK`, the only VM event.
    pub const UNHOOK: u16 = 0;
    /// `KVMI_VCPU_EVENT_PAUSE`.
    pub const PAUSE: u16 = 1;
    /// `KVMI_VCPU_EVENT_HYPERCALL`.
    pub const HYPERCALL: u16 = 3;
    /// `KVMI_VCPU_EVENT_BREAKPOINT`.
    pub const BREAKPOINT: u16 = 5;
    /// `KVMI_VCPU_EVENT_CR`.
    pub const CR: u16 = 7;
    /// `KVMI_VCPU_EVENT_TRAP`.
    pub const TRAP: u16 = 9;
    /// `KVMI_VCPU_EVENT_XSETBV`.
    pub const XSETBV: u16 = 11;
    /// `KVMI_VCPU_EVENT_DESCRIPTOR`.
    pub const DESCRIPTOR: u16 = 13;
    /// `KVMI_VCPU_EVENT_MSR`.
    pub const MSR: u16 = 15;
    /// `KVMI_VCPU_EVENT_PF`.
    pub const PF: u16 = 17;
    /// `KVMI_VCPU_EVENT_SINGLESTEP`.
    pub const SINGLESTEP: u16 = 19;
    /// First unused VM event number (`KVMI_NEXT_VM_EVENT`).
    pub const NEXT_VM_EVENT: u16 = 1;
    /// First unused vCPU event number (`KVMI_NEXT_VCPU_EVENT`).
    pub const NEXT_VCPU_EVENT: u16 = 20;
    /// Size of the event permission bitmap (`KVMI_NUM_EVENTS`): ids 0..20.
    pub const NUM_EVENTS: u16 = NEXT_VCPU_EVENT;

    /// Every vCPU event, in id order.
    pub const VCPU_EVENTS: [u16; 10] =
        [PAUSE, HYPERCALL, BREAKPOINT, CR, TRAP, XSETBV, DESCRIPTOR, MSR, PF, SINGLESTEP];

    /// True for UNHOOK and the odd ids 1..=19.
    pub const fn is_known(id: u16) -> bool {
        is_vm_event(id) || is_vcpu_event(id)
    }

    /// True only for UNHOOK.
    pub const fn is_vm_event(id: u16) -> bool {
        id == UNHOOK
    }

    /// True for the odd ids 1..=19.
    pub const fn is_vcpu_event(id: u16) -> bool {
        id & 1 == 1 && id < NEXT_VCPU_EVENT
    }

    /// What travels with one event, and which actions answer it (spec §9).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct EventInfo {
        /// The kernel's name of the event.
        pub name: &'static str,
        /// Bytes of event-specific payload after `kvmi_vcpu_event`.
        pub payload_size: usize,
        /// Bytes of event-specific reply data after `kvmi_vcpu_event_reply`.
        pub reply_size: usize,
        /// Actions this event accepts.
        pub actions: super::ActionSet,
    }

    /// The per-event table of spec §9, for vCPU events. `None` for ids that are
    /// not vCPU events (including UNHOOK, which has no reply).
    pub const fn info(id: u16) -> Option<EventInfo> {
        use super::ActionSet as A;
        let (name, payload_size, reply_size, actions) = match id {
            PAUSE => ("KVMI_VCPU_EVENT_PAUSE", 0, 0, A::CONTINUE_CRASH),
            HYPERCALL => ("KVMI_VCPU_EVENT_HYPERCALL", 0, 0, A::CONTINUE_CRASH),
            BREAKPOINT => ("KVMI_VCPU_EVENT_BREAKPOINT", 16, 0, A::ALL),
            CR => ("KVMI_VCPU_EVENT_CR", 24, 8, A::CONTINUE_CRASH),
            TRAP => ("KVMI_VCPU_EVENT_TRAP", 16, 0, A::CONTINUE_CRASH),
            XSETBV => ("KVMI_VCPU_EVENT_XSETBV", 24, 0, A::CONTINUE_CRASH),
            DESCRIPTOR => ("KVMI_VCPU_EVENT_DESCRIPTOR", 8, 0, A::ALL),
            MSR => ("KVMI_VCPU_EVENT_MSR", 24, 8, A::CONTINUE_CRASH),
            PF => ("KVMI_VCPU_EVENT_PF", 24, 0, A::ALL),
            SINGLESTEP => ("KVMI_VCPU_EVENT_SINGLESTEP", 8, 0, A::CONTINUE_CRASH),
            _ => return None,
        };
        Some(EventInfo { name, payload_size, reply_size, actions })
    }

    /// The kernel's name of an event id, if it has one.
    pub const fn name(id: u16) -> Option<&'static str> {
        if id == UNHOOK {
            return Some("KVMI_VM_EVENT_UNHOOK");
        }
        match info(id) {
            Some(i) => Some(i.name),
            None => None,
        }
    }
}

/// An event action (spec §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Action {
    /// `KVMI_EVENT_ACTION_CONTINUE`: let the guest go on as it would have.
    Continue = 0,
    /// `KVMI_EVENT_ACTION_RETRY`: re-enter the guest without completing the intercepted action.
    Retry = 1,
    /// `KVMI_EVENT_ACTION_CRASH`: stop the VM as a guest shutdown.
    Crash = 2,
}

impl Action {
    /// Decodes a wire action byte.
    pub const fn from_u8(v: u8) -> Option<Action> {
        match v {
            0 => Some(Action::Continue),
            1 => Some(Action::Retry),
            2 => Some(Action::Crash),
            _ => None,
        }
    }

    /// The kernel's name of the action.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Continue => "CONTINUE",
            Action::Retry => "RETRY",
            Action::Crash => "CRASH",
        }
    }
}

/// A set of actions, as a bit mask of `1 << action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionSet(u8);

impl ActionSet {
    /// CONTINUE and CRASH.
    pub const CONTINUE_CRASH: ActionSet = ActionSet(0b101);
    /// CONTINUE, RETRY and CRASH.
    pub const ALL: ActionSet = ActionSet(0b111);

    /// Whether `a` is in the set.
    pub const fn contains(self, a: Action) -> bool {
        self.0 & (1 << a as u8) != 0
    }
}

/// `KVMI_VERSION`.
pub const KVMI_VERSION: u32 = 1;
/// `KVMI_MAX_MSG_SIZE`: the largest body a message may carry.
pub const MAX_MSG_SIZE: usize = 4096 * 2 - 8;
/// Size of the message header.
pub const MSG_HDR_SIZE: usize = 8;
/// Guest page size that READ/WRITE_PHYSICAL and SET_PAGE_ACCESS work in.
pub const PAGE_SIZE: usize = 4096;
/// More pending pause requests than this on one vCPU ⇒ `-KVM_EBUSY`.
pub const MAX_PENDING_PAUSES: u32 = 1001;

/// Flags of `UKVMI_VM_MAP_MEMORY` (request and reply).
pub mod map_flags {
    /// Request: a writable mapping (needs `KVMI_VM_WRITE_PHYSICAL` allowed
    /// too). Reply: the descriptor sent is open read-write.
    pub const WRITABLE: u32 = 1;
    /// Every flag defined; any other bit in a request is `-KVM_EINVAL`.
    pub const ALL: u32 = WRITABLE;
}

/// Page access bits (`KVMI_PAGE_ACCESS_*`): a set bit means the access is allowed.
pub mod access {
    /// Reads allowed.
    pub const R: u8 = 1;
    /// Writes allowed.
    pub const W: u8 = 2;
    /// Instruction fetches allowed.
    pub const X: u8 = 4;
    /// Every access allowed (the page is forgotten).
    pub const RWX: u8 = R | W | X;
}

/// Descriptor-table registers named by the DESCRIPTOR event (`KVMI_DESC_*`).
pub mod desc {
    /// IDTR.
    pub const IDTR: u8 = 1;
    /// GDTR.
    pub const GDTR: u8 = 2;
    /// LDTR.
    pub const LDTR: u8 = 3;
    /// TR.
    pub const TR: u8 = 4;
}

/// Hypercall numbers of the KVMI agent channel.
pub mod hypercall {
    /// `KVM_HC_XEN_HVM_OP`, the hypercall number in RAX.
    pub const XEN_HVM_OP: u64 = 34;
    /// `KVM_HC_XEN_HVM_OP_GUEST_REQUEST_VM_EVENT`, the sub-function in RDI (EBX in 32-bit mode).
    pub const GUEST_REQUEST_VM_EVENT: u64 = 24;
}
