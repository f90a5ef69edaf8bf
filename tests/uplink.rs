//! The uplink without a NIC: Bochs has no virtio-net device, so a VM on the network `uplink`
//! is refused with a reason naming the network, and the other VMs of the set run. (The uplink
//! itself, under QEMU, is tested with Linux in `linux.rs`.)

use std::path::Path;

use integration_tests::{Firmware, Log, Platform, RunStatus, HOST_CPUS, TIMEOUT};

#[test]
fn vmx_a_vm_on_the_uplink_is_refused_without_a_nic_and_the_others_run() {
    let set = "[vm web]\nkernel = real-mode-guest.elf\nentry = real\nmemory = 2M\nnet = uplink ip=10.0.2.15\n\
               [vm real-mode]\nkernel = real-mode-guest.elf\nentry = real\nmemory = 2M\n";
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images");
    let mut config = boot::RunConfig::new(Platform::Bochs, Firmware::Bios, boot::HYPERVISOR_KERNEL);
    config.timeout = TIMEOUT;
    config.cpus = HOST_CPUS;
    config.ramdisk = boot::ramdisk_files_for(set, &base).unwrap();
    // Forwarding is QEMU's: on Bochs it is refused before anything starts.
    config.forwards = vec![boot::Forward::parse("8080:web:80").unwrap()];
    let e = boot::run(&config).unwrap_err();
    assert!(matches!(e, boot::BootError::Usage(_)), "{e}");
    assert!(e.to_string().contains("Bochs has no virtio-net device"), "{e}");

    config.forwards.clear();
    let outcome = boot::run(&config).unwrap_or_else(|e| panic!("could not run the VM set on Bochs: {e}"));
    Log(&outcome)
        .line_with_all(&["INFO  no host NIC"])
        .line_with_all(&[
            "VM-END vm=web reason=error ",
            "net uplink: the machine has no NIC to bridge the network to",
            "Bochs has none",
        ])
        .contains("[real-mode] real-mode: ok\n")
        .contains("VM-END vm=real-mode reason=debug-exit status=0")
        .ended(RunStatus::Failure, "2 VMs ran, 1 failed: web (");
}
