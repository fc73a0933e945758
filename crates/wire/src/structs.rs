//! Byte-exact KVMI v12 structures for x86_64 (spec §2, §3, §5, §8, §9).
//!
//! Every struct is `#[repr(C)]` with explicit padding and derives `zerocopy`'s
//! traits, so it converts to and from bytes without `unsafe`. Each size is
//! asserted at compile time; field offsets are tested against the spec's tables
//! in `tests/layout.rs`.

/// Declares a byte-exact wire struct (also used by the v7 module).
macro_rules! wire {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        impl Default for $name {
            fn default() -> Self {
                <Self as zerocopy::FromZeros>::new_zeroed()
            }
        }
    };
}

pub(crate) use wire;

// ---------------------------------------------------------------- framing

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

// ---------------------------------------------------------- x86 KVM state

wire!(
    /// `struct kvm_regs` (x86_64 KVM UAPI).
    KvmRegs, 144, {
    /// RAX.
    rax: u64, /// RBX.
    rbx: u64, /// RCX.
    rcx: u64, /// RDX.
    rdx: u64, /// RSI.
    rsi: u64, /// RDI.
    rdi: u64, /// RSP.
    rsp: u64, /// RBP.
    rbp: u64, /// R8.
    r8: u64, /// R9.
    r9: u64, /// R10.
    r10: u64, /// R11.
    r11: u64, /// R12.
    r12: u64, /// R13.
    r13: u64, /// R14.
    r14: u64, /// R15.
    r15: u64, /// RIP.
    rip: u64, /// RFLAGS.
    rflags: u64,
});

wire!(
    /// `struct kvm_segment`.
    KvmSegment, 24, {
    /// Base address.
    base: u64, /// Limit.
    limit: u32, /// Selector.
    selector: u16, /// Type.
    type_: u8, /// Present.
    present: u8, /// DPL.
    dpl: u8, /// D/B.
    db: u8, /// S.
    s: u8, /// L.
    l: u8, /// G.
    g: u8, /// AVL.
    avl: u8, /// Unusable.
    unusable: u8, /// Padding.
    padding: u8,
});

wire!(
    /// `struct kvm_dtable`.
    KvmDtable, 16, {
    /// Base address.
    base: u64, /// Limit.
    limit: u16, /// Padding.
    padding: [u16; 3],
});

wire!(
    /// `struct kvm_sregs` (x86_64 KVM UAPI).
    KvmSregs, 312, {
    /// CS.
    cs: KvmSegment, /// DS.
    ds: KvmSegment, /// ES.
    es: KvmSegment, /// FS.
    fs: KvmSegment, /// GS.
    gs: KvmSegment, /// SS.
    ss: KvmSegment, /// TR.
    tr: KvmSegment, /// LDT.
    ldt: KvmSegment, /// GDT.
    gdt: KvmDtable, /// IDT.
    idt: KvmDtable, /// CR0.
    cr0: u64, /// CR2.
    cr2: u64, /// CR3.
    cr3: u64, /// CR4.
    cr4: u64, /// CR8.
    cr8: u64, /// EFER.
    efer: u64, /// APIC base.
    apic_base: u64, /// Pending interrupt bitmap.
    interrupt_bitmap: [u64; 4],
});

wire!(
    /// `struct kvm_msr_entry`.
    KvmMsrEntry, 16, {
    /// MSR index.
    index: u32, /// Reserved.
    reserved: u32, /// Value.
    data: u64,
});

wire!(
    /// Header of `struct kvm_msrs`; `nmsrs` entries follow.
    KvmMsrsHdr, 8, {
    /// Number of entries.
    nmsrs: u32, /// Padding.
    pad: u32,
});

/// `struct kvm_xsave`: the 4096-byte legacy XSAVE area.
#[derive(
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
)]
#[repr(C)]
pub struct KvmXsave {
    /// The raw area.
    pub region: [u32; 1024],
}
const _: () = assert!(core::mem::size_of::<KvmXsave>() == 4096);
impl Default for KvmXsave {
    fn default() -> Self {
        <Self as zerocopy::FromZeros>::new_zeroed()
    }
}

// ------------------------------------------------------------ vCPU events

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

// --------------------------------------------------------------- commands

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
