//! The daemon's log (its stderr, `PATH.log`): one line per event, a line
//! repeated within 10 s counted rather than shown.

use std::{
    io::Write,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A line repeated within this long of its last showing is only counted.
const LOG_REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// At most this many distinct lines are tracked for repeats.
const LOG_TRACKED: usize = 64;

/// Recent log lines: (line, when last shown, repeats not shown since).
static LOG_SEEN: Mutex<Vec<(String, Instant, u32)>> = Mutex::new(Vec::new());

fn emit(msg: &str) {
    // Never panics: a log that cannot be written is no reason to stop.
    let _ = writeln!(std::io::stderr().lock(), "[ukvmi daemon {}] {msg}", std::process::id());
}

/// Logs a line; the same line again within `LOG_REPEAT_WINDOW` is counted,
/// not shown (a VMM retrying a refused handshake every second would
/// otherwise fill the log), and the count comes with its next showing or
/// at exit (`flush_log_repeats`).
pub(super) fn log(msg: &str) {
    let now = Instant::now();
    let mut seen = LOG_SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = seen.iter_mut().find(|e| e.0 == msg) {
        let since = now.duration_since(e.1);
        if since < LOG_REPEAT_WINDOW {
            e.2 = e.2.saturating_add(1);
            return;
        }
        if e.2 > 0 {
            emit(&format!("{msg} (repeated {} times in the last {} s)", e.2.saturating_add(1), since.as_secs()));
        } else {
            emit(msg);
        }
        e.1 = now;
        e.2 = 0;
        return;
    }
    seen.retain(|e| e.2 > 0 || now.duration_since(e.1) < LOG_REPEAT_WINDOW);
    if seen.len() < LOG_TRACKED {
        seen.push((msg.to_string(), now, 0));
    }
    emit(msg);
}

/// Shows the count of every line repeated since it was last shown.
pub(super) fn flush_log_repeats() {
    let now = Instant::now();
    let mut seen = LOG_SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for e in seen.iter_mut().filter(|e| e.2 > 0) {
        emit(&format!("{} (repeated {} more times in the last {} s)", e.0, e.2, now.duration_since(e.1).as_secs()));
        e.1 = now;
        e.2 = 0;
    }
}
