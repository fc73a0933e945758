//! The vCPU side of page restrictions: the PF event on the MMIO exits and
//! fetch faults that the memslot layout of `crate::page_access` causes,
//! and the one-instruction step over a fetch fault.

use super::run::Step;
use super::KvmVcpu;
use crate::exit::{CrashEvent, Exit, Failure, FailureCause, PfAccess};
use crate::page_access::ExecToken;
use std::sync::Arc;
use ukvmi_endpoint::{EventPayload, VcpuPort};
use ukvmi_wire::{access, Action};

/// This vCPU's part of page-access handling (the PF event).
#[derive(Default)]
pub(crate) struct PfState {
    /// An MMIO read that KVM still waits for: (gpa, length).
    pub(super) read_pending: Option<(u64, usize)>,
    /// SET_REGISTERS was applied during the current event (PF, HYPERCALL;
    /// cleared before each).
    pub(super) regs_set: bool,
    /// An exit that came out of `KVM_RUN` while completing a pending read
    /// early (in `set_regs`); handled before the next guest entry.
    pub(super) deferred: Option<Step>,
    /// Pages mapped back for the current step over a fetch fault.
    pub(super) exec: Vec<ExecToken>,
    /// The memslot layout's generation during the last `KVM_RUN`.
    pub(super) generation: u64,
}

impl KvmVcpu {
    /// `KVM_EXIT_MMIO` read. Outside RAM: all ones. A page whose reads are
    /// allowed (or a page between two memslot updates): its RAM. A page
    /// whose reads are removed: the PF event first. CONTINUE supplies the
    /// RAM's current value; RETRY supplies it if the tool has allowed reads
    /// meanwhile, else the event comes again (re-executing would fault
    /// again). SET_REGISTERS during the event completes the read first (see
    /// `set_regs`); the tool's registers then replace the result.
    pub(super) fn mmio_read(&mut self, port: &VcpuPort, gpa: u64, len: usize) -> Option<Exit> {
        self.pf.read_pending = Some((gpa, len));
        let shared = Arc::clone(&self.shared);
        if let Some(pa) = &shared.page_access {
            while pa.allowed(gpa) & access::R == 0 {
                self.pf.regs_set = false;
                let outcome = port.raise(self, EventPayload::Pf { gva: u64::MAX, gpa, access: access::R });
                if self.pf.read_pending.is_none() {
                    break; // completed by set_regs
                }
                match outcome.map(|o| o.action) {
                    None | Some(Action::Continue) => break,
                    Some(Action::Crash) => return Some(self.pf_crash(gpa, PfAccess::Read)),
                    Some(_) => {} // RETRY: check again
                }
            }
        }
        if let Some((gpa, len)) = self.pf.read_pending.take() {
            self.supply_read(gpa, len);
        }
        None
    }

    /// `KVM_EXIT_MMIO` write: the instruction has retired (RIP is past it),
    /// only its memory effect is held. Outside RAM: ignored. A page whose
    /// writes are allowed: written. Writes removed: the PF event first
    /// (`gva` unknown, all ones). CONTINUE writes. RETRY cannot re-execute
    /// a retired instruction, so: if the tool sent SET_REGISTERS during the
    /// event it has redirected the vCPU and the write is dropped (RIP was
    /// already past the store, so writing the registers back unchanged
    /// "skips" it); else if the page now allows writes, the write is done
    /// (what re-executing would do); else the event comes again.
    pub(super) fn mmio_write(&mut self, port: &VcpuPort, gpa: u64, data: &[u8; 8], len: usize) -> Option<Exit> {
        let bytes = data.get(..len).unwrap_or(data);
        let shared = Arc::clone(&self.shared);
        if let Some(pa) = &shared.page_access {
            while pa.allowed(gpa) & access::W == 0 {
                self.pf.regs_set = false;
                match port.raise(self, EventPayload::Pf { gva: u64::MAX, gpa, access: access::W }).map(|o| o.action) {
                    None | Some(Action::Continue) => break,
                    Some(Action::Crash) => return Some(self.pf_crash(gpa, PfAccess::Write)),
                    Some(_) if self.pf.regs_set => return None, // RETRY after SET_REGISTERS: dropped
                    Some(_) => {}                               // RETRY: check again
                }
            }
        }
        // Outside RAM (real MMIO) the write goes nowhere.
        let _ = shared.ram.write(gpa, bytes);
        None
    }

    /// After a triple fault: a page this vCPU's CPU reads by itself (its
    /// page or descriptor tables) that has no memslot because of a
    /// restriction (the likely cause: tables the guest took into use after
    /// the restriction was checked, see `page_access`).
    pub(super) fn unmapped_table(&self) -> Option<u64> {
        let (Some(pa), Ok(sregs)) = (&self.shared.page_access, self.get_sregs()) else { return None };
        pa.unmapped_table(&*self.shared, crate::page_tables::CpuTables::from_sregs(&sregs))
    }

    /// An emulation failure: ours if the instruction at RIP (which may
    /// cross into the next page) touches a RAM page that has no memslot, or
    /// had none when the vCPU ran (the layout changed since: `fetch` then
    /// simply re-enters).
    pub(super) fn fetch_fault(&self, rip: u64) -> Option<Step> {
        let pa = self.shared.page_access.as_ref()?;
        // An instruction is at most 15 bytes long.
        let next_page = (rip | 0xfff).wrapping_add(1);
        let pages = [Some(rip), (rip.wrapping_add(14) >= next_page).then_some(next_page)];
        let entered = self.pf.generation;
        let fd = &self.fd;
        // Translate with no memslot update in flight: a page-table walk
        // through a hole would fail.
        let gpa = pa.stable(|state| {
            // The layout changed since the vCPU ran: the fault may be from
            // the old one; `fetch` looks again and re-enters if need be.
            let stale = pa.generation() != entered;
            pages.into_iter().flatten().find_map(|gva| {
                let t = fd.translate_gva(gva).ok().filter(|t| t.valid != 0)?;
                state(t.physical_address).filter(|s| !s.mapped || stale).map(|_| t.physical_address)
            })
        })?;
        Some(Step::Fetch { gva: rip, gpa })
    }

    /// A fetch from a page without a memslot. Fetches removed: the PF event
    /// (gva = RIP). CONTINUE (or no event) maps the page back, lets exactly
    /// one instruction run (guest single-step), then restores the
    /// protection (`step_over_done`). RETRY re-enters: unless the tool
    /// relaxed the page or moved RIP, the fetch faults again and so the
    /// event comes again. A page that only lost reads executes the same way
    /// without an event; a page that has its slot again (an update just
    /// finished) simply runs.
    pub(super) fn fetch(&mut self, port: &VcpuPort, gva: u64, gpa: u64) -> Option<Exit> {
        let shared = Arc::clone(&self.shared);
        let pa = shared.page_access.as_ref()?;
        let state = pa.state(gpa)?;
        if state.mapped {
            return None;
        }
        if state.allowed & access::X == 0 {
            match port.raise(self, EventPayload::Pf { gva, gpa, access: access::X }).map(|o| o.action) {
                None | Some(Action::Continue) => {}
                Some(Action::Crash) => return Some(self.pf_crash(gpa, PfAccess::Fetch)),
                Some(_) => return None, // RETRY
            }
            // The tool made the page executable and readable meanwhile:
            // it has a slot of its own now. (Merely mapped is not enough:
            // another vCPU may be stepping over it for a moment.)
            if pa.state(gpa).is_none_or(|s| s.allowed & (access::R | access::X) == access::R | access::X) {
                return None;
            }
        }
        match pa.begin_exec(&*shared, gpa) {
            Ok(token) => self.pf.exec.push(token),
            Err(source) => return Some(self.failed(FailureCause::MapBack { gpa, source })),
        }
        self.debug.step_over = true;
        if let Err(e) = self.sync_debug() {
            return Some(self.failed(FailureCause::GuestDebug(e)));
        }
        None
    }

    /// The instruction stepped over a fetch fault has run: stop stepping
    /// and unmap the page(s) again.
    pub(super) fn step_over_done(&mut self) -> Option<Exit> {
        self.debug.step_over = false;
        let synced = self.sync_debug();
        let shared = Arc::clone(&self.shared);
        if let Some(pa) = &shared.page_access {
            for token in self.pf.exec.drain(..) {
                if let Err(e) = pa.end_exec(&*shared, token) {
                    let cause = FailureCause::RestoreRestriction(e);
                    return Some(Exit::Failed(Failure { vcpu: self.index, cause }));
                }
            }
        }
        synced.err().map(|e| self.failed(FailureCause::GuestDebug(e)))
    }

    pub(super) fn pf_crash(&self, gpa: u64, access: PfAccess) -> Exit {
        self.crashed(CrashEvent::Pf { access, gpa })
    }

    /// Gives KVM the data of the pending MMIO read: RAM, or all ones
    /// outside RAM.
    pub(super) fn supply_read(&mut self, gpa: u64, len: usize) {
        let mut buf = [0xffu8; 8];
        let n = len.min(8);
        if let Some(b) = buf.get_mut(..n) {
            if self.shared.ram.read(gpa, b).is_err() {
                b.fill(0xff);
            }
        }
        // The last exit was KVM_EXIT_MMIO (a read is pending), so `mmio` is
        // the active member of the exit union until the next KVM_RUN.
        self.fd.get_kvm_run().__bindgen_anon_1.mmio.data = buf;
    }
}
