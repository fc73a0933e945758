//! `ukvmi demo` end to end: the README's first command, on /dev/kvm, with
//! every step checked from its machine-readable output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use std::process::Command;

fn field(json: &str, key: &str) -> Option<String> {
    let k = format!("\"{key}\":");
    let at = json.find(&k)? + k.len();
    let rest = &json[at..];
    if let Some(s) = rest.strip_prefix('"') {
        // A JSON string: up to the first unescaped quote.
        let mut out = String::new();
        let mut esc = false;
        for c in s.chars() {
            match (esc, c) {
                (true, c) => {
                    out.push(match c {
                        'n' => '\n',
                        c => c,
                    });
                    esc = false;
                }
                (false, '\\') => esc = true,
                (false, '"') => return Some(out),
                (false, c) => out.push(c),
            }
        }
        return None;
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

#[test]
fn the_demo_walks_through_every_step_and_its_checks_hold() {
    common::require_kvm();
    let out = Command::new(env!("CARGO_BIN_EXE_ukvmi")).args(["demo", "--json", "--duration", "3"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let of = |ev: &str| -> Vec<&str> {
        lines.iter().copied().filter(|l| field(l, "event").as_deref() == Some(ev)).collect()
    };
    let failed: Vec<&str> = of("check").into_iter().filter(|l| field(l, "ok").as_deref() != Some("true")).collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "demo failed ({}): {failed:#?}\nstderr: {}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in &lines {
        assert!(line.starts_with('{') && line.ends_with('}'), "--json prints only JSON objects: {line}");
    }

    let steps: Vec<String> = of("step").iter().filter_map(|l| field(l, "step")).collect();
    assert_eq!(steps, ["1", "2", "3", "4", "5", "6", "7", "8"]);
    assert_eq!(of("attached").len(), 1);

    // 3: a live syscall trace, with the user buffer decoded.
    let sys = of("syscall");
    assert!(
        sys.iter().any(|l| field(l, "process").as_deref() == Some("shell")
            && field(l, "call").is_some_and(|c| c.starts_with("write(") && c.contains("hello"))),
        "{sys:#?}"
    );
    // 4: the rootkit's LSTAR overwrite, refused.
    let msr = of("msr");
    assert!(
        msr.iter().any(|l| field(l, "msr_name").as_deref() == Some("LSTAR")
            && field(l, "blocked").as_deref() == Some("true")
            && field(l, "process").as_deref() == Some("rootkit")),
        "{msr:#?}"
    );
    // 5: its write to the syscall table, refused.
    let page = of("page");
    assert!(
        page.iter().any(|l| field(l, "access").as_deref() == Some("w")
            && field(l, "blocked").as_deref() == Some("true")
            && field(l, "process").as_deref() == Some("rootkit")),
        "{page:#?}"
    );
    // 6: the agent's hypercall, answered, and the guest printed the answer.
    let hc = of("hypercall");
    assert!(
        hc.iter().any(|l| field(l, "message").as_deref() == Some("hello from the guest")
            && field(l, "reply").as_deref() == Some("hello from ukvmi")),
        "{hc:#?}"
    );
    let serial: Vec<String> = of("serial").iter().filter_map(|l| field(l, "line")).collect();
    assert!(serial.iter().any(|l| l.contains("hello from ukvmi")), "the guest saw the answer: {serial:#?}");
    // 7: processes from the process table.
    let ps = lines.iter().find(|l| l.contains("\"processes\":[{")).expect("a ps record");
    for name in ["init", "shell", "worker", "rootkit"] {
        assert!(ps.contains(&format!("\"name\":\"{name}\"")), "{ps}");
    }
    // 8: the checks made from outside, and the summary.
    let checks = of("check");
    assert!(checks.len() >= 10, "{checks:#?}");
    let summary = of("summary");
    assert_eq!(summary.len(), 1);
    assert_eq!(field(summary[0], "ok").as_deref(), Some("true"));
}

#[test]
fn the_demo_reads_well_without_json() {
    common::require_kvm();
    let out =
        Command::new(env!("CARGO_BIN_EXE_ukvmi")).args(["demo", "--vcpus", "1", "--duration", "2"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}\n{text}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for needle in [
        "booted demo guest: 1 vCPU,",
        "introspector attached",
        "syscall",
        "BLOCKED",
        "MSR LSTAR",
        "old value kept",
        "instruction skipped",
        "hypercall",
        "PID",
        "rootkit",
        "done:",
        "never crashed",
        "guest |",
    ] {
        assert!(text.contains(needle), "the demo's output lacks `{needle}`:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
}

#[test]
fn the_system_map_the_tools_parse_names_the_kernels_symbols() {
    // (The tools and the kernel share one declaration of the demo OS's
    // layout, ukvmi-guest-abi; the guests' build and tests check the C
    // headers against it.)
    use ukvmi_guests::demo as k;
    let map = ukvmi_monitor::SymbolMap::parse(k::SYSTEM_MAP).unwrap();
    for name in ["syscall_entry", "syscall_table", "sys_write", "agent_buf", "hijacked_syscalls", "hooked_writes"] {
        assert_eq!(map.addr(name), k::symbol(name), "{name}");
    }
}
