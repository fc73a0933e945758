//! The introspector commands (`ukvmi info`, `regs`, `ps`, `trace`, …), run
//! against a [`Monitor`] and writing to an [`Out`]: the daemon runs them for
//! its clients (see `daemon.rs`), `ukvmi demo` reuses the pieces.

use std::{
    io,
    time::{Duration, Instant},
};

use ukvmi_introspector::Registers;
use ukvmi_monitor::{
    guestos::{self, ProcessTable},
    json::{self, Obj},
    record::{msr_name, parse_msr},
    symbols::parse_number,
    Kinds, Monitor, Record, SymbolMap,
};
use ukvmi_wire::{access, event, msg};

/// Where a command's output goes: a client of the daemon, or a terminal.
pub trait Out {
    /// One line of standard output.
    fn line(&mut self, s: &str) -> io::Result<()>;
    /// Raw bytes of standard output.
    fn raw(&mut self, b: &[u8]) -> io::Result<()>;
    /// One line of standard error.
    fn note(&mut self, s: &str) -> io::Result<()>;
    /// A progress line on standard error, redrawn in place (only on a terminal).
    fn progress(&mut self, s: &str) -> io::Result<()>;
    /// Whether standard error is a terminal (progress bars).
    fn stderr_tty(&self) -> bool;
    /// Whether the reader went away (Ctrl-C on the client).
    fn gone(&self) -> bool;
}

/// What a command runs against.
pub struct Ctx<'a> {
    /// The engine (and through it the connection).
    pub mon: &'a Monitor,
    /// Symbols of the guest kernel, if known.
    pub syms: Option<&'a SymbolMap>,
}

/// A command's failure: the message for the user and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, with context.
    pub msg: String,
    /// 1 for a failure, 2 for a usage error.
    pub status: u8,
}

impl Failure {
    fn usage(msg: impl Into<String>) -> Failure {
        Failure { msg: msg.into(), status: 2 }
    }
}

impl From<ukvmi_monitor::MonitorError> for Failure {
    fn from(e: ukvmi_monitor::MonitorError) -> Failure {
        Failure { msg: e.to_string(), status: 1 }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure { msg: format!("writing the output: {e}"), status: 1 }
    }
}

fn kvmi(what: &str) -> impl FnOnce(ukvmi_introspector::Error) -> Failure + '_ {
    move |e| Failure { msg: format!("{what}: {e}"), status: 1 }
}

/// The introspector commands and one line about each (for `--help`).
pub const COMMANDS: &[(&str, &str, &str)] = &[
    ("info", "", "the VM: name, vCPUs, RAM, KVMI version, what the host supports"),
    ("regs", "VCPU", "a vCPU's registers (it keeps running unless paused)"),
    ("translate", "VCPU ADDR", "guest virtual → physical, through the vCPU's page tables"),
    ("pause", "", "hold every vCPU paused (until `resume`)"),
    ("resume", "", "let held vCPUs go"),
    ("read", "ADDR LEN", "guest physical memory as a hex dump (--raw: bytes; --vcpu N: ADDR is\n                               virtual, through that vCPU's page tables)"),
    ("dump", "[ADDR LEN]", "bulk memory (default: all RAM) to stdout or -o FILE, progress bar; --via map|socket"),
    ("ps", "", "the demo OS's processes, read from its process table"),
    ("trace", "", "live events: --syscalls (default), --msr MSR, --page ADDR (writes),\n                               --breakpoint ADDR, --hypercalls [--answer TEXT], --pauses"),
    ("watch-msr", "MSR...", "report guest writes of MSRs; --deny keeps the old value"),
    ("protect", "ADDR [LEN]", "take access away from pages (--remove w); --deny refuses writes"),
    ("symbols", "[NAME|ADDR...]", "the guest's symbol map, or look names/addresses up"),
];

struct Args<'a> {
    pos: Vec<&'a str>,
    flags: Vec<(&'a str, Option<&'a str>)>,
}

/// Options that take a value.
const VALUED: &[&str] = &[
    "--vcpu",
    "--msr",
    "--page",
    "--via",
    "--breakpoint",
    "--count",
    "--duration",
    "--remove",
    "--answer",
    "-o",
    "--output",
    "--map",
    "--timeout",
];

impl<'a> Args<'a> {
    fn parse(args: &'a [String]) -> Result<Args<'a>, Failure> {
        let mut pos = Vec::new();
        let mut flags = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if let Some((k, v)) = a.split_once('=').filter(|(k, _)| k.starts_with("--")) {
                flags.push((k, Some(v)));
            } else if VALUED.contains(&a.as_str()) {
                let v = it.next().ok_or_else(|| Failure::usage(format!("{a} needs a value")))?;
                flags.push((a.as_str(), Some(v.as_str())));
            } else if a.starts_with('-') && a.len() > 1 && parse_number(a).is_none() {
                flags.push((a.as_str(), None));
            } else {
                pos.push(a.as_str());
            }
        }
        Ok(Args { pos, flags })
    }
    fn has(&self, f: &str) -> bool {
        self.flags.iter().any(|(k, _)| *k == f)
    }
    fn vals(&self, f: &str) -> Vec<&'a str> {
        self.flags.iter().filter(|(k, _)| *k == f).filter_map(|(_, v)| *v).collect()
    }
    fn val(&self, f: &str) -> Option<&'a str> {
        self.flags.iter().rev().find(|(k, _)| *k == f).and_then(|(_, v)| *v)
    }
    fn check(&self, allowed: &[&str]) -> Result<(), Failure> {
        for (k, _) in &self.flags {
            if !allowed.contains(k) {
                return Err(Failure::usage(format!("unknown option {k} (allowed: {})", allowed.join(" "))));
            }
        }
        Ok(())
    }
    fn num(&self, f: &str) -> Result<Option<u64>, Failure> {
        self.val(f)
            .map(|v| parse_number(v).ok_or_else(|| Failure::usage(format!("{f} takes a number, not `{v}`"))))
            .transpose()
    }
    fn secs(&self, f: &str) -> Result<Option<Duration>, Failure> {
        self.val(f)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| Failure::usage(format!("{f} takes seconds, not `{v}`")))
            })
            .transpose()
    }
    fn pos(&self, i: usize, what: &str) -> Result<&'a str, Failure> {
        self.pos.get(i).copied().ok_or_else(|| Failure::usage(format!("missing {what}")))
    }
}

impl Ctx<'_> {
    fn addr(&self, text: &str) -> Result<u64, Failure> {
        match self.syms {
            Some(s) => s.resolve(text),
            None => parse_number(text),
        }
        .ok_or_else(|| {
            Failure::usage(format!(
                "`{text}` is not an address{}",
                if self.syms.is_some() {
                    " or a known symbol"
                } else {
                    " (no symbol map: give --map FILE to use names)"
                }
            ))
        })
    }

    /// A guest-physical range from the command line. A number is physical
    /// as given. A symbol is a kernel virtual address: it is translated
    /// through vCPU 0's page tables (kernel mappings are the same in every
    /// address space), page by page, and the range must be contiguous in
    /// guest-physical memory. The demo kernel is identity-mapped, so there
    /// both agree.
    fn phys(&self, text: &str, len: u64) -> Result<u64, Failure> {
        let at = self.addr(text)?;
        if parse_number(text).is_some() {
            return Ok(at);
        }
        let end = at.checked_add(len.max(1)).ok_or_else(|| Failure::usage("address range overflows"))?;
        let vm = self.mon.vm();
        let walk = |va: u64| -> Result<u64, Failure> {
            vm.translate_gva(0, va).map_err(kvmi("KVMI_VCPU_TRANSLATE_GVA"))?.ok_or_else(|| Failure {
                msg: format!("`{text}`: {va:#x} is not mapped in vCPU 0's address space"),
                status: 1,
            })
        };
        let gpa = walk(at)?;
        let mut page = (at | 0xfff).saturating_add(1);
        while page < end {
            if walk(page)? != gpa + (page - at) {
                return Err(Failure {
                    msg: format!("`{text}`+{len:#x} is not contiguous in guest-physical memory (at {page:#x}); give physical addresses"),
                    status: 1,
                });
            }
            page = page.saturating_add(0x1000);
        }
        Ok(gpa)
    }

    fn vcpu(&self, text: &str) -> Result<u16, Failure> {
        let v = parse_number(text)
            .and_then(|v| u16::try_from(v).ok())
            .ok_or_else(|| Failure::usage(format!("bad vCPU `{text}`")))?;
        if v >= self.mon.vcpus() {
            return Err(Failure::usage(format!(
                "vCPU {v} does not exist: the VM has {} (0..{})",
                self.mon.vcpus(),
                self.mon.vcpus() - 1
            )));
        }
        Ok(v)
    }

    fn describe(&self, a: u64) -> String {
        ukvmi_monitor::describe(self.syms, a)
    }
}

/// Runs one command. `args[0]` is the command name.
pub fn run(ctx: &Ctx<'_>, args: &[String], out: &mut dyn Out) -> Result<(), Failure> {
    let name = args.first().map(String::as_str).unwrap_or("");
    let a = Args::parse(args.get(1..).unwrap_or(&[]))?;
    match name {
        "info" => info(ctx, &a, out),
        "regs" => regs(ctx, &a, out),
        "translate" => translate(ctx, &a, out),
        "pause" => pause(ctx, &a, out),
        "resume" => resume(ctx, &a, out),
        "read" => read(ctx, &a, out),
        "dump" => dump(ctx, &a, out),
        "ps" => ps(ctx, &a, out),
        "trace" => trace(ctx, &a, out),
        "watch-msr" => watch_msr(ctx, &a, out),
        "protect" => protect(ctx, &a, out),
        "symbols" => symbols(ctx, &a, out),
        other => Err(Failure::usage(format!("unknown command `{other}` (see `ukvmi help`)"))),
    }
}

fn info(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--json"])?;
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
            .build();
        return Ok(out.line(&o)?);
    }
    out.line(&format!("VM        {} ({uuid})", if i.name.is_empty() { "(unnamed)" } else { &i.name }))?;
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

fn regs(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--json"])?;
    let v = ctx.vcpu(a.pos(0, "VCPU (e.g. `ukvmi regs 0`)")?)?;
    let msrs = [0xc000_0082u32, 0xc000_0081, 0xc000_0101];
    let r = ctx.mon.vm().get_registers(v, &msrs).map_err(kvmi(&format!("KVMI_VCPU_GET_REGISTERS on vCPU {v}")))?;
    if a.has("--json") {
        return Ok(out.line(&regs_json(v, &r))?);
    }
    let g = &r.regs;
    let s = &r.sregs;
    let pid = guestos::current_pid(ctx.mon, v);
    out.line(&format!(
        "vCPU {v}: {}-bit, CPL {}{}{}",
        r.mode * 8,
        s.cs.selector & 3,
        if ctx.mon.held().contains(&v) { ", paused" } else { ", running" },
        pid.map_or_else(String::new, |p| format!(", pid {p} on it"))
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

fn translate(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--json"])?;
    let v = ctx.vcpu(a.pos(0, "VCPU")?)?;
    let gva = ctx.addr(a.pos(1, "ADDR (a guest virtual address)")?)?;
    let gpa = ctx.mon.vm().translate_gva(v, gva).map_err(kvmi("KVMI_VCPU_TRANSLATE_GVA"))?;
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

fn pause(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--json", "--timeout"])?;
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

fn resume(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--json"])?;
    let v = ctx.mon.resume_all()?;
    if a.has("--json") {
        return Ok(out.line(
            &Obj::new().str("event", "resumed").raw("vcpus", &json::array(v.iter().map(u16::to_string))).build(),
        )?);
    }
    out.line(&if v.is_empty() { "no vCPU was paused".to_string() } else { format!("resumed vCPUs {v:?}") })?;
    Ok(())
}

/// Reads `len` bytes at `gpa`, calling `sink` per chunk: 1 MiB at a time
/// from the zero-copy view when the VM granted one (and `socket` is false),
/// else a page per KVMI_VM_READ_PHYSICAL.
fn read_range(
    ctx: &Ctx<'_>,
    gpa: u64,
    len: u64,
    socket: bool,
    mut sink: impl FnMut(u64, &[u8]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let vm = ctx.mon.vm();
    let map = ctx.mon.memory_map().filter(|_| !socket);
    let mut at = gpa;
    let end = gpa.checked_add(len).ok_or_else(|| Failure::usage("address range overflows"))?;
    // 1 MiB at a time either way: through the socket as pipelined
    // READ_PHYSICALs (one round trip per page would dominate).
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let n = (buf.len() as u64).min(end - at) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        match map {
            Some(m) => m
                .read(at, chunk)
                .map_err(|e| Failure { msg: format!("reading the mapped view at {at:#x}: {e}"), status: 1 })?,
            None => vm.read_physical_range(at, chunk).map_err(kvmi(&format!("KVMI_VM_READ_PHYSICAL at {at:#x}")))?,
        }
        sink(at, chunk)?;
        at += n as u64;
    }
    Ok(())
}

fn hexdump_line(addr: u64, b: &[u8]) -> String {
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    let ascii: String = b.iter().map(|&c| if c.is_ascii_graphic() || c == b' ' { c as char } else { '.' }).collect();
    format!("{addr:016x}  {:<47}  |{ascii}|", hex.join(" "))
}

fn read(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--raw", "--hex", "--vcpu"])?;
    let what = a.pos(0, "ADDR (guest physical, or virtual with --vcpu N; a number, or a kernel symbol)")?;
    let len =
        a.pos.get(1).map_or(Some(64), |l| parse_number(l)).ok_or_else(|| Failure::usage("LEN must be a number"))?;
    if len > 1 << 20 {
        return Err(Failure::usage("read is for up to 1 MiB; use `ukvmi dump` for more"));
    }
    let vcpu = a.val("--vcpu").map(|v| ctx.vcpu(v)).transpose()?;
    let addr = match vcpu {
        Some(_) => ctx.addr(what)?,
        None => ctx.phys(what, len)?,
    };
    addr.checked_add(len).ok_or_else(|| Failure::usage("address range overflows"))?;
    let raw = a.has("--raw");
    let mut pending: Vec<u8> = Vec::new();
    let mut line_at = addr;
    let mut sink = |chunk: &[u8]| -> Result<(), Failure> {
        if raw {
            return Ok(out.raw(chunk)?);
        }
        pending.extend_from_slice(chunk);
        while pending.len() >= 16 {
            out.line(&hexdump_line(line_at, pending.get(..16).unwrap_or_default()))?;
            pending.drain(..16);
            line_at += 16;
        }
        Ok(())
    };
    match vcpu {
        // Virtual: page by page through the vCPU's page tables (whatever
        // address space it is in now; pause first for a stable view).
        Some(v) => {
            let mut at = addr;
            let end = addr + len;
            while at < end {
                let n = (0x1000 - (at & 0xfff)).min(end - at);
                let gpa =
                    ctx.mon.vm().translate_gva(v, at).map_err(kvmi("KVMI_VCPU_TRANSLATE_GVA"))?.ok_or_else(|| {
                        Failure { msg: format!("{at:#x} is not mapped in vCPU {v}'s address space"), status: 1 }
                    })?;
                let mut buf = vec![0u8; n as usize];
                ctx.mon
                    .read(gpa, &mut buf)
                    .map_err(|e| Failure { msg: format!("reading gpa {gpa:#x}: {e}"), status: 1 })?;
                sink(&buf)?;
                at += n;
            }
        }
        None => read_range(ctx, addr, len, false, |_, chunk| sink(chunk))?,
    }
    if !raw && !pending.is_empty() {
        out.line(&hexdump_line(line_at, &pending))?;
    }
    Ok(())
}

fn bar(done: u64, total: u64, started: Instant) -> String {
    let frac = if total == 0 { 1.0 } else { done as f64 / total as f64 };
    let filled = (frac * 30.0) as usize;
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    format!(
        "[{}{}] {:>3.0}%  {:.1}/{:.1} MiB  {:.1} MB/s",
        "#".repeat(filled),
        " ".repeat(30 - filled.min(30)),
        frac * 100.0,
        done as f64 / 1048576.0,
        total as f64 / 1048576.0,
        done as f64 / secs / 1e6
    )
}

fn dump(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--quiet", "--via"])?;
    let socket = match a.val("--via") {
        None | Some("map") => false,
        Some("socket") => true,
        Some(v) => {
            return Err(Failure::usage(format!(
                "--via takes `map` (the zero-copy view, default when granted) or `socket` (READ_PHYSICAL), not `{v}`"
            )))
        }
    };
    if a.val("--via") == Some("map") && ctx.mon.memory_map().is_none() {
        return Err(Failure {
            msg: "the VM did not grant a mapped view (UKVMI_VM_MAP_MEMORY not allowed or not supported)".into(),
            status: 1,
        });
    }
    let ram = ctx.mon.vm().info().max_gpa;
    let given =
        a.pos.get(1).map(|l| parse_number(l).ok_or_else(|| Failure::usage("LEN must be a number"))).transpose()?;
    let gpa = a.pos.first().map(|t| ctx.phys(t, given.unwrap_or(1))).transpose()?.unwrap_or(0);
    let len = given.unwrap_or_else(|| ram.saturating_sub(gpa));
    if gpa.checked_add(len).is_none_or(|e| e > ram) {
        return Err(Failure::usage(format!("{gpa:#x}+{len:#x} is past the end of guest RAM ({ram:#x})")));
    }
    let started = Instant::now();
    let mut last = Instant::now();
    let show = out.stderr_tty() && !a.has("--quiet") && len >= 1 << 20;
    let mut done = 0u64;
    let via = if socket || ctx.mon.memory_map().is_none() { "READ_PHYSICAL" } else { "the mapped view" };
    read_range(ctx, gpa, len, socket, |_, chunk| {
        if out.gone() {
            return Err(Failure { msg: "the reader went away".into(), status: 1 });
        }
        out.raw(chunk)?;
        done += chunk.len() as u64;
        if show && last.elapsed() > Duration::from_millis(100) {
            last = Instant::now();
            out.progress(&bar(done, len, started))?;
        }
        Ok(())
    })?;
    if show {
        out.progress(&bar(done, len, started))?;
    }
    let secs = started.elapsed().as_secs_f64();
    if !a.has("--quiet") {
        out.note(&format!(
            "dumped {} bytes from {gpa:#x} in {secs:.2} s ({:.1} MB/s, through {via})",
            done,
            done as f64 / secs.max(1e-9) / 1e6
        ))?;
    }
    Ok(())
}

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

fn ps(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&["--json"])?;
    let t = ProcessTable::read(ctx.mon).map_err(|e| Failure { msg: e.to_string(), status: 1 })?;
    Ok(print_ps(&t, a.has("--json"), out)?)
}

/// Streams records from `sub` until `count` records, `duration`, the
/// reader leaving or the VM going away.
fn stream(
    ctx: &Ctx<'_>,
    sub: &ukvmi_monitor::Subscription,
    a: &Args<'_>,
    out: &mut dyn Out,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<(), Failure> {
    let count = a.num("--count")?;
    let until = a.secs("--duration")?.map(|d| Instant::now() + d);
    let json_out = a.has("--json");
    let mut n = 0u64;
    loop {
        if out.gone() || until.is_some_and(|u| Instant::now() >= u) || count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        match sub.next(Duration::from_millis(100)) {
            Ok(Some(r)) => {
                let end = matches!(r, Record::Detached { .. } | Record::Unhook);
                if end || matches!(r, Record::Lost { .. }) || keep(&r) {
                    out.line(&if json_out { r.json() } else { r.text(ctx.syms) })?;
                    if !end {
                        n += 1;
                    }
                }
                if end {
                    return Ok(());
                }
            }
            Ok(None) => {}
            Err(_) => return Ok(()),
        }
    }
}

const STREAM_FLAGS: [&str; 3] = ["--json", "--count", "--duration"];

fn trace(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let mut allowed = STREAM_FLAGS.to_vec();
    allowed.extend(["--syscalls", "--hypercalls", "--pauses", "--answer", "--breakpoint", "--msr", "--page"]);
    a.check(&allowed)?;
    let mut syscalls = a.has("--syscalls");
    let hyper = a.has("--hypercalls") || a.val("--answer").is_some();
    let pauses = a.has("--pauses");
    let bp = a.val("--breakpoint").map(|b| ctx.addr(b)).transpose()?;
    let msrs: Vec<u32> = a
        .vals("--msr")
        .iter()
        .map(|m| parse_msr(m).ok_or_else(|| Failure::usage(format!("unknown MSR `{m}`"))))
        .collect::<Result<_, _>>()?;
    let page_addrs: Vec<u64> = a.vals("--page").iter().map(|p| ctx.phys(p, 1)).collect::<Result<_, _>>()?;
    if !syscalls && !hyper && !pauses && bp.is_none() && msrs.is_empty() && page_addrs.is_empty() {
        syscalls = true;
    }
    let sub = ctx.mon.subscribe(Kinds {
        breakpoints: syscalls || bp.is_some(),
        hypercalls: hyper,
        pauses,
        msr: !msrs.is_empty(),
        pages: !page_addrs.is_empty(),
    });
    if syscalls {
        let entry = ctx.syms.and_then(|s| s.addr("syscall_entry")).ok_or_else(|| Failure {
            msg: "syscall tracing needs the kernel's `syscall_entry` symbol: run the demo guest or give --map FILE"
                .into(),
            status: 1,
        })?;
        ctx.mon.trace_syscalls(&sub, entry)?;
    }
    let bp_gpa = bp.map(|addr| ctx.mon.breakpoint(&sub, addr, false)).transpose()?;
    if hyper {
        let answer = match a.val("--answer") {
            Some(text) => {
                let buf = ctx.syms.and_then(|s| s.addr("agent_buf")).ok_or_else(|| Failure {
                    msg: "--answer writes into the demo kernel's `agent_buf`: this guest has no such symbol (give --map FILE)".into(),
                    status: 1,
                })?;
                Some((text.to_string(), buf))
            }
            None => None,
        };
        ctx.mon.hypercalls(&sub, answer)?;
    }
    for &m in &msrs {
        ctx.mon.watch_msr(&sub, m, false)?;
    }
    let mut pages = Vec::new();
    for &p in &page_addrs {
        pages.extend(ctx.mon.protect(&sub, p, 1, access::W, false)?);
    }
    if !a.has("--json") {
        out.note("tracing; Ctrl-C to stop (what it set up goes away with this command)")?;
    }
    // Only this command's own records (another client's hooks raise
    // records of the same kinds).
    stream(ctx, &sub, a, out, |r| match r {
        Record::Syscall { .. } => syscalls,
        Record::Breakpoint { gpa, .. } => bp_gpa == Some(*gpa),
        Record::Msr { msr, .. } => msrs.contains(msr),
        Record::Page { gpa, .. } => pages.contains(&(gpa & !0xfff)),
        Record::Hypercall { .. } => hyper,
        _ => pauses,
    })
}

fn watch_msr(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let mut allowed = STREAM_FLAGS.to_vec();
    allowed.push("--deny");
    a.check(&allowed)?;
    if a.pos.is_empty() {
        return Err(Failure::usage("name at least one MSR, e.g. `ukvmi watch-msr LSTAR --deny`"));
    }
    let msrs: Vec<u32> = a
        .pos
        .iter()
        .map(|m| parse_msr(m).ok_or_else(|| Failure::usage(format!("unknown MSR `{m}`"))))
        .collect::<Result<_, _>>()?;
    let sub = ctx.mon.subscribe(Kinds { msr: true, ..Kinds::default() });
    for &m in &msrs {
        ctx.mon.watch_msr(&sub, m, a.has("--deny"))?;
    }
    if !a.has("--json") {
        out.note(&format!(
            "watching {} on every vCPU{}; Ctrl-C to stop",
            msrs.iter()
                .map(|&m| msr_name(m).map_or_else(|| format!("{m:#x}"), str::to_string))
                .collect::<Vec<_>>()
                .join(", "),
            if a.has("--deny") { ", refusing writes (old value kept)" } else { "" }
        ))?;
    }
    stream(ctx, &sub, a, out, |r| matches!(r, Record::Msr { msr, .. } if msrs.contains(msr)))
}

fn protect(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let mut allowed = STREAM_FLAGS.to_vec();
    allowed.extend(["--deny", "--remove"]);
    a.check(&allowed)?;
    let what = a.pos(0, "ADDR (guest physical; a number, or a kernel symbol)")?;
    let len =
        a.pos.get(1).map_or(Some(1), |l| parse_number(l)).ok_or_else(|| Failure::usage("LEN must be a number"))?;
    let gpa = ctx.phys(what, len)?;
    let mut remove = 0u8;
    for c in a.val("--remove").unwrap_or("w").chars() {
        remove |= match c {
            'r' => access::R,
            'w' => access::W,
            'x' => access::X,
            _ => return Err(Failure::usage(format!("--remove takes letters from `rwx`, not `{c}`"))),
        };
    }
    let sub = ctx.mon.subscribe(Kinds { pages: true, ..Kinds::default() });
    let pages = ctx.mon.protect(&sub, gpa, len, remove, a.has("--deny"))?;
    if !a.has("--json") {
        out.note(&format!(
            "protecting {} page(s) from {:#x} ({}){}; Ctrl-C to stop",
            pages.len(),
            pages.first().copied().unwrap_or(0),
            ctx.describe(gpa),
            if a.has("--deny") { ", refusing writes" } else { "" }
        ))?;
    }
    stream(ctx, &sub, a, out, |r| matches!(r, Record::Page { gpa, .. } if pages.contains(&(gpa & !0xfff))))
}

fn symbols(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    a.check(&[])?;
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
