//! What a VMM's host offers ([`HostFeatures`]) turned into the KVMI
//! commands and events the endpoint can serve ([`HostCaps`]).

use crate::backend::HostCaps;
use ukvmi_wire::{event, msg};

/// What a VMM found its host (KVM) can do, by probing. The endpoint turns
/// it into [`HostCaps`] (`HostCaps::from`): what is missing answers
/// `-KVM_EOPNOTSUPP` up front, never failing later.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostFeatures {
    /// Exception injection and #BP re-injection (`KVM_GET/SET_VCPU_EVENTS`):
    /// `KVMI_VCPU_INJECT_EXCEPTION`, the BREAKPOINT and TRAP events.
    pub vcpu_events: bool,
    /// Single-stepping and int3 exits (`KVM_SET_GUEST_DEBUG`):
    /// `KVMI_VCPU_CONTROL_SINGLESTEP` and the SINGLESTEP event.
    pub guest_debug: bool,
    /// Guest MSR writes that exit to the VMM (the MSR filter):
    /// `KVMI_VCPU_CONTROL_MSR` and the MSR event.
    pub msr_events: bool,
    /// Page restrictions the VMM can enforce:
    /// `KVMI_VM_SET_PAGE_ACCESS` and the PF event.
    pub page_access: bool,
}

/// CR, XSETBV and DESCRIPTOR events (and `KVMI_VCPU_CONTROL_CR`) have no
/// exit to userspace on a stock kernel, whatever it offers; PAUSE is the
/// endpoint's own, and HYPERCALL the VMM's own doorbell, so they always work.
impl From<HostFeatures> for HostCaps {
    fn from(f: HostFeatures) -> HostCaps {
        let mut caps = HostCaps::full().without_command(msg::VCPU_CONTROL_CR);
        if !f.vcpu_events {
            caps = caps.without_command(msg::VCPU_INJECT_EXCEPTION);
        }
        if !f.guest_debug {
            caps = caps.without_command(msg::VCPU_CONTROL_SINGLESTEP);
        }
        if !f.msr_events {
            caps = caps.without_command(msg::VCPU_CONTROL_MSR);
        }
        if !f.page_access {
            caps = caps.without_command(msg::VM_SET_PAGE_ACCESS);
        }
        for id in event::VCPU_EVENTS {
            let have = match id {
                event::PAUSE | event::HYPERCALL => true,
                event::MSR => f.msr_events,
                event::BREAKPOINT | event::TRAP => f.vcpu_events,
                event::SINGLESTEP => f.guest_debug,
                event::PF => f.page_access,
                _ => false,
            };
            if !have {
                caps = caps.without_event(id);
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const ALL: HostFeatures =
        HostFeatures { vcpu_events: true, guest_debug: true, msr_events: true, page_access: true };

    /// The commands and events `HostCaps::full()` has that `caps` lacks.
    fn missing(caps: HostCaps) -> (Vec<u16>, Vec<u16>) {
        let full = HostCaps::full();
        let commands = msg::VM_COMMANDS
            .iter()
            .chain(msg::VCPU_COMMANDS.iter())
            .copied()
            .filter(|id| full.commands.contains(*id) && !caps.commands.contains(*id))
            .collect();
        let events =
            (0..event::NUM_EVENTS).filter(|id| full.events.contains(*id) && !caps.events.contains(*id)).collect();
        (commands, events)
    }

    #[test]
    fn a_full_host_lacks_only_what_stock_kvm_never_exits_for() {
        let caps = HostCaps::from(ALL);
        assert_eq!(missing(caps), (vec![msg::VCPU_CONTROL_CR], vec![event::CR, event::XSETBV, event::DESCRIPTOR]));
        assert!(caps.singlestep);
        assert!(caps.events.contains(event::UNHOOK));
    }

    #[test]
    fn a_bare_host_still_serves_pause_hypercall_and_unhook() {
        let caps = HostCaps::from(HostFeatures::default());
        assert!(!caps.singlestep);
        for id in [event::UNHOOK, event::PAUSE, event::HYPERCALL] {
            assert!(caps.events.contains(id), "event {id}");
        }
        let (commands, events) = missing(caps);
        let commands: BTreeSet<u16> = commands.into_iter().collect();
        let expected = [
            msg::VM_SET_PAGE_ACCESS,
            msg::VCPU_INJECT_EXCEPTION,
            msg::VCPU_CONTROL_CR,
            msg::VCPU_CONTROL_MSR,
            msg::VCPU_CONTROL_SINGLESTEP,
        ];
        assert_eq!(commands, expected.into_iter().collect::<BTreeSet<u16>>());
        let events: BTreeSet<u16> = events.into_iter().collect();
        let expected = [
            event::BREAKPOINT,
            event::CR,
            event::TRAP,
            event::XSETBV,
            event::DESCRIPTOR,
            event::MSR,
            event::PF,
            event::SINGLESTEP,
        ];
        assert_eq!(events, expected.into_iter().collect::<BTreeSet<u16>>());
    }

    #[test]
    fn each_feature_brings_exactly_its_commands_and_events() {
        let base = missing(HostCaps::from(HostFeatures::default()));
        let cases: [(HostFeatures, Vec<u16>, Vec<u16>); 4] = [
            (
                HostFeatures { vcpu_events: true, ..HostFeatures::default() },
                vec![msg::VCPU_INJECT_EXCEPTION],
                vec![event::BREAKPOINT, event::TRAP],
            ),
            (
                HostFeatures { guest_debug: true, ..HostFeatures::default() },
                vec![msg::VCPU_CONTROL_SINGLESTEP],
                vec![event::SINGLESTEP],
            ),
            (
                HostFeatures { msr_events: true, ..HostFeatures::default() },
                vec![msg::VCPU_CONTROL_MSR],
                vec![event::MSR],
            ),
            (
                HostFeatures { page_access: true, ..HostFeatures::default() },
                vec![msg::VM_SET_PAGE_ACCESS],
                vec![event::PF],
            ),
        ];
        for (features, commands, events) in cases {
            let (c, e) = missing(HostCaps::from(features));
            let gained_c: Vec<u16> = base.0.iter().copied().filter(|id| !c.contains(id)).collect();
            let gained_e: Vec<u16> = base.1.iter().copied().filter(|id| !e.contains(id)).collect();
            assert_eq!(gained_c, commands, "{features:?}");
            assert_eq!(gained_e, events, "{features:?}");
        }
    }

    #[test]
    fn singlestep_follows_guest_debug_alone() {
        assert!(HostCaps::from(HostFeatures { guest_debug: true, ..HostFeatures::default() }).singlestep);
        assert!(!HostCaps::from(HostFeatures { guest_debug: false, ..ALL }).singlestep);
    }
}
