//! Booting a Linux kernel: telling a Linux image from the guest ABI's
//! images, and what a Linux VM adds (PVH boot, the platform, its state).
//!
//! * `pvh`: the PVH boot protocol (kernel, command line, initrd,
//!   `hvm_start_info` and memory map into RAM).
//! * `e820`: the memory map; `cmdline`: the command line and the PVM
//!   switches; `cpuid`: the CPUID edits; `platform`: irqchip, PIT, LAPIC.

pub(crate) mod cmdline;
pub(crate) mod cpuid;
pub(crate) mod e820;
pub(crate) mod platform;
pub(crate) mod pvh;

use crate::devices::PortBus;
use crate::error::ImageError;
use linux_loader::loader::{elf::Elf, KernelLoader, PvhBootCapability};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The most guest RAM a Linux guest may have: one memslot from gpa 0 must
/// stay below the IOAPIC and LAPIC (0xfec00000, 0xfee00000).
pub const LINUX_MAX_MEMORY_MIB: u64 = 3 << 10;

/// What a kernel file is, decided from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelKind {
    /// An ELF with the Xen PVH entry note (type 18): a Linux vmlinux built
    /// with `CONFIG_PVH`, entered at `entry` in 32-bit protected mode.
    LinuxPvh {
        /// The PVH entry point (a physical address).
        entry: u64,
    },
    /// Anything else: a flat binary or an ELF64 of the guest ABI.
    Other,
}

/// Tells a Linux kernel from the guest ABI's images: linux-loader loads the
/// ELF into a scratch, sparsely backed guest memory (nothing else reads
/// the PVH note) and reports the note. A file linux-loader cannot load is
/// `Other`; today's loader then says what is wrong with it.
pub fn kernel_kind(path: &Path) -> Result<KernelKind, ImageError> {
    let read = |source| ImageError::Read { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let mut magic = [0u8; 4];
    if std::io::Read::read_exact(&mut file, &mut magic).is_err() || magic != *b"\x7fELF" {
        return Ok(KernelKind::Other);
    }
    // 4 GiB, MAP_NORESERVE: only the pages the kernel's segments land on
    // are ever touched (a PVH kernel lives below 4 GiB: its entry is 32-bit).
    let Ok(scratch) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 32)]) else {
        return Ok(KernelKind::Other);
    };
    Ok(match Elf::load(&scratch, None, &mut file, None) {
        Ok(r) => match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(GuestAddress(entry)) => KernelKind::LinuxPvh { entry },
            _ => KernelKind::Other,
        },
        Err(_) => KernelKind::Other,
    })
}

/// Where vCPU 0 of a Linux guest starts (PVH).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PvhEntry {
    /// The 32-bit entry point.
    pub entry: u64,
    /// The gpa of `hvm_start_info` (RBX at entry).
    pub start_info: u64,
}

/// What a Linux VM shares between its threads.
pub(crate) struct LinuxState {
    /// Where vCPU 0 starts.
    pub boot: PvhEntry,
    /// The port devices.
    pub bus: Mutex<PortBus>,
    /// RIPs where an instruction was completed for the emulator (each
    /// logged once).
    pub completed: Mutex<HashSet<u64>>,
}
