//! The test cases, one function each. Every case checks what it observes and returns a message
//! with the expected and observed values when something is off.

// Failure messages are formatted into a fixed buffer and returned by value: the guest has no
// allocator to box them, and returning them is not on any hot path.
#![allow(clippy::result_large_err)]

use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;

use crate::cpu;
use crate::serial::{self, println};
use crate::traps::{self, Caught, VECTOR_BP, VECTOR_GP, VECTOR_TEST_IRQ, VECTOR_UD};

/// What `cases=all` runs, in order. `triple-fault` is left out: it ends the VM.
pub const ALL: [&str; 12] = [
    "cpuid",
    "msr",
    "io",
    "hlt",
    "mmio",
    "cr",
    "xsetbv",
    "exceptions",
    "prefixed-exits",
    "cr-patterns",
    "string-io",
    "paravirt",
];

pub type CaseResult = Result<(), Msg>;

pub fn run(name: &str) -> CaseResult {
    match name {
        "cpuid" => cpuid(),
        "msr" => msr(),
        "io" => io(),
        "hlt" => hlt(),
        "mmio" => mmio(),
        "cr" => cr(),
        "xsetbv" => xsetbv(),
        "exceptions" => exceptions(),
        "triple-fault" => triple_fault(),
        "spin" => spin(),
        "bench" => bench(),
        "halt-forever" => halt_forever(),
        "ticks" => ticks(),
        "leave-traces" => leave_traces(),
        "find-no-traces" => find_no_traces(),
        "smp" => crate::smp::smp(),
        "msr-sweep" => msr_sweep(),
        "host-nmi" => host_nmi(),
        "forge-lines" => forge_lines(),
        "port-sweep" => port_sweep(),
        "prefixed-exits" => prefixed_exits(),
        "cr-patterns" => cr_patterns(),
        "string-io" => string_io(),
        "paravirt" => paravirt(),
        "timers" => timers(),
        "exit-storm" => exit_storm(),
        "phys-sweep" => phys_sweep(),
        "virtio-hostile" => crate::virtio::virtio_hostile(),
        _ => Err(fail!("unknown case")),
    }
}

/// A failure description, formatted into a fixed buffer (the guest has no allocator).
pub struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    pub fn new(args: fmt::Arguments) -> Msg {
        let mut msg = Msg { buf: [0; 256], len: 0 };
        // Writing into a Msg never fails; overlong text is cut off.
        let _ = fmt::write(&mut msg, args);
        msg
    }
}

impl fmt::Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(unprintable message)"))
    }
}

macro_rules! fail {
    ($($arg:tt)+) => {
        $crate::cases::Msg::new(format_args!($($arg)+))
    };
}
pub(crate) use fail;

/// Fails the current case with the formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(fail!($($arg)+));
        }
    };
}

/// Checks that the expected exception `what` was taken exactly once, at `rip`, with `error_code`.
fn check_caught(what: &str, caught: Caught, rip: u64, error_code: u64) -> CaseResult {
    ensure!(caught.hits == 1, "{what}: expected exactly 1 exception, saw {}", caught.hits);
    ensure!(caught.rip == rip, "{what}: expected saved RIP {rip:#x}, saw {:#x}", caught.rip);
    ensure!(
        caught.error_code == error_code,
        "{what}: expected error code {error_code:#x}, saw {:#x}",
        caught.error_code
    );
    Ok(())
}

fn cpuid() -> CaseResult {
    let leaf1 = cpu::cpuid(1, 0);
    ensure!(
        leaf1.ecx & cpu::CPUID1_ECX_HYPERVISOR != 0,
        "expected CPUID.1:ECX bit 31 (hypervisor) set, ECX={:#010x}",
        leaf1.ecx
    );
    ensure!(leaf1.ecx & cpu::CPUID1_ECX_VMX == 0, "expected CPUID.1:ECX bit 5 (VMX) clear, ECX={:#010x}", leaf1.ecx);

    // A CPU without leaf 0x8000_0001 does not report SVM either.
    if cpu::cpuid(0x8000_0000, 0).eax >= 0x8000_0001 {
        let ext1 = cpu::cpuid(0x8000_0001, 0);
        ensure!(
            ext1.ecx & cpu::CPUID_EXT1_ECX_SVM == 0,
            "expected CPUID.80000001h:ECX bit 2 (SVM) clear, ECX={:#010x}",
            ext1.ecx
        );
    }

    let hv = cpu::cpuid(0x4000_0000, 0);
    ensure!(hv.eax >= 0x4000_0001, "expected CPUID.40000000h:EAX >= 0x40000001, saw {:#010x}", hv.eax);
    let mut vendor = [0u8; 12];
    vendor[0..4].copy_from_slice(&hv.ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&hv.ecx.to_le_bytes());
    vendor[8..12].copy_from_slice(&hv.edx.to_le_bytes());
    ensure!(
        &vendor == b"RsHypervisor",
        "expected CPUID.40000000h vendor \"RsHypervisor\", saw EBX={:#010x} ECX={:#010x} EDX={:#010x}",
        hv.ebx,
        hv.ecx,
        hv.edx
    );
    Ok(())
}

const MSR_PAT: u32 = 0x277;
const MSR_LSTAR: u32 = 0xC000_0082;
/// Not implemented by the platform: RDMSR and WRMSR of it must raise #GP(0).
const MSR_UNKNOWN: u32 = 0x4000_00FF;
/// Distinctive and canonical (bits 63:47 all set).
const LSTAR_TEST_VALUE: u64 = 0xFFFF_8000_CAFE_F00D;

fn msr() -> CaseResult {
    let lstar = cpu::rdmsr(MSR_LSTAR);
    // SAFETY: the guest never executes SYSCALL, so LSTAR is unused; it is restored right away.
    unsafe { cpu::wrmsr(MSR_LSTAR, LSTAR_TEST_VALUE) };
    let seen = cpu::rdmsr(MSR_LSTAR);
    // SAFETY: as above.
    unsafe { cpu::wrmsr(MSR_LSTAR, lstar) };
    ensure!(seen == LSTAR_TEST_VALUE, "expected LSTAR {LSTAR_TEST_VALUE:#x} after writing it, saw {seen:#x}");

    // Only PAT entry 7 changes (UC <-> WC): the guest's page tables only use entry 0.
    let pat = cpu::rdmsr(MSR_PAT);
    let entry7 = if pat >> 56 == 0x01 { 0x00 } else { 0x01 };
    let pat_test = (pat & 0x00FF_FFFF_FFFF_FFFF) | entry7 << 56;
    // SAFETY: every entry keeps a valid memory type and entry 7 is unused; restored right away.
    unsafe { cpu::wrmsr(MSR_PAT, pat_test) };
    let seen = cpu::rdmsr(MSR_PAT);
    // SAFETY: restores the original value.
    unsafe { cpu::wrmsr(MSR_PAT, pat) };
    ensure!(seen == pat_test, "expected PAT {pat_test:#018x} after writing it, saw {seen:#018x}");

    traps::expect(VECTOR_GP, 2);
    let rip = rdmsr_faulting(MSR_UNKNOWN);
    check_caught("rdmsr 0x400000ff", traps::caught(), rip, 0)?;

    traps::expect(VECTOR_GP, 2);
    let rip = wrmsr_faulting(MSR_UNKNOWN, 0x1234_5678_9ABC_DEF0);
    check_caught("wrmsr 0x400000ff", traps::caught(), rip, 0)
}

/// The index ranges a hostile guest probes: architectural, hypervisor, AMD/Intel extended.
const SWEPT_MSRS: [core::ops::Range<u32>; 4] =
    [0..0x2000, 0x4000_0000..0x4000_0100, 0xc000_0000..0xc000_2000, 0xc001_0000..0xc001_2000];

/// Reads every MSR of `SWEPT_MSRS`, and writes each one that refused the read: every access
/// either works or raises #GP, and the VM goes on (the test checks that the host's log stays
/// short and the end report counts the refusals).
fn msr_sweep() -> CaseResult {
    let (mut reads, mut refused_reads, mut refused_writes) = (0u32, 0u32, 0u32);
    for msr in SWEPT_MSRS.iter().cloned().flatten() {
        reads += 1;
        traps::expect(VECTOR_GP, 2);
        rdmsr_faulting(msr);
        if traps::caught().hits == 0 {
            continue;
        }
        refused_reads += 1;
        traps::expect(VECTOR_GP, 2);
        wrmsr_faulting(msr, u64::from(msr).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        refused_writes += traps::caught().hits;
    }
    println!("case msr-sweep: {reads} MSRs read, {refused_reads} refused the read, {refused_writes} then the write");
    ensure!(refused_reads > 0 && refused_writes == refused_reads, "an MSR that refused a read took a write");
    Ok(())
}

/// RDMSR of an MSR that raises #GP (skipped by the handler); returns the instruction's address.
fn rdmsr_faulting(msr: u32) -> u64 {
    let addr: u64;
    // SAFETY: the expected #GP is skipped by the trap handler (RDMSR is 2 bytes); nothing is read.
    unsafe {
        asm!(
            "lea {addr}, [rip + 2f]",
            "2:",
            "rdmsr",
            addr = out(reg) addr,
            in("ecx") msr,
            out("eax") _,
            out("edx") _,
            options(nostack, preserves_flags),
        )
    };
    addr
}

/// WRMSR to an MSR that raises #GP (skipped by the handler); returns the instruction's address.
fn wrmsr_faulting(msr: u32, value: u64) -> u64 {
    let addr: u64;
    // SAFETY: the expected #GP is skipped by the trap handler (WRMSR is 2 bytes); nothing is written.
    unsafe {
        asm!(
            "lea {addr}, [rip + 2f]",
            "2:",
            "wrmsr",
            addr = out(reg) addr,
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    };
    addr
}

const COM1_THR: u16 = 0x3F8;
const COM1_LSR: u16 = 0x3FD;
const POST_PORT: u16 = 0x80;

fn io() -> CaseResult {
    let lsr = serial::inb(COM1_LSR);
    ensure!(lsr == 0x60, "expected LSR (in al, dx from port 0x3fd) = 0x60, saw {lsr:#04x}");

    // Port 0x80 is a write-only sink: these must simply not fault (a fault would end the run).
    // SAFETY: writes to port 0x80 have no effect on the guest.
    unsafe { asm!("out 0x80, al", in("al") 0x5Au8, options(nomem, nostack, preserves_flags)) };
    // SAFETY: as above, 16-bit form.
    unsafe { asm!("out dx, ax", in("dx") POST_PORT, in("ax") 0xA55Au16, options(nomem, nostack, preserves_flags)) };

    // The harness looks for this text as a line of its own on COM1.
    let text = b"rep-outsb-ok\n";
    let (left, next): (usize, *const u8);
    // SAFETY: reads exactly `text.len()` bytes of `text` (DF is clear, as the asm! contract says).
    unsafe {
        asm!(
            "rep outsb",
            inout("rcx") text.len() => left,
            inout("rsi") text.as_ptr() => next,
            in("dx") COM1_THR,
            options(readonly, nostack, preserves_flags),
        )
    };
    let expected_next = text.as_ptr() as usize + text.len();
    ensure!(left == 0, "rep outsb: expected RCX 0 afterwards, saw {left:#x}");
    ensure!(next as usize == expected_next, "rep outsb: expected RSI {expected_next:#x}, saw {:#x}", next as usize);

    // Four bytes into an 8-byte buffer: the tail shows whether more than RCX bytes were stored.
    let mut buffer = [0xAAu8; 8];
    let start = buffer.as_mut_ptr();
    let (left, next): (usize, *mut u8);
    // SAFETY: stores exactly 4 bytes into `buffer`, which has 8.
    unsafe {
        asm!(
            "rep insb",
            inout("rcx") 4usize => left,
            inout("rdi") start => next,
            in("dx") COM1_LSR,
            options(nostack, preserves_flags),
        )
    };
    let expected_next = start as usize + 4;
    ensure!(
        buffer == [0x60, 0x60, 0x60, 0x60, 0xAA, 0xAA, 0xAA, 0xAA],
        "rep insb: expected buffer 60 60 60 60 aa aa aa aa, saw {buffer:02x?}"
    );
    ensure!(left == 0, "rep insb: expected RCX 0 afterwards, saw {left:#x}");
    ensure!(next as usize == expected_next, "rep insb: expected RDI {expected_next:#x}, saw {:#x}", next as usize);
    Ok(())
}

const TEST_DEVICE_IRQ_PORT: u16 = 0xF5;
const RFLAGS_IF: u64 = 1 << 9;

fn hlt() -> CaseResult {
    // SAFETY: only clears IF, which is how the guest always runs.
    unsafe { asm!("cli", options(nomem, nostack)) };
    traps::reset_test_irq_count();
    // SAFETY: asks the test device to raise VECTOR_TEST_IRQ, which has a handler.
    unsafe {
        asm!("out dx, al", in("dx") TEST_DEVICE_IRQ_PORT, in("al") VECTOR_TEST_IRQ, options(nomem, nostack, preserves_flags))
    };
    let early = traps::test_irq_count();

    // STI's one-instruction interrupt shadow makes the interrupt arrive at the HLT, not before it,
    // so HLT cannot sleep forever after a delivery it missed. No `nomem`: the handler writes memory.
    // SAFETY: interrupts are enabled only for the HLT; every vector has a handler.
    unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    let count = traps::test_irq_count();

    let rflags: u64;
    // SAFETY: reads RFLAGS through the stack (push then pop).
    unsafe { asm!("pushfq", "pop {}", out(reg) rflags, options(nomem, preserves_flags)) };
    ensure!(early == 0, "vector 0x40 delivered {early} time(s) while IF=0, expected none before sti");
    ensure!(count == 1, "expected vector 0x40 exactly once across sti; hlt, saw {count}");
    ensure!(rflags & RFLAGS_IF == 0, "expected IF clear after cli, RFLAGS={rflags:#x}");
    Ok(())
}

const MMIO_ID: usize = 0xD000_0000;
const MMIO_SCRATCH: usize = 0xD000_0008;

fn mmio() -> CaseResult {
    // Explicit instructions, because the access width is what the hypervisor has to decode.
    let id: u32;
    // SAFETY: the test device's ID register is identity-mapped and reading it has no side effects.
    unsafe { asm!("mov {:e}, dword ptr [{}]", out(reg) id, in(reg) MMIO_ID, options(nostack, preserves_flags)) };
    ensure!(id == 0x1234_5678, "expected 32-bit read of 0xd0000000 = 0x12345678, saw {id:#010x}");

    let value: u64 = 0x1122_3344_5566_7788;
    let seen: u64;
    // SAFETY: the scratch register is identity-mapped device memory that only this guest uses.
    unsafe {
        asm!("mov qword ptr [{addr}], {value}", addr = in(reg) MMIO_SCRATCH, value = in(reg) value, options(nostack, preserves_flags));
        asm!("mov {}, qword ptr [{}]", out(reg) seen, in(reg) MMIO_SCRATCH, options(nostack, preserves_flags));
    }
    ensure!(seen == value, "expected 64-bit read back of 0xd0000008 = {value:#018x}, saw {seen:#018x}");

    let seen: u8;
    // SAFETY: as above, byte accesses.
    unsafe {
        asm!("mov byte ptr [{}], {}", in(reg) MMIO_SCRATCH, in(reg_byte) 0x99u8, options(nostack, preserves_flags));
        asm!("mov {}, byte ptr [{}]", out(reg_byte) seen, in(reg) MMIO_SCRATCH, options(nostack, preserves_flags));
    }
    ensure!(seen == 0x99, "expected 8-bit read back of 0xd0000008 = 0x99, saw {seen:#04x}");

    let low: u32;
    // SAFETY: as for the 32-bit read of the ID register.
    unsafe { asm!("movzx {:e}, word ptr [{}]", out(reg) low, in(reg) MMIO_ID, options(nostack, preserves_flags)) };
    ensure!(low == 0x5678, "expected movzx of the 16-bit read of 0xd0000000 = 0x5678, saw {low:#x}");
    Ok(())
}

fn cr() -> CaseResult {
    let cr0 = cpu::read_cr0();
    ensure!(cr0 & cpu::CR0_PE != 0, "expected CR0.PE set, CR0={cr0:#x}");
    ensure!(cr0 & cpu::CR0_PG != 0, "expected CR0.PG set, CR0={cr0:#x}");
    let cr4 = cpu::read_cr4();
    ensure!(cr4 & cpu::CR4_PAE != 0, "expected CR4.PAE set, CR4={cr4:#x}");
    ensure!(cr4 & cpu::CR4_VMXE == 0, "expected CR4.VMXE clear as seen by the guest, CR4={cr4:#x}");

    // SAFETY: this target is soft-float, so no x87/SSE instruction can hit CR0.TS; restored below.
    unsafe { cpu::write_cr0(cr0 | cpu::CR0_TS) };
    let with_ts = cpu::read_cr0();
    // SAFETY: clears TS again, leaving the other bits as they were.
    unsafe { cpu::write_cr0(cr0 & !cpu::CR0_TS) };
    let without_ts = cpu::read_cr0();
    // SAFETY: back to the value the guest was started with.
    unsafe { cpu::write_cr0(cr0) };
    ensure!(with_ts == cr0 | cpu::CR0_TS, "expected CR0 {:#x} after setting TS, saw {with_ts:#x}", cr0 | cpu::CR0_TS);
    ensure!(
        without_ts == cr0 & !cpu::CR0_TS,
        "expected CR0 {:#x} after clearing TS, saw {without_ts:#x}",
        cr0 & !cpu::CR0_TS
    );

    // CR8 is the local APIC's TPR[7:4]: the same value through either, and never the host's.
    // SAFETY: only priorities change; the cases after this one take no interrupts.
    unsafe { cpu::write_cr8(9) };
    let cr8 = cpu::read_cr8();
    // SAFETY: the local APIC page is identity-mapped device memory; TPR reads have no side effects.
    let tpr = unsafe { core::ptr::read_volatile(0xfee0_0080 as *const u32) };
    ensure!(cr8 == 9 && tpr == 0x90, "after CR8 = 9: CR8 {cr8:#x}, APIC TPR {tpr:#x}, expected 9 and 0x90");
    // Left at 15 on purpose: were it the host's TPR, the host's own timer (class 15) would stop
    // and the VMs after this one would never end.
    // SAFETY: as above.
    unsafe { cpu::write_cr8(15) };

    if cpu::has_xsave() {
        enable_osxsave()?;
    }
    Ok(())
}

/// Sets CR4.OSXSAVE (the CPU must support XSAVE) and checks that it reads back.
fn enable_osxsave() -> CaseResult {
    let cr4 = cpu::read_cr4();
    // SAFETY: CPUID reports XSAVE, so OSXSAVE is a supported bit; the guest keeps no extended state.
    unsafe { cpu::write_cr4(cr4 | cpu::CR4_OSXSAVE) };
    let seen = cpu::read_cr4();
    ensure!(
        seen == cr4 | cpu::CR4_OSXSAVE,
        "expected CR4 {:#x} after setting OSXSAVE, saw {seen:#x}",
        cr4 | cpu::CR4_OSXSAVE
    );
    Ok(())
}

const XCR0_X87_SSE: u64 = 0b11;
/// SSE without x87: XCR0 bit 0 must always be set, so XSETBV raises #GP(0).
const XCR0_ILLEGAL: u64 = 0b10;

fn xsetbv() -> CaseResult {
    ensure!(cpu::has_xsave(), "CPU has no XSAVE");
    enable_osxsave()?;

    let original = cpu::xgetbv(0);
    // SAFETY: x87|SSE is always a legal XCR0 on a CPU with XSAVE.
    unsafe { cpu::xsetbv(0, XCR0_X87_SSE) };
    let seen = cpu::xgetbv(0);

    traps::expect(VECTOR_GP, 3);
    let rip = xsetbv_faulting(XCR0_ILLEGAL);
    let caught = traps::caught();
    let after = cpu::xgetbv(0);
    // SAFETY: puts back the value the guest started with, which was legal.
    unsafe { cpu::xsetbv(0, original) };

    ensure!(seen == XCR0_X87_SSE, "expected XGETBV(0) = 0x3 after XSETBV, saw {seen:#x}");
    check_caught("xsetbv xcr0=0x2", caught, rip, 0)?;
    ensure!(after == XCR0_X87_SSE, "expected XCR0 to stay 0x3 after the faulting XSETBV, saw {after:#x}");
    Ok(())
}

/// XSETBV of an illegal XCR0 (skipped by the handler); returns the instruction's address.
fn xsetbv_faulting(value: u64) -> u64 {
    let addr: u64;
    // SAFETY: the expected #GP is skipped by the trap handler (XSETBV is 3 bytes); XCR0 is unchanged.
    unsafe {
        asm!(
            "lea {addr}, [rip + 2f]",
            "2:",
            "xsetbv",
            addr = out(reg) addr,
            in("ecx") 0u32,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        )
    };
    addr
}

fn exceptions() -> CaseResult {
    // #BP is a trap: the saved RIP already points past INT3, so nothing is skipped.
    traps::expect(VECTOR_BP, 0);
    let after_int3: u64;
    // SAFETY: the #BP handler counts the trap and resumes after the INT3.
    unsafe { asm!("lea {}, [rip + 2f]", "int3", "2:", out(reg) after_int3, options(nostack, preserves_flags)) };
    check_caught("int3", traps::caught(), after_int3, 0)?;

    // #UD is a fault: the saved RIP points at UD2, which the handler skips (2 bytes).
    traps::expect(VECTOR_UD, 2);
    let ud2_at: u64;
    // SAFETY: the #UD handler counts the fault and resumes after the UD2.
    unsafe { asm!("lea {}, [rip + 2f]", "2:", "ud2", out(reg) ud2_at, options(nostack, preserves_flags)) };
    check_caught("ud2", traps::caught(), ud2_at, 0)?;

    // INVLPGA is an SVM instruction, and SVM is not offered: #UD (3 bytes), not the VM's end.
    traps::expect(VECTOR_UD, 3);
    let invlpga_at: u64;
    // SAFETY: the #UD handler skips it; RAX/ECX are only its operands.
    unsafe {
        asm!("lea {}, [rip + 2f]", "2:", "invlpga rax, ecx", out(reg) invlpga_at, in("rax") 0u64, in("ecx") 0u32,
             options(nostack, preserves_flags))
    };
    check_caught("invlpga", traps::caught(), invlpga_at, 0)?;

    // MONITOR and MWAIT are not offered by CPUID: #UD (3 bytes each), as on a CPU without them,
    // rather than running natively (MWAIT would idle the host CPU inside the guest).
    ensure!(cpu::cpuid(1, 0).ecx & (1 << 3) == 0, "CPUID offers MONITOR/MWAIT");
    traps::expect(VECTOR_UD, 3);
    let monitor_at: u64;
    // SAFETY: the #UD handler skips it; RAX/ECX/EDX are only its operands.
    unsafe {
        asm!("lea {}, [rip + 2f]", "2:", "monitor", out(reg) monitor_at, in("rax") 0u64, in("ecx") 0u32, in("edx") 0u32,
             options(nostack, preserves_flags))
    };
    check_caught("monitor", traps::caught(), monitor_at, 0)?;
    traps::expect(VECTOR_UD, 3);
    let mwait_at: u64;
    // SAFETY: as for MONITOR.
    unsafe {
        asm!("lea {}, [rip + 2f]", "2:", "mwait", out(reg) mwait_at, in("eax") 0u32, in("ecx") 0u32,
             options(nostack, preserves_flags))
    };
    check_caught("mwait", traps::caught(), mwait_at, 0)?;

    // No PMU is offered: RDPMC of counter 0 raises #GP(0) (2 bytes) and reads no host counter.
    traps::expect(VECTOR_GP, 2);
    let rdpmc_at: u64;
    // SAFETY: the #GP handler skips it; EDX:EAX are clobbered either way.
    unsafe {
        asm!("lea {}, [rip + 2f]", "2:", "rdpmc", out(reg) rdpmc_at, in("ecx") 0u32, out("eax") _, out("edx") _,
             options(nostack, preserves_flags))
    };
    check_caught("rdpmc", traps::caught(), rdpmc_at, 0)?;

    // INVD and WBINVD run (the guest's memory is coherent; nothing it holds is lost).
    // SAFETY: the guest keeps nothing in caches that memory does not have.
    unsafe { asm!("wbinvd", "invd", options(nostack, preserves_flags)) };
    Ok(())
}

/// Memory the hypervisor writes kvm-clock structures into (identity-mapped: its address is
/// its guest-physical address).
#[repr(C, align(64))]
struct ClockArea(UnsafeCell<[u8; 64]>);
// SAFETY: the test guest runs on one vCPU; only the hypervisor writes it besides.
unsafe impl Sync for ClockArea {}
static CLOCK_AREA: ClockArea = ClockArea(UnsafeCell::new([0; 64]));

const MSR_KVM_WALL_CLOCK: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME: u32 = 0x4b56_4d01;

/// The paravirtual interface Linux uses here: KVM's signature in the second hypervisor range,
/// kvm-clock (the TSC's rate agrees with the timing leaf, the wall clock with today), and
/// hypercalls, which fail with -KVM_ENOSYS instead of faulting.
fn paravirt() -> CaseResult {
    let kvm = cpu::cpuid(0x4000_0100, 0);
    let words = [kvm.ebx, kvm.ecx, kvm.edx];
    ensure!(words == [0x4b4d_564b, 0x564b_4d56, 0x4d], "expected KVM's signature at 0x40000100, saw {words:x?}");
    let features = cpu::cpuid(0x4000_0101, 0).eax;
    ensure!(features == (1 << 3) | (1 << 24), "expected kvm-clock (and its stable bit) only, saw {features:#x}");
    let tsc_khz = u64::from(cpu::cpuid(0x4000_0010, 0).eax);
    ensure!(tsc_khz > 0, "the timing leaf gives no TSC frequency");

    let area = CLOCK_AREA.0.get();
    let gpa = area as u64;
    // SAFETY: the hypervisor writes 32 bytes at `gpa` (the time) and 12 at `gpa + 32` (the
    // wall clock), both inside CLOCK_AREA.
    unsafe {
        cpu::wrmsr(MSR_KVM_SYSTEM_TIME, gpa | 1);
        cpu::wrmsr(MSR_KVM_WALL_CLOCK, gpa + 32);
    }
    ensure!(cpu::rdmsr(MSR_KVM_SYSTEM_TIME) == gpa | 1, "MSR_KVM_SYSTEM_TIME does not read back");
    // SAFETY: the area is only read after the writes above.
    let info = unsafe { core::ptr::read_volatile(area) };
    let word = |at: usize| u32::from_le_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]]);
    let (version, mul, shift, flags) = (word(0), u64::from(word(24)), info[28] as i8, info[29]);
    ensure!(version != 0 && version % 2 == 0, "kvm-clock version {version} (not a finished update)");
    // Linux's pvclock_tsc_khz.
    let khz = (1_000_000u64 << 32) / mul.max(1);
    let khz = if shift < 0 { khz << -shift } else { khz >> shift };
    ensure!(khz.abs_diff(tsc_khz) <= tsc_khz / 1000 + 1, "kvm-clock says {khz} kHz, the timing leaf {tsc_khz}");
    ensure!(flags & 1 != 0, "the TSC-stable flag is not set");
    let seconds = word(32 + 4);
    ensure!(seconds > 1_600_000_000, "the wall clock says {seconds} s since 1970");
    // A structure placed outside RAM is accepted (and not written); then switch it off.
    // SAFETY: the hypervisor writes nothing at an address without RAM.
    unsafe {
        cpu::wrmsr(MSR_KVM_SYSTEM_TIME, 0xffff_f001);
        cpu::wrmsr(MSR_KVM_SYSTEM_TIME, 0);
    }

    let amd = cpu::cpuid(0, 0).ebx == 0x6874_7541;
    let result: u64;
    // SAFETY: a hypercall with an unknown number changes nothing but RAX.
    unsafe {
        if amd {
            asm!("vmmcall", inout("rax") 9u64 => result, options(nostack, preserves_flags));
        } else {
            asm!("vmcall", inout("rax") 9u64 => result, options(nostack, preserves_flags));
        }
    }
    ensure!(result as i64 == -1000, "expected -KVM_ENOSYS from a hypercall, saw {:#x}", result);

    // VMX is not offered: VMCLEAR (4 bytes with this operand) is undefined, on either vendor.
    traps::expect(VECTOR_UD, 4);
    let vmclear_at: u64;
    // SAFETY: the #UD handler skips it; its operand is only read.
    unsafe {
        asm!("lea {}, [rip + 2f]", "2:", "vmclear qword ptr [rax]", out(reg) vmclear_at, in("rax") gpa,
             options(nostack, preserves_flags))
    };
    check_caught("vmclear", traps::caught(), vmclear_at, 0)
}

/// The IPI round trip micro-benchmark (`cases=smp,bench` on two or more vCPUs, for
/// scripts/bench.sh): TSC cycles from sending an IPI to another vCPU to its answer. The other
/// micro-benchmarks are the bench guest's (`bench-guest.elf`), which also runs on bare QEMU.
fn bench() -> CaseResult {
    let Some(cycles) = crate::smp::ipi_round_trip_cycles() else {
        return Err(fail!("needs the smp case first, on two or more vCPUs"));
    };
    println!("HV-BENCH ipi round trip to another vCPU (median of 16): {cycles} cycles");
    Ok(())
}

/// Not in `cases=all`: it needs the vCPU to run whenever its timers fire, so it runs in a VM
/// of its own (guest-images/timers.vms). Timer interrupts keep time: over one second of the TSC (whose rate the timing leaf gives),
/// the local-APIC timer in periodic mode and the PIT in mode 2, each at 1 kHz, interrupt
/// 1000 times: none bunched, and none lost while the machine runs (the log line gives the
/// counts).
fn timers() -> CaseResult {
    const HZ: u64 = 1000;
    let lapic_write = crate::smp::lapic_write;
    // The `cr` case leaves the task priority at 15, which holds back every vector.
    let tpr = crate::smp::lapic_read(0x80);
    lapic_write(0x80, 0);
    let outb = |port: u16, value: u8| {
        // SAFETY: PIT and PIC ports, which this case owns while it runs.
        unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
    };
    let tsc_hz = u64::from(cpu::cpuid(0x4000_0010, 0).eax) * 1000;
    let apic_khz = u64::from(cpu::cpuid(0x4000_0010, 0).ebx);
    ensure!(tsc_hz > 0 && apic_khz > 0, "the timing leaf gives no TSC or APIC timer rate");
    // Counts VECTOR_TEST_IRQ deliveries for a second, acknowledging each with `eoi`.
    let count_for_a_second = |eoi: &dyn Fn()| {
        traps::reset_test_irq_count();
        let (start, mut seen) = (cpu::rdtsc(), 0);
        while cpu::rdtsc() - start < tsc_hz {
            // SAFETY: interrupts are on only for the HLT; the vector has a handler.
            unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
            let count = traps::test_irq_count();
            if count != seen {
                seen = count;
                eoi();
            }
        }
        u64::from(traps::test_irq_count())
    };
    // Never more than the rate allows (2%: the second's edges): no ticks bunched. Fewer only
    // while the machine itself stands still: an emulator's thread descheduled by a loaded host
    // stops everything, and the timers' missed periods are coalesced, as on hardware that was
    // stopped (seen: 10% on a machine running four emulators on two cores). A timer at the
    // wrong rate is still caught below 60%.
    let within = |what: &str, count: u64| {
        ensure!(
            (HZ * 6 / 10..=HZ + HZ / 50).contains(&count),
            "{what}: {count} interrupts in a second of the TSC, expected {HZ} (-40%, +2%)"
        );
        Ok(())
    };

    lapic_write(0xf0, 0x1ff); // enabled
    lapic_write(0x3e0, 0xb); // divide by 1
    lapic_write(0x320, u32::from(VECTOR_TEST_IRQ) | (1 << 17)); // periodic
    lapic_write(0x380, (apic_khz * 1000 / HZ) as u32); // initial count: 1 ms
    let apic = count_for_a_second(&|| lapic_write(0xb0, 0));
    lapic_write(0x320, 1 << 16); // masked
    lapic_write(0xb0, 0);
    within("local-APIC timer", apic)?;

    // The PIC in virtual-wire mode: LINT0 takes ExtINT; IRQ0 is vector VECTOR_TEST_IRQ.
    lapic_write(0x350, 0x700);
    for (port, value) in [(0x20, 0x11), (0x21, VECTOR_TEST_IRQ), (0x21, 0x04), (0x21, 0x01), (0x21, 0xfe), (0xa1, 0xff)]
    {
        outb(port, value);
    }
    let divisor = (1_193_182 / HZ) as u16;
    outb(0x43, 0x34); // channel 0, low then high byte, mode 2
    outb(0x40, divisor as u8);
    outb(0x40, (divisor >> 8) as u8);
    let pit = count_for_a_second(&|| outb(0x20, 0x20));
    outb(0x21, 0xff); // all masked
    outb(0x43, 0x30); // channel 0 to mode 0: one count and then quiet
    outb(0x40, 0);
    outb(0x40, 0);
    lapic_write(0x350, 1 << 16);
    lapic_write(0x80, tpr);
    within("PIT", pit)?;
    println!("case timers: local-APIC timer {apic}/s, PIT {pit}/s");
    Ok(())
}

fn triple_fault() -> CaseResult {
    println!("case triple-fault: triple faulting now");
    traps::load_empty_idt();
    // SAFETY: with an IDT limit of 0, INT3 cannot be delivered: #GP, then #DF, then a triple fault,
    // on which the hypervisor ends the VM. Nothing after this should run.
    unsafe { asm!("int3", options(nostack)) };
    traps::reload_idt();
    Err(fail!("still running after int3 with a zero-limit IDT, expected the VM to be killed"))
}

/// Never ends: interrupts off, no exits. Only the host timer can take the CPU back, and only
/// the VM's `timeout` can end it.
fn spin() -> CaseResult {
    println!("case spin: spinning with interrupts off");
    // SAFETY: clears IF and loops forever; nothing after it runs.
    unsafe { asm!("cli", "2:", "add rax, 1", "jmp 2b", options(nomem, nostack, noreturn)) }
}

/// Halts with interrupts on and no device programmed: nothing can ever wake it.
fn halt_forever() -> CaseResult {
    println!("case halt-forever: halting with interrupts on");
    loop {
        // SAFETY: every vector has a handler; the loop keeps halting after any wake-up.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
    }
}

/// The test device's port for real NMIs on host CPUs: 0 this CPU, 1 every other one.
const HOST_NMI_PORT: u16 = 0xf6;
const HOST_NMI_ROUNDS: u32 = 50;

/// Asks for platform NMIs on the host while VMs run: the host takes them, and this guest (like
/// every other) neither sees one nor stops.
fn host_nmi() -> CaseResult {
    for _ in 0..HOST_NMI_ROUNDS {
        for target in [0u8, 1] {
            // SAFETY: the test device only forwards the request to the host.
            unsafe {
                asm!("out dx, al", in("dx") HOST_NMI_PORT, in("al") target, options(nomem, nostack, preserves_flags))
            };
        }
        compute(200_000);
    }
    let taken = crate::smp::nmis_taken();
    ensure!(taken == 0, "the guest took {taken} NMIs, expected none: the host's are not its own");
    println!("case host-nmi: {} host NMIs requested, none reached this guest", 2 * HOST_NMI_ROUNDS);
    Ok(())
}

/// Ports the sweep leaves alone because using them ends this VM by design (debug exit, the
/// i8042's reset command, ACPI power-off, the reset register) or is its own console.
const SWEEP_SKIPPED: [core::ops::RangeInclusive<u16>; 5] =
    [0x64..=0x64, 0xf4..=0xf7, 0x3f8..=0x3ff, 0x604..=0x605, 0xcf9..=0xcf9];

fn outb(port: u16, value: u8) {
    // SAFETY: port writes reach only this VM's devices (or nothing); interrupts stay off.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Hostile: every port 0..0xffff written with a random byte and read back, every 64th also
/// as a doubleword, with interrupts off. Whatever the devices make of it, the VM runs on.
fn port_sweep() -> CaseResult {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut swept, mut all_ones) = (0u32, 0u32);
    for port in 0..=u16::MAX {
        if SWEEP_SKIPPED.iter().any(|r| r.contains(&port)) {
            continue;
        }
        outb(port, random() as u8);
        all_ones += u32::from(serial::inb(port) == 0xff);
        if port % 64 == 0 && port <= u16::MAX - 3 {
            outl(port, random() as u32);
            let _ = inl(port);
        }
        swept += 1;
    }
    println!("case port-sweep: {swept} ports written and read, {all_ones} read 0xff");
    ensure!(all_ones > 60_000, "only {all_ones} ports read as unclaimed (0xff)");
    Ok(())
}

/// RAM of the VM that runs `phys-sweep` (its `memory = 16M`).
const SWEEP_RAM_END: u64 = 16 << 20;
/// Device pages the sweep leaves alone: the IOAPIC, the local APIC and the test device.
const SWEEP_DEVICE_PAGES: [u64; 3] = [0xfec0_0000, 0xfee0_0000, 0xd000_0000];
/// Linear address of the sweep's window: PDPT entry 4 (4 GiB), which the loader leaves empty.
const SWEEP_WINDOW: u64 = 4 << 30;
const PAGE_PRESENT_WRITABLE: u64 = 0b11;
const PAGE_2M: u64 = 1 << 7;

/// A page directory the sweep points PDPT entry 4 at; entry 0 maps the probed 2 MiB.
#[repr(C, align(4096))]
struct WindowDirectory(UnsafeCell<[u64; 512]>);
// SAFETY: one CPU runs the sweep; the CPU reads it only through the page walk.
unsafe impl Sync for WindowDirectory {}
static SWEEP_WINDOW_PD: WindowDirectory = WindowDirectory(UnsafeCell::new([0; 512]));

/// Reads and writes guest-physical addresses from the end of RAM to the top of the
/// physical-address space CPUID reports: every 2 MiB below 4 GiB (both ends of each), then two
/// points per power of two up to the last word. Where there is neither RAM nor a device the
/// bus is open: every read gives all ones, before and after a write, never another VM's or the
/// host's memory.
fn phys_sweep() -> CaseResult {
    let max_phys = cpu::cpuid(0x8000_0008, 0).eax & 0xff;
    ensure!((36..=52).contains(&max_phys), "CPUID reports {max_phys} physical-address bits");
    let pml4 = (cpu::read_cr3() & !0xfff) as *const u64;
    // SAFETY: the loader's tables are identity-mapped guest RAM: PML4 entry 0 holds the PDPT.
    let pdpt = (unsafe { pml4.read_volatile() } & 0x000f_ffff_ffff_f000) as *mut u64;
    let window_pd = SWEEP_WINDOW_PD.0.get() as u64;
    // SAFETY: PDPT entry 4 is unused (the loader maps 4 GiB); it now holds the window directory.
    unsafe { pdpt.add(4).write_volatile(window_pd | PAGE_PRESENT_WRITABLE) };
    // Identity-mapped below 4 GiB; above, through the window.
    let linear = |gpa: u64| -> u64 {
        if gpa < 4 << 30 {
            return gpa;
        }
        // SAFETY: only the window's first entry changes, and its TLB entry is flushed next.
        unsafe {
            (*SWEEP_WINDOW_PD.0.get())[0] = (gpa & !0x1f_ffff) | PAGE_2M | PAGE_PRESENT_WRITABLE;
            asm!("invlpg [{}]", in(reg) SWEEP_WINDOW, options(nostack, preserves_flags));
        }
        SWEEP_WINDOW + (gpa & 0x1f_ffff)
    };
    let probe = |gpa: u64| -> CaseResult {
        let at = linear(gpa) as *mut u64;
        // SAFETY: `at` maps `gpa`, which is outside RAM: the accesses exit to the hypervisor.
        let (first, after_write) = unsafe {
            let first = at.read_volatile();
            at.write_volatile(0x5a5a_5a5a_0000_0000 | gpa >> 12);
            (first, at.read_volatile())
        };
        ensure!(
            first == u64::MAX && after_write == u64::MAX,
            "guest-physical {gpa:#x} read {first:#x}, then {after_write:#x} after a write: expected all ones"
        );
        Ok(())
    };
    let mut probed = 0u32;
    let below_4g = (SWEEP_RAM_END..4 << 30).step_by(2 << 20).flat_map(|base| [base, base + 0x1f_fff8]);
    for gpa in below_4g.filter(|gpa| !SWEEP_DEVICE_PAGES.contains(&(gpa & !0xfff))) {
        probe(gpa)?;
        probed += 1;
    }
    for bit in 32..max_phys {
        for gpa in [1u64 << bit, (1u64 << bit) + (1u64 << (bit - 1)) + 0x1238] {
            probe(gpa)?;
            probed += 1;
        }
    }
    probe((1u64 << max_phys) - 8)?;
    // SAFETY: takes the window out again.
    unsafe {
        pdpt.add(4).write_volatile(0);
        asm!("invlpg [{}]", in(reg) SWEEP_WINDOW, options(nostack, preserves_flags));
    }
    println!("case phys-sweep: {} addresses from {SWEEP_RAM_END:#x} to 2^{max_phys} read all ones", probed + 1);
    Ok(())
}

/// String I/O beyond the plain 64-bit form: an address-size prefix (EDI and ECX, whatever RDI's
/// upper half holds), an FS override (its base from IA32_FS_BASE), and a buffer that runs into
/// an unmapped page (#PF there, after the iterations before it).
fn string_io() -> CaseResult {
    let mut buffer = [0xaau8; 8];
    let start = buffer.as_mut_ptr() as u64;
    ensure!(start >> 32 == 0, "the buffer must lie below 4 GiB");
    let (left, next): (u64, u64);
    // SAFETY: with 32-bit addresses the CPU stores 3 bytes at EDI = `buffer`, ignoring the
    // junk in RDI's upper half; `buffer` has 8.
    unsafe {
        asm!(".byte 0x67, 0xf3, 0x6c", inout("rcx") 0xdead_0000_0000_0003u64 => left,
             inout("rdi") 0x1234_5678_0000_0000 | start => next, in("dx") COM1_LSR, options(nostack, preserves_flags))
    };
    ensure!(buffer[..4] == [0x60, 0x60, 0x60, 0xaa], "addr32 rep insb stored {:02x?}", &buffer[..4]);
    ensure!((left, next) == (0, start + 3), "addr32 rep insb left RCX {left:#x}, RDI {next:#x}");

    // FS override: the text comes from FS base + RSI.
    let text = b"fs-outsb-ok\n";
    let fs_base = text.as_ptr() as u64 - 0x100;
    // SAFETY: FS is not used by this guest otherwise; restored to 0 below.
    unsafe { crate::cpu::wrmsr(0xc000_0100, fs_base) };
    // SAFETY: reads `text` through FS:RSI (0x100 past the base) and writes it to COM1.
    unsafe {
        asm!(".byte 0x64, 0xf3, 0x6e", inout("rcx") text.len() => _, inout("rsi") 0x100u64 => _,
             in("dx") COM1_THR, options(readonly, nostack, preserves_flags))
    };
    // SAFETY: as above.
    unsafe { crate::cpu::wrmsr(0xc000_0100, 0) };

    // Downwards from linear 1: two stores at 1 and 0, then linear 2^64-1, which this guest
    // does not map: #PF there, with RCX and RDI as the CPU leaves them at the fault.
    traps::expect(14, 2);
    let (left, next): (u64, u64);
    // SAFETY: stores 2 bytes at linear 0 and 1 (the real-mode vector table, unused by this
    // guest); the third store faults and the handler skips the instruction; DF is cleared again.
    unsafe {
        asm!("std", "rep insb", "cld", inout("rcx") 4u64 => left, inout("rdi") 1u64 => next, in("dx") COM1_LSR,
             options(nostack))
    };
    let caught = traps::caught();
    let cr2 = cpu::read_cr2();
    ensure!(caught.hits == 1, "rep insb into an unmapped page: {} page faults, expected 1", caught.hits);
    ensure!(
        caught.error_code & 0b11 == 0b10,
        "#PF error code {:#x}, expected a write to a page not present",
        caught.error_code
    );
    ensure!(
        (cr2, left, next) == (u64::MAX, 2, u64::MAX),
        "after the #PF: CR2 {cr2:#x}, RCX {left}, RDI {next:#x}; expected 2^64-1, 2, 2^64-1"
    );
    Ok(())
}

/// Writes CR0 (`cr` 0) or CR4 from RAX (3-byte encodings); returns whether it raised #GP.
fn write_cr_faulting(cr: u8, value: u64) -> bool {
    traps::expect(VECTOR_GP, 3);
    // SAFETY: each value is either refused with #GP (skipped by the handler) or one the case
    // restores right after; the bits it toggles do not change how this code runs.
    unsafe {
        if cr == 0 {
            asm!("mov cr0, rax", in("rax") value, options(nostack))
        } else {
            asm!("mov cr4, rax", in("rax") value, options(nostack))
        }
    }
    traps::caught().hits != 0
}

/// Hostile: CR0, CR4 and EFER written with reserved and illegal bit patterns, in 64-bit mode
/// with paging on. Each must raise #GP exactly where the CPU the guest is shown does, and the
/// legal ones (clearing CR0.NE, which VMX forces underneath) must be taken as written. The
/// hypervisor intercepts these writes and checks them itself: the emulators in CI take many
/// patterns real CPUs refuse (QEMU 7.2's TCG takes CR0[63:32] and any CR4 bit, Bochs takes
/// CR0.NW without CD). CR3 is the CPU's alone (its loads do not exit) and is left out.
fn cr_patterns() -> CaseResult {
    let mut wrong = Msg::new(format_args!(""));
    let mut failures = 0u32;
    let mut check = |ok: bool, what: fmt::Arguments| {
        if !ok {
            failures += 1;
            if failures <= 6 {
                let _ = fmt::Write::write_fmt(&mut wrong, format_args!("{what}; "));
            }
        }
    };
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_WP: u64 = 1 << 16;
    const CR0_NW: u64 = 1 << 29;
    let cr0 = cpu::read_cr0();
    for bit in 32..64 {
        check(write_cr_faulting(0, cr0 | 1 << bit), format_args!("CR0 bit {bit} (reserved) was taken"));
    }
    check(write_cr_faulting(0, cr0 | CR0_NW), format_args!("CR0.NW without CD was taken"));
    check(write_cr_faulting(0, cr0 & !cpu::CR0_PG), format_args!("CR0.PG cleared in 64-bit code was taken"));
    check(write_cr_faulting(0, cr0 & !cpu::CR0_PE), format_args!("CR0.PE cleared under paging was taken"));
    for (value, what) in [(cr0 & !CR0_NE, "NE cleared"), (cr0 ^ CR0_WP, "WP toggled")] {
        check(!write_cr_faulting(0, value), format_args!("CR0 with {what} raised #GP"));
        let seen = cpu::read_cr0();
        // SAFETY: back to the value the case started with.
        unsafe { cpu::write_cr0(cr0) };
        check(seen == value, format_args!("CR0 with {what}: wrote {value:#x}, read {seen:#x}"));
    }
    check(!write_cr_faulting(0, cr0 & !CR0_ET), format_args!("CR0 with ET cleared raised #GP"));
    check(cpu::read_cr0() == cr0 | CR0_ET, format_args!("CR0.ET must read as 1"));

    let cr4 = cpu::read_cr4();
    // Reserved, or features this guest's CPUID does not offer (VMX, SMX, key locker, PKS).
    for bit in (32..64).chain([13, 14, 15, 19, 24]) {
        check(write_cr_faulting(4, cr4 | 1 << bit), format_args!("CR4 bit {bit} was taken"));
    }
    let leaf7 = cpu::cpuid(7, 0);
    if leaf7.ecx & (1 << 3) == 0 {
        check(write_cr_faulting(4, cr4 | 1 << 22), format_args!("CR4.PKE without PKU was taken"));
    }
    check(write_cr_faulting(4, cr4 & !cpu::CR4_PAE), format_args!("CR4.PAE cleared in long mode was taken"));
    check(cpu::read_cr4() == cr4, format_args!("a refused CR4 write changed CR4"));

    let efer = cpu::rdmsr(0xc000_0080);
    let ext1 = cpu::cpuid(0x8000_0001, 0);
    let amd = cpu::cpuid(0, 0).ebx == 0x6874_7541;
    let mut offered: u64 = 1 << 0 | 1 << 8 | 1 << 10; // SCE, LME (already set), LMA (ignored)
    if ext1.edx & (1 << 20) != 0 {
        offered |= 1 << 11; // NXE
    }
    if amd && ext1.edx & (1 << 25) != 0 {
        offered |= 1 << 14; // FFXSR
    }
    for bit in 0..64 {
        let value = efer | 1 << bit;
        traps::expect(VECTOR_GP, 2);
        // SAFETY: a refused write is skipped; a taken one sets an offered bit that changes
        // nothing this code relies on and is undone at once.
        unsafe {
            asm!("wrmsr", in("ecx") 0xc000_0080u32, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack))
        };
        let refused = traps::caught().hits != 0;
        // SAFETY: back to the EFER the case started with.
        unsafe { cpu::wrmsr(0xc000_0080, efer) };
        let expected = offered & (1 << bit) == 0;
        check(
            refused == expected,
            format_args!(
                "EFER bit {bit}: {} (expected {})",
                if refused { "#GP" } else { "taken" },
                if expected { "#GP" } else { "taken" }
            ),
        );
    }
    traps::expect(VECTOR_GP, 2);
    // SAFETY: refused (LME cannot change under paging) and skipped.
    unsafe {
        asm!("wrmsr", in("ecx") 0xc000_0080u32, in("eax") (efer & !(1 << 8)) as u32, in("edx") 0u32, options(nostack))
    };
    check(traps::caught().hits == 1, format_args!("EFER.LME cleared under paging was taken"));
    ensure!(failures == 0, "{failures} writes not as the CPU shown would take them: {wrong}");
    println!("case cr-patterns: CR0, CR4 and EFER checked bit by bit");
    Ok(())
}

/// Instructions that exit, each with redundant prefixes in front (CS/DS overrides, an
/// operand-size prefix): the hypervisor must resume after the whole instruction (on SVM
/// without NRIP-save it decodes the length) and give the same results as without them.
fn prefixed_exits() -> CaseResult {
    let plain = cpu::cpuid(0, 0);
    let eax: u32;
    // SAFETY: CPUID with three segment-override prefixes; RBX (reserved by the compiler) is
    // saved around it by hand.
    unsafe {
        asm!(
            "mov {save}, rbx",
            ".byte 0x2e, 0x3e, 0x26, 0x0f, 0xa2",
            "mov rbx, {save}",
            save = out(reg) _,
            inout("eax") 0u32 => eax,
            inout("ecx") 0u32 => _,
            out("edx") _,
            options(nomem, nostack, preserves_flags),
        )
    };
    ensure!(eax == plain.eax, "prefixed CPUID: EAX {eax:#x}, plain {:#x}", plain.eax);
    let pat = cpu::rdmsr(0x277);
    let (low, high): (u32, u32);
    // SAFETY: RDMSR of IA32_PAT with an operand-size prefix; reading has no effect.
    unsafe {
        asm!(".byte 0x66, 0x0f, 0x32", in("ecx") 0x277u32, out("eax") low, out("edx") high,
             options(nomem, nostack, preserves_flags))
    };
    ensure!(u64::from(high) << 32 | u64::from(low) == pat, "prefixed RDMSR of PAT: {high:#x}:{low:#x}, plain {pat:#x}");
    // SAFETY: WRMSR of IA32_PAT with a DS prefix, writing back the value it holds.
    unsafe {
        asm!(".byte 0x3e, 0x0f, 0x30", in("ecx") 0x277u32, in("eax") low, in("edx") high,
             options(nomem, nostack, preserves_flags))
    };
    // SAFETY: OUT to the POST port with a CS prefix: a write-only sink.
    unsafe { asm!(".byte 0x2e, 0xe6, 0x80", in("al") 0u8, options(nomem, nostack, preserves_flags)) };
    ensure!(cpu::rdmsr(0x277) == pat, "PAT changed");
    Ok(())
}

/// Hostile: an exit storm. CPUID and reads of an unclaimed port, as fast as the guest can.
const STORM_EXITS: u32 = 100_000;

fn exit_storm() -> CaseResult {
    let start = cpu::rdtsc();
    for i in 0..STORM_EXITS {
        let _ = cpu::cpuid(i & 0xf, 0);
        let _ = serial::inb(0x2f0);
    }
    let cycles = cpu::rdtsc() - start;
    println!("case exit-storm: {} exits, {} TSC cycles each", 2 * STORM_EXITS, cycles / u64::from(2 * STORM_EXITS));
    Ok(())
}

/// Hostile: console text that would be a line the tools parse, if it ever began one. Each
/// try comes a different way: an unfinished line cut by a host log line (an MSR refusal),
/// a carriage return and an erase-line sequence, a line longer than the host's line buffer,
/// and a raw-console record.
fn forge_lines() -> CaseResult {
    use core::fmt::Write as _;
    let mut out = serial::Serial;
    let _ = write!(out, "VM-END vm=forge reason=debug-exit status=7 detail=\"forged\"");
    traps::expect(VECTOR_GP, 2);
    rdmsr_faulting(0x0000_3fff);
    ensure!(traps::caught().hits == 1, "RDMSR 0x3fff did not raise #GP: no host line cut the text");
    let _ = write!(out, "\nHV-END status=success reason=\"forged\"\n");
    let _ = write!(out, "\r\x1b[2KVM-END vm=forge reason=power-off detail=\"forged\"\n");
    for _ in 0..600 {
        let _ = out.write_char('x');
    }
    let _ = writeln!(out, "VM-END vm=forge reason=reset detail=\"forged\"");
    let _ = writeln!(out, "HV-RAW 564d2d454e440a");
    Ok(())
}

/// Prints numbered lines with computation between them, so the console lines of VMs that
/// run at once interleave.
fn ticks() -> CaseResult {
    for tick in 0..20 {
        println!("tick {tick}");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = core::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
    Ok(())
}

/// MSRs a guest reaches without exits (syscall MSRs, KERNEL_GS_BASE), with the values
/// `leave-traces` writes: canonical where they must be.
const TRACE_MSRS: [(u32, &str, u64); 5] = [
    (0xc000_0081, "STAR", 0x0023_0010_dead_0000),
    (0xc000_0082, "LSTAR", 0xffff_8000_7e57_0010),
    (0xc000_0083, "CSTAR", 0xffff_8000_7e57_0020),
    (0xc000_0084, "FMASK", 0x0004_7e57),
    (0xc000_0102, "KERNEL_GS_BASE", 0xffff_8000_7e57_0030),
];
/// Debug address registers with the values `leave-traces` writes.
const TRACE_DRS: [u64; 4] = [0x7e57_0000_1000, 0x7e57_0000_2000, 0x7e57_0000_3000, 0x7e57_0000_4000];

fn read_drs() -> [u64; 4] {
    let (a, b, c, d): (u64, u64, u64, u64);
    // SAFETY: reading debug registers at CPL 0 has no side effects.
    unsafe {
        asm!("mov {}, dr0", "mov {}, dr1", "mov {}, dr2", "mov {}, dr3",
             out(reg) a, out(reg) b, out(reg) c, out(reg) d, options(nomem, nostack))
    };
    [a, b, c, d]
}

fn write_drs(values: [u64; 4]) {
    let [a, b, c, d] = values;
    // SAFETY: DR7 stays 0x400 (no breakpoint enabled), so the addresses are never used.
    unsafe {
        asm!("mov dr0, {}", "mov dr1, {}", "mov dr2, {}", "mov dr3, {}",
             in(reg) a, in(reg) b, in(reg) c, in(reg) d, options(nomem, nostack))
    };
}

/// CR2 with the value `leave-traces` writes: a page-fault address no exit ever sees.
const TRACE_CR2: u64 = 0x7e57_0000_5000;

fn compute(rounds: u64) {
    let mut x = 0u64;
    for i in 0..rounds {
        x = core::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
}

/// Writes distinctive values into the registers the next case looks for, then computes for a
/// while, so a VM sharing the CPU runs between its time slices.
/// TSC_AUX with the value `leave-traces` writes (when RDTSCP exists): RDTSCP reads it directly.
const TRACE_TSC_AUX: u64 = 0x7e57;
const IA32_TSC_AUX: u32 = 0xc000_0103;
const IA32_SPEC_CTRL: u32 = 0x48;
const IA32_PRED_CMD: u32 = 0x49;

/// The SPEC_CTRL value `leave-traces` writes (IBRS, and STIBP where offered), if CPUID offers
/// SPEC_CTRL at all.
fn trace_spec_ctrl() -> Option<u64> {
    let edx = cpu::cpuid(7, 0).edx;
    (edx & (1 << 26) != 0).then_some(if edx & (1 << 27) != 0 { 0b11 } else { 0b01 })
}

fn leave_traces() -> CaseResult {
    for &(msr, _, value) in &TRACE_MSRS {
        // SAFETY: the guest makes no system calls and never uses SWAPGS: these values are inert.
        unsafe { crate::cpu::wrmsr(msr, value) };
    }
    let rdtscp = crate::cpu::has_rdtscp();
    if rdtscp {
        // SAFETY: TSC_AUX only changes what RDTSCP returns.
        unsafe { crate::cpu::wrmsr(IA32_TSC_AUX, TRACE_TSC_AUX) };
    }
    let spec_ctrl = trace_spec_ctrl();
    if let Some(value) = spec_ctrl {
        // SAFETY: SPEC_CTRL and PRED_CMD only restrict or flush branch prediction.
        unsafe {
            crate::cpu::wrmsr(IA32_SPEC_CTRL, value);
            crate::cpu::wrmsr(IA32_PRED_CMD, 1);
        }
    }
    write_drs(TRACE_DRS);
    // SAFETY: this guest takes no page faults.
    unsafe { cpu::write_cr2(TRACE_CR2) };
    for _ in 0..20 {
        compute(2_000_000);
    }
    for &(msr, name, value) in &TRACE_MSRS {
        ensure!(crate::cpu::rdmsr(msr) == value, "{name} lost the value this VM wrote");
    }
    if rdtscp {
        ensure!(u64::from(crate::cpu::rdtscp_aux()) == TRACE_TSC_AUX, "RDTSCP lost the TSC_AUX this VM wrote");
    }
    if let Some(value) = spec_ctrl {
        let seen = crate::cpu::rdmsr(IA32_SPEC_CTRL);
        ensure!(seen == value, "SPEC_CTRL is {seen:#x}, not the {value:#x} this VM wrote");
    }
    ensure!(read_drs() == TRACE_DRS, "DR0-DR3 lost the values this VM wrote: {:x?}", read_drs());
    ensure!(cpu::read_cr2() == TRACE_CR2, "CR2 is {:#x}, not the value this VM wrote", cpu::read_cr2());
    Ok(())
}

/// Runs beside `leave-traces` on the same CPU: never sees its values, and keeps its own.
fn find_no_traces() -> CaseResult {
    let own: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000];
    const OWN_TSC_AUX: u32 = 0x51;
    const OWN_CR2: u64 = 0x5000;
    write_drs(own);
    // SAFETY: as in `leave_traces`.
    unsafe { cpu::write_cr2(OWN_CR2) };
    // SAFETY: as in `leave_traces`.
    unsafe { crate::cpu::wrmsr(0xc000_0082, 0xffff_8000_0000_1000) };
    let rdtscp = crate::cpu::has_rdtscp();
    if rdtscp {
        // SAFETY: as in `leave_traces`.
        unsafe { crate::cpu::wrmsr(IA32_TSC_AUX, u64::from(OWN_TSC_AUX)) };
    }
    for round in 0..30 {
        for &(msr, name, value) in &TRACE_MSRS {
            ensure!(crate::cpu::rdmsr(msr) != value, "round {round}: {name} holds the value another VM wrote");
        }
        ensure!(read_drs() == own, "round {round}: DR0-DR3 are {:x?}, not this VM's own", read_drs());
        ensure!(cpu::read_cr2() == OWN_CR2, "round {round}: CR2 is {:#x}, not this VM's own", cpu::read_cr2());
        ensure!(crate::cpu::rdmsr(0xc000_0082) == 0xffff_8000_0000_1000, "round {round}: LSTAR lost this VM's value");
        if trace_spec_ctrl().is_some() {
            let seen = crate::cpu::rdmsr(IA32_SPEC_CTRL);
            ensure!(seen == 0, "round {round}: SPEC_CTRL is {seen:#x}, not this VM's own 0");
        }
        if rdtscp {
            let aux = crate::cpu::rdtscp_aux();
            ensure!(
                aux == OWN_TSC_AUX,
                "round {round}: RDTSCP returns TSC_AUX {aux:#x}, not this VM's {OWN_TSC_AUX:#x}"
            );
        }
        compute(1_000_000);
    }
    if rdtscp {
        println!("case find-no-traces: TSC_AUX checked through RDTSCP");
    }
    if trace_spec_ctrl().is_some() {
        println!("case find-no-traces: SPEC_CTRL checked");
    }
    Ok(())
}
