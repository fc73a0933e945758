//! Every hard error closes the connection, and the guest keeps running: its
//! vCPUs make progress, a vCPU that was waiting in an event resumes, and a
//! new connection works.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::net::Shutdown;
use std::time::Duration;
use ukvmi_conformance::raw::RawPeer;
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_endpoint::Disconnect;
use ukvmi_wire::*;

fn setup() -> Setup {
    Setup::new(&FakeConfig { vcpus: 2, ..Default::default() })
}

/// After the connection closed: the reason, the guest runs, and the next
/// connection is served from scratch.
fn assert_recovered(s: &Setup, want: impl Fn(&Disconnect) -> bool) {
    assert!(s.endpoint.wait_disconnected(Some(Duration::from_secs(5))));
    let why = s.endpoint.disconnect_reason().expect("a reason is recorded");
    assert!(want(&why), "unexpected reason: {why}");
    assert!(!matches!(why, Disconnect::Internal(_)), "{why}");
    s.assert_guest_runs(&[0, 1]);
    let mut t = s.raw();
    assert_eq!(t.err_of(msg::GET_VERSION, &[]), 0);
}

/// Pauses vCPU `v` and returns the PAUSE event.
fn paused(t: &mut RawPeer, v: u16) -> ukvmi_conformance::raw::Received {
    t.pause(v, true)
}

#[test]
fn oversize_header_closes_without_a_reply() {
    let s = setup();
    let mut t = s.raw();
    let hdr = MsgHdr { id: msg::GET_VERSION, size: 8185, seq: 1 };
    t.send_bytes(hdr.as_bytes());
    t.send_bytes(&[0; 100]);
    t.expect_closed();
    assert_recovered(&s, |d| matches!(d, Disconnect::Oversize { size: 8185, .. }));
}

#[test]
fn largest_allowed_body_is_fine() {
    let s = setup();
    let mut t = s.raw();
    let seq = t.send(msg::GET_VERSION, &[0; MAX_MSG_SIZE]);
    assert_eq!(t.reply_to(seq).err(), 0);
}

#[test]
fn truncated_body_closes() {
    let s = setup();
    let mut t = s.raw();
    let hdr = MsgHdr { id: msg::VM_READ_PHYSICAL, size: 16, seq: 1 };
    t.send_bytes(hdr.as_bytes());
    t.send_bytes(&[0; 10]);
    t.stream.shutdown(Shutdown::Write).unwrap();
    t.expect_closed();
    assert_recovered(&s, |d| matches!(d, Disconnect::Truncated { expected: 16, got: 10, .. }));
}

#[test]
fn truncated_header_closes() {
    let s = setup();
    let mut t = s.raw();
    t.send_bytes(&[2, 0, 0]);
    t.stream.shutdown(Shutdown::Write).unwrap();
    t.expect_closed();
    assert_recovered(&s, |d| matches!(d, Disconnect::Truncated { expected: 8, got: 3, .. }));
}

#[test]
fn write_physical_larger_than_its_body_closes() {
    let s = setup();
    let mut t = s.raw();
    let w = VmPhysical { gpa: 0x1000, size: 64, padding1: 0, padding2: 0 };
    let mut body = w.as_bytes().to_vec();
    body.extend([0xcc; 63]);
    t.send(msg::VM_WRITE_PHYSICAL, &body);
    t.expect_closed();
    assert_eq!(s.vm.peek(0x1000, 64), vec![0; 64], "nothing was written");
    assert_recovered(&s, |d| matches!(d, Disconnect::WritePhysicalOverflow { size: 64, available: 63 }));
}

#[test]
fn set_page_access_count_larger_than_its_body_closes() {
    let s = setup();
    let mut t = s.raw();
    let h = VmSetPageAccess { count: 2, padding1: 0, padding2: 0 };
    let e = PageAccessEntry { gpa: 0x2000, access: access::R, padding: [0; 7] };
    let body: Vec<u8> = h.as_bytes().iter().chain(e.as_bytes()).copied().collect();
    t.send(msg::VM_SET_PAGE_ACCESS, &body);
    t.expect_closed();
    assert!(s.vm.page_restrictions().is_empty(), "no entry was applied");
    assert_recovered(&s, |d| matches!(d, Disconnect::PageAccessOverflow { count: 2, .. }));
}

#[test]
fn event_reply_for_a_vcpu_that_is_not_waiting_closes() {
    let s = setup();
    let mut t = s.raw();
    let r = VcpuEventReply { action: 0, event: 1, padding1: 0, padding2: 0 };
    t.send_vcpu(msg::VCPU_EVENT, 1, r.as_bytes());
    t.expect_closed();
    assert_recovered(&s, |d| matches!(d, Disconnect::BadEventReply { vcpu: 1, .. }));
}

/// Each malformed reply to a PAUSE event closes the connection, and the
/// paused vCPU resumes as if CONTINUE.
fn bad_reply(make: impl Fn(&mut RawPeer, &ukvmi_conformance::raw::Received), why: &'static str) {
    let s = setup();
    let mut t = s.raw();
    let ev = paused(&mut t, 1);
    let before = s.vm.progress(1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(s.vm.progress(1), before, "vCPU 1 is held by its PAUSE event");
    make(&mut t, &ev);
    t.expect_closed();
    assert_recovered(&s, |d| matches!(d, Disconnect::BadEventReply { vcpu: 1, why: w } if *w == why));
}

fn reply_body(ev: &ukvmi_conformance::raw::Received, r: VcpuEventReply, extra: &[u8]) -> Vec<u8> {
    let v: VcpuEvent = read_zext(tail(&ev.body, 8));
    let h = VcpuHdr { vcpu: v.vcpu, padding1: 0, padding2: 0 };
    h.as_bytes().iter().chain(r.as_bytes()).chain(extra).copied().collect()
}

#[test]
fn event_reply_with_the_wrong_seq_closes() {
    bad_reply(
        |t, ev| {
            let body = reply_body(ev, VcpuEventReply::default(), &[]);
            t.send_bytes(&frame(msg::VCPU_EVENT, ev.hdr.seq + 7, &[&body]).unwrap());
        },
        "sequence number does not match the event",
    );
}

#[test]
fn event_reply_with_nonzero_padding_closes() {
    bad_reply(
        |t, ev| {
            let r = VcpuEventReply { padding2: 1, ..Default::default() };
            t.send_bytes(&frame(msg::VCPU_EVENT, ev.hdr.seq, &[&reply_body(ev, r, &[])]).unwrap());
        },
        "non-zero padding in kvmi_vcpu_event_reply",
    );
}

#[test]
fn event_reply_with_a_payload_the_event_does_not_take_closes() {
    bad_reply(
        |t, ev| {
            let body = reply_body(ev, VcpuEventReply::default(), &[0; 8]);
            t.send_bytes(&frame(msg::VCPU_EVENT, ev.hdr.seq, &[&body]).unwrap());
        },
        "payload larger than the event's reply structure",
    );
}

#[test]
fn event_reply_shorter_than_16_bytes_closes() {
    bad_reply(
        |t, ev| {
            let body = reply_body(ev, VcpuEventReply::default(), &[]);
            t.send_bytes(&frame(msg::VCPU_EVENT, ev.hdr.seq, &[&body[..12]]).unwrap());
        },
        "body shorter than 16 bytes",
    );
}

#[test]
fn an_action_the_event_does_not_accept_closes() {
    for action in [Action::Retry as u8, 3, 0xff] {
        let s = setup();
        let mut t = s.raw();
        let ev = paused(&mut t, 0);
        t.reply_event(&ev, action, &[]);
        t.expect_closed();
        assert_recovered(&s, |d| {
            matches!(d, Disconnect::UnsupportedAction { vcpu: 0, event: "KVMI_VCPU_EVENT_PAUSE", .. })
        });
    }
}

#[test]
fn tool_dying_during_a_pause_event_releases_the_vcpu() {
    let s = setup();
    let mut t = s.raw();
    let _ev0 = paused(&mut t, 0);
    let _ev1 = paused(&mut t, 1);
    // More pauses pending behind the outstanding events.
    let p = VmPauseVcpu { vcpu: 0, wait: 0, padding1: 0, padding2: 0 };
    assert_eq!(t.err_of(msg::VM_PAUSE_VCPU, p.as_bytes()), 0);
    drop(t);
    assert_recovered(&s, |d| matches!(d, Disconnect::PeerClosed));
    // A new tool can pause again, and gets a fresh session (seq restarts at 1).
    let mut t = s.raw();
    let ev = paused(&mut t, 0);
    assert_eq!(ev.hdr.seq, 1, "each connection starts from scratch");
    t.reply_event(&ev, Action::Continue as u8, &[]);
    s.assert_guest_runs(&[0, 1]);
}

#[test]
fn unhook_while_vcpus_wait_releases_them() {
    let s = setup();
    let mut t = s.raw();
    paused(&mut t, 0);
    paused(&mut t, 1);
    let why = s.endpoint.unhook();
    assert_eq!(why, Some(Disconnect::Unhooked));
    t.expect_closed();
    s.assert_guest_runs(&[0, 1]);
}

/// Found by the endpoint fuzz targets (fuzz/README.md): a vCPU the guest has
/// not started can still wait in a PAUSE event where the backend serves its
/// requests (the fake does); the unhook, which drops a never-started vCPU's
/// work, once dropped its release job too and left it waiting for good.
#[test]
fn a_never_started_vcpu_waiting_in_an_event_is_released_by_the_unhook() {
    for round in 0..20 {
        let s = Setup::new(&FakeConfig { vcpus: 2, started: 1, ..Default::default() });
        let mut t = s.raw();
        // A PAUSE event from vCPU 1, which the guest has not started.
        t.pause(1, false);
        // The tool leaves without answering it.
        drop(t);
        assert!(s.endpoint.wait_disconnected(Some(Duration::from_secs(5))));
        s.endpoint.unhook();
        s.vm.start_vcpu(1);
        assert!(s.vm.wait_progress(1, 5, Duration::from_secs(5)), "round {round}: vCPU 1 is still in its PAUSE event");
    }
}
