//! The obligation to answer a vCPU event: [`PendingEvent`], which answers
//! CONTINUE by itself (and says so on stderr) if it is dropped unanswered,
//! because a vCPU that never gets its reply stays stopped for good.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;

use ukvmi_wire::{frame, msg, Action};

use crate::events::{self, EventReply, VcpuEventMsg};
use crate::mux::Mux;

/// A vCPU event waiting for its reply; it reads as the [`VcpuEventMsg`] it
/// carries (`Deref`).
///
/// Answer it with [`Vm::reply`](crate::Vm::reply) (or
/// [`Vm::reply_with_registers`](crate::Vm::reply_with_registers)). If it is dropped without
/// a successful reply while the connection is up, it answers CONTINUE
/// itself and logs a line on stderr, so a forgotten reply does not stall
/// the vCPU forever. [`PendingEvent::detach`] gives up that safety net, for
/// callers that answer with the raw API.
#[must_use = "a vCPU waits until its event is answered: reply with Vm::reply (dropping it answers CONTINUE)"]
#[derive(Debug)]
pub struct PendingEvent {
    msg: Box<VcpuEventMsg>,
    conn: Weak<Mux>,
    answered: AtomicBool,
}

impl PendingEvent {
    pub(crate) fn new(msg: VcpuEventMsg, conn: Weak<Mux>) -> PendingEvent {
        PendingEvent { msg: Box::new(msg), conn, answered: AtomicBool::new(false) }
    }

    /// The event as received.
    pub fn msg(&self) -> &VcpuEventMsg {
        &self.msg
    }

    /// Whether a reply has been sent (by [`Vm::reply`](crate::Vm::reply)).
    pub fn is_answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// Takes the event out without the automatic reply: the caller now
    /// answers it (e.g. with the raw API) or the vCPU waits.
    pub fn detach(self) -> VcpuEventMsg {
        self.answered.store(true, Ordering::Relaxed);
        (*self.msg).clone()
    }

    pub(crate) fn mark_answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }
}

impl std::ops::Deref for PendingEvent {
    type Target = VcpuEventMsg;

    fn deref(&self) -> &VcpuEventMsg {
        &self.msg
    }
}

impl Drop for PendingEvent {
    fn drop(&mut self) {
        if self.is_answered() {
            return;
        }
        let Some(conn) = self.conn.upgrade() else { return };
        if conn.is_closed() {
            return;
        }
        let ev = &self.msg;
        // An event this library does not know gets a bare CONTINUE.
        let body = events::reply_body(ev, EventReply::Continue).unwrap_or_else(|_| {
            events::build_reply_body(ev.vcpu.raw(), Action::Continue as u8, ev.event.raw() as u8, &[])
        });
        let sent = frame(msg::VCPU_EVENT, ev.seq, &[&body])
            .ok()
            .is_some_and(|bytes| conn.send_event_reply(ev.vcpu.raw(), ev.seq, &bytes).is_ok());
        if sent {
            eprintln!(
                "ukvmi-introspector: {} (seq {}) of vCPU {} was dropped unanswered; answered CONTINUE",
                ev.event, ev.seq, ev.vcpu
            );
        }
    }
}
