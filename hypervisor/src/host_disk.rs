//! The machine's own disk, and the regions of it that VMs get as virtio-blk disks.
//!
//! [`HostDisk`] is what a bare-metal driver (virtio-blk under QEMU, ATA under Bochs) offers:
//! whole 512-byte sectors, synchronously. [`HostRegion`] is a [`BlockBackend`] over one
//! `host:START+LEN` region of it: every access is checked against the region before the disk is
//! touched, so a guest can never read or write a byte outside its own region.

use core::fmt;

use crate::devices::virtio::blk::{BackendError, BlockBackend};

/// The host disk's sector size; drivers for other sector sizes present 512-byte sectors.
pub const HOST_SECTOR: u64 = 512;
const SECTOR: usize = HOST_SECTOR as usize;

/// Why the host disk failed a request (the driver's words, for the log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostDiskError(pub &'static str);

impl fmt::Display for HostDiskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// The machine's disk, in whole 512-byte sectors. Calls return when the device has finished.
pub trait HostDisk {
    /// Number of sectors.
    fn sectors(&self) -> u64;
    /// Whether the device itself refuses writes.
    fn read_only(&self) -> bool;
    /// Fills `buf` (a whole number of sectors) from `sector` on.
    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), HostDiskError>;
    /// Writes `data` (a whole number of sectors) from `sector` on.
    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), HostDiskError>;
    /// Returns once every completed write is on stable storage.
    fn flush(&mut self) -> Result<(), HostDiskError>;
}

/// The host disk as every VM's backends share it: one request at a time.
pub type SharedHostDisk = &'static spin::Mutex<dyn HostDisk + Send>;

/// Size in the words of the configuration: "128 MiB", or bytes if not whole MiB.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", self.0 >> 20)
        } else {
            write!(f, "{} bytes", self.0)
        }
    }
}

/// Why a region cannot be built over the host disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// The region is empty or does not start and end on sector boundaries.
    Unaligned,
    /// The region ends past the end of the disk (`disk_bytes`).
    PastEnd {
        /// Size of the host disk.
        disk_bytes: u64,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::Unaligned => f.write_str("the region is not a whole number of 512-byte sectors"),
            RegionError::PastEnd { disk_bytes } => write!(f, "the host disk has {}", Size(*disk_bytes)),
        }
    }
}

/// `[start, start + len)` bytes of the host disk as a block device of `len` bytes.
pub struct HostRegion {
    disk: SharedHostDisk,
    first_sector: u64,
    len: u64,
    read_only: bool,
}

impl fmt::Debug for HostRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRegion")
            .field("first_sector", &self.first_sector)
            .field("len", &self.len)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl HostRegion {
    /// The region `[start, start + len)` of `disk`; read-only if `read_only` or if the device
    /// is. Refused unless it is whole sectors inside the disk.
    pub fn new(disk: SharedHostDisk, start: u64, len: u64, read_only: bool) -> Result<Self, RegionError> {
        if len == 0 || !start.is_multiple_of(HOST_SECTOR) || !len.is_multiple_of(HOST_SECTOR) {
            return Err(RegionError::Unaligned);
        }
        let (sectors, device_read_only) = {
            let disk = disk.lock();
            (disk.sectors(), disk.read_only())
        };
        let disk_bytes = sectors.saturating_mul(HOST_SECTOR);
        if start.checked_add(len).is_none_or(|end| end > disk_bytes) {
            return Err(RegionError::PastEnd { disk_bytes });
        }
        Ok(HostRegion { disk, first_sector: start / HOST_SECTOR, len, read_only: read_only || device_read_only })
    }

    /// Whether the device itself is read-only (the region then is too, whatever was asked).
    pub fn device_read_only(&self) -> bool {
        self.disk.lock().read_only()
    }

    /// Checks `[offset, offset + len)` against the region; returns its end.
    fn check(&self, offset: u64, len: usize) -> Result<u64, BackendError> {
        let err = BackendError::OutOfRange { offset, len: len as u64 };
        let end = offset.checked_add(len as u64).ok_or(err)?;
        if end > self.len {
            return Err(err);
        }
        Ok(end)
    }

    /// The host sector of region-relative sector `sector` (inside the region: checked before).
    fn host_sector(&self, sector: u64) -> u64 {
        self.first_sector + sector
    }
}

fn io(e: HostDiskError) -> BackendError {
    BackendError::Io(e.0)
}

/// Splits region bytes `[offset, end)` into a partial first sector, whole sectors and a partial
/// last sector: `(sector, offset in sector, bytes)`, each piece inside one sector or a run of
/// whole sectors.
fn pieces(offset: u64, end: u64) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut at = offset;
    core::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let in_sector = at % HOST_SECTOR;
        let n = if in_sector == 0 && end - at >= HOST_SECTOR {
            (end - at) / HOST_SECTOR * HOST_SECTOR
        } else {
            (HOST_SECTOR - in_sector).min(end - at)
        };
        let piece = (at / HOST_SECTOR, in_sector as usize, n as usize);
        at += n;
        Some(piece)
    })
}

impl BlockBackend for HostRegion {
    fn capacity_bytes(&self) -> u64 {
        self.len
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let end = self.check(offset, buf.len())?;
        let mut disk = self.disk.lock();
        let mut done = 0usize;
        for (sector, in_sector, n) in pieces(offset, end) {
            let Some(out) = buf.get_mut(done..done + n) else { break };
            if in_sector == 0 && n.is_multiple_of(SECTOR) {
                disk.read_sectors(self.host_sector(sector), out).map_err(io)?;
            } else {
                let mut whole = [0u8; SECTOR];
                disk.read_sectors(self.host_sector(sector), &mut whole).map_err(io)?;
                out.copy_from_slice(whole.get(in_sector..in_sector + n).unwrap_or(&[]));
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
        let mut disk = self.disk.lock();
        let mut done = 0usize;
        for (sector, in_sector, n) in pieces(offset, end) {
            let Some(src) = data.get(done..done + n) else { break };
            if in_sector == 0 && n.is_multiple_of(SECTOR) {
                disk.write_sectors(self.host_sector(sector), src).map_err(io)?;
            } else {
                // A partial sector: read it, change our bytes, write it back. The region is
                // whole sectors, so the rest of this sector is the region's too.
                let mut whole = [0u8; SECTOR];
                disk.read_sectors(self.host_sector(sector), &mut whole).map_err(io)?;
                if let Some(dst) = whole.get_mut(in_sector..in_sector + n) {
                    dst.copy_from_slice(src);
                }
                disk.write_sectors(self.host_sector(sector), &whole).map_err(io)?;
            }
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BackendError> {
        self.disk.lock().flush().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use alloc::boxed::Box;
    use alloc::vec;
    use alloc::vec::Vec;

    use super::*;

    /// An in-memory disk that records every sector it was asked for.
    struct MemDisk {
        bytes: Vec<u8>,
        read_only: bool,
        touched: Vec<(u64, u64)>,
        flushes: usize,
        fail: bool,
    }

    impl MemDisk {
        fn new(sectors: u64) -> Self {
            let bytes = (0..sectors * HOST_SECTOR).map(|i| (i % 251) as u8).collect();
            MemDisk { bytes, read_only: false, touched: Vec::new(), flushes: 0, fail: false }
        }

        fn range(&mut self, sector: u64, len: usize) -> Result<core::ops::Range<usize>, HostDiskError> {
            assert!(len > 0 && len.is_multiple_of(SECTOR), "the disk only takes whole sectors, got {len} bytes");
            if self.fail {
                return Err(HostDiskError("device error"));
            }
            let start = (sector * HOST_SECTOR) as usize;
            assert!(start + len <= self.bytes.len(), "access past the end of the disk");
            self.touched.push((sector, (len / SECTOR) as u64));
            Ok(start..start + len)
        }
    }

    impl HostDisk for MemDisk {
        fn sectors(&self) -> u64 {
            self.bytes.len() as u64 / HOST_SECTOR
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), HostDiskError> {
            let range = self.range(sector, buf.len())?;
            buf.copy_from_slice(&self.bytes[range]);
            Ok(())
        }
        fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), HostDiskError> {
            assert!(!self.read_only, "a write reached a read-only device");
            let range = self.range(sector, data.len())?;
            self.bytes[range].copy_from_slice(data);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), HostDiskError> {
            self.flushes += 1;
            Ok(())
        }
    }

    fn shared(disk: MemDisk) -> &'static spin::Mutex<MemDisk> {
        Box::leak(Box::new(spin::Mutex::new(disk)))
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_region_must_fit_the_disk() {
        let disk = shared(MemDisk::new(128 * MIB / HOST_SECTOR));
        let e = HostRegion::new(disk, 64 * MIB, 256 * MIB, false).unwrap_err();
        assert_eq!(e.to_string(), "the host disk has 128 MiB");
        assert!(HostRegion::new(disk, 64 * MIB, 64 * MIB, false).is_ok(), "the last 64 MiB fit exactly");
        assert!(HostRegion::new(disk, 64 * MIB, 64 * MIB + HOST_SECTOR, false).is_err());
        assert_eq!(
            HostRegion::new(disk, u64::MAX - 511, 512, false).unwrap_err(),
            RegionError::PastEnd { disk_bytes: 128 * MIB }
        );
        assert_eq!(HostRegion::new(disk, 0, 0, false).unwrap_err(), RegionError::Unaligned);
        assert_eq!(HostRegion::new(disk, 1, 512, false).unwrap_err(), RegionError::Unaligned);
        let odd = shared(MemDisk::new(3));
        assert_eq!(HostRegion::new(odd, 0, 4096, false).unwrap_err().to_string(), "the host disk has 1536 bytes");
    }

    #[test]
    fn offsets_are_relative_to_the_region() {
        let disk = shared(MemDisk::new(64));
        let mut region = HostRegion::new(disk, 16 * HOST_SECTOR, 8 * HOST_SECTOR, false).unwrap();
        assert_eq!(region.capacity_bytes(), 8 * HOST_SECTOR);
        let mut buf = [0u8; 1024];
        region.read(512, &mut buf).unwrap();
        assert_eq!(&buf[..], &disk.lock().bytes[17 * SECTOR..19 * SECTOR]);
        region.write(1024, &[7u8; 512]).unwrap();
        assert!(disk.lock().bytes[18 * SECTOR..19 * SECTOR].iter().all(|&b| b == 7));
        assert_eq!(disk.lock().touched, [(17, 2), (18, 1)], "whole sectors go straight through");
    }

    #[test]
    fn unaligned_accesses_read_modify_write_whole_sectors() {
        let disk = shared(MemDisk::new(64));
        let before = disk.lock().bytes.clone();
        let mut region = HostRegion::new(disk, 8 * HOST_SECTOR, 8 * HOST_SECTOR, false).unwrap();
        let data: Vec<u8> = (0..1000).map(|i| (i * 7) as u8).collect();
        region.write(300, &data).unwrap();
        let mut expected = before.clone();
        expected[8 * SECTOR + 300..8 * SECTOR + 1300].copy_from_slice(&data);
        assert_eq!(disk.lock().bytes, expected);
        let mut back = vec![0u8; 1000];
        region.read(300, &mut back).unwrap();
        assert_eq!(back, data);
        let mut byte = [0u8; 1];
        region.read(8 * 512 - 1, &mut byte).unwrap();
        assert_eq!(byte[0], before[16 * SECTOR - 1]);
        assert!(disk.lock().touched.iter().all(|&(s, n)| s >= 8 && s + n <= 16), "{:?}", disk.lock().touched);
    }

    #[test]
    fn neighbours_are_never_touched() {
        let disk = shared(MemDisk::new(48));
        let before = disk.lock().bytes.clone();
        let (start, sectors) = (16u64, 16u64);
        let mut region = HostRegion::new(disk, start * HOST_SECTOR, sectors * HOST_SECTOR, false).unwrap();
        let len = sectors * HOST_SECTOR;
        // Writes everywhere inside, at both edges, aligned and not.
        for (offset, n) in [(0, 512), (0, 1), (len - 512, 512), (len - 1, 1), (len - 700, 700), (100, 4096)] {
            region.write(offset, &vec![0xaa; n]).unwrap();
        }
        // Requests that cross the end or lie beyond it change nothing, not even their part inside.
        let inside = disk.lock().bytes.clone();
        for (offset, n) in [(len - 512, 1024), (len - 1, 2), (len, 512), (len + 512, 512), (u64::MAX - 10, 512)] {
            assert_eq!(
                region.write(offset, &vec![0x55; n]),
                Err(BackendError::OutOfRange { offset, len: n as u64 }),
                "write at {offset:#x}+{n:#x}"
            );
            let mut buf = vec![0u8; n];
            assert!(region.read(offset, &mut buf).is_err(), "read at {offset:#x}+{n:#x}");
        }
        let after = disk.lock().bytes.clone();
        assert_eq!(after, inside, "a refused request changed the disk");
        let (lo, hi) = ((start * HOST_SECTOR) as usize, ((start + sectors) * HOST_SECTOR) as usize);
        assert_eq!(&after[..lo], &before[..lo], "the region's lower neighbour changed");
        assert_eq!(&after[hi..], &before[hi..], "the region's upper neighbour changed");
        assert!(after[lo..hi].contains(&0xaa));
        let touched = disk.lock().touched.clone();
        assert!(touched.iter().all(|&(s, n)| s >= start && s + n <= start + sectors), "{touched:?}");
    }

    #[test]
    fn read_only_regions_and_devices_refuse_writes() {
        let disk = shared(MemDisk::new(16));
        let mut region = HostRegion::new(disk, 0, 8 * HOST_SECTOR, true).unwrap();
        assert!(region.read_only());
        assert_eq!(region.write(0, &[1; 512]), Err(BackendError::ReadOnly));
        let mut buf = [0u8; 512];
        region.read(0, &mut buf).unwrap();
        disk.lock().read_only = true;
        let region = HostRegion::new(disk, 0, 8 * HOST_SECTOR, false).unwrap();
        assert!(region.read_only() && region.device_read_only(), "a read-only device makes every region read-only");
        assert!(disk.lock().touched.iter().all(|&(s, _)| s == 0));
    }

    #[test]
    fn flush_and_errors_reach_the_disk() {
        let disk = shared(MemDisk::new(16));
        let mut region = HostRegion::new(disk, 0, 16 * HOST_SECTOR, false).unwrap();
        region.flush().unwrap();
        assert_eq!(disk.lock().flushes, 1);
        disk.lock().fail = true;
        assert_eq!(region.read(0, &mut [0; 512]), Err(BackendError::Io("device error")));
        assert_eq!(region.write(3, &[0; 10]), Err(BackendError::Io("device error")));
    }
}
