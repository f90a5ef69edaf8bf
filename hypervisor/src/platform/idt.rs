//! Host IDT: every CPU exception is reported with the full register state, then the run ends;
//! NMIs either stop this CPU (another one ends the run) or are counted and ignored.
//!
//! The stubs are assembly so the report can show every general-purpose register as it was at
//! the fault (the `x86-interrupt` ABI would only give the hardware frame).

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Lazy;

use x86_64::instructions::tables::lidt;
use x86_64::registers::control::{Cr0, Cr2, Cr3, Cr4};
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::{apic, exit, gdt, serial};
use crate::status::{LineBuf, RunStatus};
use x86_64::structures::idt::InterruptStackFrame;

/// Registers as the stubs leave them on the stack, lowest address first.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
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

/// Each stub is padded to this size, so stub N lives at `start + N * STUB_SIZE`.
const STUB_SIZE: u64 = 16;
const EXCEPTION_VECTORS: usize = 32;

// Vectors for which the CPU pushes an error code get no dummy push.
macro_rules! exception_stubs {
    ($($vector:literal $dummy:literal),* $(,)?) => {
        core::arch::global_asm!(
            ".pushsection .text.hv_exception_stubs, \"ax\"",
            ".balign 16",
            ".global hv_exception_stubs_start",
            "hv_exception_stubs_start:",
            $(concat!(".balign 16\n", $dummy, "\npush ", $vector, "\njmp hv_exception_common"),)*
            "hv_exception_common:",
            "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
            "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
            "mov rdi, rsp",
            "cld",
            "call {report}",
            "ud2",
            ".popsection",
            report = sym exception_report,
        );
    };
}

exception_stubs!(
    0 "push 0", 1 "push 0", 2 "push 0", 3 "push 0", 4 "push 0", 5 "push 0", 6 "push 0", 7 "push 0",
    8 "", 9 "push 0", 10 "", 11 "", 12 "", 13 "", 14 "", 15 "push 0",
    16 "push 0", 17 "", 18 "push 0", 19 "push 0", 20 "push 0", 21 "", 22 "push 0", 23 "push 0",
    24 "push 0", 25 "push 0", 26 "push 0", 27 "push 0", 28 "push 0", 29 "", 30 "", 31 "push 0",
);

unsafe extern "C" {
    static hv_exception_stubs_start: u8;
}

#[repr(C, align(16))]
struct Idt([u64; 512]);

static IDT: Lazy<Idt> = Lazy::new(|| {
    let stubs = (&raw const hv_exception_stubs_start) as u64;
    let code_selector = gdt::selectors().code.0;
    let mut idt = Idt([0; 512]);
    for vector in 0..EXCEPTION_VECTORS {
        let ist = if vector == 8 { gdt::DOUBLE_FAULT_IST as u64 + 1 } else { 0 };
        let (low, high) = interrupt_gate(stubs + vector as u64 * STUB_SIZE, code_selector, ist);
        idt.0[vector * 2] = low;
        idt.0[vector * 2 + 1] = high;
    }
    for (vector, handler) in [
        (NMI_VECTOR, nmi as extern "x86-interrupt" fn(InterruptStackFrame) as usize as u64),
        (apic::TIMER_VECTOR, timer_interrupt as extern "x86-interrupt" fn(InterruptStackFrame) as usize as u64),
        (
            super::scheduler::WAKE_VECTOR,
            timer_interrupt as extern "x86-interrupt" fn(InterruptStackFrame) as usize as u64,
        ),
        (apic::SPURIOUS_VECTOR, spurious_interrupt as extern "x86-interrupt" fn(InterruptStackFrame) as usize as u64),
    ] {
        let (low, high) = interrupt_gate(handler, code_selector, 0);
        idt.0[vector as usize * 2] = low;
        idt.0[vector as usize * 2 + 1] = high;
    }
    idt
});

/// The host's APIC timer and the scheduler's wake-up IPI: they only have to wake the
/// hypervisor (out of HLT or out of the guest).
extern "x86-interrupt" fn timer_interrupt(_frame: InterruptStackFrame) {
    apic::eoi();
}

const NMI_VECTOR: u8 = 2;

/// NMIs of the platform (a watchdog, a front-panel button, `nmi` in QEMU's monitor) that the
/// host took since it started.
static PLATFORM_NMIS: AtomicU64 = AtomicU64::new(0);

/// How many platform NMIs the host took (and ignored).
pub fn platform_nmis() -> u64 {
    PLATFORM_NMIS.load(Ordering::Relaxed)
}

/// An NMI is either the stop signal of a CPU that is ending the run or the platform's: the
/// latter is counted (no logging here: the interrupted code may hold the console's lock).
/// VMX calls it with `int 2` for the NMIs that exited a guest.
extern "x86-interrupt" fn nmi(_frame: InterruptStackFrame) {
    if exit::ending() {
        exit::park();
    }
    PLATFORM_NMIS.fetch_add(1, Ordering::Relaxed);
}

/// Spurious APIC interrupts need no EOI.
extern "x86-interrupt" fn spurious_interrupt(_frame: InterruptStackFrame) {}

/// Loads the IDT (one table, shared by every CPU). Call on each CPU after its GDT.
pub fn init() {
    let idt: &'static Idt = &IDT;
    // SAFETY: the table is static, so it outlives every use by the CPU, and each gate points at
    // a stub of `exception_stubs!` with the GDT's code selector.
    unsafe { lidt(&DescriptorTablePointer { limit: (size_of::<Idt>() - 1) as u16, base: VirtAddr::from_ptr(idt) }) };
}

/// A present, DPL 0, 64-bit interrupt gate (Intel SDM Vol. 3, 6.14.1).
fn interrupt_gate(handler: u64, selector: u16, ist: u64) -> (u64, u64) {
    const PRESENT_INTERRUPT_GATE: u64 = 0x8e;
    let low = (handler & 0xffff)
        | (selector as u64) << 16
        | (ist & 0x7) << 32
        | PRESENT_INTERRUPT_GATE << 40
        | ((handler >> 16) & 0xffff) << 48;
    (low, handler >> 32)
}

const NAMES: [&str; EXCEPTION_VECTORS] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved (15)",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved (22)",
    "reserved (23)",
    "reserved (24)",
    "reserved (25)",
    "reserved (26)",
    "reserved (27)",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved (31)",
];

struct PageFaultCode(u64);

impl fmt::Display for PageFaultCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let pick = |bit: u64, yes, no| if c & (1 << bit) != 0 { yes } else { no };
        write!(
            f,
            "{} {} in {} mode{}{}",
            pick(0, "protection violation on", "not-present page on"),
            if c & (1 << 4) != 0 { "instruction fetch" } else { pick(1, "write", "read") },
            pick(2, "user", "supervisor"),
            pick(3, ", reserved bit set", ""),
            pick(5, ", protection key", ""),
        )
    }
}

extern "C" fn exception_report(frame: &ExceptionFrame) -> ! {
    let vector = frame.vector as usize;
    exit::claim();
    let name = NAMES.get(vector).copied().unwrap_or("unknown vector");
    let f = frame;
    let cpu = exit::this_cpu();
    serial::emergency_write(format_args!(
        "\nEXCEPTION {name} (vector {vector}) on CPU {cpu}, error code {:#x}\n",
        f.error_code
    ));
    if vector == 14 {
        serial::emergency_write(format_args!(
            "  page fault: {} at address {:#018x}\n",
            PageFaultCode(f.error_code),
            Cr2::read_raw()
        ));
    }
    serial::emergency_write(format_args!(
        "  RIP={:#018x} CS={:#06x} RFLAGS={:#018x} RSP={:#018x} SS={:#06x}\n\
        \x20 RAX={:#018x} RBX={:#018x} RCX={:#018x} RDX={:#018x}\n\
        \x20 RSI={:#018x} RDI={:#018x} RBP={:#018x} R8 ={:#018x}\n\
        \x20 R9 ={:#018x} R10={:#018x} R11={:#018x} R12={:#018x}\n\
        \x20 R13={:#018x} R14={:#018x} R15={:#018x}\n\
        \x20 CR0={:#018x} CR2={:#018x} CR3={:#018x} CR4={:#018x}\n",
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
        Cr0::read_raw(),
        Cr2::read_raw(),
        Cr3::read_raw().0.start_address().as_u64(),
        Cr4::read_raw(),
    ));
    let mut reason = LineBuf::<160>::new();
    let _ = fmt::Write::write_fmt(
        &mut reason,
        format_args!("host exception {name} (vector {vector}) at RIP {:#x} on CPU {cpu}", f.rip),
    );
    exit::end(RunStatus::Failure, reason.as_str())
}
