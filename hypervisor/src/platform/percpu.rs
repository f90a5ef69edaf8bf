//! Per-CPU state: one block per host CPU, reached through the GS base of the CPU it belongs to.
//!
//! Everything in a block is touched only by its own CPU (atomics keep that safe without
//! `unsafe impl Sync`), except `online`, which the boot CPU reads while starting the others.
//! No `static mut`: a block is allocated once per CPU and lives for the whole run.

use alloc::boxed::Box;
use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use x86_64::registers::model_specific::Msr;

use super::gdt::CpuTables;

const IA32_GS_BASE: u32 = 0xc000_0101;

/// Host CPUs this build can run (the MADT may list more; the rest stay parked).
pub const MAX_CPUS: usize = 64;

/// One host CPU's private state. `self_address` must stay first: [`current`] reads it at GS:0.
#[repr(C)]
pub struct PerCpu {
    self_address: u64,
    /// Index in start-up order: 0 is the boot CPU.
    pub index: usize,
    /// Local APIC ID (from the MADT, or read from the APIC on the boot CPU).
    pub apic_id: u32,
    /// GDT and TSS with this CPU's double-fault stack.
    pub tables: &'static CpuTables,
    /// VMX operation is on (VMXON done) on this CPU.
    pub vmx_on: AtomicBool,
    /// Physical address of the VMCS current on this CPU (0: none).
    pub current_vmcs: AtomicU64,
    /// The CPU finished bring-up and is ready to run vCPUs.
    pub online: AtomicBool,
    /// When the host timer armed on this CPU fires (TSC; 0: not armed). Backends with a timer
    /// of their own for guest mode (the VMX-preemption timer) program it from this.
    pub timer_deadline_tsc: AtomicU64,
    /// The value last written to this CPU's TSC_AUX for a guest (SVM switches it by hand):
    /// an entry rewrites the MSR only when the next vCPU's value differs.
    pub guest_tsc_aux: AtomicU64,
    /// The VM (index in the set) whose vCPU ran here last, [`crate::sched::NO_VM`] before any:
    /// see `speculation::entering_vm`.
    pub last_vm: AtomicUsize,
}

static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);
static CPUS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Allocates the block for CPU `index` and records it; the CPU itself calls [`install`].
pub fn create(index: usize, apic_id: u32, tables: &'static CpuTables) -> &'static PerCpu {
    assert!(index < MAX_CPUS, "CPU index {index} beyond MAX_CPUS");
    let block: &'static mut PerCpu = Box::leak(Box::new(PerCpu {
        self_address: 0,
        index,
        apic_id,
        tables,
        vmx_on: AtomicBool::new(false),
        current_vmcs: AtomicU64::new(0),
        online: AtomicBool::new(false),
        timer_deadline_tsc: AtomicU64::new(0),
        guest_tsc_aux: AtomicU64::new(0),
        last_vm: AtomicUsize::new(crate::sched::NO_VM),
    }));
    block.self_address = block as *const PerCpu as u64;
    CPUS[index].store(block.self_address, Ordering::Release);
    CPU_COUNT.fetch_max(index + 1, Ordering::AcqRel);
    block
}

/// Makes `block` this CPU's: its GS base points at it from now on.
pub fn install(block: &'static PerCpu) {
    // SAFETY: the host never uses GS for anything else (no user mode, no SWAPGS), and the
    // block lives forever; guests get their own GS base through the VMCS/VMCB.
    unsafe { Msr::new(IA32_GS_BASE).write(block.self_address) };
}

/// This CPU's block. Valid once [`install`] ran on this CPU (bring-up does it first thing).
pub fn current() -> &'static PerCpu {
    let address: u64;
    // SAFETY: GS:0 holds the block's own address (installed by `install`, never changed).
    unsafe { asm!("mov {}, gs:[0]", out(reg) address, options(nostack, readonly, preserves_flags)) };
    // SAFETY: the address was stored from a leaked, never-freed `PerCpu`.
    unsafe { &*(address as *const PerCpu) }
}

/// The block of CPU `index`, if it was created.
pub fn cpu(index: usize) -> Option<&'static PerCpu> {
    let address = CPUS.get(index)?.load(Ordering::Acquire);
    // SAFETY: nonzero entries come from `create`, which stores leaked, never-freed blocks.
    (address != 0).then(|| unsafe { &*(address as *const PerCpu) })
}

/// How many CPU blocks exist (online or still starting).
pub fn count() -> usize {
    CPU_COUNT.load(Ordering::Acquire)
}

/// How many CPUs finished bring-up.
pub fn online_count() -> usize {
    (0..count()).filter_map(cpu).filter(|c| c.online.load(Ordering::Acquire)).count()
}
