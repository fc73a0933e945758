//! Booting a Linux kernel: telling a Linux image from the guest ABI's
//! images, and what a Linux VM adds (PVH boot, the platform, its state).
//!
//! * `bzimage`: the 64-bit boot protocol for a bzImage (zero page,
//!   identity page tables).
//! * `pvh`: the PVH boot protocol (kernel, command line, initrd,
//!   `hvm_start_info` and memory map into RAM).
//! * `e820`: the memory map; `cmdline`: the command line and the PVM
//!   switches; `cpuid`: the CPUID edits; `platform`: irqchip, PIT, LAPIC.

pub(crate) mod bzimage;
pub(crate) mod cmdline;
pub(crate) mod cpuid;
pub(crate) mod e820;
pub(crate) mod platform;
pub(crate) mod pvh;

use crate::devices::PortBus;
use crate::error::ImageError;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;
use ukvmi_kimage::Kind;

/// The most guest RAM a Linux guest may have: one memslot from gpa 0 must
/// stay below the IOAPIC and LAPIC (0xfec00000, 0xfee00000).
pub const LINUX_MAX_MEMORY_MIB: u64 = 3 << 10;

/// What a kernel file is, decided from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KernelKind {
    /// A Linux ELF vmlinux with the Xen PVH entry note (type 18): built
    /// with `CONFIG_PVH`, entered at `entry` in 32-bit protected mode.
    LinuxPvh {
        /// The PVH entry point (a physical address).
        entry: u64,
    },
    /// A bzImage for the 64-bit boot protocol (`HdrS`, protocol 2.06 or
    /// later, `XLF_KERNEL_64`).
    LinuxBzImage {
        /// The boot protocol version (0x20f: 2.15).
        version: u16,
    },
    /// Anything else: a flat binary or an ELF64 of the guest ABI.
    Other,
}

/// Tells a Linux kernel from the guest ABI's images by what
/// [`ukvmi_kimage::detect`] makes of the file's bytes: a Linux ELF with a
/// PVH entry, or a bzImage the 64-bit boot protocol can boot. Anything else
/// (a Linux ELF without PVH included) is `Other`; today's loader then says
/// what is wrong with it.
pub fn kernel_kind(path: &Path) -> Result<KernelKind, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read { path: path.to_path_buf(), source })?;
    Ok(match ukvmi_kimage::detect(&bytes) {
        Kind::LinuxElf { pvh_entry: Some(entry) } => KernelKind::LinuxPvh { entry },
        Kind::BzImage(b) if bzimage::bootable(b.version, b.xloadflags) => {
            KernelKind::LinuxBzImage { version: b.version }
        }
        _ => KernelKind::Other,
    })
}

/// Where vCPU 0 of a Linux guest starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinuxEntry {
    /// PVH: 32-bit protected mode at `entry`, RBX = `start_info`.
    Pvh {
        /// The 32-bit entry point.
        entry: u64,
        /// The gpa of `hvm_start_info`.
        start_info: u64,
    },
    /// The 64-bit boot protocol (a bzImage): long mode at `entry`
    /// (`startup_64`), RSI = `zero_page`.
    Boot64 {
        /// `startup_64` of the compressed kernel.
        entry: u64,
        /// The gpa of `boot_params`.
        zero_page: u64,
    },
}

/// Loads a Linux kernel (an ELF vmlinux with PVH, or a bzImage) with its
/// initrd and command line; returns where vCPU 0 starts.
pub(crate) fn load(
    ram: &crate::memory::GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<LinuxEntry, crate::error::LinuxError> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(kernel).map_err(crate::error::LinuxError::ReadKernel)?;
    let is_elf = std::io::Read::read_exact(&mut f, &mut magic).is_ok() && magic == *b"\x7fELF";
    if is_elf {
        pvh::load(ram, kernel, initrd, cmdline)
    } else {
        bzimage::load(ram, kernel, initrd, cmdline)
    }
}

/// What a Linux VM shares between its threads.
pub(crate) struct LinuxState {
    /// Where vCPU 0 starts.
    pub boot: LinuxEntry,
    /// The port devices.
    pub bus: Mutex<PortBus>,
    /// RIPs where an instruction was completed for the emulator (each
    /// logged once).
    pub completed: Mutex<HashSet<u64>>,
    /// RIPs of the int3s that reached the VMM (each logged once), and how
    /// many did in all.
    pub int3_sites: Mutex<HashSet<u64>>,
    pub int3s: std::sync::atomic::AtomicU64,
    /// Instructions completed for the emulator, in all.
    pub completions: std::sync::atomic::AtomicU64,
    /// Kernel symbols by address, for messages.
    pub symbols: Vec<(u64, String)>,
}

impl LinuxState {
    /// One line for the end of the run: how often the VMM stepped in.
    pub fn summary(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        format!(
            "Linux guest: {} int3s reached the VMM at {} sites (the BREAKPOINT path; the kernel's own went back to it \
             as #BP), {} instructions completed for KVM's emulator at {} sites",
            self.int3s.load(Relaxed),
            crate::vm::lock(&self.int3_sites).len(),
            self.completions.load(Relaxed),
            crate::vm::lock(&self.completed).len()
        )
    }

    /// `addr` as `name+0xoff`, if a symbol at or below it is known.
    pub fn symbol(&self, addr: u64) -> Option<String> {
        symbol(&self.symbols, addr)
    }
}

/// The symbol of `sorted` (by address) at or below `addr`, as `name+0xoff`.
pub(crate) fn symbol(sorted: &[(u64, String)], addr: u64) -> Option<String> {
    let i = sorted.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
    let (a, name) = sorted.get(i)?;
    Some(format!("{name}+{:#x}", addr - a))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ukvmi_kimage::testing;

    /// A minimal x86-64 ELF: one PT_LOAD of 16 bytes (0xf4s) at `paddr` and,
    /// with `pvh`, the notes of a PVH vmlinux (`Linux`, then `Xen` of type 18
    /// with the entry `paddr + 4`).
    pub(crate) fn elf(paddr: u64, pvh: bool) -> Vec<u8> {
        let notes = if pvh { testing::pvh_notes(paddr as u32 + 4) } else { Vec::new() };
        testing::elf(paddr, &[0xf4; 16], &notes)
    }

    pub(crate) fn file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("ukvmi-linux-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn addresses_are_named_by_the_symbol_below_them() {
        let syms = vec![(0x1000, "a".to_string()), (0x1100, "b".to_string())];
        assert_eq!(symbol(&syms, 0x1000).as_deref(), Some("a+0x0"));
        assert_eq!(symbol(&syms, 0x10ff).as_deref(), Some("a+0xff"));
        assert_eq!(symbol(&syms, 0x2000).as_deref(), Some("b+0xf00"));
        assert_eq!(symbol(&syms, 0xfff), None);
        assert_eq!(symbol(&[], 0x1000), None);
    }

    #[test]
    fn only_an_elf_with_the_pvh_note_is_linux() {
        let pvh = file("pvh", &elf(0x20_0000, true));
        assert_eq!(kernel_kind(&pvh).unwrap(), KernelKind::LinuxPvh { entry: 0x20_0004 });
        let plain = file("plain", &elf(0x20_0000, false));
        assert_eq!(kernel_kind(&plain).unwrap(), KernelKind::Other);
        let no_pvh = file("no-pvh", &testing::elf(0x20_0000, &[0xf4; 16], &testing::note(b"Linux", 1, b"6.1\0")));
        assert_eq!(kernel_kind(&no_pvh).unwrap(), KernelKind::Other, "a vmlinux without PVH is not booted");
        let flat = file("flat", &[0xf4, 0xeb, 0xfe]);
        assert_eq!(kernel_kind(&flat).unwrap(), KernelKind::Other);
        let mut cut = elf(0x20_0000, true);
        cut.truncate(100);
        let cut = file("cut", &cut);
        assert_eq!(kernel_kind(&cut).unwrap(), KernelKind::Other, "a cut ELF does not parse: not Linux");
        assert!(kernel_kind(std::path::Path::new("/nonexistent/ukvmi-vmlinux")).is_err());
        for p in [pvh, plain, no_pvh, flat, cut] {
            std::fs::remove_file(p).unwrap();
        }
    }
}
