//! Breakpoints (and the syscall tracer built on one): planting `int3`, reporting hits, stepping over them.
//!
//! A breakpoint is an `int3` byte over the first byte of an instruction. A
//! hit is stepped over without losing the breakpoint: the original byte goes
//! back, the vCPU single-steps that one instruction (RETRY), and on the
//! SINGLESTEP event the `int3` is planted again. While the byte is out,
//! another vCPU that reaches the address runs the real instruction (and is
//! not reported): a hit can be missed, never broken.
//!
//! Locking: the state lock is held across the one-byte code writes (so a
//! release that restores the original byte and a step-over that plants the
//! `int3` again cannot interleave), never across address translation,
//! event enabling, guest-OS reads or single-step control.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard, PoisonError},
};

use ukvmi_introspector::wire::event;
use ukvmi_introspector::{EventReply, VcpuEventMsg};

use crate::{
    engine::Inner,
    error::{cmd, MonitorError, Result},
    events::EventRefs,
    record::Record,
    subs::SubId,
};

/// The `int3` opcode.
const INT3: u8 = 0xcc;

#[derive(Debug)]
struct Bp {
    orig: u8,
    syscall: bool,
    planted: bool,
    owners: Vec<SubId>,
}

#[derive(Debug, Default)]
struct State {
    bps: BTreeMap<u64, Bp>,
    /// vCPU → breakpoint gpa it is stepping over.
    stepping: HashMap<u16, u64>,
}

/// The breakpoint policy.
#[derive(Debug, Default)]
pub(crate) struct Breakpoints {
    state: Mutex<State>,
}

impl Breakpoints {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A breakpoint at `gva` (vCPU 0's address space) for `owner`; hits are
    /// reported as syscalls when `syscall`. Returns its gpa.
    pub(crate) fn add(
        &self,
        inner: &Inner,
        refs: &mut EventRefs,
        owner: SubId,
        gva: u64,
        syscall: bool,
    ) -> Result<u64> {
        let vm = &inner.vm;
        // The OS's fixed map of its image first (a breakpoint armed before
        // the kernel turned paging on), else vCPU 0's page tables.
        let gpa = match inner.os.static_gpa(gva) {
            Some(gpa) => gpa,
            None => cmd(|| format!("translating {gva:#x}"), vm.translate_gva(0, gva))?
                .map(u64::from)
                .ok_or_else(|| MonitorError::Invalid(format!("{gva:#x} is not mapped in vCPU 0's address space")))?,
        };
        if let Some(bp) = self.lock().bps.get_mut(&gpa) {
            bp.owners.push(owner);
            bp.syscall |= syscall;
            return Ok(gpa);
        }
        // New breakpoints are only made under the setup lock, so nobody
        // else plants one at `gpa` meanwhile.
        refs.enable(vm, inner.vcpus, event::BREAKPOINT)?;
        let mut orig = [0u8];
        if let Err(e) = cmd(|| format!("reading the byte at {gpa:#x}"), vm.read_physical_into(gpa, &mut orig)) {
            refs.disable(vm, inner.vcpus, event::BREAKPOINT);
            return Err(e);
        }
        if orig[0] == INT3 {
            refs.disable(vm, inner.vcpus, event::BREAKPOINT);
            return Err(MonitorError::Invalid(format!("there is already an int3 at gpa {gpa:#x}")));
        }
        let mut st = self.lock();
        if let Err(e) = cmd(|| format!("planting int3 at {gpa:#x}"), inner.write_code(gpa, INT3)) {
            drop(st);
            refs.disable(vm, inner.vcpus, event::BREAKPOINT);
            return Err(e);
        }
        st.bps.insert(gpa, Bp { orig: orig[0], syscall, planted: true, owners: vec![owner] });
        Ok(gpa)
    }

    /// Drops the owners `gone` says are gone; a breakpoint nobody owns any
    /// more gets its original byte back.
    pub(crate) fn release(&self, inner: &Inner, refs: &mut EventRefs, gone: &dyn Fn(SubId) -> bool) {
        let mut dead = 0;
        {
            let mut st = self.lock();
            st.bps.retain(|&gpa, bp| {
                bp.owners.retain(|&o| !gone(o));
                if !bp.owners.is_empty() {
                    return true;
                }
                if bp.planted {
                    let _ = inner.write_code(gpa, bp.orig);
                }
                dead += 1;
                false
            });
        }
        for _ in 0..dead {
            refs.disable(&inner.vm, inner.vcpus, event::BREAKPOINT);
        }
    }

    /// The gpas of the breakpoints in `range` (planted, or out while a vCPU
    /// steps over one).
    pub(crate) fn gpas_in(&self, range: std::ops::Range<u64>) -> Vec<u64> {
        self.lock().bps.range(range).map(|(&gpa, _)| gpa).collect()
    }

    /// Ends every step-over in progress (at shutdown).
    pub(crate) fn stop_stepping(&self, inner: &Inner) {
        let stepping = std::mem::take(&mut self.lock().stepping);
        for v in stepping.into_keys() {
            let _ = inner.vm.control_singlestep(v, false);
        }
    }

    /// A BREAKPOINT event at `gpa`: reports the hit and steps over it.
    /// `None` when the breakpoint is not (or no longer) ours.
    pub(crate) fn on_hit(&self, inner: &Inner, ev: &VcpuEventMsg, gpa: u64) -> Option<EventReply> {
        let v = ev.vcpu.raw();
        let syscall = self.lock().bps.get(&gpa)?.syscall;
        let who = inner.os.who(inner, v);
        let rec = if syscall {
            let s = inner.os.decode_syscall(inner, v, &ev.regs);
            Record::Syscall { who, nr: s.nr, name: s.name, call: s.call }
        } else {
            Record::Breakpoint { who, gpa, rip: ev.regs.rip }
        };
        inner.subs.emit(&rec);
        // Take the int3 out and claim the step-over in one go, so that
        // another vCPU's step-over does not plant it again under us.
        let stepping = {
            let mut st = self.lock();
            match st.bps.get_mut(&gpa) {
                Some(bp) if bp.planted && inner.write_code(gpa, bp.orig).is_ok() => {
                    bp.planted = false;
                    st.stepping.insert(v, gpa);
                    true
                }
                _ => false,
            }
        };
        if stepping && inner.vm.control_singlestep(v, true).is_err() {
            // No stepping: the original byte stays in place (RETRY runs the
            // real instruction) and the breakpoint is lost rather than
            // looping on a live int3.
            self.lock().stepping.remove(&v);
        }
        Some(EventReply::Retry)
    }

    /// A SINGLESTEP event: the step over a breakpoint is done; plant it
    /// again unless another vCPU is still stepping over it.
    pub(crate) fn on_singlestep(&self, inner: &Inner, vcpu: u16) -> EventReply {
        let was_stepping = {
            let mut st = self.lock();
            match st.stepping.remove(&vcpu) {
                Some(gpa) => {
                    let others = st.stepping.values().any(|&g| g == gpa);
                    if let Some(bp) = st.bps.get_mut(&gpa) {
                        if !bp.planted && !others && inner.write_code(gpa, INT3).is_ok() {
                            bp.planted = true;
                        }
                    }
                    true
                }
                None => false,
            }
        };
        if was_stepping {
            let _ = inner.vm.control_singlestep(vcpu, false);
        }
        EventReply::Continue
    }
}
