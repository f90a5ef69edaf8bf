//! Extended FPU/SSE/AVX state of a guest, kept apart from the host's.
//!
//! The host is built soft-float and never touches these registers itself, but anything the
//! guest leaves in them must not leak to another guest, and the guest must find them as it left
//! them. Each vCPU owns an XSAVE area, saved when the vCPU leaves a host CPU and loaded in full
//! before its next entry; between exits of one slice the state simply stays in the registers.

use core::arch::asm;

use raw_cpuid::cpuid;

use super::memory;
use crate::mm::frames::FRAME_SIZE;
use crate::vcpu::{XCR0_AVX, XCR0_SSE, XCR0_X87};

/// What the CPU offers, probed once by [`enable`].
#[derive(Clone, Copy, Debug)]
pub struct XFeatures {
    /// XSAVE/XRSTOR/XSETBV usable (CR4.OSXSAVE set by us).
    pub xsave: bool,
    /// XCR0 bits among x87/SSE/AVX the CPU supports.
    pub supported_xcr0: u64,
}

static FEATURES: spin::Once<XFeatures> = spin::Once::new();

/// Turns on CR4.OSFXSR and, where present, CR4.OSXSAVE with the full supported XCR0 for the
/// host. Call on each CPU before running guests (the features are probed once).
pub fn enable() -> XFeatures {
    let features = *FEATURES.call_once(|| {
        let xsave = cpuid!(1).ecx & (1 << 26) != 0;
        let supported_xcr0 = if xsave { cpuid!(0xd, 0).eax as u64 & (XCR0_X87 | XCR0_SSE | XCR0_AVX) } else { 0 };
        XFeatures { xsave, supported_xcr0 }
    });
    // SAFETY: OSFXSR and OSXSAVE only enable instructions; OSXSAVE is set only when CPUID
    // reports XSAVE, and XCR0 gets only supported bits with x87 set.
    unsafe {
        let mut cr4: u64;
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        cr4 |= 1 << 9; // OSFXSR
        if features.xsave {
            cr4 |= 1 << 18; // OSXSAVE
        }
        asm!("mov cr4, {}", in(reg) cr4, options(nostack));
        if features.xsave {
            set_xcr0(features.supported_xcr0);
        }
    }
    features
}

/// Loads XCR0.
///
/// # Safety
/// CR4.OSXSAVE is set and `value` is valid for this CPU.
unsafe fn set_xcr0(value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { asm!("xsetbv", in("ecx") 0, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack)) };
}

fn xgetbv0() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: only called with CR4.OSXSAVE set (features.xsave); XGETBV(0) has no side effects.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") low, out("edx") high, options(nomem, nostack)) };
    (high as u64) << 32 | low as u64
}

/// One save area (a whole frame: XSAVE of x87/SSE/AVX needs 832 bytes, FXSAVE 512).
pub struct XSaveArea {
    phys: u64,
}

impl XSaveArea {
    /// A zeroed area, with the legacy header giving x87 and SSE their reset values.
    pub fn new() -> Option<Self> {
        let phys = memory::alloc_zeroed(1, FRAME_SIZE)?;
        let area = XSaveArea { phys };
        // SAFETY: the frame was just allocated for this area.
        let bytes = unsafe { memory::phys_slice_mut(phys, FRAME_SIZE as usize) };
        bytes[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW after FINIT
        bytes[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR at reset
        Some(area)
    }

    fn ptr(&self) -> *mut u8 {
        memory::phys_map().virt(self.phys) as *mut u8
    }

    /// Saves the current extended state (components in `xcr0`) into the area.
    pub fn save(&mut self, features: &XFeatures, xcr0: u64) {
        // SAFETY: the area is a 4 KiB-aligned frame owned by `self`, large enough for every
        // component in XCR0 (x87, SSE, AVX), and the instructions are enabled by `enable`.
        unsafe {
            if features.xsave {
                asm!("xsave64 [{}]", in(reg) self.ptr(), in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32,
                    options(nostack));
            } else {
                asm!("fxsave64 [{}]", in(reg) self.ptr(), options(nostack));
            }
        }
    }

    /// Loads the area's extended state (components in `xcr0`).
    pub fn restore(&self, features: &XFeatures, xcr0: u64) {
        // SAFETY: as in `save`; the area holds either zeroes with a valid legacy header or a
        // previous save, both valid XRSTOR/FXRSTOR images.
        unsafe {
            if features.xsave {
                asm!("xrstor64 [{}]", in(reg) self.ptr(), in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32,
                    options(nostack));
            } else {
                asm!("fxrstor64 [{}]", in(reg) self.ptr(), options(nostack));
            }
        }
    }
}

impl Drop for XSaveArea {
    fn drop(&mut self) {
        if let Err(e) = memory::free_frames(self.phys, 1) {
            log::error!("xstate: freeing the save area at {:#x}: {e}", self.phys);
        }
    }
}

/// One guest's extended state. The host never uses these registers (it is built soft-float),
/// so the guest's state stays in them across exits: it is saved only when the vCPU leaves the
/// host CPU ([`XState::leave_cpu`], at the end of each slice) and loaded in full at its next
/// entry, where whatever another vCPU left in the registers is overwritten.
pub struct XState {
    features: XFeatures,
    guest: XSaveArea,
    /// The guest's XCR0 (starts as x87 only, as after reset).
    pub guest_xcr0: u64,
    /// The guest's state is in this CPU's registers (since the first entry of this slice).
    loaded: bool,
}

impl XState {
    /// The area for one vCPU.
    pub fn new() -> Option<Self> {
        Some(XState { features: enable(), guest: XSaveArea::new()?, guest_xcr0: XCR0_X87, loaded: false })
    }

    /// Before entry: load the guest's state if it is not in the registers yet, and its XCR0.
    pub fn enter_guest(&mut self) {
        if !self.loaded {
            // Every component the CPU has, so none keeps what another vCPU left in it:
            // components the area does not hold are initialised.
            let all = self.features.supported_xcr0;
            if self.features.xsave {
                // SAFETY: the host's XCR0 is what `enable` validated.
                unsafe { set_xcr0(all) };
            }
            self.guest.restore(&self.features, all);
            self.loaded = true;
        }
        if self.features.xsave {
            // SAFETY: guest_xcr0 was validated against supported_xcr0 by the exit handler.
            unsafe { set_xcr0(self.guest_xcr0) };
        }
    }

    /// After exit: note the guest's XCR0. Its state stays in the registers.
    pub fn leave_guest(&mut self) {
        if self.features.xsave {
            // Normally equal to guest_xcr0; where XSETBV is not intercepted (QEMU's TCG ignores
            // the SVM intercept bit) the guest set it directly and the CPU validated it.
            self.guest_xcr0 = xgetbv0();
        }
    }

    /// The vCPU leaves this host CPU: save its state (XCR0 is still the guest's).
    pub fn leave_cpu(&mut self) {
        if self.loaded {
            self.guest.save(&self.features, self.guest_xcr0);
            self.loaded = false;
        }
    }

    /// The XCR0 bits the guest may enable.
    pub fn supported_xcr0(&self) -> u64 {
        self.features.supported_xcr0
    }
}
