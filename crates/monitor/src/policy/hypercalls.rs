//! The hypercall responder: reports the guest's doorbell and answers its agent call with a tool's text.

use std::sync::{Mutex, MutexGuard, PoisonError};

use ukvmi_introspector::wire::event;
use ukvmi_introspector::{EventReply, VcpuEventMsg};

use crate::{engine::Inner, error::Result, events::EventRefs, record::Record, subs::SubId};

/// An owner's answer: the text and the guest's agent buffer it goes to
/// (`None`: observe only).
type Answer = Option<(String, u64)>;

/// The hypercall policy.
#[derive(Debug, Default)]
pub(crate) struct Hypercalls {
    owners: Mutex<Vec<(SubId, Answer)>>,
}

impl Hypercalls {
    fn lock(&self) -> MutexGuard<'_, Vec<(SubId, Answer)>> {
        self.owners.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reports hypercalls to `owner`, answering them with `answer` if given.
    pub(crate) fn add(&self, inner: &Inner, refs: &mut EventRefs, owner: SubId, answer: Answer) -> Result<()> {
        refs.enable(&inner.vm, inner.vcpus, event::HYPERCALL)?;
        self.lock().push((owner, answer));
        Ok(())
    }

    /// Drops the owners `gone` says are gone.
    pub(crate) fn release(&self, inner: &Inner, refs: &mut EventRefs, gone: &dyn Fn(SubId) -> bool) {
        let removed = {
            let mut o = self.lock();
            let before = o.len();
            o.retain(|(id, _)| !gone(*id));
            before - o.len()
        };
        for _ in 0..removed {
            refs.disable(&inner.vm, inner.vcpus, event::HYPERCALL);
        }
    }

    /// A HYPERCALL event: reports the agent message and, when an owner
    /// answers and the guest OS says the call takes an answer there, writes
    /// it and sets the call's result.
    pub(crate) fn on_hypercall(&self, inner: &Inner, ev: &VcpuEventMsg) -> EventReply {
        let answer = self.lock().iter().find_map(|(_, a)| a.clone());
        let v = ev.vcpu.raw();
        let who = inner.os.who(inner, v);
        let message = inner.os.agent_message(inner, &ev.regs);
        let mut reply = None;
        if let Some(r) = answer.and_then(|(text, buf)| inner.os.agent_reply(&ev.regs, buf, &text)) {
            if inner.vm.write_physical(r.gpa, &r.bytes).is_ok() && inner.vm.set_registers(v, &r.regs).is_ok() {
                reply = Some(String::from_utf8_lossy(&r.bytes).into_owned());
            }
        }
        inner.subs.emit(&Record::Hypercall { who, message, reply });
        EventReply::Continue
    }
}
