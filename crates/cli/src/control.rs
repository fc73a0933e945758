//! The control socket between one-shot tool commands and the daemon that
//! holds the KVMI connection (see `daemon.rs` for why there is one).
//!
//! A client sends one request — `UKVMI1`, a flags byte (bit 0: its stderr is
//! a terminal), a u32 length and the command's arguments separated by NUL —
//! and reads frames `[kind u8][len u32 LE][data]` until an exit frame:
//! stdout bytes, stderr text, a progress line, or the exit status. Closing
//! the socket (Ctrl-C) tells the daemon to stop the command and undo what
//! it set up.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

pub const MAGIC: &[u8; 6] = b"UKVMI1";
pub const MAX_REQUEST: u32 = 64 * 1024;

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

pub fn write_frame(w: &mut impl Write, kind: u8, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(data)
}

/// Reads a request: the flags byte and the arguments.
pub fn read_request(r: &mut impl Read) -> io::Result<(u8, Vec<String>)> {
    let mut head = [0u8; 11];
    r.read_exact(&mut head)?;
    if &head[..6] != MAGIC {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a ukvmi control request"));
    }
    let flags = head[6];
    let len = u32::from_le_bytes([head[7], head[8], head[9], head[10]]);
    if len > MAX_REQUEST {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("request of {len} bytes (at most {MAX_REQUEST})")));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    let text = String::from_utf8(body).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "request is not UTF-8"))?;
    let args = if text.is_empty() { Vec::new() } else { text.split('\0').map(str::to_string).collect() };
    Ok((flags, args))
}

fn write_request(w: &mut impl Write, flags: u8, args: &[String]) -> io::Result<()> {
    let body = args.join("\0");
    let len = u32::try_from(body.len()).ok().filter(|&l| l <= MAX_REQUEST).ok_or_else(|| io::Error::other("arguments too long"))?;
    let mut msg = Vec::with_capacity(11 + body.len());
    msg.extend_from_slice(MAGIC);
    msg.push(flags);
    msg.extend_from_slice(&len.to_le_bytes());
    msg.extend_from_slice(body.as_bytes());
    w.write_all(&msg)
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

/// Connects to the daemon for `vm`, starting one if nobody answers.
fn connect(vm: &Path, map: Option<&str>, spawn: bool) -> Result<UnixStream, String> {
    let ctl = ctl_path(vm);
    if let Ok(s) = UnixStream::connect(&ctl) {
        return Ok(s);
    }
    if !spawn {
        return Err(format!("no daemon serves {} (nothing is attached there)", vm.display()));
    }
    let exe = std::env::current_exe().map_err(|e| format!("finding the ukvmi binary to start the daemon: {e}"))?;
    let log = log_path(vm);
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("opening the daemon log {}: {e}", log.display()))?;
    let errf = logf.try_clone().map_err(|e| format!("daemon log: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").arg("--vm").arg(vm);
    if let Some(m) = map {
        cmd.arg("--map").arg(m);
    }
    cmd.stdin(Stdio::null()).stdout(logf).stderr(errf).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("starting the daemon: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = UnixStream::connect(&ctl) {
            return Ok(s);
        }
        match child.try_wait() {
            // Another client's daemon won the race: wait for its socket.
            Ok(Some(status)) if status.code() == Some(i32::from(ALREADY_SERVED)) => {}
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
pub fn client(vm: &Path, map: Option<&str>, mut args: Vec<String>) -> ExitCode {
    // `-o FILE` is the client's: the file is written here, not by the
    // daemon, and created only when the first output arrives (a command
    // that fails leaves an existing file alone).
    let mut out_path: Option<String> = None;
    let mut out_file: Option<File> = None;
    if let Some(i) = args.iter().position(|a| a == "-o" || a == "--output") {
        let Some(path) = args.get(i + 1).cloned() else {
            eprintln!("ukvmi: -o needs a file name");
            return ExitCode::from(2);
        };
        out_path = Some(path);
        args.drain(i..i + 2);
    }
    let spawn = args.first().map(String::as_str) != Some("detach");
    let mut sock = match connect(vm, map, spawn) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ukvmi: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stderr_tty = is_tty(2);
    if let Err(e) = write_request(&mut sock, u8::from(stderr_tty), &args) {
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
        write_request(&mut buf, 1, &args).unwrap();
        let (flags, back) = read_request(&mut buf.as_slice()).unwrap();
        assert_eq!((flags, &back), (1, &args));
        assert!(read_request(&mut &b"GARBAGE-XXXX"[..]).is_err());
        let mut huge = Vec::from(&MAGIC[..]);
        huge.push(0);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(read_request(&mut huge.as_slice()).is_err(), "a lying length is refused before allocating");
        let mut cut = Vec::new();
        write_request(&mut cut, 0, &args).unwrap();
        cut.truncate(cut.len() - 3);
        assert!(read_request(&mut cut.as_slice()).is_err());
    }
}
