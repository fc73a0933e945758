//! Command request and reply bodies (spec §8), VM and vCPU commands and
//! the ukvmi extensions.

use super::events::{VcpuEvent, VcpuEventReply};
use super::framing::{EventHdr, VcpuHdr};
use super::x86::{KvmMsrEntry, KvmMsrsHdr, KvmRegs, KvmSregs};

wire!(
    /// `struct kvmi_features` (x86).
    Features, 8, {
    /// 1 when the host can single-step.
    singlestep: u8, /// Zero.
    padding: [u8; 7],
});

wire!(
    /// GET_VERSION reply.
    GetVersionReply, 16, {
    /// `KVMI_VERSION`.
    version: u32, /// `KVMI_MAX_MSG_SIZE`.
    max_msg_size: u32, /// Host features.
    features: Features,
});

wire!(
    /// VM_CHECK_COMMAND and VM_CHECK_EVENT request.
    VmCheck, 8, {
    /// Command or event id.
    id: u16, /// Must be zero.
    padding1: u16, /// Must be zero.
    padding2: u32,
});

wire!(
    /// VM_GET_INFO reply.
    VmGetInfoReply, 16, {
    /// Online vCPUs.
    vcpu_count: u32, /// Zero.
    padding: [u32; 3],
});

wire!(
    /// VM_CONTROL_EVENTS and VCPU_CONTROL_EVENTS request.
    ControlEvents, 8, {
    /// Event id.
    event_id: u16, /// 0 or 1.
    enable: u8, /// Must be zero.
    padding1: u8, /// Must be zero.
    padding2: u32,
});

wire!(
    /// VM_READ_PHYSICAL request; also the head of VM_WRITE_PHYSICAL (data follows).
    VmPhysical, 16, {
    /// Guest physical address.
    gpa: u64, /// Bytes, 1..=4096, within one page.
    size: u16, /// Must be zero.
    padding1: u16, /// Must be zero.
    padding2: u32,
});

wire!(
    /// `UKVMI_VM_MAP_MEMORY` request (ukvmi extension). The body must be
    /// exactly these 8 bytes.
    VmMapMemory, 8, {
    /// `map_flags::*`: 0 for a read-only mapping, `WRITABLE` for read-write.
    flags: u32, /// Must be zero.
    padding: u32,
});

wire!(
    /// `UKVMI_VM_MAP_MEMORY` reply data (ukvmi extension). The reply message
    /// carries one file descriptor as `SCM_RIGHTS` ancillary data: guest RAM,
    /// with gpa `gpa` at file offset 0, `size` bytes long.
    VmMapMemoryReply, 24, {
    /// First guest physical address the descriptor maps (at file offset 0).
    gpa: u64,
    /// Bytes of guest RAM the descriptor maps (the length to `mmap`).
    size: u64,
    /// `map_flags::WRITABLE` when the descriptor is open read-write.
    flags: u32, /// Zero.
    padding: u32,
});

wire!(
    /// VM_PAUSE_VCPU request.
    VmPauseVcpu, 8, {
    /// vCPU index.
    vcpu: u16, /// 1: reply only after the vCPU left guest mode.
    wait: u8, /// Must be zero.
    padding1: u8, /// Must be zero.
    padding2: u32,
});

wire!(
    /// VM_CONTROL_CLEANUP request.
    VmControlCleanup, 8, {
    /// 0 or 1.
    enable: u8, /// Must be zero.
    padding: [u8; 7],
});

wire!(
    /// Head of VM_SET_PAGE_ACCESS; `count` entries follow.
    VmSetPageAccess, 8, {
    /// Number of entries.
    count: u16, /// Must be zero.
    padding1: u16, /// Must be zero.
    padding2: u32,
});

wire!(
    /// One VM_SET_PAGE_ACCESS entry.
    PageAccessEntry, 16, {
    /// Guest physical address of the page.
    gpa: u64, /// Allowed accesses (`access::*`).
    access: u8, /// Must be zero.
    padding: [u8; 7],
});

wire!(
    /// VCPU_GET_INFO reply.
    VcpuGetInfoReply, 8, {
    /// TSC frequency in Hz, 0 when unknown.
    tsc_speed: u64,
});

wire!(
    /// Head of VCPU_GET_REGISTERS; `nmsrs` u32 indices follow.
    VcpuGetRegisters, 8, {
    /// Number of MSR indices that follow.
    nmsrs: u16, /// Must be zero.
    padding1: u16, /// Must be zero.
    padding2: u32,
});

wire!(
    /// Fixed part of the VCPU_GET_REGISTERS reply; `msrs.nmsrs` entries follow.
    VcpuGetRegistersReply, 472, {
    /// Operand size in bytes.
    mode: u32, /// Zero.
    padding: u32, /// General registers.
    regs: KvmRegs, /// Special registers.
    sregs: KvmSregs, /// MSR list header.
    msrs: KvmMsrsHdr,
});

wire!(
    /// VCPU_GET_CPUID request.
    VcpuGetCpuid, 8, {
    /// Leaf.
    function: u32, /// Sub-leaf.
    index: u32,
});

wire!(
    /// VCPU_GET_CPUID reply.
    VcpuGetCpuidReply, 16, {
    /// EAX.
    eax: u32, /// EBX.
    ebx: u32, /// ECX.
    ecx: u32, /// EDX.
    edx: u32,
});

wire!(
    /// VCPU_CONTROL_CR request.
    VcpuControlCr, 8, {
    /// 0, 3 or 4.
    cr: u8, /// 0 or 1.
    enable: u8, /// Must be zero.
    padding1: u16, /// Must be zero.
    padding2: u32,
});

wire!(
    /// VCPU_INJECT_EXCEPTION request.
    VcpuInjectException, 16, {
    /// Vector.
    nr: u8, /// Must be zero.
    padding1: u8, /// Must be zero.
    padding2: u16, /// Error code.
    error_code: u32, /// CR2 for #PF.
    address: u64,
});

wire!(
    /// VCPU_GET_XCR request.
    VcpuGetXcr, 8, {
    /// XCR index (only 0).
    xcr: u8, /// Must be zero.
    padding: [u8; 7],
});

wire!(
    /// VCPU_GET_XCR reply.
    VcpuGetXcrReply, 8, {
    /// Value.
    value: u64,
});

wire!(
    /// VCPU_GET_MTRR_TYPE request.
    VcpuGetMtrrType, 8, {
    /// Guest physical address.
    gpa: u64,
});

wire!(
    /// VCPU_GET_MTRR_TYPE reply.
    VcpuGetMtrrTypeReply, 8, {
    /// Memory type (0 UC, 1 WC, 4 WT, 5 WP, 6 WB).
    type_: u8, /// Zero.
    padding: [u8; 7],
});

wire!(
    /// VCPU_CONTROL_MSR request.
    VcpuControlMsr, 8, {
    /// 0 or 1.
    enable: u8, /// Must be zero.
    padding1: u8, /// Must be zero.
    padding2: u16, /// MSR index.
    msr: u32,
});

wire!(
    /// VCPU_CONTROL_SINGLESTEP request.
    VcpuControlSinglestep, 8, {
    /// 0 or 1.
    enable: u8, /// Must be zero.
    padding: [u8; 7],
});

wire!(
    /// VCPU_TRANSLATE_GVA request.
    VcpuTranslateGva, 8, {
    /// Guest virtual address.
    gva: u64,
});

wire!(
    /// VCPU_TRANSLATE_GVA reply.
    VcpuTranslateGvaReply, 8, {
    /// Guest physical address, all ones when unmapped.
    gpa: u64,
});

/// Size of the fixed part of a vCPU event body: event header + `kvmi_vcpu_event`.
pub const VCPU_EVENT_BODY_BASE: usize = core::mem::size_of::<EventHdr>() + core::mem::size_of::<VcpuEvent>();
const _: () = assert!(VCPU_EVENT_BODY_BASE == 552);

/// Size of the fixed part of an event reply body: vCPU header + `kvmi_vcpu_event_reply`.
pub const EVENT_REPLY_BODY_BASE: usize = core::mem::size_of::<VcpuHdr>() + core::mem::size_of::<VcpuEventReply>();
const _: () = assert!(EVENT_REPLY_BODY_BASE == 16);

/// Size of a GET_REGISTERS reply carrying `n` MSRs: 472 + 16·n.
pub const fn get_registers_reply_size(n: usize) -> usize {
    core::mem::size_of::<VcpuGetRegistersReply>() + n * core::mem::size_of::<KvmMsrEntry>()
}
