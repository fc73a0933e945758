//! How a VM ends ([`Exit`]), and the typed reasons behind a crash
//! ([`Crash`]) or a failure ([`Failure`]). Each `Display` is the one line a
//! front end prints.

use std::fmt;
use ukvmi_endpoint::BackendError;

/// How the VM ended.
///
/// Not `#[non_exhaustive]`: a VM ends in exactly these ways, and front ends
/// are meant to handle each; what may grow are the reasons inside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest wrote its status to the power-off port.
    PowerOff(u8),
    /// Stopped from outside (a signal).
    Stopped,
    /// The guest reset the machine (a Linux guest: i8042 `0xfe` or the
    /// 0xcf9 reset control; `reboot`, or `panic=-1` after a panic).
    Reset,
    /// An event reply asked for CRASH.
    Crashed(Crash),
    /// The guest or the VMM failed.
    Failed(Failure),
}

/// The introspector answered CRASH to an event of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crash {
    /// The vCPU whose event it was.
    pub vcpu: u16,
    /// The event.
    pub event: CrashEvent,
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the introspector answered CRASH to {} on vCPU {}", self.event, self.vcpu)
    }
}

/// The event the introspector answered CRASH to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrashEvent {
    /// An event raised while the vCPU ran its KVMI jobs (e.g. PAUSE), by id.
    Event(u16),
    /// An int3 at `rip` (BREAKPOINT).
    Breakpoint {
        /// Where the int3 is.
        rip: u64,
    },
    /// A single step (SINGLESTEP).
    Singlestep,
    /// The hypercall doorbell (HYPERCALL).
    Hypercall,
    /// A guest write to a watched MSR (MSR).
    MsrWrite {
        /// The MSR.
        msr: u32,
    },
    /// An access to a restricted page (PF).
    Pf {
        /// What the guest tried.
        access: PfAccess,
        /// The page's guest-physical address.
        gpa: u64,
    },
}

impl fmt::Display for CrashEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrashEvent::Event(id) => f.write_str(ukvmi_wire::event::name(*id).unwrap_or("an event")),
            CrashEvent::Breakpoint { rip } => write!(f, "a breakpoint at {rip:#x}"),
            CrashEvent::Singlestep => f.write_str("a single step"),
            CrashEvent::Hypercall => f.write_str("a hypercall"),
            CrashEvent::MsrWrite { msr } => write!(f, "an MSR {msr:#x} write"),
            CrashEvent::Pf { access, gpa } => write!(f, "a PF event ({access} at gpa {gpa:#x})"),
        }
    }
}

/// The access a PF event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PfAccess {
    /// A read.
    Read,
    /// A write.
    Write,
    /// An instruction fetch.
    Fetch,
}

impl fmt::Display for PfAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PfAccess::Read => "read",
            PfAccess::Write => "write",
            PfAccess::Fetch => "fetch",
        })
    }
}

/// A vCPU stopped the VM because it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The vCPU.
    pub vcpu: u16,
    /// What failed.
    pub cause: FailureCause,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {}: {}", self.vcpu, self.cause)
    }
}

/// What failed on a vCPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FailureCause {
    /// Entering the guest ABI's starting state failed.
    #[error("{what} failed: {source}")]
    Boot {
        /// The ioctl.
        what: &'static str,
        /// Its errno.
        source: kvm_ioctls::Error,
    },
    /// The guest stopped in a way the VMM cannot continue from; where it was.
    #[error("{why} at rip {rip:#x} (code bytes {code:02x?})")]
    Fatal {
        /// What happened.
        why: FatalExit,
        /// The guest's RIP then (0 if unreadable).
        rip: u64,
        /// The 8 bytes at that address as a gpa (0 where unreadable).
        code: [u8; 8],
    },
    /// A debug exit that is neither a single step nor an int3.
    #[error("unexpected debug exit, exception {exception} at {pc:#x}")]
    UnexpectedDebug {
        /// The exception vector.
        exception: u32,
        /// Where.
        pc: u64,
    },
    /// Giving the guest back its own #DB failed.
    #[error("re-injecting #DB: {0}")]
    ReinjectDb(kvm_ioctls::Error),
    /// Delivering #BP for an int3 nobody intercepted failed.
    #[error("delivering #BP at {rip:#x}: {source}")]
    DeliverBp {
        /// Where the int3 is.
        rip: u64,
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// Ending the silent steps after single-stepping failed.
    #[error("ending the steps after single-stepping: {0}")]
    DrainSteps(kvm_ioctls::Error),
    /// `KVM_SET_GUEST_DEBUG` failed.
    #[error("KVM_SET_GUEST_DEBUG: {0}")]
    GuestDebug(kvm_ioctls::Error),
    /// Mapping a restricted page back to step over a fetch failed.
    #[error("mapping gpa {gpa:#x} back: {source}")]
    MapBack {
        /// The page.
        gpa: u64,
        /// Why.
        source: BackendError,
    },
    /// Restoring a page restriction after the step failed.
    #[error("restoring a page restriction: {0}")]
    RestoreRestriction(BackendError),
}

/// Why the guest cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FatalExit {
    /// `KVM_EXIT_SHUTDOWN`; `unmapped_table`: a page of the vCPU's own page
    /// or descriptor tables that a page restriction left without a memslot
    /// (the likely cause).
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN{})", TableNote(*unmapped_table))]
    TripleFault {
        /// The table page without a memslot, if one was found.
        unmapped_table: Option<u64>,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` that is neither a fetch fault nor an int3.
    #[error("KVM_EXIT_INTERNAL_ERROR (suberror {suberror})")]
    InternalError {
        /// KVM's suberror.
        suberror: u32,
    },
    /// An exit this VMM does not handle (its debug rendering).
    #[error("unexpected exit {0}")]
    UnexpectedExit(String),
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed: {0}")]
    RunFailed(kvm_ioctls::Error),
    /// An instruction KVM's emulator cannot run and the VMM does not
    /// complete (a Linux guest on a host that emulates ring 0).
    #[error("KVM's emulator cannot run `{insn}`{} (bytes {}){}", In(symbol.as_deref()), Hex(bytes), Hint(*hint))]
    Unemulated {
        /// The instruction's name ("an instruction" when not decoded).
        insn: &'static str,
        /// The kernel symbol it is in (`name+0xoff`), when symbols are known.
        symbol: Option<String>,
        /// The bytes read at RIP (up to 15; fewer at a page end).
        bytes: Vec<u8>,
        /// What avoids it (a kernel command-line switch, usually).
        hint: Option<&'static str>,
    },
}

/// Bytes as `0f 01 ca`.
struct Hex<'a>(&'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            write!(f, "{}{b:02x}", if i == 0 { "" } else { " " })?;
        }
        Ok(())
    }
}

/// " in name+0xoff" or nothing.
struct In<'a>(Option<&'a str>);

impl fmt::Display for In<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(s) => write!(f, " in {s}"),
            None => Ok(()),
        }
    }
}

/// "; try …" or nothing.
struct Hint(Option<&'static str>);

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, "; {h}"),
            None => Ok(()),
        }
    }
}

/// "; its page or descriptor tables include gpa …" or nothing.
struct TableNote(Option<u64>);

impl fmt::Display for TableNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(gpa) => write!(
                f,
                "; its page or descriptor tables include gpa {gpa:#x}, which SET_PAGE_ACCESS left without a memslot"
            ),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash(event: CrashEvent) -> String {
        Crash { vcpu: 2, event }.to_string()
    }

    #[test]
    fn crashes_say_which_event_on_which_vcpu() {
        let pause = crash(CrashEvent::Event(ukvmi_wire::event::PAUSE));
        assert_eq!(pause, "the introspector answered CRASH to KVMI_VCPU_EVENT_PAUSE on vCPU 2");
        assert_eq!(crash(CrashEvent::Event(0x7ff)), "the introspector answered CRASH to an event on vCPU 2");
        assert_eq!(
            crash(CrashEvent::Breakpoint { rip: 0x10_0010 }),
            "the introspector answered CRASH to a breakpoint at 0x100010 on vCPU 2"
        );
        assert_eq!(crash(CrashEvent::Singlestep), "the introspector answered CRASH to a single step on vCPU 2");
        assert_eq!(crash(CrashEvent::Hypercall), "the introspector answered CRASH to a hypercall on vCPU 2");
        assert_eq!(
            crash(CrashEvent::MsrWrite { msr: 0xc000_0082 }),
            "the introspector answered CRASH to an MSR 0xc0000082 write on vCPU 2"
        );
        assert_eq!(
            crash(CrashEvent::Pf { access: PfAccess::Fetch, gpa: 0x5000 }),
            "the introspector answered CRASH to a PF event (fetch at gpa 0x5000) on vCPU 2"
        );
    }

    #[test]
    fn fatal_exits_say_where_the_guest_was() {
        let f = Failure {
            vcpu: 0,
            cause: FailureCause::Fatal {
                why: FatalExit::TripleFault { unmapped_table: None },
                rip: 0x10_0001,
                code: [0xcc, 0xeb, 0xfe, 0, 0, 0, 0, 0],
            },
        };
        assert_eq!(
            f.to_string(),
            "vCPU 0: the guest triple-faulted (KVM_EXIT_SHUTDOWN) at rip 0x100001 \
             (code bytes [cc, eb, fe, 00, 00, 00, 00, 00])"
        );
        let why = FatalExit::TripleFault { unmapped_table: Some(0x3000) };
        assert_eq!(
            why.to_string(),
            "the guest triple-faulted (KVM_EXIT_SHUTDOWN; its page or descriptor tables include gpa 0x3000, \
             which SET_PAGE_ACCESS left without a memslot)"
        );
        assert_eq!(FatalExit::InternalError { suberror: 1 }.to_string(), "KVM_EXIT_INTERNAL_ERROR (suberror 1)");
    }

    #[test]
    fn unemulated_instructions_are_named_with_symbol_bytes_and_hint() {
        let with = FatalExit::Unemulated {
            insn: "popcnt",
            symbol: Some("__bitmap_weight+0x34".into()),
            bytes: vec![0xf3, 0x48, 0x0f, 0xb8, 0xc7],
            hint: Some("boot the kernel with `clearcpuid=popcnt`"),
        };
        assert_eq!(
            with.to_string(),
            "KVM's emulator cannot run `popcnt` in __bitmap_weight+0x34 (bytes f3 48 0f b8 c7); \
             boot the kernel with `clearcpuid=popcnt`"
        );
        let bare = FatalExit::Unemulated { insn: "an instruction", symbol: None, bytes: vec![0x0f, 0x0b], hint: None };
        assert_eq!(bare.to_string(), "KVM's emulator cannot run `an instruction` (bytes 0f 0b)");
    }

    #[test]
    fn other_failures_name_the_operation() {
        let e = kvm_ioctls::Error::new(libc::EINVAL);
        let f = |cause| Failure { vcpu: 1, cause }.to_string();
        assert_eq!(f(FailureCause::GuestDebug(e)), format!("vCPU 1: KVM_SET_GUEST_DEBUG: {e}"));
        assert_eq!(
            f(FailureCause::Boot { what: "KVM_SET_SREGS", source: e }),
            format!("vCPU 1: KVM_SET_SREGS failed: {e}")
        );
        assert_eq!(
            f(FailureCause::UnexpectedDebug { exception: 2, pc: 0x10 }),
            "vCPU 1: unexpected debug exit, exception 2 at 0x10"
        );
        assert_eq!(
            f(FailureCause::MapBack { gpa: 0x4000, source: BackendError::NotSupported }),
            format!("vCPU 1: mapping gpa 0x4000 back: {}", BackendError::NotSupported)
        );
    }
}
