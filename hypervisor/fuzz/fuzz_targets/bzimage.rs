//! The Linux bzImage loader (`hypervisor::loader::bzimage`) with fuzzer-chosen memory maps,
//! boot areas, command line and initrd, and through the VM setup (`vm::setup::prepare`).
//!
//! Input: path byte (bit 0: through the setup; bit 1: an initrd; bit 2: a large zero-filled
//! initrd), guest RAM size, memory map, zero-page and command-line placement, RSDP, the command
//! line, the initrd, then the image.
#![no_main]

use hypervisor::loader::bzimage::{self, LinuxError, LinuxLayout};
use hypervisor::loader::GuestMemory;
use hypervisor::vm::config::Entry;
use hypervisor::vm::setup::layout;
use hypervisor_fuzz::{e820_from, inside, overlap, prepare_and_check, ram_ranges, ram_size, Reader, SparseMemory};
use libfuzzer_sys::fuzz_target;

const MIB: u64 = 1 << 20;
const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;

fn field(image: &[u8], off: usize, len: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = image.get(off..off + len) {
        b[..len].copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

/// A guest-physical address: the setup's usual one (selector even) or any.
fn gpa(r: &mut Reader<'_>, usual: u64) -> u64 {
    let selector = r.u8();
    let raw = r.u64();
    if selector.is_multiple_of(2) {
        usual
    } else if selector % 4 == 1 {
        raw % (64 * MIB)
    } else {
        raw
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let path = r.u8();
    let size = ram_size(&mut r);
    let e820 = e820_from(&mut r, size);
    let zero_page_gpa = gpa(&mut r, layout::ZERO_PAGE);
    let cmdline_gpa = gpa(&mut r, layout::CMDLINE);
    let cmdline_max = match r.u16() {
        0 => layout::CMDLINE_MAX,
        n => u64::from(n),
    };
    let rsdp = match r.u8() % 3 {
        0 => Some(layout::RSDP),
        1 => Some(r.u64()),
        _ => None,
    };
    let cmdline = r.string(4096);
    let initrd_len = usize::from(r.u16());
    let big_initrd = (r.u32() % (8 << 20)) as usize;
    let initrd_bytes = r.bytes(initrd_len).to_vec();
    let image = r.rest();
    let initrd = match (path & 2 != 0, path & 4 != 0) {
        (false, _) => None,
        (true, false) => Some(initrd_bytes),
        (true, true) => Some(vec![0x42; big_initrd]),
    };
    let mut mem = SparseMemory::new(size);

    if path & 1 != 0 {
        let initrd = initrd.as_deref().map(|d| ("initrd", d));
        prepare_and_check(Entry::Long64, &cmdline, image, initrd, &[], &mut mem);
        return;
    }

    let lay = LinuxLayout { ram_bytes: size, e820, zero_page_gpa, cmdline_gpa, cmdline_max, rsdp };
    let result = bzimage::load_bzimage(image, initrd.as_deref(), &cmdline, &mut mem, &lay);
    if hypervisor_fuzz::verbose() {
        eprintln!("load_bzimage: {result:?}");
    }
    let loaded = match result {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = e.to_string();
            assert!(!matches!(e, LinuxError::Memory(_)), "validation missed a write outside memory: {e:?}");
            assert!(mem.writes.is_empty(), "a refused image wrote guest memory: {e:?}");
            return;
        }
    };

    // The header fields placement depends on.
    let setup_sects = match field(image, 0x1f1, 1) {
        0 => 4,
        n => n,
    };
    let kernel_len = image.len() as u64 - (setup_sects + 1) * 512;
    let initrd_addr_max = field(image, 0x22c, 4);
    let alignment = field(image, 0x230, 4);
    let relocatable = field(image, 0x234, 1) != 0;
    let xloadflags = field(image, 0x236, 2) as u16;
    let pref_address = field(image, 0x258, 8);
    let init_size = field(image, 0x260, 4);

    let limit = size.min(mem.size());
    let kernel_limit = if xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G != 0 { limit } else { limit.min(1 << 32) };
    let kernel = (loaded.kernel_start, loaded.kernel_end);
    assert_eq!(loaded.entry, loaded.kernel_start + 0x200);
    assert_eq!(loaded.zero_page, zero_page_gpa);
    assert!(loaded.kernel_end - loaded.kernel_start >= kernel_len.max(init_size), "{loaded:?}");
    assert!(inside(&ram_ranges(&lay.e820, kernel_limit), kernel.0, kernel.1), "kernel outside RAM: {loaded:?}");
    if relocatable {
        assert_eq!(loaded.kernel_start % alignment, 0, "{loaded:?}");
        assert!(loaded.kernel_start >= pref_address.max(MIB), "{loaded:?}");
    } else {
        assert_eq!(loaded.kernel_start, pref_address, "{loaded:?}");
    }

    let zp = (zero_page_gpa, zero_page_gpa + 4096);
    let cl = (cmdline_gpa, cmdline_gpa + cmdline.len() as u64 + 1);
    assert!(!overlap(kernel, zp) && !overlap(kernel, cl) && !overlap(zp, cl), "{loaded:?}");
    let rd = match (loaded.initrd, initrd.as_deref().filter(|d| !d.is_empty())) {
        (None, None) => None,
        (Some((at, len)), Some(data)) => {
            assert_eq!(len, data.len() as u64);
            let end = at + len;
            assert_eq!(at % 4096, 0);
            assert!(at >= MIB && end <= initrd_addr_max + 1, "initrd {at:#x}+{len:#x}");
            assert!(inside(&ram_ranges(&lay.e820, limit), at, end), "initrd outside RAM {at:#x}+{len:#x}");
            for other in [kernel, zp, cl] {
                assert!(!overlap((at, end), other), "initrd {at:#x}+{len:#x} overlaps {other:x?}");
            }
            Some((at, end))
        }
        (placed, given) => panic!("initrd {placed:x?} for {:?} bytes", given.map(<[u8]>::len)),
    };
    // Only the kernel, the zero page, the command line and the initrd are written.
    for &(s, e) in &mem.writes {
        let places = [Some(kernel), Some(zp), Some(cl), rd];
        assert!(places.iter().flatten().any(|&(lo, hi)| lo <= s && e <= hi), "stray write {s:#x}..{e:#x}");
    }
});
