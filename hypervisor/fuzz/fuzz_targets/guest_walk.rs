//! The software walk of the guest's page tables (`hypervisor::loader::guest_walk`): every
//! paging mode, page tables and data from the fuzzer.
//!
//! Input: flags (access kind, memory kind, paging-mode preset), CR0, CR3, CR4, EFER, the
//! linear address, the access length, the reported memory size, then the memory's bytes. With
//! the mirror memory every address aliases into those bytes, so entries pointing anywhere still
//! find tables.
#![no_main]

use hypervisor::loader::guest_walk::{self, Access, WalkError, PF_FETCH, PF_PRESENT, PF_RSVD, PF_USER, PF_WRITE};
use hypervisor::loader::{GuestMemory, SliceMemory};
use hypervisor::vcpu::GuestMode;
use hypervisor::vm::control_regs::{
    CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMEP, EFER_LMA, EFER_LME, EFER_NXE,
};
use hypervisor_fuzz::{MirrorMemory, Reader};
use libfuzzer_sys::fuzz_target;

/// A paging mode: the raw registers, or a preset with the raw values' optional bits.
fn mode(preset: u8, cr0: u64, cr3: u64, cr4: u64, efer: u64) -> GuestMode {
    let (wp, pse, smep, nxe) = (cr0 & CR0_WP, cr4 & CR4_PSE, cr4 & CR4_SMEP, efer & EFER_NXE);
    let (cr0, cr4, efer, long_code) = match preset % 6 {
        0 => (cr0, cr4, efer, efer & EFER_LMA != 0),
        1 => (CR0_PE, 0, 0, false),
        2 => (CR0_PE | CR0_PG | wp, pse | smep, 0, false),
        3 => (CR0_PE | CR0_PG | wp, CR4_PAE | smep, nxe, false),
        4 => (CR0_PE | CR0_PG | wp, CR4_PAE | smep, EFER_LME | EFER_LMA | nxe, true),
        _ => (CR0_PE | CR0_PG | wp, CR4_PAE | CR4_LA57 | smep, EFER_LME | EFER_LMA | nxe, true),
    };
    GuestMode { cr0, cr3, cr4, efer, long_code, default_32: !long_code, cs_base: 0, cpl: 0 }
}

fn check_translate(mem: &impl GuestMemory, mode: &GuestMode, gva: u64, access: Access) -> Result<u64, WalkError> {
    let result = guest_walk::translate(mem, mode, gva, access);
    if hypervisor_fuzz::verbose() {
        eprintln!("translate {gva:#x} {access:?} in {mode:x?}: {result:x?}");
    }
    let _ = result.as_ref().map_err(|e| e.to_string());
    let long = mode.efer & EFER_LMA != 0;
    let linear = if long { gva } else { gva & 0xffff_ffff };
    match result {
        Ok(gpa) => {
            assert_eq!(gpa & 0xfff, linear & 0xfff, "translation keeps the page offset");
            if mode.cr0 & CR0_PG == 0 {
                assert_eq!(gpa, linear, "paging off is the identity");
            }
            // A write or user access that is allowed implies the weaker ones are.
            let weaker = [Access { write: false, ..access }, Access { user: false, ..access }];
            for w in weaker.into_iter().filter(|&w| w != access && !(w.fetch && !w.user)) {
                assert_eq!(guest_walk::translate(mem, mode, gva, w), Ok(gpa), "{access:?} allowed but {w:?} not");
            }
        }
        Err(WalkError::PageFault { gva: fault_gva, error_code }) => {
            assert_eq!(fault_gva, linear);
            assert_eq!(error_code & PF_WRITE != 0, access.write, "{error_code:#x}");
            assert_eq!(error_code & PF_USER != 0, access.user, "{error_code:#x}");
            if error_code & PF_RSVD != 0 {
                assert_ne!(error_code & PF_PRESENT, 0, "{error_code:#x}");
            }
            if error_code & PF_FETCH != 0 {
                assert!(access.fetch, "{error_code:#x}");
            }
            assert_eq!(error_code & !0x1f, 0, "{error_code:#x}");
            assert_ne!(mode.cr0 & CR0_PG, 0, "no page faults with paging off");
        }
        Err(WalkError::NonCanonical { gva: bad }) => {
            assert!(long && bad == gva);
        }
        Err(WalkError::Memory(_)) => {}
    }
    result
}

fn run(mem: &mut (impl GuestMemory + Snapshot), mode: &GuestMode, gva: u64, access: Access, len: usize) {
    let _ = check_translate(mem, mode, gva, access);

    // Reads across pages: every byte is the byte its own translation names.
    let mut buf = vec![0u8; len];
    if guest_walk::read_virt_access(mem, mode, gva, access, &mut buf).is_ok() {
        let long = mode.efer & EFER_LMA != 0;
        for i in [0, len / 2, len.saturating_sub(1)].into_iter().filter(|&i| i < len) {
            let va = gva.wrapping_add(i as u64);
            let va = if long { va } else { va & 0xffff_ffff };
            let gpa = guest_walk::translate(mem, mode, va, access).expect("a page that was read translates");
            let mut b = [0u8];
            mem.read(gpa, &mut b).expect("a byte that was read exists");
            assert_eq!(b[0], buf[i], "byte {i} at {va:#x} -> {gpa:#x}");
        }
    }

    // Writes: a refused write leaves memory as it was.
    let data: Vec<u8> = (0..len).map(|i| i as u8 ^ 0xa5).collect();
    let before = mem.snapshot();
    if let Err(e) = guest_walk::write_virt(mem, mode, gva, &data) {
        assert!(mem.snapshot() == before, "write_virt failed ({e}) after writing");
    }
}

/// The memory's contents, to compare before and after.
trait Snapshot {
    fn snapshot(&self) -> Vec<u8>;
}

impl Snapshot for SliceMemory<'_> {
    fn snapshot(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl Snapshot for MirrorMemory {
    fn snapshot(&self) -> Vec<u8> {
        self.backing.clone()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let (cr0, cr3, cr4, efer) = (r.u64(), r.u64(), r.u64(), r.u64());
    let gva = r.u64();
    let len = usize::from(r.u16()) % (2 * 4096 + 32);
    let size = r.u64();
    let mode = mode(flags >> 4, cr0, cr3, cr4, efer);
    let access = Access { write: flags & 1 != 0, fetch: flags & 2 != 0, user: flags & 4 != 0 };
    let mut backing = r.rest().to_vec();
    if flags & 8 != 0 {
        let mut mem = MirrorMemory { backing, size };
        run(&mut mem, &mode, gva, access, len);
    } else {
        let mut mem = SliceMemory(&mut backing);
        run(&mut mem, &mode, gva, access, len);
    }
});
