//! The `ukvmi` command.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]

mod control;
mod daemon;
mod demo;
mod run;
mod tools;
mod vmm_errors;

use std::{path::PathBuf, process::ExitCode};

const HELP: &str = "\
ukvmi: KVM virtual machine introspection on a stock Linux kernel

START HERE:
    ukvmi demo               boot the demo guest OS, attach an introspector, show a
                             syscall trace, block a rootkit, answer the guest, list
                             its processes, and shut down cleanly (--json: records)

THE VM:
    ukvmi run [OPTIONS]      start a VM, optionally introspected over KVMI v12
                             (`ukvmi run --help`: options, built-in guests, host support)
    ukvmi guests             list the built-in guests

THE INTROSPECTOR (a second terminal; talks to the VM started with
`ukvmi run ... --introspect unix:PATH`):
    ukvmi [--vm PATH] [--key-file FILE] COMMAND [ARGS]
                             PATH defaults to $UKVMI_VM, else ./vm.sock; the key
                             (for a VM started with one) comes from FILE, else $UKVMI_KEY
";

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

fn help() -> String {
    let mut s = HELP.to_string();
    s.push_str("\nCOMMANDS:\n");
    for (name, args, what) in tools::COMMANDS {
        s.push_str(&format!("    {:<26} {what}\n", format!("{name} {args}")));
    }
    s.push_str(&format!("    {:<26} {}\n", "detach", "undo everything, let the VM run on, stop the daemon"));
    s.push_str(TOOL_HELP);
    s
}

pub(crate) fn default_vm_path() -> PathBuf {
    let p = std::env::var_os("UKVMI_VM").map_or_else(|| PathBuf::from("vm.sock"), PathBuf::from);
    absolute(p)
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map_or(p.clone(), |d| d.join(p))
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // Global tool options, wherever they are.
    let mut vm: Option<PathBuf> = None;
    let mut map: Option<String> = None;
    let mut key_file: Option<String> = None;
    if !matches!(args.first().map(String::as_str), Some("run" | "demo" | "daemon")) {
        while let Some(i) = args.iter().position(|a| a == "--vm" || a == "--map" || a == "--key-file") {
            let opt = args.get(i).cloned().unwrap_or_default();
            let Some(v) = args.get(i + 1).cloned() else {
                eprintln!("ukvmi: {opt} needs a value");
                return ExitCode::from(2);
            };
            if opt == "--vm" {
                vm = Some(absolute(PathBuf::from(v)));
            } else if opt == "--key-file" {
                key_file = Some(v);
            } else {
                map = Some(absolute(PathBuf::from(v)).to_string_lossy().into_owned());
            }
            args.drain(i..i + 2);
        }
    }
    match args.first().map(String::as_str) {
        Some("run") => run::main(args.get(1..).unwrap_or(&[])),
        Some("demo") => demo::main(args.get(1..).unwrap_or(&[])),
        Some("daemon") => daemon::main(args.get(1..).unwrap_or(&[])),
        Some("guests") => {
            for g in ukvmi_guests::all() {
                println!("{:<12} {}", g.name, g.summary);
            }
            ExitCode::SUCCESS
        }
        Some("help") if args.get(1).map(String::as_str) == Some("run") => {
            print!("{}", run::help());
            ExitCode::SUCCESS
        }
        Some("help") if args.get(1).map(String::as_str) == Some("demo") => {
            print!("{}", demo::HELP);
            ExitCode::SUCCESS
        }
        None | Some("help" | "-h" | "--help") => {
            print!("{}", help());
            ExitCode::SUCCESS
        }
        Some(cmd) if tools::COMMANDS.iter().any(|c| c.0 == cmd) || cmd == "detach" => {
            if args.iter().any(|a| a == "-h" || a == "--help") {
                print!("{}", help());
                return ExitCode::SUCCESS;
            }
            let key = match control::load_key(key_file.as_deref()) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("ukvmi: {e}");
                    return ExitCode::FAILURE;
                }
            };
            control::client(&vm.unwrap_or_else(default_vm_path), map.as_deref(), key.as_deref(), args)
        }
        Some(other) => {
            eprintln!("ukvmi: unknown command `{other}`\n\n{}", help());
            ExitCode::from(2)
        }
    }
}
