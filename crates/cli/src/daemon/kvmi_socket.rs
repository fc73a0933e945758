//! The listening KVMI socket, and accepting the VMM on it: who connects is
//! checked (`SO_PEERCRED`) before the handshake.

use std::{
    os::unix::{
        fs::{FileTypeExt, MetadataExt},
        net::UnixListener,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ukvmi_introspector::{Error as KvmiError, Handshake};
use ukvmi_monitor::Monitor;

use super::{log::log, vmm_peer::VmmPeer, Daemon};
use crate::control;

/// The listening KVMI socket. Like the library's `Listener`, but the
/// daemon accepts the connections itself to check who is connecting
/// before the handshake.
#[derive(Debug)]
pub(super) struct KvmiSocket {
    pub(super) sock: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to unlink only our own.
    pub(super) id: Option<(u64, u64)>,
}

impl KvmiSocket {
    /// Binds `path`, first removing a stale socket file there (any other
    /// kind of file is left alone and the bind fails). The mode comes from
    /// the daemon's umask: 0600.
    pub(super) fn bind(path: &Path) -> std::io::Result<KvmiSocket> {
        if std::fs::symlink_metadata(path).is_ok_and(|md| md.file_type().is_socket()) {
            std::fs::remove_file(path)?;
        }
        let sock = UnixListener::bind(path)?;
        let id = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(KvmiSocket { sock, path: path.to_path_buf(), id })
    }
}

/// Removes the socket file at `path` if it is still the one with `id`
/// (the daemon's own, not one made there since).
pub(super) fn remove_if_ours(path: &Path, id: Option<(u64, u64)>) {
    let now = std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
    if now.is_some() && now == id {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for KvmiSocket {
    fn drop(&mut self) {
        remove_if_ours(&self.path, self.id);
    }
}

/// Accepts connections on the KVMI socket until one is a VMM that passes
/// the handshake. A peer of another user is dropped before the handshake; a
/// connection that fails its handshake (a stray client, a wrong key) does
/// not end the wait: the next one may be the VMM. Returns the engine and
/// the VMM process it talks to.
pub(super) fn accept_vm(d: &Daemon, listener: &KvmiSocket) -> (Monitor, Option<VmmPeer>) {
    loop {
        let stream = match listener.sock.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                log(&format!("accepting on the KVMI socket: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // Something came: whatever happens next is worth keeping the log for.
        d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).vmm_seen = true;
        match control::peer_cred(&stream) {
            Ok((uid, _)) if control::trusted_uid(uid) => {}
            Ok((uid, _)) => {
                log(&format!(
                    "refused a KVMI connection from uid {uid}: only a VMM running as {} may attach",
                    match control::my_uid() {
                        0 => "root".to_string(),
                        me => format!("uid {me} or root"),
                    }
                ));
                continue;
            }
            Err(e) => {
                log(&format!("refused a KVMI connection whose user is unknown: {e}"));
                continue;
            }
        }
        let peer = VmmPeer::of(&stream);
        let key = {
            let mut st = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // A command waiting for a VM waits for this handshake too.
            st.handshaking = true;
            st.key.clone()
        };
        let hs = key.as_deref().map_or_else(Handshake::new, |k| Handshake::new().with_key(k));
        // On success `handshaking` ends when the caller attaches the VM.
        let failed = |refused: Option<String>| {
            let mut st = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            st.handshaking = false;
            if let Some(why) = refused {
                st.refused = Some((key.clone(), why, Instant::now()));
            }
            d.cond.notify_all();
        };
        // The guest OS follows `--map` (a Linux kernel, or the demo OS).
        let map = d.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).map.clone();
        let start = |vm| {
            let os = super::symbols::guest_os_for(&vm, map.as_ref());
            Monitor::start_with(vm, os)
        };
        match hs.run(stream).map(start) {
            Ok(Ok(mon)) => return (mon, peer),
            Ok(Err(e)) => {
                log(&format!("a connection on the KVMI socket failed: {e}"));
                failed(None);
            }
            Err(e) => {
                log(&format!("a connection on the KVMI socket failed: {e}"));
                failed(if let KvmiError::Handshake(why) = e { Some(why) } else { None });
            }
        }
    }
}
