//! Starting `ukvmi run` introspected by the test itself (the test's
//! [`Listener`] is the tool), and reading the guest's memory and the KVM
//! error codes of replies through that connection.

use std::time::{Duration, Instant};

use ukvmi_introspector::{Listener, Vm};

use super::{RunningVm, Scratch};

/// How long the VM has to connect and finish the handshake, and its last
/// vCPU to come up.
const START: Duration = Duration::from_secs(20);

/// Starts `ukvmi run --guest GUEST --vcpus VCPUS --introspect
/// unix:DIR/kvmi.sock --reconnect 0.2 EXTRA...` and accepts its connection.
pub fn start(dir: &Scratch, guest: &str, vcpus: u16, extra: &[&str]) -> (RunningVm, Listener, Vm) {
    let sock = dir.path("kvmi.sock");
    let listener = Listener::bind(&sock).unwrap().with_handshake_timeout(START);
    let v = vcpus.to_string();
    let intro = format!("unix:{}", sock.display());
    let mut args = vec!["--guest", guest, "--vcpus", &v, "--introspect", &intro, "--reconnect", "0.2"];
    args.extend_from_slice(extra);
    let vm = RunningVm::start(dir, &args);
    let tool = listener.accept().unwrap();
    (vm, listener, tool)
}

/// [`start`], then waits until the guest says its last vCPU is up.
pub fn start_all_up(dir: &Scratch, guest: &str, vcpus: u16, extra: &[&str]) -> (RunningVm, Listener, Vm) {
    let (vm, l, tool) = start(dir, guest, vcpus, extra);
    vm.wait_serial(&format!("vcpu {} up", vcpus - 1), 1, START);
    (vm, l, tool)
}

/// Asserts that no event comes for at least `wait`, in a window in which the
/// guest provably ran: every counter `progress` reads (through `tool`) grew.
/// The window is extended, still allowing no event, until they have (at
/// most 20 s); a guest that never moved fails the test, as "nothing
/// happened" would then prove nothing.
pub fn assert_no_event_while_running(tool: &Vm, wait: Duration, what: &str, progress: impl Fn(&Vm) -> Vec<u64>) {
    let before = progress(tool);
    assert!(!before.is_empty(), "{what}: no counter to prove the guest ran");
    let t0 = Instant::now();
    loop {
        let left = wait.saturating_sub(t0.elapsed()).max(Duration::from_millis(50));
        if let Some(e) = tool.next_event(Some(left)).unwrap() {
            panic!("{what}: expected no event, got {e:?}");
        }
        let now = progress(tool);
        let moved = now.len() == before.len() && now.iter().zip(&before).all(|(n, b)| n > b);
        if moved && t0.elapsed() >= wait {
            return;
        }
        assert!(
            t0.elapsed() < START,
            "{what}: the guest's counters did not all move ({before:?} -> {now:?}): no event proves nothing"
        );
    }
}

/// The KVM error code of a reply (a negative errno), 0 for success. An
/// error that is not KVM's fails the test.
pub fn code<X>(r: ukvmi_introspector::Result<X>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_err().unwrap_or_else(|| panic!("not a KVM error: {e}")),
    }
}

/// The u64 at guest-physical `gpa`.
pub fn read_u64(tool: &Vm, gpa: u64) -> u64 {
    u64::from_le_bytes(tool.read_physical(gpa, 8).unwrap().try_into().unwrap())
}

/// The u32 at guest-physical `gpa`.
pub fn read_u32(tool: &Vm, gpa: u64) -> u32 {
    u32::from_le_bytes(tool.read_physical(gpa, 4).unwrap().try_into().unwrap())
}
