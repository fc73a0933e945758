#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic))]
//! Event policies on top of the KVMI client library, shared by the `ukvmi`
//! tool commands and `ukvmi demo`:
//!
//! - [`Monitor`]: one event thread that answers every event by the
//!   interceptions tools asked for — syscall tracing with a breakpoint that
//!   is stepped over, MSR guards that keep the old value, page guards that
//!   skip a refused write, a hypercall responder, held pauses — and streams
//!   [`Record`]s to subscribers;
//! - [`guestos`]: the demo guest OS's process table, read from memory;
//! - [`SymbolMap`]: System.map parsing and symbolisation;
//! - [`json`]: the small JSON writer behind `--json`.

pub mod guestos;
pub mod json;
mod monitor;
pub mod record;
pub mod symbols;

pub use monitor::{describe, Kinds, Monitor, MonitorError, Result, Stats, Subscription};
pub use record::{Record, Who};
pub use symbols::SymbolMap;
