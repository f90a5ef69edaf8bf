//! QEMU's firmware configuration device (fw_cfg, docs/specs/fw_cfg.rst in QEMU): under QEMU the
//! run tool hands over the VM set's ramdisk as the fw_cfg file [`RAMDISK_FILE`], which we read by
//! DMA in one go. The boot loader would copy it from the disk a byte at a time, which on TCG
//! took about a second per megabyte before our first log line.
//!
//! The device is only probed when CPUID says a hypervisor is underneath: on bare hardware the
//! ports may belong to anything.

use x86_64::instructions::port::Port;

use super::memory;
use crate::mm::frames::FRAME_SIZE;

/// The file the run tool passes (`-fw_cfg name=...,file=...`).
const RAMDISK_FILE: &str = crate::ramdisk::FW_CFG_FILE;

const SELECTOR_PORT: u16 = 0x510;
const DATA_PORT: u16 = 0x511;
/// The DMA address register: the high half at 0x514, the low half (which starts it) at 0x518.
const DMA_PORT_HIGH: u16 = 0x514;
const DMA_PORT_LOW: u16 = 0x518;

const SELECT_SIGNATURE: u16 = 0x0000;
const SELECT_ID: u16 = 0x0001;
const SELECT_FILE_DIR: u16 = 0x0019;
/// FW_CFG_ID bit 1: the DMA interface exists.
const ID_DMA: u32 = 1 << 1;

const DMA_CTL_ERROR: u32 = 0x01;
const DMA_CTL_READ: u32 = 0x02;
const DMA_CTL_SELECT: u32 = 0x08;

/// A directory entry: size (big-endian u32), selector (u16), reserved (u16), name (56 bytes).
const DIR_ENTRY_BYTES: usize = 64;
const NAME_BYTES: usize = 56;
/// More entries than any QEMU machine has; a device claiming more is not believed.
const MAX_ENTRIES: u32 = 4096;
/// The largest ramdisk taken from fw_cfg.
const MAX_FILE_BYTES: u32 = 1 << 30;

fn select(key: u16) {
    // SAFETY: fw_cfg's selector register; `present` checked the signature before any use
    // beyond it, and selecting a key has no effect but on the data register.
    unsafe { Port::<u16>::new(SELECTOR_PORT).write(key) };
}

fn read_bytes(buf: &mut [u8]) {
    let mut data = Port::<u8>::new(DATA_PORT);
    for byte in buf {
        // SAFETY: reading fw_cfg's data register only advances its offset in the selected item.
        *byte = unsafe { data.read() };
    }
}

fn read_be32() -> u32 {
    let mut word = [0u8; 4];
    read_bytes(&mut word);
    u32::from_be_bytes(word)
}

/// Whether fw_cfg with DMA is there: only under a hypervisor (CPUID.1:ECX bit 31), then by
/// its "QEMU" signature and its ID.
fn present() -> bool {
    if raw_cpuid::cpuid!(1).ecx & (1 << 31) == 0 {
        return false;
    }
    select(SELECT_SIGNATURE);
    let mut signature = [0u8; 4];
    read_bytes(&mut signature);
    if &signature != b"QEMU" {
        return false;
    }
    select(SELECT_ID);
    let mut id = [0u8; 4];
    read_bytes(&mut id);
    u32::from_le_bytes(id) & ID_DMA != 0
}

/// The selector and size of the file `name`, from the directory.
fn find(name: &str) -> Option<(u16, u32)> {
    select(SELECT_FILE_DIR);
    let count = read_be32().min(MAX_ENTRIES);
    let mut entry = [0u8; DIR_ENTRY_BYTES];
    for _ in 0..count {
        read_bytes(&mut entry);
        let raw_name = &entry[8..8 + NAME_BYTES];
        let len = raw_name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
        if &raw_name[..len] == name.as_bytes() {
            let size = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
            return Some((u16::from_be_bytes([entry[4], entry[5]]), size));
        }
    }
    None
}

/// Reads item `key` (`len` bytes) into host-physical memory at `dest` by DMA.
fn dma_read(key: u16, dest: u64, len: u32) -> Result<(), &'static str> {
    // The access descriptor: control, length (big-endian u32s), address (big-endian u64).
    let descriptor = memory::alloc_zeroed(1, FRAME_SIZE).ok_or("no memory for the DMA descriptor")?;
    let mut bytes = [0u8; 16];
    bytes[0..4].copy_from_slice(&((u32::from(key) << 16) | DMA_CTL_SELECT | DMA_CTL_READ).to_be_bytes());
    bytes[4..8].copy_from_slice(&len.to_be_bytes());
    bytes[8..16].copy_from_slice(&dest.to_be_bytes());
    let control = memory::phys_map().virt(descriptor) as *mut u32;
    // SAFETY: the frame was just allocated for this descriptor and nothing else refers to it.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), control as *mut u8, bytes.len()) };
    // SAFETY: the DMA registers take the descriptor's physical address, big-endian halves;
    // writing the low half starts the transfer, which completes before the write returns
    // (QEMU runs it synchronously) into memory we own: `dest` for `len` bytes.
    unsafe {
        Port::<u32>::new(DMA_PORT_HIGH).write(((descriptor >> 32) as u32).to_be());
        Port::<u32>::new(DMA_PORT_LOW).write((descriptor as u32).to_be());
    }
    // SAFETY: the descriptor frame is ours; the device clears the control word when done.
    let done = u32::from_be(unsafe { core::ptr::read_volatile(control) });
    let _ = memory::free_frames(descriptor, 1);
    match done {
        0 => Ok(()),
        c if c & DMA_CTL_ERROR != 0 => Err("the device reported a DMA error"),
        _ => Err("the DMA transfer did not complete"),
    }
}

/// The ramdisk the run tool passed through fw_cfg, in frames reserved for it for the rest of
/// the run; `None` when there is no fw_cfg or no such file.
pub fn ramdisk() -> Option<&'static [u8]> {
    if !present() {
        return None;
    }
    let (key, size) = find(RAMDISK_FILE)?;
    if size == 0 || size > MAX_FILE_BYTES {
        log::warn!("fw_cfg: {RAMDISK_FILE} has {size} bytes: ignored");
        return None;
    }
    let frames = u64::from(size).div_ceil(FRAME_SIZE);
    let Some(dest) = memory::FRAMES.lock().alloc(frames, FRAME_SIZE) else {
        log::warn!("fw_cfg: no {} KiB of memory for the ramdisk", u64::from(size) >> 10);
        return None;
    };
    if let Err(e) = dma_read(key, dest, size) {
        log::warn!("fw_cfg: reading {RAMDISK_FILE}: {e}");
        let _ = memory::free_frames(dest, frames);
        return None;
    }
    // SAFETY: the frames were allocated above and are never freed: the ramdisk lives as long
    // as the hypervisor, read-only from here on.
    Some(unsafe { core::slice::from_raw_parts(memory::phys_map().virt(dest) as *const u8, size as usize) })
}
