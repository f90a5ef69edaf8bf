//! Host GDT and TSS. The TSS gives the double-fault handler its own stack (IST), so a kernel
//! stack overflow is reported instead of turning into a triple fault.

use spin::Lazy;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot used by the double-fault handler (the IDT stores slot + 1).
pub const DOUBLE_FAULT_IST: u16 = 0;
const IST_STACK_SIZE: usize = 32 * 1024;

#[repr(align(16))]
struct Stack(#[expect(dead_code, reason = "only the address is used")] [u8; IST_STACK_SIZE]);

static mut DOUBLE_FAULT_STACK: Stack = Stack([0; IST_STACK_SIZE]);

static TSS: Lazy<TaskStateSegment> = Lazy::new(|| {
    let mut tss = TaskStateSegment::new();
    let stack_start = VirtAddr::from_ptr(&raw const DOUBLE_FAULT_STACK);
    tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = stack_start + IST_STACK_SIZE as u64;
    tss
});

/// Selectors of the host GDT; VMX and SVM host state will need them.
pub struct Selectors {
    /// 64-bit kernel code.
    pub code: SegmentSelector,
    /// Kernel data (SS, DS, ES).
    pub data: SegmentSelector,
    /// The TSS.
    pub tss: SegmentSelector,
}

static GDT: Lazy<(GlobalDescriptorTable, Selectors)> = Lazy::new(|| {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(&TSS));
    (gdt, Selectors { code, data, tss })
});

/// Loads the GDT, reloads every segment register and the task register.
pub fn init() {
    GDT.0.load();
    let selectors = &GDT.1;
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives forever.
    unsafe {
        CS::set_reg(selectors.code);
        SS::set_reg(selectors.data);
        DS::set_reg(selectors.data);
        ES::set_reg(selectors.data);
        load_tss(selectors.tss);
    }
}

/// The host selectors.
pub fn selectors() -> &'static Selectors {
    &GDT.1
}
