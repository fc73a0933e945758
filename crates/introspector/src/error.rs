//! The one error type of the crate.

use std::io;
use ukvmi_wire::KvmErrno;

/// Everything that can go wrong on the introspector side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The connection has ended (EOF, read error, or [`Vm::close`](crate::Vm::close)).
    #[error("connection closed")]
    Closed,
    /// No reply arrived within the timeout.
    #[error("{command}: no reply within the timeout")]
    Timeout {
        /// The command (or `"handshake"`) that timed out.
        command: &'static str,
    },
    /// The hypervisor answered with a `KVM_E*` error code.
    #[error("{command} failed: {errno}")]
    Kvm {
        /// The command's name, e.g. `"KVMI_VCPU_GET_REGISTERS"`.
        command: &'static str,
        /// The decoded error.
        errno: KvmErrno,
    },
    /// The hypervisor answered with a non-zero code that is not a `KVM_E*` value.
    #[error("{command} failed: error code {err} (not a KVM_E* value)")]
    KvmUnknown {
        /// The command's name.
        command: &'static str,
        /// The raw `err` field.
        err: i32,
    },
    /// The peer sent something the protocol does not allow (wrong reply size, ...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The QEMU handshake failed.
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// Refused locally, nothing was sent (e.g. an action the event does not accept).
    #[error("refused: {0}")]
    Refused(String),
    /// An access through a [`GuestMemoryMap`](crate::GuestMemoryMap) outside the mapped range.
    #[error("guest memory {gpa:#x}+{len:#x} is outside the mapped range {start:#x}..{end:#x}")]
    OutOfRange {
        /// First gpa asked for.
        gpa: u64,
        /// Bytes asked for.
        len: u64,
        /// First gpa mapped.
        start: u64,
        /// First gpa past the mapping.
        end: u64,
    },
    /// A write through a read-only [`GuestMemoryMap`](crate::GuestMemoryMap).
    #[error("the guest memory map is read-only")]
    ReadOnlyMap,
}

impl Error {
    /// The `KVM_E*` code of an [`Error::Kvm`], `None` for every other error.
    pub fn errno(&self) -> Option<KvmErrno> {
        match self {
            Error::Kvm { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The raw (negative) `err` field of a failed reply: [`Error::Kvm`] or
    /// [`Error::KvmUnknown`].
    pub fn raw_err(&self) -> Option<i32> {
        match self {
            Error::Kvm { errno, .. } => Some(errno.wire()),
            Error::KvmUnknown { err, .. } => Some(*err),
            _ => None,
        }
    }

    /// Builds the error for a reply whose `err` field is `err` (≠ 0).
    pub(crate) fn from_reply(command: &'static str, err: i32) -> Error {
        match KvmErrno::from_wire(err) {
            Some(errno) => Error::Kvm { command, errno },
            None => Error::KvmUnknown { command, err },
        }
    }

    /// A closure mapping an `io::Error` to [`Error::Io`] with `context`.
    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
