//! `UKVMI_VM_MAP_MEMORY` end to end: a real VM on /dev/kvm (`ukvmi run`),
//! the introspector library over a real socket, and the guest RAM memfd
//! mapped into this process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{read_u64, start_all_up, RunningVm, Scratch};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use ukvmi_guests::layout::{self, pf_data_addr};
use ukvmi_introspector::wire::{access, event, msg, KvmErrno};
use ukvmi_introspector::{Error, Event, EventPayload, EventReply, GuestMemoryMap, Listener, Vm};

const T: Duration = Duration::from_secs(20);
const RAM: u64 = 64 << 20;
const MAP: u16 = msg::UKVMI_VM_MAP_MEMORY;

fn errno<X: std::fmt::Debug>(r: ukvmi_introspector::Result<X>) -> KvmErrno {
    match r {
        Err(e) => e.errno().unwrap_or_else(|| panic!("not a KVM error: {e}")),
        Ok(x) => panic!("expected an error, got {x:?}"),
    }
}

fn counter(vcpu: u16) -> u64 {
    layout::COUNTER_BASE + 8 * u64::from(vcpu)
}

/// Asserts `map` shows the running guest's loop counter of `vcpu` moving,
/// in step with READ_PHYSICAL.
fn assert_counter_live(tool: &Vm, map: &GuestMemoryMap, vcpu: u16) {
    let a = map.read_u64(counter(vcpu)).unwrap();
    let t0 = Instant::now();
    let mut last = a;
    while last < a + 20 {
        assert!(t0.elapsed() < T, "vCPU {vcpu}'s counter stuck at {last} in the view");
        std::thread::sleep(Duration::from_millis(10));
        let before = map.read_u64(counter(vcpu)).unwrap();
        let rp = read_u64(tool, counter(vcpu));
        let after = map.read_u64(counter(vcpu)).unwrap();
        assert!(before <= rp && rp <= after, "view {before}..{after} vs READ_PHYSICAL {rp}");
        assert!(before >= last, "the counter went backwards in the view");
        last = after;
    }
}

#[test]
fn the_view_equals_read_physical_and_follows_the_running_guest() {
    let dir = Scratch::new("zc-view");
    let (vm, _l, tool) = start_all_up(&dir, "spin", 2, &[]);
    assert_eq!(tool.check_command(MAP).map_err(|e| e.to_string()), Ok(()));
    let map = tool.map_memory().unwrap();
    assert_eq!((map.len(), map.gpa().raw(), map.is_writable()), (RAM, 0, false));
    // Static ranges (page tables, image, both pattern pages): byte for byte
    // what READ_PHYSICAL returns, page by page.
    for (start, pages) in [(0u64, 4u64), (layout::LOAD_ADDR, 4), (layout::PATTERN_BASE, 2)] {
        let mut view = vec![0u8; (pages * 4096) as usize];
        map.read(start, &mut view).unwrap();
        for p in 0..pages {
            let want = tool.read_physical(start + p * 4096, 4096).unwrap();
            assert_eq!(&view[(p * 4096) as usize..][..4096], &want[..], "page {:#x}", start + p * 4096);
        }
    }
    for j in [0usize, 1, 4095] {
        let mut b = [0u8];
        map.read(layout::PATTERN_BASE + 0x1000 + j as u64, &mut b).unwrap();
        assert_eq!(b[0], layout::pattern_byte(1, j));
    }
    // The guest's counters move in the view as the guest runs.
    assert_counter_live(&tool, &map, 0);
    assert_counter_live(&tool, &map, 1);
    // Bounds: the last byte of RAM is there, the next is not.
    let mut b = [0u8; 2];
    assert!(map.read(RAM - 2, &mut b).is_ok());
    assert!(matches!(map.read(RAM - 1, &mut b), Err(Error::OutOfRange { .. })));
    assert!(matches!(map.write(0x50_0000, &[1]), Err(Error::ReadOnlyMap)));
    vm.assert_guest_runs();
}

#[test]
fn the_read_only_descriptor_cannot_be_made_writable() {
    let dir = Scratch::new("zc-ro");
    let (vm, _l, tool) = start_all_up(&dir, "spin", 1, &[]);
    let map = tool.map_memory().unwrap();
    // SAFETY: only the address is used, for mprotect on our own mapping.
    let base = unsafe { map.as_ptr() };
    // The file behind the mapping was opened read-only by the VMM: a shared
    // mapping of it can never gain PROT_WRITE.
    // SAFETY: mprotect on the first page of a mapping we own.
    let r = unsafe { libc::mprotect(base.cast(), 4096, libc::PROT_READ | libc::PROT_WRITE) };
    assert_eq!(r, -1, "mprotect(PROT_WRITE) on the read-only view must fail");
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EACCES));
    // /proc/self/maps shows it read-only and shared, backed by the VMM's memfd.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps
        .lines()
        .find(|l| l.starts_with(&format!("{:x}-", base as usize)))
        .unwrap_or_else(|| panic!("no mapping at {base:?}"));
    assert!(line.contains(" r--s ") && line.contains("ukvmi-guest-ram"), "{line}");
    drop(map);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    assert!(!maps.lines().any(|l| l.starts_with(&format!("{:x}-", base as usize))), "unmapped on drop");
    vm.assert_guest_runs();
}

#[test]
fn writable_needs_write_physical_and_its_writes_are_seen_by_read_physical() {
    let dir = Scratch::new("zc-rw");
    // Only the map and READ_PHYSICAL (by name, both prefixes, and by number).
    let map_id = MAP.to_string();
    let (vm, _l, tool) = start_all_up(
        &dir,
        "spin",
        1,
        &[
            "--allow-command",
            "UKVMI_VM_MAP_MEMORY",
            "--allow-command",
            "KVMI_VM_READ_PHYSICAL",
            "--allow-command",
            &map_id,
        ],
    );
    assert_eq!(errno(tool.map_memory_writable()), KvmErrno::Eperm);
    let ro = tool.map_memory().unwrap();
    assert!(!ro.is_writable());
    assert_eq!(ro.read_u64(layout::PATTERN_BASE).unwrap(), read_u64(&tool, layout::PATTERN_BASE));
    drop(tool);
    drop(vm);

    let dir = Scratch::new("zc-rw2");
    let (vm, _l, tool) = start_all_up(&dir, "spin", 1, &[]);
    let rw = tool.map_memory_writable().unwrap();
    let ro = tool.map_memory().unwrap();
    assert!(rw.is_writable());
    // Across a page boundary, in RAM the guest does not use.
    let gpa = 0x50_0ffc;
    rw.write(gpa, b"zerocopy").unwrap();
    assert_eq!(tool.read_physical(gpa, 4).unwrap(), b"zero");
    assert_eq!(tool.read_physical(gpa + 4, 4).unwrap(), b"copy");
    assert_eq!(ro.read_u64(gpa).unwrap(), u64::from_le_bytes(*b"zerocopy"), "one memory, two views");
    // And the other way: WRITE_PHYSICAL shows up in both views.
    tool.write_physical(0x50_2000, &0x1122_3344_5566_7788u64.to_le_bytes()).unwrap();
    assert_eq!(rw.read_u64(0x50_2000).unwrap(), 0x1122_3344_5566_7788);
    vm.assert_guest_runs();
}

#[test]
fn allow_command_without_it_is_eperm() {
    let dir = Scratch::new("zc-eperm");
    let (vm, _l, tool) = start_all_up(
        &dir,
        "spin",
        1,
        &["--allow-command", "KVMI_VM_READ_PHYSICAL", "--allow-command", "KVMI_VM_WRITE_PHYSICAL"],
    );
    assert_eq!(errno(tool.check_command(MAP)), KvmErrno::Eperm);
    assert_eq!(errno(tool.map_memory()), KvmErrno::Eperm);
    assert_eq!(errno(tool.map_memory_writable()), KvmErrno::Eperm);
    // The connection goes on.
    assert_eq!(
        tool.read_physical(layout::PATTERN_BASE, 2).unwrap(),
        vec![layout::pattern_byte(0, 0), layout::pattern_byte(0, 1)]
    );
    vm.assert_guest_runs();
}

#[test]
fn page_protection_still_fires_for_the_guest_while_mapped() {
    let dir = Scratch::new("zc-pf");
    let (vm, _l, tool) = start_all_up(&dir, "pf", 1, &[]);
    let rw = tool.map_memory_writable().unwrap();
    let a = pf_data_addr(0);
    tool.control_events(0, event::PF, true).unwrap();
    tool.set_page_access(&[(a, access::R | access::X)]).unwrap();
    for round in 0..3u64 {
        // The guest's store to page A still stops in a PF event ...
        let ev = loop {
            match tool.next_event(Some(T)).unwrap() {
                Some(Event::Vcpu(ev)) => match ev.payload {
                    EventPayload::Pf { gpa, access: acc, .. } if gpa == a => {
                        assert_eq!(acc, access::W, "round {round}");
                        break ev;
                    }
                    EventPayload::Pf { .. } => tool.reply(&ev, EventReply::Continue).unwrap(),
                    ref other => panic!("unexpected event {other:?}"),
                },
                other => panic!("expected a PF event, got {other:?}"),
            }
        };
        // ... while the tool's own writes through the view are not
        // restricted: no event, and READ_PHYSICAL sees them at once.
        let marker = 0xabcd_0000 + round;
        rw.write(a + 0x800, &marker.to_le_bytes()).unwrap();
        assert_eq!(read_u64(&tool, a + 0x800), marker);
        assert!(rw.read_u64(a).is_ok(), "reads of the protected page through the view work too");
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    // The guest's write was applied by CONTINUE: the view shows the value
    // the guest last tried to store.
    let t0 = Instant::now();
    loop {
        let tried = read_u64(&tool, layout::PF_TRIED_BASE);
        if rw.read_u64(a).unwrap() == tried {
            break;
        }
        assert!(t0.elapsed() < T, "page A never held the guest's value");
        match tool.next_event(Some(Duration::from_millis(50))).unwrap() {
            Some(Event::Vcpu(ev)) => tool.reply(&ev, EventReply::Continue).unwrap(),
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    tool.set_page_access(&[(a, access::RWX)]).unwrap();
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(300))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    vm.assert_guest_runs();
}

/// Env var that turns [`child_tool_holds_the_map`] into the child tool.
const CHILD_SOCK: &str = "UKVMI_ZC_CHILD_SOCK";

/// The child process of [`a_tool_killed_while_holding_the_map_leaves_the_vm_fine`]:
/// accepts the VMM, maps guest RAM (read-only and writable), says so on
/// stdout, and waits to be killed.
#[test]
#[ignore = "helper process, run by a_tool_killed_while_holding_the_map_leaves_the_vm_fine"]
fn child_tool_holds_the_map() {
    let sock = std::env::var(CHILD_SOCK).expect("run only by a_tool_killed_while_holding_the_map_leaves_the_vm_fine");
    let tool = Listener::bind(&sock).unwrap().with_handshake_timeout(T).accept().unwrap();
    let ro = tool.map_memory().unwrap();
    let rw = tool.map_memory_writable().unwrap();
    rw.write(0x50_0000, b"child").unwrap();
    println!("MAPPED {}", ro.read_u64(counter(0)).unwrap());
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_tool_killed_while_holding_the_map_leaves_the_vm_fine() {
    let dir = Scratch::new("zc-kill");
    let sock = dir.path("kvmi.sock");
    let intro = format!("unix:{}", sock.display());
    let vm = RunningVm::start(&dir, &["--guest", "spin", "--introspect", &intro, "--reconnect", "0.2"]);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_tool_holds_the_map", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD_SOCK, &sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The child's lines, read on a thread so that a stuck child fails the
    // test instead of hanging it. libtest prints "test NAME ... " first,
    // on the same line.
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let t0 = Instant::now();
    loop {
        let left = T.saturating_sub(t0.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("MAPPED ") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("the child tool never mapped guest memory ({e})");
            }
        }
    }
    // SIGKILL: no unmapping, no close, no UNHOOK; the kernel tears it all down.
    child.kill().unwrap();
    child.wait().unwrap();
    vm.assert_guest_runs();
    // The VMM reconnects to the next tool, whose map works as before and
    // still holds what the killed tool wrote.
    let tool = Listener::bind(&sock).unwrap().with_handshake_timeout(T).accept().unwrap();
    let map = tool.map_memory().unwrap();
    let mut b = [0u8; 5];
    map.read(0x50_0000, &mut b).unwrap();
    assert_eq!(&b, b"child");
    assert_counter_live(&tool, &map, 0);
    vm.assert_guest_runs();
    assert!(!vm.stderr_text().contains("panicked"), "{}", vm.stderr_text());
}

/// 4 MiB of guest RAM read three ways: through READ_PHYSICAL one page per
/// round trip, through the view in one copy, and through the view page by
/// page. They agree wherever the guest does not write. (How fast each is
/// belongs to the benchmarks: BENCHMARKS.md, `vs_gdbstub`.)
#[test]
fn the_view_and_read_physical_agree_in_one_copy_and_page_by_page() {
    let dir = Scratch::new("zc-agree");
    let (_vm, _l, tool) = start_all_up(&dir, "spin", 1, &[]);
    const LEN: usize = 4 << 20;
    let map = tool.map_memory().unwrap();
    let mut via_socket = vec![0u8; LEN];
    for (i, page) in via_socket.chunks_mut(4096).enumerate() {
        tool.read_physical_into(i as u64 * 4096, page).unwrap();
    }
    let mut via_map = vec![0u8; LEN];
    map.read(0, &mut via_map).unwrap();
    let mut paged = vec![0u8; LEN];
    for (i, page) in paged.chunks_mut(4096).enumerate() {
        map.read(i as u64 * 4096, page).unwrap();
    }
    // The first 1 MiB (below the image and the counters) is static, but
    // for vCPU 0's stack (0x7c000..0x80000), which moves as the guest runs;
    // so is the image (the next MiB).
    for (from, to) in [(0, 0x7c000), (0x80000, 2 << 20)] {
        assert!(via_map[from..to] == via_socket[from..to], "view and READ_PHYSICAL differ in {from:#x}..{to:#x}");
        assert!(
            paged[from..to] == via_map[from..to],
            "the view page by page and in one copy differ in {from:#x}..{to:#x}"
        );
    }
}
