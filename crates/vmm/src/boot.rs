//! The guest ABI's starting state: the GDT and identity page tables in RAM,
//! and each vCPU's 64-bit ring-0 registers.

use crate::error::{Error, SetupError};
use crate::exit::FailureCause;
use crate::memory::GuestRam;
use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use ukvmi_guest_abi::layout;

/// `IA32_MTRR_DEF_TYPE`.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// The GDT: null, 64-bit code (0x08), data (0x10), a TSS descriptor (0x18).
const GDT: [u64; 5] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8900_0000_0067, 0];

/// Writes the GDT and identity page tables of the guest ABI.
pub(crate) fn write_tables(ram: &GuestRam) -> crate::error::Result<()> {
    let fail = |_| Error::Setup(SetupError::TablesDontFit);
    for (i, e) in GDT.iter().enumerate() {
        ram.write_u64(layout::GDT_ADDR + 8 * i as u64, *e).map_err(fail)?;
    }
    let pdpt = layout::PML4_ADDR + 0x1000;
    let pd = layout::PML4_ADDR + 0x2000;
    ram.write_u64(layout::PML4_ADDR, pdpt | 3).map_err(fail)?;
    ram.write_u64(pdpt, pd | 3).map_err(fail)?;
    for i in 0..512u64 {
        ram.write_u64(pd + 8 * i, (i << 21) | 0x83).map_err(fail)?;
    }
    // The ABI's alias: GVA 1 GiB (PDPT[1]) → one 2 MiB page at ALIAS_GPA.
    ram.write_u64(pdpt + 8, layout::ALIAS_PD_ADDR | 3).map_err(fail)?;
    ram.write_u64(layout::ALIAS_PD_ADDR, layout::ALIAS_GPA | 0x83).map_err(fail)?;
    Ok(())
}

/// Puts the guest ABI's special registers into `s`: flat segments, the
/// GDT of [`write_tables`], no IDT, paging on with the identity tables,
/// long mode.
pub(crate) fn long_mode_sregs(s: &mut kvm_sregs) {
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x08, 11, 1, 0);
    let d = seg(0x10, 3, 0, 1);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
    s.gdt.base = layout::GDT_ADDR;
    s.gdt.limit = 39;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x8005_0033;
    s.cr3 = layout::PML4_ADDR;
    s.cr4 = 0x20;
    s.efer = 0x500;
}

/// The general registers vCPU `index` of `count` starts with: RIP at
/// `entry`, RDI = index, RSI = count, RDX = the TSC frequency in kHz (0 if
/// KVM cannot tell, so a guest without a timer can turn rdtsc into time),
/// and its own stack.
pub(crate) fn boot_regs(entry: u64, index: u16, count: u16, tsc_khz: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: u64::from(index),
        rsi: u64::from(count),
        rdx: tsc_khz,
        rsp: layout::STACK_TOP - u64::from(index) * layout::STACK_SIZE,
        rflags: 2,
        ..Default::default()
    }
}

/// Enters the guest ABI's starting state on `fd` (vCPU `index` of `count`):
/// 64-bit ring 0, identity paging, MTRRs enabled with default write-back.
pub(crate) fn enter_long_mode(fd: &VcpuFd, entry: u64, index: u16, count: u16) -> Result<(), FailureCause> {
    let boot = |what: &'static str| move |source| FailureCause::Boot { what, source };
    let mut s = fd.get_sregs().map_err(boot("KVM_GET_SREGS"))?;
    long_mode_sregs(&mut s);
    fd.set_sregs(&s).map_err(boot("KVM_SET_SREGS"))?;
    let tsc_khz = fd.get_tsc_khz().map_or(0, u64::from);
    fd.set_regs(&boot_regs(entry, index, count, tsc_khz)).map_err(boot("KVM_SET_REGS"))?;
    // As firmware would: MTRRs enabled, default write-back. (A one-entry
    // list is always within KVM_MAX_MSR_ENTRIES; E2BIG says what it would be.)
    let msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: 0xc06, ..Default::default() }])
        .map_err(|_| FailureCause::Boot { what: "KVM_SET_MSRS", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
    fd.set_msrs(&msrs).map_err(boot("KVM_SET_MSRS"))?;
    Ok(())
}

/// Puts the PVH entry state into `s`: 32-bit protected mode, paging off,
/// flat segments of the boot GDT (`linux::pvh::GDT`), no IDT.
pub(crate) fn pvh_sregs(s: &mut kvm_sregs) {
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = seg(0x08, 11);
    let d = seg(0x10, 3);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
    s.tr = kvm_segment { limit: 0x67, selector: 0x18, type_: 11, present: 1, s: 0, db: 0, g: 0, ..seg(0x18, 11) };
    s.gdt.base = crate::linux::pvh::GDT_ADDR;
    s.gdt.limit = (crate::linux::pvh::GDT.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x11; // PE | ET
    s.cr3 = 0;
    s.cr4 = 0;
    s.efer = 0;
}

/// Puts the 64-bit boot protocol's entry state into `s`: long mode with
/// the identity tables and GDT of `linux::bzimage` (`__BOOT_CS` 0x10,
/// `__BOOT_DS` 0x18).
pub(crate) fn boot64_sregs(s: &mut kvm_sregs) {
    long_mode_sregs(s);
    s.cs.selector = 0x10;
    for d in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        d.selector = 0x18;
    }
    s.tr = kvm_segment { base: 0, limit: 0x67, selector: 0x20, type_: 11, present: 1, ..Default::default() };
    s.gdt.base = crate::linux::bzimage::GDT_ADDR;
    s.gdt.limit = (crate::linux::bzimage::GDT.len() * 8 - 1) as u16;
    s.cr3 = crate::linux::bzimage::PML4_ADDR;
}

/// Enters a Linux kernel on `fd`: PVH (32-bit protected mode at the entry,
/// RBX = `hvm_start_info`) or the 64-bit boot protocol (long mode at
/// `startup_64`, RSI = the zero page); MTRRs as [`enter_long_mode`] sets
/// them, and the x87/SSE control words of a reset.
pub(crate) fn enter_linux(fd: &VcpuFd, how: crate::linux::LinuxEntry) -> Result<(), FailureCause> {
    use crate::linux::LinuxEntry;
    let boot = |what: &'static str| move |source| FailureCause::Boot { what, source };
    let mut s = fd.get_sregs().map_err(boot("KVM_GET_SREGS"))?;
    let regs = match how {
        LinuxEntry::Pvh { entry, start_info } => {
            pvh_sregs(&mut s);
            kvm_regs { rip: entry, rbx: start_info, rflags: 2, ..Default::default() }
        }
        LinuxEntry::Boot64 { entry, zero_page } => {
            boot64_sregs(&mut s);
            kvm_regs { rip: entry, rsi: zero_page, rflags: 2, ..Default::default() }
        }
    };
    fd.set_sregs(&s).map_err(boot("KVM_SET_SREGS"))?;
    fd.set_regs(&regs).map_err(boot("KVM_SET_REGS"))?;
    let fpu = kvm_bindings::kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fd.set_fpu(&fpu).map_err(boot("KVM_SET_FPU"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, data: 0xc06, ..Default::default() }])
        .map_err(|_| FailureCause::Boot { what: "KVM_SET_MSRS", source: kvm_ioctls::Error::new(libc::E2BIG) })?;
    fd.set_msrs(&msrs).map_err(boot("KVM_SET_MSRS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_map_the_first_gib_and_the_alias() {
        let ram = GuestRam::new(4 << 20).unwrap();
        write_tables(&ram).unwrap();
        let q = |gpa: u64| {
            let mut b = [0u8; 8];
            ram.read(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        for (i, e) in GDT.iter().enumerate() {
            assert_eq!(q(layout::GDT_ADDR + 8 * i as u64), *e);
        }
        let pdpt = q(layout::PML4_ADDR) & !0xfff;
        assert_eq!(q(layout::PML4_ADDR) & 3, 3);
        let pd = q(pdpt) & !0xfff;
        // 2 MiB pages, identity: PD[i] maps i * 2 MiB, present, writable, large.
        assert_eq!(q(pd), 0x83);
        assert_eq!(q(pd + 8 * 511), (511 << 21) | 0x83);
        assert_eq!(q(pdpt + 8), layout::ALIAS_PD_ADDR | 3);
        assert_eq!(q(layout::ALIAS_PD_ADDR), layout::ALIAS_GPA | 0x83);
    }

    #[test]
    fn tables_refuse_ram_too_small_for_them() {
        let ram = GuestRam::new(4096).unwrap();
        let e = write_tables(&ram).unwrap_err();
        assert_eq!(e.to_string(), "RAM too small for page tables");
    }

    #[test]
    fn every_vcpu_gets_its_own_stack_and_its_index() {
        let r0 = boot_regs(0x10_0000, 0, 4, 2_000_000);
        let r3 = boot_regs(0x10_0000, 3, 4, 2_000_000);
        assert_eq!((r0.rip, r0.rdi, r0.rsi, r0.rdx, r0.rflags), (0x10_0000, 0, 4, 2_000_000, 2));
        assert_eq!(r0.rsp, layout::STACK_TOP);
        assert_eq!(r3.rdi, 3);
        assert_eq!(r0.rsp - r3.rsp, 3 * layout::STACK_SIZE);
    }

    #[test]
    fn pvh_sregs_are_32_bit_protected_mode_without_paging() {
        let mut s = kvm_sregs::default();
        pvh_sregs(&mut s);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db, s.cs.type_), (0x08, 0, 1, 11));
        assert_eq!((s.ds.selector, s.ss.selector, s.ss.db), (0x10, 0x10, 1));
        assert_eq!((s.tr.selector, s.tr.type_, s.tr.s), (0x18, 11, 0));
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x11, 0, 0, 0));
        assert_eq!((s.gdt.base, s.gdt.limit), (0x500, 31));
    }

    #[test]
    fn boot64_sregs_use_the_boot_protocols_selectors() {
        let mut s = kvm_sregs::default();
        boot64_sregs(&mut s);
        assert_eq!((s.cs.selector, s.cs.l, s.ds.selector, s.ss.selector, s.tr.selector), (0x10, 1, 0x18, 0x18, 0x20));
        assert_eq!((s.cr3, s.efer & 0x500, s.gdt.limit), (0x9000, 0x500, 47));
    }

    #[test]
    fn sregs_are_64_bit_ring_0_with_paging() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.dpl, s.cs.db), (0x08, 1, 0, 0));
        assert_eq!((s.ss.selector, s.ds.selector, s.ds.db), (0x10, 0x10, 1));
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_ne!(s.cr0 & (1 << 31), 0, "paging");
        assert_ne!(s.cr4 & (1 << 5), 0, "PAE");
        assert_eq!(s.efer & 0x500, 0x500, "LME and LMA");
        assert_eq!((s.gdt.base, s.gdt.limit), (layout::GDT_ADDR, (GDT.len() * 8 - 1) as u16));
    }
}
