//! The small port stubs of a PC: the i8042 (only its reset command), the
//! 0xcf9 reset control, and PCI configuration space with nothing in it.

use super::{PortAction, PortDevice};

/// i8042 at 0x60–0x64: status (0x64) and data (0x60) read 0 (no data,
/// ready for a command), `0xfe` to the command port 0x64 pulses the reset
/// line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct I8042;

impl PortDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> PortAction {
        PortAction::None.or_reset(offset == 4 && data.first() == Some(&0xfe))
    }
}

impl PortAction {
    fn or_reset(self, reset: bool) -> PortAction {
        if reset {
            PortAction::Reset
        } else {
            self
        }
    }
}

/// The reset control register at 0xcf9: a write with bit 2 (RST_CPU) set
/// resets the machine; reads 0.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResetControl;

impl PortDevice for ResetControl {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u16, data: &[u8]) -> PortAction {
        PortAction::None.or_reset(data.first().is_some_and(|v| v & 4 != 0))
    }
}

/// PCI configuration mechanism 1 at 0xcf8–0xcff: the address latch is kept
/// (so a probe sees type 1), every data read is all ones (no device).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PciConfig {
    address: u32,
}

impl PortDevice for PciConfig {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> PortAction {
        if offset == 0 {
            if let Ok(w) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(w);
            }
        }
        PortAction::None
    }
}
