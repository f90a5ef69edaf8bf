//! The hypervisor image: bring the host up, report the CPU, run the configured VMs.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
bootloader_api::entry_point!(start, config = &hypervisor::platform::BOOT_CONFIG);

#[cfg(target_os = "none")]
fn start(boot_info: &'static mut bootloader_api::BootInfo) -> ! {
    let host = hypervisor::platform::bring_up(boot_info);
    hypervisor::platform::run(host)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on bare metal: build and boot it with scripts/run.sh");
    std::process::exit(2);
}
