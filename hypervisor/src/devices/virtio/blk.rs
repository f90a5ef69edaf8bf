//! Virtio block device (virtio 1.2, 5.2) over a [`BlockBackend`], with [`RamOverlay`]: a
//! read-only image plus copy-on-write pages in host memory.
//!
//! Requests are served synchronously: each backend call returns before the request's status is
//! written and the chain is put in the used ring, so a completed write or flush is as durable as
//! the backend makes it (5.2.6.2). Requests the device cannot perform (out of range, read-only,
//! a failing backend, an unknown type) complete with an error status; only chains that are not
//! requests at all (no header, no status byte) are device errors.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use super::{
    DescriptorChain, DeviceError, Queue, VirtioDevice, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use crate::loader::GuestMemory;

/// Virtio device ID of a block device (5.2.1).
pub const DEVICE_ID: u16 = 2;

// Feature bits (5.2.3).
/// `seg_max` holds the most data segments in a request.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// The device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `blk_size` holds the block size.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_T_FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

// Request types (5.2.6).
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

// Request status (5.2.6).
/// The request succeeded.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// The request failed (device or driver error).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The device does not support the request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The protocol's sector size, whatever the backend's block size (5.2.5).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID string returned by VIRTIO_BLK_T_GET_ID.
pub const ID_LEN: usize = 20;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// `type`, `reserved` and `sector`: the device-readable header of every request.
const HEADER_LEN: usize = 16;
/// Bytes moved between guest memory and the backend at a time.
const CHUNK: usize = 4096;
/// Request bytes served per call before the rest is left for the next (a request itself is
/// bounded by the disk's size, a chain by the queue size).
const WORK_PER_CALL: u64 = 1 << 20;
/// Offered data segments per request: a direct chain also needs a descriptor for the header
/// and one for the status (the limit QEMU uses too).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const QUEUE_MAX_SIZES: [u16; 1] = [QUEUE_SIZE];

/// Why a backend refused an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendError {
    /// `[offset, offset + len)` is not inside the disk.
    OutOfRange {
        /// First byte of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
    },
    /// The disk is read-only.
    ReadOnly,
    /// Writing would take the copy-on-write overlay past its budget.
    BudgetExhausted {
        /// The budget in bytes.
        budget: u64,
    },
    /// The host memory for in-RAM disks' written pages is used up ([`OverlayPool`]).
    PoolExhausted,
    /// The storage behind the backend failed.
    Io(&'static str),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::OutOfRange { offset, len } => {
                write!(f, "disk access at {offset:#x}+{len:#x} is beyond the end of the disk")
            }
            BackendError::ReadOnly => f.write_str("the disk is read-only"),
            BackendError::BudgetExhausted { budget } => {
                write!(f, "the disk overlay would grow past its budget of {budget:#x} bytes")
            }
            BackendError::PoolExhausted => f.write_str("the host memory for written disk pages is used up"),
            BackendError::Io(what) => write!(f, "disk I/O failed: {what}"),
        }
    }
}

/// The storage behind a block device, addressed in bytes. Calls are synchronous: the device
/// reports a request complete only after they return.
pub trait BlockBackend {
    /// Size of the disk in bytes; the device exposes the whole 512-byte sectors of it.
    fn capacity_bytes(&self) -> u64;
    /// Whether writes are refused (the device then offers VIRTIO_BLK_F_RO).
    fn read_only(&self) -> bool;
    /// Fills `buf` from byte `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `data` at byte `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError>;
    /// Makes completed writes durable.
    fn flush(&mut self) -> Result<(), BackendError>;
    /// Host memory the backend holds for what was written, if it keeps writes in memory.
    fn held_bytes(&self) -> Option<u64> {
        None
    }
}

/// Host memory the copy-on-write pages of every overlay may take together. What guests write
/// to in-RAM disks comes out of it, so no VM can run the host out of memory through its disks:
/// a write that finds the pool empty fails (VIRTIO_BLK_S_IOERR) and the host carries on.
#[derive(Debug)]
pub struct OverlayPool {
    free_pages: AtomicU64,
}

impl OverlayPool {
    /// A pool of `bytes` (whole pages).
    pub const fn new(bytes: u64) -> Self {
        OverlayPool { free_pages: AtomicU64::new(bytes / OVERLAY_PAGE as u64) }
    }

    /// Bytes still free.
    pub fn free_bytes(&self) -> u64 {
        self.free_pages.load(Ordering::Relaxed) * OVERLAY_PAGE as u64
    }

    /// Takes `pages` pages; false (and nothing taken) if there are not that many.
    fn take(&self, pages: u64) -> bool {
        self.free_pages.try_update(Ordering::AcqRel, Ordering::Acquire, |free| free.checked_sub(pages)).is_ok()
    }

    fn give_back(&self, pages: u64) {
        self.free_pages.fetch_add(pages, Ordering::AcqRel);
    }
}

/// Granularity of [`RamOverlay`]'s copy-on-write pages.
pub const OVERLAY_PAGE: usize = 4096;
const PAGE: u64 = OVERLAY_PAGE as u64;

/// A disk made of a read-only base image (`&'static [u8]` from the boot ramdisk, or an
/// `Arc<[u8]>` shared between VMs) and the pages the guest wrote, copied on first write. Bytes
/// past the image up to the capacity read as zero. Writes live in host memory and are lost when
/// the overlay is dropped; a budget bounds how much host memory they can take.
#[derive(Debug)]
pub struct RamOverlay<B> {
    base: B,
    capacity: u64,
    read_only: bool,
    budget: Option<u64>,
    pool: Option<Arc<OverlayPool>>,
    pages: BTreeMap<u64, Box<[u8; OVERLAY_PAGE]>>,
}

impl<B> Drop for RamOverlay<B> {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            pool.give_back(self.pages.len() as u64);
        }
    }
}

impl<B: AsRef<[u8]>> RamOverlay<B> {
    /// A writable disk the size of `base`, with no overlay budget.
    pub fn new(base: B) -> Self {
        let capacity = base.as_ref().len() as u64;
        RamOverlay { base, capacity, read_only: false, budget: None, pool: None, pages: BTreeMap::new() }
    }

    /// Sets the disk size: beyond the base image it reads as zero, below it the image is cut.
    pub fn with_capacity(mut self, bytes: u64) -> Self {
        self.capacity = bytes;
        self
    }

    /// Refuses writes.
    pub fn write_protected(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Caps the overlay at `bytes` of copied pages; writes that need more fail.
    pub fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = Some(bytes);
        self
    }

    /// Takes the written pages' memory from `pool`, shared with other overlays.
    pub fn with_pool(mut self, pool: Arc<OverlayPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Host memory the written pages take.
    pub fn overlay_bytes(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }

    /// Checks `[offset, offset + len)` against the capacity; returns its end.
    fn check(&self, offset: u64, len: usize) -> Result<u64, BackendError> {
        let err = BackendError::OutOfRange { offset, len: len as u64 };
        let end = offset.checked_add(len as u64).ok_or(err)?;
        if end > self.capacity {
            return Err(err);
        }
        Ok(end)
    }

    /// Base-image bytes at `offset` into `out`; zero past the image.
    fn read_base(&self, offset: u64, out: &mut [u8]) {
        out.fill(0);
        let base = self.base.as_ref();
        let Ok(start) = usize::try_from(offset) else { return };
        if let Some(available) = base.get(start..) {
            let n = available.len().min(out.len());
            if let (Some(dst), Some(src)) = (out.get_mut(..n), available.get(..n)) {
                dst.copy_from_slice(src);
            }
        }
    }

    /// Splits `[offset, end)` into per-page pieces: (page number, offset in page, length).
    fn pieces(offset: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize)> {
        let mut at = offset;
        core::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let in_page = at % PAGE;
            let n = (PAGE - in_page).min(end - at);
            let piece = (at / PAGE, in_page as usize, n as usize);
            at += n;
            Some(piece)
        })
    }
}

impl<B: AsRef<[u8]>> BlockBackend for RamOverlay<B> {
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let end = self.check(offset, buf.len())?;
        let mut done = 0usize;
        for (page, in_page, n) in Self::pieces(offset, end) {
            let Some(out) = buf.get_mut(done..done + n) else { break };
            match self.pages.get(&page).and_then(|p| p.get(in_page..in_page + n)) {
                Some(copied) => out.copy_from_slice(copied),
                None => self.read_base(page * PAGE + in_page as u64, out),
            }
            done += n;
        }
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let end = self.check(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        // Refuse before changing anything, so a failed write leaves the disk as it was.
        let (first, last) = (offset / PAGE, (end - 1) / PAGE);
        let new = (last - first + 1) - self.pages.range(first..=last).count() as u64;
        if let Some(budget) = self.budget {
            if (self.pages.len() as u64 + new).saturating_mul(PAGE) > budget {
                return Err(BackendError::BudgetExhausted { budget });
            }
        }
        if let Some(pool) = &self.pool {
            if !pool.take(new) {
                return Err(BackendError::PoolExhausted);
            }
        }
        let mut done = 0usize;
        for (page, in_page, n) in Self::pieces(offset, end) {
            if !self.pages.contains_key(&page) {
                let mut copy = Box::new([0u8; OVERLAY_PAGE]);
                self.read_base(page * PAGE, &mut copy[..]);
                self.pages.insert(page, copy);
            }
            let (Some(dst), Some(src)) =
                (self.pages.get_mut(&page).and_then(|p| p.get_mut(in_page..in_page + n)), data.get(done..done + n))
            else {
                break;
            };
            dst.copy_from_slice(src);
            done += n;
        }
        Ok(())
    }

    /// Nothing to make durable: the overlay lives only in host memory.
    fn flush(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn held_bytes(&self) -> Option<u64> {
        Some(self.overlay_bytes())
    }
}

/// A virtio block device with one request queue.
#[derive(Debug)]
pub struct Block<B> {
    backend: B,
    id: [u8; ID_LEN],
    features: u64,
    config: Vec<u8>,
    driver_features: u64,
    /// Requests served, and those that completed with an error status.
    requests: u64,
    failed: u64,
}

/// How a request ended: its status and the bytes written from the start of the writable part.
struct Outcome {
    status: u8,
    data_written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Outcome { status, data_written: 0 }
    }

    fn of(result: Result<(), BackendError>) -> Self {
        Outcome::status(if result.is_ok() { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR })
    }
}

impl<B: BlockBackend> Block<B> {
    /// A device over `backend` whose GET_ID string is `id` (cut to 20 bytes, NUL-padded).
    pub fn new(backend: B, id: &str) -> Self {
        let mut id_bytes = [0u8; ID_LEN];
        for (dst, src) in id_bytes.iter_mut().zip(id.bytes()) {
            *dst = src;
        }
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | VIRTIO_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if backend.read_only() {
            features |= VIRTIO_BLK_F_RO;
        }
        // struct virtio_blk_config up to blk_size (5.2.4); the fields after it belong to
        // features that are not offered.
        let mut config = Vec::new();
        config.extend_from_slice(&(backend.capacity_bytes() / SECTOR_SIZE).to_le_bytes()); // capacity
        config.extend_from_slice(&0u32.to_le_bytes()); // size_max: VIRTIO_BLK_F_SIZE_MAX not offered
        config.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        config.extend_from_slice(&[0; 4]); // geometry: VIRTIO_BLK_F_GEOMETRY not offered
        config.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        Block { backend, id: id_bytes, features, config, driver_features: 0, requests: 0, failed: 0 }
    }

    /// The backend, for inspecting the disk.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Byte offset of `sector` if `len` bytes from there are whole sectors inside the disk.
    fn data_offset(&self, sector: u64, len: u32) -> Option<u64> {
        if !u64::from(len).is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(u64::from(len))?;
        let disk_end = self.backend.capacity_bytes() / SECTOR_SIZE * SECTOR_SIZE;
        (end <= disk_end).then_some(start)
    }

    /// Serves one request; returns the used length (5.2.6, 2.7.8.2).
    fn serve(&mut self, chain: &DescriptorChain, mem: &mut dyn GuestMemory) -> Result<u32, DeviceError> {
        let bad = |problem| DeviceError::BadRequest { head: chain.head(), problem };
        let mut header = [0u8; HEADER_LEN];
        if chain.read_at(mem, 0, &mut header)? < HEADER_LEN {
            return Err(bad("the device-readable header is shorter than 16 bytes"));
        }
        let writable = chain.writable_len();
        let Some(status_at) = writable.checked_sub(1) else {
            return Err(bad("there is no device-writable byte for the status"));
        };
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let outcome = match u32::from_le_bytes([t0, t1, t2, t3]) {
            VIRTIO_BLK_T_IN => self.read_sectors(chain, mem, sector, status_at)?,
            VIRTIO_BLK_T_OUT => self.write_sectors(chain, mem, sector)?,
            VIRTIO_BLK_T_FLUSH => Outcome::of(self.backend.flush()),
            VIRTIO_BLK_T_GET_ID => {
                let n = ID_LEN.min(status_at as usize);
                let written = chain.write_at(mem, 0, self.id.get(..n).unwrap_or(&[]))?;
                Outcome { status: VIRTIO_BLK_S_OK, data_written: written as u32 }
            }
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        };
        chain.write_at(mem, u64::from(status_at), &[outcome.status])?;
        self.requests += 1;
        self.failed += u64::from(outcome.status != VIRTIO_BLK_S_OK);
        // The used length counts bytes written from the start of the writable part: everything
        // when the data ran up to the status byte, else only the data (an underestimate is
        // allowed, an overestimate is not).
        Ok(if outcome.data_written == status_at { writable } else { outcome.data_written })
    }

    /// VIRTIO_BLK_T_IN: the writable part before the status byte receives `len` bytes of disk.
    fn read_sectors(
        &mut self,
        chain: &DescriptorChain,
        mem: &mut dyn GuestMemory,
        sector: u64,
        len: u32,
    ) -> Result<Outcome, DeviceError> {
        let Some(offset) = self.data_offset(sector, len) else {
            return Ok(Outcome::status(VIRTIO_BLK_S_IOERR));
        };
        let mut chunk = [0u8; CHUNK];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(CHUNK as u32);
            let Some(buf) = chunk.get_mut(..n as usize) else { break };
            if self.backend.read(offset + u64::from(done), buf).is_err() {
                return Ok(Outcome { status: VIRTIO_BLK_S_IOERR, data_written: done });
            }
            chain.write_at(mem, u64::from(done), buf)?;
            done += n;
        }
        Ok(Outcome { status: VIRTIO_BLK_S_OK, data_written: done })
    }

    /// VIRTIO_BLK_T_OUT: the readable part after the header goes to disk. A read-only device
    /// writes nothing (5.2.6.2). Without VIRTIO_BLK_F_FLUSH negotiated the driver expects
    /// writethrough, so the write is flushed before it completes.
    fn write_sectors(
        &mut self,
        chain: &DescriptorChain,
        mem: &mut dyn GuestMemory,
        sector: u64,
    ) -> Result<Outcome, DeviceError> {
        if self.backend.read_only() {
            return Ok(Outcome::status(VIRTIO_BLK_S_IOERR));
        }
        let len = chain.readable_len().saturating_sub(HEADER_LEN as u32);
        let Some(offset) = self.data_offset(sector, len) else {
            return Ok(Outcome::status(VIRTIO_BLK_S_IOERR));
        };
        let mut chunk = [0u8; CHUNK];
        let mut done = 0u32;
        while done < len {
            let n = (len - done).min(CHUNK as u32);
            let Some(buf) = chunk.get_mut(..n as usize) else { break };
            // All `n` bytes are there: `len` was taken from the readable length.
            chain.read_at(mem, HEADER_LEN as u64 + u64::from(done), buf)?;
            if self.backend.write(offset + u64::from(done), buf).is_err() {
                return Ok(Outcome::status(VIRTIO_BLK_S_IOERR));
            }
            done += n;
        }
        if self.driver_features & VIRTIO_BLK_F_FLUSH == 0 {
            return Ok(Outcome::of(self.backend.flush()));
        }
        Ok(Outcome::status(VIRTIO_BLK_S_OK))
    }
}

impl<B: BlockBackend> VirtioDevice for Block<B> {
    fn device_id(&self) -> u16 {
        DEVICE_ID
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn config(&self) -> &[u8] {
        &self.config
    }

    fn activate(&mut self, driver_features: u64) -> Result<(), DeviceError> {
        self.driver_features = driver_features;
        Ok(())
    }

    fn reset(&mut self) {
        self.driver_features = 0;
    }

    fn report(&self) -> Option<alloc::string::String> {
        let held = self
            .backend
            .held_bytes()
            .map_or(alloc::string::String::new(), |bytes| alloc::format!(", {} KiB written held in RAM", bytes / 1024));
        Some(alloc::format!("{} requests, {} failed{held}", self.requests, self.failed))
    }

    fn process(&mut self, queue_index: u16, queue: &mut Queue, mem: &mut dyn GuestMemory) -> Result<bool, DeviceError> {
        if queue_index != 0 {
            return Err(DeviceError::NoSuchQueue(queue_index));
        }
        // At most one queue's worth, and about WORK_PER_CALL bytes, per call, so that a driver
        // adding requests as fast as they complete, or making each one as large as it may,
        // cannot keep the device (and the host CPU) here: the transport calls again for the rest.
        let mut work = 0u64;
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop(mem)? else { break };
            let used_len = self.serve(&chain, mem)?;
            queue.push_used(mem, chain.head(), used_len)?;
            // Each descriptor counts as a page, so that chains of many tiny buffers add up too.
            let segments = (chain.readable().len() + chain.writable().len()) as u64;
            work += u64::from(chain.readable_len()) + u64::from(chain.writable_len()) + segments * 4096;
            if work >= WORK_PER_CALL {
                break;
            }
        }
        Ok(queue.should_interrupt(mem)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::VIRTQ_DESC_F_INDIRECT;
    use crate::devices::virtio::test_driver::{indirect_table, memory, readable, writable, Buf, Driver, DATA};
    use crate::devices::virtio::{QueueError, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED};
    use crate::loader::SliceMemory;
    use alloc::string::ToString;
    use alloc::sync::Arc;
    use alloc::vec;

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VIRTIO_BLK_F_FLUSH;
    const HEADER: u64 = DATA;
    const STATUS: u64 = DATA + 0x100;
    const BUF: u64 = DATA + 0x1000;
    /// 64 KiB: 128 sectors.
    const IMAGE_LEN: usize = 0x1_0000;

    /// A disk image whose every byte says where it is.
    fn image() -> Vec<u8> {
        (0..IMAGE_LEN).map(|i| (i % 251) as u8).collect()
    }

    /// A driver, its queue and a device that accepted `features`.
    fn setup<B: BlockBackend>(mem: &SliceMemory, backend: B, features: u64) -> (Driver, Queue, Block<B>) {
        let driver = Driver::new(16);
        let queue = driver.queue(mem, features);
        let mut block = Block::new(backend, "disk0");
        block.activate(features).unwrap();
        (driver, queue, block)
    }

    fn write_header(mem: &mut SliceMemory, request_type: u32, sector: u64) {
        mem.write_u32(HEADER, request_type).unwrap();
        mem.write_u32(HEADER + 4, 0).unwrap();
        mem.write_u64(HEADER + 8, sector).unwrap();
    }

    /// Submits a request made of the header, `data` and a 1-byte status buffer, lets the device
    /// process it and returns (status, used length).
    fn submit<B: BlockBackend>(
        mem: &mut SliceMemory,
        driver: &mut Driver,
        queue: &mut Queue,
        block: &mut Block<B>,
        request_type: u32,
        sector: u64,
        data: &[Buf],
    ) -> (u8, u32) {
        write_header(mem, request_type, sector);
        mem.write(STATUS, &[0xff]).unwrap();
        let mut bufs = vec![readable(HEADER, 16)];
        bufs.extend_from_slice(data);
        bufs.push(writable(STATUS, 1));
        let used_before = driver.used_idx(mem);
        let head = driver.chain(mem, &bufs);
        block.process(0, queue, mem).unwrap();
        assert_eq!(driver.used_idx(mem), used_before.wrapping_add(1));
        let (id, len) = driver.used(mem, used_before);
        assert_eq!(id, u32::from(head));
        let mut status = [0u8];
        mem.read(STATUS, &mut status).unwrap();
        (status[0], len)
    }

    fn read_guest(mem: &SliceMemory, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        mem.read(gpa, &mut out).unwrap();
        out
    }

    #[test]
    fn the_configuration_space_and_features_describe_the_disk() {
        let block = Block::new(RamOverlay::new(image()), "disk0");
        assert_eq!(block.device_id(), 2);
        assert_eq!(block.queue_max_sizes(), [256]);
        assert_eq!(block.config().len(), 24);
        assert_eq!(block.read_config(0, 8), Some(128), "capacity in sectors");
        assert_eq!(block.read_config(0, 4), Some(128));
        assert_eq!(block.read_config(12, 4), Some(254), "seg_max");
        assert_eq!(block.read_config(20, 4), Some(512), "blk_size");
        assert_eq!(block.read_config(24, 1), None);
        let features = block.device_features();
        let expected = VIRTIO_F_VERSION_1
            | VIRTIO_F_EVENT_IDX
            | VIRTIO_F_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        assert_eq!(features, expected);
        assert_eq!(features & (VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_RING_PACKED), 0);

        let read_only = Block::new(RamOverlay::new(image()).write_protected(), "disk0");
        assert_eq!(read_only.device_features(), expected | VIRTIO_BLK_F_RO);
        // Only whole sectors are exposed.
        let odd = Block::new(RamOverlay::new(vec![0u8; 1000]).with_capacity(4097), "disk0");
        assert_eq!(odd.read_config(0, 8), Some(8));
    }

    #[test]
    fn a_call_serves_a_bounded_amount_and_leaves_the_rest() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        // 64 entries: room for fifteen chains of three descriptors.
        let mut driver = Driver::new(64);
        let mut queue = driver.queue(&mem, FEATURES);
        let mut block = Block::new(RamOverlay::new(image()), "disk0");
        block.activate(FEATURES).unwrap();
        // Fifteen reads of the whole 64 KiB disk into one buffer: over 1 MiB of work in all.
        write_header(&mut mem, VIRTIO_BLK_T_IN, 0);
        for _ in 0..15 {
            driver.chain(&mut mem, &[readable(HEADER, 16), writable(BUF, IMAGE_LEN as u32), writable(STATUS, 1)]);
        }
        block.process(0, &mut queue, &mut mem).unwrap();
        let first = driver.used_idx(&mem);
        assert!((1..15).contains(&first), "served {first} of 15 in one call");
        assert!(queue.has_available(&mem).unwrap(), "the rest waits");
        block.process(0, &mut queue, &mut mem).unwrap();
        assert_eq!(driver.used_idx(&mem), 15, "the next call serves the rest");
    }

    #[test]
    fn overlays_share_the_pool_and_give_it_back() {
        let pool = Arc::new(OverlayPool::new(3 * PAGE));
        let mut a = RamOverlay::new(image()).with_pool(pool.clone());
        let mut b = RamOverlay::new(image()).with_pool(pool.clone());
        a.write(0, &[1; 2 * OVERLAY_PAGE]).unwrap();
        assert_eq!(pool.free_bytes(), PAGE);
        assert_eq!(b.write(0, &[2; 2 * OVERLAY_PAGE]), Err(BackendError::PoolExhausted), "two pages, one free");
        let mut unchanged = [0u8; 8];
        b.read(0, &mut unchanged).unwrap();
        assert_eq!(unchanged, image()[..8], "a refused write changes nothing");
        b.write(PAGE * 4, &[3; 16]).unwrap();
        assert_eq!(pool.free_bytes(), 0);
        a.write(0, &[4; 16]).unwrap();
        assert_eq!(pool.free_bytes(), 0, "rewriting a copied page takes nothing");
        drop(a);
        assert_eq!(pool.free_bytes(), 2 * PAGE, "a dropped overlay gives its pages back");
    }

    #[test]
    fn writes_and_reads_round_trip_through_the_overlay() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let base: Arc<[u8]> = image().into();
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(base.clone()), FEATURES);
        let written: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
        mem.write(BUF, &written).unwrap();
        // Sector 3, two sectors split over two descriptors.
        let data = [readable(BUF, 700), readable(BUF + 700, 324)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 3, &data), (0, 1));

        // Sectors 2 to 5 read into three writable descriptors.
        let data = [writable(BUF + 0x1000, 512), writable(BUF + 0x2000, 1000), writable(BUF + 0x3000, 536)];
        let (status, used) = submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_IN, 2, &data);
        assert_eq!((status, used), (VIRTIO_BLK_S_OK, 2049), "the data and the status byte");
        let mut read = read_guest(&mem, BUF + 0x1000, 512);
        read.extend(read_guest(&mem, BUF + 0x2000, 1000));
        read.extend(read_guest(&mem, BUF + 0x3000, 536));
        let mut expected = image()[1024..1536].to_vec();
        expected.extend_from_slice(&written);
        expected.extend_from_slice(&image()[2560..3072]);
        assert_eq!(read, expected);
        assert_eq!(&base[..], &image()[..], "the base image is never written");
        assert_eq!(block.backend().overlay_bytes(), 4096);
    }

    #[test]
    fn requests_in_indirect_tables_are_served() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        write_header(&mut mem, VIRTIO_BLK_T_IN, 1);
        let table = DATA + 0x8000;
        let len = indirect_table(&mut mem, table, &[readable(HEADER, 16), writable(BUF, 512), writable(STATUS, 1)]);
        driver.desc(&mut mem, 0, table, len, VIRTQ_DESC_F_INDIRECT, 0);
        driver.publish(&mut mem, 0);
        assert_eq!(block.process(0, &mut queue, &mut mem), Ok(true));
        assert_eq!(driver.used(&mem, 0), (0, 513));
        assert_eq!(read_guest(&mem, STATUS, 1), [VIRTIO_BLK_S_OK]);
        assert_eq!(read_guest(&mem, BUF, 512), image()[512..1024]);
    }

    /// A backend that counts calls, can be made to fail flushes, and can claim to be smaller or
    /// read-only while its disk would take the access: the device's own checks must catch those.
    struct Recorder {
        disk: RamOverlay<Vec<u8>>,
        capacity: u64,
        read_only: bool,
        fail_flush: bool,
        writes: u32,
        flushes: u32,
    }

    impl BlockBackend for Recorder {
        fn capacity_bytes(&self) -> u64 {
            self.capacity
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            self.disk.read(offset, buf)
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
            self.writes += 1;
            self.disk.write(offset, data)
        }
        fn flush(&mut self) -> Result<(), BackendError> {
            self.flushes += 1;
            if self.fail_flush {
                return Err(BackendError::Io("flush failed"));
            }
            Ok(())
        }
    }

    fn recorder() -> Recorder {
        let disk = RamOverlay::new(image());
        Recorder { capacity: disk.capacity_bytes(), disk, read_only: false, fail_flush: false, writes: 0, flushes: 0 }
    }

    #[test]
    fn the_device_checks_range_and_read_only_itself() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        // The disk holds 128 sectors, the backend admits to 64 and a bit.
        let backend = Recorder { capacity: 64 * 512 + 100, ..recorder() };
        let (mut driver, mut queue, mut block) = setup(&mem, backend, FEATURES);
        assert_eq!(block.read_config(0, 8), Some(64));
        let read = [writable(BUF, 512)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_IN, 63, &read).0, 0);
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_IN, 64, &read).0, 1);
        let write = [readable(BUF, 512)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 64, &write).0, 1);
        assert_eq!(block.backend().writes, 0);

        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let backend = Recorder { read_only: true, ..recorder() };
        let (mut driver, mut queue, mut block) = setup(&mem, backend, FEATURES);
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &write), (1, 1));
        assert_eq!(block.backend().writes, 0, "a read-only device does not try to write (5.2.6.2)");
    }

    #[test]
    fn flush_requests_reach_the_backend_and_report_its_result() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, recorder(), FEATURES);
        let data = [readable(BUF, 512)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data).0, 0);
        assert_eq!(block.backend().flushes, 0, "with VIRTIO_BLK_F_FLUSH the driver flushes");
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_FLUSH, 0, &[]), (0, 1));
        assert_eq!(block.backend().flushes, 1);
        block.backend.fail_flush = true;
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_FLUSH, 0, &[]).0, 1);
        assert_eq!(block.backend().flushes, 2);
    }

    #[test]
    fn without_negotiated_flush_every_write_is_flushed_before_it_completes() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, recorder(), VIRTIO_F_VERSION_1);
        let data = [readable(BUF, 512)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data).0, 0);
        assert_eq!(block.backend().flushes, 1);
        block.backend.fail_flush = true;
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data).0, 1);
        // A reset forgets the negotiated features: writethrough until the driver says otherwise.
        block.backend.fail_flush = false;
        block.activate(FEATURES).unwrap();
        submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data);
        assert_eq!(block.backend().flushes, 2);
        block.reset();
        submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data);
        assert_eq!(block.backend().flushes, 3);
    }

    #[test]
    fn get_id_returns_the_nul_padded_id_string() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        mem.write(BUF, &[0xee; 32]).unwrap();
        let data = [writable(BUF, 20)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_GET_ID, 0, &data), (0, 21));
        assert_eq!(read_guest(&mem, BUF, 21), b"disk0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\xee");
        // A shorter buffer gets what fits; a longer id is cut to 20 bytes.
        let data = [writable(BUF, 3)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_GET_ID, 0, &data), (0, 4));
        let mut long = Block::new(RamOverlay::new(image()), "a-disk-id-that-is-far-too-long");
        long.activate(FEATURES).unwrap();
        let data = [writable(BUF, 20)];
        submit(&mut mem, &mut driver, &mut queue, &mut long, VIRTIO_BLK_T_GET_ID, 0, &data);
        assert_eq!(read_guest(&mem, BUF, 20), b"a-disk-id-that-is-fa");
    }

    #[test]
    fn requests_outside_the_disk_or_not_in_sectors_fail_with_ioerr() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        mem.write(BUF, &[0xee; 1024]).unwrap();
        let one = [writable(BUF, 512)];
        let two = [writable(BUF, 1024)];
        let cases: [(u32, u64, &[Buf]); 6] = [
            (VIRTIO_BLK_T_IN, 128, &one),
            (VIRTIO_BLK_T_IN, 127, &two),
            (VIRTIO_BLK_T_IN, u64::MAX, &one),
            (VIRTIO_BLK_T_IN, 1 << 55, &one),
            (VIRTIO_BLK_T_IN, 0, &[writable(BUF, 100)]),
            (VIRTIO_BLK_T_OUT, 127, &[readable(BUF, 1024)]),
        ];
        for (request_type, sector, data) in cases {
            let (status, used) = submit(&mut mem, &mut driver, &mut queue, &mut block, request_type, sector, data);
            assert_eq!(status, VIRTIO_BLK_S_IOERR, "type {request_type}, sector {sector:#x}");
            let expected_used = if request_type == VIRTIO_BLK_T_IN { 0 } else { 1 };
            assert_eq!(used, expected_used, "nothing before the status byte was written");
        }
        assert_eq!(read_guest(&mem, BUF, 1024), [0xee; 1024]);
        assert_eq!(block.backend().overlay_bytes(), 0, "the failed write wrote nothing");
        // The last sector itself is fine.
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_IN, 127, &one).0, 0);
        assert_eq!(read_guest(&mem, BUF, 512), image()[IMAGE_LEN - 512..]);
    }

    #[test]
    fn read_only_disks_refuse_writes_and_write_nothing() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()).write_protected(), FEATURES);
        mem.write(BUF, &[0xaa; 512]).unwrap();
        let data = [readable(BUF, 512)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data), (1, 1));
        let data = [writable(BUF, 512)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_IN, 0, &data).0, 0);
        assert_eq!(read_guest(&mem, BUF, 512), image()[..512]);
        assert_eq!(block.backend().overlay_bytes(), 0);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        // FLUSH_OUT (legacy), GET_LIFETIME, DISCARD, WRITE_ZEROES, a legacy barrier read.
        for request_type in [5, 10, 11, 13, 0x8000_0000] {
            let data = [writable(BUF, 512)];
            let (status, used) = submit(&mut mem, &mut driver, &mut queue, &mut block, request_type, 0, &data);
            assert_eq!((status, used), (VIRTIO_BLK_S_UNSUPP, 0), "type {request_type:#x}");
        }
    }

    #[test]
    fn the_overlay_budget_turns_growth_into_ioerr() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let overlay = RamOverlay::new(image()).with_budget(2 * OVERLAY_PAGE as u64);
        let (mut driver, mut queue, mut block) = setup(&mem, overlay, FEATURES);
        let data = [readable(BUF, 512)];
        // Sectors 7 and 8 straddle the first two pages.
        let two = [readable(BUF, 1024)];
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 7, &two).0, 0);
        assert_eq!(block.backend().overlay_bytes(), 8192);
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 16, &data).0, 1);
        assert_eq!(block.backend().overlay_bytes(), 8192);
        assert_eq!(submit(&mut mem, &mut driver, &mut queue, &mut block, VIRTIO_BLK_T_OUT, 0, &data).0, 0);
    }

    #[test]
    fn the_overlay_copies_pages_on_write_and_reads_zero_past_the_image() {
        let base: Vec<u8> = image()[..6000].to_vec();
        let mut disk = RamOverlay::new(base.clone()).with_capacity(3 * PAGE);
        assert_eq!(disk.capacity_bytes(), 12288);
        disk.write(4090, b"0123456789").unwrap();
        assert_eq!(disk.overlay_bytes(), 8192, "the write straddles two pages");
        disk.write(11000, b"end").unwrap();
        let mut all = vec![0u8; 12288];
        disk.read(0, &mut all).unwrap();
        let mut expected = base;
        expected.resize(12288, 0);
        expected[4090..4100].copy_from_slice(b"0123456789");
        expected[11000..11003].copy_from_slice(b"end");
        assert_eq!(all, expected);
        let mut piece = [0u8; 12];
        disk.read(4089, &mut piece).unwrap();
        assert_eq!(&piece, &expected[4089..4101]);

        assert_eq!(disk.read(12280, &mut piece), Err(BackendError::OutOfRange { offset: 12280, len: 12 }));
        assert_eq!(disk.write(u64::MAX, b"x"), Err(BackendError::OutOfRange { offset: u64::MAX, len: 1 }));
        assert_eq!(disk.write(12288, b""), Ok(()));
        assert_eq!(disk.flush(), Ok(()));
        let mut short = RamOverlay::new(image()).with_capacity(100);
        assert!(short.read(96, &mut [0; 8]).is_err(), "the capacity cuts the image");

        let mut limited = RamOverlay::new(vec![0u8; 16384]).with_budget(PAGE);
        limited.write(10, b"a").unwrap();
        let error = limited.write(4095, b"ab").unwrap_err();
        assert_eq!(error, BackendError::BudgetExhausted { budget: 4096 });
        assert_eq!(error.to_string(), "the disk overlay would grow past its budget of 0x1000 bytes");
        let mut byte = [0u8; 1];
        limited.read(4095, &mut byte).unwrap();
        assert_eq!(byte, [0], "the refused write changed nothing");
        limited.write(4000, b"fits").unwrap();
        assert_eq!(RamOverlay::new(vec![0u8; 8]).write_protected().write(0, b"x"), Err(BackendError::ReadOnly));
    }

    #[test]
    fn chains_that_are_not_requests_are_device_errors() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        write_header(&mut mem, VIRTIO_BLK_T_IN, 0);
        let head = driver.chain(&mut mem, &[readable(HEADER, 16), readable(BUF, 512)]);
        let error = block.process(0, &mut queue, &mut mem).unwrap_err();
        assert_eq!(error, DeviceError::BadRequest { head, problem: "there is no device-writable byte for the status" });
        assert_eq!(driver.used_idx(&mem), 0, "nothing was completed");

        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        let head = driver.chain(&mut mem, &[readable(HEADER, 8), writable(STATUS, 1)]);
        let error = block.process(0, &mut queue, &mut mem).unwrap_err();
        assert_eq!(
            error,
            DeviceError::BadRequest { head, problem: "the device-readable header is shorter than 16 bytes" }
        );
        assert_eq!(driver.used_idx(&mem), 0);

        // A header split over two descriptors is a header.
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        driver.chain(&mut mem, &[readable(HEADER, 8), readable(HEADER + 8, 8), writable(STATUS, 1)]);
        assert_eq!(block.process(0, &mut queue, &mut mem), Ok(true));
        assert_eq!(read_guest(&mem, STATUS, 1), [VIRTIO_BLK_S_OK], "a read of no sectors");
    }

    #[test]
    fn malformed_queues_and_unknown_queues_are_device_errors() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), FEATURES);
        driver.publish(&mut mem, 16);
        let error = block.process(0, &mut queue, &mut mem).unwrap_err();
        assert_eq!(error, DeviceError::Queue(QueueError::HeadOutOfRange { head: 16, size: 16 }));
        assert_eq!(block.process(1, &mut queue, &mut mem), Err(DeviceError::NoSuchQueue(1)));
    }

    #[test]
    fn process_reports_whether_the_driver_wants_an_interrupt() {
        let mut backing = memory();
        let mut mem = SliceMemory(&mut backing);
        let (mut driver, mut queue, mut block) = setup(&mem, RamOverlay::new(image()), VIRTIO_F_VERSION_1);
        driver.set_no_interrupt(&mut mem, true);
        write_header(&mut mem, VIRTIO_BLK_T_FLUSH, 0);
        driver.chain(&mut mem, &[readable(HEADER, 16), writable(STATUS, 1)]);
        driver.chain(&mut mem, &[readable(HEADER, 16), writable(STATUS + 1, 1)]);
        assert_eq!(block.process(0, &mut queue, &mut mem), Ok(false));
        assert_eq!(driver.used_idx(&mem), 2, "both requests completed in one notification");
        driver.set_no_interrupt(&mut mem, false);
        assert_eq!(block.process(0, &mut queue, &mut mem), Ok(false), "nothing new to signal");
        driver.chain(&mut mem, &[readable(HEADER, 16), writable(STATUS, 1)]);
        assert_eq!(block.process(0, &mut queue, &mut mem), Ok(true));
    }
}
