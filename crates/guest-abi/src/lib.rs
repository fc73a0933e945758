#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]
//! The guest ABI, declared once for the VMM, the monitor and the test guests.
//!
//! - [`layout`]: where the VMM loads every test guest, its page tables,
//!   stacks, ports and the per-guest data areas;
//! - [`hypercall`]: the hypercall doorbell and KVMI's register convention;
//! - [`demo`]: the demo guest OS ("ukos"): its process table, syscall
//!   numbers, agent call and per-process memory.
//!
//! The guests' assembly repeats these values in `crates/guests/asm/layout.h`
//! and `asm/demo.h`; the `ukvmi-guests` crate's unit tests parse those
//! headers and check that every value agrees with this crate. This crate has
//! no build script and no dependencies, so the VMM and the monitor get the
//! ABI without running gcc.

pub mod demo;
pub mod hypercall;
pub mod layout;
