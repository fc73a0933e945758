//! Page-access restrictions (`KVMI_VM_SET_PAGE_ACCESS`) on stock KVM, by
//! memslot surgery.
//!
//! KVM has no per-page permissions that userspace can set, but it has
//! memslots: a page whose writes are removed gets a `KVM_MEM_READONLY`
//! slot (guest writes exit with `KVM_EXIT_MMIO`, reads and fetches run
//! normally); a page whose reads or fetches are removed gets no slot at all
//! (reads and writes exit with `KVM_EXIT_MMIO`, a fetch stops with an
//! emulation failure). Everything else is ordinary RAM, in as few slots as
//! possible: maximal runs of pages of the same kind share one slot.
//!
//! Changing a page's kind deletes the slot holding it and adds the pieces.
//! KVM cannot shrink a slot in place, so for a moment the pieces are
//! missing. A vCPU running then would not only take MMIO exits on
//! unrestricted pages (which could be served), its page-table walks would
//! fail and KVM would inject #PF into the guest (seen on this host as
//! triple faults of the test guests). So every update runs with all vCPUs
//! out of guest mode: [`GuestGate`] keeps them from entering while it is
//! closed, and closing it kicks the ones inside and waits for them.
//!
//! A page mapped back for one instruction (stepping over an execute fault,
//! `begin_exec`/`end_exec`) gets its own one-page slot that never merges
//! with its neighbours, so mapping it back and unmapping it again touch
//! only that page.
//!
//! A page the CPU reads by itself (a paging structure of the guest, or its
//! GDT, IDT, LDT or TSS) must keep a memslot: KVM's page walk through a
//! page without one, or an exception delivery reading a gate or descriptor
//! from it, fails with no exit to us, and the guest gets a #PF it cannot
//! handle (it triple-faults). So removing R or X from such a page is
//! refused (`NotSupported`, `-KVM_EOPNOTSUPP`). Which pages they are is
//! decided with every vCPU out of guest mode, inside the update that would
//! unmap the page: each vCPU's special registers are read then
//! (`KVM_GET_SREGS` on a duplicate of its fd, registered with
//! [`PageAccess::add_vcpu`]) and its tables walked (`page_tables`). W
//! alone (a read-only slot) is accepted: KVM reads read-only slots.

mod gate;
mod layout;
mod sink;
#[cfg(test)]
mod tests;

pub(crate) use gate::GuestGate;
pub(crate) use sink::{set_region, GuestPages, SlotError, SlotSink};

use crate::error::SetupError;
use crate::page_tables::{self, CpuTables, Search};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use layout::{dec_exec, desired, kind_for, page_kind, seg_at, Inner, Kind, Seg};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use ukvmi_endpoint::{BackendError, BackendResult};
use ukvmi_wire::access;

const PAGE_SHIFT: u32 = 12;
/// Most memslots we ever use at once; KVM allows 32764 (per address space)
/// on the hosts we know, and other users of slots need room too.
pub(crate) const MAX_SLOTS: usize = 16_384;

/// How a vCPU sees one page right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageState {
    /// Allowed accesses (`access::RWX` when unrestricted).
    pub allowed: u8,
    /// Whether a memslot covers the page at this moment.
    pub mapped: bool,
}

/// A page mapped back for one instruction; give it back with `end_exec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExecToken {
    gfn: u64,
    epoch: u64,
}

/// The page-access state of one VM and the memslot layout that enforces it.
#[derive(Debug)]
pub(crate) struct PageAccess {
    inner: Mutex<Inner>,
    /// Bumped by every memslot update (while no vCPU is in guest mode), so
    /// a vCPU can tell whether an exit came from an older layout.
    generation: AtomicU64,
    /// Host address of gpa 0.
    host_base: u64,
    /// RAM size in pages.
    npages: u64,
    /// The vCPUs whose registers the check of `refuse_cpu_table` reads.
    vcpus: Mutex<Vcpus>,
}

/// vCPU fds registered by their threads once they run guest code.
#[derive(Debug, Default)]
struct Vcpus {
    /// How many vCPUs the VM has (`None`: none registered yet).
    count: Option<u16>,
    /// A duplicate of each running vCPU's fd (`None`: the dup failed).
    fds: BTreeMap<u16, Option<OwnedFd>>,
}

/// Whether this host can enforce page restrictions with memslots: read-only
/// slots, guest debug (to step over an execute fault), and a real split of
/// RAM's slot 0 into a read-write and a read-only slot and back. Returns
/// the manager (RAM back in slot 0 whole) or `None`; `Err` only when the
/// probe could not put slot 0 back, which leaves the VM unusable.
pub(crate) fn probe(kvm: &Kvm, vm: &VmFd, host_base: u64, ram_size: u64) -> Result<Option<PageAccess>, SetupError> {
    if kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_READONLY_MEM)) == 0
        || kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_SET_GUEST_DEBUG)) == 0
    {
        return Ok(None);
    }
    let pa = PageAccess::new(host_base, ram_size);
    let npages = pa.npages;
    if npages < 2 {
        return Ok(None);
    }
    let last = (npages - 1) << PAGE_SHIFT;
    let works = pa.set_with(vm, last, access::R | access::X).is_ok() && pa.clear_with(vm).is_ok();
    let g = pa.lock();
    let whole = g.segs.len() == 1 && g.segs.get(&0).is_some_and(|s| s.len == npages && s.kind == Kind::Rw);
    drop(g);
    match (works, whole) {
        (true, true) => Ok(Some(pa)),
        (false, true) => Ok(None),
        (_, false) => Err(SetupError::SlotZeroLost),
    }
}

impl PageAccess {
    /// All of RAM in slot 0 (which the caller has already registered).
    pub fn new(host_base: u64, ram_size: u64) -> PageAccess {
        let npages = ram_size >> PAGE_SHIFT;
        let mut segs = BTreeMap::new();
        segs.insert(0, Seg { len: npages, kind: Kind::Rw, slot: 0 });
        PageAccess {
            inner: Mutex::new(Inner {
                allowed: BTreeMap::new(),
                exec: BTreeMap::new(),
                epoch: 0,
                segs,
                free: BTreeSet::new(),
                next_slot: 1,
            }),
            generation: AtomicU64::new(0),
            host_base,
            npages,
            vcpus: Mutex::new(Vcpus::default()),
        }
    }

    /// Called by vCPU `index` (of `count`) once it is set up to run guest
    /// code: from then on the check reads its own registers. Until every
    /// vCPU has done so, the tables vCPUs start with (`CpuTables::boot`)
    /// count as in use too.
    pub fn add_vcpu(&self, index: u16, count: u16, fd: &VcpuFd) {
        // SAFETY: `fd` is open for the whole call (borrowed from the
        // caller), and the borrow ends inside it: the dup is what we keep.
        let fd = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        let mut v = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        v.count = Some(count);
        v.fds.insert(index, fd.try_clone_to_owned().ok());
    }

    /// The vCPU thread `index` ends: its fd is no longer read.
    pub fn remove_vcpu(&self, index: u16) {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).fds.remove(&index);
    }

    /// What every vCPU's CPU reads by itself now (call with every vCPU out
    /// of guest mode, where it cannot change), plus the boot state while
    /// some vCPU has not started.
    fn vcpu_tables(&self) -> BackendResult<Vec<CpuTables>> {
        let v = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = Vec::with_capacity(v.fds.len() + 1);
        for (i, fd) in &v.fds {
            let fd = fd.as_ref().ok_or_else(|| {
                BackendError::Failed(format!("vCPU {i}'s registers cannot be read (its fd could not be duplicated)"))
            })?;
            let tables = page_tables::vcpu_tables(fd)
                .map_err(|e| BackendError::Failed(format!("KVM_GET_SREGS of vCPU {i}: {e}")))?;
            all.push(tables);
        }
        if v.count.is_none_or(|n| v.fds.len() < usize::from(n)) {
            all.push(CpuTables::boot());
        }
        Ok(all)
    }

    /// The first page of what `cpus` read by themselves (page tables,
    /// descriptor tables) for which `wanted(gfn)` holds.
    fn find_cpu_table(cpus: &[CpuTables], ram: &dyn GuestPages, wanted: &dyn Fn(u64) -> bool) -> Option<u64> {
        let read = |gpa: u64, buf: &mut [u8]| ram.read_ram(gpa, buf);
        let roots: Vec<_> = cpus.iter().map(|c| c.paging).collect();
        match page_tables::find(&roots, wanted, &read, page_tables::MAX_TABLES) {
            Search::Found(hit) => return Some(hit.gfn),
            Search::NotFound | Search::GaveUp => {}
        }
        cpus.iter().flat_map(|c| page_tables::descriptor_pages(c, &read)).find(|gfn| wanted(*gfn))
    }

    /// The first page that this vCPU's CPU reads by itself (`cpu`: its
    /// page tables, descriptor tables) and that has no memslot now; to
    /// explain a triple fault.
    pub fn unmapped_table(&self, ram: &dyn GuestPages, cpu: CpuTables) -> Option<u64> {
        let g = self.lock();
        let unmapped = |gfn: u64| self.state_of(&g, gfn << PAGE_SHIFT).is_some_and(|s| !s.mapped);
        Self::find_cpu_table(&[cpu], ram, &unmapped).map(|gfn| gfn << PAGE_SHIFT)
    }

    /// Refuses (`NotSupported`) to take the memslot away from page `gfn`
    /// if the CPU of any vCPU reads it by itself: a paging structure or a
    /// descriptor table (GDT, IDT, LDT, TSS). Runs inside the update
    /// (every vCPU out of guest mode): what is walked is what is in use
    /// when the guest next runs. A walk that exceeds
    /// `page_tables::MAX_TABLES` lets the restriction through.
    fn refuse_cpu_table(&self, sink: &dyn SlotSink, gfn: u64) -> BackendResult<()> {
        let cpus = self.vcpu_tables()?;
        match Self::find_cpu_table(&cpus, sink, &|t| t == gfn) {
            Some(_) => Err(BackendError::NotSupported),
            None => Ok(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page holding `gpa`, as a vCPU must treat it now (waits for an
    /// update in progress). `None` outside RAM.
    pub fn state(&self, gpa: u64) -> Option<PageState> {
        self.state_of(&self.lock(), gpa)
    }

    fn state_of(&self, g: &Inner, gpa: u64) -> Option<PageState> {
        let gfn = gpa >> PAGE_SHIFT;
        if gfn >= self.npages {
            return None;
        }
        let allowed = g.allowed.get(&gfn).copied().unwrap_or(access::RWX);
        Some(PageState { allowed, mapped: seg_at(&g.segs, gfn).is_some() })
    }

    /// Runs `f` while no memslot update is in progress, so that vCPU
    /// ioctls that read guest memory (`KVM_TRANSLATE` walks the page
    /// tables) see every page where it belongs; `f` gets a lookup of
    /// page states as they are during the call.
    pub fn stable<R>(&self, f: impl FnOnce(&dyn Fn(u64) -> Option<PageState>) -> R) -> R {
        let g = self.lock();
        let lookup = |gpa: u64| self.state_of(&g, gpa);
        f(&lookup)
    }

    /// The layout's generation; read it while in guest mode (inside the
    /// gate), where no update can run.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Allowed accesses of the page holding `gpa` (`RWX` outside RAM).
    pub fn allowed(&self, gpa: u64) -> u8 {
        self.state(gpa).map_or(access::RWX, |s| s.allowed)
    }

    /// Every restricted page: its guest-physical address and allowed
    /// accesses, by address (for reports such as SIGUSR1's).
    pub fn restricted(&self) -> Vec<(u64, u8)> {
        self.lock().allowed.iter().map(|(&gfn, &allowed)| (gfn << PAGE_SHIFT, allowed)).collect()
    }

    /// Number of pages with restrictions and of memslots in use.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let g = self.lock();
        (g.allowed.len(), g.segs.len())
    }

    /// Sets the allowed accesses of the page at `gpa` (`RWX` forgets it).
    /// Taking the page's memslot away (R or X removed where both were
    /// allowed) is refused with `NotSupported` if the CPU reads the page by
    /// itself: a paging structure or descriptor table (see the module docs).
    pub fn set_with(&self, sink: &dyn SlotSink, gpa: u64, allowed: u8) -> BackendResult<()> {
        let gfn = gpa >> PAGE_SHIFT;
        if gfn >= self.npages {
            return Err(BackendError::Invalid(format!("gpa {gpa:#x} is not guest memory")));
        }
        let mut g = self.lock();
        let before = page_kind(&g, gfn);
        let unmaps = kind_for(g.allowed.get(&gfn).copied().unwrap_or(access::RWX)).is_some()
            && kind_for(allowed & access::RWX).is_none();
        let old = if allowed & access::RWX == access::RWX {
            g.allowed.remove(&gfn)
        } else {
            g.allowed.insert(gfn, allowed & access::RWX)
        };
        let check = || self.refuse_cpu_table(sink, gfn);
        let guard = unmaps.then_some(&check as &dyn Fn() -> BackendResult<()>);
        let res = if page_kind(&g, gfn) != before {
            self.relayout(sink, &mut g, gfn, guard)
        } else if let Some(check) = guard {
            // The page is mapped back for a step right now; the memslot
            // goes when the step ends (`end_exec`): check now.
            sink.begin_update();
            let r = check();
            sink.end_update();
            r
        } else {
            Ok(())
        };
        if res.is_err() {
            match old {
                Some(a) => g.allowed.insert(gfn, a),
                None => g.allowed.remove(&gfn),
            };
        }
        res
    }

    /// Forgets every restriction and puts RAM back in one slot.
    pub fn clear_with(&self, sink: &dyn SlotSink) -> BackendResult<()> {
        let mut g = self.lock();
        g.allowed.clear();
        g.exec.clear();
        g.epoch = g.epoch.wrapping_add(1);
        let whole = g.segs.len() == 1 && g.segs.get(&0).is_some_and(|s| s.len == self.npages && s.kind == Kind::Rw);
        if whole {
            return Ok(());
        }
        let starts: Vec<u64> = g.segs.keys().copied().collect();
        let mut first_err = None;
        sink.begin_update();
        self.generation.fetch_add(1, Ordering::SeqCst);
        for start in starts {
            if let Err(e) = self.remove(sink, &mut g, start) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.install(sink, &mut g, 0, self.npages, Kind::Rw) {
            first_err.get_or_insert(e);
        }
        sink.end_update();
        first_err.map_or(Ok(()), Err)
    }

    /// Maps the page at `gpa` back (as if fetches and reads were allowed)
    /// for one instruction; writes stay as restricted as they were.
    pub fn begin_exec(&self, sink: &dyn SlotSink, gpa: u64) -> BackendResult<ExecToken> {
        let gfn = gpa >> PAGE_SHIFT;
        if gfn >= self.npages {
            return Err(BackendError::Invalid(format!("gpa {gpa:#x} is not guest memory")));
        }
        let mut g = self.lock();
        let before = page_kind(&g, gfn);
        *g.exec.entry(gfn).or_insert(0) += 1;
        if page_kind(&g, gfn) != before {
            if let Err(e) = self.relayout(sink, &mut g, gfn, None) {
                dec_exec(&mut g, gfn);
                return Err(e);
            }
        }
        Ok(ExecToken { gfn, epoch: g.epoch })
    }

    /// Ends what `begin_exec` started (nothing if `clear` came in between).
    pub fn end_exec(&self, sink: &dyn SlotSink, token: ExecToken) -> BackendResult<()> {
        let mut g = self.lock();
        if token.epoch != g.epoch {
            return Ok(());
        }
        let before = page_kind(&g, token.gfn);
        dec_exec(&mut g, token.gfn);
        if page_kind(&g, token.gfn) != before {
            return self.relayout(sink, &mut g, token.gfn, None);
        }
        Ok(())
    }

    /// Re-derives the slots around `gfn`, whose kind just changed, and
    /// applies the difference: slots that no longer fit are deleted first
    /// (KVM forbids overlaps), then the new ones added. On failure the old
    /// slots are put back as far as KVM lets us. `guard` runs first, with
    /// every vCPU out of guest mode; its error cancels the update.
    fn relayout(
        &self,
        sink: &dyn SlotSink,
        g: &mut Inner,
        gfn: u64,
        guard: Option<&dyn Fn() -> BackendResult<()>>,
    ) -> BackendResult<()> {
        // The span: the slot holding gfn (or gfn alone) and the slots right
        // next to it, which may now merge with it. Outside the span nothing
        // changes: its edges separate pages whose kinds did not change and
        // that were already in different (maximal) slots.
        let (mut lo, mut hi) = seg_at(&g.segs, gfn).map_or((gfn, gfn + 1), |(s, seg)| (s, s + seg.len));
        if let Some((s, _)) = lo.checked_sub(1).and_then(|p| seg_at(&g.segs, p)) {
            lo = s;
        }
        if let Some((s, seg)) = seg_at(&g.segs, hi) {
            hi = s + seg.len;
        }
        let want = desired(g, lo, hi);
        let have: Vec<(u64, Seg)> = g.segs.range(lo..hi).map(|(s, seg)| (*s, *seg)).collect();
        let stale: Vec<(u64, Seg)> = have
            .iter()
            .filter(|(s, seg)| !want.iter().any(|(ws, wl, wk)| ws == s && *wl == seg.len && *wk == seg.kind))
            .copied()
            .collect();
        let fresh: Vec<(u64, u64, Kind)> = want
            .iter()
            .filter(|(ws, wl, wk)| !have.iter().any(|(s, seg)| s == ws && seg.len == *wl && seg.kind == *wk))
            .copied()
            .collect();
        if g.segs.len() - stale.len() + fresh.len() > MAX_SLOTS {
            return Err(BackendError::Failed(format!("this restriction would need more than {MAX_SLOTS} memslots")));
        }
        sink.begin_update();
        if let Some(Err(e)) = guard.map(|f| f()) {
            sink.end_update();
            return Err(e);
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        let res = self.apply(sink, g, &stale, &fresh);
        sink.end_update();
        res
    }

    /// Deletes `stale`, then adds `fresh`.
    fn apply(
        &self,
        sink: &dyn SlotSink,
        g: &mut Inner,
        stale: &[(u64, Seg)],
        fresh: &[(u64, u64, Kind)],
    ) -> BackendResult<()> {
        for (s, _) in stale {
            if let Err(e) = self.remove(sink, g, *s) {
                self.restore(sink, g, stale, &[]);
                return Err(e);
            }
        }
        let mut added = Vec::new();
        for (s, len, kind) in fresh {
            if let Err(e) = self.install(sink, g, *s, *len, *kind) {
                self.restore(sink, g, stale, &added);
                return Err(e);
            }
            added.push(*s);
        }
        Ok(())
    }

    /// Best effort after a failed update: drop what was added, put back
    /// what was removed.
    fn restore(&self, sink: &dyn SlotSink, g: &mut Inner, removed: &[(u64, Seg)], added: &[u64]) {
        for s in added {
            let _ = self.remove(sink, g, *s);
        }
        for (s, seg) in removed {
            if !g.segs.contains_key(s) {
                let _ = self.install(sink, g, *s, seg.len, seg.kind);
            }
        }
    }

    fn region(&self, slot: u32, start: u64, len: u64, kind: Kind) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot,
            flags: kind.flags(),
            guest_phys_addr: start << PAGE_SHIFT,
            memory_size: len << PAGE_SHIFT,
            userspace_addr: self.host_base + (start << PAGE_SHIFT),
        }
    }

    fn install(&self, sink: &dyn SlotSink, g: &mut Inner, start: u64, len: u64, kind: Kind) -> BackendResult<()> {
        let slot = match g.free.pop_first() {
            Some(s) => s,
            None => {
                let s = g.next_slot;
                g.next_slot += 1;
                s
            }
        };
        match sink.set_region(self.region(slot, start, len, kind)) {
            Ok(()) => {
                g.segs.insert(start, Seg { len, kind, slot });
                Ok(())
            }
            Err(e) => {
                g.free.insert(slot);
                Err(BackendError::Failed(format!(
                    "KVM_SET_USER_MEMORY_REGION (slot {slot}, gpa {:#x}, {len} pages, {kind:?}): {e}",
                    start << PAGE_SHIFT
                )))
            }
        }
    }

    fn remove(&self, sink: &dyn SlotSink, g: &mut Inner, start: u64) -> BackendResult<()> {
        let Some(seg) = g.segs.get(&start).copied() else { return Ok(()) };
        let region = kvm_userspace_memory_region { memory_size: 0, ..self.region(seg.slot, start, seg.len, seg.kind) };
        sink.set_region(region).map_err(|e| {
            BackendError::Failed(format!("deleting memslot {} (gpa {:#x}): {e}", seg.slot, start << PAGE_SHIFT))
        })?;
        g.segs.remove(&start);
        g.free.insert(seg.slot);
        Ok(())
    }
}
