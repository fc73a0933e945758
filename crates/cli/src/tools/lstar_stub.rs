//! Putting a hijacked LSTAR back (`watch-msr LSTAR --restore`): a stub over the hijacker's
//! entry makes the vCPU write the kernel's `syscall_entry` into LSTAR at its next syscall.
//!
//! KVMI has no command that writes an MSR: an introspector can only answer a
//! guest's own write (the MSR event's reply), and the guest that already
//! holds the hijacked value writes nothing new. So the restore has the vCPU
//! do it. Every vCPU is held paused while the stub (49 bytes) is written
//! over the code LSTAR points to (the hijacker's own entry, in kernel
//! memory), never while a vCPU is inside that code. The next `syscall`
//! enters the stub in ring 0 exactly as it would the real entry; the stub
//! saves RAX, RCX and RDX below the caller's red zone, writes LSTAR with
//! `wrmsr` (an MSR event the guard lets through: it is the restore), puts the
//! registers back and jumps to `syscall_entry`, so the syscall itself runs
//! as the kernel meant. R11 is clobbered, as any syscall entry may.

use std::time::{Duration, Instant};

use super::{
    hooks::{read_msrs, MsrNow, LSTAR},
    Ctx, Failure, Out,
};
use ukvmi_monitor::{json::Obj, Subscription};

/// How long the restore waits for each hijacked vCPU's next syscall.
const WAIT: Duration = Duration::from_secs(5);

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
    s.extend_from_slice(&[0x0f, 0x30, 0x5a, 0x59, 0x58, 0x48, 0x8d, 0xa4, 0x24, 0x80, 0x00, 0x00, 0x00, 0x49, 0xbb]);
    s.extend_from_slice(&entry.to_le_bytes());
    s.extend_from_slice(&[0x41, 0xff, 0xe3]);
    s
}

fn fail(msg: String) -> Failure {
    Failure { msg, status: 1 }
}

/// Writes the stub at `gpa` (the code at `gva`) while every vCPU is held
/// outside it.
fn plant(ctx: &Ctx<'_>, gva: u64, gpa: u64, code: &[u8]) -> Result<(), Failure> {
    let len = code.len() as u64;
    for _ in 0..20 {
        ctx.mon.pause_all(Duration::from_secs(5))?;
        let mut inside = false;
        for v in 0..ctx.mon.vcpus() {
            match ctx.mon.vm().get_registers(v, &[]) {
                Ok(r) => inside |= (gva..gva + len).contains(&r.regs.rip),
                Err(e) => {
                    ctx.mon.resume_all()?;
                    return Err(super::kvmi("KVMI_VCPU_GET_REGISTERS")(e));
                }
            }
        }
        let written = if inside { None } else { Some(ctx.mon.vm().write_physical(gpa, code)) };
        ctx.mon.resume_all()?;
        match written {
            Some(r) => return r.map_err(super::kvmi("KVMI_VM_WRITE_PHYSICAL")),
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    Err(fail(format!("a vCPU was always inside the code at {gva:#x}; LSTAR left as it is")))
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
    if !ctx.mon.held().is_empty() {
        return Err(fail("vCPUs are held paused (`ukvmi pause`): `ukvmi resume` first, then --restore".into()));
    }
    let Some(entry) = hijacked.first().and_then(|m| m.kernel) else { return Ok(()) };
    ctx.mon.allow_msr_restore(sub, LSTAR, entry);
    let code = stub(entry);
    let mut planted: Vec<u64> = Vec::new();
    for m in &hijacked {
        if planted.contains(&m.value) {
            continue;
        }
        let gpa = ctx
            .mon
            .vm()
            .translate_gva(m.vcpu, m.value)
            .map_err(super::kvmi("KVMI_VCPU_TRANSLATE_GVA"))?
            .map(u64::from)
            .ok_or_else(|| fail(format!("LSTAR {:#x} on vCPU {} is not mapped: cannot restore", m.value, m.vcpu)))?;
        if (gpa & 0xfff) + code.len() as u64 > 0x1000 {
            return Err(fail(format!("LSTAR {:#x}: too close to a page end for the restore stub", m.value)));
        }
        plant(ctx, m.value, gpa, &code)?;
        planted.push(m.value);
    }
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
                out.note(&format!(
                    "vCPU {}: LSTAR not back within {} s (no syscall there yet); the stub at {:#x} puts it back at the next one",
                    m.vcpu,
                    WAIT.as_secs(),
                    m.value
                ))?;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
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
