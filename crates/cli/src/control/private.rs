//! Who may talk to whom, and what stays private: the handshake key (never
//! from the command line), peers' uids (`SO_PEERCRED`), and the daemon's
//! 0600 files.

use std::{
    fs::File,
    io,
    os::unix::{
        ffi::OsStrExt,
        fs::{OpenOptionsExt, PermissionsExt},
    },
    path::Path,
};

use super::{KEY_ENV, MAX_KEY};

/// The key for a VM's handshake, on either side (`ukvmi run` and the
/// tools): the file given with `--key-file` (less one trailing newline),
/// else `$UKVMI_KEY` if set and not empty, else none. Never from the command
/// line: every local user can read a process's arguments.
pub fn load_key(key_file: Option<&str>) -> Result<Option<Vec<u8>>, String> {
    let key = match key_file {
        Some(path) => {
            let mut key = std::fs::read(path).map_err(|e| format!("--key-file {path}: {e}"))?;
            if key.ends_with(b"\n") {
                key.pop();
                if key.ends_with(b"\r") {
                    key.pop();
                }
            }
            if key.is_empty() {
                return Err(format!("--key-file {path}: the file is empty"));
            }
            Some(key)
        }
        None => std::env::var_os(KEY_ENV).filter(|k| !k.is_empty()).map(|k| k.as_bytes().to_vec()),
    };
    if let Some(k) = &key {
        if k.contains(&0) {
            return Err("the key contains a NUL byte".into());
        }
        if k.len() > MAX_KEY as usize {
            return Err(format!("the key is longer than {MAX_KEY} bytes"));
        }
    }
    Ok(key)
}

/// The uid and pid of the process at the other end of `sock`
/// (`SO_PEERCRED`: for a connected client, as it was at `connect`; for a
/// daemon, as it was at `listen`).
pub fn peer_cred(sock: &impl std::os::fd::AsRawFd) -> io::Result<(u32, i32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a local
    // ucred of exactly that size, and `len` back; the descriptor is open
    // for the call (borrowed from `sock`).
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

/// This process's effective uid.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a peer running as `uid` may talk to us: our own user or root.
pub fn trusted_uid(uid: u32) -> bool {
    uid == my_uid() || uid == 0
}

/// Who a daemon running as `uid` serves, for messages.
pub fn served_users(uid: u32) -> String {
    if uid == 0 {
        "root only".into()
    } else {
        format!("only uid {uid} (the user it runs as) and root")
    }
}

/// Opens (creating it 0600) a file of the daemon's, appending or not: never
/// through a symlink, only a regular file, and 0600 even if it existed
/// with looser permissions.
pub fn open_private(path: &Path, append: bool) -> Result<File, String> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
    if append {
        o.append(true);
    } else {
        o.read(true).write(true).truncate(false);
    }
    let f = o.open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let md = f.metadata().map_err(|e| format!("{}: {e}", path.display()))?;
    if !md.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if md.permissions().mode() & 0o7777 != 0o600 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("making {} private (0600): {e}", path.display()))?;
    }
    Ok(f)
}
