//! The `smp` case: INIT-SIPI-SIPI brings up the application processors, then every IPI
//! delivery mode and destination kind is sent and counted where it lands.
//!
//! An AP starts in real mode at the SIPI page (0x8000, a copy of `ap_trampoline_start`),
//! switches to protected mode with the guest's GDT, enables paging with the BSP's CR3 and long
//! mode, takes a stack of its own and runs `ap_main`: it loads the IDT, enables its local APIC
//! with a flat logical ID of `1 << apic_id`, reports in and halts with interrupts on. The IPI
//! vectors count per (APIC ID, vector) in `trap_dispatch`.
//!
//! Last, every CPU sends itself `SELF_IPI_ROUNDS` IPIs whose handler lingers before its EOI:
//! each must be taken exactly once, never inside its own handler (QEMU's TCG delivers an
//! interrupt injected through SVM's EVENTINJ a second time when its CPU loop stops early).

// Failure messages are returned by value, as in `cases`.
#![allow(clippy::result_large_err)]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cases::{fail, CaseResult};
use crate::cpu;
use crate::println;
use crate::traps;

/// Guest-physical page the SIPI starts the APs at (vector 0x08).
const SIPI_PAGE: usize = 0x8000;
const SIPI_VECTOR: u32 = (SIPI_PAGE >> 12) as u32;
/// APs the case expects: the VM has four vCPUs.
const APS: u32 = 3;
/// Most APs the stacks provide for.
const MAX_APS: u32 = 8;

const LAPIC: usize = 0xfee0_0000;
const REG_ID: usize = 0x20;
const REG_TPR: usize = 0x80;
const REG_EOI: usize = 0xb0;
const REG_LDR: usize = 0xd0;
const REG_DFR: usize = 0xe0;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const ICR_PENDING: u32 = 1 << 12;

/// First vector the case sends; `IPI_VECTORS` of them are counted.
pub const IPI_VECTOR_BASE: u8 = 0x50;
const IPI_VECTORS: usize = 16;
const MAX_APIC_IDS: usize = 16;

/// CR3 for the APs, written by the BSP before the SIPI.
#[no_mangle]
static AP_CR3: AtomicU32 = AtomicU32::new(0);
/// The next AP stack to hand out.
#[no_mangle]
static AP_STACK_INDEX: AtomicU32 = AtomicU32::new(0);
/// APs that reported in (bit = APIC ID).
static ARRIVED: AtomicU64 = AtomicU64::new(0);
/// IPIs taken, by APIC ID and vector - IPI_VECTOR_BASE.
static IPIS: [[AtomicU32; IPI_VECTORS]; MAX_APIC_IDS] =
    [const { [const { AtomicU32::new(0) }; IPI_VECTORS] }; MAX_APIC_IDS];
/// NMIs taken, by APIC ID.
static NMIS: [AtomicU32; MAX_APIC_IDS] = [const { AtomicU32::new(0) }; MAX_APIC_IDS];

/// The self-IPI phase: its vector, rounds per CPU and how long (TSC ticks) its handler stays
/// before the EOI, so that a second delivery would find it still running.
const SELF_IPI_VECTOR: u8 = 0x70;
/// The IPI round trip (`cases=bench`): the BSP sends PING to APIC 1, whose handler answers
/// with PONG.
const PING_VECTOR: u8 = 0x71;
const PONG_VECTOR: u8 = 0x72;
static PONGS: AtomicU32 = AtomicU32::new(0);
const SELF_IPI_ROUNDS: u32 = 2000;
const SELF_IPI_HANDLER_TICKS: u64 = 20_000;
/// Set by the BSP: the APs run their self-IPI rounds when the next IPI wakes them.
static SELF_IPIS_GO: AtomicBool = AtomicBool::new(false);
/// CPUs that finished their rounds (bit = APIC ID).
static SELF_IPIS_DONE: AtomicU64 = AtomicU64::new(0);
/// Self-IPIs taken, deliveries that found the handler already running, and whether the
/// handler is running, by APIC ID.
static SELF_IPIS_TAKEN: [AtomicU32; MAX_APIC_IDS] = [const { AtomicU32::new(0) }; MAX_APIC_IDS];
static SELF_IPIS_NESTED: [AtomicU32; MAX_APIC_IDS] = [const { AtomicU32::new(0) }; MAX_APIC_IDS];
static SELF_IPI_RUNNING: [AtomicBool; MAX_APIC_IDS] = [const { AtomicBool::new(false) }; MAX_APIC_IDS];

global_asm!(
    r#"
    .section .text.ap, "ax"
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    jmp 1f
    // The GDT pointer, at offset 8 of the SIPI page.
    .balign 8
    // Four descriptors: null, 64-bit code, data, 32-bit code (main.rs).
    .word 4 * 8 - 1
    .long GDT
1:
    cli
    mov ax, cs
    mov ds, ax
    lgdt [0x8]
    mov eax, cr0
    or eax, 1
    mov cr0, eax
    // jmp far 0x18:ap_protected (32-bit offset)
    .byte 0x66, 0xea
    .long ap_protected
    .word 0x18
    .global ap_trampoline_end
ap_trampoline_end:

    .code32
ap_protected:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, dword ptr [AP_CR3]
    mov cr3, eax
    mov ecx, 0xc0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    // jmp far 0x08:ap_long
    .byte 0xea
    .long ap_long
    .word 0x08

    .code64
ap_long:
    mov eax, 1
    lock xadd dword ptr [rip + AP_STACK_INDEX], eax
    cmp eax, {max_aps}
    jae 2f
    inc eax
    shl rax, 14
    lea rsp, [rip + ap_stacks]
    add rsp, rax
    call ap_main
2:
    cli
    hlt
    jmp 2b

    .section .bss.ap, "aw", @nobits
    .balign 16
ap_stacks:
    .skip 0x4000 * {max_aps}
    .text
"#,
    max_aps = const MAX_APS,
);

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// A plain `mov` load: the hypervisor emulates moves to and from device memory, and a
/// volatile read may compile to another instruction (`test` with a memory operand).
pub fn lapic_read(reg: usize) -> u32 {
    let value: u32;
    // SAFETY: the local APIC page is identity-mapped device memory; reads have no side effects
    // on the registers used here.
    unsafe { asm!("mov {:e}, dword ptr [{}]", out(reg) value, in(reg) LAPIC + reg, options(nostack, preserves_flags)) };
    value
}

pub fn lapic_write(reg: usize, value: u32) {
    // SAFETY: as above; the case owns the APIC's configuration.
    unsafe { asm!("mov dword ptr [{}], {:e}", in(reg) LAPIC + reg, in(reg) value, options(nostack, preserves_flags)) };
}

fn apic_id() -> usize {
    (lapic_read(REG_ID) >> 24) as usize
}

/// Enables this CPU's local APIC in flat logical mode with logical ID `1 << apic_id`.
fn enable_lapic() {
    let id = apic_id();
    lapic_write(REG_DFR, 0xffff_ffff);
    lapic_write(REG_LDR, ((1u32 << id) & 0xff) << 24);
    lapic_write(REG_TPR, 0);
    lapic_write(REG_SVR, 0x1ff);
}

fn send_ipi(destination: u8, low: u32) {
    lapic_write(REG_ICR_HIGH, u32::from(destination) << 24);
    lapic_write(REG_ICR_LOW, low);
    while lapic_read(REG_ICR_LOW) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
}

#[no_mangle]
extern "C" fn ap_main() -> ! {
    traps::reload_idt();
    enable_lapic();
    ARRIVED.fetch_or(1 << apic_id(), Ordering::SeqCst);
    loop {
        let id = apic_id();
        if SELF_IPIS_GO.load(Ordering::SeqCst) && SELF_IPIS_DONE.load(Ordering::SeqCst) & (1 << id) == 0 {
            self_ipi_rounds();
        }
        // SAFETY: the IDT is loaded; the IPI handlers return here.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
}

/// Called by `trap_dispatch` for vectors it does not know: counts IPIs and NMIs. Returns
/// whether the vector was one of them.
pub fn count_interrupt(vector: u64) -> bool {
    let id = apic_id().min(MAX_APIC_IDS - 1);
    if vector == 2 {
        NMIS[id].fetch_add(1, Ordering::SeqCst);
        return true;
    }
    if vector == u64::from(PING_VECTOR) {
        lapic_write(REG_EOI, 0);
        send_ipi(0, u32::from(PONG_VECTOR));
        return true;
    }
    if vector == u64::from(PONG_VECTOR) {
        PONGS.fetch_add(1, Ordering::SeqCst);
        lapic_write(REG_EOI, 0);
        return true;
    }
    if vector == u64::from(SELF_IPI_VECTOR) {
        if SELF_IPI_RUNNING[id].swap(true, Ordering::SeqCst) {
            SELF_IPIS_NESTED[id].fetch_add(1, Ordering::SeqCst);
        }
        let start = cpu::rdtsc();
        while cpu::rdtsc().wrapping_sub(start) < SELF_IPI_HANDLER_TICKS {
            core::hint::spin_loop();
        }
        SELF_IPI_RUNNING[id].store(false, Ordering::SeqCst);
        SELF_IPIS_TAKEN[id].fetch_add(1, Ordering::SeqCst);
        lapic_write(REG_EOI, 0);
        return true;
    }
    let Some(index) = vector.checked_sub(u64::from(IPI_VECTOR_BASE)).filter(|&i| i < IPI_VECTORS as u64) else {
        return false;
    };
    IPIS[id][index as usize].fetch_add(1, Ordering::SeqCst);
    lapic_write(REG_EOI, 0);
    true
}

/// TSC cycles from the BSP sending an IPI to APIC 1 to the answer arriving (median of 16), or
/// `None` if APIC 1 is not up (the `smp` case starts it) or does not answer.
pub fn ipi_round_trip_cycles() -> Option<u64> {
    if ARRIVED.load(Ordering::SeqCst) & 0b10 == 0 {
        return None;
    }
    let mut rounds = [0u64; 16];
    for round in rounds.iter_mut() {
        let before = PONGS.load(Ordering::SeqCst);
        let start = cpu::rdtsc();
        send_ipi(1, u32::from(PING_VECTOR));
        if !wait_for(|| PONGS.load(Ordering::SeqCst) != before) {
            return None;
        }
        *round = cpu::rdtsc() - start;
    }
    rounds.sort_unstable();
    Some(rounds[rounds.len() / 2])
}

/// NMIs taken on every CPU so far.
pub fn nmis_taken() -> u32 {
    NMIS.iter().map(|n| n.load(Ordering::SeqCst)).sum()
}

/// Spins until `done` holds or about a second of TSC ticks (at >= 1 GHz) have passed.
fn wait_for(mut done: impl FnMut() -> bool) -> bool {
    let start = cpu::rdtsc();
    while cpu::rdtsc().wrapping_sub(start) < 2_000_000_000 {
        if done() {
            return true;
        }
        // Let the BSP take IPIs sent to itself while it waits.
        // SAFETY: the IDT is loaded and the handlers return.
        unsafe { asm!("sti", "pause", "cli", options(nomem, nostack)) };
    }
    done()
}

/// This CPU's self-IPI rounds: one IPI at a time, each waited for.
fn self_ipi_rounds() {
    let id = apic_id();
    for _ in 0..SELF_IPI_ROUNDS {
        let before = SELF_IPIS_TAKEN[id].load(Ordering::SeqCst);
        send_ipi(0, 0x0004_4000 | u32::from(SELF_IPI_VECTOR));
        if !wait_for(|| SELF_IPIS_TAKEN[id].load(Ordering::SeqCst) != before) {
            break;
        }
    }
    SELF_IPIS_DONE.fetch_or(1 << id, Ordering::SeqCst);
}

fn counts(vector: u8) -> [u32; 4] {
    let index = usize::from(vector - IPI_VECTOR_BASE);
    core::array::from_fn(|id| IPIS[id][index].load(Ordering::SeqCst))
}

/// Sends one IPI and checks where it landed, per APIC ID 0-3.
fn expect_ipi(what: &str, destination: u8, low: u32, expected: [u32; 4]) -> CaseResult {
    let vector = low as u8;
    send_ipi(destination, low);
    if !wait_for(|| counts(vector) == expected) {
        return Err(fail!(
            "{what}: vector {vector:#x} taken {:?} times by APIC IDs 0-3, expected {expected:?}",
            counts(vector)
        ));
    }
    Ok(())
}

pub fn smp() -> CaseResult {
    enable_lapic();
    if apic_id() != 0 {
        return Err(fail!("BSP has APIC ID {}, expected 0", apic_id()));
    }
    // SAFETY: both symbols delimit the trampoline in the loaded image; the SIPI page is free
    // low RAM that nothing else of the guest uses.
    unsafe {
        let start = core::ptr::addr_of!(ap_trampoline_start);
        let len = core::ptr::addr_of!(ap_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, SIPI_PAGE as *mut u8, len);
    }
    AP_CR3.store(cpu::read_cr3() as u32, Ordering::SeqCst);
    // INIT to all but self, then two SIPIs (SDM Vol. 3, 8.4.4.1).
    send_ipi(0, 0x000c_4500);
    send_ipi(0, 0x000c_4600 | SIPI_VECTOR);
    send_ipi(0, 0x000c_4600 | SIPI_VECTOR);
    let all_aps = ((1u64 << (APS + 1)) - 1) & !1;
    if !wait_for(|| ARRIVED.load(Ordering::SeqCst) == all_aps) {
        return Err(fail!("APs that started: {:#x}, expected {all_aps:#x}", ARRIVED.load(Ordering::SeqCst)));
    }
    let v = |n: u8| u32::from(IPI_VECTOR_BASE + n);
    // Fixed, physical destination.
    expect_ipi("fixed to APIC 2", 2, 0x4000 | v(0), [0, 0, 1, 0])?;
    // Fixed, logical flat destination: logical IDs 1 << apic_id.
    expect_ipi("fixed to logical 0b1010", 0b1010, 0x4800 | v(1), [0, 1, 0, 1])?;
    // Lowest priority among APIC 1-3: exactly one of them takes it.
    send_ipi(0b1110, 0x4900 | v(2));
    if !wait_for(|| counts(IPI_VECTOR_BASE + 2).iter().sum::<u32>() == 1) || counts(IPI_VECTOR_BASE + 2)[0] != 0 {
        return Err(fail!(
            "lowest priority to 1-3: taken {:?}, expected once by one of them",
            counts(IPI_VECTOR_BASE + 2)
        ));
    }
    // Shorthands.
    expect_ipi("all excluding self", 0, 0x000c_4000 | v(3), [0, 1, 1, 1])?;
    expect_ipi("all including self", 0, 0x0008_4000 | v(4), [1, 1, 1, 1])?;
    expect_ipi("self", 0, 0x0004_4000 | v(5), [1, 0, 0, 0])?;
    // Physical broadcast.
    expect_ipi("physical broadcast", 0xff, 0x4000 | v(6), [1, 1, 1, 1])?;
    // NMI to APIC 3.
    send_ipi(3, 0x4400);
    let nmis = || core::array::from_fn::<u32, 4, _>(|id| NMIS[id].load(Ordering::SeqCst));
    if !wait_for(|| nmis() == [0, 0, 0, 1]) {
        return Err(fail!("NMI to APIC 3: taken {:?} times by APIC IDs 0-3", nmis()));
    }
    // A second one: the first handler's IRET must have made room for it.
    send_ipi(3, 0x4400);
    if !wait_for(|| nmis() == [0, 0, 0, 2]) {
        return Err(fail!("second NMI to APIC 3: NMIs taken {:?} times by APIC IDs 0-3", nmis()));
    }
    // Self-IPIs on every CPU at once; the APs start when this IPI wakes them.
    SELF_IPIS_GO.store(true, Ordering::SeqCst);
    send_ipi(0, 0x000c_4000 | v(7));
    self_ipi_rounds();
    let all = (1u64 << (APS + 1)) - 1;
    let finished = || SELF_IPIS_DONE.load(Ordering::SeqCst) == all;
    // Generous: on Bochs a round costs several exits on each of four vCPUs.
    for _ in 0..30 {
        if wait_for(finished) {
            break;
        }
    }
    let taken: [u32; 4] = core::array::from_fn(|id| SELF_IPIS_TAKEN[id].load(Ordering::SeqCst));
    let nested: [u32; 4] = core::array::from_fn(|id| SELF_IPIS_NESTED[id].load(Ordering::SeqCst));
    if !finished() || taken != [SELF_IPI_ROUNDS; 4] || nested != [0; 4] {
        return Err(fail!(
            "self-IPIs: taken {taken:?} times and {nested:?} times inside their own handler by APIC IDs 0-3, expected {SELF_IPI_ROUNDS} each and never inside"
        ));
    }
    println!("case smp: {SELF_IPI_ROUNDS} self-IPIs on each CPU, each taken once");
    Ok(())
}
