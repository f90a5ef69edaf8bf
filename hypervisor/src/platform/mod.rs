//! The bare-metal layer: host bring-up on top of what the bootloader hands over.

pub mod apic;
pub mod ata_disk;
pub mod cmos;
pub mod cpu;
pub mod debug_regs;
pub mod entropy;
pub mod exit;
pub mod fw_cfg;
pub mod gdt;
pub mod guest;
pub mod host_disk;
pub mod host_nic;
pub mod idt;
pub mod memory;
pub mod pci_config;
pub mod percpu;
pub mod scheduler;
pub mod serial;
pub mod smp;
pub mod speculation;
pub mod svm;
pub mod virtio_disk;
pub mod virtio_hal;
pub mod virtio_nic;
pub mod vmx;
pub mod xstate;

use alloc::format;
use alloc::string::String;
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
    /// The firmware's ACPI RSDP (where the MADT lists the other CPUs).
    pub rsdp: Option<u64>,
}

/// Brings the host up: serial log, GDT/TSS, IDT, frames, heap, CPU identification.
pub fn bring_up(boot_info: &'static mut BootInfo) -> Host {
    serial::init();
    log::info!("hypervisor {} starting", env!("CARGO_PKG_VERSION"));
    gdt::load(gdt::boot_tables());
    idt::init();
    let memory = memory::init(boot_info);
    log::info!(
        "memory: {} MiB usable, {} MiB free after reservations, heap {} KiB",
        memory.usable_bytes >> 20,
        memory::FRAMES.lock().free_bytes() >> 20,
        memory.heap_bytes >> 10
    );
    if serial::tsc_per_microsecond() != 0 {
        // Leaf 0x8000_0007 EDX bit 8: the guests' invariant-TSC bit follows it.
        let invariant = raw_cpuid::cpuid!(0x8000_0000).eax >= 0x8000_0007
            && raw_cpuid::cpuid!(0x8000_0007).edx & crate::vm::cpuid::EXT7_EDX_INVARIANT_TSC != 0;
        log::info!(
            "tsc: {} MHz (calibrated against the PIT), {}",
            serial::tsc_per_microsecond(),
            if invariant { "invariant" } else { "not invariant: guests get kvm-clock as their clock" }
        );
    }
    // Under QEMU the run tool passes the ramdisk through fw_cfg (read by DMA); otherwise it is
    // the boot loader's.
    let ramdisk = match (fw_cfg::ramdisk(), boot_info.ramdisk_addr.into_option()) {
        (Some(ramdisk), _) => {
            log::info!("ramdisk: read from QEMU's fw_cfg");
            ramdisk
        }
        // SAFETY: the bootloader maps the ramdisk at this address for `ramdisk_len` bytes, and
        // its frames are reserved in the frame allocator, so nothing overwrites it.
        (None, Some(addr)) => unsafe { core::slice::from_raw_parts(addr as *const u8, boot_info.ramdisk_len as usize) },
        (None, None) => &[],
    };
    let cpu = cpu::identify();
    log::info!("{cpu}");
    log::info!(
        "speculation: {}",
        if speculation::has_ibpb() {
            "an IBPB whenever a CPU goes from one VM to another"
        } else {
            "no IBPB on this CPU: VMs that take turns on a CPU share its branch predictors"
        }
    );
    if let Err(e) = apic::init() {
        exit::end(RunStatus::Failure, &format!("host local APIC: {e}"));
    }
    smp::init_boot_cpu();
    Host { cpu, ramdisk, rsdp: boot_info.rsdp_addr.into_option() }
}

/// The backend every CPU enables (chosen by the boot CPU).
static BACKEND: spin::Once<guest::Backend> = spin::Once::new();

fn enable_backend(backend: guest::Backend) -> Result<(), String> {
    match backend {
        guest::Backend::Svm => svm::enable().map_err(|e| format!("{e}")),
        guest::Backend::Vmx => vmx::enable().map_err(|e| format!("{e}")),
    }
}

/// What an application processor does once it is up: virtualization on, then wait for work.
fn application_processor(block: &'static percpu::PerCpu) -> ! {
    let backend = *BACKEND.get().expect("the boot CPU chose the backend before starting APs");
    if let Err(e) = enable_backend(backend) {
        exit::end(RunStatus::Failure, &format!("CPU {}: enabling virtualization: {e}", block.index));
    }
    block.online.store(true, core::sync::atomic::Ordering::Release);
    scheduler::run_cpu()
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
    host_disk::init();
    host_nic::init();
    let config::VmSet { host: host_config, vms } = match ramdisk::find(&files, VM_CONFIG_FILE) {
        None => config::VmSet::default(),
        Some(file) => match core::str::from_utf8(file.data) {
            Err(_) => exit::end(RunStatus::Failure, &format!("{VM_CONFIG_FILE}: not UTF-8 text")),
            Ok(text) => config::parse_set(text)
                .unwrap_or_else(|e| exit::end(RunStatus::Failure, &format!("{VM_CONFIG_FILE}: {e}"))),
        },
    };
    let backend = match host.cpu.virtualization {
        Virtualization::Svm(_) => guest::Backend::Svm,
        Virtualization::Vmx(_) => guest::Backend::Vmx,
        Virtualization::None => exit::end(RunStatus::Failure, "enabling virtualization: no virtualization extension"),
    };
    if let Err(e) = enable_backend(backend) {
        exit::end(RunStatus::Failure, &format!("enabling virtualization: {e}"));
    }
    BACKEND.call_once(|| backend);
    log::info!("smp: {}", smp::start_application_processors(host.rsdp, application_processor));
    if vms.is_empty() {
        log::info!("no VMs configured");
        exit::end(RunStatus::Success, "no VMs configured");
    }
    let needed: u64 = vms.iter().map(|vm| vm.memory).sum();
    let free = memory::FRAMES.lock().free_bytes();
    if needed > free {
        exit::end(
            RunStatus::Failure,
            &format!(
                "the VM set needs {} MiB of guest RAM, but the machine has {} MiB free: give it more memory or the VMs less",
                needed >> 20,
                free >> 20
            ),
        );
    }
    log::info!("running {} VMs at once on {backend:?}, {} MiB of guest RAM", vms.len(), needed >> 20);
    scheduler::begin(vms.iter().map(|vm| vm.name.clone()).collect(), host_config.slice_us, host_config.raw_console);
    // The networks live as long as the run: every VM on one shares its switch.
    let mut networks = crate::vm::network::Networks::new();
    if vms.iter().any(|vm| vm.nics.iter().any(|nic| nic.network == crate::net::UPLINK_NETWORK)) {
        host_nic::bridge(&mut networks);
    }
    for (index, vm) in vms.iter().enumerate() {
        match guest::prepare(backend, index, vm, &files, &mut networks) {
            Ok(tasks) => scheduler::add(tasks, vm.cpus.unwrap_or_else(config::CpuSet::all)),
            Err(e) => scheduler::ended_before_start(index, &vm.name, &crate::vm::VmEnd::Error(e)),
        }
    }
    scheduler::start();
    scheduler::run_cpu()
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::SeqCst) {
        // A panic while reporting a panic, or on a second CPU: the first report is the useful one.
        exit::park();
    }
    exit::claim();
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
