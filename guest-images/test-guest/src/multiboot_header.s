// The multiboot (version 1) header of the multiboot guests (AT&T syntax). multiboot.ld puts it
// first in the image; its a.out kludge fields describe the image, so a loader never reads the
// ELF headers. The guest defines multiboot_start, its 32-bit entry point.
    .section .multiboot_header, "a"
    .balign 4
multiboot_header:
    .long 0x1badb002                      // magic
    .long 0x00010003                      // flags: page-align modules, memory info, a.out kludge
    .long -(0x1badb002 + 0x00010003)      // checksum
    .long multiboot_header                // header_addr
    .long __mb_load_start                 // load_addr
    .long __mb_load_end                   // load_end_addr
    .long __mb_bss_end                    // bss_end_addr
    .long multiboot_start                 // entry_addr
