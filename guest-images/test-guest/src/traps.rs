//! IDT, trap entry stubs and the dispatcher that the cases use to check faults they provoke.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::idt::{load_idt, IdtEntry};
use crate::serial::{self, println};

pub const VECTOR_DE: u8 = 0;
pub const VECTOR_BP: u8 = 3;
pub const VECTOR_UD: u8 = 6;
pub const VECTOR_GP: u8 = 13;
pub const VECTOR_PF: u8 = 14;
/// The vector the `hlt` case asks the test device to inject.
pub const VECTOR_TEST_IRQ: u8 = 0x40;

/// Each stub in `trap_stubs` is padded to this size, so vector N's stub is at `trap_stubs + N * 16`.
const STUB_SIZE: u64 = 16;

// One stub per vector: pushes a zero error code when the CPU does not push one, then the vector
// number, and joins `trap_common`, which saves the general registers and calls `trap_dispatch`
// with a pointer to the resulting `TrapFrame`. Whatever the dispatcher leaves in the frame
// (notably RIP) is restored by IRETQ.
global_asm!(
    r#"
    .section .text.traps, "ax"
    .balign 16
    .global trap_stubs
trap_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp trap_common
    .set vector, vector + 1
    .endr

trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    // The CPU aligned RSP to 16 before pushing its 5-word frame; with the 2 words of the stub and
    // the 15 registers (22 words) it is still 16-byte aligned here, as the call needs.
    movq %rsp, %rdi
    cld
    call trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static trap_stubs: u8;
}

/// Stack layout built by the stubs and `trap_common`, lowest address first.
// The general registers are only saved and restored around the dispatcher, never read.
#[allow(dead_code)]
#[repr(C)]
pub struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

/// The guest runs on one CPU and only writes the IDT in `init`, before loading it.
struct IdtCell(UnsafeCell<Idt>);
// SAFETY: single CPU; the table is written once, before any trap can read it.
unsafe impl Sync for IdtCell {}

static IDT: IdtCell = IdtCell(UnsafeCell::new(Idt([IdtEntry::MISSING; 256])));

/// Fills the IDT with a gate for every vector and loads it. Must run before anything can fault.
pub fn init() {
    let stubs = core::ptr::addr_of!(trap_stubs) as u64;
    // SAFETY: nothing else accesses the IDT yet (it is not loaded, and we run on one CPU).
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, entry) in idt.0.iter_mut().enumerate() {
        *entry = IdtEntry::interrupt_gate(stubs + vector as u64 * STUB_SIZE);
    }
    load_idt(IDT.0.get() as u64, (core::mem::size_of::<Idt>() - 1) as u16);
}

/// Loads an empty IDT: the next exception cannot be delivered and escalates to a triple fault.
pub fn load_empty_idt() {
    load_idt(0, 0);
}

/// Restores the guest's own IDT after `load_empty_idt`.
pub fn reload_idt() {
    load_idt(IDT.0.get() as u64, (core::mem::size_of::<Idt>() - 1) as u16);
}

const NO_VECTOR: u32 = u32::MAX;

/// The fault the running case is about to provoke, and what the handler saw of it.
static EXPECTED_VECTOR: AtomicU32 = AtomicU32::new(NO_VECTOR);
static SKIP_BYTES: AtomicU64 = AtomicU64::new(0);
static HITS: AtomicU32 = AtomicU32::new(0);
static LAST_ERROR_CODE: AtomicU64 = AtomicU64::new(0);
static LAST_RIP: AtomicU64 = AtomicU64::new(0);
/// Deliveries of `VECTOR_TEST_IRQ`.
static TEST_IRQ_COUNT: AtomicU32 = AtomicU32::new(0);

/// What the handler recorded for an expected fault.
pub struct Caught {
    /// How many times the expected vector was taken.
    pub hits: u32,
    pub error_code: u64,
    /// RIP pushed by the CPU (before the handler skipped anything).
    pub rip: u64,
}

/// Declares that `vector` is about to be raised: the handler counts it and resumes `skip` bytes
/// past the saved RIP (the length of the faulting instruction; 0 for traps such as #BP).
pub fn expect(vector: u8, skip: u64) {
    HITS.store(0, Ordering::SeqCst);
    LAST_ERROR_CODE.store(0, Ordering::SeqCst);
    LAST_RIP.store(0, Ordering::SeqCst);
    SKIP_BYTES.store(skip, Ordering::SeqCst);
    EXPECTED_VECTOR.store(u32::from(vector), Ordering::SeqCst);
}

/// Ends the expectation set by `expect` and returns what was caught.
pub fn caught() -> Caught {
    EXPECTED_VECTOR.store(NO_VECTOR, Ordering::SeqCst);
    Caught {
        hits: HITS.load(Ordering::SeqCst),
        error_code: LAST_ERROR_CODE.load(Ordering::SeqCst),
        rip: LAST_RIP.load(Ordering::SeqCst),
    }
}

pub fn test_irq_count() -> u32 {
    TEST_IRQ_COUNT.load(Ordering::SeqCst)
}

pub fn reset_test_irq_count() {
    TEST_IRQ_COUNT.store(0, Ordering::SeqCst);
}

#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if frame.vector == u64::from(VECTOR_TEST_IRQ) {
        // No interrupt controller behind the test device, so nothing to acknowledge.
        TEST_IRQ_COUNT.fetch_add(1, Ordering::SeqCst);
        return;
    }
    if frame.vector == u64::from(EXPECTED_VECTOR.load(Ordering::SeqCst)) {
        HITS.fetch_add(1, Ordering::SeqCst);
        LAST_ERROR_CODE.store(frame.error_code, Ordering::SeqCst);
        LAST_RIP.store(frame.rip, Ordering::SeqCst);
        frame.rip += SKIP_BYTES.load(Ordering::SeqCst);
        return;
    }
    if crate::smp::count_interrupt(frame.vector) {
        return;
    }
    println!(
        "case {}: FAIL unexpected exception vector {:#04x} ({}) error code {:#x} at rip {:#x} (rsp {:#x}, rflags {:#x}, cr2 {:#x})",
        crate::current_case(),
        frame.vector,
        vector_name(frame.vector),
        frame.error_code,
        frame.rip,
        frame.rsp,
        frame.rflags,
        crate::cpu::read_cr2()
    );
    println!("guest: stopped by an unexpected exception");
    serial::exit(1);
}

fn vector_name(vector: u64) -> &'static str {
    match vector as u8 {
        VECTOR_DE => "#DE",
        VECTOR_BP => "#BP",
        VECTOR_UD => "#UD",
        8 => "#DF",
        VECTOR_GP => "#GP",
        VECTOR_PF => "#PF",
        other if other < 32 => "exception",
        _ => "interrupt",
    }
}
