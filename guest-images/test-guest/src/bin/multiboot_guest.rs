//! Multiboot (version 1) test guest: 32-bit code loaded at 1 MiB through the header's a.out
//! kludge fields, entered in 32-bit protected mode with paging off, EAX = 0x2BADB002 and EBX =
//! the physical address of the multiboot information structure.
//!
//! It checks what the boot loader handed over and prints one line per check to COM1:
//!
//! ```text
//! multiboot: magic ok
//! multiboot: flags ok                      (info flags bits 0 MEM, 2 CMDLINE, 3 MODS, 6 MMAP)
//! multiboot: mem ok                        (mem_lower >= 600 KiB, mem_upper > 1024 KiB)
//! multiboot: cmdline <text>
//! multiboot: cmdline ok
//! multiboot: modules <count>               (decimal)
//! multiboot: module <index> <string> 0x<size>
//! multiboot: modules ok                    (page-aligned starts, end >= start, a string each)
//! multiboot: mmap <n> ram ranges           (decimal: entries of type 1)
//! multiboot: mmap ok
//! multiboot: done
//! ```
//!
//! A failed check prints `multiboot: <check> FAIL <details>` (values in hex) instead of its `ok`
//! line. At the end the status goes to the exit port 0xf4: 0 if every check passed, 1 otherwise.
//! A wrong magic ends the checks early, since EBX then means nothing. The guest programs nothing
//! but COM1. It is pure assembly: Rust only supplies the panic handler that `no_std` requires.

#![no_std]
#![no_main]

use core::arch::global_asm;
use core::panic::PanicInfo;

global_asm!(include_str!("../multiboot_header.s"), options(att_syntax));

// AT&T syntax, like the real-mode guest. Register use in the checks: EBX = info structure,
// EDI = number of failed checks; the print helpers preserve every register.
global_asm!(
    r#"
    .section .text.multiboot_entry, "ax"
    .code32
    .global multiboot_start
multiboot_start:
    cli
    cld
    movl $mb_stack_top, %esp
    xorl %edi, %edi

    // --- magic
    cmpl $0x2badb002, %eax
    je .Lmagic_ok
    incl %edi
    movl $s_magic_fail, %esi
    call puts
    call put_hex
    call newline
    jmp .Ldone
.Lmagic_ok:
    movl $s_magic_ok, %esi
    call puts

    // --- flags: MEM (0), CMDLINE (2), MODS (3), MMAP (6)
    movl (%ebx), %eax
    movl %eax, %edx
    andl $0x4d, %edx
    cmpl $0x4d, %edx
    je .Lflags_ok
    incl %edi
    movl $s_flags_fail, %esi
    call puts
    call put_hex
    movl $s_missing, %esi
    call puts
    notl %eax
    andl $0x4d, %eax
    call put_hex
    call newline
    jmp .Lmem
.Lflags_ok:
    movl $s_flags_ok, %esi
    call puts

    // --- mem: mem_lower (+4) >= 600, mem_upper (+8) > 1024, both in KiB
.Lmem:
    testl $0x01, (%ebx)
    jnz .Lmem_valid
    incl %edi
    movl $s_mem_noflag, %esi
    call puts
    jmp .Lcmdline
.Lmem_valid:
    cmpl $600, 4(%ebx)
    jb .Lmem_bad
    cmpl $1024, 8(%ebx)
    jbe .Lmem_bad
    movl $s_mem_ok, %esi
    call puts
    jmp .Lcmdline
.Lmem_bad:
    incl %edi
    movl $s_mem_fail, %esi
    call puts
    movl 4(%ebx), %eax
    call put_hex
    movl $s_upper, %esi
    call puts
    movl 8(%ebx), %eax
    call put_hex
    call newline

    // --- cmdline (+16)
.Lcmdline:
    testl $0x04, (%ebx)
    jnz .Lcmdline_valid
    incl %edi
    movl $s_cmdline_noflag, %esi
    call puts
    jmp .Lmodules
.Lcmdline_valid:
    cmpl $0, 16(%ebx)
    jne .Lcmdline_print
    incl %edi
    movl $s_cmdline_null, %esi
    call puts
    jmp .Lmodules
.Lcmdline_print:
    movl $s_cmdline, %esi
    call puts
    movl 16(%ebx), %esi
    call puts
    call newline
    movl $s_cmdline_ok, %esi
    call puts

    // --- modules: mods_count (+20), mods_addr (+24); entries (mod_start, mod_end, string, 0)
.Lmodules:
    testl $0x08, (%ebx)
    jnz .Lmodules_valid
    incl %edi
    movl $s_modules_noflag, %esi
    call puts
    jmp .Lmmap
.Lmodules_valid:
    pushl %edi                            // failures so far: no ok line if this check adds any
    movl $s_modules, %esi
    call puts
    movl 20(%ebx), %eax
    call put_dec
    call newline
    movl 20(%ebx), %ecx                   // ECX = count
    cmpl $64, %ecx
    jbe .Lmodules_count_ok
    incl %edi
    movl $s_modules_too_many, %esi
    call puts
    movl %ecx, %eax
    call put_hex
    call newline
    jmp .Lmodules_end
.Lmodules_count_ok:
    movl 24(%ebx), %ebp                   // EBP = current entry
    xorl %edx, %edx                       // EDX = index
.Lmodule_next:
    cmpl %ecx, %edx
    jae .Lmodules_end
    movl $s_module, %esi
    call puts
    movl %edx, %eax
    call put_dec
    call space
    movl 8(%ebp), %esi
    testl %esi, %esi
    jnz .Lmodule_string
    movl $s_no_string, %esi
.Lmodule_string:
    call puts
    call space
    movl 4(%ebp), %eax
    subl 0(%ebp), %eax
    call put_hex
    call newline
    // mod_end >= mod_start, mod_start page-aligned (header flag bit 0), a string pointer.
    movl 4(%ebp), %eax
    cmpl 0(%ebp), %eax
    jb .Lmodule_bad
    testl $0xfff, 0(%ebp)
    jnz .Lmodule_bad
    cmpl $0, 8(%ebp)
    jne .Lmodule_good
.Lmodule_bad:
    incl %edi
    movl $s_module_fail, %esi
    call puts
    movl %edx, %eax
    call put_dec
    movl $s_start, %esi
    call puts
    movl 0(%ebp), %eax
    call put_hex
    movl $s_end, %esi
    call puts
    movl 4(%ebp), %eax
    call put_hex
    movl $s_string, %esi
    call puts
    movl 8(%ebp), %eax
    call put_hex
    call newline
.Lmodule_good:
    addl $16, %ebp
    incl %edx
    jmp .Lmodule_next
.Lmodules_end:
    popl %eax
    cmpl %eax, %edi
    jne .Lmmap
    movl $s_modules_ok, %esi
    call puts

    // --- mmap: mmap_length (+44), mmap_addr (+48); entries (size, base, length, type) where
    //     size counts the bytes after itself
.Lmmap:
    testl $0x40, (%ebx)
    jnz .Lmmap_valid
    incl %edi
    movl $s_mmap_noflag, %esi
    call puts
    jmp .Ldone
.Lmmap_valid:
    movl 48(%ebx), %ebp                   // EBP = current entry
    movl 44(%ebx), %ecx
    addl %ebp, %ecx                       // ECX = end of the map
    xorl %eax, %eax                       // EAX = RAM (type 1) entries
.Lmmap_next:
    cmpl %ecx, %ebp
    jae .Lmmap_counted
    cmpl $20, 0(%ebp)
    jb .Lmmap_bad_entry
    cmpl $1, 20(%ebp)
    jne .Lmmap_skip
    incl %eax
.Lmmap_skip:
    movl 0(%ebp), %edx
    leal 4(%ebp, %edx), %ebp
    jmp .Lmmap_next
.Lmmap_bad_entry:
    incl %edi
    movl $s_mmap_bad_entry, %esi
    call puts
    movl %ebp, %eax
    call put_hex
    movl $s_size, %esi
    call puts
    movl 0(%ebp), %eax
    call put_hex
    call newline
    jmp .Ldone
.Lmmap_counted:
    movl $s_mmap, %esi
    call puts
    call put_dec
    movl $s_ram_ranges, %esi
    call puts
    testl %eax, %eax
    jnz .Lmmap_ok
    incl %edi
    movl $s_mmap_no_ram, %esi
    call puts
    movl 48(%ebx), %eax
    call put_hex
    movl $s_length, %esi
    call puts
    movl 44(%ebx), %eax
    call put_hex
    call newline
    jmp .Ldone
.Lmmap_ok:
    movl $s_mmap_ok, %esi
    call puts

.Ldone:
    movl $s_done, %esi
    call puts
    xorl %eax, %eax
    testl %edi, %edi
    setnz %al
    movw $0xf4, %dx
    outl %eax, %dx
.Lhalt:
    hlt
    jmp .Lhalt

// Writes AL to the COM1 transmit register once the line status says it is empty.
putc:
    pushl %edx
    pushl %eax
.Lputc_wait:
    movw $0x3fd, %dx
    inb %dx, %al
    testb $0x20, %al
    jz .Lputc_wait
    popl %eax
    movw $0x3f8, %dx
    outb %al, %dx
    popl %edx
    ret

// Prints the NUL-terminated string at ESI, at most 256 bytes of it (the guest's own strings
// and the boot loader's command line and module strings).
puts:
    pushl %esi
    pushl %ecx
    pushl %eax
    movl $256, %ecx
.Lputs_next:
    lodsb
    testb %al, %al
    jz .Lputs_end
    call putc
    loop .Lputs_next
.Lputs_end:
    popl %eax
    popl %ecx
    popl %esi
    ret

newline:
    pushl %eax
    movb $0x0a, %al
    call putc
    popl %eax
    ret

space:
    pushl %eax
    movb $0x20, %al
    call putc
    popl %eax
    ret

// Prints EAX as 0x followed by its hexadecimal digits, without leading zeros.
put_hex:
    pushal
    movl %eax, %ebx
    movb $0x30, %al
    call putc
    movb $0x78, %al
    call putc
    movl $8, %ecx
    xorl %edx, %edx                       // EDX = a digit was printed
.Lhex_next:
    roll $4, %ebx
    movl %ebx, %eax
    andl $0x0f, %eax
    orl %eax, %edx
    cmpl $1, %ecx                         // the last digit is always printed
    je .Lhex_print
    testl %edx, %edx
    jz .Lhex_skip
.Lhex_print:
    movb hex_digits(%eax), %al
    call putc
.Lhex_skip:
    loop .Lhex_next
    popal
    ret

// Prints EAX in decimal.
put_dec:
    pushal
    movl $10, %ecx
    xorl %ebx, %ebx                       // EBX = digits pushed
.Ldec_divide:
    xorl %edx, %edx
    divl %ecx
    pushl %edx
    incl %ebx
    testl %eax, %eax
    jnz .Ldec_divide
.Ldec_print:
    popl %eax
    addb $0x30, %al
    call putc
    decl %ebx
    jnz .Ldec_print
    popal
    ret
    .code64

    .section .rodata.multiboot_strings, "a"
hex_digits:
    .ascii "0123456789abcdef"
s_magic_ok:
    .asciz "multiboot: magic ok\n"
s_magic_fail:
    .asciz "multiboot: magic FAIL eax="
s_flags_ok:
    .asciz "multiboot: flags ok\n"
s_flags_fail:
    .asciz "multiboot: flags FAIL flags="
s_missing:
    .asciz " missing="
s_mem_ok:
    .asciz "multiboot: mem ok\n"
s_mem_noflag:
    .asciz "multiboot: mem FAIL info flag 0x1 clear\n"
s_mem_fail:
    .asciz "multiboot: mem FAIL lower="
s_upper:
    .asciz " upper="
s_cmdline:
    .asciz "multiboot: cmdline "
s_cmdline_ok:
    .asciz "multiboot: cmdline ok\n"
s_cmdline_noflag:
    .asciz "multiboot: cmdline FAIL info flag 0x4 clear\n"
s_cmdline_null:
    .asciz "multiboot: cmdline FAIL cmdline=0x0\n"
s_modules:
    .asciz "multiboot: modules "
s_modules_ok:
    .asciz "multiboot: modules ok\n"
s_modules_noflag:
    .asciz "multiboot: modules FAIL info flag 0x8 clear\n"
s_modules_too_many:
    .asciz "multiboot: modules FAIL more than 0x40 modules: mods_count="
s_module:
    .asciz "multiboot: module "
s_no_string:
    .asciz "(no-string)"
s_module_fail:
    .asciz "multiboot: modules FAIL module "
s_start:
    .asciz " mod_start="
s_end:
    .asciz " mod_end="
s_string:
    .asciz " string="
s_mmap:
    .asciz "multiboot: mmap "
s_ram_ranges:
    .asciz " ram ranges\n"
s_mmap_ok:
    .asciz "multiboot: mmap ok\n"
s_mmap_noflag:
    .asciz "multiboot: mmap FAIL info flag 0x40 clear\n"
s_mmap_bad_entry:
    .asciz "multiboot: mmap FAIL entry at "
s_size:
    .asciz " has size="
s_mmap_no_ram:
    .asciz "multiboot: mmap FAIL no type-1 entry: mmap_addr="
s_length:
    .asciz " mmap_length="
s_done:
    .asciz "multiboot: done\n"

    .section .bss.multiboot_stack, "aw", @nobits
    .balign 16
    .skip 4096
mb_stack_top:
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
