//! The table of `ukvmi` commands — each one's name, usage, one-line help,
//! options and what runs it — and the top-level help built from it (a
//! command's own help is in `help_extra.rs`; `ukvmi guests` is here too,
//! being the table's list of what `run` can boot). `main` dispatches
//! through the same table, and tool commands check their options against
//! it.

use std::process::ExitCode;

use ukvmi_monitor::json::Obj;

use crate::{
    args::{flag, valued, Opt},
    help_extra::command_help,
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
            valued("--initrd", "FILE"),
            valued("--cmdline", "TEXT"),
            valued("--map", "FILE"),
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
        options: &[flag("--json").help("one JSON object per guest: name and summary")],
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
            flag("--json").help("one JSON object: the address, len and the bytes as a hex string"),
            valued("--vcpu", "N").help("ADDR is virtual, through vCPU N's page tables"),
        ],
        action: Action::Tool(tools::read),
    },
    Command {
        name: "write",
        usage: "ADDR HEXBYTES",
        about: "patch guest memory (HEXBYTES such as 90c3, or --file FILE; up to 1 MiB),\n                               \
                every vCPU held paused meanwhile (--vcpu N: ADDR is virtual)",
        section: Section::Tool,
        options: &[
            flag("--json").help("one JSON object: the address, its gpa, len and whether the vCPUs were paused"),
            valued("--vcpu", "N").help("ADDR is virtual, through vCPU N's page tables"),
            valued("--file", "FILE").help("the bytes of FILE (- for stdin) instead of HEXBYTES; at most 1 MiB"),
            flag("--no-pause").help("write while the vCPUs run (default: all held paused for the write)"),
        ],
        action: Action::Tool(tools::write),
    },
    Command {
        name: "dump",
        usage: "[ADDR LEN]",
        about:
            "bulk memory (default: all RAM) to -o FILE, or --hex/--json; progress bar;\n                               \
                --via map|socket",
        section: Section::Tool,
        options: &[
            flag("--quiet").help("no progress bar and no summary line"),
            valued("--via", "map|socket").help("the mapped view (default when granted) or KVMI_VM_READ_PHYSICAL"),
            flag("--hex").help("a hex dump instead of the bytes (the bytes never go to a terminal)"),
            flag("--json").help("one JSON object per MiB: gpa, len and the bytes in base64"),
        ],
        action: Action::Tool(tools::dump),
    },
    Command {
        name: "ps",
        usage: "",
        about: "the processes: the demo OS's table, or a Linux kernel's tasks (--map vmlinux)",
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
        usage: "[PATTERN|ADDR...]",
        about:
            "the guest's symbols: all, those PATTERN matches (a name, a substring or\n                               \
                a glob such as 'sys_*'), or the symbol at ADDR",
        section: Section::Tool,
        options: &[flag("--json").help("one JSON object per symbol: name and addr")],
        action: Action::Tool(tools::symbols),
    },
    Command {
        name: "detach",
        usage: "",
        about: "undo everything, let the VM run on, stop the daemon",
        section: Section::Tool,
        options: &[flag("--json").help("one JSON object: {\"event\":\"detached\"}")],
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
    ukvmi [--vm PATH] [--key-file FILE] [--wait SECS] COMMAND [ARGS]
                             PATH defaults to $UKVMI_VM, else ./vm.sock (`unix:PATH`
                             works too); the key (for a VM started with one) comes
                             from FILE, else $UKVMI_KEY; with no VM at PATH a command
                             answers within about 2 s, or waits up to SECS for one
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
    undoes it. The daemon exits when the VM does, on `ukvmi detach`, or, with
    no VM, once no command waits for one (it then leaves no files behind).
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
    A number given to read, write, dump, protect or trace --page is
    guest-physical; a symbol is a kernel virtual address, translated through
    vCPU 0's page tables (breakpoints, translate, read --vcpu and write --vcpu
    take virtual addresses).

EXAMPLES:
    ukvmi --wait 30 watch-msr LSTAR --deny &                        # terminal 2, guards first
    ukvmi --wait 30 protect syscall_table --deny &
    ukvmi run --guest demo --vcpus 2 --introspect unix:vm.sock     # terminal 1
    ukvmi info                                                      # terminal 2
    ukvmi ps
    ukvmi regs 1 --json
    ukvmi translate 0 0x400000
    ukvmi read syscall_table 64
    ukvmi write agent_buf 68656c6c6f     # \"hello\"; every vCPU held paused meanwhile
    ukvmi dump -o ram.bin
    ukvmi trace --syscalls --count 20
    ukvmi watch-msr LSTAR --deny --restore     # a guard started late: repair, then refuse
    ukvmi pause; ukvmi regs 0; ukvmi resume
    ukvmi detach

COMMON OPTIONS:
    --json            one JSON object per line instead of text
    --count N         (streams) stop after N records
    --duration SECS   (streams) stop after SECS seconds

EXIT STATUS:
    0 when the command did its job, and also when the reader stops early
    (`ukvmi ... | head`: the command ends quietly, without an error);
    1 when it failed; 2 for a usage error.
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

/// Prints help text (a reader that stops early is no error).
pub(crate) fn print_help(text: &str) -> ExitCode {
    match tools::write_stdout(text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ukvmi: writing the help: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ukvmi guests [--json]`: the built-in guests, a line (or a JSON object)
/// each.
pub(crate) fn guests(cmd: &Command, args: &[String]) -> ExitCode {
    let mut json = false;
    for a in args {
        match a.as_str() {
            "--json" => json = true,
            "-h" | "--help" => return print_help(&command_help(cmd)),
            other => {
                eprintln!("ukvmi guests: unknown option `{other}` (allowed: --json)");
                return ExitCode::from(2);
            }
        }
    }
    let mut text = String::new();
    for g in ukvmi_guests::all() {
        if json {
            text.push_str(&Obj::new().str("name", g.name).str("summary", g.summary).build());
            text.push('\n');
        } else {
            text.push_str(&format!("{:<12} {}\n", g.name, g.summary));
        }
    }
    print_help(&text)
}

#[cfg(test)]
mod tests;
