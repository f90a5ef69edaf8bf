//! A loader for Multiboot (version 1) kernels, the way QEMU's `-kernel`/`-initrd`/`-append`
//! loads them.
//!
//! The Multiboot header (magic 0x1BADB002, flags, checksum) must sit 4-byte aligned in the first
//! 8192 bytes of the image. With header flag bit 16 the "a.out kludge" address fields say where
//! the image goes; without it the image must be an ELF32 (`EM_386`) executable, whose `PT_LOAD`
//! segments are loaded at their physical addresses (`p_paddr`). ELF64 images are refused, as QEMU
//! does: a Multiboot kernel starts in 32-bit protected mode.
//!
//! Modules are placed page-aligned after the kernel, each followed by its NUL-terminated string.
//! The boot information (the `multiboot_info` structure, then the memory map, the module list
//! and the command line) is written at the caller's [`MultibootLayout::info_gpa`], normally in
//! low memory. Everything lies inside RAM ranges of the memory map, below 4 GiB. The caller starts
//! the vCPU in 32-bit protected mode with paging off and flat 4 GiB code and data segments, at
//! [`LoadedMultiboot::entry`], with EAX = [`BOOTLOADER_MAGIC`] and EBX = [`LoadedMultiboot::info`].
//!
//! Required header flags (bits 0-15) this loader provides: bit 0 (page-aligned modules: always
//! done) and bit 1 (memory information: always given). Bit 2 asks for video mode information;
//! the loader may ignore the preferred mode, so, as in QEMU, the request is accepted and no video
//! information is given (info flags bits 11 and 12 stay clear). Any other required bit is refused.
//!
//! The image is validated and every placement decided before guest memory is written, so a
//! refused image leaves guest memory untouched.

use alloc::vec::Vec;
use core::fmt;

use super::bzimage::{align_up, in_ram, lowest_fit, overlaps, ram_ranges, E820Entry, Range};
use super::{GuestMemory, MemError, Size};

/// Magic value of the Multiboot header.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX when the kernel is entered.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie inside this many bytes at the start of the image.
pub const HEADER_SEARCH: usize = 8192;

/// Header flags: modules page-aligned.
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flags: memory information wanted.
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flags: video mode information wanted.
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flags: the a.out kludge address fields are valid.
pub const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Required header flags this loader provides.
const SUPPORTED_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// Boot information flags.
pub const INFO_MEMORY: u32 = 1 << 0;
/// `cmdline` is valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// `mods_count` and `mods_addr` are valid.
pub const INFO_MODS: u32 = 1 << 3;
/// `mmap_length` and `mmap_addr` are valid.
pub const INFO_MMAP: u32 = 1 << 6;

/// Bytes reserved for `struct multiboot_info` (116 bytes with the framebuffer fields, rounded up).
pub const INFO_STRUCT_SIZE: u64 = 120;
/// Bytes per memory map entry: a 4-byte `size` (20) followed by base, length and type.
pub const MMAP_ENTRY_SIZE: u64 = 24;
/// Bytes per module list entry: `mod_start`, `mod_end`, `string`, reserved.
pub const MOD_ENTRY_SIZE: u64 = 16;

const PAGE: u64 = 4096;
const GIB4: u64 = 1 << 32;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

const ELF32_EHDR_SIZE: usize = 52;
const ELF32_PHDR_SIZE: u16 = 32;
const EM_386: u16 = 3;
const ET_EXEC: u16 = 2;
const PT_LOAD: u32 = 1;

/// Where the caller wants the boot information and what the guest has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultibootLayout {
    /// Guest RAM size in bytes: nothing is placed at or above it.
    pub ram_bytes: u64,
    /// The guest's memory map, passed to the kernel and used for placement (only RAM ranges,
    /// type 1, receive the kernel, modules and boot information).
    pub e820: Vec<E820Entry>,
    /// Guest-physical address of the boot information area.
    pub info_gpa: u64,
    /// Size of the boot information area in bytes.
    pub info_max: u64,
}

/// Where the kernel starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedMultiboot {
    /// Entry point (physical).
    pub entry: u32,
    /// Guest-physical address of `struct multiboot_info` (pass it in EBX).
    pub info: u32,
}

/// A piece of guest memory a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// An ELF `PT_LOAD` segment (program header index).
    Segment(u16),
    /// The image loaded through the a.out kludge fields.
    AoutImage,
    /// The boot information area.
    Info,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Segment(i) => write!(f, "kernel segment {i}"),
            Region::AoutImage => f.write_str("kernel image"),
            Region::Info => f.write_str("boot information"),
        }
    }
}

/// Why an ELF32 Multiboot kernel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elf32Error {
    /// The image is shorter than the ELF32 header.
    TooShort {
        /// Image length in bytes.
        len: usize,
    },
    /// `EI_CLASS` is `ELFCLASS64`.
    Elf64,
    /// `EI_CLASS` is neither 32- nor 64-bit.
    BadClass {
        /// The `EI_CLASS` byte.
        class: u8,
    },
    /// `EI_DATA` is not `ELFDATA2LSB`.
    NotLittleEndian {
        /// The `EI_DATA` byte.
        data: u8,
    },
    /// `EI_VERSION` or `e_version` is not 1.
    BadVersion {
        /// The offending version.
        version: u32,
    },
    /// `e_machine` is not `EM_386`.
    WrongMachine {
        /// The `e_machine` value.
        machine: u16,
    },
    /// `e_type` is not `ET_EXEC`.
    NotExecutable {
        /// The `e_type` value.
        e_type: u16,
    },
    /// `e_phentsize` is smaller than an ELF32 program header.
    BadPhentsize {
        /// The `e_phentsize` value.
        phentsize: u16,
    },
    /// The program header table does not fit in the image.
    ProgramHeadersOutOfBounds {
        /// `e_phoff`.
        phoff: u32,
        /// `e_phentsize`.
        phentsize: u16,
        /// `e_phnum`.
        phnum: u16,
        /// Image length in bytes.
        image_len: usize,
    },
    /// No `PT_LOAD` segment with a non-zero size.
    NoLoadSegments,
    /// A segment's `p_filesz` exceeds its `p_memsz`.
    FileSizeExceedsMemSize {
        /// Program header index.
        index: u16,
        /// `p_filesz`.
        filesz: u32,
        /// `p_memsz`.
        memsz: u32,
    },
    /// A segment's file data lies outside the image.
    SegmentDataOutOfBounds {
        /// Program header index.
        index: u16,
        /// `p_offset`.
        offset: u32,
        /// `p_filesz`.
        filesz: u32,
        /// Image length in bytes.
        image_len: usize,
    },
}

impl fmt::Display for Elf32Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Elf32Error::TooShort { len } => {
                write!(f, "image is {len} bytes, shorter than the {ELF32_EHDR_SIZE}-byte ELF32 header")
            }
            Elf32Error::Elf64 => f.write_str(
                "image is a 64-bit ELF: a Multiboot kernel without a.out kludge fields (header flag bit 16) must be \
                 ELF32 (EM_386)",
            ),
            Elf32Error::BadClass { class } => write!(f, "ELF class {class} is not ELFCLASS32 (1)"),
            Elf32Error::NotLittleEndian { data } => {
                write!(f, "not a little-endian ELF image (EI_DATA {data}, expected 1)")
            }
            Elf32Error::BadVersion { version } => write!(f, "unknown ELF version {version} (expected 1)"),
            Elf32Error::WrongMachine { machine } => write!(f, "ELF image is for machine {machine}, not i386 (3)"),
            Elf32Error::NotExecutable { e_type } => write!(f, "ELF type {e_type} is not an executable (ET_EXEC = 2)"),
            Elf32Error::BadPhentsize { phentsize } => {
                write!(f, "program header size {phentsize} is smaller than the {ELF32_PHDR_SIZE} bytes of ELF32")
            }
            Elf32Error::ProgramHeadersOutOfBounds { phoff, phentsize, phnum, image_len } => write!(
                f,
                "program header table ({phnum} x {phentsize} bytes at offset {phoff:#x}) lies outside the \
                 {image_len}-byte image"
            ),
            Elf32Error::NoLoadSegments => f.write_str("ELF image has no non-empty PT_LOAD segment"),
            Elf32Error::FileSizeExceedsMemSize { index, filesz, memsz } => {
                write!(f, "segment {index} has file size {filesz:#x} larger than its memory size {memsz:#x}")
            }
            Elf32Error::SegmentDataOutOfBounds { index, offset, filesz, image_len } => write!(
                f,
                "segment {index} data at file offset {offset:#x}+{filesz:#x} lies outside the {image_len}-byte image"
            ),
        }
    }
}

/// Why a Multiboot kernel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MultibootError {
    /// No Multiboot header with a valid checksum in the first 8192 bytes.
    NoHeader {
        /// Bytes searched.
        searched: usize,
    },
    /// The only header magic found has a wrong checksum.
    BadChecksum {
        /// File offset of the header.
        offset: usize,
        /// Its `flags`.
        flags: u32,
        /// Its `checksum`.
        checksum: u32,
    },
    /// The header requires features (flag bits 0-15) this loader does not provide.
    UnsupportedFlags {
        /// The header's `flags`.
        flags: u32,
        /// The required bits not provided.
        unsupported: u32,
    },
    /// Flag bit 16 is set but the address fields run past the end of the image.
    HeaderTruncated {
        /// File offset of the header.
        offset: usize,
        /// Image length in bytes.
        image_len: usize,
    },
    /// `load_addr` is above `header_addr`.
    LoadAddrAboveHeader {
        /// `load_addr`.
        load_addr: u32,
        /// `header_addr`.
        header_addr: u32,
    },
    /// `header_addr - load_addr` is larger than the header's file offset: the text would start
    /// before the file does.
    TextBeforeFileStart {
        /// File offset of the header.
        offset: usize,
        /// `header_addr`.
        header_addr: u32,
        /// `load_addr`.
        load_addr: u32,
    },
    /// `load_end_addr` is non-zero and below `load_addr`.
    LoadEndBeforeLoad {
        /// `load_addr`.
        load_addr: u32,
        /// `load_end_addr`.
        load_end_addr: u32,
    },
    /// The bytes to load run past the end of the image.
    LoadPastImage {
        /// File offset where loading starts.
        file_offset: u64,
        /// Bytes to load.
        load_size: u64,
        /// Image length in bytes.
        image_len: usize,
    },
    /// `bss_end_addr` is non-zero and below the end of the loaded bytes.
    BssEndBeforeLoadEnd {
        /// End of the loaded bytes.
        load_end: u64,
        /// `bss_end_addr`.
        bss_end_addr: u32,
    },
    /// Flag bit 16 is clear and the image is not ELF.
    NotElf {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The ELF32 image is unusable.
    Elf(Elf32Error),
    /// The entry point is not inside the loaded kernel.
    EntryOutsideKernel {
        /// The entry point (`entry_addr` or `e_entry`).
        entry: u32,
        /// Lowest loaded address.
        start: u64,
        /// End of the loaded kernel.
        end: u64,
    },
    /// The command line contains a NUL byte.
    CmdlineHasNul {
        /// Byte offset of the NUL.
        offset: usize,
    },
    /// A module string contains a NUL byte.
    ModuleStringHasNul {
        /// Module index.
        index: usize,
        /// Byte offset of the NUL.
        offset: usize,
    },
    /// A memory map entry wraps around the address space.
    E820Overflow {
        /// Index in the layout's map.
        index: usize,
        /// Its `addr`.
        addr: u64,
        /// Its `size`.
        size: u64,
    },
    /// A piece of the kernel or the boot information is not inside guest RAM below 4 GiB.
    NotInRam {
        /// What.
        region: Region,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// RAM limit: the smaller of guest RAM and 4 GiB.
        limit: u64,
    },
    /// Two pieces overlap.
    Overlap {
        /// The piece that starts lower (or the first one found).
        first: Region,
        /// The other piece.
        second: Region,
        /// Guest-physical address where the overlap starts.
        at: u64,
    },
    /// A module (with its string) does not fit in RAM after the kernel.
    ModuleDoesNotFit {
        /// Module index.
        index: usize,
        /// Bytes needed: module, string and NUL.
        size: u64,
        /// Lowest address it could have taken.
        from: u64,
        /// RAM limit: the smaller of guest RAM and 4 GiB.
        limit: u64,
    },
    /// The boot information does not fit in the caller's area.
    InfoTooLarge {
        /// Bytes needed.
        need: u64,
        /// [`MultibootLayout::info_max`].
        info_max: u64,
    },
    /// Guest memory refused a write (cannot happen after validation unless the memory is
    /// inconsistent about its size).
    Memory(MemError),
}

impl fmt::Display for MultibootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MultibootError::NoHeader { searched } => write!(
                f,
                "no Multiboot header (magic {HEADER_MAGIC:#010x} at a 4-byte-aligned offset) in the first {searched} \
                 bytes of the image"
            ),
            MultibootError::BadChecksum { offset, flags, checksum } => write!(
                f,
                "Multiboot header at offset {offset:#x} has checksum {checksum:#010x}, expected {:#010x} (magic + \
                 flags {flags:#010x} + checksum must be 0)",
                0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)
            ),
            MultibootError::UnsupportedFlags { flags, unsupported } => write!(
                f,
                "Multiboot header flags {flags:#010x} require features this loader does not provide (bits \
                 {unsupported:#06x}; supported required bits: 0 page-align, 1 memory info, 2 video mode)"
            ),
            MultibootError::HeaderTruncated { offset, image_len } => write!(
                f,
                "Multiboot header at offset {offset:#x} has flag bit 16 but its address fields run past the end of \
                 the {image_len}-byte image"
            ),
            MultibootError::LoadAddrAboveHeader { load_addr, header_addr } => {
                write!(f, "load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
            }
            MultibootError::TextBeforeFileStart { offset, header_addr, load_addr } => write!(
                f,
                "header_addr {header_addr:#x} - load_addr {load_addr:#x} is larger than the header's file offset \
                 {offset:#x}: loading would start before the image"
            ),
            MultibootError::LoadEndBeforeLoad { load_addr, load_end_addr } => {
                write!(f, "load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}")
            }
            MultibootError::LoadPastImage { file_offset, load_size, image_len } => write!(
                f,
                "loading {load_size:#x} bytes from file offset {file_offset:#x} runs past the end of the \
                 {image_len}-byte image"
            ),
            MultibootError::BssEndBeforeLoadEnd { load_end, bss_end_addr } => {
                write!(f, "bss_end_addr {bss_end_addr:#x} is below the end of the loaded image {load_end:#x}")
            }
            MultibootError::NotElf { found } => write!(
                f,
                "Multiboot header has no a.out kludge address fields (flag bit 16) and the image is not ELF (starts \
                 with {found:02x?})"
            ),
            MultibootError::Elf(e) => write!(f, "Multiboot ELF kernel: {e}"),
            MultibootError::EntryOutsideKernel { entry, start, end } => {
                write!(f, "entry point {entry:#x} is outside the loaded kernel [{start:#x}, {end:#x})")
            }
            MultibootError::CmdlineHasNul { offset } => write!(f, "command line contains a NUL byte at offset {offset}"),
            MultibootError::ModuleStringHasNul { index, offset } => {
                write!(f, "module {index} string contains a NUL byte at offset {offset}")
            }
            MultibootError::E820Overflow { index, addr, size } => {
                write!(f, "memory map entry {index} ({addr:#x}+{size:#x}) wraps around the address space")
            }
            MultibootError::NotInRam { region, start, end, limit } => write!(
                f,
                "{region} at [{start:#x}, {end:#x}) is not inside one RAM range of the memory map below {limit:#x} ({})",
                Size(limit)
            ),
            MultibootError::Overlap { first, second, at } => {
                write!(f, "{first} and {second} overlap at guest-physical {at:#x}")
            }
            MultibootError::ModuleDoesNotFit { index, size, from, limit } => write!(
                f,
                "module {index} needs {size:#x} bytes with its string, and no RAM range between {from:#x} and \
                 {limit:#x} ({}) has room",
                Size(limit)
            ),
            MultibootError::InfoTooLarge { need, info_max } => write!(
                f,
                "boot information needs {need:#x} bytes (info, memory map, module list, command line), the area \
                 holds {info_max:#x}"
            ),
            MultibootError::Memory(e) => write!(f, "loading Multiboot kernel: {e}"),
        }
    }
}

impl From<MemError> for MultibootError {
    fn from(e: MemError) -> Self {
        MultibootError::Memory(e)
    }
}

impl From<Elf32Error> for MultibootError {
    fn from(e: Elf32Error) -> Self {
        MultibootError::Elf(e)
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s: [u8; 2] = b.get(off..off.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(s))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

/// A piece of the kernel to write: `data` at `addr`, then zeroes up to `end`.
#[derive(Clone, Copy, Debug)]
struct Piece<'a> {
    region: Region,
    addr: u64,
    data: &'a [u8],
    /// `addr + memory size`, checked not to overflow.
    end: u64,
    /// Virtual address of the piece (ELF `p_vaddr`), for translating the entry point.
    vaddr: u64,
}

/// Whether the image carries a Multiboot header (magic with a valid checksum).
pub fn has_header(image: &[u8]) -> bool {
    find_header(image).is_ok()
}

/// The Multiboot header: offset and flags.
fn find_header(image: &[u8]) -> Result<(usize, u32), MultibootError> {
    let searched = image.len().min(HEADER_SEARCH);
    let mut bad = None;
    let mut off = 0usize;
    while off + 12 <= searched {
        if u32_at(image, off) == Some(HEADER_MAGIC) {
            let flags = u32_at(image, off + 4).unwrap_or(0);
            let checksum = u32_at(image, off + 8).unwrap_or(0);
            if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) == 0 {
                return Ok((off, flags));
            }
            bad.get_or_insert(MultibootError::BadChecksum { offset: off, flags, checksum });
        }
        off += 4;
    }
    Err(bad.unwrap_or(MultibootError::NoHeader { searched }))
}

/// The a.out kludge: one piece from the header's address fields, and the entry point.
fn aout_piece(image: &[u8], off: usize) -> Result<(Piece<'_>, u32), MultibootError> {
    let truncated = MultibootError::HeaderTruncated { offset: off, image_len: image.len() };
    let field = |i: usize| u32_at(image, off + 12 + 4 * i).ok_or(truncated);
    let header_addr = field(0)?;
    let load_addr = field(1)?;
    let load_end_addr = field(2)?;
    let bss_end_addr = field(3)?;
    let entry = field(4)?;

    let delta =
        header_addr.checked_sub(load_addr).ok_or(MultibootError::LoadAddrAboveHeader { load_addr, header_addr })?;
    let text_offset = off.checked_sub(delta as usize).ok_or(MultibootError::TextBeforeFileStart {
        offset: off,
        header_addr,
        load_addr,
    })?;
    let load_size = if load_end_addr == 0 {
        // `text_offset <= off < image.len()`.
        (image.len() - text_offset) as u64
    } else {
        u64::from(
            load_end_addr
                .checked_sub(load_addr)
                .ok_or(MultibootError::LoadEndBeforeLoad { load_addr, load_end_addr })?,
        )
    };
    let past = MultibootError::LoadPastImage { file_offset: text_offset as u64, load_size, image_len: image.len() };
    let data_end = usize::try_from(load_size).ok().and_then(|n| text_offset.checked_add(n)).ok_or(past)?;
    let data = image.get(text_offset..data_end).ok_or(past)?;
    let load_end = u64::from(load_addr) + load_size;
    let end = if bss_end_addr == 0 {
        load_end
    } else if u64::from(bss_end_addr) < load_end {
        return Err(MultibootError::BssEndBeforeLoadEnd { load_end, bss_end_addr });
    } else {
        u64::from(bss_end_addr)
    };
    if !(u64::from(load_addr)..load_end).contains(&u64::from(entry)) {
        return Err(MultibootError::EntryOutsideKernel { entry, start: u64::from(load_addr), end: load_end });
    }
    let addr = u64::from(load_addr);
    Ok((Piece { region: Region::AoutImage, addr, data, end, vaddr: addr }, entry))
}

/// An ELF32 executable: its non-empty `PT_LOAD` segments and `e_entry`.
fn elf32_pieces(image: &[u8]) -> Result<(Vec<Piece<'_>>, u32), MultibootError> {
    let magic: [u8; 4] = image.get(..4).and_then(|s| s.try_into().ok()).unwrap_or([0; 4]);
    if magic != *b"\x7fELF" {
        let mut found = [0u8; 4];
        for (d, s) in found.iter_mut().zip(image) {
            *d = *s;
        }
        return Err(MultibootError::NotElf { found });
    }
    let hdr = image.get(..ELF32_EHDR_SIZE).ok_or(Elf32Error::TooShort { len: image.len() })?;
    let too_short = Elf32Error::TooShort { len: image.len() };
    let ident = |i: usize| hdr.get(i).copied().ok_or(too_short);
    match ident(4)? {
        1 => {}
        2 => return Err(Elf32Error::Elf64.into()),
        class => return Err(Elf32Error::BadClass { class }.into()),
    }
    let data = ident(5)?;
    if data != 1 {
        return Err(Elf32Error::NotLittleEndian { data }.into());
    }
    if ident(6)? != 1 {
        return Err(Elf32Error::BadVersion { version: u32::from(ident(6)?) }.into());
    }
    let e_type = u16_at(hdr, 16).ok_or(too_short)?;
    let machine = u16_at(hdr, 18).ok_or(too_short)?;
    let version = u32_at(hdr, 20).ok_or(too_short)?;
    let entry = u32_at(hdr, 24).ok_or(too_short)?;
    let phoff = u32_at(hdr, 28).ok_or(too_short)?;
    let phentsize = u16_at(hdr, 42).ok_or(too_short)?;
    let phnum = u16_at(hdr, 44).ok_or(too_short)?;
    if machine != EM_386 {
        return Err(Elf32Error::WrongMachine { machine }.into());
    }
    if e_type != ET_EXEC {
        return Err(Elf32Error::NotExecutable { e_type }.into());
    }
    if version != 1 {
        return Err(Elf32Error::BadVersion { version }.into());
    }
    if phentsize < ELF32_PHDR_SIZE {
        return Err(Elf32Error::BadPhentsize { phentsize }.into());
    }
    let table_err = Elf32Error::ProgramHeadersOutOfBounds { phoff, phentsize, phnum, image_len: image.len() };
    let table_end = u64::from(phoff) + u64::from(phentsize) * u64::from(phnum);
    if table_end > image.len() as u64 {
        return Err(table_err.into());
    }

    let mut pieces = Vec::new();
    for index in 0..phnum {
        let base = (phoff as usize).checked_add(usize::from(index) * usize::from(phentsize)).ok_or(table_err)?;
        let ph = image.get(base..base.checked_add(usize::from(ELF32_PHDR_SIZE)).ok_or(table_err)?).ok_or(table_err)?;
        let field = |i: usize| u32_at(ph, 4 * i).ok_or(table_err);
        if field(0)? != PT_LOAD {
            continue;
        }
        let (offset, vaddr, paddr, filesz, memsz) = (field(1)?, field(2)?, field(3)?, field(4)?, field(5)?);
        if filesz > memsz {
            return Err(Elf32Error::FileSizeExceedsMemSize { index, filesz, memsz }.into());
        }
        let data_err = Elf32Error::SegmentDataOutOfBounds { index, offset, filesz, image_len: image.len() };
        let start = offset as usize;
        let data = start.checked_add(filesz as usize).and_then(|end| image.get(start..end)).ok_or(data_err)?;
        if memsz == 0 {
            continue;
        }
        let addr = u64::from(paddr);
        let end = addr + u64::from(memsz);
        pieces.push(Piece { region: Region::Segment(index), addr, data, end, vaddr: u64::from(vaddr) });
    }
    if pieces.is_empty() {
        return Err(Elf32Error::NoLoadSegments.into());
    }
    Ok((pieces, entry))
}

/// Loads a Multiboot (v1) kernel, its modules (each with its string) and the boot information.
///
/// Everything in `image` is untrusted. The image and the layout are fully validated, and every
/// placement decided, before guest memory is written.
pub fn load_multiboot(
    image: &[u8],
    modules: &[(&[u8], &str)],
    cmdline: &str,
    mem: &mut impl GuestMemory,
    layout: &MultibootLayout,
) -> Result<LoadedMultiboot, MultibootError> {
    let (off, flags) = find_header(image)?;
    let unsupported = flags & 0xFFFF & !SUPPORTED_REQUIRED;
    if unsupported != 0 {
        return Err(MultibootError::UnsupportedFlags { flags, unsupported });
    }
    let (pieces, raw_entry) = if flags & FLAG_AOUT_KLUDGE != 0 {
        let (piece, entry) = aout_piece(image, off)?;
        (alloc::vec![piece], entry)
    } else {
        elf32_pieces(image)?
    };

    if let Some(offset) = cmdline.bytes().position(|b| b == 0) {
        return Err(MultibootError::CmdlineHasNul { offset });
    }
    for (index, (_, s)) in modules.iter().enumerate() {
        if let Some(offset) = s.bytes().position(|b| b == 0) {
            return Err(MultibootError::ModuleStringHasNul { index, offset });
        }
    }

    // RAM usable for placement: below guest RAM, guest memory and 4 GiB.
    let ram_limit = layout.ram_bytes.min(mem.size());
    let e820_err = |index: usize| {
        let e = layout.e820.get(index).copied().unwrap_or(E820Entry { addr: 0, size: 0, kind: 0 });
        MultibootError::E820Overflow { index, addr: e.addr, size: e.size }
    };
    let all_ram = ram_ranges(&layout.e820, ram_limit).map_err(e820_err)?;
    let limit = ram_limit.min(GIB4);
    let ram = ram_ranges(&layout.e820, limit).map_err(e820_err)?;

    // The kernel: in RAM, pieces apart.
    for p in &pieces {
        if !in_ram(&ram, p.addr, p.end) {
            return Err(MultibootError::NotInRam { region: p.region, start: p.addr, end: p.end, limit });
        }
    }
    let mut sorted = pieces.clone();
    sorted.sort_unstable_by_key(|p| p.addr);
    for pair in sorted.windows(2) {
        if let [a, b] = pair {
            if b.addr < a.end {
                return Err(MultibootError::Overlap { first: a.region, second: b.region, at: b.addr });
            }
        }
    }
    let kernel_start = sorted.first().map_or(0, |p| p.addr);
    let kernel_end = sorted.iter().map(|p| p.end).max().unwrap_or(0);

    // Entry point: physical, or virtual inside a segment (then translated).
    let entry64 = u64::from(raw_entry);
    let entry = pieces
        .iter()
        .find(|p| (p.addr..p.end).contains(&entry64))
        .map(|_| entry64)
        .or_else(|| {
            pieces.iter().find_map(|p| {
                let delta = entry64.checked_sub(p.vaddr)?;
                (delta < p.end - p.addr).then(|| p.addr + delta)
            })
        })
        .and_then(|e| u32::try_from(e).ok())
        .ok_or(MultibootError::EntryOutsideKernel { entry: raw_entry, start: kernel_start, end: kernel_end })?;

    // The boot information area: info, memory map, module list, command line.
    let mmap_len = MMAP_ENTRY_SIZE * layout.e820.len() as u64;
    let mods_len = MOD_ENTRY_SIZE * modules.len() as u64;
    let mmap_off = INFO_STRUCT_SIZE;
    let mods_off = mmap_off + mmap_len;
    let cmd_off = mods_off + mods_len;
    let info_len = cmd_off + cmdline.len() as u64 + 1;
    if info_len > layout.info_max {
        return Err(MultibootError::InfoTooLarge { need: info_len, info_max: layout.info_max });
    }
    let info_gpa = layout.info_gpa;
    let info_end = info_gpa.checked_add(info_len).ok_or(MultibootError::NotInRam {
        region: Region::Info,
        start: info_gpa,
        end: u64::MAX,
        limit,
    })?;
    if !in_ram(&ram, info_gpa, info_end) {
        return Err(MultibootError::NotInRam { region: Region::Info, start: info_gpa, end: info_end, limit });
    }
    if let Some(p) = sorted.iter().find(|p| overlaps(info_gpa, info_end, (p.addr, p.end))) {
        return Err(MultibootError::Overlap { first: p.region, second: Region::Info, at: p.addr.max(info_gpa) });
    }

    // Modules, page-aligned after the kernel, each followed by its string.
    let avoid: Vec<Range> =
        core::iter::once((info_gpa, info_end)).chain(sorted.iter().map(|p| (p.addr, p.end))).collect();
    let mut placed: Vec<(u64, u64)> = Vec::with_capacity(modules.len());
    let mut next = align_up(kernel_end, PAGE).unwrap_or(u64::MAX);
    for (index, (data, s)) in modules.iter().enumerate() {
        let size = data.len() as u64 + s.len() as u64 + 1;
        let at = lowest_fit(&ram, next, size, PAGE, &avoid).ok_or(MultibootError::ModuleDoesNotFit {
            index,
            size,
            from: next,
            limit,
        })?;
        placed.push((at, data.len() as u64));
        // `lowest_fit` checked that `at + size` does not overflow and lies below 4 GiB.
        next = align_up(at + size, PAGE).unwrap_or(u64::MAX);
    }

    // The boot information, built in a buffer.
    let (mem_lower, mem_upper) = memory_sizes(&all_ram);
    let mut info = alloc::vec![0u8; info_len as usize];
    let mut put = |off: u64, v: &[u8]| {
        let Ok(off) = usize::try_from(off) else { return };
        if let Some(dst) = off.checked_add(v.len()).and_then(|end| info.get_mut(off..end)) {
            dst.copy_from_slice(v);
        }
    };
    // Every address below is inside the area or a module, both checked to lie below 4 GiB.
    let addr32 = |a: u64| (a as u32).to_le_bytes();
    put(0, &(INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP).to_le_bytes());
    put(4, &mem_lower.to_le_bytes());
    put(8, &mem_upper.to_le_bytes());
    put(16, &addr32(info_gpa + cmd_off));
    put(20, &(modules.len() as u32).to_le_bytes());
    put(24, &addr32(info_gpa + mods_off));
    put(44, &(mmap_len as u32).to_le_bytes());
    put(48, &addr32(info_gpa + mmap_off));
    for (i, e) in layout.e820.iter().enumerate() {
        let o = mmap_off + MMAP_ENTRY_SIZE * i as u64;
        put(o, &20u32.to_le_bytes());
        put(o + 4, &e.addr.to_le_bytes());
        put(o + 12, &e.size.to_le_bytes());
        put(o + 20, &e.kind.to_le_bytes());
    }
    for (i, &(at, len)) in placed.iter().enumerate() {
        let o = mods_off + MOD_ENTRY_SIZE * i as u64;
        put(o, &addr32(at));
        put(o + 4, &addr32(at + len));
        put(o + 8, &addr32(at + len));
    }
    put(cmd_off, cmdline.as_bytes());

    // Everything is decided: write.
    for p in &pieces {
        mem.write(p.addr, p.data)?;
        let bss = p.addr + p.data.len() as u64;
        mem.zero(bss, p.end - bss)?;
    }
    for (&(at, len), (data, s)) in placed.iter().zip(modules) {
        mem.write(at, data)?;
        mem.write(at + len, s.as_bytes())?;
        mem.write(at + len + s.len() as u64, &[0])?;
    }
    mem.write(info_gpa, &info)?;
    Ok(LoadedMultiboot { entry, info: info_gpa as u32 })
}

/// `mem_lower` and `mem_upper` in KiB: RAM from 0 (at most 640 KiB) and RAM from 1 MiB up to
/// the first hole.
fn memory_sizes(ram: &[Range]) -> (u32, u32) {
    let lower = ram.iter().find(|r| r.0 == 0).map_or(0, |r| r.1.min(640 * KIB) / KIB);
    let upper = ram.iter().find(|r| r.0 <= MIB && MIB < r.1).map_or(0, |r| (r.1 - MIB) / KIB);
    (lower as u32, u32::try_from(upper).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::bzimage::{E820_RAM, E820_RESERVED};
    use crate::loader::SliceMemory;
    use alloc::string::{String, ToString};
    use alloc::vec;

    const MEM: usize = 8 << 20;
    const INFO: u64 = 0x9000;

    use crate::loader::TestMemory as Mem;

    fn layout() -> MultibootLayout {
        MultibootLayout {
            ram_bytes: MEM as u64,
            e820: vec![
                E820Entry { addr: 0, size: 0x9_fc00, kind: E820_RAM },
                E820Entry { addr: 0x9_fc00, size: 0x10_0000 - 0x9_fc00, kind: E820_RESERVED },
                E820Entry { addr: 0x10_0000, size: MEM as u64 - 0x10_0000, kind: E820_RAM },
                E820Entry { addr: 0xfec0_0000, size: 0x1000, kind: E820_RESERVED },
            ],
            info_gpa: INFO,
            info_max: 0x1000,
        }
    }

    fn load(
        image: &[u8],
        modules: &[(&[u8], &str)],
        cmdline: &str,
        layout: &MultibootLayout,
    ) -> Result<(LoadedMultiboot, Mem), MultibootError> {
        let mut backing = vec![0xccu8; MEM];
        let r = load_multiboot(image, modules, cmdline, &mut SliceMemory(&mut backing), layout)?;
        Ok((r, Mem(backing)))
    }

    fn rd32(m: &[u8], at: u64) -> u32 {
        u32_at(m, at as usize).unwrap()
    }

    fn rd64(m: &[u8], at: u64) -> u64 {
        u64::from(rd32(m, at)) | u64::from(rd32(m, at + 4)) << 32
    }

    fn header(flags: u32) -> [u8; 12] {
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..].copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags).to_le_bytes());
        h
    }

    /// An a.out-kludge kernel: header at file offset 0x40, loaded at 1 MiB, `len` bytes of file,
    /// bss up to 0x10_3000, entry at 0x10_0080.
    fn aout(len: usize, fields: [u32; 5]) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i % 253) as u8 + 1).collect();
        v[0x40..0x4c].copy_from_slice(&header(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_AOUT_KLUDGE));
        for (i, f) in fields.iter().enumerate() {
            v[0x4c + 4 * i..0x50 + 4 * i].copy_from_slice(&f.to_le_bytes());
        }
        v
    }

    const AOUT_FIELDS: [u32; 5] = [0x10_0040, 0x10_0000, 0, 0x10_3000, 0x10_0080];

    /// An ELF32 kernel with one segment per `(offset, vaddr, paddr, filesz, memsz)`, the
    /// Multiboot header (no address fields) at file offset 0x100.
    fn elf32(entry: u32, segs: &[(u32, u32, u32, u32, u32)], len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        v[..52].fill(0);
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 1;
        v[5] = 1;
        v[6] = 1;
        v[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        v[18..20].copy_from_slice(&EM_386.to_le_bytes());
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..28].copy_from_slice(&entry.to_le_bytes());
        v[28..32].copy_from_slice(&52u32.to_le_bytes());
        v[40..42].copy_from_slice(&52u16.to_le_bytes());
        v[42..44].copy_from_slice(&32u16.to_le_bytes());
        v[44..46].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        for (i, &(offset, vaddr, paddr, filesz, memsz)) in segs.iter().enumerate() {
            let o = 52 + 32 * i;
            let fields = [PT_LOAD, offset, vaddr, paddr, filesz, memsz, 5, 0x1000];
            for (j, f) in fields.iter().enumerate() {
                v[o + 4 * j..o + 4 * j + 4].copy_from_slice(&f.to_le_bytes());
            }
        }
        v[0x100..0x10c].copy_from_slice(&header(FLAG_MEMORY_INFO));
        v
    }

    #[test]
    fn loads_aout_kludge_kernel_with_modules_and_info() {
        let image = aout(0x2000, AOUT_FIELDS);
        let m0 = vec![0x11u8; 0x1800];
        let m1 = vec![0x22u8; 0x10];
        let mods: [(&[u8], &str); 3] = [(&m0, "initrd.img"), (&m1, "second arg=1"), (&[], "")];
        let lay = layout();
        let (l, m) = load(&image, &mods, "root=/dev/sda1 quiet", &lay).unwrap();
        assert_eq!(l, LoadedMultiboot { entry: 0x10_0080, info: INFO as u32 });
        // Loaded from file offset 0 (header at 0x40 maps to 0x100040), bss zeroed.
        assert_eq!(&m[0x10_0000..0x10_2000], &image[..]);
        assert!(m[0x10_2000..0x10_3000].iter().all(|&b| b == 0));

        let info = INFO;
        assert_eq!(rd32(&m, info), INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP);
        assert_eq!(rd32(&m, info + 4), 639, "mem_lower");
        assert_eq!(rd32(&m, info + 8), (MEM as u32 - 0x10_0000) / 1024, "mem_upper");
        let cmd = u64::from(rd32(&m, info + 16));
        assert_eq!(&m[cmd as usize..cmd as usize + 21], b"root=/dev/sda1 quiet\0");
        // The memory map, 24 bytes per entry with size = 20.
        assert_eq!(rd32(&m, info + 44), 4 * 24);
        let mmap = u64::from(rd32(&m, info + 48));
        assert_eq!(mmap, info + INFO_STRUCT_SIZE);
        for (i, e) in lay.e820.iter().enumerate() {
            let o = mmap + 24 * i as u64;
            assert_eq!(
                (rd32(&m, o), rd64(&m, o + 4), rd64(&m, o + 12), rd32(&m, o + 20)),
                (20, e.addr, e.size, e.kind)
            );
        }
        // Modules: page-aligned after the kernel's bss, each followed by its string.
        assert_eq!(rd32(&m, info + 20), 3);
        let mods_addr = u64::from(rd32(&m, info + 24));
        let entry = |i: u64| -> [u32; 4] { core::array::from_fn(|j| rd32(&m, mods_addr + 16 * i + 4 * j as u64)) };
        assert_eq!(entry(0), [0x10_3000, 0x10_4800, 0x10_4800, 0]);
        assert!(m[0x10_3000..0x10_4800].iter().all(|&b| b == 0x11));
        assert_eq!(&m[0x10_4800..0x10_480b], b"initrd.img\0");
        assert_eq!(entry(1), [0x10_5000, 0x10_5010, 0x10_5010, 0]);
        assert_eq!(&m[0x10_5010..0x10_501d], b"second arg=1\0");
        assert_eq!(entry(2), [0x10_6000, 0x10_6000, 0x10_6000, 0]);
        assert_eq!(m[0x10_6000], 0);
        // Everything the info points at lies inside the area.
        assert!(cmd + 21 <= INFO + 0x1000 && mods_addr >= mmap + 4 * 24);
    }

    #[test]
    fn aout_load_end_and_header_offset() {
        // Only [0x10_0000, 0x10_0800) loaded, no bss; header_addr says the text starts 0x20
        // bytes before the header, i.e. at file offset 0x20.
        let image = aout(0x2000, [0x10_0020, 0x10_0000, 0x10_0800, 0, 0x10_0010]);
        let (l, m) = load(&image, &[(&[1, 2, 3], "m")], "", &layout()).unwrap();
        assert_eq!(l.entry, 0x10_0010);
        assert_eq!(&m[0x10_0000..0x10_0800], &image[0x20..0x820]);
        assert_eq!(m[0x10_0800], 0xcc);
        let mods_addr = u64::from(rd32(&m, INFO + 24));
        assert_eq!(rd32(&m, mods_addr), 0x10_1000);
    }

    #[test]
    fn loads_elf32_kernel_at_physical_addresses() {
        // A higher-half kernel: linked at 0xc010_0000, loaded at 1 MiB; entry is virtual.
        let segs = [(0x1000, 0xc010_0000, 0x10_0000, 0x800, 0x2000), (0x2000, 0xc020_0000, 0x20_0000, 0x100, 0x100)];
        let image = elf32(0xc010_0010, &segs, 0x3000);
        let (l, m) = load(&image, &[(&[9; 5], "mod")], "", &layout()).unwrap();
        assert_eq!(l.entry, 0x10_0010);
        assert_eq!(&m[0x10_0000..0x10_0800], &image[0x1000..0x1800]);
        assert!(m[0x10_0800..0x10_2000].iter().all(|&b| b == 0));
        assert_eq!(&m[0x20_0000..0x20_0100], &image[0x2000..0x2100]);
        let mods_addr = u64::from(rd32(&m, INFO + 24));
        assert_eq!(rd32(&m, mods_addr), 0x20_1000, "modules after the highest segment");
        // A physical entry point is used as is.
        let image = elf32(0x10_0004, &segs, 0x3000);
        assert_eq!(load(&image, &[], "", &layout()).unwrap().0.entry, 0x10_0004);
        // Outside every segment.
        let image = elf32(0x50_0000, &segs, 0x3000);
        let e = load(&image, &[], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::EntryOutsideKernel { entry: 0x50_0000, start: 0x10_0000, end: 0x20_0100 });
        assert_eq!(e.to_string(), "entry point 0x500000 is outside the loaded kernel [0x100000, 0x200100)");
    }

    #[test]
    fn refuses_bad_elf32_images() {
        let segs = [(0x1000, 0x10_0000, 0x10_0000, 0x800, 0x1000)];
        let good = elf32(0x10_0000, &segs, 0x2000);
        let mut image = good.clone();
        image[4] = 2;
        let e = load(&image, &[], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::Elf(Elf32Error::Elf64));
        assert!(e.to_string().contains("must be ELF32 (EM_386)"), "{e}");
        let mut image = good.clone();
        image[18] = 62;
        assert_eq!(load(&image, &[], "", &layout()).unwrap_err(), Elf32Error::WrongMachine { machine: 62 }.into());
        let mut image = good.clone();
        image[16] = 3;
        assert_eq!(load(&image, &[], "", &layout()).unwrap_err(), Elf32Error::NotExecutable { e_type: 3 }.into());
        let mut image = good.clone();
        image[0] = b'M';
        let e = load(&image, &[], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::NotElf { found: *b"MELF" });
        let image = elf32(0x10_0000, &[(0x1000, 0x10_0000, 0x10_0000, 0x2000, 0x1000)], 0x2000);
        assert_eq!(
            load(&image, &[], "", &layout()).unwrap_err(),
            Elf32Error::FileSizeExceedsMemSize { index: 0, filesz: 0x2000, memsz: 0x1000 }.into()
        );
        let image = elf32(0x10_0000, &[(0x1800, 0x10_0000, 0x10_0000, 0x1000, 0x1000)], 0x2000);
        assert_eq!(
            load(&image, &[], "", &layout()).unwrap_err(),
            Elf32Error::SegmentDataOutOfBounds { index: 0, offset: 0x1800, filesz: 0x1000, image_len: 0x2000 }.into()
        );
        let mut image = good.clone();
        image[44..46].copy_from_slice(&0x400u16.to_le_bytes());
        assert!(matches!(
            load(&image, &[], "", &layout()).unwrap_err(),
            MultibootError::Elf(Elf32Error::ProgramHeadersOutOfBounds { phnum: 0x400, .. })
        ));
        let image = elf32(0x10_0000, &[], 0x2000);
        assert_eq!(load(&image, &[], "", &layout()).unwrap_err(), Elf32Error::NoLoadSegments.into());
        let segs = [(0x1000, 0x10_0000, 0x10_0000, 0, 0x1000), (0x1000, 0x10_0800, 0x10_0800, 0, 0x1000)];
        let e = load(&elf32(0x10_0000, &segs, 0x2000), &[], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::Overlap { first: Region::Segment(0), second: Region::Segment(1), at: 0x10_0800 });
        assert_eq!(e.to_string(), "kernel segment 0 and kernel segment 1 overlap at guest-physical 0x100800");
    }

    #[test]
    fn refuses_missing_or_broken_header() {
        let e = load(&[0u8; 0x3000], &[], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::NoHeader { searched: 8192 });
        assert_eq!(
            e.to_string(),
            "no Multiboot header (magic 0x1badb002 at a 4-byte-aligned offset) in the first 8192 bytes of the image"
        );
        // Misaligned magic is not a header.
        let mut image = vec![0u8; 0x100];
        image[0x42..0x4e].copy_from_slice(&header(0));
        assert_eq!(load(&image, &[], "", &layout()).unwrap_err(), MultibootError::NoHeader { searched: 0x100 });
        // Past 8192 bytes.
        let mut image = vec![0u8; 0x3000];
        image[0x2000..0x200c].copy_from_slice(&header(0));
        assert!(matches!(load(&image, &[], "", &layout()).unwrap_err(), MultibootError::NoHeader { .. }));
        // Bad checksum.
        let mut image = aout(0x2000, AOUT_FIELDS);
        image[0x48] ^= 1;
        let e = load(&image, &[], "", &layout()).unwrap_err();
        assert!(matches!(e, MultibootError::BadChecksum { offset: 0x40, flags: 0x1_0003, .. }), "{e:?}");
        assert!(e.to_string().contains("expected 0xe4514ffb (magic + flags 0x00010003 + checksum must be 0)"), "{e}");
        // Unsupported required flag; bit 2 (video) is accepted.
        let mut image = aout(0x2000, AOUT_FIELDS);
        image[0x40..0x4c].copy_from_slice(&header(FLAG_AOUT_KLUDGE | 1 << 3 | FLAG_VIDEO_MODE));
        let e = load(&image, &[], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::UnsupportedFlags { flags: 0x1_000c, unsupported: 8 });
        image[0x40..0x4c].copy_from_slice(&header(FLAG_AOUT_KLUDGE | FLAG_VIDEO_MODE | 1 << 20));
        load(&image, &[], "", &layout()).unwrap();
        // Address fields cut off.
        let mut image = vec![0u8; 0x54];
        image[0x40..0x4c].copy_from_slice(&header(FLAG_AOUT_KLUDGE));
        assert_eq!(
            load(&image, &[], "", &layout()).unwrap_err(),
            MultibootError::HeaderTruncated { offset: 0x40, image_len: 0x54 }
        );
    }

    #[test]
    fn refuses_bad_aout_fields() {
        let cases: [([u32; 5], MultibootError); 6] = [
            (
                [0x10_0000, 0x10_0040, 0, 0, 0x10_0080],
                MultibootError::LoadAddrAboveHeader { load_addr: 0x10_0040, header_addr: 0x10_0000 },
            ),
            (
                [0x10_0080, 0x10_0000, 0, 0, 0x10_0080],
                MultibootError::TextBeforeFileStart { offset: 0x40, header_addr: 0x10_0080, load_addr: 0x10_0000 },
            ),
            (
                [0x10_0040, 0x10_0000, 0xf_0000, 0, 0x10_0080],
                MultibootError::LoadEndBeforeLoad { load_addr: 0x10_0000, load_end_addr: 0xf_0000 },
            ),
            (
                [0x10_0040, 0x10_0000, 0x10_4000, 0, 0x10_0080],
                MultibootError::LoadPastImage { file_offset: 0, load_size: 0x4000, image_len: 0x2000 },
            ),
            (
                [0x10_0040, 0x10_0000, 0, 0x10_1000, 0x10_0080],
                MultibootError::BssEndBeforeLoadEnd { load_end: 0x10_2000, bss_end_addr: 0x10_1000 },
            ),
            (
                [0x10_0040, 0x10_0000, 0, 0x10_3000, 0x10_2800],
                MultibootError::EntryOutsideKernel { entry: 0x10_2800, start: 0x10_0000, end: 0x10_2000 },
            ),
        ];
        for (fields, want) in cases {
            assert_eq!(load(&aout(0x2000, fields), &[], "", &layout()).unwrap_err(), want, "{fields:x?}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn refuses_out_of_memory() {
        // Kernel in the BIOS hole.
        let image = aout(0x2000, [0xa_0040, 0xa_0000, 0, 0, 0xa_0080]);
        let e = load(&image, &[], "", &layout()).unwrap_err();
        assert_eq!(
            e,
            MultibootError::NotInRam { region: Region::AoutImage, start: 0xa_0000, end: 0xa_2000, limit: 8 << 20 }
        );
        assert_eq!(
            e.to_string(),
            "kernel image at [0xa0000, 0xa2000) is not inside one RAM range of the memory map below 0x800000 (8 MiB)"
        );
        // Kernel past the end of RAM.
        let image = aout(0x2000, [0x7f_f040, 0x7f_f000, 0, 0, 0x7f_f080]);
        assert!(matches!(
            load(&image, &[], "", &layout()).unwrap_err(),
            MultibootError::NotInRam { region: Region::AoutImage, .. }
        ));
        // Modules that do not fit in the rest of RAM.
        let big = vec![0u8; 0x70_0000];
        let image = aout(0x2000, AOUT_FIELDS);
        let e = load(&image, &[(&[1], "a"), (&big, "big")], "", &layout()).unwrap_err();
        assert_eq!(e, MultibootError::ModuleDoesNotFit { index: 1, size: 0x70_0004, from: 0x10_4000, limit: 8 << 20 });
        assert_eq!(
            e.to_string(),
            "module 1 needs 0x700004 bytes with its string, and no RAM range between 0x104000 and 0x800000 (8 MiB) \
             has room"
        );
        // Boot information larger than its area, outside RAM, or on the kernel.
        let mut lay = layout();
        lay.info_max = 120 + 4 * 24;
        let e = load(&image, &[], "", &lay).unwrap_err();
        assert_eq!(e, MultibootError::InfoTooLarge { need: 120 + 4 * 24 + 1, info_max: 120 + 4 * 24 });
        assert_eq!(
            e.to_string(),
            "boot information needs 0xd9 bytes (info, memory map, module list, command line), the area holds 0xd8"
        );
        lay.info_max = 120 + 4 * 24 + 1;
        load(&image, &[], "", &lay).unwrap();
        let long = "x".repeat(0x1000);
        assert!(matches!(load(&image, &[], &long, &layout()).unwrap_err(), MultibootError::InfoTooLarge { .. }));
        let mut lay = layout();
        lay.info_gpa = 0x9_fb80;
        assert!(matches!(
            load(&image, &[], "", &lay).unwrap_err(),
            MultibootError::NotInRam { region: Region::Info, start: 0x9_fb80, end: 0x9_fc59, .. }
        ));
        lay.info_gpa = u64::MAX - 8;
        assert!(matches!(
            load(&image, &[], "", &lay).unwrap_err(),
            MultibootError::NotInRam { region: Region::Info, .. }
        ));
        lay.info_gpa = 0x10_2f00;
        assert_eq!(
            load(&image, &[], "", &lay).unwrap_err(),
            MultibootError::Overlap { first: Region::AoutImage, second: Region::Info, at: 0x10_2f00 }
        );
        // Boot information placed after the kernel: modules skip over it.
        lay.info_gpa = 0x10_3000;
        let (_, m) = load(&image, &[(&[5; 0x10], "m")], "", &lay).unwrap();
        assert_eq!(rd32(&m, u64::from(rd32(&m, 0x10_3000 + 24))), 0x10_4000);
        // A short guest memory behind a larger ram_bytes limits placement too.
        let mut lay = layout();
        lay.ram_bytes = 1 << 40;
        let half = vec![0u8; 0x40_0000];
        let e = load(&image, &[(&half, "a"), (&half, "b")], "", &lay).unwrap_err();
        assert!(matches!(e, MultibootError::ModuleDoesNotFit { index: 1, limit: 0x80_0000, .. }), "{e:?}");
    }

    #[test]
    fn refuses_nul_in_strings() {
        let image = aout(0x2000, AOUT_FIELDS);
        assert_eq!(load(&image, &[], "a\0", &layout()).unwrap_err(), MultibootError::CmdlineHasNul { offset: 1 });
        assert_eq!(
            load(&image, &[(&[], "ok"), (&[], "\0")], "", &layout()).unwrap_err(),
            MultibootError::ModuleStringHasNul { index: 1, offset: 0 }
        );
        let mut lay = layout();
        lay.e820.push(E820Entry { addr: u64::MAX, size: 1, kind: E820_RAM });
        assert_eq!(
            load(&image, &[], "", &lay).unwrap_err(),
            MultibootError::E820Overflow { index: 4, addr: u64::MAX, size: 1 }
        );
    }

    #[test]
    fn memory_sizes_follow_the_map() {
        assert_eq!(memory_sizes(&[(0, 0x9_fc00), (0x10_0000, 0x800_0000)]), (639, 130048));
        assert_eq!(memory_sizes(&[(0, 0x20_0000)]), (640, 1024));
        assert_eq!(memory_sizes(&[(0x1000, 0x9_f000), (0x20_0000, 0x30_0000)]), (0, 0));
        assert_eq!(memory_sizes(&[(0x10_0000, 1 << 44)]), (0, u32::MAX));
    }

    /// xorshift64: deterministic pseudo-random numbers for the mutation test.
    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn mutated_images_never_panic() {
        let aout_image = aout(0x2000, AOUT_FIELDS);
        let segs = [(0x1000, 0xc010_0000, 0x10_0000, 0x800, 0x2000), (0x2000, 0x20_0000, 0x20_0000, 0x100, 0x100)];
        let elf_image = elf32(0xc010_0010, &segs, 0x3000);
        let mut backing = vec![0u8; MEM];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut loaded = 0;
        for round in 0..20_000u32 {
            let (mut image, hot) =
                if round % 2 == 0 { (aout_image.clone(), 0x40..0x60) } else { (elf_image.clone(), 0..0x110) };
            let flips = 1 + xorshift(&mut seed) % 6;
            for _ in 0..flips {
                let r = xorshift(&mut seed);
                let off = if r & 3 == 0 {
                    (r >> 8) as usize % image.len()
                } else {
                    hot.start + (r >> 8) as usize % hot.len()
                };
                image[off] = (r >> 40) as u8;
            }
            // Keep the header's checksum valid most of the time, so the fields behind it are reached.
            let h = if round % 2 == 0 { 0x40 } else { 0x100 };
            if !xorshift(&mut seed).is_multiple_of(4) {
                let flags = u32::from_le_bytes(image[h + 4..h + 8].try_into().unwrap());
                image[h..h + 4].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
                image[h + 8..h + 12]
                    .copy_from_slice(&0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags).to_le_bytes());
            }
            let r = xorshift(&mut seed);
            if r & 7 == 0 {
                image.truncate((r >> 8) as usize % (image.len() + 1));
            }
            let module = vec![3u8; (xorshift(&mut seed) % 0x3000) as usize];
            let name: String = "n".repeat((xorshift(&mut seed) % 16) as usize);
            let mut lay = layout();
            lay.ram_bytes = xorshift(&mut seed) % (MEM as u64 + 0x1000);
            lay.info_gpa = xorshift(&mut seed) % 0x20_0000;
            match load_multiboot(&image, &[(&module, &name)], "console=ttyS0", &mut SliceMemory(&mut backing), &lay) {
                Ok(l) => {
                    loaded += 1;
                    assert!(u64::from(l.entry) < lay.ram_bytes && u64::from(l.info) == lay.info_gpa);
                }
                Err(e) => {
                    let _ = e.to_string();
                }
            }
        }
        assert!(loaded > 100, "only {loaded} mutated images loaded");
    }
}
