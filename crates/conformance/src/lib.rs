//! A fake VM for testing the KVMI endpoint without KVM, and a harness that
//! connects it to the introspector library over a real UNIX socket pair.
//!
//! Each fake vCPU is a thread that loops: "run guest code" (count progress
//! and wait up to a millisecond, or until kicked), perform one scripted guest
//! action if any (an `int3`, an MSR write, ...), then call
//! `VcpuPort::handle_requests` when it has requests, exactly as the real VMM
//! does between guest entries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

pub mod fake;
pub mod raw;

pub use fake::{FakeConfig, FakeVm, GuestAction, Intercepts, Observed};
pub use raw::{RawPeer, Setup};
