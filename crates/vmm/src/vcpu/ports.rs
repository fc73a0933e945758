//! The guest ABI's port devices: serial, power-off, "start vCPU" and the
//! hypercall doorbell.

use super::KvmVcpu;
use crate::vm::Exit;
use ukvmi_endpoint::VcpuPort;
use ukvmi_guests::layout;

impl KvmVcpu {
    pub(super) fn io_out(&mut self, vport: &VcpuPort, port: u16, value: u32) -> Option<Exit> {
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
