//! The command line is consistent as a user meets it (issue 13): each
//! command's own help, one line for a typo, `--json` wherever a command
//! prints data, `symbols PATTERN`, `dump` never writing binary to a
//! terminal, an interrupted `dump -o` leaving no partial file, and a reader
//! that goes away (`| head`) ending every command quietly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::{
    fs::File,
    io::Read,
    os::unix::{
        io::{FromRawFd, OwnedFd},
        process::CommandExt,
    },
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{RunningVm, Scratch};

const UKVMI: &str = env!("CARGO_BIN_EXE_ukvmi");
const T: Duration = Duration::from_secs(20);

fn ukvmi(args: &[&str]) -> Output {
    Command::new(UKVMI).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A tool talking to one VM's socket.
struct Tool {
    sock: PathBuf,
}

impl Tool {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(UKVMI);
        c.arg("--vm").arg(&self.sock).args(args);
        c
    }
    fn cmd(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(o.status.success(), "ukvmi {args:?}: {}\nstderr: {}", o.status, text(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }
    fn detach(&self) {
        assert!(self.ok(&["detach"]).contains("detached"));
        let end = Instant::now() + T;
        while self.sock.with_extension("sock.ctl").exists() {
            assert!(Instant::now() < end, "the daemon did not remove its control socket");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `ukvmi run --guest GUEST ... --introspect unix:DIR/vm.sock`, its first
/// tick seen.
fn start(dir: &Scratch, guest: &str, extra: &[&str]) -> (RunningVm, Tool) {
    let sock = dir.path("vm.sock");
    let intro = format!("unix:{}", sock.display());
    let mut args = vec!["--guest", guest, "--vcpus", "1", "--introspect", &intro];
    args.extend_from_slice(extra);
    let vm = RunningVm::start(dir, &args);
    vm.wait_serial(if guest == "demo" { "shell: hello" } else { "tick" }, 1, T);
    (vm, Tool { sock })
}

/// Asserts the demo guest runs on: its shell says hello twice more.
fn assert_demo_runs(vm: &RunningVm) {
    let before = vm.serial_text().matches("shell: hello").count();
    vm.wait_serial("shell: hello", before + 2, T);
}

/// The value of `"key":` in a one-line JSON object (strings unquoted).
fn field(json: &str, key: &str) -> String {
    let k = format!("\"{key}\":");
    let at = json.find(&k).unwrap_or_else(|| panic!("no {key} in {json}")) + k.len();
    let rest = &json[at..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted[..quoted.find('"').unwrap()].to_string(),
        None => rest[..rest.find([',', '}']).unwrap()].to_string(),
    }
}

/// Every line is one JSON object.
fn all_json(out: &str) -> Vec<&str> {
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "no output");
    for l in &lines {
        assert!(l.starts_with('{') && l.ends_with('}'), "not a JSON object per line: {l}");
    }
    lines
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn unbase64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let n = q.iter().take_while(|&&c| c != b'=').fold(0u32, |n, &c| n << 6 | u32::from(val(c)));
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = n << (6 * pad);
        out.extend_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..3 - pad]);
    }
    out
}

/// A pseudo-terminal: the master end, and the path of its slave.
fn pty() -> (File, PathBuf) {
    // SAFETY: posix_openpt/grantpt/unlockpt/ptsname_r on a descriptor we
    // own, with a buffer of the length we pass.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        (File::from_raw_fd(m), PathBuf::from(path))
    }
}

/// Runs `cmd` with a terminal as its stdout; returns what it wrote there
/// and the output (stdout empty).
fn on_terminal(mut cmd: Command) -> (String, Output) {
    let (mut master, slave) = pty();
    let tty = std::fs::OpenOptions::new().read(true).write(true).open(&slave).unwrap();
    cmd.stdout(tty).stderr(Stdio::piped());
    let child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the slave: the master reads EIO once the child's is closed
    let o = child.wait_with_output().unwrap();
    let mut shown = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        shown.extend_from_slice(&buf[..n]);
    }
    (text(&shown), o)
}

/// A stdout whose reader has already gone: every write is EPIPE.
fn closed_stdout() -> Stdio {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors, which we then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] and fds[1] are ours, each wrapped once.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

/// Runs `cmd` with a closed stdout and asserts it ends quietly: status 0,
/// nothing on stderr, in well under the time anything could hang.
fn quiet_on_closed_stdout(mut cmd: Command, what: &str) -> Duration {
    let t0 = Instant::now();
    let o = cmd.stdout(closed_stdout()).stderr(Stdio::piped()).output().unwrap();
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(0), "{what}: {}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "", "{what}: no error spew, no panic");
    took
}

const VISIBLE: &[&str] = &[
    "demo",
    "run",
    "guests",
    "info",
    "regs",
    "translate",
    "pause",
    "resume",
    "read",
    "write",
    "dump",
    "ps",
    "trace",
    "watch-msr",
    "protect",
    "symbols",
    "detach",
];
const STREAMS: &[&str] = &["trace", "watch-msr", "protect"];

#[test]
fn every_command_has_its_own_help_and_a_typo_gets_one_line() {
    for &name in VISIBLE.iter().filter(|n| !["run", "demo"].contains(n)) {
        for args in [vec![name, "--help"], vec!["help", name]] {
            let o = ukvmi(&args);
            let out = text(&o.stdout);
            assert_eq!(o.status.code(), Some(0), "{args:?}");
            assert!(out.starts_with(&format!("ukvmi {name}: ")), "{args:?}: {out}");
            for part in ["\nUSAGE:\n", "\nOPTIONS:\n", "\nRUNS:\n", "\nEXAMPLES:\n"] {
                assert!(out.contains(part), "{args:?} lacks {part:?}: {out}");
            }
            assert!(out.contains(&format!("\n    ukvmi {name}")), "{args:?}: an example of itself: {out}");
            let runs = out.split("\nRUNS:\n").nth(1).unwrap();
            if STREAMS.contains(&name) {
                assert!(runs.starts_with("    until Ctrl-C"), "{name} streams: {runs}");
            } else {
                assert!(runs.starts_with("    once"), "{name} answers once: {runs}");
            }
            assert!(!out.contains("COMMANDS:") && out.lines().count() < 30, "{args:?}: only its own help: {out}");
        }
    }
    // `run` and `demo` keep their long help of their own.
    assert!(text(&ukvmi(&["help", "demo"]).stdout).starts_with("ukvmi demo: "));
    assert!(text(&ukvmi(&["help", "run"]).stdout).contains("--introspect unix:PATH"));
    // Typos: one line with the suggestion, nothing after it, at once.
    for (args, line) in [
        (vec!["inof"], "ukvmi: unknown command `inof` (did you mean `info`?)\n"),
        (vec!["dupm", "0x100000", "16"], "ukvmi: unknown command `dupm` (did you mean `dump`?)\n"),
        (vec!["help", "symbls"], "ukvmi: unknown command `symbls` (did you mean `symbols`?)\n"),
    ] {
        let t0 = Instant::now();
        let o = ukvmi(&args);
        assert!(t0.elapsed() < Duration::from_secs(2), "{args:?} answers at once");
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert_eq!((text(&o.stderr).as_str(), o.stdout.len()), (line, 0), "{args:?}");
    }
}

#[test]
fn data_commands_speak_json_and_symbols_take_patterns() {
    let o = ukvmi(&["guests", "--json"]);
    assert!(o.status.success());
    let out = text(&o.stdout);
    let guests = all_json(&out);
    assert!(guests.iter().any(|g| field(g, "name") == "demo"), "{out}");
    assert_eq!(guests.len(), text(&ukvmi(&["guests"]).stdout).lines().count(), "one object per guest");
    let o = ukvmi(&["guests", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("unknown option `--bogus`"), "{}", text(&o.stderr));

    let dir = Scratch::new("consistency-json");
    let (vm, tool) = start(&dir, "demo", &[]);
    // Paused, so that the bytes compared below stay put.
    tool.ok(&["pause"]);
    // read --json: the bytes --raw gives, as hex, with the address.
    let raw = tool.cmd(&["read", "syscall_table", "32", "--raw"]).stdout;
    let r = tool.ok(&["read", "syscall_table", "32", "--json"]);
    let r = all_json(&r)[0].to_string();
    let table = tool.ok(&["symbols", "syscall_table"]);
    let table_addr = table.split_whitespace().next().unwrap().to_string();
    assert_eq!(u64::from_str_radix(field(&r, "addr").trim_start_matches("0x"), 16).unwrap(), {
        u64::from_str_radix(table_addr.trim_start_matches("0x"), 16).unwrap()
    });
    assert_eq!(field(&r, "len"), "32");
    assert_eq!(unhex(&field(&r, "hex")), raw, "{r}");
    // dump --json: gpa, len and base64 per MiB; the same bytes as the raw dump.
    let d = tool.ok(&["dump", "0x100000", "0x180000", "--json", "--quiet"]);
    let chunks = all_json(&d);
    assert_eq!(chunks.len(), 2, "one object per MiB");
    assert_eq!((field(chunks[0], "gpa").as_str(), field(chunks[1], "gpa").as_str()), ("0x100000", "0x200000"));
    assert_eq!(field(chunks[1], "len"), (0x80000).to_string());
    let mut bytes = unbase64(&field(chunks[0], "base64"));
    bytes.extend(unbase64(&field(chunks[1], "base64")));
    let raw_dump = tool.cmd(&["dump", "0x100000", "0x180000", "--quiet"]).stdout;
    assert!(bytes.len() == 0x180000 && bytes == raw_dump, "the JSON dump holds the bytes of the raw one");
    // dump --hex: the hex dump `read` prints, for the same bytes.
    let hex = tool.ok(&["dump", "syscall_table", "32", "--hex", "--quiet"]);
    assert_eq!(hex, tool.ok(&["read", "syscall_table", "32"]));
    let o = tool.cmd(&["dump", "0x100000", "16", "--hex", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));

    // symbols: all of them (no longer a count), a glob, a substring.
    let all = tool.ok(&["symbols"]);
    assert!(all.lines().count() > 10 && all.contains(" syscall_table\n") && all.contains(" sys_write\n"), "{all}");
    let write = tool.ok(&["symbols", "sys_write"]);
    let glob = tool.ok(&["symbols", "sys_*"]);
    assert!(glob.contains(&write) && glob.lines().count() > 1, "{glob}");
    assert!(glob.lines().all(|l| l.split_whitespace().nth(1).unwrap().starts_with("sys_")), "{glob}");
    let sub = tool.ok(&["symbols", "syscall"]);
    assert!(sub.contains(&table) && sub.contains(" syscall_entry\n"), "{sub}");
    assert!(sub.lines().all(|l| l.contains("syscall")), "{sub}");
    let js = tool.ok(&["symbols", "syscall", "--json"]);
    let objs = all_json(&js);
    assert_eq!(objs.len(), sub.lines().count());
    assert!(objs.iter().any(|o| field(o, "name") == "syscall_table"
        && field(o, "addr") == {
            format!("{:#x}", u64::from_str_radix(table_addr.trim_start_matches("0x"), 16).unwrap())
        }));
    let at = tool.ok(&["symbols", table_addr.as_str(), "--json"]);
    assert_eq!(field(all_json(&at)[0], "symbol"), "syscall_table", "{at}");
    let o = tool.cmd(&["symbols", "no_such_thing*"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("no symbol is named `no_such_thing*` or matches it"), "{}", text(&o.stderr));

    // The others that print data already spoke JSON: still one object a line.
    for args in [&["info", "--json"][..], &["regs", "0", "--json"], &["translate", "0", "syscall_table", "--json"]] {
        all_json(&tool.ok(args));
    }
    all_json(&tool.ok(&["ps", "--json"]));
    tool.ok(&["resume"]);
    // detach, too: one object.
    let out = tool.ok(&["detach", "--json"]);
    let detached = all_json(&out);
    assert_eq!(detached.len(), 1);
    assert_eq!(field(detached[0], "event"), "detached");
    let end = Instant::now() + T;
    while tool.sock.with_extension("sock.ctl").exists() {
        assert!(Instant::now() < end, "the daemon did not remove its control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_demo_runs(&vm);
}

#[test]
fn dump_never_writes_binary_to_a_terminal() {
    let dir = Scratch::new("consistency-tty");
    let (vm, tool) = start(&dir, "demo", &[]);
    tool.ok(&["pause"]);
    let t0 = Instant::now();
    let (shown, o) = on_terminal(tool.command(&["dump", "0x102000", "32"]));
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stderr),
        "ukvmi dump: not writing binary to a terminal: give -o FILE, --hex (a hex dump) or --json, or redirect stdout\n"
    );
    assert_eq!(shown, "", "nothing reached the terminal");
    assert!(took < Duration::from_secs(2), "refused at once ({took:?})");
    // --hex is for terminals; so is --json.
    let (shown, o) = on_terminal(tool.command(&["dump", "0x102000", "32", "--hex", "--quiet"]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(shown.starts_with("0000000000102000  "), "{shown:?}");
    assert_eq!(shown.replace("\r\n", "\n"), tool.ok(&["read", "0x102000", "32"]));
    let (shown, o) = on_terminal(tool.command(&["dump", "0x102000", "32", "--json", "--quiet"]));
    assert!(o.status.success() && shown.starts_with("{\"gpa\":\"0x102000\""), "{shown:?}");
    // Redirected, the bytes themselves, as before.
    assert_eq!(tool.cmd(&["dump", "0x102000", "32", "--quiet"]).stdout.len(), 32);
    tool.ok(&["resume"]);
    tool.detach();
    assert_demo_runs(&vm);
}

#[test]
fn an_interrupted_dump_leaves_no_partial_file_and_says_so() {
    let dir = Scratch::new("consistency-partial");
    // 1 GiB through READ_PHYSICAL takes seconds: time to interrupt it.
    let (vm, tool) = start(&dir, "spin", &["--memory", "1024"]);
    let file = dir.path("ram.bin");
    let partial = dir.path("ram.bin.partial");
    // A complete dump: FILE, and no FILE.partial left.
    let o = tool.cmd(&["dump", "0x100000", "0x1000", "-o", file.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&file).unwrap(), tool.cmd(&["read", "0x100000", "0x1000", "--raw"]).stdout);
    assert!(!partial.exists());
    // The new FILE keeps the mode of the one it replaces (a memory dump may
    // be private), and a symlink is written through, not replaced.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = tool.cmd(&["dump", "0x100000", "0x2000", "-o", file.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (0x2000, 0o600));
    let link = dir.path("link.bin");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let o = tool.cmd(&["dump", "0x100000", "0x3000", "-o", link.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "still a symlink");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 0x3000, "written through the link");
    std::fs::write(&file, b"precious").unwrap();
    for (sig, status) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut cmd = tool.command(&["dump", "--via", "socket", "-o", file.to_str().unwrap()]);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        // SAFETY: between fork and exec, only signal(2), which is
        // async-signal-safe: Ctrl-C reaches the client even where this
        // test runs with SIGINT ignored.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        // The dump is under way: its partial file has bytes.
        let end = Instant::now() + T;
        while std::fs::metadata(&partial).map_or(0, |m| m.len()) == 0 {
            assert!(Instant::now() < end, "the dump never started writing {}", partial.display());
            assert!(child.try_wait().unwrap().is_none(), "the dump ended before it was interrupted");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let o = child.wait_with_output().unwrap();
        let took = t0.elapsed();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(status), "{err}");
        assert!(
            err.ends_with(&format!("ukvmi: interrupted: removed the partial output {}\n", partial.display())),
            "{err}"
        );
        assert!(!partial.exists(), "the partial file is gone");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious", "FILE is as it was");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    // The daemon stopped the dump and serves on.
    assert!(tool.ok(&["info"]).contains("vCPUs"));
    tool.detach();
    vm.assert_guest_runs();
}

#[test]
fn a_reader_that_goes_away_ends_every_command_quietly() {
    for args in [
        &["help"][..],
        &["--help"],
        &["run", "--help"],
        &["demo", "--help"],
        &["dump", "--help"],
        &["help", "trace"],
        &["guests"],
        &["guests", "--json"],
    ] {
        let mut c = Command::new(UKVMI);
        c.args(args);
        quiet_on_closed_stdout(c, &format!("{args:?}"));
    }
    let dir = Scratch::new("consistency-epipe");
    let (vm, tool) = start(&dir, "demo", &[]);
    // Attached first: the daemon's "waiting for the VM" note is not an error.
    assert!(tool.ok(&["info"]).contains("vCPUs"));
    for args in [
        &["info"][..],
        &["regs", "0", "--json"],
        &["ps"],
        &["symbols"],
        &["read", "0x100000", "0x10000"],
        &["dump", "0x100000", "0x400000", "--hex", "--quiet"],
        &["dump", "0x100000", "0x400000", "--json", "--quiet"],
    ] {
        let took = quiet_on_closed_stdout(tool.command(args), &format!("{args:?}"));
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
    // `| head -n 3`: a bounded stream stops when head has its lines.
    let mut child = tool
        .command(&["trace", "--syscalls", "--duration", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    for _ in 0..3 {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut l).unwrap();
        assert!(l.contains("syscall"), "{l}");
    }
    let t0 = Instant::now();
    drop(stdout);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("panicked") && !text(&o.stderr).contains("Broken pipe"), "{}", text(&o.stderr));
    assert!(t0.elapsed() < Duration::from_secs(10), "the trace stopped once its reader left");
    assert!(tool.ok(&["info"]).contains("vCPUs"), "the daemon serves on");
    tool.detach();
    assert_demo_runs(&vm);
}

#[test]
fn demo_piped_to_head_ends_quietly() {
    common::require_kvm();
    let mut child = Command::new(UKVMI).arg("demo").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    for _ in 0..3 {
        let mut l = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut l).unwrap();
        first.push_str(&l);
    }
    assert!(first.contains("== 1. boot the demo guest OS"), "{first}");
    let t0 = Instant::now();
    drop(stdout);
    let o = child.wait_with_output().unwrap();
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stderr), "", "no panic, no error");
    assert!(took < Duration::from_secs(10), "it ends soon after ({took:?})");
    assert!(!std::env::temp_dir().join(format!("ukvmi-demo-{pid}")).exists(), "its private directory is gone");
    // With the reader gone before the first line, too.
    let mut c = Command::new(UKVMI);
    c.arg("demo");
    quiet_on_closed_stdout(c, "demo");
}
