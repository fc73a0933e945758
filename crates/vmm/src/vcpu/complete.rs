//! Instructions KVM's emulator lacks (a host that emulates ring 0: PVM)
//! which the VMM completes for a Linux guest, each logged once per RIP,
//! and the names and hints of those it cannot complete.
//!
//! Completed: `fwait` (only raises a pending unmasked x87 exception, which
//! Linux kernel code never leaves; the kernel runs one on every task exit)
//! and `clac`/`stac` (RFLAGS.AC). The kernel's own `int3`s are not here:
//! they take the BREAKPOINT path (`events.rs`), which delivers #BP with
//! RIP past the int3 when no tool claims it.

use super::run::Step;
use super::KvmVcpu;
use crate::exit::FatalExit;
use crate::vm::lock;

/// RFLAGS.AC.
const RFLAGS_AC: u64 = 1 << 18;
/// The longest x86 instruction.
const MAX_INSN: usize = 15;

/// What the VMM does in the emulator's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// Nothing but moving RIP past the instruction.
    Skip,
    /// Set (`true`) or clear RFLAGS.AC, then move RIP.
    SetAc(bool),
}

/// An instruction as far as this module knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decoded {
    pub name: &'static str,
    /// Its length (meaningful when `completion` is `Some`).
    pub len: usize,
    pub completion: Option<Completion>,
    pub hint: Option<&'static str>,
}

const NOXSAVE: Option<&str> = Some("boot the kernel with `noxsave` (PVM hosts get it by default)");
const SSE: Option<&str> = Some(
    "the emulator lacks SSE instructions: clear the feature of the code that uses them \
     (e.g. `clearcpuid=137` for SSSE3, which PVM hosts get by default)",
);

/// " <sym+0xoff>" or nothing.
fn named_at(sym: Option<String>) -> String {
    sym.map(|s| format!(" <{s}>")).unwrap_or_default()
}

fn named(name: &'static str, hint: Option<&'static str>) -> Decoded {
    Decoded { name, len: 0, completion: None, hint }
}

/// Decodes the instruction at the start of `b` (legacy prefixes and REX
/// skipped) as far as completing or naming it needs.
pub(crate) fn decode(b: &[u8]) -> Decoded {
    let mut i = 0;
    let (mut rep, mut rex_w) = (false, false);
    while let Some(&p) = b.get(i) {
        match p {
            0x66 | 0x67 | 0xf0 | 0xf2 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 => {}
            0xf3 => rep = true,
            _ => break,
        }
        i += 1;
    }
    if let Some(&r) = b.get(i).filter(|r| (0x40..=0x4f).contains(*r)) {
        rex_w = r & 8 != 0;
        i += 1;
    }
    let at = |k: usize| b.get(i + k).copied();
    let modrm = |k: usize| at(k).map(|m| (m >> 6, (m >> 3) & 7));
    match (at(0), at(1), at(2)) {
        (Some(0x9b), _, _) => Decoded { name: "fwait", len: i + 1, completion: Some(Completion::Skip), hint: None },
        (Some(0x0f), Some(0x01), Some(0xca)) => {
            Decoded { name: "clac", len: i + 3, completion: Some(Completion::SetAc(false)), hint: None }
        }
        (Some(0x0f), Some(0x01), Some(0xcb)) => {
            Decoded { name: "stac", len: i + 3, completion: Some(Completion::SetAc(true)), hint: None }
        }
        (Some(0xcc), _, _) => named("int3", None),
        (Some(0x0f), Some(0x01), Some(0xd0)) => named("xgetbv", NOXSAVE),
        (Some(0x0f), Some(0x01), Some(0xd1)) => named("xsetbv", NOXSAVE),
        (Some(0x0f), Some(0xb8), _) if rep => {
            named("popcnt", Some("boot the kernel with `clearcpuid=151` (POPCNT; PVM hosts get it by default)"))
        }
        (Some(0x0f), Some(0xae), _) => match modrm(2) {
            Some((3, r)) if rep && r < 4 => named(
                match r {
                    0 => "rdfsbase",
                    1 => "rdgsbase",
                    2 => "wrfsbase",
                    _ => "wrgsbase",
                },
                Some("boot the kernel with `nofsgsbase`"),
            ),
            Some((m, 0)) if m != 3 => named("fxsave", NOXSAVE),
            Some((m, 1)) if m != 3 => named("fxrstor", NOXSAVE),
            Some((m, 2)) if m != 3 => named("ldmxcsr", SSE),
            Some((m, 3)) if m != 3 => named("stmxcsr", SSE),
            Some((m, 4)) if m != 3 => named("xsave", NOXSAVE),
            Some((m, 5)) if m != 3 => named("xrstor", NOXSAVE),
            Some((m, 6)) if m != 3 => named("xsaveopt", NOXSAVE),
            _ => named("a 0f ae instruction (fence, cache or state)", None),
        },
        (Some(0x0f), Some(0xc7), _) => match modrm(2) {
            Some((m, 1)) if m != 3 && rex_w => {
                named("cmpxchg16b", Some("CX16 is cleared in CPUID for a Linux guest; the kernel used it anyway"))
            }
            Some((m, 3)) if m != 3 => named("xrstors", NOXSAVE),
            Some((m, 4)) if m != 3 => named("xsavec", NOXSAVE),
            Some((m, 5)) if m != 3 => named("xsaves", NOXSAVE),
            _ => named("a 0f c7 instruction", None),
        },
        (Some(0x0f), Some(0x10..=0x17 | 0x28..=0x2f | 0x38 | 0x3a | 0x50..=0x7f | 0xc2..=0xc6 | 0xd0..=0xff), _) => {
            named("an SSE/MMX instruction", SSE)
        }
        _ => named("an instruction", None),
    }
}

impl KvmVcpu {
    /// Up to [`MAX_INSN`] bytes at guest-virtual `rip` (fewer where a page
    /// does not translate).
    fn code_at(&self, rip: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_INSN);
        while out.len() < MAX_INSN {
            let va = rip.wrapping_add(out.len() as u64);
            let Some(gpa) = self.translate(va) else { break };
            let room = (0x1000 - (gpa & 0xfff)) as usize;
            let mut b = vec![0u8; room.min(MAX_INSN - out.len())];
            if self.shared.ram.read(gpa, &mut b).is_err() {
                break;
            }
            out.extend_from_slice(&b);
        }
        out
    }

    /// Completes the instruction at RIP for a Linux guest when this module
    /// knows how; `None` otherwise (and always for the guest ABI's images).
    pub(super) fn complete(&mut self, regs: &kvm_bindings::kvm_regs) -> Option<Step> {
        self.shared.linux.as_ref()?;
        let code = self.code_at(regs.rip);
        let d = decode(&code);
        let how = d.completion?;
        let mut r = *regs;
        r.rip = regs.rip.wrapping_add(d.len as u64);
        if let Completion::SetAc(on) = how {
            r.rflags = if on { r.rflags | RFLAGS_AC } else { r.rflags & !RFLAGS_AC };
        }
        if let Err(e) = self.put_regs(&r) {
            return Some(Step::Fatal { why: FatalExit::RunFailed(e), rip: 0, code: [0; 8] });
        }
        if let Some(l) = &self.shared.linux {
            l.completions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let first = self.shared.linux.as_ref().filter(|l| lock(&l.completed).insert(regs.rip));
        if let Some(l) = first {
            (self.shared.log)(&format!(
                "vCPU {}: completed {} at {:#x}{} (KVM's emulator lacks it); further ones at this address are not logged",
                self.index,
                d.name,
                regs.rip,
                named_at(l.symbol(regs.rip))
            ));
        }
        Some(Step::Reenter)
    }

    /// A Linux guest's int3 reached the VMM (an emulation failure): logged
    /// once per RIP, so the kernel's own (`int3_selftest`, `text_poke_bp`)
    /// show next to a tool's. It then takes the BREAKPOINT path.
    pub(super) fn note_int3(&self, rip: u64) {
        let Some(l) = &self.shared.linux else { return };
        let n = l.int3s.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if lock(&l.int3_sites).insert(rip) {
            (self.shared.log)(&format!(
                "vCPU {}: int3 #{n} at {rip:#x}{} (an emulation failure): a tool's breakpoint, else #BP to the guest \
                 with RIP past it; further ones at this address are not logged",
                self.index,
                named_at(l.symbol(rip))
            ));
        }
    }

    /// The named fatal exit for an instruction the emulator failed on, for
    /// a Linux guest; `None` for the guest ABI's images.
    pub(super) fn unemulated(&self, regs: &kvm_bindings::kvm_regs) -> Option<FatalExit> {
        let symbol = self.shared.linux.as_ref()?.symbol(regs.rip);
        let bytes = self.code_at(regs.rip);
        let d = decode(&bytes);
        Some(FatalExit::Unemulated { insn: d.name, symbol, bytes, hint: d.hint })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(b: &[u8]) -> &'static str {
        decode(b).name
    }

    #[test]
    fn fwait_clac_and_stac_are_completed_with_their_lengths() {
        assert_eq!(
            decode(&[0x9b, 0xdb, 0xe2]),
            Decoded { name: "fwait", len: 1, completion: Some(Completion::Skip), hint: None }
        );
        assert_eq!(decode(&[0x0f, 0x01, 0xca, 0x90]).completion, Some(Completion::SetAc(false)));
        assert_eq!(decode(&[0x0f, 0x01, 0xca]).len, 3);
        assert_eq!(decode(&[0x0f, 0x01, 0xcb]).completion, Some(Completion::SetAc(true)));
        // A prefix counts in the length.
        assert_eq!(decode(&[0x3e, 0x9b]).len, 2);
    }

    #[test]
    fn what_the_probe_met_is_named_with_its_switch() {
        assert_eq!(name(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]), "popcnt");
        assert!(decode(&[0xf3, 0x48, 0x0f, 0xb8, 0xc7]).hint.unwrap().contains("clearcpuid=151"));
        assert_eq!(name(&[0x0f, 0xae, 0x54, 0x24, 0x04]), "ldmxcsr");
        assert_eq!(name(&[0x48, 0x0f, 0xae, 0x2f]), "xrstor");
        assert!(decode(&[0x48, 0x0f, 0xae, 0x2f]).hint.unwrap().contains("noxsave"));
        assert_eq!(name(&[0xf3, 0x48, 0x0f, 0xae, 0xd0]), "wrfsbase");
        assert_eq!(name(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), "cmpxchg16b");
        assert_eq!(name(&[0x0f, 0xc7, 0x0e]), "a 0f c7 instruction", "cmpxchg8b is not cmpxchg16b");
        assert_eq!(name(&[0x66, 0x0f, 0x38, 0x00, 0xc1]), "an SSE/MMX instruction");
        assert_eq!(name(&[0xcc]), "int3");
        for b in [&[][..], &[0x0f], &[0x90], &[0x66, 0x66]] {
            assert_eq!(decode(b).completion, None, "{b:02x?}");
        }
        assert_eq!(name(&[0x0f, 0x01, 0xcb]), "stac");
    }
}
