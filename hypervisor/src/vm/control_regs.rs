//! What a guest may write to CR0, CR4 and EFER: one set of rules for both backends, taken from
//! the CPU the guest is shown (its CPUID), so that a write the guest's CPU would refuse raises
//! #GP and one it would take is taken, whatever the host underneath allows. Backends apply
//! them to the writes they intercept (VMX: CR0 writes that change NE, CR4 writes that touch
//! VMXE, every EFER write; SVM: EFER) and let the CPU check the rest.

use super::cpuid::Regs;

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

/// CR0 bits (Intel SDM Vol. 3, 2.5).
pub const CR0_PE: u64 = 1 << 0;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
/// CR4 bits (Intel SDM Vol. 3, 2.5).
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;

/// The CR0 a `MOV CR0` of `value` leaves, or `None` when the CPU raises #GP: bits 63:32, NW
/// without CD, PG without PE, paging turned on for long mode without PAE, paging turned off
/// in 64-bit code or with PCIDE. ET reads as 1, as on every CPU since the P6.
pub fn cr0_write(value: u64, efer: u64, cr4: u64, in_64bit_code: bool) -> Option<u64> {
    let paging = value & CR0_PG != 0;
    let refused = value >> 32 != 0
        || (value & CR0_NW != 0 && value & CR0_CD == 0)
        || (paging && value & CR0_PE == 0)
        || (paging && efer & EFER_LME != 0 && cr4 & CR4_PAE == 0)
        || (!paging && (in_64bit_code || cr4 & CR4_PCIDE != 0));
    (!refused).then_some(value | CR0_ET)
}

/// CR4 bits the guest CPU offers, from its CPUID leaves 1 and 7.0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cr4Features {
    /// Writable bits.
    pub allowed: u64,
}

impl Cr4Features {
    /// From the guest's CPUID leaf 1 and leaf 7 subleaf 0 (EAX, EBX, ECX, EDX).
    pub fn from_cpuid(leaf1: Regs, leaf7: Regs) -> Self {
        let (ecx1, edx1, ebx7, ecx7) = (leaf1[2], leaf1[3], leaf7[1], leaf7[2]);
        let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
        // (CR4 bit, offered)
        let bits = [
            (0, has(edx1, 1)),   // VME
            (1, has(edx1, 1)),   // PVI
            (2, has(edx1, 4)),   // TSD
            (3, has(edx1, 2)),   // DE
            (4, has(edx1, 3)),   // PSE
            (5, has(edx1, 6)),   // PAE
            (6, has(edx1, 7)),   // MCE
            (7, has(edx1, 13)),  // PGE
            (8, true),           // PCE
            (9, has(edx1, 24)),  // OSFXSR
            (10, has(edx1, 25)), // OSXMMEXCPT
            (11, has(ecx7, 2)),  // UMIP
            (12, has(ecx7, 16)), // LA57
            (13, has(ecx1, 5)),  // VMXE
            (14, has(ecx1, 6)),  // SMXE
            (16, has(ebx7, 0)),  // FSGSBASE
            (17, has(ecx1, 17)), // PCIDE
            (18, has(ecx1, 26)), // OSXSAVE
            (20, has(ebx7, 7)),  // SMEP
            (21, has(ebx7, 20)), // SMAP
            (22, has(ecx7, 3)),  // PKE
            (23, has(ecx7, 7)),  // CET
        ];
        Cr4Features { allowed: bits.iter().filter(|&&(_, offered)| offered).fold(0, |a, &(bit, _)| a | 1 << bit) }
    }
}

/// The CR4 a `MOV CR4` of `value` leaves, or `None` when the CPU raises #GP: a reserved or
/// unoffered bit, PAE cleared or LA57 changed in long mode, PCIDE set outside long mode or
/// with CR3[11:0] not 0.
pub fn cr4_write(current: u64, value: u64, efer: u64, cr3: u64, features: Cr4Features) -> Option<u64> {
    let long_mode = efer & EFER_LMA != 0;
    let refused = value & !features.allowed != 0
        || (long_mode && value & CR4_PAE == 0)
        || (long_mode && (value ^ current) & CR4_LA57 != 0)
        || (value & CR4_PCIDE != 0 && current & CR4_PCIDE == 0 && (!long_mode || cr3 & 0xfff != 0));
    (!refused).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cr0_rules() {
        let long = EFER_LME | EFER_LMA;
        let on = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
        assert_eq!(cr0_write(on & !CR0_NE, long, CR4_PAE, true), Some(on & !CR0_NE), "NE may be cleared");
        assert_eq!(cr0_write(on & !CR0_ET, long, CR4_PAE, true), Some(on), "ET reads as 1");
        assert_eq!(cr0_write(on | 1 << 32, long, CR4_PAE, true), None, "bits 63:32");
        assert_eq!(cr0_write(on | CR0_NW, long, CR4_PAE, true), None, "NW without CD");
        assert_eq!(cr0_write(on | CR0_NW | CR0_CD, long, CR4_PAE, true), Some(on | CR0_NW | CR0_CD));
        assert_eq!(cr0_write(CR0_PG, 0, 0, false), None, "PG without PE");
        assert_eq!(cr0_write(on, EFER_LME, 0, false), None, "long mode needs PAE");
        assert_eq!(cr0_write(CR0_PE, long, CR4_PAE, true), None, "paging off in 64-bit code");
        assert_eq!(cr0_write(CR0_PE, long, CR4_PAE, false), Some(CR0_PE | CR0_ET), "from compatibility mode");
        assert_eq!(cr0_write(CR0_PE, 0, CR4_PCIDE, false), None, "paging off with PCIDE");
    }

    #[test]
    fn cr4_rules_follow_the_offered_features() {
        // Leaf 1: VME, DE, PSE, TSD, PAE, PGE, FXSR, SSE, PCID, XSAVE (no MCE, no VMX).
        let leaf1 = [0, 0, 1 << 17 | 1 << 26, 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 6 | 1 << 13 | 1 << 24 | 1 << 25];
        let features = Cr4Features::from_cpuid(leaf1, [0, 1 << 0 | 1 << 7, 0, 0]);
        let long = EFER_LME | EFER_LMA;
        let base = CR4_PAE | 1 << 7 | 1 << 9;
        assert_eq!(cr4_write(base, base | 1 << 16 | 1 << 20, long, 0, features), Some(base | 1 << 16 | 1 << 20));
        for (bit, what) in [(6, "MCE"), (13, "VMXE"), (14, "SMXE"), (15, "reserved"), (22, "PKE"), (32, "reserved")] {
            assert_eq!(cr4_write(base, base | 1 << bit, long, 0, features), None, "{what}");
        }
        assert_eq!(cr4_write(base, base & !CR4_PAE, long, 0, features), None, "PAE off in long mode");
        assert_eq!(cr4_write(base, base | CR4_PCIDE, long, 0x1000, features), Some(base | CR4_PCIDE));
        assert_eq!(cr4_write(base, base | CR4_PCIDE, long, 0x1001, features), None, "PCIDE with CR3[11:0]");
        assert_eq!(cr4_write(0, CR4_PCIDE, 0, 0, features), None, "PCIDE outside long mode");
        let la57 = Cr4Features::from_cpuid(leaf1, [0, 0, 1 << 16, 0]);
        assert_eq!(cr4_write(base, base | CR4_LA57, long, 0, la57), None, "LA57 changes in long mode");
        assert_eq!(cr4_write(CR4_PAE, CR4_PAE | CR4_LA57, 0, 0, la57), Some(CR4_PAE | CR4_LA57));
    }

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
