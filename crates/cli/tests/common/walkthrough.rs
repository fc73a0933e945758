//! The README's two-terminal walkthrough as a test runs it: its shell blocks, read from README.md
//! itself (so the two cannot drift), and a shell that runs each line as a user types it — in a
//! scratch directory, `&` in the background, Ctrl-C to end a stream.

use std::{
    io::BufRead,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use super::{require_kvm, RunningVm, Scratch};

/// The section of README.md the walkthrough is.
pub const SECTION: &str = "## Introspecting a VM by hand: two terminals";

/// How the README names the binary.
const BIN: &str = "target/debug/ukvmi";

/// One command of a README line.
#[derive(Debug, Clone)]
pub struct Line {
    /// The words after `target/debug/ukvmi`.
    pub args: Vec<String>,
    /// Ends with `&`: a background job.
    pub background: bool,
}

impl Line {
    /// The command's name (`run`, `watch-msr`, ...).
    pub fn name(&self) -> &str {
        // `ukvmi`'s own options (each with a value) come before the command.
        let mut args = self.args.iter().map(String::as_str);
        while let Some(a) = args.next() {
            match a {
                "--vm" | "--key-file" | "--map" | "--wait" => {
                    args.next();
                }
                name => return name,
            }
        }
        ""
    }
    /// Whether it streams until Ctrl-C.
    pub fn streams(&self) -> bool {
        ["trace", "watch-msr", "protect"].contains(&self.name())
    }
}

/// The `sh` blocks of the walkthrough section, each as its commands.
pub fn blocks() -> Vec<Vec<Line>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let at = readme.find(SECTION).unwrap_or_else(|| panic!("README.md has no `{SECTION}`"));
    let rest = &readme[at + SECTION.len()..];
    let section = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let mut blocks = Vec::new();
    let mut current: Option<Vec<Line>> = None;
    for raw in section.lines() {
        let t = raw.trim();
        if t == "```sh" {
            current = Some(Vec::new());
            continue;
        }
        if t.starts_with("```") {
            if let Some(b) = current.take() {
                blocks.push(b);
            }
            continue;
        }
        let Some(block) = current.as_mut() else { continue };
        let code = t.find(" #").map_or(t, |c| &t[..c]).trim();
        if code.is_empty() || code.starts_with('#') {
            continue;
        }
        let (code, background) = match code.strip_suffix('&') {
            Some(c) => (c.trim(), true),
            None => (code, false),
        };
        for part in code.split(';') {
            let words: Vec<String> = part.split_whitespace().map(str::to_string).collect();
            assert_eq!(words.first().map(String::as_str), Some(BIN), "README line `{raw}`: not `{BIN} ...`");
            block.push(Line { args: words[1..].to_vec(), background });
        }
    }
    blocks
}

/// A background job: its output goes to files.
pub struct Job {
    pub line: Line,
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Job {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }
    /// Waits until its stderr contains `needle`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) {
        let t0 = Instant::now();
        while !self.stderr().contains(needle) {
            assert!(
                t0.elapsed() < timeout,
                "`ukvmi {}` never said {needle:?}\nstdout:\n{}\nstderr:\n{}",
                self.line.args.join(" "),
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Ctrl-C, as `fg` then Ctrl-C would send it.
    pub fn interrupt(&mut self) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
    }
    /// Waits for it to end.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t0.elapsed() < timeout, "`ukvmi {}` did not end:\n{}", self.line.args.join(" "), self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user's shell: commands run in the scratch directory, as typed.
pub struct Shell<'a> {
    dir: &'a Scratch,
    jobs: usize,
}

impl<'a> Shell<'a> {
    pub fn new(dir: &'a Scratch) -> Shell<'a> {
        require_kvm();
        Shell { dir, jobs: 0 }
    }

    fn command(&self, line: &Line) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
        c.args(&line.args).current_dir(&self.dir.0);
        // Ctrl-C must reach the command even where this test runs with
        // SIGINT ignored (a background job of a non-interactive shell).
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls signal(2), which is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        c
    }

    /// `ukvmi run ...` in terminal 2: the serial console (its stdout) and
    /// its stderr go to files.
    pub fn start_vm(&self, line: &Line) -> RunningVm {
        assert_eq!(line.name(), "run");
        let serial = self.dir.path("serial.log");
        let stderr = self.dir.path("stderr.log");
        let child = self
            .command(line)
            .stdout(std::fs::File::create(&serial).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        RunningVm { child, serial, stderr }
    }

    /// A line ending in `&`.
    pub fn background(&mut self, line: &Line) -> Job {
        self.jobs += 1;
        let out = self.dir.path(&format!("job{}.out", self.jobs));
        let err = self.dir.path(&format!("job{}.err", self.jobs));
        let child = self
            .command(line)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Job { line: line.clone(), child, out, err }
    }

    /// A command that finishes on its own; it must succeed.
    pub fn run(&self, line: &Line) -> Output {
        let o = self.command(line).stdin(Stdio::null()).output().unwrap();
        assert!(
            o.status.success(),
            "ukvmi {}: {}\nstderr: {}",
            line.args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// A command that finishes on its own, however it ends.
    pub fn command_output(&self, line: &Line) -> Output {
        self.command(line).stdin(Stdio::null()).output().unwrap()
    }

    /// A stream in the foreground: its first line, then Ctrl-C.
    pub fn run_until_first_line(&self, line: &Line) -> String {
        let mut child = self.command(line).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait().unwrap();
        first
    }

    /// A test's own look (not a README line): a u64 of guest memory.
    pub fn u64_at(&self, symbol: &str) -> u64 {
        let line = Line { args: ["read", symbol, "8", "--raw"].map(str::to_string).to_vec(), background: false };
        let o = self.run(&line);
        u64::from_le_bytes(o.stdout[..8].try_into().unwrap())
    }
}
