//! Physical memory: the frame allocator built from the boot memory map, and the heap.

use bootloader_api::info::{BootInfo, MemoryRegionKind};
use linked_list_allocator::LockedHeap;
use spin::Mutex;
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{
    FrameAllocator as PagingFrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame,
    Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use alloc::sync::Arc;

use crate::devices::virtio::blk::OverlayPool;
use crate::mm::frames::{FrameAllocator, FrameError, PhysRange, FRAME_SIZE};
use crate::mm::second_level::TableMemory;

/// Free ranges and reservations the allocator can track; memory maps have a few dozen entries.
pub type Frames = FrameAllocator<512, 128>;

/// The host's physical frames.
pub static FRAMES: Mutex<Frames> = Mutex::new(Frames::new());

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

const HEAP_BYTES: u64 = 16 << 20;
/// The largest heap: with it, the overlay pool of in-RAM disks.
const MAX_HEAP_BYTES: u64 = 256 << 20;
const MIN_HEAP_BYTES: u64 = 1 << 20;
/// Real-mode IVT, BIOS data and option ROMs live below 1 MiB: never hand it out.
const LOW_MEMORY: PhysRange = PhysRange { start: 0, end: 1 << 20 };
/// The start-up IPI enters real mode below 0xa0000 (the legacy video area starts there); page 0
/// holds the real-mode interrupt table.
const TRAMPOLINE_WINDOW: PhysRange = PhysRange { start: 0x1000, end: 0xa_0000 };
const TRAMPOLINE_PAGES: u64 = super::smp::TRAMPOLINE_PAGES;

/// The lowest `pages` free, contiguous pages inside [`TRAMPOLINE_WINDOW`].
fn low_pages(free: &[PhysRange], pages: u64) -> Option<u64> {
    free.iter().find_map(|range| {
        let start = range.start.max(TRAMPOLINE_WINDOW.start).next_multiple_of(FRAME_SIZE);
        let end = range.end.min(TRAMPOLINE_WINDOW.end);
        (start + pages * FRAME_SIZE <= end).then_some(start)
    })
}

/// Where physical memory is mapped in the hypervisor's address space.
#[derive(Clone, Copy)]
pub struct PhysMap {
    offset: u64,
}

impl PhysMap {
    /// Virtual address of a physical address.
    pub fn virt(&self, phys: u64) -> u64 {
        self.offset + phys
    }

    /// Reads one page-table entry (or any aligned u64) of physical memory.
    fn read_u64(&self, phys: u64) -> u64 {
        // SAFETY: the bootloader maps all physical memory at `offset` (BOOT_CONFIG asks for
        // it), and callers pass 8-byte-aligned addresses from page-table entries.
        unsafe { core::ptr::read_volatile(self.virt(phys) as *const u64) }
    }

    /// Translates a virtual address of the current address space, or `None` if unmapped.
    pub fn translate(&self, virt: u64) -> Option<u64> {
        let mut table = Cr3::read().0.start_address().as_u64();
        for level in (1..=4u32).rev() {
            let index = (virt >> (12 + 9 * (level - 1))) & 0x1ff;
            let entry = self.read_u64(table + index * 8);
            if entry & PRESENT == 0 {
                return None;
            }
            let address = entry & ADDRESS_MASK;
            if level == 1 || (level <= 3 && entry & HUGE != 0) {
                let page_mask = (1u64 << (12 + 9 * (level - 1))) - 1;
                return Some((address & !page_mask) | (virt & page_mask));
            }
            table = address;
        }
        None
    }

    /// Calls `f` with the physical address of every page-table frame of the current address space.
    fn for_each_table(&self, mut f: impl FnMut(u64)) {
        let root = Cr3::read().0.start_address().as_u64();
        f(root);
        self.walk(root, 4, &mut f);
    }

    fn walk(&self, table: u64, level: u32, f: &mut impl FnMut(u64)) {
        if level == 1 {
            return;
        }
        for index in 0..512 {
            let entry = self.read_u64(table + index * 8);
            if entry & PRESENT == 0 || (level <= 3 && entry & HUGE != 0) {
                continue;
            }
            let next = entry & ADDRESS_MASK;
            f(next);
            self.walk(next, level - 1, f);
        }
    }
}

static PHYS_OFFSET: spin::Once<u64> = spin::Once::new();
/// End of the highest region of the memory map: the physical-memory window covers up to here.
static PHYS_LIMIT: spin::Once<u64> = spin::Once::new();
/// Pages below 1 MiB kept for the application processors' start-up code.
static TRAMPOLINE: spin::Once<Option<u64>> = spin::Once::new();

/// Where the AP start-up code and its page tables go (below 1 MiB), if memory::init found room.
pub fn trampoline_area() -> Option<u64> {
    TRAMPOLINE.get().copied().flatten()
}

/// Copies physical memory at `phys` into `buf` (firmware tables); `false` if any of it lies
/// outside the memory map, so a bad pointer in a table cannot fault the host.
pub fn read_phys(phys: u64, buf: &mut [u8]) -> bool {
    let limit = PHYS_LIMIT.get().copied().unwrap_or(0);
    if phys.checked_add(buf.len() as u64).is_none_or(|end| end > limit) {
        return false;
    }
    // SAFETY: the range lies inside the window the bootloader maps (checked above), and
    // firmware tables are plain memory that nothing in the hypervisor writes.
    unsafe { core::ptr::copy_nonoverlapping(phys_map().virt(phys) as *const u8, buf.as_mut_ptr(), buf.len()) };
    true
}

/// The physical-memory mapping (available once [`init`] ran).
pub fn phys_map() -> PhysMap {
    PhysMap { offset: *PHYS_OFFSET.get().expect("memory::init has not run") }
}

/// Bytes of the heap in use.
pub fn heap_used() -> u64 {
    HEAP.lock().used() as u64
}

/// Gives frames back, zeroed first. So a free frame never holds what a VM or the hypervisor
/// left: it is zeroed since its last use, or has not been used since start-up, where [`init`]
/// scrubbed it on bare metal (under a hypervisor it holds zeros, or what the firmware and the
/// boot loader left: under UEFI, OVMF's data). Guest RAM can then be handed out unwritten.
pub fn free_frames(start: u64, frames: u64) -> Result<(), FrameError> {
    FRAMES.lock().allocated(start, frames)?;
    // SAFETY: the frames are allocated (checked just now) and the caller gives them up, so
    // nothing refers to them; they are mapped in the physical-memory window.
    unsafe { core::ptr::write_bytes(phys_map().virt(start) as *mut u8, 0, (frames * FRAME_SIZE) as usize) };
    FRAMES.lock().free(start, frames)
}

/// `frames` contiguous frames aligned to `align` bytes, not written now: they hold nothing a
/// VM or the hypervisor left ([`free_frames`]), though not always zeros. For guest RAM, which
/// is large and which no loader expects to be zeroed.
pub fn alloc_clean(frames: u64, align: u64) -> Option<u64> {
    FRAMES.lock().alloc(frames, align)
}

/// Allocates `frames` zeroed, contiguous frames aligned to `align` bytes; returns the physical
/// address, or `None` when memory is exhausted.
pub fn alloc_zeroed(frames: u64, align: u64) -> Option<u64> {
    let start = FRAMES.lock().alloc(frames, align)?;
    // SAFETY: the frames were just handed to us, so nothing else aliases them, and they are
    // mapped in the physical-memory window.
    unsafe { core::ptr::write_bytes(phys_map().virt(start) as *mut u8, 0, (frames * FRAME_SIZE) as usize) };
    Some(start)
}

/// A mutable view of host-physical memory owned by the caller.
///
/// # Safety
/// The caller owns `[phys, phys + len)` (allocated from [`FRAMES`] and not shared), so no other
/// reference to it exists while the slice lives.
pub unsafe fn phys_slice_mut<'a>(phys: u64, len: usize) -> &'a mut [u8] {
    // SAFETY: forwarded to the caller; the window maps all physical memory.
    unsafe { core::slice::from_raw_parts_mut(phys_map().virt(phys) as *mut u8, len) }
}

/// The first 4 GiB are in the physical-memory window even above the last RAM region: the
/// bootloader maps them for the local APIC, the I/O APIC and PCI BARs.
const WINDOW_MIN: u64 = 1 << 32;

/// End of the physical-memory window the bootloader maps.
fn window_end() -> u64 {
    PHYS_LIMIT.get().copied().unwrap_or(0).max(WINDOW_MIN)
}

/// The physical address of `[virt, virt + len)` if all of it is mapped, to contiguous
/// physical memory (so a device can reach it as one buffer).
pub fn contiguous_phys(virt: u64, len: u64) -> Option<u64> {
    let map = phys_map();
    let end = virt.checked_add(len.max(1))?;
    let start_phys = map.translate(virt)?;
    let mut page = (virt & !(FRAME_SIZE - 1)) + FRAME_SIZE;
    while page < end {
        if map.translate(page)? != start_phys + (page - virt) {
            return None;
        }
        page += FRAME_SIZE;
    }
    Some(start_phys)
}

/// Page-table frames for new mappings, from [`FRAMES`] (the mapper zeroes them).
struct MappingFrames;

// SAFETY: every frame comes from the frame allocator, which hands each out once.
unsafe impl PagingFrameAllocator<Size4KiB> for MappingFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let phys = FRAMES.lock().alloc(1, FRAME_SIZE)?;
        Some(PhysFrame::containing_address(PhysAddr::new(phys)))
    }
}

/// The virtual address of device memory `[phys, phys + len)` (a PCI BAR). Inside the window it
/// is already mapped; above it (firmware may put 64-bit BARs there) its pages are mapped,
/// uncached, where the window would have them. Call it on the boot CPU before the others
/// start, so no other CPU can have walked the tables being extended.
pub fn device_memory(phys: u64, len: u64) -> Result<u64, &'static str> {
    let end = phys.checked_add(len).ok_or("the region wraps around the address space")?;
    let map = phys_map();
    if end <= window_end() {
        return Ok(map.virt(phys));
    }
    let offset = map.virt(0);
    let root = Cr3::read().0.start_address().as_u64();
    // SAFETY: CR3 holds the bootloader's level-4 table, reached through the window; the
    // mapper below is the only code that changes these tables, and only on this CPU.
    let level_4 = unsafe { &mut *(map.virt(root) as *mut PageTable) };
    // SAFETY: all physical memory holding page tables is mapped at `offset`.
    let mut mapper = unsafe { OffsetPageTable::new(level_4, VirtAddr::new(offset)) };
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH
        | PageTableFlags::NO_EXECUTE;
    let first = phys & !(FRAME_SIZE - 1);
    for frame_phys in (first..end).step_by(FRAME_SIZE as usize) {
        let virt = VirtAddr::try_new(offset + frame_phys).map_err(|_| "the address is outside the window's reach")?;
        let page = Page::<Size4KiB>::containing_address(virt);
        let frame = PhysFrame::containing_address(PhysAddr::new(frame_phys));
        match mapper.translate_page(page) {
            Ok(mapped) if mapped == frame => continue,
            Ok(_) => return Err("its window address is already mapped to other memory"),
            Err(_) => {}
        }
        // SAFETY: the page was unmapped and now maps device memory that nothing else maps, so
        // no existing reference changes meaning.
        unsafe { mapper.map_to(page, frame, flags, &mut MappingFrames) }
            .map_err(|_| "no memory for its page tables")?
            .flush();
    }
    Ok(map.virt(phys))
}

/// Second-level page tables live in host frames reached through the physical-memory window.
pub struct HostTables;

impl TableMemory for HostTables {
    fn alloc_table(&mut self) -> Option<u64> {
        alloc_zeroed(1, FRAME_SIZE)
    }

    fn free_table(&mut self, phys: u64) {
        if let Err(e) = free_frames(phys, 1) {
            log::error!("memory: freeing page-table frame {phys:#x}: {e}");
        }
    }

    fn table(&self, phys: u64) -> &[u64; 512] {
        // SAFETY: `phys` is a table frame this allocator handed out (4 KiB, aligned), owned by
        // the page-table builder that asks.
        unsafe { &*(phys_map().virt(phys) as *const [u64; 512]) }
    }

    fn table_mut(&mut self, phys: u64) -> &mut [u64; 512] {
        // SAFETY: as in `table`; the builder holds `&mut self`, so the view is unique.
        unsafe { &mut *(phys_map().virt(phys) as *mut [u64; 512]) }
    }
}

const PRESENT: u64 = 1;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;

/// What memory bring-up found, for the boot log.
pub struct MemorySummary {
    /// Physical-memory mapping.
    pub phys: PhysMap,
    /// Bytes the memory map calls usable.
    pub usable_bytes: u64,
    /// Heap size.
    pub heap_bytes: u64,
}

/// Builds the frame allocator from the memory map, reserving everything the bootloader placed
/// in memory, then carves out the heap.
pub fn init(boot_info: &BootInfo) -> MemorySummary {
    let offset = boot_info
        .physical_memory_offset
        .into_option()
        .expect("the bootloader did not map physical memory (BOOT_CONFIG asks it to)");
    let phys = PhysMap { offset };
    PHYS_OFFSET.call_once(|| offset);
    let mut frames = FRAMES.lock();

    let mut usable_bytes = 0;
    let regions = &boot_info.memory_regions;
    PHYS_LIMIT.call_once(|| regions.iter().map(|r| r.end).max().unwrap_or(0));
    for region in regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable) {
        usable_bytes += region.end - region.start;
        if let Err(e) = frames.add_usable(PhysRange { start: region.start, end: region.end }) {
            log::warn!("memory: usable region {:#x}..{:#x}: {e}", region.start, region.end);
        }
    }

    // The bootloader already marks these regions as not usable; reserving them again (after the
    // usable memory is in, so even an unrecorded reservation is cut out) means a wrong memory
    // map cannot make us hand out our own kernel, page tables or ramdisk.
    let reserve = |frames: &mut Frames, range: PhysRange, what: &str| {
        if let Err(e) = frames.reserve(range) {
            log::warn!("memory: reserving {what} at {:#x}: {e}", range.start);
        }
    };
    reserve(&mut frames, PhysRange::new(boot_info.kernel_addr, boot_info.kernel_len), "kernel image");
    phys.for_each_table(|table| reserve(&mut frames, PhysRange::new(table, FRAME_SIZE), "page table"));
    let boot_info_start = boot_info as *const BootInfo as u64;
    for (virt, len, what) in [
        (boot_info_start, size_of::<BootInfo>() as u64, "boot info"),
        (regions.as_ptr() as u64, size_of_val(&**regions) as u64, "memory map"),
        (boot_info.ramdisk_addr.into_option().unwrap_or(0), boot_info.ramdisk_len, "ramdisk"),
    ] {
        for page in (virt & !(FRAME_SIZE - 1)..virt + len).step_by(FRAME_SIZE as usize) {
            if let Some(frame) = phys.translate(page) {
                reserve(&mut frames, PhysRange::new(frame & !(FRAME_SIZE - 1), FRAME_SIZE), what);
            }
        }
    }

    // Everything the bootloader left is reserved now: what is still free below 1 MiB is free.
    TRAMPOLINE.call_once(|| low_pages(frames.free_ranges(), TRAMPOLINE_PAGES));
    reserve(&mut frames, LOW_MEMORY, "low memory");

    // The heap also holds what guests write to their in-RAM disks (the overlay pool): an
    // eighth of the machine, at least HEAP_BYTES, at most MAX_HEAP_BYTES.
    let mut heap_bytes = (usable_bytes / 8).clamp(HEAP_BYTES, MAX_HEAP_BYTES) & !(FRAME_SIZE - 1);
    let heap_start = loop {
        if let Some(start) = frames.alloc(heap_bytes / FRAME_SIZE, FRAME_SIZE) {
            break start;
        }
        heap_bytes /= 2;
        assert!(heap_bytes >= MIN_HEAP_BYTES, "not even {MIN_HEAP_BYTES} contiguous bytes of RAM for the heap");
    };
    // SAFETY: the range was just taken from the frame allocator, so nothing else uses it, and it
    // is mapped through the physical-memory window for the whole run.
    unsafe { HEAP.lock().init(phys.virt(heap_start) as *mut u8, heap_bytes as usize) };
    if frames.lost_bytes() > 0 {
        log::warn!("memory: {} KiB unusable because the memory map is too fragmented", frames.lost_bytes() / 1024);
    }
    // From here on a free frame holds nothing a VM or the hypervisor left ([`free_frames`]).
    // Under a hypervisor RAM came zeroed, and what firmware and the boot loader left in it is
    // theirs; on bare metal it may still hold a previous system's data, so it is scrubbed once.
    if raw_cpuid::cpuid!(1).ecx & (1 << 31) == 0 {
        for range in frames.free_ranges() {
            // SAFETY: free frames belong to no one, and the window maps them.
            unsafe { core::ptr::write_bytes(phys.virt(range.start) as *mut u8, 0, range.len() as usize) };
        }
        log::info!("memory: scrubbed {} MiB of free memory (bare metal)", frames.free_bytes() >> 20);
    }
    OVERLAY_POOL.call_once(|| Arc::new(OverlayPool::new(heap_bytes.saturating_sub(HEAP_BYTES))));
    MemorySummary { phys, usable_bytes, heap_bytes }
}

/// The heap beyond HEAP_BYTES, shared by every VM's in-RAM disk overlays.
static OVERLAY_POOL: spin::Once<Arc<OverlayPool>> = spin::Once::new();

/// The pool in-RAM disks take their written pages from (empty before [`init`]).
pub fn overlay_pool() -> Arc<OverlayPool> {
    OVERLAY_POOL.get().cloned().unwrap_or_else(|| Arc::new(OverlayPool::new(0)))
}
