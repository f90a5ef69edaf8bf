//! The MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71 (data).
//!
//! The time is never ticked: it is the wall-clock time at guest time 0 plus the guest time
//! elapsed, re-based when the guest sets the clock. Interrupts are not modelled: register C
//! always reads 0 and IRQ 8 never fires, whatever the enable bits in register B say. The
//! daylight-saving bit and the divider-chain reset of register A are stored but do not change
//! the time.

use super::{Device, Events, Span};

/// Index port (bit 7 masks NMI).
pub const INDEX_PORT: u16 = 0x70;
/// Data port.
pub const DATA_PORT: u16 = 0x71;
/// CMOS index of the century byte (the FADT's CENTURY field names it).
pub const CENTURY: u8 = 0x32;

// Register indexes (MC146818A data sheet, address map).
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;
/// UIP is set this long before each update (MC146818A data sheet, tBUC = 244 us).
const UIP_NS: u64 = 244_000;
const NS_PER_S: u64 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

/// Broken-down civil time (binary, 24-hour).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 0 = Sunday.
    weekday: u8,
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + (month <= 2) as i64;
    (year, month, day)
}

/// (year, month 1-12, day 1-31) to days since 1970-01-01; the inverse of [`civil_from_days`].
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Civil {
    fn from_seconds(seconds: i64) -> Self {
        let days = seconds.div_euclid(SECONDS_PER_DAY);
        let sod = seconds.rem_euclid(SECONDS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Civil {
            year,
            month,
            day,
            hour: (sod / 3600) as u8,
            minute: (sod / 60 % 60) as u8,
            second: (sod % 60) as u8,
            weekday: (days + 4).rem_euclid(7) as u8,
        }
    }

    /// Seconds since the epoch; out-of-range fields written by the guest are clamped.
    fn to_seconds(self) -> i64 {
        let days = days_from_civil(self.year.clamp(0, 9999), self.month.clamp(1, 12), self.day.clamp(1, 31));
        let sod = self.hour.min(23) as i64 * 3600 + self.minute.min(59) as i64 * 60 + self.second.min(59) as i64;
        days * SECONDS_PER_DAY + sod
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// The MC146818 RTC with 128 bytes of CMOS RAM.
pub struct Rtc {
    index: u8,
    nmi_masked: bool,
    /// Registers and RAM; the time registers, C and D are computed instead.
    cmos: [u8; 128],
    /// Wall-clock seconds at guest time `base_ns`.
    base_seconds: i64,
    base_ns: u64,
    /// The time as the guest sees it while register B's SET bit holds updates.
    frozen: Option<Civil>,
}

const PORTS: [Span; 1] = [Span { start: INDEX_PORT as u64, len: 2 }];

impl Rtc {
    /// An RTC showing `epoch_seconds` (seconds since 1970-01-01 UTC) at guest time 0.
    pub fn new(epoch_seconds: u64) -> Self {
        let mut cmos = [0u8; 128];
        // 32.768 kHz time base, 1024 Hz rate; 24-hour BCD (the PC BIOS defaults).
        cmos[REG_A as usize] = 0x26;
        cmos[REG_B as usize] = B_24H;
        Rtc {
            index: 0,
            nmi_masked: false,
            cmos,
            base_seconds: i64::try_from(epoch_seconds).unwrap_or(i64::MAX / 2),
            base_ns: 0,
            frozen: None,
        }
    }

    /// Fills the BIOS memory-size fields for `bytes` of RAM from address 0.
    ///
    /// 0x30/0x31 (and 0x17/0x18): KiB above 1 MiB, at most 0xffff; 0x34/0x35: 64 KiB units
    /// between 16 MiB and 4 GiB, at most 0xffff; 0x5b-0x5d: 64 KiB units above 4 GiB.
    pub fn set_memory_size(&mut self, bytes: u64) {
        const MIB: u64 = 1 << 20;
        let low = bytes.min(4 << 30);
        let ext_kib = (low.saturating_sub(MIB) / 1024).min(0xffff) as u16;
        let above_16m = (low.saturating_sub(16 * MIB) / 0x1_0000).min(0xffff) as u16;
        let above_4g = (bytes.saturating_sub(4 << 30) / 0x1_0000).min(0xff_ffff) as u32;
        let base_kib: u16 = 640;
        self.cmos[0x15..0x17].copy_from_slice(&base_kib.to_le_bytes());
        self.cmos[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        self.cmos[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        self.cmos[0x34..0x36].copy_from_slice(&above_16m.to_le_bytes());
        self.cmos[0x5b..0x5e].copy_from_slice(&above_4g.to_le_bytes()[..3]);
        // Standard checksum over 0x10-0x2d, big-endian at 0x2e (IBM AT BIOS CMOS map).
        let sum: u16 = self.cmos[0x10..0x2e].iter().map(|&b| b as u16).sum();
        self.cmos[0x2e..0x30].copy_from_slice(&sum.to_be_bytes());
    }

    /// Whether the guest has masked NMI through bit 7 of port 0x70.
    pub fn nmi_masked(&self) -> bool {
        self.nmi_masked
    }

    fn running_seconds(&self, now_ns: u64) -> i64 {
        let elapsed = (now_ns.saturating_sub(self.base_ns) / NS_PER_S) as i64;
        self.base_seconds.saturating_add(elapsed)
    }

    fn civil(&self, now_ns: u64) -> Civil {
        self.frozen.unwrap_or_else(|| Civil::from_seconds(self.running_seconds(now_ns)))
    }

    fn binary(&self) -> bool {
        self.cmos[REG_B as usize] & B_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.cmos[REG_B as usize] & B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = if hour.is_multiple_of(12) { 12 } else { hour % 12 };
        self.encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, value: u8) -> u8 {
        if self.cmos[REG_B as usize] & B_24H != 0 {
            return self.decode(value);
        }
        let h12 = self.decode(value & !HOUR_PM) % 12;
        h12 + if value & HOUR_PM != 0 { 12 } else { 0 }
    }

    fn read_register(&mut self, index: u8, now_ns: u64) -> u8 {
        let t = self.civil(now_ns);
        match index {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            WEEKDAY => self.encode(t.weekday + 1),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u8),
            CENTURY => self.encode(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => {
                let phase = now_ns.saturating_sub(self.base_ns) % NS_PER_S;
                let uip = self.frozen.is_none() && phase >= NS_PER_S - UIP_NS;
                self.cmos[REG_A as usize] & !A_UIP | if uip { A_UIP } else { 0 }
            }
            // No interrupt source is modelled, so no flag is ever set (reading clears them).
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.cmos.get(index as usize).copied().unwrap_or(0xff),
        }
    }

    /// Applies a guest write to one time field, keeping the sub-second phase while running.
    fn write_time(&mut self, index: u8, value: u8, now_ns: u64) {
        let mut t = self.civil(now_ns);
        let v = self.decode(value);
        match index {
            SECONDS => t.second = v,
            MINUTES => t.minute = v,
            HOURS => t.hour = self.decode_hour(value),
            WEEKDAY => t.weekday = v.saturating_sub(1) % 7,
            DAY => t.day = v,
            MONTH => t.month = v,
            YEAR => t.year = t.year.div_euclid(100) * 100 + (v % 100) as i64,
            _ => t.year = (v as i64) * 100 + t.year.rem_euclid(100),
        }
        if self.frozen.is_some() {
            // Held as written (even an invalid date) until SET is cleared.
            self.frozen = Some(t);
        } else {
            let delta = t.to_seconds().saturating_sub(self.running_seconds(now_ns));
            self.base_seconds = self.base_seconds.saturating_add(delta);
        }
    }

    fn write_register(&mut self, index: u8, value: u8, now_ns: u64) {
        match index {
            SECONDS | MINUTES | HOURS | WEEKDAY | DAY | MONTH | YEAR | CENTURY => self.write_time(index, value, now_ns),
            REG_A => self.cmos[REG_A as usize] = value & !A_UIP,
            REG_B => {
                let was_set = self.frozen.is_some();
                let set = value & B_SET != 0;
                if set && !was_set {
                    self.frozen = Some(self.civil(now_ns));
                } else if !set {
                    if let Some(t) = self.frozen.take() {
                        // Updates resume from the time written, one second from now.
                        self.base_seconds = t.to_seconds();
                        self.base_ns = now_ns;
                    }
                }
                self.cmos[REG_B as usize] = value;
            }
            REG_C | REG_D => {}
            _ => {
                if let Some(byte) = self.cmos.get_mut(index as usize) {
                    *byte = value;
                }
            }
        }
    }
}

impl Device for Rtc {
    fn name(&self) -> &'static str {
        "rtc"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_read(&mut self, port: u16, _size: u8, now_ns: u64, _events: &mut Events) -> u32 {
        match port {
            INDEX_PORT => (self.index | if self.nmi_masked { 0x80 } else { 0 }) as u32,
            _ => self.read_register(self.index, now_ns) as u32,
        }
    }

    fn io_write(&mut self, port: u16, _size: u8, value: u32, now_ns: u64, _events: &mut Events) {
        let byte = value as u8;
        match port {
            INDEX_PORT => {
                self.index = byte & 0x7f;
                self.nmi_masked = byte & 0x80 != 0;
            }
            _ => self.write_register(self.index, byte, now_ns),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-28 13:45:07 UTC, a Saturday.
    const EPOCH: u64 = 1_795_873_507;

    fn reg(rtc: &mut Rtc, index: u8, now: u64) -> u8 {
        let mut events = Events::default();
        rtc.io_write(INDEX_PORT, 1, index as u32, now, &mut events);
        rtc.io_read(DATA_PORT, 1, now, &mut events) as u8
    }

    fn set(rtc: &mut Rtc, index: u8, value: u8, now: u64) {
        let mut events = Events::default();
        rtc.io_write(INDEX_PORT, 1, index as u32, now, &mut events);
        rtc.io_write(DATA_PORT, 1, value as u32, now, &mut events);
    }

    fn time(rtc: &mut Rtc, now: u64) -> [u8; 8] {
        [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY].map(|i| reg(rtc, i, now))
    }

    #[test]
    fn civil_conversion_handles_epoch_leap_days_and_centuries() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
        assert_eq!(days_from_civil(2024, 3, 1) - days_from_civil(2024, 2, 28), 2);
        assert_eq!(days_from_civil(2100, 3, 1) - days_from_civil(2100, 2, 28), 1, "2100 is not a leap year");
        assert_eq!(days_from_civil(2000, 3, 1) - days_from_civil(2000, 2, 28), 2, "2000 is");
        assert_eq!(days_from_civil(2026, 11, 28), 20_785);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(Civil::from_seconds(EPOCH as i64).weekday, 6);
    }

    #[test]
    fn reads_bcd_24h_by_default_and_binary_12h_when_asked() {
        let mut rtc = Rtc::new(EPOCH);
        assert_eq!(time(&mut rtc, 0), [0x07, 0x45, 0x13, 0x07, 0x28, 0x11, 0x26, 0x20]);
        // 2.5 s later the seconds have moved by two.
        assert_eq!(reg(&mut rtc, SECONDS, 2_500_000_000), 0x09);
        set(&mut rtc, REG_B, B_BINARY, 0); // binary, 12-hour
        assert_eq!(time(&mut rtc, 0), [7, 45, 0x80 | 1, 7, 28, 11, 26, 20]);
        set(&mut rtc, REG_B, 0, 0); // BCD, 12-hour
        assert_eq!(reg(&mut rtc, HOURS, 0), 0x81);
        // Midnight is 12 AM, noon 12 PM.
        let mut midnight = Rtc::new(EPOCH - (13 * 3600 + 45 * 60 + 7));
        set(&mut midnight, REG_B, 0, 0);
        assert_eq!(reg(&mut midnight, HOURS, 0), 0x12);
        assert_eq!(reg(&mut midnight, HOURS, 12 * 3600 * NS_PER_S), 0x92);
    }

    #[test]
    fn rolls_over_leap_days_and_the_century() {
        // 2024-02-28 23:59:59 UTC, then one and two seconds later.
        let mut rtc = Rtc::new(1_709_164_799);
        assert_eq!(time(&mut rtc, NS_PER_S), [0x00, 0x00, 0x00, 0x05, 0x29, 0x02, 0x24, 0x20]);
        // 2099-12-31 23:59:59 UTC, a Thursday; one second later Friday 2100-01-01.
        let mut rtc = Rtc::new(4_102_444_799);
        assert_eq!(time(&mut rtc, 0), [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x99, 0x20]);
        assert_eq!(time(&mut rtc, NS_PER_S), [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x00, 0x21]);
    }

    #[test]
    fn uip_is_set_only_in_the_last_244us_of_each_second() {
        let mut rtc = Rtc::new(EPOCH);
        assert_eq!(reg(&mut rtc, REG_A, 0), 0x26);
        assert_eq!(reg(&mut rtc, REG_A, 999_755_999), 0x26);
        assert_eq!(reg(&mut rtc, REG_A, 999_756_000), 0xa6);
        assert_eq!(reg(&mut rtc, REG_A, 999_999_999), 0xa6);
        assert_eq!(reg(&mut rtc, REG_A, 1_000_000_000), 0x26);
        set(&mut rtc, REG_A, 0xff, 0);
        assert_eq!(reg(&mut rtc, REG_A, 0), 0x7f, "UIP is read-only");
    }

    #[test]
    fn set_bit_freezes_the_clock_and_writes_move_it() {
        let mut rtc = Rtc::new(EPOCH);
        let t0 = 5 * NS_PER_S + 300_000_000; // 13:45:12.3
        set(&mut rtc, REG_B, B_SET | B_24H, t0);
        assert_eq!(reg(&mut rtc, SECONDS, t0 + 10 * NS_PER_S), 0x12, "frozen");
        assert_eq!(reg(&mut rtc, REG_A, t0 + 699_900_000) & A_UIP, 0, "no update while SET");
        // Linux's order: year, month, day, hours, minutes, seconds. Jan 31 would not fit February.
        set(&mut rtc, YEAR, 0x28, t0);
        set(&mut rtc, MONTH, 0x02, t0);
        set(&mut rtc, DAY, 0x29, t0);
        set(&mut rtc, HOURS, 0x08, t0);
        set(&mut rtc, MINUTES, 0x00, t0);
        set(&mut rtc, SECONDS, 0x30, t0);
        let t1 = t0 + 20 * NS_PER_S;
        set(&mut rtc, REG_B, B_24H, t1);
        // 2028-02-29 08:00:30 is a Tuesday; it runs again from t1.
        assert_eq!(time(&mut rtc, t1 + 999_999_999), [0x30, 0x00, 0x08, 0x03, 0x29, 0x02, 0x28, 0x20]);
        assert_eq!(reg(&mut rtc, SECONDS, t1 + 3 * NS_PER_S), 0x33);
        // A write without SET moves the clock and keeps running.
        set(&mut rtc, MINUTES, 0x15, t1 + 3 * NS_PER_S);
        assert_eq!(reg(&mut rtc, MINUTES, t1 + 4 * NS_PER_S), 0x15);
        assert_eq!(reg(&mut rtc, SECONDS, t1 + 4 * NS_PER_S), 0x34);
    }

    #[test]
    fn status_registers_ram_nmi_and_memory_fields() {
        let mut rtc = Rtc::new(EPOCH);
        assert_eq!(reg(&mut rtc, REG_D, 0), 0x80);
        assert_eq!(reg(&mut rtc, REG_C, 0), 0);
        set(&mut rtc, REG_B, 0x72, 0); // interrupt enables are kept but never fire
        assert_eq!(reg(&mut rtc, REG_B, 0), 0x72);
        assert_eq!(reg(&mut rtc, REG_C, 3 * NS_PER_S), 0);
        set(&mut rtc, 0x50, 0xa5, 0);
        set(&mut rtc, 0x7f, 0x5a, 0);
        assert_eq!(reg(&mut rtc, 0x50, 0), 0xa5);
        assert_eq!(reg(&mut rtc, 0x7f, 0), 0x5a);
        // Bit 7 of the index masks NMI and is not part of the index.
        let mut events = Events::default();
        rtc.io_write(INDEX_PORT, 1, 0x80 | 0x50, 0, &mut events);
        assert!(rtc.nmi_masked());
        assert_eq!(rtc.io_read(DATA_PORT, 1, 0, &mut events), 0xa5);
        assert!(events.irq_lines.is_empty());
        // 256 MiB: 0xffff KiB above 1 MiB (capped), (256 - 16) MiB / 64 KiB = 3840 above 16 MiB.
        rtc.set_memory_size(256 << 20);
        assert_eq!([reg(&mut rtc, 0x30, 0), reg(&mut rtc, 0x31, 0)], [0xff, 0xff]);
        assert_eq!([reg(&mut rtc, 0x34, 0), reg(&mut rtc, 0x35, 0)], [0x00, 0x0f]);
        assert_eq!([reg(&mut rtc, 0x15, 0), reg(&mut rtc, 0x16, 0)], [0x80, 0x02]);
        // 8 MiB: 7168 KiB above 1 MiB, nothing above 16 MiB.
        rtc.set_memory_size(8 << 20);
        assert_eq!([reg(&mut rtc, 0x30, 0), reg(&mut rtc, 0x31, 0)], [0x00, 0x1c]);
        assert_eq!([reg(&mut rtc, 0x34, 0), reg(&mut rtc, 0x35, 0)], [0, 0]);
        assert_eq!([reg(&mut rtc, 0x2e, 0), reg(&mut rtc, 0x2f, 0)], [0x00, 0x80 + 0x02 + 0x1c]);
    }
}
