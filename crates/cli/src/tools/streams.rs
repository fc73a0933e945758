//! The streaming commands — `trace`, `watch-msr`, `protect` — and the loop
//! that relays their records until a count, a duration, Ctrl-C or the VM's
//! end. (`watch-msr` and `protect` first show, and with `--restore` repair,
//! what the guest already holds: see `hooks` and `lstar_stub`.)

use std::time::Instant;

use ukvmi_introspector::wire::access;
use ukvmi_monitor::{
    record::{msr_name, parse_msr},
    symbols::parse_number,
    Kinds, Record,
};

use super::{hooks, lstar_stub, Args, Ctx, Failure, Out};

/// Streams records from `sub` until `count` records, `duration`, the
/// reader leaving or the VM going away. Between records it sleeps: a
/// record, the deadline, the reader leaving (`Out::wake_when_gone`) or the
/// monitor stopping wakes it, nothing else.
fn stream(
    ctx: &Ctx<'_>,
    sub: &ukvmi_monitor::Subscription,
    a: &Args<'_>,
    out: &mut dyn Out,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<(), Failure> {
    let count = a.num("--count")?;
    // A duration too long to add to now is as good as none.
    let until = a.secs("--duration")?.and_then(|d| Instant::now().checked_add(d));
    let json_out = a.has("--json");
    out.wake_when_gone(sub.waker());
    let mut n = 0u64;
    loop {
        if out.gone() || until.is_some_and(|u| Instant::now() >= u) || count.is_some_and(|c| n >= c) {
            return Ok(());
        }
        match sub.next_until(until) {
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

/// Refuses a breakpoint in a Linux kernel's init sections
/// (`__init_begin..__init_end`): the kernel frees them after boot and fills
/// them with 0xcc, so the int3's saved byte would later be put back into
/// memory that holds something else.
fn refuse_init_text(ctx: &Ctx<'_>, at: u64) -> Result<(), Failure> {
    let Some(s) = ctx.syms else { return Ok(()) };
    let (Some(begin), Some(end)) = (s.addr("__init_begin"), s.addr("__init_end")) else { return Ok(()) };
    if (begin..end).contains(&at) {
        return Err(Failure {
            msg: format!(
                "{} is in the kernel's init sections (__init_begin..__init_end), which it frees after boot: \
                 a breakpoint there would outlive the code; pick a function in .text",
                ctx.describe(at)
            ),
            status: 1,
        });
    }
    Ok(())
}

pub(crate) fn trace(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    let mut syscalls = a.has("--syscalls");
    let hyper = a.has("--hypercalls") || a.val("--answer").is_some();
    let pauses = a.has("--pauses");
    let bp = a.val("--breakpoint").map(|b| ctx.addr(b)).transpose()?;
    if let Some(at) = bp {
        refuse_init_text(ctx, at)?;
    }
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

pub(crate) fn watch_msr(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
    if a.pos.is_empty() {
        return Err(Failure::usage("name at least one MSR, e.g. `ukvmi watch-msr LSTAR --deny`"));
    }
    let msrs: Vec<u32> = a
        .pos
        .iter()
        .map(|m| parse_msr(m).ok_or_else(|| Failure::usage(format!("unknown MSR `{m}`"))))
        .collect::<Result<_, _>>()?;
    let restore = a.has("--restore");
    if restore && !msrs.contains(&hooks::LSTAR) {
        return Err(Failure::usage("--restore puts LSTAR back (the kernel's syscall_entry): name LSTAR"));
    }
    let entry_sym = ctx.mon.guest_os().syscall_entry_symbol();
    if restore && ctx.syms.and_then(|s| s.addr(entry_sym)).is_none() {
        return Err(Failure {
            msg: format!("--restore needs the kernel's `{entry_sym}` symbol: run the demo guest or give --map FILE"),
            status: 1,
        });
    }
    let sub = ctx.mon.subscribe(Kinds { msr: true, ..Kinds::default() });
    for &m in &msrs {
        ctx.mon.watch_msr(&sub, m, a.has("--deny"))?;
    }
    // What the MSRs hold now: a write made before this command is not an
    // event (KVMI reports writes that change the value).
    let now = match hooks::read_msrs(ctx, &msrs) {
        Ok(now) => now,
        Err(e) if !restore => {
            out.note(&format!("(the current values could not be read: {})", e.msg))?;
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    hooks::show_msrs(ctx, &now, a.has("--json"), restore, out)?;
    if restore {
        lstar_stub::restore_lstar(ctx, &sub, &now, a.has("--json"), out)?;
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

pub(crate) fn protect(ctx: &Ctx<'_>, a: &Args<'_>, out: &mut dyn Out) -> Result<(), Failure> {
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
    // What the range holds now, against the kernel image: a write made
    // before this command is not an event.
    // The range the user named: LEN, else the symbol's extent (up to the
    // next symbol: syscall_table is the whole table), else one word.
    let shown = match (a.pos.get(1), ctx.syms) {
        (None, Some(s)) if parse_number(what).is_none() => {
            s.resolve(what).and_then(|v| s.extent(v)).filter(|&e| e > 0).map_or(8, |e| e.min(0x10_0000))
        }
        (None, _) => 8,
        (Some(_), _) => len,
    };
    let now = match hooks::read_range(ctx, gpa, shown) {
        Ok(now) => {
            hooks::show_range(ctx, what, &now, a.has("--json"), a.has("--restore"), out)?;
            now
        }
        Err(e) if !a.has("--restore") => {
            out.note(&format!("(the current contents could not be read: {})", e.msg))?;
            hooks::RangeNow { words: 0, changed: Vec::new(), image: None }
        }
        Err(e) => return Err(e),
    };
    if a.has("--restore") {
        if now.image.is_none() {
            return Err(Failure {
                msg: "--restore puts back the built-in kernel image's bytes: this VM does not run a built-in guest"
                    .into(),
                status: 1,
            });
        }
        hooks::restore_range(ctx, &now, a.has("--json"), out)?;
    }
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
