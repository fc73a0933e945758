//! x86 KVM state as KVMI carries it: `kvm_regs`, `kvm_sregs`, segments,
//! descriptor tables, MSR entries, the XSAVE area.

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
