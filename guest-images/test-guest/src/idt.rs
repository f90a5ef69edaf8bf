//! The 64-bit interrupt descriptor table's entries, shared by the guests that take interrupts.

use core::arch::asm;

/// The guests' 64-bit code segment.
const KERNEL_CS: u16 = 0x08;
/// Present, DPL 0, 64-bit interrupt gate (IF is cleared on entry).
const INTERRUPT_GATE: u8 = 0x8E;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl IdtEntry {
    pub const MISSING: IdtEntry =
        IdtEntry { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, reserved: 0 };

    pub fn interrupt_gate(handler: u64) -> IdtEntry {
        IdtEntry {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist: 0,
            type_attr: INTERRUPT_GATE,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Loads the IDT of `limit + 1` bytes at `base`; the caller has filled it (or means it empty).
pub fn load_idt(base: u64, limit: u16) {
    let pointer = DescriptorPointer { limit, base };
    // SAFETY: the callers pass either a fully initialised IDT or an empty one (on purpose, for
    // the triple-fault case).
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}
