//! The Intel VMX backend: VMXON, one VMCS per vCPU with EPT (and VPID), and the world switch.
//!
//! - [`enable`] turns VMX on for the calling CPU (once).
//! - [`VmxVcpu`] implements [`crate::vcpu::Vcpu`] on a VMCS.
//! - [`ept_max_page`] tells the EPT builder which leaf sizes the CPU accepts.

pub mod fields;
pub mod instructions;
mod switch;
mod vcpu;

use core::sync::atomic::Ordering;

use raw_cpuid::cpuid;
use x86_64::registers::control::{Cr0, Cr4};
use x86_64::registers::model_specific::Msr;

pub use instructions::VmxError;
pub use vcpu::VmxVcpu;

use super::memory;
use crate::mm::second_level::PageSize;
use crate::virt::msr::{IA32_FEATURE_CONTROL, IA32_VMX_BASIC, IA32_VMX_EPT_VPID_CAP};
use crate::vm::control_regs::CR4_VMXE;

/// Capability MSRs not listed in `virt::msr` (Intel SDM Vol. 3, Appendix A).
pub(crate) mod cap_msr {
    pub const PINBASED_CTLS: u32 = 0x481;
    pub const PROCBASED_CTLS: u32 = 0x482;
    pub const EXIT_CTLS: u32 = 0x483;
    pub const ENTRY_CTLS: u32 = 0x484;
    pub const MISC: u32 = 0x485;
    pub const CR0_FIXED0: u32 = 0x486;
    pub const CR0_FIXED1: u32 = 0x487;
    pub const CR4_FIXED0: u32 = 0x488;
    pub const CR4_FIXED1: u32 = 0x489;
    pub const PROCBASED_CTLS2: u32 = 0x48b;
    pub const TRUE_PINBASED_CTLS: u32 = 0x48d;
    pub const TRUE_PROCBASED_CTLS: u32 = 0x48e;
    pub const TRUE_EXIT_CTLS: u32 = 0x48f;
    pub const TRUE_ENTRY_CTLS: u32 = 0x490;
}

/// Other MSRs the backend touches.
pub(crate) mod msr {
    pub const IA32_SPEC_CTRL: u32 = 0x48;
    pub const IA32_PRED_CMD: u32 = 0x49;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_TSC_AUX: u32 = 0xc000_0103;
}

const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const CPUID1_ECX_VMX: u32 = 1 << 5;
const EPT_CAP_2M: u64 = 1 << 16;
const EPT_CAP_1G: u64 = 1 << 17;

/// Reads an MSR the caller knows exists.
fn rdmsr(number: u32) -> u64 {
    // SAFETY: callers only name MSRs whose existence CPUID or the VMX capability MSRs
    // guarantee (the VMX ones once `has_vmx` holds); reading has no side effects.
    unsafe { Msr::new(number).read() }
}

fn has_vmx() -> bool {
    cpuid!(1).ecx & CPUID1_ECX_VMX != 0
}

/// The VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
fn revision_id() -> u32 {
    rdmsr(IA32_VMX_BASIC) as u32 & 0x7fff_ffff
}

/// Turns VMX operation on for this CPU: feature control, fixed CR0/CR4 bits, VMXON.
/// Later calls return `Ok` at once. (Extended-state instructions are `platform::xstate`'s.)
pub fn enable() -> Result<(), VmxError> {
    if enabled() {
        return Ok(());
    }
    if !has_vmx() {
        return Err(VmxError::Unsupported("CPUID does not report VMX"));
    }
    let control = rdmsr(IA32_FEATURE_CONTROL);
    if control & FEATURE_CONTROL_LOCK == 0 {
        // SAFETY: the MSR is unlocked, so writing it is allowed; enabling VMX outside SMX and
        // locking is what firmware would do.
        unsafe {
            Msr::new(IA32_FEATURE_CONTROL).write(control | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX)
        };
    } else if control & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::DisabledByFirmware);
    }

    let cr4_extra = CR4_VMXE;
    let cr0 = (Cr0::read_raw() | rdmsr(cap_msr::CR0_FIXED0)) & rdmsr(cap_msr::CR0_FIXED1);
    let cr4 = (Cr4::read_raw() | cr4_extra | rdmsr(cap_msr::CR4_FIXED0)) & rdmsr(cap_msr::CR4_FIXED1);
    if cr4 & CR4_VMXE == 0 {
        return Err(VmxError::Unsupported("IA32_VMX_CR4_FIXED1 does not allow CR4.VMXE"));
    }
    // SAFETY: the fixed bits only force NE/PE/PG (already set in the 64-bit host) and VMXE;
    // OSFXSR/OSXSAVE only enable instructions the CPU reports; no mapping changes.
    unsafe {
        Cr0::write_raw(cr0);
        Cr4::write_raw(cr4);
    }

    let region = memory::alloc_zeroed(1, 4096).ok_or(VmxError::OutOfMemory)?;
    // SAFETY: the page was just allocated for us and is mapped in the physical window.
    unsafe { core::ptr::write_volatile(memory::phys_map().virt(region) as *mut u32, revision_id()) };
    // SAFETY: CR0/CR4 obey the fixed bits with VMXE set, feature control allows VMX outside
    // SMX, and the region is a fresh page with the revision id, never freed.
    unsafe { instructions::vmxon(region) }?;
    super::percpu::current().vmx_on.store(true, Ordering::Release);
    log::info!("vmx: VMXON done (VMCS revision {:#x}, region at {region:#x})", revision_id());
    Ok(())
}

/// Whether [`enable`] succeeded on this CPU.
pub fn enabled() -> bool {
    super::percpu::current().vmx_on.load(Ordering::Acquire)
}

/// The largest EPT leaf the CPU supports (IA32_VMX_EPT_VPID_CAP bits 16/17).
pub fn ept_max_page() -> PageSize {
    match ept_vpid_cap() {
        Some(cap) if cap & EPT_CAP_1G != 0 => PageSize::Size1G,
        Some(cap) if cap & EPT_CAP_2M != 0 => PageSize::Size2M,
        _ => PageSize::Size4K,
    }
}

/// IA32_VMX_EPT_VPID_CAP, when the CPU has it (it exists only if EPT or VPID can be enabled).
fn ept_vpid_cap() -> Option<u64> {
    if !has_vmx() {
        return None;
    }
    let primary = rdmsr(cap_msr::PROCBASED_CTLS);
    if (primary >> 32) & (1 << 31) == 0 {
        return None;
    }
    let secondary = rdmsr(cap_msr::PROCBASED_CTLS2) >> 32;
    (secondary & ((1 << 1) | (1 << 5)) != 0).then(|| rdmsr(IA32_VMX_EPT_VPID_CAP))
}
