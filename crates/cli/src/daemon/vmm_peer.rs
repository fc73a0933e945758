//! Which VM the daemon serves and which VMM process runs it: the VMM's pid
//! (`SO_PEERCRED` on the KVMI connection) and command line, the record of the
//! VM last served at a path (kept in `PATH.lock`, so a daemon started after
//! `detach` can tell a different VM from the same one), and refusing every
//! other VM that connects while one is served.

#[cfg(test)]
mod tests;

use std::{
    io::Read,
    os::unix::net::UnixStream,
    sync::OnceLock,
    time::{Duration, Instant},
};

use super::{kvmi_socket::KvmiSocket, log::log};
use crate::control;

/// The longest command line shown for a VMM.
const MAX_COMMAND: usize = 300;

/// The process at the other end of a KVMI connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VmmPeer {
    /// Its pid (as it was at `connect`).
    pub pid: i32,
    /// Its command line (`/proc/PID/cmdline`, else the name of its binary),
    /// arguments separated by spaces.
    pub command: String,
}

impl VmmPeer {
    /// The VMM at the other end of `stream`, if the kernel says who it is.
    pub(super) fn of(stream: &UnixStream) -> Option<VmmPeer> {
        let (_, pid) = control::peer_cred(stream).ok()?;
        Some(VmmPeer { pid, command: command_of(pid) })
    }
}

/// The command line of process `pid`, or its binary's name, or `?`.
fn command_of(pid: i32) -> String {
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut text: String = String::from_utf8_lossy(&args).replace('\0', " ").trim().to_string();
    if text.is_empty() {
        text = std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into());
    }
    if text.chars().count() > MAX_COMMAND {
        text = text.chars().take(MAX_COMMAND).chain("...".chars()).collect();
    }
    text.replace('\n', " ")
}

/// A VM as the daemon knows it: from its handshake and its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServedVm {
    /// Its name (from the handshake).
    pub name: String,
    /// Its uuid, 32 hex digits (from the handshake).
    pub uuid: String,
    /// The VMM process, if known.
    pub vmm: Option<VmmPeer>,
}

/// The VM this daemon serves, once one is attached (a daemon serves one VM
/// in its life: it exits when that VM goes away or on `detach`).
static SERVED: OnceLock<ServedVm> = OnceLock::new();

/// The VM this daemon serves (for `info`); `None` outside a daemon.
pub(crate) fn served_vm() -> Option<&'static ServedVm> {
    SERVED.get()
}

/// Remembers the VM this daemon serves.
pub(super) fn set_served(vm: ServedVm) {
    let _ = SERVED.set(vm);
}

/// A uuid as 32 hex digits.
pub(super) fn uuid_hex(uuid: &[u8]) -> String {
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

impl ServedVm {
    /// "`name` (uuid U, VMM pid P: COMMAND)".
    pub(super) fn describe(&self) -> String {
        let vmm = self.vmm.as_ref().map_or_else(String::new, |p| format!(", VMM pid {}: {}", p.pid, p.command));
        format!("`{}` (uuid {}{vmm})", self.name, self.uuid)
    }

    /// The record kept in `PATH.lock`: one `key=value` per line. Of the
    /// VMM's command line only the program's name is kept: its arguments
    /// (which might hold a secret) do not outlive the process in a file.
    pub(super) fn to_record(&self) -> String {
        let mut s = format!("uuid={}\nname={}\n", self.uuid, self.name.replace('\n', " "));
        if let Some(p) = &self.vmm {
            let program = p.command.split(' ').next().unwrap_or_default();
            let program = program.rsplit('/').next().unwrap_or(program);
            s.push_str(&format!("pid={}\ncommand={program}\n", p.pid));
        }
        s
    }

    /// Reads a record `to_record` wrote; `None` if there is no uuid in it.
    pub(super) fn from_record(text: &str) -> Option<ServedVm> {
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')));
        let uuid = field("uuid").filter(|u| !u.is_empty())?.to_string();
        let name = field("name").unwrap_or_default().to_string();
        let vmm = field("pid")
            .and_then(|p| p.parse().ok())
            .map(|pid| VmmPeer { pid, command: field("command").unwrap_or("?").to_string() });
        Some(ServedVm { name, uuid, vmm })
    }
}

/// What to tell the next command when the VM now attached is not the one
/// this path served before (`None` when it is, or nothing was served).
pub(super) fn change_notice(before: Option<&ServedVm>, now: &ServedVm, path: &str) -> Option<String> {
    let before = before?;
    (before.uuid != now.uuid).then(|| {
        format!(
            "ukvmi: note: {path} is now served by another VM: {}; before, it was {}",
            now.describe(),
            before.describe()
        )
    })
}

/// The name and uuid a connecting VMM sends first (its handshake), if it
/// sends them within a second.
fn hello_of(stream: &mut UnixStream) -> Option<(String, String)> {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 104];
    let mut got = 0;
    let end = Instant::now() + Duration::from_secs(1);
    while got < buf.len() && Instant::now() < end {
        match stream.read(buf.get_mut(got..)?) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let uuid = uuid_hex(buf.get(4..20).filter(|_| got >= 20)?);
    let name = buf.get(32..96.min(got)).unwrap_or_default();
    let name = String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or_default()).into_owned();
    Some((name, uuid))
}

/// Once a VM is attached, the KVMI socket stays bound so that another VMM
/// started with the same `--introspect` is refused in words instead of
/// running on unseen: each one is closed before its handshake is answered
/// (its VMM reports a handshake that ended early and retries), and the log
/// says who it was and which VM this daemon serves.
pub(super) fn refuse_others(listener: &KvmiSocket, served: &ServedVm) {
    loop {
        let mut stream = match listener.sock.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log(&format!("accepting on the KVMI socket: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let who = VmmPeer::of(&stream)
            .map_or_else(|| "an unknown process".to_string(), |p| format!("VMM pid {}: {}", p.pid, p.command));
        let hello = hello_of(&mut stream)
            .map_or_else(|| "a VMM".to_string(), |(name, uuid)| format!("VM `{name}` (uuid {uuid})"));
        log(&format!(
            "refused {hello} ({who}): this daemon already serves {} and stays with it; \
             give the other VM its own socket (--introspect unix:OTHER.sock)",
            served.describe()
        ));
        drop(stream);
    }
}
