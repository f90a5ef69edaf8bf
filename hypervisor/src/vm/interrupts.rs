//! The one place interrupt delivery is decided: 8259 pair, I/O APIC and local APIC together.
//!
//! Devices report line changes as GSIs ([`Events::irq_lines`](crate::devices::Events)); the run
//! loop feeds them to [`InterruptRouter::set_line`]. ISA lines 0-15 reach both the 8259s and the
//! I/O APIC, with the ISA IRQ0 -> GSI 2 override the MADT announces (the PIT's IRQ0 arrives at
//! I/O APIC pin 2); IRQ2 is the 8259 cascade and is routed nowhere. GSIs 16-23 reach the I/O APIC
//! only. I/O APIC messages go to the local APIC; level-triggered EOIs go back to the I/O APIC.
//!
//! The router owns the three controllers, so they are not on the device bus: the run loop
//! forwards the 8259 ports ([`InterruptRouter::claims_port`]), the I/O APIC and local APIC pages
//! ([`InterruptRouter::claims_mmio`]) and the APIC MSRs ([`InterruptRouter::is_lapic_msr`]) here.

use crate::devices::ioapic::{Delivery, IoApic, IOAPIC_BASE, IOAPIC_LEN, PINS};
use crate::devices::pic::PicPair;
use crate::devices::{Device, Events};

use super::lapic::{ApicEffect, LocalApic, LAPIC_BASE, LAPIC_LEN, MSR_APIC_BASE, MSR_TSC_DEADLINE};
use super::lapic::{MSR_X2APIC_FIRST, MSR_X2APIC_LAST};

/// The ISA IRQ the PIT uses.
const ISA_TIMER: u8 = 0;
/// The I/O APIC pin the PIT's IRQ0 is wired to (MADT interrupt source override).
const TIMER_GSI: u8 = 2;
/// The 8259 cascade input: not a device line.
const CASCADE: u8 = 2;

/// 8259 pair, I/O APIC and local APIC of a single-vCPU VM.
pub struct InterruptRouter {
    /// The legacy 8259 pair.
    pub pic: PicPair,
    /// The I/O APIC.
    pub ioapic: IoApic,
    /// The vCPU's local APIC.
    pub lapic: LocalApic,
    /// Last level reported for each GSI.
    line_levels: [bool; PINS],
}

impl InterruptRouter {
    /// Controllers in their reset state; `tsc_hz` is the guest TSC frequency (TSC-deadline timer).
    pub fn new(tsc_hz: u64) -> Self {
        InterruptRouter {
            pic: PicPair::new(),
            ioapic: IoApic::new(),
            lapic: LocalApic::new(tsc_hz),
            line_levels: [false; PINS],
        }
    }

    /// A device drove GSI `gsi` to `level`. GSIs above 23 are ignored.
    pub fn set_line(&mut self, gsi: u8, level: bool) {
        let Some(slot) = self.line_levels.get_mut(usize::from(gsi)) else { return };
        *slot = level;
        if gsi == CASCADE {
            return;
        }
        if gsi < 16 {
            self.pic.set_irq(gsi, level);
        }
        let pin = if gsi == ISA_TIMER { TIMER_GSI } else { gsi };
        let delivery = self.ioapic.set_irq(pin, level);
        self.deliver(delivery);
    }

    /// Applies a batch of line changes in order (as collected in `Events::irq_lines`).
    pub fn set_lines(&mut self, lines: &[(u8, bool)]) {
        for &(gsi, level) in lines {
            self.set_line(gsi, level);
        }
    }

    /// The level last reported for `gsi` (false for lines that do not exist).
    pub fn line_level(&self, gsi: u8) -> bool {
        self.line_levels.get(usize::from(gsi)).copied().unwrap_or(false)
    }

    fn deliver(&mut self, deliveries: impl IntoIterator<Item = Delivery>) {
        // One vCPU: every fixed or lowest-priority message is for its APIC.
        for delivery in deliveries {
            self.lapic.accept(delivery.vector, delivery.level);
        }
    }

    /// Acts on a local APIC register write: level EOIs re-deliver still-asserted I/O APIC lines.
    fn apply(&mut self, effect: ApicEffect) {
        if let Some(vector) = effect.eoi_level_vector {
            let again = self.ioapic.end_of_interrupt(vector);
            self.deliver(again);
        }
    }

    /// Fires the local APIC timer if it is due at `now_ns`.
    pub fn poll(&mut self, now_ns: u64) {
        self.lapic.poll(now_ns);
    }

    /// When [`InterruptRouter::poll`] next has something to do.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.lapic.next_deadline_ns()
    }

    /// Whether the 8259's INTR reaches the CPU: the local APIC is disabled (the 8259 then drives
    /// INTR directly) or LINT0 is an unmasked ExtINT input (virtual wire mode).
    fn pic_connected(&self) -> bool {
        !self.lapic.enabled() || self.lapic.lint0_extint()
    }

    /// The vector the vCPU receives next if it can take an interrupt: the local APIC's pending
    /// vector when it is enabled, otherwise the 8259's when connected.
    pub fn next_vector(&self) -> Option<u8> {
        if let Some(vector) = self.lapic.pending() {
            return Some(vector);
        }
        if self.pic_connected() && self.pic.output() {
            return self.pic.pending_vector();
        }
        None
    }

    /// Delivers the vector [`InterruptRouter::next_vector`] names (local APIC IRR -> ISR, or an
    /// 8259 INTA cycle) and returns it for injection. Call only when the guest can take it.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if let Some(vector) = self.lapic.pending() {
            self.lapic.acknowledge(vector);
            return Some(vector);
        }
        if self.pic_connected() && self.pic.output() {
            return self.pic.acknowledge();
        }
        None
    }

    /// Local APIC MMIO read at `offset` within its page.
    pub fn lapic_mmio_read(&self, offset: u64, size: u8, now_ns: u64) -> u64 {
        self.lapic.mmio_read(offset, size, now_ns)
    }

    /// Local APIC MMIO write at `offset` within its page.
    pub fn lapic_mmio_write(&mut self, offset: u64, size: u8, value: u64, now_ns: u64) {
        let effect = self.lapic.mmio_write(offset, size, value, now_ns);
        self.apply(effect);
    }

    /// Whether RDMSR/WRMSR of `msr` belongs to the local APIC.
    pub fn is_lapic_msr(msr: u32) -> bool {
        matches!(msr, MSR_APIC_BASE | MSR_TSC_DEADLINE | MSR_X2APIC_FIRST..=MSR_X2APIC_LAST)
    }

    /// RDMSR of a local APIC MSR; `Err` means inject #GP.
    #[allow(clippy::result_unit_err)]
    pub fn lapic_msr_read(&self, msr: u32, now_ns: u64) -> Result<u64, ()> {
        self.lapic.msr_read(msr, now_ns)
    }

    /// WRMSR of a local APIC MSR; `tsc` is the guest TSC at `now_ns`. `Err` means inject #GP.
    #[allow(clippy::result_unit_err)]
    pub fn lapic_msr_write(&mut self, msr: u32, value: u64, now_ns: u64, tsc: u64) -> Result<(), ()> {
        let effect = self.lapic.msr_write(msr, value, now_ns, tsc)?;
        self.apply(effect);
        Ok(())
    }

    /// Whether `port` is an 8259 or ELCR port.
    pub fn claims_port(&self, port: u16) -> bool {
        self.pic.ports().iter().any(|span| u64::from(port).wrapping_sub(span.start) < span.len)
    }

    /// Whether `gpa` is in the I/O APIC or local APIC page.
    pub fn claims_mmio(&self, gpa: u64) -> bool {
        in_page(gpa, IOAPIC_BASE, IOAPIC_LEN).is_some() || in_page(gpa, LAPIC_BASE, LAPIC_LEN).is_some()
    }

    /// Port read of an 8259/ELCR port (same shape as [`Device::io_read`]).
    pub fn io_read(&mut self, port: u16, size: u8, now_ns: u64, events: &mut Events) -> u32 {
        self.pic.io_read(port, size, now_ns, events)
    }

    /// Port write of an 8259/ELCR port (same shape as [`Device::io_write`]).
    pub fn io_write(&mut self, port: u16, size: u8, value: u32, now_ns: u64, events: &mut Events) {
        self.pic.io_write(port, size, value, now_ns, events);
    }

    /// MMIO read in the I/O APIC or local APIC page (same shape as [`Device::mmio_read`]).
    pub fn mmio_read(&mut self, gpa: u64, size: u8, now_ns: u64, events: &mut Events) -> u64 {
        if let Some(offset) = in_page(gpa, LAPIC_BASE, LAPIC_LEN) {
            return self.lapic_mmio_read(offset, size, now_ns);
        }
        self.ioapic.mmio_read(gpa, size, now_ns, events)
    }

    /// MMIO write in the I/O APIC or local APIC page (same shape as [`Device::mmio_write`]).
    pub fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, now_ns: u64, events: &mut Events) {
        if let Some(offset) = in_page(gpa, LAPIC_BASE, LAPIC_LEN) {
            self.lapic_mmio_write(offset, size, value, now_ns);
            return;
        }
        if in_page(gpa, IOAPIC_BASE, IOAPIC_LEN).is_some() {
            self.ioapic.mmio_write(gpa, size, value, now_ns, events);
            let unmasked = self.ioapic.take_deliveries();
            self.deliver(unmasked);
        }
    }
}

/// `gpa - base` if `gpa` lies in `[base, base + len)`.
fn in_page(gpa: u64, base: u64, len: u64) -> Option<u64> {
    gpa.checked_sub(base).filter(|offset| *offset < len)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOI: u64 = 0xb0;
    const SVR: u64 = 0xf0;
    const LINT0: u64 = 0x350;

    fn router() -> InterruptRouter {
        let mut r = InterruptRouter::new(1_000_000_000);
        let mut events = Events::default();
        // 8259s at 0x20/0x28, cascade on IR2, 8086 mode.
        for (port, base, icw3) in [(0x20u16, 0x20u32, 4u32), (0xa0, 0x28, 2)] {
            for (offset, value) in [(0, 0x11), (1, base), (1, icw3), (1, 0x01), (1, 0x00)] {
                r.io_write(port + offset, 1, value, 0, &mut events);
            }
        }
        r
    }

    fn enable_lapic(r: &mut InterruptRouter, lint0: u32) {
        r.lapic_mmio_write(SVR, 4, 0x1ff, 0);
        r.lapic_mmio_write(LINT0, 4, lint0.into(), 0);
    }

    /// Programs I/O APIC pin `pin` through the router's MMIO path.
    fn program(r: &mut InterruptRouter, pin: u8, low: u32) {
        let mut events = Events::default();
        let select = 0x10 + 2 * u64::from(pin);
        r.mmio_write(IOAPIC_BASE, 4, select + 1, 0, &mut events);
        r.mmio_write(IOAPIC_BASE + 0x10, 4, 0, 0, &mut events);
        r.mmio_write(IOAPIC_BASE, 4, select, 0, &mut events);
        r.mmio_write(IOAPIC_BASE + 0x10, 4, low.into(), 0, &mut events);
    }

    #[test]
    fn pit_irq0_reaches_ioapic_pin2_and_pic_ir0_and_the_lapic_wins() {
        let mut r = router();
        enable_lapic(&mut r, 0x1_0700);
        program(&mut r, 0, 0x31);
        program(&mut r, 2, 0x30);
        let mut events = Events::default();
        events.pulse(0);
        r.set_lines(&events.irq_lines);
        assert!(r.lapic.requested(0x30));
        assert!(!r.lapic.requested(0x31), "pin 0 is not the PIT");
        assert_eq!(r.pic.master_registers().0, 0x01, "PIC IR0 latched");
        assert_eq!(r.next_vector(), Some(0x30));
        assert_eq!(r.acknowledge(), Some(0x30));
        assert!(r.lapic.in_service(0x30));
        // LINT0 masked: the 8259's pending IR0 does not reach the vCPU.
        assert_eq!(r.next_vector(), None);
        assert_eq!(r.acknowledge(), None);
        // The cascade line is not a device line.
        r.set_line(2, true);
        assert_eq!(r.pic.master_registers().0, 0x01);
        assert!(!r.line_level(0) && r.line_level(2));
    }

    #[test]
    fn pic_path_is_used_while_the_lapic_is_software_disabled() {
        let mut r = router();
        program(&mut r, 1, 0x41);
        r.set_line(1, true);
        assert!(!r.lapic.requested(0x41), "disabled LAPIC accepts nothing");
        assert_eq!(r.next_vector(), Some(0x21));
        assert_eq!(r.acknowledge(), Some(0x21));
        assert_eq!(r.next_vector(), None);
        assert_eq!(r.pic.master_registers().1, 0x02);
    }

    #[test]
    fn lint0_extint_passes_the_pic_through_an_enabled_lapic() {
        let mut r = router();
        enable_lapic(&mut r, 0x700);
        r.set_line(12, true);
        assert_eq!(r.next_vector(), Some(0x2c));
        // A LAPIC vector takes precedence over the virtual wire.
        r.lapic.accept(0x90, false);
        assert_eq!(r.acknowledge(), Some(0x90));
        assert_eq!(r.acknowledge(), Some(0x2c));
        assert_eq!(r.pic.slave_registers().1, 0x10);
    }

    #[test]
    fn level_line_is_redelivered_after_eoi_only_while_asserted() {
        let mut r = router();
        enable_lapic(&mut r, 0x1_0700);
        program(&mut r, 4, 0x8044);
        r.set_line(4, true);
        assert_eq!(r.acknowledge(), Some(0x44));
        r.lapic_mmio_write(EOI, 4, 0, 10);
        assert!(r.lapic.requested(0x44), "still asserted: delivered again");
        assert_eq!(r.acknowledge(), Some(0x44));
        r.set_line(4, false);
        r.lapic_mmio_write(EOI, 4, 0, 20);
        assert!(!r.lapic.requested(0x44));
        assert_eq!(r.next_vector(), None);
        assert_eq!(r.ioapic.entry(4) & (1 << 14), 0, "remote IRR clear");
    }

    #[test]
    fn x2apic_eoi_and_ioapic_unmask_go_through_the_router() {
        let mut r = router();
        enable_lapic(&mut r, 0x1_0700);
        program(&mut r, 20, 0x1_8060);
        r.set_line(20, true);
        assert!(!r.lapic.requested(0x60));
        program(&mut r, 20, 0x8060);
        assert!(r.lapic.requested(0x60), "unmasking an asserted level pin delivers");
        assert!(InterruptRouter::is_lapic_msr(0x1b) && InterruptRouter::is_lapic_msr(0x80b));
        assert!(!InterruptRouter::is_lapic_msr(0x900));
        assert_eq!(r.lapic_msr_write(0x80b, 0, 0, 0), Err(()), "xAPIC mode");
        r.lapic_msr_write(0x1b, 0xfee0_0c00, 0, 0).unwrap();
        assert_eq!(r.acknowledge(), Some(0x60));
        r.lapic_msr_write(0x80b, 0, 0, 0).unwrap();
        assert!(r.lapic.requested(0x60));
        assert_eq!(r.lapic_msr_read(0x803, 0), Ok(0x0005_0014));
    }

    #[test]
    fn claims_and_timer_forwarding() {
        let mut r = router();
        assert!(r.claims_port(0x21) && r.claims_port(0xa0) && r.claims_port(0x4d1));
        assert!(!r.claims_port(0x22) && !r.claims_port(0x4d2));
        assert!(r.claims_mmio(0xfec0_0010) && r.claims_mmio(0xfee0_0fff));
        assert!(!r.claims_mmio(0xfec0_1000) && !r.claims_mmio(0xfedf_ffff));
        let mut events = Events::default();
        assert_eq!(r.mmio_read(0xfee0_0030, 4, 0, &mut events), 0x0005_0014);
        enable_lapic(&mut r, 0x1_0700);
        r.lapic_mmio_write(0x3e0, 4, 0xb, 0);
        r.lapic_mmio_write(0x320, 4, 0xef, 0);
        r.lapic_mmio_write(0x380, 4, 500, 100);
        assert_eq!(r.next_deadline_ns(), Some(600));
        r.poll(600);
        assert_eq!(r.next_vector(), Some(0xef));
    }
}
