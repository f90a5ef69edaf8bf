//! The configuration space of one PCI function: a type 0 header (PCI Local Bus Specification
//! 3.0, 6.1), memory BARs the guest can size and move (6.2.5.1), and a capability list (6.7).
//!
//! Every register the guest may change is described by a write mask, so a write can only ever
//! reach the bits a real function implements; everything else reads back what it was built with.

use super::super::ones;

/// Bytes of configuration space (conventional PCI: no extended space).
pub const CONFIG_LEN: usize = 256;

// Type 0 header offsets (PCI 3.0, 6.1).
/// Vendor ID.
pub const VENDOR_ID: usize = 0x00;
/// Command register.
pub const COMMAND: usize = 0x04;
/// Status register.
pub const STATUS: usize = 0x06;
/// Revision ID, then programming interface, subclass and base class.
pub const REVISION: usize = 0x08;
/// First BAR.
pub const BAR0: usize = 0x10;
/// Subsystem vendor ID, then subsystem ID.
pub const SUBSYSTEM: usize = 0x2c;
/// Capabilities pointer.
pub const CAPABILITIES: usize = 0x34;
/// Interrupt line (the driver's note of where INTx goes).
pub const INTERRUPT_LINE: usize = 0x3c;
/// Interrupt pin: 1 = INTA# .. 4 = INTD#, 0 = none.
pub const INTERRUPT_PIN: usize = 0x3d;
/// Where capabilities start: right after the header.
const FIRST_CAPABILITY: usize = 0x40;

// Command register bits (6.2.2).
/// Memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Bus master: the function may reach memory (DMA, MSI writes).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// INTx emulation disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Command bits a memory-only function implements: memory, bus master, parity error response,
/// SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = COMMAND_MEMORY | COMMAND_BUS_MASTER | 1 << 6 | 1 << 8 | COMMAND_INTX_DISABLE;

// Status register bits (6.2.3).
/// The INTx line is asserted (read-only).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// The capabilities pointer is valid.
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// Memory BAR type bits (6.2.5.1): 64-bit.
const BAR_MEMORY_64: u32 = 0b100;

/// Number of BARs in a type 0 header.
pub const BARS: usize = 6;

/// What one BAR register is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bar {
    /// Not implemented: reads 0, writes ignored.
    None,
    /// A 32-bit memory BAR of `size` bytes (a power of two, at least 16).
    Memory32 { size: u32 },
    /// The low half of a 64-bit memory BAR of `size` bytes; the next register is its high half.
    Memory64 { size: u64 },
    /// The high half of the 64-bit BAR before it.
    Upper,
}

/// The identity a function reports in its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Base class, subclass and programming interface, as 0xCCSSPP.
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// One function's configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_LEN],
    /// Bits the guest may write, byte by byte (BARs are handled apart).
    writable: [u8; CONFIG_LEN],
    bars: [Bar; BARS],
    /// Where the next capability goes.
    next_capability: usize,
    /// Where the last capability's next pointer is (the capabilities pointer at first).
    last_link: usize,
}

impl ConfigSpace {
    /// A type 0 header with `identity`, INTx pin `pin` (0 for none), no BARs and no
    /// capabilities. Command starts at 0: decoding and bus mastering off, as after reset.
    pub fn new(identity: Identity, pin: u8) -> Self {
        let mut space = ConfigSpace {
            bytes: [0; CONFIG_LEN],
            writable: [0; CONFIG_LEN],
            bars: [Bar::None; BARS],
            next_capability: FIRST_CAPABILITY,
            last_link: CAPABILITIES,
        };
        space.put(VENDOR_ID, &identity.vendor.to_le_bytes());
        space.put(VENDOR_ID + 2, &identity.device.to_le_bytes());
        space.bytes[REVISION] = identity.revision;
        space.put(REVISION + 1, &identity.class.to_le_bytes()[..3]);
        space.put(SUBSYSTEM, &identity.subsystem_vendor.to_le_bytes());
        space.put(SUBSYSTEM + 2, &identity.subsystem.to_le_bytes());
        space.bytes[INTERRUPT_PIN] = pin;
        space.set_writable(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        space.set_writable(INTERRUPT_LINE, &[0xff]);
        space
    }

    fn put(&mut self, offset: usize, value: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + value.len()) {
            dst.copy_from_slice(value);
        }
    }

    /// Lets the guest write the bits of `mask` from `offset` on.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Makes BAR `index` a memory BAR of `size` bytes (a power of two, at least 4 KiB so that
    /// no two functions share a page); 64-bit BARs take two registers. Returns false for a BAR
    /// that does not fit.
    pub fn add_memory_bar(&mut self, index: usize, size: u64, is_64bit: bool) -> bool {
        let fits = size.is_power_of_two()
            && size >= 0x1000
            && if is_64bit { index + 1 < BARS } else { index < BARS && size <= 1 << 31 };
        if !fits || self.bars[index] != Bar::None || (is_64bit && self.bars[index + 1] != Bar::None) {
            return false;
        }
        if is_64bit {
            self.bars[index] = Bar::Memory64 { size };
            self.bars[index + 1] = Bar::Upper;
            self.put(BAR0 + 4 * index, &BAR_MEMORY_64.to_le_bytes());
        } else {
            self.bars[index] = Bar::Memory32 { size: size as u32 };
        }
        true
    }

    /// Appends a capability with `id` and `body` (the bytes after ID and next pointer) to the
    /// list; returns its offset, or `None` if the space is full.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Option<usize> {
        let at = self.next_capability;
        let end = at.checked_add(2 + body.len())?;
        if end > CONFIG_LEN {
            return None;
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.put(at + 2, body);
        self.bytes[self.last_link] = at as u8;
        self.last_link = at + 1;
        // Capabilities are dword aligned (6.7).
        self.next_capability = end.next_multiple_of(4);
        let status = self.word(STATUS) | STATUS_CAPABILITIES;
        self.put(STATUS, &status.to_le_bytes());
        Some(at)
    }

    /// The byte at `offset` (0 beyond the space).
    pub fn byte(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    /// The little-endian word at `offset`.
    pub fn word(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.byte(offset), self.byte(offset + 1)])
    }

    /// The little-endian dword at `offset`.
    pub fn dword(&self, offset: usize) -> u32 {
        u32::from_le_bytes([self.byte(offset), self.byte(offset + 1), self.byte(offset + 2), self.byte(offset + 3)])
    }

    /// Stores a value the device itself changes (a read-only status bit, say), bypassing the
    /// write mask.
    pub fn set_word(&mut self, offset: usize, value: u16) {
        self.put(offset, &value.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.word(COMMAND)
    }

    /// Reads `size` (1, 2 or 4) bytes at `offset`; bytes beyond the space float high.
    pub fn read(&self, offset: usize, size: u8) -> u32 {
        let mut value = 0u32;
        for i in 0..usize::from(size.min(4)) {
            let byte = self.bytes.get(offset + i).copied().unwrap_or(0xff);
            value |= u32::from(byte) << (8 * i);
        }
        value & ones(size) as u32
    }

    /// Writes `size` bytes at `offset` through the write masks and the BAR rules.
    pub fn write(&mut self, offset: usize, size: u8, value: u32) {
        for (i, byte) in value.to_le_bytes().into_iter().enumerate().take(usize::from(size.min(4))) {
            let at = offset + i;
            if (BAR0..BAR0 + 4 * BARS).contains(&at) {
                self.write_bar_byte(at, byte);
            } else if let Some(&mask) = self.writable.get(at) {
                self.bytes[at] = (self.bytes[at] & !mask) | (byte & mask);
            }
        }
    }

    /// A BAR byte: the address bits at or above the BAR's size are writable (so writing all
    /// ones reads back the size), the type bits are not.
    fn write_bar_byte(&mut self, at: usize, byte: u8) {
        let index = (at - BAR0) / 4;
        let lane = (at - BAR0) % 4;
        let mask: u32 = match self.bars[index] {
            Bar::None => 0,
            Bar::Memory32 { size } => !(size - 1),
            Bar::Memory64 { size } => !((size - 1) as u32),
            Bar::Upper => match self.bars[index - 1] {
                Bar::Memory64 { size } => !((size - 1) >> 32) as u32,
                _ => 0,
            },
        };
        let mask = mask.to_le_bytes()[lane];
        self.bytes[at] = (self.bytes[at] & !mask) | (byte & mask);
    }

    /// Where BAR `index` decodes, as (base, size): only with memory decoding on, and never at
    /// address 0 (an unassigned BAR).
    pub fn bar_range(&self, index: usize) -> Option<(u64, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        let low = u64::from(self.dword(BAR0 + 4 * index) & !0xf);
        let (base, size) = match *self.bars.get(index)? {
            Bar::Memory32 { size } => (low, u64::from(size)),
            Bar::Memory64 { size } => (low | u64::from(self.dword(BAR0 + 4 * index + 4)) << 32, size),
            Bar::None | Bar::Upper => return None,
        };
        (base != 0).then_some((base, size))
    }

    /// Sets BAR `index`'s address, as firmware assigns it before the OS runs.
    pub fn assign_bar(&mut self, index: usize, base: u64) {
        let offset = BAR0 + 4 * index;
        self.write(offset, 4, base as u32);
        if matches!(self.bars.get(index), Some(Bar::Memory64 { .. })) {
            self.write(offset + 4, 4, (base >> 32) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDENTITY: Identity = Identity {
        vendor: 0x1af4,
        device: 0x1042,
        revision: 1,
        class: 0x01_80_00,
        subsystem_vendor: 0x1af4,
        subsystem: 0x0040,
    };

    #[test]
    fn header_reports_its_identity_and_only_masked_bits_change() {
        let mut space = ConfigSpace::new(IDENTITY, 1);
        assert_eq!(space.read(0, 4), 0x1042_1af4);
        assert_eq!(space.read(REVISION, 4), 0x0180_0001);
        assert_eq!(space.read(SUBSYSTEM, 4), 0x0040_1af4);
        assert_eq!(space.read(INTERRUPT_LINE, 2), 0x0100, "pin INTA, line unset");
        space.write(0, 4, 0);
        assert_eq!(space.read(0, 4), 0x1042_1af4, "IDs are read-only");
        space.write(COMMAND, 2, 0xffff);
        assert_eq!(space.command(), 0x0546);
        space.write(INTERRUPT_LINE, 2, 0xffff);
        assert_eq!(space.read(INTERRUPT_LINE, 2), 0x01ff, "the pin is read-only");
        assert_eq!(space.read(0xff, 4), 0xffff_ff00, "past the space floats high");
    }

    #[test]
    fn bars_size_and_move_like_hardware() {
        let mut space = ConfigSpace::new(IDENTITY, 0);
        assert!(space.add_memory_bar(0, 0x4000, false));
        assert!(space.add_memory_bar(2, 0x10_0000, true));
        assert!(!space.add_memory_bar(3, 0x1000, false), "BAR 3 is BAR 2's upper half");
        assert!(!space.add_memory_bar(5, 0x1000, true), "no room for the upper half");
        assert!(!space.add_memory_bar(1, 0x1800, false), "not a power of two");
        space.write(BAR0, 4, 0xffff_ffff);
        assert_eq!(space.read(BAR0, 4), 0xffff_c000, "sizing reads back the size");
        space.write(BAR0 + 8, 4, 0xffff_ffff);
        space.write(BAR0 + 12, 4, 0xffff_ffff);
        assert_eq!(space.read(BAR0 + 8, 4), 0xfff0_0004, "64-bit type bits stay");
        assert_eq!(space.read(BAR0 + 12, 4), 0xffff_ffff);
        space.write(BAR0 + 4, 4, 0xffff_ffff);
        assert_eq!(space.read(BAR0 + 4, 4), 0, "no BAR 1");
        space.assign_bar(0, 0xe000_0000);
        space.assign_bar(2, 0x1_2340_0000);
        assert_eq!(space.bar_range(0), None, "memory decoding is off");
        space.write(COMMAND, 2, u32::from(COMMAND_MEMORY));
        assert_eq!(space.bar_range(0), Some((0xe000_0000, 0x4000)));
        assert_eq!(space.bar_range(2), Some((0x1_2340_0000, 0x10_0000)));
        space.write(BAR0, 1, 0xff);
        assert_eq!(space.bar_range(0), Some((0xe000_0000, 0x4000)), "low address bits are not writable");
        space.write(BAR0, 4, 0);
        assert_eq!(space.bar_range(0), None, "an unassigned BAR decodes nothing");
        assert_eq!(space.bar_range(1), None);
        assert_eq!(space.bar_range(3), None);
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut space = ConfigSpace::new(IDENTITY, 0);
        assert_eq!(space.read(STATUS, 2) & u32::from(STATUS_CAPABILITIES), 0);
        assert_eq!(space.add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), Some(0x40));
        assert_eq!(space.add_capability(0x09, &[0xaa; 13]), Some(0x4c));
        assert_eq!(space.byte(CAPABILITIES), 0x40);
        assert_eq!(space.read(0x40, 2), 0x4c11);
        assert_eq!(space.read(0x4c, 2), 0x0009, "the last capability ends the list");
        assert_ne!(space.read(STATUS, 2) & u32::from(STATUS_CAPABILITIES), 0);
        space.write(0x42, 1, 0xff);
        assert_eq!(space.byte(0x42), 1, "capability bytes are read-only unless made writable");
        space.set_writable(0x42, &[0x0f]);
        space.write(0x42, 1, 0xff);
        assert_eq!(space.byte(0x42), 0x0f);
        assert_eq!(space.add_capability(0x09, &[0; 200]), None, "does not fit");
    }
}
