#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets: hypervisor/fuzz/corpus/<target>/.

Every seed is built here from what the target's input format says (see each target's header
comment), so the seeds stay small and readable and can be regenerated after a format change:

    python3 hypervisor/fuzz/make_seeds.py

The devices and run_loop targets decode their operations with the `arbitrary` crate; the
encoders below follow its rules (integers little-endian, bool = byte & 1, Option = bool then the
value, enum variant k of n = a u32 u with u * n >> 32 == k, fields in declaration order).
"""

import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent
CORPUS = ROOT / "corpus"
REPO = ROOT.parent.parent


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def boolean(b):
    return u8(1 if b else 0)


def variant(k, n):
    """The u32 that `arbitrary` decodes as variant k of an n-variant enum."""
    u = -(-(k << 32) // n)
    assert (u * n) >> 32 == k and u < 1 << 32
    return u32(u)


def option(value):
    return boolean(False) if value is None else boolean(True) + value


def text(s, length=u16):
    b = s.encode()
    return length(len(b)) + b


def write(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------
# mmio_decode: mode byte (0: 64-bit, 1: 32-bit, 2: 16-bit), RIP, device value, instruction.

def mmio_decode():
    m64, m32, m16 = 0, 1, 2
    seeds = {
        "mov-eax-from-rbx": (m64, "8b03"),
        "mov-to-rdi-from-ecx": (m64, "890f"),
        "mov-byte-imm": (m64, "c60099"),
        "mov-qword-imm32": (m64, "48c700feffffff"),
        "movzx-word": (m64, "0fb702"),
        "movsx-rex-w": (m64, "480fbe01"),
        "movsx-ax": (m64, "660fbe01"),
        "movsxd": (m64, "486301"),
        "mov-ah": (m64, "8a23"),
        "mov-r9-disp8": (m64, "4d8b4a08"),
        "mov-sib-disp32-r11w": (m64, "664589 9c8778563412"),
        "mov-al-moffs64": (m64, "a00000e0fe00000000"),
        "mov-eax-rdi-disp32": (m64, "8b8700030000"),
        "mov-rip-relative": (m64, "8b0d10000000"),
        "mov-moffs32-eax-32bit": (m32, "a30000e0fe"),
        "mov-eax-32bit": (m32, "8b03"),
        "mov-word-imm-16bit": (m16, "c7073412"),
        "mov-eax-16bit-prefix": (m16, "668b07"),
        "add-refused": (m64, "0108"),
        "rep-movsb-refused": (m64, "f3a4"),
        "mov-rsp-refused": (m64, "8b20"),
        "truncated": (m64, "48c700feff"),
    }
    for name, (mode, hexbytes) in seeds.items():
        write("mmio_decode", name, u8(mode) + u64(0x1000) + u64(0x8877665544332211) + bytes.fromhex(hexbytes.replace(" ", "")))


# ---------------------------------------------------------------------------------------------
# guest_walk: flags (bit 0 write, bit 1 fetch, bit 2 user, bit 3 mirror memory, bits 7:4 mode
# preset: 0 raw, 1 paging off, 2 32-bit, 3 PAE, 4 4-level, 5 5-level), CR0, CR3, CR4, EFER,
# linear address, length, reported size, memory bytes.

def guest_walk():
    wp, smep, nxe, pse = 1 << 16, 1 << 20, 1 << 11, 1 << 4

    def walk(flags, preset, gva, length, size, memory, cr0=wp, cr3=0, cr4=0, efer=0):
        return u8(flags | preset << 4) + u64(cr0) + u64(cr3) + u64(cr4) + u64(efer) + u64(gva) + u16(length) + u64(size) + memory

    mirror = 8
    # One entry everywhere: every level finds it, so walks reach the data.
    entry = lambda e: u64(e)
    write("guest_walk", "long4-mirror", walk(mirror, 4, 0x7FFF_FFFF_F000, 16, 1 << 40, entry(0x7), cr4=smep, efer=nxe))
    write("guest_walk", "long5-mirror", walk(mirror | 1, 5, 0xFF_FFFF_FFFF_FFF8, 16, 1 << 52, entry(0x7)))
    write("guest_walk", "long4-large-nx", walk(mirror | 2, 4, 0x4000_0000, 8, 1 << 40, entry(0x8000_0000_0000_0087), efer=nxe))
    write("guest_walk", "pae-mirror", walk(mirror | 4, 3, 0xC000_1FFC, 8, 1 << 36, entry(0x7), efer=nxe))
    write("guest_walk", "legacy-pse-mirror", walk(mirror, 2, 0x0040_0FFE, 4, 1 << 32, u32(0x83) + u32(0x7), cr4=pse))
    write("guest_walk", "paging-off", walk(0, 1, 0x1234, 4, 0, bytes(0x2000)))
    write("guest_walk", "non-canonical", walk(mirror, 4, 0x8000_0000_0000, 1, 1 << 40, entry(0x7)))
    # Real 32-bit tables: PD at 0, PT at 0x1000, page 0x2000 mapped at 0x0040_1000.
    mem = bytearray(0x3000)
    mem[4:8] = u32(0x1000 | 7)
    mem[0x1000 + 4:0x1000 + 8] = u32(0x2000 | 7)
    mem[0x2000:0x2010] = b"data in the page"
    write("guest_walk", "legacy-tables", walk(0, 2, 0x0040_1000, 16, 0, bytes(mem)))
    write("guest_walk", "raw-mode", walk(mirror | 1, 0, 0x1000, 8, 1 << 32, entry(0x3), cr0=0x8001_0001, cr4=0x20, efer=0x500))


# ---------------------------------------------------------------------------------------------
# Loader images.

def elf64(entry, segments, e_type=2, machine=62, extra=0):
    """A static ELF64 executable: segments are (paddr, data, memsz)."""
    phoff = 64
    phnum = len(segments)
    offset = phoff + 56 * phnum
    out = bytearray()
    out += b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    out += struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, phoff, 0, 0, 64, 56, phnum, 64, 0, 0)
    blobs = b""
    for paddr, data, memsz in segments:
        out += struct.pack("<IIQQQQQQ", 1, 7, offset + len(blobs), paddr, paddr, len(data), memsz, 0x1000)
        blobs += data
    return bytes(out + blobs + bytes(extra))


def elf32(entry, segments, vaddr_delta=0):
    phoff = 52
    offset = phoff + 32 * len(segments)
    out = bytearray()
    out += b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    out += struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry + vaddr_delta, phoff, 0, 0, 52, 32, len(segments), 40, 0, 0)
    blobs = b""
    for paddr, data, memsz in segments:
        out += struct.pack("<IIIIIIII", 1, offset + len(blobs), paddr + vaddr_delta, paddr, len(data), memsz, 7, 0x1000)
        blobs += data
    return bytes(out), blobs


def multiboot_header(flags, aout=None):
    magic = 0x1BADB002
    h = u32(magic) + u32(flags) + u32((-(magic + flags)) & 0xFFFFFFFF)
    if aout:
        h += b"".join(u32(v) for v in aout)
    return h


CODE = bytes.fromhex("fa f4 eb fd".replace(" ", ""))  # cli; hlt; jmp $-1


def bzimage_image(protocol=0x020F, setup_sects=4, relocatable=1, alignment=0x200000, pref=0x1000000,
                  init_size=0x100000, xloadflags=3, loadflags=1, kernel_len=0x200, initrd_max=0x7FFFFFFF):
    sects = setup_sects or 4
    setup = (sects + 1) * 512
    v = bytearray(setup + kernel_len)
    v[0x1F1] = setup_sects
    v[0x1FE:0x200] = u16(0xAA55)
    v[0x200] = 0xEB
    v[0x201] = 0x6A
    v[0x202:0x206] = b"HdrS"
    v[0x206:0x208] = u16(protocol)
    v[0x211] = loadflags
    v[0x22C:0x230] = u32(initrd_max)
    v[0x230:0x234] = u32(alignment)
    v[0x234] = relocatable
    v[0x236:0x238] = u16(xloadflags)
    v[0x238:0x23C] = u32(2047)
    v[0x258:0x260] = u64(pref)
    v[0x260:0x264] = u32(init_size)
    for i in range(kernel_len):
        v[setup + i] = (i % 251) + 1
    return bytes(v)


def ram(selector):
    """ram_size: selector 0-7 pick 2M, 16M, 32M, 64M, 256M, 1G, 3G, 6G."""
    return u8(selector) + u64(0)


# elf: path byte (bit 0 through the setup, bit 1 entry = real), RAM size, image.

def elf():
    small = elf64(0x1000, [(0x1000, CODE, 0x2000)])
    two = elf64(0x20_0000, [(0x20_0000, CODE * 16, 0x1000), (0x30_0000, b"data" * 8, 0x10_0000)])
    bss = elf64(0x10_0000, [(0x10_0000, CODE, 0x4000_0000)])
    real = elf64(0x8000, [(0x8000, CODE, 0x100)])
    write("elf", "one-segment", u8(0) + ram(1) + small)
    write("elf", "two-segments", u8(0) + ram(3) + two)
    write("elf", "gigabyte-bss", u8(0) + ram(6) + bss)
    write("elf", "overlapping", u8(0) + ram(1) + elf64(0x1000, [(0x1000, CODE, 0x2000), (0x2000, CODE, 0x10)]))
    write("elf", "shared-object", u8(0) + ram(1) + elf64(0x1000, [(0x1000, CODE, 0x10)], e_type=3))
    write("elf", "setup-long64", u8(1) + ram(1) + two)
    write("elf", "setup-real", u8(3) + ram(0) + real)


# bzimage: path byte (bit 0 through the setup, bit 1 an initrd, bit 2 a large zero-filled one),
# RAM size, memory map (even selector: the setup's), zero page, command line (even selector:
# the setup's), command-line buffer size (0: the setup's), RSDP selector (0: the setup's), the
# command line, initrd length, large initrd size, initrd bytes, image.

def bzimage():
    def seed(path, ram_sel, image, cmdline="console=ttyS0 panic=-1", initrd=b"", big=0, rsdp=0):
        return (u8(path) + ram(ram_sel) + u8(0) + u8(0) + u64(0) + u8(0) + u64(0) + u16(0) + u8(rsdp)
                + text(cmdline) + u16(len(initrd)) + u32(big) + initrd + image)

    initrd = b"070701" + bytes(200)
    write("bzimage", "relocatable", seed(0, 3, bzimage_image()))
    write("bzimage", "with-initrd", seed(2, 3, bzimage_image(), initrd=initrd))
    write("bzimage", "large-initrd", seed(6, 4, bzimage_image(), big=6 << 20))
    write("bzimage", "fixed-address", seed(0, 3, bzimage_image(relocatable=0, pref=0x400000)))
    write("bzimage", "protocol-2.12-no-rsdp", seed(0, 2, bzimage_image(protocol=0x020C), rsdp=2))
    write("bzimage", "below-4g-only", seed(2, 7, bzimage_image(xloadflags=1), initrd=initrd))
    write("bzimage", "setup-sects-zero", seed(0, 3, bzimage_image(setup_sects=0)))
    write("bzimage", "setup-path", seed(3, 3, bzimage_image(), initrd=initrd))
    write("bzimage", "too-big-for-ram", seed(0, 0, bzimage_image(init_size=0x400000)))


# multiboot: path byte (bit 0 through the setup), RAM size, memory map (even: the setup's),
# information area selector (0: the setup's), its size (0: the setup's), the command line,
# module count, each module's string and data, image.

def multiboot():
    def seed(path, ram_sel, image, cmdline="kernel mbtest", modules=()):
        out = u8(path) + ram(ram_sel) + u8(0) + u8(0) + u16(0) + text(cmdline) + u8(len(modules))
        for name, data in modules:
            out += text(name) + u16(len(data)) + data
        return out + image

    # a.out kludge: header at offset 0 of a kernel loaded at 1 MiB.
    load = 0x10_0000
    header_len = 32
    body = CODE * 8
    aout = multiboot_header(1 << 16 | 3, [load, load, load + header_len + len(body), load + 0x10000, load + header_len])
    aout_image = aout + body
    ehdr, blobs = elf32(0x10_0040, [(0x10_0000, multiboot_header(3) + CODE * 16, 0x2000)])
    elf_image = ehdr + blobs
    mods = [("one.txt first-module", b"module one\n"), ("two.txt second", b"module two\n" * 4)]
    write("multiboot", "aout-kludge", seed(0, 1, aout_image))
    write("multiboot", "aout-modules", seed(0, 1, aout_image, modules=mods))
    write("multiboot", "elf32", seed(0, 1, elf_image))
    write("multiboot", "elf32-higher-half", seed(0, 2, (lambda e: e[0] + e[1])(elf32(0x10_0040, [(0x10_0000, multiboot_header(3) + CODE * 16, 0x3000)], vaddr_delta=0xC000_0000))))
    write("multiboot", "setup-path", seed(1, 1, elf_image, modules=mods))
    write("multiboot", "bad-checksum", seed(0, 1, u32(0x1BADB002) + u32(3) + u32(0) + body))


# ---------------------------------------------------------------------------------------------
# vm_config: the VM sets in guest-images, and a few more.

def vm_config():
    for vms in sorted((REPO / "guest-images").glob("*.vms")):
        write("vm_config", vms.stem, vms.read_bytes())
    write("vm_config", "every-field", (
        "[host]\nslice = 5ms\nconsole = raw\n\n[vm all]\nkernel = k.elf\ninitrd = i.cpio\ncmdline = a=b c\n"
        "memory = 128M\nvcpus = 4\ntimeout = 60\ncpus = 0,2,4-7\nentry = long64\ndevices = test\n"
        "modules = m1.bin one, m2.bin\n\n[vm r]\nkernel = r.elf\nentry = real\nmemory = 2048K\n").encode())
    write("vm_config", "errors", b"[vm a]\nkernel = k\nmemory = 3M\n[vm a]\n")


# ---------------------------------------------------------------------------------------------
# ramdisk: mode byte; even: a cpio newc archive follows; odd: file descriptions to build one.

def newc(files):
    out = bytearray()

    def entry(ino, mode, name, data):
        nonlocal out
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)

    for i, (name, data) in enumerate(files):
        entry(i + 1, 0o100644, name, data)
    entry(0, 0, "TRAILER!!!", b"")
    return bytes(out)


def ramdisk():
    conf = (REPO / "guest-images" / "suite.vms").read_bytes()[:600]
    write("ramdisk", "archive", u8(0) + newc([("vms.conf", conf), ("images/k.bin", CODE * 8), ("./dot.txt", b"x")]))
    write("ramdisk", "empty-archive", u8(0) + newc([]))
    write("ramdisk", "directory-entry", u8(0) + newc([("a", b"1")]).replace(b"000081a4", b"000041ed", 1))
    write("ramdisk", "build", u8(1) + u8(3) + text("vms.conf") + u16(5) + b"[vm x" + text("k.elf") + u16(4) + CODE + text("d/i") + u16(0))


# ---------------------------------------------------------------------------------------------
# devices: vCPUs, TSC selector, RTC epoch and memory size, PCI reset control, then operations.

LAPIC, IOAPIC = 0xFEE0_0000, 0xFEC0_0000


class Ops:
    N = 8

    def __init__(self):
        self.b = b""

    def io(self, port, value=0, size=1, write=True):
        self.b += variant(0, self.N) + variant(1, 2) + u16(port) + u8({1: 0, 2: 1, 4: 2}[size]) + boolean(write) + u32(value)
        return self

    def inp(self, port, size=1):
        return self.io(port, 0, size, False)

    def mmio(self, gpa, value=0, size=4, write=True, cpu=0):
        self.b += variant(1, self.N) + u8(cpu) + variant(3, 4) + u64(gpa) + u8({1: 0, 2: 1, 4: 2, 8: 3}[size]) + boolean(write) + u64(value)
        return self

    def msr(self, msr, value=0, write=True, cpu=0):
        self.b += variant(2, self.N) + u8(cpu) + variant(3, 4) + u32(msr) + boolean(write) + u64(value)
        return self

    def type(self, byte):
        self.b += variant(3, self.N) + u8(byte)
        return self

    def advance(self, ns):
        shift = max(0, ns.bit_length() - 16)
        self.b += variant(4, self.N) + u16(ns >> shift) + u8(shift)
        return self

    def line(self, gsi, level):
        self.b += variant(5, self.N) + u8(gsi) + boolean(level)
        return self

    def ack(self, cpu=0):
        self.b += variant(6, self.N) + u8(cpu)
        return self

    def tpr(self, tpr, cpu=0):
        self.b += variant(7, self.N) + u8(cpu) + u8(tpr)
        return self


def machine(vcpus=1, reset_control=False):
    return u8({1: 0, 2: 1, 4: 2, 64: 3}[vcpus]) + u8(0) + u64(1_700_000_000) + u64(256 << 20) + boolean(reset_control)


def pic_init(ops):
    for port, values in ((0x20, (0x11,)), (0x21, (0x20, 0x04, 0x01)), (0xA0, (0x11,)), (0xA1, (0x28, 0x02, 0x01))):
        for v in values:
            ops.io(port, v)
    return ops


def devices():
    # 8259s and the PIT: IRQ0 every 1 ms, acknowledged and EOIed.
    ops = pic_init(Ops()).io(0x21, 0xFE).io(0x43, 0x34).io(0x40, 0xA9).io(0x40, 0x04)
    for _ in range(3):
        ops.advance(1_000_000).ack().io(0x20, 0x20)
    ops.io(0x43, 0x00).inp(0x40).inp(0x40).inp(0x61).io(0x61, 0x01).inp(0x61)
    write("devices", "pic-pit", machine() + ops.b)

    # Local APIC timer, periodic, and an EOI.
    ops = Ops().mmio(LAPIC + 0xF0, 0x1FF).mmio(LAPIC + 0x320, 0x20030).mmio(LAPIC + 0x3E0, 0xB).mmio(LAPIC + 0x380, 5000)
    ops.advance(6000).ack().mmio(LAPIC + 0xB0, 0).mmio(LAPIC + 0x390, write=False).mmio(LAPIC + 0x30, write=False)
    ops.mmio(LAPIC + 0x80, 0x20).advance(20000).ack().mmio(LAPIC + 0x100, write=False)
    write("devices", "lapic-timer", machine() + ops.b)

    # I/O APIC: the UART's GSI 4 to vector 0x34, level-triggered, then the UART raising it.
    ops = Ops().mmio(LAPIC + 0xF0, 0x1FF).mmio(IOAPIC, 0x18).mmio(IOAPIC + 0x10, 0xA034).mmio(IOAPIC, 0x19)
    ops.mmio(IOAPIC + 0x10, 0).mmio(IOAPIC, 0x01).mmio(IOAPIC + 0x10, write=False)
    ops.io(0x3F9, 0x01).io(0x3FC, 0x0B).type(ord("x")).ack().inp(0x3FA).inp(0x3F8).mmio(LAPIC + 0xB0, 0)
    write("devices", "ioapic-uart", machine() + ops.b)

    # UART: 115200 8N1, FIFOs, output, typed input with the character timeout, loopback.
    ops = Ops().io(0x3FB, 0x80).io(0x3F8, 0x01).io(0x3F9, 0x00).io(0x3FB, 0x03).io(0x3FA, 0xC7).io(0x3F9, 0x0F)
    ops.io(0x3FC, 0x0B)
    for c in b"hello\n":
        ops.io(0x3F8, c)
    for c in b"ls\r":
        ops.type(c)
    ops.advance(100_000).inp(0x3FA).inp(0x3FD).inp(0x3F8).inp(0x3F8).inp(0x3FE).io(0x3FC, 0x1F).io(0x3F8, 0x41).inp(0x3F8)
    ops.io(0x2FB, 0x03).io(0x2F8, ord("2")).inp(0x2FD)
    write("devices", "uart", machine() + ops.b)

    # CMOS RTC: the clock, the periodic interrupt, memory size and century.
    ops = Ops()
    for reg in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, 0x0A, 0x0B, 0x0D, 0x34, 0x35, 0x5B):
        ops.io(0x70, reg).inp(0x71)
    ops.io(0x70, 0x0A).io(0x71, 0x26).io(0x70, 0x0B).io(0x71, 0x42).advance(2_000_000).io(0x70, 0x0C).inp(0x71)
    ops.io(0x70, 0x8B).io(0x71, 0x86).io(0x70, 0x00).io(0x71, 0x59).io(0x70, 0x0B).io(0x71, 0x02)
    write("devices", "rtc", machine() + ops.b)

    # i8042: self-test, command byte, output port, reset pulse.
    ops = Ops().io(0x64, 0xAA).inp(0x60).io(0x64, 0x20).inp(0x60).io(0x64, 0x60).io(0x60, 0x47).io(0x64, 0xAD)
    ops.io(0x64, 0xAE).io(0x64, 0xD0).inp(0x60).io(0x60, 0xFF).inp(0x64).inp(0x60).io(0x64, 0xD1).io(0x60, 0xDF).io(0x64, 0xFE)
    write("devices", "i8042", machine() + ops.b)

    # ACPI PM: timer, enables, S5 with SLP_EN; reset register.
    ops = Ops().inp(0x608, 4).advance(1_000_000).inp(0x608, 4).io(0x602, 0x0100, 2).inp(0x600, 2).io(0x600, 0x0100, 2)
    ops.io(0x604, 0x0001, 2).io(0x604, 5 << 10, 2).io(0x604, (5 << 10) | (1 << 13), 2).io(0xCF9, 0x06)
    write("devices", "acpi-pm", machine() + ops.b)

    # PCI configuration mechanism #1: the host bridge's header, a write to its command register,
    # and the reset control register.
    ops = Ops()
    for reg in (0x00, 0x04, 0x08, 0x0C, 0x2C, 0x3C):
        ops.io(0xCF8, 0x8000_0000 | reg, 4).inp(0xCFC, 4).inp(0xCFE, 2)
    ops.io(0xCF8, 0x8000_0804, 4).inp(0xCFC, 4).io(0xCF8, 0x8000_0004, 4).io(0xCFC, 0x0007, 2).io(0xCF9, 0x02).io(0xCF9, 0x06)
    write("devices", "pci", machine(reset_control=True) + ops.b)

    # x2APIC and the TSC-deadline timer; IPIs between four vCPUs (INIT, SIPI, fixed, NMI).
    ops = Ops().msr(0x1B, 0xFEE0_0D00).msr(0x80F, 0x1FF).msr(0x832, 0x40031).msr(0x6E0, 5_000_000).advance(6_000_000)
    ops.ack().msr(0x80B, 0).msr(0x830, 0x0000_0001_0000_4500).msr(0x830, 0x0000_0001_0000_4608).msr(0x80F, 0x1FF, cpu=1)
    ops.msr(0x830, 0x0000_0001_0000_0040).ack(1).msr(0x830, 0x0008_0400).msr(0x83F, 0x41).ack().msr(0x802, write=False)
    write("devices", "x2apic-ipis", machine(vcpus=2) + ops.b)

    # xAPIC IPIs by logical destination, lowest priority, and the error register.
    ops = Ops().mmio(LAPIC + 0xF0, 0x1FF).mmio(LAPIC + 0xF0, 0x1FF, cpu=1).mmio(LAPIC + 0xD0, 0x0100_0000).mmio(LAPIC + 0xD0, 0x0200_0000, cpu=1)
    ops.mmio(LAPIC + 0x310, 0x0300_0000).mmio(LAPIC + 0x300, 0x0000_0950).ack(1).ack().mmio(LAPIC + 0x300, 0x0000_0005)
    ops.mmio(LAPIC + 0x280, 0).mmio(LAPIC + 0x280, write=False).tpr(0x3, cpu=1).line(9, True).line(9, False)
    write("devices", "xapic-ipis", machine(vcpus=4) + ops.b)

    # Debug exit, POST code and the test device.
    ops = Ops().io(0x80, 0x55).io(0xF5, 0x40).mmio(0xD000_0000, write=False).mmio(0xD000_0008, 0x1122334455667788, 8)
    ops.mmio(0xD000_000C, write=False, size=2).io(0xF4, 0)
    write("devices", "test-device-debug-exit", machine() + ops.b)


# ---------------------------------------------------------------------------------------------
# run_loop: vCPUs, TSC selector, options, slice length, typed input, code, then steps.

class Exits:
    N = 13


def port(p):
    return variant(1, 2) + u16(p)


def value_small(v):
    return variant(0, 4) + u8(v)


def value_raw(v):
    return variant(3, 4) + u64(v)


REG = {"rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7, "rip": 16}


def step(exit_bytes, vcpu=0, regs=(), flags=0, mode=None, rip=None, cr8=None, ran_us=10):
    regs = list(regs)
    assert len(regs) <= 3
    out = u8(vcpu) + exit_bytes
    for i in range(3):
        if i < len(regs):
            name, v = regs[i]
            out += option(u8(REG[name]) + (value_small(v) if 0 <= v < 256 else value_raw(v)))
        else:
            out += option(None)
    out += u8(flags) + option(mode) + option(None if rip is None else u16(rip)) + option(None if cr8 is None else u8(cr8)) + u16(ran_us)
    return out


def io_exit(p, write=True, size=1, string=False, rep=False):
    return variant(5, Exits.N) + port(p) + u8({1: 0, 2: 1, 4: 2}[size]) + boolean(write) + boolean(string) + boolean(rep)


def mmio_exit(gpa, write=True):
    return variant(6, Exits.N) + variant(4, 5) + u64(gpa) + boolean(write) + boolean(False)


def simple(k):
    return variant(k, Exits.N)


CPUID, RDMSR, WRMSR, HLT, XSETBV, WINDOW, EXTINT, PAUSE, INVD = 0, 1, 2, 3, 4, 7, 8, 9, 10


def cr8_exit(write, gpr):
    return variant(11, Exits.N) + boolean(write) + u8(gpr)


def fatal(k, *fields):
    return variant(12, Exits.N) + variant(k, 4) + b"".join(fields)


def out(p, v, size=1, **kw):
    return step(io_exit(p, True, size), regs=[("rax", v)], **kw)


def inb(p, size=1, **kw):
    return step(io_exit(p, False, size), **kw)


IF = 1


def header(vcpus=1, options=0, typed=b"", code=b"", slice_us=2000):
    return u8(vcpus - 1) + u8(0) + u8(options) + u16(slice_us) + u16(len(typed)) + typed + u16(len(code)) + code


def debug_exit(status=0, **kw):
    return out(0xF4, status, 4, **kw)


def real_mode(cs):
    return variant(2, 4) + u16(cs)


def run_loop():
    # Console output, then debug-exit status 0.
    s = b"".join(out(0x3F8, c) for c in b"hello\n") + debug_exit()
    write("run_loop", "hello", header() + s)

    # CPUID leaves, XSETBV, MSRs allowed, refused and of the local APIC.
    s = b""
    for leaf in (0, 1, 7, 0xD, 0x8000_0000, 0x8000_0001, 0x4000_0000, 0x4000_0001, 0xB):
        s += step(simple(CPUID), regs=[("rax", leaf), ("rcx", 0)])
    s += step(simple(XSETBV), regs=[("rcx", 0), ("rax", 7), ("rdx", 0)]) + step(simple(XSETBV), regs=[("rcx", 0), ("rax", 2)])
    for msr in (0x10, 0x1B, 0x3A, 0x277, 0xC000_0082, 0x4000_00FF, 0xC001_0000, 0x6E0):
        s += step(simple(RDMSR), regs=[("rcx", msr)])
    s += step(simple(WRMSR), regs=[("rcx", 0xC000_0082), ("rax", 0x1000), ("rdx", 0xFFFF_8000)])
    s += step(simple(WRMSR), regs=[("rcx", 0x277), ("rax", 0x0202_0202)]) + step(simple(INVD)) + step(simple(PAUSE))
    write("run_loop", "cpuid-msr-xsetbv", header(options=1 << 4) + s + debug_exit())

    # Local APIC through MMIO: `mov [rax], ecx` at the code address writes, `mov eax, [rax]`
    # reads; a periodic timer wakes a HLT with interrupts on; the handler's EOI.
    code = bytes.fromhex("8908" "8b00")
    def lapic_write(off, v):
        return step(mmio_exit(LAPIC + off), regs=[("rax", LAPIC + off), ("rcx", v)], rip=0, flags=0)
    s = lapic_write(0xF0, 0x1FF) + lapic_write(0x3E0, 0xB) + lapic_write(0x320, 0x20030) + lapic_write(0x380, 100_000)
    s += step(mmio_exit(LAPIC + 0x30, False), regs=[("rax", LAPIC + 0x30)], rip=2)
    s += step(simple(HLT), flags=IF, ran_us=50) + step(simple(WINDOW), flags=IF) + lapic_write(0xB0, 0) + step(simple(HLT), flags=IF)
    s += step(mmio_exit(LAPIC + 0x390, False), regs=[("rax", LAPIC + 0x390)], rip=2) + debug_exit()
    write("run_loop", "lapic-timer-mmio", header(code=code) + s)

    # 8259s and the PIT as Linux programs them, IRQ0 waking a HLT, EOIs.
    s = b""
    for p, values in ((0x20, (0x11,)), (0x21, (0x30, 0x04, 0x01)), (0xA0, (0x11,)), (0xA1, (0x38, 0x02, 0x01))):
        for v in values:
            s += out(p, v)
    s += out(0x21, 0xFE) + out(0x43, 0x34) + out(0x40, 0xA9) + out(0x40, 0x04)
    for _ in range(3):
        s += step(simple(HLT), flags=IF, ran_us=500) + step(simple(EXTINT), flags=IF) + out(0x20, 0x20)
    s += inb(0x61) + out(0x43, 0) + inb(0x40) + inb(0x40) + debug_exit()
    write("run_loop", "pic-pit-halt", header() + s)

    # Two vCPUs: INIT and SIPI from the BSP through the ICR; the AP starts in real mode, prints
    # and halts; the BSP ends the VM.
    code = bytes.fromhex("8908")
    s = lapic_write(0xF0, 0x1FF) + lapic_write(0x310, 1 << 24) + lapic_write(0x300, 0x4500) + lapic_write(0x300, 0x4608)
    s += step(simple(PAUSE))
    s += step(io_exit(0x3F8), vcpu=1, regs=[("rax", ord("A"))]) + step(simple(HLT), vcpu=1, flags=0)
    s += lapic_write(0x300, 0x0004_0400)  # NMI to all others
    s += step(simple(PAUSE), vcpu=1) + step(simple(HLT)) + debug_exit(1)
    write("run_loop", "smp-init-sipi", header(vcpus=2, code=code) + s)

    # String I/O in 64-bit mode: REP OUTSB of the code bytes to COM1, REP INSW into RAM.
    code = b"string!\n"
    s = step(io_exit(0x3F8, True, 1, True, True), regs=[("rsi", 0x1_8000), ("rcx", len(code))])
    s += step(io_exit(0x3FD, False, 2, True, True), regs=[("rdi", 0x3_0000), ("rcx", 4)])
    s += step(io_exit(0x3F8, True, 1, True, False), regs=[("rsi", 0x1_8000)], flags=2)
    s += step(io_exit(0x3F8, True, 4, True, True), regs=[("rsi", 0x30_0000), ("rcx", 2)])
    write("run_loop", "string-io", header(code=code) + s)

    # Console input: the UART's receive interrupt through the 8259 while the guest halts; the
    # raw console.
    s = b""
    for p, values in ((0x20, (0x11,)), (0x21, (0x30, 0x04, 0x01)), (0xA0, (0x11,)), (0xA1, (0x38, 0x02, 0x01))):
        for v in values:
            s += out(p, v)
    s += out(0x21, 0xEF) + out(0x3F9, 0x01) + out(0x3FC, 0x0B) + b"".join(out(0x3F8, c) for c in b"$ \x1b[1m")
    for _ in range(3):
        s += step(simple(HLT), flags=IF, ran_us=2000) + inb(0x3FA, flags=IF) + inb(0x3F8, flags=IF) + out(0x20, 0x20, flags=IF)
    write("run_loop", "console-input", header(options=4 | 8, typed=b"ls\r") + s + debug_exit())

    # CR8 as the TPR: a write, a read, a reserved value; SVM's V_TPR between exits.
    s = step(cr8_exit(True, 0), regs=[("rax", 5)]) + step(cr8_exit(False, 3)) + step(cr8_exit(True, 1), regs=[("rcx", 0x10)])
    s += step(cr8_exit(True, 4), regs=[("rsp", 2)]) + step(cr8_exit(False, 4), cr8=9) + step(simple(WINDOW), cr8=3)
    write("run_loop", "cr8", header(options=2) + s + debug_exit())

    # ACPI power-off, the i8042 reset pulse, port 0xcf9.
    write("run_loop", "power-off", header() + out(0x604, 5 << 10, 2) + out(0x604, (5 << 10) | (1 << 13), 2))
    write("run_loop", "i8042-reset", header() + out(0x64, 0xFE))
    write("run_loop", "reset-cf9", header() + out(0xCF9, 0x06))

    # Endings: triple fault, unhandled exit, entry failure, other control registers, a HLT
    # nothing can wake, real-mode string I/O.
    write("run_loop", "triple-fault", header() + step(fatal(0)))
    write("run_loop", "unhandled", header() + step(fatal(2, u64(0x30), u64(0x1234))))
    write("run_loop", "entry-failed", header() + step(fatal(1, u64(7))))
    write("run_loop", "cr3-write", header() + step(fatal(3, u8(3), boolean(True), u8(0))))
    write("run_loop", "halt-forever", header() + step(simple(HLT), flags=0))
    write("run_loop", "real-mode-string-io", header() + step(io_exit(0x3F8, True, 1, True, True), mode=real_mode(0x1000)))
    write("run_loop", "mmio-unclaimed", header() + step(mmio_exit(0xE000_0000)))


# ---------------------------------------------------------------------------------------------
# virtio: options (bit 0: memory work right after each notification, bit 1: the disk's page
# pool), entropy failure period,
# switch limits (frames, bytes, MACs, MACs per port), then `Op`s.

class Virtio:
    """Encoder for the virtio target's `Op` stream."""

    N = 15
    # Queues, as the target numbers them: blk rw, blk ro, net A rx/tx, net B rx/tx, rng.
    BLK, BLK_RO, RX_A, TX_A, RX_B, TX_B, RNG = range(7)
    # Functions.
    F_BLK, F_BLK_RO, F_NET_A, F_NET_B, F_RNG = range(5)
    # Request kinds: block IN, OUT, FLUSH, GET_ID, other; a frame to A, B, the third port,
    # broadcast, multicast, itself.
    IN, OUT, FLUSH, GET_ID, OTHER = range(5)
    TO_A, TO_B, TO_SPARE, TO_ALL, TO_GROUP, TO_SELF = range(6)
    # Regions of a BAR.
    COMMON, ISR, DEVICE, NOTIFY, MSIX, PBA, BAR = range(7)

    def __init__(self):
        self.b = b""

    def config(self, slot, register, size=4, write=False, value=0, raw=None):
        address = variant(1, 2) + u32(raw) if raw is not None else variant(0, 2) + u8(slot) + u8(register & 0xFC)
        self.b += variant(0, self.N) + address + u8(register & 3) + u8({1: 0, 2: 1, 4: 2}[size]) + boolean(write) + u32(value)
        return self

    def port(self, port, size=1, write=False, value=0):
        self.b += variant(1, self.N) + u8(port - 0xCF8) + u8({1: 0, 2: 1, 4: 2}[size]) + boolean(write) + u32(value)
        return self

    def mmio(self, function, region, offset=0, size=4, write=False, value=0):
        if region == self.ISR:
            where = variant(region, 7)
        elif region == self.BAR:
            where = variant(region, 7) + u16(offset)
        else:
            where = variant(region, 7) + u8(offset)
        self.b += variant(2, self.N) + variant(0, 2) + u8(function) + where
        self.b += u8({1: 0, 2: 1, 4: 2, 8: 3}[size]) + boolean(write) + u64(value)
        return self

    def window(self, offset, size=4, write=False, value=0):
        self.b += variant(2, self.N) + variant(1, 2) + u32(offset) + u8({1: 0, 2: 1, 4: 2, 8: 3}[size]) + boolean(write) + u64(value)
        return self

    def poke(self, gpa, data):
        assert len(data) <= 16
        self.b += variant(3, self.N) + u16(gpa) + u8(len(data)) + data.ljust(16, b"\0")
        return self

    def chain(self, queue, bufs, indirect=None, notify=True):
        assert 1 <= len(bufs) <= 4
        padded = list(bufs) + [(0, 0, False)] * (4 - len(bufs))
        self.b += variant(4, self.N) + u8(queue) + u8(len(bufs) - 1)
        self.b += b"".join(u16(gpa) + u16(length) + boolean(w) for gpa, length, w in padded)
        self.b += option(None if indirect is None else u16(indirect)) + boolean(notify)
        return self

    def publish(self, queue, head, notify=True):
        self.b += variant(5, self.N) + u8(queue) + u16(head) + boolean(notify)
        return self

    def avail(self, queue, flags=0, idx=0, used_event=0):
        self.b += variant(6, self.N) + u8(queue) + u16(flags) + u16(idx) + u16(used_event)
        return self

    def request(self, queue, kind, data, length, arg=0, notify=True):
        self.b += variant(7, self.N) + u8(queue) + u8(kind) + u32(arg) + u16(data) + u16(length) + boolean(notify)
        return self

    def notify(self, queue):
        self.b += variant(8, self.N) + u8(queue)
        return self

    def bring_up(self, function, features="offered", size_log=4, rings=None, irq="msix", steps=0xFF):
        if features == "offered":
            f = variant(0, 3)
        elif features == "version1":
            f = variant(1, 3)
        else:
            f = variant(2, 3) + u64(features)
        r = variant(0, 2) if rings is None else variant(1, 2) + u16(rings[0]) + u16(rings[1]) + u16(rings[2])
        i = variant({"intx": 0, "msix": 1, "msi": 2}[irq], 3)
        self.b += variant(9, self.N) + u8(function) + f + u8(size_log) + r + i + u8(steps)
        return self

    def inject(self, dst, length, src=2, tag=0x5A):
        def mac(m):
            return variant(5, 6) + bytes(m) if isinstance(m, (bytes, list)) else variant(m, 6)
        self.b += variant(10, self.N) + mac(dst) + mac(src) + u16(length) + u8(tag)
        return self

    def take(self, count=8):
        self.b += variant(11, self.N) + u8(count - 1)
        return self

    def run_dma(self, calls=1):
        self.b += variant(12, self.N) + u8(calls - 1)
        return self

    def drain(self):
        self.b += variant(13, self.N)
        return self

    def desc(self, queue, index, addr, length, flags, next_index):
        self.b += variant(14, self.N) + u8(queue) + u8(index) + u16(addr) + u16(length) + u8(flags) + u8(next_index)
        return self


def virtio_header(auto=True, pool=False, fail_every=0, frames=16, queue_bytes=3, macs=8, per_port=4):
    return u8((1 if auto else 0) | (2 if pool else 0)) + u8(fail_every) + u8(frames) + u8(queue_bytes) + u8(macs) + u8(per_port)


def virtio():
    v = Virtio
    data = 0x4000

    # virtio-blk with MSI-X: a read, a write read back, a flush, GET_ID, an unknown type, a
    # read past the end; the ISR and the status.
    o = Virtio().bring_up(v.F_BLK, "offered", 4)
    o.request(v.BLK, v.IN, data, 512, arg=1).request(v.BLK, v.OUT, data, 1024, arg=2)
    o.request(v.BLK, v.IN, data + 0x1000, 1024, arg=2).request(v.BLK, v.FLUSH, data, 0)
    o.request(v.BLK, v.GET_ID, data, 20).request(v.BLK, v.OTHER, data, 16, arg=0x77)
    o.request(v.BLK, v.IN, data, 1024, arg=31).mmio(v.F_BLK, v.DEVICE, 0, 8).mmio(v.F_BLK, v.ISR, size=1)
    for sector in (8, 16, 24):
        o.request(v.BLK, v.OUT, data, 512, arg=sector)  # the third page is past the overlay budget
    o.mmio(v.F_BLK, v.COMMON, 0x14, 1).drain()
    write("virtio", "blk-msix", virtio_header() + o.b)
    write("virtio", "blk-msix-pool", virtio_header(pool=True) + o.b)

    # The read-only disk on INTx, memory work left to explicit calls: a refused write, the last
    # whole sector and the partial one after it; the ISR read lowers the line.
    o = Virtio().bring_up(v.F_BLK_RO, "version1", 3, irq="intx")
    o.request(v.BLK_RO, v.OUT, data, 512, arg=0).run_dma().config(2, 0x04, 4).mmio(v.F_BLK_RO, v.ISR, size=1)
    o.request(v.BLK_RO, v.IN, data, 512, arg=7).request(v.BLK_RO, v.IN, data, 512, arg=8).run_dma(2)
    o.config(2, 0x04, 4).mmio(v.F_BLK_RO, v.ISR, size=1).config(2, 0x04, 4).drain()
    write("virtio", "blk-ro-intx", virtio_header(auto=False) + o.b)

    # Two virtio-net devices on one switch: receive buffers, a frame from A to B, a broadcast
    # from B, frames from the third port, which takes what was flooded to it.
    o = Virtio().bring_up(v.F_NET_A, "offered", 4).bring_up(v.F_NET_B, "offered", 4)
    for i in range(2):
        o.request(v.RX_A, 0, data + 0x800 * i, 1530).request(v.RX_B, 0, data + 0x1000 + 0x800 * i, 1530)
    o.request(v.TX_A, v.TO_B, data + 0x2000, 60, arg=1).request(v.TX_B, v.TO_ALL, data + 0x2800, 100, arg=2)
    o.inject(v.TO_A, 64).inject(3, 1518).inject(4, 13).inject(0, 1530).take().drain()
    o.request(v.TX_A, v.TO_SELF, data + 0x2000, 1518 + 12).request(v.TX_B, v.TO_A, data + 0x2800, 200).drain()
    write("virtio", "net-pair", virtio_header() + o.b)

    # Tight switch limits: two frames per port, 1518 bytes; flooding with no receive buffers,
    # buffers too small for what waits, random source MACs filling the table.
    o = Virtio().bring_up(v.F_NET_A, "version1", 2).bring_up(v.F_NET_B, "offered", 0, irq="intx")
    for i in range(4):
        o.inject(v.TO_ALL, 600, src=bytes([2, 0, 0, 0, 0, i]))
    o.request(v.TX_A, v.TO_ALL | 0x80, data, 300, arg=0x1234).request(v.RX_B, 0, data + 0x800, 100).drain()
    o.request(v.RX_A, 0, data + 0x1000, 1530).request(v.RX_A, 0, data + 0x1800, 1530).drain().take()
    write("virtio", "net-limits", virtio_header(frames=2, queue_bytes=1, macs=3, per_port=1) + o.b)

    # virtio-rng through MSI: small and oversized requests, a failing source every third call.
    o = Virtio().bring_up(v.F_RNG, "version1", 6, irq="msi")
    o.request(v.RNG, 0, data, 32).request(v.RNG, 0, data, 5000).request(v.RNG, 0, data, 1)
    o.request(v.RNG, 0, data, 64).chain(v.RNG, [(data, 16, True), (data + 0x100, 16, True)]).drain()
    write("virtio", "rng-msi", virtio_header(fail_every=3) + o.b)

    # Raw chains on the disk: a request through an indirect table, scattered descriptors, a head
    # beyond the table, then a reset and a fresh start.
    header = u32(0) + u32(0) + u64(3)
    o = Virtio().bring_up(v.F_BLK, "offered", 3).poke(0x4800, header).poke(0x4810, b"\xff")
    o.chain(v.BLK, [(0x4800, 16, False), (data, 512, True), (0x4810, 1, True)], indirect=0x5000)
    o.chain(v.BLK, [(0x4800, 8, False), (0x4808, 8, False), (data, 256, True), (0x4810, 1, True)])
    o.desc(v.BLK, 5, 0x4800, 16, 1, 6).desc(v.BLK, 6, data, 16, 1, 5).publish(v.BLK, 5)  # a loop
    o.publish(v.BLK, 200).mmio(v.F_BLK, v.COMMON, 0x14, 1).mmio(v.F_BLK, v.COMMON, 0x14, 1, write=True, value=0)
    o.bring_up(v.F_BLK, "offered", 3, rings=(0x2000, 0x2400, 0x2600)).avail(v.BLK, idx=5).notify(v.BLK).drain()
    write("virtio", "blk-chains", virtio_header() + o.b)

    # Registers as a hostile driver reaches them: the PCI configuration window, the MSI-X table
    # under the function mask, a moved BAR, other buses and functions, byte accesses to 0xcf8,
    # reads across the window.
    o = Virtio().bring_up(v.F_NET_A, "version1", 4)
    o.config(3, 0x42, 2, write=True, value=0xC000).mmio(v.F_NET_A, v.MSIX, 0x1C, 4, write=True, value=1)
    o.request(v.RX_A, 0, 0x4000, 1530).inject(v.TO_A, 100).run_dma().mmio(v.F_NET_A, v.PBA, 0, 8)
    o.config(3, 0x42, 2, write=True, value=0x8000).mmio(v.F_NET_A, v.MSIX, 0x1C, 4, write=True, value=0)
    o.config(3, 0xA4, 1, write=True, value=0).config(3, 0xA8, 4, write=True, value=0x12)
    o.config(3, 0xAC, 4, write=True, value=2).config(3, 0xB0, 2).config(3, 0x10, 4, write=True, value=0xFFFFFFFF)
    o.config(3, 0x10, 4).config(3, 0x10, 4, write=True, value=0xE0100000).window(0x100000 + 0x14, 1)
    o.config(0, 0, raw=0x8001_0000).config(0, 0, raw=0x8000_1900).port(0xCF8, 1, write=True, value=1).port(0xCF8, 1)
    o.port(0xCFB, 2).window(0x2_0000 + 0x2000, 8).window(0x3_0000, 4).mmio(v.F_RNG, v.DEVICE, 0, 4)
    write("virtio", "hostile-registers", virtio_header() + o.b)

    # Bring-ups cut short: notifications before DRIVER_OK, a queue enabled outside memory,
    # features that were not offered.
    o = Virtio().bring_up(v.F_BLK, "offered", 4, steps=3).notify(v.BLK).run_dma()
    o.bring_up(v.F_BLK_RO, "offered", 4, rings=(0xFF00, 0xFF00, 0xFF00)).notify(v.BLK_RO)
    o.bring_up(v.F_RNG, 1 << 40 | 1 << 32, 4).mmio(v.F_RNG, v.COMMON, 0x14, 1).bring_up(v.F_NET_B, "offered", 9)
    o.drain()
    write("virtio", "partial-bring-up", virtio_header() + o.b)


def main():
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    for make in (mmio_decode, guest_walk, elf, bzimage, multiboot, vm_config, ramdisk, devices, run_loop, virtio):
        make()
    total = sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file())
    count = sum(1 for f in CORPUS.rglob("*") if f.is_file())
    print(f"{count} seeds, {total} bytes in {CORPUS}")


if __name__ == "__main__":
    main()
