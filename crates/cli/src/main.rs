//! The `ukvmi` command.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::indexing_slicing))]

mod run;

use std::process::ExitCode;

const HELP: &str = "\
ukvmi: KVM virtual machine introspection on a stock Linux kernel

USAGE:
    ukvmi run [OPTIONS]      start a VM (optionally introspected over KVMI v12)
    ukvmi guests             list the built-in guests
    ukvmi help [COMMAND]     show help

Run `ukvmi run --help` for the VM options, the built-in guests and what this
host can and cannot introspect.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("run") => run::main(args.get(1..).unwrap_or(&[])),
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
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("ukvmi: unknown command `{other}`\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}
