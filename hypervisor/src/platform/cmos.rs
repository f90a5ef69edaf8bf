//! The host's wall-clock time from its CMOS RTC, to start guests' RTCs at the right date.

use x86_64::instructions::port::Port;

fn read(register: u8) -> u8 {
    let mut index: Port<u8> = Port::new(0x70);
    let mut data: Port<u8> = Port::new(0x71);
    // SAFETY: selecting a CMOS register (NMI stays enabled: bit 7 clear) and reading it has no
    // effect beyond the index latch, which only this code uses.
    unsafe {
        index.write(register);
        data.read()
    }
}

/// Seconds since 1970-01-01 UTC, read from the CMOS clock (assumed to run in UTC, as on QEMU,
/// Bochs and Linux-managed machines).
pub fn wall_clock_seconds() -> u64 {
    // Wait out an update in progress so the fields belong to the same second.
    for _ in 0..1_000_000 {
        if read(0x0a) & 0x80 == 0 {
            break;
        }
    }
    let binary = read(0x0b) & 0x04 != 0;
    let hour24 = read(0x0b) & 0x02 != 0;
    let decode = |v: u8| if binary { v as u64 } else { (v >> 4) as u64 * 10 + (v & 0x0f) as u64 };
    let second = decode(read(0x00));
    let minute = decode(read(0x02));
    let hour_raw = read(0x04);
    let mut hour = decode(hour_raw & 0x7f);
    if !hour24 {
        hour %= 12;
        if hour_raw & 0x80 != 0 {
            hour += 12;
        }
    }
    let day = decode(read(0x07));
    let month = decode(read(0x08));
    let century = match decode(read(0x32)) {
        19..=21 => decode(read(0x32)),
        _ => 20,
    };
    let year = century * 100 + decode(read(0x09));
    days_from_civil(year as i64, month as i64, day as i64).max(0) as u64 * 86_400 + hour * 3600 + minute * 60 + second
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
