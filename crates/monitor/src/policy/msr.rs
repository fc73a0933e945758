//! The MSR guard: reports guest writes of watched MSRs and, when asked, refuses them (the old value stays).

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use ukvmi_introspector::wire::event;
use ukvmi_introspector::EventReply;

use crate::{
    engine::Inner,
    error::{cmd, on_vcpu, Result},
    events::EventRefs,
    record::Record,
    subs::SubId,
};

/// The MSR policy: MSR → its owners and whether each refuses writes, and
/// the values tools are putting back (a guest write of exactly such a value
/// is let through even where writes are refused: it is the restore).
#[derive(Debug, Default)]
pub(crate) struct MsrGuard {
    owners: Mutex<BTreeMap<u32, Vec<(SubId, bool)>>>,
    restores: Mutex<Vec<(SubId, u32, u64)>>,
}

impl MsrGuard {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Vec<(SubId, bool)>>> {
        self.owners.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn restores(&self) -> MutexGuard<'_, Vec<(SubId, u32, u64)>> {
        self.restores.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets guest writes of exactly `value` to `msr` through for `owner`,
    /// even where its writes are refused: the tool is putting that value back.
    pub(crate) fn allow_restore(&self, owner: SubId, msr: u32, value: u64) {
        let mut r = self.restores();
        if !r.contains(&(owner, msr, value)) {
            r.push((owner, msr, value));
        }
    }

    /// Watches `msr` on every vCPU for `owner`; with `deny` writes are refused.
    pub(crate) fn add(&self, inner: &Inner, refs: &mut EventRefs, owner: SubId, msr: u32, deny: bool) -> Result<()> {
        // The owner is recorded first, so that the first event already
        // knows whether to refuse; the setup lock keeps other tools out.
        let first = {
            let mut o = self.lock();
            let owners = o.entry(msr).or_default();
            owners.push((owner, deny));
            owners.len() == 1
        };
        if !first {
            return Ok(());
        }
        let (vm, vcpus) = (&inner.vm, inner.vcpus);
        let watched = refs.enable(vm, vcpus, event::MSR).and_then(|()| {
            for v in 0..vcpus {
                if let Err(e) =
                    cmd(|| format!("watching MSR {msr:#x} on vCPU {v}"), on_vcpu(|| vm.control_msr(v, msr, true)))
                {
                    for u in 0..v {
                        let _ = vm.control_msr(u, msr, false);
                    }
                    refs.disable(vm, vcpus, event::MSR);
                    return Err(e);
                }
            }
            Ok(())
        });
        if watched.is_err() {
            self.lock().remove(&msr);
        }
        watched
    }

    /// Drops the owners `gone` says are gone; an MSR nobody watches any
    /// more is let go on every vCPU.
    pub(crate) fn release(&self, inner: &Inner, refs: &mut EventRefs, gone: &dyn Fn(SubId) -> bool) {
        self.restores().retain(|&(o, _, _)| !gone(o));
        let mut dead = Vec::new();
        self.lock().retain(|&msr, owners| {
            owners.retain(|&(o, _)| !gone(o));
            if owners.is_empty() {
                dead.push(msr);
            }
            !owners.is_empty()
        });
        for msr in dead {
            for v in 0..inner.vcpus {
                let _ = inner.vm.control_msr(v, msr, false);
            }
            refs.disable(&inner.vm, inner.vcpus, event::MSR);
        }
    }

    /// An MSR event: reports the write, refused when an owner denies it.
    pub(crate) fn on_write(&self, inner: &Inner, vcpu: u16, msr: u32, old: u64, new: u64) -> EventReply {
        let restore = self.restores().iter().any(|&(_, m, v)| m == msr && v == new);
        let deny = !restore && self.lock().get(&msr).is_some_and(|o| o.iter().any(|e| e.1));
        let who = inner.os.who(inner, vcpu);
        inner.subs.emit(&Record::Msr { who, msr, old, new, blocked: deny });
        if deny {
            EventReply::ContinueWith(old)
        } else {
            EventReply::Continue
        }
    }
}
