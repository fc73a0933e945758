//! BREAKPOINT, SINGLESTEP, TRAP (INJECT_EXCEPTION) and HYPERCALL events on
//! /dev/kvm with the `traps` guest, whose own exception handlers record
//! what really reached the guest: every check compares what the tool
//! answered with what the guest saw.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;

use common::{assert_no_event_while_running, code, read_u64, start, RunningVm, Scratch};
use std::time::{Duration, Instant};
use ukvmi_guests::layout;
use ukvmi_introspector::wire::{event, msg};
use ukvmi_introspector::{Event, EventPayload, EventReply, PendingEvent, Vm};

const T: Duration = Duration::from_secs(20);

fn traps() -> &'static ukvmi_guests::Guest {
    ukvmi_guests::find("traps").unwrap()
}

fn sym(name: &str) -> u64 {
    traps().symbol(name).unwrap_or_else(|| panic!("traps guest has no {name}"))
}

/// vector, error code, return RIP, CR2 of vCPU `vcpu`'s last exception.
fn exc_info(tool: &Vm, vcpu: u16) -> [u64; 4] {
    let b = tool.read_physical(layout::exc_info_addr(vcpu), 32).unwrap();
    let q = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
    [q(0), q(1), q(2), q(3)]
}

fn exc_count(tool: &Vm, vector: u64) -> u64 {
    read_u64(tool, layout::EXC_COUNT_BASE + vector * 8)
}

fn next_vcpu_event(tool: &Vm) -> PendingEvent {
    match tool.next_event(Some(T)).unwrap() {
        Some(Event::Vcpu(ev)) => ev,
        other => panic!("expected a vCPU event, got {other:?}"),
    }
}

/// The next BREAKPOINT event at `rip`, answering CONTINUE to breakpoints
/// elsewhere (the guest's own int3).
fn breakpoint_at(tool: &Vm, rip: u64) -> PendingEvent {
    let t0 = Instant::now();
    loop {
        let ev = next_vcpu_event(tool);
        match ev.payload {
            EventPayload::Breakpoint { gpa, insn_len } => {
                assert_eq!(insn_len, 1);
                assert_eq!(gpa, ev.regs.rip, "identity-mapped code: gpa is the int3's address");
                if ev.regs.rip == rip {
                    return ev;
                }
                tool.reply(&ev, EventReply::Continue).unwrap();
            }
            ref other => panic!("expected BREAKPOINT, got {other:?}"),
        }
        assert!(t0.elapsed() < T, "no breakpoint at {rip:#x}");
    }
}

/// Waits until `done` holds, answering CONTINUE to every event meanwhile.
fn serve_until(tool: &Vm, what: &str, mut done: impl FnMut(&Vm) -> bool) {
    let t0 = Instant::now();
    while !done(tool) {
        assert!(t0.elapsed() < T, "timed out waiting for: {what}");
        if let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(5))).unwrap() {
            tool.reply(&ev, EventReply::Continue).unwrap();
        }
    }
}

/// Waits for `n` more ticks (the guest runs), answering CONTINUE meanwhile.
fn serve_ticks(tool: &Vm, vm: &RunningVm, n: usize) {
    let before = vm.serial_text().matches("tick").count();
    serve_until(tool, "ticks", |_| vm.serial_text().matches("tick").count() >= before + n);
}

#[test]
fn the_guests_own_int3_reaches_it_when_nobody_watches() {
    let dir = Scratch::new("int3");
    let (vm, _l, tool) = start(&dir, "traps", 1, &[]);
    assert_eq!(code(tool.check_event(event::BREAKPOINT)), 0);
    vm.wait_serial("tick 64", 1, T);
    let done = read_u64(&tool, layout::INT3_DONE);
    assert!(done >= 64 / layout::INT3_EVERY - 1, "the guest went on after its int3 {done} times");
    let hits = exc_count(&tool, 3);
    assert!(hits >= done && hits <= done + 1, "#BP handled {hits} times, went on {done} times");
    let [vector, error, rip, _] = exc_info(&tool, 0);
    assert_eq!((vector, error), (3, 0));
    assert_eq!(rip, sym("after_int3"), "#BP's return address is right after the int3");
    // Nobody answers the doorbell: -KVM_ENOSYS.
    assert_eq!(read_u64(&tool, layout::HC_RESULT_BASE) as i64, -1000);
    vm.assert_guest_runs();
}

#[test]
fn breakpoint_continue_gives_the_guest_its_own_bp() {
    let dir = Scratch::new("bpcont");
    let (vm, _l, tool) = start(&dir, "traps", 1, &[]);
    tool.control_events(0, event::BREAKPOINT, true).unwrap();
    let ev = breakpoint_at(&tool, sym("guest_int3"));
    let (hits, done) = (exc_count(&tool, 3), read_u64(&tool, layout::INT3_DONE));
    tool.reply(&ev, EventReply::Continue).unwrap();
    let ev2 = breakpoint_at(&tool, sym("guest_int3"));
    assert_eq!(exc_count(&tool, 3), hits + 1, "CONTINUE delivered exactly one #BP");
    assert_eq!(read_u64(&tool, layout::INT3_DONE), done + 1);
    assert_eq!(exc_info(&tool, 0)[2], sym("after_int3"), "with the right return address");
    // RETRY after moving RIP past the int3: the guest never sees this #BP.
    let mut regs = ev2.regs;
    regs.rip += 1;
    tool.set_registers(0, &regs).unwrap();
    tool.reply(&ev2, EventReply::Retry).unwrap();
    let ev3 = breakpoint_at(&tool, sym("guest_int3"));
    assert_eq!(exc_count(&tool, 3), hits + 1, "RETRY injected nothing");
    assert_eq!(read_u64(&tool, layout::INT3_DONE), done + 2, "and the guest went on");
    tool.reply(&ev3, EventReply::Continue).unwrap();
    // Disabled again: the guest handles its int3 alone.
    tool.control_events(0, event::BREAKPOINT, false).unwrap();
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(200))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    let h = exc_count(&tool, 3);
    vm.wait_serial("tick", 2, T);
    vm.assert_guest_runs();
    assert!(exc_count(&tool, 3) > h);
    // The guest's own int3s go on (its #BP handler counts them), no event.
    assert_no_event_while_running(&tool, Duration::from_millis(100), "breakpoint events disabled", |t| {
        vec![exc_count(t, 3)]
    });
}

#[test]
fn a_planted_breakpoint_is_skipped_then_stepped_over() {
    let dir = Scratch::new("bpplant");
    let (vm, _l, tool) = start(&dir, "traps", 1, &[]);
    let target = sym("bp_target");
    let original = tool.read_physical(target, 1).unwrap()[0];
    assert_ne!(original, 0xcc);
    tool.control_events(0, event::BREAKPOINT, true).unwrap();
    tool.write_physical(target, &[0xcc]).unwrap();
    // First hit: skip the whole 8-byte instruction with SET_REGISTERS + RETRY.
    let ev = breakpoint_at(&tool, target);
    let runs = read_u64(&tool, layout::BP_TARGET_RUNS);
    let mut regs = ev.regs;
    regs.rip = target + 8;
    tool.set_registers(0, &regs).unwrap();
    tool.reply(&ev, EventReply::Retry).unwrap();
    // Second hit: the skipped increment never ran; now remove the 0xCC and retry in place.
    let ev = breakpoint_at(&tool, target);
    assert_eq!(read_u64(&tool, layout::BP_TARGET_RUNS), runs, "the skipped instruction did not run");
    assert_eq!(ev.regs.r14, regs.r14 + 1, "one loop iteration later");
    tool.write_physical(target, &[original]).unwrap();
    tool.reply(&ev, EventReply::Retry).unwrap();
    let t0 = Instant::now();
    while read_u64(&tool, layout::BP_TARGET_RUNS) < runs + 3 {
        assert!(t0.elapsed() < T, "the restored instruction never ran");
        // Keep answering the guest's own int3.
        if let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(5))).unwrap() {
            assert_ne!(ev.regs.rip, target, "the planted breakpoint is gone");
            tool.reply(&ev, EventReply::Continue).unwrap();
        }
    }
    // The guest never saw a #BP from the planted byte.
    let [vector, _, rip, _] = exc_info(&tool, 0);
    assert!(vector != 3 || rip == sym("after_int3"), "the guest saw a #BP returning to {rip:#x}");
    serve_ticks(&tool, &vm, 2);
}

#[test]
fn breakpoints_on_two_vcpus_answered_out_of_order() {
    let dir = Scratch::new("bp2");
    let (vm, _l, tool) = start(&dir, "traps", 2, &[]);
    vm.wait_serial("vcpu 1 up", 1, T);
    let target = sym("bp_target");
    let original = tool.read_physical(target, 1).unwrap()[0];
    for v in 0..2 {
        tool.control_events(v, event::BREAKPOINT, true).unwrap();
    }
    tool.write_physical(target, &[0xcc]).unwrap();
    // Collect one planted-breakpoint event from each vCPU; both wait at once.
    let mut waiting: [Option<PendingEvent>; 2] = [None, None];
    let t0 = Instant::now();
    while waiting.iter().any(Option::is_none) {
        assert!(t0.elapsed() < T, "both vCPUs should stop at the breakpoint");
        let ev = next_vcpu_event(&tool);
        assert!(matches!(ev.payload, EventPayload::Breakpoint { .. }), "{:?}", ev.payload);
        let slot = &mut waiting[usize::from(ev.vcpu.raw())];
        if ev.regs.rip == target && slot.is_none() {
            *slot = Some(ev);
        } else {
            tool.reply(&ev, EventReply::Continue).unwrap();
        }
    }
    let [Some(e0), Some(e1)] = waiting else { unreachable!() };
    // Both are held: neither counter moves.
    let c = [read_u64(&tool, layout::counter_addr(0)), read_u64(&tool, layout::counter_addr(1))];
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!([read_u64(&tool, layout::counter_addr(0)), read_u64(&tool, layout::counter_addr(1))], c);
    // Answer vCPU 1 first: it skips the instruction and runs on while vCPU 0 stays held.
    tool.write_physical(target, &[original]).unwrap();
    let mut r1 = e1.regs;
    r1.rip = target + 8;
    tool.set_registers(1, &r1).unwrap();
    tool.reply(&e1, EventReply::Retry).unwrap();
    serve_until(&tool, "vCPU 1 resumes", |t| read_u64(t, layout::counter_addr(1)) >= c[1] + 3);
    assert_eq!(read_u64(&tool, layout::counter_addr(0)), c[0], "vCPU 0 is still held");
    assert_eq!(tool.get_registers(0, &[]).unwrap().regs.rip, target);
    tool.reply(&e0, EventReply::Retry).unwrap();
    serve_until(&tool, "vCPU 0 resumes", |t| read_u64(t, layout::counter_addr(0)) >= c[0] + 3);
    serve_ticks(&tool, &vm, 2);
}

#[test]
fn disconnect_while_two_vcpus_wait_releases_them_and_drops_every_interception() {
    let dir = Scratch::new("bpdrop");
    let (vm, l, tool) = start(&dir, "traps", 2, &[]);
    vm.wait_serial("vcpu 1 up", 1, T);
    for v in 0..2 {
        tool.control_events(v, event::BREAKPOINT, true).unwrap();
        tool.control_events(v, event::HYPERCALL, true).unwrap();
    }
    let mut seen = [false; 2];
    while !(seen[0] && seen[1]) {
        let ev = next_vcpu_event(&tool).detach(); // left waiting: no automatic answer
        seen[usize::from(ev.vcpu.raw())] = true; // never answered
    }
    assert!(vm.interceptions().contains("guest-debug=vcpu0:int3,vcpu1:int3"), "{}", vm.interceptions());
    drop(tool);
    vm.assert_guest_runs();
    let tool = l.accept().unwrap();
    let before = [exc_count(&tool, 3), read_u64(&tool, layout::counter_addr(1))];
    vm.wait_serial("tick", 2, T);
    vm.assert_guest_runs();
    assert!(exc_count(&tool, 3) > before[0], "the guest handles its own int3 again");
    assert!(read_u64(&tool, layout::counter_addr(1)) > before[1], "vCPU 1 resumed");
    assert_eq!(read_u64(&tool, layout::HC_RESULT_BASE + 8) as i64, -1000, "nobody answers hypercalls");
    // int3s (vCPU 0 and 1 share the #BP count) and hypercalls on both vCPUs
    // go on, with no event.
    assert_no_event_while_running(&tool, Duration::from_millis(300), "nothing is enabled any more", |t| {
        vec![exc_count(t, 3), read_u64(t, layout::HC_COUNT_BASE), read_u64(t, layout::HC_COUNT_BASE + 8)]
    });
    let report = vm.interceptions();
    assert!(report.contains("guest-debug=none") && report.contains("msr-writes=none"), "{report}");
}

#[test]
fn singlestep_reports_every_instruction() {
    let dir = Scratch::new("step");
    let (vm, _l, tool) = start(&dir, "spin", 1, &[]);
    assert!(tool.get_version().unwrap().singlestep, "features.singlestep");
    assert_eq!(code(tool.check_command(msg::VCPU_CONTROL_SINGLESTEP)), 0);
    assert_eq!(code(tool.check_event(event::SINGLESTEP)), 0);
    let spin = ukvmi_guests::find("spin").unwrap();
    let iterate = spin.symbol("iterate").unwrap();
    vm.wait_serial("tick", 1, T); // past the pattern fill: into the loop
    tool.control_singlestep(0, true).unwrap();
    assert_eq!(code(tool.inject_exception(0, 6, 0, 0)), -16, "no injection while single-stepping");
    let mut prev: Option<PendingEvent> = None;
    let mut checked = 0;
    let mut failed = 0;
    // Until vCPU 0 prints a tick: its `out` to the serial port exits by
    // itself, which interrupts that step (`failed`). (This host steps over
    // `hlt` without a HLT exit.)
    for _ in 0..5000 {
        let ev = next_vcpu_event(&tool);
        let EventPayload::Singlestep { failed: f } = ev.payload else { panic!("{:?}", ev.payload) };
        failed += u32::from(f);
        let rip = ev.regs.rip;
        if f {
            // Interrupted steps follow instructions that exit by themselves:
            // hlt (f4) and the serial port's out (ee).
            // RIP is past the instruction here (PVM emulates it) and on it
            // on hardware KVM.
            let off = (rip - spin.load_addr) as usize;
            let exits = |b: u8| matches!(b, 0xf4 | 0xee | 0xef);
            assert!(exits(spin.image[off - 1]) || exits(spin.image[off]), "failed step at {rip:#x}");
        }
        assert!(spin.symbolize(rip).is_some(), "stepped to {rip:#x}, outside the guest");
        // `iterate` starts with `inc %r14` (3 bytes): one step runs exactly it.
        if let Some(p) = &prev {
            if p.regs.rip == iterate && !f {
                assert_eq!(rip, iterate + 3, "one instruction per step");
                assert_eq!(ev.regs.r14, p.regs.r14 + 1);
                checked += 1;
            }
        }
        tool.reply(&ev, EventReply::Continue).unwrap();
        prev = Some(ev);
        if checked >= 2 && failed > 0 {
            break;
        }
    }
    assert!(checked >= 2, "never stepped through iterate's first instruction");
    assert!(failed > 0, "the serial port's out interrupts a step");
    tool.control_singlestep(0, false).unwrap();
    while let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(200))).unwrap() {
        tool.reply(&ev, EventReply::Continue).unwrap();
    }
    vm.wait_serial("tick", 1, T);
    vm.assert_guest_runs();
    assert_no_event_while_running(&tool, Duration::from_millis(100), "stepping is off", |t| {
        vec![read_u64(t, layout::counter_addr(0))]
    });
}

#[test]
fn injected_exceptions_reach_the_guest_and_trap_reports_them() {
    let dir = Scratch::new("inject");
    let (vm, _l, tool) = start(&dir, "traps", 1, &[]);
    assert_eq!(code(tool.check_command(msg::VCPU_INJECT_EXCEPTION)), 0);
    vm.wait_serial("tick", 1, T);
    tool.control_events(0, event::TRAP, true).unwrap();
    // Swallow the guest's own int3s (RETRY past them), so that the last
    // exception it records is the injected one.
    tool.control_events(0, event::BREAKPOINT, true).unwrap();
    let own_bps = exc_count(&tool, 3);
    let skip_int3 = |ev: &PendingEvent| {
        assert!(matches!(ev.payload, EventPayload::Breakpoint { .. }), "{:?}", ev.payload);
        let mut r = ev.regs;
        r.rip += 1;
        tool.set_registers(0, &r).unwrap();
        tool.reply(ev, EventReply::Retry).unwrap();
    };
    for (nr, error, addr) in [(14u8, 0x6u32, 0xdead_b000u64), (6, 0, 0), (13, 0x18, 0)] {
        let before = exc_count(&tool, u64::from(nr));
        tool.inject_exception(0, nr, error, addr).unwrap();
        let mut ev = next_vcpu_event(&tool);
        while ev.event == event::BREAKPOINT {
            skip_int3(&ev);
            ev = next_vcpu_event(&tool);
        }
        assert_eq!(ev.payload, EventPayload::Trap { nr, error_code: error, address: addr }, "TRAP reports it");
        tool.reply(&ev, EventReply::Continue).unwrap();
        let t0 = Instant::now();
        while exc_count(&tool, u64::from(nr)) == before {
            assert!(t0.elapsed() < T, "vector {nr} never reached the guest");
            if let Some(Event::Vcpu(ev)) = tool.next_event(Some(Duration::from_millis(2))).unwrap() {
                skip_int3(&ev);
            }
        }
        assert_eq!(exc_count(&tool, u64::from(nr)), before + 1);
        let [vector, err, rip, cr2] = exc_info(&tool, 0);
        assert_eq!((vector, err), (u64::from(nr), u64::from(error)), "vector {nr}");
        assert!(traps().symbolize(rip).is_some(), "returns into the guest: {rip:#x}");
        if nr == 14 {
            assert_eq!(cr2, addr, "CR2 of the injected #PF");
        }
    }
    assert!(exc_count(&tool, 3) <= own_bps + 1, "every int3 was swallowed (one may have been under way)");
    tool.control_events(0, event::BREAKPOINT, false).unwrap();
    serve_ticks(&tool, &vm, 2);
    vm.assert_guest_runs();
}

#[test]
fn hypercall_doorbell_and_its_answers() {
    let dir = Scratch::new("hcall");
    let (vm, l, tool) = start(&dir, "traps", 2, &[]);
    vm.wait_serial("vcpu 1 up", 1, T);
    assert_eq!(code(tool.check_event(event::HYPERCALL)), 0);
    tool.control_events(0, event::HYPERCALL, true).unwrap();
    let ev = next_vcpu_event(&tool);
    assert_eq!((ev.payload.clone(), ev.vcpu.raw()), (EventPayload::Hypercall, 0));
    assert_eq!(ev.regs.rax & 0xffff_ffff, layout::HC_KVMI_NR);
    assert_eq!((ev.regs.rdi, ev.regs.rsi), (layout::HC_KVMI_SUBFN, 0));
    let hc_ret = traps().symbol("hypercall_out").unwrap() + 1; // `out %eax,%dx` is one byte
    assert_eq!(ev.regs.rip, hc_ret, "the doorbell has completed when the event is sent");
    let count = read_u64(&tool, layout::HC_COUNT_BASE);
    tool.reply(&ev, EventReply::Continue).unwrap();
    let ev = next_vcpu_event(&tool).detach();
    assert_eq!(ev.payload, EventPayload::Hypercall);
    assert_eq!(read_u64(&tool, layout::HC_COUNT_BASE), count + 1);
    assert_eq!(read_u64(&tool, layout::HC_RESULT_BASE), 0, "an answered hypercall returns 0");
    assert_eq!(read_u64(&tool, layout::HC_RESULT_BASE + 8) as i64, -1000, "vCPU 1 does not report it");
    // RETRY is not an action HYPERCALL accepts: the connection closes and the guest runs on.
    let retry = 1; // KVMI_EVENT_ACTION_RETRY; the library refuses to send it here
    tool.raw().reply_raw(ev.seq, ev.vcpu.raw(), retry, event::HYPERCALL as u8, &[]).unwrap();
    let t0 = Instant::now();
    while tool.next_event(Some(Duration::from_millis(100))).is_ok() {
        assert!(t0.elapsed() < T, "the VMM should close the connection");
    }
    vm.wait_stderr("disconnected", T);
    assert!(vm.stderr_text().contains("is not accepted by KVMI_VCPU_EVENT_HYPERCALL"), "{}", vm.stderr_text());
    vm.assert_guest_runs();
    let tool = l.accept().unwrap();
    assert!(read_u64(&tool, layout::HC_COUNT_BASE) > count + 1, "vCPU 0 was released");
}

#[test]
fn crash_from_a_breakpoint_stops_the_vm_as_a_guest_shutdown() {
    let dir = Scratch::new("bpcrash");
    let (mut vm, _l, tool) = start(&dir, "traps", 1, &[]);
    tool.control_events(0, event::BREAKPOINT, true).unwrap();
    let ev = breakpoint_at(&tool, sym("guest_int3"));
    tool.reply(&ev, EventReply::Crash).unwrap();
    let status = vm.wait_exit(T);
    assert_eq!(status.code(), Some(2), "{}", vm.stderr_text());
    assert!(vm.stderr_text().contains("CRASH to a breakpoint"), "{}", vm.stderr_text());
}

/// Makes vCPU 0 raise `which` and returns the event (other events are
/// answered CONTINUE on the way).
fn trigger(tool: &Vm, which: u16) -> PendingEvent {
    match which {
        event::PAUSE => tool.pause_vcpu(0, false).unwrap(),
        event::SINGLESTEP => tool.control_singlestep(0, true).unwrap(),
        event::TRAP => {
            tool.control_events(0, event::TRAP, true).unwrap();
            tool.inject_exception(0, 6, 0, 0).unwrap();
        }
        other => tool.control_events(0, other, true).unwrap(),
    }
    let t0 = Instant::now();
    loop {
        let ev = next_vcpu_event(tool);
        if ev.event == which && ev.vcpu.raw() == 0 {
            return ev;
        }
        tool.reply(&ev, EventReply::Continue).unwrap();
        assert!(t0.elapsed() < T, "no {which} event");
    }
}

#[test]
fn crash_from_any_event_stops_the_vm_with_a_clear_message() {
    for (which, words) in [
        (event::PAUSE, "CRASH to KVMI_VCPU_EVENT_PAUSE on vCPU 0"),
        (event::HYPERCALL, "CRASH to a hypercall"),
        (event::SINGLESTEP, "CRASH to a single step"),
        (event::TRAP, "CRASH to KVMI_VCPU_EVENT_TRAP on vCPU 0"),
    ] {
        let dir = Scratch::new("crashall");
        let (mut vm, _l, tool) = start(&dir, "traps", 1, &[]);
        vm.wait_serial("tick", 1, T);
        let ev = trigger(&tool, which);
        tool.reply(&ev, EventReply::Crash).unwrap();
        let status = vm.wait_exit(T);
        let err = vm.stderr_text();
        assert_eq!(status.code(), Some(2), "event {which}: {err}");
        assert!(err.contains("CRASH") && err.contains(words), "event {which}: {err}");
    }
}

#[test]
fn an_action_the_event_does_not_accept_closes_the_connection_and_the_guest_runs_on() {
    let dir = Scratch::new("badaction");
    let (vm, l, mut tool) = start(&dir, "traps", 1, &[]);
    vm.wait_serial("tick", 1, T);
    // RETRY (1) where only CONTINUE/CRASH are accepted, and an action byte
    // that means nothing (7) for an event that accepts RETRY.
    for (n, (which, action)) in
        [(event::PAUSE, 1u8), (event::HYPERCALL, 1), (event::SINGLESTEP, 1), (event::TRAP, 1), (event::BREAKPOINT, 7)]
            .into_iter()
            .enumerate()
    {
        let ev = trigger(&tool, which).detach();
        tool.raw().reply_raw(ev.seq, ev.vcpu.raw(), action, which as u8, &[]).unwrap();
        let t0 = Instant::now();
        while tool.next_event(Some(Duration::from_millis(50))).is_ok() {
            assert!(t0.elapsed() < T, "event {which}, action {action}: the connection stayed open");
        }
        let t0 = Instant::now();
        while vm.stderr_text().matches("is not accepted by").count() <= n {
            assert!(t0.elapsed() < T, "event {which}: the VMM did not say why\n{}", vm.stderr_text());
            std::thread::sleep(Duration::from_millis(10));
        }
        tool = l.accept().unwrap();
        assert!(tool.next_event(Some(Duration::from_millis(100))).unwrap().is_none(), "a fresh session");
    }
    vm.assert_guest_runs();
}

#[test]
fn a_tool_dying_mid_step_leaves_the_guest_running_at_full_speed() {
    let dir = Scratch::new("stepdrop");
    let (vm, l, tool) = start(&dir, "traps", 1, &[]);
    vm.wait_serial("tick", 1, T);
    tool.control_singlestep(0, true).unwrap();
    let ev = next_vcpu_event(&tool);
    assert!(matches!(ev.payload, EventPayload::Singlestep { .. }));
    let held = read_u64(&tool, layout::counter_addr(0));
    assert!(vm.interceptions().contains("guest-debug=vcpu0:singlestep"), "{}", vm.interceptions());
    drop(tool); // dies with vCPU 0 waiting in a SINGLESTEP event
    let tool = l.accept().unwrap();
    // Stepping stopped: the loop runs at its normal rate (~1 ms per
    // iteration, versus one event round trip per instruction before).
    serve_until(&tool, "the guest runs 100 iterations", |t| read_u64(t, layout::counter_addr(0)) >= held + 100);
    assert!(tool.next_event(Some(Duration::from_millis(200))).unwrap().is_none(), "no more steps");
    let report = vm.interceptions();
    assert!(report.contains("guest-debug=none"), "stepping is off in KVM: {report}");
    assert_eq!(code(tool.inject_exception(0, 6, 0, 0)), 0, "not single-stepping any more (no EBUSY)");
}

/// Where the guest's exception handler returns: its `popfq; ret`, after it
/// copied the frame's RIP and RFLAGS below the interrupted stack.
fn handler_popf() -> u64 {
    let g = traps();
    let from = (sym("exc_common") - g.load_addr) as usize;
    let at = g.image[from..].windows(2).position(|w| w == [0x9d, 0xc3]).expect("popfq; ret in exc_common");
    g.load_addr + (from + at) as u64
}

/// Single-steps vCPU 0 into the guest's #BP handler (its own int3, which
/// the VMM delivers while KVM steps) up to `rip`, and returns the event
/// there: the handler's frame holds KVM's TF at this point.
fn step_into_bp_handler(tool: &Vm, rip: u64) -> PendingEvent {
    let t0 = Instant::now();
    tool.control_singlestep(0, true).unwrap();
    let mut in_handler = false;
    loop {
        let ev = next_vcpu_event(tool);
        assert!(matches!(ev.payload, EventPayload::Singlestep { .. }), "{:?}", ev.payload);
        in_handler |= (sym("exc_common")..sym("exc_common") + 8).contains(&ev.regs.rip);
        if in_handler && ev.regs.rip == rip {
            return ev;
        }
        tool.reply(&ev, EventReply::Continue).unwrap();
        assert!(t0.elapsed() < T, "never stepped to {rip:#x} in the #BP handler");
    }
}

/// The guest goes on as before: its loop runs, its own int3s complete, and
/// no #DB reaches it (a TF left in a frame would trap after every
/// instruction, forever).
fn assert_no_trap_flag_left(vm: &RunningVm, tool: &Vm, when: &str) {
    let done = read_u64(tool, layout::INT3_DONE);
    let t0 = Instant::now();
    while read_u64(tool, layout::INT3_DONE) <= done + 2 {
        if t0.elapsed() > T {
            let regs = tool
                .get_registers(0, &[])
                .map(|r| format!("rip {:#x} rsp {:#x} rflags {:#x}", r.regs.rip, r.regs.rsp, r.regs.rflags));
            let stack = tool.read_physical(0x7ff00, 256).unwrap();
            let stack: Vec<u64> = stack.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
            panic!(
                "{when}: the guest's own int3s stopped; #DB {} times, last exception {:x?}, {regs:?}, {}\nstack {stack:x?}\n{}",
                exc_count(tool, 1),
                exc_info(tool, 0),
                vm.interceptions(),
                vm.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.assert_guest_runs();
    let db = exc_count(tool, 1);
    assert_eq!(db, 0, "{when}: #DB reached the guest, TF leaked into it ({:x?})", exc_info(tool, 0));
}

#[test]
fn single_stepping_stopped_inside_an_exception_handler_leaves_no_trap_flag() {
    let dir = Scratch::new("steptf");
    let (vm, _l, tool) = start(&dir, "traps", 1, &[]);
    vm.wait_serial("tick", 1, T);
    for (rip, when) in [(sym("exc_common") + 1, "at the handler's entry"), (handler_popf(), "at its popfq")] {
        let ev = step_into_bp_handler(&tool, rip);
        // Turned off while the vCPU waits in the event, then answered.
        tool.control_singlestep(0, false).unwrap();
        tool.reply(&ev, EventReply::Continue).unwrap();
        assert_no_trap_flag_left(&vm, &tool, when);
        assert!(tool.next_event(Some(Duration::from_millis(100))).unwrap().is_none(), "{when}: no more steps");
    }
}

#[test]
fn a_tool_dying_inside_a_stepped_exception_handler_leaves_no_trap_flag() {
    let dir = Scratch::new("steptfdrop");
    let (vm, l, mut tool) = start(&dir, "traps", 1, &[]);
    vm.wait_serial("tick", 1, T);
    for (rip, when) in [
        (sym("exc_common") + 1, "at the handler's entry"),
        (handler_popf() - 2, "after it copied its frame"),
        (handler_popf(), "at its popfq"),
        (handler_popf() + 1, "at its ret"),
    ] {
        let _ev = step_into_bp_handler(&tool, rip);
        drop(tool);
        tool = l.accept().unwrap();
        assert_no_trap_flag_left(&vm, &tool, when);
        assert!(vm.interceptions().contains("guest-debug=none"), "{when}: KVM stopped stepping");
    }
}

/// An exception KVM delivers by itself while it steps (a fault of the
/// stepped instruction) also pushes KVM's TF; stepping stopped inside its
/// handler must not leave it to the guest either.
#[test]
fn stepping_stopped_inside_the_handler_of_a_fault_leaves_no_trap_flag() {
    let dir = Scratch::new("steptfud");
    let (vm, l, mut tool) = start(&dir, "traps", 1, &[]);
    vm.wait_serial("tick", 1, T);
    // A free page, identity-mapped: `ud2; jmp back`.
    const TRAMPOLINE: u64 = 0x28_0000;
    for (n, dies) in [(1u64, false), (2, true)] {
        tool.control_singlestep(0, true).unwrap();
        let ev = next_vcpu_event(&tool);
        let back = ev.regs.rip;
        let rel = (back as i64 - (TRAMPOLINE as i64 + 7)) as i32;
        let mut code = vec![0x0f, 0x0b, 0xe9];
        code.extend_from_slice(&rel.to_le_bytes());
        tool.write_physical(TRAMPOLINE, &code).unwrap();
        let mut regs = ev.regs;
        regs.rip = TRAMPOLINE;
        tool.set_registers(0, &regs).unwrap();
        tool.reply(&ev, EventReply::Continue).unwrap();
        let t0 = Instant::now();
        let ev = loop {
            let ev = next_vcpu_event(&tool);
            if (sym("exc_common")..sym("exc_common") + 8).contains(&ev.regs.rip) {
                break ev;
            }
            tool.reply(&ev, EventReply::Continue).unwrap();
            assert!(t0.elapsed() < T, "never stepped into the #UD handler");
        };
        // A fault returns to the faulting instruction: point the frame's
        // RIP past the ud2, as a debugger would, so the guest goes on.
        let to_page_end = 0x1000 - (ev.regs.rsp & 0xfff);
        let stack = tool.read_physical(ev.regs.rsp, to_page_end.min(128) as u16).unwrap();
        let slot = stack.chunks(8).position(|q| q == TRAMPOLINE.to_le_bytes()).expect("the #UD frame's RIP");
        tool.write_physical(ev.regs.rsp + 8 * slot as u64, &(TRAMPOLINE + 2).to_le_bytes()).unwrap();
        if dies {
            drop(tool);
            tool = l.accept().unwrap();
        } else {
            tool.control_singlestep(0, false).unwrap();
            tool.reply(&ev, EventReply::Continue).unwrap();
        }
        let when = if dies { "the tool died in the handler" } else { "stepping turned off in the handler" };
        assert_no_trap_flag_left(&vm, &tool, when);
        assert_eq!(exc_count(&tool, 6), n, "{when}: #UD reached the guest once");
    }
}
