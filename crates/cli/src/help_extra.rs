//! Per-command help: what `ukvmi COMMAND --help` adds to the command table
//! (each command's examples and whether it streams, keyed by name), that
//! help itself, and the one line for a mistyped command.

use crate::{
    args::Opt,
    commands::{self, Action, Command, Section, COMMANDS},
};

/// The help extras of one command.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Extra {
    /// The command's name, as in the command table.
    pub name: &'static str,
    /// Command lines a user can type as they are (comments after `#`).
    pub examples: &'static [&'static str],
    /// Whether it runs until Ctrl-C (or `--count`/`--duration`) rather than
    /// answering once and exiting.
    pub streams: bool,
}

const fn once(name: &'static str, examples: &'static [&'static str]) -> Extra {
    Extra { name, examples, streams: false }
}

const fn stream(name: &'static str, examples: &'static [&'static str]) -> Extra {
    Extra { name, examples, streams: true }
}

/// Every command's extras.
pub(crate) const EXTRAS: &[Extra] = &[
    once("demo", &["ukvmi demo", "ukvmi demo --json | head"]),
    stream(
        "run",
        &[
            "ukvmi run --guest demo --vcpus 2 --introspect unix:vm.sock",
            "ukvmi run --kernel vmlinux --initrd initramfs.cpio --cmdline \"console=ttyS0 rdinit=/init\"",
        ],
    ),
    once("guests", &["ukvmi guests", "ukvmi guests --json"]),
    once("info", &["ukvmi info", "ukvmi info --json"]),
    once("regs", &["ukvmi regs 0", "ukvmi regs 1 --json"]),
    once("translate", &["ukvmi translate 0 0x400000", "ukvmi translate 0 syscall_table --json"]),
    once("pause", &["ukvmi pause; ukvmi regs 0; ukvmi resume", "ukvmi pause --timeout 1 --json"]),
    once("resume", &["ukvmi resume"]),
    once(
        "read",
        &[
            "ukvmi read syscall_table 64",
            "ukvmi read 0x100000 16 --raw | xxd",
            "ukvmi read --vcpu 0 0x400000 32 --json",
        ],
    ),
    once(
        "write",
        &[
            "ukvmi write agent_buf 68656c6c6f   # \"hello\"",
            "ukvmi write 0x2000000 '00 11 22 33' --json",
            "ukvmi write --vcpu 0 0x400000 --file patch.bin",
            "ukvmi write syscall_table --file - < table.bin   # stdin",
        ],
    ),
    once(
        "dump",
        &["ukvmi dump -o ram.bin", "ukvmi dump 0x102000 32 --hex", "ukvmi dump 0x100000 0x1000 --json > page.json"],
    ),
    once("ps", &["ukvmi ps", "ukvmi ps --json"]),
    stream("trace", &["ukvmi trace --syscalls --count 20", "ukvmi trace --msr LSTAR --duration 5 --json"]),
    stream("watch-msr", &["ukvmi watch-msr LSTAR --deny", "ukvmi watch-msr LSTAR STAR --count 5 --json"]),
    stream("protect", &["ukvmi protect syscall_table --deny", "ukvmi protect 0x3e0000 0x1000 --remove rw --json"]),
    once(
        "symbols",
        &[
            "ukvmi symbols                  # every symbol",
            "ukvmi symbols 'sys_*'          # a glob",
            "ukvmi symbols syscall --json   # a substring",
            "ukvmi symbols 0x102010",
        ],
    ),
    once("detach", &["ukvmi detach"]),
    stream("daemon", &["ukvmi daemon --vm vm.sock   # the first tool command starts it for you"]),
    once("help", &["ukvmi help", "ukvmi help dump"]),
];

/// The extras of the command called `name`.
pub(crate) fn find(name: &str) -> Option<&'static Extra> {
    EXTRAS.iter().find(|e| e.name == name)
}

/// `ukvmi COMMAND --help` (and `ukvmi help COMMAND`): the command's usage,
/// what it does, its options, whether it streams and examples — not the
/// whole `ukvmi help`, which it points to.
pub(crate) fn command_help(c: &Command) -> String {
    let about = c.about.split_whitespace().collect::<Vec<_>>().join(" ");
    let usage = if c.usage.is_empty() { String::new() } else { format!(" {}", c.usage) };
    let globals = if daemon_runs(c) { "[--vm PATH] [--key-file FILE] " } else { "" };
    let mut s = format!("ukvmi {}: {about}\n\nUSAGE:\n    ukvmi {globals}{}{usage}", c.name, c.name);
    s.push_str(if c.name == "dump" { " [-o FILE]\n" } else { "\n" });
    s.push_str("\nOPTIONS:\n");
    let shown: Vec<&Opt> = c.options.iter().filter(|o| !["-h", "--help"].contains(&o.name)).collect();
    if shown.is_empty() && c.name != "dump" {
        s.push_str("    (none)\n");
    }
    for o in shown {
        let spec = o.value.map_or_else(|| o.name.to_string(), |v| format!("{} {v}", o.name));
        s.push_str(format!("    {spec:<26} {}", o.help).trim_end());
        s.push('\n');
    }
    if c.name == "dump" {
        s.push_str(&format!(
            "    {:<26} {}\n",
            "-o FILE", "write the bytes to FILE (as FILE.partial until done; removed if interrupted)"
        ));
    }
    let extra = find(c.name);
    s.push_str("\nRUNS:\n    ");
    let bounded = c.options.iter().any(|o| o.name == "--count");
    s.push_str(match (extra.is_some_and(|e| e.streams), bounded) {
        (true, true) => {
            "until Ctrl-C (streams; --count N or --duration SECS stop it sooner), then undoes what it set up\n"
        }
        (true, false) => "until Ctrl-C, or until what it serves goes away\n",
        (false, _) => "once: answers and exits\n",
    });
    if let Some(e) = extra {
        s.push_str("\nEXAMPLES:\n");
        for ex in e.examples {
            s.push_str(&format!("    {ex}\n"));
        }
    }
    s.push_str(if daemon_runs(c) {
        "\nEvery command, and how the tool commands reach the VM (--vm, --key-file, --map): `ukvmi help`\n"
    } else {
        "\nEvery command: `ukvmi help`\n"
    });
    s
}

/// Whether the daemon runs `c` (a tool command, or `detach`).
fn daemon_runs(c: &Command) -> bool {
    matches!(c.action, Action::Tool(_) | Action::Detach)
}

/// The one line for a command that does not exist, with the nearest one
/// when a typo is likely.
pub(crate) fn unknown_command(name: &str) -> String {
    match suggest(name) {
        Some(s) => format!("ukvmi: unknown command `{name}` (did you mean `{s}`?)"),
        None => format!("ukvmi: unknown command `{name}` (`ukvmi help` lists the commands)"),
    }
}

/// What `ukvmi help [COMMAND]` prints: `Err` is the one line for an
/// unknown COMMAND.
pub(crate) fn help_for(name: Option<&str>) -> Result<String, String> {
    match name {
        None => Ok(commands::help()),
        Some("run") => Ok(crate::run::help()),
        Some("demo") => Ok(crate::demo::HELP.to_string()),
        Some(n) => commands::find(n).map(command_help).ok_or_else(|| unknown_command(n)),
    }
}

/// The command nearest to a mistyped `name` (one or two letters off), if any.
pub(crate) fn suggest(name: &str) -> Option<&'static str> {
    COMMANDS
        .iter()
        .filter(|c| c.section != Section::Hidden)
        .map(|c| (edit_distance(name, c.name), c.name))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// Levenshtein distance between two short words.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row.first().copied().unwrap_or(0);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or(0);
            let left = row.get(j).copied().unwrap_or(0);
            let best = (prev + usize::from(ca != *cb)).min(above + 1).min(left + 1);
            if let Some(cell) = row.get_mut(j + 1) {
                *cell = best;
            }
            prev = above;
        }
    }
    row.last().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{help, TOOL_HELP};

    #[test]
    fn every_command_has_examples_and_every_entry_a_command() {
        for c in COMMANDS {
            let e = find(c.name);
            assert!(e.is_some(), "`{}` has no entry in EXTRAS", c.name);
            let e = e.unwrap();
            assert!(!e.examples.is_empty(), "`{}` has no example", c.name);
            for ex in e.examples {
                assert!(ex.starts_with(&format!("ukvmi {}", c.name)), "`{}`: example `{ex}`", c.name);
            }
        }
        for (i, e) in EXTRAS.iter().enumerate() {
            assert!(commands::find(e.name).is_some(), "EXTRAS names `{}`, which is no command", e.name);
            assert!(EXTRAS.iter().skip(i + 1).all(|d| d.name != e.name), "`{}` twice", e.name);
        }
    }

    #[test]
    fn the_streaming_commands_are_the_ones_with_count_and_duration() {
        for c in COMMANDS.iter().filter(|c| matches!(c.action, commands::Action::Tool(_))) {
            let has_count = c.options.iter().any(|o| o.name == "--count");
            assert_eq!(find(c.name).map(|e| e.streams), Some(has_count), "{}", c.name);
        }
    }

    #[test]
    fn typos_find_their_command() {
        assert_eq!(suggest("rgs"), Some("regs"));
        assert_eq!(suggest("tarce"), Some("trace"));
        assert_eq!(suggest("frobnicate"), None);
        assert_eq!(suggest("daemonx"), None, "hidden commands are not suggested");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_tool_commands_help_lists_its_options_examples_and_whether_it_streams() {
        let trace = commands::find("trace").unwrap();
        let h = command_help(trace);
        assert!(h.starts_with("ukvmi trace: live events: --syscalls (default), --msr MSR,"), "{h}");
        assert!(h.contains("    --count N                  stop after N records\n"), "{h}");
        assert!(h.contains("    --msr MSR "), "{h}");
        assert!(h.contains("\nRUNS:\n    until Ctrl-C"), "{h}");
        assert!(h.contains("\nEXAMPLES:\n    ukvmi trace --syscalls --count 20\n"), "{h}");
        assert!(!h.contains(TOOL_HELP) && !h.contains("COMMANDS:"), "the whole help no longer follows: {h}");
        assert!(h.lines().count() < 30, "{h}");
        assert!(h.ends_with("`ukvmi help`\n"), "it says where the whole help is: {h}");
        for c in COMMANDS.iter().filter(|c| matches!(c.action, Action::Tool(_))) {
            assert!(c.options.iter().all(|o| !o.help.is_empty()), "{}: an option without help", c.name);
        }
        assert!(command_help(commands::find("detach").unwrap()).contains("OPTIONS:\n    --json"));
        assert!(command_help(commands::find("read").unwrap()).contains("\nRUNS:\n    once: answers and exits\n"));
        let daemon = command_help(commands::find("daemon").unwrap());
        assert!(daemon.contains("OPTIONS:\n    --vm PATH\n") && !daemon.contains("--count"), "{daemon}");
        assert!(!daemon.contains("    --help"), "-h and --help are not listed: {daemon}");
        let dump = command_help(commands::find("dump").unwrap());
        assert!(dump.contains("    -o FILE ") && dump.contains("    --hex "), "{dump}");
        let guests = command_help(commands::find("guests").unwrap());
        assert!(guests.contains("USAGE:\n    ukvmi guests\n") && guests.contains("    --json "), "{guests}");
    }

    #[test]
    fn help_for_a_command_or_one_line_for_a_typo() {
        assert_eq!(help_for(None), Ok(help()));
        assert_eq!(help_for(Some("dump")), Ok(command_help(commands::find("dump").unwrap())));
        assert!(help_for(Some("run")).unwrap().contains("--introspect"));
        assert_eq!(help_for(Some("inf")), Err("ukvmi: unknown command `inf` (did you mean `info`?)".to_string()));
        let none = help_for(Some("frobnicate")).unwrap_err();
        assert!(!none.contains('\n') && !none.contains("did you mean"), "{none}");
    }
}
