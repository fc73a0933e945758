//! What the endpoint needs from a VM, as small capability traits.
//!
//! The endpoint knows KVMI, not KVM. It reaches the VM only through:
//!
//! * [`VmBackend`]: shared by all threads; vCPU count and readiness, kicks,
//!   guest physical memory, what the host supports ([`HostCaps`]), and the
//!   optional VM-wide page-access control.
//! * [`VcpuBackend`]: one per vCPU, used only on that vCPU's own thread while
//!   it is out of guest mode; registers and MSRs, plus optional features
//!   reached through `support_*()` methods that return `None` when the host
//!   lacks them. `None` becomes `-KVM_EOPNOTSUPP` on the wire.
//!
//! What the host supports is also declared up front in [`HostCaps`], so that
//! `KVMI_VM_CHECK_COMMAND` and `KVMI_VM_CHECK_EVENT` can tell the tool before
//! it tries.

use thiserror::Error;
use ukvmi_wire::{event, msg, KvmErrno, KvmRegs, KvmSregs, KvmXsave};

/// Why a backend operation failed. Each maps to one `KVM_E*` reply code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    /// The host cannot do this (`-KVM_EOPNOTSUPP`).
    #[error("not supported by this host")]
    NotSupported,
    /// Nothing there: unbacked page, missing CPUID leaf (`-KVM_ENOENT`).
    #[error("no such page or entry")]
    NotFound,
    /// The backend rejected the argument (`-KVM_EINVAL`).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The resource is in use (`-KVM_EBUSY`).
    #[error("busy: {0}")]
    Busy(String),
    /// The device manager forbids it, e.g. an MSR filtered by userspace (`-KVM_EPERM`).
    #[error("not permitted: {0}")]
    Denied(String),
    /// Anything else (`-KVM_EINVAL`, the kernel's catch-all).
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    /// The error code the tool receives.
    pub fn errno(&self) -> KvmErrno {
        match self {
            BackendError::NotSupported => KvmErrno::Eopnotsupp,
            BackendError::NotFound => KvmErrno::Enoent,
            BackendError::Invalid(_) | BackendError::Failed(_) => KvmErrno::Einval,
            BackendError::Busy(_) => KvmErrno::Ebusy,
            BackendError::Denied(_) => KvmErrno::Eperm,
        }
    }
}

/// Result of a backend operation.
pub type BackendResult<T> = Result<T, BackendError>;

/// A set of message or event ids below 32, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdSet(u32);

impl IdSet {
    /// The empty set.
    pub const EMPTY: IdSet = IdSet(0);
    /// Every id below 32.
    pub const FULL: IdSet = IdSet(u32::MAX);

    /// Whether `id` is in the set.
    pub const fn contains(self, id: u16) -> bool {
        id < 32 && self.0 & (1 << id) != 0
    }

    /// The set with `id` added (ids ≥ 32 are ignored).
    #[must_use]
    pub const fn with(self, id: u16) -> IdSet {
        if id < 32 {
            IdSet(self.0 | (1 << id))
        } else {
            self
        }
    }

    /// The set with `id` removed.
    #[must_use]
    pub const fn without(self, id: u16) -> IdSet {
        if id < 32 {
            IdSet(self.0 & !(1 << id))
        } else {
            self
        }
    }

    /// The raw mask.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// A set from a raw mask.
    pub const fn from_bits(bits: u32) -> IdSet {
        IdSet(bits)
    }
}

/// What the host can do, decided once (by probing) when the VM starts; a
/// VMM on KVM builds it from the [`HostFeatures`](crate::HostFeatures) it probed.
///
/// Commands and events not in these sets answer `-KVM_EOPNOTSUPP` from
/// `KVMI_VM_CHECK_COMMAND` / `KVMI_VM_CHECK_EVENT`, and when used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// Commands the host supports.
    pub commands: IdSet,
    /// Events the host can deliver.
    pub events: IdSet,
    /// Whether single-stepping works (`features.singlestep` of GET_VERSION).
    pub singlestep: bool,
}

impl HostCaps {
    /// Everything KVMI v12 defines.
    pub fn full() -> HostCaps {
        let mut commands = IdSet::EMPTY;
        for id in msg::VM_COMMANDS.iter().chain(msg::VCPU_COMMANDS.iter()) {
            commands = commands.with(*id);
        }
        let mut events = IdSet::EMPTY.with(event::UNHOOK);
        for id in event::VCPU_EVENTS {
            events = events.with(id);
        }
        HostCaps { commands, events, singlestep: true }
    }

    /// Without the command `id`.
    #[must_use]
    pub fn without_command(mut self, id: u16) -> HostCaps {
        self.commands = self.commands.without(id);
        if id == msg::VCPU_CONTROL_SINGLESTEP {
            self.singlestep = false;
        }
        self
    }

    /// Without the event `id`.
    #[must_use]
    pub fn without_event(mut self, id: u16) -> HostCaps {
        self.events = self.events.without(id);
        self
    }
}

/// The VM as the receiving thread sees it. Shared by every thread.
pub trait VmBackend: Send + Sync + 'static {
    /// Number of online vCPUs; vCPU indices are `0..vcpu_count()`.
    fn vcpu_count(&self) -> u16;

    /// Whether the guest has started this vCPU (its MP state is not
    /// "uninitialised"). A vCPU that is not ready answers `-KVM_EAGAIN`.
    fn vcpu_ready(&self, vcpu: u16) -> bool;

    /// Makes the vCPU leave guest mode soon and call
    /// [`crate::VcpuPort::handle_requests`]. With `wait`, returns only when the
    /// vCPU is out of guest mode (at once if it is not running guest code).
    fn kick(&self, vcpu: u16, wait: bool);

    /// Reads guest physical memory. `gpa..gpa+buf.len()` never crosses a page.
    fn read_physical(&self, gpa: u64, buf: &mut [u8]) -> BackendResult<()>;

    /// Writes guest physical memory. `gpa..gpa+data.len()` never crosses a page.
    fn write_physical(&self, gpa: u64, data: &[u8]) -> BackendResult<()>;

    /// End of the highest guest RAM range (the handshake's `max_gpa`; v7's
    /// GET_MAX_GFN is this in pages, rounded up).
    fn max_gpa(&self) -> u64;

    /// What this host supports.
    fn caps(&self) -> HostCaps;

    /// Page-access restrictions, where the host can enforce them.
    fn support_page_access(&self) -> Option<&dyn PageAccessOps> {
        None
    }

    /// Guest RAM as a shareable file (`UKVMI_VM_MAP_MEMORY`), where the VM
    /// keeps it in one. `None` (the default): the command is reported and
    /// answered as `-KVM_EOPNOTSUPP`.
    fn support_shared_memory(&self) -> Option<&dyn SharedMemoryOps> {
        None
    }
}

/// Guest RAM held in one file (a memfd) that can be handed to the tool.
///
/// Contract, checked by the endpoint before it sends anything:
/// * the file is sealed with at least `F_SEAL_SHRINK | F_SEAL_GROW`, so a
///   tool holding a writable descriptor cannot resize it (and SIGBUS the
///   VMM); sealing `F_SEAL_SEAL` too stops a tool from adding seals such as
///   `F_SEAL_FUTURE_WRITE`;
/// * it is at least [`SharedMemoryOps::ram_size`] bytes long.
///
/// The endpoint never hands out this descriptor itself: a read-only request
/// gets a fresh read-only open of the file (`/proc/self/fd/N`), a writable
/// one a duplicate. So that a tool of another uid cannot in turn reopen its
/// read-only descriptor read-write through its own `/proc/self/fd`, the file
/// should be mode 0400 (owner read only; the VMM's own descriptor and
/// mappings keep working).
pub trait SharedMemoryOps: Send + Sync {
    /// The guest-RAM file; file offset 0 holds gpa [`SharedMemoryOps::ram_gpa`].
    fn ram_fd(&self) -> std::os::fd::BorrowedFd<'_>;
    /// First gpa the file maps (0 for RAM from address 0).
    fn ram_gpa(&self) -> u64 {
        0
    }
    /// Bytes of guest RAM in the file.
    fn ram_size(&self) -> u64;
}

/// VM-wide page-access restrictions (`KVMI_VM_SET_PAGE_ACCESS`).
pub trait PageAccessOps: Send + Sync {
    /// Sets the allowed accesses (`access::*` bits) of the 4 KiB page at
    /// `gpa`; `access::RWX` forgets the page. `NotFound`/`Invalid` when the
    /// page is not guest memory.
    fn set_page_access(&self, gpa: u64, access: u8) -> BackendResult<()>;

    /// Removes every restriction (unhook).
    fn clear_page_access(&self);
}

/// An exception as injected into the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Exception {
    /// Vector.
    pub nr: u8,
    /// Error code (0 for vectors that have none).
    pub error_code: u32,
    /// CR2 for a page fault.
    pub address: u64,
}

impl Exception {
    /// Whether `nr` is an exception a tool may inject: a vector below 32
    /// that the architecture defines as an exception (not the NMI, 2, nor
    /// the reserved 9, 15, 22–27 and 31). Others would be refused by KVM
    /// after the command had been answered, and no TRAP would follow.
    pub const fn is_injectable(nr: u8) -> bool {
        nr < 32 && !matches!(nr, 2 | 9 | 15 | 22..=27 | 31)
    }

    /// Whether vector `nr` pushes an error code.
    pub const fn has_error_code(nr: u8) -> bool {
        matches!(nr, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
    }
}

/// One vCPU, driven only on its own thread while out of guest mode.
pub trait VcpuBackend {
    /// General registers.
    fn regs(&mut self) -> BackendResult<KvmRegs>;
    /// Sets the general registers.
    fn set_regs(&mut self, regs: &KvmRegs) -> BackendResult<()>;
    /// Special registers.
    fn sregs(&mut self) -> BackendResult<KvmSregs>;
    /// Reads MSRs: `out[i]` = value of `indices[i]`. Any unreadable MSR fails
    /// the whole call.
    fn msrs(&mut self, indices: &[u32], out: &mut [u64]) -> BackendResult<()>;
    /// Virtual TSC frequency in kHz, when the host can tell.
    fn tsc_khz(&mut self) -> Option<u32> {
        None
    }

    /// CPUID as the guest sees it.
    fn support_cpuid(&mut self) -> Option<&mut dyn CpuidOps> {
        None
    }
    /// XCR0 and the XSAVE area.
    fn support_xstate(&mut self) -> Option<&mut dyn XstateOps> {
        None
    }
    /// Memory types from the guest's MTRRs.
    fn support_mtrr(&mut self) -> Option<&mut dyn MtrrOps> {
        None
    }
    /// Guest virtual → physical translation.
    fn support_translate(&mut self) -> Option<&mut dyn TranslateOps> {
        None
    }
    /// Interceptions that vCPU events need (e.g. #BP for BREAKPOINT).
    fn support_intercepts(&mut self) -> Option<&mut dyn InterceptOps> {
        None
    }
    /// Single-stepping.
    fn support_singlestep(&mut self) -> Option<&mut dyn SinglestepOps> {
        None
    }
    /// Exception injection.
    fn support_inject(&mut self) -> Option<&mut dyn InjectOps> {
        None
    }
}

/// CPUID as the guest sees it.
pub trait CpuidOps {
    /// Leaf `function`, sub-leaf `index` as `[eax, ebx, ecx, edx]`; `None` if absent.
    fn cpuid(&mut self, function: u32, index: u32) -> BackendResult<Option<[u32; 4]>>;
}

/// XCR0 and the XSAVE area.
pub trait XstateOps {
    /// XCR0.
    fn xcr0(&mut self) -> BackendResult<u64>;
    /// The 4096-byte XSAVE area.
    fn xsave(&mut self) -> BackendResult<Box<KvmXsave>>;
    /// Loads an XSAVE area; `Invalid` if the host rejects it.
    fn set_xsave(&mut self, area: &KvmXsave) -> BackendResult<()>;
}

/// Memory types from the guest's MTRRs.
pub trait MtrrOps {
    /// x86 memory type of the page holding `gpa`.
    fn mtrr_type(&mut self, gpa: u64) -> BackendResult<u8>;
}

/// Guest virtual → physical translation with the vCPU's current paging.
pub trait TranslateOps {
    /// The gpa, or `None` when `gva` is not mapped.
    fn translate_gva(&mut self, gva: u64) -> BackendResult<Option<u64>>;
}

/// Interceptions behind vCPU events. The endpoint calls these when the tool
/// enables or disables something, and undoes its own calls on unhook when
/// the cleanup flag is set.
pub trait InterceptOps {
    /// A vCPU event was enabled or disabled (BREAKPOINT needs #BP exits, ...).
    fn set_event_intercept(&mut self, event: u16, enable: bool) -> BackendResult<()>;
    /// Write interception of CR0, CR3 or CR4.
    fn set_cr_intercept(&mut self, cr: u8, enable: bool) -> BackendResult<()>;
    /// Write interception of one MSR.
    fn set_msr_intercept(&mut self, msr: u32, enable: bool) -> BackendResult<()>;
}

/// Single-stepping.
pub trait SinglestepOps {
    /// Turns single-stepping on or off.
    fn set_singlestep(&mut self, enable: bool) -> BackendResult<()>;
}

/// Exception injection.
pub trait InjectOps {
    /// Queues `exc` for the next guest entry and returns what will really be
    /// injected there (another pending exception may win).
    fn inject(&mut self, exc: Exception) -> BackendResult<Exception>;
}
