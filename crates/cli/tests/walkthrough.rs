//! The README's two-terminal walkthrough, run as written: its commands are read from README.md
//! itself. Guards started before the VM refuse every attack of the demo OS's rootkit; guards
//! started after it report the damage, and `--restore` repairs it. The guest's own serial output
//! and its rootkit-hook counters (`hijacked_syscalls`, `hooked_writes`) are the judges.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::time::Duration;

use common::{
    walkthrough::{blocks, Job, Line, Shell},
    RunningVm, Scratch,
};

const T: Duration = Duration::from_secs(30);

/// The rootkit's report lines: (LSTAR or table, succeeded, attempt).
fn attacks(serial: &str) -> Vec<(&'static str, bool, u64)> {
    serial
        .lines()
        .filter_map(|l| {
            let what = if l.starts_with("rootkit: LSTAR hijack ") {
                "LSTAR"
            } else if l.starts_with("rootkit: syscall_table[write] hook ") {
                "table"
            } else {
                return None;
            };
            let n = l.rsplit("(attempt ").next()?.trim_end_matches(')').parse().ok()?;
            Some((what, l.contains(" succeeded"), n))
        })
        .collect()
}

/// The README's `run` line (terminal 2).
fn run_line(walk: &[Vec<Line>]) -> Line {
    walk[0].iter().find(|l| l.name() == "run").expect("the walkthrough starts a VM").clone()
}

/// Waits until the rootkit has reported attempt `n` for both attacks.
fn wait_attempt(vm: &RunningVm, n: u64) {
    let t0 = std::time::Instant::now();
    while attacks(&vm.serial_text()).iter().filter(|a| a.2 >= n).count() < 2 {
        assert!(t0.elapsed() < T, "no attempt {n}:\n{}", vm.serial_text());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_walkthrough_as_written_refuses_every_attack() {
    let dir = Scratch::new("walk-first");
    let walk = blocks();
    assert_eq!(walk.len(), 2, "the walkthrough: the session, then the late guards with --restore");
    let mut sh = Shell::new(&dir);
    let mut guards: Vec<Job> = Vec::new();
    let mut vm: Option<RunningVm> = None;
    for line in &walk[0] {
        match line.name() {
            "run" => {
                assert!(guards.len() >= 2, "the README starts the guards before the VM");
                let started = sh.start_vm(line);
                // Let the rootkit try twice (about 1 s after boot, then every 2 s).
                wait_attempt(&started, 2);
                vm = Some(started);
            }
            "detach" => {
                let vm = vm.as_ref().expect("detach comes after the VM");
                // The guest ran all along (its counters are checked below
                // while it keeps running): a shell line and a third attempt.
                let hellos = vm.serial_text().matches("shell: hello").count();
                wait_attempt(vm, 3);
                vm.wait_serial("shell: hello", hellos + 1, T);
                assert_eq!(sh.u64_at("hijacked_syscalls"), 0, "no syscall went through the rootkit's LSTAR hook");
                assert_eq!(sh.u64_at("hooked_writes"), 0, "no write went through the rootkit's table hook");
                sh.run(line);
            }
            _ if line.background => guards.push(sh.background(line)),
            _ if line.streams() => {
                let first = sh.run_until_first_line(line);
                assert!(!first.is_empty(), "`ukvmi {}` printed nothing", line.args.join(" "));
            }
            _ => {
                sh.run(line);
            }
        }
    }
    let vm = vm.expect("the walkthrough starts a VM");
    assert!(!vm.serial_text().contains("killed by exception"), "{}", vm.serial_text());
    let seen = attacks(&vm.serial_text());
    assert!(seen.len() >= 6, "{seen:?}");
    assert!(seen.iter().all(|a| !a.1), "every attack refused: {seen:?}\n{}", vm.serial_text());
    // The guards end with `detach`, having shown a clean start and refused each attempt.
    for g in &mut guards {
        g.wait(T);
    }
    let (msr, table) = (&guards[0], &guards[1]);
    assert_eq!(msr.line.name(), "watch-msr");
    assert!(msr.stderr().contains("vCPU 1: LSTAR = ") && msr.stderr().contains("the kernel's syscall entry"));
    assert!(!msr.stderr().contains("COMPROMISED"), "{}", msr.stderr());
    assert!(msr.stdout().lines().filter(|l| l.starts_with("BLOCKED") && l.contains("LSTAR")).count() >= 3);
    assert_eq!(table.line.name(), "protect");
    assert!(
        table.stderr().contains("syscall_table: all 512 words as in the `demo` kernel image"),
        "{}",
        table.stderr()
    );
    assert!(
        table.stdout().lines().filter(|l| l.starts_with("BLOCKED") && l.contains("syscall_table+0x8")).count() >= 3
    );
    // `dump -o ram.bin` wrote into the current directory, as a user's would.
    assert!(dir.path("ram.bin").metadata().unwrap().len() > 0);
}

#[test]
fn late_guards_report_the_damage_and_restore_repairs_it() {
    let dir = Scratch::new("walk-late");
    let walk = blocks();
    let mut sh = Shell::new(&dir);
    // The VM first: the rootkit wins.
    let vm = sh.start_vm(&run_line(&walk));
    vm.wait_serial("rootkit: LSTAR hijack succeeded", 1, T);
    vm.wait_serial("rootkit: syscall_table[write] hook succeeded", 1, T);

    // The first block's guards, late: they say the guest is compromised.
    let mut late: Vec<Job> = walk[0].iter().filter(|l| l.background).map(|l| sh.background(l)).collect();
    assert_eq!(late.len(), 2);
    late[0].wait_stderr("vCPU 1: LSTAR = 0x", T);
    late[0].wait_stderr("COMPROMISED already", T);
    assert!(late[0].stderr().contains("add --restore"), "{}", late[0].stderr());
    late[1].wait_stderr("syscall_table: COMPROMISED already: 1 of 512 words", T);
    assert!(late[1].stderr().contains("(syscall_table+0x8)") && late[1].stderr().contains("the image has 0x"));
    assert!(late[1].stderr().contains("(sys_write)"), "{}", late[1].stderr());
    for g in &mut late {
        g.interrupt();
        g.wait(T);
    }

    // The second block: --restore.
    assert!(walk[1].iter().all(|l| l.background && l.args.contains(&"--restore".to_string())), "{:?}", walk[1]);
    let restore: Vec<Job> = walk[1].iter().map(|l| sh.background(l)).collect();
    restore[0].wait_stderr("restored vCPU 1: LSTAR", T);
    restore[0].wait_stderr("watching LSTAR", T);
    restore[1].wait_stderr("restored 0x", T);
    restore[1].wait_stderr("protecting 1 page(s)", T);
    assert!(restore[1].stderr().contains("-> sys_write"), "{}", restore[1].stderr());
    let at_restore = attacks(&vm.serial_text()).iter().map(|a| a.2).max().unwrap();

    // From the next whole attempt on, every attack fails, and the hooks
    // see no more calls while the guest runs on.
    wait_attempt(&vm, at_restore + 1);
    let hijacked = sh.u64_at("hijacked_syscalls");
    let hooked = sh.u64_at("hooked_writes");
    let rounds = vm.serial_text().matches("worker: round").count();
    wait_attempt(&vm, at_restore + 3);
    // The worker runs on vCPU 1, the rootkit's, and writes with syscalls.
    vm.wait_serial("worker: round", rounds + 1, T);
    assert_eq!(sh.u64_at("hijacked_syscalls"), hijacked, "syscalls still enter through the rootkit's LSTAR hook");
    assert_eq!(sh.u64_at("hooked_writes"), hooked, "writes still go through the rootkit's table hook");
    let after: Vec<_> = attacks(&vm.serial_text()).into_iter().filter(|a| a.2 > at_restore + 1).collect();
    assert!(after.len() >= 4, "{after:?}");
    assert!(after.iter().all(|a| !a.1), "attacks after the restore are refused: {after:?}\n{}", vm.serial_text());

    assert!(!vm.serial_text().contains("killed by exception"), "{}", vm.serial_text());
    let detach = walk[0].iter().find(|l| l.name() == "detach").unwrap();
    sh.run(detach);
    for mut g in restore {
        g.wait(T);
        assert!(g.stdout().lines().any(|l| l.starts_with("BLOCKED")), "{}", g.stdout());
    }
}

/// A command of this test's own (not a README line), in the same shell.
fn own(args: &[&str]) -> Line {
    Line { args: args.iter().map(|a| a.to_string()).collect(), background: false }
}

#[test]
fn the_state_and_the_restore_in_json_and_the_mistakes() {
    let dir = Scratch::new("walk-json");
    let walk = blocks();
    let mut sh = Shell::new(&dir);
    let vm = sh.start_vm(&run_line(&walk));
    vm.wait_serial("rootkit: syscall_table[write] hook succeeded", 1, T);

    // --json: the state as JSON objects on stderr; stdout keeps the records.
    let o = sh.run(&own(&["watch-msr", "LSTAR", "--json", "--duration", "0.2"]));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains(r#"{"event":"state","vcpu":0,"msr":"0xc0000082","msr_name":"LSTAR","value":"#), "{err}");
    let v1 = err.lines().find(|l| l.contains(r#""vcpu":1,"#)).unwrap_or_else(|| panic!("{err}"));
    assert!(v1.contains(r#""compromised":true"#) && v1.contains(r#""symbol":"syscall_table_end""#), "{v1}");
    assert!(!String::from_utf8(o.stdout).unwrap().contains(r#""event":"state""#));
    let o = sh.run(&own(&["protect", "syscall_table", "--json", "--duration", "0.2"]));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        err.contains(r#""range":"syscall_table","words":512,"image":"demo","changed":1,"hooks":1,"compromised":true"#),
        "{err}"
    );
    assert!(
        err.contains(r#""at":"syscall_table+0x8""#) && err.contains(r#""image_symbol":"sys_write","pointer":true"#)
    );

    // --restore --json (guarding, so the rootkit cannot hook again): what
    // was put back.
    let msr = sh.background(&own(&["watch-msr", "LSTAR", "--deny", "--restore", "--json"]));
    let table = sh.background(&own(&["protect", "syscall_table", "--deny", "--restore", "--json"]));
    msr.wait_stderr(r#"{"event":"restored","vcpu":1,"msr_name":"LSTAR","old":"0x"#, T);
    table.wait_stderr(r#"{"event":"restored","gpa":"0x"#, T);
    // Now clean, seen from outside: LSTAR is syscall_entry on every vCPU,
    // the table as in the image.
    let o = sh.run(&own(&["watch-msr", "LSTAR", "--duration", "0.2"]));
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.matches("(syscall_entry): the kernel's syscall entry").count(), 2, "{err}");
    let o = sh.run(&own(&["protect", "syscall_table", "--duration", "0.2"]));
    assert!(String::from_utf8(o.stderr).unwrap().contains("all 512 words as in the `demo` kernel image"));
    // The restore left no stub behind: the rootkit's page is as it was
    // (its hook first, zeros at the end), and the guest runs on.
    let hellos = vm.serial_text().matches("shell: hello").count();
    vm.wait_serial("shell: hello", hellos + 2, T);
    let o = sh.run(&own(&["read", "module_area+0xfc0", "64", "--raw"]));
    assert_eq!(o.stdout, vec![0u8; 64], "the stub's room is zero again");
    let o = sh.run(&own(&["read", "module_area", "2", "--raw"]));
    assert_ne!(o.stdout, [0x49, 0xbb], "the jump to the stub is gone: the rootkit's own bytes are back");
    assert!(!vm.serial_text().contains("killed by exception"), "{}", vm.serial_text());

    // Mistakes: clear errors, and the daemon serves on.
    let o = sh.command_output(&own(&["watch-msr", "STAR", "--restore"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--restore puts LSTAR back"));
    sh.run(&own(&["detach"]));
}
