//! The tool daemon's life as a new user meets it (issue 13), end to end
//! through the real `ukvmi` binary: a fast, clear answer when no VM is
//! there (and nothing left behind), `--wait`, `--vm unix:PATH`, a path that
//! is not a socket, a second VM on a served socket, the VM changing under a
//! path after `detach`, `info` naming the VMM, `--map` given to a running
//! daemon, and a trace's undo finished before the next command.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{daemon_pids, RunningVm, Scratch};

const UKVMI: &str = env!("CARGO_BIN_EXE_ukvmi");
const T: Duration = Duration::from_secs(20);

/// `ukvmi` run in `dir` (so the default `./vm.sock` is there), without the
/// caller's `UKVMI_VM` or key.
fn ukvmi(dir: &Path) -> Command {
    let mut c = Command::new(UKVMI);
    c.current_dir(dir).env_remove("UKVMI_VM").env_remove("UKVMI_KEY");
    c
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output, what: &str) -> String {
    assert!(o.status.success(), "{what}: {}\nstderr: {}", o.status, text(&o.stderr));
    text(&o.stdout)
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// Waits until no daemon serves `sock` and `dir` holds exactly `left`.
fn wait_until_gone(dir: &Path, sock: &Path, left: &[&str]) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let now = listing(dir);
        if daemon_pids(sock).is_empty() && now == left {
            return;
        }
        assert!(Instant::now() < end, "after 5 s: daemons {:?}, files {now:?} (want {left:?})", daemon_pids(sock));
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn field(json: &str, key: &str) -> String {
    let k = format!("\"{key}\":");
    let at = json.find(&k).unwrap_or_else(|| panic!("no {key} in {json}")) + k.len();
    let rest = &json[at..];
    match rest.strip_prefix('"') {
        // A string (the command line may hold commas).
        Some(s) => s[..s.find('"').unwrap()].to_string(),
        None => rest[..rest.find([',', '}']).unwrap()].to_string(),
    }
}

/// Starts a VM at `sock` (its serial and stderr in `dir`) and waits for its
/// guest to run.
fn start_vm(dir: &Scratch, sock: &Path, extra: &[&str]) -> RunningVm {
    let intro = format!("unix:{}", sock.display());
    let mut args = vec!["--guest", "traps", "--vcpus", "1", "--introspect", &intro];
    args.extend_from_slice(extra);
    let vm = RunningVm::start(dir, &args);
    vm.wait_serial("tick", 1, T);
    vm
}

fn detach(dir: &Path, sock: &Path) {
    let o = ukvmi(dir).arg("--vm").arg(sock).arg("detach").output().unwrap();
    assert!(ok(&o, "detach").contains("detached"));
    let end = Instant::now() + T;
    while !daemon_pids(sock).is_empty() {
        assert!(Instant::now() < end, "the daemon did not exit after detach");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_no_vm_a_command_answers_within_2_s_and_leaves_nothing() {
    let dir = Scratch::new("life-novm");
    let sock = dir.path("vm.sock");
    for (how, vm_args) in [
        ("the default ./vm.sock", vec![]),
        ("--vm unix:vm.sock", vec!["--vm".to_string(), "unix:vm.sock".to_string()]),
        ("--vm unix:ABSOLUTE", vec!["--vm".to_string(), format!("unix:{}", sock.display())]),
    ] {
        let t0 = Instant::now();
        let o = ukvmi(&dir.0).args(&vm_args).arg("info").output().unwrap();
        let took = t0.elapsed();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{how}: {err}");
        assert!(took < Duration::from_secs(4), "{how}: no VM took {took:?} to answer: {err}");
        println!("{how}: answered in {took:?}");
        assert!(err.contains(&format!("no VM connected to {} within 2 s", sock.display())), "{how}: {err}");
        assert!(
            err.contains(&format!("ukvmi run --guest demo --introspect unix:{}", sock.display()))
                && err.contains("--wait SECS"),
            "{how}: the answer says what to do: {err}"
        );
        // The daemon it started is gone, and with it every file it made.
        wait_until_gone(&dir.0, &sock, &[]);
    }
    // Commands one after another and at once, as a daemon leaves: each gets
    // the same answer (one that reaches a leaving daemon starts a new one).
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|i| {
                let dir = &dir;
                s.spawn(move || {
                    std::thread::sleep(Duration::from_millis(700 * i));
                    ukvmi(&dir.0).args(["regs", "0"]).output().unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &outs {
        assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
        assert!(text(&o.stderr).contains("no VM connected to"), "{}", text(&o.stderr));
    }
    wait_until_gone(&dir.0, &sock, &[]);
    // Ctrl-C of a command told to wait long: the daemon does not wait on
    // for nobody; it leaves, and leaves nothing.
    let mut waiting = ukvmi(&dir.0).args(["--wait", "60", "info"]).stderr(Stdio::null()).spawn().unwrap();
    let end = Instant::now() + T;
    while !sock.exists() {
        assert!(Instant::now() < end, "no daemon started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(i32::try_from(waiting.id()).unwrap(), libc::SIGINT) };
    waiting.wait().unwrap();
    wait_until_gone(&dir.0, &sock, &[]);
    // A log an earlier session left: kept as it was, without this daemon's lines.
    let earlier = "[ukvmi daemon 1] VM `demo` attached: 2 vCPUs\n";
    std::fs::write(dir.path("vm.sock.log"), earlier).unwrap();
    let o = ukvmi(&dir.0).arg("info").output().unwrap();
    assert!(text(&o.stderr).contains("no VM connected to"), "{}", text(&o.stderr));
    wait_until_gone(&dir.0, &sock, &["vm.sock.log"]);
    assert_eq!(std::fs::read_to_string(dir.path("vm.sock.log")).unwrap(), earlier);
    std::fs::remove_file(dir.path("vm.sock.log")).unwrap();
    // A `--wait` that is not seconds is a usage error, before any daemon.
    let o = ukvmi(&dir.0).args(["--wait", "soon", "info"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--wait takes seconds"), "{}", text(&o.stderr));
    assert!(listing(&dir.0).is_empty());
}

#[test]
fn a_path_that_is_not_a_socket_is_refused_by_name_and_left_alone() {
    let dir = Scratch::new("life-notsock");
    let readme = dir.path("README.md");
    std::fs::write(&readme, "# my project\n").unwrap();
    // An old daemon's log next to it: not shown again.
    std::fs::write(dir.path("README.md.log"), "[ukvmi daemon 1] AN OLD LINE\n").unwrap();
    for _ in 0..2 {
        let t0 = Instant::now();
        let o = ukvmi(&dir.0).args(["--vm", "README.md", "regs", "0"]).output().unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(1), "took {:?}", t0.elapsed());
        assert!(err.contains(&format!("{} exists and is not a socket", readme.display())), "{err}");
        assert!(!err.contains("AN OLD LINE") && !err.contains("Address already in use"), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    assert_eq!(std::fs::read_to_string(&readme).unwrap(), "# my project\n");
    assert_eq!(listing(&dir.0), ["README.md", "README.md.log"]);
    assert!(daemon_pids(&readme).is_empty());

    // A daemon that cannot start: its own words, not the old log's.
    std::fs::write(dir.path("vm.sock.log"), "[ukvmi daemon 1] AN OLD LINE\n").unwrap();
    let o = ukvmi(&dir.0).args(["--map", "missing.map", "info"]).output().unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot use the symbol map") && err.contains("missing.map"), "{err}");
    assert!(!err.contains("AN OLD LINE"), "{err}");
}

#[test]
fn wait_lets_a_command_wait_for_a_vm_that_starts_later() {
    let dir = Scratch::new("life-wait");
    let sock = dir.path("vm.sock");
    let t0 = Instant::now();
    let waiting = ukvmi(&dir.0)
        .args(["--wait", "60", "info", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Longer than the default wait before the VM even starts.
    std::thread::sleep(Duration::from_secs(3));
    let vm = start_vm(&dir, &sock, &["--name", "late"]);
    let o = waiting.wait_with_output().unwrap();
    let info = ok(&o, "info with --wait 60");
    assert!(t0.elapsed() > Duration::from_secs(3));
    assert_eq!(field(&info, "name"), "late");
    detach(&dir.0, &sock);
    vm.assert_guest_runs();
}

#[test]
fn info_names_the_vmm_and_a_second_vm_on_the_socket_is_refused_in_both_logs() {
    let dir = Scratch::new("life-second");
    let other_dir = Scratch::new("life-second-b");
    let sock = dir.path("vm.sock");
    let first = start_vm(&dir, &sock, &["--name", "first"]);
    let info = ok(&ukvmi(&dir.0).args(["info", "--json"]).output().unwrap(), "info --json");
    assert_eq!(field(&info, "name"), "first");
    assert_eq!(field(&info, "vmm_pid"), first.child.id().to_string(), "{info}");
    let command = field(&info, "vmm_command");
    assert!(command.contains("run") && command.contains("--name first"), "{info}");
    let uuid = field(&info, "uuid");
    let text_info = ok(&ukvmi(&dir.0).arg("info").output().unwrap(), "info");
    assert!(text_info.contains(&format!("VMM       pid {}: ", first.child.id())), "{text_info}");

    // A second VM on the same socket: refused, and both sides say so.
    let second = start_vm(&other_dir, &sock, &["--name", "second", "--reconnect", "0.2"]);
    let log_path = with_suffix(&sock, ".log");
    let end = Instant::now() + T;
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let vmm = second.stderr_text();
        if log.contains("refused VM `second`")
            && vmm.contains("introspection: the introspector closed the connection before answering the handshake")
        {
            assert!(
                log.contains(&format!("VMM pid {}", second.child.id()))
                    && log.contains(&format!("already serves `first` (uuid {uuid}")),
                "the daemon's line names both VMs: {log}"
            );
            break;
        }
        assert!(Instant::now() < end, "no refusal in both logs:\ndaemon:\n{log}\nsecond VMM:\n{vmm}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Several retries later, the daemon still serves the first VM, and the
    // refusal is in its log once, not once per retry.
    second.assert_guest_runs();
    let info = ok(&ukvmi(&dir.0).args(["info", "--json"]).output().unwrap(), "info --json");
    assert_eq!((field(&info, "name"), field(&info, "uuid")), ("first".to_string(), uuid));
    let log = std::fs::read_to_string(&log_path).unwrap();
    // (The VMM retries every 0.2 s; the log shows a repeated line once per 10 s.)
    let shown = log.matches("refused VM `second`").count();
    assert!((1..=2).contains(&shown), "{shown} refusal lines:\n{log}");
    assert!(!second.stderr_text().contains("introspector connected"), "{}", second.stderr_text());
    detach(&dir.0, &sock);
    first.assert_guest_runs();
}

#[test]
fn after_detach_a_different_vm_at_the_path_is_announced() {
    let dir = Scratch::new("life-pin");
    let other_dir = Scratch::new("life-pin-b");
    let sock = dir.path("vm.sock");
    let mut first = start_vm(&dir, &sock, &["--name", "first", "--reconnect", "0.2"]);
    let info = ok(&ukvmi(&dir.0).args(["info", "--json"]).output().unwrap(), "info");
    let uuid1 = field(&info, "uuid");
    detach(&dir.0, &sock);
    // The same VM again: nothing to announce.
    let o = ukvmi(&dir.0).args(["info", "--json"]).output().unwrap();
    assert_eq!(field(&ok(&o, "info"), "uuid"), uuid1);
    assert!(!text(&o.stderr).contains("another VM"), "{}", text(&o.stderr));
    detach(&dir.0, &sock);
    first.signal(libc::SIGTERM);
    first.wait_exit(T);

    // Another VM now connects to the same path: the next command says so.
    let second = start_vm(&other_dir, &sock, &["--name", "second", "--reconnect", "0.2"]);
    let o = ukvmi(&dir.0).args(["info", "--json"]).output().unwrap();
    let info = ok(&o, "info");
    let uuid2 = field(&info, "uuid");
    assert_ne!(uuid1, uuid2);
    let err = text(&o.stderr);
    assert!(
        err.contains(&format!("{} is now served by another VM: `second` (uuid {uuid2}", sock.display()))
            && err.contains(&format!("before, it was `first` (uuid {uuid1}")),
        "the change is announced: {err}"
    );
    // Once.
    let o = ukvmi(&dir.0).arg("info").output().unwrap();
    ok(&o, "info");
    assert!(!text(&o.stderr).contains("another VM"), "{}", text(&o.stderr));
    detach(&dir.0, &sock);
    second.assert_guest_runs();
}

#[test]
fn map_given_to_a_running_daemon_is_applied_or_refused_in_words() {
    let dir = Scratch::new("life-map");
    let sock = dir.path("vm.sock");
    let vm = start_vm(&dir, &sock, &[]);
    // The daemon starts with the built-in traps symbols.
    ok(&ukvmi(&dir.0).arg("info").output().unwrap(), "info");
    let o = ukvmi(&dir.0).args(["symbols", "my_marker"]).output().unwrap();
    assert!(!o.status.success() && text(&o.stderr).contains("no symbol is named `my_marker`"), "{}", text(&o.stderr));
    let map = dir.path("System.map");
    std::fs::write(&map, "0000000000101234 T my_marker\n").unwrap();
    let o = ukvmi(&dir.0).arg("--map").arg(&map).args(["symbols", "my_marker"]).output().unwrap();
    assert_eq!(ok(&o, "symbols with --map").trim(), "0x0000000000101234 my_marker");
    assert!(
        text(&o.stderr).contains(&format!("now uses {} (1 symbols)", map.display())),
        "the change is said: {}",
        text(&o.stderr)
    );
    // The same map again: nothing to say.
    let o = ukvmi(&dir.0).arg("--map").arg(&map).args(["symbols", "my_marker"]).output().unwrap();
    ok(&o, "symbols with the same --map");
    assert!(text(&o.stderr).is_empty(), "{}", text(&o.stderr));
    // A map that cannot be read: the command fails and says what is kept.
    let o = ukvmi(&dir.0).args(["--map", "nonexistent.map", "symbols", "my_marker"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("nonexistent.map") && text(&o.stderr).contains("keeps"), "{}", text(&o.stderr));
    detach(&dir.0, &sock);
    vm.assert_guest_runs();
}

#[test]
fn a_trace_stopped_with_ctrl_c_is_undone_before_the_next_command() {
    let dir = Scratch::new("life-undo");
    let sock = dir.path("vm.sock");
    let intro = format!("unix:{}", sock.display());
    let vm = RunningVm::start(&dir, &["--guest", "demo", "--vcpus", "2", "--introspect", &intro]);
    vm.wait_serial("shell: hello", 1, T);
    let entry = ukvmi_guests::demo::symbol("syscall_entry").unwrap();
    let demo = ukvmi_guests::find("demo").unwrap();
    let original = demo.image[usize::try_from(entry - demo.load_addr).unwrap()];
    assert_ne!(original, 0xcc);
    for round in 0..6 {
        let mut trace = ukvmi(&dir.0)
            .args(["trace", "--syscalls", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(trace.stdout.as_mut().unwrap()), &mut first).unwrap();
        assert!(first.contains("\"syscall\""), "round {round}: the trace runs: {first}");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(i32::try_from(trace.id()).unwrap(), libc::SIGINT) };
        trace.wait().unwrap();
        let o = ukvmi(&dir.0).args(["read", &format!("{entry:#x}"), "1", "--raw"]).output().unwrap();
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert_eq!(o.stdout, [original], "round {round}: the int3 is still in syscall_entry right after Ctrl-C");
    }
    // The guest ran on through the syscalls meanwhile.
    let hellos = vm.serial_text().matches("shell: hello").count();
    vm.wait_serial("shell: hello", hellos + 2, T);
    detach(&dir.0, &sock);
}
