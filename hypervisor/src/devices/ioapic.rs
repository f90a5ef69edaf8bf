//! An 82093AA-style I/O APIC with 24 redirection entries at 0xFEC0_0000.
//!
//! The guest selects a register through IOREGSEL (+0x00) and accesses it through IOWIN (+0x10),
//! 32 bits at a time; other widths and offsets are ignored and read 0. Deliveries are returned to
//! the caller (the interrupt router), which hands them to the local APIC.

use alloc::vec::Vec;

use super::{Device, Events, Span};

/// Guest-physical base of the I/O APIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Size of the MMIO window.
pub const IOAPIC_LEN: u64 = 0x1000;
/// Number of redirection entries (and input pins).
pub const PINS: usize = 24;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;
/// Version 0x11 with the highest redirection entry (23) in bits 23:16 (82093AA datasheet, 3.2.2).
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);
/// The ID lives in bits 27:24 (82093AA datasheet, 3.2.1).
const ID_MASK: u32 = 0x0f00_0000;

// Redirection entry fields (82093AA datasheet, 3.2.4).
const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DELIVERY_STATUS: u64 = 1 << 12;
const ACTIVE_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const LOGICAL: u64 = 1 << 11;
const LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DESTINATION_SHIFT: u32 = 56;
/// Bits the guest may write: vector, delivery mode, destination mode, polarity, trigger, mask,
/// destination.
const WRITABLE: u64 = 0xff00_0000_0001_afff;
const _: () = assert!(WRITABLE & (DELIVERY_STATUS | REMOTE_IRR) == 0);

/// An interrupt message for the local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The vector.
    pub vector: u8,
    /// Level-triggered: the LAPIC sets its TMR bit and reports the EOI back.
    pub level: bool,
    /// Destination field (APIC ID or logical destination).
    pub destination: u8,
    /// Logical destination mode.
    pub logical: bool,
    /// Lowest-priority rather than fixed delivery.
    pub lowest_priority: bool,
}

/// The I/O APIC.
#[derive(Clone, Debug)]
pub struct IoApic {
    id: u32,
    select: u8,
    entries: [u64; PINS],
    /// Raw pin levels, before polarity.
    pins: u32,
    pending: Vec<Delivery>,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

const MMIO: [Span; 1] = [Span { start: IOAPIC_BASE, len: IOAPIC_LEN }];

impl IoApic {
    /// The reset state: ID 0, every entry masked.
    pub fn new() -> Self {
        IoApic { id: 0, select: 0, entries: [MASKED; PINS], pins: 0, pending: Vec::new() }
    }

    /// The redirection entry of `pin` (0 for pins that do not exist).
    pub fn entry(&self, pin: u8) -> u64 {
        self.entries.get(usize::from(pin)).copied().unwrap_or(0)
    }

    /// Changes the level of input `gsi`; returns the interrupt this raises, if any.
    pub fn set_irq(&mut self, gsi: u8, level: bool) -> Option<Delivery> {
        let index = usize::from(gsi);
        if index >= PINS {
            return None;
        }
        let was = self.asserted(index);
        let bit = 1u32 << index;
        if level {
            self.pins |= bit;
        } else {
            self.pins &= !bit;
        }
        let now = self.asserted(index);
        let entry = self.entries[index];
        if entry & LEVEL != 0 {
            self.try_level(index)
        } else if now && !was && entry & MASKED == 0 {
            Self::delivery(entry)
        } else {
            None
        }
    }

    /// EOI broadcast from the local APIC for `vector`: clears remote IRR of the level entries with
    /// that vector and re-delivers the ones whose input is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<Delivery> {
        let mut out = Vec::new();
        for index in 0..PINS {
            let entry = self.entries[index];
            if entry & LEVEL != 0 && entry & REMOTE_IRR != 0 && (entry & VECTOR_MASK) as u8 == vector {
                self.entries[index] &= !REMOTE_IRR;
                out.extend(self.try_level(index));
            }
        }
        out
    }

    /// Deliveries raised by register writes (unmasking an asserted level entry), oldest first.
    pub fn take_deliveries(&mut self) -> Vec<Delivery> {
        core::mem::take(&mut self.pending)
    }

    /// Whether pin `index` is asserted after polarity.
    fn asserted(&self, index: usize) -> bool {
        let raw = self.pins & (1 << index) != 0;
        let active_low = self.entries.get(index).is_some_and(|e| e & ACTIVE_LOW != 0);
        raw != active_low
    }

    /// Level entry: delivers while asserted, unmasked and without remote IRR, setting remote IRR.
    fn try_level(&mut self, index: usize) -> Option<Delivery> {
        let entry = *self.entries.get(index)?;
        if entry & (MASKED | REMOTE_IRR) != 0 || !self.asserted(index) {
            return None;
        }
        let delivery = Self::delivery(entry)?;
        self.entries[index] |= REMOTE_IRR;
        Some(delivery)
    }

    /// The message an entry sends; only fixed (0) and lowest-priority (1) modes reach the LAPIC:
    /// SMI, NMI, INIT and ExtINT entries are not modelled.
    fn delivery(entry: u64) -> Option<Delivery> {
        let mode = (entry >> DELIVERY_MODE_SHIFT) & 7;
        (mode <= 1).then_some(Delivery {
            vector: (entry & VECTOR_MASK) as u8,
            level: entry & LEVEL != 0,
            destination: (entry >> DESTINATION_SHIFT) as u8,
            logical: entry & LOGICAL != 0,
            lowest_priority: mode == 1,
        })
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id,
            REG_VERSION => VERSION,
            sel if sel >= REG_REDIRECTION => {
                let index = usize::from((sel - REG_REDIRECTION) / 2);
                let Some(entry) = self.entries.get(index) else { return 0 };
                if sel & 1 == 0 {
                    *entry as u32
                } else {
                    (*entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = value & ID_MASK,
            sel if sel >= REG_REDIRECTION => {
                let index = usize::from((sel - REG_REDIRECTION) / 2);
                let Some(old) = self.entries.get(index).copied() else { return };
                let written = if sel & 1 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut new = (old & !WRITABLE) | (written & WRITABLE);
                // Remote IRR only has meaning for level entries.
                if new & LEVEL == 0 {
                    new &= !REMOTE_IRR;
                }
                self.entries[index] = new;
                // Unmasking (or re-polarising) an asserted level entry delivers it now.
                if let Some(delivery) = self.try_level_entry(index) {
                    self.pending.push(delivery);
                }
            }
            _ => {}
        }
    }

    fn try_level_entry(&mut self, index: usize) -> Option<Delivery> {
        if self.entries.get(index)? & LEVEL == 0 {
            return None;
        }
        self.try_level(index)
    }
}

impl Device for IoApic {
    fn name(&self) -> &'static str {
        "ioapic"
    }

    fn mmio(&self) -> &[Span] {
        &MMIO
    }

    fn mmio_read(&mut self, gpa: u64, size: u8, _now_ns: u64, _events: &mut Events) -> u64 {
        if size != 4 {
            return 0;
        }
        match gpa.wrapping_sub(IOAPIC_BASE) {
            IOREGSEL => u64::from(self.select),
            IOWIN => u64::from(self.read_register()),
            _ => 0,
        }
    }

    fn mmio_write(&mut self, gpa: u64, size: u8, value: u64, _now_ns: u64, _events: &mut Events) {
        if size != 4 {
            return;
        }
        match gpa.wrapping_sub(IOAPIC_BASE) {
            IOREGSEL => self.select = value as u8,
            IOWIN => self.write_register(value as u32),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(io: &mut IoApic, reg: u8, value: u32) {
        let mut events = Events::default();
        io.mmio_write(IOAPIC_BASE, 4, reg.into(), 0, &mut events);
        io.mmio_write(IOAPIC_BASE + IOWIN, 4, value.into(), 0, &mut events);
    }

    fn read(io: &mut IoApic, reg: u8) -> u32 {
        let mut events = Events::default();
        io.mmio_write(IOAPIC_BASE, 4, reg.into(), 0, &mut events);
        io.mmio_read(IOAPIC_BASE + IOWIN, 4, 0, &mut events) as u32
    }

    /// Programs pin `pin` with `low` (vector and flags) and destination 0.
    fn program(io: &mut IoApic, pin: u8, low: u32) {
        write(io, REG_REDIRECTION + 2 * pin + 1, 0);
        write(io, REG_REDIRECTION + 2 * pin, low);
    }

    #[test]
    fn identification_and_redirection_registers() {
        let mut io = IoApic::new();
        assert_eq!(read(&mut io, REG_VERSION), 0x0017_0011);
        write(&mut io, REG_ID, 0xff00_0000);
        assert_eq!(read(&mut io, REG_ID), 0x0f00_0000);
        assert_eq!(read(&mut io, REG_REDIRECTION + 6), 0x0001_0000, "entries reset masked");
        write(&mut io, REG_REDIRECTION + 7, 0x0300_0000);
        // Remote IRR and delivery status are read-only.
        write(&mut io, REG_REDIRECTION + 6, 0x0001_f035);
        assert_eq!(read(&mut io, REG_REDIRECTION + 6), 0x0001_a035);
        assert_eq!(io.entry(3), 0x0300_0000_0001_a035);
        // Out-of-range register and wrong widths.
        assert_eq!(read(&mut io, REG_REDIRECTION + 48), 0);
        let mut events = Events::default();
        assert_eq!(io.mmio_read(IOAPIC_BASE + IOWIN, 2, 0, &mut events), 0);
        assert_eq!(io.mmio_read(IOAPIC_BASE + 0x20, 4, 0, &mut events), 0);
        assert_eq!(io.set_irq(24, true), None);
    }

    #[test]
    fn edge_entry_delivers_once_per_rising_edge_unless_masked() {
        let mut io = IoApic::new();
        assert_eq!(io.set_irq(2, true), None, "masked at reset");
        io.set_irq(2, false);
        program(&mut io, 2, 0x30);
        let expected =
            Some(Delivery { vector: 0x30, level: false, destination: 0, logical: false, lowest_priority: false });
        assert_eq!(io.set_irq(2, true), expected);
        assert_eq!(io.set_irq(2, true), None, "no edge while held");
        assert_eq!(io.set_irq(2, false), None);
        assert_eq!(io.set_irq(2, true), expected);
        io.set_irq(2, false);
        program(&mut io, 2, 0x1_0030);
        assert_eq!(io.set_irq(2, true), None);
        assert!(io.take_deliveries().is_empty());
    }

    #[test]
    fn level_entry_redelivers_after_eoi_while_asserted() {
        let mut io = IoApic::new();
        write(&mut io, REG_REDIRECTION + 9, 0x0100_0000);
        write(&mut io, REG_REDIRECTION + 8, 0x8041);
        let delivery = Delivery { vector: 0x41, level: true, destination: 1, logical: false, lowest_priority: false };
        assert_eq!(io.set_irq(4, true), Some(delivery));
        assert_eq!(io.entry(4) & REMOTE_IRR, REMOTE_IRR);
        assert_eq!(io.set_irq(4, true), None, "remote IRR blocks");
        assert_eq!(io.end_of_interrupt(0x42), []);
        assert_eq!(io.end_of_interrupt(0x41), [delivery]);
        io.set_irq(4, false);
        assert_eq!(io.end_of_interrupt(0x41), []);
        assert_eq!(io.entry(4) & REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_entry_delivers_through_the_queue() {
        let mut io = IoApic::new();
        program(&mut io, 10, 0x1_8052);
        assert_eq!(io.set_irq(10, true), None);
        program(&mut io, 10, 0x8052);
        assert_eq!(
            io.take_deliveries(),
            [Delivery { vector: 0x52, level: true, destination: 0, logical: false, lowest_priority: false }]
        );
        assert!(io.take_deliveries().is_empty());
    }

    #[test]
    fn active_low_polarity_inverts_the_line() {
        let mut io = IoApic::new();
        io.set_irq(16, true);
        // Level, active low, vector 0x60: the high line is idle.
        program(&mut io, 16, 0xa060);
        assert!(io.take_deliveries().is_empty());
        let delivery =
            Some(Delivery { vector: 0x60, level: true, destination: 0, logical: false, lowest_priority: false });
        assert_eq!(io.set_irq(16, false), delivery);
        io.set_irq(16, true);
        assert_eq!(io.end_of_interrupt(0x60), []);
    }

    #[test]
    fn non_fixed_delivery_modes_are_not_delivered() {
        let mut io = IoApic::new();
        program(&mut io, 5, 0x0700);
        assert_eq!(io.set_irq(5, true), None);
        program(&mut io, 6, 0x0130);
        let lowest = Delivery { vector: 0x30, level: false, destination: 0, logical: false, lowest_priority: true };
        assert_eq!(io.set_irq(6, true), Some(lowest));
    }
}
