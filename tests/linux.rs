//! Unmodified Linux boots inside the hypervisor to a busybox userspace and powers off through
//! ACPI: the small kernel built from linux-source-6.1 and Debian's distro kernel, each on SVM
//! (QEMU TCG) and VMX (Bochs). Each test asserts on the guest's own output.
//!
//! The images come from `guest-images/linux/*.sh` (cached outside the checkout;
//! `scripts/test.sh` builds them first, so here they are cache hits) and are booted through the
//! committed VM sets `guest-images/linux*.vms`.

use std::path::Path;
use std::process::Command;
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use integration_tests::{Firmware, Log, Platform, RunOutcome, RunStatus, HOST_CPUS, TIMEOUT};

/// Runs a guest-image script: it builds the image if needed and links it into
/// `guest-images/linux/out/`, where the committed VM sets name it.
fn ensure_image(script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/linux").join(script);
    let output = Command::new("bash").arg(&path).output().unwrap_or_else(|e| panic!("running {script}: {e}"));
    if !output.status.success() {
        panic!("{script} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Small,
    Distro,
}

fn boot_linux(platform: Platform, kernel: Kernel) -> RunOutcome {
    boot_linux_with(platform, Firmware::Bios, kernel)
}

/// Builds (or finds) the images, which links them where the committed VM sets expect them,
/// then boots the set for `kernel`.
fn boot_linux_with(platform: Platform, firmware: Firmware, kernel: Kernel) -> RunOutcome {
    ensure_image("initramfs.sh");
    let vms = match kernel {
        Kernel::Small => {
            ensure_image("small-kernel.sh");
            "linux-checks.vms"
        }
        Kernel::Distro => {
            ensure_image("distro-kernel.sh");
            "linux-distro.vms"
        }
    };
    // Bochs's default Skylake lacks IBRS, so the distro kernel rightly warns that retpolines
    // leave it open to RETBleed, as it would on that bare emulator: it runs on Tiger Lake.
    let cpu_model = (platform == Platform::Bochs && kernel == Kernel::Distro).then_some("tigerlake");
    boot_configured(platform, firmware, vms, TIMEOUT * 3, Vec::new(), false, cpu_model)
}

fn boot_with(
    platform: Platform,
    firmware: Firmware,
    vms: &str,
    timeout: std::time::Duration,
    typed_input: Vec<(String, Vec<u8>)>,
) -> RunOutcome {
    boot_configured(platform, firmware, vms, timeout, typed_input, false, None)
}

/// [`boot_with`], and `raw_terminal` shows the VM with the input raw (`RunOutcome::terminal`).
fn boot_configured(
    platform: Platform,
    firmware: Firmware,
    vms: &str,
    timeout: std::time::Duration,
    typed_input: Vec<(String, Vec<u8>)>,
    raw_terminal: bool,
    cpu_model: Option<&str>,
) -> RunOutcome {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images").join(vms);
    let mut config = boot::RunConfig::new(platform, firmware, boot::HYPERVISOR_KERNEL);
    config.timeout = timeout;
    config.cpus = HOST_CPUS;
    config.typed_input = typed_input;
    config.raw_terminal = raw_terminal;
    config.cpu_model = cpu_model.map(String::from);
    config.ramdisk = boot::ramdisk_files(Some(&path)).unwrap_or_else(|e| panic!("VM set {vms}: {e}"));
    let outcome = boot::run(&config).unwrap_or_else(|e| panic!("could not run {vms} on {platform}: {e}"));
    // The rule of every Linux test: the kernel's log holds no warning, trace or refused MSR.
    Log(&outcome).guest_kernels_are_quiet();
    outcome
}

fn run(platform: Platform, kernel: Kernel) -> &'static RunOutcome {
    static SVM_SMALL: OnceLock<RunOutcome> = OnceLock::new();
    static VMX_SMALL: OnceLock<RunOutcome> = OnceLock::new();
    static SVM_DISTRO: OnceLock<RunOutcome> = OnceLock::new();
    static VMX_DISTRO: OnceLock<RunOutcome> = OnceLock::new();
    let cell = match (platform, kernel) {
        (Platform::Bochs, Kernel::Small) => &VMX_SMALL,
        (Platform::Bochs, Kernel::Distro) => &VMX_DISTRO,
        (_, Kernel::Small) => &SVM_SMALL,
        (_, Kernel::Distro) => &SVM_DISTRO,
    };
    cell.get_or_init(|| boot_linux(platform, kernel))
}

/// The count of a /proc/interrupts line whose label contains `name`, summed over the CPUs.
fn interrupt_count(outcome: &RunOutcome, irq: &str, name: &str) -> Option<u64> {
    outcome.serial.lines().filter_map(|l| l.strip_prefix("[linux] ")).find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == irq && line.contains(name))
            .then(|| fields.map_while(|f| f.parse::<u64>().ok()).reduce(|a, b| a + b))?
    })
}

/// The per-CPU counts of the /proc/interrupts line `label` (`LOC:`, `RES:`, ...).
fn per_cpu_counts(outcome: &RunOutcome, label: &str) -> Vec<u64> {
    let line =
        outcome.serial.lines().filter_map(|l| l.strip_prefix("[linux] ")).find(|l| l.trim_start().starts_with(label));
    line.map(|l| l.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect()).unwrap_or_default()
}

/// Linux on four vCPUs: all four come up, each counts its own local-timer interrupts and
/// IPIs, and a task pinned to each runs there.
fn runs_on_four_vcpus(outcome: &RunOutcome) {
    let log = Log(outcome);
    log.ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
    log.contains("[linux] HV-LINUX-CPUS: 4\n").line_with_all(&["[linux]", "CPU0", "CPU1", "CPU2", "CPU3"]);
    for cpu in 0..4 {
        log.contains(&format!("[linux] HV-LINUX-PINNED: cpu {cpu} ran on {cpu}\n"));
    }
    let (local, resched, calls) =
        (per_cpu_counts(outcome, "LOC:"), per_cpu_counts(outcome, "RES:"), per_cpu_counts(outcome, "CAL:"));
    let every_cpu_counts = local.len() == 4
        && resched.len() == 4
        && calls.len() == 4
        && (0..4).all(|cpu| local[cpu] > 0 && resched[cpu] + calls[cpu] > 0);
    if !every_cpu_counts {
        log.contains(&format!("(per-CPU counts: LOC {local:?}, RES {resched:?}, CAL {calls:?})"));
    }
}

#[test]
fn svm_small_kernel_runs_on_four_vcpus() {
    runs_on_four_vcpus(run(Platform::Tcg, Kernel::Small));
}

#[test]
fn vmx_small_kernel_runs_on_four_vcpus() {
    runs_on_four_vcpus(run(Platform::Bochs, Kernel::Small));
}

/// Debian's kernel on four vCPUs (`linux-smp.vms`).
#[test]
fn svm_distro_kernel_runs_on_four_vcpus() {
    ensure_image("distro-kernel.sh");
    ensure_image("initramfs.sh");
    runs_on_four_vcpus(&boot_with(Platform::Tcg, Firmware::Bios, "linux-smp.vms", TIMEOUT * 3, Vec::new()));
}

/// Two Linux VMs on two vCPUs each and a test guest at once (`bench/set.vms`): all start
/// together, their consoles interleave line by line without mixing, and all end cleanly.
fn three_vms_run_at_once(platform: Platform) {
    ensure_image("small-kernel.sh");
    ensure_image("initramfs.sh");
    let outcome = &boot_with(platform, Firmware::Bios, "bench/set.vms", TIMEOUT * 3, Vec::new());
    let log = Log(outcome);
    log.ended(RunStatus::Success, "3 VMs ran, all ended cleanly").vm_ended("ticks", "debug-exit status=0");
    for vm in ["linux-a", "linux-b"] {
        // A line a VM had not finished when another VM wrote continues on a line of its own.
        let prefix = format!("[{vm}] ");
        let text: String = log.lines_starting(&prefix).iter().map(|l| &l[prefix.len()..]).collect();
        assert!(text.contains("HV-LINUX-CPUS: 2"), "{vm} did not count 2 CPUs:\n{text}");
        log.vm_ended(vm, "power-off");
    }
    let lines = log.lines_starting("[");
    let first = |vm: &str| lines.iter().position(|line| line.starts_with(vm)).expect("the VM printed");
    let last = |vm: &str| lines.iter().rposition(|line| line.starts_with(vm)).expect("the VM printed");
    assert!(
        first("[linux-b]") < last("[linux-a]") && first("[linux-a]") < last("[linux-b]"),
        "the two Linux VMs did not run at the same time"
    );
    assert!(first("[ticks]") < last("[linux-a]"), "the test guest did not run beside the Linux VMs");
    for line in outcome.serial.lines() {
        assert!(line.matches("[linux-").count() + line.matches("[ticks]").count() <= 1, "a line mixes VMs: {line:?}");
    }
}

#[test]
fn svm_three_vms_run_at_once() {
    three_vms_run_at_once(Platform::Tcg);
}

#[test]
fn vmx_three_vms_run_at_once() {
    three_vms_run_at_once(Platform::Bochs);
}

fn reaches_userspace_and_powers_off(platform: Platform, kernel: Kernel) {
    let outcome = run(platform, kernel);
    Log(outcome)
        .contains("[linux] HV-LINUX-MARKER: userspace up\n")
        .line_with_all(&["[linux] Linux ", " 6.1.", " x86_64"])
        .contains("[linux] HV-LINUX-MARKER: checks done\n")
        .contains("VM-END vm=linux reason=power-off status=0")
        .ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
}

fn timer_and_uart_interrupts_count(platform: Platform, kernel: Kernel) {
    let outcome = run(platform, kernel);
    let log = Log(outcome);
    let timer = interrupt_count(outcome, "0:", "timer");
    let uart = interrupt_count(outcome, "4:", "ttyS0");
    let local = interrupt_count(outcome, "LOC:", "Local timer");
    if !matches!(timer, Some(n) if n > 0) || !matches!(uart, Some(n) if n > 0) || !matches!(local, Some(n) if n > 0) {
        log.contains(&format!("(interrupt counts: timer {timer:?}, ttyS0 {uart:?}, LOC {local:?})"));
    }
    log.line_with_all(&["[linux]", "IO-APIC", "timer"]).line_with_all(&["[linux]", "IO-APIC", "ttyS0"]);
}

/// Linux keeps a clock that reads without exits: the TSC where the vCPU's TSC is invariant,
/// otherwise kvm-clock (the TSC scaled by the hypervisor's figures). Either way it took the
/// TSC's frequency from kvm-clock rather than calibrating, and the watchdog never gave up on
/// it (every Linux test fails on that).
fn clocksource_is_the_tsc_or_kvm_clock(platform: Platform, kernel: Kernel) {
    let outcome = run(platform, kernel);
    let log = Log(outcome);
    log.contains("[linux] HV-LINUX-TSC: ");
    let invariant = outcome.serial.contains("[linux] HV-LINUX-TSC: invariant\n");
    let expected = if invariant { "tsc" } else { "kvm-clock" };
    log.contains(&format!("[linux] HV-LINUX-CLOCKSOURCE: {expected}\n"))
        .line_with_all(&["[linux]", "kvm-clock: Using msrs 4b564d01 and 4b564d00"])
        .line_with_all(&["[linux]", "tsc: Detected ", " MHz processor"]);
    if outcome.serial.contains("Fast TSC calibration") || outcome.serial.contains("calibration failed") {
        log.contains("(the guest calibrated its TSC)");
    }
}

#[test]
fn svm_small_kernel_reaches_userspace_and_powers_off() {
    reaches_userspace_and_powers_off(Platform::Tcg, Kernel::Small);
}

#[test]
fn svm_small_kernel_counts_timer_and_uart_interrupts() {
    timer_and_uart_interrupts_count(Platform::Tcg, Kernel::Small);
}

#[test]
fn svm_small_kernel_clocksource_is_the_tsc_or_kvm_clock() {
    clocksource_is_the_tsc_or_kvm_clock(Platform::Tcg, Kernel::Small);
}

#[test]
fn vmx_small_kernel_reaches_userspace_and_powers_off() {
    reaches_userspace_and_powers_off(Platform::Bochs, Kernel::Small);
}

#[test]
fn vmx_small_kernel_counts_timer_and_uart_interrupts() {
    timer_and_uart_interrupts_count(Platform::Bochs, Kernel::Small);
}

#[test]
fn vmx_small_kernel_clocksource_is_the_tsc_or_kvm_clock() {
    clocksource_is_the_tsc_or_kvm_clock(Platform::Bochs, Kernel::Small);
}

#[test]
fn svm_small_kernel_boots_from_the_uefi_image_too() {
    let outcome = boot_linux_with(Platform::Tcg, Firmware::Uefi, Kernel::Small);
    Log(&outcome)
        .contains("[linux] HV-LINUX-MARKER: checks done\n")
        .contains("VM-END vm=linux reason=power-off status=0")
        .ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
}

#[test]
fn svm_small_kernel_shell_takes_typed_input() {
    ensure_image("small-kernel.sh");
    ensure_image("initramfs.sh");
    // Without the typed `exit` the shell would wait forever: keep the failure short.
    // Pasted in one go: far more than the guest UART's 16-byte FIFO holds.
    let typed = vec![(
        "shell on the console".to_string(),
        b"echo typed-$((6*7)); echo a-line-longer-than-the-sixteen-byte-receive-fifo-0123456789\nexit\n".to_vec(),
    )];
    let outcome = boot_with(Platform::Tcg, Firmware::Bios, "linux.vms", TIMEOUT, typed);
    if outcome.serial.contains("input overrun") {
        Log(&outcome).contains("(no 'input overrun' from the guest's serial driver)");
    }
    Log(&outcome)
        .contains("[linux] typed-42\n")
        .contains("[linux] a-line-longer-than-the-sixteen-byte-receive-fifo-0123456789\n")
        .contains("VM-END vm=linux reason=power-off status=0")
        .ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
}

#[test]
fn vmx_distro_kernel_reaches_userspace_and_powers_off() {
    reaches_userspace_and_powers_off(Platform::Bochs, Kernel::Distro);
}

#[test]
fn vmx_distro_kernel_clocksource_is_the_tsc_or_kvm_clock() {
    clocksource_is_the_tsc_or_kvm_clock(Platform::Bochs, Kernel::Distro);
}

/// Debian's kernel with its root on virtio-blk (`linux-virtio.vms`): the initramfs loads the
/// virtio modules and switches to the ext4 root; the VM writes a file and reads it back from
/// the disk with the page cache dropped, through MSI-X, finds its read-only disk refuses a
/// write, and reads from its virtio entropy device.
fn root_on_virtio_blk(platform: Platform) {
    for script in ["distro-kernel.sh", "rootfs.sh", "root-initramfs.sh"] {
        ensure_image(script);
    }
    let cpu_model = (platform == Platform::Bochs).then_some("tigerlake");
    let outcome =
        boot_configured(platform, Firmware::Bios, "linux-virtio.vms", TIMEOUT * 3, Vec::new(), false, cpu_model);
    let log = Log(&outcome);
    log.contains("[root] HV-ROOT-MARKER: userspace up on /dev/vda\n")
        .line_with_all(&["[root]", "PCI-MSI", "virtio0-req.0"])
        .contains("[root] HV-ROOT-RO-DISK: refused\n")
        .line_with_all(&["[root] HV-ROOT-RNG: virtio_rng.0 "])
        .contains("VM-END vm=root reason=power-off status=0")
        .ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
    let sum = |marker: &str| {
        outcome.serial.lines().find_map(|l| l.strip_prefix(marker)).map(str::trim).unwrap_or_default().to_string()
    };
    let (written, reread) = (sum("[root] HV-ROOT-WRITE: "), sum("[root] HV-ROOT-REREAD: "));
    if written.len() != 64 || written != reread {
        log.contains(&format!("(written sha256 {written:?}, read back {reread:?})"));
    }
}

/// Two VMs with Debian's kernel on one network (`linux-net.vms`): the client pings the server
/// through the hypervisor's switch, sends it 10 MiB over TCP, which arrive with the same
/// sha256, and fetches a page from the server's web server.
fn two_vms_talk_over_virtio_net(platform: Platform) {
    for script in ["distro-kernel.sh", "net-initramfs.sh"] {
        ensure_image(script);
    }
    let cpu_model = (platform == Platform::Bochs).then_some("tigerlake");
    // Bochs takes about 10 minutes (two distro boots and 10 MiB through two guest TCP stacks).
    let timeout = if platform == Platform::Bochs { TIMEOUT * 6 } else { TIMEOUT * 4 };
    let outcome = boot_configured(platform, Firmware::Bios, "linux-net.vms", timeout, Vec::new(), false, cpu_model);
    let log = Log(&outcome);
    log.contains("[server] HV-NET-MARKER: up 10.0.0.1/24 52:54:00:12:00:00\n")
        .contains("[client] HV-NET-MARKER: up 10.0.0.2/24 52:54:00:12:01:00\n")
        .line_with_all(&["[client] HV-NET-PING: ok"])
        .contains("[client] HV-NET-HTTP: HV-NET-SERVICE-OK\n")
        .contains("[server] HV-NET-MARKER: done\n")
        .contains("[client] HV-NET-MARKER: done\n")
        .contains("VM-END vm=server reason=power-off status=0")
        .contains("VM-END vm=client reason=power-off status=0")
        .ended(RunStatus::Success, "2 VMs ran, all ended cleanly");
    let field = |marker: &str| {
        outcome.serial.lines().find_map(|l| l.strip_prefix(marker)).map(str::trim).unwrap_or_default().to_string()
    };
    let (sent, received) = (field("[client] HV-NET-TX: "), field("[server] HV-NET-RX: "));
    if !sent.starts_with("10485760 ") || sent != received {
        log.contains(&format!("(sent {sent:?}, received {received:?})"));
    }
}

#[test]
fn svm_two_vms_talk_over_virtio_net() {
    two_vms_talk_over_virtio_net(Platform::Tcg);
}

/// The longest test by far: about 10 minutes on Bochs.
#[test]
fn vmx_two_vms_talk_over_virtio_net() {
    two_vms_talk_over_virtio_net(Platform::Bochs);
}

#[test]
fn svm_distro_kernel_root_on_virtio_blk() {
    root_on_virtio_blk(Platform::Tcg);
}

#[test]
fn vmx_distro_kernel_root_on_virtio_blk() {
    root_on_virtio_blk(Platform::Bochs);
}

#[test]
fn svm_distro_kernel_reaches_userspace_and_powers_off() {
    reaches_userspace_and_powers_off(Platform::Tcg, Kernel::Distro);
}

#[test]
fn svm_distro_kernel_counts_timer_and_uart_interrupts() {
    timer_and_uart_interrupts_count(Platform::Tcg, Kernel::Distro);
}

#[test]
fn svm_distro_kernel_clocksource_is_the_tsc_or_kvm_clock() {
    clocksource_is_the_tsc_or_kvm_clock(Platform::Tcg, Kernel::Distro);
}

/// Linux next to a VM that spins with interrupts off (ended by its timeout) and one that halts
/// forever: Linux boots, runs its checks and powers off while the spinner still runs.
#[test]
fn svm_small_kernel_boots_beside_a_spinning_and_a_sleeping_vm() {
    ensure_image("small-kernel.sh");
    ensure_image("initramfs.sh");
    let outcome = boot_with(Platform::Tcg, Firmware::Bios, "linux-beside-hostile.vms", TIMEOUT, Vec::new());
    let log = Log(&outcome);
    log.contains("[linux] HV-LINUX-MARKER: checks done\n")
        .vm_ended("linux", "power-off")
        .vm_ended("spinner", "timeout")
        .vm_ended("sleeper", "timeout")
        .ended(RunStatus::Failure, "3 VMs ran, 2 failed");
    let position = |needle: &str| outcome.serial.find(needle).expect("present");
    assert!(position("VM-END vm=linux ") < position("VM-END vm=spinner "), "Linux waited for the spinner");
}

/// Two Linux shells at once: typed input goes to the first, Ctrl-] moves it to the second, and
/// when the second powers off the input comes back to the first by itself. On the terminal
/// the VM with the input is shown raw (an escape sequence it prints arrives intact, its own
/// prefixed lines do not appear); the log keeps the prefixed, sanitized lines.
#[test]
fn svm_two_shells_at_once_take_input_in_turn() {
    ensure_image("small-kernel.sh");
    ensure_image("initramfs.sh");
    let step = |after: &str, bytes: &[u8]| (after.to_string(), bytes.to_vec());
    let typed = vec![
        step("[a] shell on the console", b"echo from-a-$((6*7))\n"),
        step("[b] shell on the console", b""),
        step("[a] from-a-42", b"\x1decho from-b-$((7*7))\n"),
        step("[b] from-b-49", b"printf '\\033[7mraw-b\\033[0m\\n'\n"),
        step("[b] .[7mraw-b.[0m", b"exit\n"),
        step("VM-END vm=b ", b"echo back-in-a\nexit\n"),
    ];
    let outcome = boot_configured(Platform::Tcg, Firmware::Bios, "linux-two-shells.vms", TIMEOUT, typed, true, None);
    let log = Log(&outcome);
    log.contains("[a] from-a-42\n")
        .contains("[b] from-b-49\n")
        .contains("HV-CONSOLE: input goes to vm b\n")
        .contains("HV-CONSOLE: input goes to vm a\n")
        .contains("[a] back-in-a\n")
        .vm_ended("a", "power-off")
        .vm_ended("b", "power-off")
        .ended(RunStatus::Success, "2 VMs ran, all ended cleanly");
    assert!(
        !outcome.serial.contains("[b] from-a") && !outcome.serial.contains("[a] from-b"),
        "input reached the wrong VM"
    );
    let terminal = String::from_utf8_lossy(&outcome.terminal);
    assert!(
        terminal.contains("\x1b[7mraw-b\x1b[0m")
            && terminal.contains("from-a-42")
            && !terminal.contains("[a] from-a-42"),
        "the terminal did not show the VM with the input raw:\n{terminal}"
    );
    assert!(!outcome.serial.contains("HV-RAW"), "the log holds raw records");
}

/// A free TCP port on the host's 127.0.0.1 (free when asked: QEMU binds it a moment later).
fn free_host_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port on 127.0.0.1");
    listener.local_addr().expect("the bound port").port()
}

/// One HTTP GET of `/` on 127.0.0.1:`port`: the whole response, or why not.
fn http_get(port: u16) -> Result<String, String> {
    use std::io::{Read, Write};
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|e| format!("connecting: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| format!("sending: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("reading: {e}"))?;
    Ok(response)
}

/// The uplink (`linux-uplink.vms`): one distro-kernel VM on the network bridged to the
/// machine's NIC, QEMU's user network, takes 10.0.2.15 and serves a page on port 8080; the run
/// forwards a free host port to it (`--forward PORT:server:8080`), and this test, on the host,
/// fetches the page through QEMU's forward, the NIC, the hypervisor's switch and the guest's
/// virtio-net once the guest says it serves. The guest powers off after that one request.
#[test]
fn svm_the_host_reaches_a_guest_service_over_the_uplink() {
    for script in ["distro-kernel.sh", "net-initramfs.sh"] {
        ensure_image(script);
    }
    let port = free_host_port();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/linux-uplink.vms");
    let mut config = boot::RunConfig::new(Platform::Tcg, Firmware::Bios, boot::HYPERVISOR_KERNEL);
    config.timeout = TIMEOUT * 4;
    config.cpus = HOST_CPUS;
    config.ramdisk = boot::ramdisk_files(Some(&path)).unwrap_or_else(|e| panic!("linux-uplink.vms: {e}"));
    config.forwards = vec![boot::Forward::parse(&format!("{port}:server:8080")).unwrap()];
    let (tap, serial) = mpsc::channel::<Vec<u8>>();
    config.serial_tap = Some(tap);
    let started = Instant::now();
    let run = thread::spawn(move || boot::run(&config));

    // The guest's marker, then the page; both bounded (the run's own timeout ends the tap).
    const SERVING: &[u8] = b"[server] HV-NET-MARKER: serving http on port 8080";
    let mut seen = Vec::new();
    let serving = loop {
        match serial.recv() {
            Ok(bytes) => {
                seen.extend_from_slice(&bytes);
                if seen.windows(SERVING.len()).any(|w| w == SERVING) {
                    break Some(Instant::now());
                }
            }
            Err(_) => break None,
        }
    };
    let mut fetched = Err("the guest never said it serves".to_string());
    if let Some(serving) = serving {
        for _ in 0..30 {
            fetched = http_get(port).and_then(|response| {
                response.contains("HV-NET-SERVICE-OK").then_some(response.clone()).ok_or(response)
            });
            if fetched.is_ok() {
                break;
            }
            thread::sleep(Duration::from_secs(1));
        }
        if fetched.is_ok() {
            eprintln!(
                "uplink: the guest served {:.1} s after the run started; the host had the page {:.3} s later",
                serving.duration_since(started).as_secs_f64(),
                serving.elapsed().as_secs_f64()
            );
        }
    }
    let outcome = run.join().expect("the run thread").unwrap_or_else(|e| panic!("could not run linux-uplink.vms: {e}"));
    let log = Log(&outcome);
    log.guest_kernels_are_quiet();
    if let Err(why) = &fetched {
        log.contains(&format!("(the host could not fetch http://127.0.0.1:{port}/: {why:?})"));
    }
    log.line_with_all(&["host NIC: virtio-net at 00:", "MAC 52:54:00:12:34:56"])
        .contains("uplink: network uplink bridged to the host NIC (port 0)")
        .contains("[server] HV-NET-MARKER: up 10.0.2.15/24 52:54:00:12:00:00 via 10.0.2.2\n")
        .line_with_all(&["[server] HV-NET-SERVED: 200 ", "10.0.2.2"])
        .contains("[server] HV-NET-MARKER: done\n")
        .line_with_all(&["uplink: to the wire ", "0 refused by the NIC"])
        .vm_ended("server", "power-off")
        .ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
}
