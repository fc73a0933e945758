//! The demo guest OS ("ukos") as a [`GuestOs`]: process attribution, syscall decoding, the agent call.
//!
//! The pid on each vCPU comes from the process table's header, names from
//! the whole table (cached, and read again on a pid the cache does not
//! know). Syscalls follow the demo kernel's convention (RAX = number, then
//! RDI, RSI, RDX, R10); the agent call passes R8 = `agent_buf`, R9 = length
//! (`ukvmi_guest_abi::demo::AGENT_BUF_SIZE`).

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use ukvmi_guest_abi::demo::AGENT_BUF_SIZE;
use ukvmi_introspector::wire::KvmRegs;

use super::{table, AgentReply, GuestMemory, GuestOs, PhysRead, ReadError, Syscall};
use crate::record::msr_name;

/// The demo guest OS. Keeps a cache of process names by pid.
#[derive(Debug, Default)]
pub struct DemoOs {
    names: Mutex<HashMap<u32, String>>,
}

impl DemoOs {
    /// A demo OS with an empty name cache.
    #[must_use]
    pub fn new() -> DemoOs {
        DemoOs::default()
    }
}

/// `&dyn GuestMemory` as `&dyn PhysRead` (without trait upcasting, which
/// the workspace's minimum Rust does not have).
struct Phys<'a>(&'a dyn GuestMemory);

impl PhysRead for Phys<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.0.read_phys(gpa, buf)
    }
}

/// Reads up to 64 bytes of a user string through `vcpu`'s page tables (not
/// past the page it starts on); a longer one ends in `…`.
fn user_string(mem: &dyn GuestMemory, vcpu: u16, gva: u64, len: u64) -> Option<String> {
    let gpa = mem.translate(vcpu, gva)?;
    let room = 0x1000 - (gpa & 0xfff);
    let n = usize::try_from(len.min(64).min(room)).ok()?;
    let mut buf = vec![0u8; n];
    mem.read_phys(gpa, &mut buf).ok()?;
    let mut s = String::from_utf8_lossy(&buf).into_owned();
    if len > n as u64 {
        s.push('…');
    }
    Some(s)
}

impl GuestOs for DemoOs {
    fn current_process(&self, mem: &dyn GuestMemory, vcpu: u16) -> Option<u32> {
        table::current_pid(&Phys(mem), vcpu)
    }

    fn process_name(&self, mem: &dyn GuestMemory, pid: u32) -> Option<String> {
        if let Some(n) = self.names.lock().unwrap_or_else(PoisonError::into_inner).get(&pid) {
            return Some(n.clone());
        }
        // A miss: read the table without the cache locked (a round trip).
        let t = table::ProcessTable::read(&Phys(mem)).ok()?;
        let names: HashMap<u32, String> = t.procs.into_iter().map(|p| (p.pid, p.name)).collect();
        let name = names.get(&pid).cloned();
        *self.names.lock().unwrap_or_else(PoisonError::into_inner) = names;
        name
    }

    fn decode_syscall(&self, mem: &dyn GuestMemory, vcpu: u16, r: &KvmRegs) -> Syscall {
        let nr = r.rax;
        let (name, nargs) = sys::describe(nr);
        let args = [r.rdi, r.rsi, r.rdx, r.r10];
        let call = match nr {
            sys::WRITE => match user_string(mem, vcpu, r.rsi, r.rdx) {
                Some(s) => format!("write({}, {s:?}, {})", r.rdi, r.rdx),
                None => format!("write({}, {:#x}, {})", r.rdi, r.rsi, r.rdx),
            },
            sys::DEBUG_WRMSR => {
                let msr = u32::try_from(r.rdi)
                    .ok()
                    .and_then(msr_name)
                    .map_or_else(|| format!("{:#x}", r.rdi), str::to_string);
                format!("debug_wrmsr({msr}, {:#x})", r.rsi)
            }
            sys::AGENT => match user_string(mem, vcpu, r.rdi, r.rsi) {
                Some(s) => format!("agent({s:?}, {})", r.rsi),
                None => format!("agent({:#x}, {})", r.rdi, r.rsi),
            },
            sys::SLEEP | sys::EXIT => format!("{name}({})", r.rdi),
            _ => {
                let a: Vec<String> = args.iter().take(nargs).map(|a| format!("{a:#x}")).collect();
                format!("{name}({})", a.join(", "))
            }
        };
        Syscall { nr, name, call }
    }

    fn agent_message(&self, mem: &dyn GuestMemory, regs: &KvmRegs) -> String {
        let len = usize::try_from(regs.r9).unwrap_or(0).min(AGENT_BUF_SIZE);
        let mut buf = vec![0u8; len];
        if len == 0 || mem.read_phys(regs.r8, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn agent_reply(&self, regs: &KvmRegs, agent_buf: u64, text: &str) -> Option<AgentReply> {
        let bytes = text.as_bytes().get(..text.len().min(AGENT_BUF_SIZE)).unwrap_or_default();
        if bytes.is_empty() || regs.r8 != agent_buf {
            return None;
        }
        let mut regs = *regs;
        regs.rax = bytes.len() as u64;
        Some(AgentReply { gpa: agent_buf, bytes: bytes.to_vec(), regs })
    }
}

/// Syscall numbers of the demo OS (from `ukvmi_guest_abi::demo`).
pub mod sys {
    use ukvmi_guest_abi::demo as abi;

    /// write(fd, buf, len)
    pub const WRITE: u64 = abi::SYS_WRITE;
    /// yield()
    pub const YIELD: u64 = abi::SYS_YIELD;
    /// sleep(ms)
    pub const SLEEP: u64 = abi::SYS_SLEEP;
    /// getpid()
    pub const GETPID: u64 = abi::SYS_GETPID;
    /// exit(code)
    pub const EXIT: u64 = abi::SYS_EXIT;
    /// debug_wrmsr(msr, value): the "leftover debug syscall" the rootkit abuses.
    pub const DEBUG_WRMSR: u64 = abi::SYS_DEBUG_WRMSR;
    /// debug_poke(kaddr, value): writes a u64 anywhere in the kernel.
    pub const DEBUG_POKE: u64 = abi::SYS_DEBUG_POKE;
    /// agent(msg, len, reply, cap): asks the introspector through the doorbell.
    pub const AGENT: u64 = abi::SYS_AGENT;

    /// The syscall's name and how many arguments it takes.
    pub fn describe(nr: u64) -> (&'static str, usize) {
        match nr {
            WRITE => ("write", 3),
            YIELD => ("yield", 0),
            SLEEP => ("sleep", 1),
            GETPID => ("getpid", 0),
            EXIT => ("exit", 1),
            DEBUG_WRMSR => ("debug_wrmsr", 2),
            DEBUG_POKE => ("debug_poke", 2),
            AGENT => ("agent", 4),
            _ => ("unknown", 4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestos::{HEADER_SIZE, PROC_MAGIC, PROC_TABLE};
    use ukvmi_guest_abi::demo as abi;

    /// Guest memory in a buffer from gpa 0; GVA == GPA below its end.
    struct Mem(Vec<u8>);

    impl PhysRead for Mem {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
            let at = usize::try_from(gpa).unwrap();
            let src = self.0.get(at..at + buf.len()).ok_or(ReadError::OutOfRange { gpa, len: buf.len() })?;
            buf.copy_from_slice(src);
            Ok(())
        }
    }

    impl GuestMemory for Mem {
        fn translate(&self, _vcpu: u16, gva: u64) -> Option<u64> {
            (gva < self.0.len() as u64).then_some(gva)
        }
    }

    fn put(m: &mut Mem, at: u64, bytes: &[u8]) {
        let at = at as usize;
        m.0[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A table with "shell" (pid 2) running on vCPU 1.
    fn memory() -> Mem {
        let mut m = Mem(vec![0; 0x40_0000]);
        let t = PROC_TABLE;
        put(&mut m, t, &PROC_MAGIC.to_le_bytes());
        put(&mut m, t + abi::PH_VERSION as u64, &abi::PROC_VERSION.to_le_bytes());
        put(&mut m, t + abi::PH_MAX_PROCS as u64, &(abi::MAX_PROCS as u32).to_le_bytes());
        put(&mut m, t + abi::PH_ENTRY_SIZE as u64, &(abi::PROC_ENTRY_SIZE as u32).to_le_bytes());
        put(&mut m, t + abi::PH_NCPUS as u64, &2u32.to_le_bytes());
        put(&mut m, t + abi::PH_CURRENT_PID as u64 + 4, &2u32.to_le_bytes());
        let e = t + HEADER_SIZE as u64;
        put(&mut m, e + abi::PE_PID as u64, &2u32.to_le_bytes());
        put(&mut m, e + abi::PE_NAME as u64, b"shell");
        m
    }

    #[test]
    fn who_names_the_process_on_the_vcpu_and_rereads_the_table_on_a_new_pid() {
        let mut m = memory();
        let os = DemoOs::new();
        let who = os.who(&m, 1);
        assert_eq!((who.vcpu, who.pid, who.process.as_deref()), (1, Some(2), Some("shell")));
        assert_eq!(os.who(&m, 0).pid, None, "vCPU 0 idles");
        // A new process in the slot: its pid is new, so the table is read again.
        let e = PROC_TABLE + HEADER_SIZE as u64;
        put(&mut m, e + abi::PE_PID as u64, &7u32.to_le_bytes());
        put(&mut m, e + abi::PE_NAME as u64, b"later");
        put(&mut m, PROC_TABLE + abi::PH_CURRENT_PID as u64 + 4, &7u32.to_le_bytes());
        assert_eq!(os.who(&m, 1).process.as_deref(), Some("later"));
        // No table: nobody.
        let os = DemoOs::new();
        assert_eq!(os.who(&Mem(vec![0; 0x1000]), 0).pid, None);
    }

    #[test]
    fn syscalls_are_decoded_with_their_strings() {
        let mut m = memory();
        put(&mut m, 0x1000, b"hi there");
        let os = DemoOs::new();
        let regs = KvmRegs { rax: sys::WRITE, rdi: 1, rsi: 0x1000, rdx: 8, ..KvmRegs::default() };
        let s = os.decode_syscall(&m, 0, &regs);
        assert_eq!((s.nr, s.name, s.call.as_str()), (1, "write", r#"write(1, "hi there", 8)"#));
        // Unmapped buffer: the address instead.
        let regs = KvmRegs { rsi: 0x1_0000_0000, ..regs };
        assert_eq!(os.decode_syscall(&m, 0, &regs).call, "write(1, 0x100000000, 8)");
        let regs = KvmRegs { rax: sys::DEBUG_WRMSR, rdi: 0xc000_0082, rsi: 0x41, ..KvmRegs::default() };
        assert_eq!(os.decode_syscall(&m, 0, &regs).call, "debug_wrmsr(LSTAR, 0x41)");
        let regs = KvmRegs { rax: 999, rdi: 1, rsi: 2, rdx: 3, r10: 4, ..KvmRegs::default() };
        let s = os.decode_syscall(&m, 0, &regs);
        assert_eq!((s.name, s.call.as_str()), ("unknown", "unknown(0x1, 0x2, 0x3, 0x4)"));
    }

    #[test]
    fn the_agent_is_answered_only_at_its_buffer_and_within_its_size() {
        let mut m = memory();
        put(&mut m, 0x2000, b"ping");
        let os = DemoOs::new();
        let regs = KvmRegs { r8: 0x2000, r9: 4, rax: 77, ..KvmRegs::default() };
        assert_eq!(os.agent_message(&m, &regs), "ping");
        assert_eq!(os.agent_message(&m, &KvmRegs { r9: 0, ..regs }), "");
        let r = os.agent_reply(&regs, 0x2000, "pong").unwrap();
        assert_eq!((r.gpa, r.bytes.as_slice(), r.regs.rax, r.regs.r8), (0x2000, &b"pong"[..], 4, 0x2000));
        assert!(os.agent_reply(&regs, 0x3000, "pong").is_none(), "R8 names another buffer");
        assert!(os.agent_reply(&regs, 0x2000, "").is_none());
        let long = "x".repeat(AGENT_BUF_SIZE + 10);
        assert_eq!(os.agent_reply(&regs, 0x2000, &long).unwrap().bytes.len(), AGENT_BUF_SIZE);
    }
}
