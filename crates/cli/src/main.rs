//! The `ukvmi` command: takes `ukvmi`'s own options out of the words and
//! dispatches to the command the table (`commands.rs`) names.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

mod args;
mod commands;
mod control;
mod daemon;
mod demo;
mod help_extra;
mod run;
mod tools;
mod vmm_errors;

use std::{path::PathBuf, process::ExitCode};

use commands::Action;

pub(crate) use commands::TOOL_HELP;

pub(crate) fn default_vm_path() -> PathBuf {
    let p = std::env::var_os("UKVMI_VM").map_or_else(|| PathBuf::from("vm.sock"), PathBuf::from);
    absolute(vm_socket_path(p))
}

/// A VM's socket path as given: `unix:PATH` (as `ukvmi run --introspect`
/// takes it) is the same as `PATH`.
fn vm_socket_path(p: PathBuf) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    match p.as_os_str().as_bytes().strip_prefix(b"unix:") {
        Some(rest) if !rest.is_empty() => PathBuf::from(std::ffi::OsStr::from_bytes(rest)),
        _ => p,
    }
}

/// `ukvmi`'s own `--wait SECS` (how long a tool command waits for a VM to
/// connect; without it, about 2 s): taken like `--vm`, wherever it is.
const WAIT: &[&str] = &["--wait"];

/// The seconds of `--wait`: a number, 0 or more (fractions allowed).
fn wait_secs(v: &str) -> Result<std::time::Duration, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 86_400.0 * 49.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(|| format!("--wait takes seconds (a number such as 30 or 0.5), not `{v}`"))
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map_or(p.clone(), |d| d.join(p))
    }
}

/// `ukvmi`'s own options for the tool commands.
#[derive(Debug, Default)]
struct ToolOptions {
    vm: Option<PathBuf>,
    map: Option<String>,
    key_file: Option<String>,
    wait: Option<std::time::Duration>,
}

/// Takes `--vm`, `--map`, `--key-file` and `--wait` out of `args`, wherever
/// they are (the last of each wins); `Err` says what is wrong with one (given
/// without its value, or a `--wait` that is not seconds).
fn take_tool_options(args: &mut Vec<String>) -> Result<ToolOptions, String> {
    let mut o = ToolOptions::default();
    while let Some((_, v)) = args::take_option(args, WAIT).map_err(|opt| format!("{opt} needs a value"))? {
        o.wait = Some(wait_secs(&v)?);
    }
    while let Some((opt, v)) =
        args::take_option(args, commands::TOOL_GLOBALS).map_err(|opt| format!("{opt} needs a value"))?
    {
        match opt.as_str() {
            "--vm" => o.vm = Some(absolute(vm_socket_path(PathBuf::from(v)))),
            "--key-file" => o.key_file = Some(v),
            _ => o.map = Some(absolute(PathBuf::from(v)).to_string_lossy().into_owned()),
        }
    }
    Ok(o)
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let first = args.first().and_then(|a| commands::find(a));
    let mut globals = ToolOptions::default();
    if first.is_none_or(commands::Command::takes_tool_options) {
        globals = match take_tool_options(&mut args) {
            Ok(g) => g,
            Err(why) => {
                eprintln!("ukvmi: {why}");
                return ExitCode::from(2);
            }
        };
    }
    let rest = args.get(1..).unwrap_or(&[]);
    let Some(name) = args.first().map(String::as_str) else {
        return commands::print_help(&commands::help());
    };
    let Some(cmd) = commands::find(name) else {
        if name == "-h" || name == "--help" {
            return commands::print_help(&commands::help());
        }
        eprintln!("{}", help_extra::unknown_command(name));
        return ExitCode::from(2);
    };
    match cmd.action {
        Action::Run => run::main(rest),
        Action::Demo => demo::main(rest),
        Action::Daemon => daemon::main(rest),
        Action::Guests => commands::guests(cmd, rest),
        Action::Help => match help_extra::help_for(rest.first().map(String::as_str)) {
            Ok(text) => commands::print_help(&text),
            Err(line) => {
                eprintln!("{line}");
                ExitCode::from(2)
            }
        },
        Action::Tool(_) | Action::Detach => {
            if args.iter().any(|a| a == "-h" || a == "--help") {
                return commands::print_help(&help_extra::command_help(cmd));
            }
            let key = match control::load_key(globals.key_file.as_deref()) {
                Ok(k) => k,
                Err(e) => {
                    eprintln!("ukvmi: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let vm = globals.vm.unwrap_or_else(default_vm_path);
            let session = control::Session { map: globals.map.as_deref(), key: key.as_deref(), wait: globals.wait };
            control::client(&vm, &session, args)
        }
    }
}
