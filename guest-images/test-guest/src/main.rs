//! 64-bit test guest.
//!
//! Entered in long mode with the first 4 GiB identity-mapped and RSI pointing at a NUL-terminated
//! command line `cases=NAME,NAME,...` (or `cases=all`). Runs each named case, printing one line per
//! case (`case NAME: ok` or `case NAME: FAIL ...`) and a summary `guest: N passed, M failed` on
//! COM1, then reports 0 (all passed) or 1 on the exit port.

#![no_std]
#![no_main]

mod cases;
mod cpu;
mod idt;
mod serial;
mod smp;
mod traps;
mod virtio;

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::panic::PanicInfo;

use serial::println;

/// Longest command line the guest reads; anything longer is reported as malformed.
const MAX_CMDLINE: usize = 4096;

// Entry point. Before any Rust code runs: our own GDT (0x08 = 64-bit code, 0x10 = data) is loaded
// and CS reloaded from it, .bss (which holds the stack) is zeroed, and RSP set. The command-line
// pointer arrives in RSI and is passed on as the first argument.
global_asm!(
    r#"
    .section .text.entry, "ax"
    .global _start
_start:
    cli
    cld
    lgdt [rip + GDT_POINTER]
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax

    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    lea rsp, [rip + STACK_TOP]

    // A far return is the way to reload CS in long mode.
    push 0x08
    lea rax, [rip + 2f]
    push rax
    retfq
2:
    mov rdi, rsi
    call guest_main
3:
    cli
    hlt
    jmp 3b

    .section .rodata.gdt, "a"
    .balign 16
    .global GDT
GDT:
    .quad 0
    .quad 0x00af9b000000ffff    // 0x08: 64-bit code, present, DPL 0, accessed
    .quad 0x00cf93000000ffff    // 0x10: data, read/write, present, DPL 0, accessed
    .quad 0x00cf9b000000ffff    // 0x18: 32-bit code, for application processors on their way up
GDT_END:
    .balign 2
    .word 0
GDT_POINTER:
    .word GDT_END - GDT - 1
    .quad GDT

    .section .bss.stack, "aw", @nobits
    .balign 16
    .skip 0x10000
STACK_TOP:
"#
);

/// Name of the case being run, for the unexpected-exception report.
struct CurrentCase(UnsafeCell<&'static str>);
// SAFETY: single CPU; written only by the case loop, read by trap handlers that run synchronously
// in between.
unsafe impl Sync for CurrentCase {}

static CURRENT_CASE: CurrentCase = CurrentCase(UnsafeCell::new("(none)"));

pub fn current_case() -> &'static str {
    // SAFETY: see `CurrentCase`; no write can be in progress while this runs.
    unsafe { *CURRENT_CASE.0.get() }
}

fn set_current_case(name: &'static str) {
    // SAFETY: see `CurrentCase`; traps read it only while the case runs, after this write.
    unsafe { *CURRENT_CASE.0.get() = name };
}

#[no_mangle]
extern "C" fn guest_main(cmdline: *const u8) -> ! {
    traps::init();

    let Some(cmdline) = read_cmdline(cmdline) else {
        finish(0, 1, "command line missing, unterminated or not ASCII");
    };
    let Some(list) = cmdline.split_ascii_whitespace().find_map(|word| word.strip_prefix("cases=")) else {
        finish(0, 1, "command line has no cases=");
    };

    let (mut passed, mut failed) = (0u32, 0u32);
    let mut run = |name: &'static str| {
        if run_case(name) {
            passed += 1;
        } else {
            failed += 1;
        }
    };
    if list == "all" {
        cases::ALL.iter().for_each(|&name| run(name));
    } else {
        list.split(',').filter(|name| !name.is_empty()).for_each(run);
    }
    if passed + failed == 0 {
        finish(0, 1, "empty case list");
    }
    finish(passed, failed, "")
}

/// Runs one case and prints its result line; returns whether it passed.
fn run_case(name: &'static str) -> bool {
    set_current_case(name);
    let result = cases::run(name);
    set_current_case("(none)");
    match &result {
        Ok(()) => println!("case {name}: ok"),
        Err(message) => println!("case {name}: FAIL {message}"),
    }
    result.is_ok()
}

/// Prints the summary (after `problem`, if any) and exits with 0 only if nothing failed.
fn finish(passed: u32, failed: u32, problem: &str) -> ! {
    if !problem.is_empty() {
        println!("guest: FAIL {problem}");
    }
    println!("guest: {passed} passed, {failed} failed");
    serial::exit(if failed == 0 { 0 } else { 1 })
}

/// The NUL-terminated ASCII string at `ptr` (identity-mapped guest-physical memory).
fn read_cmdline(ptr: *const u8) -> Option<&'static str> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY (both blocks): the hypervisor passes the address of the command line, which stays in
    // place and unmodified for the life of the guest; nothing past its NUL (or MAX_CMDLINE) is read.
    let len = (0..MAX_CMDLINE).find(|&i| unsafe { ptr.add(i).read() } == 0)?;
    let text = unsafe { core::slice::from_raw_parts(ptr, len) };
    if !text.is_ascii() {
        return None;
    }
    core::str::from_utf8(text).ok()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("case {}: FAIL guest panic: {info}", current_case());
    println!("guest: stopped by a panic");
    serial::exit(1)
}
