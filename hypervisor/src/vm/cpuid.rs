//! The CPU model guests see: the host's CPUID with the hypervisor bit set, our signature at
//! 0x4000_0000, VMX/SVM hidden, and extended-state features limited to what the world switch
//! saves (x87, SSE, AVX).

use crate::vcpu::{XCR0_AVX, XCR0_SSE, XCR0_X87};

/// The hypervisor's CPUID signature (leaf 0x4000_0000, EBX:ECX:EDX).
pub const SIGNATURE: &[u8; 12] = b"RsHypervisor";
/// Highest hypervisor leaf.
pub const MAX_HYPERVISOR_LEAF: u32 = 0x4000_0001;

/// EAX, EBX, ECX, EDX.
pub type Regs = [u32; 4];

const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const EXT1_ECX_SVM: u32 = 1 << 2;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
/// AVX-512 F, DQ, IFMA, PF, ER, CD, BW, VL: state the world switch does not save.
const LEAF7_EBX_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
/// AVX-512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ.
const LEAF7_ECX_AVX512: u32 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
/// XSAVE area size for the legacy region, header and AVX's upper halves.
const XSAVE_SIZE_SSE: u32 = 576;
const XSAVE_SIZE_AVX: u32 = 832;

/// What the guest's CPUID instruction returns.
///
/// `host` executes the real CPUID; `guest_osxsave` is the guest's CR4.OSXSAVE;
/// `supported_xcr0` the XCR0 bits the hypervisor lets guests enable.
pub fn guest_cpuid(
    leaf: u32,
    subleaf: u32,
    host: &dyn Fn(u32, u32) -> Regs,
    guest_osxsave: bool,
    supported_xcr0: u64,
) -> Regs {
    let avx = supported_xcr0 & XCR0_AVX != 0;
    match leaf {
        0x4000_0000 => {
            let word =
                |i: usize| u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]]);
            [MAX_HYPERVISOR_LEAF, word(0), word(4), word(8)]
        }
        0x4000_0001..=0x4fff_ffff => [0; 4],
        // MONITOR/MWAIT and thermal/power management (APERF/MPERF) are not virtualized.
        5 | 6 => [0; 4],
        1 => {
            let [eax, ebx, mut ecx, edx] = host(1, 0);
            // The emulated local APIC offers x2APIC and the TSC-deadline timer whatever the
            // host has; MONITOR/MWAIT would idle without exiting.
            ecx = (ecx | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE)
                & !(LEAF1_ECX_VMX | LEAF1_ECX_OSXSAVE | LEAF1_ECX_MONITOR);
            let edx = edx | LEAF1_EDX_APIC;
            if guest_osxsave {
                ecx |= LEAF1_ECX_OSXSAVE;
            }
            if !avx {
                ecx &= !(LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C);
            }
            // One logical processor, APIC ID 0, whatever the host has.
            let ebx = (ebx & 0x0000_ffff) | (1 << 16);
            [eax, ebx, ecx, edx]
        }
        7 if subleaf == 0 => {
            let [eax, mut ebx, ecx, edx] = host(7, 0);
            ebx &= !LEAF7_EBX_AVX512;
            if !avx {
                ebx &= !LEAF7_EBX_AVX2;
            }
            [eax, ebx, ecx & !LEAF7_ECX_AVX512, edx]
        }
        0xd => match subleaf {
            0 => {
                let components = supported_xcr0 & (XCR0_X87 | XCR0_SSE | XCR0_AVX);
                let size = if avx { XSAVE_SIZE_AVX } else { XSAVE_SIZE_SSE };
                [components as u32, size, size, 0]
            }
            // XSAVEOPT only: supervisor state (XSS) is not virtualized.
            1 => [host(0xd, 1)[0] & 1, 0, 0, 0],
            2 if avx => host(0xd, 2),
            _ => [0; 4],
        },
        0x8000_0001 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            [eax, ebx, ecx & !EXT1_ECX_SVM, edx]
        }
        0x8000_000a => [0; 4],
        _ => host(leaf, subleaf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that reports everything: VMX, SVM, AVX, AVX-512, OSXSAVE.
    fn generous_host(leaf: u32, subleaf: u32) -> Regs {
        match (leaf, subleaf) {
            (1, _) => [0x906ea, 0x0810_0800, !LEAF1_ECX_HYPERVISOR, 0xbfeb_fbff],
            (7, 0) => [0, 0xffff_ffff, 0xffff_ffff, 0],
            (0xd, 0) => [0xe7, 2696, 2696, 0],
            (0xd, 1) => [0xf, 0, 0, 0],
            (0xd, 2) => [256, 576, 0, 0],
            (0x8000_0001, _) => [0, 0, 0xffff_ffff, 0],
            (0x8000_000a, _) => [1, 16, 0, 0xff],
            _ => [leaf, subleaf, 0x1111, 0x2222],
        }
    }

    const X87_SSE_AVX: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX;

    #[test]
    fn signature_and_hypervisor_bit() {
        let regs = guest_cpuid(0x4000_0000, 0, &generous_host, false, X87_SSE_AVX);
        assert_eq!(regs[0], MAX_HYPERVISOR_LEAF);
        let mut text = [0u8; 12];
        for (i, r) in regs[1..].iter().enumerate() {
            text[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&text, SIGNATURE);
        let leaf1 = guest_cpuid(1, 0, &generous_host, false, X87_SSE_AVX);
        assert_ne!(leaf1[2] & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf1[1] >> 16 & 0xff, 1, "one logical processor");
        assert_eq!(leaf1[2] & (LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE), LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(leaf1[2] & LEAF1_ECX_MONITOR, 0);
        assert_ne!(leaf1[3] & LEAF1_EDX_APIC, 0);
        assert_eq!(guest_cpuid(6, 0, &generous_host, false, X87_SSE_AVX), [0; 4]);
        assert_eq!(guest_cpuid(0x4000_0001, 0, &generous_host, false, X87_SSE_AVX), [0; 4]);
    }

    #[test]
    fn virtualization_extensions_are_hidden() {
        assert_eq!(guest_cpuid(1, 0, &generous_host, false, X87_SSE_AVX)[2] & LEAF1_ECX_VMX, 0);
        assert_eq!(guest_cpuid(0x8000_0001, 0, &generous_host, false, X87_SSE_AVX)[2] & EXT1_ECX_SVM, 0);
        assert_eq!(guest_cpuid(0x8000_000a, 0, &generous_host, false, X87_SSE_AVX), [0; 4]);
    }

    #[test]
    fn osxsave_follows_the_guest_cr4() {
        assert_eq!(guest_cpuid(1, 0, &generous_host, false, X87_SSE_AVX)[2] & LEAF1_ECX_OSXSAVE, 0);
        assert_ne!(guest_cpuid(1, 0, &generous_host, true, X87_SSE_AVX)[2] & LEAF1_ECX_OSXSAVE, 0);
    }

    #[test]
    fn extended_state_is_limited_to_what_is_switched() {
        assert_eq!(guest_cpuid(0xd, 0, &generous_host, true, X87_SSE_AVX), [7, 832, 832, 0]);
        assert_eq!(guest_cpuid(7, 0, &generous_host, true, X87_SSE_AVX)[1] & LEAF7_EBX_AVX512, 0);
        assert_ne!(guest_cpuid(7, 0, &generous_host, true, X87_SSE_AVX)[1] & LEAF7_EBX_AVX2, 0);
        let sse_only = XCR0_X87 | XCR0_SSE;
        assert_eq!(guest_cpuid(0xd, 0, &generous_host, true, sse_only), [3, 576, 576, 0]);
        assert_eq!(guest_cpuid(1, 0, &generous_host, true, sse_only)[2] & LEAF1_ECX_AVX, 0);
        assert_eq!(guest_cpuid(7, 0, &generous_host, true, sse_only)[1] & LEAF7_EBX_AVX2, 0);
        assert_eq!(guest_cpuid(0xd, 2, &generous_host, true, sse_only), [0; 4]);
        assert_eq!(guest_cpuid(0xd, 1, &generous_host, true, sse_only), [1, 0, 0, 0]);
    }

    #[test]
    fn other_leaves_pass_through() {
        assert_eq!(guest_cpuid(0x16, 3, &generous_host, false, X87_SSE_AVX), [0x16, 3, 0x1111, 0x2222]);
    }
}
