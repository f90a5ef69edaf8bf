//! A host fault is reported with the vector, error code and every register, and ends the run
//! with a failure status.

use integration_tests::{boot, Firmware, Log, Platform, RunStatus};

fn assert_page_fault_report(log: &Log<'_>) {
    log.contains("fault test: reading unmapped address 0x7eadbeef0000")
        .contains("EXCEPTION #PF page fault (vector 14) on CPU 1, error code 0x0")
        .contains("page fault: not-present page on read in supervisor mode at address 0x00007eadbeef0000")
        .line_with_all(&["RIP=0x", "CS=0x0008", "RFLAGS=0x", "RSP=0x", "SS=0x0010"])
        .line_with_all(&["RAX=0x00007eadbeef0000", "RBX=0x", "RCX=0x", "RDX=0x"])
        .line_with_all(&["R13=0x", "R14=0x", "R15=0x"])
        .line_with_all(&["CR0=0x", "CR2=0x00007eadbeef0000", "CR3=0x", "CR4=0x"])
        .ended(RunStatus::Failure, "host exception #PF page fault (vector 14) at RIP 0x");
    // One report: the boot CPU, stopped by the AP's report, neither reports nor ends the run.
    assert_eq!(log.0.serial.matches("EXCEPTION ").count(), 1, "exactly one exception report");
    assert_eq!(log.0.serial.matches("HV-END ").count(), 1, "exactly one end line");
}

#[test]
fn fault_test_build_under_qemu_reports_the_page_fault_and_fails() {
    let outcome = boot(Platform::Tcg, Firmware::Bios, boot::FAULT_TEST_KERNEL);
    let log = Log(&outcome);
    assert_page_fault_report(&log);
    log.emulator_exit_contains("isa-debug-exit with the failure code");
}

#[test]
fn fault_test_build_under_bochs_reports_the_page_fault_and_fails() {
    let outcome = boot(Platform::Bochs, Firmware::Bios, boot::FAULT_TEST_KERNEL);
    assert_page_fault_report(&Log(&outcome));
}
