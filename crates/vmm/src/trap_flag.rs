//! Keeping KVM's single-step flag out of the guest.
//!
//! KVM single-steps a guest (`KVM_GUESTDBG_SINGLESTEP`) by setting TF in
//! the guest's RFLAGS and hiding it from `KVM_GET_REGS`. When an exception
//! is delivered while it steps, the CPU (or, where ring 0 is emulated, KVM's
//! emulator) pushes RFLAGS *with* TF into the exception frame. While the
//! stepping goes on this is invisible: the handler's `iretq`/`popfq` brings
//! TF back and KVM takes the #DB. But if stepping stops while such a frame
//! is still live (the tool turns it off, or disconnects, with the vCPU
//! inside the handler), the handler returns with a TF nobody owns: the
//! guest takes a #DB after every instruction, and a handler that returns
//! with the flags it was given never gets out of it.
//!
//! So the vCPU records every exception it injects that the guest enters
//! with KVM stepping: the interrupted RSP and CS, and where [`frame_for`]
//! says the CPU pushes the frame. When stepping stops with such a frame not yet returned through,
//! KVM keeps stepping, silently (`Debug::drain` in `vcpu::debug`), until the guest
//! is back at the interrupted RSP and CS ([`LeakedFrame::returned`]): its
//! TF is then in RFLAGS, where KVM hides it and clears it as stepping
//! really stops. This holds whatever the handler does with its frame (our
//! guests copy RIP and RFLAGS elsewhere and return with `popfq; ret`). A
//! guest that does not come back within [`DRAIN_LIMIT`] steps (it switched
//! tasks) gets TF cleared in each frame still intact on its stack instead
//! ([`LeakedFrame::still_live`]).
//!
//! Exceptions KVM delivers by itself while it steps (a fault of the
//! stepped instruction) are found after the fact: when RSP moved by a
//! frame or more between two steps ([`maybe_delivered`]), [`find_frame`]
//! looks above the stack pointer for a frame that holds the previous RSP,
//! selectors around it and TF in its RFLAGS. (Where ring 0 is
//! emulated, KVM steps into the handler, so the next exit is there; on
//! hardware the handler runs unstepped.)
//!
//! Limit: a guest that set TF itself under the tool's single-stepping
//! loses it in those frames (KVM already hides the guest's TF then).

/// RFLAGS.TF.
pub(crate) const TF: u64 = 1 << 8;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// At most this many frames are remembered (nested exceptions while
/// stepping are rare; the oldest go first).
pub(crate) const MAX_FRAMES: usize = 16;
/// Silent steps allowed for the guest to return through its frames once
/// stepping stopped (a few hundred microseconds each where ring 0 is
/// emulated; handlers return within tens of instructions).
pub(crate) const DRAIN_LIMIT: u32 = 20_000;

/// An exception frame pushed with KVM's TF in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeakedFrame {
    /// Guest-virtual address of the pushed RFLAGS.
    pub rflags_at: u64,
    /// The interrupted RSP, pushed 8 bytes above RFLAGS.
    pub old_rsp: u64,
    /// The interrupted CS selector, pushed 8 bytes below RFLAGS.
    pub old_cs: u64,
}

impl LeakedFrame {
    /// Guest-virtual address of the pushed CS.
    pub fn cs_at(&self) -> u64 {
        self.rflags_at.wrapping_sub(8)
    }

    /// Whether the guest is back where the exception interrupted it (the
    /// same CS, the stack popped to the interrupted RSP or above): the
    /// frame is gone, and so is its TF (back in RFLAGS, where KVM hides
    /// and clears it when stepping stops).
    pub fn returned(&self, rsp: u64, cs: u16) -> bool {
        u64::from(cs) == self.old_cs & 0xffff && rsp >= self.old_rsp
    }

    /// Whether the frame is still the one pushed (same interrupted RSP and
    /// CS, TF still set) and not yet popped (the stack pointer is at or
    /// below its RIP slot). `rsp` is the guest's RSP now.
    pub fn still_live(&self, rsp: u64, pushed_rsp: u64, pushed_cs: u64, pushed_rflags: u64) -> bool {
        pushed_rsp == self.old_rsp
            && pushed_cs & 0xffff == self.old_cs & 0xffff
            && pushed_rflags & TF != 0
            && rsp <= self.rflags_at.wrapping_sub(16)
    }
}

/// What [`frame_for`] needs to know about the vCPU at delivery time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuState {
    pub efer: u64,
    pub rsp: u64,
    pub cs_selector: u16,
    pub idt_base: u64,
    pub idt_limit: u16,
    pub tss_base: u64,
}

/// Reads guest-virtual memory for [`frame_for`].
pub(crate) trait ReadVirt {
    fn read_u64(&self, gva: u64) -> Option<u64>;
}

/// Where a 64-bit CPU pushes the frame of exception `nr` delivered now:
/// the stack is the gate's IST stack, else the TSS's RSPn on a privilege
/// change, else the current one; it is aligned down to 16 and receives
/// SS, RSP, RFLAGS, CS, RIP (and an error code). `None` outside long mode
/// or when the IDT or TSS cannot be read.
pub(crate) fn frame_for(nr: u8, cpu: &CpuState, mem: &dyn ReadVirt) -> Option<LeakedFrame> {
    if cpu.efer & EFER_LMA == 0 {
        return None;
    }
    let offset = u64::from(nr) * 16;
    if offset + 15 > u64::from(cpu.idt_limit) {
        return None;
    }
    let gate_lo = mem.read_u64(cpu.idt_base.wrapping_add(offset))?;
    let selector = (gate_lo >> 16) as u16;
    let ist = (gate_lo >> 32) & 7;
    let cpl = cpu.cs_selector & 3;
    // The handler's CPL is its code segment's DPL; the selector's RPL is
    // the same for every sane kernel, and reading the GDT is not needed.
    let new_cpl = selector & 3;
    let stack = if ist != 0 {
        mem.read_u64(cpu.tss_base.wrapping_add(0x24 + (ist - 1) * 8))?
    } else if new_cpl < cpl {
        mem.read_u64(cpu.tss_base.wrapping_add(4 + u64::from(new_cpl) * 8))?
    } else {
        cpu.rsp
    };
    let top = stack & !0xf;
    Some(LeakedFrame { rflags_at: top.wrapping_sub(24), old_rsp: cpu.rsp, old_cs: u64::from(cpu.cs_selector) })
}

/// How far above the stack pointer [`find_frame`] looks, in bytes.
pub(crate) const SEARCH_BYTES: usize = 256;

/// Whether the guest may have taken an exception between two exits where
/// KVM stepped, judged by RSP alone (one ioctl per step): the stack grew
/// by at least a frame (five quadwords) or moved as far the other way (a
/// switch to another stack, such as ring 3 to ring 0).
pub(crate) fn maybe_delivered(rsp_before: u64, rsp_now: u64) -> bool {
    rsp_before.abs_diff(rsp_now) >= 40
}

/// Looks in `stack` (quadwords read from guest-virtual `base` upwards) for
/// the frame an exception pushed over a vCPU whose RSP was `old_rsp`: RIP,
/// a code selector, RFLAGS with TF, `old_rsp`, a stack selector.
pub(crate) fn find_frame(stack: &[u64], base: u64, old_rsp: u64) -> Option<LeakedFrame> {
    let selector = |v: u64| v >> 16 == 0;
    stack.windows(5).enumerate().find_map(|(i, w)| {
        let &[_, cs, rflags, rsp, ss] = w else { return None };
        (selector(cs) && cs & !3 != 0 && selector(ss) && rsp == old_rsp && rflags & TF != 0).then(|| LeakedFrame {
            rflags_at: base.wrapping_add(8 * (i as u64 + 2)),
            old_rsp,
            old_cs: cs,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Mem(HashMap<u64, u64>);
    impl ReadVirt for Mem {
        fn read_u64(&self, gva: u64) -> Option<u64> {
            self.0.get(&gva).copied()
        }
    }

    fn gate(selector: u16, ist: u64) -> u64 {
        (u64::from(selector) << 16) | (ist << 32) | (0x8e << 40)
    }

    fn cpu(rsp: u64, cs: u16) -> CpuState {
        CpuState { efer: EFER_LMA | 0x500, rsp, cs_selector: cs, idt_base: 0x1000, idt_limit: 0xfff, tss_base: 0x2000 }
    }

    #[test]
    fn same_privilege_frames_go_below_the_aligned_stack() {
        let mem = Mem(HashMap::from([(0x1000 + 3 * 16, gate(8, 0))]));
        // The traps guest's #BP: RSP 0x80000, RFLAGS pushed at 0x7ffe8.
        let f = frame_for(3, &cpu(0x80000, 8), &mem).unwrap();
        assert_eq!(f, LeakedFrame { rflags_at: 0x7ffe8, old_rsp: 0x80000, old_cs: 8 });
        let f = frame_for(3, &cpu(0x8000f, 8), &mem).unwrap();
        assert_eq!(f.rflags_at, 0x7ffe8, "aligned down to 16 first");
        assert_eq!(f.cs_at(), 0x7ffe0, "CS, RFLAGS, RSP from there on");
    }

    #[test]
    fn privilege_changes_and_ist_take_the_tss_stacks() {
        let mem = Mem(HashMap::from([
            (0x1000 + 14 * 16, gate(8, 0)),
            (0x1000 + 8 * 16, gate(8, 2)),
            (0x2004, 0x9000),     // RSP0
            (0x2024 + 8, 0xa000), // IST2
        ]));
        let f = frame_for(14, &cpu(0x7fff_1234, 0x33), &mem).unwrap();
        assert_eq!(f.rflags_at, 0x9000 - 24, "ring 3 to ring 0 uses RSP0");
        assert_eq!(f.old_rsp, 0x7fff_1234);
        let f = frame_for(8, &cpu(0x80000, 8), &mem).unwrap();
        assert_eq!(f.rflags_at, 0xa000 - 24, "IST 2");
    }

    #[test]
    fn no_frame_outside_long_mode_or_the_idt() {
        let mem = Mem(HashMap::from([(0x1000 + 3 * 16, gate(8, 0))]));
        let mut c = cpu(0x80000, 8);
        c.efer = 0;
        assert!(frame_for(3, &c, &mem).is_none());
        let mut c = cpu(0x80000, 8);
        c.idt_limit = 3 * 16 + 14;
        assert!(frame_for(3, &c, &mem).is_none(), "the gate is past the limit");
        assert!(frame_for(4, &cpu(0x80000, 8), &mem).is_none(), "unreadable gate");
    }

    #[test]
    fn a_delivery_is_suspected_on_a_stack_switch_or_a_frame_sized_push() {
        assert!(!maybe_delivered(0x80000, 0x7fff8), "a push");
        assert!(!maybe_delivered(0x7fff8, 0x80000), "a pop");
        assert!(maybe_delivered(0x80000, 0x7ffd0), "five quadwords and more");
        assert!(maybe_delivered(0x7fff_1000, 0x8ff0), "to a ring-0 stack below");
        assert!(maybe_delivered(0x1000, 0xffff_8000_0000_1000), "to a ring-0 stack above");
    }

    #[test]
    fn a_pushed_frame_is_found_by_its_interrupted_rsp_and_cs() {
        // The traps guest's #BP handler one instruction in: error code 0,
        // then RIP, CS, RFLAGS with TF, RSP, SS.
        let stack = [0x3, 0, 0x100030, 8, 0x146, 0x80000, 0x10, 0];
        let f = find_frame(&stack, 0x7ffc8, 0x80000).unwrap();
        assert_eq!(f, LeakedFrame { rflags_at: 0x7ffe8, old_rsp: 0x80000, old_cs: 8 });
        assert!(find_frame(&stack, 0x7ffc8, 0x7f000).is_none(), "another RSP");
        let no_tf = [0x3, 0, 0x100030, 8, 0x46, 0x80000, 0x10, 0];
        assert!(find_frame(&no_tf, 0x7ffc8, 0x80000).is_none(), "nothing leaked");
        let not_selectors = [0x3, 0, 0x100030, 0x1_0008, 0x146, 0x80000, 0x10, 0];
        assert!(find_frame(&not_selectors, 0x7ffc8, 0x80000).is_none(), "CS is no selector");
        let null_cs = [0x3, 0, 0x100030, 0, 0x146, 0x80000, 0x10, 0];
        assert!(find_frame(&null_cs, 0x7ffc8, 0x80000).is_none(), "a null CS");
        assert!(find_frame(&stack[..4], 0x7ffc8, 0x80000).is_none(), "too short");
        let user = [0x7fff_0000_1234, 0x33, 0x346, 0x7fff_1000, 0x2b];
        let f = find_frame(&user, 0x8fd8, 0x7fff_1000).unwrap();
        assert_eq!(f, LeakedFrame { rflags_at: 0x8fe8, old_rsp: 0x7fff_1000, old_cs: 0x33 }, "from ring 3");
    }

    #[test]
    fn a_frame_is_returned_through_once_back_at_the_interrupted_stack() {
        let f = LeakedFrame { rflags_at: 0x7ffe8, old_rsp: 0x80000, old_cs: 8 };
        assert!(!f.returned(0x7ffa8, 8), "inside the handler");
        assert!(!f.returned(0x7fff8, 8), "after popfq, before ret");
        assert!(f.returned(0x80000, 8));
        assert!(f.returned(0x80010, 8), "and popped further");
        let user = LeakedFrame { rflags_at: 0x9000 - 24, old_rsp: 0x7fff_1000, old_cs: 0x33 };
        assert!(!user.returned(0x8f00, 8), "in the kernel");
        assert!(!user.returned(0x7fff_2000, 8), "a ring-0 stack above the user one is not a return");
        assert!(user.returned(0x7fff_1000, 0x33));
    }

    #[test]
    fn a_frame_is_live_until_popped_and_only_while_unchanged() {
        let f = LeakedFrame { rflags_at: 0x7ffe8, old_rsp: 0x80000, old_cs: 8 };
        assert!(f.still_live(0x7ffa8, 0x80000, 8, 0x146), "inside the handler");
        assert!(f.still_live(0x7ffd8, 0x80000, 8, 0x146), "RSP at the RIP slot: about to return");
        assert!(!f.still_live(0x80000, 0x80000, 8, 0x146), "returned");
        assert!(!f.still_live(0x7ffa8, 0x80000, 8, 0x46), "no TF in it");
        assert!(!f.still_live(0x7ffa8, 0x7f000, 8, 0x146), "another frame");
        assert!(!f.still_live(0x7ffa8, 0x80000, 0x10, 0x146), "another frame");
    }
}
