//! The hypervisor side of a KVMI v12 connection, as a library a VMM embeds.
//!
//! This crate knows KVMI, not KVM: it reaches the VM only through the small
//! traits of [`backend`]. The design follows the kernel patch "KVM:
//! introspection: handle vCPU commands":
//!
//! * **One receiving thread per connection** ([`receiver`](crate::Endpoint::hook))
//!   reads each message (8-byte header, body ≤ 8184 bytes; more, or a short
//!   read, is a hard error).
//! * **VM commands** (even ids) run on that thread, in order.
//! * **vCPU messages** (odd ids) are validated there by `vcpu_dispatch`
//!   (not allowed → `-KVM_EPERM`; padding → `-KVM_EINVAL`; index →
//!   `-KVM_EINVAL`; not ready → `-KVM_EAGAIN`) and queued as a job on their
//!   vCPU, which is kicked. The vCPU thread runs its jobs in
//!   [`VcpuPort::handle_requests`] between guest entries and sends each reply
//!   itself.
//! * **Events** are raised by the vCPU thread ([`VcpuPort::raise`]); it
//!   blocks until the reply, running its own jobs meanwhile.
//! * **Dialects**: KVMI v12, or the kvmi-v7 ABI the existing tools speak
//!   ([`Dialect`]); a v7 message is decoded into its v12 counterpart on the
//!   receiving thread and then takes the same path.
//! * **Hard errors** shut the socket down; every vCPU then gets a release job
//!   and a vCPU waiting in an event resumes as if answered CONTINUE. The
//!   guest keeps running whatever happens to the connection.
//!
//! See `docs/architecture.md` in the repository for the whole picture.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

pub mod backend;
mod dialect;
mod endpoint;
mod event_channel;
pub mod handshake;
mod host_features;
mod permissions;
mod receiver;
mod session;
mod shared_memory;
mod vcpu;
mod vcpu_commands;
mod vcpu_dispatch;
mod vcpu_ring;
mod vm_commands;

/// The VMM's side of the event trace (`UKVMI_EVENT_TRACE`): `<prefix>.vmm`,
/// written when a connection ends.
static TRACE: ukvmi_event_trace::Trace = ukvmi_event_trace::Trace::new("vmm");

pub use backend::{
    BackendError, BackendResult, CpuidOps, Exception, HostCaps, IdSet, InjectOps, InterceptOps, MtrrOps, PageAccessOps,
    SharedMemoryOps, SinglestepOps, TranslateOps, VcpuBackend, VmBackend, XstateOps,
};
pub use dialect::{Dialect, Log};
pub use endpoint::{Endpoint, HookError, Options, PreUnhookError};
pub use host_features::HostFeatures;
pub use permissions::{PermissionError, Permissions};
pub use session::Disconnect;
pub use ukvmi_wire::EventPayload;
pub use vcpu::{EventOutcome, Flow, VcpuPort};
