//! The host disk on a virtio-blk PCI device (QEMU's `-device virtio-blk-pci`), driven by the
//! `virtio-drivers` crate over its modern PCI transport, polled: a request is submitted, the
//! queue's used ring is polled until the device answers, and only then does the call return.
//! Data moves through one DMA buffer of our own, so the device only ever sees frames we own.

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::PciTransport;

use super::memory;
use super::pci_config;
use super::virtio_hal::{self, FrameHal, VIRTIO_VENDOR};
use crate::host_disk::{HostDisk, HostDiskError, HOST_SECTOR};
use crate::mm::frames::FRAME_SIZE;

/// The PCI device IDs of a virtio block device (transitional and modern).
const BLOCK_DEVICE_IDS: [u16; 2] = [0x1001, 0x1042];

/// Frames of the buffer each request's data goes through: 64 KiB, 128 sectors a request.
const BUFFER_FRAMES: u64 = 16;
const BUFFER_BYTES: usize = (BUFFER_FRAMES * FRAME_SIZE) as usize;

/// A virtio-blk device found on the host's PCI bus.
pub struct VirtioDisk {
    blk: VirtIOBlk<FrameHal, PciTransport>,
    /// Where it sits, for the log.
    pub location: DeviceFunction,
    /// What every request's data goes through: frames the device may reach.
    buffer: &'static mut [u8],
}

// SAFETY: the driver's MMIO pointers and DMA memory are valid on every CPU (one address space);
// the disk is only used through the host disk's lock, one CPU at a time.
unsafe impl Send for VirtioDisk {}

fn request_error(e: virtio_drivers::Error) -> HostDiskError {
    HostDiskError(match e {
        virtio_drivers::Error::IoError => "the virtio-blk device reported an I/O error",
        virtio_drivers::Error::Unsupported => "the virtio-blk device does not support the request",
        virtio_drivers::Error::NotReady => "the virtio-blk device is not ready",
        virtio_drivers::Error::DmaError => "no memory for a virtio-blk request",
        _ => "a virtio-blk request failed",
    })
}

impl VirtioDisk {
    /// The first virtio-blk device on the host's PCI buses, set up for polled requests;
    /// `Some(Err)` says why a device that is there cannot be used.
    pub fn probe() -> Option<Result<Self, &'static str>> {
        let (location, _, _) = pci_config::functions()
            .find(|&(_, vendor, device)| vendor == VIRTIO_VENDOR && BLOCK_DEVICE_IDS.contains(&device))?;
        Some(Self::open(location))
    }

    fn open(location: DeviceFunction) -> Result<Self, &'static str> {
        let transport = virtio_hal::transport(location)?;
        let mut blk =
            VirtIOBlk::<FrameHal, _>::new(transport).map_err(|_| "the virtio-blk device did not initialise")?;
        // Polled: the device need not interrupt (the host's interrupt handlers only acknowledge).
        blk.disable_interrupts();
        let phys = memory::alloc_zeroed(BUFFER_FRAMES, FRAME_SIZE).ok_or("no memory for its DMA buffer")?;
        // SAFETY: the frames were just allocated for this disk and are never freed; only the
        // disk (under the host disk's lock) and the device during its requests touch them.
        let buffer = unsafe { memory::phys_slice_mut(phys, BUFFER_BYTES) };
        Ok(VirtioDisk { blk, location, buffer })
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), HostDiskError> {
        let sectors = len as u64 / HOST_SECTOR;
        if !(len as u64).is_multiple_of(HOST_SECTOR)
            || sector.checked_add(sectors).is_none_or(|end| end > self.sectors())
        {
            return Err(HostDiskError("request outside the host disk"));
        }
        Ok(())
    }
}

impl HostDisk for VirtioDisk {
    fn sectors(&self) -> u64 {
        self.blk.capacity()
    }

    fn read_only(&self) -> bool {
        self.blk.readonly()
    }

    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), HostDiskError> {
        self.check(sector, buf.len())?;
        let mut at = sector;
        for chunk in buf.chunks_mut(BUFFER_BYTES) {
            let data = self.buffer.get_mut(..chunk.len()).ok_or(HostDiskError("request larger than the buffer"))?;
            self.blk.read_blocks(at as usize, data).map_err(request_error)?;
            chunk.copy_from_slice(data);
            at += chunk.len() as u64 / HOST_SECTOR;
        }
        Ok(())
    }

    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), HostDiskError> {
        if self.read_only() {
            return Err(HostDiskError("the host disk is read-only"));
        }
        self.check(sector, data.len())?;
        let mut at = sector;
        for chunk in data.chunks(BUFFER_BYTES) {
            let staged = self.buffer.get_mut(..chunk.len()).ok_or(HostDiskError("request larger than the buffer"))?;
            staged.copy_from_slice(chunk);
            self.blk.write_blocks(at as usize, staged).map_err(request_error)?;
            at += chunk.len() as u64 / HOST_SECTOR;
        }
        Ok(())
    }

    /// VIRTIO_BLK_T_FLUSH when the device offered VIRTIO_BLK_F_FLUSH; without it the device is
    /// write-through (virtio 1.2, 5.2.6.2) and every completed write is already durable.
    fn flush(&mut self) -> Result<(), HostDiskError> {
        self.blk.flush().map_err(request_error)
    }
}
