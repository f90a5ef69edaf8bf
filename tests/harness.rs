//! Shared helpers for the integration tests: boot the real image in a real emulator and judge
//! the serial log, printing the whole log whenever an expectation fails.

use std::time::Duration;

pub use boot::{Firmware, Platform, RunOutcome, RunStatus};

/// Generous for a loaded two-core CI machine; a healthy run takes a few seconds.
pub const TIMEOUT: Duration = Duration::from_secs(180);
/// Every integration run has this many host CPUs, so every test also runs the hypervisor SMP.
pub const HOST_CPUS: u32 = 2;

/// Boots `kernel` on `platform` with `firmware` and an empty VM set, and returns the outcome.
/// A run that cannot even start (missing emulator, image build failure) fails the test with
/// the reason.
pub fn boot(platform: Platform, firmware: Firmware, kernel: &str) -> RunOutcome {
    let mut config = boot::RunConfig::new(platform, firmware, kernel);
    config.timeout = TIMEOUT;
    config.cpus = HOST_CPUS;
    match boot::run(&config) {
        Ok(outcome) => outcome,
        Err(e) => panic!("could not run the hypervisor on {platform} with {firmware}: {e}"),
    }
}

/// Boots the hypervisor image on `platform` with the VM set in `guest-images/<vms>`.
pub fn boot_vms(platform: Platform, firmware: Firmware, vms: &str) -> RunOutcome {
    boot_vms_on(platform, firmware, vms, None)
}

/// [`boot_vms`] on the emulator's CPU model `cpu_model` rather than the platform's default.
pub fn boot_vms_on(platform: Platform, firmware: Firmware, vms: &str, cpu_model: Option<&str>) -> RunOutcome {
    boot_vms_with(platform, firmware, vms, cpu_model, HOST_CPUS)
}

/// [`boot_vms_on`] on a machine of `cpus` host CPUs. One, where a test needs its vCPU to run
/// whenever it is due: QEMU's single-threaded TCG runs the machine's CPUs in turns, so with two
/// one of them stands still for whole time slices.
pub fn boot_vms_with(
    platform: Platform,
    firmware: Firmware,
    vms: &str,
    cpu_model: Option<&str>,
    cpus: u32,
) -> RunOutcome {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images").join(vms);
    let mut config = boot::RunConfig::new(platform, firmware, boot::HYPERVISOR_KERNEL);
    config.timeout = TIMEOUT;
    config.cpus = cpus;
    config.cpu_model = cpu_model.map(String::from);
    config.ramdisk = boot::ramdisk_files(Some(&path)).unwrap_or_else(|e| panic!("VM set {vms}: {e}"));
    match boot::run(&config) {
        Ok(outcome) => outcome,
        Err(e) => panic!("could not run {vms} on {platform}: {e}"),
    }
}

/// Boots the VM set `vms_text` (file names relative to `guest-images/`) on `platform`, with
/// `disk` as the machine's own disk (`boot run --disk`), the emulator's CPU model `cpu_model`
/// if given, and `timeout`.
pub fn boot_set_with_disk(
    platform: Platform,
    vms_text: &str,
    disk: Option<&std::path::Path>,
    cpu_model: Option<&str>,
    timeout: Duration,
) -> RunOutcome {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images");
    let mut config = boot::RunConfig::new(platform, Firmware::Bios, boot::HYPERVISOR_KERNEL);
    config.timeout = timeout;
    config.cpus = HOST_CPUS;
    config.cpu_model = cpu_model.map(String::from);
    config.disk = disk.map(std::path::Path::to_path_buf);
    config.ramdisk = boot::ramdisk_files_for(vms_text, &base).unwrap_or_else(|e| panic!("VM set {vms_text:?}: {e}"));
    match boot::run(&config) {
        Ok(outcome) => outcome,
        Err(e) => panic!("could not run the VM set on {platform}: {e}"),
    }
}

/// Assertions over one run's serial log.
pub struct Log<'a>(pub &'a RunOutcome);

impl Log<'_> {
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\n--- run: {}\n--- serial log ({}):\n{}\n--- emulator messages:\n{}",
            self.0.summary(),
            self.0.log_path.display(),
            self.0.serial,
            self.0.emulator_messages
        )
    }

    /// The log contains `needle`.
    pub fn contains(&self, needle: &str) -> &Self {
        if !self.0.serial.contains(needle) {
            self.fail(&format!("serial log lacks {needle:?}"));
        }
        self
    }

    /// Some line contains every one of `needles` (for facts reported on one line).
    pub fn line_with_all(&self, needles: &[&str]) -> &Self {
        if !self.0.serial.lines().any(|line| needles.iter().all(|n| line.contains(n))) {
            self.fail(&format!("no serial line contains all of {needles:?}"));
        }
        self
    }

    /// No guest kernel complained: no `WARNING:`, `Call Trace`, `BUG:`, `Oops` or
    /// `unchecked MSR access` line from any VM, and the clocksource watchdog marked nothing unstable.
    pub fn guest_kernels_are_quiet(&self) -> &Self {
        const COMPLAINTS: [&str; 7] = [
            "WARNING:",
            "Call Trace",
            "BUG:",
            "Oops",
            "unchecked MSR access",
            // The clocksource watchdog gave up on the TSC (or another clock). Linux's policy of
            // distrusting a non-invariant TSC on multi-CPU AMD ("TSCs unsynchronized") is not
            // the watchdog: kvm-clock serves then.
            "Marking clocksource",
            "Marking TSC unstable due to clocksource watchdog",
        ];
        if let Some(line) = self.0.serial.lines().find(|line| COMPLAINTS.iter().any(|c| line.contains(c))) {
            self.fail(&format!("a guest kernel complained: {line:?}"));
        }
        self
    }

    /// The VM named `vm` ended with this `VM-END` reason (on a line of its own: a guest's text
    /// that merely contains one never counts).
    pub fn vm_ended(&self, vm: &str, reason: &str) -> &Self {
        let line = format!("VM-END vm={vm} reason={reason} ");
        if self.lines_starting(&line).is_empty() {
            self.fail(&format!("no line starts with {line:?}"));
        }
        self
    }

    /// Every line of the log that starts with `prefix`, in order.
    pub fn lines_starting(&self, prefix: &str) -> Vec<&str> {
        self.0.serial.lines().filter(|line| line.starts_with(prefix)).collect()
    }

    /// The run ended with this end-line status and a reason containing `reason`, and nothing
    /// followed the end line.
    pub fn ended(&self, status: RunStatus, reason: &str) -> &Self {
        match &self.0.end {
            Some((s, r)) if *s == status && r.contains(reason) => {}
            _ => self.fail(&format!("expected the run to end with {status:?} ({reason:?})")),
        }
        let last = self.0.serial.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !last.starts_with(hypervisor_end_marker()) {
            self.fail("the end line is not the last line of the log");
        }
        self
    }

    /// The emulator's own exit status says what the end line says.
    pub fn emulator_exit_contains(&self, text: &str) -> &Self {
        if !self.0.emulator_exit.contains(text) {
            self.fail(&format!("emulator exit {:?} does not mention {text:?}", self.0.emulator_exit));
        }
        self
    }
}

fn hypervisor_end_marker() -> &'static str {
    "HV-END "
}
