//! Second-level (guest-physical to host-physical) page tables.
//!
//! One four-level table builder serves both Intel EPT and AMD NPT; the two
//! differ only in how a single 64-bit entry is encoded, which is what
//! [`EntryFormat`] abstracts. Table memory is reached through [`TableMemory`],
//! so this module needs neither `unsafe` nor knowledge of how the hypervisor
//! maps physical memory.
//!
//! Levels are numbered as in the manuals' walk order: 4 = PML4, 3 = PDPT,
//! 2 = PD, 1 = PT. Leaves live at level 1 (4 KiB), 2 (2 MiB) or 3 (1 GiB).
//!
//! Every mutating operation is all-or-nothing: `unmap` and `protect` validate
//! the whole range and reserve every table a split could need before touching
//! an entry, and `map` rolls back the pages it already installed if it fails.
//! Large pages are split when needed but never merged back.

use core::fmt;
use core::marker::PhantomData;

/// Exclusive upper bound of guest-physical addresses (4-level walk, 48 bits).
pub const GPA_LIMIT: u64 = 1 << 48;
/// Exclusive upper bound of host-physical addresses (architectural MAXPHYADDR limit, 52 bits).
pub const HPA_LIMIT: u64 = 1 << 52;

/// Physical address field, bits 51:12 (Intel SDM Vol. 3 "EPT paging-structure entries"; AMD APM Vol. 2).
pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// EPT read access, bit 0 (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_READ: u64 = 1 << 0;
/// EPT write access, bit 1 (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_WRITE: u64 = 1 << 1;
/// EPT execute access (supervisor execute under MBEC), bit 2 (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_EXECUTE: u64 = 1 << 2;
/// EPT leaf memory type field, bits 5:3 (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_MEMTYPE_MASK: u64 = 7 << 3;
/// EPT leaf memory type write-back (6), bits 5:3 (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_MEMTYPE_WB: u64 = 6 << 3;
/// EPT ignore-PAT, bit 6; left clear so guest PAT still applies (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_IGNORE_PAT: u64 = 1 << 6;
/// EPT large page (2 MiB / 1 GiB leaf), bit 7 (Intel SDM Vol. 3, "EPT paging-structure entries").
pub const EPT_LARGE: u64 = 1 << 7;

/// NPT present, bit 0 (AMD APM Vol. 2, "Nested paging" / long-mode page-table entries).
pub const NPT_PRESENT: u64 = 1 << 0;
/// NPT writable, bit 1 (AMD APM Vol. 2, "Nested paging" / long-mode page-table entries).
pub const NPT_WRITABLE: u64 = 1 << 1;
/// NPT user, bit 2; needed at every level, guest accesses count as user (AMD APM Vol. 2, "Nested paging").
pub const NPT_USER: u64 = 1 << 2;
/// NPT page size (2 MiB / 1 GiB leaf), bit 7 (AMD APM Vol. 2, "Nested paging" / long-mode page-table entries).
pub const NPT_LARGE: u64 = 1 << 7;
/// NPT no-execute, bit 63; reserved unless the host runs with EFER.NXE (AMD APM Vol. 2, "Nested paging").
pub const NPT_NO_EXECUTE: u64 = 1 << 63;

const PAGE_4K: u64 = 4096;
const ENTRIES: usize = 512;
const ROOT_LEVEL: u8 = 4;

/// Bytes covered by one entry of a table at `level`.
const fn span(level: u8) -> u64 {
    1 << (12 + 9 * (level as u32 - 1))
}

/// Address of a leaf at `level`, without the low bits that large pages reuse (e.g. NPT PAT bit 12).
const fn leaf_addr(raw: u64, level: u8) -> u64 {
    raw & ADDR_MASK & !(span(level) - 1)
}

/// Access rights of a mapping as seen by the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    /// Guest may read.
    pub read: bool,
    /// Guest may write.
    pub write: bool,
    /// Guest may execute.
    pub execute: bool,
}

impl Perms {
    /// Read, write and execute.
    pub const RWX: Perms = Perms { read: true, write: true, execute: true };
    /// Read and write.
    pub const RW: Perms = Perms { read: true, write: true, execute: false };
    /// Read and execute.
    pub const RX: Perms = Perms { read: true, write: false, execute: true };
    /// Read only.
    pub const R: Perms = Perms { read: true, write: false, execute: false };
}

/// Size of a leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB page, leaf at level 1.
    Size4K,
    /// 2 MiB page, leaf at level 2.
    Size2M,
    /// 1 GiB page, leaf at level 3.
    Size1G,
}

impl PageSize {
    /// Size of the page in bytes.
    pub const fn bytes(self) -> u64 {
        span(self.level())
    }

    /// Table level holding a leaf of this size (1 = PT, 2 = PD, 3 = PDPT).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// Page size of a leaf found at `level`; `None` if no leaf can live there.
    pub const fn from_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

/// Result of a successful guest-physical lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Host-physical address of the looked-up byte (offset inside the page included).
    pub hpa: u64,
    /// Permissions of the containing page.
    pub perms: Perms,
    /// Size of the containing page.
    pub page: PageSize,
}

/// Why a table operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// An address or length is not a multiple of 4 KiB.
    Unaligned,
    /// The length is zero.
    ZeroLength,
    /// The range exceeds the 48-bit guest or 52-bit host address space, or overflows.
    OutOfRange,
    /// Part of the range is already mapped, starting at `gpa`.
    Overlap {
        /// First already-mapped guest-physical address found.
        gpa: u64,
    },
    /// The table allocator ran out of memory.
    OutOfTableMemory,
    /// The entry format cannot express the requested permissions.
    UnsupportedPermissions,
    /// Part of the range is not mapped, starting at `gpa`.
    NotMapped {
        /// First unmapped guest-physical address found.
        gpa: u64,
    },
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::Unaligned => f.write_str("address or length is not 4 KiB aligned"),
            MapError::ZeroLength => f.write_str("length is zero"),
            MapError::OutOfRange => {
                f.write_str("range exceeds the guest (48-bit) or host (52-bit) physical address space")
            }
            MapError::Overlap { gpa } => write!(f, "guest-physical {gpa:#x} is already mapped"),
            MapError::OutOfTableMemory => f.write_str("out of memory for page tables"),
            MapError::UnsupportedPermissions => {
                f.write_str("permissions cannot be expressed by this page-table format")
            }
            MapError::NotMapped { gpa } => write!(f, "guest-physical {gpa:#x} is not mapped"),
        }
    }
}

impl core::error::Error for MapError {}

/// A decoded table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not present: the guest faults (EPT violation / nested page fault).
    Absent,
    /// Points to the next-level table at this host-physical address.
    Table(u64),
    /// Maps a page starting at host-physical `addr`.
    Leaf {
        /// Host-physical base of the page.
        addr: u64,
        /// Access rights of the page.
        perms: Perms,
    },
}

/// Encoding of second-level paging-structure entries.
pub trait EntryFormat {
    /// Encodes a non-leaf entry pointing to the table at host-physical `table`.
    fn table(table: u64) -> u64;
    /// Encodes a leaf mapping `hpa` as a page of `size` (level 1, 2 or 3) with `perms`.
    fn leaf(size: PageSize, hpa: u64, perms: Perms) -> Result<u64, MapError>;
    /// Decodes an entry read from a table at `level` (1 = PT ... 4 = PML4).
    fn decode(raw: u64, level: u8) -> Decoded;
}

/// Checks what every leaf encoder needs: an aligned, in-range host address.
fn check_leaf_addr(size: PageSize, hpa: u64) -> Result<(), MapError> {
    if !hpa.is_multiple_of(size.bytes()) {
        return Err(MapError::Unaligned);
    }
    if hpa >= HPA_LIMIT {
        return Err(MapError::OutOfRange);
    }
    Ok(())
}

/// Whether a non-leaf entry at `level` with its large-page bit set is a leaf.
const fn is_leaf(level: u8, large: bool) -> bool {
    // Bit 7 is PAT/ignored in 4 KiB entries and reserved in the PML4.
    level == 1 || (large && level <= 3)
}

/// Intel EPT entry format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ept;

impl EntryFormat for Ept {
    fn table(table: u64) -> u64 {
        // Non-leaf rights are ANDed with the leaf's, so grant everything here.
        (table & ADDR_MASK) | EPT_READ | EPT_WRITE | EPT_EXECUTE
    }

    /// Execute-only leaves are accepted; the caller must check the CPU supports them.
    fn leaf(size: PageSize, hpa: u64, perms: Perms) -> Result<u64, MapError> {
        // Without read, only execute-only is valid: no rights would mean "not
        // present" and write without read is an EPT misconfiguration.
        if !perms.read && (perms.write || !perms.execute) {
            return Err(MapError::UnsupportedPermissions);
        }
        check_leaf_addr(size, hpa)?;
        let mut raw = hpa | EPT_MEMTYPE_WB;
        if perms.read {
            raw |= EPT_READ;
        }
        if perms.write {
            raw |= EPT_WRITE;
        }
        if perms.execute {
            raw |= EPT_EXECUTE;
        }
        if size != PageSize::Size4K {
            raw |= EPT_LARGE;
        }
        Ok(raw)
    }

    fn decode(raw: u64, level: u8) -> Decoded {
        if raw & (EPT_READ | EPT_WRITE | EPT_EXECUTE) == 0 {
            Decoded::Absent
        } else if is_leaf(level, raw & EPT_LARGE != 0) {
            Decoded::Leaf {
                addr: leaf_addr(raw, level),
                perms: Perms {
                    read: raw & EPT_READ != 0,
                    write: raw & EPT_WRITE != 0,
                    execute: raw & EPT_EXECUTE != 0,
                },
            }
        } else {
            Decoded::Table(raw & ADDR_MASK)
        }
    }
}

/// AMD NPT entry format (ordinary long-mode page-table entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Npt;

impl EntryFormat for Npt {
    fn table(table: u64) -> u64 {
        (table & ADDR_MASK) | NPT_PRESENT | NPT_WRITABLE | NPT_USER
    }

    /// Every present NPT page is readable, so non-readable rights are refused.
    fn leaf(size: PageSize, hpa: u64, perms: Perms) -> Result<u64, MapError> {
        if !perms.read {
            return Err(MapError::UnsupportedPermissions);
        }
        check_leaf_addr(size, hpa)?;
        let mut raw = hpa | NPT_PRESENT | NPT_USER;
        if perms.write {
            raw |= NPT_WRITABLE;
        }
        if !perms.execute {
            raw |= NPT_NO_EXECUTE;
        }
        if size != PageSize::Size4K {
            raw |= NPT_LARGE;
        }
        Ok(raw)
    }

    fn decode(raw: u64, level: u8) -> Decoded {
        if raw & NPT_PRESENT == 0 {
            Decoded::Absent
        } else if is_leaf(level, raw & NPT_LARGE != 0) {
            Decoded::Leaf {
                addr: leaf_addr(raw, level),
                perms: Perms { read: true, write: raw & NPT_WRITABLE != 0, execute: raw & NPT_NO_EXECUTE == 0 },
            }
        } else {
            Decoded::Table(raw & ADDR_MASK)
        }
    }
}

/// Source of page-table memory, addressed by host-physical address.
pub trait TableMemory {
    /// Returns the host-physical address of a zeroed, 4 KiB-aligned 4 KiB table.
    fn alloc_table(&mut self) -> Option<u64>;
    /// Returns a table obtained from `alloc_table`.
    fn free_table(&mut self, phys: u64);
    /// Reads the table at host-physical `phys`.
    fn table(&self, phys: u64) -> &[u64; 512];
    /// Writes the table at host-physical `phys`.
    fn table_mut(&mut self, phys: u64) -> &mut [u64; 512];
}

/// A table within a walk: where it is, its level and the first GPA it covers.
#[derive(Clone, Copy)]
struct Node {
    phys: u64,
    level: u8,
    base: u64,
}

impl Node {
    /// Entries of this table overlapping `[start, end)`, as
    /// `(index, entry base, clipped start, clipped end)`.
    fn slots(self, start: u64, end: u64) -> impl Iterator<Item = (usize, u64, u64, u64)> {
        let size = span(self.level);
        let first = ((start - self.base) / size) as usize;
        let last = ((end - 1 - self.base) / size) as usize;
        (first..=last).map(move |idx| {
            let entry_base = self.base + idx as u64 * size;
            (idx, entry_base, start.max(entry_base), end.min(entry_base + size))
        })
    }

    fn child(self, phys: u64, entry_base: u64) -> Node {
        Node { phys, level: self.level - 1, base: entry_base }
    }
}

/// What a range walk looks for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seek {
    Mapped,
    Unmapped,
}

/// What a range walk does to the leaves it covers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Clear,
    Protect(Perms),
}

/// Splitting at both edges of a range needs at most two tables per edge (1 GiB -> 2 MiB -> 4 KiB).
const MAX_SPLIT_TABLES: usize = 4;

/// Tables allocated before a change so that splitting large pages cannot fail halfway.
#[derive(Default)]
struct Reserve {
    frames: [u64; MAX_SPLIT_TABLES],
    len: usize,
}

impl Reserve {
    fn fill<M: TableMemory + ?Sized>(mem: &mut M, count: usize) -> Result<Reserve, MapError> {
        let mut reserve = Reserve::default();
        while reserve.len < count {
            let Some(frame) = mem.alloc_table() else {
                reserve.release(mem);
                return Err(MapError::OutOfTableMemory);
            };
            reserve.frames[reserve.len] = frame;
            reserve.len += 1;
        }
        Ok(reserve)
    }

    fn take(&mut self) -> Option<u64> {
        self.len = self.len.checked_sub(1)?;
        Some(self.frames[self.len])
    }

    fn release<M: TableMemory + ?Sized>(mut self, mem: &mut M) {
        while let Some(frame) = self.take() {
            mem.free_table(frame);
        }
    }
}

/// Validates a 4 KiB-granular range below `limit` and returns its exclusive end.
fn check_range(addr: u64, len: u64, limit: u64) -> Result<u64, MapError> {
    if len == 0 {
        return Err(MapError::ZeroLength);
    }
    if !addr.is_multiple_of(PAGE_4K) || !len.is_multiple_of(PAGE_4K) {
        return Err(MapError::Unaligned);
    }
    addr.checked_add(len).filter(|&end| end <= limit).ok_or(MapError::OutOfRange)
}

/// A four-level second-level page-table hierarchy in format `F`.
///
/// Dropping it without calling [`destroy`](Self::destroy) leaks its tables.
pub struct SecondLevelTables<F: EntryFormat> {
    root: u64,
    max_page: PageSize,
    tables: usize,
    format: PhantomData<F>,
}

impl<F: EntryFormat> SecondLevelTables<F> {
    /// Creates an empty hierarchy; `max_page` is the largest leaf the hardware supports.
    pub fn new<M: TableMemory + ?Sized>(mem: &mut M, max_page: PageSize) -> Result<Self, MapError> {
        let root = mem.alloc_table().ok_or(MapError::OutOfTableMemory)?;
        Ok(Self { root, max_page, tables: 1, format: PhantomData })
    }

    /// Host-physical address of the PML4, for the EPTP or nCR3.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Largest page size this hierarchy will create.
    pub fn max_page(&self) -> PageSize {
        self.max_page
    }

    /// Number of tables currently in use, root included.
    pub fn table_count(&self) -> usize {
        self.tables
    }

    /// Maps `[gpa, gpa + len)` to `[hpa, hpa + len)` with the largest pages alignment allows.
    ///
    /// Fails without changing anything if any part of the range is already mapped;
    /// on running out of table memory, the pages mapped so far are removed again.
    pub fn map<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: Perms,
    ) -> Result<(), MapError> {
        let end = check_range(gpa, len, GPA_LIMIT)?;
        check_range(hpa, len, HPA_LIMIT)?;
        F::leaf(PageSize::Size4K, 0, perms)?;
        if let Some(at) = self.seek(mem, Seek::Mapped, gpa, end) {
            return Err(MapError::Overlap { gpa: at });
        }

        let mut offset = 0;
        while offset < len {
            let size = self.pick_size(gpa + offset, hpa + offset, len - offset);
            if let Err(err) = self.map_page(mem, gpa + offset, hpa + offset, size, perms) {
                // Clearing through the failed page also frees tables allocated
                // for it; the range held only our own aligned pages, so no
                // split (and thus no allocation) can be needed.
                let undone = self.walk(mem, &mut Reserve::default(), Op::Clear, gpa, gpa + offset + size.bytes());
                debug_assert!(undone.is_ok());
                return Err(err);
            }
            offset += size.bytes();
        }
        Ok(())
    }

    /// Removes every mapping in `[gpa, gpa + len)`, splitting large pages that straddle the edges.
    ///
    /// The whole range must be mapped; otherwise `NotMapped` is returned and
    /// nothing changes. Tables left empty are returned to `mem`.
    pub fn unmap<M: TableMemory + ?Sized>(&mut self, mem: &mut M, gpa: u64, len: u64) -> Result<(), MapError> {
        let end = check_range(gpa, len, GPA_LIMIT)?;
        if let Some(hole) = self.seek(mem, Seek::Unmapped, gpa, end) {
            return Err(MapError::NotMapped { gpa: hole });
        }
        self.modify(mem, Op::Clear, gpa, end)
    }

    /// Changes the permissions of the already mapped `[gpa, gpa + len)`, splitting edge pages as needed.
    ///
    /// Like `unmap`, it changes nothing unless the whole range is mapped.
    pub fn protect<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        len: u64,
        perms: Perms,
    ) -> Result<(), MapError> {
        let end = check_range(gpa, len, GPA_LIMIT)?;
        F::leaf(PageSize::Size4K, 0, perms)?;
        if let Some(hole) = self.seek(mem, Seek::Unmapped, gpa, end) {
            return Err(MapError::NotMapped { gpa: hole });
        }
        self.modify(mem, Op::Protect(perms), gpa, end)
    }

    /// Translates one guest-physical byte address, offset inside large pages included.
    pub fn translate<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<Translation> {
        let (level, addr, perms) = self.leaf_at(mem, gpa)?;
        let page = PageSize::from_level(level)?;
        Some(Translation { hpa: addr + (gpa & (page.bytes() - 1)), perms, page })
    }

    /// Frees every table, root included.
    pub fn destroy<M: TableMemory + ?Sized>(self, mem: &mut M) {
        Self::free_tree(mem, self.root, ROOT_LEVEL);
    }

    fn root_node(&self) -> Node {
        Node { phys: self.root, level: ROOT_LEVEL, base: 0 }
    }

    fn free_tree<M: TableMemory + ?Sized>(mem: &mut M, phys: u64, level: u8) {
        for idx in 0..ENTRIES {
            if let Decoded::Table(child) = F::decode(mem.table(phys)[idx], level) {
                Self::free_tree(mem, child, level - 1);
            }
        }
        mem.free_table(phys);
    }

    /// Largest page allowed by `max_page`, the alignment of both addresses and the remaining length.
    fn pick_size(&self, gpa: u64, hpa: u64, remaining: u64) -> PageSize {
        [PageSize::Size1G, PageSize::Size2M]
            .into_iter()
            .find(|size| {
                let bytes = size.bytes();
                bytes <= self.max_page.bytes() && (gpa | hpa).is_multiple_of(bytes) && remaining >= bytes
            })
            .unwrap_or(PageSize::Size4K)
    }

    /// Installs one leaf, creating intermediate tables on the way.
    fn map_page<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        perms: Perms,
    ) -> Result<(), MapError> {
        let mut node = self.root_node();
        while node.level > size.level() {
            let idx = (gpa / span(node.level)) as usize % ENTRIES;
            let next = match F::decode(mem.table(node.phys)[idx], node.level) {
                Decoded::Table(next) => next,
                Decoded::Leaf { .. } => return Err(MapError::Overlap { gpa }),
                Decoded::Absent => {
                    let next = mem.alloc_table().ok_or(MapError::OutOfTableMemory)?;
                    self.tables += 1;
                    mem.table_mut(node.phys)[idx] = F::table(next);
                    next
                }
            };
            node = node.child(next, gpa & !(span(node.level) - 1));
        }
        let idx = (gpa / span(node.level)) as usize % ENTRIES;
        if F::decode(mem.table(node.phys)[idx], node.level) != Decoded::Absent {
            return Err(MapError::Overlap { gpa });
        }
        mem.table_mut(node.phys)[idx] = F::leaf(size, hpa, perms)?;
        Ok(())
    }

    /// Leaf covering `gpa` as `(level, page base hpa, perms)`.
    fn leaf_at<M: TableMemory + ?Sized>(&self, mem: &M, gpa: u64) -> Option<(u8, u64, Perms)> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut phys = self.root;
        for level in (1..=ROOT_LEVEL).rev() {
            let idx = (gpa / span(level)) as usize % ENTRIES;
            match F::decode(mem.table(phys)[idx], level) {
                Decoded::Absent => return None,
                Decoded::Leaf { addr, perms } => return Some((level, addr, perms)),
                Decoded::Table(next) => phys = next,
            }
        }
        None
    }

    /// First address in `[start, end)` that is mapped (or unmapped, per `want`).
    fn seek<M: TableMemory + ?Sized>(&self, mem: &M, want: Seek, start: u64, end: u64) -> Option<u64> {
        Self::seek_in(mem, want, self.root_node(), start, end)
    }

    fn seek_in<M: TableMemory + ?Sized>(mem: &M, want: Seek, node: Node, start: u64, end: u64) -> Option<u64> {
        for (idx, entry_base, lo, hi) in node.slots(start, end) {
            match F::decode(mem.table(node.phys)[idx], node.level) {
                Decoded::Absent if want == Seek::Unmapped => return Some(lo),
                Decoded::Leaf { .. } if want == Seek::Mapped => return Some(lo),
                Decoded::Table(child) => {
                    let found = Self::seek_in(mem, want, node.child(child, entry_base), lo, hi);
                    if found.is_some() {
                        return found;
                    }
                }
                Decoded::Absent | Decoded::Leaf { .. } => {}
            }
        }
        None
    }

    /// Applies `op` to a fully mapped range with tables for all splits reserved up front.
    fn modify<M: TableMemory + ?Sized>(&mut self, mem: &mut M, op: Op, start: u64, end: u64) -> Result<(), MapError> {
        let mut reserve = Reserve::fill(mem, self.split_tables_needed(mem, start, end))?;
        let result = self.walk(mem, &mut reserve, op, start, end);
        reserve.release(mem);
        result
    }

    /// Exact number of tables splitting large pages at the range edges will allocate.
    fn split_tables_needed<M: TableMemory + ?Sized>(&self, mem: &M, start: u64, end: u64) -> usize {
        // Identify each new table by (level of the split leaf, its base) so
        // edges falling in the same large page are not counted twice.
        let mut needed = [(0u8, 0u64); MAX_SPLIT_TABLES];
        let mut count = 0;
        for edge in [start, end] {
            let Some((leaf_level, ..)) = self.leaf_at(mem, edge) else {
                continue;
            };
            for level in (2..=leaf_level).rev() {
                if edge.is_multiple_of(span(level)) {
                    break;
                }
                let key = (level, edge & !(span(level) - 1));
                if !needed[..count].contains(&key) {
                    needed[count] = key;
                    count += 1;
                }
            }
        }
        count
    }

    /// Applies `op` to every leaf in `[start, end)`, splitting partly covered leaves and freeing emptied tables.
    fn walk<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        reserve: &mut Reserve,
        op: Op,
        start: u64,
        end: u64,
    ) -> Result<(), MapError> {
        let root = self.root_node();
        self.walk_in(mem, reserve, op, root, start, end)
    }

    fn walk_in<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        reserve: &mut Reserve,
        op: Op,
        node: Node,
        start: u64,
        end: u64,
    ) -> Result<(), MapError> {
        let entry_size = span(node.level);
        for (idx, entry_base, lo, hi) in node.slots(start, end) {
            let child = match F::decode(mem.table(node.phys)[idx], node.level) {
                Decoded::Absent => continue,
                Decoded::Leaf { addr, .. } if lo == entry_base && hi == entry_base + entry_size => {
                    mem.table_mut(node.phys)[idx] = match op {
                        Op::Clear => 0,
                        Op::Protect(perms) => F::leaf(Self::leaf_size(node.level), addr, perms)?,
                    };
                    continue;
                }
                Decoded::Leaf { addr, perms } => {
                    let table = self.split(mem, reserve, node.level, addr, perms)?;
                    mem.table_mut(node.phys)[idx] = F::table(table);
                    table
                }
                Decoded::Table(table) => table,
            };
            let child = node.child(child, entry_base);
            self.walk_in(mem, reserve, op, child, lo, hi)?;
            if op == Op::Clear && Self::is_empty(mem, child) {
                mem.table_mut(node.phys)[idx] = 0;
                mem.free_table(child.phys);
                self.tables -= 1;
            }
        }
        Ok(())
    }

    /// Replaces a large leaf by a table of 512 smaller leaves mapping the same memory.
    fn split<M: TableMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        reserve: &mut Reserve,
        level: u8,
        addr: u64,
        perms: Perms,
    ) -> Result<u64, MapError> {
        let small = Self::leaf_size(level - 1);
        let first = F::leaf(small, addr, perms)?;
        let table = reserve.take().ok_or(MapError::OutOfTableMemory)?;
        // The address field is a plain bit range, so the pieces differ only there.
        for (i, entry) in mem.table_mut(table).iter_mut().enumerate() {
            *entry = first + i as u64 * small.bytes();
        }
        self.tables += 1;
        Ok(table)
    }

    fn leaf_size(level: u8) -> PageSize {
        PageSize::from_level(level).unwrap_or(PageSize::Size4K)
    }

    fn is_empty<M: TableMemory + ?Sized>(mem: &M, node: Node) -> bool {
        mem.table(node.phys).iter().all(|&raw| F::decode(raw, node.level) == Decoded::Absent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::boxed::Box;
    use alloc::string::ToString;
    use alloc::vec::Vec;

    const FAKE_BASE: u64 = 0x1000_0000;
    const K4: u64 = 0x1000;
    const M2: u64 = 0x20_0000;
    const G1: u64 = 0x4000_0000;

    /// Tables in boxed slots at fake physical addresses, with an optional cap on live tables.
    struct FakeMem {
        slots: Vec<Option<Box<[u64; 512]>>>,
        live: usize,
        limit: usize,
    }

    impl FakeMem {
        fn new() -> Self {
            Self::with_limit(usize::MAX)
        }

        fn with_limit(limit: usize) -> Self {
            FakeMem { slots: Vec::new(), live: 0, limit }
        }

        fn slot(phys: u64) -> usize {
            assert!(phys.is_multiple_of(K4), "unaligned table address {phys:#x}");
            ((phys - FAKE_BASE) / K4) as usize
        }
    }

    impl TableMemory for FakeMem {
        fn alloc_table(&mut self) -> Option<u64> {
            if self.live >= self.limit {
                return None;
            }
            let idx = match self.slots.iter().position(Option::is_none) {
                Some(idx) => idx,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            self.slots[idx] = Some(Box::new([0; 512]));
            self.live += 1;
            Some(FAKE_BASE + idx as u64 * K4)
        }

        fn free_table(&mut self, phys: u64) {
            let slot = Self::slot(phys);
            assert!(self.slots[slot].take().is_some(), "double free of {phys:#x}");
            self.live -= 1;
        }

        fn table(&self, phys: u64) -> &[u64; 512] {
            self.slots[Self::slot(phys)].as_deref().expect("use of a freed table")
        }

        fn table_mut(&mut self, phys: u64) -> &mut [u64; 512] {
            self.slots[Self::slot(phys)].as_deref_mut().expect("use of a freed table")
        }
    }

    /// Runs a generic test body once per entry format.
    macro_rules! both_formats {
        ($($name:ident),* $(,)?) => {
            $(
                mod $name {
                    #[test]
                    fn ept() {
                        super::$name::<super::Ept>();
                    }
                    #[test]
                    fn npt() {
                        super::$name::<super::Npt>();
                    }
                }
            )*
        };
    }

    both_formats!(
        leaf_levels,
        range_uses_largest_pages,
        range_with_misaligned_hpa_uses_4k,
        max_page_is_honoured,
        translate_exact_inside_pages,
        overlap_refused_without_change,
        rollback_on_out_of_table_memory,
        unmap_4k_from_middle_of_1g,
        empty_tables_freed,
        unmap_not_mapped_changes_nothing,
        unmap_split_out_of_memory_changes_nothing,
        protect_splits_edges,
        argument_errors,
        destroy_frees_everything,
    );

    fn setup<F: EntryFormat>(max_page: PageSize) -> (FakeMem, SecondLevelTables<F>) {
        let mut mem = FakeMem::new();
        let tables = SecondLevelTables::<F>::new(&mut mem, max_page).unwrap();
        (mem, tables)
    }

    /// Raw entries visited from the PML4 down to the leaf for `gpa`.
    fn path<F: EntryFormat>(tables: &SecondLevelTables<F>, mem: &FakeMem, gpa: u64) -> Vec<u64> {
        let mut raw_path = Vec::new();
        let mut phys = tables.root();
        for level in (1..=4u8).rev() {
            let raw = mem.table(phys)[(gpa / span(level)) as usize % 512];
            raw_path.push(raw);
            match F::decode(raw, level) {
                Decoded::Table(next) => phys = next,
                _ => break,
            }
        }
        raw_path
    }

    fn leaf_levels<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, 0x1000, 0x5000, K4, Perms::RWX).unwrap();
        t.map(&mut mem, 0x40_0000, 0x80_0000, M2, Perms::RW).unwrap();
        t.map(&mut mem, G1, 3 * G1, G1, Perms::RX).unwrap();
        assert_eq!(path(&t, &mem, 0x1000).len(), 4);
        assert_eq!(path(&t, &mem, 0x40_0000).len(), 3);
        assert_eq!(path(&t, &mem, G1).len(), 2);
        // root, PDPT, PD, PT
        assert_eq!(t.table_count(), 4);
        assert_eq!(mem.live, 4);
    }

    #[test]
    fn ept_entry_bits() {
        let (mut mem, mut t) = setup::<Ept>(PageSize::Size1G);
        t.map(&mut mem, 0x1000, 0x5000, K4, Perms::RWX).unwrap();
        t.map(&mut mem, 0x40_0000, 0x80_0000, M2, Perms::RW).unwrap();
        t.map(&mut mem, G1, 3 * G1, G1, Perms::RX).unwrap();
        t.map(&mut mem, 0x2000, 0x6000, K4, Perms::R).unwrap();

        let p4k = path(&t, &mem, 0x1000);
        for &table_entry in &p4k[..3] {
            assert_eq!(table_entry & 0xFFF, 0b111, "non-leaf must be RWX only: {table_entry:#x}");
            assert_eq!(table_entry & 0xFFF0_0000_0000_0000, 0);
        }
        assert_eq!(p4k[3], 0x5000 | 6 << 3 | 0b111);
        assert_eq!(path(&t, &mem, 0x2000)[3], 0x6000 | 6 << 3 | 0b001);
        assert_eq!(path(&t, &mem, 0x40_0000)[2], 0x80_0000 | 1 << 7 | 6 << 3 | 0b011);
        assert_eq!(path(&t, &mem, G1)[1], (3 * G1) | 1 << 7 | 6 << 3 | 0b101);
    }

    #[test]
    fn npt_entry_bits() {
        let (mut mem, mut t) = setup::<Npt>(PageSize::Size1G);
        t.map(&mut mem, 0x1000, 0x5000, K4, Perms::RW).unwrap();
        t.map(&mut mem, 0x40_0000, 0x80_0000, M2, Perms::RX).unwrap();
        t.map(&mut mem, G1, 3 * G1, G1, Perms::RWX).unwrap();
        t.map(&mut mem, 0x2000, 0x6000, K4, Perms::R).unwrap();

        let p4k = path(&t, &mem, 0x1000);
        for &table_entry in &p4k[..3] {
            assert_eq!(table_entry & 0xFFF, 0b111, "non-leaf must be P|W|U: {table_entry:#x}");
            assert_eq!(table_entry & 1 << 63, 0, "non-leaf must not be NX");
        }
        assert_eq!(p4k[3], 0x5000 | 1 << 63 | 0b111);
        assert_eq!(path(&t, &mem, 0x2000)[3], 0x6000 | 1 << 63 | 0b101);
        assert_eq!(path(&t, &mem, 0x40_0000)[2], 0x80_0000 | 1 << 7 | 0b101);
        assert_eq!(path(&t, &mem, G1)[1], (3 * G1) | 1 << 7 | 0b111);
        for gpa in [0x1000, 0x2000, 0x40_0000, G1] {
            for raw in path(&t, &mem, gpa) {
                assert_ne!(raw & 0b100, 0, "user bit missing at some level for {gpa:#x}");
            }
        }
    }

    const RANGE_START: u64 = 0x3FE0_0000;
    const RANGE_END: u64 = 0x8020_1000;

    /// Expected page size at sample points of RANGE_START..RANGE_END with fully aligned hpa.
    fn expect_sizes<F: EntryFormat>(t: &SecondLevelTables<F>, mem: &FakeMem, delta: u64, cases: &[(u64, PageSize)]) {
        for &(gpa, page) in cases {
            let tr = t.translate(mem, gpa).unwrap_or_else(|| panic!("{gpa:#x} unmapped"));
            assert_eq!(tr, Translation { hpa: gpa + delta, perms: Perms::RW, page }, "at {gpa:#x}");
        }
        assert_eq!(t.translate(mem, RANGE_START - K4), None);
        assert_eq!(t.translate(mem, RANGE_END), None);
    }

    fn range_uses_largest_pages<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        let delta = 0x1_0000_0000;
        t.map(&mut mem, RANGE_START, RANGE_START + delta, RANGE_END - RANGE_START, Perms::RW).unwrap();
        use PageSize::*;
        let cases = [
            (RANGE_START, Size2M),
            (0x3FFF_F000, Size2M),
            (G1, Size1G),
            (0x7FFF_F000, Size1G),
            (0x8000_0000, Size2M),
            (0x801F_F000, Size2M),
            (0x8020_0000, Size4K),
        ];
        expect_sizes(&t, &mem, delta, &cases);
        // root, PDPT, PD for 0..1G, PD for 2G..3G, PT for the last 4 KiB page
        assert_eq!(t.table_count(), 5);
        assert_eq!(mem.live, 5);
    }

    fn range_with_misaligned_hpa_uses_4k<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        let delta = 0x1000_1000;
        t.map(&mut mem, RANGE_START, RANGE_START + delta, RANGE_END - RANGE_START, Perms::RW).unwrap();
        use PageSize::*;
        let cases =
            [(RANGE_START, Size4K), (G1, Size4K), (0x6000_0000, Size4K), (0x8000_0000, Size4K), (0x8020_0000, Size4K)];
        expect_sizes(&t, &mem, delta, &cases);
        // root + PDPT + 3 PDs + 1 PT below 1G + 512 PTs for the middle GiB + 2 PTs above 2G
        assert_eq!(t.table_count(), 520);
        assert_eq!(mem.live, 520);
    }

    fn max_page_is_honoured<F: EntryFormat>() {
        use PageSize::*;
        let delta = 0x1_0000_0000;
        let (mut mem, mut t) = setup::<F>(Size2M);
        t.map(&mut mem, RANGE_START, RANGE_START + delta, RANGE_END - RANGE_START, Perms::RW).unwrap();
        expect_sizes(
            &t,
            &mem,
            delta,
            &[(RANGE_START, Size2M), (G1, Size2M), (0x7FE0_0000, Size2M), (0x8020_0000, Size4K)],
        );

        let (mut mem, mut t) = setup::<F>(Size4K);
        t.map(&mut mem, G1, G1, 2 * M2, Perms::RW).unwrap();
        assert_eq!(t.translate(&mem, G1 + M2).unwrap().page, Size4K);
        assert_eq!(t.table_count(), 1 + 1 + 1 + 2);
    }

    fn translate_exact_inside_pages<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        let pages = [
            (0x7000, 0x1234_5000, PageSize::Size4K),
            (0x60_0000, 0xA0_0000, PageSize::Size2M),
            (4 * G1, 7 * G1, PageSize::Size1G),
        ];
        for (gpa, hpa, page) in pages {
            t.map(&mut mem, gpa, hpa, page.bytes(), Perms::RX).unwrap();
        }
        for (gpa, hpa, page) in pages {
            let size = page.bytes();
            for offset in [0, 1, 0x123, 0xFFF, size / 2 + 0x456, size - 8, size - 1] {
                assert_eq!(
                    t.translate(&mem, gpa + offset),
                    Some(Translation { hpa: hpa + offset, perms: Perms::RX, page }),
                    "gpa {gpa:#x} + {offset:#x}"
                );
            }
            assert_eq!(t.translate(&mem, gpa + size), None);
            assert_eq!(t.translate(&mem, gpa - 1), None);
        }
        assert_eq!(t.translate(&mem, GPA_LIMIT), None);
        assert_eq!(t.translate(&mem, u64::MAX), None);
    }

    fn overlap_refused_without_change<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, G1 + M2, 0x4000_0000, M2, Perms::RW).unwrap();
        t.map(&mut mem, 2 * G1, 2 * G1, G1, Perms::RW).unwrap();
        let count = t.table_count();
        let live = mem.live;

        // Starts free below, runs into the 2 MiB page.
        assert_eq!(t.map(&mut mem, G1, 0x9000_0000, M2 + K4, Perms::RW), Err(MapError::Overlap { gpa: G1 + M2 }));
        // Lands inside the 1 GiB page.
        assert_eq!(
            t.map(&mut mem, 2 * G1 + 0x5000, 0x9000_0000, K4, Perms::RW),
            Err(MapError::Overlap { gpa: 2 * G1 + 0x5000 })
        );
        assert_eq!(t.translate(&mem, G1), None);
        assert_eq!(t.translate(&mem, G1 + M2 - K4), None);
        assert_eq!(t.translate(&mem, G1 + M2 + 0x10).unwrap().hpa, 0x4000_0010);
        assert_eq!(t.translate(&mem, 2 * G1 + 0x5000).unwrap().page, PageSize::Size1G);
        assert_eq!(t.table_count(), count);
        assert_eq!(mem.live, live);
    }

    fn rollback_on_out_of_table_memory<F: EntryFormat>() {
        // Room for root, PDPT, PD and one PT: the second 4 KiB page needs a second PT.
        let mut mem = FakeMem::with_limit(4);
        let mut t = SecondLevelTables::<F>::new(&mut mem, PageSize::Size1G).unwrap();
        assert_eq!(t.map(&mut mem, 0x1F_F000, 0x1000, 2 * K4, Perms::RW), Err(MapError::OutOfTableMemory));
        assert_eq!(t.translate(&mem, 0x1F_F000), None);
        assert_eq!(t.table_count(), 1);
        assert_eq!(mem.live, 1);

        // Failing with a half-built path (PDPT allocated, PD not) must free the PDPT.
        mem.limit = 2;
        assert_eq!(t.map(&mut mem, 0, 0, K4, Perms::RW), Err(MapError::OutOfTableMemory));
        assert_eq!(mem.live, 1);
        assert!(mem.table(t.root()).iter().all(|&raw| raw == 0));

        // Earlier mappings survive a later failed call.
        mem.limit = 4;
        t.map(&mut mem, 0, 0, K4, Perms::RW).unwrap();
        assert_eq!(t.map(&mut mem, 0x1F_F000, 0x1000, 2 * K4, Perms::RW), Err(MapError::OutOfTableMemory));
        assert_eq!(t.translate(&mem, 0x10).unwrap().hpa, 0x10);
        assert_eq!(t.translate(&mem, 0x1F_F000), None);
        assert_eq!((t.table_count(), mem.live), (4, 4));
    }

    fn unmap_4k_from_middle_of_1g<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        let (gpa, hpa) = (G1, 6 * G1);
        let hole = gpa + 0x1234_5000;
        t.map(&mut mem, gpa, hpa, G1, Perms::RW).unwrap();
        t.unmap(&mut mem, hole, K4).unwrap();

        assert_eq!(t.translate(&mem, hole), None);
        assert_eq!(t.translate(&mem, hole + K4 - 1), None);
        let mut samples = Vec::new();
        for i in 0..512 {
            samples.push(gpa + i * M2);
            samples.push(gpa + i * M2 + M2 - 1);
        }
        samples.extend([hole - K4, hole - 1, hole + K4, hole + K4 + 0x777, gpa + G1 - 1]);
        for probe in samples {
            let tr = t.translate(&mem, probe).unwrap_or_else(|| panic!("{probe:#x} lost"));
            assert_eq!(tr.hpa, probe - gpa + hpa, "at {probe:#x}");
            assert_eq!(tr.perms, Perms::RW);
            let same_2m = probe & !(M2 - 1) == hole & !(M2 - 1);
            assert_eq!(tr.page, if same_2m { PageSize::Size4K } else { PageSize::Size2M });
        }
        // root, PDPT, new PD, new PT
        assert_eq!((t.table_count(), mem.live), (4, 4));

        // Removing the rest frees every table below the root.
        t.unmap(&mut mem, gpa, hole - gpa).unwrap();
        t.unmap(&mut mem, hole + K4, gpa + G1 - hole - K4).unwrap();
        assert_eq!(t.translate(&mem, gpa + G1 - 1), None);
        assert_eq!((t.table_count(), mem.live), (1, 1));
    }

    fn empty_tables_freed<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, 0x1000, 0x1000, K4, Perms::RW).unwrap();
        t.map(&mut mem, 0x7F_0000_0000, 0x2000, 3 * K4, Perms::RW).unwrap();
        t.map(&mut mem, 0x3000, 0x4000_0000, 2 * M2, Perms::RW).unwrap();
        assert!(t.table_count() > 1);
        t.unmap(&mut mem, 0x7F_0000_0000, 3 * K4).unwrap();
        t.unmap(&mut mem, 0x1000, K4).unwrap();
        assert!(t.table_count() > 1);
        t.unmap(&mut mem, 0x3000, 2 * M2).unwrap();
        assert_eq!((t.table_count(), mem.live), (1, 1));
        assert!(mem.table(t.root()).iter().all(|&raw| raw == 0));
    }

    fn unmap_not_mapped_changes_nothing<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, 0, 0x10_0000, 2 * K4, Perms::RW).unwrap();
        t.map(&mut mem, 2 * G1, 0, G1, Perms::RW).unwrap();
        let count = t.table_count();
        assert_eq!(t.unmap(&mut mem, 0, 3 * K4), Err(MapError::NotMapped { gpa: 0x2000 }));
        assert_eq!(t.unmap(&mut mem, 0x5000, K4), Err(MapError::NotMapped { gpa: 0x5000 }));
        // Would split the 1 GiB page if it were allowed to proceed.
        assert_eq!(t.unmap(&mut mem, 3 * G1 - K4, 2 * K4), Err(MapError::NotMapped { gpa: 3 * G1 }));
        assert_eq!(t.translate(&mem, 0).unwrap().hpa, 0x10_0000);
        assert_eq!(t.translate(&mem, 0x1FFF).unwrap().hpa, 0x10_1FFF);
        assert_eq!(t.translate(&mem, 3 * G1 - K4).unwrap().page, PageSize::Size1G);
        assert_eq!((t.table_count(), mem.live), (count, count));
    }

    fn unmap_split_out_of_memory_changes_nothing<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, G1, 0, G1, Perms::RW).unwrap();
        // Needs a PD and a PT; allow only one of them.
        mem.limit = mem.live + 1;
        assert_eq!(t.unmap(&mut mem, G1 + 0x5000, K4), Err(MapError::OutOfTableMemory));
        assert_eq!(t.protect(&mut mem, G1 + 0x5000, K4, Perms::R), Err(MapError::OutOfTableMemory));
        assert_eq!(
            t.translate(&mem, G1 + 0x5000).unwrap(),
            Translation { hpa: 0x5000, perms: Perms::RW, page: PageSize::Size1G }
        );
        assert_eq!((t.table_count(), mem.live), (2, 2));
        // A 2 MiB-aligned edge needs only the PD.
        t.unmap(&mut mem, G1, M2).unwrap();
        assert_eq!(t.translate(&mem, G1 + M2).unwrap().page, PageSize::Size2M);
        assert_eq!((t.table_count(), mem.live), (3, 3));

        // Both edges of a 4 KiB hole fall in the same new PD and PT: exactly two tables suffice.
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, G1, 0, G1, Perms::RW).unwrap();
        mem.limit = mem.live + 2;
        t.unmap(&mut mem, G1 + 0x5000, K4).unwrap();
        assert_eq!(t.translate(&mem, G1 + 0x5000), None);
        assert_eq!((t.table_count(), mem.live), (4, 4));
    }

    fn protect_splits_edges<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, M2, 0x80_0000, M2, Perms::RWX).unwrap();
        t.protect(&mut mem, M2 + 0x3000, 2 * K4, Perms::R).unwrap();
        let at = |t: &SecondLevelTables<F>, mem: &FakeMem, gpa| t.translate(mem, gpa).unwrap();
        assert_eq!(at(&t, &mem, M2 + 0x3000), Translation { hpa: 0x80_3000, perms: Perms::R, page: PageSize::Size4K });
        assert_eq!(at(&t, &mem, M2 + 0x4FFF), Translation { hpa: 0x80_4FFF, perms: Perms::R, page: PageSize::Size4K });
        assert_eq!(
            at(&t, &mem, M2 + 0x2FFF),
            Translation { hpa: 0x80_2FFF, perms: Perms::RWX, page: PageSize::Size4K }
        );
        assert_eq!(
            at(&t, &mem, M2 + 0x5000),
            Translation { hpa: 0x80_5000, perms: Perms::RWX, page: PageSize::Size4K }
        );
        assert_eq!(at(&t, &mem, 2 * M2 - 1).hpa, 0x9F_FFFF);
        assert_eq!((t.table_count(), mem.live), (4, 4));

        // Whole pages are rewritten in place, no split needed.
        t.map(&mut mem, G1, G1, G1, Perms::RW).unwrap();
        let before = t.table_count();
        t.protect(&mut mem, G1, G1, Perms::RX).unwrap();
        assert_eq!(
            at(&t, &mem, G1 + 0x1234_5678),
            Translation { hpa: G1 + 0x1234_5678, perms: Perms::RX, page: PageSize::Size1G }
        );
        assert_eq!(t.table_count(), before);

        assert_eq!(t.protect(&mut mem, 0, K4, Perms::R), Err(MapError::NotMapped { gpa: 0 }));
        assert_eq!(t.protect(&mut mem, 2 * M2 - K4, 2 * K4, Perms::R), Err(MapError::NotMapped { gpa: 2 * M2 }));
        assert_eq!(at(&t, &mem, 2 * M2 - K4).perms, Perms::RWX);
    }

    #[test]
    fn npt_refuses_unexpressible_perms() {
        let (mut mem, mut t) = setup::<Npt>(PageSize::Size1G);
        let write_only = Perms { read: false, write: true, execute: false };
        let exec_only = Perms { read: false, write: false, execute: true };
        let none = Perms { read: false, write: false, execute: false };
        for perms in [write_only, exec_only, none] {
            assert_eq!(t.map(&mut mem, 0, 0, K4, perms), Err(MapError::UnsupportedPermissions));
        }
        assert_eq!((t.table_count(), mem.live), (1, 1));
        t.map(&mut mem, 0, 0, K4, Perms::RW).unwrap();
        assert_eq!(t.protect(&mut mem, 0, K4, write_only), Err(MapError::UnsupportedPermissions));
        assert_eq!(t.translate(&mem, 0).unwrap().perms, Perms::RW);
    }

    #[test]
    fn ept_permission_rules() {
        let (mut mem, mut t) = setup::<Ept>(PageSize::Size1G);
        let write_only = Perms { read: false, write: true, execute: false };
        let none = Perms { read: false, write: false, execute: false };
        let exec_only = Perms { read: false, write: false, execute: true };
        assert_eq!(t.map(&mut mem, 0, 0, K4, write_only), Err(MapError::UnsupportedPermissions));
        let write_exec = Perms { read: false, write: true, execute: true };
        assert_eq!(t.map(&mut mem, 0, 0, K4, none), Err(MapError::UnsupportedPermissions));
        assert_eq!(t.map(&mut mem, 0, 0, K4, write_exec), Err(MapError::UnsupportedPermissions));
        t.map(&mut mem, 0, 0x9000, K4, exec_only).unwrap();
        assert_eq!(path(&t, &mem, 0)[3], 0x9000 | 6 << 3 | 0b100);
        assert_eq!(t.translate(&mem, 0x10).unwrap().perms, exec_only);
    }

    fn argument_errors<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        let rw = Perms::RW;
        assert_eq!(t.map(&mut mem, 0x800, 0, K4, rw), Err(MapError::Unaligned));
        assert_eq!(t.map(&mut mem, 0, 0x10, K4, rw), Err(MapError::Unaligned));
        assert_eq!(t.map(&mut mem, 0, 0, 0x1800, rw), Err(MapError::Unaligned));
        assert_eq!(t.map(&mut mem, 0, 0, 0, rw), Err(MapError::ZeroLength));
        assert_eq!(t.map(&mut mem, GPA_LIMIT - K4, 0, 2 * K4, rw), Err(MapError::OutOfRange));
        assert_eq!(t.map(&mut mem, GPA_LIMIT, 0, K4, rw), Err(MapError::OutOfRange));
        assert_eq!(t.map(&mut mem, 0, HPA_LIMIT - K4, 2 * K4, rw), Err(MapError::OutOfRange));
        assert_eq!(t.map(&mut mem, !0xFFF, 0, 2 * K4, rw), Err(MapError::OutOfRange));
        assert_eq!(t.map(&mut mem, 0, !0xFFF, 2 * K4, rw), Err(MapError::OutOfRange));
        assert_eq!(t.unmap(&mut mem, 0x10, K4), Err(MapError::Unaligned));
        assert_eq!(t.unmap(&mut mem, 0, 0), Err(MapError::ZeroLength));
        assert_eq!(t.protect(&mut mem, GPA_LIMIT, K4, rw), Err(MapError::OutOfRange));
        assert_eq!((t.table_count(), mem.live), (1, 1));

        // The very top of both address spaces is usable.
        t.map(&mut mem, GPA_LIMIT - K4, HPA_LIMIT - K4, K4, rw).unwrap();
        assert_eq!(t.translate(&mem, GPA_LIMIT - 1).unwrap().hpa, HPA_LIMIT - 1);
        t.unmap(&mut mem, GPA_LIMIT - K4, K4).unwrap();
        assert_eq!((t.table_count(), mem.live), (1, 1));
    }

    fn destroy_frees_everything<F: EntryFormat>() {
        let (mut mem, mut t) = setup::<F>(PageSize::Size1G);
        t.map(&mut mem, RANGE_START, RANGE_START + 0x1000_1000, RANGE_END - RANGE_START, Perms::RW).unwrap();
        assert_eq!(mem.live, 520);
        t.destroy(&mut mem);
        assert_eq!(mem.live, 0);
    }

    #[test]
    fn error_messages() {
        assert_eq!(MapError::Overlap { gpa: 0x2000 }.to_string(), "guest-physical 0x2000 is already mapped");
        assert_eq!(MapError::NotMapped { gpa: 0x3000 }.to_string(), "guest-physical 0x3000 is not mapped");
        assert_eq!(MapError::Unaligned.to_string(), "address or length is not 4 KiB aligned");
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::Size4K.bytes(), 0x1000);
        assert_eq!(PageSize::Size2M.bytes(), 0x20_0000);
        assert_eq!(PageSize::Size1G.bytes(), 0x4000_0000);
    }

    #[test]
    fn npt_large_leaf_ignores_pat_bit() {
        // Bit 12 of a 2 MiB NPT leaf is PAT, not part of the address.
        let raw = 0x60_0000 | 1 << 12 | NPT_LARGE | NPT_PRESENT | NPT_USER;
        assert_eq!(Npt::decode(raw, 2), Decoded::Leaf { addr: 0x60_0000, perms: Perms::RX });
        assert_eq!(Npt::decode(raw, 1), Decoded::Leaf { addr: 0x60_1000, perms: Perms::RX });
    }
}
