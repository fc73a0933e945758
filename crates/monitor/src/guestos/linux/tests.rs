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
        types: 28_210,
    }
}

#[test]
fn offsets_from_a_hand_built_btf() {
    let o = LinuxOffsets::from_btf(&btf_blob(Lies::default())).unwrap();
    assert_eq!(
        o,
        LinuxOffsets { task_size: 0x600, types: 14, ..test_kernel_offsets() },
        "mm is found through an anonymous union and struct"
    );
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

/// A kernel with `tasks` (pid, name, state, flags) after init_task, linked
/// in order; vCPU 0 runs the task at index `current` (None: init_task).
fn guest(tasks: &[(u32, &str, u32, u32)], current: Option<usize>) -> (Mem, LinuxOs) {
    let o = test_kernel_offsets();
    let mem = Mem::default();
    let write_task = |at: u64, pid: u32, name: &str, state: u32, flags: u32, parent: u64| {
        mem.write_kva(at + o.pid, &pid.to_le_bytes());
        mem.write_kva(at + o.tgid, &pid.to_le_bytes());
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name.as_bytes());
        mem.write_kva(at + o.comm, &comm);
        mem.write_kva(at + o.state, &state.to_le_bytes());
        mem.write_kva(at + o.flags, &flags.to_le_bytes());
        mem.write_kva(at + o.real_parent, &parent.to_le_bytes());
    };
    write_task(INIT_TASK, 0, "swapper/0", 0, PF_KTHREAD, INIT_TASK);
    let addrs: Vec<u64> = std::iter::once(INIT_TASK).chain((0..tasks.len() as u64).map(task_va)).collect();
    for (i, &(pid, name, state, flags)) in tasks.iter().enumerate() {
        write_task(addrs[i + 1], pid, name, state, flags, INIT_TASK);
    }
    for (i, &a) in addrs.iter().enumerate() {
        let next = addrs[(i + 1) % addrs.len()];
        mem.write_kva(a + o.tasks + o.list_next, &(next + o.tasks).to_le_bytes());
    }
    mem.write_kva(PER_CPU_OFFSET, &(PCPU_BASE).to_le_bytes());
    let cur = current.map_or(INIT_TASK, |i| addrs[i + 1]);
    mem.write_kva(PCPU_BASE + 0x1ac00, &cur.to_le_bytes());
    let syms = LinuxSymbols {
        init_task: INIT_TASK,
        per_cpu_offset: Some(PER_CPU_OFFSET),
        current_task: Some(0x1ac00),
        image_end: Some(0xffff_ffff_81a1_6000),
    };
    (mem, LinuxOs::new(o, syms))
}

const BOOTED: &[(u32, &str, u32, u32)] = &[
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

#[test]
fn a_very_long_list_stops_at_the_limit() {
    // init_task's link points at a node whose link points at a fresh node,
    // forever: built lazily by a memory that makes up every page.
    struct Endless;
    impl PhysRead for Endless {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReadError> {
            // Every 8-byte link at offset tasks (0x2e0) of a 0x1000-aligned
            // task points to the next page's; other fields read as zeros.
            buf.fill(0);
            let page = gpa & !0xfff;
            if gpa & 0xfff == 0x2e0 && buf.len() == 8 {
                let next_task = PAGE_OFFSET + page + 0x1000;
                buf.copy_from_slice(&(next_task + 0x2e0).to_le_bytes());
            }
            Ok(())
        }
    }
    impl GuestMemory for Endless {
        fn translate(&self, _vcpu: u16, _gva: u64) -> Option<u64> {
            None
        }
    }
    let syms = LinuxSymbols { init_task: PAGE_OFFSET, per_cpu_offset: None, current_task: None, image_end: None };
    let os = LinuxOs::new(test_kernel_offsets(), syms);
    let list = os.tasks(&Endless, 1).unwrap();
    assert_eq!(list.tasks.len(), MAX_TASKS);
    assert!(list.incomplete.as_deref().unwrap().contains("more than"), "{:?}", list.incomplete);
}
