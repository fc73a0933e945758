//! Which KVMI vCPU events are enabled, counted by the interceptions that need each.

use std::collections::HashMap;

use ukvmi_introspector::wire::event;
use ukvmi_introspector::Vm;

use crate::error::{cmd, on_vcpu, Result};

/// Reference counts of enabled vCPU events. Lives inside the monitor's
/// setup lock: only configuration (tools asking, subscriptions going, the
/// shutdown) enables or disables events, never the event thread.
#[derive(Debug, Default)]
pub(crate) struct EventRefs {
    counts: HashMap<u16, usize>,
}

impl EventRefs {
    /// One more interception needs `ev`: enables it on every vCPU when it
    /// is the first (undoing a partial enable on failure).
    pub(crate) fn enable(&mut self, vm: &Vm, vcpus: u16, ev: u16) -> Result<()> {
        if self.counts.get(&ev).copied().unwrap_or(0) == 0 {
            for v in 0..vcpus {
                let name = event::name(ev).unwrap_or("event");
                if let Err(e) =
                    cmd(|| format!("enabling {name} on vCPU {v}"), on_vcpu(|| vm.control_events(v, ev, true)))
                {
                    for u in 0..v {
                        let _ = vm.control_events(u, ev, false);
                    }
                    return Err(e);
                }
            }
        }
        *self.counts.entry(ev).or_insert(0) += 1;
        Ok(())
    }

    /// Adds `n` references to `ev`, which must already be enabled.
    pub(crate) fn add(&mut self, ev: u16, n: usize) {
        *self.counts.entry(ev).or_insert(0) += n;
    }

    /// One interception less needs `ev`: disables it on every vCPU after the last.
    pub(crate) fn disable(&mut self, vm: &Vm, vcpus: u16, ev: u16) {
        let Some(n) = self.counts.get_mut(&ev) else { return };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.counts.remove(&ev);
            for v in 0..vcpus {
                let _ = vm.control_events(v, ev, false);
            }
        }
    }
}
