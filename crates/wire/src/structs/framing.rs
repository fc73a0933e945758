//! Framing structures: the message header, the error code every reply
//! starts with, and the headers of events and vCPU commands.

wire!(
    /// `struct kvmi_msg_hdr`: precedes every message in both directions.
    MsgHdr, 8, {
    /// Message id.
    id: u16,
    /// Body bytes after this header.
    size: u16,
    /// Sequence number.
    seq: u32,
});

wire!(
    /// `struct kvmi_error_code`: starts every command reply body.
    ErrorCode, 8, {
    /// 0 or a negative `KVM_E*` code.
    err: i32,
    /// Zero.
    padding: u32,
});

wire!(
    /// `struct kvmi_vcpu_hdr`: starts every vCPU command and event reply body.
    VcpuHdr, 8, {
    /// vCPU index (0 .. online vCPUs − 1).
    vcpu: u16,
    /// Must be zero.
    padding1: u16,
    /// Must be zero.
    padding2: u32,
});

wire!(
    /// `struct kvmi_event_hdr`: starts every event body.
    EventHdr, 8, {
    /// Event id.
    event: u16,
    /// Zero.
    padding: [u16; 3],
});
