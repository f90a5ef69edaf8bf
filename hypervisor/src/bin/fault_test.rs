//! A test build that faults on purpose right after bring-up, to prove the exception report path:
//! on the second CPU when the machine has one (the boot CPU is then stopped by the report), else
//! on the boot CPU.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
bootloader_api::entry_point!(start, config = &hypervisor::platform::BOOT_CONFIG);

/// Canonical, never mapped by the bootloader (it places everything in the upper half or near the
/// kernel), so reading it raises #PF.
#[cfg(target_os = "none")]
const UNMAPPED: u64 = 0x0000_7ead_beef_0000;

#[cfg(target_os = "none")]
fn start(boot_info: &'static mut bootloader_api::BootInfo) -> ! {
    let host = hypervisor::platform::bring_up(boot_info);
    // An AP faults as soon as it runs Rust code; the boot CPU waits for it to come online,
    // which it never does, and is stopped by the AP's report instead.
    let started = hypervisor::platform::smp::start_application_processors(host.rsdp, |_| fault());
    log::info!("fault test: {started}");
    fault()
}

#[cfg(target_os = "none")]
fn fault() -> ! {
    log::info!("fault test: reading unmapped address {UNMAPPED:#x}");
    // SAFETY: deliberately invalid; the read never completes because the #PF handler ends the run.
    let value = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    panic!("fault test: read of {UNMAPPED:#x} returned {value:#x} instead of faulting");
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the fault-test hypervisor build runs on bare metal: the integration tests boot it");
    std::process::exit(2);
}
