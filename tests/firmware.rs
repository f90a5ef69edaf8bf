//! The hypervisor image boots through both firmware paths and reports the virtualization the
//! platform offers: SVM with NPT under QEMU TCG, VMX with EPT under Bochs.

use integration_tests::{boot, Firmware, Log, Platform, RunStatus};

const SVM_WITH_NPT: &[&str] = &["cpu: AuthenticAMD", "SVM rev 1: NPT yes", "ASIDs 16", "NRIP-save no"];

fn assert_clean_bring_up(log: &Log<'_>) {
    log.contains("hypervisor 0.1.0 starting")
        .line_with_all(&["memory:", "MiB usable", "MiB free after reservations", "heap"])
        .contains("ramdisk: 124 bytes, 0 files")
        .contains("smp: 2 host CPUs running (2 listed in the MADT)")
        .ended(RunStatus::Success, "no VMs configured");
}

#[test]
fn bios_image_under_qemu_tcg_reports_svm_with_npt() {
    let outcome = boot(Platform::Tcg, Firmware::Bios, boot::HYPERVISOR_KERNEL);
    let log = Log(&outcome);
    log.line_with_all(SVM_WITH_NPT);
    assert_clean_bring_up(&log);
    log.emulator_exit_contains("isa-debug-exit with the success code");
}

#[test]
fn uefi_image_under_qemu_tcg_reports_svm_with_npt() {
    let outcome = boot(Platform::Tcg, Firmware::Uefi, boot::HYPERVISOR_KERNEL);
    let log = Log(&outcome);
    log.line_with_all(SVM_WITH_NPT);
    assert_clean_bring_up(&log);
    log.emulator_exit_contains("isa-debug-exit with the success code");
}

#[test]
fn bios_image_under_bochs_reports_vmx_with_ept_vpid_and_unrestricted_guest() {
    let outcome = boot(Platform::Bochs, Firmware::Bios, boot::HYPERVISOR_KERNEL);
    let log = Log(&outcome);
    log.line_with_all(&["cpu: GenuineIntel", "VMX: EPT yes", "VPID yes", "unrestricted guest yes"]);
    assert_clean_bring_up(&log);
}

#[test]
fn cpu_without_virtualization_is_reported_and_the_run_fails() {
    let mut config = boot::RunConfig::new(Platform::Tcg, Firmware::Bios, boot::HYPERVISOR_KERNEL);
    config.cpu_model = Some("qemu64,-svm".into());
    config.timeout = integration_tests::TIMEOUT;
    let outcome = boot::run(&config).expect("run under QEMU TCG");
    Log(&outcome)
        .line_with_all(&["cpu: AuthenticAMD", "no VMX or SVM"])
        .contains("virtualization unusable: the CPU offers neither VMX nor SVM")
        .ended(RunStatus::Failure, "virtualization unusable")
        .emulator_exit_contains("isa-debug-exit with the failure code");
}
