//! The monitor's error type, and the retry of vCPU commands a guest has not started yet.

use std::time::{Duration, Instant};

/// An error from the monitor, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MonitorError {
    /// A KVMI command failed.
    #[error("{what}: {source}")]
    Command {
        /// What the monitor was doing.
        what: String,
        /// The client library's error.
        #[source]
        source: ukvmi_introspector::Error,
    },
    /// The request makes no sense for this VM.
    #[error("{0}")]
    Invalid(String),
    /// The monitor has stopped (the VM went away).
    #[error("the connection to the VM is closed")]
    Closed,
    /// Waiting for the guest took too long.
    #[error("{0}")]
    Timeout(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, MonitorError>;

/// Names a failed KVMI command with what the monitor was doing.
pub(crate) fn cmd<T>(what: impl FnOnce() -> String, r: ukvmi_introspector::Result<T>) -> Result<T> {
    r.map_err(|source| MonitorError::Command { what: what(), source })
}

/// How long a vCPU command waits for a vCPU the guest has not started yet.
pub(crate) const VCPU_UP_WAIT: Duration = Duration::from_secs(10);

/// Runs a vCPU command, retrying while the vCPU is not up yet (`-KVM_EAGAIN`:
/// a guest starts its other vCPUs some time after the VM starts), for up to
/// [`VCPU_UP_WAIT`]. Never called with a lock the event thread needs held.
pub(crate) fn on_vcpu<T>(mut f: impl FnMut() -> ukvmi_introspector::Result<T>) -> ukvmi_introspector::Result<T> {
    let end = Instant::now() + VCPU_UP_WAIT;
    loop {
        match f() {
            Err(e) if e.errno() == Some(ukvmi_introspector::wire::KvmErrno::Eagain) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}
