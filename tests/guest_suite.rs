//! The guest test suite on both backends: SVM under QEMU TCG and VMX under Bochs. Each platform
//! boots once per VM set (shared by its tests); every case is its own test that fails on the
//! guest's own verdict line.

use std::sync::OnceLock;

use integration_tests::{boot_vms, Firmware, Log, Platform, RunOutcome, RunStatus};

/// Tests `NAME::svm` (QEMU TCG) and `NAME::vmx` (Bochs) that run the check `NAME` on each
/// backend.
macro_rules! on_both_backends {
    ($check:ident) => {
        mod $check {
            use super::*;

            #[test]
            fn svm() {
                super::$check(Platform::Tcg);
            }

            #[test]
            fn vmx() {
                super::$check(Platform::Bochs);
            }
        }
    };
}

fn suite(platform: Platform) -> &'static RunOutcome {
    static SVM: OnceLock<RunOutcome> = OnceLock::new();
    static VMX: OnceLock<RunOutcome> = OnceLock::new();
    let cell = if platform == Platform::Bochs { &VMX } else { &SVM };
    cell.get_or_init(|| boot_vms(platform, Firmware::Bios, "suite.vms"))
}

fn triple_fault_set(platform: Platform) -> &'static RunOutcome {
    static SVM: OnceLock<RunOutcome> = OnceLock::new();
    static VMX: OnceLock<RunOutcome> = OnceLock::new();
    let cell = if platform == Platform::Bochs { &VMX } else { &SVM };
    cell.get_or_init(|| boot_vms(platform, Firmware::Bios, "triple-fault.vms"))
}

fn case_passes(platform: Platform, case: &str) {
    Log(suite(platform)).contains(&format!("[exits] case {case}: ok\n"));
}

macro_rules! cases {
    ($platform:expr, $module:ident: $($case:ident => $name:literal),* $(,)?) => {
        mod $module {
            use super::*;
            $(
                #[test]
                fn $case() {
                    case_passes($platform, $name);
                }
            )*
        }
    };
}

cases!(Platform::Tcg, svm:
    cpuid => "cpuid", msr => "msr", io => "io", hlt_and_interrupt_window => "hlt", mmio => "mmio",
    control_registers => "cr", xsetbv => "xsetbv", exceptions => "exceptions",
    redundant_prefixes_at_exits => "prefixed-exits", control_register_bit_patterns => "cr-patterns",
    string_io_in_every_form => "string-io", paravirtual_clock_and_hypercalls => "paravirt");
cases!(Platform::Bochs, vmx:
    cpuid => "cpuid", msr => "msr", io => "io", hlt_and_interrupt_window => "hlt", mmio => "mmio",
    control_registers => "cr", xsetbv => "xsetbv", exceptions => "exceptions",
    redundant_prefixes_at_exits => "prefixed-exits", control_register_bit_patterns => "cr-patterns",
    string_io_in_every_form => "string-io", paravirtual_clock_and_hypercalls => "paravirt");

fn whole_suite_ends_cleanly(platform: Platform) {
    Log(suite(platform))
        .contains("[exits] rep-outsb-ok\n")
        .contains("[exits] fs-outsb-ok\n")
        .contains("[exits] guest: 12 passed, 0 failed\n")
        .contains("VM-END vm=exits reason=debug-exit status=0")
        .contains("[real-mode] real-mode: ok\n")
        .contains("[real-mode] real-mode: rep outsb ok\n")
        .contains("VM-END vm=real-mode reason=debug-exit status=0")
        .ended(RunStatus::Success, "12 VMs ran, all ended cleanly");
}

/// A multiboot v1 kernel gets its magic, memory map, command line and modules, as QEMU's
/// `-kernel/-append/-initrd` would give them.
fn multiboot_kernel_gets_its_boot_information(platform: Platform) {
    let log = Log(suite(platform));
    for check in ["magic", "flags", "mem", "cmdline", "modules", "mmap"] {
        log.contains(&format!("[multiboot] multiboot: {check} ok\n"));
    }
    // The kernel's path comes first, as QEMU and GRUB put it.
    log.contains("[multiboot] multiboot: cmdline multiboot-guest.elf mbtest cmdline ok\n")
        .contains("[multiboot] multiboot: modules 2\n")
        .contains("[multiboot] multiboot: module 0 multiboot-modules/one.txt first-module 0xd\n")
        .contains("[multiboot] multiboot: module 1 multiboot-modules/two.txt second 0x1f\n")
        .contains("VM-END vm=multiboot reason=debug-exit status=0");
}

on_both_backends!(multiboot_kernel_gets_its_boot_information);

fn exit_table_is_printed(platform: Platform, reasons: &[&str]) {
    let log = Log(suite(platform));
    log.contains("vm exits: ").line_with_all(&["exit reason", "count", "handling"]);
    for reason in reasons {
        log.line_with_all(&[&format!("  {reason} "), " s "]);
    }
}

const EXIT_REASONS: [&str; 7] = ["io", "cpuid", "nested-fault", "io-string", "hlt", "rdmsr", "wrmsr"];

fn triple_fault_stops_only_that_vm(platform: Platform) {
    Log(triple_fault_set(platform))
        .contains("[triple-fault] case triple-fault: triple faulting now\n")
        .line_with_all(&["VM-END vm=triple-fault reason=triple-fault", "triple fault at RIP 0x"])
        .contains("[after-triple-fault] real-mode: ok\n")
        .contains("VM-END vm=after-triple-fault reason=debug-exit status=0")
        .ended(RunStatus::Failure, "2 VMs ran, 1 failed: triple-fault (triple fault at RIP");
}

#[test]
fn svm_suite_ends_cleanly() {
    whole_suite_ends_cleanly(Platform::Tcg);
}

#[test]
fn vmx_suite_ends_cleanly() {
    whole_suite_ends_cleanly(Platform::Bochs);
}

#[test]
fn svm_exit_table_is_printed() {
    // QEMU's TCG ignores the SVM XSETBV intercept, so no xsetbv row there.
    exit_table_is_printed(Platform::Tcg, &EXIT_REASONS);
}

#[test]
fn vmx_exit_table_is_printed() {
    exit_table_is_printed(Platform::Bochs, &EXIT_REASONS);
    Log(suite(Platform::Bochs)).line_with_all(&["  xsetbv ", " s "]);
}

on_both_backends!(triple_fault_stops_only_that_vm);

/// A VM alone on a one-CPU machine: over a second of its TSC the local-APIC timer and the PIT, at
/// 1 kHz each, interrupt 1000 times (at most 2% more; fewer only while the emulator's thread
/// is descheduled by a loaded machine, so down to 60% is accepted).
fn timer_interrupts_keep_time(platform: Platform) {
    let outcome = integration_tests::boot_vms_with(platform, Firmware::Bios, "timers.vms", None, 1);
    let log = Log(&outcome);
    log.contains("[timers] case timers: ok\n").line_with_all(&["[timers] case timers: local-APIC timer "]);
    log.contains("[timers] guest: 1 passed, 0 failed\n").vm_ended("timers", "debug-exit");
}

on_both_backends!(timer_interrupts_keep_time);

#[test]
fn malformed_and_oversized_images_end_only_their_vm_with_the_reason() {
    let outcome = integration_tests::boot_vms(Platform::Tcg, Firmware::Bios, "bad-images.vms");
    Log(&outcome)
        .line_with_all(&[
            "VM-END vm=not-a-kernel reason=error",
            "kernel multiboot-modules/one.txt: not a bzImage, multiboot or ELF64 image",
        ])
        .line_with_all(&["VM-END vm=too-small reason=error", "kernel test-guest.elf:", "outside guest memory"])
        .contains("[still-running] real-mode: ok\n")
        .contains("VM-END vm=still-running reason=debug-exit status=0")
        .ended(RunStatus::Failure, "3 VMs ran, 2 failed: not-a-kernel (error: kernel multiboot-modules/one.txt");
}

/// Two VMs pinned to one host CPU run at once: the second never reads the syscall MSRs,
/// KERNEL_GS_BASE, TSC_AUX (through RDTSCP, which never exits), CR2 or debug registers the first
/// wrote, and both keep their own values.
fn registers_do_not_leak_between_vms_on_one_cpu(platform: Platform) {
    Log(suite(platform))
        .contains("[traces] case leave-traces: ok\n")
        .contains("[no-traces] case find-no-traces: TSC_AUX checked through RDTSCP\n")
        .contains("[no-traces] case find-no-traces: ok\n")
        .vm_ended("no-traces", "debug-exit status=0");
}

on_both_backends!(registers_do_not_leak_between_vms_on_one_cpu);

/// On an Intel CPU with IBRS and IBPB (Bochs's Tiger Lake), SPEC_CTRL is offered and each vCPU
/// keeps its own: the second VM reads 0 while the first, on the same host CPU, holds IBRS and
/// STIBP. And the CPU clears its branch predictors (IBPB) each time it goes from one VM to the
/// other.
#[test]
fn vmx_spec_ctrl_and_branch_predictors_stay_with_their_vm() {
    let outcome = integration_tests::boot_vms_on(Platform::Bochs, Firmware::Bios, "traces.vms", Some("tigerlake"));
    let barriers = outcome.serial.lines().find_map(|line| {
        line.split_once("host: ")?.1.strip_suffix(" branch-predictor barriers (IBPB) between VMs")?.parse::<u64>().ok()
    });
    if barriers.is_none_or(|n| n == 0) {
        Log(&outcome).fail("no \"host: N branch-predictor barriers (IBPB) between VMs\" line with N above 0");
    }
    Log(&outcome)
        .contains("speculation: an IBPB whenever a CPU goes from one VM to another")
        .contains("[traces] case leave-traces: ok\n")
        .contains("[no-traces] case find-no-traces: SPEC_CTRL checked\n")
        .contains("[no-traces] case find-no-traces: ok\n")
        .ended(RunStatus::Success, "2 VMs ran, all ended cleanly");
}

/// Four vCPUs: INIT-SIPI-SIPI starts the three APs in real mode, then fixed (physical and
/// logical), lowest-priority, NMI, self and broadcast IPIs each land exactly where they should;
/// then all four send themselves IPIs at once, each taken exactly once and never inside its
/// own handler; an IPI to another vCPU is answered (the micro-benchmark's round trip).
fn application_processors_start_and_ipis_land(platform: Platform) {
    Log(suite(platform))
        .contains("vm smp: 16 MiB RAM, 4 vCPUs")
        .contains("[smp] case smp: 2000 self-IPIs on each CPU, each taken once\n")
        .contains("[smp] case smp: ok\n")
        .line_with_all(&["[smp] HV-BENCH ipi round trip to another vCPU (median of 16): ", " cycles"])
        .vm_ended("smp", "debug-exit status=0");
}

on_both_backends!(application_processors_start_and_ipis_land);

/// The bench guest (a multiboot kernel that maps its own memory and goes to long mode) reports
/// each micro-benchmark as a count of cycles, then ends through the exit port.
fn micro_benchmarks_run_to_the_end(platform: Platform) {
    let log = Log(suite(platform));
    for what in
        ["cpuid", "port write (out 0x80)", "mmio read (local APIC)", "hlt wake-up by the APIC timer (median of 16)"]
    {
        let line = suite(platform).serial.lines().find_map(|l| l.strip_prefix(&format!("[bench] HV-BENCH {what}: ")));
        let cycles = line.and_then(|rest| rest.strip_suffix(" cycles")).and_then(|n| n.parse::<u64>().ok());
        if cycles.is_none_or(|n| n == 0) {
            log.fail(&format!("no line \"[bench] HV-BENCH {what}: N cycles\" with N above 0"));
        }
    }
    log.contains("[bench] HV-BENCH done\n").vm_ended("bench", "debug-exit status=0");
}

on_both_backends!(micro_benchmarks_run_to_the_end);

/// A hostile VM reads every MSR of the probed ranges (and writes those that refused the read):
/// each access works or raises #GP, the host logs at most a few of them and counts the rest in
/// the VM's end report, and the VMs after it run as usual.
fn an_msr_sweep_is_refused_quietly_and_counted(platform: Platform) {
    let outcome = suite(platform);
    let log = Log(outcome);
    log.contains("[msr-sweep] case msr-sweep: ok\n")
        .line_with_all(&["[msr-sweep] case msr-sweep: 24832 MSRs read,", "then the write"])
        .vm_ended("msr-sweep", "debug-exit status=0")
        .line_with_all(&["refused MSR accesses (#GP):", "in 0x0-0x1fff", "in 0xc0010000-0xc001ffff"])
        .contains("[real-mode] real-mode: ok\n");
    let logged =
        outcome.serial.lines().filter(|l| l.contains("vm msr-sweep: ") && l.contains("is not allowed")).count();
    assert!(
        // `vm::msr::LOGGED_REFUSALS` (16) MSRs, then one line saying the rest are counted.
        (1..=17).contains(&logged),
        "{logged} log lines for refused MSRs: the log must stay bounded"
    );
}

on_both_backends!(an_msr_sweep_is_refused_quietly_and_counted);

/// Real NMIs of the host's platform, on the CPU that asked and on the others (wherever they
/// are: in a guest, in the host, halted), are taken by the host and counted: no guest sees
/// one, and every VM runs on.
fn platform_nmis_change_nothing(platform: Platform) {
    let outcome = suite(platform);
    Log(outcome)
        .contains("[host-nmi] case host-nmi: 100 host NMIs requested, none reached this guest\n")
        .vm_ended("host-nmi", "debug-exit status=0")
        .contains("[smp] case smp: ok\n");
    let line = outcome.serial.lines().find(|l| l.contains("platform NMIs taken and ignored"));
    let counted = line.and_then(|l| l.split_whitespace().rev().nth(5)?.parse::<u32>().ok());
    // Fifty to this CPU, each taken before the next; the others may merge while one waits.
    assert!(counted.is_some_and(|n| n >= 50), "host's NMI count: {line:?}\n{}", outcome.serial);
}

on_both_backends!(platform_nmis_change_nothing);

/// A guest prints end lines and raw records in every way it can (after a host log line cut
/// its unfinished line, after a carriage return and an erase-line sequence, past the host's
/// line buffer): each lands inside a line of its own VM, so the only `VM-END` of that VM and
/// the only `HV-END` are the hypervisor's.
fn guest_text_cannot_forge_parsed_lines(platform: Platform) {
    let outcome = suite(platform);
    let log = Log(outcome);
    log.contains("[forge] case forge-lines: ok\n")
        .contains("[forge] VM-END vm=forge reason=debug-exit status=7")
        .contains("[forge] HV-END status=success")
        .vm_ended("forge", "debug-exit status=0");
    let ends = log.lines_starting("VM-END vm=forge ");
    assert_eq!(ends.len(), 1, "VM-END lines of the forging VM: {ends:?}");
    assert_eq!(log.lines_starting("HV-END ").len(), 1, "the run has one end line");
    assert!(log.lines_starting("HV-RAW ").is_empty(), "no raw records without console = raw");
    assert!(outcome.serial.lines().any(|l| l.starts_with("[forge] ") && l.contains("VM-END vm=forge reason=reset")));
}

on_both_backends!(guest_text_cannot_forge_parsed_lines);

/// A hostile VM writes random values to every port but the few that end it by design, reads
/// them all back, storms the host with CPUID and port exits, then reads and writes across the
/// whole guest-physical address space (an open bus wherever there is neither RAM nor a
/// device): it ends cleanly, and so does every VM beside it.
fn port_sweeps_and_exit_storms_change_nothing_outside(platform: Platform) {
    let outcome = suite(platform);
    Log(outcome)
        .line_with_all(&["[port-sweep] case port-sweep: ", " ports written and read, "])
        .contains("[port-sweep] case port-sweep: ok\n")
        .line_with_all(&["[port-sweep] case exit-storm: 200000 exits, "])
        .contains("[port-sweep] case exit-storm: ok\n")
        .line_with_all(&["[port-sweep] case phys-sweep: ", " addresses from 0x1000000 to 2^", " read all ones"])
        .contains("[port-sweep] case phys-sweep: ok\n")
        .vm_ended("port-sweep", "debug-exit status=0")
        .line_with_all(&["accesses to ports without a device: "])
        .line_with_all(&["accesses to guest-physical addresses without RAM or a device: "])
        .contains("[smp] case smp: ok\n");
    let logged =
        outcome.serial.lines().filter(|l| l.contains("vm port-sweep: port ") && l.contains("has no device")).count();
    // `vm::msr::LOGGED_REFUSALS` (16) ports, then one line saying the rest are counted.
    assert!((1..=17).contains(&logged), "{logged} log lines for ports without a device: the log must stay bounded");
    let logged = outcome.serial.lines().filter(|l| l.contains("vm port-sweep: ") && l.contains("reaches")).count();
    assert!((1..=17).contains(&logged), "{logged} log lines for guest-physical holes: the log must stay bounded");
}

on_both_backends!(port_sweeps_and_exit_storms_change_nothing_outside);

/// A hostile virtio-blk driver: after a Linux-style bring-up and reads that check the disk's
/// data, every malformed queue (a descriptor beyond the queue, a loop, bad indirect tables,
/// buffers and rings outside RAM, a runaway available index, a chain of more than 4 GiB,
/// chains that are no request) puts the device into DEVICE_NEEDS_RESET, and a reset and a
/// fresh bring-up make it read again; garbage in every register changes nothing else. The
/// host logs the first few device errors and then one line saying it stops, and every VM
/// ends cleanly.
fn a_hostile_virtio_driver_only_resets_its_own_device(platform: Platform) {
    let outcome = suite(platform);
    let vm = "vm virtio-hostile: virtio-blk vda";
    Log(outcome)
        .contains("vm virtio-hostile: disk vda = test-disk.img (65536 bytes) at PCI 00:01.0")
        .line_with_all(&[
            "[virtio-hostile] case virtio-hostile: 19 malformed queues, each needed a reset; ",
            " refused ",
        ])
        .contains("[virtio-hostile] case virtio-hostile: ok\n")
        .vm_ended("virtio-hostile", "debug-exit status=0")
        .line_with_all(&[vm, "(00:01.0): queue 0: ", "names descriptor 256", "the device needs a reset"])
        .line_with_all(&[vm, "(00:01.0): queue 0: ", "(a loop); the device needs a reset"])
        .contains(&format!("{vm}: further device errors are not reported\n"))
        .contains("[real-mode] real-mode: ok\n")
        .contains("[smp] case smp: ok\n");
    let logged = outcome.serial.lines().filter(|l| l.contains(vm) && l.contains("the device needs a reset")).count();
    // `devices::virtio::pci::LOGGED_ERRORS` (4) errors, then one line saying the rest are not.
    assert!((1..=4).contains(&logged), "{logged} log lines for device errors: the log must stay bounded");
}

on_both_backends!(a_hostile_virtio_driver_only_resets_its_own_device);
