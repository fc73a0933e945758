//! The event thread: takes every event from the connection and hands it to the policy it belongs to.

use std::sync::{atomic::Ordering, Arc};

use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent};

use crate::{engine::Inner, record::Record};

/// The event thread's body: runs until the monitor stops, the VMM unhooks,
/// or the connection fails. It waits for events without a timeout (an idle
/// monitor costs no wake-ups); [`Monitor::stop`](crate::Monitor::stop)
/// wakes it with `Vm::wake_event_waiter`.
pub(crate) fn event_loop(inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::SeqCst) {
        if inner.stopping.load(Ordering::SeqCst) {
            inner.shutdown();
            break;
        }
        match inner.vm.next_event(None) {
            Ok(None) => {}
            Ok(Some(Event::Vcpu(ev))) => {
                inner.events.fetch_add(1, Ordering::Relaxed);
                handle(&inner, ev);
            }
            Ok(Some(Event::Unhook { .. })) => {
                inner.subs.emit(&Record::Unhook);
                inner.shutdown();
                break;
            }
            Ok(Some(_)) => {}
            Err(e) => {
                if !inner.stop.load(Ordering::SeqCst) {
                    inner.subs.close_all(&Record::Detached { reason: e.to_string() });
                    inner.stop.store(true, Ordering::SeqCst);
                    inner.pauses.wake();
                }
                break;
            }
        }
    }
}

/// Answers one vCPU event. No lock is held here; each policy takes its own.
fn handle(inner: &Inner, ev: PendingEvent) {
    let v = ev.vcpu.raw();
    let reply = match ev.payload {
        EventPayload::Pause => match inner.pauses.on_pause(inner, ev) {
            Some(ev) => {
                let _ = inner.vm.reply(&ev, EventReply::Continue);
                return;
            }
            None => return,
        },
        EventPayload::Breakpoint { gpa, .. } => match inner.bps.on_hit(inner, &ev, gpa) {
            Some(r) => r,
            None => {
                // Not (or no longer) ours.
                inner.answer_stray(&ev);
                return;
            }
        },
        EventPayload::Singlestep { .. } => inner.bps.on_singlestep(inner, v),
        EventPayload::Msr { msr, old_value, new_value } => inner.msrs.on_write(inner, v, msr, old_value, new_value),
        EventPayload::Pf { gva, gpa, access } => inner.pages.on_fault(inner, &ev, gva, gpa, access),
        EventPayload::Hypercall => inner.hypercalls.on_hypercall(inner, &ev),
        _ => EventReply::Continue,
    };
    let _ = inner.vm.reply(&ev, reply);
}
