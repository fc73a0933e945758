//! `UKVMI_EVENT_CHANNEL=0` keeps a monitor's events on the socket (for
//! comparisons); unset or anything else, `Monitor::start` takes the
//! channel where the VM offers it. Its own test binary with one test: it
//! changes the process environment, which nothing else may read meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use ukvmi_conformance::{FakeConfig, Setup};
use ukvmi_introspector::Vm;
use ukvmi_monitor::Monitor;

fn channel_with(value: Option<&str>) -> bool {
    match value {
        Some(v) => std::env::set_var("UKVMI_EVENT_CHANNEL", v),
        None => std::env::remove_var("UKVMI_EVENT_CHANNEL"),
    }
    let s = Setup::new(&FakeConfig::default());
    let mon = Monitor::start(Vm::connect_raw(s.connect()).unwrap()).unwrap();
    let on = mon.event_channel();
    mon.stop();
    on
}

#[test]
fn the_environment_turns_the_channel_off() {
    assert!(channel_with(None), "unset: on where the VM offers it");
    assert!(!channel_with(Some("0")));
    assert!(!channel_with(Some("off")));
    assert!(channel_with(Some("1")));
    std::env::remove_var("UKVMI_EVENT_CHANNEL");
}
