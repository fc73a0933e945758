//! The KVMI v12 wire ABI for x86_64: message and event ids, `KVM_E*` error
//! codes, and every structure of the protocol, byte-compatible with the
//! "VM introspection" v12 patch series. Types only: no I/O, no threads.
//!
//! All integers are little-endian (host order on x86_64). Structures are
//! `#[repr(C)]` with explicit padding and use `zerocopy` for conversion to and
//! from bytes; [`read_zext`] applies the kernel's rule that a short body reads
//! as if zero-extended.
//!
//! The older **kvmi-v7** dialect that libkvmi, LibVMI and the other existing
//! tools speak lives in [`v7`]: its ids, the structures that differ, and the
//! maps between the two numberings.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

mod codec;
mod errno;
pub mod event_channel;
pub mod handshake;
mod ids;
mod payload;
mod structs;
mod types;
pub mod v7;

pub use codec::{frame, read_zext, tail, TooLarge};
pub use errno::KvmErrno;
pub use ids::*;
pub use payload::EventPayload;
pub use structs::*;
pub use types::{Access, CommandId, EventId, Gfn, Gpa, Gva, VcpuId};

pub use zerocopy;
pub use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes};
