//! The MSRs a guest may touch when they are not passed through: an allow-list with modelled
//! values. Anything else gets #GP(0), logged once per MSR.

use alloc::collections::BTreeMap;
use alloc::collections::BTreeSet;

const IA32_TSC: u32 = 0x10;
const IA32_FEATURE_CONTROL: u32 = 0x3a;
/// Locked with VMX (and SGX, LMCE) off: what firmware leaves when it disables them.
const FEATURE_CONTROL_LOCKED: u64 = 1;
const IA32_APIC_BASE: u32 = 0x1b;
const IA32_BIOS_SIGN_ID: u32 = 0x8b;
const IA32_MTRRCAP: u32 = 0xfe;
const IA32_MISC_ENABLE: u32 = 0x1a0;
const IA32_PAT: u32 = 0x277;
const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The xAPIC at its reset base, bootstrap processor, (not yet enabled: no APIC is emulated).
const APIC_BASE_RESET: u64 = 0xfee0_0000 | (1 << 8);
/// Fast-strings enable, as firmware leaves it.
const MISC_ENABLE_RESET: u64 = 1;
const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// Per-vCPU MSR state for allow-listed MSRs.
#[derive(Default)]
pub struct MsrModel {
    values: BTreeMap<u32, u64>,
    refused: BTreeSet<u32>,
}

/// The result of an access the model refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// First refusal of this MSR (log it).
    pub first: bool,
}

fn is_storage_msr(msr: u32) -> bool {
    matches!(msr,
        IA32_BIOS_SIGN_ID | IA32_MISC_ENABLE | IA32_PAT | IA32_MTRR_DEF_TYPE
        | 0x3b                       // TSC_ADJUST (hidden in CPUID, harmless if probed)
        | 0x179 | 0x17a              // MCG_CAP (no banks), MCG_STATUS: machine check is hidden
        | 0xc001_0010                // AMD SYSCFG (no memory encryption)
        | 0xc001_0015                // AMD HWCR
        | 0xc001_0055                // AMD interrupt-pending message (no C1E)
        | 0xc001_1029                // AMD DE_CFG (LFENCE serialization bit)
        | 0x174..=0x176              // SYSENTER_CS/ESP/EIP
        | 0x200..=0x20f              // variable-range MTRRs
        | 0x250 | 0x258 | 0x259 | 0x268..=0x26f // fixed-range MTRRs
        | 0xc000_0081..=0xc000_0084  // STAR, LSTAR, CSTAR, SFMASK
        | 0xc000_0100..=0xc000_0103 // FS/GS/KERNEL_GS base, TSC_AUX
    )
}

impl MsrModel {
    /// RDMSR; `tsc` is the guest's current TSC.
    pub fn read(&mut self, msr: u32, tsc: u64) -> Result<u64, Refused> {
        match msr {
            IA32_TSC => Ok(tsc),
            IA32_FEATURE_CONTROL => Ok(FEATURE_CONTROL_LOCKED),
            // Reports no variable or fixed MTRRs: the guest has nothing to program.
            IA32_MTRRCAP => Ok(0),
            IA32_APIC_BASE => Ok(*self.values.get(&msr).unwrap_or(&APIC_BASE_RESET)),
            _ if is_storage_msr(msr) => Ok(*self.values.get(&msr).unwrap_or(&reset_value(msr))),
            _ => Err(self.refuse(msr)),
        }
    }

    /// WRMSR.
    pub fn write(&mut self, msr: u32, value: u64) -> Result<(), Refused> {
        let valid = match msr {
            IA32_PAT => (0..8).all(|i| matches!((value >> (i * 8)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7)),
            // Moving or enabling the APIC needs an emulated APIC: keep the reset value only.
            IA32_APIC_BASE => value == APIC_BASE_RESET,
            IA32_TSC => true,
            _ => is_storage_msr(msr),
        };
        if !valid {
            return Err(self.refuse(msr));
        }
        if msr != IA32_TSC {
            self.values.insert(msr, value);
        }
        Ok(())
    }

    fn refuse(&mut self, msr: u32) -> Refused {
        Refused { first: self.refused.insert(msr) }
    }
}

fn reset_value(msr: u32) -> u64 {
    match msr {
        IA32_MISC_ENABLE => MISC_ENABLE_RESET,
        IA32_PAT => PAT_RESET,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_listed_msrs_store_and_model() {
        let mut m = MsrModel::default();
        assert_eq!(m.read(IA32_TSC, 1234), Ok(1234));
        assert_eq!(m.read(IA32_PAT, 0), Ok(PAT_RESET));
        m.write(0xc000_0082, 0xffff_8000_0000_1000).unwrap();
        assert_eq!(m.read(0xc000_0082, 0), Ok(0xffff_8000_0000_1000));
        assert_eq!(m.read(IA32_APIC_BASE, 0), Ok(0xfee0_0100));
        assert_eq!(m.read(IA32_MISC_ENABLE, 0), Ok(1));
        assert_eq!(m.read(IA32_MTRRCAP, 0), Ok(0));
    }

    #[test]
    fn cpu_identification_msrs_linux_reads_have_safe_values() {
        let mut m = MsrModel::default();
        for msr in [0x179, 0x17a, 0xc001_0010, 0xc001_0015, 0xc001_0055, 0xc001_1029] {
            assert_eq!(m.read(msr, 0), Ok(0), "MSR {msr:#x}");
        }
        m.write(0xc001_1029, 2).unwrap();
        assert_eq!(m.read(0xc001_1029, 0), Ok(2));
    }

    #[test]
    fn everything_else_is_refused_and_reported_once() {
        let mut m = MsrModel::default();
        assert_eq!(m.read(0x4000_00ff, 0), Err(Refused { first: true }));
        assert_eq!(m.write(0x4000_00ff, 1), Err(Refused { first: false }));
        assert_eq!(m.read(0x3a, 0), Ok(1), "feature control reads locked with VMX off");
        assert_eq!(m.write(0x3a, 5), Err(Refused { first: true }), "and a locked MSR cannot be written");
        assert_eq!(m.write(IA32_PAT, 0x0202_0202_0202_0202), Err(Refused { first: true }), "memory type 2 is reserved");
        assert_eq!(m.write(IA32_APIC_BASE, 0xfee0_0900), Err(Refused { first: true }));
        assert_eq!(m.read(IA32_PAT, 0), Ok(PAT_RESET), "a refused write changes nothing");
    }
}
