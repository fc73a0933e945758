//! The memslot layout that enforces a set of page restrictions: the kind of
//! slot each page needs and the fewest slots that cover a range.

use kvm_bindings::KVM_MEM_READONLY;
use std::collections::{BTreeMap, BTreeSet};
use ukvmi_wire::access;

/// What a memslot does with guest accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Ordinary RAM.
    Rw,
    /// Read-only: guest writes exit to the VMM.
    Ro,
    /// Mapped back for one instruction: writes allowed.
    TempRw,
    /// Mapped back for one instruction: writes still exit.
    TempRo,
}

impl Kind {
    pub(super) fn flags(self) -> u32 {
        match self {
            Kind::Ro | Kind::TempRo => KVM_MEM_READONLY,
            Kind::Rw | Kind::TempRw => 0,
        }
    }

    pub(super) fn merges_with(self, other: Kind) -> bool {
        self == other && matches!(self, Kind::Rw | Kind::Ro)
    }
}

/// The slot a page with these allowed accesses lives in (`None`: no slot).
pub(super) fn kind_for(allowed: u8) -> Option<Kind> {
    if allowed & (access::R | access::X) != access::R | access::X {
        None
    } else if allowed & access::W == 0 {
        Some(Kind::Ro)
    } else {
        Some(Kind::Rw)
    }
}

/// One memslot as we track it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seg {
    pub(super) len: u64,
    pub(super) kind: Kind,
    pub(super) slot: u32,
}

#[derive(Debug)]
pub(super) struct Inner {
    /// gfn → allowed accesses, only for pages that are not RWX.
    pub(super) allowed: BTreeMap<u64, u8>,
    /// gfn → how many vCPUs are stepping over a fetch on that page.
    pub(super) exec: BTreeMap<u64, u32>,
    /// Bumped by `clear`: tokens handed out before are void.
    pub(super) epoch: u64,
    /// The memslots, by first gfn.
    pub(super) segs: BTreeMap<u64, Seg>,
    /// Slot ids given back; the lowest is reused first, so RAM returns to
    /// slot 0 when it is whole again and ids stay small.
    pub(super) free: BTreeSet<u32>,
    pub(super) next_slot: u32,
}

pub(super) fn dec_exec(g: &mut Inner, gfn: u64) {
    if let Some(n) = g.exec.get_mut(&gfn) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            g.exec.remove(&gfn);
        }
    }
}

/// The slot holding `gfn`, if any.
pub(super) fn seg_at(segs: &BTreeMap<u64, Seg>, gfn: u64) -> Option<(u64, Seg)> {
    segs.range(..=gfn).next_back().filter(|(s, seg)| gfn < **s + seg.len).map(|(s, seg)| (*s, *seg))
}

/// The slot kind of one page now (`None`: no slot).
pub(super) fn page_kind(g: &Inner, gfn: u64) -> Option<Kind> {
    let allowed = g.allowed.get(&gfn).copied().unwrap_or(access::RWX);
    if g.exec.contains_key(&gfn) {
        Some(if allowed & access::W == 0 { Kind::TempRo } else { Kind::TempRw })
    } else {
        kind_for(allowed)
    }
}

/// The maximal slots covering `lo..hi`: (first gfn, pages, kind).
pub(super) fn desired(g: &Inner, lo: u64, hi: u64) -> Vec<(u64, u64, Kind)> {
    let mut special: Vec<u64> =
        g.allowed.range(lo..hi).map(|(k, _)| *k).chain(g.exec.range(lo..hi).map(|(k, _)| *k)).collect();
    special.sort_unstable();
    special.dedup();
    let mut out: Vec<(u64, u64, Kind)> = Vec::new();
    let mut push = |start: u64, len: u64, kind: Option<Kind>| {
        let Some(kind) = kind else { return };
        if let Some(last) = out.last_mut() {
            if last.0 + last.1 == start && last.2.merges_with(kind) {
                last.1 += len;
                return;
            }
        }
        out.push((start, len, kind));
    };
    let mut cur = lo;
    for gfn in special {
        if cur < gfn {
            push(cur, gfn - cur, Some(Kind::Rw));
        }
        push(gfn, 1, page_kind(g, gfn));
        cur = gfn + 1;
    }
    if cur < hi {
        push(cur, hi - cur, Some(Kind::Rw));
    }
    out
}
