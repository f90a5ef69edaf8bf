//! The fixed ACPI hardware the FADT describes: PM1a event and control blocks, the PM timer and
//! the reset register at port 0xcf9.
//!
//! The platform is always in ACPI mode (SCI_EN reads 1, so no SMI_CMD port is needed). No
//! event is ever signalled: the enable bits are stored but the SCI (GSI 9) is never raised.
//! Only TMR_STS is ever set, by the timer's bit 23 toggling, so status reads stay truthful.

use super::{Device, Events, Power, Span};

/// PM1a event block: PM1_STS (16 bits) then PM1_EN (16 bits).
pub const PM1A_EVT_BLK: u16 = 0x600;
/// PM1a event block length in bytes.
pub const PM1_EVT_LEN: u8 = 4;
/// PM1a control block: PM1_CNT (16 bits).
pub const PM1A_CNT_BLK: u16 = 0x604;
/// PM1a control block length in bytes.
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer block (one 32-bit register).
pub const PM_TMR_BLK: u16 = 0x608;
/// PM timer block length in bytes.
pub const PM_TMR_LEN: u8 = 4;
/// Reset register (the FADT's RESET_REG, system I/O space, 8 bits).
pub const RESET_PORT: u16 = 0xcf9;
/// The value the FADT tells the OS to write to [`RESET_PORT`] (hard reset + CPU reset).
pub const RESET_VALUE: u8 = 0x06;
/// SLP_TYP for S5, as the DSDT's \_S5 package declares it.
pub const S5_SLP_TYP: u8 = 5;
/// The PM timer is 24 bits wide: the FADT must leave TMR_VAL_EXT clear.
pub const PM_TIMER_32BIT: bool = false;
/// PM timer frequency in Hz (ACPI 6.5, 4.8.3.3: 3.579545 MHz).
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// SCI interrupt the FADT names (never raised here).
pub const SCI_GSI: u8 = 9;

// PM1_STS / PM1_EN bits (ACPI 6.5, 4.8.3.1).
const TMR_STS: u16 = 1 << 0;
/// Status bits that can be set; everything else reads 0.
const STS_IMPLEMENTED: u16 = TMR_STS;
const EN_WRITABLE: u16 = 0x0521; // TMR_EN, GBL_EN, PWRBTN_EN, RTC_EN
                                 // PM1_CNT bits (ACPI 6.5, 4.8.3.2.1).
const SCI_EN: u16 = 1 << 0;
const GBL_RLS: u16 = 1 << 2;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
// Reset control register bits (Intel ICH/PCH, port 0xcf9): SYS_RST, RST_CPU, FULL_RST.
const RST_CPU: u8 = 1 << 2;
const RESET_KEPT: u8 = 0x0a;

const TIMER_MASK: u64 = if PM_TIMER_32BIT { 0xffff_ffff } else { 0xff_ffff };
/// TMR_STS is set each time this bit of the timer changes (ACPI 6.5, 4.8.3.3).
const TIMER_MSB_SHIFT: u32 = if PM_TIMER_32BIT { 31 } else { 23 };

/// PM timer ticks since guest time 0 (not wrapped).
fn timer_ticks(now_ns: u64) -> u64 {
    (now_ns as u128 * PM_TIMER_HZ as u128 / 1_000_000_000) as u64
}

/// PM1a blocks, PM timer and reset register.
#[derive(Default)]
pub struct AcpiPm {
    /// Timer MSB toggles counted when TMR_STS was last cleared.
    tmr_cleared_at: u64,
    pm1_en: u16,
    /// PM1_CNT as last written, without the write-only bits.
    pm1_cnt: u16,
    reset: u8,
}

const PORTS: [Span; 3] = [
    Span { start: PM1A_EVT_BLK as u64, len: (PM1_EVT_LEN + PM1_CNT_LEN) as u64 },
    Span { start: PM_TMR_BLK as u64, len: PM_TMR_LEN as u64 },
    Span { start: RESET_PORT as u64, len: 1 },
];

impl AcpiPm {
    /// The fixed hardware at power-on.
    pub fn new() -> Self {
        AcpiPm::default()
    }

    /// The PM timer value at `now_ns`.
    pub fn timer(&self, now_ns: u64) -> u32 {
        (timer_ticks(now_ns) & TIMER_MASK) as u32
    }

    fn msb_toggles(now_ns: u64) -> u64 {
        timer_ticks(now_ns) >> TIMER_MSB_SHIFT
    }

    fn pm1_sts(&self, now_ns: u64) -> u16 {
        if Self::msb_toggles(now_ns) > self.tmr_cleared_at {
            TMR_STS
        } else {
            0
        }
    }

    /// One byte of the register file at `port`.
    fn read_byte(&mut self, port: u16, now_ns: u64) -> u8 {
        let half = |v: u16, hi: bool| if hi { (v >> 8) as u8 } else { v as u8 };
        match port {
            0x600 | 0x601 => half(self.pm1_sts(now_ns), port == 0x601),
            0x602 | 0x603 => half(self.pm1_en, port == 0x603),
            0x604 | 0x605 => half(self.pm1_cnt | SCI_EN, port == 0x605),
            0x608..=0x60b => (self.timer(now_ns) >> ((port - PM_TMR_BLK) * 8)) as u8,
            RESET_PORT => self.reset,
            _ => 0xff,
        }
    }

    /// One byte of a write; `port` is the byte's own port.
    fn write_byte(&mut self, port: u16, value: u8, now_ns: u64, events: &mut Events) {
        let set_half = |reg: u16, hi: bool| {
            if hi {
                (reg & 0x00ff) | (value as u16) << 8
            } else {
                (reg & 0xff00) | value as u16
            }
        };
        match port {
            // Write-1-to-clear.
            0x600 | 0x601 => {
                let bits = set_half(0, port == 0x601) & STS_IMPLEMENTED;
                if bits & TMR_STS != 0 {
                    self.tmr_cleared_at = Self::msb_toggles(now_ns);
                }
            }
            0x602 | 0x603 => self.pm1_en = set_half(self.pm1_en, port == 0x603) & EN_WRITABLE,
            0x604 | 0x605 => {
                let cnt = set_half(self.pm1_cnt, port == 0x605);
                self.pm1_cnt = cnt & !(SLP_EN | GBL_RLS | SCI_EN);
                let slp_typ = ((cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT) as u8;
                if cnt & SLP_EN != 0 && slp_typ == S5_SLP_TYP {
                    events.power = Some(Power::Off);
                }
                // Other sleep states are not offered (the DSDT declares only \_S5): ignored.
            }
            RESET_PORT => {
                // RST_CPU self-clears; SYS_RST and FULL_RST keep their values.
                self.reset = value & RESET_KEPT;
                if value & RST_CPU != 0 {
                    events.power = Some(Power::Reset);
                }
            }
            // The PM timer is read-only.
            _ => {}
        }
    }
}

impl Device for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }

    fn ports(&self) -> &[Span] {
        &PORTS
    }

    fn io_read(&mut self, port: u16, size: u8, now_ns: u64, _events: &mut Events) -> u32 {
        // Wide reads return consecutive registers, all sampled at the same instant.
        (0..size.min(4))
            .fold(0u32, |acc, i| acc | (self.read_byte(port.wrapping_add(i as u16), now_ns) as u32) << (8 * i as u32))
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32, now_ns: u64, events: &mut Events) {
        for (i, byte) in value.to_le_bytes().into_iter().take(size.min(4) as usize).enumerate() {
            self.write_byte(port.wrapping_add(i as u16), byte, now_ns, events);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(pm: &mut AcpiPm, port: u16, size: u8, now: u64) -> u32 {
        pm.io_read(port, size, now, &mut Events::default())
    }

    fn write(pm: &mut AcpiPm, port: u16, size: u8, value: u32, now: u64) -> Events {
        let mut events = Events::default();
        pm.io_write(port, size, value, now, &mut events);
        events
    }

    #[test]
    fn pm_timer_runs_at_3_579545_mhz_and_wraps_at_24_bits() {
        let mut pm = AcpiPm::new();
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, 0), 0);
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, 1_000_000), 3579);
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, 1_000_000_000), 3_579_545);
        // 2^24 ticks take 4.687 s: just before and after the wrap.
        let wrap_ns = 4_686_968_875; // ceil(2^24 * 1e9 / 3579545)
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, wrap_ns - 1), 0xff_ffff);
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, wrap_ns), 0);
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, 5_000_000_000), (17_897_725 - (1 << 24)) as u32);
        // Byte reads see the same counter.
        assert_eq!(read(&mut pm, PM_TMR_BLK + 1, 1, 1_000_000_000), (3_579_545 >> 8) & 0xff);
        assert_eq!(read(&mut pm, PM_TMR_BLK + 3, 1, 1_000_000_000), 0, "upper byte of a 24-bit timer");
        write(&mut pm, PM_TMR_BLK, 4, 0, 1_000_000_000);
        assert_eq!(read(&mut pm, PM_TMR_BLK, 4, 1_000_000_000), 3_579_545, "read-only");
    }

    #[test]
    fn pm1_status_is_write_one_to_clear_and_enable_is_stored() {
        let mut pm = AcpiPm::new();
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 2, 0), 0);
        // Bit 23 first toggles at 2^23 ticks (2.343 s).
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 2, 2_343_484_437), 0);
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 2, 2_343_484_438), 1);
        // Writing 0 changes nothing; writing 1 clears until the next toggle.
        write(&mut pm, PM1A_EVT_BLK, 2, 0xfffe, 3_000_000_000);
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 2, 3_000_000_000), 1);
        write(&mut pm, PM1A_EVT_BLK, 2, 0x0001, 3_000_000_000);
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 2, 3_000_000_000), 0);
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 2, 4_686_968_875), 1);
        write(&mut pm, PM1A_EVT_BLK + 2, 2, 0xffff, 0);
        assert_eq!(read(&mut pm, PM1A_EVT_BLK + 2, 2, 0), 0x0521);
        // A dword read of the event block returns STS in the low half, EN in the high half.
        assert_eq!(read(&mut pm, PM1A_EVT_BLK, 4, 4_686_968_875), 0x0521_0001);
    }

    #[test]
    fn s5_powers_off_and_other_sleep_types_do_not() {
        let mut pm = AcpiPm::new();
        assert_eq!(read(&mut pm, PM1A_CNT_BLK, 2, 0), 1, "SCI_EN: always in ACPI mode");
        // ACPICA writes SLP_TYP first, then SLP_TYP | SLP_EN.
        assert_eq!(write(&mut pm, PM1A_CNT_BLK, 2, 5 << 10, 0).power, None);
        assert_eq!(read(&mut pm, PM1A_CNT_BLK, 2, 0), 0x1401);
        for typ in [0u32, 1, 3, 4, 6, 7] {
            assert_eq!(write(&mut pm, PM1A_CNT_BLK, 2, typ << 10 | 1 << 13, 0).power, None, "SLP_TYP {typ}");
        }
        assert_eq!(read(&mut pm, PM1A_CNT_BLK, 2, 0) & 0x2000, 0, "SLP_EN reads 0");
        assert_eq!(write(&mut pm, PM1A_CNT_BLK, 2, (S5_SLP_TYP as u32) << 10 | 1 << 13, 0).power, Some(Power::Off));
        // A byte write of the high half alone works too.
        assert_eq!(write(&mut pm, PM1A_CNT_BLK + 1, 1, 0x34, 0).power, Some(Power::Off));
    }

    #[test]
    fn reset_register_resets_on_rst_cpu() {
        let mut pm = AcpiPm::new();
        assert_eq!(write(&mut pm, RESET_PORT, 1, 0x02, 0).power, None, "SYS_RST alone only selects hard reset");
        assert_eq!(read(&mut pm, RESET_PORT, 1, 0), 0x02);
        assert_eq!(write(&mut pm, RESET_PORT, 1, RESET_VALUE as u32, 0).power, Some(Power::Reset));
        assert_eq!(read(&mut pm, RESET_PORT, 1, 0), 0x02, "RST_CPU self-clears");
        assert_eq!(write(&mut pm, RESET_PORT, 1, 0x0e, 0).power, Some(Power::Reset));
        assert_eq!(read(&mut pm, RESET_PORT, 1, 0), 0x0a);
        assert!(write(&mut pm, PM1A_EVT_BLK, 4, u32::MAX, 0).irq_lines.is_empty(), "no SCI");
    }
}
