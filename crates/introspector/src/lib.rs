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
//! # Threads
//!
//! Each [`Vm`] owns exactly one reader thread. It reads every message from
//! the socket (8-byte header, then `size` body bytes) and classifies it as the
//! spec says: id 0 → VM event, id 1 with a body of at least 552 bytes → vCPU
//! event, anything else → a reply. Commands are sent from the callers' own
//! threads: each message is framed and written with a single `write_all`
//! under a write lock, so any number of threads may issue commands at once
//! through a shared `&Vm` (it is `Send + Sync`).
//!
//! # Replies
//!
//! Every command takes a fresh sequence number (a per-`Vm` counter starting
//! at 1) and registers a one-shot slot under it before writing. The reader
//! thread hands each reply to the slot with the same `seq` and message id,
//! in whatever order replies arrive (the kernel answers VM commands and each
//! vCPU's commands in separate queues). A reply that matches nothing is kept
//! for [`Vm::take_unmatched`] and otherwise dropped. A command waits at most
//! [`Vm::timeout`] (15 s by default) and then fails with
//! [`Error::Timeout`]; an error code becomes [`Error::Kvm`] naming the
//! command; a reply of the wrong size becomes [`Error::Protocol`].
//!
//! # Events
//!
//! Events are parsed by the reader thread into [`Event`]s and queued; take
//! them with [`Vm::next_event`] or [`Vm::events`], from any thread. A vCPU
//! that sent an event waits for [`Vm::reply`] and meanwhile still executes
//! commands addressed to it, so the usual pattern is: take an event, inspect
//! or change the vCPU with commands, reply. When the connection ends (EOF,
//! read error, [`Vm::close`] or drop) every waiting command gets
//! [`Error::Closed`] and, once the queue is drained, so does `next_event`.
//!
//! # Zero-copy guest memory
//!
//! [`Vm::map_memory`] (and [`Vm::map_memory_writable`]) use the ukvmi
//! extension `UKVMI_VM_MAP_MEMORY`: the VMM sends its guest-RAM memfd with
//! the reply (`SCM_RIGHTS`) and the library maps it as a
//! [`GuestMemoryMap`], a live view of guest physical memory read with
//! bounds-checked copies instead of one page per round trip. The reader
//! thread reads with `recvmsg`: a descriptor goes to the map request it
//! answers; any other descriptor that arrives is closed.
//!
//! # Example
//!
//! ```no_run
//! use ukvmi_introspector::{Event, EventKind, EventReply, Listener};
//! use ukvmi_wire::event;
//!
//! # fn main() -> ukvmi_introspector::Result<()> {
//! let listener = Listener::bind("/run/kvmi.sock")?.with_key(b"secret");
//! let vm = listener.accept()?;
//! println!("{} has {} vCPUs", vm.info().name, vm.get_info()?);
//! vm.control_events(0, event::BREAKPOINT, true)?;
//! while let Some(ev) = vm.next_event(None)? {
//!     match ev {
//!         Event::Vcpu(ev) => {
//!             if let EventKind::Breakpoint { gpa, .. } = ev.kind {
//!                 println!("vCPU {} hit INT3 at {gpa:#x}", ev.vcpu);
//!             }
//!             vm.reply(&ev, EventReply::Continue)?;
//!         }
//!         Event::Unhook { .. } => break,
//!         Event::UnknownVm { .. } => {}
//!     }
//! }
//! vm.close();
//! # Ok(())
//! # }
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic))]

mod commands;
mod error;
mod event;
mod listener;
mod map;
mod mux;
mod pipeline;
#[cfg(any(test, feature = "raw"))]
mod raw;
mod transport;
mod vm;

#[cfg(test)]
mod tests;

pub use commands::{Registers, VersionInfo};
pub use error::{Error, Result};
pub use event::{Event, EventKind, EventReply, VcpuEventMsg};
pub use listener::{Handshake, Incoming, Listener, DEFAULT_HANDSHAKE_TIMEOUT};
pub use map::GuestMemoryMap;
#[cfg(any(test, feature = "raw"))]
pub use raw::{RawReply, RawVm};
pub use vm::{Events, Vm, VmInfo, DEFAULT_REPLY_TIMEOUT};
