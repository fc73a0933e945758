//! The tool side of the control socket: finding (or starting) the daemon
//! for a VM's socket, sending it one command and relaying its frames to
//! stdout, stderr or the `-o` file ([`OutFile`]: complete or absent).

use std::{
    ffi::{CString, OsStr},
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
    sync::atomic::{AtomicPtr, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use super::{
    ctl_path, log_path, my_uid, open_private, peer_cred, trusted_uid, write_request, Request, ALREADY_SERVED, EXIT,
    FLAG_TTY, KEY_ENV, MAX_DATA, PROGRESS, STDERR, STDOUT,
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

/// The input a command takes from a file, read here (with the user's
/// permissions and working directory; `-` is stdin): `Ok(None)` for a
/// command without `--file` in the table, or not given one. At most
/// `MAX_DATA` bytes are read; a FILE that holds more is refused (status 2).
fn read_input(args: &[String]) -> Result<Option<Vec<u8>>, (u8, String)> {
    let Some(cmd) = args.first().and_then(|n| crate::commands::find(n)) else { return Ok(None) };
    if !cmd.options.iter().any(|o| o.name == INPUT_FILE) {
        return Ok(None);
    }
    let valued = crate::commands::tool_valued_options();
    let Some(path) = crate::args::last_value(args.get(1..).unwrap_or(&[]), &valued, INPUT_FILE) else {
        return Ok(None);
    };
    let (name, src): (&str, Box<dyn Read>) = if path == "-" {
        ("stdin", Box::new(io::stdin()))
    } else {
        let f = File::open(&path).map_err(|e| (1, format!("--file {path}: {e}")))?;
        (path.as_str(), Box::new(f))
    };
    let mut data = Vec::new();
    src.take(u64::from(MAX_DATA) + 1).read_to_end(&mut data).map_err(|e| (1, format!("reading {name}: {e}")))?;
    if data.len() > MAX_DATA as usize {
        return Err((
            2,
            format!(
                "{name} holds more than {} MiB: `{}` takes at most {MAX_DATA} bytes at a time",
                MAX_DATA >> 20,
                cmd.name
            ),
        ));
    }
    Ok(Some(data))
}

/// The option by which a command takes its input from a file (read by the
/// client, sent with the request).
const INPUT_FILE: &str = "--file";

/// Runs one tool command through the daemon and relays its output.
pub fn client(vm: &Path, session: &Session<'_>, mut args: Vec<String>) -> ExitCode {
    // `-o FILE` is the client's: the file is written here, not by the
    // daemon, and created only when the first output arrives (a command
    // that fails leaves an existing file alone).
    let out_path = match crate::args::take_option(&mut args, crate::commands::OUTPUT) {
        Ok(o) => o.map(|(_, path)| path),
        Err(_) => {
            eprintln!("ukvmi: -o needs a file name");
            return ExitCode::from(2);
        }
    };
    let name = args.first().map_or("", String::as_str);
    if name == "dump" && out_path.is_none() && is_tty(1) && !args.iter().any(|a| a == "--hex" || a == "--json") {
        eprintln!(
            "ukvmi dump: not writing binary to a terminal: give -o FILE, --hex (a hex dump) or --json, or redirect stdout"
        );
        return ExitCode::from(2);
    }
    let data = match read_input(&args) {
        Ok(d) => d,
        Err((status, msg)) => {
            eprintln!("ukvmi {name}: {msg}");
            return ExitCode::from(status);
        }
    };
    let streams = crate::help_extra::find(name).is_some_and(|e| e.streams);
    let mut out_file = out_path.as_deref().map(|p| OutFile::new(p, streams));
    let spawn = args.first().map(String::as_str) != Some("detach");
    let req = Request {
        flags: if is_tty(2) { FLAG_TTY } else { 0 },
        args,
        key: session.key.map(<[u8]>::to_vec),
        // Whole milliseconds, at most u32::MAX (49 days).
        wait_ms: session.wait.map(|w| u32::try_from(w.as_millis()).unwrap_or(u32::MAX)),
        map: session.map.map(str::to_string),
        data,
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
            STDOUT if out_file.is_some() => {
                if let Some(Err(e)) = out_file.as_mut().map(|f| f.write(&data)) {
                    eprintln!("ukvmi: {e}");
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
                let status = data.first().copied().unwrap_or(1);
                if let Some(f) = out_file.take() {
                    if let Err(e) = f.finish(status == 0) {
                        eprintln!("ukvmi: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                return ExitCode::from(status);
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

/// The partial `-o` file a signal handler removes (a leaked C string), and
/// its length.
static PARTIAL: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static PARTIAL_LEN: AtomicUsize = AtomicUsize::new(0);

/// SIGINT, SIGTERM and SIGHUP while a partial `-o` file exists: remove it,
/// say so, and exit as the signal would (128 + its number).
extern "C" fn on_signal(sig: libc::c_int) {
    const SAID: &[u8] = b"\nukvmi: interrupted: removed the partial output ";
    let p = PARTIAL.load(Ordering::SeqCst);
    if !p.is_null() {
        // SAFETY: `p` is a NUL-terminated string leaked for the life of the
        // process, PARTIAL_LEN bytes long; unlink(2), write(2) and _exit(2)
        // are async-signal-safe.
        unsafe {
            if libc::unlink(p) == 0 {
                libc::write(2, SAID.as_ptr().cast(), SAID.len());
                libc::write(2, p.cast(), PARTIAL_LEN.load(Ordering::SeqCst));
                libc::write(2, b"\n".as_ptr().cast(), 1);
            }
        }
    }
    // SAFETY: _exit(2) ends the process without running anything else.
    unsafe { libc::_exit(128 + sig) }
}

/// Points the signal handler at `partial` (or at nothing) and, the first
/// time, installs it for the signals that end a command — except those
/// ignored by whoever started us (a background job's SIGINT).
fn guard_partial(partial: Option<&Path>) {
    let raw = partial
        .and_then(|p| CString::new(p.as_os_str().as_bytes()).ok())
        .map_or(std::ptr::null_mut(), CString::into_raw);
    PARTIAL_LEN.store(partial.map_or(0, |p| p.as_os_str().len()), Ordering::SeqCst);
    PARTIAL.store(raw, Ordering::SeqCst);
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: sigaction(2) with a zeroed, then filled, struct
            // sigaction; the handler only makes async-signal-safe calls.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(sig, &act, std::ptr::null_mut());
            }
        }
    });
}

/// The `-o FILE` output. A command that answers once writes FILE.partial,
/// renamed to FILE when it succeeds and removed when it fails or is
/// interrupted, so FILE is either complete or as it was. A streaming
/// command (whose normal end is Ctrl-C) writes FILE itself, and so does
/// one whose FILE is no regular file (`-o /dev/stdout`, a FIFO, a
/// symlink, which a rename would replace). FILE.partial takes the mode of
/// the FILE it replaces (a dump of guest memory may be private).
#[derive(Debug)]
struct OutFile {
    path: PathBuf,
    /// Where the bytes go until the command succeeds, if not to `path`.
    partial: Option<PathBuf>,
    /// Created when the first output arrives.
    file: Option<File>,
}

impl OutFile {
    fn new(path: &str, streams: bool) -> OutFile {
        let path = PathBuf::from(path);
        let special = std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file());
        let partial = (!streams && !special).then(|| {
            let mut p = path.as_os_str().to_owned();
            p.push(".partial");
            PathBuf::from(p)
        });
        OutFile { path, partial, file: None }
    }

    fn target(&self) -> &Path {
        self.partial.as_deref().unwrap_or(&self.path)
    }

    /// Writes `data`, creating the file first.
    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        if self.file.is_none() {
            let at = self.target().to_path_buf();
            guard_partial(self.partial.as_deref());
            let mut open = std::fs::OpenOptions::new();
            open.write(true).create(true).truncate(true);
            if self.partial.is_some() {
                open.custom_flags(libc::O_NOFOLLOW);
                if let Ok(m) = std::fs::metadata(&self.path) {
                    open.mode(m.permissions().mode() & 0o7777);
                }
            }
            let f = open.open(&at).map_err(|e| format!("creating {}: {e}", at.display()))?;
            self.file = Some(f);
        }
        match self.file.as_mut() {
            Some(f) => f.write_all(data).map_err(|e| format!("writing {}: {e}", self.target().display())),
            None => Ok(()),
        }
    }

    /// The command ended: on success the file is synced and (from
    /// FILE.partial) renamed to FILE; otherwise the partial file goes. The
    /// signal handler keeps watching until then: interrupted before the
    /// rename, FILE stays as it was; after it, FILE is complete.
    fn finish(mut self, ok: bool) -> Result<(), String> {
        let Some(f) = self.file.take() else { return Ok(()) };
        let synced = f.sync_all();
        drop(f);
        let Some(partial) = self.partial.take() else {
            return synced.map_err(|e| format!("writing {}: {e}", self.path.display()));
        };
        let done = if ok { synced.and_then(|()| std::fs::rename(&partial, &self.path)) } else { Ok(()) };
        if !ok || done.is_err() {
            remove_partial(&partial);
        }
        guard_partial(None);
        done.map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

impl Drop for OutFile {
    /// The command did not finish (the daemon went away, or stdout or a
    /// write failed): the partial file goes.
    fn drop(&mut self) {
        if let (Some(partial), Some(_)) = (self.partial.take(), self.file.take()) {
            remove_partial(&partial);
            guard_partial(None);
        }
    }
}

fn remove_partial(partial: &Path) {
    if std::fs::remove_file(partial).is_ok() {
        eprintln!("ukvmi: removed the partial output {}", partial.display());
    }
}
