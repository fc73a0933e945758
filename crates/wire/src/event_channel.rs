//! The layout of the ukvmi event channel (`UKVMI_VM_EVENT_CHANNEL`): a
//! shared-memory file with one slot per vCPU through which vCPU events and
//! their replies travel instead of the socket.
//!
//! The file is `PAGE`-aligned: a header page, then one [`SLOT_SIZE`] slot per
//! vCPU (slot `i` at `(i + 1) * SLOT_SIZE`). Every word named here is a
//! 32-bit little-endian integer at a 4-byte-aligned offset, accessed
//! atomically by both sides. The event and reply areas hold whole framed
//! messages, byte for byte what the socket would carry (header and body).
//!
//! Who writes what:
//!
//! * header [`TOOL_SLEEPERS`]: the tool (threads about to block in `poll`
//!   on the wake-up pipe); the VMM only reads it.
//! * slot [`EV_SEQ`], [`EV_LEN`], [`EV_DATA`]: the VMM (the vCPU thread
//!   posting an event: data and length first, the seq last).
//! * slot [`VCPU_SLEEPING`]: the VMM (a hint: the vCPU sleeps on [`BELL`]).
//! * header [`HDR_FEATURES`]: the VMM (what it accepts beyond layout
//!   version 1; [`FEATURE_REPLY_REGS`]); the tool only reads it.
//! * slot [`REPLY_SEQ`], [`REPLY_LEN`], [`REPLY_FLAGS`], [`REPLY_DATA`],
//!   [`REPLY_REGS`]: the tool (data, registers, length and flags first, the
//!   seq, equal to the event's, last).
//! * slot [`BELL`]: both add to it, then `FUTEX_WAKE` it (shared futex);
//!   the vCPU thread waits on it.
//!
//! The VMM never trusts what it reads: the tool may write any byte at any
//! time. It copies a reply out and validates the copy like a socket reply.
//!
//! # A reply that carries registers (beyond KVMI)
//!
//! Where the header's [`HDR_FEATURES`] has [`FEATURE_REPLY_REGS`], a tool may
//! set [`REPLY_WITH_REGS`] in [`REPLY_FLAGS`] and put a whole `kvm_regs`
//! ([`REPLY_REGS_SIZE`] bytes) at [`REPLY_REGS`]: the VMM then treats them
//! exactly as a `KVMI_VCPU_SET_REGISTERS` sent during that event (the
//! event's delayed registers, set when the reply is taken, before the guest
//! resumes; they replace an earlier SET_REGISTERS of the same event). One
//! slot write instead of a command on the socket and the reply.
//!
//! A tool that never writes [`REPLY_FLAGS`] (it stays 0) behaves as with
//! layout version 1 alone; a tool that uses the flag writes the word with
//! every reply (0 when there are no registers). The VMM refuses the whole
//! reply, as it refuses any malformed channel reply (the connection ends
//! with `BadEventReply`, the vCPU resumes as if CONTINUE and nothing of the
//! reply is applied), when: [`REPLY_FLAGS`] has a bit other than
//! [`REPLY_WITH_REGS`]; the reply message itself is malformed (§7.3, as
//! without registers); or registers come while `KVMI_VCPU_SET_REGISTERS`
//! is not allowed for the connection (or not supported by the backend). A
//! socket SET_REGISTERS would get an error code back; an event reply has no
//! answer to carry one, and applying the reply without its registers would
//! apply half of it.

// zerocopy's KnownLayout derive adds helper types without Debug; the
// structs themselves derive Debug.
#![allow(missing_debug_implementations)]

use crate::structs::wire;

/// Bytes of the header page and of each slot.
pub const SLOT_SIZE: usize = 4096;
/// `MAGIC` word at offset 0 of the header: `"EVCH"`.
pub const MAGIC: u32 = 0x4843_5645;
/// Layout version at offset 4 of the header.
pub const VERSION: u32 = 1;

/// Header: the magic number.
pub const HDR_MAGIC: usize = 0;
/// Header: the layout version.
pub const HDR_VERSION: usize = 4;
/// Header: the number of vCPU slots.
pub const HDR_NR_VCPUS: usize = 8;
/// Header: [`FEATURE_REPLY_REGS`] and any later feature bits (VMM's).
pub const HDR_FEATURES: usize = 12;
/// [`HDR_FEATURES`] bit: the VMM takes registers with a reply ([`REPLY_WITH_REGS`]).
pub const FEATURE_REPLY_REGS: u32 = 1;
/// Header: tool threads blocked (or about to block) waiting for the pipe.
pub const TOOL_SLEEPERS: usize = 64;

/// Slot: seq of the last event posted (0: none yet).
pub const EV_SEQ: usize = 0;
/// Slot: bytes of that event at [`EV_DATA`].
pub const EV_LEN: usize = 4;
/// Slot: non-zero while the vCPU thread sleeps on [`BELL`].
pub const VCPU_SLEEPING: usize = 8;
/// Slot: seq of the event the reply at [`REPLY_DATA`] answers.
pub const REPLY_SEQ: usize = 64;
/// Slot: bytes of that reply.
pub const REPLY_LEN: usize = 68;
/// Slot: the reply's flags ([`REPLY_WITH_REGS`]; 0: a plain reply).
pub const REPLY_FLAGS: usize = 72;
/// [`REPLY_FLAGS`] bit: a `kvm_regs` at [`REPLY_REGS`] goes with the reply.
pub const REPLY_WITH_REGS: u32 = 1;
/// Slot: the vCPU's doorbell (a shared futex word).
pub const BELL: usize = 128;
/// Slot: the event message.
pub const EV_DATA: usize = 256;
/// Most bytes an event message may take.
pub const EV_MAX: usize = 2048;
/// Slot: the reply message.
pub const REPLY_DATA: usize = EV_DATA + EV_MAX;
/// Most bytes a reply message may take (header, vCPU header, reply and the
/// largest event-specific reply data, with room to spare).
pub const REPLY_MAX: usize = 256;

/// Slot: the `kvm_regs` that go with the reply ([`REPLY_WITH_REGS`]).
pub const REPLY_REGS: usize = REPLY_DATA + REPLY_MAX;
/// Bytes at [`REPLY_REGS`]: one `kvm_regs`.
pub const REPLY_REGS_SIZE: usize = core::mem::size_of::<crate::KvmRegs>();

const _: () = assert!(REPLY_REGS + REPLY_REGS_SIZE <= SLOT_SIZE);
const _: () = assert!(REPLY_REGS % 8 == 0);

/// Bytes of the channel file for `nr_vcpus` vCPUs.
pub const fn file_size(nr_vcpus: usize) -> usize {
    (nr_vcpus + 1) * SLOT_SIZE
}

/// Offset of vCPU `i`'s slot.
pub const fn slot_offset(i: usize) -> usize {
    (i + 1) * SLOT_SIZE
}

wire!(
    /// `UKVMI_VM_EVENT_CHANNEL` request body (ukvmi extension).
    VmEventChannel, 8, {
    /// No flag is defined: zero.
    flags: u32,
    /// Zero.
    padding: u32,
});

wire!(
    /// `UKVMI_VM_EVENT_CHANNEL` reply data. The reply carries two
    /// descriptors as `SCM_RIGHTS`: the channel file (read-write, sealed
    /// against resizing) and the read end of the wake-up pipe.
    VmEventChannelReply, 16, {
    /// Bytes of the channel file (the length to `mmap`).
    size: u64,
    /// vCPU slots.
    nr_vcpus: u32,
    /// [`VERSION`].
    version: u32,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_aligned_apart_and_areas_fit_in_a_slot() {
        let header = [HDR_MAGIC, HDR_VERSION, HDR_NR_VCPUS, HDR_FEATURES, TOOL_SLEEPERS];
        let slot = [EV_SEQ, EV_LEN, VCPU_SLEEPING, REPLY_SEQ, REPLY_LEN, REPLY_FLAGS, BELL];
        for w in header.iter().chain(&slot) {
            assert_eq!(w % 4, 0, "offset {w} aligned");
            assert!(w + 4 <= EV_DATA, "offset {w} before the data areas");
        }
        // The VMM's words and the tool's live on separate cache lines.
        assert_eq!((EV_SEQ / 64, REPLY_SEQ / 64, REPLY_FLAGS / 64, BELL / 64), (0, 1, 1, 2));
        assert_eq!((REPLY_REGS, REPLY_REGS_SIZE), (2560, 144));
        assert_eq!(file_size(2), 3 * 4096);
        assert_eq!(slot_offset(1), 2 * 4096);
        assert_eq!(core::mem::size_of::<VmEventChannel>(), 8);
        assert_eq!(core::mem::size_of::<VmEventChannelReply>(), 16);
    }
}
