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

use crate::page_tables::{self, CpuTables, Search};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use ukvmi_endpoint::{BackendError, BackendResult};
use ukvmi_wire::access;

const PAGE_SHIFT: u32 = 12;
/// Most memslots we ever use at once; KVM allows 32764 (per address space)
/// on the hosts we know, and other users of slots need room too.
pub(crate) const MAX_SLOTS: usize = 16_384;

/// What a memslot does with guest accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
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
    fn flags(self) -> u32 {
        match self {
            Kind::Ro | Kind::TempRo => KVM_MEM_READONLY,
            Kind::Rw | Kind::TempRw => 0,
        }
    }

    fn merges_with(self, other: Kind) -> bool {
        self == other && matches!(self, Kind::Rw | Kind::Ro)
    }
}

/// The slot a page with these allowed accesses lives in (`None`: no slot).
fn kind_for(allowed: u8) -> Option<Kind> {
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
struct Seg {
    len: u64,
    kind: Kind,
    slot: u32,
}

/// Guest RAM as the page-table walk reads it (`page_tables`).
pub(crate) trait GuestPages {
    /// Fills `buf` from guest-physical `gpa`; false if that is not RAM.
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

/// The VM's RAM.
impl GuestPages for crate::vm::VmShared {
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.ram.read(gpa, buf).is_ok()
    }
}

/// A bare VM fd (the probe): no guest, no tables.
impl GuestPages for VmFd {
    fn read_ram(&self, _gpa: u64, _buf: &mut [u8]) -> bool {
        false
    }
}

/// Where memslot changes go: KVM, or a recorder in unit tests; it also
/// reads the RAM of the guest whose layout it changes.
pub(crate) trait SlotSink: GuestPages {
    /// `KVM_SET_USER_MEMORY_REGION` (a size of 0 deletes the slot).
    fn set_region(&self, region: kvm_userspace_memory_region) -> Result<(), String>;
    /// Called before the first change of an update: no vCPU may be in
    /// guest mode until `end_update`.
    fn begin_update(&self) {}
    /// The update is over.
    fn end_update(&self) {}
}

/// `KVM_SET_USER_MEMORY_REGION` on a VM fd.
pub(crate) fn set_region(vm: &VmFd, region: kvm_userspace_memory_region) -> Result<(), String> {
    // SAFETY: every region we pass lies inside guest RAM's own mapping
    // (`host_base` + gpa, bounded by the RAM size checked in `set_with`),
    // which lives as long as the VM; a size of 0 only deletes.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| e.to_string())
}

impl SlotSink for VmFd {
    fn set_region(&self, region: kvm_userspace_memory_region) -> Result<(), String> {
        set_region(self, region)
    }
}

/// Keeps vCPUs out of guest mode while memslots change. vCPU threads wrap
/// each `KVM_RUN` in [`GuestGate::enter`]; an updater calls
/// [`GuestGate::close`] with a function that kicks every vCPU, and
/// [`GuestGate::open`] when done. Updaters are serialised by the caller
/// (the page-access lock).
#[derive(Debug, Default)]
pub(crate) struct GuestGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// vCPU threads inside `KVM_RUN`.
    inside: u32,
    /// Closed: nobody may enter.
    closed: bool,
}

/// A vCPU thread inside `KVM_RUN`; leaves on drop.
#[derive(Debug)]
pub(crate) struct Inside<'a>(&'a GuestGate);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.inside = s.inside.saturating_sub(1);
        if s.inside == 0 {
            self.0.changed.notify_all();
        }
    }
}

impl GuestGate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits while the gate is closed, then counts the caller in.
    pub fn enter(&self) -> Inside<'_> {
        let mut s = self.lock();
        while s.closed {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.inside += 1;
        Inside(self)
    }

    /// Closes the gate and returns once no vCPU is in guest mode; `kick`
    /// pulls them out (called again every millisecond while some remain,
    /// in case a kick raced with an entry).
    pub fn close(&self, kick: &dyn Fn()) {
        self.lock().closed = true;
        loop {
            kick();
            let s = self.lock();
            if s.inside == 0 {
                return;
            }
            let (s, _) = self.changed.wait_timeout(s, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner());
            if s.inside == 0 {
                return;
            }
        }
    }

    /// Lets vCPUs enter again.
    pub fn open(&self) {
        self.lock().closed = false;
        self.changed.notify_all();
    }
}

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

#[derive(Debug)]
struct Inner {
    /// gfn → allowed accesses, only for pages that are not RWX.
    allowed: BTreeMap<u64, u8>,
    /// gfn → how many vCPUs are stepping over a fetch on that page.
    exec: BTreeMap<u64, u32>,
    /// Bumped by `clear`: tokens handed out before are void.
    epoch: u64,
    /// The memslots, by first gfn.
    segs: BTreeMap<u64, Seg>,
    /// Slot ids given back; the lowest is reused first, so RAM returns to
    /// slot 0 when it is whole again and ids stay small.
    free: BTreeSet<u32>,
    next_slot: u32,
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
pub(crate) fn probe(kvm: &Kvm, vm: &VmFd, host_base: u64, ram_size: u64) -> Result<Option<PageAccess>, String> {
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
        (_, false) => Err("probing read-only memslots left guest RAM without its memslot".into()),
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

fn dec_exec(g: &mut Inner, gfn: u64) {
    if let Some(n) = g.exec.get_mut(&gfn) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            g.exec.remove(&gfn);
        }
    }
}

/// The slot holding `gfn`, if any.
fn seg_at(segs: &BTreeMap<u64, Seg>, gfn: u64) -> Option<(u64, Seg)> {
    segs.range(..=gfn).next_back().filter(|(s, seg)| gfn < **s + seg.len).map(|(s, seg)| (*s, *seg))
}

/// The slot kind of one page now (`None`: no slot).
fn page_kind(g: &Inner, gfn: u64) -> Option<Kind> {
    let allowed = g.allowed.get(&gfn).copied().unwrap_or(access::RWX);
    if g.exec.contains_key(&gfn) {
        Some(if allowed & access::W == 0 { Kind::TempRo } else { Kind::TempRw })
    } else {
        kind_for(allowed)
    }
}

/// The maximal slots covering `lo..hi`: (first gfn, pages, kind).
fn desired(g: &Inner, lo: u64, hi: u64) -> Vec<(u64, u64, Kind)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// Records the live slots like KVM does, refusing overlaps.
    #[derive(Default)]
    struct Fake {
        live: RefCell<BTreeMap<u32, kvm_userspace_memory_region>>,
        calls: RefCell<usize>,
        fail_after: RefCell<Option<usize>>,
        /// Guest RAM pages with content (the rest reads as not RAM).
        ram: RefCell<BTreeMap<u64, [u8; 4096]>>,
    }

    impl Fake {
        fn put64(&self, gpa: u64, v: u64) {
            let mut ram = self.ram.borrow_mut();
            let page = ram.entry(gpa & !0xfff).or_insert([0; 4096]);
            let o = (gpa & 0xfff) as usize;
            page[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    impl GuestPages for Fake {
        fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let o = (gpa & 0xfff) as usize;
            let ram = self.ram.borrow();
            match ram.get(&(gpa & !0xfff)).and_then(|p| p.get(o..o + buf.len())) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    impl SlotSink for Fake {
        fn set_region(&self, r: kvm_userspace_memory_region) -> Result<(), String> {
            *self.calls.borrow_mut() += 1;
            let fail_now = {
                let mut f = self.fail_after.borrow_mut();
                match f.as_mut() {
                    Some(0) => {
                        *f = None;
                        true
                    }
                    Some(n) => {
                        *n -= 1;
                        false
                    }
                    None => false,
                }
            };
            if fail_now {
                return Err("injected failure".into());
            }
            let mut live = self.live.borrow_mut();
            if r.memory_size == 0 {
                live.remove(&r.slot).ok_or("no such slot")?;
                return Ok(());
            }
            if live.contains_key(&r.slot) {
                return Err("slot id in use".into());
            }
            let end = r.guest_phys_addr + r.memory_size;
            if live.values().any(|o| r.guest_phys_addr < o.guest_phys_addr + o.memory_size && o.guest_phys_addr < end) {
                return Err("overlap".into());
            }
            assert_eq!(r.userspace_addr, BASE + r.guest_phys_addr);
            live.insert(r.slot, r);
            Ok(())
        }
    }

    const BASE: u64 = 0x7f00_0000_0000;
    const PAGES: u64 = 64;

    /// A VM whose vCPUs all ended: no page tables are in use.
    fn setup() -> (PageAccess, Fake) {
        let (pa, fake) = setup_booting();
        pa.vcpus.lock().unwrap().count = Some(0);
        (pa, fake)
    }

    /// A VM whose vCPUs have not started: they will use the boot tables.
    fn setup_booting() -> (PageAccess, Fake) {
        let fake = Fake::default();
        fake.live.borrow_mut().insert(
            0,
            kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: PAGES << 12,
                userspace_addr: BASE,
            },
        );
        (PageAccess::new(BASE, PAGES << 12), fake)
    }

    /// Per page: None (no slot), Some(read-only?).
    fn map(fake: &Fake) -> Vec<Option<bool>> {
        let mut m = vec![None; PAGES as usize];
        for r in fake.live.borrow().values() {
            for p in (r.guest_phys_addr >> 12)..((r.guest_phys_addr + r.memory_size) >> 12) {
                m[p as usize] = Some(r.flags & KVM_MEM_READONLY != 0);
            }
        }
        m
    }

    /// The live slots are maximal runs of equal kind (temporary pages alone).
    fn assert_maximal(pa: &PageAccess, fake: &Fake) {
        let g = pa.lock();
        let live = fake.live.borrow();
        assert_eq!(live.len(), g.segs.len());
        let segs: Vec<(u64, Seg)> = g.segs.iter().map(|(s, seg)| (*s, *seg)).collect();
        for w in segs.windows(2) {
            let ((a, sa), (b, sb)) = (w[0], w[1]);
            assert!(!(a + sa.len == b && sa.kind.merges_with(sb.kind)), "{segs:?} not maximal");
        }
        for (s, seg) in &segs {
            let r = live.get(&seg.slot).expect("tracked slot is live");
            assert_eq!((r.guest_phys_addr >> 12, r.memory_size >> 12), (*s, seg.len));
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(kind_for(access::RWX), Some(Kind::Rw));
        assert_eq!(kind_for(access::R | access::X), Some(Kind::Ro));
        assert_eq!(kind_for(access::R | access::W), None);
        assert_eq!(kind_for(access::W | access::X), None);
        assert_eq!(kind_for(0), None);
    }

    #[test]
    fn split_and_merge_back() {
        let (pa, fake) = setup();
        pa.set_with(&fake, 10 << 12, access::R | access::X).unwrap();
        let m = map(&fake);
        assert_eq!(m[10], Some(true));
        assert!(m.iter().enumerate().all(|(i, p)| i == 10 || *p == Some(false)));
        assert_eq!(fake.live.borrow().len(), 3);
        // A neighbour with the same restriction joins its slot.
        pa.set_with(&fake, 11 << 12, access::R | access::X).unwrap();
        assert_eq!(fake.live.borrow().len(), 3);
        assert_eq!(map(&fake)[11], Some(true));
        // Read removed: no slot.
        pa.set_with(&fake, 11 << 12, access::W | access::X).unwrap();
        assert_eq!(map(&fake)[11], None);
        assert_eq!(pa.state(11 << 12), Some(PageState { allowed: access::W | access::X, mapped: false }));
        assert_maximal(&pa, &fake);
        // Same kind again: no slot work at all.
        let calls = *fake.calls.borrow();
        pa.set_with(&fake, 11 << 12, access::W).unwrap();
        assert_eq!(*fake.calls.borrow(), calls);
        // Forget both: back to one slot.
        pa.set_with(&fake, 11 << 12, access::RWX).unwrap();
        pa.set_with(&fake, 10 << 12, access::RWX).unwrap();
        assert_eq!(fake.live.borrow().len(), 1);
        assert!(map(&fake).iter().all(|p| *p == Some(false)));
        assert_eq!(pa.counts(), (0, 1));
    }

    #[test]
    fn edges_and_bounds() {
        let (pa, fake) = setup();
        pa.set_with(&fake, 0, 0).unwrap();
        pa.set_with(&fake, (PAGES - 1) << 12, access::R | access::X).unwrap();
        let m = map(&fake);
        assert_eq!((m[0], m[1], m[PAGES as usize - 1]), (None, Some(false), Some(true)));
        assert_maximal(&pa, &fake);
        assert!(matches!(pa.set_with(&fake, PAGES << 12, 0), Err(BackendError::Invalid(_))));
        assert_eq!(pa.state(PAGES << 12), None);
        pa.clear_with(&fake).unwrap();
        assert_eq!(fake.live.borrow().len(), 1);
        assert!(fake.live.borrow().contains_key(&0), "RAM is back in slot 0");
        assert!(map(&fake).iter().all(|p| *p == Some(false)));
    }

    #[test]
    fn random_walk_stays_consistent() {
        let (pa, fake) = setup();
        let mut want = [access::RWX; PAGES as usize];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = (x % PAGES) as usize;
            let allowed = ((x >> 8) % 8) as u8;
            pa.set_with(&fake, (page as u64) << 12, allowed).unwrap();
            want[page] = allowed;
            let m = map(&fake);
            for (i, a) in want.iter().enumerate() {
                let expect = kind_for(*a).map(|k| k == Kind::Ro);
                assert_eq!(m[i], expect, "page {i} allowed {a}");
                assert_eq!(pa.allowed((i as u64) << 12), *a);
            }
            assert_maximal(&pa, &fake);
        }
    }

    #[test]
    fn exec_override_is_its_own_slot() {
        let (pa, fake) = setup();
        pa.set_with(&fake, 5 << 12, access::R | access::W).unwrap(); // X removed
        pa.set_with(&fake, 6 << 12, access::R | access::W).unwrap();
        assert_eq!(map(&fake)[5], None);
        let t = pa.begin_exec(&fake, 5 << 12).unwrap();
        assert_eq!(map(&fake)[5], Some(false));
        assert_eq!(map(&fake)[6], None);
        assert_eq!(pa.allowed(5 << 12), access::R | access::W, "still restricted");
        let t2 = pa.begin_exec(&fake, 5 << 12).unwrap(); // a second vCPU
        pa.end_exec(&fake, t).unwrap();
        assert_eq!(map(&fake)[5], Some(false), "the other vCPU still steps");
        pa.end_exec(&fake, t2).unwrap();
        assert_eq!(map(&fake)[5], None);
        assert_maximal(&pa, &fake);
        // Write-protected too: mapped back read-only.
        pa.set_with(&fake, 5 << 12, access::R).unwrap();
        let t = pa.begin_exec(&fake, 5 << 12).unwrap();
        assert_eq!(map(&fake)[5], Some(true));
        // A clear in between voids the token.
        pa.clear_with(&fake).unwrap();
        pa.end_exec(&fake, t).unwrap();
        assert_eq!(fake.live.borrow().len(), 1);
    }

    /// On real KVM: the probe succeeds here and leaves RAM whole in slot 0;
    /// real splits and merges are accepted by KVM.
    #[test]
    #[allow(clippy::panic)]
    fn probe_and_real_slots_on_this_host() {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            panic!("this test uses /dev/kvm, which cannot be opened: {e}");
        }
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let ram = crate::memory::GuestRam::new(4 << 20).unwrap();
        let base = ram.host_base().unwrap();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: base,
        };
        set_region(&vm, region).unwrap();
        let pa = probe(&kvm, &vm, base, ram.size()).unwrap().expect("this host has read-only memslots and guest debug");
        assert_eq!(pa.counts(), (0, 1));
        assert_eq!(pa.lock().segs.get(&0).map(|s| s.slot), Some(0));
        pa.set_with(&vm, 0x10_0000, access::R | access::X).unwrap();
        pa.set_with(&vm, 0x10_1000, 0).unwrap();
        let t = pa.begin_exec(&vm, 0x10_1000).unwrap();
        assert_eq!(pa.counts(), (2, 4), "RAM, read-only page, stepped-over page (own slot), RAM");
        pa.end_exec(&vm, t).unwrap();
        pa.set_with(&vm, 0x10_0000, access::RWX).unwrap();
        assert_eq!(pa.counts(), (1, 2));
        pa.clear_with(&vm).unwrap();
        assert_eq!(pa.counts(), (0, 1));
        // KVM agrees that slot 0 is whole again: re-registering it unchanged is accepted.
        set_region(&vm, region).unwrap();
    }

    #[test]
    fn unmapping_a_page_table_is_refused() {
        let (pa, fake) = setup_booting();
        // The boot tables (CR3 0x1000): PML4 → PDPT 0x2000 → PD 0x3000,
        // whose entries 0 and 2 point to page tables at 0x4000 and 0x8000
        // and entry 1 maps a 2 MiB page.
        assert_eq!(CpuTables::boot().paging.cr3, 0x1000);
        fake.put64(0x1000, 0x2003);
        fake.put64(0x2000, 0x3003);
        fake.put64(0x3000, 0x4003);
        fake.put64(0x3008, 0x20_0083);
        fake.put64(0x3010, 0x8003);
        for t in [0x1000, 0x2000, 0x3000, 0x4000, 0x8000] {
            for a in [access::W | access::X, access::R | access::W, 0, access::R] {
                let calls = *fake.calls.borrow();
                assert!(matches!(pa.set_with(&fake, t + 8, a), Err(BackendError::NotSupported)), "{t:#x} {a}");
                assert_eq!(*fake.calls.borrow(), calls, "no memslot touched");
                assert_eq!(pa.allowed(t), access::RWX, "nothing recorded");
            }
        }
        // Write protection keeps the slot: accepted, and then R cannot go.
        pa.set_with(&fake, 0x3000, access::R | access::X).unwrap();
        assert_eq!(map(&fake)[3], Some(true));
        assert!(matches!(pa.set_with(&fake, 0x3000, access::X), Err(BackendError::NotSupported)));
        assert_eq!(pa.allowed(0x3000), access::R | access::X, "the old restriction stays");
        assert_eq!(map(&fake)[3], Some(true));
        pa.set_with(&fake, 0x3000, access::RWX).unwrap();
        // Data pages are restricted as before.
        for d in [0x5000, 0x6000, 0x9000] {
            pa.set_with(&fake, d, 0).unwrap();
            assert_eq!(map(&fake)[(d >> 12) as usize], None);
        }
        // A page table mapped back for a step: the restriction is checked
        // at once (its slot would go when the step ends).
        let t = pa.begin_exec(&fake, 0x8000).unwrap();
        assert!(matches!(pa.set_with(&fake, 0x8000, access::R | access::W), Err(BackendError::NotSupported)));
        pa.end_exec(&fake, t).unwrap();
        assert_eq!(map(&fake)[8], Some(false));
        // The boot GDT's page (0x500, identity-mapped by a 2 MiB page).
        fake.put64(0x3000, 0x83);
        assert!(matches!(pa.set_with(&fake, 0x500, access::R | access::W), Err(BackendError::NotSupported)));
        pa.set_with(&fake, 0x500, access::R | access::X).unwrap();
        pa.set_with(&fake, 0x500, access::RWX).unwrap();
        // Once every vCPU has ended, the boot tables are nobody's.
        pa.vcpus.lock().unwrap().count = Some(0);
        pa.set_with(&fake, 0x1000, 0).unwrap();
        assert_eq!(map(&fake)[1], None);
        assert_maximal(&pa, &fake);
    }

    #[test]
    fn failed_update_rolls_back() {
        let (pa, fake) = setup();
        *fake.fail_after.borrow_mut() = Some(2); // delete ok, first add ok, second add fails
        assert!(pa.set_with(&fake, 20 << 12, 0).is_err());
        *fake.fail_after.borrow_mut() = None;
        assert_eq!(pa.allowed(20 << 12), access::RWX);
        assert!(map(&fake).iter().all(|p| *p == Some(false)), "RAM fully mapped again");
        assert_maximal(&pa, &fake);
        pa.set_with(&fake, 20 << 12, 0).unwrap();
        assert_eq!(map(&fake)[20], None);
    }
}
