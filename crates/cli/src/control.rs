//! The control socket between one-shot tool commands and the daemon that
//! holds the KVMI connection (see `daemon.rs` for why there is one).
//!
//! A client sends one request — `UKVMI1`, a flags byte (bit 0: its stderr is
//! a terminal; bit 1: a key follows), a u32 length and the command's
//! arguments separated by NUL, then with bit 1 a u32 length and the key —
//! and reads frames `[kind u8][len u32 LE][data]` until an exit frame:
//! stdout bytes, stderr text, a progress line, or the exit status. Closing
//! the socket (Ctrl-C) tells the daemon to stop the command and undo what
//! it set up.
//!
//! The socket, like every file the daemon makes, is 0600, and both ends
//! check the other's uid (`SO_PEERCRED`): the daemon serves only its own
//! user and root, and a client talks only to a daemon running as itself or
//! root (it may be about to send the key).

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{OpenOptionsExt, PermissionsExt},
        net::UnixStream,
        process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

pub const MAGIC: &[u8; 6] = b"UKVMI1";
pub const MAX_REQUEST: u32 = 64 * 1024;
/// The longest key a request may carry.
pub const MAX_KEY: u32 = 4096;

/// Request flag: the client's stderr is a terminal.
pub const FLAG_TTY: u8 = 1;
/// Request flag: a key follows the arguments.
pub const FLAG_KEY: u8 = 2;

/// The environment variable that holds the key (tools, daemon and VMM).
pub const KEY_ENV: &str = "UKVMI_KEY";

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const PROGRESS: u8 = 3;
pub const EXIT: u8 = 9;

/// The daemon's control socket for the KVMI socket at `vm`.
pub fn ctl_path(vm: &Path) -> PathBuf {
    let mut p = vm.as_os_str().to_owned();
    p.push(".ctl");
    PathBuf::from(p)
}

/// The file the daemon for the KVMI socket at `vm` holds locked (flock)
/// for as long as it runs, so that only one serves a path.
pub fn lock_path(vm: &Path) -> PathBuf {
    let mut p = vm.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The daemon's exit status when another daemon already serves (or is
/// starting to serve) the same path: its client then talks to that one.
pub const ALREADY_SERVED: u8 = 3;

/// The daemon's log for the KVMI socket at `vm`.
pub fn log_path(vm: &Path) -> PathBuf {
    let mut p = vm.as_os_str().to_owned();
    p.push(".log");
    PathBuf::from(p)
}

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
        o.write(true).truncate(false);
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

pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)
}

/// One request: the flags byte, the arguments and the key, if any.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u8,
    pub args: Vec<String>,
    pub key: Option<Vec<u8>>,
}

/// Reads a request.
pub fn read_request(r: &mut impl Read) -> io::Result<Request> {
    let mut head = [0u8; 11];
    r.read_exact(&mut head)?;
    if &head[..6] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a ukvmi control request"));
    }
    let flags = head[6];
    let len = u32::from_le_bytes([head[7], head[8], head[9], head[10]]);
    if len > MAX_REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("request of {len} bytes (at most {MAX_REQUEST})"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    let text =
        String::from_utf8(body).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))?;
    let args = if text.is_empty() { Vec::new() } else { text.split('\0').map(str::to_string).collect() };
    let key = if flags & FLAG_KEY != 0 {
        let mut l = [0u8; 4];
        r.read_exact(&mut l)?;
        let len = u32::from_le_bytes(l);
        if len > MAX_KEY {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("key of {len} bytes (at most {MAX_KEY})")));
        }
        let mut key = vec![0u8; len as usize];
        r.read_exact(&mut key)?;
        Some(key)
    } else {
        None
    };
    Ok(Request { flags, args, key })
}

fn write_request(w: &mut impl Write, flags: u8, args: &[String], key: Option<&[u8]>) -> io::Result<()> {
    let body = args.join("\0");
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_REQUEST)
        .ok_or_else(|| io::Error::other("arguments too long"))?;
    let mut msg = Vec::with_capacity(15 + body.len() + key.map_or(0, <[u8]>::len));
    msg.extend_from_slice(MAGIC);
    msg.push(flags | if key.is_some() { FLAG_KEY } else { 0 });
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(body.as_bytes());
    if let Some(k) = key {
        let klen =
            u32::try_from(k.len()).ok().filter(|&l| l <= MAX_KEY).ok_or_else(|| io::Error::other("key too long"))?;
        msg.extend_from_slice(&klen.to_le_bytes());
        msg.extend_from_slice(k);
    }
    w.write_all(&msg)
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

/// Connects to the control socket `ctl` if a daemon answers there, and
/// checks that it runs as this user or root: a socket another user put
/// there must not get the command, let alone the key.
fn try_connect(ctl: &Path) -> Result<Option<UnixStream>, String> {
    let Ok(s) = UnixStream::connect(ctl) else { return Ok(None) };
    match peer_cred(&s) {
        Ok((uid, _)) if trusted_uid(uid) => Ok(Some(s)),
        Ok((uid, pid)) => Err(format!(
            "{} is served by uid {uid} (pid {pid}), not by this user (uid {}) or root: not using it",
            ctl.display(),
            my_uid()
        )),
        Err(e) => Err(format!("{}: cannot tell who serves it: {e}", ctl.display())),
    }
}

/// Connects to the daemon for `vm`, starting one if nobody answers. The
/// key goes to a new daemon in its environment, never on its command line.
fn connect(vm: &Path, map: Option<&str>, key: Option<&[u8]>, spawn: bool) -> Result<UnixStream, String> {
    let ctl = ctl_path(vm);
    if let Some(s) = try_connect(&ctl)? {
        return Ok(s);
    }
    if !spawn {
        return Err(format!("no daemon serves {} (nothing is attached there)", vm.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding the ukvmi binary to start the daemon: {e}"))?;
    let log = log_path(vm);
    let logf = open_private(&log, true).map_err(|e| format!("the daemon log: {e}"))?;
    let errf = logf.try_clone().map_err(|e| format!("daemon log: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").arg("--vm").arg(vm);
    if let Some(m) = map {
        cmd.arg("--map").arg(m);
    }
    cmd.env_remove(KEY_ENV);
    if let Some(k) = key {
        cmd.env(KEY_ENV, OsStr::from_bytes(k));
    }
    cmd.stdin(Stdio::null()).stdout(logf).stderr(errf).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("starting the daemon: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lost_at: Option<Instant> = None;
    loop {
        if let Some(s) = try_connect(&ctl)? {
            return Ok(s);
        }
        match child.try_wait() {
            // Another daemon holds the lock: one another client started
            // (its socket comes soon), or one that is exiting (after
            // `detach`; then nobody will open the socket): wait a little,
            // then start ours again.
            Ok(Some(status)) if status.code() == Some(i32::from(ALREADY_SERVED)) => {
                let since = *lost_at.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(200) {
                    lost_at = None;
                    child = cmd.spawn().map_err(|e| format!("starting the daemon: {e}"))?;
                }
            }
            Ok(Some(status)) => {
                let log_text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("the daemon exited ({status}): {}", log_text.trim()));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("the daemon did not open {} within 5 s (log: {})", ctl.display(), log.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs one tool command through the daemon and relays its output.
pub fn client(vm: &Path, map: Option<&str>, key: Option<&[u8]>, mut args: Vec<String>) -> ExitCode {
    // `-o FILE` is the client's: the file is written here, not by the
    // daemon, and created only when the first output arrives (a command
    // that fails leaves an existing file alone).
    let mut out_file: Option<File> = None;
    let out_path = match crate::args::take_option(&mut args, crate::commands::OUTPUT) {
        Ok(o) => o.map(|(_, path)| path),
        Err(_) => {
            eprintln!("ukvmi: -o needs a file name");
            return ExitCode::from(2);
        }
    };
    let spawn = args.first().map(String::as_str) != Some("detach");
    let mut sock = match connect(vm, map, key, spawn) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ukvmi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stderr_tty = is_tty(2);
    if let Err(e) = write_request(&mut sock, if stderr_tty { FLAG_TTY } else { 0 }, &args, key) {
        eprintln!("ukvmi: sending the command to the daemon: {e}");
        return ExitCode::FAILURE;
    }
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr();
    let mut progress_shown = false;
    loop {
        let mut head = [0u8; 5];
        if let Err(e) = sock.read_exact(&mut head) {
            eprintln!("ukvmi: the daemon closed the connection ({e}); see {}", log_path(vm).display());
            return ExitCode::FAILURE;
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut data = vec![0u8; len];
        if sock.read_exact(&mut data).is_err() {
            eprintln!("ukvmi: the daemon's reply was cut short");
            return ExitCode::FAILURE;
        }
        let ok = match head[0] {
            STDOUT if out_path.is_some() => {
                let path = out_path.as_deref().unwrap_or_default();
                if out_file.is_none() {
                    match File::create(path) {
                        Ok(f) => out_file = Some(f),
                        Err(e) => {
                            eprintln!("ukvmi: creating {path}: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                if let Err(e) = out_file.as_mut().map_or(Ok(()), |f| f.write_all(&data)) {
                    eprintln!("ukvmi: writing {path}: {e}");
                    return ExitCode::FAILURE;
                }
                Ok(())
            }
            STDOUT => stdout.write_all(&data).and_then(|()| stdout.flush()),
            STDERR => {
                if progress_shown {
                    let _ = stderr.write_all(b"\n");
                    progress_shown = false;
                }
                stderr.write_all(&data)
            }
            PROGRESS => {
                progress_shown = true;
                stderr.write_all(b"\r\x1b[K").and_then(|()| stderr.write_all(&data))
            }
            EXIT => {
                if progress_shown {
                    let _ = stderr.write_all(b"\n");
                }
                if let Some(f) = out_file.as_mut() {
                    if let Err(e) = f.sync_all() {
                        eprintln!("ukvmi: writing {}: {e}", out_path.as_deref().unwrap_or_default());
                        return ExitCode::FAILURE;
                    }
                }
                return ExitCode::from(data.first().copied().unwrap_or(1));
            }
            k => {
                eprintln!("ukvmi: unknown frame kind {k} from the daemon");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = ok {
            // Our stdout is gone (e.g. `| head`): closing the socket stops
            // the command in the daemon. Any other error is a failure.
            if e.kind() == io::ErrorKind::BrokenPipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("ukvmi: writing the output: {e}");
            return ExitCode::FAILURE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        let args = vec!["read".to_string(), "0x1000".to_string(), "16".to_string()];
        write_request(&mut buf, 1, &args, None).unwrap();
        let req = read_request(&mut buf.as_slice()).unwrap();
        assert_eq!(req, Request { flags: 1, args: args.clone(), key: None });
        let mut keyed = Vec::new();
        write_request(&mut keyed, 0, &args, Some(b"s3cret")).unwrap();
        let req = read_request(&mut keyed.as_slice()).unwrap();
        assert_eq!(req, Request { flags: FLAG_KEY, args: args.clone(), key: Some(b"s3cret".to_vec()) });
        keyed.truncate(keyed.len() - 1);
        assert!(read_request(&mut keyed.as_slice()).is_err(), "a cut key is refused");
        let mut lying = Vec::new();
        write_request(&mut lying, 0, &args, Some(b"k")).unwrap();
        let at = lying.len() - 5;
        lying[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut lying.as_slice()).is_err(), "a lying key length is refused before allocating");
        assert!(read_request(&mut &b"GARBAGE-XXXX"[..]).is_err());
        let mut huge = Vec::from(&MAGIC[..]);
        huge.push(0);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut huge.as_slice()).is_err(), "a lying length is refused before allocating");
        let mut cut = Vec::new();
        write_request(&mut cut, 0, &args, None).unwrap();
        cut.truncate(cut.len() - 3);
        assert!(read_request(&mut cut.as_slice()).is_err());
    }
}
