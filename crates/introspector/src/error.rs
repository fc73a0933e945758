//! The crate's error types: [`Error`], and [`ProtocolError`] / [`MapProblem`] for what the peer got wrong.

use std::io;
use ukvmi_wire::KvmErrno;

/// Everything that can go wrong on the introspector side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    Protocol(#[from] ProtocolError),
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

/// What was wrong with something the peer sent ([`Error::Protocol`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A command reply too short to hold `kvmi_error_code`.
    #[error("{command}: reply body of {len} bytes is shorter than kvmi_error_code")]
    ShortReply {
        /// The command answered.
        command: &'static str,
        /// Bytes in the reply body.
        len: usize,
    },
    /// A successful reply whose data is not the size the command returns.
    #[error("{command}: reply carries {got} bytes of data, expected {expected}")]
    ReplyLength {
        /// The command answered.
        command: &'static str,
        /// Bytes of data received.
        got: usize,
        /// Bytes of data expected.
        expected: usize,
    },
    /// `KVMI_VCPU_GET_REGISTERS` listed another number of MSRs than asked.
    #[error("{command}: reply lists {got} MSRs, {asked} were asked for")]
    MsrCount {
        /// The command answered.
        command: &'static str,
        /// MSRs the reply lists.
        got: u64,
        /// MSRs asked for.
        asked: usize,
    },
    /// A `UKVMI_VM_MAP_MEMORY` reply that cannot be mapped.
    #[error("{command}: {problem}")]
    Map {
        /// The command answered.
        command: &'static str,
        /// What was wrong.
        problem: MapProblem,
    },
    /// A `UKVMI_VM_EVENT_CHANNEL` reply, or the channel it hands over, that
    /// cannot be used.
    #[error("UKVMI_VM_EVENT_CHANNEL: {problem}")]
    EventChannel {
        /// What was wrong.
        problem: &'static str,
    },
}

/// Why a `UKVMI_VM_MAP_MEMORY` reply could not be mapped ([`ProtocolError::Map`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapProblem {
    /// The reply carried no descriptor.
    #[error("the reply carried no file descriptor")]
    NoDescriptor,
    /// The RAM size does not fit in this process's address space.
    #[error("RAM size {0} does not fit")]
    TooLarge(u64),
    /// An empty range, or one that wraps around.
    #[error("unusable RAM range {gpa:#x}+{size:#x}")]
    UnusableRange {
        /// First guest-physical address.
        gpa: u64,
        /// Bytes.
        size: u64,
    },
    /// Reply flags that do not match the request (or unknown bits, or padding).
    #[error("reply flags {0:#x} do not match the request")]
    Flags(u32),
    /// The descriptor is not sealed against shrinking (the VMM could make accesses fault).
    #[error("the descriptor is not sealed against shrinking")]
    NotSealed,
    /// The descriptor's access mode does not allow the mapping asked for.
    #[error("the descriptor's access mode {0:#x} does not allow the mapping asked for")]
    AccessMode(i32),
    /// The file is shorter than the reply announces.
    #[error("the file has {file} bytes, the reply announces {announced}")]
    TooShort {
        /// Bytes in the file.
        file: u64,
        /// Bytes the reply announces.
        announced: u64,
    },
    /// Duplicating the descriptor failed.
    #[error("dup: {0}")]
    Dup(#[source] io::Error),
    /// `fstat` of the descriptor failed.
    #[error("fstat: {0}")]
    Fstat(#[source] io::Error),
    /// `mmap` returned a null address.
    #[error("mmap returned NULL")]
    Null,
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
