//! Thin wrappers around the privileged instructions the cases use.

use core::arch::asm;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_OSXSAVE: u64 = 1 << 18;

pub const CPUID1_ECX_VMX: u32 = 1 << 5;
pub const CPUID1_ECX_XSAVE: u32 = 1 << 26;
pub const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
pub const CPUID_EXT1_ECX_SVM: u32 = 1 << 2;

#[derive(Clone, Copy)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let (eax, ebx, ecx, edx): (u32, u64, u32, u32);
    // SAFETY: CPUID only writes the four result registers. LLVM reserves RBX, so its value is
    // swapped through a scratch register.
    unsafe {
        asm!(
            "mov {rbx_out}, rbx",
            "cpuid",
            "xchg {rbx_out}, rbx",
            rbx_out = out(reg) ebx,
            inout("eax") leaf => eax,
            inout("ecx") subleaf => ecx,
            out("edx") edx,
            options(nomem, nostack, preserves_flags),
        )
    };
    Cpuid { eax, ebx: ebx as u32, ecx, edx }
}

pub fn has_xsave() -> bool {
    cpuid(1, 0).ecx & CPUID1_ECX_XSAVE != 0
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called for MSRs the platform implements (unknown ones go through the trap
    // expectation in the cases instead); reading an MSR does not touch memory.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    u64::from(hi) << 32 | u64::from(lo)
}

/// # Safety
/// `value` must be valid for `msr` and must not break what the guest relies on (its own code and
/// data stay reachable and cacheable).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the write is harmless.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nostack, preserves_flags))
    };
}

pub fn read_cr0() -> u64 {
    let value;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// Paging and protection must stay enabled, and CR0.TS may only be set while no x87/SSE code runs
/// (this target is soft-float, so the guest never does).
pub unsafe fn write_cr0(value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) };
}

pub fn read_cr3() -> u64 {
    let value;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

pub fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: RDTSC has no side effects.
    unsafe { asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags)) };
    (u64::from(high) << 32) | u64::from(low)
}

/// RDTSCP is offered (then TSC_AUX exists and RDTSCP returns it in ECX).
pub fn has_rdtscp() -> bool {
    cpuid(0x8000_0000, 0).eax >= 0x8000_0001 && cpuid(0x8000_0001, 0).edx & (1 << 27) != 0
}

/// The TSC_AUX value RDTSCP returns (read without an exit).
pub fn rdtscp_aux() -> u32 {
    let aux: u32;
    // SAFETY: RDTSCP only writes EAX, EDX and ECX; callers check `has_rdtscp` first.
    unsafe { asm!("rdtscp", out("eax") _, out("edx") _, out("ecx") aux, options(nomem, nostack, preserves_flags)) };
    aux
}

/// CR8: the task priority class (TPR[7:4]).
pub fn read_cr8() -> u64 {
    let value;
    // SAFETY: reading CR8 has no side effects.
    unsafe { asm!("mov {}, cr8", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// Interrupts of priority class `value` and below stay blocked until it is lowered again.
pub unsafe fn write_cr8(value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr8, {}", in(reg) value, options(nostack, preserves_flags)) };
}

pub fn read_cr2() -> u64 {
    let value;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// The next page-fault handler that runs before a fault must not trust CR2.
pub unsafe fn write_cr2(value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

pub fn read_cr4() -> u64 {
    let value;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) };
    value
}

/// # Safety
/// PAE must stay set and only bits the CPU supports may be set.
pub unsafe fn write_cr4(value: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) };
}

/// Requires CR4.OSXSAVE.
pub fn xgetbv(xcr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: XGETBV only reads an extended control register (callers set CR4.OSXSAVE first).
    unsafe { asm!("xgetbv", in("ecx") xcr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    u64::from(hi) << 32 | u64::from(lo)
}

/// # Safety
/// CR4.OSXSAVE must be set and `value` must be a legal XCR0 (or a #GP must be expected).
pub unsafe fn xsetbv(xcr: u32, value: u64) {
    // SAFETY: guaranteed by the caller; the guest keeps no extended state that a change could lose.
    unsafe {
        asm!("xsetbv", in("ecx") xcr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags))
    };
}
