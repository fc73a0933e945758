//! The introspector commands end to end: a real VM (`ukvmi run`), the
//! daemon the first command starts, and the commands as a user types them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use common::{RunningVm, Scratch};
use std::os::unix::process::CommandExt;
use ukvmi_guests::layout;

const T: Duration = Duration::from_secs(20);

struct Tool {
    sock: PathBuf,
}

impl Tool {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ukvmi")).arg("--vm").arg(&self.sock).args(args).output().unwrap()
    }
    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(o.status.success(), "ukvmi {args:?}: {}\nstderr: {}", o.status, String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    }
    fn fails(&self, args: &[&str], status: i32, needle: &str) {
        let o = self.cmd(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(status), "ukvmi {args:?}: {err}");
        assert!(err.contains(needle), "ukvmi {args:?}: stderr `{err}` lacks `{needle}`");
    }
    fn u64_at(&self, addr: u64) -> u64 {
        let o = self.cmd(&["read", &format!("{addr:#x}"), "8", "--raw"]);
        assert!(o.status.success());
        u64::from_le_bytes(o.stdout[..8].try_into().unwrap())
    }
    /// Starts a streaming command, waits for its first line (which must
    /// contain `needle`), and interrupts it as Ctrl-C would.
    fn interrupt_after_first(&self, args: &[&str], needle: &str) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
        cmd.arg("--vm").arg(&self.sock).args(args).stdout(Stdio::piped()).stderr(Stdio::null());
        // Ctrl-C must reach the client even where this test runs with
        // SIGINT ignored (a background job of a non-interactive shell),
        // which its children would inherit.
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls signal(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut first).unwrap();
        assert!(first.contains(needle), "{first}");
        // SAFETY: signals our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait().unwrap();
    }
    fn field(json: &str, key: &str) -> String {
        let k = format!("\"{key}\":");
        let at = json.find(&k).unwrap_or_else(|| panic!("no {key} in {json}")) + k.len();
        let rest = &json[at..];
        let end = rest.find([',', '}']).unwrap();
        rest[..end].trim_matches('"').to_string()
    }
}

/// How many `ukvmi daemon` processes serve `sock`.
fn daemons_for(sock: &std::path::Path) -> usize {
    common::daemon_pids(sock).len()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

fn start(dir: &Scratch, guest: &str, vcpus: &str) -> (RunningVm, Tool) {
    let sock = dir.path("vm.sock");
    let vm = RunningVm::start(
        dir,
        &["--guest", guest, "--vcpus", vcpus, "--introspect", &format!("unix:{}", sock.display())],
    );
    vm.wait_serial("tick", 1, T);
    (vm, Tool { sock })
}

fn detach(tool: &Tool) {
    assert!(tool.ok(&["detach"]).contains("detached"));
    let end = Instant::now() + T;
    while tool.sock.with_extension("sock.ctl").exists() {
        assert!(Instant::now() < end, "the daemon did not remove its control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn one_shot_commands_read_a_running_vm() {
    let dir = Scratch::new("tools");
    let (vm, tool) = start(&dir, "traps", "2");
    let traps = ukvmi_guests::find("traps").unwrap();

    // Four first commands at once: one daemon starts, all four are served.
    let outs: Vec<Output> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| tool.cmd(&["info", "--json"]))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &outs {
        assert!(o.status.success(), "a concurrent first command: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(daemons_for(&tool.sock), 1, "one daemon per socket path");
    let info = String::from_utf8(outs[0].stdout.clone()).unwrap();
    assert_eq!(Tool::field(&info, "name"), "traps");
    assert_eq!(Tool::field(&info, "vcpus"), "2");
    assert_eq!(Tool::field(&info, "ram_bytes"), (64u64 << 20).to_string());
    assert!(info.contains("KVMI_VCPU_GET_REGISTERS") && info.contains("KVMI_VCPU_EVENT_BREAKPOINT"), "{info}");

    let regs = tool.ok(&["regs", "1", "--json"]);
    assert_eq!(hex(&Tool::field(&regs, "r13")), 1, "vCPU 1's r13 holds its index: {regs}");
    let rip = hex(&Tool::field(&regs, "rip"));
    assert!(traps.symbolize(rip).is_some(), "rip {rip:#x} is inside the guest");
    let text = tool.ok(&["regs", "0"]);
    assert!(text.contains("rip ") && text.contains("r15 0x123456789abcdef0"), "{text}");

    let tr = tool.ok(&["translate", "0", "0x100000", "--json"]);
    assert_eq!(Tool::field(&tr, "gpa"), "0x100000");

    // Memory: raw, symbol-addressed, and a dump through a file.
    let o = tool.cmd(&["read", "0x100000", "32", "--raw"]);
    assert_eq!(&o.stdout[..], &traps.image[..32]);
    let hexdump = tool.ok(&["read", "bp_target", "16"]);
    let bp_off = (traps.symbol("bp_target").unwrap() - traps.load_addr) as usize;
    let first = format!("{:02x} {:02x}", traps.image[bp_off], traps.image[bp_off + 1]);
    assert!(hexdump.contains(&first), "{hexdump} lacks {first}");
    let file = dir.path("img.bin");
    let o = tool.cmd(&["dump", "0x100000", &traps.image.len().to_string(), "-o", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&file).unwrap(), traps.image);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("through the mapped view"),
        "dump reports what it did: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let file2 = dir.path("img2.bin");
    let o = tool.cmd(&[
        "dump",
        "0x100000",
        &traps.image.len().to_string(),
        "--via",
        "socket",
        "-o",
        file2.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("through READ_PHYSICAL"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&file2).unwrap(), traps.image);

    // Pause holds every vCPU until resume.
    let p = tool.ok(&["pause", "--json"]);
    assert!(p.contains(r#""vcpus":[0,1]"#), "{p}");
    let c0 = tool.u64_at(layout::counter_addr(0));
    let c1 = tool.u64_at(layout::counter_addr(1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (tool.u64_at(layout::counter_addr(0)), tool.u64_at(layout::counter_addr(1))),
        (c0, c1),
        "paused vCPUs do not run"
    );
    assert!(tool.ok(&["regs", "0"]).contains("paused"));
    assert!(tool.ok(&["resume"]).contains("resumed vCPUs [0, 1]"));
    let end = Instant::now() + T;
    while tool.u64_at(layout::counter_addr(0)) == c0 || tool.u64_at(layout::counter_addr(1)) == c1 {
        assert!(Instant::now() < end, "resumed vCPUs run again");
        std::thread::sleep(Duration::from_millis(50));
    }
    detach(&tool);
    vm.assert_guest_runs();
}

#[test]
fn trace_steps_over_its_breakpoint_and_ctrl_c_removes_it() {
    let dir = Scratch::new("tools-bp");
    let (vm, tool) = start(&dir, "traps", "2");
    let traps = ukvmi_guests::find("traps").unwrap();
    let bp = traps.symbol("bp_target").unwrap();
    let runs0 = tool.u64_at(layout::BP_TARGET_RUNS) + tool.u64_at(layout::BP_TARGET_RUNS + 8);

    let out = tool.ok(&["trace", "--breakpoint", "bp_target", "--count", "6", "--json"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    for l in &lines {
        assert_eq!(Tool::field(l, "event"), "breakpoint");
        assert_eq!(hex(&Tool::field(l, "gpa")), bp);
        assert_eq!(hex(&Tool::field(l, "rip")), bp);
    }
    // Stepped over, not skipped: the instruction under the int3 (`incq
    // BP_TARGET_RUNS(,i,8)`) ran at every hit.
    let runs1 = tool.u64_at(layout::BP_TARGET_RUNS) + tool.u64_at(layout::BP_TARGET_RUNS + 8);
    assert!(runs1 >= runs0 + 6, "bp_target ran {runs0} -> {runs1} over 6 hits");
    let o = tool.cmd(&["read", "bp_target", "1", "--raw"]);
    assert_eq!(o.stdout, [traps.image[(bp - traps.load_addr) as usize]], "the original byte is back");

    // A trace killed mid-way (Ctrl-C) takes its breakpoint with it.
    tool.interrupt_after_first(&["trace", "--breakpoint", "bp_target", "--json"], "breakpoint");
    let end = Instant::now() + T;
    loop {
        let o = tool.cmd(&["read", "bp_target", "1", "--raw"]);
        if o.stdout == [traps.image[(bp - traps.load_addr) as usize]] {
            break;
        }
        assert!(Instant::now() < end, "the int3 stayed after the client went away");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = tool.u64_at(layout::BP_TARGET_RUNS);
    std::thread::sleep(Duration::from_millis(300));
    assert!(tool.u64_at(layout::BP_TARGET_RUNS) > r, "the guest runs bp_target on its own again");
    detach(&tool);
    vm.assert_guest_runs();
}

#[test]
fn watch_msr_deny_keeps_the_old_value() {
    let dir = Scratch::new("tools-msr");
    let (vm, tool) = start(&dir, "msr", "1");
    let out = tool.ok(&["watch-msr", "LSTAR", "--deny", "--count", "3", "--json"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let olds: Vec<u64> = lines.iter().map(|l| hex(&Tool::field(l, "old"))).collect();
    let news: Vec<u64> = lines.iter().map(|l| hex(&Tool::field(l, "new"))).collect();
    for l in &lines {
        assert_eq!(Tool::field(l, "msr_name"), "LSTAR");
        assert_eq!(Tool::field(l, "blocked"), "true");
    }
    assert!(news.iter().all(|n| n & layout::LSTAR_TAG == layout::LSTAR_TAG), "{news:x?}");
    assert!(olds.iter().all(|&o| o == olds[0]), "refused writes leave LSTAR alone: {olds:x?}");
    assert!(news[0] != news[2], "the guest kept trying new values");
    // `trace --msr` reports without refusing.
    let out = tool.ok(&["trace", "--msr", "LSTAR", "--count", "2", "--json"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.lines().all(|l| Tool::field(l, "event") == "msr" && Tool::field(l, "blocked") == "false"), "{out}");
    // Text form, allowed: the value goes through.
    let out = tool.ok(&["watch-msr", "0xc0000082", "--count", "2"]);
    assert!(out.lines().all(|l| l.starts_with("msr") && l.ends_with("allowed")), "{out}");
    detach(&tool);
    vm.assert_guest_runs();
}

#[test]
fn mistakes_get_clear_errors_and_the_daemon_survives_garbage() {
    let dir = Scratch::new("tools-err");
    let (vm, tool) = start(&dir, "spin", "1");
    tool.fails(&["regs", "3"], 2, "vCPU 3 does not exist");
    tool.fails(&["read", "no_such_symbol", "8"], 2, "not an address or a known symbol");
    tool.fails(&["ps"], 1, "no demo-OS process table");
    tool.fails(&["trace"], 1, "syscall_entry");
    tool.fails(&["watch-msr", "NOPE"], 2, "unknown MSR");
    tool.fails(&["protect", "0x1000", "--remove", "q"], 2, "--remove takes letters");
    tool.fails(&["dump", "0x3fff000", "0x2000"], 2, "past the end of guest RAM");
    // A huge range is refused before anything is allocated; the daemon lives on.
    tool.fails(&["protect", "0", "0xffffffffffffffff"], 1, "at most 511");
    // A failed command leaves an existing -o file alone.
    let keep = dir.path("keep.bin");
    std::fs::write(&keep, b"precious").unwrap();
    tool.fails(&["dump", "0x3fff000", "0x2000", "-o", keep.to_str().unwrap()], 2, "past the end");
    assert_eq!(std::fs::read(&keep).unwrap(), b"precious");
    // detach with nothing attached says so instead of starting a daemon.
    let other = Tool { sock: dir.path("nothing.sock") };
    other.fails(&["detach"], 1, "no daemon serves");
    assert!(!dir.path("nothing.sock.ctl").exists());
    let o = tool.cmd(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    // Garbage and a lying length on the control socket: the daemon drops
    // that client and goes on serving.
    for junk in [&b"hello daemon\n"[..], b"UKVMI1\x00\xff\xff\xff\xff"] {
        let mut s = std::os::unix::net::UnixStream::connect(tool.sock.with_extension("sock.ctl")).unwrap();
        std::io::Write::write_all(&mut s, junk).unwrap();
    }
    assert!(tool.ok(&["info"]).contains("spin"));
    detach(&tool);
    vm.assert_guest_runs();
}

#[test]
fn ps_trace_and_protect_on_the_demo_os() {
    let dir = Scratch::new("tools-demo");
    let sock = dir.path("vm.sock");
    let vm = RunningVm::start(
        &dir,
        &["--guest", "demo", "--vcpus", "2", "--reconnect", "0.1", "--introspect", &format!("unix:{}", sock.display())],
    );
    vm.wait_serial("shell: hello", 1, T);
    let tool = Tool { sock };
    // Before the rootkit's first attack (about 1 s after boot): guard the
    // syscall table, in the background, while the other commands run.
    let guard = {
        let sock = tool.sock.clone();
        std::thread::spawn(move || {
            Tool { sock }.ok(&["protect", "syscall_table", "8", "--deny", "--count", "1", "--json", "--duration", "15"])
        })
    };

    let ps = tool.ok(&["ps", "--json"]);
    for (pid, name, cpu) in [(1, "init", 0), (2, "shell", 0), (3, "worker", 1), (4, "rootkit", 1)] {
        let obj = format!(r#"{{"pid":{pid},"name":"{name}","#);
        let at = ps.find(&obj).unwrap_or_else(|| panic!("no {name} in {ps}"));
        assert_eq!(Tool::field(&ps[at..], "cpu"), cpu.to_string(), "{ps}");
    }
    let text = tool.ok(&["ps"]);
    assert!(text.contains("PID") && text.contains("rootkit"), "{text}");

    // Virtual reads: paused, each vCPU is in some process's address space;
    // its code at 0x400000 is the user image, the same bytes as physical
    // memory at the frame `translate` names.
    tool.ok(&["pause"]);
    for v in ["0", "1"] {
        let tr = tool.ok(&["translate", v, "0x400000", "--json"]);
        let gpa = Tool::field(&tr, "gpa");
        let virt = tool.cmd(&["read", "--vcpu", v, "0x400000", "64", "--raw"]);
        let phys = tool.cmd(&["read", &gpa, "64", "--raw"]);
        assert!(virt.status.success(), "{}", String::from_utf8_lossy(&virt.stderr));
        assert_eq!(virt.stdout, phys.stdout, "vCPU {v}: virtual 0x400000 = physical {gpa}");
        assert_eq!(virt.stdout.len(), 64);
    }
    tool.fails(&["read", "--vcpu", "0", "0x7f0000000000", "8"], 1, "not mapped");
    tool.ok(&["resume"]);

    // Each process has its own address space: 0x400000 maps to its own frames.
    let cr3s: Vec<String> = ps.split(r#""cr3":""#).skip(1).map(|s| s[..s.find('"').unwrap()].to_string()).collect();
    assert_eq!(cr3s.len(), 4);
    assert!(cr3s.iter().collect::<std::collections::BTreeSet<_>>().len() == 4, "distinct CR3s: {cr3s:?}");

    let trace = tool.ok(&["trace", "--syscalls", "--count", "12", "--json"]);
    let lines: Vec<&str> = trace.lines().collect();
    assert_eq!(lines.len(), 12, "{trace}");
    assert!(lines.iter().all(|l| Tool::field(l, "event") == "syscall"), "{trace}");
    assert!(lines.iter().any(|l| Tool::field(l, "process") == "worker"), "{trace}");

    // The rootkit's write to the syscall table, refused; the table keeps sys_write.
    let out = guard.join().unwrap();
    assert_eq!(Tool::field(&out, "event"), "page", "{out}");
    assert_eq!(Tool::field(&out, "blocked"), "true");
    assert_eq!(Tool::field(&out, "process"), "rootkit");
    // Two guards at once: one ending must not switch PF events off for the
    // other (its page stays restricted and must keep reporting).
    // (The rootkit attacks about every 2 s: its second refused write comes
    // well after the short guard ended.)
    let second = {
        let sock = tool.sock.clone();
        std::thread::spawn(move || {
            Tool { sock }.ok(&["protect", "syscall_table", "8", "--deny", "--count", "2", "--json", "--duration", "15"])
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // The demo kernel's tick count brackets the short guard's window: the
    // guest ran all along, so an empty report means nobody wrote there.
    let ticks = || Tool::field(&tool.ok(&["ps", "--json"]), "ticks").parse::<u64>().unwrap();
    let ticks_before = ticks();
    let short = tool.ok(&["protect", "0x310000", "0x2000", "--duration", "0.5"]);
    let ticks_after = ticks();
    assert!(ticks_after > ticks_before, "the guest did not run during the guard: {ticks_before} -> {ticks_after}");
    assert!(short.is_empty(), "nobody writes there: {short}");
    let second = second.join().unwrap();
    assert_eq!(second.lines().count(), 2, "the remaining guard still sees the rootkit: {second}");
    assert!(second.lines().all(|l| Tool::field(l, "blocked") == "true"), "{second}");

    // Syscall traces cut short by Ctrl-C, again and again: the guest never
    // receives a #BP (or #DB) for a hit that was in flight.
    for _ in 0..4 {
        tool.interrupt_after_first(&["trace", "--syscalls", "--json"], "syscall");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(tool.u64_at(layout::EXC_COUNT_BASE + 3 * 8), 0, "#BP reached the guest");
    assert_eq!(tool.u64_at(layout::EXC_COUNT_BASE + 8), 0, "#DB reached the guest");

    // The guest itself saw its write vanish (it reads the slot back).
    vm.wait_serial("syscall_table[write] hook failed", 1, T);
    if !vm.serial_text().contains("hook succeeded") {
        let table = ukvmi_guests::demo::symbol("syscall_table").unwrap();
        assert_eq!(tool.u64_at(table + 8), ukvmi_guests::demo::symbol("sys_write").unwrap());
    }
    detach(&tool);
    vm.wait_serial("shell: hello", 3, T);
}

#[test]
fn symbols_are_virtual_and_physical_commands_translate_them() {
    let dir = Scratch::new("tools-symva");
    let sock = dir.path("vm.sock");
    let vm = RunningVm::start(
        &dir,
        &["--guest", "demo", "--vcpus", "1", "--introspect", &format!("unix:{}", sock.display())],
    );
    vm.wait_serial("shell: hello", 1, T);
    let tool = Tool { sock };
    // A System.map whose `user_code` is the demo OS's user image at VA
    // 0x400000, which is not identity-mapped (each process has its own
    // frames), and `ptable` an identity-mapped kernel address.
    let map = dir.path("System.map");
    std::fs::write(&map, "0000000000400000 T user_code\n00000000003e0000 D ptable\n").unwrap();
    let m = map.to_str().unwrap();
    tool.ok(&["--map", m, "pause"]);
    let tr = tool.ok(&["--map", m, "translate", "0", "0x400000", "--json"]);
    let gpa = hex(&Tool::field(&tr, "gpa"));
    assert_ne!(gpa, 0x400000, "user code is not identity-mapped: {tr}");
    let by_symbol = tool.cmd(&["--map", m, "read", "user_code", "64", "--raw"]);
    assert!(by_symbol.status.success(), "{}", String::from_utf8_lossy(&by_symbol.stderr));
    let at_gpa = tool.cmd(&["read", &format!("{gpa:#x}"), "64", "--raw"]).stdout;
    let at_number = tool.cmd(&["read", "0x400000", "64", "--raw"]).stdout;
    assert_eq!(by_symbol.stdout, at_gpa, "the symbol is read where vCPU 0 maps it");
    assert_ne!(at_gpa, at_number, "a number stays physical (and holds other bytes here)");
    let dumped = tool.cmd(&["--map", m, "dump", "user_code+0x10", "16"]).stdout;
    assert_eq!(dumped, at_gpa[0x10..0x20], "dump translates symbols too");
    let ptable = tool.cmd(&["--map", m, "read", "ptable", "16", "--raw"]).stdout;
    assert_eq!(ptable, tool.cmd(&["read", "0x3e0000", "16", "--raw"]).stdout, "identity-mapped kernel data");
    tool.ok(&["resume"]);
    detach(&tool);
}

#[test]
fn a_vm_merely_named_like_a_built_in_guest_gets_no_symbols() {
    let dir = Scratch::new("tools-name");
    let sock = dir.path("vm.sock");
    let vm = RunningVm::start(
        &dir,
        &["--guest", "spin", "--name", "demo", "--introspect", &format!("unix:{}", sock.display())],
    );
    vm.wait_serial("tick", 1, T);
    let tool = Tool { sock };
    assert!(tool.ok(&["info", "--json"]).contains(r#""name":"demo""#));
    tool.fails(&["read", "syscall_table", "8"], 2, "no symbol map");
    tool.fails(&["symbols"], 1, "no symbol map");
    let log = std::fs::read_to_string(dir.path("vm.sock.log")).unwrap();
    assert!(log.contains("does not run the built-in `demo` guest"), "{log}");
    detach(&tool);
}

/// The pid of the `ukvmi daemon` serving `sock`.
fn daemon_pid(sock: &std::path::Path) -> u32 {
    common::daemon_pids(sock).first().copied().unwrap_or_else(|| panic!("no daemon serves {}", sock.display()))
}

#[test]
fn a_daemon_killed_mid_trace_leaves_no_int3_in_the_guest() {
    let dir = Scratch::new("tools-kill9");
    let sock = dir.path("vm.sock");
    let vm = RunningVm::start(
        &dir,
        &["--guest", "demo", "--vcpus", "2", "--reconnect", "0.1", "--introspect", &format!("unix:{}", sock.display())],
    );
    vm.wait_serial("shell: hello", 1, T);
    let tool = Tool { sock: sock.clone() };
    let entry = ukvmi_guests::demo::symbol("syscall_entry").unwrap();
    let demo = ukvmi_guests::find("demo").unwrap();
    let original = demo.image[usize::try_from(entry - demo.load_addr).unwrap()];
    assert_ne!(original, 0xcc);
    // The trace's int3 is out of memory only while a hit is stepped over:
    // kill until one kill caught it planted (the VMM then says it put the
    // byte back); every kill must leave the guest whole.
    for round in 1.. {
        assert!(round <= 10, "ten kills never caught the trace's int3 in memory");
        let mut trace = Command::new(env!("CARGO_BIN_EXE_ukvmi"))
            .arg("--vm")
            .arg(&sock)
            .args(["trace", "--syscalls", "--json"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path("trace.err")).unwrap())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(trace.stdout.take().unwrap()));
        for _ in 0..5 {
            let l = lines.next().unwrap_or_else(|| {
                panic!(
                    "round {round}: the trace ended: {}\ndaemon log:\n{}",
                    std::fs::read_to_string(dir.path("trace.err")).unwrap_or_default(),
                    std::fs::read_to_string(dir.path("vm.sock.log")).unwrap_or_default()
                )
            });
            let l = l.unwrap();
            assert_eq!(Tool::field(&l, "event"), "syscall", "{l}");
        }
        // A record goes out just as its hit is being stepped over, the
        // int3 out of memory; it comes back within a millisecond or so and
        // stays until the next syscall. Kill a little after the record.
        std::thread::sleep(Duration::from_millis(5 + 11 * round as u64));
        // SAFETY: kill(2) with a pid we just found.
        unsafe { libc::kill(daemon_pid(&sock) as i32, libc::SIGKILL) };
        let end = Instant::now() + T;
        while vm.stderr_text().matches("introspector disconnected").count() < round {
            assert!(Instant::now() < end, "the VMM did not see the daemon go:\n{}", vm.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = trace.kill();
        let _ = trace.wait();
        // Every process runs on: the shell keeps printing (through syscalls).
        let hellos = vm.serial_text().matches("shell: hello").count();
        vm.wait_serial("shell: hello", hellos + 2, T);
        // A new daemon finds the original byte and no #BP or #DB in the guest.
        let now = tool.cmd(&["read", &format!("{entry:#x}"), "1", "--raw"]);
        assert!(now.status.success(), "{}", String::from_utf8_lossy(&now.stderr));
        assert_eq!(now.stdout, [original], "round {round}: syscall_entry's first byte");
        assert_eq!(tool.u64_at(layout::EXC_COUNT_BASE + 3 * 8), 0, "#BP reached the guest");
        assert_eq!(tool.u64_at(layout::EXC_COUNT_BASE + 8), 0, "#DB reached the guest");
        detach(&tool);
        if vm.stderr_text().contains("put back 1 byte(s) the introspector had written with undo") {
            break;
        }
    }
}

/// `ukvmi write`'s bytes as HEXBYTES.
fn hexbytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn write_puts_bytes_in_guest_memory_with_the_vcpus_held_and_the_guest_sees_them() {
    let dir = Scratch::new("tools-write");
    let (vm, tool) = start(&dir, "traps", "2");
    // The guest prints its tick line from `tick_msg`: patched, it prints
    // the new text (the guest itself read the bytes).
    let tick = tool.ok(&["read", "tick_msg", "5", "--raw"]);
    assert_eq!(tick, "tick ");
    // While it goes in, every vCPU is held paused: a pause trace sees each
    // one paused and resumed.
    let pauses = {
        let sock = tool.sock.clone();
        std::thread::spawn(move || {
            Tool { sock }.ok(&["trace", "--pauses", "--json", "--count", "4", "--duration", "15"])
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let out = tool.ok(&["write", "tick_msg", "54", "4f 43 4b"]);
    assert!(out.starts_with("wrote 4 bytes at ") && out.contains("(tick_msg)"), "{out}");
    assert!(out.contains("every vCPU was held paused for it"), "{out}");
    let pauses = pauses.join().unwrap();
    for (event, vcpu) in [("paused", "0"), ("paused", "1"), ("resumed", "0"), ("resumed", "1")] {
        assert!(
            pauses.lines().any(|l| Tool::field(l, "event") == event && Tool::field(l, "vcpu") == vcpu),
            "no {event} of vCPU {vcpu}: {pauses}"
        );
    }
    assert_eq!(tool.ok(&["read", "tick_msg", "5", "--raw"]), "TOCK ", "read back");
    vm.wait_serial("TOCK ", 2, T);
    // Put back: the guest ticks as before.
    tool.ok(&["write", "tick_msg", &hexbytes(b"tick")]);
    let ticks = vm.serial_text().matches("tick ").count();
    vm.wait_serial("tick ", ticks + 2, T);

    // --json: where it went; across a page boundary, at a physical address.
    let j = tool.ok(&["write", "0x2000ffe", "00112233aabbccdd", "--json"]);
    assert_eq!(
        (Tool::field(&j, "addr"), Tool::field(&j, "gpa"), Tool::field(&j, "len"), Tool::field(&j, "paused")),
        ("0x2000ffe".into(), "0x2000ffe".into(), "8".into(), "true".into()),
        "{j}"
    );
    assert!(!j.contains("\"vcpu\"") && !j.contains("\"runs\""), "physical, in one run: {j}");
    let o = tool.cmd(&["read", "0x2000ffe", "8", "--raw"]);
    assert_eq!(o.stdout, [0x00, 0x11, 0x22, 0x33, 0xaa, 0xbb, 0xcc, 0xdd]);

    // --file: the most one write takes (1 MiB), read back whole; and stdin.
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = dir.path("big.bin");
    std::fs::write(&file, &big).unwrap();
    let t0 = Instant::now();
    let j = tool.ok(&["write", "0x2100000", "--file", file.to_str().unwrap(), "--json"]);
    let took = t0.elapsed();
    assert_eq!(Tool::field(&j, "len"), (1u32 << 20).to_string(), "{j}");
    assert!(tool.cmd(&["read", "0x2100000", "0x100000", "--raw"]).stdout == big, "1 MiB read back");
    eprintln!("write: 1 MiB through KVMI_VM_WRITE_PHYSICAL in {took:?}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_ukvmi"));
    c.arg("--vm").arg(&tool.sock).args(["write", "0x2003000", "--file", "-"]).stdin(Stdio::piped());
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"from stdin").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tool.cmd(&["read", "0x2003000", "10", "--raw"]).stdout, b"from stdin");

    // Paused by the user, the vCPUs stay paused; --vcpu N goes through
    // vCPU N's page tables (here identity-mapped).
    tool.ok(&["pause"]);
    let c0 = tool.u64_at(layout::counter_addr(0));
    let j = tool.ok(&["write", "--vcpu", "1", "0x2004000", "5a5a", "--json"]);
    assert_eq!((Tool::field(&j, "vcpu"), Tool::field(&j, "gpa")), ("1".into(), "0x2004000".into()), "{j}");
    let text = tool.ok(&["write", "0x2004002", "5a"]);
    assert!(text.contains("the vCPUs were paused already and stay paused"), "{text}");
    // --no-pause while the user's pause holds them: still reported paused.
    let j = tool.ok(&["write", "0x2004003", "5a", "--no-pause", "--json"]);
    assert_eq!(Tool::field(&j, "paused"), "true", "{j}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(tool.u64_at(layout::counter_addr(0)), c0, "still paused after the writes");
    assert!(tool.ok(&["regs", "0"]).contains("paused"));
    tool.ok(&["resume"]);
    assert_eq!(tool.cmd(&["read", "0x2004000", "4", "--raw"]).stdout, [0x5a; 4]);
    // --no-pause: written with the vCPUs running.
    let j = tool.ok(&["write", "0x2005000", "01", "--no-pause", "--json"]);
    assert_eq!(Tool::field(&j, "paused"), "false", "{j}");
    assert_eq!(tool.cmd(&["read", "0x2005000", "1", "--raw"]).stdout, [1]);
    detach(&tool);
    vm.assert_guest_runs();
}

#[test]
fn write_refuses_bad_bytes_and_bad_addresses_and_writes_nothing() {
    let dir = Scratch::new("tools-write-err");
    let (vm, tool) = start(&dir, "traps", "2");
    let before = tool.cmd(&["read", "0x2000000", "16", "--raw"]).stdout;
    tool.fails(&["write", "0x2000000", "zz"], 2, "`z` (character 1) is not a hex digit");
    tool.fails(&["write", "0x2000000", "909"], 2, "3 hex digits, an odd number");
    tool.fails(&["write", "0x2000000", "0x90"], 2, "not a number: drop the `0x`");
    tool.fails(&["write", "0x2000000"], 2, "missing the bytes");
    tool.fails(&["write"], 2, "missing ADDR");
    let empty = dir.path("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    tool.fails(&["write", "0x2000000", "90", "--file", empty.to_str().unwrap()], 2, "give one, not both");
    tool.fails(&["write", "0x2000000", "--file", empty.to_str().unwrap()], 2, "the file is empty");
    tool.fails(
        &["write", "0x2000000", "--file", "/nonexistent/patch.bin"],
        1,
        "--file /nonexistent/patch.bin: No such file",
    );
    let over = dir.path("over.bin");
    std::fs::write(&over, vec![0x41u8; (1 << 20) + 1]).unwrap();
    tool.fails(&["write", "0x2000000", "--file", over.to_str().unwrap()], 2, "holds more than 1 MiB");
    // More hex than a command line carries to the daemon: --file is the way.
    let long = "00".repeat(40_000);
    tool.fails(&["write", "0x2000000", &long], 1, "(`write` takes its bytes from a file with --file)");
    // Addresses: past the end of RAM, unmapped, unknown.
    tool.fails(&["write", "0x3fffffe", "00112233"], 2, "0x3fffffe+0x4 is past the end of guest RAM (0x4000000)");
    tool.fails(&["write", "0xfffffffffffffffe", "00112233"], 2, "address range overflows");
    tool.fails(
        &["write", "--vcpu", "0", "0x7f0000000000", "00"],
        1,
        "0x7f0000000000 is not mapped in vCPU 0's address space",
    );
    tool.fails(&["write", "--vcpu", "7", "0x2000000", "00"], 2, "vCPU 7 does not exist");
    tool.fails(&["write", "no_such_symbol", "00"], 2, "not an address or a known symbol");
    tool.fails(&["write", "0x2000000", "00", "--bogus"], 2, "unknown option --bogus");
    // A wait longer than the clock can add is a usage error, not a daemon
    // thread's panic (which left the vCPUs paused and the client waiting).
    tool.fails(&["pause", "--timeout", "1e19"], 2, "--timeout takes at most");
    // A breakpoint's int3 is no place to write: its byte would come back.
    let trace = {
        let sock = tool.sock.clone();
        std::thread::spawn(move || Tool { sock }.cmd(&["trace", "--breakpoint", "bp_target", "--duration", "3"]))
    };
    std::thread::sleep(Duration::from_millis(800));
    tool.fails(&["write", "bp_target", "90"], 1, "holds the int3 of a breakpoint");
    trace.join().unwrap();
    // Nothing was written, and no failure left the vCPUs paused.
    assert_eq!(tool.cmd(&["read", "0x2000000", "16", "--raw"]).stdout, before);
    let traps = ukvmi_guests::find("traps").unwrap();
    let bp = traps.symbol("bp_target").unwrap();
    assert_eq!(tool.cmd(&["read", "bp_target", "1", "--raw"]).stdout, [traps.image[(bp - traps.load_addr) as usize]]);
    assert!(tool.ok(&["regs", "0"]).contains("running"), "no write left the vCPUs paused");
    let c = tool.u64_at(layout::counter_addr(1));
    std::thread::sleep(Duration::from_millis(200));
    assert!(tool.u64_at(layout::counter_addr(1)) > c, "vCPU 1 runs");
    detach(&tool);
    vm.assert_guest_runs();
}
