//! The introspector (tool) side of KVMI v12: the library an introspection
//! tool links to.
//!
//! # Connections
//!
//! As with libkvmi, the tool *listens* and the VMM (QEMU) connects to it.
//! [`Listener::bind`] creates the UNIX socket; [`Listener::accept`] takes one
//! connection, runs the QEMU handshake (reads `qemu_vmi_to_introspector`,
//! answers with the SHA-1 cookie hash of the optional key), then sends
//! `KVMI_GET_VERSION` and returns a [`Vm`] carrying the [`VmInfo`] learnt on
//! the way. A rejected cookie shows up as the connection closing before
//! `KVMI_GET_VERSION` is answered, hence the "invalid authentication token?"
//! hint in that error. [`Vm::connect_raw`] skips all that, for tests that
//! already hold a connected socket.
//!
//! # Layers
//!
//! - `transport`: the socket's read side. One `recvmsg` reads ahead every
//!   byte that has arrived (up to 64 KiB) together with any `SCM_RIGHTS`
//!   descriptors; whole messages (8-byte header, then `size` body bytes) are
//!   cut out of that buffer one at a time.
//! - `mux`: the multiplexer. It classifies each message as the spec says
//!   (id 0 → VM event, id 1 with a body of at least 552 bytes → vCPU event,
//!   anything else → a reply), hands replies to the request registered
//!   under the same seq *and* id, queues events, and keeps the last 64
//!   replies nobody asked for.
//! - [`Vm`] (`vm`, `commands`, `pipeline`, `map`): the facade, one typed
//!   method per command, pipelined bulk reads, the zero-copy memory map.
//! - `raw` (cargo feature `raw`): `Vm::raw()` sends bytes the typed API never
//!   would, for conformance tests.
//!
//! # Threads: whoever waits reads
//!
//! There is no dedicated reader that everyone waits on. A thread that waits
//! for its reply (or for an event) takes the socket's read side itself when
//! nobody holds it, reads and dispatches messages until its own has come,
//! and lets go; a thread that finds the read side taken sleeps until the
//! holder lets go (woken after every message), then looks again. Replies
//! thus reach their caller without a thread hand-off. Each [`Vm`] also owns
//! one standby reader thread that reads only while nobody waits, so events
//! and late replies are still taken in and a closed connection is noticed.
//! Commands are written from the callers' own threads, each message framed
//! and written with a single `write_all` under a write lock, so any number
//! of threads may issue commands at once through a shared `&Vm` (it is
//! `Send + Sync`).
//!
//! # Replies
//!
//! Every command takes a fresh sequence number (a per-`Vm` counter starting
//! at 1) and registers under it before writing; replies are matched in
//! whatever order they arrive (the kernel answers VM commands and each
//! vCPU's commands in separate queues). A command waits at most
//! [`Vm::timeout`] (15 s by default) and then fails with
//! [`Error::Timeout`]; an error code becomes [`Error::Kvm`] naming the
//! command; a reply of the wrong size becomes [`Error::Protocol`].
//!
//! # Events
//!
//! Events are parsed into [`Event`]s and queued; take them with
//! [`Vm::next_event`] or [`Vm::events`], from any thread. A vCPU event comes
//! as a [`PendingEvent`]: the vCPU waits for [`Vm::reply`] and meanwhile
//! still executes commands addressed to it, so the usual pattern is: take an
//! event, inspect or change the vCPU with commands, reply. A `PendingEvent`
//! dropped unanswered answers CONTINUE itself (with a line on stderr), so a
//! forgotten reply cannot stop a vCPU for good. When the connection ends
//! (EOF, read error, [`Vm::close`] or drop) every waiting command gets
//! [`Error::Closed`] and, once the queue is drained, so does `next_event`;
//! [`Vm::events`] then ends, with a last `Err` if the connection broke.
//!
//! # Zero-copy guest memory
//!
//! [`Vm::map_memory`] (and [`Vm::map_memory_writable`]) use the ukvmi
//! extension `UKVMI_VM_MAP_MEMORY`: the VMM sends its guest-RAM memfd with
//! the reply (`SCM_RIGHTS`) and the library maps it as a
//! [`GuestMemoryMap`], a live view of guest physical memory read with
//! bounds-checked copies instead of one page per round trip. A descriptor
//! goes to the map request it answers; any other descriptor that arrives is
//! closed.
//!
//! # Vocabulary
//!
//! Addresses are [`Gpa`] (guest-physical) and [`Gva`] (guest-virtual), vCPUs
//! [`VcpuId`], ids [`EventId`] and [`CommandId`], page rights [`Access`];
//! parameters take `impl Into<..>`, so raw integers still work. Everything
//! the API exposes is re-exported here (and the whole wire crate as
//! [`wire`]): a tool needs no other ukvmi dependency.
//!
//! # Example
//!
//! ```no_run
//! use ukvmi_introspector::{event, Event, EventPayload, EventReply, Listener};
//!
//! # fn main() -> ukvmi_introspector::Result<()> {
//! let listener = Listener::bind("/run/kvmi.sock")?.with_key(b"secret");
//! let vm = listener.accept()?;
//! println!("{} has {} vCPUs", vm.info().name, vm.vcpu_count()?);
//! vm.control_events(0, event::BREAKPOINT, true)?;
//! for ev in vm.events() {
//!     match ev? {
//!         Event::Vcpu(ev) => {
//!             if let EventPayload::Breakpoint { gpa, .. } = ev.payload {
//!                 println!("vCPU {} hit INT3 at {gpa:#x}", ev.vcpu);
//!             }
//!             vm.reply(&ev, EventReply::Continue)?;
//!         }
//!         Event::Unhook { .. } => break,
//!         _ => {}
//!     }
//! }
//! vm.close();
//! # Ok(())
//! # }
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

mod commands;
mod error;
mod event_channel;
mod events;
mod listener;
mod map;
mod mux;
mod pending;
mod pipeline;
#[cfg(any(test, feature = "raw"))]
mod raw;
mod transport;
mod vm;
mod wake;

/// The tool's side of the event trace (`UKVMI_EVENT_TRACE`): `<prefix>.tool`,
/// written when a [`Vm`] closes.
static TRACE: ukvmi_event_trace::Trace = ukvmi_event_trace::Trace::new("tool");

#[cfg(test)]
mod tests;

/// The ```rust snippets of the repository's README, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

pub use commands::{Registers, VersionInfo};
pub use error::{Error, MapProblem, ProtocolError, Result};
pub use events::{Event, EventReply, VcpuEventMsg};
pub use listener::{Handshake, Incoming, Listener, DEFAULT_HANDSHAKE_TIMEOUT};
pub use map::GuestMemoryMap;
pub use pending::PendingEvent;
#[cfg(any(test, feature = "raw"))]
pub use raw::{RawReply, RawVm};
/// The whole wire crate (structures, ids, v7 dialect) for what the
/// re-exports above do not cover.
pub use ukvmi_wire as wire;
/// The wire vocabulary the API uses, re-exported so a tool needs no direct
/// `ukvmi-wire` dependency.
pub use ukvmi_wire::{
    access, event, msg, Access, CommandId, EventId, EventMsrs, EventPayload, Gfn, Gpa, Gva, KvmErrno, KvmMsrEntry,
    KvmRegs, KvmSregs, KvmXsave, VcpuGetCpuidReply, VcpuId,
};
pub use vm::{Events, Vm, VmInfo, DEFAULT_REPLY_TIMEOUT};
