//! The VMM's error types: every failure says what was being done, and none
//! names a command-line flag (a front end words its own options).

use std::path::PathBuf;
use thiserror::Error;
use ukvmi_endpoint::PermissionError;

/// The fewest MiB of guest RAM a VM may have (the guest ABI's tables and
/// stacks live in the first 4 MiB).
pub const MIN_MEMORY_MIB: u64 = 4;

/// The most guest RAM a VM may have, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// A VMM failure.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` is missing or unusable.
    #[error("cannot use /dev/kvm: {0} (is KVM available and are you allowed to open /dev/kvm?)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// An OS call failed.
    #[error("{what} failed: {source}")]
    Os {
        /// The operation.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A VM setting this VMM or host cannot honour.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The guest image could not be loaded.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Setting the VM up failed in the VMM itself.
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// A VM setting this VMM or this host cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than the guest ABI has stacks for.
    #[error("{requested} vCPUs are more than the guest ABI's {max} (one 16 KiB stack each below 512 KiB)")]
    AbiVcpuLimit {
        /// vCPUs asked for.
        requested: u16,
        /// The guest ABI's maximum.
        max: u16,
    },
    /// More vCPUs than this host's KVM allows (`KVM_CAP_MAX_VCPUS`).
    #[error("{requested} vCPUs exceed this host's limit of {max}")]
    HostVcpuLimit {
        /// vCPUs asked for.
        requested: u16,
        /// The host's maximum.
        max: usize,
    },
    /// Less guest RAM than [`MIN_MEMORY_MIB`].
    #[error("{mib} MiB of guest RAM is less than the {min} MiB a VM needs")]
    TooLittleMemory {
        /// MiB asked for.
        mib: u64,
        /// The minimum.
        min: u64,
    },
    /// More guest RAM than [`MAX_MEMORY_MIB`].
    #[error("{mib} MiB of guest RAM is more than the {max} MiB (1 TiB) ukvmi supports")]
    TooMuchMemory {
        /// MiB asked for.
        mib: u64,
        /// The maximum.
        max: u64,
    },
    /// A command id the endpoint's permissions refuse to allow.
    #[error("command {id} cannot be allowed: {source}")]
    AllowCommand {
        /// The command id.
        id: u16,
        /// Why.
        source: PermissionError,
    },
    /// A Linux guest with more than one vCPU: there is no MP table or ACPI
    /// MADT to tell the kernel about the others.
    #[error(
        "a Linux guest runs on one vCPU ({requested} asked for): the VMM gives it no MP table or ACPI to find more"
    )]
    LinuxVcpus {
        /// vCPUs asked for.
        requested: u16,
    },
    /// A Linux guest with more RAM than fits below the IOAPIC/LAPIC.
    #[error("{mib} MiB of guest RAM is more than the {max} MiB a Linux guest may have (RAM is one memslot from 0, below the IOAPIC and LAPIC)")]
    LinuxMemory {
        /// MiB asked for.
        mib: u64,
        /// The maximum.
        max: u64,
    },
    /// An event id the endpoint's permissions refuse to allow.
    #[error("event {id} cannot be allowed: {source}")]
    AllowEvent {
        /// The event id.
        id: u16,
        /// Why.
        source: PermissionError,
    },
}

/// The guest image could not be put into RAM.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ImageError {
    /// A built-in guest larger than guest RAM.
    #[error("guest {name} does not fit in RAM")]
    BuiltinTooLarge {
        /// The guest's name.
        name: &'static str,
    },
    /// The kernel file could not be read.
    #[error("cannot read kernel {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A Linux kernel could not be booted.
    #[error("Linux kernel {}: {source}", path.display())]
    Linux {
        /// The kernel file.
        path: PathBuf,
        /// Why.
        source: LinuxError,
    },
    /// The kernel file is not a loadable image.
    #[error("kernel {}: {source}", path.display())]
    Kernel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: LoadError,
    },
}

/// Why a Linux kernel could not be booted.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum LinuxError {
    /// The kernel file could not be read.
    #[error("cannot read it: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// linux-loader refused the kernel (or its command line).
    #[error("{0}")]
    Load(#[source] linux_loader::loader::Error),
    /// The ELF has no PVH entry note.
    #[error("this vmlinux has no PVH entry (build it with CONFIG_PVH)")]
    NoPvhEntry,
    /// A bzImage too old for the 64-bit boot protocol (before 2.06, or
    /// without `XLF_KERNEL_64`).
    #[error("this bzImage cannot be booted through the 64-bit boot protocol (protocol 2.06 or later with a 64-bit entry is needed)")]
    NotBootable,
    /// The command line is longer than the kernel takes.
    #[error("the kernel command line has {len} bytes, more than the {max} Linux takes")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// The command line has characters the kernel cannot take.
    #[error("bad kernel command line: {0}")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The initrd file could not be read.
    #[error("cannot read the initrd: {0}")]
    ReadInitrd(#[source] std::io::Error),
    /// The initrd does not fit between the kernel and the top of RAM.
    #[error(
        "an initrd of {size} bytes does not fit in guest RAM between the kernel's end ({kernel_end:#x}) and {ram:#x}"
    )]
    InitrdDoesNotFit {
        /// The initrd's size.
        size: u64,
        /// The first byte after the kernel.
        kernel_end: u64,
        /// The top of RAM it may use.
        ram: u64,
    },
    /// The boot structures do not fit in guest RAM.
    #[error("the PVH boot structures do not fit in guest RAM")]
    BootParams,
}

/// What is wrong with a kernel image (an ELF64 file or a flat binary).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum LoadError {
    /// An empty file.
    #[error("the file is empty")]
    Empty,
    /// A flat binary larger than RAM above its load address.
    #[error("{len} bytes do not fit in guest RAM at {at:#x}")]
    FlatTooLarge {
        /// The file's length.
        len: usize,
        /// The load address.
        at: u64,
    },
    /// ELF, but not little-endian ELF64.
    #[error("only little-endian ELF64 is supported")]
    NotElf64,
    /// ELF64, but not for x86-64.
    #[error("not an x86-64 ELF")]
    NotX86_64,
    /// The ELF or a program header is cut short or inconsistent.
    #[error("truncated or malformed ELF header")]
    Malformed,
    /// A segment's file data lies past the end of the file.
    #[error("segment data past the end of the file")]
    SegmentPastEnd,
    /// A segment's data does not fit in guest RAM.
    #[error("segment at {paddr:#x} does not fit in guest RAM")]
    SegmentTooLarge {
        /// The segment's physical address.
        paddr: u64,
    },
    /// A segment's zero-filled tail does not fit in guest RAM.
    #[error("bss at {paddr:#x} does not fit in guest RAM")]
    BssTooLarge {
        /// The segment's physical address.
        paddr: u64,
    },
    /// No `PT_LOAD` segment.
    #[error("no loadable segment")]
    NoLoadableSegment,
}

/// Setting the VM up failed in the VMM itself (not the host, not the
/// settings).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SetupError {
    /// Guest RAM larger than this process can map.
    #[error("memory size {bytes} too large")]
    RamTooLarge {
        /// Bytes asked for.
        bytes: u64,
    },
    /// vm-memory could not map guest RAM.
    #[error("mapping guest RAM: {0}")]
    MapRam(#[source] vm_memory::mmap::FromRangesError),
    /// Guest RAM has no host address.
    #[error("guest RAM has no host mapping: {0}")]
    NoHostMapping(#[source] vm_memory::GuestMemoryError),
    /// Guest RAM is too small for the guest ABI's GDT and page tables.
    #[error("RAM too small for page tables")]
    TablesDontFit,
    /// The endpoint has no port for a vCPU the VM has.
    #[error("vCPU port")]
    NoVcpuPort,
    /// Probing read-only memslots left guest RAM without its memslot.
    #[error("probing read-only memslots left guest RAM without its memslot")]
    SlotZeroLost,
}

impl Error {
    pub(crate) fn kvm(what: &'static str, source: kvm_ioctls::Error) -> Error {
        Error::Kvm { what, source }
    }

    pub(crate) fn os(what: &'static str, source: std::io::Error) -> Error {
        Error::Os { what, source }
    }
}

/// Result of a VMM operation.
pub type Result<T> = std::result::Result<T, Error>;
