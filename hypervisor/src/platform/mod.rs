//! The bare-metal layer: host bring-up on top of what the bootloader hands over.

pub mod apic;
pub mod cmos;
pub mod cpu;
pub mod exit;
pub mod gdt;
pub mod guest;
pub mod idt;
pub mod memory;
pub mod serial;
pub mod svm;
pub mod vmx;
pub mod xstate;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::BootInfo;

use crate::ramdisk;
use crate::status::{LineBuf, RunStatus};
use crate::virt::Virtualization;
use crate::vm::config;

/// Asks the bootloader to map all physical memory (frame allocator, heap and, later, guest
/// memory are reached through it) and for a stack large enough for exit handling.
pub static BOOT_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

/// The name of the VM configuration inside the ramdisk.
pub const VM_CONFIG_FILE: &str = "vms.conf";

/// What bring-up produced.
pub struct Host {
    /// The CPU and its virtualization.
    pub cpu: cpu::CpuReport,
    /// The ramdisk with guest images and VM configuration (empty if there is none).
    pub ramdisk: &'static [u8],
}

/// Brings the host up: serial log, GDT/TSS, IDT, frames, heap, CPU identification.
pub fn bring_up(boot_info: &'static mut BootInfo) -> Host {
    serial::init();
    log::info!("hypervisor {} starting", env!("CARGO_PKG_VERSION"));
    gdt::init();
    idt::init();
    let memory = memory::init(boot_info);
    log::info!(
        "memory: {} MiB usable, {} MiB free after reservations, heap {} KiB",
        memory.usable_bytes >> 20,
        memory::FRAMES.lock().free_bytes() >> 20,
        memory.heap_bytes >> 10
    );
    if serial::tsc_per_microsecond() != 0 {
        log::info!("tsc: {} MHz (calibrated against the PIT)", serial::tsc_per_microsecond());
    }
    let ramdisk = match boot_info.ramdisk_addr.into_option() {
        // SAFETY: the bootloader maps the ramdisk at this address for `ramdisk_len` bytes, and
        // its frames are reserved in the frame allocator, so nothing overwrites it.
        Some(addr) => unsafe { core::slice::from_raw_parts(addr as *const u8, boot_info.ramdisk_len as usize) },
        None => &[],
    };
    let cpu = cpu::identify();
    log::info!("{cpu}");
    Host { cpu, ramdisk }
}

/// Checks virtualization, loads the VM set from the ramdisk, runs it and ends the run.
pub fn run(host: Host) -> ! {
    if let Err(why) = host.cpu.virtualization.verdict() {
        log::error!("virtualization unusable: {why}");
        exit::end(RunStatus::Failure, &format!("virtualization unusable: {why}"));
    }
    let files = match ramdisk::parse(host.ramdisk) {
        Ok(files) => files,
        Err(e) => exit::end(RunStatus::Failure, &format!("ramdisk: {e}")),
    };
    log::info!("ramdisk: {} bytes, {} files", host.ramdisk.len(), files.len());
    let vms = match ramdisk::find(&files, VM_CONFIG_FILE) {
        None => Vec::new(),
        Some(file) => match core::str::from_utf8(file.data) {
            Err(_) => exit::end(RunStatus::Failure, &format!("{VM_CONFIG_FILE}: not UTF-8 text")),
            Ok(text) => {
                config::parse(text).unwrap_or_else(|e| exit::end(RunStatus::Failure, &format!("{VM_CONFIG_FILE}: {e}")))
            }
        },
    };
    if vms.is_empty() {
        log::info!("no VMs configured");
        exit::end(RunStatus::Success, "no VMs configured");
    }
    let enabled = match host.cpu.virtualization {
        Virtualization::Svm(_) => svm::enable().map(|()| guest::Backend::Svm).map_err(|e| format!("{e}")),
        Virtualization::Vmx(_) => vmx::enable().map(|()| guest::Backend::Vmx).map_err(|e| format!("{e}")),
        Virtualization::None => Err("no virtualization extension".into()),
    };
    let backend = enabled.unwrap_or_else(|e| exit::end(RunStatus::Failure, &format!("enabling virtualization: {e}")));
    if let Err(e) = apic::init() {
        exit::end(RunStatus::Failure, &format!("host local APIC: {e}"));
    }
    log::info!("running {} VMs on {backend:?}", vms.len());
    let mut failed: Vec<String> = Vec::new();
    for vm in &vms {
        log::info!("vm {}: starting", vm.name);
        let end = guest::run(backend, vm, &files);
        serial::write_line(&end.end_line(&vm.name));
        if !end.is_clean() {
            failed.push(format!("{} ({end})", vm.name));
        }
    }
    if failed.is_empty() {
        exit::end(RunStatus::Success, &format!("{} VMs ran, all ended cleanly", vms.len()))
    }
    exit::end(RunStatus::Failure, &format!("{} VMs ran, {} failed: {}", vms.len(), failed.len(), failed.join("; ")))
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::SeqCst) {
        // A panic while reporting a panic: the first report is the useful one.
        loop {
            x86_64::instructions::hlt();
        }
    }
    let mut reason = LineBuf::<200>::new();
    match info.location() {
        Some(l) => {
            let _ = write!(reason, "panic at {}:{}:{}: {}", l.file(), l.line(), l.column(), info.message());
        }
        None => {
            let _ = write!(reason, "panic: {}", info.message());
        }
    }
    serial::emergency_write(format_args!("\nPANIC: {}\n", reason.as_str()));
    exit::end(RunStatus::Failure, reason.as_str())
}
