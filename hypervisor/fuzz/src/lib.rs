//! Mocks and checks shared by the fuzz targets: guest memories that cost nothing for gigabytes
//! of guest RAM, a byte reader for the targets' fixed-layout control headers, range checks for
//! the loaders' invariants, and the VM setup path (`prepare_and_check`) the loader targets share.
//!
//! Nothing here models the CPU: the targets only check that the library never panics, never
//! loops without bound, and keeps the invariants its documentation states.

use std::collections::BTreeMap;

use hypervisor::loader::bzimage::{E820Entry, E820_RAM};
use hypervisor::loader::{GuestMemory, MemError};
use hypervisor::vcpu::StartMode;
use hypervisor::vm::config::{DeviceSet, Entry, VmConfig};
use hypervisor::vm::setup::{self, KernelFormat};

const PAGE: u64 = 4096;

/// Guest memory of any size (up to the whole 64-bit space) that stores only the pages written,
/// and records every range written, so a target can check where a loader put things.
#[derive(Debug, Default)]
pub struct SparseMemory {
    size: u64,
    pages: BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    /// Every `[start, end)` written (data or zeroes), in order.
    pub writes: Vec<(u64, u64)>,
}

impl SparseMemory {
    /// `size` bytes of zeroed guest memory.
    pub fn new(size: u64) -> Self {
        SparseMemory { size, pages: BTreeMap::new(), writes: Vec::new() }
    }

    fn check(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        let err = MemError::OutOfRange { gpa, len };
        let end = gpa.checked_add(len).ok_or(err)?;
        if end > self.size {
            return Err(err);
        }
        Ok(end)
    }

    /// The byte at `gpa` (0 where nothing was written).
    pub fn byte(&self, gpa: u64) -> u8 {
        self.pages.get(&(gpa / PAGE)).map_or(0, |p| p[(gpa % PAGE) as usize])
    }
}

impl GuestMemory for SparseMemory {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(gpa, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.byte(gpa + i as u64);
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        let end = self.check(gpa, data.len() as u64)?;
        if gpa < end {
            self.writes.push((gpa, end));
        }
        let (mut at, mut rest) = (gpa, data);
        while !rest.is_empty() {
            let off = (at % PAGE) as usize;
            let n = rest.len().min(PAGE as usize - off);
            let page = self.pages.entry(at / PAGE).or_insert_with(|| Box::new([0; PAGE as usize]));
            page[off..off + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            at += n as u64;
        }
        Ok(())
    }

    /// Zeroing gigabytes (an ELF segment's .bss) costs only the pages that were written.
    fn zero(&mut self, gpa: u64, len: u64) -> Result<(), MemError> {
        let end = self.check(gpa, len)?;
        if gpa == end {
            return Ok(());
        }
        self.writes.push((gpa, end));
        let first = gpa / PAGE;
        let last = (end - 1) / PAGE;
        let touched: Vec<u64> = self.pages.range(first..=last).map(|(&k, _)| k).collect();
        for k in touched {
            let page_start = k * PAGE;
            let lo = gpa.max(page_start) - page_start;
            let hi = end.min(page_start + PAGE) - page_start;
            if lo == 0 && hi == PAGE {
                self.pages.remove(&k);
            } else if let Some(page) = self.pages.get_mut(&k) {
                page[lo as usize..hi as usize].fill(0);
            }
        }
        Ok(())
    }
}

/// Guest memory whose reported size may be far larger than its backing: address `gpa` reads
/// and writes backing byte `gpa % backing.len()`. Page-table entries from the fuzzer then land
/// in real data wherever they point, so walks go deep.
#[derive(Debug)]
pub struct MirrorMemory {
    /// The bytes behind every alias.
    pub backing: Vec<u8>,
    /// Size reported to the code under test.
    pub size: u64,
}

impl MirrorMemory {
    fn index(&self, gpa: u64) -> usize {
        (gpa % self.backing.len() as u64) as usize
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let err = MemError::OutOfRange { gpa, len };
        if self.backing.is_empty() || gpa.checked_add(len).ok_or(err)? > self.size {
            return Err(err);
        }
        Ok(())
    }
}

impl GuestMemory for MirrorMemory {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.check(gpa, buf.len() as u64)?;
        for (i, b) in buf.iter_mut().enumerate() {
            *b = self.backing[self.index(gpa + i as u64)];
        }
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.check(gpa, data.len() as u64)?;
        for (i, &b) in data.iter().enumerate() {
            let at = self.index(gpa + i as u64);
            self.backing[at] = b;
        }
        Ok(())
    }
}

/// Reads a fixed-layout control header: little-endian fields, zero once the input runs out, so
/// every input is valid and a seed's fields stay at fixed offsets.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// The next `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (now, rest) = self.data.split_at(n);
        self.data = rest;
        now
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// The next little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A string of up to `max` bytes: a length byte pair, then the bytes (invalid UTF-8 is
    /// replaced).
    pub fn string(&mut self, max: usize) -> String {
        let len = usize::from(self.u16()) % (max + 1);
        String::from_utf8_lossy(self.bytes(len)).into_owned()
    }

    /// Everything not read yet.
    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// The RAM ranges (type 1) of `e820`, clipped to `[0, limit)`, merged: an independent
/// reimplementation for checking the loaders' placements.
pub fn ram_ranges(e820: &[E820Entry], limit: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = e820
        .iter()
        .filter(|e| e.kind == E820_RAM)
        .filter_map(|e| Some((e.addr, e.addr.checked_add(e.size)?.min(limit))))
        .filter(|r| r.0 < r.1)
        .collect();
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for r in v {
        match merged.last_mut() {
            Some(last) if r.0 <= last.1 => last.1 = last.1.max(r.1),
            _ => merged.push(r),
        }
    }
    merged
}

/// Whether `[start, end)` lies inside one of the merged `ranges`.
pub fn inside(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    start <= end && ranges.iter().any(|&(lo, hi)| lo <= start && end <= hi)
}

/// Whether two half-open ranges share a byte.
pub fn overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}

/// A memory map from the control header: the one the VM setup gives its guests for a RAM size
/// (selector even), up to 15 fuzzer-chosen entries (selector odd: bits 7:4 count them), or 130
/// (selector 0xff), more than the zero page holds.
pub fn e820_from(r: &mut Reader<'_>, ram: u64) -> Vec<E820Entry> {
    let selector = r.u8();
    if selector.is_multiple_of(2) {
        return hypervisor::vm::setup::e820(ram);
    }
    let count = if selector == 0xff { 130 } else { usize::from(selector >> 4) };
    (0..count)
        .map(|_| {
            let addr = r.u64();
            let size = r.u64();
            let kind = u32::from(r.u8() % 4);
            E820Entry { addr, size, kind }
        })
        .collect()
}

/// A guest RAM size from the control header: common VM sizes, or any size (even tiny or past
/// 4 GiB).
pub fn ram_size(r: &mut Reader<'_>) -> u64 {
    const SIZES: [u64; 8] = [2 << 20, 16 << 20, 32 << 20, 64 << 20, 256 << 20, 1 << 30, 3 << 30, 6 << 30];
    let selector = r.u8();
    let raw = r.u64();
    match SIZES.get(usize::from(selector % 10)) {
        Some(&size) => size,
        None if selector % 10 == 8 => raw % (8 << 30),
        None => raw,
    }
}

/// A VM configuration for loading `kernel` through `vm::setup::prepare`.
pub fn vm_config(entry: Entry, memory: u64, cmdline: &str) -> VmConfig {
    VmConfig {
        name: "fuzz".into(),
        kernel: "kernel".into(),
        initrd: None,
        modules: Vec::new(),
        cmdline: cmdline.into(),
        memory,
        vcpus: 1,
        entry,
        devices: DeviceSet::default(),
        timeout_seconds: None,
        cpus: None,
        disks: Vec::new(),
        nics: Vec::new(),
    }
}

/// Loads `kernel` the way a VM is built (`vm::setup::prepare`: ACPI tables, the loader the
/// image's headers name, the identity map) and checks what the setup promises: every write
/// inside guest memory, the start state matching the format and the entry kind, nothing
/// after the BIOS area for the ACPI tables.
pub fn prepare_and_check(
    entry: Entry,
    cmdline: &str,
    kernel: &[u8],
    initrd: Option<(&str, &[u8])>,
    modules: &[(&str, &[u8])],
    mem: &mut SparseMemory,
) {
    let config = vm_config(entry, mem.size(), cmdline);
    let detected = setup::detect(kernel);
    let result = setup::prepare(&config, kernel, initrd, modules, mem);
    if verbose() {
        eprintln!("prepare: {result:?}");
    }
    match result {
        Ok(prepared) => {
            let _ = format!("{prepared:?}");
            assert_eq!(Some(prepared.format), detected);
            for &(s, e) in &mem.writes {
                assert!(s < e && e <= mem.size(), "write {s:#x}..{e:#x} outside {:#x} bytes", mem.size());
            }
            // ACPI tables, kernel, boot information, page tables, command line: each byte is
            // written once, or one of them overwrote another.
            let mut sorted = mem.writes.clone();
            sorted.sort_unstable();
            for pair in sorted.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "writes {:x?} and {:x?} overlap", pair[0], pair[1]);
            }
            match (prepared.start, prepared.format, entry) {
                (StartMode::Long64 { cr3, .. }, KernelFormat::BzImage | KernelFormat::Elf64, Entry::Long64) => {
                    assert_eq!(cr3, setup::layout::PAGE_TABLES);
                }
                (StartMode::Protected32 { eax, .. }, KernelFormat::Multiboot, Entry::Long64) => {
                    assert_eq!(eax, hypervisor::loader::multiboot::BOOTLOADER_MAGIC);
                }
                (StartMode::Real { cs, ip }, KernelFormat::Elf64, Entry::Real) => {
                    let linear = (u64::from(cs) << 4) + u64::from(ip);
                    let e = hypervisor::loader::elf::load_elf64(kernel, &mut SparseMemory::new(mem.size()))
                        .expect("the image loaded once")
                        .entry;
                    assert_eq!(linear, e, "cs:ip {cs:#x}:{ip:#x} for entry {e:#x}");
                }
                (start, format, entry) => panic!("{format:?} image with entry {entry:?} started as {start:?}"),
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

/// Whether `FUZZ_VERBOSE` is set: the targets then say what each input did, for checking
/// seeds and reading crash reproducers (`FUZZ_VERBOSE=1 target/.../run_loop corpus/run_loop/hello`).
pub fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("FUZZ_VERBOSE").is_some())
}
