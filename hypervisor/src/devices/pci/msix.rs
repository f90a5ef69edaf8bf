//! MSI-X (PCI Local Bus Specification 3.0, 6.8.2): the capability, the vector table and the
//! pending bit array a function keeps in one of its BARs.
//!
//! A function signals a vector; the table turns it into a message (an address and data the
//! interrupt router decodes) or, while the vector or the whole function is masked, into a
//! pending bit that is sent when the mask is lifted.

use alloc::vec;
use alloc::vec::Vec;

use super::super::{ones, Events, Msi};
use super::config::{ConfigSpace, COMMAND_BUS_MASTER};

/// MSI-X capability ID.
pub const CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_LEN: usize = 16;
/// Most vectors a table may have (6.8.2.3: an 11-bit table size).
pub const MAX_VECTORS: u16 = 2048;
/// "No vector" in the registers that name one (virtio's VIRTIO_MSI_NO_VECTOR).
pub const NO_VECTOR: u16 = 0xffff;

/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: this vector is masked (set after reset).
const VECTOR_MASKED: u8 = 1;
/// Writable bits of one entry, byte by byte: the address is dword aligned, and only the mask
/// bit of vector control is implemented.
const ENTRY_WRITABLE: [u8; ENTRY_LEN] =
    [0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0];

/// A function's MSI-X state.
#[derive(Clone, Debug)]
pub struct Msix {
    /// Offset of the capability in configuration space.
    capability: usize,
    table: Vec<u8>,
    pending: Vec<u64>,
}

impl Msix {
    /// `vectors` entries (1 to [`MAX_VECTORS`]), all masked, and a capability in `space` that
    /// puts the table at `table_offset` and the pending bits at `pba_offset` of BAR `bar`.
    /// `None` if the count is out of range or the capability does not fit.
    pub fn new(space: &mut ConfigSpace, vectors: u16, bar: u8, table_offset: u32, pba_offset: u32) -> Option<Self> {
        if vectors == 0 || vectors > MAX_VECTORS || bar > 5 || (table_offset | pba_offset) & 7 != 0 {
            return None;
        }
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let capability = space.add_capability(CAPABILITY_ID, &body)?;
        // Only enable and function mask are writable (6.8.2.3).
        space.set_writable(capability + 3, &[0xc0]);
        let mut table = vec![0u8; usize::from(vectors) * ENTRY_LEN];
        for entry in table.as_chunks_mut::<ENTRY_LEN>().0 {
            entry[12] = VECTOR_MASKED;
        }
        Some(Msix { capability, table, pending: vec![0; usize::from(vectors).div_ceil(64)] })
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        (self.table.len() / ENTRY_LEN) as u16
    }

    fn control(&self, space: &ConfigSpace) -> u16 {
        space.word(self.capability + 2)
    }

    /// Whether the driver turned MSI-X on (then INTx is not used).
    pub fn enabled(&self, space: &ConfigSpace) -> bool {
        self.control(space) & CONTROL_ENABLE != 0
    }

    /// Back to reset: every vector masked, nothing pending, MSI-X off (the capability's control
    /// word lives in `space`, which the caller resets).
    pub fn reset(&mut self) {
        for entry in self.table.as_chunks_mut::<ENTRY_LEN>().0 {
            entry.fill(0);
            entry[12] = VECTOR_MASKED;
        }
        self.pending.fill(0);
    }

    fn masked(&self, space: &ConfigSpace, vector: usize) -> bool {
        self.control(space) & CONTROL_FUNCTION_MASK != 0
            || self.table.get(vector * ENTRY_LEN + 12).is_none_or(|control| control & VECTOR_MASKED != 0)
    }

    fn message(&self, vector: usize) -> Msi {
        let entry = &self.table[vector * ENTRY_LEN..(vector + 1) * ENTRY_LEN];
        let dword = |i: usize| u32::from_le_bytes([entry[i], entry[i + 1], entry[i + 2], entry[i + 3]]);
        Msi { address: u64::from(dword(0)) | u64::from(dword(4)) << 32, data: dword(8) }
    }

    /// Signals `vector`: a message now, or a pending bit while it is masked. Without MSI-X on,
    /// or for a vector the table does not have, nothing happens; the caller uses INTx.
    pub fn signal(&mut self, space: &ConfigSpace, vector: u16, events: &mut Events) {
        let index = usize::from(vector);
        if !self.enabled(space) || index >= usize::from(self.vectors()) {
            return;
        }
        if self.masked(space, index) {
            self.pending[index / 64] |= 1 << (index % 64);
        } else if space.command() & COMMAND_BUS_MASTER != 0 {
            // The message is a memory write by the function: not without bus mastering.
            events.msi.push(self.message(index));
        }
    }

    /// Sends the pending vectors that are no longer masked (after a table or control write).
    pub fn deliver_unmasked(&mut self, space: &ConfigSpace, events: &mut Events) {
        if !self.enabled(space) {
            return;
        }
        for index in 0..usize::from(self.vectors()) {
            if self.pending[index / 64] & (1 << (index % 64)) != 0 && !self.masked(space, index) {
                self.pending[index / 64] &= !(1 << (index % 64));
                if space.command() & COMMAND_BUS_MASTER != 0 {
                    events.msi.push(self.message(index));
                }
            }
        }
    }

    /// Reads the table at `offset` (within the table), `size` bytes; outside it reads float high.
    pub fn table_read(&self, offset: u64, size: u8) -> u64 {
        read_bytes(&self.table, offset, size)
    }

    /// Writes the table; unmasking a vector with its pending bit set sends it.
    pub fn table_write(&mut self, space: &ConfigSpace, offset: u64, size: u8, value: u64, events: &mut Events) {
        let Ok(start) = usize::try_from(offset) else { return };
        for (i, byte) in value.to_le_bytes().into_iter().enumerate().take(usize::from(size.min(8))) {
            let at = start.saturating_add(i);
            if let Some(slot) = self.table.get_mut(at) {
                let mask = ENTRY_WRITABLE[at % ENTRY_LEN];
                *slot = (*slot & !mask) | (byte & mask);
            }
        }
        self.deliver_unmasked(space, events);
    }

    /// Reads the pending bit array (read-only).
    pub fn pba_read(&self, offset: u64, size: u8) -> u64 {
        let bytes: Vec<u8> = self.pending.iter().flat_map(|word| word.to_le_bytes()).collect();
        read_bytes(&bytes, offset, size)
    }
}

/// `size` little-endian bytes of `bytes` at `offset`; bytes outside float high.
fn read_bytes(bytes: &[u8], offset: u64, size: u8) -> u64 {
    let mut value = 0u64;
    for i in 0..u64::from(size.min(8)) {
        let byte = usize::try_from(offset.saturating_add(i)).ok().and_then(|at| bytes.get(at)).copied().unwrap_or(0xff);
        value |= u64::from(byte) << (8 * i);
    }
    value & ones(size)
}

#[cfg(test)]
mod tests {
    use super::super::config::{Identity, COMMAND};
    use super::*;

    fn space() -> ConfigSpace {
        let identity = Identity {
            vendor: 0x1af4,
            device: 0x1041,
            revision: 1,
            class: 0x02_00_00,
            subsystem_vendor: 0,
            subsystem: 0,
        };
        ConfigSpace::new(identity, 1)
    }

    fn program(msix: &mut Msix, space: &ConfigSpace, vector: u64, address: u64, data: u32, events: &mut Events) {
        msix.table_write(space, vector * 16, 8, address, events);
        msix.table_write(space, vector * 16 + 8, 4, u64::from(data), events);
        msix.table_write(space, vector * 16 + 12, 4, 0, events);
    }

    #[test]
    fn the_capability_describes_the_table() {
        let mut space = space();
        let msix = Msix::new(&mut space, 3, 0, 0x4000, 0x4800).unwrap();
        let at = usize::from(space.byte(0x34));
        assert_eq!(space.byte(at), CAPABILITY_ID);
        assert_eq!(space.read(at + 2, 2), 2, "table size is N - 1, MSI-X off");
        assert_eq!(space.read(at + 4, 4), 0x4000);
        assert_eq!(space.read(at + 8, 4), 0x4800);
        space.write(at + 2, 2, 0xffff);
        assert_eq!(space.read(at + 2, 2), 0xc002, "only enable and function mask are writable");
        assert!(msix.enabled(&space));
        assert_eq!(msix.table_read(12, 4), 1, "vectors start masked");
        assert_eq!(msix.table_read(3 * 16, 4), 0xffff_ffff, "past the table");
        assert!(Msix::new(&mut space, 0, 0, 0, 0x800).is_none());
        assert!(Msix::new(&mut space, 4, 0, 0x4004, 0x4800).is_none(), "misaligned table");
    }

    #[test]
    fn messages_follow_masks_enable_and_bus_mastering() {
        let mut space = space();
        let mut msix = Msix::new(&mut space, 2, 0, 0, 0x800).unwrap();
        let control = usize::from(space.byte(0x34)) + 2;
        let mut events = Events::default();
        program(&mut msix, &space, 1, 0xfee0_1000, 0x4051, &mut events);
        msix.signal(&space, 1, &mut events);
        assert!(events.msi.is_empty(), "MSI-X is off: INTx is the caller's business");

        space.write(control, 2, u32::from(CONTROL_ENABLE | CONTROL_FUNCTION_MASK));
        msix.signal(&space, 1, &mut events);
        assert!(events.msi.is_empty());
        assert_eq!(msix.pba_read(0, 8), 0b10, "function masked: pending");
        space.write(COMMAND, 2, u32::from(COMMAND_BUS_MASTER));
        space.write(control, 2, u32::from(CONTROL_ENABLE));
        msix.deliver_unmasked(&space, &mut events);
        assert_eq!(events.msi, [Msi { address: 0xfee0_1000, data: 0x4051 }]);
        assert_eq!(msix.pba_read(0, 8), 0);

        events.msi.clear();
        msix.signal(&space, 0, &mut events);
        assert_eq!(msix.pba_read(0, 1), 1, "vector 0 is still masked");
        program(&mut msix, &space, 0, 0xfee0_0003, 0x31, &mut events);
        assert_eq!(
            events.msi,
            [Msi { address: 0xfee0_0000, data: 0x31 }],
            "unmasking sends it; address bits 1:0 are 0"
        );
        events.msi.clear();
        msix.signal(&space, 2, &mut events);
        msix.signal(&space, NO_VECTOR, &mut events);
        assert!(events.msi.is_empty(), "no such vectors");
        space.write(COMMAND, 2, 0);
        msix.signal(&space, 1, &mut events);
        assert!(events.msi.is_empty(), "no bus mastering, no message");
        msix.reset();
        assert_eq!(msix.table_read(16, 8), 0);
        assert_eq!(msix.table_read(28, 4), 1);
    }
}
