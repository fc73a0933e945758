//! The VMM's error type: every failure says what was being done.

use thiserror::Error;

/// A VMM failure.
#[derive(Debug, Error)]
pub enum Error {
    /// `/dev/kvm` is missing or unusable.
    #[error("cannot use /dev/kvm: {0} (is KVM available and are you allowed to open /dev/kvm?)")]
    NoKvm(String),
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
    /// A bad option, guest or image.
    #[error("{0}")]
    Config(String),
    /// The guest stopped in a way that is an error.
    #[error("{0}")]
    Guest(String),
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
