//! The page guard: takes access rights away from guest pages, reports the faults, and can refuse writes.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use ukvmi_introspector::wire::{access, event};
use ukvmi_introspector::{EventReply, VcpuEventMsg};

use crate::{
    engine::Inner,
    error::{cmd, MonitorError, Result},
    events::EventRefs,
    record::Record,
    subs::SubId,
};

/// Most pages one SET_PAGE_ACCESS command carries.
const MAX_PAGES: usize = 511;

/// One owner's restriction of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hold {
    owner: SubId,
    deny: bool,
    /// The access bits it removed.
    removed: u8,
}

type Pages = BTreeMap<u64, Vec<Hold>>;

/// The access a page keeps once `holds` have taken theirs.
fn left(holds: &[Hold]) -> u8 {
    access::RWX & !holds.iter().fold(0, |a, h| a | h.removed)
}

/// The page policy: page gpa → who restricts it and how.
#[derive(Debug, Default)]
pub(crate) struct PageGuard {
    pages: Mutex<Pages>,
}

impl PageGuard {
    fn lock(&self) -> MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the `remove` access bits away from the pages covering
    /// `gpa..gpa+len` for `owner`. Returns the pages.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(
        &self,
        inner: &Inner,
        refs: &mut EventRefs,
        owner: SubId,
        gpa: u64,
        len: u64,
        remove: u8,
        deny: bool,
    ) -> Result<Vec<u64>> {
        if len == 0 || remove & access::RWX == 0 {
            return Err(MonitorError::Invalid("nothing to protect".into()));
        }
        let first = gpa & !0xfff;
        let last = gpa.checked_add(len - 1).ok_or_else(|| MonitorError::Invalid("range overflows".into()))? & !0xfff;
        let count = (last - first) / 0x1000 + 1;
        if count > MAX_PAGES as u64 {
            return Err(MonitorError::Invalid(format!("{count} pages: at most {MAX_PAGES} at a time")));
        }
        let pages: Vec<u64> = (first..=last).step_by(0x1000).collect();
        refs.enable(&inner.vm, inner.vcpus, event::PF)?;
        // Record the holds first (the first fault already knows whether to
        // refuse); the setup lock keeps other tools' changes out.
        let hold = Hold { owner, deny, removed: remove };
        let entries: Vec<(u64, u8)> = {
            let mut p = self.lock();
            pages
                .iter()
                .map(|&page| {
                    let holds = p.entry(page).or_default();
                    holds.push(hold);
                    (page, left(holds))
                })
                .collect()
        };
        if let Err(e) = cmd(
            || format!("KVMI_VM_SET_PAGE_ACCESS on {} page(s) from {first:#x}", pages.len()),
            inner.vm.set_page_access(&entries),
        ) {
            let mut p = self.lock();
            for page in &pages {
                if let Some(holds) = p.get_mut(page) {
                    if let Some(i) = holds.iter().rposition(|h| *h == hold) {
                        holds.remove(i);
                    }
                    if holds.is_empty() {
                        p.remove(page);
                    }
                }
            }
            drop(p);
            refs.disable(&inner.vm, inner.vcpus, event::PF);
            return Err(e);
        }
        // One PF reference per page hold, as release drops them.
        refs.add(event::PF, pages.len() - 1);
        Ok(pages)
    }

    /// Drops the holds of owners `gone` says are gone and gives their pages
    /// back the access nobody else takes.
    pub(crate) fn release(&self, inner: &Inner, refs: &mut EventRefs, gone: &dyn Fn(SubId) -> bool) {
        let mut changed: Vec<(u64, u8)> = Vec::new();
        let mut dropped = 0usize;
        self.lock().retain(|&page, holds| {
            let before = holds.len();
            holds.retain(|h| !gone(h.owner));
            if holds.len() != before {
                changed.push((page, left(holds)));
                dropped += before - holds.len();
            }
            !holds.is_empty()
        });
        for chunk in changed.chunks(MAX_PAGES) {
            let _ = inner.vm.set_page_access(chunk);
        }
        for _ in 0..dropped {
            refs.disable(&inner.vm, inner.vcpus, event::PF);
        }
    }

    /// A PF event: reports the access; a write to a page an owner denies is
    /// refused (the instruction skipped).
    pub(crate) fn on_fault(&self, inner: &Inner, ev: &VcpuEventMsg, gva: u64, gpa: u64, acc: u8) -> EventReply {
        let v = ev.vcpu.raw();
        let page = gpa & !0xfff;
        let deny = acc & access::W != 0 && self.lock().get(&page).is_some_and(|o| o.iter().any(|h| h.deny));
        let who = inner.os.who(inner, v);
        let kind = if acc & access::W != 0 {
            'w'
        } else if acc & access::X != 0 {
            'x'
        } else {
            'r'
        };
        // Refusing a write: on this VMM RIP is already past the store;
        // SET_REGISTERS + RETRY drops the write.
        let blocked = deny && inner.vm.set_registers(v, &ev.regs).is_ok();
        inner.subs.emit(&Record::Page { who, gpa, gva, access: kind, rip: ev.regs.rip, blocked });
        if blocked {
            EventReply::Retry
        } else {
            EventReply::Continue
        }
    }
}
