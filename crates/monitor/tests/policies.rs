//! The monitor's policies against the conformance crate's fake VM (no KVM):
//! the page guard, held pauses with the hypercall responder, a breakpoint
//! stepped over, and an event answered while another tool's setup waits
//! on a vCPU.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::time::{Duration, Instant};

use ukvmi_conformance::{fake::KERNEL_BASE, FakeConfig, GuestAction, Setup};
use ukvmi_introspector::wire::access;
use ukvmi_introspector::Vm;
use ukvmi_monitor::{Kinds, Monitor, Record, Subscription};

const LSTAR: u32 = 0xc000_0082;
const SYSENTER_EIP: u32 = 0x176;
const T: Duration = Duration::from_secs(10);

fn attach(s: &Setup) -> Monitor {
    Monitor::start(Vm::connect_raw(s.connect()).unwrap()).unwrap()
}

fn next(sub: &Subscription) -> Record {
    sub.next(T).unwrap().expect("a record within the timeout")
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + T;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_page_guard_refuses_writes_until_its_subscription_goes() {
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s);
    let sub = mon.subscribe(Kinds { pages: true, ..Kinds::default() });
    assert_eq!(mon.protect(&sub, 0x5010, 1, access::W, true).unwrap(), vec![0x5000]);
    assert_eq!(s.vm.page_restrictions().get(&5), Some(&(access::R | access::X)));
    s.vm.guest_does(0, GuestAction::Write { gpa: 0x5010, value: 0x41 });
    match next(&sub) {
        Record::Page { who, gpa, access, blocked, .. } => {
            assert_eq!((who.vcpu, gpa, access, blocked), (0, 0x5010, 'w', true));
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(s.vm.peek(0x5010, 1), [0], "a refused write landed");
    // The guard goes with its subscription: the page gets its access back
    // and the retried write lands.
    drop(sub);
    assert!(s.vm.page_restrictions().get(&5).is_none_or(|&a| a == access::RWX));
    wait_until("the write lands", || s.vm.peek(0x5010, 1) == [0x41]);
    assert!(mon.protect(&mon.subscribe(Kinds::ALL), 0x5000, 0, access::W, true).is_err(), "empty range");
    mon.stop();
}

#[test]
fn held_vcpus_take_new_registers_and_the_agent_gets_its_answer() {
    const BUF: u64 = 0x6000;
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s);
    let sub = mon.subscribe(Kinds { hypercalls: true, pauses: true, ..Kinds::default() });
    mon.hypercalls(&sub, Some(("pong".into(), BUF))).unwrap();
    assert_eq!(mon.pause_all(T).unwrap(), vec![0]);
    assert_eq!(next(&sub), Record::Paused { vcpu: 0 });
    assert_eq!(mon.held(), vec![0]);
    s.vm.poke_mem(BUF, b"hello");
    let mut regs = mon.vm().get_registers(0, &[]).unwrap().regs;
    (regs.r8, regs.r9) = (BUF, 5);
    mon.vm().set_registers(0, &regs).unwrap();
    assert_eq!(mon.resume_all().unwrap(), vec![0]);
    assert_eq!(next(&sub), Record::Resumed { vcpu: 0 });
    assert!(mon.held().is_empty());
    s.vm.guest_does(0, GuestAction::Hypercall);
    match next(&sub) {
        Record::Hypercall { who, message, reply } => {
            assert_eq!((who.vcpu, message.as_str(), reply.as_deref()), (0, "hello", Some("pong")));
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(s.vm.peek(BUF, 5), b"pongo");
    mon.stop();
}

#[test]
fn an_agent_call_elsewhere_is_reported_but_not_written_to() {
    const BUF: u64 = 0x6000;
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s);
    let sub = mon.subscribe(Kinds { hypercalls: true, ..Kinds::default() });
    mon.hypercalls(&sub, Some(("pong".into(), BUF))).unwrap();
    mon.pause_all(T).unwrap();
    s.vm.poke_mem(0x7000, b"hi");
    let mut regs = mon.vm().get_registers(0, &[]).unwrap().regs;
    (regs.r8, regs.r9) = (0x7000, 2);
    mon.vm().set_registers(0, &regs).unwrap();
    mon.resume_all().unwrap();
    s.vm.guest_does(0, GuestAction::Hypercall);
    assert_eq!(next(&sub), Record::Hypercall { who: next_who(0), message: "hi".into(), reply: None });
    assert_eq!(s.vm.peek(0x7000, 2), b"hi");
    assert_eq!(s.vm.peek(BUF, 4), [0; 4]);
    mon.stop();
}

/// A scoped hold (a `write`) and the tool's pause nest: whichever ends
/// first, the vCPUs stay held until the other ends too, and only then go.
#[test]
fn a_hold_and_the_tools_pause_nest() {
    let s = Setup::new(&FakeConfig::default());
    let mon = attach(&s);
    let sub = mon.subscribe(Kinds { pauses: true, ..Kinds::default() });
    // The hold ends first: the tool's pause keeps the vCPU.
    let held = mon.hold_all(T).unwrap();
    assert_eq!(held.vcpus(), [0]);
    assert_eq!(next(&sub), Record::Paused { vcpu: 0 });
    assert_eq!(mon.pause_all(T).unwrap(), vec![0]);
    drop(held);
    assert_eq!(mon.held(), vec![0], "the end of a hold let go of a vCPU the tool's pause holds");
    assert_eq!(mon.resume_all().unwrap(), vec![0]);
    assert_eq!(next(&sub), Record::Resumed { vcpu: 0 });
    assert!(mon.held().is_empty());
    // The tool's pause ends first: the hold keeps the vCPU until it ends.
    mon.pause_all(T).unwrap();
    assert_eq!(next(&sub), Record::Paused { vcpu: 0 });
    let held = mon.hold_all(T).unwrap();
    assert_eq!(mon.pause_holders(), ukvmi_monitor::PauseHolders { tool: true, scoped: 1 });
    assert_eq!(mon.resume_all().unwrap(), Vec::<u16>::new(), "resume let go of a vCPU a hold keeps");
    assert_eq!(mon.pause_holders(), ukvmi_monitor::PauseHolders { tool: false, scoped: 1 });
    assert_eq!(mon.held(), vec![0]);
    drop(held);
    assert_eq!(next(&sub), Record::Resumed { vcpu: 0 });
    assert!(mon.held().is_empty());
    // Two holds: the vCPU goes with the second.
    let (a, b) = (mon.hold_all(T).unwrap(), mon.hold_all(T).unwrap());
    assert_eq!(next(&sub), Record::Paused { vcpu: 0 });
    drop(a);
    assert_eq!(mon.held(), vec![0]);
    drop(b);
    assert_eq!(next(&sub), Record::Resumed { vcpu: 0 });
    assert!(mon.held().is_empty());
    mon.stop();
}

/// Who on the fake (no demo-OS table in its memory): just the vCPU.
fn next_who(vcpu: u16) -> ukvmi_monitor::Who {
    ukvmi_monitor::Who { vcpu, pid: None, process: None }
}

#[test]
fn a_breakpoint_is_reported_stepped_over_and_planted_again() {
    const AT: u64 = 0x2000;
    let s = Setup::new(&FakeConfig::default());
    s.vm.poke_mem(AT, &[0x90]);
    let mon = attach(&s);
    let sub = mon.subscribe(Kinds { breakpoints: true, ..Kinds::default() });
    assert_eq!(mon.breakpoint(&sub, KERNEL_BASE + AT, false).unwrap(), AT);
    assert_eq!(s.vm.peek(AT, 1), [0xcc]);
    // A second breakpoint over a live int3 is refused.
    let other = mon.subscribe(Kinds::default());
    s.vm.poke_mem(AT + 1, &[0xcc]);
    assert!(mon.breakpoint(&other, KERNEL_BASE + AT + 1, false).is_err());
    // Put the vCPU just before the breakpoint (the fake runs one byte per slice).
    mon.pause_all(T).unwrap();
    let mut regs = mon.vm().get_registers(0, &[]).unwrap().regs;
    regs.rip = KERNEL_BASE + AT - 1;
    mon.vm().set_registers(0, &regs).unwrap();
    s.vm.guest_does(0, GuestAction::Int3);
    mon.resume_all().unwrap();
    match next(&sub) {
        Record::Breakpoint { who, gpa, rip } => assert_eq!((who.vcpu, gpa, rip), (0, AT, KERNEL_BASE + AT)),
        r => panic!("{r:?}"),
    }
    // Stepped over: the single step ends and the int3 is back.
    wait_until("the int3 is planted again", || s.vm.peek(AT, 1) == [0xcc] && !s.vm.intercepts(0).singlestep);
    assert!(
        !s.vm.take_log(0).iter().any(|o| matches!(o, ukvmi_conformance::Observed::Injected(e) if e.nr == 3)),
        "the guest got a #BP for the monitor's breakpoint"
    );
    drop(sub);
    assert_eq!(s.vm.peek(AT, 1), [0x90], "the original byte is back");
    mon.stop();
}

#[test]
fn events_are_answered_while_another_tools_setup_waits_on_a_vcpu() {
    let s = Setup::new(&FakeConfig { vcpus: 2, ..FakeConfig::default() });
    let mon = attach(&s);
    let guard = mon.subscribe(Kinds { msr: true, ..Kinds::default() });
    mon.watch_msr(&guard, LSTAR, true).unwrap();
    // vCPU 1 stops serving commands: a second tool's watch waits on it.
    s.vm.hold(1, true);
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| {
            let sub = mon.subscribe(Kinds::default());
            mon.watch_msr(&sub, SYSENTER_EIP, false)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiting.is_finished(), "the watch did not wait for vCPU 1");
        // Meanwhile vCPU 0's MSR write is answered by the guard at once.
        let t0 = Instant::now();
        s.vm.guest_does(0, GuestAction::WriteMsr { msr: LSTAR, value: 0x4141 });
        match guard.next(Duration::from_secs(3)).unwrap() {
            Some(Record::Msr { msr, blocked, .. }) => assert_eq!((msr, blocked), (LSTAR, true)),
            r => panic!("no MSR record while the setup waits: {r:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(!waiting.is_finished(), "the test did not overlap the wait");
        s.vm.hold(1, false);
        waiting.join().unwrap().unwrap();
    });
    mon.stop();
}

#[test]
fn a_stopped_monitor_sets_no_new_hooks() {
    let s = Setup::new(&FakeConfig::default());
    s.vm.poke_mem(0x2000, &[0x90]);
    let mon = attach(&s);
    let sub = mon.subscribe(Kinds::ALL);
    mon.stop();
    assert!(matches!(mon.watch_msr(&sub, LSTAR, true), Err(ukvmi_monitor::MonitorError::Closed)));
    assert!(matches!(mon.breakpoint(&sub, KERNEL_BASE + 0x2000, false), Err(ukvmi_monitor::MonitorError::Closed)));
    assert!(matches!(mon.protect(&sub, 0x5000, 1, access::W, true), Err(ukvmi_monitor::MonitorError::Closed)));
    assert!(matches!(mon.hypercalls(&sub, None), Err(ukvmi_monitor::MonitorError::Closed)));
    assert!(!s.vm.intercepts(0).msrs.contains(&LSTAR));
    assert_eq!(s.vm.peek(0x2000, 1), [0x90]);
    assert!(s.vm.page_restrictions().is_empty());
    // Its stream ends with the reason.
    assert!(matches!(next(&sub), Record::Detached { .. }));
    assert!(sub.next(Duration::ZERO).is_err());
}
