//! What a guest may write to EFER: one set of rules for both backends, taken from the CPU the
//! guest is shown (its CPUID), so that a write the guest's CPU would refuse raises #GP and one
//! it would take is taken, whatever the host underneath allows.

/// EFER bits (Intel SDM Vol. 3, 2.2.1; AMD APM Vol. 2, 3.1.7).
pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
pub const EFER_FFXSR: u64 = 1 << 14;

/// The guest CPU's EFER-related features (CPUID 0x8000_0001 EDX).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EferFeatures {
    /// SYSCALL/SYSRET (EDX bit 11).
    pub syscall: bool,
    /// Execute-disable (EDX bit 20).
    pub nx: bool,
    /// Fast FXSAVE/FXRSTOR (EDX bit 25, AMD).
    pub ffxsr: bool,
    /// Long mode (EDX bit 29).
    pub long_mode: bool,
}

impl EferFeatures {
    /// From the guest's CPUID 0x8000_0001 EDX; `amd` when the guest CPU is AMD's (Intel's
    /// bit 25 means nothing for EFER).
    pub fn from_cpuid(ext1_edx: u32, amd: bool) -> Self {
        let bit = |n: u32| ext1_edx & (1 << n) != 0;
        EferFeatures { syscall: bit(11), nx: bit(20), ffxsr: amd && bit(25), long_mode: bit(29) }
    }

    /// EFER bits a WRMSR may set (LMA is accepted and ignored: the CPU owns it).
    fn writable(&self) -> u64 {
        let mut bits = EFER_LMA;
        // Intel reports SYSCALL only to 64-bit code, but SCE is writable wherever long mode is.
        if self.syscall || self.long_mode {
            bits |= EFER_SCE;
        }
        if self.long_mode {
            bits |= EFER_LME;
        }
        if self.nx {
            bits |= EFER_NXE;
        }
        if self.ffxsr {
            bits |= EFER_FFXSR;
        }
        bits
    }
}

/// The EFER a guest's `WRMSR` of `value` leaves, with `current` EFER and paging on or off; `None`
/// when the CPU raises #GP: a reserved or unoffered bit, or LME changed while paging is on.
/// LMA keeps its current value (only CR0.PG moves it).
pub fn efer_write(current: u64, value: u64, paging: bool, features: EferFeatures) -> Option<u64> {
    if value & !features.writable() != 0 {
        return None;
    }
    if paging && (value ^ current) & EFER_LME != 0 {
        return None;
    }
    Some((value & !EFER_LMA) | (current & EFER_LMA))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: EferFeatures = EferFeatures { syscall: true, nx: true, ffxsr: true, long_mode: true };

    #[test]
    fn offered_bits_are_taken_and_lma_stays_the_cpus() {
        let long = EFER_LME | EFER_LMA;
        assert_eq!(efer_write(long, EFER_LME | EFER_SCE | EFER_NXE, true, ALL), Some(long | EFER_SCE | EFER_NXE));
        assert_eq!(efer_write(long, EFER_LME | EFER_SCE, true, ALL), Some(long | EFER_SCE), "LMA written as 0");
        assert_eq!(efer_write(0, EFER_LMA, false, ALL), Some(0), "LMA written as 1");
        assert_eq!(efer_write(0, EFER_LME | EFER_FFXSR, false, ALL), Some(EFER_LME | EFER_FFXSR));
    }

    #[test]
    fn reserved_and_unoffered_bits_raise_gp() {
        for bit in (0..64).map(|b| 1u64 << b) {
            let offered = bit & (EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE | EFER_FFXSR) != 0;
            assert_eq!(efer_write(0, bit, false, ALL).is_some(), offered, "bit {bit:#x}");
        }
        let intel = EferFeatures::from_cpuid(1 << 11 | 1 << 20 | 1 << 25 | 1 << 29, false);
        assert_eq!(efer_write(0, EFER_FFXSR, false, intel), None, "FFXSR is AMD's");
        let no_nx = EferFeatures { nx: false, ..ALL };
        assert_eq!(efer_write(0, EFER_NXE, false, no_nx), None);
        let no_long_mode = EferFeatures::from_cpuid(0, false);
        assert_eq!(efer_write(0, EFER_LME, false, no_long_mode), None);
        assert_eq!(efer_write(0, EFER_SCE, false, no_long_mode), None);
        // SVME (nested virtualization is not offered), LMSLE, TCE.
        for bit in [12, 13, 15] {
            assert_eq!(efer_write(0, 1 << bit, false, ALL), None, "bit {bit}");
        }
    }

    #[test]
    fn lme_cannot_change_under_paging() {
        assert_eq!(efer_write(0, EFER_LME, true, ALL), None);
        assert_eq!(efer_write(EFER_LME | EFER_LMA, 0, true, ALL), None);
        assert_eq!(efer_write(EFER_LME, 0, false, ALL), Some(0));
    }
}
