//! Timestamps along one event round trip, for finding where the time goes
//! (`UKVMI_EVENT_TRACE=<path prefix>`; off, it costs one atomic load per
//! point).
//!
//! With the variable set, each point of an event's life is recorded in
//! memory as `(seq, point, CLOCK_MONOTONIC ns, event id)`, one [`Trace`] per
//! side: the VMM's endpoint appends its records to `<prefix>.vmm` when the
//! connection ends, the introspector library to `<prefix>.tool` when its
//! `Vm` closes. Both use the same clock, so the two files join on the
//! event's seq (`event_rtt`'s per-hand-off report reads them). A line is
//! `seq point ns id`, the point as its number in [`Point`].

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

/// Points of an event's life, numbered as the trace files carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Point {
    /// VMM: the vCPU thread is about to send (or post) the event.
    VcpuSends = 0,
    /// Tool: it has the event in hand (read off the socket or the channel).
    ToolReceives = 1,
    /// Tool: it is about to send (or post) the reply.
    ToolReplies = 2,
    /// VMM: the receiving thread has read the reply off the socket.
    ReceiverRead = 3,
    /// VMM: the receiving thread has queued the reply for the vCPU.
    JobQueued = 4,
    /// VMM: the vCPU thread has the reply in hand (popped the job, or saw it
    /// in the channel).
    VcpuWakes = 5,
    /// VMM: the vCPU thread returns the outcome: the guest is about to
    /// resume.
    VcpuResumes = 6,
    /// VMM: the vCPU thread starts building the event (before reading the
    /// registers it carries).
    VcpuBuilds = 7,
    /// VMM: KVM_GET_REGS (through the backend) returned.
    RegsRead = 8,
    /// VMM: KVM_GET_SREGS returned (then the MSRs are read).
    SregsRead = 9,
}

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static PREFIX: OnceLock<String> = OnceLock::new();

/// Whether tracing is on (the environment is read once per process).
#[inline]
fn on() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => read_env(),
    }
}

#[cold]
fn read_env() -> bool {
    let prefix = std::env::var("UKVMI_EVENT_TRACE").ok().filter(|p| !p.is_empty());
    let on = prefix.is_some();
    if let Some(p) = prefix {
        let _ = PREFIX.set(p);
    }
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
    on
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock `Instant` uses; the same in
/// every process of the machine).
fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// The clock now when tracing is on (for a point recorded once its seq is
/// known, with [`Trace::mark_at`]), else 0 without reading the clock.
#[inline]
pub fn stamp() -> u64 {
    if on() {
        now_ns()
    } else {
        0
    }
}

/// One side's records (a `static` in the crate that records them), written
/// to `<prefix>.<side>`.
#[derive(Debug)]
pub struct Trace {
    side: &'static str,
    records: Mutex<Vec<(u32, u8, u64, u16)>>,
}

impl Trace {
    /// An empty trace whose records go to `<prefix>.<side>`.
    pub const fn new(side: &'static str) -> Trace {
        Trace { side, records: Mutex::new(Vec::new()) }
    }

    fn records(&self) -> MutexGuard<'_, Vec<(u32, u8, u64, u16)>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `point` of event `seq` now (`id`: the event id, where known).
    #[inline]
    pub fn mark(&self, seq: u32, point: Point, id: u16) {
        if on() {
            let t = now_ns();
            self.records().push((seq, point as u8, t, id));
        }
    }

    /// Records `point` of event `seq` at time `t` (from [`stamp`]).
    #[inline]
    pub fn mark_at(&self, seq: u32, point: Point, t: u64) {
        if on() {
            self.records().push((seq, point as u8, t, 0));
        }
    }

    /// Appends the records so far to `<prefix>.<side>` and forgets them.
    pub fn flush(&self) {
        if !on() {
            return;
        }
        let Some(prefix) = PREFIX.get() else { return };
        let recs = std::mem::take(&mut *self.records());
        let mut text = String::with_capacity(recs.len() * 32);
        for (seq, point, t, id) in recs {
            text.push_str(&format!("{seq} {point} {t} {id}\n"));
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(format!("{prefix}.{}", self.side));
        if let Ok(mut f) = file {
            let _ = f.write_all(text.as_bytes());
        }
    }
}
