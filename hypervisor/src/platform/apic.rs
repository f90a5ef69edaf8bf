//! The host's local APIC as a one-shot timer that forces the guest to exit when an emulated
//! device's deadline arrives, and lets the host sleep in HLT until then.
//!
//! The legacy PIC is masked: the APIC timer is the host's only interrupt source.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use raw_cpuid::cpuid;
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::memory;

/// Vector of the host timer interrupt.
pub const TIMER_VECTOR: u8 = 0xf0;
/// Spurious-interrupt vector (no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Where the xAPIC page is mapped uncached in the hypervisor's address space.
const XAPIC_VIRT: u64 = 0x7f00_0000_0000;

// Register offsets (xAPIC MMIO; x2APIC MSR = 0x800 + offset / 16).
const ID: u32 = 0x20;
const EOI: u32 = 0xb0;
const ICR_LOW: u32 = 0x300;
const ICR_HIGH: u32 = 0x310;
const SVR: u32 = 0xf0;
const LVT_TIMER: u32 = 0x320;
const TIMER_INITIAL: u32 = 0x380;
const TIMER_CURRENT: u32 = 0x390;
const TIMER_DIVIDE: u32 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const DIVIDE_BY_1: u32 = 0b1011;
// ICR (Intel SDM Vol. 3, 11.6.1): delivery modes, level, delivery status, shorthands.
const ICR_FIXED: u32 = 0 << 8;
const ICR_NMI: u32 = 4 << 8;
const ICR_INIT: u32 = 5 << 8;
const ICR_STARTUP: u32 = 6 << 8;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_SEND_PENDING: u32 = 1 << 12;
const ICR_ALL_EXCLUDING_SELF: u32 = 3 << 18;

static X2APIC: AtomicBool = AtomicBool::new(false);
static READY: AtomicBool = AtomicBool::new(false);
/// APIC timer ticks per millisecond.
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

fn read(reg: u32) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is enabled, so the MSR exists.
        unsafe { Msr::new(0x800 + reg / 16).read() as u32 }
    } else {
        // SAFETY: the xAPIC page is mapped uncached at XAPIC_VIRT by `init`; registers are
        // 32-bit at 16-byte-aligned offsets.
        unsafe { core::ptr::read_volatile((XAPIC_VIRT + reg as u64) as *const u32) }
    }
}

fn write(reg: u32, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: as in `read`.
        unsafe { Msr::new(0x800 + reg / 16).write(value as u64) }
    } else {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((XAPIC_VIRT + reg as u64) as *mut u32, value) }
    }
}

struct Frames;

// SAFETY: frames come from the global allocator, which hands each out once.
unsafe impl FrameAllocator<Size4KiB> for Frames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        memory::alloc_zeroed(1, 4096).map(|phys| PhysFrame::containing_address(PhysAddr::new(phys)))
    }
}

/// On the boot CPU: masks the PIC, enables the local APIC (x2APIC when available) and
/// calibrates its timer. The other CPUs follow with [`init_this_cpu`].
pub fn init() -> Result<(), &'static str> {
    // SAFETY: masking every line of both 8259s only stops legacy interrupts, which nothing in
    // the hypervisor uses; their vectors would collide with exceptions.
    unsafe {
        Port::<u8>::new(0x21).write(0xff);
        Port::<u8>::new(0xa1).write(0xff);
    }
    if cpuid!(1).edx & (1 << 9) == 0 {
        return Err("the CPU has no local APIC");
    }
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC.
    let base = unsafe { Msr::new(IA32_APIC_BASE).read() };
    if cpuid!(1).ecx & (1 << 21) != 0 {
        // SAFETY: x2APIC is supported (CPUID); enabling it from xAPIC mode is allowed.
        unsafe { Msr::new(IA32_APIC_BASE).write(base | APIC_BASE_ENABLE | APIC_BASE_X2APIC) };
        X2APIC.store(true, Ordering::Relaxed);
    } else {
        map_xapic(base & 0xf_ffff_f000)?;
    }
    enable_timer();

    // Count APIC ticks across 1 ms of TSC.
    let tsc_per_ms = super::serial::tsc_per_microsecond() * 1000;
    if tsc_per_ms == 0 {
        return Err("TSC frequency unknown: cannot calibrate the APIC timer");
    }
    write(TIMER_INITIAL, u32::MAX);
    let start = rdtsc();
    while rdtsc() - start < tsc_per_ms {
        core::hint::spin_loop();
    }
    let elapsed = u32::MAX - read(TIMER_CURRENT);
    write(TIMER_INITIAL, 0);
    if elapsed == 0 {
        return Err("the APIC timer does not count");
    }
    TICKS_PER_MS.store(elapsed as u64, Ordering::Relaxed);
    READY.store(true, Ordering::Relaxed);
    log::info!("apic: {} mode, timer {} kHz", if X2APIC.load(Ordering::Relaxed) { "x2APIC" } else { "xAPIC" }, elapsed);
    Ok(())
}

/// The APIC setup every CPU needs: the same mode as the boot CPU, spurious vector, a masked
/// one-shot timer.
fn enable_timer() {
    write(SVR, 0x100 | SPURIOUS_VECTOR as u32);
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    write(LVT_TIMER, LVT_MASKED | TIMER_VECTOR as u32);
}

/// On an application processor, after [`init`] ran on the boot CPU: the same APIC mode and a
/// timer with the boot CPU's calibration (every CPU's APIC timer runs on the same bus clock).
pub fn init_this_cpu() {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: the boot CPU found x2APIC support in CPUID, which every CPU of the machine
        // shares; IA32_APIC_BASE exists on every CPU with a local APIC.
        unsafe {
            let mut base_msr = Msr::new(IA32_APIC_BASE);
            let base = base_msr.read();
            base_msr.write(base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        }
    }
    enable_timer();
}

/// This CPU's local APIC ID.
pub fn local_apic_id() -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        read(ID)
    } else {
        read(ID) >> 24
    }
}

/// Sends an interprocessor interrupt: `command` is the ICR's low word, `destination` an APIC ID.
fn send(destination: u32, command: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on; the ICR MSR takes the destination in its upper half.
        unsafe { Msr::new(0x830).write(u64::from(destination) << 32 | u64::from(command)) };
        return;
    }
    write(ICR_HIGH, destination << 24);
    write(ICR_LOW, command);
    // xAPIC: the next command must wait until this one left (bounded: a stuck APIC must not
    // hang the host).
    for _ in 0..1_000_000 {
        if read(ICR_LOW) & ICR_SEND_PENDING == 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// INIT (assert) to the CPU with APIC ID `destination`: it waits for a start-up IPI.
pub fn send_init(destination: u32) {
    send(destination, ICR_INIT | ICR_ASSERT);
}

/// Start-up IPI: the CPU starts in real mode at `page << 12` (`page` below 0x100).
pub fn send_startup(destination: u32, page: u8) {
    send(destination, ICR_STARTUP | ICR_ASSERT | u32::from(page));
}

/// A fixed interrupt at `vector` to the CPU with APIC ID `destination`.
pub fn send_fixed(destination: u32, vector: u8) {
    send(destination, ICR_FIXED | ICR_ASSERT | u32::from(vector));
}

/// An NMI to every CPU but this one (stopping the machine after a fatal error).
pub fn send_nmi_to_others() {
    if READY.load(Ordering::Relaxed) {
        send(0, ICR_NMI | ICR_ASSERT | ICR_ALL_EXCLUDING_SELF);
    }
}

/// An NMI to this CPU (the test device's request).
pub fn send_nmi_to_self() {
    if READY.load(Ordering::Relaxed) {
        // The self shorthand does not take NMIs: name this CPU's APIC ID instead.
        send(local_apic_id(), ICR_NMI | ICR_ASSERT);
    }
}

fn map_xapic(phys: u64) -> Result<(), &'static str> {
    let map = memory::phys_map();
    let (root, _) = x86_64::registers::control::Cr3::read();
    // SAFETY: CR3's table is reached through the physical-memory window and only this
    // single-threaded bring-up modifies it.
    let pml4 = unsafe { &mut *(map.virt(root.start_address().as_u64()) as *mut PageTable) };
    // SAFETY: the bootloader maps all physical memory at this offset.
    let mut mapper = unsafe { OffsetPageTable::new(pml4, VirtAddr::new(map.virt(0))) };
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(XAPIC_VIRT));
    let frame = PhysFrame::containing_address(PhysAddr::new(phys));
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH
        | PageTableFlags::NO_EXECUTE;
    // SAFETY: the page is unused (reserved for the APIC) and the frame is the APIC's MMIO page,
    // which no Rust object aliases.
    unsafe { mapper.map_to(page, frame, flags, &mut Frames) }.map_err(|_| "mapping the local APIC failed")?.flush();
    Ok(())
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// How much later than asked an armed timer may fire and still be kept (see [`arm`]).
const TIMER_SLACK_US: u64 = 4;

/// Arms the one-shot timer to fire after `ns` (clamped to the counter's range), or disarms it.
/// A timer already armed to fire in time is left alone (see [`crate::sched::keeps_armed_timer`]).
pub fn arm(ns: Option<u64>) {
    if !READY.load(Ordering::Relaxed) {
        return;
    }
    let armed = &super::percpu::current().timer_deadline_tsc;
    let Some(ns) = ns else {
        if armed.swap(0, Ordering::Relaxed) != 0 {
            write(TIMER_INITIAL, 0);
        }
        return;
    };
    let ticks_per_ms = TICKS_PER_MS.load(Ordering::Relaxed) as u128;
    let ticks = (ns as u128 * ticks_per_ms / 1_000_000).clamp(1, u32::MAX as u128);
    // When the counter really runs out: `ns` may be beyond its range.
    let fires_in_us = ticks * 1000 / ticks_per_ms;
    let tsc_per_us = super::serial::tsc_per_microsecond();
    let now = rdtsc();
    let fires_in_tsc = (fires_in_us * tsc_per_us as u128).min(u64::MAX as u128);
    let deadline_tsc = now.saturating_add(fires_in_tsc as u64).max(1);
    let previous = armed.load(Ordering::Relaxed);
    let slack = TIMER_SLACK_US * tsc_per_us;
    if crate::sched::keeps_armed_timer(previous, now, deadline_tsc, slack) {
        return;
    }
    if previous == 0 {
        // Unmasked at the first arming; a disarmed timer (initial count 0) stays quiet.
        write(LVT_TIMER, TIMER_VECTOR as u32);
    }
    write(TIMER_INITIAL, ticks as u32);
    armed.store(deadline_tsc, Ordering::Relaxed);
}

/// Signals end of interrupt.
pub fn eoi() {
    if READY.load(Ordering::Relaxed) {
        write(EOI, 0);
    }
}

/// Lets a pending host interrupt be taken (after an exit caused by it).
pub fn take_pending_interrupt() {
    // The interrupt shadow of STI covers the NOP; the interrupt arrives right after it.
    x86_64::instructions::interrupts::enable();
    core::hint::spin_loop();
    x86_64::instructions::interrupts::disable();
}

/// Sleeps until the timer (or another interrupt) fires; the caller armed the timer.
pub fn sleep() {
    x86_64::instructions::interrupts::enable_and_hlt();
    x86_64::instructions::interrupts::disable();
}
