//! A loader for static x86-64 ELF64 executables (`ET_EXEC`).
//!
//! Each `PT_LOAD` segment is copied to its physical address (`p_paddr`) in guest memory and the
//! rest of the segment, up to `p_memsz`, is zeroed (`.bss`). The whole image is validated before
//! anything is written, so a refused image leaves guest memory untouched.

use alloc::vec::Vec;
use core::fmt;

use super::{GuestMemory, MemError, Size};

/// Size of the ELF64 file header.
const EHDR_SIZE: usize = 64;
/// Size of an ELF64 program header.
const PHDR_SIZE: u16 = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EV_CURRENT: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;

/// Where a loaded image ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedElf {
    /// Entry point (`e_entry`).
    pub entry: u64,
    /// Lowest guest-physical address written by a `PT_LOAD` segment.
    pub lowest: u64,
    /// One past the highest guest-physical address written by a `PT_LOAD` segment.
    pub highest_end: u64,
}

/// Why an ELF image was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElfError {
    /// The image is shorter than the ELF header.
    TooShort {
        /// Image length in bytes.
        len: usize,
    },
    /// The image does not start with `\x7fELF`.
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// `EI_CLASS` is not `ELFCLASS64`.
    NotElf64 {
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
    /// `e_machine` is not `EM_X86_64`.
    WrongMachine {
        /// The `e_machine` value.
        machine: u16,
    },
    /// `e_type` is `ET_DYN`: a shared object or position-independent executable.
    Relocatable,
    /// `e_type` is neither `ET_EXEC` nor `ET_DYN`.
    NotExecutable {
        /// The `e_type` value.
        e_type: u16,
    },
    /// `e_phentsize` is smaller than an ELF64 program header.
    BadPhentsize {
        /// The `e_phentsize` value.
        phentsize: u16,
    },
    /// The program header table does not fit in the image.
    ProgramHeadersOutOfBounds {
        /// `e_phoff`.
        phoff: u64,
        /// `e_phentsize`.
        phentsize: u16,
        /// `e_phnum`.
        phnum: u16,
        /// Image length in bytes.
        image_len: usize,
    },
    /// A `PT_INTERP` segment: the executable needs a dynamic loader.
    NeedsInterpreter {
        /// Program header index.
        index: u16,
    },
    /// No `PT_LOAD` segment with a non-zero size.
    NoLoadSegments,
    /// A segment's `p_filesz` exceeds its `p_memsz`.
    FileSizeExceedsMemSize {
        /// Program header index.
        index: u16,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// A segment's file data lies outside the image.
    SegmentDataOutOfBounds {
        /// Program header index.
        index: u16,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
        /// Image length in bytes.
        image_len: usize,
    },
    /// A segment does not fit in guest memory.
    SegmentOutsideMemory {
        /// Program header index.
        index: u16,
        /// `p_paddr`.
        paddr: u64,
        /// `p_memsz`.
        memsz: u64,
        /// Guest memory size in bytes.
        mem_size: u64,
    },
    /// A segment overlaps a range the caller keeps for itself ([`Reserved`]).
    OverlapsReserved {
        /// Program header index.
        index: u16,
        /// `p_paddr`.
        paddr: u64,
        /// `p_paddr + p_memsz`.
        end: u64,
        /// The range it overlaps.
        area: Reserved,
    },
    /// Two segments overlap in guest-physical memory.
    Overlap {
        /// Index of the segment that starts lower.
        first: u16,
        /// Index of the other segment.
        second: u16,
        /// Guest-physical address of the start of the overlap.
        at: u64,
    },
    /// Guest memory refused a write (cannot happen after validation unless the memory is
    /// inconsistent about its size).
    Memory(MemError),
}

impl fmt::Display for ElfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ElfError::TooShort { len } => {
                write!(f, "image is {len} bytes, shorter than the {EHDR_SIZE}-byte ELF64 header")
            }
            ElfError::BadMagic { found } => write!(f, "not an ELF image (magic {found:02x?}, expected 7f 45 4c 46)"),
            ElfError::NotElf64 { class } => write!(f, "not a 64-bit ELF image (EI_CLASS {class}, expected 2)"),
            ElfError::NotLittleEndian { data } => {
                write!(f, "not a little-endian ELF image (EI_DATA {data}, expected 1)")
            }
            ElfError::BadVersion { version } => write!(f, "unknown ELF version {version} (expected 1)"),
            ElfError::WrongMachine { machine } => {
                write!(f, "ELF image is for machine {machine}, not x86-64 (62)")
            }
            ElfError::Relocatable => f.write_str(
                "ELF image is ET_DYN: relocatable/PIE images are not supported, link a static executable (ET_EXEC)",
            ),
            ElfError::NotExecutable { e_type } => write!(f, "ELF type {e_type} is not an executable (ET_EXEC = 2)"),
            ElfError::BadPhentsize { phentsize } => {
                write!(f, "program header size {phentsize} is smaller than the {PHDR_SIZE} bytes of ELF64")
            }
            ElfError::ProgramHeadersOutOfBounds { phoff, phentsize, phnum, image_len } => write!(
                f,
                "program header table ({phnum} x {phentsize} bytes at offset {phoff:#x}) lies outside the \
                 {image_len}-byte image"
            ),
            ElfError::NeedsInterpreter { index } => {
                write!(f, "segment {index} is PT_INTERP: dynamically linked images are not supported, link statically")
            }
            ElfError::NoLoadSegments => f.write_str("ELF image has no non-empty PT_LOAD segment"),
            ElfError::FileSizeExceedsMemSize { index, filesz, memsz } => {
                write!(f, "segment {index} has file size {filesz:#x} larger than its memory size {memsz:#x}")
            }
            ElfError::SegmentDataOutOfBounds { index, offset, filesz, image_len } => write!(
                f,
                "segment {index} data at file offset {offset:#x}+{filesz:#x} lies outside the {image_len}-byte image"
            ),
            ElfError::SegmentOutsideMemory { index, paddr, memsz, mem_size } => {
                write!(f, "segment {index} at {paddr:#x}+{memsz:#x} lies outside guest memory ({})", Size(mem_size))
            }
            ElfError::OverlapsReserved { index, paddr, end, area } => write!(
                f,
                "segment {index} at {paddr:#x}..{end:#x} overlaps the {} at {:#x}..{:#x}",
                area.what, area.start, area.end
            ),
            ElfError::Overlap { first, second, at } => {
                write!(f, "segments {first} and {second} overlap at guest-physical {at:#x}")
            }
            ElfError::Memory(e) => write!(f, "loading segment: {e}"),
        }
    }
}

impl From<MemError> for ElfError {
    fn from(e: MemError) -> Self {
        ElfError::Memory(e)
    }
}

/// Reads a little-endian `u16` at `off` (`None` if out of bounds).
fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

/// Reads a little-endian `u32` at `off` (`None` if out of bounds).
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s: [u8; 4] = b.get(off..off.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(s))
}

/// Reads a little-endian `u64` at `off` (`None` if out of bounds).
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s: [u8; 8] = b.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(s))
}

/// A validated `PT_LOAD` segment.
#[derive(Clone, Copy, Debug)]
struct Segment {
    index: u16,
    paddr: u64,
    /// `paddr + memsz`, known not to overflow and to lie within guest memory.
    end: u64,
    /// Byte range of the file data in the image.
    file_start: usize,
    file_end: usize,
}

/// A guest-physical range `[start, end)` the caller fills itself (page tables, command line,
/// ACPI tables): no segment may overlap it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reserved {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What it holds, for the error.
    pub what: &'static str,
}

/// Loads a static x86-64 ELF64 executable into guest memory at the segments' physical addresses.
///
/// Everything in `image` is treated as untrusted. The image is fully validated before guest
/// memory is touched.
pub fn load_elf64(image: &[u8], mem: &mut impl GuestMemory) -> Result<LoadedElf, ElfError> {
    load_elf64_around(image, mem, &[])
}

/// [`load_elf64`], refusing any segment that overlaps one of `reserved`.
pub fn load_elf64_around(
    image: &[u8],
    mem: &mut impl GuestMemory,
    reserved: &[Reserved],
) -> Result<LoadedElf, ElfError> {
    let hdr = image.get(..EHDR_SIZE).ok_or(ElfError::TooShort { len: image.len() })?;
    let magic = [hdr[0], hdr[1], hdr[2], hdr[3]];
    if magic != *b"\x7fELF" {
        return Err(ElfError::BadMagic { found: magic });
    }
    if hdr[4] != ELFCLASS64 {
        return Err(ElfError::NotElf64 { class: hdr[4] });
    }
    if hdr[5] != ELFDATA2LSB {
        return Err(ElfError::NotLittleEndian { data: hdr[5] });
    }
    if hdr[6] != EV_CURRENT {
        return Err(ElfError::BadVersion { version: u32::from(hdr[6]) });
    }
    let too_short = ElfError::TooShort { len: image.len() };
    let e_type = u16_at(hdr, 16).ok_or(too_short)?;
    let machine = u16_at(hdr, 18).ok_or(too_short)?;
    let version = u32_at(hdr, 20).ok_or(too_short)?;
    let entry = u64_at(hdr, 24).ok_or(too_short)?;
    let phoff = u64_at(hdr, 32).ok_or(too_short)?;
    let phentsize = u16_at(hdr, 54).ok_or(too_short)?;
    let phnum = u16_at(hdr, 56).ok_or(too_short)?;

    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine { machine });
    }
    match e_type {
        ET_EXEC => {}
        ET_DYN => return Err(ElfError::Relocatable),
        other => return Err(ElfError::NotExecutable { e_type: other }),
    }
    if version != u32::from(EV_CURRENT) {
        return Err(ElfError::BadVersion { version });
    }
    if phentsize < PHDR_SIZE {
        return Err(ElfError::BadPhentsize { phentsize });
    }
    let table_err = ElfError::ProgramHeadersOutOfBounds { phoff, phentsize, phnum, image_len: image.len() };
    let table_len = u64::from(phentsize).checked_mul(u64::from(phnum)).ok_or(table_err)?;
    let table_end = phoff.checked_add(table_len).ok_or(table_err)?;
    if table_end > image.len() as u64 {
        return Err(table_err);
    }
    // In bounds of the image, so these fit in usize.
    let phoff = usize::try_from(phoff).map_err(|_| table_err)?;
    let phentsize = usize::from(phentsize);

    let mem_size = mem.size();
    let mut segments: Vec<Segment> = Vec::new();
    for index in 0..phnum {
        let base = usize::from(index).checked_mul(phentsize).and_then(|o| o.checked_add(phoff)).ok_or(table_err)?;
        let ph = image.get(base..base.checked_add(usize::from(PHDR_SIZE)).ok_or(table_err)?).ok_or(table_err)?;
        let p_type = u32_at(ph, 0).ok_or(table_err)?;
        if p_type == PT_INTERP {
            return Err(ElfError::NeedsInterpreter { index });
        }
        if p_type != PT_LOAD {
            continue;
        }
        let offset = u64_at(ph, 8).ok_or(table_err)?;
        let paddr = u64_at(ph, 24).ok_or(table_err)?;
        let filesz = u64_at(ph, 32).ok_or(table_err)?;
        let memsz = u64_at(ph, 40).ok_or(table_err)?;
        if filesz > memsz {
            return Err(ElfError::FileSizeExceedsMemSize { index, filesz, memsz });
        }
        let data_err = ElfError::SegmentDataOutOfBounds { index, offset, filesz, image_len: image.len() };
        let file_end = offset.checked_add(filesz).ok_or(data_err)?;
        if file_end > image.len() as u64 {
            return Err(data_err);
        }
        let mem_err = ElfError::SegmentOutsideMemory { index, paddr, memsz, mem_size };
        let end = paddr.checked_add(memsz).ok_or(mem_err)?;
        if end > mem_size {
            return Err(mem_err);
        }
        if memsz == 0 {
            continue;
        }
        let file_start = usize::try_from(offset).map_err(|_| data_err)?;
        let file_end = usize::try_from(file_end).map_err(|_| data_err)?;
        segments.push(Segment { index, paddr, end, file_start, file_end });
    }
    if segments.is_empty() {
        return Err(ElfError::NoLoadSegments);
    }

    // Overlap check on the segments sorted by address: each must end before the next starts.
    let mut sorted = segments.clone();
    sorted.sort_unstable_by_key(|s| (s.paddr, s.index));
    for pair in sorted.windows(2) {
        if let [a, b] = pair {
            if b.paddr < a.end {
                let (first, second) = if a.index < b.index { (a.index, b.index) } else { (b.index, a.index) };
                return Err(ElfError::Overlap { first, second, at: b.paddr });
            }
        }
    }
    for s in &sorted {
        if let Some(&area) = reserved.iter().find(|r| r.start < r.end && s.paddr < r.end && r.start < s.end) {
            return Err(ElfError::OverlapsReserved { index: s.index, paddr: s.paddr, end: s.end, area });
        }
    }

    let mut lowest = u64::MAX;
    let mut highest_end = 0;
    for s in &segments {
        let data = image.get(s.file_start..s.file_end).ok_or(ElfError::SegmentDataOutOfBounds {
            index: s.index,
            offset: s.file_start as u64,
            filesz: (s.file_end - s.file_start) as u64,
            image_len: image.len(),
        })?;
        mem.write(s.paddr, data)?;
        // `data.len() <= memsz`, so neither of these overflows.
        let bss = s.paddr + data.len() as u64;
        mem.zero(bss, s.end - bss)?;
        lowest = lowest.min(s.paddr);
        highest_end = highest_end.max(s.end);
    }
    Ok(LoadedElf { entry, lowest, highest_end })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::loader::SliceMemory;
    use alloc::string::ToString;
    use alloc::vec;

    /// One program header for [`build_elf`].
    #[derive(Clone, Copy)]
    pub(crate) struct Ph {
        pub p_type: u32,
        pub offset: u64,
        pub paddr: u64,
        pub filesz: u64,
        pub memsz: u64,
    }

    impl Ph {
        pub(crate) fn load(offset: u64, paddr: u64, filesz: u64, memsz: u64) -> Self {
            Ph { p_type: PT_LOAD, offset, paddr, filesz, memsz }
        }
    }

    /// Writes an ELF64 header and program header table (at offset 64) and pads the image to `len`.
    pub(crate) fn build_elf(e_type: u16, machine: u16, entry: u64, phdrs: &[Ph], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len.max(64 + 56 * phdrs.len())];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = ELFCLASS64;
        v[5] = ELFDATA2LSB;
        v[6] = EV_CURRENT;
        v[16..18].copy_from_slice(&e_type.to_le_bytes());
        v[18..20].copy_from_slice(&machine.to_le_bytes());
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&entry.to_le_bytes());
        v[32..40].copy_from_slice(&64u64.to_le_bytes());
        v[52..54].copy_from_slice(&64u16.to_le_bytes());
        v[54..56].copy_from_slice(&56u16.to_le_bytes());
        v[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, p) in phdrs.iter().enumerate() {
            let o = 64 + 56 * i;
            v[o..o + 4].copy_from_slice(&p.p_type.to_le_bytes());
            v[o + 4..o + 8].copy_from_slice(&5u32.to_le_bytes());
            v[o + 8..o + 16].copy_from_slice(&p.offset.to_le_bytes());
            v[o + 16..o + 24].copy_from_slice(&p.paddr.to_le_bytes());
            v[o + 24..o + 32].copy_from_slice(&p.paddr.to_le_bytes());
            v[o + 32..o + 40].copy_from_slice(&p.filesz.to_le_bytes());
            v[o + 40..o + 48].copy_from_slice(&p.memsz.to_le_bytes());
            v[o + 48..o + 56].copy_from_slice(&0x1000u64.to_le_bytes());
        }
        v
    }

    fn exec(phdrs: &[Ph], len: usize) -> Vec<u8> {
        build_elf(ET_EXEC, EM_X86_64, 0x10_0000, phdrs, len)
    }

    fn load(image: &[u8], mem_size: usize) -> Result<(LoadedElf, Vec<u8>), ElfError> {
        let mut backing = vec![0xccu8; mem_size];
        let r = load_elf64(image, &mut SliceMemory(&mut backing))?;
        Ok((r, backing))
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let mut image = exec(&[Ph::load(0x100, 0x1000, 0x10, 0x30), Ph::load(0x200, 0x3000, 0x8, 0x8)], 0x300);
        for (i, b) in image[0x100..0x110].iter_mut().enumerate() {
            *b = i as u8 + 1;
        }
        image[0x200..0x208].copy_from_slice(b"SEGMENT1");
        let (loaded, mem) = load(&image, 0x10000).unwrap();
        assert_eq!(loaded, LoadedElf { entry: 0x10_0000, lowest: 0x1000, highest_end: 0x3008 });
        assert_eq!(&mem[0x1000..0x1010], &image[0x100..0x110]);
        assert!(mem[0x1010..0x1030].iter().all(|&b| b == 0), "bss zeroed");
        assert_eq!(mem[0x1030], 0xcc, "nothing written past memsz");
        assert_eq!(mem[0xfff], 0xcc);
        assert_eq!(&mem[0x3000..0x3008], b"SEGMENT1");
    }

    #[test]
    fn skips_other_segments_and_empty_loads() {
        let note = Ph { p_type: 4, offset: 0xffff_ffff, paddr: u64::MAX, filesz: u64::MAX, memsz: 1 };
        let image = exec(&[note, Ph::load(0, 0x2000, 0, 0), Ph::load(0, 0x1000, 0, 0x10)], 0x200);
        let (loaded, mem) = load(&image, 0x4000).unwrap();
        assert_eq!((loaded.lowest, loaded.highest_end), (0x1000, 0x1010));
        assert!(mem[0x1000..0x1010].iter().all(|&b| b == 0));
        assert_eq!(load(&exec(&[note], 0x200), 0x4000).unwrap_err(), ElfError::NoLoadSegments);
    }

    #[test]
    fn refuses_truncated_header() {
        let image = exec(&[Ph::load(0, 0, 0, 0x10)], 0x100);
        assert_eq!(load(&image[..63], 0x1000).unwrap_err(), ElfError::TooShort { len: 63 });
        assert_eq!(load(&[], 0x1000).unwrap_err(), ElfError::TooShort { len: 0 });
        // Header intact but the program header table cut off.
        let e = load(&image[..100], 0x1000).unwrap_err();
        assert!(matches!(e, ElfError::ProgramHeadersOutOfBounds { phnum: 1, image_len: 100, .. }), "{e:?}");
    }

    #[test]
    fn refuses_bad_ident() {
        let good = exec(&[Ph::load(0, 0, 0, 0x10)], 0x100);
        let mut image = good.clone();
        image[1] = b'X';
        let e = load(&image, 0x1000).unwrap_err();
        assert_eq!(e, ElfError::BadMagic { found: *b"\x7fXLF" });
        assert_eq!(e.to_string(), "not an ELF image (magic [7f, 58, 4c, 46], expected 7f 45 4c 46)");
        let mut image = good.clone();
        image[4] = 1;
        assert_eq!(load(&image, 0x1000).unwrap_err(), ElfError::NotElf64 { class: 1 });
        let mut image = good.clone();
        image[5] = 2;
        assert_eq!(load(&image, 0x1000).unwrap_err(), ElfError::NotLittleEndian { data: 2 });
        let mut image = good.clone();
        image[20] = 2;
        assert_eq!(load(&image, 0x1000).unwrap_err(), ElfError::BadVersion { version: 2 });
    }

    #[test]
    fn refuses_wrong_machine_and_types() {
        let phs = [Ph::load(0, 0, 0, 0x10)];
        let e = load(&build_elf(ET_EXEC, 3, 0, &phs, 0x100), 0x1000).unwrap_err();
        assert_eq!(e, ElfError::WrongMachine { machine: 3 });
        assert_eq!(e.to_string(), "ELF image is for machine 3, not x86-64 (62)");
        let e = load(&build_elf(ET_DYN, EM_X86_64, 0, &phs, 0x100), 0x1000).unwrap_err();
        assert_eq!(e, ElfError::Relocatable);
        assert!(e.to_string().contains("relocatable/PIE images are not supported"));
        let e = load(&build_elf(1, EM_X86_64, 0, &phs, 0x100), 0x1000).unwrap_err();
        assert_eq!(e, ElfError::NotExecutable { e_type: 1 });
        let interp = Ph { p_type: PT_INTERP, ..Ph::load(0, 0, 0, 0) };
        assert_eq!(load(&exec(&[interp], 0x100), 0x1000).unwrap_err(), ElfError::NeedsInterpreter { index: 0 });
    }

    #[test]
    fn refuses_segment_outside_memory() {
        let phs = [Ph::load(0, 0x1000, 0, 0x10), Ph::load(0, 0x2000, 0, 0x10), Ph::load(0x80, 0x30_0000, 0x10, 0x5000)];
        let image = exec(&phs, 0x200);
        let mut backing = vec![0u8; 0x10000];
        // A small memory backing with a large reported size is not needed: 64 KiB shows the text.
        let e = load_elf64(&image, &mut SliceMemory(&mut backing)).unwrap_err();
        assert_eq!(e, ElfError::SegmentOutsideMemory { index: 2, paddr: 0x30_0000, memsz: 0x5000, mem_size: 0x10000 });
        assert_eq!(e.to_string(), "segment 2 at 0x300000+0x5000 lies outside guest memory (64 KiB)");
        assert!(backing.iter().all(|&b| b == 0), "nothing written on refusal");
        // Wrapping around the address space.
        let e = load(&exec(&[Ph::load(0, u64::MAX - 4, 0, 0x10)], 0x100), 0x1000).unwrap_err();
        assert!(matches!(e, ElfError::SegmentOutsideMemory { index: 0, .. }));
        // Ending exactly at the end of memory is fine.
        load(&exec(&[Ph::load(0, 0xff0, 0, 0x10)], 0x100), 0x1000).unwrap();
    }

    #[test]
    fn refuses_filesz_above_memsz_and_data_outside_image() {
        let e = load(&exec(&[Ph::load(0, 0x1000, 0x20, 0x10)], 0x100), 0x4000).unwrap_err();
        assert_eq!(e, ElfError::FileSizeExceedsMemSize { index: 0, filesz: 0x20, memsz: 0x10 });
        assert_eq!(e.to_string(), "segment 0 has file size 0x20 larger than its memory size 0x10");
        let e = load(&exec(&[Ph::load(0xf0, 0x1000, 0x20, 0x20)], 0x100), 0x4000).unwrap_err();
        assert_eq!(e, ElfError::SegmentDataOutOfBounds { index: 0, offset: 0xf0, filesz: 0x20, image_len: 0x100 });
        let e = load(&exec(&[Ph::load(u64::MAX, 0x1000, 2, 2)], 0x100), 0x4000).unwrap_err();
        assert!(matches!(e, ElfError::SegmentDataOutOfBounds { .. }));
    }

    #[test]
    fn refuses_overlapping_segments() {
        let phs = [Ph::load(0, 0x3000, 0, 0x1000), Ph::load(0, 0x1000, 0, 0x1000), Ph::load(0, 0x1800, 0, 0x10)];
        let e = load(&exec(&phs, 0x200), 0x10000).unwrap_err();
        assert_eq!(e, ElfError::Overlap { first: 1, second: 2, at: 0x1800 });
        assert_eq!(e.to_string(), "segments 1 and 2 overlap at guest-physical 0x1800");
        // Adjacent segments do not overlap.
        let phs = [Ph::load(0, 0x1000, 0, 0x1000), Ph::load(0, 0x2000, 0, 0x1000)];
        load(&exec(&phs, 0x200), 0x10000).unwrap();
        // Same start.
        let phs = [Ph::load(0, 0x1000, 0, 0x10), Ph::load(0, 0x1000, 0, 0x10)];
        assert_eq!(
            load(&exec(&phs, 0x200), 0x10000).unwrap_err(),
            ElfError::Overlap { first: 0, second: 1, at: 0x1000 }
        );
    }

    #[test]
    fn refuses_segments_over_reserved_ranges_before_writing() {
        let tables = Reserved { start: 0x1_0000, end: 0x1_6000, what: "page tables" };
        let phs = [Ph::load(0x100, 0x8000, 0x10, 0x10), Ph::load(0x100, 0x1_5000, 0x10, 0x2000)];
        let mut backing = vec![0xccu8; 0x20000];
        let e = load_elf64_around(&exec(&phs, 0x200), &mut SliceMemory(&mut backing), &[tables]).unwrap_err();
        assert_eq!(e, ElfError::OverlapsReserved { index: 1, paddr: 0x1_5000, end: 0x1_7000, area: tables });
        assert_eq!(e.to_string(), "segment 1 at 0x15000..0x17000 overlaps the page tables at 0x10000..0x16000");
        assert!(backing.iter().all(|&b| b == 0xcc), "nothing written on refusal");
        // Touching is not overlapping, and an empty range reserves nothing.
        let phs = [Ph::load(0x100, 0x1_6000, 0x10, 0x10), Ph::load(0x100, 0xf000, 0x10, 0x1000)];
        let empty = Reserved { start: 0x1_6008, end: 0x1_6008, what: "nothing" };
        load_elf64_around(&exec(&phs, 0x200), &mut SliceMemory(&mut backing), &[tables, empty]).unwrap();
    }

    #[test]
    fn refuses_bad_program_header_table() {
        let mut image = exec(&[Ph::load(0, 0, 0, 0x10)], 0x100);
        image[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        let e = load(&image, 0x1000).unwrap_err();
        assert_eq!(
            e,
            ElfError::ProgramHeadersOutOfBounds { phoff: 64, phentsize: 56, phnum: 0xffff, image_len: 0x100 }
        );
        assert!(e.to_string().contains("65535 x 56 bytes at offset 0x40"), "{e}");
        let mut image = exec(&[Ph::load(0, 0, 0, 0x10)], 0x100);
        image[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(load(&image, 0x1000).unwrap_err(), ElfError::ProgramHeadersOutOfBounds { .. }));
        let mut image = exec(&[Ph::load(0, 0, 0, 0x10)], 0x100);
        image[54..56].copy_from_slice(&32u16.to_le_bytes());
        assert_eq!(load(&image, 0x1000).unwrap_err(), ElfError::BadPhentsize { phentsize: 32 });
        // A larger phentsize is allowed: the extra bytes are skipped.
        let mut image = exec(&[], 0x200);
        image[54..56].copy_from_slice(&64u16.to_le_bytes());
        image[56..58].copy_from_slice(&2u16.to_le_bytes());
        for i in 0..2u64 {
            let o = 64 + 64 * i as usize;
            image[o..o + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            image[o + 24..o + 32].copy_from_slice(&(0x1000 * (i + 1)).to_le_bytes());
            image[o + 40..o + 48].copy_from_slice(&0x10u64.to_le_bytes());
        }
        let (loaded, _) = load(&image, 0x4000).unwrap();
        assert_eq!((loaded.lowest, loaded.highest_end), (0x1000, 0x2010));
    }
}
