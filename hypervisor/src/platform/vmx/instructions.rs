//! The VMX instructions, each wrapped once, with RFLAGS.CF/ZF turned into errors
//! (Intel SDM Vol. 3, 31.2 "Conventions": CF = VMfailInvalid, ZF = VMfailValid).
//!
//! VMLAUNCH and VMRESUME live in the world switch (`switch.rs`), which reports their
//! failures the same way.

use core::arch::asm;
use core::fmt;

use super::fields::{w32, Field, Readable, Width};

/// Why a VMX operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// The CPU lacks something this backend needs (CPUID, capability MSRs).
    Unsupported(&'static str),
    /// IA32_FEATURE_CONTROL is locked with VMX outside SMX disabled.
    DisabledByFirmware,
    /// A VM-execution/exit/entry control this backend needs cannot be set.
    ControlNotAllowed(&'static str),
    /// No memory for a VMX region, bitmap or save area.
    OutOfMemory,
    /// The instruction failed with CF set: no current VMCS (or VMX not usable).
    FailInvalid(&'static str),
    /// The instruction failed with ZF set; `error` is the VM-instruction error field.
    FailValid {
        /// The failing instruction.
        instruction: &'static str,
        /// VM-instruction error number.
        error: u32,
    },
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            VmxError::Unsupported(what) => write!(f, "VMX unusable: {what}"),
            VmxError::DisabledByFirmware => {
                f.write_str("VMX disabled by firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX)")
            }
            VmxError::ControlNotAllowed(what) => write!(f, "VMX control not allowed by this CPU: {what}"),
            VmxError::OutOfMemory => f.write_str("out of memory for VMX structures"),
            VmxError::FailInvalid(instruction) => write!(f, "{instruction} failed (VMfailInvalid: no current VMCS)"),
            VmxError::FailValid { instruction, error } => {
                write!(f, "{instruction} failed: VM-instruction error {error} ({})", instruction_error_text(error))
            }
        }
    }
}

/// The meaning of a VM-instruction error number (Intel SDM Vol. 3, 31.4).
pub fn instruction_error_text(error: u32) -> &'static str {
    match error {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}

/// Turns the flags a VMX instruction left into a result.
fn check(instruction: &'static str, cf: u8, zf: u8) -> Result<(), VmxError> {
    if cf != 0 {
        Err(VmxError::FailInvalid(instruction))
    } else if zf != 0 {
        // VMfailValid means a current VMCS exists, so its error field can be read.
        Err(VmxError::FailValid { instruction, error: vm_instruction_error() })
    } else {
        Ok(())
    }
}

/// The VM-instruction error field of the current VMCS (0 if it cannot be read).
pub fn vm_instruction_error() -> u32 {
    // SAFETY: only called after a VMfailValid, which the SDM guarantees to happen only with a
    // current VMCS in VMX root operation.
    unsafe { vmread(w32::VM_INSTRUCTION_ERROR.encoding()) }.map_or(0, |v| v as u32)
}

/// VMXON: enters VMX root operation with the VMXON region at `region`.
///
/// # Safety
/// CR0/CR4 obey the VMX fixed bits with CR4.VMXE set, IA32_FEATURE_CONTROL allows VMX, and
/// `region` is a 4 KiB-aligned physical page owned by VMX from now on, holding the revision id.
pub unsafe fn vmxon(region: u64) -> Result<(), VmxError> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; the operand is a pointer to the 64-bit physical address.
    unsafe {
        asm!("vmxon [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &region, cf = out(reg_byte) cf,
             zf = out(reg_byte) zf, options(nostack));
    }
    check("VMXON", cf, zf)
}

/// VMCLEAR: flushes the VMCS at `vmcs` to memory and marks it clear (not current, not launched).
///
/// # Safety
/// VMX root operation; `vmcs` is a 4 KiB-aligned VMCS region owned by the caller.
pub unsafe fn vmclear(vmcs: u64) -> Result<(), VmxError> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("vmclear [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &vmcs, cf = out(reg_byte) cf,
             zf = out(reg_byte) zf, options(nostack));
    }
    check("VMCLEAR", cf, zf)
}

/// VMPTRLD: makes the VMCS at `vmcs` current.
///
/// # Safety
/// VMX root operation; `vmcs` is a 4 KiB-aligned VMCS region owned by the caller, initialised
/// with the revision id.
pub unsafe fn vmptrld(vmcs: u64) -> Result<(), VmxError> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("vmptrld [{p}]", "setc {cf}", "setz {zf}", p = in(reg) &vmcs, cf = out(reg_byte) cf,
             zf = out(reg_byte) zf, options(nostack));
    }
    check("VMPTRLD", cf, zf)
}

/// VMREAD of the field with `encoding` from the current VMCS.
///
/// # Safety
/// VMX root operation (VMREAD raises #UD outside it).
pub unsafe fn vmread(encoding: u32) -> Result<u64, VmxError> {
    let value: u64;
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; VMREAD only reads the current VMCS.
    unsafe {
        asm!("vmread {v}, {e}", "setc {cf}", "setz {zf}", v = out(reg) value, e = in(reg) u64::from(encoding),
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack, nomem));
    }
    check("VMREAD", cf, zf).map(|()| value)
}

/// VMWRITE of `value` to the field with `encoding` in the current VMCS.
///
/// # Safety
/// VMX root operation, and the value must not break memory safety once the guest runs or the
/// host returns (host state, bitmap and EPT addresses must be right): the caller vouches for it.
pub unsafe fn vmwrite(encoding: u32, value: u64) -> Result<(), VmxError> {
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller.
    unsafe {
        asm!("vmwrite {e}, {v}", "setc {cf}", "setz {zf}", e = in(reg) u64::from(encoding), v = in(reg) value,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check("VMWRITE", cf, zf)
}

/// Typed VMREAD.
///
/// # Safety
/// As [`vmread`].
pub unsafe fn read<W: Width>(field: impl Readable<W>) -> Result<W::Value, VmxError> {
    // SAFETY: forwarded to the caller.
    unsafe { vmread(field.encoding()) }.map(W::from_raw)
}

/// Typed VMWRITE.
///
/// # Safety
/// As [`vmwrite`].
pub unsafe fn write<W: Width>(field: Field<W>, value: W::Value) -> Result<(), VmxError> {
    // SAFETY: forwarded to the caller.
    unsafe { vmwrite(field.encoding(), W::to_raw(value)) }
}

/// INVEPT type: invalidate mappings of one EPTP.
pub const INVEPT_SINGLE_CONTEXT: u64 = 1;
/// INVEPT type: invalidate mappings of all EPTPs.
pub const INVEPT_ALL_CONTEXTS: u64 = 2;
/// INVVPID type: invalidate one VPID's mappings.
pub const INVVPID_SINGLE_CONTEXT: u64 = 1;
/// INVVPID type: invalidate all VPIDs' mappings.
pub const INVVPID_ALL_CONTEXTS: u64 = 2;

/// INVEPT: drops cached guest-physical (and combined) mappings derived from `eptp`.
///
/// # Safety
/// VMX root operation; the CPU supports INVEPT with this `kind`.
pub unsafe fn invept(kind: u64, eptp: u64) -> Result<(), VmxError> {
    let descriptor: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; the descriptor is a valid 128-bit memory operand.
    unsafe {
        asm!("invept {k}, [{d}]", "setc {cf}", "setz {zf}", k = in(reg) kind, d = in(reg) &descriptor,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check("INVEPT", cf, zf)
}

/// INVVPID: drops cached linear mappings tagged with `vpid`.
///
/// # Safety
/// VMX root operation; the CPU supports INVVPID with this `kind`; `vpid` is not 0.
pub unsafe fn invvpid(kind: u64, vpid: u16) -> Result<(), VmxError> {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let (cf, zf): (u8, u8);
    // SAFETY: forwarded to the caller; the descriptor is a valid 128-bit memory operand.
    unsafe {
        asm!("invvpid {k}, [{d}]", "setc {cf}", "setz {zf}", k = in(reg) kind, d = in(reg) &descriptor,
             cf = out(reg_byte) cf, zf = out(reg_byte) zf, options(nostack));
    }
    check("INVVPID", cf, zf)
}
