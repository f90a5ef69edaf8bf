//! The `virtio-hostile` case: a driver for the VM's virtio-blk disk that first does what
//! Linux's virtio_pci_modern and virtio_blk do, then breaks every rule the device has to
//! survive.
//!
//! The normal path: find 1af4:1042 on bus 0 (at 00:01.0), size its BAR, walk its capability
//! list (MSI-X, MSI, and the common, notify, ISR, device and PCI-configuration-access
//! capabilities, each where the hypervisor puts it), reset it, negotiate VERSION_1 and
//! INDIRECT_DESC, set up the request queue in this guest's RAM and read sectors, with INTx
//! (the ISR is read after each completion, as Linux's handler does) and polling the used ring.
//!
//! Then every malformed queue the device must refuse: an available entry naming a descriptor
//! beyond the queue, a chain that loops, indirect tables of a bad length, nested or with NEXT,
//! a buffer beyond guest RAM, an available index that runs ahead by more than the queue size,
//! rings outside RAM (or misaligned) at enable time, a chain of more than 4 GiB, and chains
//! that are no request (a short header, no status byte, readable after writable). Each must
//! leave the device in DEVICE_NEEDS_RESET (with a configuration change interrupt when it was
//! live) and complete nothing; a reset and a fresh bring-up make it work again. Requests the
//! device can refuse (sectors beyond the disk, lengths that are not whole sectors, an unknown
//! type) complete with an error status and leave it running. Last, garbage in every common
//! configuration register with every width (from reset and while live), in the device
//! configuration, the ISR and the pending bits, through the PCI configuration window, and
//! notifications of queues that do not exist: the device and this VM run on.
//!
//! The VM that runs it has `memory = 16M` and `disk = test-disk.img`: 128 sectors, each the
//! text `sector NNN ` then letters and a newline ([`disk_byte`]).

// Failure messages are returned by value, as in `cases`.
#![allow(clippy::result_large_err)]

use core::arch::asm;
use core::cell::UnsafeCell;

use crate::cases::{fail, CaseResult, Msg};
use crate::println;

/// Fails the case with the formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(fail!($($arg)+));
        }
    };
}

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;

/// Red Hat's vendor ID and the modern virtio-blk device ID (0x1040 + 2).
const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_BLK: u32 = 0x1042;
/// Where the hypervisor plugs the first disk, and where it assigns its BAR.
const DISK_SLOT: u8 = 1;
const BAR0_EXPECTED: u32 = 0xe000_0000;
const BAR_SIZE: u32 = 0x8000;

// Configuration-space registers and bits (PCI 3.0, 6.1).
const PCI_COMMAND: u8 = 0x04;
const PCI_STATUS: u8 = 0x06;
const PCI_CLASS_REVISION: u8 = 0x08;
const PCI_HEADER_TYPE: u8 = 0x0e;
const PCI_BAR0: u8 = 0x10;
const PCI_CAPABILITIES: u8 = 0x34;
const PCI_INTERRUPT_PIN: u8 = 0x3d;
const COMMAND_MEMORY: u32 = 1 << 1;
const STATUS_INTERRUPT: u32 = 1 << 3;
const STATUS_CAPABILITIES: u32 = 1 << 4;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSI: u8 = 0x05;
const CAP_MSIX: u8 = 0x11;
/// Mass storage, other; revision 1 (a modern-only device).
const CLASS_REVISION: u32 = 0x0180_0001;

// virtio_pci_cap cfg_type values (virtio 1.2, 4.1.4).
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
const CFG_PCI: u8 = 5;
const CFG_NAMES: [&str; 6] = ["", "common", "notify", "ISR", "device", "PCI configuration access"];

// Where each structure is in the BAR.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u32 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE: u32 = 0x4000;
const MSIX_PBA: u32 = 0x5000;
const MSIX_VECTORS: u32 = 2;

// struct virtio_pci_common_cfg (4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = COMMON;
const DEVICE_FEATURE: u64 = COMMON + 0x04;
const DRIVER_FEATURE_SELECT: u64 = COMMON + 0x08;
const DRIVER_FEATURE: u64 = COMMON + 0x0c;
const NUM_QUEUES: u64 = COMMON + 0x12;
const DEVICE_STATUS: u64 = COMMON + 0x14;
const CONFIG_GENERATION: u64 = COMMON + 0x15;
const QUEUE_SELECT: u64 = COMMON + 0x16;
const QUEUE_SIZE: u64 = COMMON + 0x18;
const QUEUE_ENABLE: u64 = COMMON + 0x1c;
const QUEUE_NOTIFY_OFF: u64 = COMMON + 0x1e;
const QUEUE_DESC: u64 = COMMON + 0x20;
const QUEUE_DRIVER: u64 = COMMON + 0x28;
const QUEUE_DEVICE: u64 = COMMON + 0x30;

// Device status bits (2.1).
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;
const NEEDS_RESET: u8 = 0x40;
const LIVE: u8 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

const F_INDIRECT_DESC: u64 = 1 << 28;
const F_VERSION_1: u64 = 1 << 32;
/// What this driver accepts, as Linux's virtio_blk does without EVENT_IDX.
const FEATURES: u64 = F_VERSION_1 | F_INDIRECT_DESC;

// ISR bits (4.1.4.5).
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

// Descriptor flags (2.7.5).
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

// virtio-blk requests and their status (5.2.6).
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The request queue's maximum size, which this driver uses.
const QUEUE_ENTRIES: u16 = 256;
/// RAM of the VM that runs the case (its `memory = 16M`).
const RAM_SIZE: u64 = 16 << 20;
/// `test-disk.img`: 64 KiB.
const DISK_SECTORS: u64 = 128;
const SECTOR: u64 = 512;
/// The GET_ID string: the image's file name.
const DISK_ID: &[u8] = b"test-disk.img";

// The queue and request buffers, offsets into `DMA`.
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const STATUS_BYTE: u64 = 0x3100;
/// Indirect descriptor tables.
const TABLE: u64 = 0x3200;
const DATA: u64 = 0x4000;
const DMA_LEN: usize = 0x5000;

/// How often the used index is read before a request counts as never completed. The device
/// does a queue's work within the exit of the notification, so the first look should do.
const POLLS: u32 = 100_000;

/// Guest RAM the device reads and writes: rings, headers, data. Identity-mapped, so its
/// address is its guest-physical address.
#[repr(C, align(4096))]
struct DmaArea(UnsafeCell<[u8; DMA_LEN]>);
// SAFETY: one CPU runs the case; the device touches it only within exits of this CPU.
unsafe impl Sync for DmaArea {}
static DMA: DmaArea = DmaArea(UnsafeCell::new([0; DMA_LEN]));

/// Guest-physical address of `offset` in the DMA area.
fn gpa(offset: u64) -> u64 {
    DMA.0.get() as u64 + offset
}

fn ram<T>(offset: u64) -> *mut T {
    let size = core::mem::size_of::<T>() as u64;
    assert!(offset.is_multiple_of(size) && offset + size <= DMA_LEN as u64, "DMA area offset {offset:#x}");
    DMA.0.get().cast::<u8>().wrapping_add(offset as usize).cast()
}

fn ram_write<T>(offset: u64, value: T) {
    // SAFETY: in bounds and aligned (checked by `ram`); volatile, since the device reads it.
    unsafe { ram::<T>(offset).write_volatile(value) }
}

fn ram_read<T>(offset: u64) -> T {
    // SAFETY: as in `ram_write`; volatile, since the device writes it.
    unsafe { ram::<T>(offset).read_volatile() }
}

fn ram_fill(offset: u64, len: u64, byte: u8) {
    (offset..offset + len).for_each(|at| ram_write(at, byte));
}

/// Byte `i` of sector `sector` of `test-disk.img`.
fn disk_byte(sector: u64, i: u64) -> u8 {
    let digit = |n: u64| b'0' + (n % 10) as u8;
    let label = *b"sector ";
    match i {
        0..=6 => label[i as usize],
        7 => digit(sector / 100),
        8 => digit(sector / 10),
        9 => digit(sector),
        10 => b' ',
        511 => b'\n',
        _ => b'a' + ((sector + i) % 26) as u8,
    }
}

fn outl(port: u16, value: u32) {
    // SAFETY: configuration-space accesses reach only this VM's PCI devices.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

fn cfg_select(slot: u8, function: u8, offset: u8) {
    outl(CONFIG_ADDRESS, 0x8000_0000 | u32::from(slot) << 11 | u32::from(function) << 8 | u32::from(offset & 0xfc));
}

/// Reads `width` bytes of function 0 of `slot` at `offset` through CONFIG_DATA.
fn cfg_read(slot: u8, offset: u8, width: u8) -> u32 {
    cfg_select(slot, 0, offset);
    let port = CONFIG_DATA + u16::from(offset & 3);
    let value: u32;
    // SAFETY: as in `outl`.
    unsafe {
        match width {
            1 => {
                asm!("in al, dx", "movzx eax, al", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
            }
            2 => {
                asm!("in ax, dx", "movzx eax, ax", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
            }
            _ => asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)),
        }
    }
    value
}

fn cfg_write(slot: u8, offset: u8, width: u8, value: u32) {
    cfg_select(slot, 0, offset);
    let port = CONFIG_DATA + u16::from(offset & 3);
    // SAFETY: as in `outl`.
    unsafe {
        match width {
            1 => asm!("out dx, al", in("dx") port, in("al") value as u8, options(nomem, nostack, preserves_flags)),
            2 => asm!("out dx, ax", in("dx") port, in("ax") value as u16, options(nomem, nostack, preserves_flags)),
            _ => asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)),
        }
    }
}

/// An MMIO read of exactly `width` bytes (1, 2, 4 or 8; any alignment).
fn mmio_read(addr: u64, width: u8) -> u64 {
    let value: u64;
    // SAFETY: `addr` is in the disk's BAR: device registers, no RAM. Written as instructions,
    // since the access width (and an unaligned address) is what is being tested.
    unsafe {
        match width {
            1 => {
                asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags))
            }
            2 => {
                asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags))
            }
            4 => {
                asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags))
            }
            _ => {
                asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) value, options(nostack, preserves_flags))
            }
        }
    }
    value
}

/// An MMIO write of exactly `width` bytes of `value`.
fn mmio_write(addr: u64, width: u8, value: u64) {
    // SAFETY: as in `mmio_read`. Not `nomem`: the device may read this guest's RAM in the exit.
    unsafe {
        match width {
            1 => {
                asm!("mov byte ptr [{a}], {v}", a = in(reg) addr, v = in(reg_byte) value as u8, options(nostack, preserves_flags))
            }
            2 => {
                asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
            4 => {
                asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
            _ => {
                asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) value, options(nostack, preserves_flags))
            }
        }
    }
}

/// xorshift64: the garbage.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A descriptor: address, length, flags (NEXT is added by `submit`).
type Buffer = (u64, u32, u16);

/// The driver: the BAR, the PCI configuration window and the driver's ring positions.
struct Disk {
    bar: u64,
    pci_cfg_cap: u8,
    avail_idx: u16,
    used_idx: u16,
    /// Malformed queues that needed a reset.
    resets: u32,
    /// Requests completed with an error status.
    refused: u32,
    /// Garbage register writes.
    garbage: u32,
}

impl Disk {
    fn read(&self, offset: u64, width: u8) -> u64 {
        mmio_read(self.bar + offset, width)
    }

    fn write(&self, offset: u64, width: u8, value: u64) {
        mmio_write(self.bar + offset, width, value)
    }

    fn status(&self) -> u8 {
        self.read(DEVICE_STATUS, 1) as u8
    }

    /// Sets status bits, as Linux's `virtio_add_status` does: read, OR, write.
    fn add_status(&self, bits: u8) {
        let status = self.status();
        self.write(DEVICE_STATUS, 1, u64::from(status | bits));
    }

    fn reset(&self) -> CaseResult {
        self.write(DEVICE_STATUS, 1, 0);
        // Linux waits for the status to read 0 before it goes on.
        for _ in 0..1000 {
            if self.status() == 0 {
                return Ok(());
            }
        }
        Err(fail!("status {:#x} after writing 0, expected 0", self.status()))
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (virtio 1.2, 3.1.1).
    fn negotiate(&self) -> CaseResult {
        self.reset()?;
        self.add_status(ACKNOWLEDGE);
        self.add_status(DRIVER);
        self.write(DEVICE_FEATURE_SELECT, 4, 0);
        let low = self.read(DEVICE_FEATURE, 4);
        self.write(DEVICE_FEATURE_SELECT, 4, 1);
        let offered = self.read(DEVICE_FEATURE, 4) << 32 | low;
        ensure!(offered & FEATURES == FEATURES, "device features {offered:#x} lack VERSION_1 or INDIRECT_DESC");
        self.write(DRIVER_FEATURE_SELECT, 4, 0);
        self.write(DRIVER_FEATURE, 4, FEATURES & 0xffff_ffff);
        self.write(DRIVER_FEATURE_SELECT, 4, 1);
        self.write(DRIVER_FEATURE, 4, FEATURES >> 32);
        self.add_status(FEATURES_OK);
        let status = self.status();
        ensure!(
            status == ACKNOWLEDGE | DRIVER | FEATURES_OK,
            "status {status:#x} after FEATURES_OK, expected {:#x}",
            ACKNOWLEDGE | DRIVER | FEATURES_OK
        );
        Ok(())
    }

    /// Checks struct virtio_blk_config: capacity (read in halves under the generation, as
    /// Linux's virtio_cread64 does), seg_max and blk_size.
    fn check_config(&self) -> CaseResult {
        let generation = self.read(CONFIG_GENERATION, 1);
        let capacity = self.read(DEVICE_CONFIG + 4, 4) << 32 | self.read(DEVICE_CONFIG, 4);
        ensure!(self.read(CONFIG_GENERATION, 1) == generation, "configuration generation changed");
        ensure!(capacity == DISK_SECTORS, "capacity {capacity} sectors, expected {DISK_SECTORS}");
        let (seg_max, blk_size) = (self.read(DEVICE_CONFIG + 12, 4), self.read(DEVICE_CONFIG + 20, 4));
        ensure!(seg_max == 254 && blk_size == SECTOR, "seg_max {seg_max}, blk_size {blk_size}: expected 254 and 512");
        ensure!(self.read(NUM_QUEUES, 2) == 1, "num_queues {}, expected 1", self.read(NUM_QUEUES, 2));
        Ok(())
    }

    /// Queue 0 at the maximum size with these rings, then queue_enable; returns queue_enable
    /// as it reads back.
    fn setup_queue(&self, desc: u64, driver: u64, device: u64) -> Result<u64, Msg> {
        self.write(QUEUE_SELECT, 2, 0);
        let max = self.read(QUEUE_SIZE, 2);
        ensure!(max == u64::from(QUEUE_ENTRIES), "queue 0 size {max}, expected {QUEUE_ENTRIES}");
        ensure!(self.read(QUEUE_ENABLE, 2) == 0, "queue 0 enabled before it was set up");
        ensure!(self.read(QUEUE_NOTIFY_OFF, 2) == 0, "queue 0 notify offset {}", self.read(QUEUE_NOTIFY_OFF, 2));
        self.write(QUEUE_SIZE, 2, u64::from(QUEUE_ENTRIES));
        for (field, address) in [(QUEUE_DESC, desc), (QUEUE_DRIVER, driver), (QUEUE_DEVICE, device)] {
            // As Linux's vp_iowrite64_twopart: low half, then high half.
            self.write(field, 4, address & 0xffff_ffff);
            self.write(field + 4, 4, address >> 32);
            let seen = self.read(field, 8);
            ensure!(seen == address, "queue address at {field:#x} reads {seen:#x}, written {address:#x}");
        }
        self.write(QUEUE_ENABLE, 2, 1);
        Ok(self.read(QUEUE_ENABLE, 2))
    }

    /// The whole bring-up, with empty rings in `DMA`: the device is live afterwards.
    fn bring_up(&mut self) -> CaseResult {
        self.negotiate()?;
        self.check_config()?;
        (DESC..HEADER).step_by(8).for_each(|at| ram_write::<u64>(at, 0));
        self.avail_idx = 0;
        self.used_idx = 0;
        let enabled = self.setup_queue(gpa(DESC), gpa(AVAIL), gpa(USED))?;
        ensure!(enabled == 1, "queue_enable reads {enabled} after enabling rings in RAM; status {:#x}", self.status());
        self.add_status(DRIVER_OK);
        let status = self.status();
        ensure!(status == LIVE, "status {status:#x} after DRIVER_OK, expected {LIVE:#x}");
        Ok(())
    }

    fn put_desc(&self, table: u64, index: u16, (addr, len, flags): Buffer, next: u16) {
        let at = table + 16 * u64::from(index);
        ram_write(at, addr);
        ram_write(at + 8, len);
        ram_write(at + 12, flags);
        ram_write(at + 14, next);
    }

    /// Makes `head` available and notifies queue 0.
    fn publish(&mut self, head: u16) {
        ram_write(AVAIL + 4 + 2 * u64::from(self.avail_idx % QUEUE_ENTRIES), head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        ram_write(AVAIL + 2, self.avail_idx);
        self.notify(0);
    }

    fn notify(&self, queue: u16) {
        self.write(NOTIFY + u64::from(NOTIFY_MULTIPLIER) * u64::from(queue), 2, u64::from(queue));
    }

    /// `buffers` as one chain from descriptor 0, made available and notified.
    fn submit(&mut self, buffers: &[Buffer]) {
        let last = buffers.len() - 1;
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let next = if i < last { i as u16 + 1 } else { 0 };
            self.put_desc(DESC, i as u16, (addr, len, if i < last { flags | NEXT } else { flags }), next);
        }
        self.publish(0);
    }

    fn header(kind: u32, sector: u64) {
        ram_write(HEADER, kind);
        ram_write(HEADER + 4, 0u32);
        ram_write(HEADER + 8, sector);
        ram_write(STATUS_BYTE, 0xffu8);
    }

    /// Waits for the next used element: (id, len).
    fn used(&mut self) -> Option<(u32, u32)> {
        for _ in 0..POLLS {
            if ram_read::<u16>(USED + 2) != self.used_idx {
                let element = USED + 4 + 8 * u64::from(self.used_idx % QUEUE_ENTRIES);
                self.used_idx = self.used_idx.wrapping_add(1);
                return Some((ram_read(element), ram_read(element + 4)));
            }
            core::hint::spin_loop();
        }
        None
    }

    /// The chain at descriptor 0 completed, with a queue interrupt, and the device is still
    /// live; returns (status byte, used length).
    fn complete(&mut self, what: &str) -> Result<(u8, u32), Msg> {
        let Some((id, len)) = self.used() else {
            return Err(fail!("{what}: never completed; status {:#x}", self.status()));
        };
        ensure!(id == 0, "{what}: used element for descriptor {id}, expected 0");
        let status = self.status();
        ensure!(status == LIVE, "{what}: status {status:#x} afterwards, expected {LIVE:#x}");
        // What Linux's INTx handler does: read (and so clear) the ISR.
        let isr = self.read(ISR, 1) as u8;
        ensure!(isr & ISR_QUEUE != 0, "{what}: ISR {isr:#x} shows no used buffer notification");
        Ok((ram_read(STATUS_BYTE), len))
    }

    /// A request of `kind` for `sector` with the data buffers `data` between the header and
    /// the status byte; returns (status byte, used length).
    fn request(&mut self, what: &str, kind: u32, sector: u64, data: &[Buffer]) -> Result<(u8, u32), Msg> {
        Self::header(kind, sector);
        let mut chain = [(0, 0, 0); 4];
        chain[0] = (gpa(HEADER), 16, 0);
        chain[1..=data.len()].copy_from_slice(data);
        chain[data.len() + 1] = (gpa(STATUS_BYTE), 1, WRITE);
        self.submit(&chain[..data.len() + 2]);
        self.complete(what)
    }

    /// A request the device must refuse with `expected` as its status, staying live.
    fn refused(&mut self, what: &str, kind: u32, sector: u64, data: &[Buffer], expected: u8) -> CaseResult {
        let (status, _) = self.request(what, kind, sector, data)?;
        ensure!(status == expected, "{what}: request status {status}, expected {expected}");
        self.refused += 1;
        Ok(())
    }

    /// The 512 bytes at DATA are sector `sector` of the disk.
    fn check_sector(sector: u64) -> CaseResult {
        for i in 0..SECTOR {
            let (seen, expected) = (ram_read::<u8>(DATA + i), disk_byte(sector, i));
            ensure!(seen == expected, "sector {sector} byte {i}: {seen:#04x}, expected {expected:#04x}");
        }
        Ok(())
    }

    fn read_sector(&mut self, sector: u64) -> CaseResult {
        ram_fill(DATA, SECTOR, 0xee);
        let (status, len) = self
            .request("read", T_IN, sector, &[(gpa(DATA), SECTOR as u32, WRITE)])
            .map_err(|e| fail!("sector {sector}: {e}"))?;
        ensure!(status == S_OK && len == 513, "read of sector {sector}: status {status}, used length {len}");
        Self::check_sector(sector)
    }

    /// A read through an indirect table: header, data and status in three table entries.
    fn read_sector_indirect(&mut self, sector: u64) -> CaseResult {
        Self::header(T_IN, sector);
        ram_fill(DATA, SECTOR, 0xee);
        self.put_desc(TABLE, 0, (gpa(HEADER), 16, NEXT), 1);
        self.put_desc(TABLE, 1, (gpa(DATA), SECTOR as u32, WRITE | NEXT), 2);
        self.put_desc(TABLE, 2, (gpa(STATUS_BYTE), 1, WRITE), 0);
        self.put_desc(DESC, 0, (gpa(TABLE), 48, INDIRECT), 0);
        self.publish(0);
        let (status, len) = self.complete("indirect read")?;
        ensure!(status == S_OK && len == 513, "indirect read: status {status}, used length {len}");
        Self::check_sector(sector)
    }

    /// After a malformed queue: DEVICE_NEEDS_RESET, nothing completed, the configuration
    /// change interrupt if the device was `live`; a notification changes nothing; then a reset
    /// and a fresh bring-up read sector 1 again.
    fn needs_reset(&mut self, what: &str, live: bool) -> CaseResult {
        let status = self.status();
        ensure!(status & NEEDS_RESET != 0, "{what}: status {status:#x}, expected DEVICE_NEEDS_RESET (0x40)");
        let used = ram_read::<u16>(USED + 2);
        ensure!(used == self.used_idx, "{what}: the device completed something (used index {used})");
        if live {
            // INTx: the ISR holds the configuration change, the PCI status shows the line
            // asserted until the ISR is read.
            let pci_status = cfg_read(DISK_SLOT, PCI_STATUS, 2);
            ensure!(pci_status & STATUS_INTERRUPT != 0, "{what}: PCI status {pci_status:#x} shows no interrupt");
            let isr = self.read(ISR, 1) as u8;
            ensure!(isr == ISR_CONFIG, "{what}: ISR {isr:#x}, expected only the configuration change bit");
            let pci_status = cfg_read(DISK_SLOT, PCI_STATUS, 2);
            ensure!(pci_status & STATUS_INTERRUPT == 0, "{what}: interrupt still shown after reading the ISR");
        }
        self.notify(0);
        let (status, used) = (self.status(), ram_read::<u16>(USED + 2));
        ensure!(
            status & NEEDS_RESET != 0 && used == self.used_idx,
            "{what}: after another notification status {status:#x}, used index {used}"
        );
        self.resets += 1;
        self.bring_up().map_err(|e| fail!("{what}, then a reset: {e}"))?;
        self.read_sector(1).map_err(|e| fail!("{what}, then a reset: {e}"))
    }

    /// A bring-up with these rings, which must not enable; DRIVER_OK is set all the same, as
    /// Linux does without reading queue_enable back.
    fn bad_rings(&mut self, desc: u64, driver: u64, device: u64) -> CaseResult {
        self.negotiate()?;
        let enabled = self.setup_queue(desc, driver, device)?;
        ensure!(enabled == 0, "queue_enable reads {enabled}");
        self.add_status(DRIVER_OK);
        Ok(())
    }

    /// Garbage of every width at every offset of `range` of the BAR, each read back.
    fn garbage_in(&mut self, range: core::ops::Range<u64>, random: &mut Random) {
        for offset in range {
            for width in [1, 2, 4, 8] {
                self.write(offset, width, random.next());
                let _ = self.read(offset, width);
                self.garbage += 1;
            }
        }
    }
}

/// Finds the disk and checks its configuration space: IDs, class, BAR0 (placed and sized),
/// the capabilities. Returns the driver with the BAR's address.
fn find() -> Result<Disk, Msg> {
    let (mut found, mut functions) = (None, 0u32);
    for slot in 0..32u8 {
        for function in 0..8u8 {
            cfg_select(slot, function, 0);
            let id = cfg_read_selected();
            if id == u32::MAX {
                continue;
            }
            functions += 1;
            if id == VIRTIO_BLK << 16 | VIRTIO_VENDOR {
                ensure!(found.is_none(), "a second virtio-blk function at 00:{slot:02x}.{function}");
                found = Some((slot, function));
            }
        }
    }
    ensure!(
        found == Some((DISK_SLOT, 0)),
        "1af4:1042 at {found:?} of {functions} functions on bus 0, expected 00:01.0"
    );
    let slot = DISK_SLOT;
    let class = cfg_read(slot, PCI_CLASS_REVISION, 4);
    ensure!(class == CLASS_REVISION, "class and revision {class:#010x}, expected {CLASS_REVISION:#010x}");
    ensure!(cfg_read(slot, PCI_HEADER_TYPE, 1) == 0, "not a single-function type 0 header");
    ensure!(
        cfg_read(slot, PCI_INTERRUPT_PIN, 1) == 1,
        "interrupt pin {}, expected INTA",
        cfg_read(slot, PCI_INTERRUPT_PIN, 1)
    );
    let command = cfg_read(slot, PCI_COMMAND, 2);
    ensure!(command & COMMAND_MEMORY != 0, "memory decoding is off (command {command:#x})");
    let bar = cfg_read(slot, PCI_BAR0, 4);
    ensure!(bar == BAR0_EXPECTED, "BAR0 {bar:#010x}, expected {BAR0_EXPECTED:#010x} (32-bit memory)");
    // Sized as an OS does: decoding off, all ones, read back, restore.
    cfg_write(slot, PCI_COMMAND, 2, command & !COMMAND_MEMORY);
    cfg_write(slot, PCI_BAR0, 4, u32::MAX);
    let size = !(cfg_read(slot, PCI_BAR0, 4) & !0xf) + 1;
    cfg_write(slot, PCI_BAR0, 4, bar);
    cfg_write(slot, PCI_COMMAND, 2, command);
    ensure!(size == BAR_SIZE, "BAR0 is {size:#x} bytes, expected {BAR_SIZE:#x}");
    ensure!(cfg_read(slot, PCI_BAR0, 4) == bar, "BAR0 not restored after sizing");
    let status = cfg_read(slot, PCI_STATUS, 2);
    ensure!(status & STATUS_CAPABILITIES != 0, "status {status:#x} has no capability list");
    let pci_cfg_cap = check_capabilities(slot)?;
    Ok(Disk { bar: u64::from(bar), pci_cfg_cap, avail_idx: 0, used_idx: 0, resets: 0, refused: 0, garbage: 0 })
}

fn cfg_read_selected() -> u32 {
    let value: u32;
    // SAFETY: as in `outl`.
    unsafe { asm!("in eax, dx", in("dx") CONFIG_DATA, out("eax") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// A virtio capability (`struct virtio_pci_cap`, and the notify multiplier after it).
#[derive(Clone, Copy)]
struct VirtioCap {
    /// Its offset in configuration space.
    at: u8,
    cap_len: u32,
    bar: u32,
    offset: u32,
    length: u32,
    /// `notify_off_multiplier`, for the notify capability (0 for the others).
    multiplier: u32,
}

/// Walks the capability list: MSI-X with its table and pending bits in BAR0, MSI off, and each
/// virtio structure once, in BAR0 where the hypervisor places it (other capabilities are
/// skipped). Returns the offset of the PCI
/// configuration access capability.
fn check_capabilities(slot: u8) -> Result<u8, Msg> {
    let mut virtio: [Option<VirtioCap>; 6] = [None; 6];
    let mut msix = false;
    let mut at = cfg_read(slot, PCI_CAPABILITIES, 1) as u8 & 0xfc;
    let mut count = 0;
    while at != 0 {
        count += 1;
        ensure!(count <= 48, "the capability list does not end");
        ensure!(at >= 0x40, "capability at {at:#x}, inside the header");
        let id = cfg_read(slot, at, 1) as u8;
        match id {
            CAP_MSIX => {
                let control = cfg_read(slot, at + 2, 2);
                let (table, pba) = (cfg_read(slot, at + 4, 4), cfg_read(slot, at + 8, 4));
                ensure!(
                    (control & 0x7ff) + 1 == MSIX_VECTORS && control & 0x8000 == 0,
                    "MSI-X control {control:#x}: expected {MSIX_VECTORS} vectors, disabled"
                );
                ensure!(
                    table == MSIX_TABLE && pba == MSIX_PBA,
                    "MSI-X table {table:#x}, pending bits {pba:#x}: expected BAR0 + {MSIX_TABLE:#x}, + {MSIX_PBA:#x}"
                );
                msix = true;
            }
            CAP_VENDOR => {
                let cap_len = cfg_read(slot, at + 2, 1);
                let cfg_type = cfg_read(slot, at + 3, 1) as usize;
                ensure!((1..=5).contains(&cfg_type), "virtio capability at {at:#x} of type {cfg_type}");
                ensure!(virtio[cfg_type].is_none(), "a second {} capability at {at:#x}", CFG_NAMES[cfg_type]);
                let multiplier = if cfg_type == usize::from(CFG_NOTIFY) { cfg_read(slot, at + 16, 4) } else { 0 };
                virtio[cfg_type] = Some(VirtioCap {
                    at,
                    cap_len,
                    bar: cfg_read(slot, at + 4, 1),
                    offset: cfg_read(slot, at + 8, 4),
                    length: cfg_read(slot, at + 12, 4),
                    multiplier,
                });
            }
            // Off, as after reset: completions and configuration changes come through INTx.
            CAP_MSI => {
                let control = cfg_read(slot, at + 2, 2);
                ensure!(control & 1 == 0, "MSI control {control:#x}: MSI is on before the driver turned it on");
            }
            // Others (power management, PCI Express) are no business of this driver's.
            _ => {}
        }
        at = cfg_read(slot, at + 1, 1) as u8 & 0xfc;
    }
    ensure!(msix, "no MSI-X capability");
    // (type, offset in BAR0, least length, cap_len).
    let expected = [
        (CFG_COMMON, COMMON, COMMON_LEN, 16),
        (CFG_NOTIFY, NOTIFY, 2, 20),
        (CFG_ISR, ISR, 1, 16),
        (CFG_DEVICE, DEVICE_CONFIG, 24, 16),
    ];
    for (cfg_type, offset, least, cap_len) in expected {
        let name = CFG_NAMES[usize::from(cfg_type)];
        let Some(VirtioCap { at, cap_len: len, bar, offset: start, length, multiplier }) =
            virtio[usize::from(cfg_type)]
        else {
            return Err(fail!("no {name} capability"));
        };
        ensure!(
            len >= cap_len && bar == 0 && u64::from(start) == offset && length >= least,
            "{name} capability at {at:#x}: cap_len {len}, BAR {bar}, offset {start:#x}, length {length:#x}; \
             expected BAR0 + {offset:#x}, at least {least:#x} bytes"
        );
        ensure!(start + length <= BAR_SIZE, "{name} structure runs past BAR0");
        ensure!(
            cfg_type != CFG_NOTIFY || multiplier == NOTIFY_MULTIPLIER,
            "notify_off_multiplier {multiplier}, expected {NOTIFY_MULTIPLIER}"
        );
    }
    let Some(VirtioCap { at, cap_len: len, .. }) = virtio[usize::from(CFG_PCI)] else {
        return Err(fail!("no PCI configuration access capability"));
    };
    ensure!(len >= 20, "PCI configuration access capability of {len} bytes");
    Ok(at)
}

/// The PCI configuration access window: BAR0 registers through configuration space.
fn window(disk: &Disk, offset: u32, length: u32) -> u32 {
    let cap = disk.pci_cfg_cap;
    cfg_write(DISK_SLOT, cap + 4, 1, 0);
    cfg_write(DISK_SLOT, cap + 8, 4, offset);
    cfg_write(DISK_SLOT, cap + 12, 4, length);
    cfg_read(DISK_SLOT, cap + 16, length as u8)
}

/// The case: see the module's description.
pub fn virtio_hostile() -> CaseResult {
    ensure!(gpa(DMA_LEN as u64) <= RAM_SIZE, "the DMA area is not in the first {RAM_SIZE:#x} bytes");
    let mut disk = find()?;
    ensure!(window(&disk, 0x12, 2) == 1, "num_queues through the configuration window");
    ensure!(window(&disk, DEVICE_CONFIG as u32, 4) == DISK_SECTORS as u32, "capacity through the configuration window");

    normal_path(&mut disk)?;
    refused_requests(&mut disk)?;
    malformed_queues(&mut disk)?;
    garbage(&mut disk)?;

    // The written sector is still there: resets do not touch the disk's contents.
    ram_fill(DATA, SECTOR, 0);
    let (status, _) = disk.request("read of the written sector", T_IN, 2, &[(gpa(DATA), SECTOR as u32, WRITE)])?;
    ensure!(status == S_OK && (0..SECTOR).all(|i| ram_read::<u8>(DATA + i) == 0x5a), "sector 2 lost what was written");
    println!(
        "case virtio-hostile: {} malformed queues, each needed a reset; {} requests refused with a status; \
         {} garbage register writes",
        disk.resets, disk.refused, disk.garbage
    );
    Ok(())
}

/// Bring-up, reads (direct, indirect, with the header in two pieces, the last sector, two
/// sectors), GET_ID, a write read back, a flush.
fn normal_path(disk: &mut Disk) -> CaseResult {
    disk.bring_up()?;
    disk.read_sector(1)?;
    disk.read_sector(0)?;
    disk.read_sector(DISK_SECTORS - 1)?;
    disk.read_sector_indirect(7)?;

    Disk::header(T_IN, 3);
    ram_fill(DATA, SECTOR, 0xee);
    disk.submit(&[
        (gpa(HEADER), 8, 0),
        (gpa(HEADER + 8), 8, 0),
        (gpa(DATA), SECTOR as u32, WRITE),
        (gpa(STATUS_BYTE), 1, WRITE),
    ]);
    let (status, _) = disk.complete("read with the header in two descriptors")?;
    ensure!(status == S_OK, "read with the header in two descriptors: status {status}");
    Disk::check_sector(3)?;

    ram_fill(DATA, 2 * SECTOR, 0xee);
    let (status, len) = disk.request("two-sector read", T_IN, 5, &[(gpa(DATA), 2 * SECTOR as u32, WRITE)])?;
    ensure!(status == S_OK && len == 1025, "two-sector read: status {status}, used length {len}");
    Disk::check_sector(5)?;

    ram_fill(DATA, 20, 0);
    let (status, _) = disk.request("GET_ID", T_GET_ID, 0, &[(gpa(DATA), 20, WRITE)])?;
    let id_ok = (0..20).all(|i| ram_read::<u8>(DATA + i) == DISK_ID.get(i as usize).copied().unwrap_or(0));
    ensure!(status == S_OK && id_ok, "GET_ID: status {status}, or the ID is not {DISK_ID:?}");

    ram_fill(DATA, SECTOR, 0x5a);
    let (status, _) = disk.request("write of sector 2", T_OUT, 2, &[(gpa(DATA), SECTOR as u32, 0)])?;
    ensure!(status == S_OK, "write of sector 2: status {status}");
    ram_fill(DATA, SECTOR, 0);
    let (status, _) = disk.request("read of the written sector", T_IN, 2, &[(gpa(DATA), SECTOR as u32, WRITE)])?;
    ensure!(status == S_OK && (0..SECTOR).all(|i| ram_read::<u8>(DATA + i) == 0x5a), "sector 2 reads back otherwise");
    let (status, _) = disk.request("flush", T_FLUSH, 0, &[])?;
    ensure!(status == S_OK, "flush: status {status}");
    Ok(())
}

/// Requests the device completes with an error status: they are well-formed chains, so the
/// device stays live.
fn refused_requests(disk: &mut Disk) -> CaseResult {
    let sector = (gpa(DATA), SECTOR as u32, WRITE);
    disk.refused("read past the end", T_IN, DISK_SECTORS, &[sector], S_IOERR)?;
    disk.refused("read across the end", T_IN, DISK_SECTORS - 1, &[(gpa(DATA), 2 * SECTOR as u32, WRITE)], S_IOERR)?;
    disk.refused("read of sector 2^55 (the byte offset overflows)", T_IN, 1 << 55, &[sector], S_IOERR)?;
    disk.refused("read of sector 2^64-1", T_IN, u64::MAX, &[sector], S_IOERR)?;
    disk.refused("read of 100 bytes", T_IN, 1, &[(gpa(DATA), 100, WRITE)], S_IOERR)?;
    disk.refused("write past the end", T_OUT, DISK_SECTORS, &[(gpa(DATA), SECTOR as u32, 0)], S_IOERR)?;
    disk.refused("request type 0x7777", 0x7777, 0, &[sector], S_UNSUPP)?;
    disk.read_sector(1)
}

/// Writes the header of a read of sector 1; returns its buffer.
fn read_header() -> Buffer {
    Disk::header(T_IN, 1);
    (gpa(HEADER), 16, 0)
}

/// The status byte's buffer.
fn status() -> Buffer {
    (gpa(STATUS_BYTE), 1, WRITE)
}

/// A malformed queue: what it is, whether the device is live when it sees it (then a
/// configuration change interrupt is due), and how the driver makes it.
type Malformed = (&'static str, bool, fn(&mut Disk) -> CaseResult);

const MALFORMED: [Malformed; 19] = [
    // (a) An available entry naming a descriptor beyond the queue.
    ("available entry naming descriptor 256 of 256", true, |disk| {
        disk.put_desc(DESC, 0, read_header(), 0);
        disk.publish(QUEUE_ENTRIES);
        Ok(())
    }),
    // (b) A chain that loops (device-readable throughout, so only the loop is wrong).
    ("descriptor chain 0 -> 1 -> 0", true, |disk| {
        disk.put_desc(DESC, 0, (gpa(HEADER), 16, NEXT), 1);
        disk.put_desc(DESC, 1, (gpa(DATA), SECTOR as u32, NEXT), 0);
        disk.publish(0);
        Ok(())
    }),
    // (c) Indirect tables: a length that is not a multiple of 16, an indirect descriptor inside
    // one, indirect together with NEXT, a NEXT beyond the table.
    ("indirect table of 40 bytes", true, |disk| {
        disk.put_desc(TABLE, 0, (read_header().0, 16, NEXT), 1);
        disk.put_desc(TABLE, 1, (gpa(DATA), SECTOR as u32, WRITE | NEXT), 2);
        disk.put_desc(TABLE, 2, status(), 0);
        disk.put_desc(DESC, 0, (gpa(TABLE), 40, INDIRECT), 0);
        disk.publish(0);
        Ok(())
    }),
    ("indirect descriptor inside an indirect table", true, |disk| {
        disk.put_desc(TABLE + 0x100, 0, (gpa(DATA), SECTOR as u32, WRITE | NEXT), 1);
        disk.put_desc(TABLE + 0x100, 1, status(), 0);
        disk.put_desc(TABLE, 0, (read_header().0, 16, NEXT), 1);
        disk.put_desc(TABLE, 1, (gpa(TABLE + 0x100), 32, INDIRECT), 0);
        disk.put_desc(DESC, 0, (gpa(TABLE), 32, INDIRECT), 0);
        disk.publish(0);
        Ok(())
    }),
    ("indirect descriptor with NEXT", true, |disk| {
        disk.put_desc(TABLE, 0, (read_header().0, 16, NEXT), 1);
        disk.put_desc(TABLE, 1, (gpa(DATA), SECTOR as u32, WRITE | NEXT), 2);
        disk.put_desc(TABLE, 2, status(), 0);
        disk.put_desc(DESC, 0, (gpa(TABLE), 48, INDIRECT | NEXT), 1);
        disk.put_desc(DESC, 1, status(), 0);
        disk.publish(0);
        Ok(())
    }),
    ("indirect descriptor chaining past its table", true, |disk| {
        disk.put_desc(TABLE, 0, (read_header().0, 16, NEXT), 1);
        disk.put_desc(TABLE, 1, (gpa(DATA), SECTOR as u32, WRITE | NEXT), 3);
        disk.put_desc(TABLE, 2, status(), 0);
        disk.put_desc(DESC, 0, (gpa(TABLE), 48, INDIRECT), 0);
        disk.publish(0);
        Ok(())
    }),
    // (d) Data buffers beyond guest RAM: far beyond, and wrapping around the address space.
    ("data buffer at 0xffff_ffff_0000", true, |disk| {
        disk.submit(&[read_header(), (0xffff_ffff_0000, SECTOR as u32, WRITE), status()]);
        Ok(())
    }),
    ("data buffer wrapping around 2^64", true, |disk| {
        disk.submit(&[read_header(), (u64::MAX - 0xff, SECTOR as u32, WRITE), status()]);
        Ok(())
    }),
    // (e) The available index further ahead of the device than the queue has entries.
    ("available index 257 ahead in a queue of 256", true, |disk| {
        disk.put_desc(DESC, 0, read_header(), 0);
        ram_write(AVAIL + 2, disk.avail_idx.wrapping_add(QUEUE_ENTRIES + 1));
        disk.notify(0);
        Ok(())
    }),
    // (f) Rings outside guest RAM, or misaligned, when the queue is enabled.
    ("available ring across the end of RAM", false, |disk| disk.bad_rings(gpa(DESC), RAM_SIZE - 0x100, gpa(USED))),
    ("descriptor table at 4 GiB", false, |disk| disk.bad_rings(4 << 30, gpa(AVAIL), gpa(USED))),
    ("descriptor table at 2^63", false, |disk| disk.bad_rings(1 << 63, gpa(AVAIL), gpa(USED))),
    ("used ring at 2^64 - 256 (its end wraps)", false, |disk| disk.bad_rings(gpa(DESC), gpa(AVAIL), u64::MAX - 0xff)),
    ("used ring 2 bytes off its alignment", false, |disk| disk.bad_rings(gpa(DESC), gpa(AVAIL), gpa(USED) + 2)),
    // (g) Chains of more than 4 GiB: 256 descriptors each covering all of RAM, and
    // descriptors of 0xffff_ffff bytes (more than RAM); then chains that are no request.
    ("a chain of 256 descriptors of 16 MiB (4 GiB in all)", true, |disk| {
        for i in 0..QUEUE_ENTRIES {
            let last = i == QUEUE_ENTRIES - 1;
            disk.put_desc(DESC, i, (0, RAM_SIZE as u32, if last { 0 } else { NEXT }), if last { 0 } else { i + 1 });
        }
        disk.publish(0);
        Ok(())
    }),
    ("a chain of four descriptors of 0xffff_ffff bytes", true, |disk| {
        let huge = (gpa(HEADER), u32::MAX, 0);
        disk.submit(&[huge, huge, huge, huge]);
        Ok(())
    }),
    ("a request header of 8 bytes", true, |disk| {
        disk.submit(&[(read_header().0, 8, 0), status()]);
        Ok(())
    }),
    ("a request without a status byte", true, |disk| {
        disk.submit(&[read_header(), (gpa(DATA), SECTOR as u32, 0)]);
        Ok(())
    }),
    ("a device-readable buffer after a writable one", true, |disk| {
        disk.submit(&[read_header(), status(), (gpa(DATA), SECTOR as u32, 0)]);
        Ok(())
    }),
];

/// Every malformed queue, each followed by the checks and the reset of `Disk::needs_reset`.
fn malformed_queues(disk: &mut Disk) -> CaseResult {
    for (what, live, make) in MALFORMED {
        make(disk).map_err(|e| fail!("{what}: {e}"))?;
        disk.needs_reset(what, live)?;
    }
    Ok(())
}

/// Garbage in every register, notifications of queues that do not exist; after each round
/// the device still comes up and reads.
fn garbage(disk: &mut Disk) -> CaseResult {
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    // Common configuration (and the bytes after it), from reset and while live.
    disk.reset()?;
    disk.garbage_in(COMMON..COMMON + 0x40, &mut random);
    disk.bring_up()?;
    disk.garbage_in(COMMON..COMMON + 0x40, &mut random);
    disk.bring_up()?;
    disk.read_sector(1)?;

    // Queues that do not exist, at every width: each of 1 to 64 (the transport keeps a bit
    // per queue) and beyond, up to the end of the notify structure. Nothing happens.
    for queue in (1..=64u64).chain((65..0x400).step_by(31)) {
        for width in [1, 2, 4] {
            disk.write(NOTIFY + u64::from(NOTIFY_MULTIPLIER) * queue, width, random.next());
        }
        let _ = disk.read(NOTIFY + u64::from(NOTIFY_MULTIPLIER) * queue, 4);
    }
    ensure!(disk.status() == LIVE, "status {:#x} after notifying queues that do not exist", disk.status());
    let used = ram_read::<u16>(USED + 2);
    ensure!(used == disk.used_idx, "notifying queues that do not exist completed requests");
    disk.read_sector(1)?;

    // Read-only structures (the device configuration, the ISR, the MSI-X pending bits) and
    // the MSI-X table, with MSI-X off.
    disk.garbage_in(DEVICE_CONFIG..DEVICE_CONFIG + 0x20, &mut random);
    disk.garbage_in(u64::from(MSIX_TABLE)..u64::from(MSIX_TABLE) + 0x20, &mut random);
    disk.garbage_in(ISR..ISR + 4, &mut random);
    disk.garbage_in(u64::from(MSIX_PBA)..u64::from(MSIX_PBA) + 16, &mut random);
    ensure!(disk.status() == LIVE, "status {:#x} after garbage in read-only structures", disk.status());
    disk.check_config()?;
    disk.read_sector(1)?;

    // The configuration window, pointed anywhere in BAR0 (and at other BARs) and written.
    let cap = disk.pci_cfg_cap;
    for _ in 0..128 {
        let r = random.next();
        let length = [1u32, 2, 4, 3][(r & 3) as usize];
        let offset = ((r >> 8) as u32 % 0x6000) & !(length - 1);
        let bar = if r >> 40 & 7 == 0 { (r >> 44) as u32 & 0xff } else { 0 };
        cfg_write(DISK_SLOT, cap + 4, 1, bar);
        cfg_write(DISK_SLOT, cap + 8, 4, offset);
        cfg_write(DISK_SLOT, cap + 12, 4, length);
        let width = [1u8, 2, 4][(r >> 48) as usize % 3];
        cfg_write(DISK_SLOT, cap + 16, width, (r >> 16) as u32);
        let _ = cfg_read(DISK_SLOT, cap + 16, width);
        disk.garbage += 1;
    }
    // Nothing of that reached the rest of configuration space.
    let id = cfg_read(DISK_SLOT, 0, 4);
    ensure!(id == VIRTIO_BLK << 16 | VIRTIO_VENDOR, "ID {id:#x} after writes through the window");
    let bar = cfg_read(DISK_SLOT, PCI_BAR0, 4);
    ensure!(u64::from(bar) == disk.bar, "BAR0 {bar:#x} after writes through the window");
    disk.bring_up()?;
    disk.read_sector(1)?;
    disk.read_sector_indirect(9)
}
