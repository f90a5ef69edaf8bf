//! The ELF64 loader (`hypervisor::loader::elf`), directly and through the VM setup
//! (`vm::setup::prepare`, which adds ACPI tables, the identity map and the command line, or
//! starts a real-mode image).
//!
//! Input: path byte (bit 0: through the setup; bit 1: `entry = real`), the guest RAM size
//! selector and value, then the image.
#![no_main]

use hypervisor::loader::elf::{self, ElfError};
use hypervisor::vm::config::Entry;
use hypervisor_fuzz::{prepare_and_check, ram_size, Reader, SparseMemory};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let path = r.u8();
    let size = ram_size(&mut r);
    let image = r.rest();
    let mut mem = SparseMemory::new(size);

    if path & 1 != 0 {
        let entry = if path & 2 == 0 { Entry::Long64 } else { Entry::Real };
        prepare_and_check(entry, "console=ttyS0", image, None, &[], &mut mem);
        return;
    }
    let result = elf::load_elf64(image, &mut mem);
    if hypervisor_fuzz::verbose() {
        eprintln!("load_elf64: {result:?}");
    }
    match result {
        Ok(loaded) => {
            assert!(loaded.lowest < loaded.highest_end, "{loaded:?}");
            assert!(loaded.highest_end <= size, "{loaded:?} beyond {size:#x}");
            for &(s, e) in &mem.writes {
                assert!(loaded.lowest <= s && e <= loaded.highest_end, "write {s:#x}..{e:#x} outside {loaded:?}");
            }
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(!matches!(e, ElfError::Memory(_)), "validation missed a write outside memory: {e:?}");
            assert!(mem.writes.is_empty(), "a refused image wrote guest memory: {e:?}");
        }
    }
});
