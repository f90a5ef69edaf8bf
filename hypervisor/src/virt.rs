//! What hardware virtualization the CPU offers, decoded from CPUID values and capability MSRs.
//!
//! The bare-metal layer reads the raw values; this module turns them into capabilities and a
//! verdict (usable, or why not), so the decoding is unit-tested on the host.

use core::fmt;

/// MSR numbers read by the bare-metal layer (Intel SDM Vol. 4; AMD APM Vol. 2 15.30).
pub mod msr {
    /// IA32_FEATURE_CONTROL: lock bit and "VMX outside SMX" enable.
    pub const IA32_FEATURE_CONTROL: u32 = 0x3a;
    /// IA32_VMX_BASIC: VMCS revision and the "true controls" flag (bit 55).
    pub const IA32_VMX_BASIC: u32 = 0x480;
    /// IA32_VMX_PROCBASED_CTLS: primary processor-based controls.
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    /// IA32_VMX_PROCBASED_CTLS2: secondary processor-based controls.
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
    /// IA32_VMX_EPT_VPID_CAP: EPT and VPID capabilities.
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48c;
    /// IA32_VMX_TRUE_PROCBASED_CTLS: primary controls without the legacy default-1 bits.
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
    /// VM_CR: SVMDIS (bit 4) and its lock (bit 3).
    pub const VM_CR: u32 = 0xc001_0114;
}

const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
const BASIC_TRUE_CONTROLS: u64 = 1 << 55;
const PRIMARY_ACTIVATE_SECONDARY: u32 = 1 << 31;
const SECONDARY_EPT: u32 = 1 << 1;
const SECONDARY_VPID: u32 = 1 << 5;
const SECONDARY_UNRESTRICTED_GUEST: u32 = 1 << 7;
const EPT_CAP_4_LEVEL: u64 = 1 << 6;
const EPT_CAP_WRITE_BACK: u64 = 1 << 14;
const EPT_CAP_2M: u64 = 1 << 16;
const EPT_CAP_1G: u64 = 1 << 17;
const EPT_CAP_INVEPT: u64 = 1 << 20;
const EPT_CAP_INVVPID: u64 = 1 << 32;
const VM_CR_LOCK: u64 = 1 << 3;
const VM_CR_SVMDIS: u64 = 1 << 4;
const SVM_FEATURE_NPT: u32 = 1 << 0;
const SVM_FEATURE_NRIP_SAVE: u32 = 1 << 3;

/// Raw VMX capability MSRs. `secondary` and `ept_vpid_cap` are `None` when the CPU does not
/// allow the MSR to be read (the architecture makes them conditional).
#[derive(Clone, Copy, Debug, Default)]
pub struct VmxMsrs {
    /// IA32_FEATURE_CONTROL.
    pub feature_control: u64,
    /// IA32_VMX_BASIC.
    pub basic: u64,
    /// IA32_VMX_TRUE_PROCBASED_CTLS if `basic` says it exists, else IA32_VMX_PROCBASED_CTLS.
    pub primary: u64,
    /// IA32_VMX_PROCBASED_CTLS2.
    pub secondary: Option<u64>,
    /// IA32_VMX_EPT_VPID_CAP.
    pub ept_vpid_cap: Option<u64>,
}

impl VmxMsrs {
    /// Whether IA32_VMX_BASIC announces the "true" control MSRs.
    pub fn has_true_controls(basic: u64) -> bool {
        basic & BASIC_TRUE_CONTROLS != 0
    }

    /// Whether the secondary controls MSR may be read, given the primary controls MSR.
    pub fn has_secondary_controls(primary: u64) -> bool {
        allowed1(primary) & PRIMARY_ACTIVATE_SECONDARY != 0
    }

    /// Whether IA32_VMX_EPT_VPID_CAP may be read, given the secondary controls MSR.
    pub fn has_ept_vpid_cap(secondary: u64) -> bool {
        allowed1(secondary) & (SECONDARY_EPT | SECONDARY_VPID) != 0
    }
}

/// Bits a VMX control may be set to 1 live in the high half of its capability MSR.
fn allowed1(capability: u64) -> u32 {
    (capability >> 32) as u32
}

/// Decoded VMX capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCaps {
    /// Firmware locked IA32_FEATURE_CONTROL without enabling VMX outside SMX.
    pub disabled_by_firmware: bool,
    /// IA32_FEATURE_CONTROL is still unlocked: the hypervisor must enable and lock it.
    pub feature_control_unlocked: bool,
    /// The "true" control MSRs exist.
    pub true_controls: bool,
    /// Extended page tables.
    pub ept: bool,
    /// EPT with a 4-level walk.
    pub ept_4_level: bool,
    /// EPT paging structures may be write-back.
    pub ept_write_back: bool,
    /// EPT 2 MiB pages.
    pub ept_2m: bool,
    /// EPT 1 GiB pages.
    pub ept_1g: bool,
    /// INVEPT instruction.
    pub invept: bool,
    /// Virtual-processor identifiers.
    pub vpid: bool,
    /// INVVPID instruction.
    pub invvpid: bool,
    /// Guests may run in real mode and unpaged protected mode.
    pub unrestricted_guest: bool,
}

impl VmxCaps {
    /// Decodes the raw MSR values.
    pub fn decode(m: &VmxMsrs) -> Self {
        let secondary = m.secondary.map_or(0, allowed1);
        let ept_cap = m.ept_vpid_cap.unwrap_or(0);
        let ept = secondary & SECONDARY_EPT != 0;
        let vpid = secondary & SECONDARY_VPID != 0;
        VmxCaps {
            disabled_by_firmware: m.feature_control & FEATURE_CONTROL_LOCKED != 0
                && m.feature_control & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0,
            feature_control_unlocked: m.feature_control & FEATURE_CONTROL_LOCKED == 0,
            true_controls: VmxMsrs::has_true_controls(m.basic),
            ept,
            ept_4_level: ept && ept_cap & EPT_CAP_4_LEVEL != 0,
            ept_write_back: ept && ept_cap & EPT_CAP_WRITE_BACK != 0,
            ept_2m: ept && ept_cap & EPT_CAP_2M != 0,
            ept_1g: ept && ept_cap & EPT_CAP_1G != 0,
            invept: ept && ept_cap & EPT_CAP_INVEPT != 0,
            vpid,
            invvpid: vpid && ept_cap & EPT_CAP_INVVPID != 0,
            unrestricted_guest: secondary & SECONDARY_UNRESTRICTED_GUEST != 0,
        }
    }

    /// The hypervisor needs EPT (4-level, write-back) and unrestricted guest; VPID is optional.
    pub fn verdict(&self) -> Result<(), Unusable> {
        if self.disabled_by_firmware {
            return Err(Unusable::VmxDisabledByFirmware);
        }
        if !self.ept {
            return Err(Unusable::VmxLacks("EPT"));
        }
        if !self.ept_4_level || !self.ept_write_back {
            return Err(Unusable::VmxLacks("EPT with a 4-level walk and write-back memory type"));
        }
        if !self.unrestricted_guest {
            return Err(Unusable::VmxLacks("unrestricted guest"));
        }
        Ok(())
    }
}

impl fmt::Display for VmxCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VMX: EPT {} (4-level {}, write-back {}, 2M {}, 1G {}, INVEPT {}), VPID {}, unrestricted guest {}, \
             true controls {}",
            yes(self.ept),
            yes(self.ept_4_level),
            yes(self.ept_write_back),
            yes(self.ept_2m),
            yes(self.ept_1g),
            yes(self.invept),
            yes(self.vpid),
            yes(self.unrestricted_guest),
            yes(self.true_controls),
        )?;
        if self.disabled_by_firmware {
            f.write_str(", disabled by firmware")?;
        }
        Ok(())
    }
}

/// Raw SVM values: CPUID 0x8000000A and the VM_CR MSR.
#[derive(Clone, Copy, Debug, Default)]
pub struct SvmRaw {
    /// CPUID 0x8000000A EAX (SVM revision).
    pub eax: u32,
    /// CPUID 0x8000000A EBX (number of ASIDs).
    pub ebx: u32,
    /// CPUID 0x8000000A EDX (feature flags).
    pub edx: u32,
    /// VM_CR MSR.
    pub vm_cr: u64,
}

/// Decoded SVM capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvmCaps {
    /// SVM revision number.
    pub revision: u8,
    /// Number of address space identifiers, including ASID 0 used by the host.
    pub asids: u32,
    /// Nested page tables.
    pub npt: bool,
    /// The CPU saves the next RIP on intercepts.
    pub nrip_save: bool,
    /// Firmware set and locked VM_CR.SVMDIS.
    pub disabled_by_firmware: bool,
}

impl SvmCaps {
    /// Decodes the raw values.
    pub fn decode(raw: &SvmRaw) -> Self {
        SvmCaps {
            revision: raw.eax as u8,
            asids: raw.ebx,
            npt: raw.edx & SVM_FEATURE_NPT != 0,
            nrip_save: raw.edx & SVM_FEATURE_NRIP_SAVE != 0,
            disabled_by_firmware: raw.vm_cr & VM_CR_SVMDIS != 0 && raw.vm_cr & VM_CR_LOCK != 0,
        }
    }

    /// The hypervisor needs NPT and at least one guest ASID; NRIP-save is optional.
    pub fn verdict(&self) -> Result<(), Unusable> {
        if self.disabled_by_firmware {
            return Err(Unusable::SvmDisabledByFirmware);
        }
        if !self.npt {
            return Err(Unusable::SvmLacks("nested paging (NPT)"));
        }
        if self.asids < 2 {
            return Err(Unusable::SvmLacks("a guest ASID"));
        }
        Ok(())
    }
}

impl fmt::Display for SvmCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SVM rev {}: NPT {}, ASIDs {}, NRIP-save {}",
            self.revision,
            yes(self.npt),
            self.asids,
            yes(self.nrip_save)
        )?;
        if self.disabled_by_firmware {
            f.write_str(", disabled by firmware")?;
        }
        Ok(())
    }
}

/// The virtualization extension found, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Virtualization {
    /// Intel VMX.
    Vmx(VmxCaps),
    /// AMD SVM.
    Svm(SvmCaps),
    /// CPUID shows neither.
    None,
}

impl Virtualization {
    /// Whether the hypervisor can run guests with it, and if not, why.
    pub fn verdict(&self) -> Result<(), Unusable> {
        match self {
            Virtualization::Vmx(caps) => caps.verdict(),
            Virtualization::Svm(caps) => caps.verdict(),
            Virtualization::None => Err(Unusable::NoExtension),
        }
    }
}

impl fmt::Display for Virtualization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Virtualization::Vmx(caps) => caps.fmt(f),
            Virtualization::Svm(caps) => caps.fmt(f),
            Virtualization::None => f.write_str("no VMX or SVM"),
        }
    }
}

/// Why the CPU's virtualization cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unusable {
    /// CPUID reports neither VMX nor SVM.
    NoExtension,
    /// IA32_FEATURE_CONTROL is locked with VMX off.
    VmxDisabledByFirmware,
    /// VMX lacks a feature the hypervisor needs.
    VmxLacks(&'static str),
    /// VM_CR.SVMDIS is set and locked.
    SvmDisabledByFirmware,
    /// SVM lacks a feature the hypervisor needs.
    SvmLacks(&'static str),
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::NoExtension => f.write_str(
                "the CPU offers neither VMX nor SVM (under QEMU use -cpu host with nested KVM, \
                 or -cpu qemu64,+svm,+npt with TCG)",
            ),
            Unusable::VmxDisabledByFirmware => f.write_str(
                "VMX is disabled by firmware (IA32_FEATURE_CONTROL locked without VMX outside SMX): \
                 enable Intel VT-x in the firmware setup",
            ),
            Unusable::VmxLacks(what) => write!(f, "VMX is present but lacks {what}, which this hypervisor needs"),
            Unusable::SvmDisabledByFirmware => {
                f.write_str("SVM is disabled by firmware (VM_CR.SVMDIS locked): enable AMD-V/SVM in the firmware setup")
            }
            Unusable::SvmLacks(what) => write!(f, "SVM is present but lacks {what}, which this hypervisor needs"),
        }
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    /// Values read from Bochs's `corei7_skylake_x` model, reduced to the bits that matter here.
    fn skylake_like() -> VmxMsrs {
        VmxMsrs {
            feature_control: 0x5,
            basic: 1 << 55,
            primary: (PRIMARY_ACTIVATE_SECONDARY as u64) << 32,
            secondary: Some(((SECONDARY_EPT | SECONDARY_VPID | SECONDARY_UNRESTRICTED_GUEST) as u64) << 32),
            ept_vpid_cap: Some(EPT_CAP_4_LEVEL | EPT_CAP_WRITE_BACK | EPT_CAP_2M | EPT_CAP_1G | EPT_CAP_INVEPT),
        }
    }

    #[test]
    fn vmx_with_ept_vpid_and_unrestricted_guest_is_usable() {
        let caps = VmxCaps::decode(&skylake_like());
        assert!(caps.ept && caps.vpid && caps.unrestricted_guest && caps.ept_1g && !caps.invvpid);
        assert!(!caps.feature_control_unlocked);
        assert_eq!(caps.verdict(), Ok(()));
        assert_eq!(
            caps.to_string(),
            "VMX: EPT yes (4-level yes, write-back yes, 2M yes, 1G yes, INVEPT yes), VPID yes, \
             unrestricted guest yes, true controls yes"
        );
    }

    #[test]
    fn allowed0_bits_do_not_count_as_capabilities() {
        let mut m = skylake_like();
        m.secondary = Some((SECONDARY_EPT | SECONDARY_UNRESTRICTED_GUEST) as u64);
        let caps = VmxCaps::decode(&m);
        assert!(!caps.ept && !caps.unrestricted_guest);
        assert_eq!(caps.verdict(), Err(Unusable::VmxLacks("EPT")));
    }

    #[test]
    fn vmx_locked_off_by_firmware_is_reported() {
        let mut m = skylake_like();
        m.feature_control = FEATURE_CONTROL_LOCKED;
        assert_eq!(VmxCaps::decode(&m).verdict(), Err(Unusable::VmxDisabledByFirmware));
        m.feature_control = 0;
        let caps = VmxCaps::decode(&m);
        assert!(caps.feature_control_unlocked);
        assert_eq!(caps.verdict(), Ok(()));
    }

    #[test]
    fn vmx_without_unrestricted_guest_or_wb_is_refused() {
        let mut m = skylake_like();
        m.secondary = Some(((SECONDARY_EPT | SECONDARY_VPID) as u64) << 32);
        assert_eq!(VmxCaps::decode(&m).verdict(), Err(Unusable::VmxLacks("unrestricted guest")));
        let mut m = skylake_like();
        m.ept_vpid_cap = Some(EPT_CAP_4_LEVEL);
        assert!(matches!(VmxCaps::decode(&m).verdict(), Err(Unusable::VmxLacks(_))));
    }

    #[test]
    fn conditional_msrs_are_gated() {
        assert!(VmxMsrs::has_secondary_controls((PRIMARY_ACTIVATE_SECONDARY as u64) << 32));
        assert!(!VmxMsrs::has_secondary_controls(PRIMARY_ACTIVATE_SECONDARY as u64));
        assert!(VmxMsrs::has_ept_vpid_cap((SECONDARY_VPID as u64) << 32));
        assert!(!VmxMsrs::has_ept_vpid_cap((SECONDARY_UNRESTRICTED_GUEST as u64) << 32));
    }

    #[test]
    fn svm_decodes_qemu_tcg_values() {
        // QEMU TCG with -cpu qemu64,+svm,+npt: revision 1, 16 ASIDs, NPT only.
        let caps = SvmCaps::decode(&SvmRaw { eax: 1, ebx: 16, edx: SVM_FEATURE_NPT, vm_cr: 0 });
        assert_eq!(caps.verdict(), Ok(()));
        assert_eq!(caps.to_string(), "SVM rev 1: NPT yes, ASIDs 16, NRIP-save no");
    }

    #[test]
    fn svm_without_npt_or_disabled_is_refused() {
        let no_npt = SvmCaps::decode(&SvmRaw { eax: 1, ebx: 16, edx: SVM_FEATURE_NRIP_SAVE, vm_cr: 0 });
        assert!(no_npt.nrip_save);
        assert_eq!(no_npt.verdict(), Err(Unusable::SvmLacks("nested paging (NPT)")));
        let locked = SvmRaw { eax: 1, ebx: 16, edx: SVM_FEATURE_NPT, vm_cr: VM_CR_LOCK | VM_CR_SVMDIS };
        assert_eq!(SvmCaps::decode(&locked).verdict(), Err(Unusable::SvmDisabledByFirmware));
        // SVMDIS without the lock can still be cleared by the hypervisor.
        let unlocked = SvmRaw { vm_cr: VM_CR_SVMDIS, ..locked };
        assert_eq!(SvmCaps::decode(&unlocked).verdict(), Ok(()));
        assert_eq!(Virtualization::None.verdict(), Err(Unusable::NoExtension));
    }
}
