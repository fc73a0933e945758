//! The demo guest ("ukos") end to end on /dev/kvm: a real VM, a real
//! introspector over a real socket. The processes run and print, the process
//! table in guest memory tells the truth (names, vCPUs, page tables, syscall
//! counts), each process has its own frames behind VA 0x400000, the agent
//! doorbell carries a reply both ways, and the rootkit's attacks take effect
//! when nobody stops them (the guest runs on) and stay without effect when
//! the tool blocks them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{read_u64, start, Scratch};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use ukvmi_guests::demo;
use ukvmi_introspector::wire::{access, event};
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};
use ukvmi_monitor::guestos::{ProcState, ProcessTable};

const T: Duration = Duration::from_secs(30);

fn sym(name: &str) -> u64 {
    demo::symbol(name).unwrap_or_else(|| panic!("demo.map has no {name}"))
}

fn table(tool: &Vm) -> ProcessTable {
    ProcessTable::read(tool).expect("the process table is there once the kernel booted")
}

fn frames_of_slot(slot: u64) -> u64 {
    demo::USER_FRAMES_BASE + slot * demo::USER_FRAMES_SIZE
}

fn slot_of_cr3(cr3: u64) -> u64 {
    (cr3 - demo::PBLK_BASE) / demo::PBLK_SIZE
}

fn vcpu_event(tool: &Vm, timeout: Duration) -> Option<PendingEvent> {
    match tool.next_event(Some(timeout)).unwrap() {
        Some(Event::Vcpu(ev)) => Some(ev),
        None => None,
        Some(other) => panic!("unexpected event {other:?}"),
    }
}

/// The table as the kernel keeps it after boot, for `vcpus` vCPUs.
fn check_table(t: &ProcessTable, vcpus: u32) {
    assert_eq!(t.ncpus, vcpus);
    assert_eq!(t.procs.len(), 4, "{t:?}");
    for (p, &(pid, name, cpu2)) in t.procs.iter().zip(demo::PROCESSES.iter()) {
        assert_eq!((p.pid, p.name.as_str()), (pid, name));
        assert_eq!(p.cpu, if vcpus == 2 { cpu2 } else { 0 }, "{name}");
        assert_eq!(p.cr3, demo::PBLK_BASE + p.slot as u64 * demo::PBLK_SIZE, "{name}: its own page tables");
        assert!(
            matches!(p.state, ProcState::Ready | ProcState::Running | ProcState::Sleeping),
            "{name}: state {:?}",
            p.state
        );
        assert!(p.syscalls > 0, "{name} made no syscall");
        assert!(
            p.user_rip >= demo::USER_BASE && p.user_rip < demo::USER_BASE + 0x1_0000,
            "{name}: rip {:#x}",
            p.user_rip
        );
    }
    let mut cr3s: Vec<u64> = t.procs.iter().map(|p| p.cr3).collect();
    cr3s.sort_unstable();
    cr3s.dedup();
    assert_eq!(cr3s.len(), 4, "distinct page tables");
    for &pid in &t.current {
        assert!(pid == 0 || t.by_pid(pid).is_some(), "current pid {pid}");
    }
}

#[test]
fn demo_on_two_vcpus_processes_table_translation_agent_and_rootkit() {
    let dir = Scratch::new("demo2");
    let (vm, _l, tool) = start(&dir, "demo", 2, &[]);
    let t0 = Instant::now();
    vm.wait_serial("ukos: boot done", 1, T);
    let boot = t0.elapsed();
    for line in ["ukvmi guest demo: vcpu 0 up", "vcpu 1 up", "init: ukos init running as pid 1", "shell: hello"] {
        vm.wait_serial(line, 1, T);
    }
    vm.wait_serial("worker: round 40", 1, T);
    eprintln!("demo: boot line after {boot:?} (VM start and attach included)");

    // The process table.
    let t1 = table(&tool);
    check_table(&t1, 2);
    std::thread::sleep(Duration::from_millis(1200));
    let t2 = table(&tool);
    assert!(t2.ticks >= t1.ticks + 1000 && t2.ticks < t1.ticks + 20_000, "ticks {} -> {}", t1.ticks, t2.ticks);
    for pid in [2, 3] {
        let (a, b) = (t1.by_pid(pid).unwrap().syscalls, t2.by_pid(pid).unwrap().syscalls);
        assert!(b > a, "pid {pid}: syscalls {a} -> {b}");
    }

    // The agent: init's doorbell on vCPU 0 carries the message in agent_buf;
    // the tool's reply goes back the same way, its length in RAX.
    tool.control_events(0, event::HYPERCALL, true).unwrap();
    let ev = vcpu_event(&tool, T).expect("init calls the agent every 2 s");
    assert!(matches!(ev.payload, EventPayload::Hypercall), "{:?}", ev.payload);
    let agent_buf = sym("agent_buf");
    assert_eq!((ev.regs.r8, ev.regs.r9), (agent_buf, 20));
    assert_eq!(tool.read_physical(agent_buf, 20).unwrap(), b"hello from the guest");
    assert_eq!(slot_of_cr3(ev.sregs.cr3), 0, "init's page tables");
    assert_eq!(tool.translate_gva(0, demo::USER_BASE).unwrap().map(u64::from), Some(frames_of_slot(0)));
    let reply = b"hi from the tool";
    tool.write_physical(agent_buf, reply).unwrap();
    let mut regs = ev.regs;
    regs.rax = reply.len() as u64;
    tool.set_registers(0, &regs).unwrap();
    tool.reply(&ev, EventReply::Continue).unwrap();
    tool.control_events(0, event::HYPERCALL, false).unwrap();
    vm.wait_serial("init: agent replied: hi from the tool", 1, T);

    // Each process in its own context: a breakpoint on syscall_entry
    // (ring 0 on every host) stops each caller with its CR3 loaded, where
    // VA 0x400000 is its own frames.
    let entry = sym("syscall_entry");
    let original = tool.read_physical(entry, 1).unwrap();
    assert_ne!(original[0], 0xcc);
    for v in 0..2 {
        tool.control_events(v, event::BREAKPOINT, true).unwrap();
    }
    let mut seen: BTreeMap<u32, (u64, u64)> = BTreeMap::new(); // pid -> (syscall nr, frames of 0x400000)
    let deadline = Instant::now() + T;
    tool.write_physical(entry, &[0xcc]).unwrap();
    while seen.len() < 4 && Instant::now() < deadline {
        let Some(ev) = vcpu_event(&tool, Duration::from_secs(5)) else { continue };
        assert!(matches!(ev.payload, EventPayload::Breakpoint { .. }), "{:?}", ev.payload);
        assert_eq!(ev.regs.rip, entry);
        let slot = slot_of_cr3(ev.sregs.cr3);
        let frames = tool.translate_gva(ev.vcpu.raw(), demo::USER_BASE).unwrap().unwrap().raw();
        let t = table(&tool);
        let p = t.procs.iter().find(|p| p.slot as u64 == slot).unwrap();
        assert_eq!(t.current[usize::from(ev.vcpu.raw())], p.pid, "the table names the caller");
        assert_eq!(u32::from(ev.vcpu.raw()), p.cpu);
        assert!(ev.regs.rcx >= demo::USER_BASE && ev.regs.rcx < demo::USER_BASE + 0x1_0000, "RCX = its user RIP");
        seen.insert(p.pid, (ev.regs.rax, frames));
        // Put the byte back and re-execute; plant again for the next caller.
        tool.write_physical(entry, &original).unwrap();
        tool.reply(&ev, EventReply::Retry).unwrap();
        if seen.len() < 4 {
            tool.write_physical(entry, &[0xcc]).unwrap();
        }
    }
    tool.write_physical(entry, &original).unwrap();
    for v in 0..2 {
        tool.control_events(v, event::BREAKPOINT, false).unwrap();
    }
    while let Some(ev) = vcpu_event(&tool, Duration::from_millis(300)) {
        tool.reply(&ev, EventReply::Retry).unwrap();
    }
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4], "{seen:?}");
    for (pid, (nr, frames)) in &seen {
        assert_eq!(*frames, frames_of_slot(u64::from(pid - 1)), "pid {pid}: VA 0x400000 -> its own frames");
        assert!([1, 24, 35, 39, 200, 201, 202].contains(nr), "pid {pid}: syscall {nr}");
    }

    // The rootkit, unopposed: both attacks take effect, the guest runs on.
    vm.wait_serial("rootkit: LSTAR hijack succeeded", 1, T);
    vm.wait_serial("rootkit: syscall_table[write] hook succeeded", 1, T);
    let lstar = tool.get_registers(1, &[0xc000_0082]).unwrap().msrs[0].data;
    assert_eq!(lstar, sym("module_area"), "vCPU 1's LSTAR points at the rootkit's hook");
    let table_write = read_u64(&tool, sym("syscall_table") + 8 * demo::SYS_WRITE);
    assert_eq!(table_write, sym("module_area") + 24, "syscall_table[write] points at the write hook");
    let hellos = vm.serial_text().matches("shell: hello").count();
    vm.wait_serial("shell: hello", hellos + 3, T);
    let (hijacked, hooked) = (read_u64(&tool, sym("hijacked_syscalls")), read_u64(&tool, sym("hooked_writes")));
    assert!(hijacked > 0 && hooked > 0, "hijacked {hijacked}, hooked {hooked}");
    vm.wait_serial("worker: round", vm.serial_text().matches("worker: round").count() + 1, T);
    assert!(read_u64(&tool, sym("hijacked_syscalls")) > hijacked, "every vCPU-1 syscall goes through the hook");
    assert!(read_u64(&tool, sym("hooked_writes")) > hooked);
    let t3 = table(&tool);
    check_table(&t3, 2);
    assert!(!vm.serial_text().contains("killed") && !vm.serial_text().contains("ukos: kernel exception"));
}

#[test]
fn demo_on_one_vcpu_with_the_attacks_blocked() {
    let dir = Scratch::new("demo1");
    let (vm, _l, tool) = start(&dir, "demo", 1, &[]);
    vm.wait_serial("ukos: boot done", 1, T);
    assert!(vm.serial_text().contains("ukos: kernel booting on 1 vCPU(s)"));
    vm.wait_serial("init: ukos init running as pid 1", 1, T);
    vm.wait_serial("shell: hello", 2, T);
    check_table(&table(&tool), 1);

    // Block both attacks as the demo tool does: the MSR write keeps the old
    // value, the store to the write-protected syscall table is skipped.
    let table_page = sym("syscall_table");
    tool.control_events(0, event::MSR, true).unwrap();
    tool.control_msr(0, 0xc000_0082, true).unwrap();
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(table_page, access::R | access::X)]).unwrap();
    let (mut msr_blocked, mut pf_blocked) = (0, 0);
    let deadline = Instant::now() + T;
    while (msr_blocked < 2 || pf_blocked < 2) && Instant::now() < deadline {
        let Some(ev) = vcpu_event(&tool, Duration::from_secs(5)) else { continue };
        match ev.payload {
            EventPayload::Msr { msr, old_value, new_value } => {
                assert_eq!(msr, 0xc000_0082);
                assert_eq!(old_value, sym("syscall_entry"));
                assert_eq!(new_value, sym("module_area"));
                assert_eq!(table(&tool).current[0], 4, "the rootkit is the writer");
                tool.reply(&ev, EventReply::ContinueWith(old_value)).unwrap();
                msr_blocked += 1;
            }
            EventPayload::Pf { gpa, access: a, .. } => {
                assert_eq!((gpa, a), (table_page + 8 * demo::SYS_WRITE, access::W));
                assert_eq!(ev.regs.rsi, sym("module_area") + 24, "the value it tried to store");
                tool.set_registers(0, &ev.regs).unwrap();
                tool.reply(&ev, EventReply::Retry).unwrap();
                pf_blocked += 1;
            }
            ref other => panic!("unexpected {other:?}"),
        }
    }
    assert!(msr_blocked >= 2 && pf_blocked >= 2, "msr {msr_blocked}, pf {pf_blocked}");
    vm.wait_serial("rootkit: LSTAR hijack failed", 2, T);
    vm.wait_serial("rootkit: syscall_table[write] hook failed", 2, T);
    assert!(!vm.serial_text().contains("hijack succeeded") && !vm.serial_text().contains("hook succeeded"));
    assert_eq!(read_u64(&tool, sym("hijacked_syscalls")), 0);
    assert_eq!(read_u64(&tool, sym("hooked_writes")), 0);
    assert_eq!(read_u64(&tool, table_page + 8 * demo::SYS_WRITE), sym("sys_write"));
    assert_eq!(tool.get_registers(0, &[0xc000_0082]).unwrap().msrs[0].data, sym("syscall_entry"));

    // Unblocked, the guest runs on as before.
    tool.control_msr(0, 0xc000_0082, false).unwrap();
    tool.set_page_access(&[(table_page, access::RWX)]).unwrap();
    while let Some(ev) = vcpu_event(&tool, Duration::from_millis(300)) {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    let hellos = vm.serial_text().matches("shell: hello").count();
    vm.wait_serial("shell: hello", hellos + 2, T);
    vm.wait_serial("worker: round", 1, T);
    let t = table(&tool);
    check_table(&t, 1);
    assert!(t.by_pid(4).unwrap().syscalls > 0);
}
