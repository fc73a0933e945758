//! The fast paths keep the protocol's semantics: bulk READ_PHYSICAL
//! (pipelined by the library, answered in batches by the receiving thread),
//! GET_REGISTERS answered from the registers the event captured (on the
//! vCPU thread, in its FIFO order), and callers that read their
//! own replies while events and other callers' replies arrive.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::time::Duration;
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_introspector::{Event, EventReply, Vm};
use ukvmi_wire::*;

mod common;
use common::{code, EINVAL};

const T: Duration = Duration::from_secs(10);

/// A recognisable pattern: byte i of RAM is a hash of i.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

#[test]
fn read_physical_range_reads_any_span_and_matches_guest_memory() {
    let s = Setup::new(&FakeConfig::default());
    let ram = pattern(1 << 20);
    s.vm.poke_mem(0, &ram);
    let vm = Vm::connect_raw(s.connect()).unwrap();
    // Unaligned start and end, several pages, one page, a sliver, empty.
    for (gpa, len) in [(0x1234usize, 5 * 4096 + 777), (0x8000, 4096), (0x9ffe, 3), (0x4000, 0), (0, 1 << 20)] {
        let mut buf = vec![0xeeu8; len];
        vm.read_physical_range(gpa as u64, &mut buf).unwrap();
        assert!(buf == ram[gpa..gpa + len], "range {gpa:#x}+{len:#x} differs from guest memory");
    }
    assert_eq!(vm.raw().unmatched_count(), 0);
}

#[test]
fn read_physical_range_past_ram_fails_and_the_connection_stays_usable() {
    let s = Setup::new(&FakeConfig::default());
    let vm = Vm::connect_raw(s.connect()).unwrap();
    // 64 pages in RAM, then 64 beyond its end (1 MiB): the first failing
    // piece's error comes back; every reply owed is collected.
    let mut buf = vec![0u8; 128 * 4096];
    assert_eq!(code(vm.read_physical_range((1 << 20) - 64 * 4096, &mut buf)), -2);
    assert!(
        matches!(vm.read_physical_range(u64::MAX - 10, &mut [0u8; 20]), Err(ukvmi_introspector::Error::Refused(_))),
        "a range that wraps around is refused before anything is sent"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm.raw().unmatched_count(), 0, "no reply arrived after its request gave up");
    assert_eq!(vm.vcpu_count().unwrap(), 1, "the connection still works");
    let mut one = [0u8; 8];
    vm.read_physical_range(0x100, &mut one).unwrap();
}

#[test]
fn batched_read_physical_replies_keep_their_order_among_other_commands() {
    let s = Setup::new(&FakeConfig::default());
    let ram = pattern(1 << 20);
    s.vm.poke_mem(0, &ram);
    let mut t = s.raw();
    // One write: reads (good and bad) mixed with other VM commands and a
    // vCPU command; every reply must come in request order for the VM
    // commands, each with its own answer.
    let phys = |gpa: u64, size: u16| VmPhysical { gpa, size, padding1: 0, padding2: 0 };
    let mut bytes = Vec::new();
    let mut expect: Vec<(u32, u16, i32, Option<Vec<u8>>)> = Vec::new();
    let mut push = |t: &mut ukvmi_conformance::raw::RawPeer, id: u16, body: &[u8], err: i32, data: Option<Vec<u8>>| {
        let seq = t.next_seq();
        bytes.extend_from_slice(&frame(id, seq, &[body]).unwrap());
        expect.push((seq, id, err, data));
    };
    for i in 0..20u64 {
        let at = 0x10_000 + i as usize * 4096;
        push(&mut t, msg::VM_READ_PHYSICAL, phys(at as u64, 4096).as_bytes(), 0, Some(ram[at..at + 4096].to_vec()));
    }
    push(&mut t, msg::VM_READ_PHYSICAL, phys(0x20_ffe, 4).as_bytes(), EINVAL, None);
    push(
        &mut t,
        msg::VM_READ_PHYSICAL,
        phys(0x21_000, 100).as_bytes(),
        0,
        Some(ram[0x21_000..0x21_000 + 100].to_vec()),
    );
    push(&mut t, msg::VM_READ_PHYSICAL, phys(1 << 20, 8).as_bytes(), -2, None);
    push(&mut t, msg::VM_GET_INFO, &[], 0, Some(VmGetInfoReply { vcpu_count: 1, padding: [0; 3] }.as_bytes().to_vec()));
    push(&mut t, msg::VM_READ_PHYSICAL, phys(0x22_000, 4096).as_bytes(), 0, Some(ram[0x22_000..0x23_000].to_vec()));
    let w = VmPhysical { gpa: 0x30_000, size: 4, padding1: 0, padding2: 0 };
    let wbody: Vec<u8> = w.as_bytes().iter().chain(b"new!").copied().collect();
    push(&mut t, msg::VM_WRITE_PHYSICAL, &wbody, 0, Some(Vec::new()));
    push(&mut t, msg::VM_READ_PHYSICAL, phys(0x30_000, 4).as_bytes(), 0, Some(b"new!".to_vec()));
    t.send_bytes(&bytes);
    for (seq, id, err, data) in expect {
        let r = t.recv();
        assert_eq!((r.hdr.seq, r.hdr.id), (seq, id), "replies in request order");
        assert_eq!(r.err(), err, "seq {seq}");
        match data {
            Some(d) => assert!(r.body[8..] == d[..], "data of seq {seq} (a read after the write sees it)"),
            None => assert_eq!(r.body.len(), 8, "an error reply carries only the code"),
        }
    }
}

#[test]
fn registers_of_a_parked_vcpu_come_in_fifo_order_with_its_other_commands() {
    let s = Setup::new(&FakeConfig::default());
    let mut t = s.raw();
    let ev = t.pause(0, true);
    assert_eq!(ev.event_id(), event::PAUSE);
    std::thread::sleep(Duration::from_millis(20)); // the vCPU parks
    let regs_in_event: VcpuEvent = read_zext(&ev.body[8..]);
    // Alternate commands that only the vCPU thread can answer (MSRs, XSAVE)
    // with plain GET_REGISTERS the receiving thread may answer itself:
    // replies must keep the vCPU's FIFO order.
    let hdr = VcpuHdr { vcpu: 0, padding1: 0, padding2: 0 };
    let get_regs = |nmsrs: u16| {
        let mut b: Vec<u8> = hdr.as_bytes().to_vec();
        b.extend_from_slice(VcpuGetRegisters { nmsrs, padding1: 0, padding2: 0 }.as_bytes());
        for _ in 0..nmsrs {
            b.extend_from_slice(&0x174u32.to_le_bytes());
        }
        b
    };
    let mut bytes = Vec::new();
    let mut seqs = Vec::new();
    for round in 0..10 {
        for (id, body) in [
            (msg::VCPU_GET_REGISTERS, get_regs(0)),
            (msg::VCPU_GET_XSAVE, hdr.as_bytes().to_vec()),
            (msg::VCPU_GET_REGISTERS, get_regs(1)),
            (msg::VCPU_GET_REGISTERS, get_regs(0)),
        ] {
            let seq = t.next_seq();
            bytes.extend_from_slice(&frame(id, seq, &[&body]).unwrap());
            seqs.push((seq, id));
            if round % 2 == 1 {
                // One by one, the vCPU parking in between: the receiving
                // thread answers the plain reads itself.
                t.send_bytes(&std::mem::take(&mut bytes));
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // In bursts: reads queue behind the vCPU thread's jobs.
        t.send_bytes(&std::mem::take(&mut bytes));
    }
    for (seq, id) in seqs {
        let r = t.recv();
        assert_eq!((r.hdr.seq, r.hdr.id), (seq, id), "FIFO replies for one vCPU");
        assert_eq!(r.err(), 0);
        if id == msg::VCPU_GET_REGISTERS {
            let got: VcpuGetRegistersReply = read_zext(&r.body[8..]);
            assert_eq!(got.regs, regs_in_event.arch.regs, "the registers the event captured");
            assert_eq!(got.sregs, regs_in_event.arch.sregs);
        }
    }
    // After the reply the vCPU runs again: its registers move on.
    let reply = VcpuEventReply { action: Action::Continue as u8, event: event::PAUSE as u8, padding1: 0, padding2: 0 };
    let body: Vec<u8> = hdr.as_bytes().iter().chain(reply.as_bytes()).copied().collect();
    t.send_bytes(&frame(msg::VCPU_EVENT, ev.hdr.seq, &[&body]).unwrap());
    s.assert_guest_runs(&[0]);
}

#[test]
fn callers_reading_for_themselves_share_the_socket_with_events_and_each_other() {
    let s = Setup::new(&FakeConfig { vcpus: 2, ..Default::default() });
    let vm = Vm::connect_raw(s.connect()).unwrap();
    vm.control_events(0, event::PAUSE, true).unwrap();
    std::thread::scope(|sc| {
        // Four threads issue commands while a fifth pauses and resumes the
        // vCPUs: every reply reaches its caller, every event the event
        // taker, whoever happened to read it off the socket.
        for k in 0..4u64 {
            let vm = &vm;
            sc.spawn(move || {
                for i in 0..300u64 {
                    // Each thread its own addresses (it reads back what it wrote).
                    let gpa = 0x100 * (k * 300 + i);
                    vm.write_physical(gpa, &i.to_le_bytes()).unwrap();
                    assert_eq!(vm.read_physical(gpa, 8).unwrap(), i.to_le_bytes());
                    assert_eq!(vm.vcpu_count().unwrap(), 2);
                }
            });
        }
        let vm = &vm;
        sc.spawn(move || {
            for i in 0..100u16 {
                let vcpu = i % 2;
                vm.pause_vcpu(vcpu, true).unwrap();
                let Some(Event::Vcpu(ev)) = vm.next_event(Some(T)).unwrap() else { panic!("no PAUSE event") };
                assert_eq!((ev.event.raw(), ev.vcpu.raw()), (event::PAUSE, vcpu));
                assert_eq!(vm.get_registers(vcpu, &[]).unwrap().regs, ev.regs);
                vm.reply(&ev, EventReply::Continue).unwrap();
            }
        });
    });
    assert_eq!(vm.raw().unmatched_count(), 0);
    assert!(vm.next_event(Some(Duration::from_millis(50))).unwrap().is_none(), "no stray event");
}
