//! vCPU event structures: `kvmi_vcpu_event` with its architecture part,
//! the per-event payloads and the event reply.

use super::x86::{KvmRegs, KvmSregs};

wire!(
    /// The nine MSRs every vCPU event carries, in wire order.
    EventMsrs, 72, {
    /// `MSR_IA32_SYSENTER_CS`.
    sysenter_cs: u64, /// `MSR_IA32_SYSENTER_ESP`.
    sysenter_esp: u64, /// `MSR_IA32_SYSENTER_EIP`.
    sysenter_eip: u64, /// `MSR_EFER`.
    efer: u64, /// `MSR_STAR`.
    star: u64, /// `MSR_LSTAR`.
    lstar: u64, /// `MSR_CSTAR`.
    cstar: u64, /// `MSR_IA32_CR_PAT`.
    pat: u64, /// `MSR_KERNEL_GS_BASE`.
    shadow_gs: u64,
});

impl EventMsrs {
    /// The MSR indices of the fields, in wire order.
    pub const INDICES: [u32; 9] = [
        0x174,       // SYSENTER_CS
        0x175,       // SYSENTER_ESP
        0x176,       // SYSENTER_EIP
        0xc000_0080, // EFER
        0xc000_0081, // STAR
        0xc000_0082, // LSTAR
        0xc000_0083, // CSTAR
        0x277,       // PAT
        0xc000_0102, // KERNEL_GS_BASE
    ];

    /// Builds the block from values given in [`EventMsrs::INDICES`] order.
    pub fn from_values(v: [u64; 9]) -> Self {
        let [sysenter_cs, sysenter_esp, sysenter_eip, efer, star, lstar, cstar, pat, shadow_gs] = v;
        EventMsrs { sysenter_cs, sysenter_esp, sysenter_eip, efer, star, lstar, cstar, pat, shadow_gs }
    }
}

wire!(
    /// `struct kvmi_vcpu_event_arch` (x86).
    VcpuEventArch, 536, {
    /// Operand size in bytes: 2, 4 or 8.
    mode: u8, /// Not cleared by the kernel; ignore.
    padding: [u8; 7], /// General registers.
    regs: KvmRegs, /// Special registers.
    sregs: KvmSregs, /// Selected MSRs.
    msrs: EventMsrs,
});

wire!(
    /// `struct kvmi_vcpu_event`: follows the event header in every vCPU event.
    VcpuEvent, 544, {
    /// Size of this structure as the sender knows it (544 in v12).
    size: u16, /// vCPU index.
    vcpu: u16, /// Not cleared by the kernel; ignore.
    padding: u32, /// Architectural state.
    arch: VcpuEventArch,
});

wire!(
    /// `struct kvmi_vcpu_event_reply`: follows the vCPU header in every event reply.
    VcpuEventReply, 8, {
    /// Action (`Action`).
    action: u8, /// Event id (not checked).
    event: u8, /// Must be zero.
    padding1: u16, /// Must be zero.
    padding2: u32,
});

wire!(
    /// BREAKPOINT payload.
    EventBreakpoint, 16, {
    /// Translation of CS.base + RIP.
    gpa: u64, /// Instruction length.
    insn_len: u8, /// Zero.
    padding: [u8; 7],
});

wire!(
    /// CR payload.
    EventCr, 24, {
    /// Control register number (0, 3, 4).
    cr: u8, /// Zero.
    padding: [u8; 7], /// Current value.
    old_value: u64, /// Value the guest wants to write.
    new_value: u64,
});

wire!(
    /// CR reply payload.
    EventCrReply, 8, {
    /// Value to write.
    new_val: u64,
});

wire!(
    /// TRAP payload.
    EventTrap, 16, {
    /// Vector.
    nr: u8, /// Zero.
    padding1: u8, /// Zero.
    padding2: u16, /// Error code.
    error_code: u32, /// CR2 for #PF.
    address: u64,
});

wire!(
    /// XSETBV payload.
    EventXsetbv, 24, {
    /// XCR index.
    xcr: u8, /// Zero.
    padding: [u8; 7], /// Previous value.
    old_value: u64, /// New value.
    new_value: u64,
});

wire!(
    /// DESCRIPTOR payload.
    EventDescriptor, 8, {
    /// `desc::*`.
    descriptor: u8, /// 1 for a load (LIDT...), 0 for a store (SIDT...).
    write: u8, /// Zero.
    padding: [u8; 6],
});

wire!(
    /// MSR payload.
    EventMsr, 24, {
    /// MSR index.
    msr: u32, /// Zero.
    padding: u32, /// Current value.
    old_value: u64, /// Value the guest wants to write.
    new_value: u64,
});

wire!(
    /// MSR reply payload.
    EventMsrReply, 8, {
    /// Value to write.
    new_val: u64,
});

wire!(
    /// PF payload.
    EventPf, 24, {
    /// Guest virtual address, all ones if unknown.
    gva: u64, /// Guest physical address.
    gpa: u64, /// The attempted access (`access::*`).
    access: u8, /// Zero.
    padding1: u8, /// Zero.
    padding2: u16, /// Zero.
    padding3: u32,
});

wire!(
    /// SINGLESTEP payload.
    EventSinglestep, 8, {
    /// 1 when another exit interrupted the step.
    failed: u8, /// Zero.
    padding: [u8; 7],
});
