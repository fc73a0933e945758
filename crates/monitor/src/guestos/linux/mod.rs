//! The Linux guest OS as a [`GuestOs`]: tasks, the current task of each
//! vCPU and syscall names, from the kernel's own BTF and symbols.
//!
//! Struct offsets come from the kernel's BTF ([`LinuxOffsets`], read once);
//! addresses from its symbols (`init_task`, `__per_cpu_offset`,
//! `current_task`). No external profile. Everything read from the guest is
//! an unlocked snapshot that may lie: every walk is bounded, every read
//! checked (see `tasks.rs`).

mod btf;
mod kva;
mod syscalls;
mod tasks;
#[cfg(test)]
mod tests;

use ukvmi_introspector::wire::KvmRegs;

pub use btf::{BtfError, LinuxOffsets, ThreadLinks, MAX_BTF};
pub use kva::{kva_to_pa, KERNEL_IMAGE_END, PAGE_OFFSET, START_KERNEL_MAP};
pub use tasks::{Task, TaskList, MAX_TASKS, PF_KTHREAD};

use super::{AgentReply, GuestMemory, GuestOs, Syscall};
use crate::{record::Who, symbols::SymbolMap};

/// Why a kernel gave no Linux guest OS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinuxError {
    /// The kernel file could not be read as an ELF.
    #[error("the kernel file: {0}")]
    Image(#[from] ukvmi_kimage::Error),
    /// The kernel has no BTF to read offsets from.
    #[error("the kernel file has no .BTF section (build it with CONFIG_DEBUG_INFO_BTF)")]
    NoBtf,
    /// The BTF gave no offsets.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// A symbol the OS needs is missing.
    #[error("the kernel's symbols have no `{0}`")]
    NoSymbol(&'static str),
    /// The task list could not be read at all.
    #[error("the task list: {0}")]
    Tasks(String),
}

/// The kernel addresses the Linux guest OS reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxSymbols {
    /// `init_task`: the idle task of CPU 0 and the task list's head.
    pub init_task: u64,
    /// `__per_cpu_offset`: each CPU's per-cpu base (absent without SMP).
    pub per_cpu_offset: Option<u64>,
    /// `current_task`'s per-cpu offset (the BTF's, when it has it, wins).
    pub current_task: Option<u64>,
    /// `_end`: where the kernel image ends (its static map stops there).
    pub image_end: Option<u64>,
}

impl LinuxSymbols {
    /// The addresses from a symbol map (System.map or the ELF's `.symtab`).
    pub fn from_map(map: &SymbolMap) -> Result<LinuxSymbols, LinuxError> {
        Ok(LinuxSymbols {
            init_task: map.addr("init_task").ok_or(LinuxError::NoSymbol("init_task"))?,
            per_cpu_offset: map.addr("__per_cpu_offset"),
            current_task: map.addr("current_task"),
            image_end: map.addr("_end"),
        })
    }
}

/// The Linux guest OS.
#[derive(Debug, Clone)]
pub struct LinuxOs {
    offsets: LinuxOffsets,
    syms: LinuxSymbols,
}

impl LinuxOs {
    /// A Linux OS with these offsets and addresses.
    pub fn new(offsets: LinuxOffsets, syms: LinuxSymbols) -> LinuxOs {
        LinuxOs { offsets, syms }
    }

    /// Reads a vmlinux ELF: offsets from its `.BTF`, addresses from `map`
    /// (give [`symbol_map_of`]'s result for the ELF's own symbols).
    pub fn from_kernel(elf: &[u8], map: &SymbolMap) -> Result<LinuxOs, LinuxError> {
        let elf = ukvmi_kimage::Elf::parse(elf)?;
        let blob = elf.section_data(".BTF").ok_or(LinuxError::NoBtf)?;
        Ok(LinuxOs::new(LinuxOffsets::from_btf(blob)?, LinuxSymbols::from_map(map)?))
    }

    /// The offsets in use.
    pub fn offsets(&self) -> &LinuxOffsets {
        &self.offsets
    }

    /// The addresses in use.
    pub fn symbols(&self) -> &LinuxSymbols {
        &self.syms
    }

    /// One line saying what this OS reads, for logs.
    pub fn describe(&self) -> String {
        let o = &self.offsets;
        let threads = match o.threads {
            ThreadLinks::Signal { signal, thread_head, thread_node } => {
                format!("threads by signal {signal:#x} -> thread_head {thread_head:#x}, thread_node {thread_node:#x}")
            }
            ThreadLinks::Group { thread_group } => format!("threads by thread_group {thread_group:#x}"),
            ThreadLinks::LeadersOnly => {
                "no thread links in the BTF (signal_struct.thread_head, task_struct.thread_group): leaders only".into()
            }
        };
        format!(
            "Linux (BTF: {} types; task_struct {} bytes: tasks {:#x}, pid {:#x}, comm {:#x}, {threads}; current_task per-cpu {})",
            o.types,
            o.task_size,
            o.tasks,
            o.pid,
            o.comm,
            self.current_offset().map_or_else(|| "unknown".to_string(), |c| format!("{c:#x}"))
        )
    }

    fn current_offset(&self) -> Option<u64> {
        self.offsets.current_task.or(self.syms.current_task)
    }

    /// The address of the task running on `vcpu` (its CPU's `current_task`).
    pub fn current_task(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<u64> {
        let off = self.current_offset()?;
        let base = match self.syms.per_cpu_offset {
            Some(table) => kva::read_u64(mem, table.checked_add(u64::from(vcpu).checked_mul(8)?)?)?,
            None if vcpu == 0 => 0,
            None => return None,
        };
        let task = kva::read_u64(mem, base.checked_add(off)?)?;
        (task != 0).then_some(task)
    }

    /// Every task (kernel threads included; each thread-group leader
    /// followed by its other threads, unless the BTF gave no thread links),
    /// with the task each of the first `vcpus` vCPUs runs marked.
    pub fn tasks(&self, mem: &dyn GuestMemory, vcpus: u16) -> Result<TaskList, LinuxError> {
        let mut list = tasks::walk(mem, &self.offsets, self.syms.init_task).map_err(LinuxError::Tasks)?;
        for v in 0..vcpus {
            if let Some(cur) = self.current_task(mem, v) {
                if let Some(t) = list.tasks.iter_mut().find(|t| t.addr == cur) {
                    t.on_cpu = Some(v);
                }
            }
        }
        Ok(list)
    }

    /// The current task of `vcpu`, read whole.
    fn current(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<Task> {
        tasks::read_task(mem, &self.offsets, self.current_task(mem, vcpu)?)
    }
}

/// A symbol map of a vmlinux ELF's `.symtab` (as System.map would have it),
/// or of its kallsyms tables when `.symtab` was stripped (a distribution
/// kernel unpacked from its bzImage).
pub fn symbol_map_of(elf: &[u8]) -> Result<SymbolMap, LinuxError> {
    let elf = ukvmi_kimage::Elf::parse(elf)?;
    let syms = match elf.symbols() {
        Err(ukvmi_kimage::Error::NoSection { .. }) => elf.kallsyms()?,
        other => other?,
    };
    Ok(SymbolMap::from_symbols(syms.into_iter().filter(|s| s.kind != 'U').map(|s| (s.addr, s.name))))
}

impl GuestOs for LinuxOs {
    fn current_process(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<u32> {
        let task = self.current_task(mem, vcpu)?;
        kva::read_u32(mem, task.checked_add(self.offsets.pid)?)
    }

    fn process_name(&self, mem: &dyn GuestMemory, pid: u32) -> Option<String> {
        let list = tasks::walk(mem, &self.offsets, self.syms.init_task).ok()?;
        list.tasks.into_iter().find(|t| t.pid == pid).map(|t| t.name)
    }

    fn decode_syscall(&self, _mem: &dyn GuestMemory, _vcpu: u16, r: &KvmRegs) -> Syscall {
        let name = syscalls::name(r.rax);
        let args = [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9];
        let a: Vec<String> = args.iter().map(|a| format!("{a:#x}")).collect();
        Syscall { nr: r.rax, name, call: format!("{name}({})", a.join(", ")) }
    }

    fn agent_message(&self, _mem: &dyn GuestMemory, _regs: &KvmRegs) -> String {
        String::new()
    }

    fn agent_reply(&self, _regs: &KvmRegs, _agent_buf: u64, _text: &str) -> Option<AgentReply> {
        None
    }

    fn who(&self, mem: &dyn GuestMemory, vcpu: u16) -> Who {
        let cur = self.current(mem, vcpu);
        Who { vcpu, pid: cur.as_ref().map(|t| t.pid), process: cur.map(|t| t.name) }
    }

    fn os_name(&self) -> &'static str {
        "linux"
    }

    fn syscall_entry_symbol(&self) -> &'static str {
        "entry_SYSCALL_64"
    }

    fn task_list(&self, mem: &dyn GuestMemory, vcpus: u16) -> Option<Result<TaskList, LinuxError>> {
        Some(self.tasks(mem, vcpus))
    }

    fn static_gpa(&self, gva: u64) -> Option<u64> {
        let end = self.syms.image_end.unwrap_or(KERNEL_IMAGE_END).min(KERNEL_IMAGE_END);
        (START_KERNEL_MAP..end).contains(&gva).then(|| gva - START_KERNEL_MAP)
    }

    fn describe_current(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<String> {
        self.current(mem, vcpu).map(|t| format!("pid {} ({})", t.pid, t.name))
    }
}
