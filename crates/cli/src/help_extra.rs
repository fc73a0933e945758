//! What `ukvmi COMMAND --help` adds to the command table: each command's
//! examples and whether it streams (runs until Ctrl-C), keyed by name.

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
    stream("run", &["ukvmi run --guest demo --vcpus 2 --introspect unix:vm.sock"]),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{self, COMMANDS};

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
}
