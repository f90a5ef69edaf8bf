//! The driver side of a split virtqueue, for tests: it lays out rings in guest memory, writes
//! descriptors and publishes chains the way a guest driver does.

use alloc::vec;
use alloc::vec::Vec;

use super::queue::{VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::Queue;
use crate::loader::{GuestMemory, MemError};

/// Guest-physical layout used by the tests; the rings fit a queue of up to 256 entries.
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x3000;
pub const USED: u64 = 0x4000;
/// Where test buffers go.
pub const DATA: u64 = 0x1_0000;
/// Guest memory size of [`memory`].
pub const MEM_SIZE: usize = 0x10_0000;

/// Zeroed guest memory for [`crate::loader::SliceMemory`].
pub fn memory() -> Vec<u8> {
    vec![0; MEM_SIZE]
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A device-readable buffer.
pub fn readable(addr: u64, len: u32) -> Buf {
    Buf { addr, len, writable: false }
}

/// A device-writable buffer.
pub fn writable(addr: u64, len: u32) -> Buf {
    Buf { addr, len, writable: true }
}

/// A driver's view of one queue.
pub struct Driver {
    pub size: u16,
    avail_idx: u16,
    next_free: u16,
}

impl Driver {
    pub fn new(size: u16) -> Self {
        Driver { size, avail_idx: 0, next_free: 0 }
    }

    /// A device queue (maximum 256) set up with this driver's layout and enabled.
    pub fn queue(&self, mem: &impl GuestMemory, features: u64) -> Queue {
        let mut queue = Queue::new(256).unwrap();
        self.configure(&mut queue, mem, features);
        queue
    }

    /// Sets up `queue` with this driver's layout and enables it, as a driver does after reset.
    pub fn configure(&self, queue: &mut Queue, mem: &impl GuestMemory, features: u64) {
        queue.set_size(self.size).unwrap();
        queue.set_desc_table(DESC).unwrap();
        queue.set_avail_ring(AVAIL).unwrap();
        queue.set_used_ring(USED).unwrap();
        queue.set_features(features);
        queue.enable(mem.size()).unwrap();
    }

    /// Writes descriptor `index` of the descriptor table.
    pub fn desc(&self, mem: &mut impl GuestMemory, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(mem, DESC + 16 * u64::from(index), addr, len, flags, next);
    }

    /// Puts `head` in the next available ring entry and publishes it.
    pub fn publish(&mut self, mem: &mut impl GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_u16(AVAIL + 4 + 2 * slot, head).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_u16(AVAIL + 2, self.avail_idx).unwrap();
    }

    /// Overwrites the available index, as a buggy or hostile driver would.
    pub fn set_avail_idx(&mut self, mem: &mut impl GuestMemory, idx: u16) {
        self.avail_idx = idx;
        mem.write_u16(AVAIL + 2, idx).unwrap();
    }

    /// Writes `bufs` as a chain of free descriptors, publishes it and returns its head.
    pub fn chain(&mut self, mem: &mut impl GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.next_free;
        for (i, buf) in bufs.iter().enumerate() {
            let index = self.next_free;
            self.next_free = (self.next_free + 1) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if buf.writable { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
            self.desc(mem, index, buf.addr, buf.len, flags, if last { 0 } else { self.next_free });
        }
        self.publish(mem, head);
        head
    }

    /// The device's used index.
    pub fn used_idx(&self, mem: &impl GuestMemory) -> u16 {
        mem.read_u16(USED + 2).unwrap()
    }

    /// Used element `slot`: (id, len).
    pub fn used(&self, mem: &impl GuestMemory, slot: u16) -> (u32, u32) {
        let gpa = USED + 4 + 8 * u64::from(slot % self.size);
        (mem.read_u32(gpa).unwrap(), mem.read_u32(gpa + 4).unwrap())
    }

    /// Sets `used_event` (after the available ring entries).
    pub fn set_used_event(&self, mem: &mut impl GuestMemory, event: u16) {
        mem.write_u16(AVAIL + 4 + 2 * u64::from(self.size), event).unwrap();
    }

    /// The device's `avail_event` (after the used ring elements).
    pub fn avail_event(&self, mem: &impl GuestMemory) -> u16 {
        mem.read_u16(USED + 4 + 8 * u64::from(self.size)).unwrap()
    }

    /// Sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT.
    pub fn set_no_interrupt(&self, mem: &mut impl GuestMemory, on: bool) {
        mem.write_u16(AVAIL, if on { VIRTQ_AVAIL_F_NO_INTERRUPT } else { 0 }).unwrap();
    }
}

/// Writes one descriptor at `gpa` (a table entry or an indirect table entry).
pub fn write_desc(mem: &mut impl GuestMemory, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
    mem.write_u64(gpa, addr).unwrap();
    mem.write_u32(gpa + 8, len).unwrap();
    mem.write_u16(gpa + 12, flags).unwrap();
    mem.write_u16(gpa + 14, next).unwrap();
}

/// Writes `bufs` as a linked indirect table at `gpa`; returns its length in bytes.
pub fn indirect_table(mem: &mut impl GuestMemory, gpa: u64, bufs: &[Buf]) -> u32 {
    for (i, buf) in bufs.iter().enumerate() {
        let last = i + 1 == bufs.len();
        let flags = if buf.writable { VIRTQ_DESC_F_WRITE } else { 0 } | if last { 0 } else { VIRTQ_DESC_F_NEXT };
        write_desc(mem, gpa + 16 * i as u64, buf.addr, buf.len, flags, if last { 0 } else { i as u16 + 1 });
    }
    16 * bufs.len() as u32
}

/// Guest memory far larger than its backing: the first [`MEM_SIZE`] bytes are real, the rest
/// reads as zero and drops writes. For chains that add up to gigabytes.
pub struct HugeMemory {
    pub low: Vec<u8>,
}

pub const HUGE_SIZE: u64 = 1 << 40;

impl GuestMemory for HugeMemory {
    fn size(&self) -> u64 {
        HUGE_SIZE
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let end = gpa.checked_add(buf.len() as u64).filter(|&end| end <= HUGE_SIZE);
        end.ok_or(MemError::OutOfRange { gpa, len: buf.len() as u64 })?;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = usize::try_from(gpa + i as u64).ok().and_then(|at| self.low.get(at)).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let end = gpa.checked_add(data.len() as u64).filter(|&end| end <= HUGE_SIZE);
        end.ok_or(MemError::OutOfRange { gpa, len: data.len() as u64 })?;
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(gpa + i as u64).ok().and_then(|at| self.low.get_mut(at)) {
                *slot = *b;
            }
        }
        Ok(())
    }
}
