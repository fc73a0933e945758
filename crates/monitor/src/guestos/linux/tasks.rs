//! The kernel's tasks, walked from `init_task` with every step bounded.
//!
//! `init_task.tasks` heads a circular list through every thread-group
//! leader (kernel threads included); each leader's other threads hang off
//! it on a list of their own ([`ThreadLinks`]: `signal->thread_head`, or
//! `thread_group` on older kernels). The walk reads an unlocked snapshot
//! that the guest may change or forge. The leader list is walked first: it
//! stops on the way back to the head, on an address it has seen, on a read
//! that fails, or after [`MAX_TASKS`] tasks. Then each leader's threads:
//! that walk stops, for this group only, on the way back to its head, on a
//! link it has seen, on one into the leader list, on a task already listed
//! or of another thread group, on a read that fails; and for good when
//! [`MAX_TASKS`] tasks (leaders and threads) are listed. Whatever stopped a
//! walk early is said.

use std::collections::HashSet;

use super::kva::{read_kva, read_u32, read_u64};
use super::{LinuxOffsets, ThreadLinks};
use crate::guestos::GuestMemory;

/// Most tasks a walk reads (leaders and threads).
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

impl Task {
    /// Whether it is a thread other than its group's leader (its pid is
    /// not its thread group's id).
    pub fn is_thread(&self) -> bool {
        self.pid != self.tgid
    }
}

/// The tasks, and why the walk stopped early if it did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskList {
    /// Every task read, `init_task` (pid 0, the idle task) first, each
    /// thread-group leader followed by its other threads.
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

/// Walks the task list from `init_task` (at kernel address `init_task`):
/// every leader, each followed by its other threads.
pub(super) fn walk(mem: &dyn GuestMemory, o: &LinuxOffsets, init_task: u64) -> Result<TaskList, String> {
    let mut why = Reasons::default();
    let (leaders, mut full) = walk_leaders(mem, o, init_task, &mut why)?;
    let mut group = Groups {
        leader_nodes: leaders.iter().filter_map(|t| t.addr.checked_add(o.tasks)).collect(),
        listed: leaders.iter().map(|t| t.addr).collect(),
        room: MAX_TASKS.saturating_sub(leaders.len()),
    };
    let mut tasks = Vec::with_capacity(leaders.len());
    for leader in leaders {
        let (threads, stop) = if full { (Vec::new(), None) } else { group.threads_of(mem, o, &leader) };
        tasks.push(leader);
        tasks.extend(threads);
        if let Some(stop) = stop {
            full = matches!(stop, Stop::Full);
            why.add(stop.to_string());
        }
    }
    Ok(TaskList { tasks, incomplete: why.say() })
}

/// The leaders, from `init_task.tasks`, and whether [`MAX_TASKS`] of them
/// stopped the walk; a reason in `why` when the list stopped early.
fn walk_leaders(
    mem: &dyn GuestMemory,
    o: &LinuxOffsets,
    init_task: u64,
    why: &mut Reasons,
) -> Result<(Vec<Task>, bool), String> {
    let first = read_task(mem, o, init_task).ok_or_else(|| format!("init_task at {init_task:#x} cannot be read"))?;
    let head = init_task.checked_add(o.tasks).ok_or("init_task's address overflows")?;
    let mut tasks = vec![first];
    let mut seen = HashSet::from([head]);
    let mut node = head;
    loop {
        let Some(next) = node.checked_add(o.list_next).and_then(|a| read_u64(mem, a)) else {
            why.add(format!("the list link at {node:#x} cannot be read"));
            break;
        };
        if next == head {
            break;
        }
        if !seen.insert(next) {
            why.add(format!("the list loops back to {next:#x} without reaching init_task"));
            break;
        }
        if tasks.len() >= MAX_TASKS {
            why.add(Stop::Full.to_string());
            return Ok((tasks, true));
        }
        let Some(task) = next.checked_sub(o.tasks).and_then(|t| read_task(mem, o, t)) else {
            why.add(format!("the task at list node {next:#x} cannot be read (the list changed while read?)"));
            break;
        };
        tasks.push(task);
        node = next;
    }
    Ok((tasks, false))
}

/// Why a walk stopped early, the first said in full.
#[derive(Default)]
struct Reasons {
    first: Option<String>,
    more: usize,
}

impl Reasons {
    fn add(&mut self, why: String) {
        match &self.first {
            None => self.first = Some(why),
            Some(first) if *first == why => {}
            Some(_) => self.more += 1,
        }
    }

    fn say(self) -> Option<String> {
        let more = self.more;
        self.first.map(|w| if more == 0 { w } else { format!("{w} (and {more} more thread lists stopped early)") })
    }
}

/// Why one leader's thread walk stopped early.
enum Stop {
    /// [`MAX_TASKS`] tasks are listed: no more threads are read.
    Full,
    /// This group's list lies or changed; other groups are still read.
    Group(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Full => write!(f, "more than {MAX_TASKS} tasks: the walk stopped there"),
            Stop::Group(why) => f.write_str(why),
        }
    }
}

/// A list of threads: its head, and where the link lies in each
/// `task_struct` on it.
#[derive(Clone, Copy)]
struct Ring {
    head: u64,
    link: u64,
}

/// What the thread walks share.
struct Groups {
    /// The leader list's links.
    leader_nodes: HashSet<u64>,
    /// Every task listed so far.
    listed: HashSet<u64>,
    /// How many more tasks may be listed.
    room: usize,
}

impl Groups {
    /// The threads of `leader` other than itself, in list order, and why
    /// their walk stopped if it stopped early.
    fn threads_of(&mut self, mem: &dyn GuestMemory, o: &LinuxOffsets, leader: &Task) -> (Vec<Task>, Option<Stop>) {
        let mut threads = Vec::new();
        let stop = match thread_ring(mem, o.threads, leader) {
            Ok(Some(ring)) => self.walk(mem, o, leader, ring, &mut threads).err(),
            Ok(None) => None,
            Err(why) => Some(Stop::Group(why)),
        };
        (threads, stop)
    }

    /// Appends the threads on `ring` (but `leader`) to `threads`.
    fn walk(
        &mut self,
        mem: &dyn GuestMemory,
        o: &LinuxOffsets,
        leader: &Task,
        ring: Ring,
        threads: &mut Vec<Task>,
    ) -> Result<(), Stop> {
        let group = |why: String| Stop::Group(format!("the thread list of pid {} {why}", leader.pid));
        // With signal->thread_head the leader is on the list too.
        let own = leader.addr.checked_add(ring.link);
        let mut seen = HashSet::from([ring.head]);
        let mut node = ring.head;
        loop {
            let Some(next) = node.checked_add(o.list_next).and_then(|a| read_u64(mem, a)) else {
                return Err(group(format!("has a link at {node:#x} that cannot be read")));
            };
            if next == ring.head {
                return Ok(());
            }
            if !seen.insert(next) {
                return Err(group(format!("loops back to {next:#x} without reaching its head")));
            }
            if self.leader_nodes.contains(&next) {
                return Err(group(format!("runs into the leader list at {next:#x}")));
            }
            node = next;
            if Some(next) == own {
                continue;
            }
            if self.room == 0 {
                return Err(Stop::Full);
            }
            let Some(task) = next.checked_sub(ring.link).and_then(|t| read_task(mem, o, t)) else {
                return Err(group(format!("has a task at node {next:#x} that cannot be read")));
            };
            if task.tgid != leader.tgid {
                return Err(group(format!("reaches pid {} of thread group {}", task.pid, task.tgid)));
            }
            if !self.listed.insert(task.addr) {
                return Err(group(format!("reaches the task at {:#x} again", task.addr)));
            }
            self.room -= 1;
            threads.push(task);
        }
    }
}

/// The ring of `leader`'s threads (`None` when the BTF gave none).
fn thread_ring(mem: &dyn GuestMemory, links: ThreadLinks, leader: &Task) -> Result<Option<Ring>, String> {
    let (head, link) = match links {
        ThreadLinks::Signal { signal, thread_head, thread_node } => {
            let sig = leader.addr.checked_add(signal).and_then(|a| read_u64(mem, a));
            let head = sig.filter(|&s| s != 0).and_then(|s| s.checked_add(thread_head));
            (head.ok_or_else(|| format!("the signal_struct of pid {} cannot be read", leader.pid))?, thread_node)
        }
        ThreadLinks::Group { thread_group } => {
            let head = leader.addr.checked_add(thread_group);
            (head.ok_or_else(|| format!("the thread list of pid {} overflows", leader.pid))?, thread_group)
        }
        ThreadLinks::LeadersOnly => return Ok(None),
    };
    Ok(Some(Ring { head, link }))
}
