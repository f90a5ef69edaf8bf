//! Physical frame bookkeeping.
//!
//! The allocator keeps a sorted list of free, page-aligned physical ranges in a fixed-size array,
//! so it works before the heap exists. Usable memory is added first, then everything that must
//! never be handed out (kernel, page tables, ramdisk, boot info, low memory) is reserved; a reserve
//! always wins over a usable range, whatever the order of calls.

use core::fmt;

/// Size of one physical frame.
pub const FRAME_SIZE: u64 = 4096;

/// A half-open physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl PhysRange {
    /// `[start, start + len)`, saturating at the top of the address space.
    pub const fn new(start: u64, len: u64) -> Self {
        PhysRange { start, end: start.saturating_add(len) }
    }

    /// Length in bytes.
    pub const fn len(&self) -> u64 {
        self.end - self.start
    }

    /// True for an empty range.
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    fn overlaps(&self, other: &PhysRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// Why a bookkeeping call was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The range list is full; the range was not (fully) recorded.
    TooFragmented,
    /// An address or length is not frame-aligned.
    Unaligned,
    /// A freed range overlaps memory that is already free (double free).
    AlreadyFree {
        /// Start of the offending range.
        start: u64,
    },
    /// A freed range touches reserved memory.
    Reserved {
        /// Start of the offending range.
        start: u64,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooFragmented => f.write_str("free-range list is full"),
            FrameError::Unaligned => f.write_str("address or length is not 4 KiB aligned"),
            FrameError::AlreadyFree { start } => write!(f, "range at {start:#x} is already free"),
            FrameError::Reserved { start } => write!(f, "range at {start:#x} is reserved"),
        }
    }
}

/// Free-range allocator with room for `N` free ranges and `R` reserved ranges.
pub struct FrameAllocator<const N: usize, const R: usize> {
    free: [PhysRange; N],
    free_len: usize,
    reserved: [PhysRange; R],
    reserved_len: usize,
    /// Bytes that could not be recorded as free because the list overflowed.
    lost_bytes: u64,
}

const EMPTY: PhysRange = PhysRange { start: 0, end: 0 };

impl<const N: usize, const R: usize> Default for FrameAllocator<N, R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize, const R: usize> FrameAllocator<N, R> {
    /// An allocator with no memory.
    pub const fn new() -> Self {
        FrameAllocator { free: [EMPTY; N], free_len: 0, reserved: [EMPTY; R], reserved_len: 0, lost_bytes: 0 }
    }

    /// Adds usable memory, shrunk inward to whole frames and minus every reserved range.
    pub fn add_usable(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let start = align_up(range.start);
        let end = range.end & !(FRAME_SIZE - 1);
        if start >= end {
            return Ok(());
        }
        // Add what remains after cutting out reservations (sorted by start).
        let mut pending = PhysRange { start, end };
        let mut result = Ok(());
        for i in 0..self.reserved_len {
            let r = self.reserved[i];
            if r.end <= pending.start {
                continue;
            }
            if r.start >= pending.end {
                break;
            }
            if pending.start < r.start {
                result = result.and(self.merge_in(PhysRange { start: pending.start, end: r.start }));
            }
            pending.start = r.end;
            if pending.start >= pending.end {
                return result;
            }
        }
        self.merge_in(pending).and(result)
    }

    /// Marks a range as never to be handed out, now or after any later [`Self::add_usable`].
    ///
    /// If the reservation list is full the range is still removed from the free list, so a
    /// reserve never fails open; the error tells the caller it may not survive a later add.
    pub fn reserve(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let range = PhysRange { start: range.start & !(FRAME_SIZE - 1), end: align_up(range.end) };
        if range.is_empty() {
            return Ok(());
        }
        // Page tables and the like arrive frame by frame: absorb neighbours to keep the list short.
        let mut merged = range;
        let mut i = 0;
        while i < self.reserved_len {
            let r = self.reserved[i];
            if r.start <= merged.end && merged.start <= r.end {
                merged = PhysRange { start: merged.start.min(r.start), end: merged.end.max(r.end) };
                self.reserved.copy_within(i + 1..self.reserved_len, i);
                self.reserved_len -= 1;
            } else {
                i += 1;
            }
        }
        let recorded = if self.reserved_len < R {
            let at = self.reserved[..self.reserved_len].partition_point(|r| r.start < merged.start);
            self.reserved.copy_within(at..self.reserved_len, at + 1);
            self.reserved[at] = merged;
            self.reserved_len += 1;
            Ok(())
        } else {
            Err(FrameError::TooFragmented)
        };
        self.remove_free(range);
        recorded
    }

    /// Allocates `frames` contiguous frames whose start is a multiple of `align` bytes
    /// (a power of two, at least [`FRAME_SIZE`]). Returns the physical start address.
    pub fn alloc(&mut self, frames: u64, align: u64) -> Option<u64> {
        if frames == 0 || !align.is_power_of_two() {
            return None;
        }
        let align = align.max(FRAME_SIZE);
        let len = frames.checked_mul(FRAME_SIZE)?;
        let found = self.free[..self.free_len].iter().find_map(|r| {
            let start = r.start.checked_add(align - 1)? & !(align - 1);
            (start.checked_add(len)? <= r.end).then_some(start)
        })?;
        self.remove_free(PhysRange::new(found, len));
        Some(found)
    }

    /// Allocates one frame.
    pub fn alloc_frame(&mut self) -> Option<u64> {
        self.alloc(1, FRAME_SIZE)
    }

    /// Returns `frames` frames at `start` to the free list, refusing double frees and reserved memory.
    pub fn free(&mut self, start: u64, frames: u64) -> Result<(), FrameError> {
        let range = self.allocated(start, frames)?;
        self.insert_free(range)
    }

    /// The range of `frames` frames at `start` if all of it is allocated (neither free nor
    /// reserved), which is what [`Self::free`] takes back.
    pub fn allocated(&self, start: u64, frames: u64) -> Result<PhysRange, FrameError> {
        if !start.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::Unaligned);
        }
        let range = PhysRange::new(start, frames.saturating_mul(FRAME_SIZE));
        if self.free[..self.free_len].iter().any(|r| r.overlaps(&range)) {
            return Err(FrameError::AlreadyFree { start });
        }
        if self.reserved[..self.reserved_len].iter().any(|r| r.overlaps(&range)) {
            return Err(FrameError::Reserved { start });
        }
        Ok(range)
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        self.free[..self.free_len].iter().map(PhysRange::len).sum()
    }

    /// Bytes dropped because the free list overflowed (never handed out, never leaked twice).
    pub fn lost_bytes(&self) -> u64 {
        self.lost_bytes
    }

    /// The free ranges, sorted by address.
    pub fn free_ranges(&self) -> &[PhysRange] {
        &self.free[..self.free_len]
    }

    /// Adds a range that may overlap free ranges (memory maps can repeat themselves).
    fn merge_in(&mut self, mut range: PhysRange) -> Result<(), FrameError> {
        // Free ranges are disjoint and never touch, so one pass finds everything to absorb.
        for r in &self.free[..self.free_len] {
            if r.start <= range.end && range.start <= r.end {
                range.start = range.start.min(r.start);
                range.end = range.end.max(r.end);
            }
        }
        self.remove_free(range);
        self.insert_free(range)
    }

    /// Inserts a range known not to overlap any free range, merging with neighbours.
    fn insert_free(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let at = self.free[..self.free_len].partition_point(|r| r.start < range.start);
        let merges_left = at > 0 && self.free[at - 1].end == range.start;
        let merges_right = at < self.free_len && self.free[at].start == range.end;
        match (merges_left, merges_right) {
            (true, true) => {
                self.free[at - 1].end = self.free[at].end;
                self.remove_index(at);
            }
            (true, false) => self.free[at - 1].end = range.end,
            (false, true) => self.free[at].start = range.start,
            (false, false) => {
                if self.free_len == N {
                    self.lost_bytes += range.len();
                    return Err(FrameError::TooFragmented);
                }
                self.free.copy_within(at..self.free_len, at + 1);
                self.free[at] = range;
                self.free_len += 1;
            }
        }
        Ok(())
    }

    /// Removes `cut` from every free range it touches, splitting where needed.
    fn remove_free(&mut self, cut: PhysRange) {
        let mut i = 0;
        while i < self.free_len {
            let r = self.free[i];
            if !r.overlaps(&cut) {
                i += 1;
                continue;
            }
            let left = PhysRange { start: r.start, end: cut.start };
            let right = PhysRange { start: cut.end, end: r.end };
            match (left.is_empty(), right.is_empty()) {
                (true, true) => {
                    self.remove_index(i);
                    continue;
                }
                (false, true) => self.free[i] = left,
                (true, false) => self.free[i] = right,
                (false, false) => {
                    self.free[i] = left;
                    if self.free_len == N {
                        // Dropping the piece keeps the reservation intact at the cost of memory.
                        self.lost_bytes += right.len();
                    } else {
                        self.free.copy_within(i + 1..self.free_len, i + 2);
                        self.free[i + 1] = right;
                        self.free_len += 1;
                    }
                }
            }
            i += 1;
        }
    }

    fn remove_index(&mut self, i: usize) {
        self.free.copy_within(i + 1..self.free_len, i);
        self.free_len -= 1;
    }
}

fn align_up(addr: u64) -> u64 {
    addr.checked_add(FRAME_SIZE - 1).map_or(!(FRAME_SIZE - 1), |a| a & !(FRAME_SIZE - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    type Small = FrameAllocator<8, 8>;

    const MIB: u64 = 1 << 20;

    fn ranges<const N: usize, const R: usize>(a: &FrameAllocator<N, R>) -> Vec<(u64, u64)> {
        a.free_ranges().iter().map(|r| (r.start, r.end)).collect()
    }

    #[test]
    fn usable_ranges_are_shrunk_to_whole_frames_and_merged() {
        let mut a = Small::new();
        a.add_usable(PhysRange { start: 0x1001, end: 0x5fff }).unwrap();
        a.add_usable(PhysRange { start: 0x5000, end: 0x8000 }).unwrap();
        assert_eq!(ranges(&a), [(0x2000, 0x8000)]);
        assert_eq!(a.free_bytes(), 0x6000);
    }

    #[test]
    fn reserve_before_or_after_add_removes_the_same_frames() {
        let mut before = Small::new();
        before.reserve(PhysRange { start: 0x3000, end: 0x4800 }).unwrap();
        before.add_usable(PhysRange::new(0, 0x10000)).unwrap();
        let mut after = Small::new();
        after.add_usable(PhysRange::new(0, 0x10000)).unwrap();
        after.reserve(PhysRange { start: 0x3000, end: 0x4800 }).unwrap();
        // The partial frame at 0x4000..0x4800 is reserved whole.
        assert_eq!(ranges(&before), [(0, 0x3000), (0x5000, 0x10000)]);
        assert_eq!(ranges(&before), ranges(&after));
    }

    #[test]
    fn reserved_memory_is_never_handed_out() {
        let mut a = FrameAllocator::<64, 64>::new();
        a.add_usable(PhysRange::new(0, 4 * MIB)).unwrap();
        let reserved = [PhysRange::new(0, MIB), PhysRange::new(0x20_3000, 0x2000), PhysRange::new(0x30_0000, 0x1000)];
        for r in reserved {
            a.reserve(r).unwrap();
        }
        // Adding the same memory again must not resurrect reservations.
        a.add_usable(PhysRange::new(0, 4 * MIB)).unwrap();
        let mut got = Vec::new();
        while let Some(f) = a.alloc_frame() {
            got.push(f);
        }
        assert_eq!(got.len() as u64, (4 * MIB - MIB - 0x3000) / FRAME_SIZE);
        for f in got {
            let frame = PhysRange::new(f, FRAME_SIZE);
            assert!(reserved.iter().all(|r| !r.overlaps(&frame)), "handed out reserved frame {f:#x}");
        }
    }

    #[test]
    fn aligned_contiguous_allocations_split_the_free_range() {
        let mut a = Small::new();
        a.add_usable(PhysRange { start: 0x1000, end: 8 * MIB }).unwrap();
        let big = a.alloc(512, 2 * MIB).unwrap();
        assert_eq!(big, 2 * MIB);
        assert_eq!(ranges(&a), [(0x1000, 2 * MIB), (4 * MIB, 8 * MIB)]);
        assert_eq!(a.alloc_frame(), Some(0x1000));
        assert_eq!(a.alloc(0, FRAME_SIZE), None);
        assert_eq!(a.alloc(1, 3 * FRAME_SIZE), None, "non-power-of-two alignment");
        assert_eq!(a.alloc(2048, FRAME_SIZE), None, "larger than any free range");
    }

    #[test]
    fn free_merges_neighbours_and_refuses_double_free() {
        let mut a = Small::new();
        a.add_usable(PhysRange::new(0, 0x4000)).unwrap();
        let frames: Vec<u64> = (0..4).map(|_| a.alloc_frame().unwrap()).collect();
        assert_eq!(frames, [0, 0x1000, 0x2000, 0x3000]);
        assert_eq!(a.alloc_frame(), None);
        a.free(0x1000, 1).unwrap();
        a.free(0x3000, 1).unwrap();
        a.free(0x2000, 1).unwrap();
        assert_eq!(ranges(&a), [(0x1000, 0x4000)]);
        assert_eq!(a.free(0x2000, 1), Err(FrameError::AlreadyFree { start: 0x2000 }));
        assert_eq!(a.free(0x800, 1), Err(FrameError::Unaligned));
    }

    #[test]
    fn adjacent_reservations_share_one_slot() {
        let mut a = FrameAllocator::<8, 2>::new();
        a.add_usable(PhysRange::new(0, 16 * MIB)).unwrap();
        for frame in 0..100 {
            a.reserve(PhysRange::new(0x10_0000 + frame * FRAME_SIZE, FRAME_SIZE)).unwrap();
        }
        a.reserve(PhysRange::new(0x80_0000, FRAME_SIZE)).unwrap();
        // A third, separate reservation has no slot, but is still cut from the free list.
        assert_eq!(a.reserve(PhysRange::new(0x90_0000, FRAME_SIZE)), Err(FrameError::TooFragmented));
        assert_eq!(ranges(&a), [(0, 0x10_0000), (0x16_4000, 0x80_0000), (0x80_1000, 0x90_0000), (0x90_1000, 16 * MIB)]);
    }

    #[test]
    fn freeing_reserved_memory_is_refused() {
        let mut a = Small::new();
        a.reserve(PhysRange::new(0x5000, 0x1000)).unwrap();
        assert_eq!(a.free(0x5000, 1), Err(FrameError::Reserved { start: 0x5000 }));
        assert_eq!(a.free_bytes(), 0);
    }

    #[test]
    fn overflowing_the_free_list_loses_memory_rather_than_reservations() {
        let mut a = FrameAllocator::<2, 8>::new();
        a.add_usable(PhysRange::new(0, 0x10000)).unwrap();
        a.reserve(PhysRange::new(0x2000, 0x1000)).unwrap();
        a.reserve(PhysRange::new(0x8000, 0x1000)).unwrap();
        assert_eq!(ranges(&a), [(0, 0x2000), (0x3000, 0x8000)]);
        assert_eq!(a.lost_bytes(), 0x7000);
        let mut total = 0;
        while let Some(f) = a.alloc_frame() {
            assert!(f != 0x2000 && f != 0x8000);
            total += 1;
        }
        assert_eq!(total, 7);
    }
}
