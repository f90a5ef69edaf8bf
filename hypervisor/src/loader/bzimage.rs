//! A loader for Linux x86 bzImages, using the 64-bit entry of the boot protocol
//! (`Documentation/arch/x86/boot.rst`).
//!
//! The protected-mode part of the image (everything after the real-mode setup sectors) is copied
//! to its load address, the zero page (`struct boot_params`) is built from the image's setup
//! header plus what the loader provides (command line, initrd, e820 map, RSDP), and the caller
//! starts the vCPU in 64-bit mode at [`LoadedLinux::entry`] (load address + 0x200) with RSI
//! pointing at the zero page and the kernel, zero page, command line and initrd identity-mapped.
//!
//! Placement follows the protocol's rule for the kernel's runtime start address: a non-relocatable
//! kernel runs at `pref_address`; a relocatable one runs at its load address aligned up to
//! `kernel_alignment`, but never below `pref_address` (a kernel loaded lower moves itself up to
//! `pref_address` before decompressing). So the kernel is loaded at the lowest
//! `kernel_alignment`-aligned address at or above `pref_address` (normally 16 MiB) where the
//! whole `init_size` area fits inside one RAM range of the e820 map, below 4 GiB unless the
//! kernel sets `XLF_CAN_BE_LOADED_ABOVE_4G`. The initrd goes at the highest page-aligned address
//! that keeps it above 1 MiB, below `initrd_addr_max` and guest RAM, and away from everything
//! else.
//!
//! `loadflags.CAN_USE_HEAP` and `heap_end_ptr` only matter to the real-mode setup code, which the
//! 64-bit entry skips, so they are left as the image has them. The whole image is validated and
//! every placement decided before guest memory is touched, so a refused image leaves guest
//! memory untouched.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::{GuestMemory, MemError, Size};

/// Size of the zero page (`struct boot_params`).
pub const ZERO_PAGE_SIZE: u64 = 4096;
/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved memory.
pub const E820_RESERVED: u32 = 2;
/// ACPI reclaimable memory.
pub const E820_ACPI: u32 = 3;
/// The most e820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;

/// Oldest protocol version accepted: 2.12 introduced `xloadflags`.
const MIN_PROTOCOL: u16 = 0x020C;
const BOOT_FLAG: u16 = 0xAA55;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB4: u64 = 1 << 32;

// Offsets in the image and in the zero page (the setup header sits at the same offset in both).
const OFF_SETUP_SECTS: usize = 0x1F1;
const OFF_BOOT_FLAG: usize = 0x1FE;
const OFF_JUMP_LEN: usize = 0x201;
const OFF_HEADER: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_TYPE_OF_LOADER: usize = 0x210;
const OFF_LOADFLAGS: usize = 0x211;
const OFF_RAMDISK_IMAGE: usize = 0x218;
const OFF_RAMDISK_SIZE: usize = 0x21C;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_INITRD_ADDR_MAX: usize = 0x22C;
const OFF_KERNEL_ALIGNMENT: usize = 0x230;
const OFF_RELOCATABLE: usize = 0x234;
const OFF_XLOADFLAGS: usize = 0x236;
const OFF_CMDLINE_SIZE: usize = 0x238;
const OFF_HARDWARE_SUBARCH: usize = 0x23C;
const OFF_HARDWARE_SUBARCH_DATA: usize = 0x240;
const OFF_SETUP_DATA: usize = 0x250;
const OFF_PREF_ADDRESS: usize = 0x258;
const OFF_INIT_SIZE: usize = 0x260;
// Zero-page-only fields.
const ZP_ACPI_RSDP_ADDR: usize = 0x070;
const ZP_EXT_RAMDISK_IMAGE: usize = 0x0C0;
const ZP_EXT_RAMDISK_SIZE: usize = 0x0C4;
const ZP_EXT_CMD_LINE_PTR: usize = 0x0C8;
const ZP_E820_ENTRIES: usize = 0x1E8;
const ZP_E820_TABLE: usize = 0x2D0;
const E820_ENTRY_SIZE: usize = 20;

/// A 2.12 header reaches at least to the end of `handover_offset`.
const MIN_HEADER_END: usize = 0x268;
/// `struct boot_params` has room for the setup header up to here.
const MAX_HEADER_END: usize = 0x290;

const LOADED_HIGH: u8 = 1 << 0;
const XLF_KERNEL_64: u16 = 1 << 0;
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
/// `type_of_loader` for a loader without an assigned id.
const LOADER_UNDEFINED: u8 = 0xFF;

/// One entry of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// [`E820_RAM`], [`E820_RESERVED`], [`E820_ACPI`], ...
    pub kind: u32,
}

/// Where the caller wants things and what the guest has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxLayout {
    /// Guest RAM size in bytes: nothing is placed at or above it.
    pub ram_bytes: u64,
    /// The guest's memory map, copied into the zero page and used for placement (only
    /// [`E820_RAM`] ranges receive the kernel and the initrd).
    pub e820: Vec<E820Entry>,
    /// Guest-physical address of the 4 KiB zero page.
    pub zero_page_gpa: u64,
    /// Guest-physical address of the command-line buffer.
    pub cmdline_gpa: u64,
    /// Size of the command-line buffer in bytes, including the terminating NUL.
    pub cmdline_max: u64,
    /// Guest-physical address of the ACPI RSDP, passed in `acpi_rsdp_addr` to kernels with
    /// protocol 2.14 or newer (older kernels find it by scanning the BIOS area).
    pub rsdp: Option<u64>,
}

/// Where a loaded kernel ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedLinux {
    /// The 64-bit entry point: load address + 0x200.
    pub entry: u64,
    /// Guest-physical address of the zero page (pass it in RSI).
    pub zero_page: u64,
    /// Load address of the protected-mode kernel.
    pub kernel_start: u64,
    /// End of the memory the kernel needs before it reads the memory map: load address plus
    /// `init_size` (or the kernel's length if that is larger). Identity-map up to here.
    pub kernel_end: u64,
    /// Guest-physical address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// Boot protocol version (0x020F for 2.15).
    pub protocol: u16,
}

/// Which loader-provided area a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootArea {
    /// The zero page.
    ZeroPage,
    /// The command-line buffer.
    Cmdline,
}

impl fmt::Display for BootArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BootArea::ZeroPage => "zero page",
            BootArea::Cmdline => "command-line buffer",
        })
    }
}

/// Why a kernel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxError {
    /// The image ends before (or right at) the end of its real-mode setup.
    TooShort {
        /// Image length in bytes.
        len: usize,
        /// `setup_sects` (0 means 4).
        setup_sects: u8,
        /// `(setup_sects + 1) * 512`.
        setup_size: usize,
    },
    /// No 0xAA55 at offset 0x1FE.
    NoBootSignature {
        /// The 16-bit value found.
        found: u16,
    },
    /// No "HdrS" at offset 0x202.
    NoHdrS {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The boot protocol is older than 2.12.
    ProtocolTooOld {
        /// The `version` field.
        version: u16,
    },
    /// The setup header length (from the jump at 0x200) is outside what protocol 2.12 and
    /// `struct boot_params` allow.
    BadHeaderLength {
        /// Offset of the end of the setup header: 0x202 + the byte at 0x201.
        end: usize,
    },
    /// `xloadflags` lacks `XLF_KERNEL_64`.
    No64BitEntry {
        /// The `xloadflags` field.
        xloadflags: u16,
    },
    /// `loadflags` lacks `LOADED_HIGH`: a zImage that wants to be loaded at 0x10000.
    NotLoadedHigh {
        /// The `loadflags` field.
        loadflags: u8,
    },
    /// A relocatable kernel's `kernel_alignment` is not a power of two.
    BadKernelAlignment {
        /// The `kernel_alignment` field.
        alignment: u32,
    },
    /// The command line contains a NUL byte.
    CmdlineHasNul {
        /// Byte offset of the NUL.
        offset: usize,
    },
    /// The command line is longer than the kernel accepts (`cmdline_size`).
    CmdlineTooLongForKernel {
        /// Length in bytes, without the NUL.
        len: usize,
        /// The `cmdline_size` field.
        cmdline_size: u32,
    },
    /// The command line and its NUL do not fit in the caller's buffer.
    CmdlineTooLongForBuffer {
        /// Length in bytes, without the NUL.
        len: usize,
        /// [`LinuxLayout::cmdline_max`].
        cmdline_max: u64,
    },
    /// More e820 entries than the zero page holds.
    TooManyE820Entries {
        /// Number of entries in the layout.
        count: usize,
    },
    /// An e820 entry wraps around the address space.
    E820Overflow {
        /// Index in the layout's map.
        index: usize,
        /// Its `addr`.
        addr: u64,
        /// Its `size`.
        size: u64,
    },
    /// The zero page or command-line buffer lies outside guest memory.
    AreaOutsideMemory {
        /// Which area.
        area: BootArea,
        /// Its guest-physical address.
        gpa: u64,
        /// Its length in bytes.
        len: u64,
        /// Guest memory size in bytes.
        mem_size: u64,
    },
    /// The zero page and the command line overlap.
    AreasOverlap {
        /// Zero page address.
        zero_page: u64,
        /// Command-line address.
        cmdline: u64,
        /// Command-line length including the NUL.
        cmdline_len: u64,
    },
    /// No RAM range has room for the kernel's `init_size` area at an allowed address (at or
    /// above 1 MiB, for a fixed kernel too).
    KernelDoesNotFit {
        /// Bytes needed from the load address: max(`init_size`, protected-mode kernel length).
        need: u64,
        /// The `init_size` field.
        init_size: u32,
        /// The `pref_address` field.
        pref_address: u64,
        /// `kernel_alignment` for a relocatable kernel, `None` for a fixed one.
        alignment: Option<u32>,
        /// Placement limit: guest RAM size, or 4 GiB when lower and the kernel cannot be loaded
        /// above 4 GiB.
        limit: u64,
    },
    /// No RAM range below the initrd limit has room for the initrd.
    InitrdDoesNotFit {
        /// Initrd size in bytes.
        size: u64,
        /// The `initrd_addr_max` field (last byte the initrd may occupy).
        initrd_addr_max: u32,
        /// Guest RAM size in bytes.
        ram_bytes: u64,
    },
    /// Guest memory refused a write (cannot happen after validation unless the memory is
    /// inconsistent about its size).
    Memory(MemError),
}

fn version_str(v: u16) -> impl fmt::Display {
    struct V(u16);
    impl fmt::Display for V {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{}.{:02} ({:#06x})", self.0 >> 8, self.0 & 0xff, self.0)
        }
    }
    V(v)
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LinuxError::TooShort { len, setup_sects, setup_size } => write!(
                f,
                "image is {len} bytes, not longer than its {setup_size}-byte real-mode setup (setup_sects \
                 {setup_sects}): no protected-mode kernel follows"
            ),
            LinuxError::NoBootSignature { found } => {
                write!(f, "not a Linux kernel: boot_flag at 0x1fe is {found:#06x}, expected 0xaa55")
            }
            LinuxError::NoHdrS { found } => write!(
                f,
                "not a bzImage: header magic at 0x202 is {found:02x?}, expected \"HdrS\" (boot protocol 2.00+)"
            ),
            LinuxError::ProtocolTooOld { version } => write!(
                f,
                "boot protocol {} is older than 2.12 (0x020c), the first with xloadflags and a 64-bit entry",
                version_str(version)
            ),
            LinuxError::BadHeaderLength { end } => write!(
                f,
                "setup header ends at {end:#x} (0x202 + byte at 0x201): protocol 2.12 headers end at or after \
                 {MIN_HEADER_END:#x} and boot_params holds them up to {MAX_HEADER_END:#x}"
            ),
            LinuxError::No64BitEntry { xloadflags } => {
                write!(f, "kernel has no 64-bit entry point (xloadflags {xloadflags:#06x} lacks XLF_KERNEL_64, bit 0)")
            }
            LinuxError::NotLoadedHigh { loadflags } => write!(
                f,
                "loadflags {loadflags:#04x} lacks LOADED_HIGH (bit 0): zImage kernels loaded at 0x10000 are not \
                 supported"
            ),
            LinuxError::BadKernelAlignment { alignment } => {
                write!(f, "kernel_alignment {alignment:#x} of a relocatable kernel is not a power of two")
            }
            LinuxError::CmdlineHasNul { offset } => write!(f, "command line contains a NUL byte at offset {offset}"),
            LinuxError::CmdlineTooLongForKernel { len, cmdline_size } => {
                write!(f, "command line is {len} bytes, longer than the kernel's cmdline_size of {cmdline_size} bytes")
            }
            LinuxError::CmdlineTooLongForBuffer { len, cmdline_max } => write!(
                f,
                "command line is {len} bytes, which with its NUL does not fit the {cmdline_max}-byte command-line \
                 buffer"
            ),
            LinuxError::TooManyE820Entries { count } => {
                write!(f, "memory map has {count} entries, the zero page holds at most {E820_MAX_ENTRIES}")
            }
            LinuxError::E820Overflow { index, addr, size } => {
                write!(f, "memory map entry {index} ({addr:#x}+{size:#x}) wraps around the address space")
            }
            LinuxError::AreaOutsideMemory { area, gpa, len, mem_size } => {
                write!(f, "{area} at {gpa:#x}+{len:#x} lies outside guest memory ({})", Size(mem_size))
            }
            LinuxError::AreasOverlap { zero_page, cmdline, cmdline_len } => write!(
                f,
                "zero page at {zero_page:#x}+0x1000 overlaps the command line at {cmdline:#x}+{cmdline_len:#x}"
            ),
            LinuxError::KernelDoesNotFit { need, init_size, pref_address, alignment, limit } => {
                write!(f, "kernel needs {need:#x} bytes (init_size {init_size:#x}) ")?;
                match alignment {
                    Some(a) => write!(f, "at a {a:#x}-aligned address at or above pref_address {pref_address:#x}")?,
                    None => write!(f, "at its fixed address pref_address {pref_address:#x} (not relocatable)")?,
                }
                write!(
                    f,
                    " inside one RAM range of the memory map below {limit:#x}, and there is none ({} of guest RAM)",
                    Size(limit)
                )
            }
            LinuxError::InitrdDoesNotFit { size, initrd_addr_max, ram_bytes } => write!(
                f,
                "initrd of {size:#x} bytes ({}) does not fit in free RAM between 1 MiB and initrd_addr_max {initrd_addr_max:#x} \
                 and the end of guest RAM ({}), apart from the kernel, zero page and command line",
                Size(size),
                Size(ram_bytes)
            ),
            LinuxError::Memory(e) => write!(f, "loading kernel: {e}"),
        }
    }
}

impl From<MemError> for LinuxError {
    fn from(e: MemError) -> Self {
        LinuxError::Memory(e)
    }
}

fn u8_at(b: &[u8], off: usize) -> Option<u8> {
    b.get(off).copied()
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s: [u8; 2] = b.get(off..off.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(s))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

/// Writes `data` at `off` in the zero page. Every offset used is a constant inside the page or
/// bounded by a check (at most 128 e820 entries), so nothing is ever dropped.
fn put(page: &mut [u8], off: usize, data: &[u8]) {
    if let Some(dst) = off.checked_add(data.len()).and_then(|end| page.get_mut(off..end)) {
        dst.copy_from_slice(data);
    }
}

// ---------------------------------------------------------------------------------------------
// Placement helpers, shared with the Multiboot loader.

/// A half-open guest-physical range `[start, end)`.
pub(crate) type Range = (u64, u64);

/// The RAM ranges of `e820`, clipped to `[0, limit)`, sorted and with touching or overlapping
/// ranges merged. `Err(index)` names an entry that wraps around the address space.
pub(crate) fn ram_ranges(e820: &[E820Entry], limit: u64) -> Result<Vec<Range>, usize> {
    let mut v: Vec<Range> = Vec::new();
    for (index, e) in e820.iter().enumerate() {
        let end = e.addr.checked_add(e.size).ok_or(index)?;
        if e.kind != E820_RAM {
            continue;
        }
        let end = end.min(limit);
        if e.addr < end {
            v.push((e.addr, end));
        }
    }
    v.sort_unstable();
    let mut merged: Vec<Range> = Vec::with_capacity(v.len());
    for r in v {
        match merged.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

/// Whether `[start, end)` lies inside one of `ram`.
pub(crate) fn in_ram(ram: &[Range], start: u64, end: u64) -> bool {
    ram.iter().any(|&(lo, hi)| lo <= start && end <= hi)
}

/// Whether `[s, e)` and `r` share a byte (empty ranges share none).
pub(crate) fn overlaps(s: u64, e: u64, r: Range) -> bool {
    s < e && r.0 < r.1 && s < r.1 && r.0 < e
}

/// `x` rounded up to `align` (a power of two), `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(x.checked_add(mask)? & !mask)
}

/// The lowest `align`-aligned address `s >= min` such that `[s, s + len)` lies inside one of `ram`
/// and overlaps none of `avoid`. `align` must be a power of two.
pub(crate) fn lowest_fit(ram: &[Range], min: u64, len: u64, align: u64, avoid: &[Range]) -> Option<u64> {
    'ranges: for &(lo, hi) in ram {
        let Some(mut s) = align_up(lo.max(min), align) else { break };
        // Each step moves past one avoided range, which is then never hit again.
        loop {
            let Some(e) = s.checked_add(len) else { break 'ranges };
            if e > hi {
                continue 'ranges;
            }
            match avoid.iter().find(|&&r| overlaps(s, e, r)) {
                Some(&(_, r_end)) => match align_up(r_end, align) {
                    Some(next) => s = next,
                    None => break 'ranges,
                },
                None => return Some(s),
            }
        }
    }
    None
}

/// The highest `align`-aligned address `s` such that `[s, s + len)` lies inside one of `ram` and
/// overlaps none of `avoid`. `align` must be a power of two.
pub(crate) fn highest_fit(ram: &[Range], len: u64, align: u64, avoid: &[Range]) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    for &(lo, hi) in ram.iter().rev() {
        let mut top = hi;
        // Each step moves below one avoided range, which is then never hit again.
        while let Some(s) = top.checked_sub(len).map(|s| s & !mask) {
            if s < lo {
                break;
            }
            let e = s + len; // <= top
            match avoid.iter().find(|&&r| overlaps(s, e, r)) {
                Some(&(r_start, _)) => top = r_start,
                None => return Some(s),
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------

/// Loads a bzImage for the 64-bit boot protocol: the protected-mode kernel, the zero page, the
/// command line and the initrd.
///
/// Everything in `image` is untrusted. The image and the layout are fully validated, and every
/// placement decided, before guest memory is written. An empty `initrd` counts as none.
pub fn load_bzimage(
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    mem: &mut impl GuestMemory,
    layout: &LinuxLayout,
) -> Result<LoadedLinux, LinuxError> {
    // The real-mode setup and the header inside it.
    let setup_sects = u8_at(image, OFF_SETUP_SECTS).unwrap_or(0);
    let sects = if setup_sects == 0 { 4 } else { usize::from(setup_sects) };
    let setup_size = (sects + 1) * 512;
    let too_short = LinuxError::TooShort { len: image.len(), setup_sects, setup_size };
    if image.len() <= setup_size {
        return Err(too_short);
    }
    // `setup_size >= 2560`, so every header field below is inside the image; the `ok_or`s only
    // keep that from being an assumption.
    let boot_flag = u16_at(image, OFF_BOOT_FLAG).ok_or(too_short)?;
    if boot_flag != BOOT_FLAG {
        return Err(LinuxError::NoBootSignature { found: boot_flag });
    }
    let magic: [u8; 4] = image.get(OFF_HEADER..OFF_HEADER + 4).and_then(|s| s.try_into().ok()).ok_or(too_short)?;
    if magic != *b"HdrS" {
        return Err(LinuxError::NoHdrS { found: magic });
    }
    let protocol = u16_at(image, OFF_VERSION).ok_or(too_short)?;
    if protocol < MIN_PROTOCOL {
        return Err(LinuxError::ProtocolTooOld { version: protocol });
    }
    let header_end = OFF_HEADER + usize::from(u8_at(image, OFF_JUMP_LEN).ok_or(too_short)?);
    if !(MIN_HEADER_END..=MAX_HEADER_END).contains(&header_end) {
        return Err(LinuxError::BadHeaderLength { end: header_end });
    }
    let header = image.get(OFF_SETUP_SECTS..header_end).ok_or(too_short)?;
    let xloadflags = u16_at(image, OFF_XLOADFLAGS).ok_or(too_short)?;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxError::No64BitEntry { xloadflags });
    }
    let loadflags = u8_at(image, OFF_LOADFLAGS).ok_or(too_short)?;
    if loadflags & LOADED_HIGH == 0 {
        return Err(LinuxError::NotLoadedHigh { loadflags });
    }
    let relocatable = u8_at(image, OFF_RELOCATABLE).ok_or(too_short)? != 0;
    let alignment = u32_at(image, OFF_KERNEL_ALIGNMENT).ok_or(too_short)?;
    if relocatable && !alignment.is_power_of_two() {
        return Err(LinuxError::BadKernelAlignment { alignment });
    }
    let pref_address = u64_at(image, OFF_PREF_ADDRESS).ok_or(too_short)?;
    let init_size = u32_at(image, OFF_INIT_SIZE).ok_or(too_short)?;
    let initrd_addr_max = u32_at(image, OFF_INITRD_ADDR_MAX).ok_or(too_short)?;
    let cmdline_size = u32_at(image, OFF_CMDLINE_SIZE).ok_or(too_short)?;
    let kernel = image.get(setup_size..).ok_or(too_short)?;

    // Command line.
    if let Some(offset) = cmdline.bytes().position(|b| b == 0) {
        return Err(LinuxError::CmdlineHasNul { offset });
    }
    let cmd_len = cmdline.len();
    if cmd_len as u64 > u64::from(cmdline_size) {
        return Err(LinuxError::CmdlineTooLongForKernel { len: cmd_len, cmdline_size });
    }
    let cmd_bytes = cmd_len as u64 + 1;
    if cmd_bytes > layout.cmdline_max {
        return Err(LinuxError::CmdlineTooLongForBuffer { len: cmd_len, cmdline_max: layout.cmdline_max });
    }

    // The caller's areas.
    if layout.e820.len() > E820_MAX_ENTRIES {
        return Err(LinuxError::TooManyE820Entries { count: layout.e820.len() });
    }
    let mem_size = mem.size();
    let limit = layout.ram_bytes.min(mem_size);
    let ram = ram_ranges(&layout.e820, limit).map_err(|index| {
        let e = layout.e820.get(index).copied().unwrap_or(E820Entry { addr: 0, size: 0, kind: 0 });
        LinuxError::E820Overflow { index, addr: e.addr, size: e.size }
    })?;
    let area = |area, gpa: u64, len: u64| -> Result<Range, LinuxError> {
        let err = LinuxError::AreaOutsideMemory { area, gpa, len, mem_size };
        let end = gpa.checked_add(len).ok_or(err)?;
        if end > mem_size {
            return Err(err);
        }
        Ok((gpa, end))
    };
    let zp = area(BootArea::ZeroPage, layout.zero_page_gpa, ZERO_PAGE_SIZE)?;
    let cl = area(BootArea::Cmdline, layout.cmdline_gpa, cmd_bytes)?;
    if overlaps(zp.0, zp.1, cl) {
        return Err(LinuxError::AreasOverlap {
            zero_page: layout.zero_page_gpa,
            cmdline: layout.cmdline_gpa,
            cmdline_len: cmd_bytes,
        });
    }

    // Kernel placement.
    let kernel_len = kernel.len() as u64;
    let need = u64::from(init_size).max(kernel_len);
    let kernel_limit = if xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 { limit } else { limit.min(GIB4) };
    let kernel_ram: Vec<Range> = ram.iter().map(|&(lo, hi)| (lo, hi.min(kernel_limit))).filter(|r| r.0 < r.1).collect();
    let no_fit = LinuxError::KernelDoesNotFit {
        need,
        init_size,
        pref_address,
        alignment: relocatable.then_some(alignment),
        limit: kernel_limit,
    };
    let kernel_start = if relocatable {
        // Below pref_address the kernel would move itself up to pref_address anyway; below 1 MiB
        // it would sit on the BIOS area and the real-mode trampoline.
        lowest_fit(&kernel_ram, pref_address.max(MIB), need, u64::from(alignment), &[zp, cl]).ok_or(no_fit)?
    } else {
        // Not below 1 MiB either: the caller keeps low memory for itself (the identity-map page
        // tables of a 64-bit start, for one), besides the BIOS area and the real-mode trampoline.
        let end = pref_address.checked_add(need).ok_or(no_fit)?;
        if pref_address < MIB
            || !in_ram(&kernel_ram, pref_address, end)
            || overlaps(pref_address, end, zp)
            || overlaps(pref_address, end, cl)
        {
            return Err(no_fit);
        }
        pref_address
    };
    // `lowest_fit` checked that this does not overflow.
    let kernel_end = kernel_start.checked_add(need).ok_or(no_fit)?;
    let entry = kernel_start.checked_add(0x200).ok_or(no_fit)?;

    // Initrd placement: the highest page below both initrd_addr_max and the end of RAM.
    let initrd = initrd.filter(|d| !d.is_empty());
    let initrd_at = match initrd {
        None => None,
        Some(data) => {
            let size = data.len() as u64;
            let ceiling = limit.min(u64::from(initrd_addr_max) + 1);
            // Linux keeps the first 1 MiB for itself (BIOS data, real-mode trampoline).
            let initrd_ram: Vec<Range> =
                ram.iter().map(|&(lo, hi)| (lo.max(MIB), hi.min(ceiling))).filter(|r| r.0 < r.1).collect();
            let at = highest_fit(&initrd_ram, size, PAGE, &[(kernel_start, kernel_end), zp, cl])
                .ok_or(LinuxError::InitrdDoesNotFit { size, initrd_addr_max, ram_bytes: layout.ram_bytes })?;
            Some((at, size, data))
        }
    };

    // The zero page.
    let mut page = vec![0u8; ZERO_PAGE_SIZE as usize];
    put(&mut page, OFF_SETUP_SECTS, header);
    put(&mut page, OFF_TYPE_OF_LOADER, &[LOADER_UNDEFINED]);
    // Loader-owned pointers are never taken from the image.
    put(&mut page, OFF_HARDWARE_SUBARCH, &0u32.to_le_bytes());
    put(&mut page, OFF_HARDWARE_SUBARCH_DATA, &0u64.to_le_bytes());
    put(&mut page, OFF_SETUP_DATA, &0u64.to_le_bytes());
    let cmd_ptr = layout.cmdline_gpa;
    put(&mut page, OFF_CMD_LINE_PTR, &(cmd_ptr as u32).to_le_bytes());
    put(&mut page, ZP_EXT_CMD_LINE_PTR, &((cmd_ptr >> 32) as u32).to_le_bytes());
    let (rd_at, rd_size) = initrd_at.map_or((0, 0), |(at, size, _)| (at, size));
    put(&mut page, OFF_RAMDISK_IMAGE, &(rd_at as u32).to_le_bytes());
    put(&mut page, ZP_EXT_RAMDISK_IMAGE, &((rd_at >> 32) as u32).to_le_bytes());
    put(&mut page, OFF_RAMDISK_SIZE, &(rd_size as u32).to_le_bytes());
    put(&mut page, ZP_EXT_RAMDISK_SIZE, &((rd_size >> 32) as u32).to_le_bytes());
    if let Some(rsdp) = layout.rsdp {
        if protocol >= 0x020E {
            put(&mut page, ZP_ACPI_RSDP_ADDR, &rsdp.to_le_bytes());
        }
    }
    // At most 128 entries, checked above.
    put(&mut page, ZP_E820_ENTRIES, &[layout.e820.len() as u8]);
    for (i, e) in layout.e820.iter().enumerate() {
        let off = ZP_E820_TABLE + i * E820_ENTRY_SIZE;
        put(&mut page, off, &e.addr.to_le_bytes());
        put(&mut page, off + 8, &e.size.to_le_bytes());
        put(&mut page, off + 16, &e.kind.to_le_bytes());
    }

    // Everything is decided: write.
    mem.write(kernel_start, kernel)?;
    mem.write(zp.0, &page)?;
    mem.write(cl.0, cmdline.as_bytes())?;
    mem.write(cl.0 + cmd_len as u64, &[0])?;
    if let Some((at, _, data)) = initrd_at {
        mem.write(at, data)?;
    }
    Ok(LoadedLinux {
        entry,
        zero_page: layout.zero_page_gpa,
        kernel_start,
        kernel_end,
        initrd: initrd_at.map(|(at, size, _)| (at, size)),
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::SliceMemory;
    use alloc::string::{String, ToString};

    const MEM: usize = 32 << 20;
    const SETUP: usize = 5 * 512;

    /// The header fields of a synthetic bzImage.
    #[derive(Clone, Copy)]
    struct Hdr {
        setup_sects: u8,
        protocol: u16,
        loadflags: u8,
        xloadflags: u16,
        relocatable: bool,
        alignment: u32,
        pref_address: u64,
        init_size: u32,
        initrd_addr_max: u32,
        cmdline_size: u32,
        kernel_len: usize,
    }

    impl Default for Hdr {
        fn default() -> Self {
            Hdr {
                setup_sects: 4,
                protocol: 0x020F,
                loadflags: LOADED_HIGH,
                xloadflags: XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G,
                relocatable: true,
                alignment: 0x20_0000,
                pref_address: 0x100_0000,
                init_size: 0x10_0000,
                initrd_addr_max: 0x7fff_ffff,
                cmdline_size: 2047,
                kernel_len: 0x3000,
            }
        }
    }

    impl Hdr {
        fn build(&self) -> Vec<u8> {
            let sects = if self.setup_sects == 0 { 4 } else { usize::from(self.setup_sects) };
            let setup = (sects + 1) * 512;
            let mut v = vec![0u8; setup + self.kernel_len];
            v[0x1EF] = 0xff; // outside the header: must not be copied
            v[0x1F1] = self.setup_sects;
            v[0x1F2..0x1F4].copy_from_slice(&1u16.to_le_bytes()); // root_flags
            v[0x1FA..0x1FC].copy_from_slice(&0xffffu16.to_le_bytes()); // vid_mode
            v[0x1FE..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
            v[0x200] = 0xEB;
            v[0x201] = 0x6A; // header ends at 0x26c (protocol 2.15)
            v[0x202..0x206].copy_from_slice(b"HdrS");
            v[0x206..0x208].copy_from_slice(&self.protocol.to_le_bytes());
            v[0x211] = self.loadflags;
            v[0x22C..0x230].copy_from_slice(&self.initrd_addr_max.to_le_bytes());
            v[0x230..0x234].copy_from_slice(&self.alignment.to_le_bytes());
            v[0x234] = u8::from(self.relocatable);
            v[0x236..0x238].copy_from_slice(&self.xloadflags.to_le_bytes());
            v[0x238..0x23C].copy_from_slice(&self.cmdline_size.to_le_bytes());
            v[0x250..0x258].copy_from_slice(&0xdead_beefu64.to_le_bytes()); // setup_data: loader-owned
            v[0x258..0x260].copy_from_slice(&self.pref_address.to_le_bytes());
            v[0x260..0x264].copy_from_slice(&self.init_size.to_le_bytes());
            v[0x26C] = 0x5a; // past the header: must not be copied
            for (i, b) in v[setup..].iter_mut().enumerate() {
                *b = (i % 251) as u8 + 1;
            }
            v
        }
    }

    fn e820(ram_bytes: u64) -> Vec<E820Entry> {
        vec![
            E820Entry { addr: 0, size: 0x9_fc00, kind: E820_RAM },
            E820Entry { addr: 0x9_fc00, size: 0x10_0000 - 0x9_fc00, kind: E820_RESERVED },
            E820Entry { addr: 0x10_0000, size: ram_bytes - 0x10_0000, kind: E820_RAM },
        ]
    }

    fn layout() -> LinuxLayout {
        LinuxLayout {
            ram_bytes: MEM as u64,
            e820: e820(MEM as u64),
            zero_page_gpa: 0x7000,
            cmdline_gpa: 0x2_0000,
            cmdline_max: 4096,
            rsdp: Some(0xe_0000),
        }
    }

    use crate::loader::TestMemory as Mem;

    fn load(
        image: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
        layout: &LinuxLayout,
    ) -> Result<(LoadedLinux, Mem), LinuxError> {
        let mut backing = vec![0u8; MEM];
        let r = load_bzimage(image, initrd, cmdline, &mut SliceMemory(&mut backing), layout)?;
        Ok((r, Mem(backing)))
    }

    fn rd32(m: &[u8], off: usize) -> u32 {
        u32_at(m, off).unwrap()
    }

    fn rd64(m: &[u8], off: usize) -> u64 {
        u64_at(m, off).unwrap()
    }

    #[test]
    fn loads_kernel_and_builds_zero_page() {
        let image = Hdr::default().build();
        let initrd: Vec<u8> = (0..0x1800u32).map(|i| i as u8).collect();
        let lay = layout();
        let (l, m) = load(&image, Some(&initrd), "console=ttyS0 root=/dev/ram0", &lay).unwrap();
        assert_eq!(l.kernel_start, 0x100_0000);
        assert_eq!(l.entry, 0x100_0200);
        assert_eq!(l.kernel_end, 0x110_0000);
        assert_eq!(l.zero_page, 0x7000);
        assert_eq!(l.protocol, 0x020F);
        // Highest page below the end of RAM.
        assert_eq!(l.initrd, Some((MEM as u64 - 0x2000, 0x1800)));
        assert_eq!(&m[0x100_0000..0x100_3000], &image[SETUP..]);
        assert_eq!(&m[MEM - 0x2000..MEM - 0x800], &initrd[..]);
        assert_eq!(&m[0x2_0000..0x2_001d], b"console=ttyS0 root=/dev/ram0\0");

        let zp = &m[0x7000..0x8000];
        assert_eq!(zp[0x1EF], 0, "bytes before the header are not copied");
        assert_eq!(zp[0x1F1], 4);
        assert_eq!(&zp[0x1F2..0x210], &image[0x1F2..0x210], "header copied");
        assert_eq!(&zp[0x202..0x206], b"HdrS");
        assert_eq!(zp[OFF_TYPE_OF_LOADER], 0xFF);
        assert_eq!(zp[OFF_LOADFLAGS], LOADED_HIGH);
        assert_eq!(zp[0x26C], 0, "bytes after the header are not copied");
        assert_eq!(rd64(zp, OFF_SETUP_DATA), 0, "setup_data is never taken from the image");
        assert_eq!(rd32(zp, OFF_CMD_LINE_PTR), 0x2_0000);
        assert_eq!(rd32(zp, ZP_EXT_CMD_LINE_PTR), 0);
        assert_eq!(rd32(zp, OFF_RAMDISK_IMAGE), MEM as u32 - 0x2000);
        assert_eq!(rd32(zp, OFF_RAMDISK_SIZE), 0x1800);
        assert_eq!(rd32(zp, ZP_EXT_RAMDISK_IMAGE), 0);
        assert_eq!(rd32(zp, ZP_EXT_RAMDISK_SIZE), 0);
        assert_eq!(rd64(zp, ZP_ACPI_RSDP_ADDR), 0xe_0000);
        assert_eq!(rd32(zp, OFF_PREF_ADDRESS), 0x100_0000);
        assert_eq!(rd32(zp, OFF_INIT_SIZE), 0x10_0000);
        assert_eq!(zp[ZP_E820_ENTRIES], 3);
        for (i, e) in lay.e820.iter().enumerate() {
            let o = ZP_E820_TABLE + 20 * i;
            assert_eq!((rd64(zp, o), rd64(zp, o + 8), rd32(zp, o + 16)), (e.addr, e.size, e.kind), "entry {i}");
        }
        assert!(zp[ZP_E820_TABLE + 60..].iter().all(|&b| b == 0));
    }

    #[test]
    fn no_initrd_old_protocol_rsdp_and_empty_cmdline() {
        let image = Hdr { protocol: 0x020C, ..Hdr::default() }.build();
        let (l, m) = load(&image, Some(&[]), "", &layout()).unwrap();
        assert_eq!(l.initrd, None);
        assert_eq!(l.protocol, 0x020C);
        let zp = &m[0x7000..0x8000];
        assert_eq!(rd64(zp, ZP_ACPI_RSDP_ADDR), 0, "acpi_rsdp_addr needs protocol 2.14");
        assert_eq!((rd32(zp, OFF_RAMDISK_IMAGE), rd32(zp, OFF_RAMDISK_SIZE)), (0, 0));
        assert_eq!(m[0x2_0000], 0);
        assert_eq!(rd32(zp, OFF_CMD_LINE_PTR), 0x2_0000);
    }

    #[test]
    fn setup_sects_zero_means_four() {
        let image = Hdr { setup_sects: 0, ..Hdr::default() }.build();
        assert_eq!(image.len(), SETUP + 0x3000);
        let (l, m) = load(&image, None, "", &layout()).unwrap();
        assert_eq!(&m[l.kernel_start as usize..l.kernel_start as usize + 0x3000], &image[SETUP..]);
        let image = Hdr { setup_sects: 30, ..Hdr::default() }.build();
        let (l, m) = load(&image, None, "", &layout()).unwrap();
        assert_eq!(m[l.kernel_start as usize], image[31 * 512]);
    }

    #[test]
    fn relocatable_kernel_skips_holes_and_fixed_kernel_stays() {
        // A reserved hole at 16..18 MiB: the next 2 MiB-aligned place is 18 MiB.
        let mut lay = layout();
        lay.e820 = vec![
            E820Entry { addr: 0, size: 0x9_fc00, kind: E820_RAM },
            E820Entry { addr: 0x10_0000, size: 0xf0_0000, kind: E820_RAM },
            E820Entry { addr: 0x100_0000, size: 0x20_0000, kind: E820_RESERVED },
            E820Entry { addr: 0x120_0000, size: MEM as u64 - 0x120_0000, kind: E820_RAM },
        ];
        let (l, _) = load(&Hdr::default().build(), None, "", &lay).unwrap();
        assert_eq!((l.kernel_start, l.entry), (0x120_0000, 0x120_0200));
        // Not aligned in the map: aligned up.
        lay.e820[3] = E820Entry { addr: 0x110_1000, size: MEM as u64 - 0x110_1000, kind: E820_RAM };
        let (l, _) = load(&Hdr::default().build(), None, "", &lay).unwrap();
        assert_eq!(l.kernel_start, 0x120_0000);
        // A fixed kernel cannot move past the hole.
        let e = load(&Hdr { relocatable: false, ..Hdr::default() }.build(), None, "", &lay).unwrap_err();
        assert!(matches!(e, LinuxError::KernelDoesNotFit { alignment: None, pref_address: 0x100_0000, .. }), "{e:?}");
        assert!(e.to_string().contains("at its fixed address pref_address 0x1000000 (not relocatable)"), "{e}");
        // Without the hole it loads at pref_address, whatever the alignment says.
        let h = Hdr { relocatable: false, alignment: 3, pref_address: 0x30_0000, ..Hdr::default() };
        let (l, _) = load(&h.build(), None, "", &layout()).unwrap();
        assert_eq!(l.kernel_start, 0x30_0000);
        // A small pref_address: the kernel still stays above 1 MiB.
        let h = Hdr { pref_address: 0, alignment: 0x1000, ..Hdr::default() };
        let (l, _) = load(&h.build(), None, "", &layout()).unwrap();
        assert_eq!(l.kernel_start, 0x10_0000);
        // A fixed kernel cannot go there: low memory holds what the caller put there (the
        // setup's page tables at 0x10000 would overwrite it).
        let h = Hdr { relocatable: false, pref_address: 0x1_0f00, init_size: 0x1000, ..Hdr::default() };
        let e = load(&h.build(), None, "", &layout()).unwrap_err();
        assert!(matches!(e, LinuxError::KernelDoesNotFit { alignment: None, pref_address: 0x1_0f00, .. }), "{e:?}");
    }

    #[test]
    fn kernel_region_avoids_boot_areas() {
        let mut lay = layout();
        lay.zero_page_gpa = 0x100_0000;
        let (l, _) = load(&Hdr::default().build(), None, "", &lay).unwrap();
        assert_eq!(l.kernel_start, 0x120_0000);
        let e = load(&Hdr { relocatable: false, ..Hdr::default() }.build(), None, "", &lay).unwrap_err();
        assert!(matches!(e, LinuxError::KernelDoesNotFit { .. }));
    }

    #[test]
    fn initrd_below_initrd_addr_max_and_away_from_kernel() {
        let initrd = vec![7u8; 0x2000];
        // initrd_addr_max is the last byte the initrd may occupy.
        let h = Hdr { initrd_addr_max: 0x17f_ffff, ..Hdr::default() };
        let (l, _) = load(&h.build(), Some(&initrd), "", &layout()).unwrap();
        assert_eq!(l.initrd, Some((0x180_0000 - 0x2000, 0x2000)));
        // Only 4 KiB free between the kernel's init_size area and initrd_addr_max: goes below it.
        let h = Hdr { initrd_addr_max: 0x110_0fff, ..Hdr::default() };
        let (l, m) = load(&h.build(), Some(&initrd), "", &layout()).unwrap();
        assert_eq!(l.kernel_end, 0x110_0000);
        assert_eq!(l.initrd, Some((0x100_0000 - 0x2000, 0x2000)));
        assert!(m[0xff_e000..0x100_0000].iter().all(|&b| b == 7));
        // It fits exactly above the kernel.
        let h = Hdr { initrd_addr_max: 0x110_1fff, ..Hdr::default() };
        let (l, _) = load(&h.build(), Some(&initrd), "", &layout()).unwrap();
        assert_eq!(l.initrd, Some((0x110_0000, 0x2000)));
        // Odd sizes are placed page-aligned, ending at or below the limit.
        let (l, _) = load(&Hdr::default().build(), Some(&initrd[..0x1001]), "", &layout()).unwrap();
        assert_eq!(l.initrd, Some((MEM as u64 - 0x2000, 0x1001)));
    }

    #[test]
    fn refuses_initrd_that_does_not_fit() {
        // 15 MiB free below the kernel and 15 MiB above it.
        let initrd = vec![0u8; 16 << 20];
        let e = load(&Hdr::default().build(), Some(&initrd), "", &layout()).unwrap_err();
        assert_eq!(
            e,
            LinuxError::InitrdDoesNotFit { size: 16 << 20, initrd_addr_max: 0x7fff_ffff, ram_bytes: 32 << 20 }
        );
        assert_eq!(
            e.to_string(),
            "initrd of 0x1000000 bytes (16 MiB) does not fit in free RAM between 1 MiB and initrd_addr_max 0x7fffffff and the \
             end of guest RAM (32 MiB), apart from the kernel, zero page and command line"
        );
        let h = Hdr { initrd_addr_max: 0xf_ffff, ..Hdr::default() };
        let e = load(&h.build(), Some(&[1; 0x1000]), "", &layout()).unwrap_err();
        assert!(matches!(e, LinuxError::InitrdDoesNotFit { initrd_addr_max: 0xf_ffff, .. }), "{e:?}");
    }

    #[test]
    fn refuses_kernel_too_big_for_ram() {
        let h = Hdr { init_size: 0x200_0000, ..Hdr::default() };
        let mut backing = vec![0u8; MEM];
        let e = load_bzimage(&h.build(), None, "", &mut SliceMemory(&mut backing), &layout()).unwrap_err();
        assert_eq!(
            e,
            LinuxError::KernelDoesNotFit {
                need: 0x200_0000,
                init_size: 0x200_0000,
                pref_address: 0x100_0000,
                alignment: Some(0x20_0000),
                limit: MEM as u64,
            }
        );
        assert_eq!(
            e.to_string(),
            "kernel needs 0x2000000 bytes (init_size 0x2000000) at a 0x200000-aligned address at or above \
             pref_address 0x1000000 inside one RAM range of the memory map below 0x2000000, and there is none \
             (32 MiB of guest RAM)"
        );
        assert!(backing.iter().all(|&b| b == 0), "nothing written on refusal");
        // The image itself longer than init_size counts too.
        let h = Hdr { init_size: 0x1000, kernel_len: 0x20_0000, ..Hdr::default() };
        let mut lay = layout();
        lay.ram_bytes = 0x110_0000;
        assert!(matches!(
            load(&h.build(), None, "", &lay).unwrap_err(),
            LinuxError::KernelDoesNotFit { need: 0x20_0000, .. }
        ));
    }

    #[test]
    fn refuses_truncated_and_foreign_images() {
        let good = Hdr::default().build();
        let e = load(&good[..SETUP], None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::TooShort { len: SETUP, setup_sects: 4, setup_size: SETUP });
        assert_eq!(
            e.to_string(),
            "image is 2560 bytes, not longer than its 2560-byte real-mode setup (setup_sects 4): no protected-mode \
             kernel follows"
        );
        assert!(matches!(load(&[], None, "", &layout()).unwrap_err(), LinuxError::TooShort { len: 0, .. }));
        assert!(matches!(load(&good[..0x1F0], None, "", &layout()).unwrap_err(), LinuxError::TooShort { .. }));
        let mut image = good.clone();
        image[0x1FE] = 0;
        let e = load(&image, None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::NoBootSignature { found: 0xAA00 });
        assert_eq!(e.to_string(), "not a Linux kernel: boot_flag at 0x1fe is 0xaa00, expected 0xaa55");
        let mut image = good.clone();
        image[0x205] = b's';
        let e = load(&image, None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::NoHdrS { found: *b"Hdrs" });
        let mut image = good.clone();
        image[0x201] = 0x50;
        assert_eq!(load(&image, None, "", &layout()).unwrap_err(), LinuxError::BadHeaderLength { end: 0x252 });
        image[0x201] = 0x8f;
        assert_eq!(load(&image, None, "", &layout()).unwrap_err(), LinuxError::BadHeaderLength { end: 0x291 });
    }

    #[test]
    fn refuses_old_protocol_and_missing_flags() {
        let e = load(&Hdr { protocol: 0x0209, ..Hdr::default() }.build(), None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::ProtocolTooOld { version: 0x0209 });
        assert_eq!(
            e.to_string(),
            "boot protocol 2.09 (0x0209) is older than 2.12 (0x020c), the first with xloadflags and a 64-bit entry"
        );
        let e = load(&Hdr { xloadflags: 2, ..Hdr::default() }.build(), None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::No64BitEntry { xloadflags: 2 });
        assert!(e.to_string().starts_with("kernel has no 64-bit entry point"), "{e}");
        let e = load(&Hdr { loadflags: 0x80, ..Hdr::default() }.build(), None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::NotLoadedHigh { loadflags: 0x80 });
        let e = load(&Hdr { alignment: 0x30_0000, ..Hdr::default() }.build(), None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::BadKernelAlignment { alignment: 0x30_0000 });
        let e = load(&Hdr { alignment: 0, ..Hdr::default() }.build(), None, "", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::BadKernelAlignment { alignment: 0 });
    }

    #[test]
    fn refuses_bad_cmdlines() {
        let image = Hdr { cmdline_size: 16, ..Hdr::default() }.build();
        load(&image, None, "0123456789abcdef", &layout()).unwrap();
        let e = load(&image, None, "0123456789abcdefg", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::CmdlineTooLongForKernel { len: 17, cmdline_size: 16 });
        assert_eq!(e.to_string(), "command line is 17 bytes, longer than the kernel's cmdline_size of 16 bytes");
        let mut lay = layout();
        lay.cmdline_max = 8;
        load(&image, None, "1234567", &lay).unwrap();
        let e = load(&image, None, "12345678", &lay).unwrap_err();
        assert_eq!(e, LinuxError::CmdlineTooLongForBuffer { len: 8, cmdline_max: 8 });
        assert_eq!(
            e.to_string(),
            "command line is 8 bytes, which with its NUL does not fit the 8-byte command-line buffer"
        );
        let e = load(&image, None, "a\0b", &layout()).unwrap_err();
        assert_eq!(e, LinuxError::CmdlineHasNul { offset: 1 });
    }

    #[test]
    fn refuses_bad_layouts() {
        let image = Hdr::default().build();
        let mut lay = layout();
        lay.zero_page_gpa = MEM as u64 - 0x800;
        let e = load(&image, None, "", &lay).unwrap_err();
        assert_eq!(
            e,
            LinuxError::AreaOutsideMemory {
                area: BootArea::ZeroPage,
                gpa: MEM as u64 - 0x800,
                len: 0x1000,
                mem_size: MEM as u64
            }
        );
        assert_eq!(e.to_string(), "zero page at 0x1fff800+0x1000 lies outside guest memory (32 MiB)");
        let mut lay = layout();
        lay.cmdline_gpa = u64::MAX;
        assert!(matches!(
            load(&image, None, "x", &lay).unwrap_err(),
            LinuxError::AreaOutsideMemory { area: BootArea::Cmdline, len: 2, .. }
        ));
        let mut lay = layout();
        lay.cmdline_gpa = 0x7ffe;
        assert_eq!(
            load(&image, None, "x", &lay).unwrap_err(),
            LinuxError::AreasOverlap { zero_page: 0x7000, cmdline: 0x7ffe, cmdline_len: 2 }
        );
        let mut lay = layout();
        lay.e820 = vec![E820Entry { addr: 0x1000, size: 0x1000, kind: E820_RAM }; 129];
        assert_eq!(load(&image, None, "", &lay).unwrap_err(), LinuxError::TooManyE820Entries { count: 129 });
        let mut lay = layout();
        lay.e820.push(E820Entry { addr: u64::MAX, size: 2, kind: E820_RESERVED });
        assert_eq!(
            load(&image, None, "", &lay).unwrap_err(),
            LinuxError::E820Overflow { index: 3, addr: u64::MAX, size: 2 }
        );
    }

    #[test]
    fn placement_helpers() {
        let ram = ram_ranges(
            &[
                E820Entry { addr: 0x5000, size: 0x1000, kind: E820_RAM },
                E820Entry { addr: 0x1000, size: 0x2000, kind: E820_RAM },
                E820Entry { addr: 0x3000, size: 0x1000, kind: E820_RAM },
                E820Entry { addr: 0x2000, size: 0x3000, kind: E820_RESERVED },
                E820Entry { addr: 0x8000, size: 0x8000, kind: E820_RAM },
            ],
            0xc000,
        )
        .unwrap();
        assert_eq!(ram, [(0x1000, 0x4000), (0x5000, 0x6000), (0x8000, 0xc000)]);
        assert_eq!(lowest_fit(&ram, 0, 0x3000, 0x1000, &[]), Some(0x1000));
        assert_eq!(lowest_fit(&ram, 0, 0x3000, 0x1000, &[(0x1800, 0x1801)]), Some(0x8000));
        assert_eq!(lowest_fit(&ram, 0, 0x1000, 0x1000, &[(0x0, 0x3800), (0x5000, 0x5001)]), Some(0x8000));
        assert_eq!(lowest_fit(&ram, 0x8001, 0x1000, 0x1000, &[]), Some(0x9000));
        assert_eq!(lowest_fit(&ram, 0, 0x5000, 0x1000, &[]), None);
        assert_eq!(lowest_fit(&ram, u64::MAX, 1, 0x1000, &[]), None);
        assert_eq!(highest_fit(&ram, 0x1000, 0x1000, &[]), Some(0xb000));
        assert_eq!(highest_fit(&ram, 0x1000, 0x1000, &[(0xafff, 0xc000)]), Some(0x9000));
        assert_eq!(highest_fit(&ram, 0x4001, 0x1000, &[]), None);
        assert_eq!(highest_fit(&ram, 0x2000, 0x1000, &[(0x8000, 0xc000)]), Some(0x2000));
        assert_eq!(ram_ranges(&[E820Entry { addr: 1, size: u64::MAX, kind: E820_RESERVED }], 0), Err(0));
    }

    /// xorshift64: deterministic pseudo-random numbers for the mutation test.
    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn mutated_headers_never_panic() {
        let good = Hdr { kernel_len: 0x800, init_size: 0x1000, ..Hdr::default() }.build();
        let mut backing = vec![0u8; MEM];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut loaded = 0;
        for _ in 0..20_000 {
            let mut image = good.clone();
            let flips = 1 + xorshift(&mut seed) % 8;
            for _ in 0..flips {
                let r = xorshift(&mut seed);
                // Mostly the header, sometimes anywhere.
                let off = if r & 3 == 0 { (r >> 8) as usize % image.len() } else { 0x1F0 + (r >> 8) as usize % 0x80 };
                image[off] = (r >> 40) as u8;
            }
            let r = xorshift(&mut seed);
            if r & 7 == 0 {
                image.truncate((r >> 8) as usize % (image.len() + 1));
            }
            let cmdline: String = "x".repeat((xorshift(&mut seed) % 64) as usize);
            let initrd = vec![1u8; (xorshift(&mut seed) % 0x3000) as usize];
            let mut lay = layout();
            lay.ram_bytes = xorshift(&mut seed) % (MEM as u64 + 0x1000);
            let mut mem = SliceMemory(&mut backing);
            match load_bzimage(&image, Some(&initrd), &cmdline, &mut mem, &lay) {
                Ok(l) => {
                    loaded += 1;
                    assert!(l.kernel_end <= lay.ram_bytes && l.kernel_start >= 0x10_0000);
                    if let Some((at, size)) = l.initrd {
                        assert!(at + size <= lay.ram_bytes.min(l.kernel_start) || at >= l.kernel_end);
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        assert!(loaded > 100, "only {loaded} mutated images loaded");
    }
}
