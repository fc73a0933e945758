//! Port I/O: the guest ABI's port devices (serial, power-off, "start vCPU"
//! and the hypercall doorbell), or a Linux guest's port bus (`devices`).

use super::KvmVcpu;
use crate::devices::PortAction;
use crate::vm::{lock, Exit, VmShared};
use ukvmi_endpoint::VcpuPort;
use ukvmi_guest_abi::layout;

/// What an `in` from `port` reads: the serial LSR says "transmitter
/// empty"; every other port reads as all ones (nothing there).
pub(super) fn in_value(port: u16) -> u8 {
    if port == layout::PORT_SERIAL + 5 {
        0x60
    } else {
        0xff
    }
}

/// An `in` from `port`: a Linux guest's bus, or the guest ABI's ports.
pub(super) fn port_in(shared: &VmShared, port: u16, data: &mut [u8]) {
    match &shared.linux {
        Some(l) => lock(&l.bus).read(port, data),
        None => data.fill(in_value(port)),
    }
}

impl KvmVcpu {
    pub(super) fn io_out(&mut self, vport: &VcpuPort, port: u16, value: u32) -> Option<Exit> {
        if let Some(l) = &self.shared.linux {
            if port == layout::PORT_HYPERCALL {
                return self.hypercall(vport);
            }
            // (`out` sizes are not kept: the devices look at the bytes they need.)
            return match lock(&l.bus).write(port, &value.to_le_bytes()) {
                PortAction::Reset => Some(Exit::Reset),
                PortAction::None => None,
            };
        }
        if matches!(
            port,
            layout::PORT_HYPERCALL | layout::PORT_SERIAL | layout::PORT_POWEROFF | layout::PORT_START_VCPU
        ) {
            self.shared.guest_spoke();
        }
        match port {
            layout::PORT_HYPERCALL => return self.hypercall(vport),
            layout::PORT_SERIAL => self.shared.serial_byte(value as u8),
            layout::PORT_POWEROFF => return Some(Exit::PowerOff(value as u8)),
            layout::PORT_START_VCPU => {
                if let Ok(i) = u16::try_from(value) {
                    self.shared.start_vcpu(i);
                }
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_serial_line_status_reads_as_something() {
        assert_eq!(in_value(layout::PORT_SERIAL + 5), 0x60);
        assert_eq!(in_value(layout::PORT_SERIAL), 0xff);
        assert_eq!(in_value(layout::PORT_POWEROFF), 0xff);
        assert_eq!(in_value(0x1234), 0xff);
    }
}
