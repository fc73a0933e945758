//! The demo guest OS's process table, read and checked from guest memory.
//!
//! The table sits at a fixed guest physical address (`ukvmi_guest_abi::demo`
//! declares its layout). Everything is read from guest memory; a table that
//! does not look right is an error, never a panic.

use super::{PhysRead, ReadError};
use crate::json::Obj;

use ukvmi_guest_abi::demo as abi;

/// Guest physical address of the process table.
pub const PROC_TABLE: u64 = abi::PROC_TABLE;
/// The table's magic: "UKOSPROC" as little-endian bytes.
pub const PROC_MAGIC: u64 = abi::PROC_MAGIC;
/// Size of the table header.
pub const HEADER_SIZE: usize = abi::PROC_HEADER_SIZE;
/// Size of one entry.
pub const ENTRY_SIZE: usize = abi::PROC_ENTRY_SIZE;
/// Most entries the table may have.
pub const MAX_PROCS: usize = abi::MAX_PROCS;
/// Most vCPUs whose current pid the header records.
pub const MAX_CPUS: usize = abi::CURRENT_PID_SLOTS;

/// A process's state as the kernel records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProcState {
    /// Runnable, waiting for its vCPU.
    Ready,
    /// Running on its vCPU now.
    Running,
    /// Sleeping until `wake_tick`.
    Sleeping,
    /// Exited with `exit_code`.
    Exited,
    /// A value the tools do not know.
    Other(u32),
}

impl ProcState {
    fn from_raw(v: u32) -> ProcState {
        match v {
            abi::PS_READY => ProcState::Ready,
            abi::PS_RUNNING => ProcState::Running,
            abi::PS_SLEEPING => ProcState::Sleeping,
            abi::PS_EXITED => ProcState::Exited,
            v => ProcState::Other(v),
        }
    }

    /// A short lowercase name.
    pub fn name(self) -> String {
        match self {
            ProcState::Ready => "ready".into(),
            ProcState::Running => "running".into(),
            ProcState::Sleeping => "sleeping".into(),
            ProcState::Exited => "exited".into(),
            ProcState::Other(v) => format!("state{v}"),
        }
    }
}

/// One entry of the process table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Its slot in the table.
    pub slot: usize,
    /// Process id.
    pub pid: u32,
    /// State.
    pub state: ProcState,
    /// The vCPU it is pinned to.
    pub cpu: u32,
    /// Exit code (when exited).
    pub exit_code: u32,
    /// Its page-table root.
    pub cr3: u64,
    /// Syscalls it has made.
    pub syscalls: u64,
    /// Name.
    pub name: String,
    /// Tick it sleeps until.
    pub wake_tick: u64,
    /// User RIP at its last kernel entry.
    pub user_rip: u64,
}

impl Process {
    /// The process as a JSON object.
    pub fn to_json(&self) -> String {
        Obj::new()
            .num("pid", u64::from(self.pid))
            .str("name", &self.name)
            .str("state", &self.state.name())
            .num("cpu", u64::from(self.cpu))
            .hex("cr3", self.cr3)
            .num("syscalls", self.syscalls)
            .hex("user_rip", self.user_rip)
            .num("exit_code", u64::from(self.exit_code))
            .build()
    }
}

/// The whole table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessTable {
    /// vCPUs the kernel runs on.
    pub ncpus: u32,
    /// Pid running on each vCPU (0: none).
    pub current: Vec<u32>,
    /// Milliseconds since boot, roughly.
    pub ticks: u64,
    /// Used entries, in table order.
    pub procs: Vec<Process>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes)
}

/// Errors reading the table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OsError {
    /// Memory could not be read.
    #[error("reading the process table at {gpa:#x}: {source}")]
    Read {
        /// Where.
        gpa: u64,
        /// Why.
        #[source]
        source: ReadError,
    },
    /// No table there: not the demo OS, or not booted yet.
    #[error("no demo-OS process table at {PROC_TABLE:#x} (magic {found:#x}, want {PROC_MAGIC:#x}): is the guest `--guest demo`, and has it booted?")]
    NoTable {
        /// The magic found.
        found: u64,
    },
    /// The header holds values the tools cannot use.
    #[error("the process table header is inconsistent: {0}")]
    BadHeader(String),
}

impl ProcessTable {
    /// Reads and checks the table.
    pub fn read(mem: &dyn PhysRead) -> Result<ProcessTable, OsError> {
        let mut buf = vec![0u8; HEADER_SIZE + MAX_PROCS * ENTRY_SIZE];
        mem.read_phys(PROC_TABLE, &mut buf).map_err(|source| OsError::Read { gpa: PROC_TABLE, source })?;
        Self::parse(&buf)
    }

    /// Parses the table from its bytes (header plus entries).
    pub fn parse(buf: &[u8]) -> Result<ProcessTable, OsError> {
        let magic = u64_at(buf, abi::PH_MAGIC);
        if magic != PROC_MAGIC {
            return Err(OsError::NoTable { found: magic });
        }
        let version = u32_at(buf, abi::PH_VERSION);
        let max = u32_at(buf, abi::PH_MAX_PROCS) as usize;
        let esize = u32_at(buf, abi::PH_ENTRY_SIZE) as usize;
        let ncpus = u32_at(buf, abi::PH_NCPUS);
        if version != abi::PROC_VERSION {
            return Err(OsError::BadHeader(format!("version {version}, the tools know {}", abi::PROC_VERSION)));
        }
        if max == 0 || max > MAX_PROCS || esize != ENTRY_SIZE {
            return Err(OsError::BadHeader(format!("{max} entries of {esize} bytes")));
        }
        if ncpus == 0 || ncpus as usize > MAX_CPUS {
            return Err(OsError::BadHeader(format!("{ncpus} vCPUs")));
        }
        let current = (0..ncpus as usize).map(|i| u32_at(buf, abi::PH_CURRENT_PID + 4 * i)).collect();
        let ticks = u64_at(buf, abi::PH_TICKS);
        let mut procs = Vec::new();
        for i in 0..max {
            let e = buf.get(HEADER_SIZE + i * ENTRY_SIZE..HEADER_SIZE + (i + 1) * ENTRY_SIZE).unwrap_or(&[]);
            let pid = u32_at(e, abi::PE_PID);
            if pid == 0 {
                continue;
            }
            let name_bytes = e.get(abi::PE_NAME..abi::PE_NAME + abi::NAME_LEN).unwrap_or(&[]);
            let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
            let name = name_bytes
                .get(..end)
                .unwrap_or(&[])
                .iter()
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
                .collect();
            procs.push(Process {
                slot: i,
                pid,
                state: ProcState::from_raw(u32_at(e, abi::PE_STATE)),
                cpu: u32_at(e, abi::PE_CPU),
                exit_code: u32_at(e, abi::PE_EXIT_CODE),
                cr3: u64_at(e, abi::PE_CR3),
                syscalls: u64_at(e, abi::PE_SYSCALLS),
                name,
                wake_tick: u64_at(e, abi::PE_WAKE_TICK),
                user_rip: u64_at(e, abi::PE_USER_RIP),
            });
        }
        Ok(ProcessTable { ncpus, current, ticks, procs })
    }

    /// The process with this pid.
    pub fn by_pid(&self, pid: u32) -> Option<&Process> {
        self.procs.iter().find(|p| p.pid == pid)
    }

    /// The process running on `vcpu`, if any.
    pub fn current_on(&self, vcpu: u16) -> Option<&Process> {
        let pid = *self.current.get(usize::from(vcpu))?;
        self.by_pid(pid)
    }
}

/// Reads the pid running on `vcpu` (one small read of the header).
pub fn current_pid(mem: &dyn PhysRead, vcpu: u16) -> Option<u32> {
    if usize::from(vcpu) >= MAX_CPUS {
        return None;
    }
    let mut b = [0u8; abi::PH_TICKS];
    mem.read_phys(PROC_TABLE, &mut b).ok()?;
    if u64_at(&b, abi::PH_MAGIC) != PROC_MAGIC {
        return None;
    }
    Some(u32_at(&b, abi::PH_CURRENT_PID + 4 * usize::from(vcpu))).filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE + MAX_PROCS * ENTRY_SIZE];
        b[0..8].copy_from_slice(&PROC_MAGIC.to_le_bytes());
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        b[12..16].copy_from_slice(&8u32.to_le_bytes());
        b[16..20].copy_from_slice(&64u32.to_le_bytes());
        b[20..24].copy_from_slice(&2u32.to_le_bytes());
        b[24..28].copy_from_slice(&2u32.to_le_bytes());
        b[56..64].copy_from_slice(&1234u64.to_le_bytes());
        let e = HEADER_SIZE + 64;
        b[e..e + 4].copy_from_slice(&2u32.to_le_bytes());
        b[e + 4..e + 8].copy_from_slice(&2u32.to_le_bytes());
        b[e + 16..e + 24].copy_from_slice(&0x5000u64.to_le_bytes());
        b[e + 24..e + 32].copy_from_slice(&9u64.to_le_bytes());
        b[e + 32..e + 37].copy_from_slice(b"shell");
        b[e + 37] = 0;
        b
    }

    #[test]
    fn parses_a_table() {
        let t = ProcessTable::parse(&table()).unwrap();
        assert_eq!(t.ncpus, 2);
        assert_eq!(t.current, vec![2, 0]);
        assert_eq!(t.ticks, 1234);
        assert_eq!(t.procs.len(), 1);
        let p = &t.procs[0];
        assert_eq!(
            (p.slot, p.pid, p.name.as_str(), p.state, p.cr3, p.syscalls),
            (1, 2, "shell", ProcState::Running, 0x5000, 9)
        );
        assert_eq!(t.current_on(0).map(|p| p.pid), Some(2));
        assert!(t.current_on(1).is_none());
        assert!(p.to_json().contains(r#""name":"shell""#));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(ProcessTable::parse(&[0u8; 10]), Err(OsError::NoTable { found: 0 })));
        let mut b = table();
        b[8] = 2;
        assert!(matches!(ProcessTable::parse(&b), Err(OsError::BadHeader(_))), "version 2");
        let mut b = table();
        b[16] = 65;
        assert!(matches!(ProcessTable::parse(&b), Err(OsError::BadHeader(_))));
        let mut b = table();
        b[20] = 200;
        assert!(matches!(ProcessTable::parse(&b), Err(OsError::BadHeader(_))));
        let mut b = table();
        b.truncate(70); // entries cut short: read as free slots, no panic
        assert!(ProcessTable::parse(&b).unwrap().procs.is_empty());
    }
}
