//! The struct offsets the Linux guest OS needs, from the kernel's own BTF.
//!
//! `btfparse` parses the blob into types; the member lookups are ours, with
//! every chain bounded (a hostile BTF can make typedefs point at themselves
//! or a struct contain itself as an anonymous member), every size computed
//! with checked arithmetic, and every offset checked against its struct.

use std::{cell::Cell, collections::BTreeMap};

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};

/// Most typedef/const/volatile links followed from one type.
const MAX_CHAIN: usize = 32;
/// Most nested anonymous structs/unions searched for a member.
const MAX_ANON_DEPTH: usize = 8;
/// Most struct/union member lists searched for one member (a hostile BTF
/// can nest a struct with many anonymous members into itself).
const MAX_VISITS: usize = 10_000;
/// Largest BTF blob read (the stock Debian kernel's is 4.4 MB).
pub const MAX_BTF: usize = 64 << 20;
/// `TASK_COMM_LEN` must be at most this.
const MAX_COMM: u64 = 64;

/// Why a BTF blob gave no offsets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BtfError {
    /// The blob did not parse.
    #[error("the kernel's BTF does not parse: {0}")]
    Parse(String),
    /// The blob is larger than [`MAX_BTF`].
    #[error("the BTF blob is {0} bytes, more than the {MAX_BTF} read")]
    TooLarge(usize),
    /// A struct the OS needs is not described.
    #[error("the kernel's BTF has no `struct {0}`")]
    NoStruct(&'static str),
    /// A member the OS needs is not in its struct.
    #[error("the kernel's BTF has no member `{member}` in `struct {strukt}`")]
    NoMember {
        /// The struct.
        strukt: &'static str,
        /// The member.
        member: &'static str,
    },
    /// The member is there but not usable: a bit field, a size that does not
    /// fit, an offset outside its struct, a chain of types too long.
    #[error("`struct {strukt}.{member}` in the kernel's BTF is unusable: {why}")]
    Bad {
        /// The struct.
        strukt: &'static str,
        /// The member.
        member: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// Where the fields the Linux guest OS reads lie, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxOffsets {
    /// `sizeof(struct task_struct)`.
    pub task_size: u64,
    /// `task_struct.tasks` (a `list_head` linking every thread-group leader).
    pub tasks: u64,
    /// `task_struct.pid` (4 bytes).
    pub pid: u64,
    /// `task_struct.tgid` (4 bytes).
    pub tgid: u64,
    /// `task_struct.comm`.
    pub comm: u64,
    /// Its length (`TASK_COMM_LEN`, 16).
    pub comm_len: u64,
    /// `task_struct.__state` (`state` before 5.14; 4 or 8 bytes).
    pub state: u64,
    /// Size of the state field.
    pub state_size: u64,
    /// `task_struct.flags` (4 bytes; `PF_KTHREAD` = 0x0020_0000).
    pub flags: u64,
    /// `task_struct.mm` (a pointer; NULL for kernel threads).
    pub mm: u64,
    /// `task_struct.real_parent` (a pointer).
    pub real_parent: u64,
    /// `list_head.next`.
    pub list_next: u64,
    /// The per-cpu offset of the current task pointer: the `current_task`
    /// variable (6.1), or `pcpu_hot.current_task` (6.2+), from the
    /// `.data..percpu` DATASEC.
    pub current_task: Option<u64>,
    /// How the threads of a thread group are linked.
    pub threads: ThreadLinks,
    /// How many types the BTF has.
    pub types: usize,
}

/// How the threads of a thread group are linked to each other (all of them
/// `list_head`s; `init_task.tasks` links only each group's leader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadLinks {
    /// `task_struct.signal` (a pointer) to the group's `signal_struct`,
    /// whose `thread_head` heads a list through every thread's
    /// `task_struct.thread_node`, the leader's included (3.14 on; the only
    /// one left from 6.7).
    Signal {
        /// `task_struct.signal`.
        signal: u64,
        /// `signal_struct.thread_head`.
        thread_head: u64,
        /// `task_struct.thread_node`.
        thread_node: u64,
    },
    /// `task_struct.thread_group`: a ring through every thread of the group,
    /// with no head but the leader's own link (before 6.7).
    Group {
        /// `task_struct.thread_group`.
        thread_group: u64,
    },
    /// The BTF describes neither (or only unusably): leaders only.
    LeadersOnly,
}

/// A byte slice as btfparse reads it.
struct Bytes<'a>(&'a [u8]);

impl Readable for Bytes<'_> {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let eof = || btfparse::Error::new(btfparse::ErrorKind::EOF, "read past the end of the BTF blob");
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buffer.len()).ok_or_else(eof)?;
        buffer.copy_from_slice(self.0.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
}

/// The parsed types, with our bounded lookups.
struct Types<'a>(&'a BTreeMap<u32, TypeVariant>, Cell<usize>);

impl Types<'_> {
    /// `tid` with typedefs, qualifiers and type tags looked through.
    fn strip(&self, mut tid: u32) -> Option<&TypeVariant> {
        for _ in 0..MAX_CHAIN {
            let t = self.0.get(&tid)?;
            tid = match t {
                TypeVariant::Typedef(x) => *x.tid(),
                TypeVariant::Const(x) => *x.tid(),
                TypeVariant::Volatile(x) => *x.tid(),
                TypeVariant::Restrict(x) => *x.tid(),
                TypeVariant::TypeTag(x) => *x.tid(),
                _ => return Some(t),
            };
        }
        None
    }

    /// The size of `tid`'s values, if it has one that fits.
    fn size(&self, tid: u32, depth: usize) -> Option<u64> {
        if depth > MAX_CHAIN {
            return None;
        }
        Some(match self.strip(tid)? {
            TypeVariant::Ptr(_) => 8,
            TypeVariant::Int(x) => *x.size() as u64,
            TypeVariant::Enum(x) => *x.size() as u64,
            TypeVariant::Enum64(x) => *x.size() as u64,
            TypeVariant::Struct(x) => *x.size() as u64,
            TypeVariant::Union(x) => *x.size() as u64,
            TypeVariant::Array(a) => {
                self.size(*a.element_tid(), depth + 1)?.checked_mul(u64::from(*a.element_count()))?
            }
            _ => return None,
        })
    }

    /// The struct named `name` (the first one with members: the BTF may also
    /// hold forward declarations) and its size.
    fn find_struct(&self, name: &'static str) -> Result<(u32, u64), BtfError> {
        self.0
            .iter()
            .find_map(|(id, t)| match t {
                TypeVariant::Struct(s) if s.name().as_deref() == Some(name) && !s.member_list().is_empty() => {
                    Some((*id, *s.size() as u64))
                }
                _ => None,
            })
            .ok_or(BtfError::NoStruct(name))
    }

    /// The byte offset and type of `member` in struct/union `tid`, looking
    /// into anonymous members (to `depth` levels).
    fn member_in(&self, tid: u32, member: &str, depth: usize) -> Option<Result<(u64, u32), &'static str>> {
        let visits = self.1.get();
        if visits >= MAX_VISITS {
            return Some(Err("too many nested anonymous members"));
        }
        self.1.set(visits + 1);
        let list = match self.strip(tid)? {
            TypeVariant::Struct(s) => s.member_list(),
            TypeVariant::Union(u) => u.member_list(),
            _ => return None,
        };
        let byte = |o: Offset| match o {
            Offset::ByteOffset(b) => Ok(u64::from(b)),
            Offset::BitOffsetAndSize(..) => Err("a bit field"),
        };
        if let Some(m) = list.iter().find(|m| m.name().as_deref() == Some(member)) {
            return Some(byte(m.offset()).map(|o| (o, m.tid())));
        }
        if depth >= MAX_ANON_DEPTH {
            return None;
        }
        for m in list.iter().filter(|m| m.name().is_none()) {
            if let Some(found) = self.member_in(m.tid(), member, depth + 1) {
                return Some(found.and_then(|(inner, t)| {
                    let at = byte(m.offset())?;
                    at.checked_add(inner).map(|o| (o, t)).ok_or("an offset that overflows")
                }));
            }
        }
        None
    }

    /// Offset and size of `strukt.member`, checked to lie inside a struct of
    /// `size` bytes and to have one of the sizes in `sizes` (any if empty).
    fn field(
        &self,
        (tid, size): (u32, u64),
        strukt: &'static str,
        member: &'static str,
        sizes: &[u64],
    ) -> Result<(u64, u64), BtfError> {
        let bad = |why| BtfError::Bad { strukt, member, why };
        self.1.set(0);
        let (off, mtid) = self.member_in(tid, member, 0).ok_or(BtfError::NoMember { strukt, member })?.map_err(bad)?;
        let msize = self.size(mtid, 0).ok_or(bad("a type without a size"))?;
        if !sizes.is_empty() && !sizes.contains(&msize) {
            return Err(bad("an unexpected size"));
        }
        if off.checked_add(msize).is_none_or(|end| end > size) {
            return Err(bad("it lies outside its struct"));
        }
        Ok((off, msize))
    }

    /// The per-cpu offset of the current task pointer.
    fn current_task(&self) -> Option<u64> {
        let percpu = self.0.values().find_map(|t| match t {
            TypeVariant::DataSec(d) if d.name().as_deref() == Some(".data..percpu") => Some(d),
            _ => None,
        })?;
        let var = |want: &str| {
            percpu.variable_list().iter().find(|v| {
                matches!(self.0.get(&v.var_decl_id), Some(TypeVariant::Var(x)) if x.name().as_deref() == Some(want))
            })
        };
        if let Some(v) = var("current_task") {
            return (v.var_size == 8).then_some(u64::from(v.offset));
        }
        // 6.2+: struct pcpu_hot { union { struct { struct task_struct *current_task; ... } } }.
        let v = var("pcpu_hot")?;
        self.1.set(0);
        let Some(TypeVariant::Var(x)) = self.0.get(&v.var_decl_id) else { return None };
        let (inner, _) = self.member_in(*x.tid(), "current_task", 0)?.ok()?;
        u64::from(v.offset).checked_add(inner)
    }
}

impl LinuxOffsets {
    /// Reads the offsets from a raw BTF blob (a vmlinux's `.BTF` section, or
    /// `/sys/kernel/btf/vmlinux`).
    pub fn from_btf(blob: &[u8]) -> Result<LinuxOffsets, BtfError> {
        if blob.len() > MAX_BTF {
            return Err(BtfError::TooLarge(blob.len()));
        }
        let info = TypeInformation::new(&Bytes(blob)).map_err(|e| BtfError::Parse(format!("{e:?}")))?;
        let types = Types(info.get(), Cell::new(0));
        let task = types.find_struct("task_struct")?;
        let list = types.find_struct("list_head")?;
        let t = |member, sizes: &[u64]| types.field(task, "task_struct", member, sizes);
        let (tasks, _) = t("tasks", &[16])?;
        let (pid, _) = t("pid", &[4])?;
        let (tgid, _) = t("tgid", &[4])?;
        let (comm, comm_len) = t("comm", &[])?;
        if comm_len == 0 || comm_len > MAX_COMM {
            return Err(BtfError::Bad { strukt: "task_struct", member: "comm", why: "an unexpected size" });
        }
        let (state, state_size) = match t("__state", &[4, 8]) {
            Err(BtfError::NoMember { .. }) => t("state", &[4, 8])?,
            r => r?,
        };
        let (flags, _) = t("flags", &[4])?;
        let (mm, _) = t("mm", &[8])?;
        let (real_parent, _) = t("real_parent", &[8])?;
        let (list_next, _) = types.field(list, "list_head", "next", &[8])?;
        // Threads are a bonus: a BTF that does not say how they are linked
        // (or says it unusably) still gives the leaders.
        let by_signal = || -> Result<ThreadLinks, BtfError> {
            let sig = types.find_struct("signal_struct")?;
            let (thread_head, _) = types.field(sig, "signal_struct", "thread_head", &[16])?;
            let (signal, _) = t("signal", &[8])?;
            let (thread_node, _) = t("thread_node", &[16])?;
            Ok(ThreadLinks::Signal { signal, thread_head, thread_node })
        };
        let threads = by_signal()
            .or_else(|_| t("thread_group", &[16]).map(|(thread_group, _)| ThreadLinks::Group { thread_group }))
            .unwrap_or(ThreadLinks::LeadersOnly);
        Ok(LinuxOffsets {
            task_size: task.1,
            tasks,
            pid,
            tgid,
            comm,
            comm_len,
            state,
            state_size,
            flags,
            mm,
            real_parent,
            list_next,
            current_task: types.current_task(),
            threads,
            types: types.0.len(),
        })
    }
}
