//! The monitor's policies, one per kind of interception; each keeps its own state behind its own lock.
//!
//! Every policy has the same shape: a setup method a tool calls (under the
//! monitor's setup lock, which orders configuration changes and owns the
//! event reference counts), a `release` that undoes what the subscriptions
//! that are gone asked for, and an event handler the event thread calls.
//! A handler takes its policy's lock only to copy out or record state and
//! does its KVMI round trips (reading guest memory, setting registers,
//! single-stepping) without it; the one exception is the breakpoint
//! policy's one-byte code writes, which it makes under its own lock so that
//! a breakpoint's `int3` and its original byte never cross.

pub(crate) mod breakpoints;
pub(crate) mod hypercalls;
pub(crate) mod msr;
pub(crate) mod pages;
pub(crate) mod pauses;
