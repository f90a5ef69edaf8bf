//! The Multiboot v1 loader (`hypervisor::loader::multiboot`: a.out kludge and ELF32 kernels,
//! modules, boot information) with fuzzer-chosen memory maps and boot-information area, and
//! through the VM setup (`vm::setup::prepare`).
//!
//! Input: path byte (bit 0: through the setup), guest RAM size, memory map, information area
//! and its size, the command line, up to four modules (string and data), then the image.
#![no_main]

use hypervisor::loader::multiboot::{self, MultibootError, MultibootLayout};
use hypervisor::loader::GuestMemory;
use hypervisor::vm::config::Entry;
use hypervisor::vm::setup::layout;
use hypervisor_fuzz::{e820_from, inside, overlap, prepare_and_check, ram_ranges, ram_size, Reader, SparseMemory};
use libfuzzer_sys::fuzz_target;

fn read_u32(mem: &SparseMemory, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    mem.read(gpa, &mut b).expect("boot information lies in memory");
    u32::from_le_bytes(b)
}

fn read_bytes(mem: &SparseMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.read(gpa, &mut b).expect("boot information lies in memory");
    b
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let path = r.u8();
    let size = ram_size(&mut r);
    let e820 = e820_from(&mut r, size);
    let info_gpa = match r.u8() % 3 {
        0 => layout::MULTIBOOT_INFO,
        1 => r.u64() % (64 << 20),
        _ => r.u64(),
    };
    let info_max = match r.u16() {
        0 => layout::MULTIBOOT_INFO_MAX,
        n => u64::from(n),
    };
    let cmdline = r.string(512);
    let count = usize::from(r.u8() % 5);
    let modules: Vec<(String, Vec<u8>)> = (0..count)
        .map(|_| {
            let name = r.string(64);
            let len = usize::from(r.u16() % 4096);
            (name, r.bytes(len).to_vec())
        })
        .collect();
    let image = r.rest();
    let mut mem = SparseMemory::new(size);

    if path & 1 != 0 {
        // The setup takes the first module as the "initrd", like QEMU's -initrd.
        let mut named: Vec<(&str, &[u8])> = modules.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let initrd = if named.is_empty() { None } else { Some(named.remove(0)) };
        prepare_and_check(Entry::Long64, &cmdline, image, initrd, &named, &mut mem);
        return;
    }

    let lay = MultibootLayout { ram_bytes: size, e820, info_gpa, info_max };
    let mods: Vec<(&[u8], &str)> = modules.iter().map(|(n, d)| (d.as_slice(), n.as_str())).collect();
    let result = multiboot::load_multiboot(image, &mods, &cmdline, &mut mem, &lay);
    if hypervisor_fuzz::verbose() {
        eprintln!("load_multiboot: {result:?}");
    }
    let loaded = match result {
        Ok(loaded) => loaded,
        Err(e) => {
            let _ = e.to_string();
            assert!(!matches!(e, MultibootError::Memory(_)), "validation missed a write outside memory: {e:?}");
            assert!(mem.writes.is_empty(), "a refused image wrote guest memory: {e:?}");
            return;
        }
    };

    // Everything lands in RAM below 4 GiB, and the entry point in what was loaded.
    let ram = ram_ranges(&lay.e820, size.min(mem.size()).min(1 << 32));
    for &(s, e) in &mem.writes {
        assert!(inside(&ram, s, e), "write {s:#x}..{e:#x} outside RAM {ram:x?}");
    }
    let entry = u64::from(loaded.entry);
    assert!(mem.writes.iter().any(|&(s, e)| s <= entry && entry < e), "entry {entry:#x} outside the kernel");
    assert_eq!(u64::from(loaded.info), info_gpa);
    if mem.writes.len() <= 256 {
        for (i, &a) in mem.writes.iter().enumerate() {
            for &b in &mem.writes[i + 1..] {
                assert!(!overlap(a, b), "writes {a:x?} and {b:x?} overlap");
            }
        }
    }

    // The boot information names the command line and every module with its string.
    let info = u64::from(loaded.info);
    let cmd_ptr = u64::from(read_u32(&mem, info + 16));
    assert_eq!(read_bytes(&mem, cmd_ptr, cmdline.len() + 1), [cmdline.as_bytes(), &[0]].concat());
    assert_eq!(read_u32(&mem, info + 20) as usize, modules.len());
    let mods_addr = u64::from(read_u32(&mem, info + 24));
    let mut previous_end = 0;
    for (i, (name, body)) in modules.iter().enumerate() {
        let entry = mods_addr + 16 * i as u64;
        let (start, end, string) = (
            u64::from(read_u32(&mem, entry)),
            u64::from(read_u32(&mem, entry + 4)),
            u64::from(read_u32(&mem, entry + 8)),
        );
        assert_eq!(start % 4096, 0, "module {i} at {start:#x}");
        assert!(start >= previous_end, "module {i} before module {}", i.saturating_sub(1));
        assert_eq!(end - start, body.len() as u64);
        assert_eq!(&read_bytes(&mem, start, body.len()), body, "module {i}");
        assert_eq!(read_bytes(&mem, string, name.len() + 1), [name.as_bytes(), &[0]].concat(), "module {i}");
        previous_end = string + name.len() as u64 + 1;
    }
});
