//! Several VMs at once on several host CPUs: they start together, their console lines
//! interleave without ever mixing, a VM that spins with interrupts off holds back nobody and is
//! ended by its `timeout`, and Linux still boots next to such VMs.

use std::sync::OnceLock;

use integration_tests::{boot_vms, Firmware, Log, Platform, RunOutcome, RunStatus};

fn concurrent(platform: Platform) -> &'static RunOutcome {
    static SVM: OnceLock<RunOutcome> = OnceLock::new();
    static VMX: OnceLock<RunOutcome> = OnceLock::new();
    let cell = if platform == Platform::Bochs { &VMX } else { &SVM };
    cell.get_or_init(|| boot_vms(platform, Firmware::Bios, "concurrent.vms"))
}

/// The printing VMs' lines alternate: each one printed while the other was still running.
fn consoles_interleave_line_by_line(platform: Platform) {
    let log = Log(concurrent(platform));
    log.contains("[ticks-a] case ticks: ok\n").contains("[ticks-b] case ticks: ok\n");
    let ticks = log.lines_starting("[ticks-");
    let first = |vm: &str| ticks.iter().position(|line| line.starts_with(vm)).expect("the VM printed");
    let last = |vm: &str| ticks.iter().rposition(|line| line.starts_with(vm)).expect("the VM printed");
    assert!(
        first("[ticks-b]") < last("[ticks-a]") && first("[ticks-a]") < last("[ticks-b]"),
        "the two VMs did not run at the same time:\n{}",
        ticks.join("\n")
    );
    // No line carries two prefixes, and every tick line is whole.
    for line in log.0.serial.lines() {
        assert!(line.matches("[ticks-").count() <= 1, "a line mixes two VMs: {line:?}");
        if line.contains("] tick ") {
            assert!(line.starts_with("[ticks-"), "a tick line does not start with its VM's prefix: {line:?}");
        }
    }
}

/// The spinner never exits on its own: the host timer takes its CPU back every slice, its
/// timeout ends it; the VM that halts with interrupts on waits (console input could still wake
/// it) until its timeout too.
fn a_spinning_vm_is_ended_by_its_timeout_and_holds_back_nobody(platform: Platform) {
    let outcome = concurrent(platform);
    let log = Log(outcome);
    log.vm_ended("ticks-a", "debug-exit")
        .vm_ended("ticks-b", "debug-exit")
        .vm_ended("spinner", "timeout")
        .contains("detail=\"still running after its timeout of 4 s\"")
        .vm_ended("sleeper", "timeout")
        .ended(RunStatus::Failure, "4 VMs ran, 2 failed");
    // While the spinner held a CPU, the printing VMs kept printing.
    let spin_start = outcome.serial.find("[spinner] case spin: spinning").expect("the spinner started");
    let spin_end = outcome.serial.find("VM-END vm=spinner ").expect("the spinner ended");
    let while_spinning = outcome.serial[spin_start..spin_end].matches("] tick ").count();
    assert!(while_spinning >= 2, "only {while_spinning} tick lines while the spinner ran: it held back the others");
}

#[test]
fn svm_consoles_interleave_line_by_line() {
    consoles_interleave_line_by_line(Platform::Tcg);
}

#[test]
fn vmx_consoles_interleave_line_by_line() {
    consoles_interleave_line_by_line(Platform::Bochs);
}

#[test]
fn svm_spinning_vm_is_ended_by_its_timeout() {
    a_spinning_vm_is_ended_by_its_timeout_and_holds_back_nobody(Platform::Tcg);
}

#[test]
fn vmx_spinning_vm_is_ended_by_its_timeout() {
    a_spinning_vm_is_ended_by_its_timeout_and_holds_back_nobody(Platform::Bochs);
}
