//! Starting the other host CPUs: the MADT lists them, INIT-SIPI-SIPI wakes each one into a
//! real-mode trampoline below 1 MiB, which climbs to long mode on the hypervisor's own page
//! tables and calls [`ap_main`] on a stack of its own.
//!
//! The trampoline's page tables are a copy of the hypervisor's top level with entry 0 replaced
//! by an identity map of the first 2 MiB, which the trampoline needs for the instant paging
//! comes on; [`ap_main`] switches to the hypervisor's real CR3 right away. CPUs start one at a
//! time, so the trampoline's parameter slots are reused.

use alloc::format;
use alloc::string::String;
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::registers::control::Cr3;
use x86_64::registers::model_specific::Msr;

use super::gdt::{self, CpuTables};
use super::{apic, idt, memory, percpu, serial, xstate};
use crate::host_acpi;
use crate::mm::frames::FRAME_SIZE;
use crate::vm::control_regs::{CR4_VMXE, EFER_LME, EFER_NXE, EFER_SCE};

/// Stack of each application processor (as large as the boot CPU's).
const AP_STACK_BYTES: u64 = 256 * 1024;
/// How long one CPU may take from the first SIPI to `online`.
const AP_START_TIMEOUT_US: u64 = 2_000_000;
/// Pages the trampoline needs below 1 MiB: code and data, then PML4, PDPT and PD.
pub const TRAMPOLINE_PAGES: u64 = 4;

const IA32_EFER: u32 = 0xc000_0080;
const IA32_PAT: u32 = 0x277;

// Layout of the trampoline page: a short jump over the data, the data at fixed offsets, then
// the code. The boot CPU patches every address the code needs, because the page's location is
// known only at run time.
const GDT_OFFSET: u64 = 8;
const GDTR_OFFSET: u64 = 40;
const BOOT_CR3_OFFSET: u64 = 48;
const EFER_OFFSET: u64 = 52;
const PROTECTED_ENTRY_OFFSET: u64 = 56;
const LONG_ENTRY_OFFSET: u64 = 60;
const PARAMS_OFFSET: u64 = 64;
/// Top of the trampoline's own stack (real and protected mode), inside its page.
const STACK_OFFSET: u64 = 0xff0;

// The trampoline, assembled into the image and copied to its page at run time. Real mode:
// CS = page >> 4, IP = 0. ESI keeps the page's linear address through every mode.
global_asm!(
    ".pushsection .rodata.hv_ap_trampoline, \"a\"",
    ".balign 16",
    ".global hv_ap_trampoline_start",
    ".global hv_ap_trampoline_end",
    ".global hv_ap_protected",
    ".global hv_ap_long",
    "hv_ap_trampoline_start:",
    ".byte 0xeb, 0x5e",
    ".fill 6, 1, 0",
    ".quad 0",
    ".quad 0x00cf9a000000ffff",
    ".quad 0x00cf92000000ffff",
    ".quad 0x00af9a000000ffff",
    ".word 31",
    ".long 0",
    ".fill 2, 1, 0",
    ".long 0, 0, 0, 0",
    ".quad 0, 0, 0, 0",
    ".code16",
    "cli",
    "cld",
    "mov ax, cs",
    "mov ds, ax",
    "mov ss, ax",
    "mov sp, {stack}",
    "xor esi, esi",
    "mov si, ax",
    "shl esi, 4",
    "lgdt [{gdtr}]",
    "mov eax, cr0",
    "or eax, 1",
    "mov cr0, eax",
    // Far return to 32-bit code: push selector 0x08 and the linear target, 32 bits each.
    "mov eax, [{protected_entry}]",
    ".byte 0x66, 0x6a, 0x08",
    "push eax",
    ".byte 0x66, 0xcb",
    ".code32",
    "hv_ap_protected:",
    "mov ax, 0x10",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "lea esp, [esi + {stack}]",
    "mov eax, cr4",
    "or eax, 1 << 5",
    "mov cr4, eax",
    "mov eax, [esi + {boot_cr3}]",
    "mov cr3, eax",
    "mov ecx, 0xc0000080",
    "rdmsr",
    "or eax, [esi + {efer}]",
    "wrmsr",
    "mov eax, cr0",
    "or eax, 0x80010001",
    "mov cr0, eax",
    "mov eax, [esi + {long_entry}]",
    "push 0x18",
    "push eax",
    "retf",
    ".code64",
    "hv_ap_long:",
    "xor eax, eax",
    "mov ds, ax",
    "mov es, ax",
    "mov ss, ax",
    "mov esi, esi",
    // Parameters: real CR3, stack top, argument, entry.
    "mov rax, [rsi + {params}]",
    "mov rsp, [rsi + {params} + 8]",
    "mov rdi, [rsi + {params} + 16]",
    "mov rdx, [rsi + {params} + 24]",
    "jmp rdx",
    "hv_ap_trampoline_end:",
    ".popsection",
    // In the image proper: switch to the real CR3 (the trampoline's identity map is gone
    // after this), then call ap_main with a clean frame.
    ".pushsection .text.hv_ap_entry, \"ax\"",
    ".global hv_ap_entry",
    "hv_ap_entry:",
    "mov cr3, rax",
    "xor ebp, ebp",
    "call {main}",
    "ud2",
    ".popsection",
    main = sym ap_main,
    stack = const STACK_OFFSET,
    gdtr = const GDTR_OFFSET,
    protected_entry = const PROTECTED_ENTRY_OFFSET,
    boot_cr3 = const BOOT_CR3_OFFSET,
    efer = const EFER_OFFSET,
    long_entry = const LONG_ENTRY_OFFSET,
    params = const PARAMS_OFFSET,
);

unsafe extern "C" {
    static hv_ap_trampoline_start: u8;
    static hv_ap_trampoline_end: u8;
    static hv_ap_protected: u8;
    static hv_ap_long: u8;
    static hv_ap_entry: u8;
}

/// Control and feature state the boot CPU runs with; each AP copies it.
static BOOT_CR0: AtomicU64 = AtomicU64::new(0);
static BOOT_CR4: AtomicU64 = AtomicU64::new(0);
static BOOT_PAT: AtomicU64 = AtomicU64::new(0);

/// What an application processor does once it is up: enable virtualization, then run vCPUs.
static AP_WORK: spin::Once<fn(&'static percpu::PerCpu) -> !> = spin::Once::new();

/// Sets up the boot CPU's per-CPU block (call once, before anything reads [`percpu::current`]).
pub fn init_boot_cpu() {
    let block = percpu::create(0, apic::local_apic_id(), gdt::boot_tables());
    percpu::install(block);
    block.online.store(true, Ordering::Release);
}

fn symbol_offset(symbol: *const u8) -> u64 {
    symbol as u64 - (&raw const hv_ap_trampoline_start) as u64
}

/// Starts every other CPU the MADT lists; each runs `work` once up. Returns a line for the
/// start-up report. Any failure leaves the machine running on the CPUs that did start.
pub fn start_application_processors(rsdp: Option<u64>, work: fn(&'static percpu::PerCpu) -> !) -> String {
    AP_WORK.call_once(|| work);
    match start_all(rsdp) {
        Ok(listed) => format!("{} host CPUs running ({} listed in the MADT)", percpu::online_count(), listed),
        Err(why) => format!("{} host CPU running ({why})", percpu::online_count()),
    }
}

fn start_all(rsdp: Option<u64>) -> Result<usize, String> {
    let rsdp = rsdp.ok_or("the firmware gave no ACPI RSDP")?;
    let map = memory::phys_map();
    let read = |address: u64, buf: &mut [u8]| memory::read_phys(address, buf);
    let ids = host_acpi::processor_apic_ids(&read, rsdp).map_err(|e| format!("ACPI: {e}"))?;
    let boot_id = percpu::current().apic_id;
    let others: alloc::vec::Vec<u32> = ids.iter().copied().filter(|&id| id != boot_id).collect();
    if others.is_empty() {
        return Ok(ids.len());
    }
    let trampoline = memory::trampoline_area().ok_or("no free memory below 1 MiB for the start-up code")?;
    let entry = (&raw const hv_ap_entry) as u64;
    if (entry >> 39) & 0x1ff == 0 {
        return Err(
            "the hypervisor is mapped in the first 512 GiB, where the start-up code needs its identity map".into()
        );
    }
    prepare_trampoline(trampoline, &map);
    // SAFETY: reading control registers and these MSRs has no side effects.
    unsafe {
        let (cr0, cr4): (u64, u64);
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
        BOOT_CR0.store(cr0, Ordering::Relaxed);
        BOOT_CR4.store(cr4 & !CR4_VMXE, Ordering::Relaxed);
        BOOT_PAT.store(Msr::new(IA32_PAT).read(), Ordering::Relaxed);
    }
    let (cr3_frame, cr3_flags) = Cr3::read_raw();
    let real_cr3 = cr3_frame.start_address().as_u64() | u64::from(cr3_flags);
    log::info!("smp: trampoline at {trampoline:#x}, host CR3 {real_cr3:#x}");
    for (n, &apic_id) in others.iter().enumerate() {
        let index = n + 1;
        if index >= percpu::MAX_CPUS {
            log::warn!("smp: only {} CPUs are supported; the others stay parked", percpu::MAX_CPUS);
            break;
        }
        let stack = memory::alloc_zeroed(AP_STACK_BYTES / FRAME_SIZE, FRAME_SIZE)
            .ok_or_else(|| format!("out of memory for CPU {index}'s stack"))?;
        let stack_top = map.virt(stack) + AP_STACK_BYTES;
        let block = percpu::create(index, apic_id, CpuTables::for_application_processor());
        let params = [real_cr3, stack_top, block as *const percpu::PerCpu as u64, entry];
        let params_at = map.virt(trampoline + PARAMS_OFFSET) as *mut u64;
        for (i, value) in params.into_iter().enumerate() {
            // SAFETY: the trampoline page is ours (reserved below 1 MiB) and the slots lie
            // inside the copied code; no CPU runs the trampoline while they are written.
            unsafe { core::ptr::write_volatile(params_at.add(i), value) };
        }
        let page = (trampoline >> 12) as u8;
        apic::send_init(apic_id);
        delay_us(10_000);
        apic::send_startup(apic_id, page);
        delay_us(200);
        if !block.online.load(Ordering::Acquire) {
            apic::send_startup(apic_id, page);
        }
        let start = serial::uptime_micros();
        while !block.online.load(Ordering::Acquire) {
            if serial::uptime_micros() - start > AP_START_TIMEOUT_US {
                return Err(format!("CPU with APIC ID {apic_id} did not start within 2 s"));
            }
            core::hint::spin_loop();
        }
    }
    Ok(ids.len())
}

/// Copies the trampoline to its page and builds its page tables: the hypervisor's top level
/// with an identity map of the first 2 MiB in entry 0.
fn prepare_trampoline(trampoline: u64, map: &memory::PhysMap) {
    let start = (&raw const hv_ap_trampoline_start) as u64;
    let len = (&raw const hv_ap_trampoline_end) as u64 - start;
    assert!(len <= FRAME_SIZE, "the AP trampoline outgrew its page");
    let (pml4, pdpt, pd) = (trampoline + FRAME_SIZE, trampoline + 2 * FRAME_SIZE, trampoline + 3 * FRAME_SIZE);
    let page = |phys: u64| map.virt(phys) as *mut u64;
    let (root, _) = Cr3::read();
    // SAFETY: the four pages below 1 MiB belong to the trampoline (reserved by memory::init,
    // never handed out); the source is the hypervisor's image and its live PML4, read only.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, page(trampoline) as *mut u8, len as usize);
        core::ptr::copy_nonoverlapping(page(root.start_address().as_u64()), page(pml4), 512);
        const PRESENT_WRITABLE: u64 = 0b11;
        const HUGE: u64 = 1 << 7;
        core::ptr::write_bytes(page(pdpt), 0, 512);
        core::ptr::write_bytes(page(pd), 0, 512);
        page(pml4).write_volatile(pdpt | PRESENT_WRITABLE);
        page(pdpt).write_volatile(pd | PRESENT_WRITABLE);
        page(pd).write_volatile(PRESENT_WRITABLE | HUGE);
        let patch = |offset: u64, value: u64| (map.virt(trampoline + offset) as *mut u32).write_unaligned(value as u32);
        patch(GDTR_OFFSET + 2, trampoline + GDT_OFFSET);
        patch(BOOT_CR3_OFFSET, pml4);
        // Long mode, and NX and SYSCALL as the boot CPU has them (NX-marked entries need NXE).
        patch(EFER_OFFSET, Msr::new(IA32_EFER).read() & (EFER_SCE | EFER_NXE) | EFER_LME);
        patch(PROTECTED_ENTRY_OFFSET, trampoline + symbol_offset(&raw const hv_ap_protected));
        patch(LONG_ENTRY_OFFSET, trampoline + symbol_offset(&raw const hv_ap_long));
    }
}

fn delay_us(us: u64) {
    let start = serial::uptime_micros();
    while serial::uptime_micros() - start < us {
        core::hint::spin_loop();
    }
}

/// First Rust code on an application processor: the boot CPU's control state, this CPU's
/// GDT, TSS, IDT, per-CPU block and local APIC, then the work it was started for.
extern "C" fn ap_main(block: &'static percpu::PerCpu) -> ! {
    // First, so that even a fault during the rest of bring-up is reported with this CPU's index.
    percpu::install(block);
    // SAFETY: the boot CPU runs with these values, and every CPU of the machine shares its
    // features; VMXE is left out (virtualization is enabled per CPU later).
    unsafe {
        asm!("mov cr0, {}", in(reg) BOOT_CR0.load(Ordering::Relaxed), options(nostack));
        asm!("mov cr4, {}", in(reg) BOOT_CR4.load(Ordering::Relaxed), options(nostack));
        Msr::new(IA32_PAT).write(BOOT_PAT.load(Ordering::Relaxed));
    }
    gdt::load(block.tables);
    idt::init();
    apic::init_this_cpu();
    xstate::enable();
    let work = *AP_WORK.get().expect("APs start only after their work is set");
    work(block)
}
