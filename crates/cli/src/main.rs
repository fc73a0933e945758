//! The `ukvmi` command: takes `ukvmi`'s own options out of the words and
//! dispatches to the command the table (`commands.rs`) names.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing))]

mod args;
mod commands;
mod control;
mod daemon;
mod demo;
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
        print!("{}", commands::help());
        return ExitCode::SUCCESS;
    };
    let Some(cmd) = commands::find(name) else {
        if name == "-h" || name == "--help" {
            print!("{}", commands::help());
            return ExitCode::SUCCESS;
        }
        let hint = commands::suggest(name).map_or_else(String::new, |s| format!(" (did you mean `{s}`?)"));
        eprintln!("ukvmi: unknown command `{name}`{hint}\n\n{}", commands::help());
        return ExitCode::from(2);
    };
    match cmd.action {
        Action::Run => run::main(rest),
        Action::Demo => demo::main(rest),
        Action::Daemon => daemon::main(rest),
        Action::Guests => {
            for g in ukvmi_guests::all() {
                println!("{:<12} {}", g.name, g.summary);
            }
            ExitCode::SUCCESS
        }
        Action::Help => {
            match rest.first().map(String::as_str) {
                Some("run") => print!("{}", run::help()),
                Some("demo") => print!("{}", demo::HELP),
                Some(other) => match commands::find(other) {
                    Some(c) if matches!(c.action, Action::Tool(_) | Action::Detach) => {
                        print!("{}", commands::command_help(c));
                    }
                    _ => print!("{}", commands::help()),
                },
                None => print!("{}", commands::help()),
            }
            ExitCode::SUCCESS
        }
        Action::Tool(_) | Action::Detach => {
            if args.iter().any(|a| a == "-h" || a == "--help") {
                print!("{}", commands::command_help(cmd));
                return ExitCode::SUCCESS;
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
