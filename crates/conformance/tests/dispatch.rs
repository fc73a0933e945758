//! The seed's vCPU message validation (spec §7.2), in its order, answered by
//! the receiving thread; unknown ids; FIFO replies; PAUSE after the queue.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::time::Duration;
use ukvmi_conformance::raw::ReadOutcome;
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_wire::*;

mod common;
use common::{EAGAIN, EINVAL, ENOSYS, EPERM};

fn two_vcpus_one_started() -> Setup {
    Setup::new(&FakeConfig { vcpus: 2, started: 1, ..Default::default() })
}

#[test]
fn unknown_ids_answer_enosys_with_id_and_seq_echoed() {
    let s = two_vcpus_one_started();
    let mut t = s.raw();
    for id in [0xffffu16, 0, 22, 30, 31, 0x8001] {
        let seq = t.send(id, &[]);
        let r = t.reply_to(seq);
        assert_eq!(r.hdr.id, id);
        assert_eq!(r.hdr.size, 8, "error replies carry only the error code");
        assert_eq!(r.err(), ENOSYS, "id {id}");
    }
    s.assert_guest_runs(&[0]);
}

#[test]
fn disallowed_vcpu_command_is_eperm_before_any_other_check() {
    let s = two_vcpus_one_started();
    s.endpoint.permissions().set_command(i32::from(msg::VCPU_GET_INFO), false).unwrap();
    let mut t = s.raw();
    // Bad padding, bad index, not-ready vCPU: EPERM still comes first.
    let bad = VcpuHdr { vcpu: 1, padding1: 1, padding2: 0 };
    assert_eq!(t.err_of(msg::VCPU_GET_INFO, bad.as_bytes()), EPERM);
    assert_eq!(t.vcpu_err_of(msg::VCPU_GET_INFO, 99, &[]), EPERM);
    assert_eq!(t.vcpu_err_of(msg::VCPU_GET_INFO, 1, &[]), EPERM);
    // Other commands are unaffected.
    assert_eq!(t.vcpu_err_of(msg::VCPU_GET_XCR, 0, &[0; 8]), 0);
    // A disallowed VM command too.
    s.endpoint.permissions().set_command(i32::from(msg::VM_GET_INFO), false).unwrap();
    assert_eq!(t.err_of(msg::VM_GET_INFO, &[]), EPERM);
}

#[test]
fn padding_is_checked_before_the_index_and_readiness() {
    let s = two_vcpus_one_started();
    let mut t = s.raw();
    for (p1, p2) in [(1u16, 0u32), (0, 1), (0x8000, 0x8000_0000)] {
        let h = VcpuHdr { vcpu: 0, padding1: p1, padding2: p2 };
        assert_eq!(t.err_of(msg::VCPU_GET_INFO, h.as_bytes()), EINVAL);
        // vCPU 1 is not ready, vCPU 7 does not exist: padding wins.
        let h = VcpuHdr { vcpu: 1, padding1: p1, padding2: p2 };
        assert_eq!(t.err_of(msg::VCPU_GET_INFO, h.as_bytes()), EINVAL);
        let h = VcpuHdr { vcpu: 7, padding1: p1, padding2: p2 };
        assert_eq!(t.err_of(msg::VCPU_GET_INFO, h.as_bytes()), EINVAL);
    }
}

#[test]
fn vcpu_index_out_of_range_is_einval() {
    let s = two_vcpus_one_started();
    let mut t = s.raw();
    for v in [2u16, 99, u16::MAX] {
        assert_eq!(t.vcpu_err_of(msg::VCPU_GET_INFO, v, &[]), EINVAL, "vcpu {v}");
    }
}

#[test]
fn vcpu_not_started_is_eagain_then_works_once_started() {
    let s = two_vcpus_one_started();
    let mut t = s.raw();
    assert_eq!(t.vcpu_err_of(msg::VCPU_GET_INFO, 1, &[]), EAGAIN);
    assert_eq!(t.vcpu_err_of(msg::VCPU_GET_REGISTERS, 1, &[0; 8]), EAGAIN);
    // An event reply to a vCPU that is neither ready nor waiting: EAGAIN,
    // with id 1 and an 8-byte body (spec §2's caveat).
    let seq = t.send_vcpu(msg::VCPU_EVENT, 1, &[0; 8]);
    let r = t.reply_to(seq);
    assert_eq!((r.hdr.id, r.hdr.size, r.err()), (msg::VCPU_EVENT, 8, EAGAIN));
    s.vm.start_vcpu(1);
    let seq = t.send_vcpu(msg::VCPU_GET_INFO, 1, &[]);
    let r = t.reply_to(seq);
    assert_eq!(r.err(), 0);
    assert_eq!(r.hdr.size, 16);
    s.assert_guest_runs(&[0, 1]);
}

#[test]
fn a_short_body_is_zero_extended_and_means_vcpu_0() {
    let s = two_vcpus_one_started();
    let mut t = s.raw();
    // No body at all: vCPU header reads as zeros.
    let seq = t.send(msg::VCPU_GET_INFO, &[]);
    let r = t.reply_to(seq);
    assert_eq!(r.err(), 0);
    let info: VcpuGetInfoReply = read_zext(tail(&r.body, 8));
    assert_eq!(info.tsc_speed, u64::from(ukvmi_conformance::fake::TSC_KHZ) * 1000);
    // A body longer than needed is tolerated.
    let seq = t.send(msg::GET_VERSION, &[0xaa; 300]);
    assert_eq!(t.reply_to(seq).err(), 0);
}

#[test]
fn replies_of_one_vcpu_come_in_fifo_order() {
    let s = Setup::new(&FakeConfig { vcpus: 2, ..Default::default() });
    let mut t = s.raw();
    // Queue many commands in one write so they wait in the job queue together.
    let mut bytes = Vec::new();
    let mut seqs = Vec::new();
    for i in 0..200u32 {
        let seq = 50_000 + i;
        let id = if i % 3 == 0 { msg::VCPU_GET_INFO } else { msg::VCPU_GET_REGISTERS };
        let body: Vec<u8> = VcpuHdr::default().as_bytes().iter().copied().chain([0u8; 8]).collect();
        bytes.extend(frame(id, seq, &[&body]).unwrap());
        seqs.push(seq);
    }
    t.send_bytes(&bytes);
    for want in seqs {
        let r = t.recv();
        assert_eq!(r.hdr.seq, want, "replies for one vCPU must keep the order of the commands");
        assert_eq!(r.err(), 0);
    }
}

#[test]
fn pause_events_wait_for_the_job_queue_to_drain() {
    let s = Setup::new(&FakeConfig::default());
    let mut t = s.raw();
    let pause = VmPauseVcpu { vcpu: 0, wait: 1, padding1: 0, padding2: 0 };
    let first = t.pause(0, true);
    assert_eq!(first.hdr.size, 552);
    // While the vCPU is held: a second pause, then commands, then the reply.
    let p2 = t.send(msg::VM_PAUSE_VCPU, pause.as_bytes());
    assert_eq!(t.reply_to(p2).err(), 0);
    let cmds: Vec<u32> = (0..5).map(|_| t.send_vcpu(msg::VCPU_GET_INFO, 0, &[])).collect();
    t.reply_event(&first, Action::Continue as u8, &[]);
    for seq in cmds {
        assert_eq!(t.reply_to(seq).err(), 0, "commands queued before the reply run first");
    }
    let second = t.recv();
    assert_eq!(second.event_id(), event::PAUSE, "then the pending pause");
    assert!(second.hdr.seq > first.hdr.seq, "event seqs grow: {} then {}", first.hdr.seq, second.hdr.seq);
    t.reply_event(&second, Action::Continue as u8, &[]);
    s.assert_guest_runs(&[0]);
    assert!(matches!(t.read(Duration::from_millis(50)), ReadOutcome::Timeout));
}

#[test]
fn more_than_1001_pending_pauses_is_ebusy() {
    let s = Setup::new(&FakeConfig::default());
    let mut t = s.raw();
    let pause = VmPauseVcpu { vcpu: 0, wait: 1, padding1: 0, padding2: 0 };
    t.pause(0, true);
    // The vCPU is held in the event, so further pauses stay pending.
    let nowait = VmPauseVcpu { wait: 0, ..pause };
    for i in 0..1002 {
        assert_eq!(t.err_of(msg::VM_PAUSE_VCPU, nowait.as_bytes()), 0, "pause {i}");
    }
    assert_eq!(t.err_of(msg::VM_PAUSE_VCPU, nowait.as_bytes()), -16);
    // Disconnecting drops the pending pauses; the guest runs on.
    drop(t);
    s.endpoint.wait_disconnected(Some(Duration::from_secs(5)));
    s.assert_guest_runs(&[0]);
}
