//! [`Endpoint`]: the introspection side of one VM. It lives as long as the
//! VM; each connection ("hook") gets a fresh session.

use crate::backend::VmBackend;
use crate::dialect::{self, Dialect, Log};
use crate::permissions::Permissions;
use crate::receiver;
use crate::session::{lock, Disconnect, Session};
use crate::vcpu::VcpuPort;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;
use ukvmi_wire::event;

/// Why [`Endpoint::hook`] failed.
#[derive(Debug, Error)]
pub enum HookError {
    /// A session is active; unhook it first (the kernel's `EEXIST`).
    #[error("the VM is already hooked; unhook the previous connection first")]
    AlreadyHooked,
    /// The socket could not be prepared or the receiving thread not started.
    #[error("could not start the receiving thread: {0}")]
    Io(#[from] std::io::Error),
}

/// Why [`Endpoint::pre_unhook`] did not send the UNHOOK event.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PreUnhookError {
    /// No connection.
    #[error("no introspector is connected")]
    NotHooked,
    /// The tool did not enable `KVMI_VM_EVENT_UNHOOK`: unhook at once.
    #[error("the introspector did not enable the UNHOOK event")]
    NotEnabled,
    /// Writing the event failed.
    #[error("sending the UNHOOK event failed: {0}")]
    SendFailed(Disconnect),
}

/// How an [`Endpoint`] serves its connections.
pub struct Options {
    /// Allowed commands and events (default: all).
    pub permissions: Permissions,
    /// The wire dialect (default: v12).
    pub dialect: Dialect,
    /// Where one-line notices go (default: nowhere).
    pub log: Option<Log>,
}

impl Default for Options {
    fn default() -> Options {
        Options { permissions: Permissions::allow_all(), dialect: Dialect::V12, log: None }
    }
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("dialect", &self.dialect).field("log", &self.log.is_some()).finish()
    }
}

pub(crate) struct PortState {
    /// Set when the vCPU has something to do in `handle_requests`.
    pub request: Arc<AtomicBool>,
    /// Finished sessions whose per-vCPU cleanup this vCPU still owes, oldest
    /// first, each with the CONTROL_CLEANUP flag it ended with (several when
    /// connections come and go before the vCPU next gets to it).
    pub cleanup: Mutex<Vec<(Arc<Session>, bool)>>,
}

pub(crate) struct Shared {
    pub vm: Arc<dyn VmBackend>,
    pub perms: Arc<Permissions>,
    pub dialect: Dialect,
    pub log: Log,
    pub ports: Vec<PortState>,
    pub current: Mutex<Option<Arc<Session>>>,
    pub receiver: Mutex<Option<JoinHandle<()>>>,
}

impl Shared {
    pub fn port(&self, index: u16) -> Option<&PortState> {
        self.ports.get(usize::from(index))
    }

    pub fn current(&self) -> Option<Arc<Session>> {
        lock(&self.current).clone()
    }
}

/// The hypervisor side of KVMI for one VM.
///
/// Create it with the VM's backend, give each vCPU thread its
/// [`VcpuPort`], then [`hook`](Endpoint::hook) a connected socket whenever an
/// introspector is there. When the connection ends (see
/// [`wait_disconnected`](Endpoint::wait_disconnected)), call
/// [`unhook`](Endpoint::unhook) before hooking the next one.
pub struct Endpoint {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("vcpus", &self.shared.ports.len()).field("hooked", &self.is_hooked()).finish()
    }
}

impl Endpoint {
    /// An endpoint that allows every command and event (QEMU's default).
    pub fn new(vm: Arc<dyn VmBackend>) -> Endpoint {
        Self::with_permissions(vm, Permissions::allow_all())
    }

    /// An endpoint with the given allowed sets, serving KVMI v12.
    pub fn with_permissions(vm: Arc<dyn VmBackend>, perms: Permissions) -> Endpoint {
        Self::with_options(vm, Options { permissions: perms, ..Options::default() })
    }

    /// An endpoint with the given allowed sets, dialect and log.
    pub fn with_options(vm: Arc<dyn VmBackend>, options: Options) -> Endpoint {
        let Options { permissions: perms, dialect, log } = options;
        let ports = (0..vm.vcpu_count())
            .map(|_| PortState { request: Arc::new(AtomicBool::new(false)), cleanup: Mutex::new(Vec::new()) })
            .collect();
        Endpoint {
            shared: Arc::new(Shared {
                vm,
                perms: Arc::new(perms),
                dialect,
                log: log.unwrap_or_else(|| Arc::new(|_: &str| {})),
                ports,
                current: Mutex::new(None),
                receiver: Mutex::new(None),
            }),
        }
    }

    /// The dialect this endpoint's connections speak.
    pub fn dialect(&self) -> Dialect {
        self.shared.dialect
    }

    /// The allowed-command and allowed-event sets. Changes apply at once,
    /// also to a connected tool.
    pub fn permissions(&self) -> &Permissions {
        &self.shared.perms
    }

    /// The handle vCPU thread `index` uses.
    pub fn vcpu_port(&self, index: u16) -> Option<VcpuPort> {
        self.shared.port(index)?;
        Some(VcpuPort { shared: Arc::clone(&self.shared), index })
    }

    /// Starts serving KVMI on `socket` (after the handshake): a new session
    /// with everything disabled, and its receiving thread.
    pub fn hook(&self, socket: UnixStream) -> Result<(), HookError> {
        let mut cur = lock(&self.shared.current);
        if cur.is_some() {
            return Err(HookError::AlreadyHooked);
        }
        let requests: Vec<_> = self.shared.ports.iter().map(|p| Arc::clone(&p.request)).collect();
        let sess = Arc::new(Session::new(
            Arc::clone(&self.shared.vm),
            Arc::clone(&self.shared.perms),
            &requests,
            socket,
            self.shared.dialect,
            Arc::clone(&self.shared.log),
        )?);
        let rd = sess.reader()?;
        let for_thread = Arc::clone(&sess);
        let handle =
            std::thread::Builder::new().name("kvmi-recv".into()).spawn(move || receiver::run(for_thread, rd))?;
        *lock(&self.shared.receiver) = Some(handle);
        *cur = Some(sess);
        Ok(())
    }

    /// Whether a session exists (it may already have disconnected).
    pub fn is_hooked(&self) -> bool {
        lock(&self.shared.current).is_some()
    }

    /// Whether a session exists and its connection is still up.
    pub fn is_connected(&self) -> bool {
        self.shared.current().is_some_and(|s| !s.is_closed())
    }

    /// Waits until the current connection has ended (at most `timeout`).
    /// True if it ended or there is none.
    pub fn wait_disconnected(&self, timeout: Option<Duration>) -> bool {
        match self.shared.current() {
            None => true,
            Some(s) => s.wait_closed(timeout),
        }
    }

    /// vCPU events sent on the current connection so far, per (v12) event
    /// id; ids with none are left out.
    pub fn events_sent(&self) -> Vec<(u16, u32)> {
        self.shared.current().map_or_else(Vec::new, |s| s.events_sent())
    }

    /// Why the current (or last unhooked) connection ended, if it did.
    pub fn disconnect_reason(&self) -> Option<Disconnect> {
        self.shared.current().and_then(|s| s.reason())
    }

    /// Sends `KVMI_VM_EVENT_UNHOOK` (if the tool enabled it) and waits up to
    /// `timeout` for the tool to close the connection. Returns whether it
    /// closed in time. Call [`Endpoint::unhook`] afterwards either way.
    pub fn pre_unhook(&self, timeout: Duration) -> Result<bool, PreUnhookError> {
        let sess = self.shared.current().ok_or(PreUnhookError::NotHooked)?;
        if sess.is_closed() {
            return Ok(true);
        }
        if !sess.vm_event_enabled(event::UNHOOK) {
            return Err(PreUnhookError::NotEnabled);
        }
        let bytes = dialect::frame_unhook(sess.dialect, sess.next_seq())
            .map_err(|e| PreUnhookError::SendFailed(Disconnect::WriteFailed(e.to_string())))?;
        sess.send(&bytes).map_err(PreUnhookError::SendFailed)?;
        Ok(sess.wait_closed(Some(timeout)))
    }

    /// Ends the session: shuts the socket down, stops the receiving thread,
    /// removes every page-access restriction, and has each vCPU drop its
    /// queued jobs and (with CONTROL_CLEANUP on) undo its interceptions
    /// before it next enters the guest. Returns why the connection ended.
    pub fn unhook(&self) -> Option<Disconnect> {
        let sess = lock(&self.shared.current).take()?;
        sess.hard_error(Disconnect::Unhooked);
        if let Some(h) = lock(&self.shared.receiver).take() {
            let _ = h.join();
        }
        if let Some(pa) = self.shared.vm.support_page_access() {
            pa.clear_page_access();
        }
        let restore = sess.cleanup.load(Ordering::SeqCst);
        for (i, p) in self.shared.ports.iter().enumerate() {
            // ports came from a u16 vCPU count.
            let i = i as u16;
            // A vCPU the guest never started ran nothing for this session
            // (its commands answered -KVM_EAGAIN): nothing to undo, and it
            // may never run to do it. Its pauses go now; no note keeps the
            // session (and its socket) alive.
            if !self.shared.vm.vcpu_ready(i) {
                sess.drop_vcpu_jobs(i);
                continue;
            }
            lock(&p.cleanup).push((Arc::clone(&sess), restore));
            p.request.store(true, Ordering::SeqCst);
            self.shared.vm.kick(i, false);
        }
        sess.reason()
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.unhook();
    }
}
