//! The kernel's task list, walked from `init_task` with every step bounded.
//!
//! `init_task.tasks` heads a circular list through every thread-group
//! leader (kernel threads included). The walk reads an unlocked snapshot
//! that the guest may change or forge: it stops on the way back to the
//! head, on an address it has seen, on a read that fails, or after
//! [`MAX_TASKS`] tasks, and says why when it stopped early.

use std::collections::HashSet;

use super::kva::{read_kva, read_u32, read_u64};
use super::LinuxOffsets;
use crate::guestos::GuestMemory;

/// Most tasks a walk reads.
pub const MAX_TASKS: usize = 32_768;
/// `PF_KTHREAD`: the task is a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// One task as the kernel records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// The `task_struct`'s kernel address.
    pub addr: u64,
    /// Its pid (thread id).
    pub pid: u32,
    /// Its thread group id (the process id).
    pub tgid: u32,
    /// Its name (`comm`, NUL-trimmed, lossy UTF-8).
    pub name: String,
    /// Its state letter as `ps` prints it (R, S, D, T, t, X, Z, P, I).
    pub state: char,
    /// Whether it is a kernel thread (`PF_KTHREAD`).
    pub kthread: bool,
    /// Its parent's pid, when the parent could be read.
    pub ppid: Option<u32>,
    /// The vCPU it runs on now, if it is some vCPU's current task.
    pub on_cpu: Option<u16>,
}

/// The tasks, and why the walk stopped early if it did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskList {
    /// Every task read, `init_task` (pid 0, the idle task) first.
    pub tasks: Vec<Task>,
    /// Why the list may be incomplete (`None`: the walk came back to its head).
    pub incomplete: Option<String>,
}

/// The `ps` letter of a `__state` value (`TASK_REPORT` order, as
/// `task_state_index` reads it; 0 is running).
fn state_letter(state: u64) -> char {
    const LETTERS: [(u64, char); 7] =
        [(0x0001, 'S'), (0x0002, 'D'), (0x0004, 'T'), (0x0008, 't'), (0x0010, 'X'), (0x0020, 'Z'), (0x0040, 'P')];
    if state == 0 {
        return 'R';
    }
    // TASK_IDLE = TASK_UNINTERRUPTIBLE | TASK_NOLOAD.
    if state & 0x0402 == 0x0402 {
        return 'I';
    }
    LETTERS.iter().find(|(bit, _)| state & bit != 0).map_or('?', |&(_, c)| c)
}

/// Reads the task at `addr`; `None` when a field cannot be read.
pub(super) fn read_task(mem: &dyn GuestMemory, o: &LinuxOffsets, addr: u64) -> Option<Task> {
    let at = |off: u64| addr.checked_add(off);
    let pid = read_u32(mem, at(o.pid)?)?;
    let tgid = read_u32(mem, at(o.tgid)?)?;
    let mut comm = vec![0u8; usize::try_from(o.comm_len).ok()?];
    read_kva(mem, at(o.comm)?, &mut comm)?;
    let end = comm.iter().position(|&c| c == 0).unwrap_or(comm.len());
    let name = String::from_utf8_lossy(comm.get(..end)?).into_owned();
    let state = if o.state_size == 8 { read_u64(mem, at(o.state)?)? } else { u64::from(read_u32(mem, at(o.state)?)?) };
    let flags = read_u32(mem, at(o.flags)?)?;
    let parent = read_u64(mem, at(o.real_parent)?)?;
    let ppid = parent.checked_add(o.pid).and_then(|p| read_u32(mem, p));
    Some(Task {
        addr,
        pid,
        tgid,
        name,
        state: state_letter(state),
        kthread: flags & PF_KTHREAD != 0,
        ppid,
        on_cpu: None,
    })
}

/// Walks the task list from `init_task` (at kernel address `init_task`).
pub(super) fn walk(mem: &dyn GuestMemory, o: &LinuxOffsets, init_task: u64) -> Result<TaskList, String> {
    let first = read_task(mem, o, init_task).ok_or_else(|| format!("init_task at {init_task:#x} cannot be read"))?;
    let head = init_task.checked_add(o.tasks).ok_or("init_task's address overflows")?;
    let mut list = TaskList { tasks: vec![first], incomplete: None };
    let mut seen = HashSet::from([head]);
    let mut node = head;
    loop {
        let Some(next) = node.checked_add(o.list_next).and_then(|a| read_u64(mem, a)) else {
            list.incomplete = Some(format!("the list link at {node:#x} cannot be read"));
            break;
        };
        if next == head {
            break;
        }
        if !seen.insert(next) {
            list.incomplete = Some(format!("the list loops back to {next:#x} without reaching init_task"));
            break;
        }
        if list.tasks.len() >= MAX_TASKS {
            list.incomplete = Some(format!("more than {MAX_TASKS} tasks: the walk stopped there"));
            break;
        }
        let Some(task) = next.checked_sub(o.tasks).and_then(|t| read_task(mem, o, t)) else {
            list.incomplete =
                Some(format!("the task at list node {next:#x} cannot be read (the list changed while read?)"));
            break;
        };
        list.tasks.push(task);
        node = next;
    }
    Ok(list)
}
