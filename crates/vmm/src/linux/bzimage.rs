//! The 64-bit Linux boot protocol for a bzImage: the protected-mode kernel
//! at 1 MiB, the zero page (`boot_params`) with the file's setup header,
//! the command line, initrd and e820 map, and identity page tables for
//! entering `startup_64` in long mode.
//!
//! On a host that emulates ring 0 (PVM) the in-guest decompressor runs in
//! KVM's emulator: slow, but it works; a vmlinux through PVH is faster.

use super::e820::e820;
use super::pvh::{place_initrd, write_cmdline, CMDLINE_ADDR};
use super::LinuxEntry;
use crate::error::LinuxError;
use crate::memory::GuestRam;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use std::path::Path;
use vm_memory::GuestAddress;

/// The zero page.
pub(crate) const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The boot GDT: null, null, 64-bit code (`__BOOT_CS` 0x10), data
/// (`__BOOT_DS` 0x18), a 64-bit TSS (0x20, two slots).
pub(crate) const GDT_ADDR: u64 = 0x500;
pub(crate) const GDT: [u64; 6] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067, 0];
/// Identity page tables: PML4, PDPT, then four PDs of 2 MiB pages (4 GiB).
pub(crate) const PML4_ADDR: u64 = 0x9000;
// The zero page, the tables (6 pages) and the command line do not overlap.
const _: () = assert!(ZERO_PAGE_ADDR + 0x1000 <= PML4_ADDR && PML4_ADDR + 6 * 0x1000 <= CMDLINE_ADDR);

/// The protected-mode kernel's load address (`code32_start`).
const KERNEL_ADDR: u64 = 0x10_0000;
/// `CAN_USE_HEAP` in `loadflags`.
const CAN_USE_HEAP: u8 = 0x80;
/// Where the decompressed kernel goes unless relocated (16 MiB on x86-64).
const LOAD_PHYSICAL_ADDR: u64 = 0x100_0000;

/// Whether a bzImage of boot protocol `version` with `xloadflags` can be
/// booted here: protocol 2.06 or later (for `cmdline_size`) with the 64-bit
/// entry. Detection ([`kernel_kind`](crate::kernel_kind), from
/// `ukvmi_kimage`'s header) and loading (from linux-loader's) both ask it.
pub(crate) fn bootable(version: u16, xloadflags: u16) -> bool {
    version >= 0x206 && xloadflags & ukvmi_kimage::BzImage::XLF_KERNEL_64 != 0
}

/// The zero page for the file's setup header `hdr`, a command line of
/// `cmdline_len` bytes at [`CMDLINE_ADDR`], an initrd (gpa, size) and
/// `ram` bytes of RAM.
pub(crate) fn zero_page(hdr: setup_header, cmdline_len: usize, initrd: Option<(u64, u64)>, ram: u64) -> boot_params {
    let mut p = boot_params { hdr, ..Default::default() };
    p.hdr.type_of_loader = 0xff;
    p.hdr.loadflags |= CAN_USE_HEAP;
    p.hdr.heap_end_ptr = 0xfe00;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    let map = e820(ram);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    p.e820_entries = map.len().min(p.e820_table.len()) as u8;
    p
}

/// Writes the GDT and the identity page tables (4 GiB in 2 MiB pages).
pub(crate) fn write_tables(ram: &GuestRam) -> Result<(), LinuxError> {
    let w = |gpa: u64, v: u64| ram.write_u64(gpa, v).map_err(|_| LinuxError::BootParams);
    for (i, e) in GDT.iter().enumerate() {
        w(GDT_ADDR + 8 * i as u64, *e)?;
    }
    let pdpt = PML4_ADDR + 0x1000;
    w(PML4_ADDR, pdpt | 3)?;
    for g in 0..4u64 {
        let pd = pdpt + 0x1000 * (1 + g);
        w(pdpt + 8 * g, pd | 3)?;
        for i in 0..512u64 {
            w(pd + 8 * i, ((g << 30) + (i << 21)) | 0x83)?;
        }
    }
    Ok(())
}

/// Loads a bzImage, its initrd and command line and writes the zero page
/// and the tables; returns where vCPU 0 starts.
pub(crate) fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry, LinuxError> {
    let mut file = std::fs::File::open(kernel).map_err(LinuxError::ReadKernel)?;
    let loaded =
        BzImage::load(ram.mem(), None, &mut file, Some(GuestAddress(KERNEL_ADDR))).map_err(LinuxError::Load)?;
    let hdr = loaded.setup_header.ok_or(LinuxError::NotBootable)?;
    if !bootable(hdr.version, hdr.xloadflags) {
        return Err(LinuxError::NotBootable);
    }
    write_cmdline(ram, cmdline)?;
    write_tables(ram)?;
    // The decompressed kernel lands at 16 MiB and needs `init_size` there.
    let end = LOAD_PHYSICAL_ADDR.saturating_add(u64::from(hdr.init_size)).max(loaded.kernel_end);
    let limit = u64::from(hdr.initrd_addr_max).saturating_add(1).min(super::LINUX_MAX_MEMORY_MIB << 20);
    let rd = initrd.map(|p| place_initrd(ram, p, end, limit)).transpose()?;
    let params = zero_page(hdr, cmdline.len(), rd, ram.size());
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)), ram.mem())
        .map_err(|_| LinuxError::BootParams)?;
    Ok(LinuxEntry::Boot64 { entry: loaded.kernel_load.0 + 0x200, zero_page: ZERO_PAGE_ADDR })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_page_has_the_loader_cmdline_initrd_and_map() {
        let hdr = setup_header { version: 0x20f, loadflags: 1, xloadflags: 1, ..Default::default() };
        assert!(bootable(hdr.version, hdr.xloadflags));
        let p = zero_page(hdr, 26, Some((0xfff_e000, 0x1800)), 256 << 20);
        let (ty, lf, heap, cl, cs) =
            (p.hdr.type_of_loader, p.hdr.loadflags, p.hdr.heap_end_ptr, p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((ty, lf, heap, cl, cs), (0xff, 0x81, 0xfe00, 0x2_0000, 27));
        let (ri, rs) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size);
        assert_eq!((ri, rs), (0xfff_e000, 0x1800));
        assert_eq!(p.e820_entries, 4);
        let last = p.e820_table[3];
        let (a, s, t) = (last.addr, last.size, last.r#type);
        assert_eq!((a, s, t), (0x10_0000, (256 << 20) - 0x10_0000, 1));
        assert!(!bootable(0x205, 1), "too old");
        assert!(!bootable(0x20f, 0), "no 64-bit entry");
    }

    #[test]
    fn the_tables_identity_map_4_gib() {
        let ram = GuestRam::new(1 << 20).unwrap();
        write_tables(&ram).unwrap();
        let q = |gpa: u64| {
            let mut b = [0u8; 8];
            ram.read(gpa, &mut b).unwrap();
            u64::from_le_bytes(b)
        };
        let pdpt = q(PML4_ADDR) & !0xfff;
        let pd3 = q(pdpt + 24) & !0xfff;
        assert_eq!(q(pd3 + 8 * 511), ((3 << 30) + (511 << 21)) | 0x83);
        assert_eq!(q(q(pdpt) & !0xfff), 0x83);
        assert_eq!(q(GDT_ADDR + 0x10), GDT[2]);
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;
    use crate::linux::tests::file;

    /// A minimal bzImage: one setup sector, the header at 0x1f1, 2 KiB of
    /// "protected-mode kernel" (0xf4s) after it.
    fn bz(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut b = vec![0u8; 1024];
        b[0x1f1] = 1; // setup_sects
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x211] = 1; // LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        b.extend([0xf4; 2048]);
        b
    }

    #[test]
    fn a_bzimage_is_told_apart_and_loaded_with_its_zero_page() {
        let good = file("bz", &bz(0x20f, 1));
        assert_eq!(crate::kernel_kind(&good).unwrap(), crate::KernelKind::LinuxBzImage { version: 0x20f });
        let old = file("bz-old", &bz(0x205, 1));
        assert_eq!(crate::kernel_kind(&old).unwrap(), crate::KernelKind::Other);
        let ram = GuestRam::new(32 << 20).unwrap();
        let initrd = file("bz-initrd", &[7; 100]);
        let entry = crate::linux::load(&ram, &good, Some(&initrd), "console=ttyS0").unwrap();
        assert_eq!(entry, LinuxEntry::Boot64 { entry: 0x10_0200, zero_page: ZERO_PAGE_ADDR });
        let mut b = [0u8; 4];
        ram.read(0x10_0000, &mut b).unwrap();
        assert_eq!(b, [0xf4; 4], "the protected-mode kernel at 1 MiB");
        ram.read(ZERO_PAGE_ADDR + 0x202, &mut b).unwrap();
        assert_eq!(&b, b"HdrS", "the setup header in the zero page");
        let mut one = [0u8; 1];
        ram.read(ZERO_PAGE_ADDR + 0x210, &mut one).unwrap();
        assert_eq!(one[0], 0xff, "type_of_loader");
        ram.read(ZERO_PAGE_ADDR + 0x218, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), (32 << 20) - 0x1000, "ramdisk_image at the top of RAM");
        ram.read(ZERO_PAGE_ADDR + 0x1e8, &mut one).unwrap();
        assert_eq!(one[0], 4, "e820_entries");
        assert!(matches!(crate::linux::load(&ram, &old, None, ""), Err(LinuxError::NotBootable)));
        for p in [good, old, initrd] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
