//! Prints a kernel image's kallsyms as a System.map (`ADDRESS TYPE NAME`
//! lines), for a vmlinux without `.symtab`: `cargo run -p ukvmi-kimage
//! --example kallsyms -- vmlinux > System.map` (scripts/stock-linux).

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(path) = std::env::args_os().nth(1) else {
        eprintln!("usage: kallsyms VMLINUX  (prints its kallsyms as a System.map)");
        return ExitCode::from(2);
    };
    let shown = path.to_string_lossy().into_owned();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("kallsyms: {shown}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let syms = match ukvmi_kimage::Elf::parse(&bytes) {
        Ok(elf) => elf.kallsyms(),
        Err(_) => ukvmi_kimage::kallsyms(&bytes),
    };
    let syms = match syms {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kallsyms: {shown}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for s in &syms {
        if writeln!(out, "{:016x} {} {}", s.addr, s.kind, s.name).is_err() {
            return ExitCode::FAILURE;
        }
    }
    if out.flush().is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
