//! What the monitor must know of the guest's operating system, as a trait.
//!
//! The monitor's policies see guest memory and registers; which process a
//! vCPU runs, what its name is, what a syscall means and where an agent
//! message lies depend on the guest OS. [`GuestOs`] answers those
//! questions; [`DemoOs`] is the demo guest OS's ("ukos", `crates/guests`)
//! answer. A second guest OS is a second implementation, handed to
//! [`Monitor::start_with`](crate::Monitor::start_with).
//!
//! [`LinuxOs`] is Linux's, from the kernel's own BTF and symbols
//! ([`linux`]).
//!
//! The demo OS's process table ([`ProcessTable`]) and syscall numbers
//! ([`sys`]) are public for the tools that show them.

use std::fmt;

use ukvmi_introspector::wire::KvmRegs;

use crate::record::Who;

mod demo;
pub mod linux;
mod table;

pub use demo::{sys, DemoOs};
pub use linux::LinuxOs;
pub use table::{
    current_pid, OsError, ProcState, Process, ProcessTable, ENTRY_SIZE, HEADER_SIZE, MAX_CPUS, MAX_PROCS, PROC_MAGIC,
    PROC_TABLE,
};

/// Guest memory could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The KVMI command (or the mapped view) refused.
    #[error(transparent)]
    Kvmi(#[from] ukvmi_introspector::Error),
    /// The range lies outside the memory (a buffer in tests, an overflow).
    #[error("{len} bytes at {gpa:#x} lie outside guest memory")]
    OutOfRange {
        /// Where the read started.
        gpa: u64,
        /// How many bytes it wanted.
        len: usize,
    },
}

/// Reads guest physical memory (the KVMI client, the monitor, which
/// prefers its mapped view, or a buffer in tests).
pub trait PhysRead {
    /// Fills `buf` from `gpa`.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError>;
}

/// Guest memory as a guest OS reads it: physical reads and the vCPUs'
/// address translation.
pub trait GuestMemory: PhysRead {
    /// The gpa `gva` maps to in `vcpu`'s address space, if it is mapped.
    fn translate(&self, vcpu: u16, gva: u64) -> Option<u64>;
}

impl PhysRead for ukvmi_introspector::Vm {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa.checked_add(done as u64).ok_or(ReadError::OutOfRange { gpa, len: buf.len() })?;
            let room = (0x1000 - (at & 0xfff)) as usize;
            let n = room.min(buf.len() - done);
            let chunk = buf.get_mut(done..done + n).ok_or(ReadError::OutOfRange { gpa, len: done + n })?;
            self.read_physical_into(at, chunk)?;
            done += n;
        }
        Ok(())
    }
}

impl GuestMemory for ukvmi_introspector::Vm {
    fn translate(&self, vcpu: u16, gva: u64) -> Option<u64> {
        self.translate_gva(vcpu, gva).ok().flatten().map(u64::from)
    }
}

/// A syscall as the guest OS decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syscall {
    /// Its number.
    pub nr: u64,
    /// Its name (`unknown` if the OS does not know it).
    pub name: &'static str,
    /// `name(args…)` with strings decoded where known.
    pub call: String,
}

/// How to answer an agent call: write `bytes` at `gpa`, then set the vCPU's
/// registers to `regs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReply {
    /// Where the answer goes.
    pub gpa: u64,
    /// The answer.
    pub bytes: Vec<u8>,
    /// The registers the vCPU returns with (the answer's length in RAX, say).
    pub regs: KvmRegs,
}

/// The guest operating system, as the monitor's policies need it. Every
/// method reads guest memory through `mem` and must not panic on what it
/// finds there; implementations must not hold their own locks across those
/// reads (each can be a KVMI round trip).
pub trait GuestOs: Send + Sync + fmt::Debug {
    /// The pid of the process running on `vcpu`, if one is.
    fn current_process(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<u32>;

    /// The name of process `pid`, if the OS has one for it.
    fn process_name(&self, mem: &dyn GuestMemory, pid: u32) -> Option<String>;

    /// Decodes the syscall a vCPU makes at the kernel's syscall entry, with
    /// its registers `regs` there.
    fn decode_syscall(&self, mem: &dyn GuestMemory, vcpu: u16, regs: &KvmRegs) -> Syscall;

    /// The message a hypercall carries (empty when none).
    fn agent_message(&self, mem: &dyn GuestMemory, regs: &KvmRegs) -> String;

    /// How to answer an agent hypercall made with `regs` with `text`, given
    /// the agent buffer `agent_buf` the tool named; `None` when this call
    /// takes no answer there (a guest with other conventions is never
    /// written to).
    fn agent_reply(&self, regs: &KvmRegs, agent_buf: u64, text: &str) -> Option<AgentReply>;

    /// A short name of the OS (`demo`, `linux`).
    fn os_name(&self) -> &'static str {
        "demo"
    }

    /// The symbol of the kernel's syscall entry: LSTAR's honest value.
    fn syscall_entry_symbol(&self) -> &'static str {
        "syscall_entry"
    }

    /// Every task of the guest, the current one of each of the first
    /// `vcpus` vCPUs marked; `None` when this OS has no such list (the demo
    /// OS's process table is read by its own tools).
    fn task_list(&self, _mem: &dyn GuestMemory, _vcpus: u16) -> Option<Result<linux::TaskList, linux::LinuxError>> {
        None
    }

    /// The gpa of kernel address `gva` that holds whatever the page tables
    /// say (or before there are any: a guard armed before the kernel turned
    /// paging on), when the OS knows one: Linux's image at
    /// `__START_KERNEL_map` (kernels without KASLR, or booted `nokaslr`).
    fn static_gpa(&self, _gva: u64) -> Option<u64> {
        None
    }

    /// What runs on `vcpu`, in a few words (`pid 3`, `pid 1 (init)`).
    fn describe_current(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<String> {
        self.current_process(mem, vcpu).map(|p| format!("pid {p}"))
    }

    /// Who is on `vcpu`: the vCPU, and the process and its name when known.
    fn who(&self, mem: &dyn GuestMemory, vcpu: u16) -> Who {
        let pid = self.current_process(mem, vcpu);
        let process = pid.and_then(|p| self.process_name(mem, p));
        Who { vcpu, pid, process }
    }
}
