//! The tool side of the control socket: finding (or starting) the daemon
//! for a VM's socket, sending it one command and relaying its frames to
//! stdout, stderr or the `-o` file.

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, Read, Write},
    os::unix::{ffi::OsStrExt, net::UnixStream, process::CommandExt},
    path::Path,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use super::{
    ctl_path, log_path, my_uid, open_private, peer_cred, trusted_uid, write_request, Request, ALREADY_SERVED, EXIT,
    FLAG_TTY, KEY_ENV, PROGRESS, STDERR, STDOUT,
};

/// What one command asks of the daemon besides its words.
#[derive(Debug, Clone, Copy, Default)]
pub struct Session<'a> {
    /// `--map FILE` (absolute).
    pub map: Option<&'a str>,
    /// The handshake key.
    pub key: Option<&'a [u8]>,
    /// `--wait SECS`: how long to wait for a VM (else the daemon's default).
    pub wait: Option<Duration>,
}

/// `vm` must be a socket or nothing: the daemon would bind it, and a user's
/// file there (`--vm README.md`) is refused by name and left alone.
fn check_vm_path(vm: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(vm) {
        Ok(md) if !md.file_type().is_socket() => Err(format!(
            "{} exists and is not a socket: not touching it. --vm names the socket the tools listen on \
             for the VM, the PATH of `ukvmi run --introspect unix:PATH`",
            vm.display()
        )),
        _ => Ok(()),
    }
}

/// How long the daemon log at `log` is now (what a new daemon adds comes after).
fn log_len(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// What the daemon wrote to its log after byte `from`.
fn log_since(log: &Path, from: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut f) = File::open(log) {
        use std::io::Seek;
        if f.seek(io::SeekFrom::Start(from)).is_ok() {
            let _ = f.read_to_end(&mut text);
        }
    }
    String::from_utf8_lossy(&text).trim().to_string()
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
    check_vm_path(vm)?;
    let exe = std::env::current_exe().map_err(|e| format!("finding the ukvmi binary to start the daemon: {e}"))?;
    let log = log_path(vm);
    let log_from = log_len(&log);
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
                // Only what this daemon said, not an older one's lines.
                return Err(format!("the daemon exited ({status}): {}", log_since(&log, log_from)));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("the daemon did not open {} within 5 s (log: {})", ctl.display(), log.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Connects to (or starts) the daemon for `vm`, sends the request and reads
/// the head of the first reply frame. A daemon may close without a word when
/// it was exiting just as we connected (no VM ever came, or `detach`): then
/// this tries again, with a new daemon.
fn open(vm: &Path, s: &Session<'_>, spawn: bool, req: &Request) -> Result<(UnixStream, [u8; 5]), String> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut sock = connect(vm, s.map, s.key, spawn)?;
        write_request(&mut sock, req).map_err(|e| format!("sending the command to the daemon: {e}"))?;
        let mut head = [0u8; 5];
        match sock.read_exact(&mut head) {
            Ok(()) => return Ok((sock, head)),
            Err(_) if tries < 3 && spawn => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(format!("the daemon closed the connection ({e}); see {}", log_path(vm).display()));
            }
        }
    }
}

/// Runs one tool command through the daemon and relays its output.
pub fn client(vm: &Path, session: &Session<'_>, mut args: Vec<String>) -> ExitCode {
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
    let req = Request {
        flags: if is_tty(2) { FLAG_TTY } else { 0 },
        args,
        key: session.key.map(<[u8]>::to_vec),
        // Whole milliseconds, at most u32::MAX (49 days).
        wait_ms: session.wait.map(|w| u32::try_from(w.as_millis()).unwrap_or(u32::MAX)),
        map: session.map.map(str::to_string),
    };
    let (mut sock, first) = match open(vm, session, spawn, &req) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ukvmi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut first = Some(first);
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr();
    let mut progress_shown = false;
    loop {
        let mut head = [0u8; 5];
        if let Some(h) = first.take() {
            head = h;
        } else if let Err(e) = sock.read_exact(&mut head) {
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
