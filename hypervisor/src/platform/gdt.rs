//! Host GDT and TSS, one pair per CPU. The TSS gives the double-fault handler its own stack
//! (IST), so a kernel stack overflow is reported instead of turning into a triple fault.
//!
//! Every CPU's GDT has the same layout, so the selectors are the same everywhere; only the
//! TSS (and with it the double-fault stack) differs.

use alloc::boxed::Box;
use alloc::vec;

use spin::Lazy;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::PrivilegeLevel;
use x86_64::VirtAddr;

/// IST slot used by the double-fault handler (the IDT stores slot + 1).
pub const DOUBLE_FAULT_IST: u16 = 0;
const IST_STACK_SIZE: usize = 32 * 1024;

#[repr(align(16))]
struct Stack(#[expect(dead_code, reason = "only the address is used")] [u8; IST_STACK_SIZE]);

/// The boot CPU's double-fault stack: it must exist before the heap does. Only its address is
/// taken; the CPU writes it when a double fault arrives.
static mut BOOT_DOUBLE_FAULT_STACK: Stack = Stack([0; IST_STACK_SIZE]);

/// Selectors of the host GDT; VMX and SVM host state need them.
pub struct Selectors {
    /// 64-bit kernel code.
    pub code: SegmentSelector,
    /// Kernel data (SS, DS, ES).
    pub data: SegmentSelector,
    /// The TSS.
    pub tss: SegmentSelector,
}

/// One CPU's GDT and TSS.
pub struct CpuTables {
    gdt: GlobalDescriptorTable,
    tss: &'static TaskStateSegment,
}

impl CpuTables {
    /// Tables around `tss`.
    fn new(tss: &'static TaskStateSegment) -> Self {
        let mut gdt = GlobalDescriptorTable::new();
        gdt.append(Descriptor::kernel_code_segment());
        gdt.append(Descriptor::kernel_data_segment());
        gdt.append(Descriptor::tss_segment(tss));
        CpuTables { gdt, tss }
    }

    /// Tables for an application processor, with a double-fault stack from the heap.
    pub fn for_application_processor() -> &'static CpuTables {
        let stack: &'static mut [u8] = vec![0u8; IST_STACK_SIZE].leak();
        let top = VirtAddr::from_ptr(stack.as_ptr()) + IST_STACK_SIZE as u64;
        let tss = Box::leak(Box::new(task_state(top.align_down(16u64))));
        Box::leak(Box::new(CpuTables::new(tss)))
    }

    /// Address of this CPU's TSS (for the VMX host-state area).
    pub fn tss_base(&self) -> u64 {
        self.tss as *const TaskStateSegment as u64
    }
}

/// A TSS whose double-fault IST entry is `double_fault_stack_top`.
fn task_state(double_fault_stack_top: VirtAddr) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = double_fault_stack_top;
    tss
}

static BOOT_TSS: Lazy<TaskStateSegment> =
    Lazy::new(|| task_state(VirtAddr::from_ptr(&raw const BOOT_DOUBLE_FAULT_STACK) + IST_STACK_SIZE as u64));
static BOOT_TABLES: Lazy<CpuTables> = Lazy::new(|| CpuTables::new(&BOOT_TSS));

static SELECTORS: Selectors = Selectors {
    code: SegmentSelector::new(1, PrivilegeLevel::Ring0),
    data: SegmentSelector::new(2, PrivilegeLevel::Ring0),
    tss: SegmentSelector::new(3, PrivilegeLevel::Ring0),
};

/// The boot CPU's tables (built without the heap, which does not exist yet at that point).
pub fn boot_tables() -> &'static CpuTables {
    &BOOT_TABLES
}

/// Loads `tables` on this CPU, reloads every segment register and the task register.
pub fn load(tables: &'static CpuTables) {
    tables.gdt.load();
    // SAFETY: the selectors index the descriptors `CpuTables::new` appends in this order, in a
    // GDT that lives forever; the TSS descriptor is not yet busy on this CPU.
    unsafe {
        CS::set_reg(SELECTORS.code);
        SS::set_reg(SELECTORS.data);
        DS::set_reg(SELECTORS.data);
        ES::set_reg(SELECTORS.data);
        load_tss(SELECTORS.tss);
    }
}

/// The host selectors (the same on every CPU).
pub fn selectors() -> &'static Selectors {
    &SELECTORS
}
