//! Identifies the CPU and the hardware virtualization it offers.

use core::fmt;

use raw_cpuid::{cpuid, CpuId};
use x86_64::registers::model_specific::Msr;

use crate::virt::{msr, SvmCaps, SvmRaw, Virtualization, VmxCaps, VmxMsrs};

/// What the boot log says about the CPU.
pub struct CpuReport {
    vendor: [u8; 12],
    family: u8,
    model: u8,
    stepping: u8,
    brand: [u8; 48],
    /// Hardware virtualization found.
    pub virtualization: Virtualization,
}

/// Reads CPUID and the capability MSRs of whichever extension CPUID announces.
pub fn identify() -> CpuReport {
    let cpuid = CpuId::new();
    let mut vendor = [b' '; 12];
    if let Some(v) = cpuid.get_vendor_info() {
        copy_text(&mut vendor, v.as_str());
    }
    let (family, model, stepping) =
        cpuid.get_feature_info().map_or((0, 0, 0), |f| (f.family_id(), f.model_id(), f.stepping_id()));
    let mut brand = [b' '; 48];
    if let Some(b) = cpuid.get_processor_brand_string() {
        copy_text(&mut brand, b.as_str().trim());
    }

    let has_vmx = cpuid.get_feature_info().is_some_and(|f| f.has_vmx());
    let has_svm = cpuid.get_extended_processor_and_feature_identifiers().is_some_and(|f| f.has_svm());
    let virtualization = if has_vmx {
        Virtualization::Vmx(VmxCaps::decode(&read_vmx_msrs()))
    } else if has_svm && cpuid!(0x8000_0000).eax >= 0x8000_000a {
        let leaf = cpuid!(0x8000_000a);
        // SAFETY: VM_CR exists on every CPU that reports SVM (AMD APM Vol. 2, 15.30.1).
        let vm_cr = unsafe { Msr::new(msr::VM_CR).read() };
        Virtualization::Svm(SvmCaps::decode(&SvmRaw { eax: leaf.eax, ebx: leaf.ebx, edx: leaf.edx, vm_cr }))
    } else {
        Virtualization::None
    };
    CpuReport { vendor, family, model, stepping, brand, virtualization }
}

/// Reads the VMX capability MSRs, each only when the architecture says it exists.
fn read_vmx_msrs() -> VmxMsrs {
    // SAFETY (all reads): CPUID.1:ECX.VMX is set, which guarantees IA32_FEATURE_CONTROL and
    // IA32_VMX_BASIC/PROCBASED_CTLS; the others are read only when the bits that announce them
    // are set (Intel SDM Vol. 3, Appendix A).
    let read = |number| unsafe { Msr::new(number).read() };
    let basic = read(msr::IA32_VMX_BASIC);
    let primary = if VmxMsrs::has_true_controls(basic) {
        read(msr::IA32_VMX_TRUE_PROCBASED_CTLS)
    } else {
        read(msr::IA32_VMX_PROCBASED_CTLS)
    };
    let secondary = VmxMsrs::has_secondary_controls(primary).then(|| read(msr::IA32_VMX_PROCBASED_CTLS2));
    let ept_vpid_cap = secondary.filter(|&s| VmxMsrs::has_ept_vpid_cap(s)).map(|_| read(msr::IA32_VMX_EPT_VPID_CAP));
    VmxMsrs { feature_control: read(msr::IA32_FEATURE_CONTROL), basic, primary, secondary, ept_vpid_cap }
}

fn copy_text(dst: &mut [u8], src: &str) {
    for (d, s) in dst.iter_mut().zip(src.bytes()) {
        *d = if s.is_ascii_graphic() || s == b' ' { s } else { b'?' };
    }
}

fn text(bytes: &[u8]) -> &str {
    // copy_text only stores ASCII.
    core::str::from_utf8(bytes).unwrap_or("?").trim()
}

impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cpu: {} family {:#x} model {:#x} stepping {} \"{}\"; {}",
            text(&self.vendor),
            self.family,
            self.model,
            self.stepping,
            text(&self.brand),
            self.virtualization
        )
    }
}
