//! A split virtqueue as the device sees it (virtio 1.2, 2.7).
//!
//! The transport writes the queue's size and ring addresses and enables it; the device pops
//! descriptor chains the driver made available and pushes them back to the used ring. Everything
//! in the rings comes from the guest, so every index, length and address is checked before use
//! and a malformed queue is reported as a [`QueueError`]: the transport then sets
//! DEVICE_NEEDS_RESET (2.1.2). After an error the queue stays failed until it is reset, so a
//! driver that keeps notifying gets the same error rather than a half-processed ring.

use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

use super::{VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};
use crate::loader::{GuestMemory, MemError};

/// The largest queue size the split format allows (2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// The buffer continues in the descriptor named by `next` (2.7.5).
pub(super) const VIRTQ_DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub(super) const VIRTQ_DESC_F_WRITE: u16 = 2;
/// The buffer holds a table of indirect descriptors (2.7.5.3).
pub(super) const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver asks for no used buffer notifications (2.7.7).
pub(super) const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Size of one descriptor in the table and in indirect tables.
const DESCRIPTOR_LEN: u64 = 16;
/// Size of one used ring element: `id` and `len`, both le32.
const USED_ELEMENT_LEN: u64 = 8;
/// Offset of the ring entries in the available and used rings, after `flags` and `idx`.
const RING_ENTRIES: u64 = 4;

/// One of the three parts of a split virtqueue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// The descriptor table (Descriptor Area).
    Descriptors,
    /// The available ring (Driver Area).
    Available,
    /// The used ring (Device Area).
    Used,
}

impl Ring {
    /// Minimum alignment of the part (2.7, table of alignments).
    fn align(self) -> u64 {
        match self {
            Ring::Descriptors => 16,
            Ring::Available => 2,
            Ring::Used => 4,
        }
    }

    /// Size of the part for a queue of `size` entries, including the event index that follows
    /// the available and used rings.
    fn len(self, size: u16) -> u64 {
        let size = u64::from(size);
        match self {
            Ring::Descriptors => DESCRIPTOR_LEN * size,
            Ring::Available => 6 + 2 * size,
            Ring::Used => 6 + USED_ELEMENT_LEN * size,
        }
    }
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ring::Descriptors => "descriptor table",
            Ring::Available => "available ring",
            Ring::Used => "used ring",
        })
    }
}

/// Where a descriptor lives, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DescriptorRef {
    /// Entry of the queue's descriptor table.
    Direct(u16),
    /// Entry `entry` of the indirect table that descriptor `table` refers to.
    Indirect {
        /// The descriptor-table entry with VIRTQ_DESC_F_INDIRECT.
        table: u16,
        /// Index inside the indirect table.
        entry: u32,
    },
}

impl fmt::Display for DescriptorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DescriptorRef::Direct(index) => write!(f, "descriptor {index}"),
            DescriptorRef::Indirect { table, entry } => {
                write!(f, "indirect descriptor {entry} (in the table of descriptor {table})")
            }
        }
    }
}

/// Why a queue cannot be configured or its rings cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// The size is not a power of two in `1..=max`.
    InvalidSize {
        /// Size the driver asked for.
        size: u16,
        /// The device's maximum for this queue.
        max: u16,
    },
    /// The size or an address was written while the queue is enabled.
    ChangedWhileEnabled,
    /// A used element was pushed to a queue that is not enabled.
    NotEnabled,
    /// A ring address is not aligned as 2.7 requires.
    Misaligned {
        /// The misaligned part.
        ring: Ring,
        /// Its guest-physical address.
        gpa: u64,
    },
    /// A ring does not fit in guest memory.
    RingOutsideMemory {
        /// The part that does not fit.
        ring: Ring,
        /// Its guest-physical address.
        gpa: u64,
        /// Its size in bytes.
        len: u64,
    },
    /// Accessing a ring failed (guest memory changed after the queue was enabled).
    RingAccess {
        /// The part being accessed.
        ring: Ring,
        /// The failed access.
        error: MemError,
    },
    /// The available index is further ahead of the last one seen than the queue has entries.
    AvailIndexRunaway {
        /// The driver's `idx`.
        avail_idx: u16,
        /// The next entry the device expected to read.
        last_avail: u16,
        /// The queue size.
        size: u16,
    },
    /// An available ring entry names a descriptor beyond the table.
    HeadOutOfRange {
        /// The descriptor index read from the ring.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's `next` is beyond its table.
    NextOutOfRange {
        /// The descriptor with the bad `next`.
        desc: DescriptorRef,
        /// The `next` it names.
        next: u16,
        /// Number of entries in the table.
        limit: u32,
    },
    /// A chain has more descriptors than its table (so it loops).
    ChainTooLong {
        /// Head of the chain.
        head: u16,
        /// Descriptors allowed: the queue size, or the entries of an indirect table.
        limit: u32,
    },
    /// A chain's buffers add up to more than `u32::MAX` bytes (2.7.5.2).
    ChainTooLarge {
        /// Head of the chain.
        head: u16,
    },
    /// A buffer is not inside guest memory, or its end overflows.
    BufferOutsideMemory {
        /// The descriptor.
        desc: DescriptorRef,
        /// Its `addr`.
        addr: u64,
        /// Its `len`.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one (2.7.4.2).
    ReadableAfterWritable {
        /// The device-readable descriptor.
        desc: DescriptorRef,
    },
    /// VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated (2.7.5.3.1).
    IndirectNotNegotiated {
        /// The descriptor.
        desc: u16,
    },
    /// VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT (2.7.5.3.1).
    IndirectWithNext {
        /// The descriptor.
        desc: u16,
    },
    /// VIRTQ_DESC_F_INDIRECT inside an indirect table (2.7.5.3.1).
    NestedIndirect {
        /// The descriptor inside the indirect table.
        desc: DescriptorRef,
    },
    /// An indirect table's length is zero or not a multiple of 16.
    IndirectTableLength {
        /// The descriptor that refers to the table.
        desc: u16,
        /// The table length in bytes.
        len: u32,
    },
    /// An indirect table has more entries than the device walks.
    IndirectTableTooLong {
        /// The descriptor that refers to the table.
        desc: u16,
        /// Entries in the table.
        entries: u32,
        /// The most a chain may have: the queue size.
        limit: u32,
    },
    /// An indirect table is not inside guest memory.
    IndirectTableOutsideMemory {
        /// The descriptor that refers to the table.
        desc: u16,
        /// Table address.
        addr: u64,
        /// Table length.
        len: u32,
    },
    /// The device pushed a used element for a descriptor beyond the table.
    UsedHeadOutOfRange {
        /// The head the device pushed.
        head: u16,
        /// The queue size.
        size: u16,
    },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::InvalidSize { size, max } => {
                write!(f, "queue size {size} is not a power of two between 1 and {max}")
            }
            QueueError::ChangedWhileEnabled => f.write_str("queue size or address written while the queue is enabled"),
            QueueError::NotEnabled => f.write_str("used buffer pushed to a queue that is not enabled"),
            QueueError::Misaligned { ring, gpa } => {
                write!(f, "{ring} at {gpa:#x} is not aligned to {} bytes", ring.align())
            }
            QueueError::RingOutsideMemory { ring, gpa, len } => {
                write!(f, "{ring} at {gpa:#x} ({len:#x} bytes) is outside guest memory")
            }
            QueueError::RingAccess { ring, error } => write!(f, "{ring}: {error}"),
            QueueError::AvailIndexRunaway { avail_idx, last_avail, size } => write!(
                f,
                "available index {avail_idx} is {} entries ahead of the last one seen ({last_avail}), \
                 more than the queue size {size}",
                avail_idx.wrapping_sub(*last_avail)
            ),
            QueueError::HeadOutOfRange { head, size } => {
                write!(f, "available ring names descriptor {head}, beyond the queue size {size}")
            }
            QueueError::NextOutOfRange { desc, next, limit } => {
                write!(f, "{desc} chains to descriptor {next}, beyond its table of {limit}")
            }
            QueueError::ChainTooLong { head, limit } => {
                write!(f, "descriptor chain from {head} has more than {limit} descriptors (a loop)")
            }
            QueueError::ChainTooLarge { head } => {
                write!(f, "descriptor chain from {head} is longer than {:#x} bytes", u32::MAX)
            }
            QueueError::BufferOutsideMemory { desc, addr, len } => {
                write!(f, "{desc} points outside guest memory ({addr:#x} + {len:#x})")
            }
            QueueError::ReadableAfterWritable { desc } => {
                write!(f, "{desc} is device-readable but follows a device-writable descriptor")
            }
            QueueError::IndirectNotNegotiated { desc } => {
                write!(f, "descriptor {desc} is indirect, but VIRTIO_F_INDIRECT_DESC was not negotiated")
            }
            QueueError::IndirectWithNext { desc } => write!(f, "descriptor {desc} is indirect and also has NEXT set"),
            QueueError::NestedIndirect { desc } => write!(f, "{desc} is itself indirect"),
            QueueError::IndirectTableLength { desc, len } => write!(
                f,
                "descriptor {desc} refers to an indirect table of {len:#x} bytes, not a non-zero multiple of 16"
            ),
            QueueError::IndirectTableTooLong { desc, entries, limit } => write!(
                f,
                "descriptor {desc} refers to an indirect table of {entries} descriptors, more than the queue \
                 size {limit}"
            ),
            QueueError::IndirectTableOutsideMemory { desc, addr, len } => {
                write!(f, "descriptor {desc} refers to an indirect table outside guest memory ({addr:#x} + {len:#x})")
            }
            QueueError::UsedHeadOutOfRange { head, size } => {
                write!(f, "used element for descriptor {head}, beyond the queue size {size}")
            }
        }
    }
}

/// A guest-physical buffer of a descriptor chain, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A descriptor chain popped from the available ring: its device-readable buffers, then its
/// device-writable ones, in order. Give it back with [`Queue::push_used`] and [`Self::head`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescriptorChain {
    head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl DescriptorChain {
    /// The head descriptor index, which identifies the chain in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// The device-readable buffers.
    pub fn readable(&self) -> &[Segment] {
        &self.readable
    }

    /// The device-writable buffers.
    pub fn writable(&self) -> &[Segment] {
        &self.writable
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u32 {
        total_len(&self.readable)
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> u32 {
        total_len(&self.writable)
    }

    /// Copies device-readable bytes, from `offset` bytes into the readable part, into `buf`.
    /// Returns how many were copied: fewer than `buf.len()` where the readable part ends.
    pub fn read_at(&self, mem: &(impl GuestMemory + ?Sized), offset: u64, buf: &mut [u8]) -> Result<usize, MemError> {
        let len = buf.len();
        for_each_piece(&self.readable, offset, len, |gpa, range| {
            let piece = buf.get_mut(range).ok_or(MemError::OutOfRange { gpa, len: len as u64 })?;
            mem.read(gpa, piece)
        })
    }

    /// Copies `data` into the device-writable part, from `offset` bytes into it. Returns how many
    /// bytes were written: fewer than `data.len()` where the writable part ends.
    pub fn write_at(&self, mem: &mut (impl GuestMemory + ?Sized), offset: u64, data: &[u8]) -> Result<usize, MemError> {
        for_each_piece(&self.writable, offset, data.len(), |gpa, range| {
            let piece = data.get(range).ok_or(MemError::OutOfRange { gpa, len: data.len() as u64 })?;
            mem.write(gpa, piece)
        })
    }
}

/// Sum of segment lengths; a chain never holds more than `u32::MAX` bytes (checked in `pop`).
fn total_len(segments: &[Segment]) -> u32 {
    segments.iter().fold(0u32, |sum, s| sum.saturating_add(s.len))
}

/// Splits bytes `[offset, offset + len)` of the concatenated `segments` into contiguous guest
/// pieces and calls `visit(gpa, range in the caller's buffer)` for each. Returns the bytes
/// covered, which is less than `len` where the segments end.
fn for_each_piece(
    segments: &[Segment],
    offset: u64,
    len: usize,
    mut visit: impl FnMut(u64, core::ops::Range<usize>) -> Result<(), MemError>,
) -> Result<usize, MemError> {
    let mut skip = offset;
    let mut done = 0usize;
    for segment in segments {
        if done == len {
            break;
        }
        let segment_len = u64::from(segment.len);
        if skip >= segment_len {
            skip -= segment_len;
            continue;
        }
        let n = usize::try_from(segment_len - skip).unwrap_or(usize::MAX).min(len - done);
        let gpa = segment.gpa.checked_add(skip).ok_or(MemError::OutOfRange { gpa: segment.gpa, len: skip })?;
        visit(gpa, done..done + n)?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// One descriptor as it is in guest memory (2.7.5).
#[derive(Clone, Copy, Debug)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Descriptor {
    fn read(mem: &(impl GuestMemory + ?Sized), gpa: u64) -> Result<Self, MemError> {
        let mut bytes = [0u8; DESCRIPTOR_LEN as usize];
        mem.read(gpa, &mut bytes)?;
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = bytes;
        Ok(Descriptor {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        })
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A chain being collected: its segments, byte total and whether a writable one was seen.
struct ChainBuilder {
    chain: DescriptorChain,
    total: u64,
    mem_size: u64,
}

impl ChainBuilder {
    /// Adds the buffer of a non-indirect descriptor, enforcing the rules of 2.7.4.2 and 2.7.5.2.
    fn add(&mut self, at: DescriptorRef, desc: &Descriptor) -> Result<(), QueueError> {
        let end = desc.addr.checked_add(u64::from(desc.len));
        if end.is_none_or(|end| end > self.mem_size) {
            return Err(QueueError::BufferOutsideMemory { desc: at, addr: desc.addr, len: desc.len });
        }
        self.total += u64::from(desc.len);
        if self.total > u64::from(u32::MAX) {
            return Err(QueueError::ChainTooLarge { head: self.chain.head });
        }
        let segment = Segment { gpa: desc.addr, len: desc.len };
        if desc.has(VIRTQ_DESC_F_WRITE) {
            self.chain.writable.push(segment);
        } else if self.chain.writable.is_empty() {
            self.chain.readable.push(segment);
        } else {
            return Err(QueueError::ReadableAfterWritable { desc: at });
        }
        Ok(())
    }
}

/// `vring_need_event` of virtio_queue.h (virtio 1.2, appendix A): whether moving the used index
/// from `old` to `new` stepped over `event`, i.e. `event` is in `[old, new)` modulo 2^16.
fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A split virtqueue: its configuration (set by the transport) and the device's positions.
#[derive(Clone, Debug)]
pub struct Queue {
    max_size: u16,
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    enabled: bool,
    event_idx: bool,
    indirect: bool,
    /// Next available ring entry to read.
    last_avail: u16,
    /// The device's used `idx`: where the next used element goes.
    used_idx: u16,
    /// Used elements written since the last [`Queue::should_interrupt`].
    unsignalled: u32,
    error: Option<QueueError>,
}

impl Queue {
    /// A disabled queue of at most `max_size` entries (a power of two up to 32768), whose size
    /// starts at the maximum as the transports present it after reset (4.1.4.3).
    pub fn new(max_size: u16) -> Result<Self, QueueError> {
        if !max_size.is_power_of_two() || max_size > MAX_QUEUE_SIZE {
            return Err(QueueError::InvalidSize { size: max_size, max: MAX_QUEUE_SIZE });
        }
        Ok(Queue::disabled(max_size))
    }

    fn disabled(max_size: u16) -> Self {
        Queue {
            max_size,
            size: max_size,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            enabled: false,
            event_idx: false,
            indirect: false,
            last_avail: 0,
            used_idx: 0,
            unsignalled: 0,
            error: None,
        }
    }

    /// Back to the state after [`Queue::new`]: disabled, maximum size, no addresses, no
    /// negotiated features, indices at 0 and no error.
    pub fn reset(&mut self) {
        *self = Queue::disabled(self.max_size);
    }

    /// The device's maximum size for this queue.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// The size the driver chose (the maximum until it writes one).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Sets the number of entries: a power of two no larger than the maximum.
    pub fn set_size(&mut self, size: u16) -> Result<(), QueueError> {
        self.check_disabled()?;
        if !size.is_power_of_two() || size > self.max_size {
            return Err(QueueError::InvalidSize { size, max: self.max_size });
        }
        self.size = size;
        Ok(())
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc_table
    }

    /// Guest-physical address of the available ring.
    pub fn avail_ring(&self) -> u64 {
        self.avail_ring
    }

    /// Guest-physical address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// Sets the descriptor table address. Alignment is checked by [`Queue::enable`], since a
    /// transport may write the address in halves.
    pub fn set_desc_table(&mut self, gpa: u64) -> Result<(), QueueError> {
        self.check_disabled()?;
        self.desc_table = gpa;
        Ok(())
    }

    /// Sets the available ring address (checked by [`Queue::enable`]).
    pub fn set_avail_ring(&mut self, gpa: u64) -> Result<(), QueueError> {
        self.check_disabled()?;
        self.avail_ring = gpa;
        Ok(())
    }

    /// Sets the used ring address (checked by [`Queue::enable`]).
    pub fn set_used_ring(&mut self, gpa: u64) -> Result<(), QueueError> {
        self.check_disabled()?;
        self.used_ring = gpa;
        Ok(())
    }

    /// Takes VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC from the negotiated features.
    pub fn set_features(&mut self, driver_features: u64) {
        self.event_idx = driver_features & VIRTIO_F_EVENT_IDX != 0;
        self.indirect = driver_features & VIRTIO_F_INDIRECT_DESC != 0;
    }

    /// Whether the queue is enabled (the transport's queue_enable).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Enables the queue once its rings are aligned (2.7.1) and inside guest memory of
    /// `memory_size` bytes, so that later ring accesses cannot fail for a well-behaved memory.
    pub fn enable(&mut self, memory_size: u64) -> Result<(), QueueError> {
        for (ring, gpa) in
            [(Ring::Descriptors, self.desc_table), (Ring::Available, self.avail_ring), (Ring::Used, self.used_ring)]
        {
            if !gpa.is_multiple_of(ring.align()) {
                return Err(QueueError::Misaligned { ring, gpa });
            }
            let len = ring.len(self.size);
            if gpa.checked_add(len).is_none_or(|end| end > memory_size) {
                return Err(QueueError::RingOutsideMemory { ring, gpa, len });
            }
        }
        self.enabled = true;
        Ok(())
    }

    /// The error that failed the queue, if any; it stays until [`Queue::reset`].
    pub fn error(&self) -> Option<&QueueError> {
        self.error.as_ref()
    }

    fn check_disabled(&self) -> Result<(), QueueError> {
        if self.enabled {
            return Err(QueueError::ChangedWhileEnabled);
        }
        Ok(())
    }

    /// Address of a ring field `offset` bytes into `ring`; the ring was checked by `enable`.
    fn ring_gpa(&self, ring: Ring, offset: u64) -> Result<u64, QueueError> {
        let base = match ring {
            Ring::Descriptors => self.desc_table,
            Ring::Available => self.avail_ring,
            Ring::Used => self.used_ring,
        };
        base.checked_add(offset)
            .ok_or(QueueError::RingAccess { ring, error: MemError::OutOfRange { gpa: base, len: offset } })
    }

    fn read_ring_u16(&self, mem: &(impl GuestMemory + ?Sized), ring: Ring, offset: u64) -> Result<u16, QueueError> {
        mem.read_u16(self.ring_gpa(ring, offset)?).map_err(|error| QueueError::RingAccess { ring, error })
    }

    /// Offset of `used_event` (after the available ring entries) or `avail_event` (after the used
    /// ring elements).
    fn event_offset(&self, ring: Ring) -> u64 {
        let entry = if ring == Ring::Used { USED_ELEMENT_LEN } else { 2 };
        RING_ENTRIES + entry * u64::from(self.size)
    }

    /// Takes the next chain the driver made available, `None` if there is none or the queue is
    /// not enabled. With VIRTIO_F_EVENT_IDX, also tells the driver (`avail_event`) to notify
    /// again as soon as it adds a chain the device has not seen.
    pub fn pop(&mut self, mem: &mut (impl GuestMemory + ?Sized)) -> Result<Option<DescriptorChain>, QueueError> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        if !self.enabled {
            return Ok(None);
        }
        let popped = self.try_pop(mem);
        if let Err(error) = &popped {
            self.error = Some(error.clone());
        }
        popped
    }

    fn try_pop(&mut self, mem: &mut (impl GuestMemory + ?Sized)) -> Result<Option<DescriptorChain>, QueueError> {
        if !self.has_available(mem)? {
            if !self.event_idx {
                return Ok(None);
            }
            // The driver may have added a chain after reading the old avail_event: look again
            // once the new one is visible, or that chain would wait for a notification that
            // never comes.
            self.publish_avail_event(mem)?;
            fence(Ordering::SeqCst);
            if !self.has_available(mem)? {
                return Ok(None);
            }
        }
        // Ring entries and descriptors are read only after the index that published them.
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_avail % self.size);
        let head = self.read_ring_u16(mem, Ring::Available, RING_ENTRIES + 2 * slot)?;
        if head >= self.size {
            return Err(QueueError::HeadOutOfRange { head, size: self.size });
        }
        let chain = self.walk(mem, head)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        if self.event_idx {
            self.publish_avail_event(mem)?;
        }
        Ok(Some(chain))
    }

    /// Whether the driver's available index is ahead of the device, refusing an index that ran
    /// ahead by more than the queue holds (the driver cannot have made that many available).
    /// How many chains the device has taken so far (the available ring position, mod 2^16).
    pub fn taken(&self) -> u16 {
        self.last_avail
    }

    /// Whether the driver made chains available that the device has not taken.
    pub fn has_available(&self, mem: &(impl GuestMemory + ?Sized)) -> Result<bool, QueueError> {
        let avail_idx = self.read_ring_u16(mem, Ring::Available, 2)?;
        let pending = avail_idx.wrapping_sub(self.last_avail);
        if pending > self.size {
            return Err(QueueError::AvailIndexRunaway { avail_idx, last_avail: self.last_avail, size: self.size });
        }
        Ok(pending != 0)
    }

    /// Writes `avail_event` = the next entry the device will read (2.7.10, "Available Buffer
    /// Notification Suppression").
    fn publish_avail_event(&self, mem: &mut (impl GuestMemory + ?Sized)) -> Result<(), QueueError> {
        let gpa = self.ring_gpa(Ring::Used, self.event_offset(Ring::Used))?;
        mem.write_u16(gpa, self.last_avail).map_err(|error| QueueError::RingAccess { ring: Ring::Used, error })
    }

    /// Follows the chain from `head` (< size) through the descriptor table and at most one
    /// indirect table at its end (2.7.5.3.2).
    fn walk(&self, mem: &(impl GuestMemory + ?Sized), head: u16) -> Result<DescriptorChain, QueueError> {
        let mut builder = ChainBuilder {
            chain: DescriptorChain { head, readable: Vec::new(), writable: Vec::new() },
            total: 0,
            mem_size: mem.size(),
        };
        let limit = u32::from(self.size);
        let mut index = head;
        let mut count = 0u32;
        loop {
            count += 1;
            if count > limit {
                return Err(QueueError::ChainTooLong { head, limit });
            }
            let gpa = self.ring_gpa(Ring::Descriptors, DESCRIPTOR_LEN * u64::from(index))?;
            let desc = Descriptor::read(mem, gpa)
                .map_err(|error| QueueError::RingAccess { ring: Ring::Descriptors, error })?;
            if desc.has(VIRTQ_DESC_F_INDIRECT) {
                if !self.indirect {
                    return Err(QueueError::IndirectNotNegotiated { desc: index });
                }
                if desc.has(VIRTQ_DESC_F_NEXT) {
                    return Err(QueueError::IndirectWithNext { desc: index });
                }
                // The indirect descriptor's own WRITE flag is ignored (2.7.5.3.2).
                walk_indirect(mem, index, &desc, limit, &mut builder)?;
                break;
            }
            builder.add(DescriptorRef::Direct(index), &desc)?;
            if !desc.has(VIRTQ_DESC_F_NEXT) {
                break;
            }
            if desc.next >= self.size {
                return Err(QueueError::NextOutOfRange { desc: DescriptorRef::Direct(index), next: desc.next, limit });
            }
            index = desc.next;
        }
        Ok(builder.chain)
    }

    /// Writes a used element for chain `head` with `written` bytes written to its writable
    /// buffers, then the used index: the element must be visible first (2.7.8.2).
    pub fn push_used(
        &mut self,
        mem: &mut (impl GuestMemory + ?Sized),
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        if !self.enabled {
            return Err(QueueError::NotEnabled);
        }
        if head >= self.size {
            return Err(QueueError::UsedHeadOutOfRange { head, size: self.size });
        }
        let slot = u64::from(self.used_idx % self.size);
        let element_gpa = self.ring_gpa(Ring::Used, RING_ENTRIES + USED_ELEMENT_LEN * slot)?;
        let mut element = [0u8; USED_ELEMENT_LEN as usize];
        let (id, len) = element.split_at_mut(4);
        id.copy_from_slice(&u32::from(head).to_le_bytes());
        len.copy_from_slice(&written.to_le_bytes());
        let to_ring = |error| QueueError::RingAccess { ring: Ring::Used, error };
        mem.write(element_gpa, &element).map_err(to_ring)?;
        fence(Ordering::Release);
        let next = self.used_idx.wrapping_add(1);
        mem.write_u16(self.ring_gpa(Ring::Used, 2)?, next).map_err(to_ring)?;
        self.used_idx = next;
        self.unsignalled = self.unsignalled.saturating_add(1);
        Ok(())
    }

    /// Whether the used elements pushed since the last call need a used buffer notification:
    /// with VIRTIO_F_EVENT_IDX when the used index passed the driver's `used_event`, otherwise
    /// unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT (2.7.7.2).
    pub fn should_interrupt(&mut self, mem: &(impl GuestMemory + ?Sized)) -> Result<bool, QueueError> {
        let pushed = core::mem::take(&mut self.unsignalled);
        if pushed == 0 || !self.enabled {
            return Ok(false);
        }
        // The used index must be visible before the driver's suppression state is read, or a
        // driver re-enabling interrupts in between would miss this one.
        fence(Ordering::SeqCst);
        if !self.event_idx {
            let flags = self.read_ring_u16(mem, Ring::Available, 0)?;
            return Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0);
        }
        // Modulo 2^16 the window between old and new is ambiguous once it is that wide.
        if pushed > u32::from(u16::MAX) {
            return Ok(true);
        }
        let used_event = self.read_ring_u16(mem, Ring::Available, self.event_offset(Ring::Available))?;
        let old = self.used_idx.wrapping_sub(pushed as u16);
        Ok(vring_need_event(used_event, self.used_idx, old))
    }
}

/// Adds the buffers of the indirect table that descriptor `index` refers to (2.7.5.3).
fn walk_indirect(
    mem: &(impl GuestMemory + ?Sized),
    index: u16,
    table: &Descriptor,
    limit: u32,
    builder: &mut ChainBuilder,
) -> Result<(), QueueError> {
    if table.len == 0 || !table.len.is_multiple_of(DESCRIPTOR_LEN as u32) {
        return Err(QueueError::IndirectTableLength { desc: index, len: table.len });
    }
    let entries = table.len / DESCRIPTOR_LEN as u32;
    // No chain may be longer than the queue (2.7.5.3.1: "A driver MUST NOT create a descriptor
    // chain longer than the Queue Size"): this bounds what one chain costs the device to walk.
    if entries > limit {
        return Err(QueueError::IndirectTableTooLong { desc: index, entries, limit });
    }
    if table.addr.checked_add(u64::from(table.len)).is_none_or(|end| end > builder.mem_size) {
        return Err(QueueError::IndirectTableOutsideMemory { desc: index, addr: table.addr, len: table.len });
    }
    let mut entry = 0u32;
    let mut count = 0u32;
    loop {
        count += 1;
        if count > entries {
            return Err(QueueError::ChainTooLong { head: builder.chain.head, limit: entries });
        }
        let at = DescriptorRef::Indirect { table: index, entry };
        // In range: entry < entries, so the descriptor lies inside the table checked above.
        let gpa = table.addr + DESCRIPTOR_LEN * u64::from(entry);
        let desc = Descriptor::read(mem, gpa).map_err(|_| QueueError::IndirectTableOutsideMemory {
            desc: index,
            addr: table.addr,
            len: table.len,
        })?;
        if desc.has(VIRTQ_DESC_F_INDIRECT) {
            return Err(QueueError::NestedIndirect { desc: at });
        }
        builder.add(at, &desc)?;
        if !desc.has(VIRTQ_DESC_F_NEXT) {
            return Ok(());
        }
        if u32::from(desc.next) >= entries {
            return Err(QueueError::NextOutOfRange { desc: at, next: desc.next, limit: entries });
        }
        entry = u32::from(desc.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_driver::{
        indirect_table, memory, readable, writable, write_desc, Driver, HugeMemory, AVAIL, DATA, DESC, MEM_SIZE, USED,
    };
    use crate::loader::SliceMemory;
    use alloc::string::ToString;
    use alloc::vec;

    const TABLE: u64 = DATA + 0x8000;

    fn seg(gpa: u64, len: u32) -> Segment {
        Segment { gpa, len }
    }

    /// Sets up a queue of 8 with `features`, lets `setup` play the driver, pops once and
    /// expects an error, which must also stick to the queue.
    fn pop_error(features: u64, setup: impl FnOnce(&mut Driver, &mut SliceMemory)) -> QueueError {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, features);
        setup(&mut driver, &mut mem);
        let error = queue.pop(&mut mem).unwrap_err();
        assert_eq!(queue.error(), Some(&error));
        error
    }

    #[test]
    fn pops_a_request_and_returns_it_through_the_used_ring() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        assert_eq!(queue.pop(&mut mem), Ok(None));
        mem.write(DATA, b"request!").unwrap();
        let head = driver.chain(&mut mem, &[readable(DATA, 8), writable(DATA + 0x100, 4)]);
        let chain = queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(chain.head(), head);
        assert_eq!(chain.readable(), [seg(DATA, 8)]);
        assert_eq!(chain.writable(), [seg(DATA + 0x100, 4)]);
        assert_eq!((chain.readable_len(), chain.writable_len()), (8, 4));
        let mut buf = [0u8; 16];
        assert_eq!(chain.read_at(&mem, 0, &mut buf), Ok(8));
        assert_eq!(&buf[..8], b"request!");
        assert_eq!(chain.write_at(&mut mem, 0, b"done!"), Ok(4), "bounded by the writable part");
        let mut out = [0u8; 5];
        mem.read(DATA + 0x100, &mut out).unwrap();
        assert_eq!(&out, b"done\0");
        assert_eq!(queue.pop(&mut mem), Ok(None), "one chain was made available");

        queue.push_used(&mut mem, head, 4).unwrap();
        assert_eq!(driver.used_idx(&mem), 1);
        assert_eq!(driver.used(&mem, 0), (u32::from(head), 4));
        assert_eq!(queue.should_interrupt(&mem), Ok(true));
        assert_eq!(queue.should_interrupt(&mem), Ok(false), "nothing was used since");
    }

    #[test]
    fn chains_of_scattered_descriptors_are_read_and_written_across_segments() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        // 5 -> 2 -> 7 -> 0 -> 3: three readable (one empty), two writable.
        let (next, write) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE);
        driver.desc(&mut mem, 5, DATA, 4, next, 2);
        driver.desc(&mut mem, 2, DATA + 0x40, 0, next, 7);
        driver.desc(&mut mem, 7, DATA + 0x80, 6, next, 0);
        driver.desc(&mut mem, 0, DATA + 0x100, 3, write | next, 3);
        driver.desc(&mut mem, 3, DATA + 0x200, 5, write, 0);
        driver.publish(&mut mem, 5);
        mem.write(DATA, b"abcd").unwrap();
        mem.write(DATA + 0x80, b"efghij").unwrap();

        let chain = queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(chain.head(), 5);
        assert_eq!(chain.readable(), [seg(DATA, 4), seg(DATA + 0x40, 0), seg(DATA + 0x80, 6)]);
        assert_eq!(chain.writable(), [seg(DATA + 0x100, 3), seg(DATA + 0x200, 5)]);
        assert_eq!((chain.readable_len(), chain.writable_len()), (10, 8));
        let mut buf = [0u8; 7];
        assert_eq!(chain.read_at(&mem, 2, &mut buf), Ok(7));
        assert_eq!(&buf, b"cdefghi");
        assert_eq!(chain.read_at(&mem, 9, &mut buf), Ok(1));
        assert_eq!(buf[0], b'j');
        assert_eq!(chain.read_at(&mem, 10, &mut buf), Ok(0));
        assert_eq!(chain.read_at(&mem, u64::MAX, &mut buf), Ok(0));

        assert_eq!(chain.write_at(&mut mem, 1, b"123456789"), Ok(7));
        let (mut first, mut second) = ([0u8; 4], [0u8; 6]);
        mem.read(DATA + 0x100, &mut first).unwrap();
        mem.read(DATA + 0x200, &mut second).unwrap();
        assert_eq!(&first, b"\x0012\0");
        assert_eq!(&second, b"34567\0");
        assert_eq!(chain.write_at(&mut mem, 8, b"x"), Ok(0));
    }

    #[test]
    fn a_chain_of_exactly_queue_size_descriptors_is_accepted() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        let bufs = [readable(DATA, 1); 8];
        driver.chain(&mut mem, &bufs);
        assert_eq!(queue.pop(&mut mem).unwrap().unwrap().readable().len(), 8);
    }

    #[test]
    fn indirect_tables_are_followed_alone_or_after_direct_descriptors() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, VIRTIO_F_INDIRECT_DESC);
        let table = [readable(DATA, 16), writable(DATA + 0x200, 512), writable(DATA + 0x400, 1)];
        let len = indirect_table(&mut mem, TABLE, &table);
        // The WRITE flag on the descriptor that refers to the table is ignored (2.7.5.3.2).
        driver.desc(&mut mem, 0, TABLE, len, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0);
        driver.publish(&mut mem, 0);
        let chain = queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(chain.head(), 0);
        assert_eq!(chain.readable(), [seg(DATA, 16)]);
        assert_eq!(chain.writable(), [seg(DATA + 0x200, 512), seg(DATA + 0x400, 1)]);

        // Direct readable descriptors, then one indirect descriptor at the end of the chain.
        let len = indirect_table(&mut mem, TABLE + 0x100, &[writable(DATA + 0x600, 8)]);
        driver.desc(&mut mem, 1, DATA + 0x20, 4, VIRTQ_DESC_F_NEXT, 2);
        driver.desc(&mut mem, 2, TABLE + 0x100, len, VIRTQ_DESC_F_INDIRECT, 0);
        driver.publish(&mut mem, 1);
        let chain = queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(chain.head(), 1);
        assert_eq!(chain.readable(), [seg(DATA + 0x20, 4)]);
        assert_eq!(chain.writable(), [seg(DATA + 0x600, 8)]);
    }

    #[test]
    fn descriptor_indices_beyond_the_table_are_refused() {
        let error = pop_error(0, |driver, mem| driver.publish(mem, 8));
        assert_eq!(error, QueueError::HeadOutOfRange { head: 8, size: 8 });
        let error = pop_error(0, |driver, mem| {
            driver.desc(mem, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 9);
            driver.publish(mem, 0);
        });
        assert_eq!(error, QueueError::NextOutOfRange { desc: DescriptorRef::Direct(0), next: 9, limit: 8 });
        assert_eq!(error.to_string(), "descriptor 0 chains to descriptor 9, beyond its table of 8");
    }

    #[test]
    fn descriptor_loops_are_detected() {
        let error = pop_error(0, |driver, mem| {
            driver.desc(mem, 0, DATA, 4, VIRTQ_DESC_F_NEXT, 1);
            driver.desc(mem, 1, DATA, 4, VIRTQ_DESC_F_NEXT, 0);
            driver.publish(mem, 0);
        });
        assert_eq!(error, QueueError::ChainTooLong { head: 0, limit: 8 });
        let error = pop_error(0, |driver, mem| {
            driver.desc(mem, 3, DATA, 0, VIRTQ_DESC_F_NEXT, 3);
            driver.publish(mem, 3);
        });
        assert_eq!(error, QueueError::ChainTooLong { head: 3, limit: 8 });
    }

    #[test]
    fn buffers_outside_memory_or_overflowing_are_refused() {
        let end = MEM_SIZE as u64;
        let error = pop_error(0, |driver, mem| {
            driver.chain(mem, &[readable(end - 4, 8)]);
        });
        assert_eq!(error, QueueError::BufferOutsideMemory { desc: DescriptorRef::Direct(0), addr: end - 4, len: 8 });
        assert_eq!(error.to_string(), "descriptor 0 points outside guest memory (0xffffc + 0x8)");
        let error = pop_error(0, |driver, mem| {
            driver.chain(mem, &[readable(DATA, 4), writable(u64::MAX - 3, 16)]);
        });
        assert_eq!(
            error,
            QueueError::BufferOutsideMemory { desc: DescriptorRef::Direct(1), addr: u64::MAX - 3, len: 16 }
        );

        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        driver.chain(&mut mem, &[writable(end - 8, 8), writable(end, 0)]);
        assert_eq!(queue.pop(&mut mem).unwrap().unwrap().writable_len(), 8, "up to the last byte is fine");
    }

    #[test]
    fn chains_longer_than_4_gib_are_refused() {
        let mut mem = HugeMemory { low: memory() };
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        driver.chain(&mut mem, &[readable(1 << 32, 0x8000_0000), writable(3 << 32, 0x7fff_ffff)]);
        let chain = queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(chain.readable_len() as u64 + chain.writable_len() as u64, u64::from(u32::MAX));
        driver.chain(&mut mem, &[readable(1 << 32, 0x8000_0000), writable(3 << 32, 0x8000_0000)]);
        assert_eq!(queue.pop(&mut mem), Err(QueueError::ChainTooLarge { head: 2 }));
    }

    #[test]
    fn readable_buffers_after_writable_ones_are_refused() {
        let error = pop_error(0, |driver, mem| {
            driver.chain(mem, &[readable(DATA, 4), writable(DATA + 0x10, 4), readable(DATA + 0x20, 4)]);
        });
        assert_eq!(error, QueueError::ReadableAfterWritable { desc: DescriptorRef::Direct(2) });
        // Across a direct descriptor and the indirect table that follows it.
        let error = pop_error(VIRTIO_F_INDIRECT_DESC, |driver, mem| {
            let len = indirect_table(mem, TABLE, &[readable(DATA, 4)]);
            driver.desc(mem, 0, DATA + 0x10, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
            driver.desc(mem, 1, TABLE, len, VIRTQ_DESC_F_INDIRECT, 0);
            driver.publish(mem, 0);
        });
        assert_eq!(error, QueueError::ReadableAfterWritable { desc: DescriptorRef::Indirect { table: 1, entry: 0 } });
        assert_eq!(
            error.to_string(),
            "indirect descriptor 0 (in the table of descriptor 1) is device-readable but follows a device-writable \
             descriptor"
        );
    }

    #[test]
    fn indirect_descriptors_follow_the_rules_of_2_7_5_3() {
        let table = |driver: &mut Driver, mem: &mut SliceMemory, flags: u16| {
            let len = indirect_table(mem, TABLE, &[readable(DATA, 4), writable(DATA + 0x10, 1)]);
            driver.desc(mem, 0, TABLE, len, flags, 1);
            driver.desc(mem, 1, DATA + 0x20, 1, VIRTQ_DESC_F_WRITE, 0);
            driver.publish(mem, 0);
        };
        let error = pop_error(0, |driver, mem| table(driver, mem, VIRTQ_DESC_F_INDIRECT));
        assert_eq!(error, QueueError::IndirectNotNegotiated { desc: 0 });
        let error = pop_error(VIRTIO_F_INDIRECT_DESC, |driver, mem| {
            table(driver, mem, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT)
        });
        assert_eq!(error, QueueError::IndirectWithNext { desc: 0 });

        let error = pop_error(VIRTIO_F_INDIRECT_DESC, |driver, mem| {
            indirect_table(mem, TABLE, &[readable(DATA, 4), writable(DATA + 0x10, 1)]);
            write_desc(mem, TABLE + 16, TABLE, 32, VIRTQ_DESC_F_INDIRECT, 0);
            driver.desc(mem, 0, TABLE, 32, VIRTQ_DESC_F_INDIRECT, 0);
            driver.publish(mem, 0);
        });
        assert_eq!(error, QueueError::NestedIndirect { desc: DescriptorRef::Indirect { table: 0, entry: 1 } });
    }

    #[test]
    fn indirect_tables_must_be_whole_descriptors_inside_memory() {
        let refer = |len: u32, addr: u64| {
            move |driver: &mut Driver, mem: &mut SliceMemory| {
                driver.desc(mem, 0, addr, len, VIRTQ_DESC_F_INDIRECT, 0);
                driver.publish(mem, 0);
            }
        };
        let features = VIRTIO_F_INDIRECT_DESC;
        assert_eq!(pop_error(features, refer(0, TABLE)), QueueError::IndirectTableLength { desc: 0, len: 0 });
        assert_eq!(pop_error(features, refer(24, TABLE)), QueueError::IndirectTableLength { desc: 0, len: 24 });
        let end = MEM_SIZE as u64;
        assert_eq!(
            pop_error(features, refer(32, end - 16)),
            QueueError::IndirectTableOutsideMemory { desc: 0, addr: end - 16, len: 32 }
        );
        assert_eq!(
            pop_error(features, refer(32, u64::MAX - 15)),
            QueueError::IndirectTableOutsideMemory { desc: 0, addr: u64::MAX - 15, len: 32 }
        );
        let size = u32::from(Driver::new(8).size);
        assert_eq!(
            pop_error(features, refer(16 * (size + 1), DATA)),
            QueueError::IndirectTableTooLong { desc: 0, entries: size + 1, limit: size },
            "a chain is never longer than the queue"
        );
    }

    #[test]
    fn loops_and_bad_links_inside_indirect_tables_are_detected() {
        let error = pop_error(VIRTIO_F_INDIRECT_DESC, |driver, mem| {
            write_desc(mem, TABLE, DATA, 4, VIRTQ_DESC_F_NEXT, 1);
            write_desc(mem, TABLE + 16, DATA, 4, VIRTQ_DESC_F_NEXT, 0);
            driver.desc(mem, 0, TABLE, 32, VIRTQ_DESC_F_INDIRECT, 0);
            driver.publish(mem, 0);
        });
        assert_eq!(error, QueueError::ChainTooLong { head: 0, limit: 2 });
        let error = pop_error(VIRTIO_F_INDIRECT_DESC, |driver, mem| {
            write_desc(mem, TABLE, DATA, 4, VIRTQ_DESC_F_NEXT, 2);
            driver.desc(mem, 0, TABLE, 32, VIRTQ_DESC_F_INDIRECT, 0);
            driver.publish(mem, 0);
        });
        let at = DescriptorRef::Indirect { table: 0, entry: 0 };
        assert_eq!(error, QueueError::NextOutOfRange { desc: at, next: 2, limit: 2 });
    }

    #[test]
    fn an_available_index_running_ahead_by_more_than_the_queue_is_malformed() {
        let error = pop_error(0, |driver, mem| driver.set_avail_idx(mem, 9));
        assert_eq!(error, QueueError::AvailIndexRunaway { avail_idx: 9, last_avail: 0, size: 8 });
        assert_eq!(
            error.to_string(),
            "available index 9 is 9 entries ahead of the last one seen (0), more than the queue size 8"
        );
        // A full ring (exactly `size` ahead) is fine: eight chains of descriptor 0.
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        driver.desc(&mut mem, 0, DATA, 4, 0, 0);
        driver.set_avail_idx(&mut mem, 8);
        for _ in 0..8 {
            assert_eq!(queue.pop(&mut mem).unwrap().unwrap().head(), 0);
        }
        assert_eq!(queue.pop(&mut mem), Ok(None));
    }

    #[test]
    fn a_failed_queue_stays_failed_until_reset() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        driver.publish(&mut mem, 8);
        let error = QueueError::HeadOutOfRange { head: 8, size: 8 };
        assert_eq!(queue.pop(&mut mem), Err(error.clone()));
        mem.write_u16(AVAIL + 4, 0).unwrap();
        assert_eq!(queue.pop(&mut mem), Err(error), "repairing the ring does not revive the queue");
        queue.reset();
        assert!(!queue.is_enabled() && queue.error().is_none());
        assert_eq!((queue.size(), queue.desc_table(), queue.avail_ring(), queue.used_ring()), (256, 0, 0, 0));
        // The driver starts over with fresh rings.
        let mut driver = Driver::new(8);
        mem.write_u16(AVAIL + 2, 0).unwrap();
        driver.configure(&mut queue, &mem, 0);
        driver.chain(&mut mem, &[readable(DATA, 4)]);
        assert_eq!(queue.pop(&mut mem).unwrap().unwrap().head(), 0);
    }

    #[test]
    fn rings_must_be_aligned_and_inside_guest_memory() {
        let mut backing = memory();
        let mem = SliceMemory(&mut backing);
        let configured = |desc: u64, avail: u64, used: u64| {
            let mut queue = Queue::new(256).unwrap();
            queue.set_size(8).unwrap();
            queue.set_desc_table(desc).unwrap();
            queue.set_avail_ring(avail).unwrap();
            queue.set_used_ring(used).unwrap();
            queue
        };
        assert_eq!(
            configured(DESC + 8, AVAIL, USED).enable(mem.size()),
            Err(QueueError::Misaligned { ring: Ring::Descriptors, gpa: DESC + 8 })
        );
        assert_eq!(
            configured(DESC, AVAIL + 1, USED).enable(mem.size()),
            Err(QueueError::Misaligned { ring: Ring::Available, gpa: AVAIL + 1 })
        );
        let error = configured(DESC, AVAIL, USED + 2).enable(mem.size()).unwrap_err();
        assert_eq!(error, QueueError::Misaligned { ring: Ring::Used, gpa: USED + 2 });
        assert_eq!(error.to_string(), "used ring at 0x4002 is not aligned to 4 bytes");
        // Alignments are minimums: 2- and 4-byte rings may sit at any such address.
        assert_eq!(configured(DESC, AVAIL + 2, USED + 4).enable(mem.size()), Ok(()));

        let end = MEM_SIZE as u64;
        assert_eq!(
            configured(DESC, AVAIL, end - 68).enable(mem.size()),
            Err(QueueError::RingOutsideMemory { ring: Ring::Used, gpa: end - 68, len: 70 })
        );
        assert_eq!(configured(DESC, AVAIL, end - 72).enable(mem.size()), Ok(()), "70 bytes fit");
        assert_eq!(
            configured(DESC, end - 20, USED).enable(mem.size()),
            Err(QueueError::RingOutsideMemory { ring: Ring::Available, gpa: end - 20, len: 22 })
        );
        let top = !15u64;
        assert_eq!(
            configured(top, AVAIL, USED).enable(mem.size()),
            Err(QueueError::RingOutsideMemory { ring: Ring::Descriptors, gpa: top, len: 128 })
        );
    }

    #[test]
    fn queue_sizes_are_powers_of_two_within_the_maximum() {
        for bad in [0, 3, 0xffff] {
            assert_eq!(Queue::new(bad).unwrap_err(), QueueError::InvalidSize { size: bad, max: MAX_QUEUE_SIZE });
        }
        assert_eq!(Queue::new(MAX_QUEUE_SIZE).unwrap().size(), MAX_QUEUE_SIZE);
        let mut queue = Queue::new(256).unwrap();
        assert_eq!((queue.size(), queue.max_size()), (256, 256), "the size starts at the maximum");
        for bad in [0, 3, 255, 512] {
            assert_eq!(queue.set_size(bad), Err(QueueError::InvalidSize { size: bad, max: 256 }));
        }
        assert_eq!(queue.size(), 256);
        for good in [1, 2, 128, 256] {
            queue.set_size(good).unwrap();
            assert_eq!(queue.size(), good);
        }
        assert_eq!(
            QueueError::InvalidSize { size: 3, max: 256 }.to_string(),
            "queue size 3 is not a power of two between 1 and 256"
        );
    }

    #[test]
    fn an_enabled_queue_cannot_be_reconfigured() {
        let mut backing = memory();
        let mem = SliceMemory(&mut backing);
        let mut queue = Driver::new(8).queue(&mem, 0);
        assert!(queue.is_enabled());
        assert_eq!(queue.set_size(4), Err(QueueError::ChangedWhileEnabled));
        assert_eq!(queue.set_desc_table(0), Err(QueueError::ChangedWhileEnabled));
        assert_eq!(queue.set_avail_ring(0), Err(QueueError::ChangedWhileEnabled));
        assert_eq!(queue.set_used_ring(0), Err(QueueError::ChangedWhileEnabled));
        assert_eq!((queue.size(), queue.desc_table(), queue.avail_ring(), queue.used_ring()), (8, DESC, AVAIL, USED));
    }

    #[test]
    fn a_disabled_queue_pops_nothing_and_takes_no_used_buffers() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        driver.chain(&mut mem, &[readable(DATA, 4)]);
        let mut queue = Queue::new(8).unwrap();
        queue.set_desc_table(DESC).unwrap();
        queue.set_avail_ring(AVAIL).unwrap();
        queue.set_used_ring(USED).unwrap();
        assert_eq!(queue.pop(&mut mem), Ok(None));
        assert_eq!(queue.push_used(&mut mem, 0, 0), Err(QueueError::NotEnabled));
        queue.enable(mem.size()).unwrap();
        assert_eq!(queue.push_used(&mut mem, 8, 0), Err(QueueError::UsedHeadOutOfRange { head: 8, size: 8 }));
        assert_eq!(driver.used_idx(&mem), 0);
        assert_eq!(queue.pop(&mut mem).unwrap().unwrap().head(), 0);
    }

    /// Guest memory that logs the address of every write.
    struct Recording<'a> {
        inner: SliceMemory<'a>,
        writes: Vec<u64>,
    }

    impl GuestMemory for Recording<'_> {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.inner.read(gpa, buf)
        }
        fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
            self.writes.push(gpa);
            self.inner.write(gpa, data)
        }
    }

    #[test]
    fn the_used_element_is_written_before_the_used_index() {
        let mut backing = memory();
        let mut mem = Recording { inner: SliceMemory(&mut backing), writes: vec![] };
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        driver.chain(&mut mem, &[writable(DATA, 4)]);
        queue.pop(&mut mem).unwrap().unwrap();
        mem.writes.clear();
        queue.push_used(&mut mem, 0, 4).unwrap();
        assert_eq!(mem.writes, [USED + 4, USED + 2]);
    }

    #[test]
    fn vring_need_event_is_true_when_the_window_passes_the_event() {
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(5, 10, 5), "event at the old index");
        assert!(vring_need_event(9, 10, 5), "event just before the new index");
        assert!(!vring_need_event(10, 10, 5));
        assert!(!vring_need_event(4, 10, 5));
        assert!(vring_need_event(0xffff, 1, 0xfffe), "across the wrap");
        assert!(!vring_need_event(1, 1, 0xfffe));
    }

    /// Makes one chain available, pops it and pushes it back.
    fn round_trip<M: GuestMemory>(driver: &mut Driver, queue: &mut Queue, mem: &mut M) {
        driver.chain(mem, &[writable(DATA, 4)]);
        let chain = queue.pop(mem).unwrap().unwrap();
        queue.push_used(mem, chain.head(), 4).unwrap();
    }

    #[test]
    fn with_event_idx_interrupts_come_only_when_the_used_index_passes_used_event() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, VIRTIO_F_EVENT_IDX);
        driver.set_used_event(&mut mem, 2);
        // The driver wants an interrupt once the element at index 2 is used (idx reaches 3).
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(false));
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(false));
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(true));
        // A batch that steps over the event interrupts once.
        driver.set_used_event(&mut mem, 4);
        round_trip(&mut driver, &mut queue, &mut mem);
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(true));
        assert_eq!(queue.should_interrupt(&mem), Ok(false));
        // An event already behind stays quiet; NO_INTERRUPT is ignored with EVENT_IDX.
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(false));
        driver.set_no_interrupt(&mut mem, true);
        driver.set_used_event(&mut mem, 6);
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(true));
    }

    #[test]
    fn without_event_idx_no_interrupt_suppresses_interrupts() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let mut queue = driver.queue(&mem, 0);
        driver.set_used_event(&mut mem, 0x7777);
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(true), "used_event is ignored");
        driver.set_no_interrupt(&mut mem, true);
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(false));
        driver.set_no_interrupt(&mut mem, false);
        round_trip(&mut driver, &mut queue, &mut mem);
        assert_eq!(queue.should_interrupt(&mem), Ok(true));
    }

    #[test]
    fn with_event_idx_avail_event_asks_for_the_next_unseen_entry() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(8);
        let used_end = USED + 4 + 8 * 8;
        mem.write_u16(used_end, 0x5555).unwrap();
        let mut queue = driver.queue(&mem, VIRTIO_F_EVENT_IDX);
        assert_eq!(queue.pop(&mut mem), Ok(None));
        assert_eq!(driver.avail_event(&mem), 0, "an empty ring asks for a notification at once");
        driver.chain(&mut mem, &[readable(DATA, 4)]);
        driver.chain(&mut mem, &[readable(DATA, 4)]);
        queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(driver.avail_event(&mem), 1);
        queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(driver.avail_event(&mem), 2);
        assert_eq!(queue.pop(&mut mem), Ok(None));
        assert_eq!(driver.avail_event(&mem), 2);

        let mut driver = Driver::new(8);
        mem.write_u16(AVAIL + 2, 0).unwrap();
        mem.write_u16(used_end, 0x5555).unwrap();
        let mut queue = driver.queue(&mem, 0);
        driver.chain(&mut mem, &[readable(DATA, 4)]);
        queue.pop(&mut mem).unwrap().unwrap();
        assert_eq!(queue.pop(&mut mem), Ok(None));
        assert_eq!(driver.avail_event(&mem), 0x5555, "avail_event is left alone without EVENT_IDX");
    }

    #[test]
    fn ring_indices_wrap_at_65536() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(4);
        let mut queue = driver.queue(&mem, VIRTIO_F_EVENT_IDX);
        let total = 65536 + 5;
        for n in 1..=total {
            driver.set_used_event(&mut mem, (n - 1) as u16);
            round_trip(&mut driver, &mut queue, &mut mem);
            assert_eq!(queue.should_interrupt(&mem), Ok(true), "round trip {n}");
        }
        assert_eq!(driver.used_idx(&mem), 5);
        assert_eq!(driver.avail_event(&mem), 5);
        assert_eq!(driver.used(&mem, 4), (0, 4));
        assert!(queue.error().is_none());
    }

    #[test]
    fn more_than_65535_unsignalled_used_buffers_always_interrupt() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let mut driver = Driver::new(4);
        let mut queue = driver.queue(&mem, VIRTIO_F_EVENT_IDX);
        driver.set_used_event(&mut mem, 0x4000);
        for _ in 0..65536 {
            round_trip(&mut driver, &mut queue, &mut mem);
        }
        // The used index is back where it started, which alone would look like no progress.
        assert_eq!(driver.used_idx(&mem), 0);
        assert_eq!(queue.should_interrupt(&mem), Ok(true));
    }
}
