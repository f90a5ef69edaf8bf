//! Micro-benchmark guest: the same binary runs inside the hypervisor and on bare QEMU, so each
//! figure has its baseline. A multiboot (version 1) kernel, loaded at 1 MiB through the header's
//! a.out kludge fields (QEMU's `-kernel` and the hypervisor's loader both take it), entered in
//! 32-bit protected mode; it maps the first 4 GiB, goes to long mode and prints, on COM1, one
//! line per measurement in guest TSC cycles:
//!
//! ```text
//! HV-BENCH cpuid: <cycles> cycles
//! HV-BENCH port write (out 0x80): <cycles> cycles
//! HV-BENCH mmio read (local APIC): <cycles> cycles
//! HV-BENCH hlt wake-up by the APIC timer (median of 16): <cycles> cycles
//! HV-BENCH done
//! ```
//!
//! then writes 0 to the exit port 0xf4 (QEMU: `-device isa-debug-exit,iobase=0xf4`). It uses
//! only what a PC has on both sides: COM1, port 0x80, the local APIC and its timer.

#![no_std]
#![no_main]

#[allow(dead_code)] // shared with the test guest, which uses all of it
#[path = "../cpu.rs"]
mod cpu;
#[path = "../idt.rs"]
mod idt;
#[allow(dead_code)]
#[path = "../serial.rs"]
mod serial;

use core::arch::{asm, global_asm};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU64, Ordering};

use idt::{load_idt, IdtEntry};
use serial::println;

const ROUNDS: u64 = 2000;
const LAPIC: usize = 0xfee0_0000;
const LAPIC_VERSION: usize = 0x30;
const LAPIC_EOI: usize = 0xb0;
const LAPIC_SPURIOUS: usize = 0xf0;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_INITIAL_COUNT: usize = 0x380;
const LAPIC_CURRENT_COUNT: usize = 0x390;
const LAPIC_DIVIDE: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const TIMER_VECTOR: u8 = 0x40;
const SPURIOUS_VECTOR: u8 = 0xff;
/// The one-shot the HLT waits for: 2 ms at QEMU's and the hypervisor's 1 GHz APIC timer.
const WAKE_TICKS: u32 = 2_000_000;
/// APIC ticks the calibration against the TSC runs for.
const CALIBRATION_TICKS: u32 = 20_000_000;

/// Timer interrupts taken (the handler below counts them).
#[no_mangle]
static BENCH_TICKS: AtomicU64 = AtomicU64::new(0);

global_asm!(include_str!("../multiboot_header.s"), options(att_syntax));

// The way to long mode: zero the bss, identity-map 4 GiB with 2 MiB pages (PML4, one PDPT, four
// PDs, all in the bss), PAE, EFER.LME, paging, a 64-bit code segment. Then the interrupt
// stubs: the timer counts and sends EOI; anything else unexpected ends the guest with status 3.
global_asm!(
    r#"
    .section .text.multiboot_entry, "ax"
    .code32
    .global multiboot_start
multiboot_start:
    cli
    cld
    movl $__mb_load_end, %edi
    movl $__mb_bss_end, %ecx
    subl %edi, %ecx
    xorl %eax, %eax
    rep stosb
    movl $bench_stack_top, %esp

    movl $bench_pdpt + 3, bench_pml4
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $bench_pd + 3, %eax
    movl %eax, bench_pdpt(,%ecx,8)
    incl %ecx
    cmpl $4, %ecx
    jb 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                       // present, writable, 2 MiB
    movl %eax, bench_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax                        // address bits 32 and up
    movl %eax, bench_pd + 4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    movl %cr4, %eax
    orl $0x20, %eax                       // PAE
    movl %eax, %cr4
    movl $bench_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx                // EFER
    rdmsr
    orl $0x100, %eax                      // LME
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax                 // PG, PE
    movl %eax, %cr0
    lgdt bench_gdt_pointer
    ljmp $0x08, $3f

    .code64
3:  movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq bench_stack_top(%rip), %rsp
    call bench_main
4:  cli
    hlt
    jmp 4b

    .global bench_timer_interrupt
bench_timer_interrupt:
    pushq %rax
    lock incq BENCH_TICKS(%rip)
    movq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .global bench_spurious_interrupt
bench_spurious_interrupt:
    iretq

    .global bench_unexpected_trap
bench_unexpected_trap:
    movw $0xf4, %dx
    movl $3, %eax
    outl %eax, %dx
5:  cli
    hlt
    jmp 5b

    .section .rodata.gdt, "a"
    .balign 8
bench_gdt:
    .quad 0
    .quad 0x00af9b000000ffff              // 0x08: 64-bit code
    .quad 0x00cf93000000ffff              // 0x10: data
bench_gdt_end:
bench_gdt_pointer:
    .word bench_gdt_end - bench_gdt - 1
    .long bench_gdt

    .section .bss.paging, "aw", @nobits
    .balign 4096
bench_pml4:
    .skip 4096
bench_pdpt:
    .skip 4096
bench_pd:
    .skip 4 * 4096
    .skip 0x4000
bench_stack_top:
"#,
    options(att_syntax)
);

unsafe extern "C" {
    fn bench_timer_interrupt();
    fn bench_spurious_interrupt();
    fn bench_unexpected_trap();
}

static mut IDT: [IdtEntry; 256] = [IdtEntry::MISSING; 256];

fn install_idt() {
    // SAFETY: runs once, before interrupts are enabled; nothing else touches the table.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (vector, entry) in idt.iter_mut().enumerate() {
        let handler: unsafe extern "C" fn() = match vector as u8 {
            TIMER_VECTOR => bench_timer_interrupt,
            SPURIOUS_VECTOR => bench_spurious_interrupt,
            _ => bench_unexpected_trap,
        };
        *entry = IdtEntry::interrupt_gate(handler as usize as u64);
    }
    load_idt(idt.as_ptr() as u64, (size_of::<[IdtEntry; 256]>() - 1) as u16);
}

// The accesses are plain MOVs in assembly: the compiler may fold a volatile load into another
// instruction (a SUB with a memory operand), which MMIO emulation need not decode.
fn lapic_read(register: usize) -> u32 {
    let value: u32;
    // SAFETY: the local APIC's page is identity-mapped; reads of these registers have no effects.
    unsafe { asm!("mov {:e}, dword ptr [{}]", out(reg) value, in(reg) LAPIC + register, options(nostack, readonly)) };
    value
}

fn lapic_write(register: usize, value: u32) {
    // SAFETY: as above; the guest owns its local APIC.
    unsafe { asm!("mov dword ptr [{}], {:e}", in(reg) LAPIC + register, in(reg) value, options(nostack)) };
}

/// Mean TSC cycles of `op` over `ROUNDS` runs.
fn per_round(op: &dyn Fn()) -> u64 {
    let start = cpu::rdtsc();
    for _ in 0..ROUNDS {
        op();
    }
    (cpu::rdtsc() - start) / ROUNDS
}

fn report(what: &str, cycles: u64) {
    println!("HV-BENCH {what}: {cycles} cycles");
}

/// TSC cycles per 1024 APIC timer ticks (divide by 1), measured over `CALIBRATION_TICKS`.
fn tsc_per_kilotick() -> u64 {
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_INITIAL_COUNT, u32::MAX);
    let (start_tsc, start_count) = (cpu::rdtsc(), lapic_read(LAPIC_CURRENT_COUNT));
    let mut count = start_count;
    while start_count - count < CALIBRATION_TICKS {
        count = lapic_read(LAPIC_CURRENT_COUNT);
    }
    let cycles = cpu::rdtsc() - start_tsc;
    lapic_write(LAPIC_INITIAL_COUNT, 0);
    cycles * 1024 / u64::from(start_count - count)
}

/// Cycles from a one-shot timer's expiry to its handler, the guest halted in between (median
/// of 16). The expiry is taken from the midpoint of the write that arms the timer.
fn hlt_wake_up_cycles() -> u64 {
    let per_kilotick = tsc_per_kilotick();
    let wait = u64::from(WAKE_TICKS) * per_kilotick / 1024;
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
    let mut latencies = [0u64; 16];
    for latency in latencies.iter_mut() {
        let ticks = BENCH_TICKS.load(Ordering::Relaxed);
        let before = cpu::rdtsc();
        lapic_write(LAPIC_INITIAL_COUNT, WAKE_TICKS);
        let expiry = before + (cpu::rdtsc() - before) / 2 + wait;
        while BENCH_TICKS.load(Ordering::Relaxed) == ticks {
            // SAFETY: interrupts are enabled only for the HLT; the timer's vector has a handler.
            unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
        }
        *latency = cpu::rdtsc().saturating_sub(expiry);
    }
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
    latencies.sort_unstable();
    latencies[latencies.len() / 2]
}

#[no_mangle]
extern "C" fn bench_main() -> ! {
    install_idt();
    // SAFETY: masks both 8259s, so only the local APIC interrupts (the BIOS may have left the
    // PIT's IRQ 0 on, at a vector this guest does not handle).
    unsafe {
        asm!("out 0x21, al", "out 0xa1, al", in("al") 0xffu8, options(nomem, nostack, preserves_flags));
    }
    lapic_write(LAPIC_SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR)); // enabled
    lapic_write(LAPIC_DIVIDE, 0b1011); // divide by 1

    report(
        "cpuid",
        per_round(&|| {
            core::hint::black_box(cpu::cpuid(0, 0));
        }),
    );
    // SAFETY: port 0x80 is the POST-code port: writes only record a byte.
    report(
        "port write (out 0x80)",
        per_round(&|| unsafe { asm!("out 0x80, al", in("al") 0u8, options(nomem, nostack, preserves_flags)) }),
    );
    report(
        "mmio read (local APIC)",
        per_round(&|| {
            core::hint::black_box(lapic_read(LAPIC_VERSION));
        }),
    );
    report("hlt wake-up by the APIC timer (median of 16)", hlt_wake_up_cycles());
    println!("HV-BENCH done");
    lapic_write(LAPIC_EOI, 0);
    serial::exit(0)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("HV-BENCH FAIL guest panic: {info}");
    serial::exit(1)
}
