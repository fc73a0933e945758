//! The CMOS RAM and its real-time clock at 0x70/0x71: the time is the
//! host's (UTC) in BCD, never updating (UIP clear), 24-hour mode.

use super::{PortAction, PortDevice};

/// Index register (0x70; bit 7 is the NMI mask, ignored) and 128 bytes.
#[derive(Debug, Clone)]
pub(crate) struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Cmos {
        let mut ram = [0u8; 128];
        ram[0x0a] = 0x26; // 32.768 kHz time base, 1024 Hz rate, UIP clear
        ram[0x0b] = 0x02; // 24-hour, BCD
        ram[0x0d] = 0x80; // valid RAM and time
        Cmos { index: 0, ram }
    }
}

fn bcd(v: u64) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// Days since 1970-01-01 as (year, month, day) (the civil calendar).
pub(crate) fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The RTC register `reg` (0x00–0x09) at `secs` since the epoch, BCD.
pub(crate) fn rtc(reg: u8, secs: u64) -> Option<u8> {
    let days = secs / 86_400;
    let t = secs % 86_400;
    let (y, m, d) = civil(days);
    Some(match reg {
        0 => bcd(t % 60),
        2 => bcd(t / 60 % 60),
        4 => bcd(t / 3600),
        6 => bcd((days + 4) % 7 + 1), // 1970-01-01 was a Thursday; Sunday = 1
        7 => bcd(d),
        8 => bcd(m),
        9 => bcd(y),
        0x32 => bcd(y / 100),
        1 | 3 | 5 => 0, // alarms
        _ => return None,
    })
}

impl PortDevice for Cmos {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let v = if offset == 0 {
            self.index
        } else {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            rtc(self.index, now).unwrap_or_else(|| self.ram.get(usize::from(self.index)).copied().unwrap_or(0))
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) -> PortAction {
        let Some(&v) = data.first() else { return PortAction::None };
        if offset == 0 {
            self.index = v & 0x7f;
        } else if !matches!(self.index, 0x0a..=0x0d) {
            if let Some(r) = self.ram.get_mut(usize::from(self.index)) {
                *r = v;
            }
        }
        PortAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_reads_in_bcd() {
        // 2026-12-05 02:30:59 UTC, a Saturday.
        let secs = 1_796_437_859;
        assert_eq!(civil(secs / 86_400), (2026, 12, 5));
        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32].iter().map(|r| rtc(*r, secs).unwrap()).collect();
        assert_eq!(regs, [0x59, 0x30, 0x02, 0x07, 0x05, 0x12, 0x26, 0x20]);
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn status_registers_say_valid_24h_bcd_and_no_update() {
        let mut c = Cmos::default();
        let mut b = [0u8; 1];
        for (reg, want) in [(0x0a, 0x26), (0x0b, 0x02), (0x0d, 0x80)] {
            c.write(0, &[reg | 0x80]);
            c.read(1, &mut b);
            assert_eq!(b[0], want, "register {reg:#x}");
        }
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a, "plain CMOS RAM keeps what was written");
        c.read(0, &mut b);
        assert_eq!(b[0], 0x40);
    }
}
