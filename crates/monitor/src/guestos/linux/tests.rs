//! The Linux guest OS on hand-built BTF and a synthetic guest memory, and on
//! the test kernel's own BTF (`UKVMI_LINUX_KERNEL`, from scripts/linux).

use std::{cell::RefCell, collections::HashMap};

use super::*;
use crate::guestos::{PhysRead, ReadError};

// ---- a hand-built BTF blob ------------------------------------------------------

/// Knobs for the blob: what lies in it.
#[derive(Default, Clone, Copy)]
struct Lies {
    /// `pid` is a bit field.
    pid_bitfield: bool,
    /// `comm`'s type is a typedef that points at itself.
    typedef_cycle: bool,
    /// The anonymous union holds itself (instead of the struct with `mm`).
    self_union: bool,
    /// `real_parent` lies past the end of the struct.
    outside: bool,
    /// There is no `struct signal_struct` (it has another name).
    no_signal_struct: bool,
    /// There is no `thread_group` (it has another name).
    no_thread_group: bool,
    /// `thread_node` is a bit field.
    thread_node_bitfield: bool,
}

fn btf_blob(lies: Lies) -> Vec<u8> {
    let mut strings = vec![0u8];
    let mut name = |s: &str| -> u32 {
        let at = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        at
    };
    let mut types: Vec<u8> = Vec::new();
    let mut put = |words: &[u32]| {
        for w in words {
            types.extend_from_slice(&w.to_le_bytes());
        }
    };
    let kind = |k: u32, vlen: u32, kflag: bool| (k << 24) | vlen | if kflag { 1 << 31 } else { 0 };
    // 1 int, 2 unsigned long, 3 char
    put(&[name("int"), kind(1, 0, false), 4, (1 << 24) | 32]);
    put(&[name("long unsigned int"), kind(1, 0, false), 8, 64]);
    put(&[name("char"), kind(1, 0, false), 1, 8]);
    // 4 struct list_head { next, prev }
    let (n_next, n_prev) = (name("next"), name("prev"));
    put(&[name("list_head"), kind(4, 2, false), 16, n_next, 5, 0, n_prev, 5, 64]);
    // 5 struct list_head *
    put(&[0, kind(2, 0, false), 4]);
    // 6 char[16], or the cyclic typedef 14
    put(&[0, kind(3, 0, false), 0, if lies.typedef_cycle { 14 } else { 3 }, 1, 16]);
    // 7 struct task_struct *
    put(&[0, kind(2, 0, false), 9]);
    // 8 anonymous struct { int *mm; }
    let n_mm = name("mm");
    put(&[0, kind(4, 1, false), 8, n_mm, 10, 0]);
    // 9 struct task_struct (kind_flag: member offsets carry bit sizes)
    let members: Vec<(u32, u32, u32)> = vec![
        (name("__state"), 1, 0x18 * 8),
        (name("flags"), 1, 0x2c * 8),
        (name("tasks"), 4, 0x2e0 * 8),
        (0, 11, 0x330 * 8),
        (name("pid"), 1, if lies.pid_bitfield { (3 << 24) | (0x3a8 * 8 + 1) } else { 0x3a8 * 8 }),
        (name("tgid"), 1, 0x3ac * 8),
        (name("real_parent"), 7, if lies.outside { 0x5fc * 8 } else { 0x3b0 * 8 }),
        (name("comm"), 6, 0x508 * 8),
        (name("brk_randomized"), 1, (1 << 24) | (0x518 * 8 + 3)),
        (name(if lies.no_thread_group { "thread_grp" } else { "thread_group" }), 4, 0x450 * 8),
        (name("thread_node"), 4, if lies.thread_node_bitfield { (16 << 24) | (0x460 * 8 + 1) } else { 0x460 * 8 }),
        (name("signal"), 16, 0x538 * 8),
    ];
    put(&[name("task_struct"), kind(4, members.len() as u32, true), 0x600]);
    for (n, t, o) in members {
        put(&[n, t, o]);
    }
    // 10 int *
    put(&[0, kind(2, 0, false), 1]);
    // 11 anonymous union { struct { int *mm; }; } (or holding itself)
    put(&[0, kind(5, 1, false), 8, 0, if lies.self_union { 11 } else { 8 }, 0]);
    // 12 var current_task, 13 datasec .data..percpu
    put(&[name("current_task"), kind(14, 0, false), 7, 1]);
    put(&[name(".data..percpu"), kind(15, 1, false), 0x20000, 12, 0x1ac00, 8]);
    // 14 typedef loop -> itself
    put(&[name("loop"), kind(8, 0, false), 14]);
    // 15 struct signal_struct { int nr_threads; ...; struct list_head thread_head; }, 16 a pointer to it
    let (n_nr, n_head) = (name("nr_threads"), name("thread_head"));
    let n_sig = name(if lies.no_signal_struct { "signal_strukt" } else { "signal_struct" });
    put(&[n_sig, kind(4, 2, false), 0x400, n_nr, 1, 8 * 8, n_head, 4, 0x10 * 8]);
    put(&[0, kind(2, 0, false), 15]);

    let mut blob = Vec::new();
    blob.extend_from_slice(&0xeb9fu16.to_le_bytes());
    blob.extend_from_slice(&[1, 0]);
    for w in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
        blob.extend_from_slice(&w.to_le_bytes());
    }
    blob.extend_from_slice(&types);
    blob.extend_from_slice(&strings);
    blob
}

/// The test kernel's offsets (measured: docs/plan-linux-guest.md).
fn test_kernel_offsets() -> LinuxOffsets {
    LinuxOffsets {
        task_size: 6272,
        tasks: 0x2e0,
        pid: 0x3a8,
        tgid: 0x3ac,
        comm: 0x508,
        comm_len: 16,
        state: 0x18,
        state_size: 4,
        flags: 0x2c,
        mm: 0x330,
        real_parent: 0x3b0,
        list_next: 0,
        current_task: Some(0x1ac00),
        threads: ThreadLinks::Signal { signal: 0x538, thread_head: 0x10, thread_node: 0x460 },
        types: 28_210,
    }
}

#[test]
fn offsets_from_a_hand_built_btf() {
    let o = LinuxOffsets::from_btf(&btf_blob(Lies::default())).unwrap();
    assert_eq!(
        o,
        LinuxOffsets { task_size: 0x600, types: 16, ..test_kernel_offsets() },
        "mm is found through an anonymous union and struct"
    );
}

/// Thread links are a bonus: `signal->thread_head` when the BTF has it,
/// else `thread_group`, else none; a lie in them loses the threads, never
/// the offsets.
#[test]
fn thread_links_from_a_hand_built_btf() {
    let threads = |lies: Lies| LinuxOffsets::from_btf(&btf_blob(lies)).unwrap().threads;
    assert_eq!(threads(Lies::default()), test_kernel_offsets().threads, "signal->thread_head first");
    let group = ThreadLinks::Group { thread_group: 0x450 };
    assert_eq!(threads(Lies { no_signal_struct: true, ..Lies::default() }), group, "before 3.14");
    assert_eq!(threads(Lies { thread_node_bitfield: true, ..Lies::default() }), group, "an unusable thread_node");
    let none = Lies { no_signal_struct: true, no_thread_group: true, ..Lies::default() };
    assert_eq!(threads(none), ThreadLinks::LeadersOnly);
    assert_eq!(
        LinuxOffsets::from_btf(&btf_blob(none)).unwrap(),
        LinuxOffsets { task_size: 0x600, types: 16, threads: ThreadLinks::LeadersOnly, ..test_kernel_offsets() },
        "the other offsets are the same"
    );
    assert_eq!(threads(Lies { no_thread_group: true, ..Lies::default() }), test_kernel_offsets().threads, "6.7+");
}

#[test]
fn lying_btf_is_refused_not_followed() {
    let bad = |lies: Lies| LinuxOffsets::from_btf(&btf_blob(lies)).unwrap_err();
    assert_eq!(
        bad(Lies { pid_bitfield: true, ..Lies::default() }),
        BtfError::Bad { strukt: "task_struct", member: "pid", why: "a bit field" }
    );
    assert_eq!(
        bad(Lies { typedef_cycle: true, ..Lies::default() }),
        BtfError::Bad { strukt: "task_struct", member: "comm", why: "a type without a size" }
    );
    assert_eq!(
        bad(Lies { self_union: true, ..Lies::default() }),
        BtfError::NoMember { strukt: "task_struct", member: "mm" },
        "a union holding itself is searched to a bounded depth"
    );
    assert_eq!(
        bad(Lies { outside: true, ..Lies::default() }),
        BtfError::Bad { strukt: "task_struct", member: "real_parent", why: "it lies outside its struct" }
    );
    let blob = btf_blob(Lies::default());
    for cut in 0..blob.len() {
        assert!(LinuxOffsets::from_btf(&blob[..cut]).is_err(), "cut at {cut}");
    }
    for i in 0..blob.len() {
        for x in [0xff, 0x01, 0x80] {
            let mut b = blob.clone();
            b[i] ^= x;
            let _ = LinuxOffsets::from_btf(&b);
        }
    }
    assert!(matches!(LinuxOffsets::from_btf(b"not btf"), Err(BtfError::Parse(_))));
}

fn kernel_file() -> Vec<u8> {
    let path = std::env::var_os("UKVMI_LINUX_KERNEL")
        .expect("UKVMI_LINUX_KERNEL is not set: run scripts/linux (scripts/test exports it) to build the test kernel");
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading the test kernel {path:?}: {e} (run scripts/linux)"))
}

#[test]
fn offsets_from_the_test_kernels_btf() {
    let f = kernel_file();
    let elf = ukvmi_kimage::Elf::parse(&f).unwrap();
    let o = LinuxOffsets::from_btf(elf.section_data(".BTF").expect(".BTF")).unwrap();
    assert_eq!(o, LinuxOffsets { types: o.types, ..test_kernel_offsets() });
    assert!(o.types > 20_000, "{} types", o.types);
    let map = symbol_map_of(&f).unwrap();
    let os = LinuxOs::from_kernel(&f, &map).unwrap();
    assert_eq!(os.symbols().init_task, 0xffff_ffff_8181_1580);
    assert_eq!(os.symbols().current_task, Some(0x1ac00), "the symbol agrees with the BTF");
    assert!(os.symbols().per_cpu_offset.is_some());
    assert!(os.symbols().image_end.is_some_and(|e| e > 0xffff_ffff_8100_0000));
    assert!(os.describe().contains("pid 0x3a8"), "{}", os.describe());
    assert!(
        os.describe().contains("threads by signal 0x538 -> thread_head 0x10, thread_node 0x460"),
        "{}",
        os.describe()
    );
}

/// With `.symtab` gone (renamed, as a stripped distribution kernel has
/// none), the test kernel's symbols come from its kallsyms (text symbols:
/// it lacks `CONFIG_KALLSYMS_ALL`), at the addresses `.symtab` gives.
#[test]
fn a_kernel_without_symtab_gives_its_kallsyms() {
    let f = kernel_file();
    let full = symbol_map_of(&f).unwrap();
    let mut stripped = f.clone();
    let at = stripped.windows(8).position(|w| w == b".symtab\0").expect(".symtab's name");
    stripped[at + 6] = b'X';
    let elf = ukvmi_kimage::Elf::parse(&stripped).unwrap();
    assert!(elf.section(".symtab").is_none(), "the name was renamed");
    let map = symbol_map_of(&stripped).unwrap();
    assert!(map.len() > 5_000, "{} symbols", map.len());
    for name in ["start_kernel", "kthreadd", "entry_SYSCALL_64"] {
        assert_eq!(map.addr(name), full.addr(name), "{name}");
        assert!(map.addr(name).is_some(), "{name}");
    }
}

// ---- a synthetic guest memory -----------------------------------------------------

/// Sparse guest memory: pages created on write; no page tables (translate
/// fails), so the kernel's fixed maps are used.
#[derive(Default)]
struct Mem(RefCell<HashMap<u64, Vec<u8>>>);

impl Mem {
    fn write(&self, pa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let a = pa + i as u64;
            self.0.borrow_mut().entry(a >> 12).or_insert_with(|| vec![0; 4096])[(a & 0xfff) as usize] = *b;
        }
    }
    fn write_kva(&self, va: u64, bytes: &[u8]) {
        let pa = if va >= START_KERNEL_MAP { va - START_KERNEL_MAP } else { va - PAGE_OFFSET };
        self.write(pa, bytes);
    }
}

impl PhysRead for Mem {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa + i as u64;
            let pages = self.0.borrow();
            let page = pages.get(&(a >> 12)).ok_or(ReadError::OutOfRange { gpa, len: 1 })?;
            *b = page[(a & 0xfff) as usize];
        }
        Ok(())
    }
}

impl GuestMemory for Mem {
    fn translate(&self, _vcpu: u16, _gva: u64) -> Option<u64> {
        None
    }
}

const INIT_TASK: u64 = 0xffff_ffff_8181_1580;
const PER_CPU_OFFSET: u64 = 0xffff_ffff_8168_8670;
const PCPU_BASE: u64 = 0xffff_8880_0700_0000;

fn task_va(i: u64) -> u64 {
    PAGE_OFFSET + 0x20_0000 + i * 0x2000
}

/// The test kernel's thread links: `task_struct.{thread_group, thread_node,
/// signal}`, `signal_struct.thread_head`.
const THREAD_GROUP: u64 = 0x450;
const THREAD_NODE: u64 = 0x460;
const SIGNAL: u64 = 0x538;
const THREAD_HEAD: u64 = 0x10;

/// Where the thread at index `j` of a [`guest_with`]'s threads lies.
fn thread_va(j: usize) -> u64 {
    task_va(0x100 + j as u64)
}

/// Where the `signal_struct` of thread group `g` lies (0: init_task's, `i
/// + 1`: that of the leader at index `i`).
fn signal_va(g: usize) -> u64 {
    PAGE_OFFSET + 0x80_0000 + g as u64 * 0x1000
}

/// A task after init_task: pid, name, state, flags.
type Leader = (u32, &'static str, u32, u32);
/// A thread: the index of its leader in the leaders, its pid and name.
type Thread = (usize, u32, &'static str);

/// Which thread lists a synthetic kernel keeps (6.1 keeps both; 6.7+ only
/// `signal->thread_head`; before 3.14 only `thread_group`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lists {
    Both,
    GroupOnly,
}

/// Links the `list_head`s at `nodes` into a ring, in order.
fn ring(mem: &Mem, nodes: &[u64]) {
    for (i, &n) in nodes.iter().enumerate() {
        mem.write_kva(n, &nodes[(i + 1) % nodes.len()].to_le_bytes());
    }
}

/// A kernel with `tasks` after init_task, linked in order; vCPU 0 runs the
/// task at index `current` (None: init_task).
fn guest(tasks: &[Leader], current: Option<usize>) -> (Mem, LinuxOs) {
    guest_with(tasks, &[], Lists::Both, current.map_or(INIT_TASK, |i| task_va(i as u64)))
}

/// A kernel with `tasks` after init_task, linked in order, each leader's
/// `threads` after it on its thread lists (the `j`th at [`thread_va`]`(j)`);
/// vCPU 0 runs the task at address `current`. The offsets are the test
/// kernel's (`signal->thread_head`), or `thread_group` for `GroupOnly`.
fn guest_with(tasks: &[Leader], threads: &[Thread], lists: Lists, current: u64) -> (Mem, LinuxOs) {
    let mut o = test_kernel_offsets();
    if lists == Lists::GroupOnly {
        o.threads = ThreadLinks::Group { thread_group: THREAD_GROUP };
    }
    let mem = Mem::default();
    let write_task = |at: u64, pid: u32, tgid: u32, name: &str, state: u32, flags: u32| {
        mem.write_kva(at + o.pid, &pid.to_le_bytes());
        mem.write_kva(at + o.tgid, &tgid.to_le_bytes());
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        mem.write_kva(at + o.comm, &comm);
        mem.write_kva(at + o.state, &state.to_le_bytes());
        mem.write_kva(at + o.flags, &flags.to_le_bytes());
        mem.write_kva(at + o.real_parent, &INIT_TASK.to_le_bytes());
    };
    write_task(INIT_TASK, 0, 0, "swapper/0", 0, PF_KTHREAD);
    let addrs: Vec<u64> = std::iter::once(INIT_TASK).chain((0..tasks.len() as u64).map(task_va)).collect();
    for (i, &(pid, name, state, flags)) in tasks.iter().enumerate() {
        write_task(addrs[i + 1], pid, pid, name, state, flags);
    }
    ring(&mem, &addrs.iter().map(|a| a + o.tasks).collect::<Vec<_>>());
    for (g, &leader) in addrs.iter().enumerate() {
        let tgid = g.checked_sub(1).map_or(0, |i| tasks[i].0);
        let mut members = vec![leader];
        for (j, &(_, pid, name)) in threads.iter().enumerate().filter(|(_, t)| t.0 + 1 == g) {
            write_task(thread_va(j), pid, tgid, name, 1, 0x0040_0040);
            members.push(thread_va(j));
        }
        ring(&mem, &members.iter().map(|m| m + THREAD_GROUP).collect::<Vec<_>>());
        if lists == Lists::Both {
            let head = signal_va(g) + THREAD_HEAD;
            ring(&mem, &std::iter::once(head).chain(members.iter().map(|m| m + THREAD_NODE)).collect::<Vec<_>>());
            for m in &members {
                mem.write_kva(m + SIGNAL, &signal_va(g).to_le_bytes());
            }
        }
    }
    mem.write_kva(PER_CPU_OFFSET, &(PCPU_BASE).to_le_bytes());
    mem.write_kva(PCPU_BASE + 0x1ac00, &current.to_le_bytes());
    let syms = LinuxSymbols {
        init_task: INIT_TASK,
        per_cpu_offset: Some(PER_CPU_OFFSET),
        current_task: Some(0x1ac00),
        image_end: Some(0xffff_ffff_81a1_6000),
    };
    (mem, LinuxOs::new(o, syms))
}

const BOOTED: &[Leader] = &[
    (1, "init", 0, 0x0040_0100),
    (2, "kthreadd", 1, PF_KTHREAD),
    (3, "rcu_gp", 0x402, PF_KTHREAD),
    (9, "ksoftirqd/0", 1, PF_KTHREAD),
];

#[test]
fn walks_the_task_list_and_finds_the_current_task() {
    let (mem, os) = guest(BOOTED, Some(0));
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(list.incomplete, None);
    let rows: Vec<(u32, &str, char, bool, Option<u16>)> =
        list.tasks.iter().map(|t| (t.pid, t.name.as_str(), t.state, t.kthread, t.on_cpu)).collect();
    assert_eq!(
        rows,
        [
            (0, "swapper/0", 'R', true, None),
            (1, "init", 'R', false, Some(0)),
            (2, "kthreadd", 'S', true, None),
            (3, "rcu_gp", 'I', true, None),
            (9, "ksoftirqd/0", 'S', true, None),
        ]
    );
    assert!(list.tasks.iter().all(|t| t.ppid == Some(0)));
    assert_eq!(os.current_process(&mem, 0), Some(1));
    assert_eq!(os.who(&mem, 0), Who { vcpu: 0, pid: Some(1), process: Some("init".into()) });
    assert_eq!(os.describe_current(&mem, 0).as_deref(), Some("pid 1 (init)"));
    assert_eq!(os.process_name(&mem, 9).as_deref(), Some("ksoftirqd/0"));
    assert_eq!(os.process_name(&mem, 77), None);
    assert_eq!(os.current_process(&mem, 1), None, "vCPU 1's per-cpu base is not there");
    assert!(os.task_list(&mem, 1).is_some());
    assert_eq!(os.syscall_entry_symbol(), "entry_SYSCALL_64");
    assert_eq!(os.static_gpa(INIT_TASK), Some(0x181_1580), "the image's fixed map");
    assert_eq!(os.static_gpa(0xffff_ffff_81a1_6000), None, "past _end (modules live above)");
    assert_eq!(os.static_gpa(task_va(0)), None, "the direct map is not the image");
    let r = KvmRegs { rax: 39, ..KvmRegs::default() };
    assert_eq!(os.decode_syscall(&mem, 0, &r).name, "getpid");
    assert!(os.agent_reply(&r, 0, "x").is_none(), "never writes to a Linux guest");

    let (mem, os) = guest(BOOTED, None);
    assert_eq!(os.who(&mem, 0).process.as_deref(), Some("swapper/0"), "the idle task");
}

#[test]
fn lying_task_lists_end_the_walk_with_a_reason() {
    let o = test_kernel_offsets();
    // A cycle that never comes back to init_task: ksoftirqd/0 -> kthreadd.
    let (mem, os) = guest(BOOTED, Some(0));
    mem.write_kva(task_va(3) + o.tasks, &(task_va(1) + o.tasks).to_le_bytes());
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(list.tasks.len(), 5, "every task once");
    assert!(list.incomplete.as_deref().unwrap().contains("loops back"), "{:?}", list.incomplete);
    // A task pointing at itself.
    mem.write_kva(task_va(0) + o.tasks, &(task_va(0) + o.tasks).to_le_bytes());
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(list.tasks.len(), 2);
    assert!(list.incomplete.is_some());
    // A link into unmapped memory.
    mem.write_kva(task_va(0) + o.tasks, &0xffff_8880_7fff_0000u64.to_le_bytes());
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(list.tasks.len(), 2);
    assert!(list.incomplete.as_deref().unwrap().contains("cannot be read"), "{:?}", list.incomplete);
    // A link near the top of the address space (the task address underflows / overflows).
    for bad in [0u64, 5, u64::MAX, u64::MAX - 7] {
        mem.write_kva(task_va(0) + o.tasks, &bad.to_le_bytes());
        let list = os.tasks(&mem, 1).unwrap();
        assert_eq!(list.tasks.len(), 2, "link {bad:#x}");
        assert!(list.incomplete.is_some());
    }
    // No init_task at all.
    let empty = Mem::default();
    assert!(matches!(os.tasks(&empty, 1), Err(LinuxError::Tasks(_))));
    assert_eq!(os.current_process(&empty, 0), None);
    assert_eq!(os.who(&empty, 0), Who { vcpu: 0, pid: None, process: None });
}

/// A memory that makes up every page, lazily: zeros, but for the 8-byte
/// links at the page offsets in its list, each pointing that many bytes on
/// (0: at itself) to the same offset. With tasks at every page, a list as
/// long as the address space.
struct Endless(&'static [(u64, u64)]);

impl PhysRead for Endless {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        buf.fill(0);
        let link = self.0.iter().find(|&&(at, _)| gpa & 0xfff == at && buf.len() == 8);
        if let Some(&(_, step)) = link {
            buf.copy_from_slice(&(PAGE_OFFSET + gpa + step).to_le_bytes());
        }
        Ok(())
    }
}

impl GuestMemory for Endless {
    fn translate(&self, _vcpu: u16, _gva: u64) -> Option<u64> {
        None
    }
}

/// An OS whose init_task is the first task of an [`Endless`] memory.
fn endless_os(o: LinuxOffsets) -> LinuxOs {
    LinuxOs::new(o, LinuxSymbols { init_task: PAGE_OFFSET, per_cpu_offset: None, current_task: None, image_end: None })
}

#[test]
fn a_very_long_list_stops_at_the_limit() {
    // init_task's link (at tasks, 0x2e0) points at the next page's task's, forever.
    let list = endless_os(test_kernel_offsets()).tasks(&Endless(&[(0x2e0, 0x1000)]), 1).unwrap();
    assert_eq!(list.tasks.len(), MAX_TASKS);
    assert!(list.incomplete.as_deref().unwrap().contains("more than"), "{:?}", list.incomplete);
}

// ---- threads ----------------------------------------------------------------------

/// init, kthreadd and two processes: `app` (42) with three more threads and
/// `db` (50) with one.
const PROCS: &[Leader] = &[
    (1, "init", 1, 0x0040_0100),
    (2, "kthreadd", 1, PF_KTHREAD),
    (42, "app", 1, 0x0040_0000),
    (50, "db", 1, 0x0040_0000),
];
const THREADS: &[Thread] = &[(2, 43, "app:io"), (2, 44, "app:gc"), (3, 51, "db:wal"), (2, 47, "app:worker")];

/// pid, tgid, name, whether a thread, the vCPU it runs on.
type Row = (u32, u32, String, bool, Option<u16>);

fn rows(list: &TaskList) -> Vec<Row> {
    list.tasks.iter().map(|t| (t.pid, t.tgid, t.name.clone(), t.is_thread(), t.on_cpu)).collect()
}

fn row(pid: u32, tgid: u32, name: &str, on_cpu: Option<u16>) -> Row {
    (pid, tgid, name.to_string(), pid != tgid, on_cpu)
}

/// Every task of PROCS and THREADS, leaders each followed by their threads;
/// `app:gc` (44) on vCPU 0.
fn all_rows() -> Vec<Row> {
    vec![
        row(0, 0, "swapper/0", None),
        row(1, 1, "init", None),
        row(2, 2, "kthreadd", None),
        row(42, 42, "app", None),
        row(43, 42, "app:io", None),
        row(44, 42, "app:gc", Some(0)),
        row(47, 42, "app:worker", None),
        row(50, 50, "db", None),
        row(51, 50, "db:wal", None),
    ]
}

/// The leaders' rows alone, and those of the threads of `app` before the
/// walk of its list stopped (by pid).
fn rows_but(app_threads: &[u32]) -> Vec<Row> {
    all_rows().into_iter().filter(|r| !r.3 || r.1 != 42 || app_threads.contains(&r.0)).collect()
}

/// The leaders' rows alone.
fn leader_rows() -> Vec<Row> {
    all_rows().into_iter().filter(|r| !r.3).collect()
}

/// A guest of PROCS and THREADS with `lists`, whose walk lists them all.
fn all_listed(lists: Lists) -> (Mem, LinuxOs, TaskList) {
    let (mem, os) = guest_with(PROCS, THREADS, lists, thread_va(1));
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(list.incomplete, None);
    assert_eq!(rows(&list), all_rows());
    (mem, os, list)
}

#[test]
fn threads_follow_their_leader_by_signal_thread_head() {
    let (mem, os, list) = all_listed(Lists::Both);
    assert!(list.tasks.iter().all(|t| t.ppid == Some(0) && t.state != '?'));
    assert!(!list.tasks.iter().any(|t| t.is_thread() && t.kthread));
    // The thread on vCPU 0 is the current task everywhere.
    assert_eq!(os.current_process(&mem, 0), Some(44));
    assert_eq!(os.who(&mem, 0), Who { vcpu: 0, pid: Some(44), process: Some("app:gc".into()) });
    assert_eq!(os.describe_current(&mem, 0).as_deref(), Some("pid 44 (app:gc)"));
    assert_eq!(os.process_name(&mem, 47).as_deref(), Some("app:worker"), "threads are found by pid");
}

#[test]
fn threads_follow_their_leader_by_thread_group_on_older_kernels() {
    let (mem, os, _) = all_listed(Lists::GroupOnly);
    assert!(os.describe().contains("threads by thread_group 0x450"), "{}", os.describe());
    // No signal->thread_head there: the 6.1 offsets find no signal_struct,
    // say so for every group and still list every leader.
    let os = LinuxOs::new(test_kernel_offsets(), *os.symbols());
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(rows(&list), leader_rows());
    assert_eq!(
        list.incomplete.as_deref(),
        Some("the signal_struct of pid 0 cannot be read (and 4 more thread lists stopped early)")
    );
}

#[test]
fn without_thread_links_only_leaders_are_listed() {
    let (mem, os) = guest_with(PROCS, THREADS, Lists::Both, thread_va(1));
    let o = LinuxOffsets { threads: ThreadLinks::LeadersOnly, ..test_kernel_offsets() };
    let os = LinuxOs::new(o, *os.symbols());
    let list = os.tasks(&mem, 1).unwrap();
    assert_eq!(list.incomplete, None, "the walk did all it could");
    assert_eq!(rows(&list), leader_rows(), "the current thread is not listed, so nothing is marked");
    assert!(os.describe().contains("leaders only"), "{}", os.describe());
    assert_eq!(os.who(&mem, 0).pid, Some(44), "the current task is still read directly");
}

/// Each lie stops the walk of its own thread list only, with a reason:
/// every leader, and every other group's threads, are still listed, and no
/// task twice.
#[test]
fn lying_thread_lists_stop_their_group_with_a_reason() {
    let node = |j: usize| thread_va(j) + THREAD_NODE;
    let app_head = signal_va(3) + THREAD_HEAD;
    let check = |what: &str, lie: &dyn Fn(&Mem), lists: Lists, app: &[u32], why: &str| {
        let (mem, os) = guest_with(PROCS, THREADS, lists, thread_va(1));
        lie(&mem);
        let list = os.tasks(&mem, 1).unwrap();
        let on = |mut r: Row| {
            r.4 = r.4.filter(|_| app.contains(&44));
            r
        };
        assert_eq!(rows(&list), rows_but(app).into_iter().map(on).collect::<Vec<_>>(), "{what}");
        let got = list.incomplete.unwrap_or_else(|| panic!("{what}: no reason"));
        assert!(got.starts_with(why), "{what}: {got}");
    };
    let link = |mem: &Mem, at: u64, to: u64| mem.write_kva(at, &to.to_le_bytes());
    let both = Lists::Both;
    check(
        "app:gc back to app:io",
        &|m| link(m, node(1), node(0)),
        both,
        &[43, 44],
        &format!("the thread list of pid 42 loops back to {:#x} without reaching its head", node(0)),
    );
    check("app:io to itself", &|m| link(m, node(0), node(0)), both, &[43], "the thread list of pid 42 loops back");
    check(
        "app:io into the leader list (kthreadd's link)",
        &|m| link(m, node(0), task_va(1) + 0x2e0),
        both,
        &[43],
        "the thread list of pid 42 runs into the leader list",
    );
    check(
        "app:io into init_task's link (the leader list's head)",
        &|m| link(m, node(0), INIT_TASK + 0x2e0),
        both,
        &[43],
        "the thread list of pid 42 runs into the leader list",
    );
    check(
        "app:io to db's thread",
        &|m| link(m, node(0), node(2)),
        both,
        &[43],
        "the thread list of pid 42 reaches pid 51 of thread group 50",
    );
    check(
        "app's head to unmapped memory",
        &|m| link(m, app_head, 0xffff_8880_7fff_0000),
        both,
        &[],
        "the thread list of pid 42 has a task at node 0xffff88807fff0000 that cannot be read",
    );
    for bad in [0u64, 5, u64::MAX, u64::MAX - 7] {
        check(&format!("app:io to {bad:#x}"), &|m| link(m, node(0), bad), both, &[43], "the thread list of pid 42 ");
    }
    check(
        "app's signal pointer to unmapped memory",
        &|m| link(m, task_va(2) + SIGNAL, 0xffff_8880_7fff_0000),
        both,
        &[],
        "the thread list of pid 42 has a link at 0xffff88807fff0010 that cannot be read",
    );
    for bad in [0u64, u64::MAX - 7] {
        check(
            &format!("app's signal pointer {bad:#x}"),
            &|m| link(m, task_va(2) + SIGNAL, bad),
            both,
            &[],
            "the signal_struct of pid 42 cannot be read",
        );
    }
    // A task listed already, under a tgid that agrees: db claims app's tgid
    // (so it reads as one of app's threads) and its list (after db's own
    // link) goes to app:io.
    let (mem, os) = guest_with(PROCS, THREADS, both, thread_va(1));
    mem.write_kva(task_va(3) + 0x3ac, &42u32.to_le_bytes());
    link(&mem, task_va(3) + THREAD_NODE, node(0));
    let list = os.tasks(&mem, 1).unwrap();
    let mut want = all_rows();
    want.truncate(7);
    want.push(row(50, 42, "db", None));
    assert_eq!(rows(&list), want, "app:io once; db:wal is lost behind the lie");
    let why = list.incomplete.unwrap();
    assert_eq!(why, format!("the thread list of pid 50 reaches the task at {:#x} again", thread_va(0)));
    // The same lies in a thread_group ring (its head is the leader's own link).
    let group = |j: usize| thread_va(j) + THREAD_GROUP;
    check(
        "thread_group: app:gc back to app:io",
        &|m| link(m, group(1), group(0)),
        Lists::GroupOnly,
        &[43, 44],
        "the thread list of pid 42 loops back",
    );
    check(
        "thread_group: app:io into the leader list",
        &|m| link(m, group(0), task_va(3) + 0x2e0),
        Lists::GroupOnly,
        &[43],
        "the thread list of pid 42 runs into the leader list",
    );
}

#[test]
fn two_lying_lists_say_the_first_and_count_the_rest() {
    let (mem, os) = guest_with(PROCS, THREADS, Lists::Both, thread_va(1));
    let node = |j: usize| thread_va(j) + THREAD_NODE;
    mem.write_kva(node(0), &node(0).to_le_bytes());
    mem.write_kva(node(2), &node(2).to_le_bytes());
    let list = os.tasks(&mem, 1).unwrap();
    let why = list.incomplete.unwrap();
    assert!(why.starts_with("the thread list of pid 42 loops back"), "{why}");
    assert!(why.ends_with("(and 1 more thread lists stopped early)"), "{why}");
    assert_eq!(list.tasks.iter().filter(|t| t.is_thread()).count(), 2, "app:io and db:wal");
}

#[test]
fn threads_count_toward_the_limit() {
    // init_task's only leader link points at itself; its thread_group link
    // at the next page's task's, forever (every task reads as pid 0, tgid 0,
    // like init_task).
    let o = LinuxOffsets { threads: ThreadLinks::Group { thread_group: THREAD_GROUP }, ..test_kernel_offsets() };
    let list = endless_os(o).tasks(&Endless(&[(0x2e0, 0), (THREAD_GROUP, 0x1000)]), 1).unwrap();
    assert_eq!(list.tasks.len(), MAX_TASKS, "leaders and threads together");
    assert_eq!(list.incomplete.as_deref(), Some("more than 32768 tasks: the walk stopped there"));
}
