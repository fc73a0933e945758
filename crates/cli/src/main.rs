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
    absolute(p)
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
}

/// Takes `--vm`, `--map` and `--key-file` out of `args`, wherever they are
/// (the last of each wins); `Err` names one given without its value.
fn take_tool_options(args: &mut Vec<String>) -> Result<ToolOptions, String> {
    let mut o = ToolOptions::default();
    while let Some((opt, v)) = args::take_option(args, commands::TOOL_GLOBALS)? {
        match opt.as_str() {
            "--vm" => o.vm = Some(absolute(PathBuf::from(v))),
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
            Err(opt) => {
                eprintln!("ukvmi: {opt} needs a value");
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
            control::client(&vm, globals.map.as_deref(), key.as_deref(), args)
        }
    }
}
