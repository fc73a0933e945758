//! The commands that read the guest's own structures: `ps` (the demo OS's
//! process table) and `symbols` (the guest's symbol map).

use std::io;

use ukvmi_monitor::{
    guestos::{self, ProcessTable},
    json::{self, Obj},
    symbols::parse_number,
};

use super::{Args, Ctx, Failure, Out};

/// Prints the process table (text or JSON).
pub fn print_ps(t: &ProcessTable, json_out: bool, out: &mut dyn Out) -> io::Result<()> {
    if json_out {
        let procs = json::array(t.procs.iter().map(guestos::Process::to_json));
        let cur = json::array(t.current.iter().map(u32::to_string));
        return out.line(
            &Obj::new()
                .num("ticks", t.ticks)
                .num("ncpus", u64::from(t.ncpus))
                .raw("current", &cur)
                .raw("processes", &procs)
                .build(),
        );
    }
    out.line(&format!("{:>4}  {:<10} {:<9} {:>4}  {:>18}  {:>9}", "PID", "NAME", "STATE", "CPU", "CR3", "SYSCALLS"))?;
    for p in &t.procs {
        let on = if t.current.get(p.cpu as usize) == Some(&p.pid) { "*" } else { " " };
        out.line(&format!(
            "{:>4}{on} {:<10} {:<9} {:>4}  {:>#18x}  {:>9}",
            p.pid,
            p.name,
            p.state.name(),
            p.cpu,
            p.cr3,
            p.syscalls
        ))?;
    }
    out.line(&format!("(* = on its vCPU now; up {:.1} s)", t.ticks as f64 / 1000.0))
}

pub(crate) fn ps(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let t = ProcessTable::read(ctx.mon).map_err(|e| Failure { msg: e.to_string(), status: 1 })?;
    Ok(print_ps(&t, a.has("--json"), out)?)
}

pub(crate) fn symbols(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let syms =
        ctx.syms.ok_or_else(|| Failure { msg: "no symbol map for this VM (give --map FILE)".into(), status: 1 })?;
    if a.pos.is_empty() {
        return Ok(out.line(&format!(
            "{} symbols; look one up with `ukvmi symbols NAME` or `ukvmi symbols 0xADDR`",
            syms.len()
        ))?);
    }
    for q in &a.pos {
        match (syms.addr(q), parse_number(q)) {
            (Some(addr), _) => out.line(&format!("{addr:#018x} {q}"))?,
            (None, Some(addr)) => out.line(&format!("{addr:#018x} {}", syms.describe(addr)))?,
            (None, None) => return Err(Failure { msg: format!("no symbol `{q}`"), status: 1 }),
        }
    }
    Ok(())
}
