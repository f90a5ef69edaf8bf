//! Branch predictors between VMs: when a CPU goes from a vCPU of one VM to a vCPU of another,
//! an IBPB (indirect branch prediction barrier) first, so that no VM's indirect branches run
//! on predictions another VM trained (Spectre v2 across VMs). A CPU that returns to the VM it
//! ran last, with only the hypervisor or idle time in between, needs none.

use core::sync::atomic::{AtomicU64, Ordering};

use raw_cpuid::cpuid;
use spin::Once;
use x86_64::registers::model_specific::Msr;

use super::percpu;

const IA32_PRED_CMD: u32 = 0x49;
const PRED_CMD_IBPB: u64 = 1;

static HAS_IBPB: Once<bool> = Once::new();
static BARRIERS: AtomicU64 = AtomicU64::new(0);

/// Whether the CPU has IBPB: CPUID 7 EDX bit 26 (Intel's IBRS/IBPB) or 0x8000_0008 EBX bit 12
/// (AMD's IBPB).
pub fn has_ibpb() -> bool {
    *HAS_IBPB.call_once(|| {
        let intel = cpuid!(0).eax >= 7 && cpuid!(7, 0).edx & (1 << 26) != 0;
        let amd = cpuid!(0x8000_0000).eax >= 0x8000_0008 && cpuid!(0x8000_0008).ebx & (1 << 12) != 0;
        intel || amd
    })
}

/// Before a vCPU of VM `vm` (its index in the set) runs on this CPU.
pub fn entering_vm(vm: usize) {
    let last = percpu::current().last_vm.swap(vm, Ordering::Relaxed);
    if crate::sched::needs_predictor_barrier(last, vm) && has_ibpb() {
        // SAFETY: PRED_CMD exists (checked above); an IBPB only discards predictions.
        unsafe { Msr::new(IA32_PRED_CMD).write(PRED_CMD_IBPB) };
        BARRIERS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Barriers issued so far, on all CPUs.
pub fn barriers() -> u64 {
    BARRIERS.load(Ordering::Relaxed)
}
