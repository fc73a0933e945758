//! The PVH boot protocol: the kernel's segments, the command line, the
//! initrd, the boot GDT and `hvm_start_info` with its memory map and module
//! list, all written into guest RAM.

use super::e820::e820;
use super::LinuxEntry;
use crate::error::LinuxError;
use crate::memory::GuestRam;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{elf::Elf, load_cmdline, KernelLoader, PvhBootCapability};
use std::path::Path;
use vm_memory::GuestAddress;

/// The boot GDT: null, flat 32-bit code (0x08), flat data (0x10), a
/// 32-bit TSS (0x18).
pub(crate) const GDT_ADDR: u64 = 0x500;
pub(crate) const GDT: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];
/// `hvm_start_info` (RBX at entry), its module list, the memory map.
pub(crate) const START_INFO_ADDR: u64 = 0x6000;
pub(crate) const MODLIST_ADDR: u64 = 0x6040;
pub(crate) const MEMMAP_ADDR: u64 = 0x7000;
/// The command line (up to `cmdline::MAX_LEN` bytes).
pub(crate) const CMDLINE_ADDR: u64 = 0x2_0000;
/// `XEN_HVM_START_MAGIC_VALUE`.
pub(crate) const START_MAGIC: u32 = 0x336e_c578;

// The structures do not overlap each other or the GDT (start_info is 56
// bytes, one module entry 32, the memory map at most 4 entries of 24).
const _: () = assert!(
    GDT_ADDR + 8 * GDT.len() as u64 <= START_INFO_ADDR
        && START_INFO_ADDR + 56 <= MODLIST_ADDR
        && MODLIST_ADDR + 32 <= MEMMAP_ADDR
        && MEMMAP_ADDR + 4 * 24 <= CMDLINE_ADDR
);

/// The `hvm_start_info` for a memory map of `memmap_entries` and
/// `nr_modules` modules at the addresses above.
pub(crate) fn start_info(memmap_entries: u32, nr_modules: u32) -> hvm_start_info {
    hvm_start_info {
        magic: START_MAGIC,
        version: 1,
        nr_modules,
        modlist_paddr: if nr_modules > 0 { MODLIST_ADDR } else { 0 },
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries,
        ..Default::default()
    }
}

/// Where an initrd of `size` bytes goes: page-aligned at the top of the
/// first `ram_top` bytes, above `kernel_end`; `None` if it does not fit.
pub(crate) fn initrd_addr(size: u64, kernel_end: u64, ram_top: u64) -> Option<u64> {
    let addr = ram_top.checked_sub(size)? & !0xfff;
    let floor = kernel_end.checked_add(0xfff)? & !0xfff;
    (addr >= floor).then_some(addr)
}

/// Writes `cmdline` (NUL-terminated) at [`CMDLINE_ADDR`].
pub(crate) fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<(), LinuxError> {
    if cmdline.len() >= super::cmdline::MAX_LEN {
        return Err(LinuxError::CmdlineTooLong { len: cmdline.len(), max: super::cmdline::MAX_LEN - 1 });
    }
    let line = Cmdline::try_from(cmdline, super::cmdline::MAX_LEN).map_err(LinuxError::Cmdline)?;
    load_cmdline(ram.mem(), GuestAddress(CMDLINE_ADDR), &line).map_err(LinuxError::Load)
}

/// Reads the initrd at `path` into RAM, page-aligned at the top of RAM
/// (below `limit`) above `kernel_end`; returns its gpa and size.
pub(crate) fn place_initrd(ram: &GuestRam, path: &Path, kernel_end: u64, limit: u64) -> Result<(u64, u64), LinuxError> {
    let bytes = std::fs::read(path).map_err(LinuxError::ReadInitrd)?;
    let size = bytes.len() as u64;
    let top = ram.size().min(limit);
    let addr = initrd_addr(size, kernel_end, top).ok_or(LinuxError::InitrdDoesNotFit { size, kernel_end, ram: top })?;
    ram.write(addr, &bytes).map_err(|_| LinuxError::BootParams)?;
    Ok((addr, size))
}

/// Loads a PVH kernel, its initrd and command line into `ram` and writes
/// the boot structures; returns where vCPU 0 starts.
pub(crate) fn load(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry, LinuxError> {
    let mem = ram.mem();
    let mut file = std::fs::File::open(kernel).map_err(LinuxError::ReadKernel)?;
    let loaded = Elf::load(mem, None, &mut file, None).map_err(LinuxError::Load)?;
    let PvhBootCapability::PvhEntryPresent(GuestAddress(entry)) = loaded.pvh_boot_cap else {
        return Err(LinuxError::NoPvhEntry);
    };
    write_cmdline(ram, cmdline)?;
    for (i, e) in GDT.iter().enumerate() {
        ram.write_u64(GDT_ADDR + 8 * i as u64, *e).map_err(|_| LinuxError::BootParams)?;
    }
    let mut modules = Vec::new();
    if let Some(path) = initrd {
        let (paddr, size) = place_initrd(ram, path, loaded.kernel_end, super::LINUX_MAX_MEMORY_MIB << 20)?;
        modules.push(hvm_modlist_entry { paddr, size, ..Default::default() });
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820(ram.size())
        .into_iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    let info = start_info(memmap.len() as u32, modules.len() as u32);
    let mut params = BootParams::new(&info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|_| LinuxError::BootParams)?;
    Ok(LinuxEntry::Pvh { entry, start_info: START_INFO_ADDR })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::ByteValued;

    #[test]
    fn start_info_is_version_1_with_the_tables_addresses() {
        let s = start_info(4, 1);
        let b = s.as_slice();
        assert_eq!(b.len(), 56, "hvm_start_info is 56 bytes");
        assert_eq!(b[0..4], 0x336e_c578u32.to_le_bytes());
        assert_eq!(b[4..8], 1u32.to_le_bytes(), "version");
        assert_eq!(b[12..16], 1u32.to_le_bytes(), "nr_modules");
        assert_eq!(b[16..24], MODLIST_ADDR.to_le_bytes());
        assert_eq!(b[24..32], CMDLINE_ADDR.to_le_bytes());
        assert_eq!(b[32..40], 0u64.to_le_bytes(), "no RSDP");
        assert_eq!(b[40..48], MEMMAP_ADDR.to_le_bytes());
        assert_eq!(b[48..52], 4u32.to_le_bytes(), "memmap entries");
        assert_eq!(start_info(4, 0).modlist_paddr, 0);
    }

    #[test]
    fn the_initrd_goes_to_the_top_of_ram_above_the_kernel() {
        assert_eq!(initrd_addr(0x1800, 0x200_0000, 0x1000_0000), Some(0x1000_0000 - 0x2000));
        assert_eq!(initrd_addr(0x1000, 0x200_0000, 0x1000_0000), Some(0x0fff_f000));
        // Right above the kernel's end (rounded up to a page) still fits.
        assert_eq!(initrd_addr(0x1000, 0x0fff_e001, 0x1000_0000), Some(0x0fff_f000));
        assert_eq!(initrd_addr(0x1001, 0x0fff_e001, 0x1000_0000), None);
        assert_eq!(initrd_addr(u64::MAX, 0, 0x1000_0000), None);
    }

    #[test]
    fn the_boot_gdt_is_flat_32_bit() {
        // Code: base 0, limit 0xfffff pages, D=1 L=0, type 0xb (exec/read, accessed).
        assert_eq!((GDT[1] >> 40) & 0xff, 0x9b);
        assert_eq!((GDT[1] >> 52) & 0xf, 0xc);
        assert_eq!((GDT[2] >> 40) & 0xff, 0x93);
        assert_eq!((GDT[3] >> 40) & 0xff, 0x8b, "busy 32-bit TSS");
    }
}

#[cfg(test)]
mod load_tests {
    use super::*;
    use crate::linux::tests::{elf, file};

    fn read<const N: usize>(ram: &GuestRam, gpa: u64) -> [u8; N] {
        let mut b = [0u8; N];
        ram.read(gpa, &mut b).unwrap();
        b
    }

    #[test]
    fn a_pvh_kernel_is_loaded_with_its_boot_structures() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let kernel = file("k", &elf(0x20_0000, true));
        let initrd = file("i", &[0x5a; 5000]);
        let boot = load(&ram, &kernel, Some(&initrd), "console=ttyS0 rdinit=/init").unwrap();
        assert_eq!(boot, LinuxEntry::Pvh { entry: 0x20_0004, start_info: START_INFO_ADDR });
        assert_eq!(read::<16>(&ram, 0x20_0000), [0xf4; 16], "the segment");
        assert_eq!(&read::<27>(&ram, CMDLINE_ADDR), b"console=ttyS0 rdinit=/init\0");
        assert_eq!(read::<4>(&ram, START_INFO_ADDR), START_MAGIC.to_le_bytes());
        assert_eq!(read::<4>(&ram, START_INFO_ADDR + 12), 1u32.to_le_bytes(), "one module");
        assert_eq!(read::<4>(&ram, START_INFO_ADDR + 48), 4u32.to_le_bytes(), "four memmap entries");
        // The initrd: page-aligned at the top of RAM, described by the module list.
        let at = (8u64 << 20) - 0x2000;
        assert_eq!(read::<8>(&ram, MODLIST_ADDR), at.to_le_bytes());
        assert_eq!(read::<8>(&ram, MODLIST_ADDR + 8), 5000u64.to_le_bytes());
        assert_eq!(read::<4>(&ram, at), [0x5a; 4]);
        // The last memmap entry is RAM from 1 MiB to the end.
        let last = MEMMAP_ADDR + 3 * 24;
        assert_eq!(read::<8>(&ram, last), 0x10_0000u64.to_le_bytes());
        assert_eq!(read::<8>(&ram, last + 8), ((8u64 << 20) - 0x10_0000).to_le_bytes());
        assert_eq!(read::<4>(&ram, last + 16), 1u32.to_le_bytes());
        assert_eq!(read::<8>(&ram, GDT_ADDR + 8), GDT[1].to_le_bytes());
        for p in [kernel, initrd] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn what_cannot_boot_says_why() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let plain = file("noentry", &elf(0x20_0000, false));
        assert!(matches!(load(&ram, &plain, None, ""), Err(LinuxError::NoPvhEntry)));
        let kernel = file("k2", &elf(0x20_0000, true));
        let long = "x".repeat(2048);
        assert!(matches!(load(&ram, &kernel, None, &long), Err(LinuxError::CmdlineTooLong { len: 2048, max: 2047 })));
        let big = file("big", &vec![0u8; 3 << 20]);
        let e = load(&ram, &kernel, Some(&big), "").unwrap_err();
        assert!(matches!(e, LinuxError::InitrdDoesNotFit { size: 0x30_0000, .. }), "{e}");
        let outside = file("outside", &elf(0x80_0000, true));
        assert!(matches!(load(&ram, &outside, None, ""), Err(LinuxError::Load(_))));
        for p in [plain, kernel, big, outside] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
