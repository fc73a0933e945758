//! The 16550 UART at 0x3f8 (vm-superio's `Serial`): what the guest sends
//! goes to the VM's serial console, its interrupt is GSI 4 through an
//! irqfd.

use super::{PortAction, PortDevice};
use crate::vm::Console;
use std::io::Write;
use std::sync::{Arc, Mutex};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The GSI of COM1's interrupt.
pub(crate) const SERIAL_GSI: u32 = 4;

/// An irqfd: writing 1 raises the interrupt KVM routes it to.
#[derive(Debug)]
pub(crate) struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The transmitter's output: the VM's line-buffered serial console.
pub(crate) struct ConsoleOut(pub Arc<Mutex<Console>>);

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut c = crate::vm::lock(&self.0);
        for b in buf {
            c.byte(*b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// COM1.
pub(crate) struct SerialPort(Serial<IrqLine, NoEvents, ConsoleOut>);

impl SerialPort {
    /// A 16550 raising `irq` and writing to `console`.
    pub(crate) fn new(irq: IrqLine, console: Arc<Mutex<Console>>) -> SerialPort {
        SerialPort(Serial::new(irq, ConsoleOut(console)))
    }
}

impl PortDevice for SerialPort {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> PortAction {
        if let Some(v) = data.first() {
            // A failed irqfd write loses one interrupt; the guest's
            // driver polls LSR as well.
            let _ = self.0.write(offset as u8, *v);
        }
        PortAction::None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vm::SerialSink;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A port whose console is a shared buffer; the eventfd to watch.
    pub(crate) fn port() -> (SerialPort, EventFd) {
        port_into(Arc::new(Mutex::new(Vec::new()))).0
    }

    pub(crate) fn port_into(buf: Arc<Mutex<Vec<u8>>>) -> ((SerialPort, EventFd), ()) {
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let console = Arc::new(Mutex::new(Console::new(SerialSink::Writer(Box::new(Shared(buf))))));
        ((SerialPort::new(IrqLine(evt.try_clone().unwrap()), console), evt), ())
    }

    #[test]
    fn bytes_reach_the_console_by_line_and_raise_the_interrupt() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let ((mut p, evt), ()) = port_into(Arc::clone(&buf));
        p.write(1, &[0x02]); // IER: THR empty interrupt
        assert!(evt.read().unwrap() >= 1, "enabling it raises it");
        let mut iir = [0u8; 1];
        p.read(2, &mut iir); // acknowledges it
        assert!(evt.read().is_err(), "nothing pending");
        for b in b"hi\n" {
            p.write(0, &[*b]);
        }
        assert_eq!(*buf.lock().unwrap(), b"hi\n");
        assert!(evt.read().unwrap() >= 1, "the THR-empty interrupt was raised");
        let mut lsr = [0u8; 1];
        p.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "transmitter empty");
    }
}
