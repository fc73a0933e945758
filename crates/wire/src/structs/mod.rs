//! Byte-exact KVMI v12 structures for x86_64 (spec §2, §3, §5, §8, §9),
//! one file per group: framing, x86 state, vCPU events, commands.
//!
//! Every struct is `#[repr(C)]` with explicit padding and derives `zerocopy`'s
//! traits, so it converts to and from bytes without `unsafe`. Each size is
//! asserted at compile time; field offsets are tested against the spec's tables
//! in `tests/layout.rs`.

// zerocopy's KnownLayout derive adds helper types without Debug; every
// struct declared here derives Debug itself.
#![allow(missing_debug_implementations)]

/// Declares a byte-exact wire struct (also used by the v7 module).
macro_rules! wire {
    ($(#[$m:meta])* $name:ident, $size:expr, { $($(#[$fm:meta])* $f:ident : $t:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable, zerocopy::KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }
        const _: () = assert!(core::mem::size_of::<$name>() == $size);
        impl Default for $name {
            fn default() -> Self {
                <Self as zerocopy::FromZeros>::new_zeroed()
            }
        }
    };
}

pub(crate) use wire;

mod commands;
mod events;
mod framing;
mod x86;

pub use commands::*;
pub use events::*;
pub use framing::*;
pub use x86::*;
