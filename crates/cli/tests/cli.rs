//! The command line: help, errors, exit status.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{RunningVm, Scratch};
use std::process::Command;
use std::time::Duration;

fn ukvmi(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ukvmi")).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn help_lists_the_builtin_guests_and_host_limits() {
    let (code, out, _) = ukvmi(&["run", "--help"]);
    assert_eq!(code, 0);
    for g in ukvmi_guests::all() {
        assert!(out.contains(g.name), "{} missing from --help", g.name);
    }
    assert!(out.contains("--introspect unix:PATH"));
    assert!(out.contains("EOPNOTSUPP"));
    // The host section comes from a real probe of /dev/kvm.
    let host = out.split("ON THIS HOST").nth(1).expect("a host section");
    let line = |what: &str| {
        host.lines().find(|l| l.trim_start().starts_with(what)).unwrap_or_else(|| panic!("{what}: {host}"))
    };
    assert!(line("events").contains("BREAKPOINT") && line("events").contains("MSR"), "{host}");
    assert!(line("missing").contains("CONTROL_CR") && line("missing").contains(" CR"), "{host}");
    assert!(!line("events").contains("XSETBV"), "{host}");
}

#[test]
fn bad_input_is_a_clear_error_never_a_panic() {
    for (args, needle) in [
        (vec!["run"], "give --guest NAME or --kernel PATH"),
        (vec!["run", "--guest", "nope"], "no built-in guest `nope`"),
        (vec!["run", "--kernel", "/nonexistent/k.bin"], "no such file"),
        (vec!["run", "--guest", "spin", "--vcpus", "x"], "--vcpus takes a number"),
        (vec!["run", "--guest", "spin", "--vcpus", "0"], "at least 1"),
        (vec!["run", "--guest", "spin", "--vcpus", "32"], "more than the guest ABI's 31"),
        (vec!["run", "--guest", "spin", "--memory", "2"], "at least 4 MiB"),
        (vec!["run", "--guest", "spin", "--introspect", "/tmp/x"], "unix:PATH"),
        (vec!["run", "--guest", "spin", "--bogus"], "unknown option `--bogus`"),
        (vec!["run", "--guest", "spin", "--allow-command", "KVMI_NOPE"], "unknown command"),
        (vec!["run", "--guest", "spin", "--uuid", "123"], "bad --uuid"),
        (vec!["frobnicate"], "unknown command"),
    ] {
        let (code, _, err) = ukvmi(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_commands_help_shows_its_options_and_a_typo_gets_a_suggestion() {
    for args in [vec!["regs", "--help"], vec!["help", "regs"], vec!["regs", "0", "-h"]] {
        let (code, out, _) = ukvmi(&args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.starts_with("ukvmi regs: a vCPU's registers"), "{args:?}: {out}");
        // The command's own help (issue 13: no longer the whole help after it).
        assert!(out.contains("    --json ") && !out.contains("--count"), "{out}");
        assert!(out.contains("\nEXAMPLES:\n    ukvmi regs 0\n") && out.contains("\nRUNS:\n    once"), "{out}");
        assert!(!out.contains("COMMANDS:") && !out.contains("HOW THE TOOL COMMANDS REACH THE VM"), "{out}");
        assert!(out.ends_with("`ukvmi help`\n"), "it says where everything is: {out}");
    }
    let (code, all, _) = ukvmi(&["help"]);
    assert_eq!(code, 0);
    assert!(all.contains("COMMANDS:") && all.contains("HOW THE TOOL COMMANDS REACH THE VM"), "{all}");
    let (code, out, err) = ukvmi(&["rgs", "0"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("ukvmi: unknown command `rgs` (did you mean `regs`?)"), "{err}");
    assert_eq!((err.lines().count(), out.as_str()), (1, ""), "one line, no help after it: {err}");
    let (code, _, err) = ukvmi(&["frobnicate"]);
    assert_eq!(code, 2);
    assert!(!err.contains("did you mean"), "{err}");
    assert_eq!(err, "ukvmi: unknown command `frobnicate` (`ukvmi help` lists the commands)\n");
}

#[test]
fn power_off_sets_the_exit_status() {
    for (guest, status) in [("poweroff", 0), ("poweroff7", 7)] {
        let dir = Scratch::new(guest);
        let mut vm = RunningVm::start(&dir, &["--guest", guest]);
        let s = vm.wait_exit(Duration::from_secs(30));
        assert_eq!(s.code(), Some(status), "{guest}: {}", vm.stderr_text());
        assert!(vm.serial_text().contains("bye"), "{}", vm.serial_text());
    }
}

#[test]
fn an_unreachable_socket_does_not_stop_the_vm() {
    let dir = Scratch::new("unreach");
    let mut vm = RunningVm::start(
        &dir,
        &["--guest", "spin", "--introspect", "unix:/nonexistent/dir/kvmi.sock", "--reconnect", "0.2"],
    );
    vm.wait_serial("tick", 2, Duration::from_secs(20));
    vm.wait_stderr("cannot connect to the introspector", Duration::from_secs(10));
    vm.signal(libc::SIGINT);
    assert_eq!(vm.wait_exit(Duration::from_secs(20)).code(), Some(0));
}

/// Wraps a flat image in a minimal ELF64 executable: one PT_LOAD at `paddr`,
/// with 4 KiB of BSS.
fn elf(image: &[u8], paddr: u64, entry: u64) -> Vec<u8> {
    use ukvmi_kimage::testing::{ehdr, phdr};
    let len = image.len() as u64;
    [ehdr(entry, 1), phdr(1, 64 + 56, paddr, len, len + 4096), image.to_vec()].concat()
}

#[test]
fn kernel_images_flat_and_elf() {
    let g = ukvmi_guests::find("poweroff7").unwrap();
    let dir = Scratch::new("kernel");
    let flat = dir.path("k.bin");
    std::fs::write(&flat, g.image).unwrap();
    let elf_path = dir.path("k.elf");
    std::fs::write(&elf_path, elf(g.image, g.load_addr, g.entry)).unwrap();
    for path in [&flat, &elf_path] {
        let mut vm = RunningVm::start(&dir, &["--kernel", path.to_str().unwrap()]);
        assert_eq!(vm.wait_exit(Duration::from_secs(30)).code(), Some(7), "{}: {}", path.display(), vm.stderr_text());
        assert!(vm.serial_text().contains("bye"));
    }
    // A broken ELF is a clear error.
    let mut broken = elf(g.image, g.load_addr, g.entry);
    broken.truncate(100);
    let bad = dir.path("bad.elf");
    std::fs::write(&bad, &broken).unwrap();
    let (code, _, err) = ukvmi(&["run", "--kernel", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.elf") && !err.contains("panicked"), "{err}");
    let big = dir.path("big.elf");
    std::fs::write(&big, elf(g.image, 1 << 40, 1 << 40)).unwrap();
    let (code, _, err) = ukvmi(&["run", "--kernel", big.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("does not fit in guest RAM"), "{err}");
}

#[test]
fn an_instruction_the_emulator_cannot_do_still_ends_the_vm() {
    // An emulation failure is re-entered a few times (it may be an int3 a tool
    // removed meanwhile); a real one comes back at the same RIP and must
    // still end the VM with a clear reason, never loop.
    // `movd %eax,%xmm0` (SSE: KVM's emulator lacks it at ring 0 on PVM),
    // then power off with status 7, then `hlt` forever.
    let code_bytes = [0x66, 0x0f, 0x6e, 0xc0, 0xb0, 0x07, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];
    let dir = Scratch::new("emulfail");
    let path = dir.path("k.bin");
    std::fs::write(&path, code_bytes).unwrap();
    let mut vm = RunningVm::start(&dir, &["--kernel", path.to_str().unwrap()]);
    let status = vm.wait_exit(Duration::from_secs(30));
    let err = vm.stderr_text();
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains("KVM_EXIT_INTERNAL_ERROR") && err.contains("at rip 0x100000"), "{err}");
    } else {
        // Hardware KVM runs it (status 7) or the guest faults without an IDT.
        assert!(matches!(status.code(), Some(7) | Some(1)), "{status:?}: {err}");
    }
}
