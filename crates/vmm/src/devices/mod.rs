//! Port devices of a Linux guest's PC, on one bus: the 16550 (`serial`),
//! the CMOS/RTC (`cmos`), and the small stubs (`legacy`: i8042, the 0xcf9
//! reset, PCI configuration that finds nothing). Ports no device claims
//! read all ones and ignore writes, each logged once. The guest ABI's
//! images never see this bus (`vcpu::ports` serves them).

pub(crate) mod cmos;
pub(crate) mod legacy;
pub(crate) mod serial;

use std::collections::HashSet;
use std::sync::Arc;

/// What a port write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PortAction {
    /// Nothing more.
    None,
    /// The guest reset the machine.
    Reset,
}

/// A device on some ports; `offset` is the port minus the first one.
pub(crate) trait PortDevice: Send {
    /// An `in`: fills `data` (1, 2 or 4 bytes).
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// An `out` of `data`.
    fn write(&mut self, offset: u16, data: &[u8]) -> PortAction;
}

/// Ports read and written without effect and without a log line: the POST
/// code port and the delay port.
const QUIET_PORTS: [u16; 2] = [0x80, 0xed];

/// The port devices, by range.
pub(crate) struct PortBus {
    devices: Vec<(u16, u16, Box<dyn PortDevice>)>,
    logged: HashSet<u16>,
    log: Arc<dyn Fn(&str) + Send + Sync>,
}

impl PortBus {
    /// An empty bus; unclaimed ports are reported through `log` once each.
    pub(crate) fn new(log: Arc<dyn Fn(&str) + Send + Sync>) -> PortBus {
        PortBus { devices: Vec::new(), logged: HashSet::new(), log }
    }

    /// Puts `dev` on ports `start..start + len`.
    pub(crate) fn add(&mut self, start: u16, len: u16, dev: Box<dyn PortDevice>) {
        self.devices.push((start, len, dev));
    }

    /// The PC of a Linux guest: serial (with its IRQ), CMOS, i8042, reset
    /// and PCI configuration.
    pub(crate) fn pc(log: Arc<dyn Fn(&str) + Send + Sync>, serial: serial::SerialPort) -> PortBus {
        let mut bus = PortBus::new(log);
        bus.add(0x3f8, 8, Box::new(serial));
        bus.add(0x70, 2, Box::new(cmos::Cmos::default()));
        bus.add(0x60, 5, Box::new(legacy::I8042));
        bus.add(0xcf8, 8, Box::new(legacy::PciConfig::default()));
        bus.add(0xcf9, 1, Box::new(legacy::ResetControl));
        bus
    }

    fn find(&mut self, port: u16) -> Option<(u16, &mut Box<dyn PortDevice>)> {
        // The last added wins (0xcf9 lies inside PCI's 0xcf8..0xd00).
        self.devices
            .iter_mut()
            .rev()
            .find(|(start, len, _)| port >= *start && port - *start < *len)
            .map(|(start, _, d)| (port - *start, d))
    }

    fn unclaimed(&mut self, port: u16, what: &str) {
        if !QUIET_PORTS.contains(&port) && self.logged.insert(port) {
            (self.log)(&format!(
                "guest {what} port {port:#x}: no device there (reads 0xff, writes ignored); not logged again"
            ));
        }
    }

    /// An `in` from `port`.
    pub(crate) fn read(&mut self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((off, d)) => d.read(off, data),
            None => {
                data.fill(0xff);
                self.unclaimed(port, "reads from");
            }
        }
    }

    /// An `out` to `port`.
    pub(crate) fn write(&mut self, port: u16, data: &[u8]) -> PortAction {
        match self.find(port) {
            Some((off, d)) => d.write(off, data),
            None => {
                self.unclaimed(port, "writes to");
                PortAction::None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Log = Arc<dyn Fn(&str) + Send + Sync>;

    fn logger() -> (Arc<Mutex<Vec<String>>>, Log) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&lines);
        (lines, Arc::new(move |s: &str| l.lock().unwrap().push(s.to_string())))
    }

    #[test]
    fn unclaimed_ports_read_all_ones_and_are_logged_once() {
        let (lines, log) = logger();
        let mut bus = PortBus::new(log);
        let mut b = [0u8; 2];
        bus.read(0x2f8, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        bus.read(0x2f8, &mut b);
        assert_eq!(bus.write(0x2f8, &[1]), PortAction::None);
        bus.write(0x80, &[1]);
        bus.read(0xed, &mut b);
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("port 0x2f8"), "{lines:?}");
    }

    #[test]
    fn the_pc_resets_through_the_i8042_and_0xcf9() {
        let (lines, log) = logger();
        let (port, _evt) = serial::tests::port();
        let mut bus = PortBus::pc(log, port);
        let mut b = [0xaau8; 1];
        bus.read(0x64, &mut b);
        assert_eq!(b, [0], "i8042 status: nothing to read, ready for input");
        assert_eq!(bus.write(0x64, &[0xd1]), PortAction::None);
        assert_eq!(bus.write(0x60, &[0xfe]), PortAction::None, "a data byte, not the reset command");
        assert_eq!(bus.write(0x64, &[0xfe]), PortAction::Reset);
        assert_eq!(bus.write(0xcf9, &[0x02]), PortAction::None);
        assert_eq!(bus.write(0xcf9, &[0x06]), PortAction::Reset);
        // PCI: the address latch reads back, the data port finds nothing.
        bus.write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut w = [0u8; 4];
        bus.read(0xcf8, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0x8000_0000);
        bus.read(0xcfc, &mut w);
        assert_eq!(w, [0xff; 4]);
        assert!(lines.lock().unwrap().is_empty());
    }
}
