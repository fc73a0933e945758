//! The [`Monitor`] handle: attaching to a VM, the interceptions tools ask for, and stopping.
//!
//! Interceptions belong to subscriptions. A tool (a `ukvmi trace` client,
//! the demo) subscribes, asks for interceptions, and reads records; when
//! its [`Subscription`] is dropped, everything it asked for is undone (the
//! breakpoint bytes restored, MSRs unwatched, page access given back).

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use ukvmi_introspector::wire::event;
use ukvmi_introspector::{GuestMemoryMap, Vm};

use crate::{
    dispatch,
    engine::Inner,
    error::{cmd, MonitorError, Result},
    guestos::{DemoOs, GuestMemory, GuestOs, PhysRead, ReadError},
    subs::{Kinds, Subscription},
    symbols::SymbolMap,
};

/// Counters for a summary line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// vCPU events handled.
    pub events: u64,
}

/// The engine: one event thread that answers every event by the
/// interceptions tools asked for — syscall tracing with a breakpoint that
/// is stepped over, MSR guards that keep the old value, page guards that
/// skip a refused write, a hypercall responder, held pauses — and streams
/// [`Record`](crate::Record)s to subscribers.
pub struct Monitor {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("vcpus", &self.inner.vcpus).field("os", &self.inner.os).finish()
    }
}

impl Monitor {
    /// Takes over `vm`, whose guest runs the demo OS ([`DemoOs`]): learns
    /// its vCPUs, enables PAUSE events, and starts the event thread.
    pub fn start(vm: Vm) -> Result<Monitor> {
        Monitor::start_with(vm, Arc::new(DemoOs::new()))
    }

    /// Like [`start`](Self::start), for a guest that runs `os`. Events come
    /// through the shared-memory event channel when the VM offers it
    /// (`UKVMI_VM_EVENT_CHANNEL`), unless the environment says
    /// `UKVMI_EVENT_CHANNEL=0` (or `off`, `no`, `false`); see
    /// [`start_with_event_channel`](Self::start_with_event_channel).
    pub fn start_with(vm: Vm, os: Arc<dyn GuestOs>) -> Result<Monitor> {
        let off = std::env::var("UKVMI_EVENT_CHANNEL")
            .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "0" | "off" | "no" | "false"));
        Monitor::start_with_event_channel(vm, os, !off)
    }

    /// Like [`start_with`](Self::start_with), with the event channel asked
    /// for (`channel`) or not, whatever the environment says. Asked for,
    /// it is enabled only where the VM reports the command (CHECK_COMMAND);
    /// a VM without it, or one that refuses it (an error code), keeps events
    /// on the socket ([`event_channel`](Self::event_channel) tells which).
    /// Any other failure to set it up is an error: the VMM may already post
    /// events where this side would not look.
    pub fn start_with_event_channel(vm: Vm, os: Arc<dyn GuestOs>, channel: bool) -> Result<Monitor> {
        if channel && vm.check_command(ukvmi_introspector::wire::msg::UKVMI_VM_EVENT_CHANNEL).is_ok() {
            match vm.enable_event_channel() {
                // Refused (an error code): the VMM did not turn it on; events stay on the socket.
                Err(e) if e.raw_err().is_some() => {}
                // Anything else (a reply without its descriptors, a mapping that
                // fails, a timeout) may leave the VMM posting events where this
                // side does not look, and the guest waiting for good: give up.
                Err(source) => {
                    return Err(MonitorError::Command {
                        what: "turning the shared-memory event channel on (UKVMI_EVENT_CHANNEL=0 keeps events on \
                               the socket)"
                            .into(),
                        source,
                    })
                }
                Ok(()) => {}
            }
        }
        let vm = Arc::new(vm);
        let vcpus = cmd(|| "KVMI_VM_GET_INFO".into(), vm.vcpu_count())?;
        let vcpus = u16::try_from(vcpus)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| MonitorError::Invalid(format!("the VM reports {vcpus} vCPUs")))?;
        let inner = Arc::new(Inner::new(vm, vcpus, os));
        inner.setup().enable(&inner.vm, vcpus, event::PAUSE)?;
        // UNHOOK: when the VMM shuts down, undo the hooks before it goes.
        let _ = inner.vm.control_vm_events(event::UNHOOK, true);
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("ukvmi-monitor".into())
            .spawn(move || dispatch::event_loop(worker))
            .map_err(|e| MonitorError::Invalid(format!("starting the event thread: {e}")))?;
        Ok(Monitor { inner, thread: Mutex::new(Some(thread)) })
    }

    /// The connection, for plain commands (registers, memory, translate).
    pub fn vm(&self) -> &Vm {
        &self.inner.vm
    }

    /// The guest OS the monitor attributes events with.
    pub fn guest_os(&self) -> &dyn GuestOs {
        &*self.inner.os
    }

    /// Whether vCPU events come through the shared-memory event channel
    /// (else through the socket).
    pub fn event_channel(&self) -> bool {
        self.inner.vm.event_channel_enabled()
    }

    /// The zero-copy view of guest RAM, if the VM granted one.
    pub fn memory_map(&self) -> Option<&GuestMemoryMap> {
        self.inner.map.as_ref()
    }

    /// Reads guest physical memory: through the mapped view when there is
    /// one, else with READ_PHYSICAL a page at a time.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), ReadError> {
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
        Subscription::new(&self.inner, kinds)
    }

    /// Traces syscalls: a breakpoint on the kernel's syscall entry at
    /// `entry_gva` (translated through vCPU 0's page tables).
    pub fn trace_syscalls(&self, sub: &Subscription, entry_gva: u64) -> Result<u64> {
        self.breakpoint(sub, entry_gva, true)
    }

    /// A breakpoint at `gva`; hits are reported as [`Record::Breakpoint`](crate::Record::Breakpoint)
    /// (or as syscalls when `syscall`). Returns its gpa.
    pub fn breakpoint(&self, sub: &Subscription, gva: u64, syscall: bool) -> Result<u64> {
        let mut refs = self.inner.setup_open()?;
        self.inner.bps.add(&self.inner, &mut refs, sub.id, gva, syscall)
    }

    /// Writes `pieces` (gpa, bytes) into guest memory unless one of them
    /// covers a breakpoint's `int3` (the byte saved under it would come
    /// back over the new bytes when the breakpoint goes). The check and the
    /// writes happen under the setup lock, under which every new
    /// breakpoint is planted, so none appears in between.
    pub fn write_unless_breakpoint(&self, pieces: &[(u64, &[u8])]) -> std::result::Result<(), GuardedWriteError> {
        let _setup = self.inner.setup_open().map_err(|_| GuardedWriteError::Closed)?;
        for &(gpa, bytes) in pieces {
            if let Some(&at) = self.inner.bps.gpas_in(gpa..gpa.saturating_add(bytes.len() as u64)).first() {
                return Err(GuardedWriteError::Breakpoint { gpa: at });
            }
        }
        let mut written = 0u64;
        for &(gpa, bytes) in pieces {
            self.inner.vm.write_physical(gpa, bytes).map_err(|source| GuardedWriteError::Write {
                gpa,
                written,
                source,
            })?;
            written += bytes.len() as u64;
        }
        Ok(())
    }

    /// Watches guest writes of `msr` on every vCPU; with `deny` they are
    /// refused (the old value kept).
    pub fn watch_msr(&self, sub: &Subscription, msr: u32, deny: bool) -> Result<()> {
        let mut refs = self.inner.setup_open()?;
        self.inner.msrs.add(&self.inner, &mut refs, sub.id, msr, deny)
    }

    /// Lets the guest's writes of exactly `value` to `msr` through while
    /// `sub` lives, even where [`watch_msr`](Self::watch_msr) refuses
    /// writes: a tool that makes the guest put a value back (KVMI has no
    /// command that writes an MSR) must not have that write refused.
    pub fn allow_msr_restore(&self, sub: &Subscription, msr: u32, value: u64) {
        self.inner.msrs.allow_restore(sub.id, msr, value);
    }

    /// Takes the `remove` access bits (`r`, `w`, `x`: `access::*`) away from
    /// the pages covering `gpa..gpa+len`; with `deny`, writes are refused
    /// (the instruction skipped) instead of let through. Returns the pages.
    pub fn protect(&self, sub: &Subscription, gpa: u64, len: u64, remove: u8, deny: bool) -> Result<Vec<u64>> {
        let mut refs = self.inner.setup_open()?;
        self.inner.pages.add(&self.inner, &mut refs, sub.id, gpa, len, remove, deny)
    }

    /// Answers the guest's hypercall doorbell. With `Some((text, agent_buf))`
    /// the guest OS's agent call gets `text` back (for the demo OS: written
    /// to the kernel's `agent_buf`, only when the call's R8 names exactly
    /// that buffer, so a guest with other conventions is never written to,
    /// and RAX set to its length). With `None` calls are only reported.
    pub fn hypercalls(&self, sub: &Subscription, answer: Option<(String, u64)>) -> Result<()> {
        let mut refs = self.inner.setup_open()?;
        self.inner.hypercalls.add(&self.inner, &mut refs, sub.id, answer)
    }

    /// The tool's pause: holds every vCPU paused (in a PAUSE event) until
    /// [`resume_all`](Self::resume_all).
    pub fn pause_all(&self, timeout: Duration) -> Result<Vec<u16>> {
        self.inner.pauses.pause_all(&self.inner, timeout)
    }

    /// Ends the tool's pause. Returns the vCPUs let go: none while a
    /// [`hold_all`](Self::hold_all) still keeps them (they go when it ends).
    pub fn resume_all(&self) -> Result<Vec<u16>> {
        Ok(self.inner.pauses.resume_all(&self.inner))
    }

    /// Holds every vCPU paused for as long as the returned guard lives,
    /// whatever [`pause_all`](Self::pause_all)/[`resume_all`](Self::resume_all)
    /// do meanwhile: for work that must not be seen half done (patching
    /// guest code). Holds nest; the vCPUs go when the last holder is gone.
    pub fn hold_all(&self, timeout: Duration) -> Result<HeldVcpus<'_>> {
        let vcpus = self.inner.pauses.hold(&self.inner, timeout)?;
        Ok(HeldVcpus { mon: self, vcpus })
    }

    /// vCPUs held paused now.
    pub fn held(&self) -> Vec<u16> {
        self.inner.pauses.held()
    }

    /// Who holds the vCPUs paused: the tool's pause, and how many scoped
    /// holds ([`hold_all`](Self::hold_all)).
    pub fn pause_holders(&self) -> PauseHolders {
        self.inner.pauses.holders()
    }

    /// Undoes every interception, lets held vCPUs go, stops the event
    /// thread and closes the connection.
    pub fn stop(&self) {
        // The event thread does the shutdown (it is the one reading events,
        // so it can answer the stragglers); if it is gone, do it here.
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.vm.wake_event_waiter();
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
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), ReadError> {
        self.inner.read_phys(gpa, buf)
    }
}

impl GuestMemory for Monitor {
    fn translate(&self, vcpu: u16, gva: u64) -> Option<u64> {
        self.inner.translate(vcpu, gva)
    }
}

/// Describes an address with a symbol map if there is one.
pub fn describe(syms: Option<&SymbolMap>, addr: u64) -> String {
    syms.map_or_else(|| format!("{addr:#x}"), |s| s.describe(addr))
}

/// Every vCPU held paused until this is dropped ([`Monitor::hold_all`]).
#[derive(Debug)]
#[must_use = "the vCPUs are let go when this is dropped"]
pub struct HeldVcpus<'a> {
    mon: &'a Monitor,
    vcpus: Vec<u16>,
}

impl HeldVcpus<'_> {
    /// The vCPUs held.
    pub fn vcpus(&self) -> &[u16] {
        &self.vcpus
    }
}

impl Drop for HeldVcpus<'_> {
    fn drop(&mut self) {
        self.mon.inner.pauses.unhold(&self.mon.inner);
    }
}

/// Who holds the vCPUs paused ([`Monitor::pause_holders`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PauseHolders {
    /// The tool's pause ([`Monitor::pause_all`]) is on.
    pub tool: bool,
    /// Scoped holds alive ([`Monitor::hold_all`]).
    pub scoped: usize,
}

/// Why [`Monitor::write_unless_breakpoint`] wrote nothing, or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuardedWriteError {
    /// The monitor has stopped; nothing was written.
    #[error("the connection to the VM is closed; nothing was written")]
    Closed,
    /// A breakpoint's `int3` is in the range; nothing was written.
    #[error("gpa {gpa:#x} holds the int3 of a breakpoint; nothing was written")]
    Breakpoint {
        /// Where the breakpoint is.
        gpa: u64,
    },
    /// A KVMI_VM_WRITE_PHYSICAL failed after `written` bytes went in.
    #[error("KVMI_VM_WRITE_PHYSICAL at gpa {gpa:#x}: {source}")]
    Write {
        /// The piece that failed.
        gpa: u64,
        /// Bytes written before it.
        written: u64,
        /// The library's error.
        #[source]
        source: ukvmi_introspector::Error,
    },
}
