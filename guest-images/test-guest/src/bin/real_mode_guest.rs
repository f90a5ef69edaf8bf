//! Real-mode test guest: 16-bit code at 0x7C00, started with CS=0 and IP=0x7C00.
//!
//! Checks that CR0.PE is clear, prints `real-mode: ok` (or `real-mode: FAIL ...`) to COM1, then
//! `real-mode: rep outsb ok` through string I/O from a segment with a base, and
//! reports the result through the exit port (0 = ok, 1 = failed). It is pure assembly: Rust only
//! supplies the panic handler that `no_std` requires.

#![no_std]
#![no_main]

use core::arch::global_asm;
use core::panic::PanicInfo;

// AT&T syntax because it spells out 16-bit CALL/RET (`callw`/`retw`); the Intel-syntax parser
// would emit the 32-bit forms with an operand-size prefix.
global_asm!(
    r#"
    .section .text.real_mode_entry, "ax"
    .code16
    .global real_mode_start
real_mode_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7000, %sp
    cld

    // SMSW reads CR0[15:0]; PE is bit 0 and must be clear in real mode.
    smsww %ax
    testb $1, %al
    jnz 2f
    movw $real_mode_ok, %si
    callw puts
    // String I/O in real mode: REP OUTSB from DS:SI with a segment base (DS = 0x0700).
    movw $0x0700, %ax
    movw %ax, %ds
    movw $(real_mode_outsb - 0x7000), %si
    movw $(real_mode_outsb_end - real_mode_outsb), %cx
    movw $0x3f8, %dx
    rep outsb
    xorw %ax, %ax
    movw %ax, %ds
    xorl %ebx, %ebx
    jmp 3f
2:
    movw %ax, %bp
    movw $real_mode_fail, %si
    callw puts
    movw %bp, %ax
    callw put_hex16
    movb $0x0a, %al
    callw putc
    movl $1, %ebx
3:
    // 32-bit OUT (operand-size prefix in 16-bit code) of the status to the exit port.
    movw $0xf4, %dx
    movl %ebx, %eax
    outl %eax, %dx
4:
    hlt
    jmp 4b

// Prints the NUL-terminated string at DS:SI.
puts:
    lodsb
    testb %al, %al
    jz 5f
    callw putc
    jmp puts
5:
    retw

// Writes AL to the COM1 transmit register once the line status says it is empty.
putc:
    pushw %dx
    pushw %ax
6:
    movw $0x3fd, %dx
    inb %dx, %al
    testb $0x20, %al
    jz 6b
    popw %ax
    movw $0x3f8, %dx
    outb %al, %dx
    popw %dx
    retw

// Prints AX as four hexadecimal digits (clobbers BX and CX).
put_hex16:
    movw %ax, %bx
    movw $4, %cx
7:
    rolw $4, %bx
    movb %bl, %al
    andb $0x0f, %al
    addb $0x30, %al
    cmpb $0x39, %al
    jbe 8f
    addb $7, %al
8:
    callw putc
    loop 7b
    retw

real_mode_ok:
    .asciz "real-mode: ok\n"
real_mode_outsb:
    .ascii "real-mode: rep outsb ok\n"
real_mode_outsb_end:
real_mode_fail:
    .asciz "real-mode: FAIL CR0.PE is set, MSW=0x"
    .code64
"#,
    options(att_syntax)
);

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    // Never reached: the binary contains no Rust code that can panic.
    loop {
        core::hint::spin_loop();
    }
}
