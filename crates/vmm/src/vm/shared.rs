//! The state every thread of a VM shares (`VmShared`): vCPU bookkeeping,
//! kicks, the serial console, the VM's end, and the endpoint's
//! `VmBackend` (memory, shared memory, page access) on top of it.

use super::{Exit, SerialSink};
use crate::kick;
use crate::memory::GuestRam;
use crate::msr_filter::MsrFilter;
use crate::page_access::{self, GuestGate, PageAccess, SlotSink};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use ukvmi_endpoint::{BackendResult, HostCaps, PageAccessOps, SharedMemoryOps, VmBackend};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) struct VcpuShared {
    pub started: AtomicBool,
    /// The `KVM_SET_GUEST_DEBUG` control last applied (for reports).
    pub debug_control: std::sync::atomic::AtomicU32,
    pub in_guest: AtomicBool,
    pub exits: AtomicU64,
    pub(super) thread: Mutex<Option<libc::pthread_t>>,
    pub(super) wake: Mutex<bool>,
    pub(super) woken: Condvar,
}

/// The serial console: where the guest's serial bytes go, a line at a
/// time.
pub(crate) struct Console {
    sink: SerialSink,
    line: Vec<u8>,
}

impl Console {
    pub(crate) fn new(sink: SerialSink) -> Console {
        Console { sink, line: Vec::new() }
    }

    /// One byte; a full line (or 256 bytes) goes out.
    pub(crate) fn byte(&mut self, b: u8) {
        self.line.push(b);
        if b == b'\n' || self.line.len() >= 256 {
            self.flush_line();
        }
    }

    /// Writes out what is buffered (the VM's last, unfinished line).
    pub(crate) fn flush_line(&mut self) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            let _ = match &mut self.sink {
                SerialSink::Stdout => {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&line).and_then(|()| o.flush())
                }
                SerialSink::Writer(w) => w.write_all(&line).and_then(|()| w.flush()),
            };
        }
    }
}

/// The most restricted pages a report lists one by one.
const LISTED_PAGES: usize = 32;

/// `0x102000:r-x,0x103000:---` (each page's gpa and the accesses the guest
/// still has), the first [`LISTED_PAGES`] then a count; `none` when empty.
pub(crate) fn page_list(pages: &[(u64, u8)]) -> String {
    use ukvmi_wire::access;
    if pages.is_empty() {
        return "none".into();
    }
    let bit = |a: u8, b: u8, c: char| if a & b != 0 { c } else { '-' };
    let mut s: Vec<String> = pages
        .iter()
        .take(LISTED_PAGES)
        .map(|&(gpa, a)| {
            format!("{gpa:#x}:{}{}{}", bit(a, access::R, 'r'), bit(a, access::W, 'w'), bit(a, access::X, 'x'))
        })
        .collect();
    if pages.len() > LISTED_PAGES {
        s.push(format!("+{} more", pages.len() - LISTED_PAGES));
    }
    s.join(",")
}

/// State shared by every thread of the VM; the endpoint's `VmBackend`.
pub(crate) struct VmShared {
    /// The VM fd, for VM-wide interception (MSR filter). Declared before
    /// `ram` so that it is closed (dropping KVM's use of the memory) before
    /// the RAM mapping goes.
    pub vm: VmFd,
    pub ram: GuestRam,
    /// Watched MSRs (present when the host delivers MSR-write exits).
    pub msr_filter: Option<MsrFilter>,
    /// Page restrictions (present when the host has read-only memslots and
    /// guest debug, see `page_access`).
    pub page_access: Option<PageAccess>,
    /// Closed while memslots change: no vCPU runs guest code then.
    pub gate: GuestGate,
    pub entry: u64,
    pub(super) vcpus: Vec<VcpuShared>,
    pub(super) caps: HostCaps,
    pub(super) stop: AtomicBool,
    pub(super) exit: Mutex<Option<Exit>>,
    pub(super) exited: Condvar,
    pub(super) serial: Arc<Mutex<Console>>,
    /// One-line status messages (the front end's log).
    pub log: Arc<dyn Fn(&str) + Send + Sync>,
    /// A Linux guest's devices and state (`None` for the guest ABI).
    pub linux: Option<crate::linux::LinuxState>,
    /// The guest has written to one of the ABI's ports (serial, power-off,
    /// start vCPU, hypercall): it got far enough to talk to the VMM.
    pub(super) spoke: AtomicBool,
}

impl VmShared {
    pub fn vcpu(&self, i: u16) -> Option<&VcpuShared> {
        self.vcpus.get(usize::from(i))
    }

    pub fn vcpu_count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn register_thread(&self, i: u16, alive: bool) {
        if let Some(v) = self.vcpu(i) {
            // SAFETY: pthread_self has no preconditions.
            *lock(&v.thread) = alive.then(|| unsafe { libc::pthread_self() });
        }
    }

    /// Sleeps up to `t`, or until kicked.
    pub fn idle(&self, i: u16, t: Duration) {
        if let Some(v) = self.vcpu(i) {
            let g = lock(&v.wake);
            let (mut g, _) = v.woken.wait_timeout_while(g, t, |k| !*k).unwrap_or_else(|e| e.into_inner());
            *g = false;
        }
    }

    /// Whether vCPU `i` was kicked since it last looked (and forgets it).
    /// The vCPU thread calls it with `in_guest` raised, right before
    /// KVM_RUN; see [`VmBackend::kick`](ukvmi_endpoint::VmBackend::kick).
    pub fn take_wake(&self, i: u16) -> bool {
        self.vcpu(i).is_some_and(|v| std::mem::take(&mut *lock(&v.wake)))
    }

    pub fn start_vcpu(&self, i: u16) {
        if let Some(v) = self.vcpu(i) {
            v.started.store(true, Ordering::SeqCst);
            self.kick(i, false);
        }
    }

    /// Notes that the guest wrote to one of the ABI's ports.
    pub fn guest_spoke(&self) {
        self.spoke.store(true, Ordering::Relaxed);
    }

    /// Whether the guest ever wrote to one of the ABI's ports.
    pub fn has_spoken(&self) -> bool {
        self.spoke.load(Ordering::Relaxed)
    }

    pub fn serial_byte(&self, b: u8) {
        lock(&self.serial).byte(b);
    }

    /// See [`StopHandle::interceptions`].
    pub fn interceptions(&self) -> String {
        let msrs = self.msr_filter.as_ref().map(MsrFilter::watched).unwrap_or_default();
        let msrs = if msrs.is_empty() {
            "none".to_string()
        } else {
            msrs.iter().map(|m| format!("{m:#x}")).collect::<Vec<_>>().join(",")
        };
        let mut debug = Vec::new();
        for (i, v) in self.vcpus.iter().enumerate() {
            let c = v.debug_control.load(Ordering::SeqCst);
            if c != 0 {
                let mut what = Vec::new();
                if c & kvm_bindings::KVM_GUESTDBG_SINGLESTEP != 0 {
                    what.push("singlestep");
                }
                if c & kvm_bindings::KVM_GUESTDBG_USE_SW_BP != 0 {
                    what.push("int3");
                }
                debug.push(format!("vcpu{i}:{}", what.join("+")));
            }
        }
        let debug = if debug.is_empty() { "none".to_string() } else { debug.join(",") };
        let pages = match &self.page_access {
            None => "unsupported".to_string(),
            Some(pa) => page_list(&pa.restricted()),
        };
        format!("interceptions: msr-writes={msrs} guest-debug={debug} restricted-pages={pages}")
    }

    /// Records how the VM ended (the first reason wins) and stops every vCPU.
    pub fn finish(&self, why: Exit) {
        {
            let mut e = lock(&self.exit);
            if e.is_none() {
                *e = Some(why);
            }
            self.exited.notify_all();
        }
        self.stop.store(true, Ordering::SeqCst);
        for i in 0..self.vcpu_count() {
            self.kick(i, false);
        }
    }
}

impl VmBackend for VmShared {
    fn vcpu_count(&self) -> u16 {
        self.vcpus.len() as u16
    }

    fn vcpu_ready(&self, vcpu: u16) -> bool {
        self.vcpu(vcpu).is_some_and(|v| v.started.load(Ordering::SeqCst))
    }

    fn kick(&self, vcpu: u16, wait: bool) {
        let Some(v) = self.vcpu(vcpu) else { return };
        let before = v.exits.load(Ordering::SeqCst);
        *lock(&v.wake) = true;
        v.woken.notify_all();
        // Only a thread in guest mode (or on its way in) needs the signal.
        // One outside (parked in an event, handling an exit, idle) checks
        // `wake` after raising `in_guest` and before KVM_RUN
        // (`take_wake`): the flag was set under the lock before this load,
        // so either it sees the flag or this sees `in_guest`. A signal to
        // a parked thread would cost a signal delivery, an interrupted
        // wait and a KVM_RUN that returns EINTR at once.
        if v.in_guest.load(Ordering::SeqCst) {
            if let Some(t) = *lock(&v.thread) {
                kick::signal(t);
            }
        }
        if wait {
            let t0 = Instant::now();
            while v.in_guest.load(Ordering::SeqCst)
                && v.exits.load(Ordering::SeqCst) == before
                && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::yield_now();
            }
        }
    }

    fn read_physical(&self, gpa: u64, buf: &mut [u8]) -> BackendResult<()> {
        self.ram.read(gpa, buf)
    }

    fn write_physical(&self, gpa: u64, data: &[u8]) -> BackendResult<()> {
        self.ram.write(gpa, data)
    }

    fn max_gpa(&self) -> u64 {
        self.ram.size()
    }

    fn caps(&self) -> HostCaps {
        self.caps
    }

    fn support_page_access(&self) -> Option<&dyn PageAccessOps> {
        self.page_access.is_some().then_some(self as &dyn PageAccessOps)
    }

    fn support_shared_memory(&self) -> Option<&dyn SharedMemoryOps> {
        Some(self as &dyn SharedMemoryOps)
    }
}

/// `UKVMI_VM_MAP_MEMORY`: guest RAM is one sealed memfd from gpa 0. The
/// tool's mapping is a second view of the same pages; it does not go
/// through KVM's memslots, so page-access restrictions (which live in the
/// memslot layout) keep applying to the guest and never to the tool.
impl SharedMemoryOps for VmShared {
    fn ram_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ram.fd()
    }

    fn ram_size(&self) -> u64 {
        self.ram.size()
    }
}

impl PageAccessOps for VmShared {
    fn set_page_access(&self, gpa: u64, access: u8) -> BackendResult<()> {
        let pa = self.page_access.as_ref().ok_or(ukvmi_endpoint::BackendError::NotSupported)?;
        pa.set_with(self, gpa, access)
    }

    fn clear_page_access(&self) {
        if let Some(pa) = &self.page_access {
            if let Err(e) = pa.clear_with(self) {
                // Nothing to answer to (unhook); the guest may now fault on
                // RAM it should see, so say it loudly.
                // Never panics, even with stderr closed.
                let _ = writeln!(std::io::stderr(), "ukvmi: removing page restrictions failed: {e}");
            }
        }
    }
}

/// Memslot changes for page restrictions, with every vCPU out of guest mode.
impl SlotSink for VmShared {
    fn set_region(&self, region: kvm_userspace_memory_region) -> std::result::Result<(), page_access::SlotError> {
        page_access::set_region(&self.vm, region)
    }
    fn begin_update(&self) {
        self.gate.close(&|| {
            for i in 0..self.vcpu_count() {
                self.kick(i, false);
            }
        });
    }
    fn end_update(&self) {
        self.gate.open();
    }
}

#[cfg(test)]
mod tests {
    use super::page_list;
    use ukvmi_wire::access;

    #[test]
    fn restricted_pages_are_listed_with_what_the_guest_may_still_do() {
        assert_eq!(page_list(&[]), "none");
        assert_eq!(
            page_list(&[(0x10_2000, access::R | access::X), (0x10_3000, 0), (0x10_4000, access::R | access::W)]),
            "0x102000:r-x,0x103000:---,0x104000:rw-"
        );
        let many: Vec<(u64, u8)> = (0..40u64).map(|i| (i << 12, access::R)).collect();
        let s = page_list(&many);
        assert!(s.starts_with("0x0:r--,0x1000:r--,") && s.ends_with(",0x1f000:r--,+8 more"), "{s}");
    }
}
