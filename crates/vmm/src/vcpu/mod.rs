//! One vCPU: its thread-owned state. All KVM vCPU ioctls happen on the
//! owning thread, split by exit family into the submodules.
//!
//! * `run`: the thread's run loop, exit decoding and dispatch.
//! * `debug`: `KVM_SET_GUEST_DEBUG` switches and the trap-flag drain.
//! * `events`: BREAKPOINT, SINGLESTEP, HYPERCALL and MSR events; injection.
//! * `complete`: instructions KVM's emulator lacks that the VMM completes
//!   for a Linux guest, and the names of those it cannot.
//! * `page_access`: the PF event on MMIO exits and fetch faults.
//! * `ports`: the guest ABI's port devices.
//! * `virt`: guest-virtual reads through this vCPU's page tables.
//! * `backend`: the endpoint's `VcpuBackend` (with `mtrr`'s computation).

mod backend;
mod complete;
mod debug;
mod events;
mod mtrr;
mod page_access;
mod ports;
mod regs_cache;
mod run;
mod virt;

pub(crate) use debug::Debug;
pub(crate) use page_access::PfState;
pub(crate) use regs_cache::RegsCache;

use crate::exit::{Crash, CrashEvent, Exit, Failure, FailureCause};
use crate::trap_flag;
use crate::vm::VmShared;
use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use std::sync::Arc;

/// The vCPU thread's own state.
pub(crate) struct KvmVcpu {
    pub fd: VcpuFd,
    pub index: u16,
    pub shared: Arc<VmShared>,
    pub cpuid: CpuId,
    /// What guest debugging is switched on.
    pub debug: Debug,
    /// Page-access (PF) handling state.
    pub pf: PfState,
    /// RIP of the last emulation failure re-entered, and how many times in
    /// a row (`internal_error`);
    /// cleared by any other exit.
    pub emul_retry: Option<(u64, u32)>,
    /// Exception frames pushed with KVM's single-step TF (see `trap_flag`),
    /// cleaned when stepping stops.
    pub tf_frames: Vec<trap_flag::LeakedFrame>,
    /// Silent steps taken so far while draining them (`Debug::drain`).
    pub drain_steps: u32,
    /// RSP at the last exit while KVM stepped (to notice exceptions KVM
    /// delivered by itself in between).
    pub last_step: Option<u64>,
    /// An exception injected for the next entry to deliver.
    pub pending_exception: Option<u8>,
    /// Registers and MSRs read since the last exit (`regs_cache`).
    pub regs_cache: RegsCache,
}

impl KvmVcpu {
    /// The VM ends: the introspector answered CRASH to `event` here.
    pub(crate) fn crashed(&self, event: CrashEvent) -> Exit {
        Exit::Crashed(Crash { vcpu: self.index, event })
    }

    /// The VM ends: `cause` failed on this vCPU.
    pub(crate) fn failed(&self, cause: FailureCause) -> Exit {
        Exit::Failed(Failure { vcpu: self.index, cause })
    }
}
