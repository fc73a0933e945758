//! The introspection connection: connect, serve, log the disconnect and
//! reconnect; and UNHOOK with a deadline at shutdown.

use super::shared::{lock, VmShared};
use super::{IntrospectConfig, Vm};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use ukvmi_endpoint::handshake::{self, VmIdentity};
use ukvmi_endpoint::{Dialect, Endpoint};
use ukvmi_wire::event;

impl Vm {
    /// Sends UNHOOK and waits up to `timeout` for the tool to close. A tool
    /// that stopped reading its socket can block the send itself: then the
    /// connection is shut down at the deadline, which ends the send.
    pub(super) fn pre_unhook(&self, timeout: Duration) {
        let ep = &self.endpoint;
        let log = &self.log;
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            s.spawn(move || {
                let _ = tx.send(ep.pre_unhook(timeout));
            });
            match rx.recv_timeout(timeout + Duration::from_millis(500)) {
                Ok(Ok(true)) => log("introspector closed after UNHOOK"),
                Ok(Ok(false)) => log("introspector did not close within the unhook timeout"),
                Ok(Err(_)) => {}
                Err(_) => {
                    log("introspector is not reading its socket; closing the connection");
                    ep.unhook();
                }
            }
        });
    }
}

/// "3 events (PAUSE 2, PF 1)" for the disconnect line.
fn events_line(sent: &[(u16, u32)]) -> String {
    let total: u32 = sent.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return "0 events".into();
    }
    let kinds: Vec<String> = sent
        .iter()
        .map(|&(id, n)| {
            let name = event::name(id).unwrap_or("?");
            format!("{} {n}", name.trim_start_matches("KVMI_VCPU_EVENT_"))
        })
        .collect();
    format!("{total} events ({})", kinds.join(", "))
}

/// How long a v7 connection waits for the guest to start its vCPUs.
const V7_START_WAIT: Duration = Duration::from_secs(5);

/// Waits until the guest has started every vCPU (at most `limit`; false if
/// it had not by then, or the VM is stopping). v7 tools (libmicrovmi) give
/// up on the `-KVM_EAGAIN` a vCPU that is not started yet answers, and a
/// tool already listening when the VM starts would connect within
/// milliseconds of boot, before the guest brought its other vCPUs up.
fn wait_for_vcpus(sh: &VmShared, limit: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        let all = (0..sh.vcpu_count()).all(|i| sh.vcpu(i).is_some_and(|v| v.started.load(Ordering::SeqCst)));
        if all {
            return true;
        }
        if t0.elapsed() >= limit || sh.stopping() || lock(&sh.exit).is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Connects to the tool, serves it until it goes, and tries again every
/// `reconnect`, as QEMU's `reconnect=N` chardev does. The guest never waits.
pub(super) fn connection_loop(
    ep: &Endpoint,
    sh: &VmShared,
    cfg: &IntrospectConfig,
    id: &VmIdentity,
    log: &dyn Fn(&str),
) {
    if cfg.dialect == Dialect::V7 && !wait_for_vcpus(sh, V7_START_WAIT) {
        log(&format!(
            "not every vCPU was started within {V7_START_WAIT:?}; connecting anyway \
             (a v7 tool may get -KVM_EAGAIN for the others)"
        ));
    }
    let mut last_err = String::new();
    while !sh.stopping() && lock(&sh.exit).is_none() {
        let stop = || sh.stopping() || lock(&sh.exit).is_some();
        let opts = handshake::ConnectOptions {
            key: cfg.key.as_deref(),
            timeout: cfg.handshake_timeout,
            allowed_uids: &cfg.allowed_uids,
            cancel: &stop,
        };
        match handshake::connect_with(&cfg.path, id, &opts) {
            Ok(stream) => {
                last_err.clear();
                // Hook under the exit lock: once `Vm::run` has seen the VM
                // end, no new session can start behind its back.
                let hooked = {
                    let exit = lock(&sh.exit);
                    if exit.is_some() || sh.stopping() {
                        return;
                    }
                    ep.hook(stream)
                };
                if let Err(e) = hooked {
                    log(&format!("introspection: {e}"));
                } else {
                    log(&format!("introspector connected at {}", cfg.path.display()));
                    // Asleep until the connection ends: the tool's doing, or
                    // `Vm::run`'s unhook once the VM has ended (it sets
                    // `exit` first). No periodic wake-ups while connected.
                    ep.wait_disconnected(None);
                    if sh.stopping() || lock(&sh.exit).is_some() {
                        return;
                    }
                    let events = events_line(&ep.events_sent());
                    let why = ep.unhook();
                    log(&format!(
                        "introspector disconnected ({}) after {events}; the guest keeps running",
                        why.map_or_else(|| "closed".to_string(), |w| w.to_string())
                    ));
                }
            }
            Err(e) => {
                let s = e.to_string();
                if s != last_err {
                    log(&format!("introspection: {s}; retrying every {:?}", cfg.reconnect));
                    last_err = s;
                }
            }
        }
        // Asleep until the next attempt or the VM's end, whichever comes
        // first (`finish` and `StopHandle::stop` set `exit` and notify
        // `exited`): no periodic wake-ups while nobody listens.
        let e = lock(&sh.exit);
        let (e, _) = sh.exited.wait_timeout_while(e, cfg.reconnect, |e| e.is_none()).unwrap_or_else(|p| p.into_inner());
        if e.is_some() || sh.stopping() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_events_is_said_plainly() {
        assert_eq!(events_line(&[]), "0 events");
        assert_eq!(events_line(&[(event::PAUSE, 0)]), "0 events");
    }

    #[test]
    fn events_are_counted_by_short_name() {
        let line = events_line(&[(event::PAUSE, 2), (event::PF, 1)]);
        assert_eq!(line, "3 events (PAUSE 2, PF 1)");
    }

    #[test]
    fn an_unknown_event_id_is_a_question_mark() {
        assert_eq!(events_line(&[(0xfff0, 4)]), "4 events (? 4)");
    }
}
