//! The tool's timestamps along one event round trip, for finding where the
//! time goes (`UKVMI_EVENT_TRACE=<path prefix>`; off: one atomic load per point).
//!
//! With the variable set, each point of an event's life on the tool side is
//! recorded in memory as `(seq, point, CLOCK_MONOTONIC ns, event id)`, and
//! the records are appended to `<prefix>.tool` when the [`Vm`](crate::Vm)
//! closes. The VMM's endpoint records its points the same way
//! (`<prefix>.vmm`); both use the same clock, so the files join on seq.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// Points of an event's life (numbers shared with the endpoint's trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Point {
    /// The tool has the event in hand (read off the socket or the channel).
    ToolReceives = 1,
    /// The tool is about to send (or post) the reply.
    ToolReplies = 2,
}

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static PREFIX: OnceLock<String> = OnceLock::new();
static RECORDS: Mutex<Vec<(u32, u8, u64, u16)>> = Mutex::new(Vec::new());

/// Whether tracing is on (the environment is read once).
fn on() -> bool {
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => {
            let prefix = std::env::var("UKVMI_EVENT_TRACE").ok().filter(|p| !p.is_empty());
            let on = prefix.is_some();
            if let Some(p) = prefix {
                let _ = PREFIX.set(p);
            }
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock `Instant` uses; the same in
/// every process of the machine).
fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// Records `point` of event `seq` (`id`: the event id, where known).
#[inline]
pub(crate) fn mark(seq: u32, point: Point, id: u16) {
    if on() {
        let t = now_ns();
        crate::mux::lock(&RECORDS).push((seq, point as u8, t, id));
    }
}

/// Appends the records so far to `<prefix>.tool` and forgets them.
pub(crate) fn flush() {
    if !on() {
        return;
    }
    let Some(prefix) = PREFIX.get() else { return };
    let recs = std::mem::take(&mut *crate::mux::lock(&RECORDS));
    let mut text = String::with_capacity(recs.len() * 32);
    for (seq, point, t, id) in recs {
        text.push_str(&format!("{seq} {point} {t} {id}\n"));
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(format!("{prefix}.tool"));
    if let Ok(mut f) = file {
        let _ = f.write_all(text.as_bytes());
    }
}
