//! The host disk on an ATA drive (Bochs, which has no virtio devices): PIO with LBA48 (READ
//! SECTORS EXT, WRITE SECTORS EXT, FLUSH CACHE EXT), polled, with the drive's interrupt off.
//! The primary master is the hypervisor's own boot disk and is never probed; the host disk is
//! the first ATA drive among the primary slave and the secondary master and slave.

use x86_64::instructions::port::Port;

use super::serial;
use crate::host_disk::{HostDisk, HostDiskError, HOST_SECTOR};

// Command block registers, from the channel's base port.
const DATA: u16 = 0;
const SECTOR_COUNT: u16 = 2;
const LBA_LOW: u16 = 3;
const LBA_MID: u16 = 4;
const LBA_HIGH: u16 = 5;
const DRIVE: u16 = 6;
const STATUS_COMMAND: u16 = 7;

const STATUS_BSY: u8 = 0x80;
const STATUS_DF: u8 = 0x20;
const STATUS_DRQ: u8 = 0x08;
const STATUS_ERR: u8 = 0x01;
/// Device control: interrupts off (nIEN).
const CONTROL_NIEN: u8 = 0x02;

const IDENTIFY: u8 = 0xec;
const READ_SECTORS_EXT: u8 = 0x24;
const WRITE_SECTORS_EXT: u8 = 0x34;
const FLUSH_CACHE_EXT: u8 = 0xea;

/// Sectors per command: the 16-bit count could take 65536, but a guest request is at most a
/// few KiB and shorter commands keep other CPUs' waits for the disk short.
const MAX_SECTORS: u64 = 256;
/// A drive that stays busy this long has failed (spin-up of a real disk takes seconds).
const TIMEOUT_MICROS: u64 = 10_000_000;
const WORDS_PER_SECTOR: usize = HOST_SECTOR as usize / 2;

/// The drives that may hold the host disk: (channel base port, control port, slave, name).
const CANDIDATES: [(u16, u16, bool, &str); 3] =
    [(0x1f0, 0x3f6, true, "ata0-slave"), (0x170, 0x376, false, "ata1-master"), (0x170, 0x376, true, "ata1-slave")];

/// One ATA drive, driven by PIO.
pub struct AtaDisk {
    base: u16,
    control: u16,
    slave: bool,
    sectors: u64,
    /// Where it sits, for the log: `ata0-slave`, ...
    pub name: &'static str,
}

impl AtaDisk {
    /// The first ATA (not ATAPI) drive with LBA48 among the candidates.
    pub fn probe() -> Option<Self> {
        CANDIDATES.iter().find_map(|&(base, control, slave, name)| {
            let mut disk = AtaDisk { base, control, slave, sectors: 0, name };
            disk.identify().then_some(disk)
        })
    }

    fn inb(&self, register: u16) -> u8 {
        // SAFETY: the port is a register of the IDE channel the host disk is on. The boot
        // firmware is done with the channel, so only this driver, under the host disk's lock
        // (or the boot CPU's probe before any VM runs), uses it.
        unsafe { Port::<u8>::new(self.base + register).read() }
    }

    fn outb(&self, register: u16, value: u8) {
        // SAFETY: as in `inb`.
        unsafe { Port::<u8>::new(self.base + register).write(value) }
    }

    /// The alternate status register: the status without acknowledging anything.
    fn alt_status(&self) -> u8 {
        // SAFETY: as in `inb`; reading the alternate status has no side effect.
        unsafe { Port::<u8>::new(self.control).read() }
    }

    fn read_words(&self, words: &mut [u16; WORDS_PER_SECTOR]) {
        let mut data = Port::<u16>::new(self.base + DATA);
        for word in words.iter_mut() {
            // SAFETY: as in `inb`; the drive has DRQ set, so it expects a sector's words.
            *word = unsafe { data.read() };
        }
    }

    fn write_words(&self, bytes: &[u8]) {
        let mut data = Port::<u16>::new(self.base + DATA);
        for &pair in bytes.as_chunks::<2>().0 {
            // SAFETY: as in `read_words`.
            unsafe { data.write(u16::from_le_bytes(pair)) };
        }
    }

    /// Selects this drive (LBA addressing) and waits the 400 ns the status needs to follow.
    fn select(&self) {
        self.outb(DRIVE, 0xe0 | if self.slave { 0x10 } else { 0 });
        for _ in 0..4 {
            self.alt_status();
        }
    }

    /// Waits until the drive is not busy; returns the status, or why not.
    fn wait_ready(&self) -> Result<u8, HostDiskError> {
        let deadline = serial::uptime_micros() + TIMEOUT_MICROS;
        loop {
            let status = self.alt_status();
            if status & STATUS_BSY == 0 {
                if status & (STATUS_ERR | STATUS_DF) != 0 {
                    return Err(HostDiskError("the ATA disk reported an error"));
                }
                return Ok(status);
            }
            if serial::uptime_micros() > deadline {
                return Err(HostDiskError("the ATA disk stayed busy for 10 s"));
            }
            core::hint::spin_loop();
        }
    }

    /// Waits until the drive asks for (or offers) a sector's data.
    fn wait_data(&self) -> Result<(), HostDiskError> {
        if self.wait_ready()? & STATUS_DRQ == 0 {
            return Err(HostDiskError("the ATA disk did not transfer the data"));
        }
        Ok(())
    }

    /// IDENTIFY DEVICE: true for an ATA drive with LBA48, whose size it records.
    fn identify(&mut self) -> bool {
        if self.alt_status() == 0xff {
            return false; // nothing on the channel: the bus floats
        }
        self.select();
        // SAFETY: as in `inb`: the channel's own control register, interrupts off.
        unsafe { Port::<u8>::new(self.control).write(CONTROL_NIEN) };
        for register in [SECTOR_COUNT, LBA_LOW, LBA_MID, LBA_HIGH] {
            self.outb(register, 0);
        }
        self.outb(STATUS_COMMAND, IDENTIFY);
        if matches!(self.alt_status(), 0 | 0xff) {
            return false; // no drive
        }
        let deadline = serial::uptime_micros() + TIMEOUT_MICROS;
        while self.alt_status() & STATUS_BSY != 0 {
            if serial::uptime_micros() > deadline {
                return false;
            }
            core::hint::spin_loop();
        }
        // ATAPI and SATA bridges put a signature here and abort IDENTIFY DEVICE.
        if self.inb(LBA_MID) != 0 || self.inb(LBA_HIGH) != 0 || self.wait_data().is_err() {
            return false;
        }
        let mut words = [0u16; WORDS_PER_SECTOR];
        self.read_words(&mut words);
        self.inb(STATUS_COMMAND); // acknowledge
        let lba48 = words[83] & (1 << 10) != 0;
        let sectors = words[100..104].iter().rev().fold(0u64, |n, &w| n << 16 | u64::from(w));
        self.sectors = sectors;
        lba48 && sectors > 0
    }

    /// Issues an LBA48 command for `count` (1..=65536) sectors from `sector`.
    fn command(&self, command: u8, sector: u64, count: u64) -> Result<(), HostDiskError> {
        self.select();
        self.wait_ready()?;
        let count = count as u16; // 65536 is written as 0
        let [c0, c1] = count.to_le_bytes();
        let [l0, l1, l2, l3, l4, l5, _, _] = sector.to_le_bytes();
        // High bytes first, then low bytes: the registers are two-deep FIFOs.
        for (register, value) in [
            (SECTOR_COUNT, c1),
            (LBA_LOW, l3),
            (LBA_MID, l4),
            (LBA_HIGH, l5),
            (SECTOR_COUNT, c0),
            (LBA_LOW, l0),
            (LBA_MID, l1),
            (LBA_HIGH, l2),
        ] {
            self.outb(register, value);
        }
        self.outb(STATUS_COMMAND, command);
        Ok(())
    }

    fn check(&self, sector: u64, len: usize) -> Result<(), HostDiskError> {
        let sectors = len as u64 / HOST_SECTOR;
        if !(len as u64).is_multiple_of(HOST_SECTOR) || sector.checked_add(sectors).is_none_or(|end| end > self.sectors)
        {
            return Err(HostDiskError("request outside the host disk"));
        }
        Ok(())
    }
}

impl HostDisk for AtaDisk {
    fn sectors(&self) -> u64 {
        self.sectors
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read_sectors(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), HostDiskError> {
        self.check(sector, buf.len())?;
        let per_command = (MAX_SECTORS * HOST_SECTOR) as usize;
        for (index, run) in buf.chunks_mut(per_command).enumerate() {
            let first = sector + (index * per_command) as u64 / HOST_SECTOR;
            self.command(READ_SECTORS_EXT, first, run.len() as u64 / HOST_SECTOR)?;
            for out in run.as_chunks_mut::<{ HOST_SECTOR as usize }>().0 {
                self.wait_data()?;
                let mut words = [0u16; WORDS_PER_SECTOR];
                self.read_words(&mut words);
                for (pair, word) in out.as_chunks_mut::<2>().0.iter_mut().zip(words) {
                    *pair = word.to_le_bytes();
                }
            }
        }
        Ok(())
    }

    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), HostDiskError> {
        self.check(sector, data.len())?;
        let per_command = (MAX_SECTORS * HOST_SECTOR) as usize;
        for (index, run) in data.chunks(per_command).enumerate() {
            let first = sector + (index * per_command) as u64 / HOST_SECTOR;
            self.command(WRITE_SECTORS_EXT, first, run.len() as u64 / HOST_SECTOR)?;
            for sector_bytes in run.as_chunks::<{ HOST_SECTOR as usize }>().0 {
                self.wait_data()?;
                self.write_words(sector_bytes);
            }
            // The last sector is on the drive once it is no longer busy.
            self.wait_ready()?;
        }
        Ok(())
    }

    /// FLUSH CACHE EXT: returns once the drive's write cache is on the medium.
    fn flush(&mut self) -> Result<(), HostDiskError> {
        self.select();
        self.wait_ready()?;
        self.outb(STATUS_COMMAND, FLUSH_CACHE_EXT);
        for _ in 0..4 {
            self.alt_status();
        }
        self.wait_ready().map(|_| ())
    }
}
