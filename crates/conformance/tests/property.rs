//! Random and mutated messages thrown at the endpoint over a real socket.
//! Properties: nothing panics (endpoint, fake vCPUs); every reply is well
//! formed; a hard error always closes the connection (and only then is the
//! connection closed); the guest keeps running afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use proptest::prelude::*;
use std::collections::HashMap;
use std::time::Duration;
use ukvmi_conformance::raw::ReadOutcome;
use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_endpoint::Disconnect;
use ukvmi_wire::*;

#[derive(Debug, Clone)]
enum Gen {
    /// A framed message with a plausible body.
    Framed { id: u16, body: Vec<u8> },
    /// Raw bytes that break the framing.
    Raw(Vec<u8>),
    /// A header announcing more than 8184 bytes.
    Oversize(u16),
}

fn ids() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => prop::sample::select(msg::VM_COMMANDS.to_vec()),
        4 => prop::sample::select(msg::VCPU_COMMANDS.to_vec()),
        1 => Just(msg::VCPU_EVENT),
        1 => any::<u16>(),
    ]
}

/// Bodies biased to zeros, so that validation passes often enough to reach
/// the handlers, with random bytes sprinkled in.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(prop_oneof![6 => Just(0u8), 1 => 1u8..4, 1 => any::<u8>()], 0..48),
        1 => prop::collection::vec(any::<u8>(), 0..200),
        1 => (0usize..4200).prop_map(|n| vec![0u8; n]),
    ]
}

fn gen() -> impl Strategy<Value = Gen> {
    prop_oneof![
        20 => (ids(), body()).prop_map(|(id, body)| {
            // vCPU messages mostly name vCPU 0 or 1 with clean padding.
            Gen::Framed { id, body }
        }),
        1 => prop::collection::vec(any::<u8>(), 1..24).prop_map(Gen::Raw),
        1 => (8185u16..=u16::MAX).prop_map(Gen::Oversize),
    ]
}

fn check_reply(m: &ukvmi_conformance::raw::Received) {
    assert!(m.hdr.size >= 8, "reply too short: {:?}", m.hdr);
    let err = m.err();
    if err != 0 {
        assert!(KvmErrno::from_wire(err).is_some(), "unknown error {err}");
        assert_eq!(m.hdr.size, 8, "an error reply carries no data: {:?}", m.hdr);
    }
    let pad: ErrorCode = read_zext(&m.body);
    assert_eq!(pad.padding, 0);
}

fn run_case(msgs: Vec<Gen>) {
    let s = Setup::new(&FakeConfig { vcpus: 2, started: 1, ..Default::default() });
    let mut t = s.raw();
    let mut sent: HashMap<u32, u16> = HashMap::new();
    let mut framing_intact = true;
    let mut must_close = false;
    for g in &msgs {
        match g {
            Gen::Framed { id, body } => {
                let seq = t.send(*id, body);
                if framing_intact {
                    sent.insert(seq, *id);
                }
            }
            Gen::Raw(b) => {
                t.send_bytes(b);
                framing_intact = false;
            }
            Gen::Oversize(size) => {
                let h = MsgHdr { id: msg::GET_VERSION, size: *size, seq: 1 };
                t.send_bytes(h.as_bytes());
                if framing_intact {
                    must_close = true;
                }
                framing_intact = false;
            }
        }
    }
    // A marker: once it is answered, every VM command before it was.
    let marker = framing_intact.then(|| t.send(msg::GET_VERSION, &[]));
    if let Some(seq) = marker {
        sent.insert(seq, msg::GET_VERSION);
    }
    let mut closed = false;
    let mut quiet_after_marker = 0;
    loop {
        match t.read(Duration::from_millis(100)) {
            ReadOutcome::Closed => {
                closed = true;
                break;
            }
            ReadOutcome::Timeout => {
                quiet_after_marker += 1;
                if quiet_after_marker >= 3 {
                    break;
                }
            }
            ReadOutcome::Msg(m) => {
                if m.hdr.id == msg::VCPU_EVENT && usize::from(m.hdr.size) >= VCPU_EVENT_BODY_BASE {
                    // Keep paused vCPUs moving.
                    t.reply_event(&m, Action::Continue as u8, &[]);
                    continue;
                }
                if m.hdr.id == msg::VM_EVENT && m.hdr.size == 8 {
                    continue;
                }
                check_reply(&m);
                if framing_intact {
                    let id = sent.get(&m.hdr.seq).copied();
                    assert_eq!(id, Some(m.hdr.id), "reply {:?} matches no request", m.hdr);
                }
                if Some(m.hdr.seq) == marker {
                    quiet_after_marker = 0;
                }
            }
        }
    }
    if must_close {
        assert!(closed, "an oversize header must close the connection");
    }
    let reason = s.endpoint.disconnect_reason();
    if let Some(r) = &reason {
        assert!(!matches!(r, Disconnect::Internal(_)), "{r}");
        // A hard error was recorded: the tool must have seen EOF.
        assert!(closed, "hard error {r} without closing the connection");
    }
    if closed {
        assert!(reason.is_some(), "closed without a recorded reason");
    }
    drop(t);
    s.endpoint.wait_disconnected(Some(Duration::from_secs(5)));
    s.assert_guest_runs(&[0]);
    // The endpoint still serves a new connection.
    let mut t2 = s.raw();
    assert_eq!(t2.err_of(msg::GET_VERSION, &[]), 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_messages_never_break_the_endpoint(msgs in prop::collection::vec(gen(), 1..24)) {
        run_case(msgs);
    }

    #[test]
    fn mutated_valid_messages(flips in prop::collection::vec((0usize..64, any::<u8>()), 1..6), which in 0usize..6) {
        // Start from a valid message and flip bytes anywhere in it, header included.
        let vcpu = VcpuHdr::default();
        let valid: Vec<Vec<u8>> = vec![
            frame(msg::VM_READ_PHYSICAL, 5, &[VmPhysical { gpa: 0x3000, size: 16, padding1: 0, padding2: 0 }.as_bytes()]).unwrap(),
            frame(msg::VM_WRITE_PHYSICAL, 5, &[VmPhysical { gpa: 0x3000, size: 4, padding1: 0, padding2: 0 }.as_bytes(), &[1, 2, 3, 4]]).unwrap(),
            frame(msg::VCPU_GET_REGISTERS, 5, &[vcpu.as_bytes(), VcpuGetRegisters { nmsrs: 1, padding1: 0, padding2: 0 }.as_bytes(), &0xc000_0080u32.to_le_bytes()]).unwrap(),
            frame(msg::VM_SET_PAGE_ACCESS, 5, &[VmSetPageAccess { count: 1, padding1: 0, padding2: 0 }.as_bytes(), PageAccessEntry { gpa: 0x4000, access: 7, padding: [0; 7] }.as_bytes()]).unwrap(),
            frame(msg::VM_PAUSE_VCPU, 5, &[VmPauseVcpu { vcpu: 0, wait: 1, padding1: 0, padding2: 0 }.as_bytes()]).unwrap(),
            frame(msg::VCPU_CONTROL_EVENTS, 5, &[vcpu.as_bytes(), ControlEvents { event_id: event::BREAKPOINT, enable: 1, padding1: 0, padding2: 0 }.as_bytes()]).unwrap(),
        ];
        let mut m = valid[which].clone();
        for (pos, val) in flips {
            let i = pos % m.len();
            m[i] = val;
        }
        // Re-frame honestly when the size field still fits what we send;
        // otherwise send the bytes as they are (a lying size field).
        let hdr: MsgHdr = read_zext(&m);
        let gen = if usize::from(hdr.size) == m.len() - 8 {
            Gen::Framed { id: hdr.id, body: m[8..].to_vec() }
        } else if usize::from(hdr.size) > MAX_MSG_SIZE {
            Gen::Oversize(hdr.size)
        } else {
            Gen::Raw(m)
        };
        run_case(vec![gen]);
    }
}
