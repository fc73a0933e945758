//! What the guest's syscall hooks hold when `watch-msr` and `protect` start — an MSR on each
//! vCPU against the kernel's entry symbol, a range's words against the kernel image — reported
//! (text on stderr, JSON objects with `--json`), and the words put back for `--restore`.
//!
//! Watching a hook only sees what changes after it starts; a guest attacked
//! before that (the demo's rootkit strikes a second after boot) is shown here
//! instead of looking clean. The reference values are honest ones: LSTAR's is
//! the kernel's `syscall_entry` symbol (built-in guests, or `--map`); a
//! range's are the bytes of the built-in guest image the VM runs (checked
//! against its memory first), the same image the VMM loaded at boot.

use ukvmi_monitor::{json::Obj, record::msr_name};

use super::{Ctx, Failure, Out};

/// The MSR whose kernel value is known (the syscall entry).
pub(super) const LSTAR: u32 = 0xc000_0082;

/// One MSR on one vCPU as it is now.
#[derive(Debug, Clone, Copy)]
pub(super) struct MsrNow {
    pub vcpu: u16,
    pub msr: u32,
    pub value: u64,
    /// The kernel's own value, when known (LSTAR: `syscall_entry`).
    pub kernel: Option<u64>,
}

impl RangeNow {
    /// The changed words that were pointers into the kernel: the hooks.
    pub fn hooks(&self) -> impl Iterator<Item = &Changed> {
        self.changed.iter().filter(|c| c.pointer)
    }
}

/// `0x… (symbol+off)`, or the bare number where no symbol is near.
fn named(ctx: &Ctx<'_>, v: u64) -> String {
    let d = ctx.describe(v);
    if d == format!("{v:#x}") {
        d
    } else {
        format!("{v:#x} ({d})")
    }
}

impl MsrNow {
    /// Set, and to something other than the kernel's own value. Zero is
    /// "not set yet": a guard armed before the guest's kernel set up its
    /// syscall entry (a Linux guest watched from boot).
    pub fn hijacked(&self) -> bool {
        self.value != 0 && self.kernel.is_some_and(|k| k != self.value)
    }
}

fn msr_text(msr: u32) -> String {
    msr_name(msr).map_or_else(|| format!("{msr:#x}"), str::to_string)
}

/// Reads each of `msrs` on every vCPU.
pub(super) fn read_msrs(ctx: &Ctx<'_>, msrs: &[u32]) -> Result<Vec<MsrNow>, Failure> {
    let entry_sym = ctx.mon.guest_os().syscall_entry_symbol();
    let entry = ctx.syms.and_then(|s| s.addr(entry_sym));
    let mut all = Vec::new();
    for v in 0..ctx.mon.vcpus() {
        let regs = ctx.mon.vm().get_registers(v, msrs).map_err(super::kvmi("KVMI_VCPU_GET_REGISTERS"))?;
        for (&msr, e) in msrs.iter().zip(&regs.msrs) {
            all.push(MsrNow { vcpu: v, msr, value: e.data, kernel: if msr == LSTAR { entry } else { None } });
        }
    }
    Ok(all)
}

/// Reports `now`, one line (or JSON object) per MSR and vCPU; a hijacked
/// one says so and what to do.
pub(super) fn show_msrs(
    ctx: &Ctx<'_>,
    now: &[MsrNow],
    json: bool,
    restoring: bool,
    out: &mut dyn Out,
) -> Result<(), Failure> {
    for m in now {
        if json {
            let o = Obj::new().str("event", "state").num("vcpu", u64::from(m.vcpu)).hex("msr", u64::from(m.msr));
            let o = match msr_name(m.msr) {
                Some(n) => o.str("msr_name", n),
                None => o,
            };
            let o = o.hex("value", m.value).str("symbol", &ctx.describe(m.value));
            let o = match m.kernel {
                Some(k) => o.hex("kernel", k).bool("compromised", m.hijacked()),
                None => o,
            };
            out.note(&o.build())?;
            continue;
        }
        if m.value == 0 {
            out.note(&format!(
                "vCPU {}: {} = 0: not set yet (the guest's kernel has not set up its syscall entry)",
                m.vcpu,
                msr_text(m.msr)
            ))?;
            continue;
        }
        let head = format!("vCPU {}: {} = {:#x} ({})", m.vcpu, msr_text(m.msr), m.value, ctx.describe(m.value));
        out.note(&match m.kernel {
            Some(k) if m.hijacked() => format!(
                "{head}: COMPROMISED already: the kernel's syscall entry is {} ({k:#x}); {}",
                ctx.mon.guest_os().syscall_entry_symbol(),
                if restoring {
                    "putting it back"
                } else {
                    "refusing writes from now on keeps this value: add --restore to put it back"
                }
            ),
            Some(_) => format!("{head}: the kernel's syscall entry"),
            None => head,
        })?;
    }
    Ok(())
}

/// The built-in guest image the VM runs, when it runs one: its first page
/// is in memory at the load address (but for a few planted `int3`s).
fn builtin_image(ctx: &Ctx<'_>) -> Option<&'static ukvmi_guests::Guest> {
    const PLANTED: usize = 16;
    let g = ukvmi_guests::find(&ctx.mon.vm().info().name)?;
    let mut mem = vec![0u8; g.image.len().min(4096)];
    ctx.mon.read(g.load_addr, &mut mem).ok()?;
    (mem.iter().zip(g.image).filter(|(a, b)| a != b).count() <= PLANTED).then_some(g)
}

/// One 8-byte word of a range that differs from the kernel image.
#[derive(Debug, Clone, Copy)]
pub(super) struct Changed {
    pub gpa: u64,
    pub now: u64,
    pub image: u64,
    /// The image's word points into the kernel image (a hook: a table slot,
    /// a function pointer), unlike data the kernel changes as it runs.
    pub pointer: bool,
}

/// A range's words against the kernel image.
#[derive(Debug)]
pub(super) struct RangeNow {
    /// Words compared (those inside the image).
    pub words: u64,
    /// Those that differ.
    pub changed: Vec<Changed>,
    /// The image compared with, if any.
    pub image: Option<&'static str>,
}

/// Compares the 8-byte words of `gpa..gpa+len` (guest-physical) that lie
/// in the built-in kernel image with the image's own bytes.
pub(super) fn read_range(ctx: &Ctx<'_>, gpa: u64, len: u64) -> Result<RangeNow, Failure> {
    let Some(g) = builtin_image(ctx) else {
        return Ok(RangeNow { words: 0, changed: Vec::new(), image: None });
    };
    let start = gpa.max(g.load_addr).next_multiple_of(8);
    let end = gpa.saturating_add(len).min(g.end());
    let mut changed = Vec::new();
    let mut words = 0;
    if start < end {
        let size = usize::try_from(end - start).map_err(|_| Failure::usage("range too large"))?;
        let mut mem = vec![0u8; size];
        ctx.mon.read(start, &mut mem).map_err(|e| Failure { msg: format!("reading {start:#x}: {e}"), status: 1 })?;
        let off = usize::try_from(start - g.load_addr).unwrap_or(usize::MAX);
        let img = g.image.get(off..).unwrap_or(&[]);
        for (i, (m, r)) in mem.chunks_exact(8).zip(img.chunks_exact(8)).enumerate() {
            words += 1;
            if m != r {
                let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
                let image = word(r);
                let pointer = (g.load_addr..g.end()).contains(&image);
                changed.push(Changed { gpa: start + 8 * i as u64, now: word(m), image, pointer });
            }
        }
    }
    Ok(RangeNow { words, changed, image: Some(g.name) })
}

/// At most this many changed words are listed one by one.
const LIST: usize = 16;

/// Reports `now` for the range `what` at `gpa`.
pub(super) fn show_range(
    ctx: &Ctx<'_>,
    what: &str,
    now: &RangeNow,
    json: bool,
    restoring: bool,
    out: &mut dyn Out,
) -> Result<(), Failure> {
    if json {
        let o = Obj::new().str("event", "state").str("range", what).num("words", now.words);
        let o = match now.image {
            Some(i) => o
                .str("image", i)
                .num("changed", now.changed.len() as u64)
                .num("hooks", now.hooks().count() as u64)
                .bool("compromised", now.hooks().next().is_some()),
            None => o,
        };
        out.note(&o.build())?;
        for c in &now.changed {
            out.note(
                &Obj::new()
                    .str("event", "state")
                    .hex("gpa", c.gpa)
                    .str("at", &ctx.describe(c.gpa))
                    .hex("value", c.now)
                    .str("symbol", &ctx.describe(c.now))
                    .hex("image", c.image)
                    .str("image_symbol", &ctx.describe(c.image))
                    .bool("pointer", c.pointer)
                    .build(),
            )?;
        }
        return Ok(());
    }
    let Some(image) = now.image else {
        out.note(&format!(
            "{what}: no kernel image to compare with (not a built-in guest): changes made before now are not shown"
        ))?;
        return Ok(());
    };
    if now.changed.is_empty() {
        if now.words > 0 {
            out.note(&format!("{what}: all {} words as in the `{image}` kernel image", now.words))?;
        }
        return Ok(());
    }
    let hooks = now.hooks().count();
    let data = now.changed.len() - hooks;
    if hooks > 0 {
        out.note(&format!(
            "{what}: COMPROMISED already: {hooks} of {} words point elsewhere than in the `{image}` kernel image; {}",
            now.words,
            if restoring {
                "putting them back"
            } else {
                "refusing writes from now on keeps them: add --restore to put them back"
            }
        ))?;
    }
    if data > 0 {
        out.note(&format!(
            "{what}: {data} of {} words differ from the `{image}` kernel image where it holds data, not pointers \
             (the kernel changes its data as it runs; --restore leaves them)",
            now.words
        ))?;
    }
    for c in now.changed.iter().take(LIST) {
        out.note(&format!(
            "  {}: {}; the image has {}{}",
            named(ctx, c.gpa),
            named(ctx, c.now),
            named(ctx, c.image),
            if c.pointer { "" } else { " (data)" }
        ))?;
    }
    if now.changed.len() > LIST {
        out.note(&format!("  ... and {} more", now.changed.len() - LIST))?;
    }
    Ok(())
}

/// Writes the image's words back over the changed pointers (the hooks;
/// data is left as the kernel keeps it) and says so.
pub(super) fn restore_range(ctx: &Ctx<'_>, now: &RangeNow, json: bool, out: &mut dyn Out) -> Result<(), Failure> {
    for c in now.hooks() {
        ctx.mon.vm().write_physical(c.gpa, &c.image.to_le_bytes()).map_err(super::kvmi("KVMI_VM_WRITE_PHYSICAL"))?;
        if json {
            out.note(
                &Obj::new().str("event", "restored").hex("gpa", c.gpa).hex("old", c.now).hex("new", c.image).build(),
            )?;
        } else {
            out.note(&format!(
                "restored {:#x} ({}): {} -> {}",
                c.gpa,
                ctx.describe(c.gpa),
                ctx.describe(c.now),
                ctx.describe(c.image)
            ))?;
        }
    }
    Ok(())
}
