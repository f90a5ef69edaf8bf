//! What the `virtio-drivers` crate needs from the platform, shared by the drivers of the
//! machine's own virtio devices (the host disk, the host NIC): DMA frames and address
//! translation ([`FrameHal`]), and a device's modern PCI transport ([`transport`]).

use core::ptr::NonNull;

use virtio_drivers::transport::pci::bus::{Command, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use super::memory;
use super::pci_config::PortAccess;
use crate::mm::frames::FRAME_SIZE;

/// The PCI vendor of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;

/// DMA memory and address translation for `virtio-drivers`: frames from the frame allocator,
/// reached through the physical-memory window; BARs through [`memory::device_memory`].
pub struct FrameHal;

// SAFETY: `dma_alloc` hands out zeroed frames that the frame allocator gives to no one else until
// `dma_dealloc`; `mmio_phys_to_virt` returns the window (or newly mapped) address of the BAR
// region; `share` returns the physical address the buffer's own bytes or its bounce copy are at.
unsafe impl Hal for FrameHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match memory::alloc_zeroed(pages as u64, FRAME_SIZE) {
            Some(phys) => (phys, NonNull::new(memory::phys_map().virt(phys) as *mut u8).unwrap_or(NonNull::dangling())),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        match memory::free_frames(paddr, pages as u64) {
            Ok(()) => 0,
            Err(_) => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        match memory::device_memory(paddr, size as u64) {
            Ok(virt) => NonNull::new(virt as *mut u8).unwrap_or(NonNull::dangling()),
            Err(why) => panic!("virtio device: BAR region {paddr:#x}+{size:#x} cannot be mapped: {why}"),
        }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        let (virt, len) = (buffer.as_ptr() as *mut u8 as u64, buffer.len());
        if let Some(phys) = memory::contiguous_phys(virt, len as u64) {
            return phys;
        }
        // The request header and status live on the caller's stack, which may cross into a
        // frame that is not the next one: give the device a contiguous copy.
        let frames = (len as u64).div_ceil(FRAME_SIZE);
        let phys = memory::alloc_zeroed(frames, FRAME_SIZE).expect("virtio device: no memory for a bounce buffer");
        if direction != BufferDirection::DeviceToDriver {
            // SAFETY: the caller guarantees `buffer` is valid for `len` bytes; the bounce frames
            // were just allocated, so the ranges do not overlap.
            unsafe { core::ptr::copy_nonoverlapping(virt as *const u8, memory::phys_map().virt(phys) as *mut u8, len) };
        }
        phys
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let (virt, len) = (buffer.as_ptr() as *mut u8 as u64, buffer.len());
        if memory::contiguous_phys(virt, len as u64) == Some(paddr) {
            return;
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: `paddr` is the bounce copy `share` made for this buffer, still allocated,
            // and the caller guarantees `buffer` is valid and not otherwise accessed.
            unsafe {
                core::ptr::copy_nonoverlapping(memory::phys_map().virt(paddr) as *const u8, virt as *mut u8, len)
            };
        }
        if memory::free_frames(paddr, (len as u64).div_ceil(FRAME_SIZE)).is_err() {
            log::error!("virtio device: freeing bounce buffer at {paddr:#x} failed");
        }
    }
}

/// The virtio-pci transport of the device at `location`, with memory decoding and bus mastering
/// on. Call it on the boot CPU before the others start (BARs may need mapping).
pub fn transport(location: DeviceFunction) -> Result<PciTransport, &'static str> {
    let mut root = PciRoot::new(PortAccess);
    // Firmware assigned the BARs; the device must decode them and may master the bus for its
    // rings and buffers.
    let (_, command) = root.get_status_command(location);
    root.set_command(location, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
    PciTransport::new::<FrameHal, _>(&mut root, location)
        .map_err(|_| "its virtio-pci capabilities or BARs are unusable")
}
