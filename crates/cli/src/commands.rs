//! The table of `ukvmi` commands — each one's name, usage, one-line help,
//! options and what runs it — and the top-level help built from it. `main`
//! dispatches through the same table, and tool commands check their
//! options against it.

use crate::{
    args::{flag, valued, Opt},
    tools::{self, ToolFn},
};

/// Where a command appears in `ukvmi help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    /// "START HERE".
    Start,
    /// "THE VM".
    Vm,
    /// "COMMANDS" (the introspector's).
    Tool,
    /// Not listed (`daemon`, `help`).
    Hidden,
}

/// What runs a command.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Action {
    /// `ukvmi run`.
    Run,
    /// `ukvmi demo`.
    Demo,
    /// `ukvmi daemon` (started by the first tool command).
    Daemon,
    /// `ukvmi guests`.
    Guests,
    /// `ukvmi help [run|demo]`.
    Help,
    /// `ukvmi detach`: the daemon's own command.
    Detach,
    /// A tool command, run by the daemon.
    Tool(ToolFn),
}

/// One command.
#[derive(Debug)]
pub(crate) struct Command {
    /// The command's name.
    pub name: &'static str,
    /// What follows the name in its usage line.
    pub usage: &'static str,
    /// One line (or a few, already indented) about it.
    pub about: &'static str,
    /// Where `ukvmi help` lists it.
    pub section: Section,
    /// The options it takes, in the order its errors list them.
    pub options: &'static [Opt],
    /// What runs it.
    pub action: Action,
}

impl Command {
    /// Whether `ukvmi` takes `--vm`, `--map` and `--key-file` out of this
    /// command's words (every command but those with options of their own
    /// by those names).
    pub(crate) fn takes_tool_options(&self) -> bool {
        !matches!(self.action, Action::Run | Action::Demo | Action::Daemon)
    }
}

/// The options of `ukvmi` itself for tool commands, wherever they are.
pub(crate) const TOOL_GLOBALS: &[&str] = &["--vm", "--map", "--key-file"];

/// The client's output file option (the file is written by the client).
pub(crate) const OUTPUT: &[&str] = &["-o", "--output"];

const STREAM: [Opt; 3] = [
    flag("--json").help("one JSON object per line instead of text"),
    valued("--count", "N").help("stop after N records"),
    valued("--duration", "SECS").help("stop after SECS seconds"),
];
const JSON: &[Opt] = &[flag("--json").help("one JSON object per line instead of text")];
const HELP_FLAGS: [Opt; 2] = [flag("-h"), flag("--help")];

/// Every command, in the order `ukvmi help` lists them.
pub(crate) const COMMANDS: &[Command] = &[
    Command {
        name: "demo",
        usage: "",
        about: "boot the demo guest OS, attach an introspector, show a\n                             \
                syscall trace, block a rootkit, answer the guest, list\n                             \
                its processes, and shut down cleanly (--json: records)",
        section: Section::Start,
        options: &[
            flag("--json").help("one JSON object per line instead of text"),
            valued("--vcpus", "N"),
            valued("--duration", "SECS"),
            HELP_FLAGS[0],
            HELP_FLAGS[1],
        ],
        action: Action::Demo,
    },
    Command {
        name: "run",
        usage: "[OPTIONS]",
        about: "start a VM, optionally introspected over KVMI v12\n                             \
                (`ukvmi run --help`: options, built-in guests, host support)",
        section: Section::Vm,
        options: &[
            valued("--guest", "NAME"),
            valued("--kernel", "PATH"),
            valued("--vcpus", "N"),
            valued("--memory", "MIB"),
            valued("--introspect", "unix:PATH"),
            flag("--key"),
            valued("--key-file", "FILE"),
            valued("--introspector-uid", "UID"),
            valued("--name", "NAME"),
            valued("--uuid", "UUID"),
            valued("--reconnect", "SECS"),
            valued("--handshake-timeout", "SECS"),
            valued("--unhook-timeout", "SECS"),
            valued("--kvmi-dialect", "v12|v7"),
            valued("--allow-command", "ID"),
            valued("--allow-event", "ID"),
            valued("--serial", "stdio|file:PATH"),
            HELP_FLAGS[0],
            HELP_FLAGS[1],
        ],
        action: Action::Run,
    },
    Command {
        name: "guests",
        usage: "",
        about: "list the built-in guests",
        section: Section::Vm,
        options: &[],
        action: Action::Guests,
    },
    Command {
        name: "info",
        usage: "",
        about: "the VM: name, vCPUs, RAM, KVMI version, what the host supports",
        section: Section::Tool,
        options: JSON,
        action: Action::Tool(tools::info),
    },
    Command {
        name: "regs",
        usage: "VCPU",
        about: "a vCPU's registers (it keeps running unless paused)",
        section: Section::Tool,
        options: JSON,
        action: Action::Tool(tools::regs),
    },
    Command {
        name: "translate",
        usage: "VCPU ADDR",
        about: "guest virtual → physical, through the vCPU's page tables",
        section: Section::Tool,
        options: JSON,
        action: Action::Tool(tools::translate),
    },
    Command {
        name: "pause",
        usage: "",
        about: "hold every vCPU paused (until `resume`)",
        section: Section::Tool,
        options: &[
            flag("--json").help("one JSON object per line instead of text"),
            valued("--timeout", "SECS").help("give up unless every vCPU is paused within SECS (default 5)"),
        ],
        action: Action::Tool(tools::pause),
    },
    Command {
        name: "resume",
        usage: "",
        about: "let held vCPUs go",
        section: Section::Tool,
        options: JSON,
        action: Action::Tool(tools::resume),
    },
    Command {
        name: "read",
        usage: "ADDR LEN",
        about: "guest physical memory as a hex dump (--raw: bytes; --vcpu N: ADDR is\n                               \
                virtual, through that vCPU's page tables)",
        section: Section::Tool,
        options: &[
            flag("--raw").help("the bytes themselves instead of a hex dump"),
            flag("--hex").help("a hex dump (the default)"),
            valued("--vcpu", "N").help("ADDR is virtual, through vCPU N's page tables"),
        ],
        action: Action::Tool(tools::read),
    },
    Command {
        name: "dump",
        usage: "[ADDR LEN]",
        about: "bulk memory (default: all RAM) to stdout or -o FILE, progress bar; --via map|socket",
        section: Section::Tool,
        options: &[
            flag("--quiet").help("no progress bar and no summary line"),
            valued("--via", "map|socket").help("the mapped view (default when granted) or KVMI_VM_READ_PHYSICAL"),
        ],
        action: Action::Tool(tools::dump),
    },
    Command {
        name: "ps",
        usage: "",
        about: "the demo OS's processes, read from its process table",
        section: Section::Tool,
        options: JSON,
        action: Action::Tool(tools::ps),
    },
    Command {
        name: "trace",
        usage: "",
        about: "live events: --syscalls (default), --msr MSR, --page ADDR (writes),\n                               \
                --breakpoint ADDR, --hypercalls [--answer TEXT], --pauses",
        section: Section::Tool,
        options: &[
            STREAM[0],
            STREAM[1],
            STREAM[2],
            flag("--syscalls").help("every syscall (the default when nothing else is asked for)"),
            flag("--hypercalls").help("the guest's hypercalls"),
            flag("--pauses").help("vCPU pause events"),
            valued("--answer", "TEXT").help("answer each hypercall with TEXT (into the demo kernel's agent_buf)"),
            valued("--breakpoint", "ADDR").help("a breakpoint at ADDR (virtual)"),
            valued("--msr", "MSR").help("writes of MSR (repeat for more)"),
            valued("--page", "ADDR").help("writes to the page at ADDR (repeat for more)"),
        ],
        action: Action::Tool(tools::trace),
    },
    Command {
        name: "watch-msr",
        usage: "MSR...",
        about: "show MSRs on every vCPU, then report guest writes; --deny keeps the old value,\n                               \
                --restore puts a hijacked LSTAR back to the kernel's syscall_entry",
        section: Section::Tool,
        options: &[
            STREAM[0],
            STREAM[1],
            STREAM[2],
            flag("--deny").help("refuse the writes: the old value stays"),
            flag("--restore").help("put a hijacked LSTAR back (the vCPU writes it at its next syscall)"),
        ],
        action: Action::Tool(tools::watch_msr),
    },
    Command {
        name: "protect",
        usage: "ADDR [LEN]",
        about: "show what ADDR holds against the kernel image, then take access away from\n                               \
                pages (--remove w); --deny refuses writes; --restore puts the image's bytes back",
        section: Section::Tool,
        options: &[
            STREAM[0],
            STREAM[1],
            STREAM[2],
            flag("--deny").help("refuse the writes: the instruction is skipped"),
            flag("--restore").help("put back the words that differ from the built-in kernel image"),
            valued("--remove", "rwx").help("the access to take away: letters from rwx (default w)"),
        ],
        action: Action::Tool(tools::protect),
    },
    Command {
        name: "symbols",
        usage: "[NAME|ADDR...]",
        about: "the guest's symbol map, or look names/addresses up",
        section: Section::Tool,
        options: &[],
        action: Action::Tool(tools::symbols),
    },
    Command {
        name: "detach",
        usage: "",
        about: "undo everything, let the VM run on, stop the daemon",
        section: Section::Tool,
        options: &[],
        action: Action::Detach,
    },
    Command {
        name: "daemon",
        usage: "--vm PATH [--map FILE] [--key-file FILE]",
        about: "hold the KVMI connection for the tool commands (started by them)",
        section: Section::Hidden,
        options: &[
            valued("--vm", "PATH"),
            valued("--map", "FILE"),
            valued("--key-file", "FILE"),
            HELP_FLAGS[0],
            HELP_FLAGS[1],
        ],
        action: Action::Daemon,
    },
    Command {
        name: "help",
        usage: "[COMMAND]",
        about: "this help, or a command's",
        section: Section::Hidden,
        options: &[],
        action: Action::Help,
    },
];

/// The command called `name`.
pub(crate) fn find(name: &str) -> Option<&'static Command> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// The option names of `cmd` that take a value.
pub(crate) fn valued_options(cmd: &Command) -> Vec<&'static str> {
    cmd.options.iter().filter(|o| o.value.is_some()).map(|o| o.name).collect()
}

/// Every tool command's valued options, and the client's (`-o`) and
/// `ukvmi`'s (`--map`): a tool command's words are split the same way
/// whichever command they are for, and only then checked against its own.
pub(crate) fn tool_valued_options() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = OUTPUT.iter().chain(&["--map"]).copied().collect();
    for c in COMMANDS.iter().filter(|c| matches!(c.action, Action::Tool(_))) {
        for o in valued_options(c) {
            if !v.contains(&o) {
                v.push(o);
            }
        }
    }
    v
}

const INTRO: &str = "ukvmi: KVM virtual machine introspection on a stock Linux kernel\n";

const INTROSPECTOR: &str = "
THE INTROSPECTOR (a second terminal; talks to the VM started with
`ukvmi run ... --introspect unix:PATH`):
    ukvmi [--vm PATH] [--key-file FILE] COMMAND [ARGS]
                             PATH defaults to $UKVMI_VM, else ./vm.sock; the key
                             (for a VM started with one) comes from FILE, else $UKVMI_KEY
";

/// How the tool commands reach the VM, examples and common options (also
/// `ukvmi daemon --help`).
pub(crate) const TOOL_HELP: &str = "
HOW THE TOOL COMMANDS REACH THE VM:
    With KVMI the introspector listens and the VMM connects, and what a tool
    enables lasts as long as its connection. The first command for PATH starts
    a small daemon in the background (log: PATH.log) that listens on PATH, holds
    the connection, and runs each command sent to its control socket PATH.ctl.
    Streaming commands (trace, watch-msr, protect) own what they set up: Ctrl-C
    undoes it. The daemon exits when the VM does, or on `ukvmi detach`.
    PATH, PATH.ctl, PATH.lock and PATH.log are 0600 whatever the umask, and
    the daemon serves only its own user and root (SO_PEERCRED), on PATH.ctl
    and on PATH (the VMM).
    A VM started with a key (`ukvmi run --key-file`) needs the same key here:
    --key-file FILE (one trailing newline is not part of the key) or $UKVMI_KEY,
    never on the command line. It reaches the daemon through its environment
    and the control socket; while no VM is attached, each command's key is
    the one the daemon answers the next handshake with.
    Addresses are numbers (0x...) or, for built-in guests or with --map FILE
    (System.map format), symbol names such as syscall_table or sys_write+0x4.
    A number given to read, dump, protect or trace --page is guest-physical; a
    symbol is a kernel virtual address, translated through vCPU 0's page tables
    (breakpoints, translate and read --vcpu take virtual addresses).

EXAMPLES:
    ukvmi run --guest demo --vcpus 2 --introspect unix:vm.sock     # terminal 1
    ukvmi info                                                      # terminal 2
    ukvmi ps
    ukvmi regs 1 --json
    ukvmi translate 0 0x400000
    ukvmi read syscall_table 64
    ukvmi dump -o ram.bin
    ukvmi trace --syscalls --count 20
    ukvmi watch-msr LSTAR --deny
    ukvmi protect syscall_table --deny
    ukvmi pause; ukvmi regs 0; ukvmi resume
    ukvmi detach

COMMON OPTIONS:
    --json            one JSON object per line instead of text
    --count N         (streams) stop after N records
    --duration SECS   (streams) stop after SECS seconds
";

/// `ukvmi help`: every listed command, by section.
pub(crate) fn help() -> String {
    let mut s = String::from(INTRO);
    let usage = |c: &Command| if c.usage.is_empty() { c.name.to_string() } else { format!("{} {}", c.name, c.usage) };
    let in_section = |sec: Section| COMMANDS.iter().filter(move |c| c.section == sec);
    for (title, sec) in [("START HERE", Section::Start), ("THE VM", Section::Vm)] {
        s.push_str(&format!("\n{title}:\n"));
        for c in in_section(sec) {
            s.push_str(&format!("    {:<25}{}\n", format!("ukvmi {}", usage(c)), c.about));
        }
    }
    s.push_str(INTROSPECTOR);
    s.push_str("\nCOMMANDS:\n");
    for c in in_section(Section::Tool) {
        s.push_str(&format!("    {:<26} {}\n", usage(c), c.about));
    }
    s.push_str(TOOL_HELP);
    s
}

/// `ukvmi COMMAND --help` for a tool command: its usage, what it does and
/// its options, then the whole `ukvmi help` as before.
pub(crate) fn command_help(c: &Command) -> String {
    let about = c.about.split_whitespace().collect::<Vec<_>>().join(" ");
    let usage = if c.usage.is_empty() { String::new() } else { format!(" {}", c.usage) };
    let mut s =
        format!("ukvmi {}: {about}\n\nUSAGE:\n    ukvmi [--vm PATH] [--key-file FILE] {}{usage}", c.name, c.name);
    s.push_str(if c.name == "dump" { " [-o FILE]\n" } else { "\n" });
    s.push_str("\nOPTIONS:\n");
    if c.options.is_empty() {
        s.push_str("    (none)\n");
    }
    for o in c.options {
        let spec = o.value.map_or_else(|| o.name.to_string(), |v| format!("{} {v}", o.name));
        s.push_str(&format!("    {spec:<26} {}\n", o.help));
    }
    s.push_str("\n----\n\n");
    s.push_str(&help());
    s
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

    #[test]
    fn names_are_unique_and_typos_find_their_command() {
        for (i, c) in COMMANDS.iter().enumerate() {
            assert!(COMMANDS.iter().skip(i + 1).all(|d| d.name != c.name), "{} twice", c.name);
        }
        assert_eq!(suggest("rgs"), Some("regs"));
        assert_eq!(suggest("tarce"), Some("trace"));
        assert_eq!(suggest("frobnicate"), None);
        assert_eq!(suggest("daemonx"), None, "hidden commands are not suggested");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn help_lists_every_visible_command_once() {
        let h = help();
        for c in COMMANDS.iter().filter(|c| c.section != Section::Hidden) {
            assert!(h.contains(&format!("    {}", if c.section == Section::Tool { c.name } else { "ukvmi " })));
            assert!(h.contains(c.about), "{}", c.name);
        }
        assert!(!h.contains("hold the KVMI connection"));
    }

    #[test]
    fn a_tool_commands_help_lists_its_options_then_everything() {
        let trace = find("trace").unwrap();
        let h = command_help(trace);
        assert!(h.starts_with("ukvmi trace: live events: --syscalls (default), --msr MSR,"), "{h}");
        assert!(h.contains("    --count N                  stop after N records\n"), "{h}");
        assert!(h.contains("    --msr MSR "), "{h}");
        assert!(h.ends_with(&help()), "the whole help follows");
        for c in COMMANDS.iter().filter(|c| matches!(c.action, Action::Tool(_))) {
            assert!(c.options.iter().all(|o| !o.help.is_empty()), "{}: an option without help", c.name);
        }
        assert!(command_help(find("detach").unwrap()).contains("OPTIONS:\n    (none)\n"));
    }
}
