//! Guest debugging of one vCPU: the `KVM_SET_GUEST_DEBUG` switches, and
//! keeping KVM's single-step trap flag out of the guest's exception frames
//! (the drain after stepping stops, see `trap_flag`).

use super::KvmVcpu;
use crate::trap_flag;
use std::sync::atomic::Ordering;

/// Guest-debug switches of one vCPU, combined into one `KVM_SET_GUEST_DEBUG`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Debug {
    /// The tool's single-stepping (`KVMI_VCPU_CONTROL_SINGLESTEP`).
    pub singlestep: bool,
    /// `int3` exits (`KVM_GUESTDBG_USE_SW_BP`) for BREAKPOINT events.
    pub sw_bp: bool,
    /// One internal step (the VMM stepping over something by itself).
    pub step_over: bool,
    /// Silent steps after stepping stopped, until the guest has returned
    /// through every exception frame that holds KVM's TF (`trap_flag`).
    pub drain: bool,
}

impl Debug {
    fn control(self) -> u32 {
        use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_SW_BP};
        let mut c = 0;
        if self.singlestep || self.step_over || self.drain {
            c |= KVM_GUESTDBG_SINGLESTEP;
        }
        if self.sw_bp {
            c |= KVM_GUESTDBG_USE_SW_BP;
        }
        if c != 0 {
            c |= KVM_GUESTDBG_ENABLE;
        }
        c
    }
}

impl KvmVcpu {
    /// `KVM_SET_REGS`, then guest debugging again: hardware KVM forgets its
    /// single-step flag when RIP changes under it (`singlestep_rip`).
    pub(super) fn put_regs(&mut self, regs: &kvm_bindings::kvm_regs) -> std::result::Result<(), kvm_ioctls::Error> {
        self.write_regs(regs)?;
        if self.stepping() {
            self.sync_debug()?;
        }
        Ok(())
    }

    /// Applies [`KvmVcpu::debug`] with `KVM_SET_GUEST_DEBUG`.
    pub(crate) fn sync_debug(&mut self) -> std::result::Result<(), kvm_ioctls::Error> {
        if !self.debug.singlestep && !self.debug.step_over && !self.debug.drain && !self.tf_frames.is_empty() {
            // Stepping stops: not while a frame with KVM's TF is still to
            // be returned through.
            self.forget_returned_frames();
            self.debug.drain = !self.tf_frames.is_empty();
            self.drain_steps = 0;
        }
        if !self.stepping() {
            self.last_step = None;
        }
        let dbg = kvm_bindings::kvm_guest_debug { control: self.debug.control(), ..Default::default() };
        self.before_vcpu_write()?;
        self.fd.set_guest_debug(&dbg)?;
        if let Some(me) = self.shared.vcpu(self.index) {
            me.debug_control.store(dbg.control, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Whether KVM is single-stepping the guest (the tool's or our own).
    pub(super) fn stepping(&self) -> bool {
        self.debug.singlestep || self.debug.step_over || self.debug.drain
    }

    /// Drops the recorded frames the guest has returned through.
    pub(super) fn forget_returned_frames(&mut self) {
        let (Ok(regs), Ok(sregs)) = (self.get_regs(), self.get_sregs()) else { return };
        self.tf_frames.retain(|f| !f.returned(regs.rsp, sregs.cs.selector));
    }

    /// One silent step while draining: once every frame is returned
    /// through, stepping really stops (and KVM takes its TF back, which
    /// the guest's return restored). A guest that does not return within
    /// `DRAIN_LIMIT` steps (it switched tasks) gets TF cleared in the
    /// frames instead, where they are still intact.
    pub(super) fn drain_step(&mut self) -> std::result::Result<(), kvm_ioctls::Error> {
        self.forget_returned_frames();
        self.drain_steps = self.drain_steps.saturating_add(1);
        if !self.tf_frames.is_empty() && self.drain_steps < trap_flag::DRAIN_LIMIT {
            return Ok(());
        }
        if !self.tf_frames.is_empty() {
            self.clear_leaked_tf();
        }
        self.debug.drain = false;
        self.sync_debug()
    }

    /// After an exit while KVM steps: if the guest looks like it took an
    /// exception since the last one (one KVM delivered by itself, such as
    /// a fault of the stepped instruction), finds its frame on the stack
    /// and remembers it, as for the exceptions the VMM injects.
    pub(super) fn watch_for_delivery(&mut self) {
        let Ok(regs) = self.get_regs() else { return };
        let Some(before) = self.last_step.replace(regs.rsp) else { return };
        if !trap_flag::maybe_delivered(before, regs.rsp) {
            return;
        }
        let mut stack = [0u64; trap_flag::SEARCH_BYTES / 8];
        let n = self.read_virt_qwords(regs.rsp, &mut stack);
        if let Some(f) = trap_flag::find_frame(stack.get(..n).unwrap_or_default(), regs.rsp, before) {
            self.remember_frame(f);
        }
    }

    pub(super) fn remember_frame(&mut self, f: trap_flag::LeakedFrame) {
        if self.tf_frames.contains(&f) {
            return;
        }
        if self.tf_frames.len() >= trap_flag::MAX_FRAMES {
            self.tf_frames.remove(0);
        }
        self.tf_frames.push(f);
    }

    /// Remembers where exception `nr`, about to be delivered while KVM
    /// steps, will push RFLAGS with TF in it.
    pub(super) fn note_leaked_frame(&mut self, nr: u8) {
        let (Ok(regs), Ok(sregs)) = (self.get_regs(), self.get_sregs()) else { return };
        let cpu = trap_flag::CpuState {
            efer: sregs.efer,
            rsp: regs.rsp,
            cs_selector: sregs.cs.selector,
            idt_base: sregs.idt.base,
            idt_limit: sregs.idt.limit,
            tss_base: sregs.tr.base,
        };
        if let Some(f) = trap_flag::frame_for(nr, &cpu, self) {
            // (The frame's place only matters if the guest never returns.)
            self.remember_frame(f);
        }
    }

    /// Clears TF in every recorded frame that is still intact on the
    /// guest's stack, so it does not come back as the guest's own (an
    /// endless #DB in the guest). Only right for a handler that returns
    /// through its frame as the CPU pushed it.
    pub(super) fn clear_leaked_tf(&mut self) {
        let frames = std::mem::take(&mut self.tf_frames);
        let Ok(regs) = self.get_regs() else { return };
        for f in frames {
            // CS, RFLAGS, RSP: three quadwords in a row.
            let mut slots = [0u64; 3];
            if self.read_virt_qwords(f.cs_at(), &mut slots) < 3 {
                continue;
            }
            let [cs, rflags, rsp] = slots;
            if f.still_live(regs.rsp, rsp, cs, rflags) {
                if let Some(gpa) = self.translate(f.rflags_at) {
                    let _ = self.shared.ram.write_u64(gpa, rflags & !trap_flag::TF);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_SW_BP};

    #[test]
    fn nothing_switched_on_is_no_guest_debug() {
        assert_eq!(Debug::default().control(), 0);
    }

    #[test]
    fn every_kind_of_stepping_single_steps() {
        let step = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        assert_eq!(Debug { singlestep: true, ..Debug::default() }.control(), step);
        assert_eq!(Debug { step_over: true, ..Debug::default() }.control(), step);
        assert_eq!(Debug { drain: true, ..Debug::default() }.control(), step);
    }

    #[test]
    fn int3_exits_combine_with_stepping() {
        let bp = Debug { sw_bp: true, ..Debug::default() };
        assert_eq!(bp.control(), KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP);
        let both = Debug { sw_bp: true, singlestep: true, ..Debug::default() };
        assert_eq!(both.control(), KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP | KVM_GUESTDBG_SINGLESTEP);
    }
}
