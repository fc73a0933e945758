#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]
//! Event policies on top of the KVMI client library, shared by the `ukvmi`
//! tool commands and `ukvmi demo`.
//!
//! - [`Monitor`]: one event thread that answers every event by the
//!   interceptions tools asked for and streams [`Record`]s to each
//!   [`Subscription`]. Each interception is a policy with its own module
//!   (`policy::*`): breakpoints and their step-over (the syscall tracer is
//!   one), the MSR guard, the page guard, the hypercall responder, held
//!   pauses;
//! - [`guestos`]: the [`GuestOs`] trait the policies attribute and decode
//!   events with, and the demo guest OS's implementation ([`DemoOs`]) and
//!   process table;
//! - [`SymbolMap`]: System.map parsing and symbolisation;
//! - [`json`]: the small JSON writer behind `--json`.
//!
//! # Threads and locks
//!
//! One event thread (`ukvmi-monitor`) reads events and answers each; the
//! tools' threads call [`Monitor`]'s methods. Configuration (asking for an
//! interception, a [`Subscription`] dropped, the shutdown) is ordered by a
//! setup lock, which may be held across KVMI round trips (enabling events
//! on every vCPU waits up to 10 s for a vCPU the guest has not started);
//! the event thread never takes it. Each policy keeps its state behind its
//! own lock, taken to copy out or record state and released before any
//! round trip (reading guest memory, setting registers, answering) — except
//! that the breakpoint policy writes its one-byte `int3`/original byte
//! under its own lock, so that a step-over and a removal cannot cross. A
//! policy records an owner before it arms the hardware and removes it if
//! arming fails, so an event that arrives meanwhile is already handled by
//! the owner's rules. The subscribers' lock is innermost but for each
//! subscription's queue (a reader waits on its queue alone, woken by a
//! record, the end of the stream or a [`SubWaker`]). Lock order: setup →
//! one policy → subscribers → a queue. The shutdown sets the stop flag before
//! it lets held vCPUs go, and the pause policy checks that flag under its
//! lock, so no vCPU is held after a stop.

mod dispatch;
mod engine;
mod error;
mod events;
pub mod guestos;
pub mod json;
mod monitor;
mod policy;
pub mod record;
mod subs;
pub mod symbols;

pub use error::{MonitorError, Result};
pub use guestos::{DemoOs, GuestMemory, GuestOs, PhysRead, ReadError};
pub use monitor::{describe, GuardedWriteError, HeldVcpus, Monitor, PauseHolders, Stats};
pub use record::{Record, Who};
pub use subs::{Kinds, SubWaker, Subscription};
pub use symbols::SymbolMap;
