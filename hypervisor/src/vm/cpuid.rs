//! The CPU model guests see: the host's CPUID with the hypervisor bit set, our signature at
//! 0x4000_0000 with a timing leaf, KVM's paravirtual clock interface at 0x4000_0100, VMX/SVM
//! hidden, and extended-state features limited to what the world switch saves (x87, SSE, AVX).

use crate::vcpu::{XCR0_AVX, XCR0_SSE, XCR0_X87};

/// The hypervisor's CPUID signature (leaf 0x4000_0000, EBX:ECX:EDX).
pub const SIGNATURE: &[u8; 12] = b"RsHypervisor";
/// Highest leaf of our own range: the timing leaf.
pub const MAX_HYPERVISOR_LEAF: u32 = TIMING_LEAF;
/// The timing leaf many hypervisors offer (VMware's layout): EAX the TSC's frequency in kHz,
/// EBX the local APIC timer's input clock in kHz.
pub const TIMING_LEAF: u32 = 0x4000_0010;
/// Where the KVM-compatible leaves start. Linux scans 0x4000_0000 + N * 0x100 for KVM's
/// signature, so our own stays at 0x4000_0000 (as Hyper-V-compatible hypervisors do).
pub const KVM_LEAVES: u32 = 0x4000_0100;
/// KVM's signature, EBX:ECX:EDX of [`KVM_LEAVES`].
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// KVM_FEATURE_CLOCKSOURCE2 (the kvm-clock MSRs at 0x4b56_4d00) and
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT (all vCPUs' clocks agree). Nothing else of KVM's
/// interface is offered: no steal time, PV EOI, PV TLB flush, async page faults or PV IPIs.
pub const KVM_FEATURES: u32 = (1 << 3) | (1 << 24);
/// The APIC timer's input clock: one tick per nanosecond ([`super::lapic`]).
const APIC_TIMER_KHZ: u32 = 1_000_000;
/// Leaf 0x8000_0007 EDX: invariant TSC (constant rate in every P-, C- and T-state).
pub const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// EAX, EBX, ECX, EDX.
pub type Regs = [u32; 4];

const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Perfmon and debug capability (IA32_PERF_CAPABILITIES): no PMU is virtualized.
const LEAF1_ECX_PDCM: u32 = 1 << 15;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_APIC: u32 = 1 << 9;
/// More than one logical processor per package (then leaf 1 EBX[23:16] counts them).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Machine-check exception and architecture: no banks are emulated.
const LEAF1_EDX_MCE_MCA: u32 = (1 << 7) | (1 << 14);
/// Thermal monitor and its clock control (ACPI, TM): their MSRs (0x19a-0x19d) are not emulated.
const LEAF1_EDX_THERMAL: u32 = (1 << 22) | (1 << 29);
/// Thermal monitor 2 and its MSR.
const LEAF1_ECX_TM2: u32 = 1 << 8;
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
/// Leaf 7 EBX: SGX (its MSRs and leaf 0x12), MPX (BNDCFGS, and XCR0 state not switched),
/// Intel PT (its MSRs).
const LEAF7_EBX_UNMODELLED: u32 = (1 << 2) | (1 << 14) | (1 << 25);
/// Leaf 7 ECX: PKU and OSPKE (PKRU is not switched), WAITPKG (UMWAIT_CONTROL), CET shadow
/// stacks (their MSRs), SGX launch control.
const LEAF7_ECX_UNMODELLED: u32 = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 30);
/// Leaf 7 EDX: FLUSH_CMD 0x10b, ARCH_CAPABILITIES 0x10a and CORE_CAPABILITIES 0xcf
/// (L1D_FLUSH and the two capability MSRs), CET IBT, AVX-512 VP2INTERSECT.
const LEAF7_EDX_UNMODELLED: u32 = (1 << 8) | (1 << 20) | (1 << 28) | (1 << 29) | (1 << 30);
/// Leaf 7 EDX: SPEC_CTRL 0x48 and PRED_CMD 0x49 (IBRS/IBPB) and the SPEC_CTRL bits STIBP and
/// SSBD. The VMX backend gives each vCPU its own SPEC_CTRL where the CPU has it; the SVM
/// backend does not switch it yet, so AMD hosts hide them (and their leaf 0x8000_0008 bits).
const LEAF7_EDX_SPECULATION_CONTROL: u32 = (1 << 26) | (1 << 27) | (1 << 31);
/// Leaf 0x8000_0008 EBX (AMD): IBPB, IBRS, STIBP and their always-on/preferred/same-mode
/// hints, SSBD and VIRT_SSBD: the same speculation-control MSRs (and 0xc001_011f).
const EXT8_EBX_SPECULATION_CONTROL: u32 =
    (1 << 12) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19) | (1 << 24) | (1 << 25);
/// XSAVE area size for the legacy region, header and AVX's upper halves.
const XSAVE_SIZE_SSE: u32 = 576;
const XSAVE_SIZE_AVX: u32 = 832;

/// The machine facts the CPU model needs.
#[derive(Clone, Copy, Debug)]
pub struct CpuModel {
    /// XCR0 bits the hypervisor lets guests enable.
    pub supported_xcr0: u64,
    /// The guest TSC's real frequency, which leaves 0x15/0x16 report (0 if unknown).
    pub tsc_hz: u64,
    /// This vCPU's local APIC ID (the MADT lists vCPU `n` with ID `n`).
    pub apic_id: u32,
    /// vCPUs of the VM: one core each, one thread per core, one package.
    pub vcpus: u32,
}

impl CpuModel {
    /// Bits an APIC ID spends on the core number: the vCPU count rounded up to a power of two.
    fn core_bits(&self) -> u32 {
        self.vcpus.max(1).next_power_of_two().trailing_zeros()
    }
}

/// Leaf 0x15 (TSC/crystal ratio) is the highest leaf the model needs to report.
const TSC_LEAF: u32 = 0x15;
const FREQUENCY_LEAF: u32 = 0x16;
const LEAF7_EBX_TSC_ADJUST: u32 = 1 << 1;

/// A signature leaf: the highest leaf of its range, then 12 bytes of text in EBX, ECX, EDX.
fn signature_leaf(max_leaf: u32, text: &[u8; 12]) -> Regs {
    let word = |i: usize| u32::from_le_bytes([text[i], text[i + 1], text[i + 2], text[i + 3]]);
    [max_leaf, word(0), word(4), word(8)]
}

/// Whether the host CPU is AMD's (its topology leaves differ from Intel's).
pub fn amd(host: &dyn Fn(u32, u32) -> Regs) -> bool {
    let [_, ebx, ecx, edx] = host(0, 0);
    [ebx, edx, ecx] == [0x6874_7541, 0x6974_6e65, 0x444d_4163]
}

/// What the guest's CPUID instruction returns.
///
/// `host` executes the real CPUID; `guest_osxsave` is the guest's CR4.OSXSAVE.
pub fn guest_cpuid(
    leaf: u32,
    subleaf: u32,
    host: &dyn Fn(u32, u32) -> Regs,
    guest_osxsave: bool,
    model: &CpuModel,
) -> Regs {
    let supported_xcr0 = model.supported_xcr0;
    let avx = supported_xcr0 & XCR0_AVX != 0;
    let host_max = host(0, 0)[0];
    match leaf {
        0 => {
            let [eax, ebx, ecx, edx] = host(0, 0);
            let eax = if model.tsc_hz != 0 { eax.max(FREQUENCY_LEAF) } else { eax };
            [eax, ebx, ecx, edx]
        }
        // The TSC runs at the host's measured rate, not the model's nominal one: say so, or an
        // Intel guest computes its clocks from a frequency the TSC does not have.
        TSC_LEAF if model.tsc_hz != 0 => [1, 1, model.tsc_hz.min(u32::MAX as u64) as u32, 0],
        FREQUENCY_LEAF if model.tsc_hz != 0 => {
            let mhz = (model.tsc_hz / 1_000_000).min(0xffff) as u32;
            [mhz, mhz, 100, 0]
        }
        // The topology is the VM's own, so it agrees with the MADT whatever the host has:
        // leaves 4 and 0xB/0x1F (Intel), 0x8000_0008 and 0x8000_001E (AMD).
        4 if !amd(host) => {
            let [eax, ebx, ecx, edx] = host(4, subleaf);
            if eax & 0x1f == 0 {
                return [0; 4];
            }
            let level = (eax >> 5) & 7;
            let sharing = if level >= 3 { (1u32 << model.core_bits()) - 1 } else { 0 };
            let cores = (1u32 << model.core_bits()) - 1;
            [(eax & 0x3fff) | sharing << 14 | cores << 26, ebx, ecx, edx]
        }
        0xb | 0x1f if leaf == 0xb || (host_max >= 0x1f && !amd(host)) => match subleaf {
            0 => [0, 1, 0x100, model.apic_id],
            1 => [model.core_bits(), model.vcpus.max(1), 0x200 | 1, model.apic_id],
            _ => [0, 0, subleaf & 0xff, model.apic_id],
        },
        0x8000_0008 if amd(host) => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            let cores = model.vcpus.max(1) - 1;
            let ecx = (ecx & !0xf0ff) | (model.core_bits() << 12) | (cores & 0xff);
            [eax, ebx & !EXT8_EBX_SPECULATION_CONTROL, ecx, edx]
        }
        0x8000_0008 => {
            let [eax, ebx, ecx, edx] = host(leaf, subleaf);
            [eax, ebx & !EXT8_EBX_SPECULATION_CONTROL, ecx, edx]
        }
        0x8000_001e if amd(host) => [model.apic_id, model.apic_id & 0xff, 0, 0],
        // Leaves the host does not have but the raised maximum now covers.
        l if l < 0x4000_0000 && l > host_max && l <= FREQUENCY_LEAF => [0; 4],
        0x4000_0000 => signature_leaf(MAX_HYPERVISOR_LEAF, SIGNATURE),
        TIMING_LEAF => [(model.tsc_hz / 1000).min(u32::MAX as u64) as u32, APIC_TIMER_KHZ, 0, 0],
        KVM_LEAVES => signature_leaf(KVM_LEAVES + 1, KVM_SIGNATURE),
        // KVM_CPUID_FEATURES: EAX the features, EDX the hints (none: KVM_HINTS_REALTIME would
        // tell the guest its vCPUs never share a host CPU).
        l if l == KVM_LEAVES + 1 => [KVM_FEATURES, 0, 0, 0],
        0x4000_0001..=0x4fff_ffff => [0; 4],
        // Power management: only the invariant-TSC bit, where the host's TSC is invariant (the
        // guest's TSC is the host's plus an offset). Hardware P-states, boost and the rest
        // would lead the guest to MSRs that are not modelled.
        0x8000_0007 if host(0x8000_0000, 0)[0] >= leaf => [0, 0, 0, host(leaf, subleaf)[3] & EXT7_EDX_INVARIANT_TSC],
        0x8000_0007 => [0; 4],
        // MONITOR/MWAIT, thermal/power management (APERF/MPERF) and the architectural PMU
        // (leaf 0xA) are not virtualized.
        5 | 6 | 0xa => [0; 4],
        1 => {
            let [eax, ebx, mut ecx, edx] = host(1, 0);
            // The emulated local APIC offers x2APIC and the TSC-deadline timer whatever the
            // host has; MONITOR/MWAIT would idle without exiting.
            ecx = (ecx | LEAF1_ECX_HYPERVISOR | LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE)
                & !(LEAF1_ECX_VMX | LEAF1_ECX_OSXSAVE | LEAF1_ECX_MONITOR | LEAF1_ECX_PDCM | LEAF1_ECX_TM2);
            let edx = (edx | LEAF1_EDX_APIC) & !(LEAF1_EDX_MCE_MCA | LEAF1_EDX_THERMAL);
            if guest_osxsave {
                ecx |= LEAF1_ECX_OSXSAVE;
            }
            if !avx {
                ecx &= !(LEAF1_ECX_AVX | LEAF1_ECX_FMA | LEAF1_ECX_F16C);
            }
            // This vCPU's APIC ID and the VM's logical processors, whatever the host has.
            let addressable = (1u32 << model.core_bits()).min(0xff);
            let ebx = (ebx & 0x0000_ffff) | addressable << 16 | (model.apic_id & 0xff) << 24;
            let edx = if model.vcpus > 1 { edx | LEAF1_EDX_HTT } else { edx & !LEAF1_EDX_HTT };
            [eax, ebx, ecx, edx]
        }
        7 if subleaf == 0 => {
            let [eax, mut ebx, ecx, edx] = host(7, 0);
            // TSC_ADJUST is not modelled: the TSC is the host's. Nothing whose MSRs or state
            // the hypervisor does not model is offered.
            ebx &= !(LEAF7_EBX_AVX512 | LEAF7_EBX_TSC_ADJUST | LEAF7_EBX_UNMODELLED);
            if !avx {
                ebx &= !LEAF7_EBX_AVX2;
            }
            let mut edx = edx & !LEAF7_EDX_UNMODELLED;
            if amd(host) {
                edx &= !LEAF7_EDX_SPECULATION_CONTROL;
            }
            [eax, ebx, ecx & !(LEAF7_ECX_AVX512 | LEAF7_ECX_UNMODELLED), edx]
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
            (0, _) => [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            _ => [leaf, subleaf, 0x1111, 0x2222],
        }
    }

    const X87_SSE_AVX: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX;

    /// The model of a one-vCPU VM.
    fn model(supported_xcr0: u64, tsc_hz: u64) -> CpuModel {
        CpuModel { supported_xcr0, tsc_hz, apic_id: 0, vcpus: 1 }
    }

    fn amd_host(leaf: u32, subleaf: u32) -> Regs {
        match leaf {
            0 => [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            0x8000_0000 => [0x8000_001e, 0, 0, 0],
            0x8000_0008 => [0x3030, 0, 0x0000_7007, 0],
            _ => generous_host(leaf, subleaf),
        }
    }

    #[test]
    fn topology_agrees_with_the_vcpu_count_not_the_host() {
        let m = CpuModel { supported_xcr0: X87_SSE_AVX, tsc_hz: 0, apic_id: 2, vcpus: 3 };
        let leaf1 = guest_cpuid(1, 0, &generous_host, false, &m);
        assert_eq!(leaf1[1] >> 24, 2, "APIC ID");
        assert_eq!(leaf1[1] >> 16 & 0xff, 4, "addressable IDs: 3 rounded up");
        assert_ne!(leaf1[3] & LEAF1_EDX_HTT, 0);
        let one = guest_cpuid(1, 0, &generous_host, false, &model(X87_SSE_AVX, 0));
        assert_eq!((one[1] >> 16 & 0xff, one[3] & LEAF1_EDX_HTT), (1, 0));
        // Intel: leaf 0xB (and 0x1F) say one thread per core, 3 cores, x2APIC ID 2.
        let modern = |leaf: u32, subleaf: u32| if leaf == 0 { [0x1f, 0, 0, 0] } else { generous_host(leaf, subleaf) };
        assert_ne!(
            guest_cpuid(0x1f, 0, &generous_host, false, &m),
            [0, 1, 0x100, 2],
            "0x1F only where the host has it"
        );
        for leaf in [0xb, 0x1f] {
            assert_eq!(guest_cpuid(leaf, 0, &modern, false, &m), [0, 1, 0x100, 2]);
            assert_eq!(guest_cpuid(leaf, 1, &modern, false, &m), [2, 3, 0x201, 2]);
            assert_eq!(guest_cpuid(leaf, 2, &modern, false, &m), [0, 0, 2, 2]);
        }
        // Leaf 4: per-core caches, 4 addressable cores; the host's L3 sharing is not passed on.
        let cache = guest_cpuid(4, 0, &|_, _| [0xfc00_4121, 1, 2, 3], false, &m);
        assert_eq!((cache[0] >> 26, cache[0] >> 14 & 0xfff, cache[0] & 0x3fff), (3, 0, 0x0121));
        let l3 = guest_cpuid(4, 3, &|_, _| [0xfc0f_c163, 1, 2, 3], false, &m);
        assert_eq!(l3[0] >> 14 & 0xfff, 3, "the L3 is shared by the whole package");
        // AMD: 0x8000_0008 ECX gives the core count and APIC ID width, 0x8000_001E the IDs.
        let ext8 = guest_cpuid(0x8000_0008, 0, &amd_host, false, &m);
        assert_eq!((ext8[2] & 0xff, ext8[2] >> 12 & 0xf), (2, 2));
        assert_eq!(guest_cpuid(0x8000_001e, 0, &amd_host, false, &m), [2, 2, 0, 0]);
        assert_eq!(guest_cpuid(0x8000_0008, 0, &generous_host, false, &m)[2], 0x1111, "Intel: untouched");
    }

    #[test]
    fn signature_and_hypervisor_bit() {
        let regs = guest_cpuid(0x4000_0000, 0, &generous_host, false, &model(X87_SSE_AVX, 0));
        assert_eq!(regs[0], MAX_HYPERVISOR_LEAF);
        assert_eq!(&text(regs), SIGNATURE);
        let leaf1 = guest_cpuid(1, 0, &generous_host, false, &model(X87_SSE_AVX, 0));
        assert_ne!(leaf1[2] & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(leaf1[1] >> 16 & 0xff, 1, "one logical processor");
        assert_eq!(leaf1[2] & (LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE), LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE);
        assert_eq!(leaf1[2] & (LEAF1_ECX_MONITOR | LEAF1_ECX_PDCM), 0);
        assert_eq!(guest_cpuid(0xa, 0, &generous_host, false, &model(7, 0)), [0; 4]);
        assert_ne!(leaf1[3] & LEAF1_EDX_APIC, 0);
        assert_eq!(leaf1[3] & LEAF1_EDX_MCE_MCA, 0);
        assert_eq!((leaf1[3] & LEAF1_EDX_THERMAL, leaf1[2] & LEAF1_ECX_TM2), (0, 0), "no thermal MSRs");
        assert_eq!(guest_cpuid(6, 0, &generous_host, false, &model(X87_SSE_AVX, 0)), [0; 4]);
        assert_eq!(guest_cpuid(0x4000_0001, 0, &generous_host, false, &model(X87_SSE_AVX, 0)), [0; 4]);
    }

    fn text(regs: Regs) -> [u8; 12] {
        let mut text = [0u8; 12];
        for (i, r) in regs[1..].iter().enumerate() {
            text[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
        }
        text
    }

    /// Linux finds KVM's signature in the second range and then uses kvm-clock, which gives it
    /// the TSC's frequency; our own timing leaf gives it to guests that read 0x4000_0010.
    #[test]
    fn paravirtual_clock_leaves() {
        let m = model(X87_SSE_AVX, 2_500_000_000);
        let kvm = guest_cpuid(KVM_LEAVES, 0, &generous_host, false, &m);
        assert_eq!((kvm[0], &text(kvm)), (0x4000_0101, b"KVMKVMKVM\0\0\0"));
        assert_eq!(guest_cpuid(0x4000_0101, 0, &generous_host, false, &m), [(1 << 3) | (1 << 24), 0, 0, 0]);
        assert_eq!(guest_cpuid(0x4000_0000, 0, &generous_host, false, &m)[0], TIMING_LEAF);
        assert_eq!(guest_cpuid(TIMING_LEAF, 0, &generous_host, false, &m), [2_500_000, 1_000_000, 0, 0]);
        assert_eq!(guest_cpuid(0x4000_0102, 0, &generous_host, false, &m), [0; 4]);
    }

    #[test]
    fn invariant_tsc_only_where_the_host_has_it() {
        let m = model(X87_SSE_AVX, 0);
        let invariant = |leaf: u32, subleaf: u32| match leaf {
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            0x8000_0007 => [1, 2, 3, u32::MAX],
            _ => generous_host(leaf, subleaf),
        };
        assert_eq!(guest_cpuid(0x8000_0007, 0, &invariant, false, &m), [0, 0, 0, EXT7_EDX_INVARIANT_TSC]);
        let variant =
            |leaf: u32, subleaf: u32| if leaf == 0x8000_0007 { [0, 0, 0, 0x6ff] } else { generous_host(leaf, subleaf) };
        assert_eq!(guest_cpuid(0x8000_0007, 0, &variant, false, &m), [0; 4], "P-states and boost hidden");
    }

    #[test]
    fn virtualization_extensions_are_hidden() {
        assert_eq!(guest_cpuid(1, 0, &generous_host, false, &model(X87_SSE_AVX, 0))[2] & LEAF1_ECX_VMX, 0);
        assert_eq!(guest_cpuid(0x8000_0001, 0, &generous_host, false, &model(X87_SSE_AVX, 0))[2] & EXT1_ECX_SVM, 0);
        assert_eq!(guest_cpuid(0x8000_000a, 0, &generous_host, false, &model(X87_SSE_AVX, 0)), [0; 4]);
    }

    #[test]
    fn osxsave_follows_the_guest_cr4() {
        assert_eq!(guest_cpuid(1, 0, &generous_host, false, &model(X87_SSE_AVX, 0))[2] & LEAF1_ECX_OSXSAVE, 0);
        assert_ne!(guest_cpuid(1, 0, &generous_host, true, &model(X87_SSE_AVX, 0))[2] & LEAF1_ECX_OSXSAVE, 0);
    }

    #[test]
    fn extended_state_is_limited_to_what_is_switched() {
        assert_eq!(guest_cpuid(0xd, 0, &generous_host, true, &model(X87_SSE_AVX, 0)), [7, 832, 832, 0]);
        assert_eq!(guest_cpuid(7, 0, &generous_host, true, &model(X87_SSE_AVX, 0))[1] & LEAF7_EBX_AVX512, 0);
        assert_ne!(guest_cpuid(7, 0, &generous_host, true, &model(X87_SSE_AVX, 0))[1] & LEAF7_EBX_AVX2, 0);
        let sse_only = XCR0_X87 | XCR0_SSE;
        assert_eq!(guest_cpuid(0xd, 0, &generous_host, true, &model(sse_only, 0)), [3, 576, 576, 0]);
        assert_eq!(guest_cpuid(1, 0, &generous_host, true, &model(sse_only, 0))[2] & LEAF1_ECX_AVX, 0);
        assert_eq!(guest_cpuid(7, 0, &generous_host, true, &model(sse_only, 0))[1] & LEAF7_EBX_AVX2, 0);
        assert_eq!(guest_cpuid(0xd, 2, &generous_host, true, &model(sse_only, 0)), [0; 4]);
        assert_eq!(guest_cpuid(0xd, 1, &generous_host, true, &model(sse_only, 0)), [1, 0, 0, 0]);
    }

    #[test]
    fn tsc_frequency_leaves_report_the_measured_rate() {
        let model = model(X87_SSE_AVX, 99_000_000);
        assert_eq!(guest_cpuid(0, 0, &generous_host, false, &model)[0], 0x16, "max leaf raised to cover 0x16");
        assert_eq!(guest_cpuid(0x15, 0, &generous_host, false, &model), [1, 1, 99_000_000, 0]);
        assert_eq!(guest_cpuid(0x16, 0, &generous_host, false, &model)[0], 99);
        assert_eq!(guest_cpuid(0x14, 0, &generous_host, false, &model), [0; 4], "above the host's maximum");
        assert_eq!(guest_cpuid(7, 0, &generous_host, false, &model)[1] & LEAF7_EBX_TSC_ADJUST, 0);
    }

    /// Every MSR that an offered feature implies exists: features whose MSRs or state the
    /// hypervisor does not model are not offered.
    #[test]
    fn features_without_modelled_msrs_are_hidden() {
        let m = model(X87_SSE_AVX, 0);
        let everything = |leaf: u32, subleaf: u32| match leaf {
            7 | 0x8000_0008 => [0, u32::MAX, u32::MAX, u32::MAX],
            _ => generous_host(leaf, subleaf),
        };
        let leaf7 = guest_cpuid(7, 0, &everything, true, &m);
        assert_eq!(leaf7[3] & (0x7 << 28), 0, "L1D_FLUSH, ARCH_CAPABILITIES, CORE_CAPABILITIES");
        assert_eq!(leaf7[3] & LEAF7_EDX_SPECULATION_CONTROL, LEAF7_EDX_SPECULATION_CONTROL, "Intel: SPEC_CTRL");
        assert_eq!(leaf7[2] & (1 << 3), 0, "PKU");
        assert_eq!(leaf7[1] & (1 << 2), 0, "SGX");
        let ext8 = guest_cpuid(0x8000_0008, 0, &everything, true, &m);
        assert_eq!(ext8[1] & EXT8_EBX_SPECULATION_CONTROL, 0, "Intel host");
        let amd = |leaf: u32, subleaf: u32| if leaf == 0 { amd_host(0, 0) } else { everything(leaf, subleaf) };
        assert_eq!(guest_cpuid(0x8000_0008, 0, &amd, true, &m)[1] & EXT8_EBX_SPECULATION_CONTROL, 0, "AMD host");
        assert_eq!(guest_cpuid(7, 0, &amd, true, &m)[3] & LEAF7_EDX_SPECULATION_CONTROL, 0, "AMD: not switched");
        assert_ne!(leaf7[1] & LEAF7_EBX_AVX2, 0, "what is modelled stays");
    }

    #[test]
    fn other_leaves_pass_through() {
        let model = model(X87_SSE_AVX, 0);
        assert_eq!(guest_cpuid(2, 3, &generous_host, false, &model), [2, 3, 0x1111, 0x2222]);
        assert_eq!(guest_cpuid(0x8000_0008, 0, &generous_host, false, &model), [0x8000_0008, 0, 0x1111, 0x2222]);
        assert_eq!(guest_cpuid(0x16, 0, &generous_host, false, &model), [0; 4], "above the maximum without a TSC rate");
    }
}
