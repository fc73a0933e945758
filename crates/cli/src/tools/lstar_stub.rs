//! Putting a hijacked LSTAR back (`watch-msr LSTAR --restore`): a stub the vCPU runs at its next
//! syscall writes the kernel's `syscall_entry` into LSTAR; then the guest's bytes are put back.
//!
//! KVMI has no command that writes an MSR: an introspector can only answer a
//! guest's own write (the MSR event's reply), and a guest that already holds
//! the hijacked value writes nothing new. So the vCPU does it. With every
//! vCPU held paused and none inside the bytes concerned, the 49-byte stub goes
//! into the last 64 bytes of the page LSTAR points into, which must be free
//! (all zero), and a 13-byte jump to it over the first bytes of the code LSTAR
//! points to (the hijacker's entry; other code of the hijacker further on is
//! left alone). The next `syscall` enters there in ring 0 exactly as it would
//! the real entry; the stub saves RAX, RCX and RDX below the caller's red
//! zone, writes LSTAR with `wrmsr` (an MSR event the guard lets through: it is
//! the restore), puts the registers back and jumps to `syscall_entry`, so the
//! syscall itself runs as the kernel meant (R11 is clobbered, as any syscall
//! entry may). Once every hijacked vCPU's LSTAR is back, the bytes the restore
//! wrote are put back as they were, again with every vCPU held outside them.

use std::time::{Duration, Instant};

use super::{
    hooks::{read_msrs, MsrNow, LSTAR},
    Ctx, Failure, Out,
};
use ukvmi_monitor::{json::Obj, Subscription};

/// How long the restore waits for each hijacked vCPU's next syscall.
const WAIT: Duration = Duration::from_secs(5);

/// Bytes kept for the stub at the end of the page.
const ROOM: u64 = 64;

/// The stub: `lea -128(%rsp),%rsp; push rax/rcx/rdx; wrmsr(LSTAR, entry);
/// pop; lea 128(%rsp),%rsp; movabs $entry,%r11; jmp *%r11`.
fn stub(entry: u64) -> Vec<u8> {
    let (lo, hi) = ((entry & 0xffff_ffff) as u32, (entry >> 32) as u32);
    let mut s = vec![0x48, 0x8d, 0x64, 0x24, 0x80, 0x50, 0x51, 0x52, 0xb9];
    s.extend_from_slice(&LSTAR.to_le_bytes());
    s.push(0xb8);
    s.extend_from_slice(&lo.to_le_bytes());
    s.push(0xba);
    s.extend_from_slice(&hi.to_le_bytes());
    s.extend_from_slice(&[0x0f, 0x30, 0x5a, 0x59, 0x58, 0x48, 0x8d, 0xa4, 0x24, 0x80, 0x00, 0x00, 0x00]);
    s.extend_from_slice(&jump(entry));
    s
}

/// `movabs $to,%r11; jmp *%r11` (13 bytes; R11 is free at a syscall entry).
fn jump(to: u64) -> Vec<u8> {
    let mut j = vec![0x49, 0xbb];
    j.extend_from_slice(&to.to_le_bytes());
    j.extend_from_slice(&[0x41, 0xff, 0xe3]);
    j
}

fn fail(msg: String) -> Failure {
    Failure { msg, status: 1 }
}

/// Guest memory the restore writes: where (virtual and physical) and bytes.
#[derive(Debug, Clone)]
struct Patch {
    gva: u64,
    gpa: u64,
    bytes: Vec<u8>,
}

/// Writes `patches` while every vCPU is held paused outside all of them.
fn write_paused(ctx: &Ctx<'_>, patches: &[Patch]) -> Result<(), Failure> {
    for _ in 0..20 {
        let held = ctx.mon.hold_all(Duration::from_secs(5))?;
        let mut inside = false;
        for v in 0..ctx.mon.vcpus() {
            match ctx.mon.vm().get_registers(v, &[]) {
                Ok(r) => {
                    inside |= patches
                        .iter()
                        .any(|p| (p.gva..p.gva.saturating_add(p.bytes.len() as u64)).contains(&r.regs.rip));
                }
                Err(e) => {
                    drop(held);
                    return Err(super::kvmi("KVMI_VCPU_GET_REGISTERS")(e));
                }
            }
        }
        let written = if inside {
            None
        } else {
            Some(patches.iter().try_for_each(|p| ctx.mon.vm().write_physical(p.gpa, &p.bytes)))
        };
        drop(held);
        match written {
            Some(r) => return r.map_err(super::kvmi("KVMI_VM_WRITE_PHYSICAL")),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    Err(fail("a vCPU was always inside the code the restore must write; LSTAR left as it is".into()))
}

/// The patches that make the code at `target` (on `vcpu`) restore LSTAR,
/// and the bytes they replace.
fn patches(ctx: &Ctx<'_>, vcpu: u16, target: u64, entry: u64) -> Result<(Vec<Patch>, Vec<Patch>), Failure> {
    let gpa = ctx
        .mon
        .vm()
        .translate_gva(vcpu, target)
        .map_err(super::kvmi("KVMI_VCPU_TRANSLATE_GVA"))?
        .map(u64::from)
        .ok_or_else(|| fail(format!("LSTAR {target:#x} on vCPU {vcpu} is not mapped: cannot restore")))?;
    let body_gva = (target | 0xfff) - (ROOM - 1);
    let body_gpa = (gpa | 0xfff) - (ROOM - 1);
    let hop = jump(body_gva);
    if target.saturating_add(hop.len() as u64) > body_gva {
        return Err(fail(format!("LSTAR {target:#x}: too close to its page's end for the restore stub")));
    }
    let read = |at: u64, len: usize| -> Result<Vec<u8>, Failure> {
        let mut b = vec![0u8; len];
        ctx.mon.read(at, &mut b).map_err(|e| fail(format!("reading {at:#x}: {e}")))?;
        Ok(b)
    };
    let old_body = read(body_gpa, ROOM as usize)?;
    if old_body.iter().any(|&b| b != 0) {
        return Err(fail(format!(
            "LSTAR {target:#x}: the end of its page ({body_gva:#x}) is in use, so there is no room for the restore \
             stub; LSTAR left as it is"
        )));
    }
    let old_hop = read(gpa, hop.len())?;
    let mut body = stub(entry);
    body.resize(ROOM as usize, 0);
    let new = vec![Patch { gva: body_gva, gpa: body_gpa, bytes: body }, Patch { gva: target, gpa, bytes: hop }];
    let old = vec![Patch { gva: body_gva, gpa: body_gpa, bytes: old_body }, Patch { gva: target, gpa, bytes: old_hop }];
    Ok((new, old))
}

/// Puts LSTAR back to `syscall_entry` on every vCPU of `now` where it was
/// hijacked, and reports each.
pub(super) fn restore_lstar(
    ctx: &Ctx<'_>,
    sub: &Subscription,
    now: &[MsrNow],
    json: bool,
    out: &mut dyn Out,
) -> Result<(), Failure> {
    let hijacked: Vec<MsrNow> = now.iter().filter(|m| m.msr == LSTAR && m.hijacked()).copied().collect();
    if hijacked.is_empty() {
        return Ok(());
    }
    if ctx.mon.pause_holders().tool {
        return Err(fail("vCPUs are held paused (`ukvmi pause`): `ukvmi resume` first, then --restore".into()));
    }
    let Some(entry) = hijacked.first().and_then(|m| m.kernel) else { return Ok(()) };
    ctx.mon.allow_msr_restore(sub, LSTAR, entry);
    let (mut planted, mut originals, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for m in &hijacked {
        if targets.contains(&m.value) {
            continue;
        }
        let (new, old) = patches(ctx, m.vcpu, m.value, entry)?;
        planted.extend(new);
        originals.extend(old);
        targets.push(m.value);
    }
    write_paused(ctx, &planted)?;
    let deadline = Instant::now() + WAIT;
    let mut left = hijacked;
    while !left.is_empty() {
        let again = read_msrs(ctx, &[LSTAR])?;
        left.retain(|m| {
            let back = again.iter().any(|a| a.vcpu == m.vcpu && a.value == entry);
            if back {
                let line = if json {
                    Obj::new()
                        .str("event", "restored")
                        .num("vcpu", u64::from(m.vcpu))
                        .str("msr_name", "LSTAR")
                        .hex("old", m.value)
                        .hex("new", entry)
                        .build()
                } else {
                    format!(
                        "restored vCPU {}: LSTAR {} -> {} (written by the vCPU at its next syscall)",
                        m.vcpu,
                        ctx.describe(m.value),
                        ctx.describe(entry)
                    )
                };
                let _ = out.note(&line);
            }
            !back
        });
        if left.is_empty() || out.gone() {
            break;
        }
        if Instant::now() >= deadline {
            for m in &left {
                out.note(&if json {
                    Obj::new()
                        .str("event", "restore_pending")
                        .num("vcpu", u64::from(m.vcpu))
                        .str("msr_name", "LSTAR")
                        .hex("stub", m.value)
                        .build()
                } else {
                    format!(
                        "vCPU {}: LSTAR not back within {} s (no syscall there yet); the stub at {:#x} puts it back at \
                         the next one",
                        m.vcpu,
                        WAIT.as_secs(),
                        m.value
                    )
                })?;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if left.is_empty() {
        // Every hijacked LSTAR is back: the guest's bytes go back as they were.
        write_paused(ctx, &originals)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_is_the_code_the_docs_describe() {
        // As GNU as assembles it (entry 0x1122334455667788).
        let want: [u8; 49] = [
            0x48, 0x8d, 0x64, 0x24, 0x80, // lea -0x80(%rsp),%rsp
            0x50, 0x51, 0x52, // push %rax; push %rcx; push %rdx
            0xb9, 0x82, 0x00, 0x00, 0xc0, // mov $0xc0000082,%ecx
            0xb8, 0x88, 0x77, 0x66, 0x55, // mov $0x55667788,%eax
            0xba, 0x44, 0x33, 0x22, 0x11, // mov $0x11223344,%edx
            0x0f, 0x30, // wrmsr
            0x5a, 0x59, 0x58, // pop %rdx; pop %rcx; pop %rax
            0x48, 0x8d, 0xa4, 0x24, 0x80, 0x00, 0x00, 0x00, // lea 0x80(%rsp),%rsp
            0x49, 0xbb, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // movabs $entry,%r11
            0x41, 0xff, 0xe3, // jmp *%r11
        ];
        assert_eq!(stub(0x1122_3344_5566_7788), want);
    }
}
