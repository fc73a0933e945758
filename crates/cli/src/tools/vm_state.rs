//! The commands about the VM and its vCPUs: `info`, `regs`, `translate`,
//! `pause` and `resume`.

use std::time::{Duration, Instant};

use ukvmi_introspector::wire::{event, msg};
use ukvmi_introspector::Registers;
use ukvmi_monitor::{
    guestos::ProcessTable,
    json::{self, Obj},
    record::msr_name,
};

use super::{kvmi, Args, Ctx, Failure, Out};

pub(crate) fn info(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let vm = ctx.mon.vm();
    let i = vm.info().clone();
    let uuid: String = i.uuid.iter().map(|b| format!("{b:02x}")).collect();
    let cmds: Vec<&str> = (0..64u16)
        .chain(msg::EXTENSION_COMMANDS)
        .filter(|&id| msg::name(id).is_some() && vm.check_command(id).is_ok())
        .filter_map(msg::name)
        .collect();
    let evs: Vec<&str> = (0..32u16)
        .filter(|&id| event::name(id).is_some() && vm.check_event(id).is_ok())
        .filter_map(event::name)
        .collect();
    let os = ProcessTable::read(ctx.mon).ok();
    // The VMM process the daemon talks to (its pid from SO_PEERCRED on the
    // KVMI connection); unknown outside the daemon.
    let vmm = crate::daemon::served_vm().and_then(|s| s.vmm.as_ref());
    if a.has("--json") {
        let strs = |v: &[&str]| json::array(v.iter().map(|s| json::quote(s)));
        let o = Obj::new()
            .str("name", &i.name)
            .str("uuid", &uuid)
            .num("vcpus", u64::from(ctx.mon.vcpus()))
            .num("ram_bytes", i.max_gpa)
            .num("kvmi_version", u64::from(i.version))
            .num("max_msg_size", u64::from(i.max_msg_size))
            .bool("singlestep", i.singlestep)
            .raw("commands", &strs(&cmds))
            .raw("events", &strs(&evs))
            .bool("demo_os", os.is_some())
            .num("symbols", ctx.syms.map_or(0, |s| s.len() as u64))
            .raw("vmm_pid", &vmm.map_or_else(|| "null".to_string(), |p| p.pid.to_string()))
            .raw("vmm_command", &vmm.map_or_else(|| "null".to_string(), |p| json::quote(&p.command)))
            .build();
        return Ok(out.line(&o)?);
    }
    out.line(&format!("VM        {} ({uuid})", if i.name.is_empty() { "(unnamed)" } else { &i.name }))?;
    if let Some(p) = vmm {
        out.line(&format!("VMM       pid {}: {}", p.pid, p.command))?;
    }
    out.line(&format!("vCPUs     {}", ctx.mon.vcpus()))?;
    out.line(&format!("RAM       {} MiB", i.max_gpa >> 20))?;
    out.line(&format!(
        "KVMI      v12 series, protocol version {}, messages up to {} bytes, single-step {}",
        i.version,
        i.max_msg_size,
        if i.singlestep { "yes" } else { "no" }
    ))?;
    let short = |v: &[&str]| v.iter().map(|s| s.trim_start_matches("KVMI_")).collect::<Vec<_>>().join(" ");
    out.line(&format!("commands  {}", short(&cmds)))?;
    out.line(&format!("events    {}", short(&evs).replace("VCPU_EVENT_", "").replace("VM_EVENT_", "")))?;
    out.line(&format!(
        "guest OS  {}",
        match &os {
            Some(t) => format!("demo OS, {} processes, up {:.1} s", t.procs.len(), t.ticks as f64 / 1000.0),
            None => "unknown (no demo-OS process table)".into(),
        }
    ))?;
    out.line(&format!(
        "memory    {}",
        if ctx.mon.memory_map().is_some() {
            "mapped (zero-copy view, UKVMI_VM_MAP_MEMORY)"
        } else {
            "READ_PHYSICAL only"
        }
    ))?;
    out.line(&format!(
        "symbols   {}",
        ctx.syms.map_or_else(|| "none".to_string(), |s| format!("{} (`ukvmi symbols`)", s.len()))
    ))?;
    Ok(())
}

fn regs_json(v: u16, r: &Registers) -> String {
    let g = &r.regs;
    let s = &r.sregs;
    let mut o = Obj::new().num("vcpu", u64::from(v)).num("mode", u64::from(r.mode));
    for (n, val) in [
        ("rax", g.rax),
        ("rbx", g.rbx),
        ("rcx", g.rcx),
        ("rdx", g.rdx),
        ("rsi", g.rsi),
        ("rdi", g.rdi),
        ("rsp", g.rsp),
        ("rbp", g.rbp),
        ("r8", g.r8),
        ("r9", g.r9),
        ("r10", g.r10),
        ("r11", g.r11),
        ("r12", g.r12),
        ("r13", g.r13),
        ("r14", g.r14),
        ("r15", g.r15),
        ("rip", g.rip),
        ("rflags", g.rflags),
        ("cr0", s.cr0),
        ("cr2", s.cr2),
        ("cr3", s.cr3),
        ("cr4", s.cr4),
        ("efer", s.efer),
    ] {
        o = o.hex(n, val);
    }
    o = o.num("cpl", u64::from(s.cs.selector & 3));
    for m in &r.msrs {
        let key = msr_name(m.index).map_or_else(|| format!("msr_{:#x}", m.index), |n| n.to_ascii_lowercase());
        o = o.hex(&key, m.data);
    }
    o.build()
}

pub(crate) fn regs(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let v = ctx.vcpu(a.pos(0, "VCPU (e.g. `ukvmi regs 0`)")?)?;
    let msrs = [0xc000_0082u32, 0xc000_0081, 0xc000_0101];
    let r = ctx.mon.vm().get_registers(v, &msrs).map_err(kvmi(&format!("KVMI_VCPU_GET_REGISTERS on vCPU {v}")))?;
    if a.has("--json") {
        return Ok(out.line(&regs_json(v, &r))?);
    }
    let g = &r.regs;
    let s = &r.sregs;
    let pid = ctx.mon.guest_os().describe_current(ctx.mon, v);
    out.line(&format!(
        "vCPU {v}: {}-bit, CPL {}{}{}",
        r.mode * 8,
        s.cs.selector & 3,
        if ctx.mon.held().contains(&v) { ", paused" } else { ", running" },
        pid.map_or_else(String::new, |p| format!(", {p} on it"))
    ))?;
    out.line(&format!("rip {:#018x}  {}", g.rip, ctx.describe(g.rip)))?;
    let rows = [
        [("rax", g.rax), ("rbx", g.rbx), ("rcx", g.rcx), ("rdx", g.rdx)],
        [("rsi", g.rsi), ("rdi", g.rdi), ("rsp", g.rsp), ("rbp", g.rbp)],
        [("r8 ", g.r8), ("r9 ", g.r9), ("r10", g.r10), ("r11", g.r11)],
        [("r12", g.r12), ("r13", g.r13), ("r14", g.r14), ("r15", g.r15)],
        [("cr0", s.cr0), ("cr3", s.cr3), ("cr4", s.cr4), ("efer", s.efer)],
    ];
    for row in rows {
        out.line(&row.iter().map(|(n, v)| format!("{n} {v:#018x}")).collect::<Vec<_>>().join("  "))?;
    }
    out.line(&format!("rflags {:#x}", g.rflags))?;
    for m in &r.msrs {
        let n = msr_name(m.index).map_or_else(|| format!("{:#x}", m.index), str::to_string);
        out.line(&format!("{n:<7} {:#018x}  {}", m.data, ctx.describe(m.data)))?;
    }
    Ok(())
}

pub(crate) fn translate(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let v = ctx.vcpu(a.pos(0, "VCPU")?)?;
    let gva = ctx.addr(a.pos(1, "ADDR (a guest virtual address)")?)?;
    let gpa = ctx.mon.vm().translate_gva(v, gva).map_err(kvmi("KVMI_VCPU_TRANSLATE_GVA"))?.map(u64::from);
    if a.has("--json") {
        let o = Obj::new().num("vcpu", u64::from(v)).hex("gva", gva);
        let o = match gpa {
            Some(p) => o.hex("gpa", p).bool("mapped", true),
            None => o.bool("mapped", false),
        };
        return Ok(out.line(&o.build())?);
    }
    match gpa {
        Some(p) => out.line(&format!("{gva:#x} -> {p:#x}   (vCPU {v}'s page tables)"))?,
        None => {
            return Err(Failure { msg: format!("{gva:#x} is not mapped in vCPU {v}'s address space"), status: 1 });
        }
    }
    Ok(())
}

pub(crate) fn pause(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let t0 = Instant::now();
    let held = ctx.mon.pause_all(a.secs("--timeout")?.unwrap_or(Duration::from_secs(5)))?;
    let us = t0.elapsed().as_micros();
    if a.has("--json") {
        let list = json::array(held.iter().map(u16::to_string));
        return Ok(out.line(&Obj::new().str("event", "paused").raw("vcpus", &list).num("micros", us as u64).build())?);
    }
    out.line(&format!("paused vCPUs {held:?} in {us} µs; they stay paused until `ukvmi resume` (or detach)"))?;
    Ok(())
}

pub(crate) fn resume(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let v = ctx.mon.resume_all()?;
    if a.has("--json") {
        return Ok(out.line(
            &Obj::new().str("event", "resumed").raw("vcpus", &json::array(v.iter().map(u16::to_string))).build(),
        )?);
    }
    let text = match (v.is_empty(), ctx.mon.held()) {
        (false, _) => format!("resumed vCPUs {v:?}"),
        (true, h) if h.is_empty() => "no vCPU was paused".to_string(),
        (true, h) => format!(
            "vCPUs {h:?} stay paused until the command holding them ends (a `write`, or `watch-msr --restore` \
             putting LSTAR back)"
        ),
    };
    out.line(&text)?;
    Ok(())
}
