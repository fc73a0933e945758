//! The event engine: one thread takes every event from the connection and
//! answers it according to the interceptions the tools asked for.
//!
//! Interceptions belong to subscriptions. A tool (a `ukvmi trace` client,
//! the demo) subscribes, asks for interceptions, and reads records; when
//! its [`Subscription`] is dropped, everything it asked for is undone (the
//! breakpoint bytes restored, MSRs unwatched, page access given back).
//!
//! Breakpoints are planted as an `int3` byte over the first byte of the
//! instruction. A hit is stepped over without losing the breakpoint: the
//! original byte goes back, the vCPU single-steps that one instruction
//! (RETRY), and on the SINGLESTEP event the `int3` is planted again. While
//! the byte is out, another vCPU that reaches the address runs the real
//! instruction (and is not reported): a hit can be missed, never broken.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ukvmi_introspector::{Event, EventKind, EventReply, GuestMemoryMap, VcpuEventMsg, Vm};
use ukvmi_wire::{access, event};

use crate::{
    guestos::{self, sys, PhysRead},
    record::{msr_name, Record, Who},
    symbols::SymbolMap,
};

/// An error from the monitor, with what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// A KVMI command failed.
    #[error("{what}: {source}")]
    Command {
        /// What the monitor was doing.
        what: String,
        /// The client library's error.
        #[source]
        source: ukvmi_introspector::Error,
    },
    /// The request makes no sense for this VM.
    #[error("{0}")]
    Invalid(String),
    /// The monitor has stopped (the VM went away).
    #[error("the connection to the VM is closed")]
    Closed,
    /// Waiting for the guest took too long.
    #[error("{0}")]
    Timeout(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, MonitorError>;

fn cmd<T>(what: impl FnOnce() -> String, r: ukvmi_introspector::Result<T>) -> Result<T> {
    r.map_err(|source| MonitorError::Command { what: what(), source })
}

/// Runs a vCPU command, retrying while the vCPU is not up yet (`-KVM_EAGAIN`:
/// a guest starts its other vCPUs some time after the VM starts), for up to
/// `VCPU_UP_WAIT`.
fn on_vcpu<T>(mut f: impl FnMut() -> ukvmi_introspector::Result<T>) -> ukvmi_introspector::Result<T> {
    let end = Instant::now() + VCPU_UP_WAIT;
    loop {
        match f() {
            Err(e) if e.errno() == Some(ukvmi_wire::KvmErrno::Eagain) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

/// How long a vCPU command waits for a vCPU the guest has not started yet.
const VCPU_UP_WAIT: Duration = Duration::from_secs(10);

/// Which records a subscription wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Kinds {
    /// Syscalls and other breakpoints.
    pub breakpoints: bool,
    /// MSR writes.
    pub msr: bool,
    /// Page accesses.
    pub pages: bool,
    /// Hypercalls.
    pub hypercalls: bool,
    /// Pause and resume.
    pub pauses: bool,
}

impl Kinds {
    /// Everything.
    pub const ALL: Kinds = Kinds { breakpoints: true, msr: true, pages: true, hypercalls: true, pauses: true };

    fn wants(&self, r: &Record) -> bool {
        match r {
            Record::Syscall { .. } | Record::Breakpoint { .. } => self.breakpoints,
            Record::Msr { .. } => self.msr,
            Record::Page { .. } => self.pages,
            Record::Hypercall { .. } => self.hypercalls,
            Record::Paused { .. } | Record::Resumed { .. } => self.pauses,
            Record::Unhook | Record::Detached { .. } | Record::Lost { .. } => true,
        }
    }
}

type SubId = u64;

struct Sub {
    id: SubId,
    kinds: Kinds,
    tx: mpsc::SyncSender<Record>,
    /// Records dropped because the reader fell behind, not yet reported.
    lost: u64,
}

/// Records a subscription may have waiting before newer ones are dropped
/// (and counted): a reader that stops must not grow the monitor forever.
const SUB_BACKLOG: usize = 10_000;

#[derive(Debug)]
struct Bp {
    orig: u8,
    syscall: bool,
    planted: bool,
    owners: Vec<SubId>,
}

#[derive(Debug, Default)]
struct State {
    subs: Vec<Sub>,
    next_id: SubId,
    bps: BTreeMap<u64, Bp>,
    /// vCPU → breakpoint gpa it is stepping over.
    stepping: HashMap<u16, u64>,
    /// MSR → (owner, deny).
    msrs: BTreeMap<u32, Vec<(SubId, bool)>>,
    /// Page gpa → (owner, deny, access bits removed).
    pages: BTreeMap<u64, Vec<(SubId, bool, u8)>>,
    /// Hypercall owners and their answer (None: observe only): the text and
    /// the guest's agent buffer it goes to.
    hypercalls: Vec<(SubId, Option<(String, u64)>)>,
    /// Events enabled on every vCPU, with how many interceptions need each.
    enabled: HashMap<u16, usize>,
    want_pause: BTreeSet<u16>,
    held: BTreeMap<u16, VcpuEventMsg>,
    /// Process names by pid (demo OS), refreshed on a miss.
    names: HashMap<u32, String>,
}

impl std::fmt::Debug for Sub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sub({})", self.id)
    }
}

struct Inner {
    vm: Arc<Vm>,
    /// The zero-copy view of guest RAM, when the VM grants one
    /// (`UKVMI_VM_MAP_MEMORY`); reads fall back to READ_PHYSICAL.
    map: Option<GuestMemoryMap>,
    /// The VM keeps an undo record of our code writes
    /// (`UKVMI_VM_WRITE_PHYSICAL_UNDO`): a monitor that dies leaves no int3.
    undo: bool,
    vcpus: u16,
    state: Mutex<State>,
    cond: Condvar,
    /// Set once the monitor has shut down (or the connection ended).
    stop: AtomicBool,
    /// Asks the event thread to shut down (it owns the last reads).
    stopping: AtomicBool,
    events: AtomicU64,
}

/// Counters for a summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// vCPU events handled.
    pub events: u64,
}

/// The engine; see the module documentation.
pub struct Monitor {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("vcpus", &self.inner.vcpus).finish()
    }
}

/// A tool's stream of records; dropping it undoes its interceptions.
pub struct Subscription {
    id: SubId,
    rx: mpsc::Receiver<Record>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Subscription({})", self.id)
    }
}

impl Subscription {
    /// The next record, waiting up to `timeout`. `Err` once the monitor
    /// has stopped and every record was taken.
    pub fn next(&self, timeout: Duration) -> std::result::Result<Option<Record>, MonitorError> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => Ok(Some(r)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(MonitorError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.inner.release(self.id);
    }
}

impl Monitor {
    /// Takes over `vm`: learns its vCPUs, enables PAUSE events, and starts
    /// the event thread.
    pub fn start(vm: Vm) -> Result<Monitor> {
        let vm = Arc::new(vm);
        let vcpus = cmd(|| "KVMI_VM_GET_INFO".into(), vm.get_info())?;
        let vcpus = u16::try_from(vcpus)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| MonitorError::Invalid(format!("the VM reports {vcpus} vCPUs")))?;
        let map = vm.map_memory().ok();
        let undo = vm.check_command(ukvmi_wire::msg::UKVMI_VM_WRITE_PHYSICAL_UNDO).is_ok();
        let inner = Arc::new(Inner {
            vm,
            map,
            undo,
            vcpus,
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            stop: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            events: AtomicU64::new(0),
        });
        {
            let mut st = inner.lock();
            inner.enable(&mut st, event::PAUSE)?;
        }
        // UNHOOK: when the VMM shuts down, undo the hooks before it goes.
        let _ = inner.vm.control_vm_events(event::UNHOOK, true);
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("ukvmi-monitor".into())
            .spawn(move || worker.event_loop())
            .map_err(|e| MonitorError::Invalid(format!("starting the event thread: {e}")))?;
        Ok(Monitor { inner, thread: Mutex::new(Some(thread)) })
    }

    /// The connection, for plain commands (registers, memory, translate).
    pub fn vm(&self) -> &Vm {
        &self.inner.vm
    }

    /// The zero-copy view of guest RAM, if the VM granted one.
    pub fn memory_map(&self) -> Option<&GuestMemoryMap> {
        self.inner.map.as_ref()
    }

    /// Reads guest physical memory: through the mapped view when there is
    /// one, else with READ_PHYSICAL a page at a time.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        self.inner.read_phys(gpa, buf)
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u16 {
        self.inner.vcpus
    }

    /// Whether the monitor is still attached.
    pub fn is_running(&self) -> bool {
        !self.inner.stop.load(Ordering::Relaxed) && !self.inner.vm.is_closed()
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        Stats { events: self.inner.events.load(Ordering::Relaxed) }
    }

    /// A new stream of the records of `kinds`.
    pub fn subscribe(&self, kinds: Kinds) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(SUB_BACKLOG);
        let mut st = self.inner.lock();
        st.next_id += 1;
        let id = st.next_id;
        st.subs.push(Sub { id, kinds, tx, lost: 0 });
        Subscription { id, rx, inner: Arc::clone(&self.inner) }
    }

    /// Traces syscalls: a breakpoint on the kernel's syscall entry at
    /// `entry_gva` (translated through vCPU 0's page tables).
    pub fn trace_syscalls(&self, sub: &Subscription, entry_gva: u64) -> Result<u64> {
        self.breakpoint(sub, entry_gva, true)
    }

    /// A breakpoint at `gva`; hits are reported as [`Record::Breakpoint`]
    /// (or as syscalls when `syscall`). Returns its gpa.
    pub fn breakpoint(&self, sub: &Subscription, gva: u64, syscall: bool) -> Result<u64> {
        let inner = &self.inner;
        let vm = &inner.vm;
        let gpa = cmd(|| format!("translating {gva:#x}"), vm.translate_gva(0, gva))?
            .ok_or_else(|| MonitorError::Invalid(format!("{gva:#x} is not mapped in vCPU 0's address space")))?;
        let mut st = inner.lock();
        if let Some(bp) = st.bps.get_mut(&gpa) {
            bp.owners.push(sub.id);
            bp.syscall |= syscall;
            return Ok(gpa);
        }
        inner.enable(&mut st, event::BREAKPOINT)?;
        let mut orig = [0u8];
        cmd(|| format!("reading the byte at {gpa:#x}"), vm.read_physical_into(gpa, &mut orig))?;
        if orig[0] == 0xcc {
            inner.disable(&mut st, event::BREAKPOINT);
            return Err(MonitorError::Invalid(format!("there is already an int3 at gpa {gpa:#x}")));
        }
        st.bps.insert(gpa, Bp { orig: orig[0], syscall, planted: false, owners: vec![sub.id] });
        if let Err(e) = cmd(|| format!("planting int3 at {gpa:#x}"), inner.write_code(gpa, 0xcc)) {
            st.bps.remove(&gpa);
            inner.disable(&mut st, event::BREAKPOINT);
            return Err(e);
        }
        if let Some(bp) = st.bps.get_mut(&gpa) {
            bp.planted = true;
        }
        Ok(gpa)
    }

    /// Watches guest writes of `msr` on every vCPU; with `deny` they are
    /// refused (the old value kept).
    pub fn watch_msr(&self, sub: &Subscription, msr: u32, deny: bool) -> Result<()> {
        let inner = &self.inner;
        let mut st = inner.lock();
        if !st.msrs.contains_key(&msr) {
            inner.enable(&mut st, event::MSR)?;
            for v in 0..inner.vcpus {
                if let Err(e) =
                    cmd(|| format!("watching MSR {msr:#x} on vCPU {v}"), on_vcpu(|| inner.vm.control_msr(v, msr, true)))
                {
                    for u in 0..v {
                        let _ = inner.vm.control_msr(u, msr, false);
                    }
                    inner.disable(&mut st, event::MSR);
                    return Err(e);
                }
            }
        }
        st.msrs.entry(msr).or_default().push((sub.id, deny));
        Ok(())
    }

    /// Takes the `remove` access bits (`r`, `w`, `x`: `access::*`) away from
    /// the pages covering `gpa..gpa+len`; with `deny`, writes are refused
    /// (the instruction skipped) instead of let through.
    pub fn protect(&self, sub: &Subscription, gpa: u64, len: u64, remove: u8, deny: bool) -> Result<Vec<u64>> {
        let inner = &self.inner;
        if len == 0 || remove & access::RWX == 0 {
            return Err(MonitorError::Invalid("nothing to protect".into()));
        }
        let first = gpa & !0xfff;
        let last = gpa.checked_add(len - 1).ok_or_else(|| MonitorError::Invalid("range overflows".into()))? & !0xfff;
        let count = (last - first) / 0x1000 + 1;
        if count > 511 {
            return Err(MonitorError::Invalid(format!("{count} pages: at most 511 at a time")));
        }
        let pages: Vec<u64> = (first..=last).step_by(0x1000).collect();
        let mut st = inner.lock();
        inner.enable(&mut st, event::PF)?;
        let entries: Vec<(u64, u8)> = pages
            .iter()
            .map(|p| {
                let taken = st.pages.get(p).map_or(0, |o| o.iter().fold(0, |a, e| a | e.2));
                (*p, access::RWX & !(taken | remove))
            })
            .collect();
        if let Err(e) = cmd(
            || format!("KVMI_VM_SET_PAGE_ACCESS on {} page(s) from {first:#x}", pages.len()),
            inner.vm.set_page_access(&entries),
        ) {
            inner.disable(&mut st, event::PF);
            return Err(e);
        }
        for p in &pages {
            st.pages.entry(*p).or_default().push((sub.id, deny, remove));
        }
        // One PF reference per page entry, as release drops them.
        *st.enabled.entry(event::PF).or_insert(1) += pages.len() - 1;
        Ok(pages)
    }

    /// Answers the guest's hypercall doorbell. With `Some((text, agent_buf))`
    /// the demo OS's agent call gets `text` back: it is written to the
    /// kernel's `agent_buf` (only when the call's R8 names exactly that
    /// buffer, so a guest with other conventions is never written to) and
    /// RAX is set to its length. With `None` calls are only reported.
    pub fn hypercalls(&self, sub: &Subscription, answer: Option<(String, u64)>) -> Result<()> {
        let inner = &self.inner;
        let mut st = inner.lock();
        inner.enable(&mut st, event::HYPERCALL)?;
        st.hypercalls.push((sub.id, answer));
        Ok(())
    }

    /// Holds every vCPU paused (in a PAUSE event) until [`resume_all`](Self::resume_all).
    pub fn pause_all(&self, timeout: Duration) -> Result<Vec<u16>> {
        let inner = &self.inner;
        let mut st = inner.lock();
        for v in 0..inner.vcpus {
            if st.want_pause.insert(v) && !st.held.contains_key(&v) {
                if let Err(e) = cmd(|| format!("KVMI_VM_PAUSE_VCPU {v}"), on_vcpu(|| inner.vm.pause_vcpu(v, false))) {
                    inner.resume_locked(&mut st);
                    return Err(e);
                }
            }
        }
        let deadline = Instant::now() + timeout;
        while st.held.len() < usize::from(inner.vcpus) {
            if inner.stop.load(Ordering::Relaxed) {
                return Err(MonitorError::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let msg = format!(
                    "only vCPUs {:?} paused within {timeout:?}; all let go again",
                    st.held.keys().collect::<Vec<_>>()
                );
                inner.resume_locked(&mut st);
                return Err(MonitorError::Timeout(msg));
            }
            st = inner
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
        Ok(st.held.keys().copied().collect())
    }

    /// Lets every held vCPU go. Returns the ones that were held.
    pub fn resume_all(&self) -> Result<Vec<u16>> {
        let mut st = self.inner.lock();
        Ok(self.inner.resume_locked(&mut st))
    }

    /// vCPUs held paused now.
    pub fn held(&self) -> Vec<u16> {
        self.inner.lock().held.keys().copied().collect()
    }

    /// Undoes every interception, lets held vCPUs go, stops the event
    /// thread and closes the connection.
    pub fn stop(&self) {
        // The event thread does the shutdown (it is the one reading events,
        // so it can answer the stragglers); if it is gone, do it here.
        self.inner.stopping.store(true, Ordering::SeqCst);
        let t = self.thread.lock().map_or_else(|e| e.into_inner().take(), |mut g| g.take());
        if let Some(t) = t {
            let _ = t.join();
        }
        self.inner.shutdown();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

impl PhysRead for Monitor {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        self.inner.read_phys(gpa, buf)
    }
}

impl PhysRead for Inner {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        match &self.map {
            Some(m) => m.read(gpa, buf).map_err(|e| e.to_string()),
            None => self.vm.read_phys(gpa, buf),
        }
    }
}

impl Inner {
    /// Writes one byte of guest code (an int3 or the byte it replaced): with
    /// the VM's undo record where it has one, so the VMM puts the original
    /// back if this monitor dies.
    fn write_code(&self, gpa: u64, byte: u8) -> ukvmi_introspector::Result<()> {
        if self.undo {
            self.vm.write_physical_undo(gpa, &[byte])
        } else {
            self.vm.write_physical(gpa, &[byte])
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enable(&self, st: &mut State, ev: u16) -> Result<()> {
        let n = st.enabled.entry(ev).or_insert(0);
        if *n == 0 {
            for v in 0..self.vcpus {
                let name = event::name(ev).unwrap_or("event");
                if let Err(e) =
                    cmd(|| format!("enabling {name} on vCPU {v}"), on_vcpu(|| self.vm.control_events(v, ev, true)))
                {
                    for u in 0..v {
                        let _ = self.vm.control_events(u, ev, false);
                    }
                    return Err(e);
                }
            }
        }
        *st.enabled.entry(ev).or_insert(0) += 1;
        Ok(())
    }

    fn disable(&self, st: &mut State, ev: u16) {
        let Some(n) = st.enabled.get_mut(&ev) else { return };
        *n = n.saturating_sub(1);
        if *n == 0 {
            st.enabled.remove(&ev);
            for v in 0..self.vcpus {
                let _ = self.vm.control_events(v, ev, false);
            }
        }
    }

    fn emit(&self, st: &mut State, r: Record) {
        st.subs.retain_mut(|s| {
            if !s.kinds.wants(&r) {
                return true;
            }
            if s.lost > 0 {
                match s.tx.try_send(Record::Lost { count: s.lost }) {
                    Ok(()) => s.lost = 0,
                    Err(mpsc::TrySendError::Full(_)) => {
                        s.lost += 1;
                        return true;
                    }
                    Err(mpsc::TrySendError::Disconnected(_)) => return false,
                }
            }
            match s.tx.try_send(r.clone()) {
                Ok(()) => true,
                Err(mpsc::TrySendError::Full(_)) => {
                    s.lost += 1;
                    true
                }
                Err(mpsc::TrySendError::Disconnected(_)) => false,
            }
        });
    }

    fn resume_locked(&self, st: &mut State) -> Vec<u16> {
        st.want_pause.clear();
        let held = std::mem::take(&mut st.held);
        let mut out = Vec::new();
        for (v, ev) in held {
            let _ = self.vm.reply(&ev, EventReply::Continue);
            self.emit(st, Record::Resumed { vcpu: v });
            out.push(v);
        }
        out
    }

    /// Undoes what subscription `id` asked for.
    fn release(&self, id: SubId) {
        let mut st = self.lock();
        st.subs.retain(|s| s.id != id);
        self.release_locked(&mut st, |o| o == id);
    }

    fn release_locked(&self, st: &mut State, gone: impl Fn(SubId) -> bool) {
        let vm = &self.vm;
        let mut dead_bps = Vec::new();
        for (gpa, bp) in st.bps.iter_mut() {
            bp.owners.retain(|&o| !gone(o));
            if bp.owners.is_empty() {
                dead_bps.push(*gpa);
            }
        }
        for gpa in dead_bps {
            if let Some(bp) = st.bps.remove(&gpa) {
                if bp.planted {
                    let _ = self.write_code(gpa, bp.orig);
                }
                self.disable(st, event::BREAKPOINT);
            }
        }
        let mut dead_msrs = Vec::new();
        for (msr, owners) in st.msrs.iter_mut() {
            owners.retain(|&(o, _)| !gone(o));
            if owners.is_empty() {
                dead_msrs.push(*msr);
            }
        }
        for msr in dead_msrs {
            st.msrs.remove(&msr);
            for v in 0..self.vcpus {
                let _ = vm.control_msr(v, msr, false);
            }
            self.disable(st, event::MSR);
        }
        let mut changed = Vec::new();
        for (page, owners) in st.pages.iter_mut() {
            let before = owners.len();
            owners.retain(|&(o, _, _)| !gone(o));
            if owners.len() != before {
                let taken = owners.iter().fold(0, |a, e| a | e.2);
                changed.push((*page, access::RWX & !taken, before - owners.len()));
            }
        }
        if !changed.is_empty() {
            let entries: Vec<(u64, u8)> = changed.iter().map(|c| (c.0, c.1)).collect();
            for chunk in entries.chunks(511) {
                let _ = vm.set_page_access(chunk);
            }
            for (page, _, n) in changed {
                if st.pages.get(&page).is_some_and(Vec::is_empty) {
                    st.pages.remove(&page);
                }
                for _ in 0..n {
                    self.disable(st, event::PF);
                }
            }
        }
        let before = st.hypercalls.len();
        st.hypercalls.retain(|(o, _)| !gone(*o));
        for _ in st.hypercalls.len()..before {
            self.disable(st, event::HYPERCALL);
        }
    }

    fn shutdown(&self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut st = self.lock();
        self.release_locked(&mut st, |_| true);
        self.resume_locked(&mut st);
        for v in std::mem::take(&mut st.stepping).into_keys() {
            let _ = self.vm.control_singlestep(v, false);
        }
        self.disable(&mut st, event::PAUSE);
        self.emit(&mut st, Record::Detached { reason: "the monitor stopped; every hook was removed".into() });
        st.subs.clear();
        drop(st);
        // Events already on their way were raised under the hooks just
        // removed: answer them here rather than leave them to the VMM's
        // "as if CONTINUE" at close, which would hand a breakpoint hit to
        // the guest as a #BP.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && !self.vm.is_closed() {
            match self.vm.next_event(Some(Duration::from_millis(50))) {
                Ok(Some(Event::Vcpu(ev))) => self.answer_stray(&ev),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.vm.close();
        self.cond.notify_all();
    }

    /// Answers an event no interception claims: a breakpoint whose `int3`
    /// is no longer in memory was one of ours (removed since): RETRY runs
    /// the real instruction; a live `int3` is the guest's own (CONTINUE
    /// gives it its #BP). Anything else: CONTINUE.
    fn answer_stray(&self, ev: &VcpuEventMsg) {
        let action = match ev.kind {
            EventKind::Breakpoint { gpa, .. } => {
                let mut b = [0u8];
                if self.read_phys(gpa, &mut b).is_ok() && b[0] != 0xcc {
                    EventReply::Retry
                } else {
                    EventReply::Continue
                }
            }
            _ => EventReply::Continue,
        };
        let _ = self.vm.reply(ev, action);
    }

    fn event_loop(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            if self.stopping.load(Ordering::Relaxed) {
                self.shutdown();
                break;
            }
            match self.vm.next_event(Some(Duration::from_millis(100))) {
                Ok(None) => {}
                Ok(Some(Event::Vcpu(ev))) => {
                    self.events.fetch_add(1, Ordering::Relaxed);
                    self.handle(*ev);
                }
                Ok(Some(Event::Unhook { .. })) => {
                    {
                        let mut st = self.lock();
                        self.emit(&mut st, Record::Unhook);
                    }
                    self.shutdown();
                    break;
                }
                Ok(Some(Event::UnknownVm { .. })) => {}
                Err(e) => {
                    if !self.stop.load(Ordering::Relaxed) {
                        let mut st = self.lock();
                        self.emit(&mut st, Record::Detached { reason: e.to_string() });
                        st.subs.clear();
                        drop(st);
                        self.stop.store(true, Ordering::SeqCst);
                        self.cond.notify_all();
                    }
                    break;
                }
            }
        }
    }

    fn who(&self, st: &mut State, vcpu: u16) -> Who {
        let mut who = Who { vcpu, pid: None, process: None };
        who.pid = guestos::current_pid(self, vcpu);
        if let Some(pid) = who.pid {
            if !st.names.contains_key(&pid) {
                if let Ok(t) = guestos::ProcessTable::read(self) {
                    st.names = t.procs.into_iter().map(|p| (p.pid, p.name)).collect();
                }
            }
            who.process = st.names.get(&pid).cloned();
        }
        who
    }

    fn handle(&self, ev: VcpuEventMsg) {
        let vm = &self.vm;
        let mut st = self.lock();
        let v = ev.vcpu;
        let reply = match ev.kind {
            EventKind::Pause => {
                if st.want_pause.contains(&v) && !self.stop.load(Ordering::Relaxed) {
                    self.emit(&mut st, Record::Paused { vcpu: v });
                    st.held.insert(v, ev);
                    self.cond.notify_all();
                    return;
                }
                EventReply::Continue
            }
            EventKind::Breakpoint { gpa, .. } => {
                let Some(bp) = st.bps.get(&gpa) else {
                    // Not (or no longer) ours.
                    drop(st);
                    self.answer_stray(&ev);
                    return;
                };
                let (syscall, planted, orig) = (bp.syscall, bp.planted, bp.orig);
                let who = self.who(&mut st, v);
                let rec = if syscall {
                    self.syscall_record(who, &ev)
                } else {
                    Record::Breakpoint { who, gpa, rip: ev.regs.rip }
                };
                self.emit(&mut st, rec);
                if planted && self.write_code(gpa, orig).is_ok() {
                    if let Some(bp) = st.bps.get_mut(&gpa) {
                        bp.planted = false;
                    }
                    if vm.control_singlestep(v, true).is_ok() {
                        st.stepping.insert(v, gpa);
                    }
                    // Else no stepping: the original byte stays in place
                    // (RETRY runs the real instruction) and the breakpoint
                    // is lost rather than looping on a live int3.
                }
                EventReply::Retry
            }
            EventKind::Singlestep { .. } => {
                if let Some(gpa) = st.stepping.remove(&v) {
                    let _ = vm.control_singlestep(v, false);
                    let others = st.stepping.values().any(|&g| g == gpa);
                    if let Some(bp) = st.bps.get_mut(&gpa) {
                        if !bp.planted && !others && self.write_code(gpa, 0xcc).is_ok() {
                            bp.planted = true;
                        }
                    }
                }
                EventReply::Continue
            }
            EventKind::Msr { msr, old_value, new_value } => {
                let deny = st.msrs.get(&msr).is_some_and(|o| o.iter().any(|e| e.1));
                let who = self.who(&mut st, v);
                self.emit(&mut st, Record::Msr { who, msr, old: old_value, new: new_value, blocked: deny });
                if deny {
                    EventReply::ContinueWith(old_value)
                } else {
                    EventReply::Continue
                }
            }
            EventKind::Pf { gva, gpa, access: acc } => {
                let page = gpa & !0xfff;
                let deny = acc & access::W != 0 && st.pages.get(&page).is_some_and(|o| o.iter().any(|e| e.1));
                let who = self.who(&mut st, v);
                let kind = if acc & access::W != 0 {
                    'w'
                } else if acc & access::X != 0 {
                    'x'
                } else {
                    'r'
                };
                // Refusing a write: on this VMM RIP is already past the
                // store; SET_REGISTERS + RETRY drops the write.
                let blocked = deny && vm.set_registers(v, &ev.regs).is_ok();
                self.emit(&mut st, Record::Page { who, gpa, gva, access: kind, rip: ev.regs.rip, blocked });
                if blocked {
                    EventReply::Retry
                } else {
                    EventReply::Continue
                }
            }
            EventKind::Hypercall => {
                let answer = st.hypercalls.iter().find_map(|(_, a)| a.clone());
                let who = self.who(&mut st, v);
                let message = self.agent_message(&ev);
                let mut reply = None;
                if let Some((text, buf)) = answer {
                    let bytes = text
                        .as_bytes()
                        .get(..text.len().min(ukvmi_guest_abi::demo::AGENT_BUF_SIZE))
                        .unwrap_or_default();
                    let mut regs = ev.regs;
                    if !bytes.is_empty() && ev.regs.r8 == buf && vm.write_physical(buf, bytes).is_ok() {
                        regs.rax = bytes.len() as u64;
                        if vm.set_registers(v, &regs).is_ok() {
                            reply = Some(String::from_utf8_lossy(bytes).into_owned());
                        }
                    }
                }
                self.emit(&mut st, Record::Hypercall { who, message, reply });
                EventReply::Continue
            }
            _ => EventReply::Continue,
        };
        drop(st);
        let _ = vm.reply(&ev, reply);
    }

    /// The demo OS's agent message: R8 = buffer (gpa), R9 = length.
    fn agent_message(&self, ev: &VcpuEventMsg) -> String {
        let len = usize::try_from(ev.regs.r9).unwrap_or(0).min(ukvmi_guest_abi::demo::AGENT_BUF_SIZE);
        let mut buf = vec![0u8; len];
        if len == 0 || self.read_phys(ev.regs.r8, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Reads up to 64 bytes of a user string through the vCPU's page tables.
    fn user_string(&self, vcpu: u16, gva: u64, len: u64) -> Option<String> {
        let gpa = self.vm.translate_gva(vcpu, gva).ok()??;
        let room = 0x1000 - (gpa & 0xfff);
        let n = usize::try_from(len.min(64).min(room)).ok()?;
        let mut buf = vec![0u8; n];
        self.read_phys(gpa, &mut buf).ok()?;
        let mut s = String::from_utf8_lossy(&buf).into_owned();
        if len > n as u64 {
            s.push('…');
        }
        Some(s)
    }

    fn syscall_record(&self, who: Who, ev: &VcpuEventMsg) -> Record {
        let r = &ev.regs;
        let nr = r.rax;
        let (name, nargs) = sys::describe(nr);
        let args = [r.rdi, r.rsi, r.rdx, r.r10];
        let call = match nr {
            sys::WRITE => match self.user_string(ev.vcpu, r.rsi, r.rdx) {
                Some(s) => format!("write({}, {s:?}, {})", r.rdi, r.rdx),
                None => format!("write({}, {:#x}, {})", r.rdi, r.rsi, r.rdx),
            },
            sys::DEBUG_WRMSR => {
                let msr = u32::try_from(r.rdi)
                    .ok()
                    .and_then(msr_name)
                    .map_or_else(|| format!("{:#x}", r.rdi), str::to_string);
                format!("debug_wrmsr({msr}, {:#x})", r.rsi)
            }
            sys::AGENT => match self.user_string(ev.vcpu, r.rdi, r.rsi) {
                Some(s) => format!("agent({s:?}, {})", r.rsi),
                None => format!("agent({:#x}, {})", r.rdi, r.rsi),
            },
            sys::SLEEP | sys::EXIT => format!("{name}({})", r.rdi),
            _ => {
                let a: Vec<String> = args.iter().take(nargs).map(|a| format!("{a:#x}")).collect();
                format!("{name}({})", a.join(", "))
            }
        };
        Record::Syscall { who, nr, name, call }
    }
}

/// Describes an address with a symbol map if there is one.
pub fn describe(syms: Option<&SymbolMap>, addr: u64) -> String {
    syms.map_or_else(|| format!("{addr:#x}"), |s| s.describe(addr))
}
