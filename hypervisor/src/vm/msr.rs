//! The MSRs a guest may touch when they are not passed through: an allow-list with modelled
//! values. Anything else gets #GP(0); the VM counts refusals by range ([`MsrRefusals`]) and
//! logs only the first few MSRs, so a guest probing every index grows neither our memory nor
//! the log.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

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
/// EFER: validated by the run loop ([`super::control_regs`]), held by the backend.
pub const IA32_EFER: u32 = 0xc000_0080;

/// The xAPIC at its reset base, bootstrap processor, (not yet enabled: no APIC is emulated).
const APIC_BASE_RESET: u64 = 0xfee0_0000 | (1 << 8);
/// Fast-strings enable, as firmware leaves it.
const MISC_ENABLE_RESET: u64 = 1;
const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// Per-vCPU MSR state for allow-listed MSRs.
#[derive(Default)]
pub struct MsrModel {
    values: BTreeMap<u32, u64>,
}

/// An access the model refuses (the guest gets #GP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused;

/// MSRs every AMD CPU has without a CPUID bit, which read as 0 and ignore writes, as on KVM:
/// the legacy performance counters (PERF_CTL0-3, PERF_CTR0-3: no PMU is offered) and NB_CFG
/// (0xc001_001f), which Linux reads and sets unchecked on family 10h and later to enable
/// extended PCI configuration through port 0xcf8 (not offered: the bit reads back clear).
pub fn amd_read_as_zero(msr: u32) -> bool {
    (0xc001_0000..=0xc001_0007).contains(&msr) || msr == 0xc001_001f
}

/// Ranges refusals are counted in, for the VM's end report.
const REFUSAL_RANGES: [(u32, u32); 4] =
    [(0, 0x1fff), (0x4000_0000, 0x4000_ffff), (0xc000_0000, 0xc000_1fff), (0xc001_0000, 0xc001_ffff)];
/// Distinct MSRs whose first refusal is logged; the rest are only counted.
pub const LOGGED_REFUSALS: usize = 16;

/// A VM's refused MSR accesses: counts by range (plus one for everything else) and the first
/// [`LOGGED_REFUSALS`] distinct MSRs, bounded whatever the guest tries.
#[derive(Default)]
pub struct MsrRefusals {
    counts: [u64; REFUSAL_RANGES.len() + 1],
    logged: FirstFew,
}

/// Whether to log a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalLog {
    /// The first refusal of this MSR: log it.
    First,
    /// The first refusal of an MSR beyond [`LOGGED_REFUSALS`]: say that the rest are counted.
    LimitReached,
    /// Already logged, or beyond the limit.
    Quiet,
}

impl RefusalLog {
    /// Logs `what` VM `vm` did (`once` says how often such lines come), or, at the limit, that
    /// from now on `rest` are only counted.
    pub fn log(self, level: log::Level, vm: &str, what: core::fmt::Arguments<'_>, once: &str, rest: &str) {
        match self {
            RefusalLog::First => log::log!(level, "vm {vm}: {what} ({once})"),
            RefusalLog::LimitReached => {
                log::log!(level, "vm {vm}: {what}; from now on {rest} are only counted (see the VM's end report)")
            }
            RefusalLog::Quiet => {}
        }
    }
}

/// The first [`LOGGED_REFUSALS`] distinct keys (MSRs, ports, guest-physical pages) a VM got
/// wrong, so its log says what they were and stays short whatever the guest does.
#[derive(Default)]
pub struct FirstFew {
    logged: Vec<u64>,
    /// The note that further ones are only counted has been given.
    limit_announced: bool,
}

impl FirstFew {
    /// Whether and how to log `key`.
    pub fn note(&mut self, key: u64) -> RefusalLog {
        if self.logged.contains(&key) {
            RefusalLog::Quiet
        } else if self.logged.len() < LOGGED_REFUSALS {
            self.logged.push(key);
            RefusalLog::First
        } else if !self.limit_announced {
            self.limit_announced = true;
            RefusalLog::LimitReached
        } else {
            RefusalLog::Quiet
        }
    }
}

impl MsrRefusals {
    /// Counts a refusal of `msr`.
    pub fn record(&mut self, msr: u32) -> RefusalLog {
        let range = REFUSAL_RANGES.iter().position(|&(lo, hi)| (lo..=hi).contains(&msr));
        self.counts[range.unwrap_or(REFUSAL_RANGES.len())] += 1;
        self.logged.note(msr.into())
    }

    /// `refused MSR accesses (#GP): N in LO-HI, ...`, or `None` if there were none.
    pub fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (i, &count) in self.counts.iter().enumerate().filter(|&(_, &count)| count > 0) {
            parts.push(match REFUSAL_RANGES.get(i) {
                Some((lo, hi)) => format!("{count} in {lo:#x}-{hi:#x}"),
                None => format!("{count} elsewhere"),
            });
        }
        (!parts.is_empty()).then(|| format!("refused MSR accesses (#GP): {}", parts.join(", ")))
    }
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
            _ => Err(Refused),
        }
    }

    /// WRMSR.
    pub fn write(&mut self, msr: u32, value: u64) -> Result<(), Refused> {
        let valid = match msr {
            IA32_PAT => valid_pat(value),
            // Moving or enabling the APIC needs an emulated APIC: keep the reset value only.
            IA32_APIC_BASE => value == APIC_BASE_RESET,
            IA32_TSC => true,
            // TSC_AUX: bits 63:32 are reserved.
            0xc000_0103 => value >> 32 == 0,
            // Addresses the CPU uses as they are: FS/GS/KERNEL_GS base, LSTAR, CSTAR,
            // SYSENTER_ESP/EIP must be canonical.
            0xc000_0100..=0xc000_0102 | 0xc000_0082 | 0xc000_0083 | 0x175 | 0x176 => is_canonical(value),
            _ => is_storage_msr(msr),
        };
        if !valid {
            return Err(Refused);
        }
        if msr != IA32_TSC {
            self.values.insert(msr, value);
        }
        Ok(())
    }
}

/// Bits 63:47 all equal (48-bit virtual addresses).
fn is_canonical(value: u64) -> bool {
    ((value as i64) << 16 >> 16) as u64 == value
}

/// Whether `value` is a PAT the CPU accepts: every entry a defined memory type (UC, WC, WT,
/// WP, WB, UC-).
pub fn valid_pat(value: u64) -> bool {
    (0..8).all(|i| matches!((value >> (i * 8)) & 0xff, 0 | 1 | 4 | 5 | 6 | 7))
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
    fn everything_else_is_refused() {
        let mut m = MsrModel::default();
        assert_eq!(m.read(0x4000_00ff, 0), Err(Refused));
        assert_eq!(m.write(0x4000_00ff, 1), Err(Refused));
        assert_eq!(m.read(0x3a, 0), Ok(1), "feature control reads locked with VMX off");
        assert_eq!(m.write(0x3a, 5), Err(Refused), "and a locked MSR cannot be written");
        assert_eq!(m.write(IA32_PAT, 0x0202_0202_0202_0202), Err(Refused), "memory type 2 is reserved");
        assert_eq!(m.write(IA32_APIC_BASE, 0xfee0_0900), Err(Refused));
        assert_eq!(m.read(IA32_PAT, 0), Ok(PAT_RESET), "a refused write changes nothing");
    }

    #[test]
    fn a_sweep_over_every_index_is_counted_in_bounded_memory_and_logged_a_few_times() {
        let mut refusals = MsrRefusals::default();
        let mut logged = 0;
        let mut limit_notes = 0;
        for msr in (0..0x2000).chain(0x4000_0000..0x4000_1000).chain(0xc001_0000..0xc001_2000).chain([0x1234_5678]) {
            for _ in 0..2 {
                match refusals.record(msr) {
                    RefusalLog::First => logged += 1,
                    RefusalLog::LimitReached => limit_notes += 1,
                    RefusalLog::Quiet => {}
                }
            }
        }
        assert_eq!((logged, limit_notes), (LOGGED_REFUSALS, 1));
        assert_eq!(refusals.logged.logged.len(), LOGGED_REFUSALS, "memory stays bounded");
        assert_eq!(
            refusals.summary().unwrap(),
            "refused MSR accesses (#GP): 16384 in 0x0-0x1fff, 8192 in 0x40000000-0x4000ffff, \
             16384 in 0xc0010000-0xc001ffff, 2 elsewhere"
        );
        assert_eq!(MsrRefusals::default().summary(), None);
    }
}
