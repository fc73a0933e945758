//! The event thread: takes every event from the connection and hands it to the policy it belongs to.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use ukvmi_introspector::{Event, EventKind, EventReply, VcpuEventMsg};

use crate::{engine::Inner, record::Record};

/// The event thread's body: runs until the monitor stops, the VMM unhooks,
/// or the connection fails.
pub(crate) fn event_loop(inner: Arc<Inner>) {
    while !inner.stop.load(Ordering::SeqCst) {
        if inner.stopping.load(Ordering::SeqCst) {
            inner.shutdown();
            break;
        }
        match inner.vm.next_event(Some(Duration::from_millis(100))) {
            Ok(None) => {}
            Ok(Some(Event::Vcpu(ev))) => {
                inner.events.fetch_add(1, Ordering::Relaxed);
                handle(&inner, *ev);
            }
            Ok(Some(Event::Unhook { .. })) => {
                inner.subs.emit(&Record::Unhook);
                inner.shutdown();
                break;
            }
            Ok(Some(Event::UnknownVm { .. })) => {}
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
fn handle(inner: &Inner, ev: VcpuEventMsg) {
    let reply = match ev.kind {
        EventKind::Pause => match inner.pauses.on_pause(inner, ev) {
            Some(ev) => {
                let _ = inner.vm.reply(&ev, EventReply::Continue);
                return;
            }
            None => return,
        },
        EventKind::Breakpoint { gpa, .. } => match inner.bps.on_hit(inner, &ev, gpa) {
            Some(r) => r,
            None => {
                // Not (or no longer) ours.
                inner.answer_stray(&ev);
                return;
            }
        },
        EventKind::Singlestep { .. } => inner.bps.on_singlestep(inner, ev.vcpu),
        EventKind::Msr { msr, old_value, new_value } => inner.msrs.on_write(inner, ev.vcpu, msr, old_value, new_value),
        EventKind::Pf { gva, gpa, access } => inner.pages.on_fault(inner, &ev, gva, gpa, access),
        EventKind::Hypercall => inner.hypercalls.on_hypercall(inner, &ev),
        _ => EventReply::Continue,
    };
    let _ = inner.vm.reply(&ev, reply);
}
