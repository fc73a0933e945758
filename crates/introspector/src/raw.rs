//! The raw protocol API (cargo feature `raw`): bytes and frames the typed
//! API would never send, for conformance tests. Everything here can break
//! the connection's framing or leave a vCPU waiting; tools do not need it.

use ukvmi_wire::{frame, msg, read_zext, tail, ErrorCode, MsgHdr};

use crate::error::{Error, Result};
use crate::events;
use crate::transport::Message;
use crate::vm::{command_name, Vm};

/// A reply as received, for the raw request paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawReply {
    /// The message header (id and seq echoed from the request).
    pub hdr: MsgHdr,
    /// `kvmi_error_code.err` (zero-extended if the body was shorter than 8).
    pub err: i32,
    /// The bytes after `kvmi_error_code`.
    pub data: Vec<u8>,
}

impl RawReply {
    fn from_msg(m: &Message) -> RawReply {
        let ec: ErrorCode = read_zext(&m.body);
        RawReply { hdr: m.hdr, err: ec.err, data: tail(&m.body, 8).to_vec() }
    }
}

/// The raw protocol view of a [`Vm`]; see [`Vm::raw`].
#[derive(Debug, Clone, Copy)]
pub struct RawVm<'a> {
    vm: &'a Vm,
}

impl Vm {
    /// The raw protocol API of this connection (feature `raw`).
    pub fn raw(&self) -> RawVm<'_> {
        RawVm { vm: self }
    }
}

impl RawVm<'_> {
    /// Takes a fresh sequence number (a counter per `Vm`, from 1).
    pub fn next_seq(&self) -> u32 {
        self.vm.mux.next_seq()
    }

    /// Sends a message with `id` and `body` (framed, fresh seq) and waits for
    /// the reply with the same seq and id, whatever its `err`.
    pub fn request_raw(&self, id: u16, body: &[u8]) -> Result<RawReply> {
        let seq = self.next_seq();
        let bytes = frame(id, seq, &[body]).map_err(|e| Error::Refused(e.to_string()))?;
        self.request_bytes(id, seq, &bytes)
    }

    /// Writes `bytes` as they are (the caller framed them, possibly wrongly)
    /// and waits for a reply carrying `id` and `seq`.
    pub fn request_bytes(&self, id: u16, seq: u32, bytes: &[u8]) -> Result<RawReply> {
        let m = self.vm.mux.roundtrip(id, seq, command_name(id), bytes)?;
        Ok(RawReply::from_msg(&m))
    }

    /// Writes `bytes` as they are, with no framing and no reply expected.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<()> {
        self.vm.mux.write(bytes)
    }

    /// Sends an event reply built from raw parts, unchecked: vCPU header
    /// (`vcpu`), `kvmi_vcpu_event_reply` (`action`, `event`), then `payload`.
    pub fn reply_raw(&self, seq: u32, vcpu: u16, action: u8, event: u8, payload: &[u8]) -> Result<()> {
        let body = events::build_reply_body(vcpu, action, event, payload);
        let bytes = frame(msg::VCPU_EVENT, seq, &[&body]).map_err(|e| Error::Refused(e.to_string()))?;
        self.vm.mux.write(&bytes)
    }

    /// Replies that matched no pending request (taken: the store is emptied).
    /// At most the last 64 are kept; see [`RawVm::unmatched_count`].
    pub fn take_unmatched(&self) -> Vec<RawReply> {
        self.vm.mux.take_unmatched().iter().map(RawReply::from_msg).collect()
    }

    /// How many replies matched no pending request since the connection began.
    pub fn unmatched_count(&self) -> u64 {
        self.vm.mux.unmatched_count()
    }
}
