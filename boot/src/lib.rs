//! Host side of the hypervisor: builds the BIOS and UEFI disk images (bootloader + ramdisk with
//! guest images and VM configuration) and runs them on QEMU (nested KVM or TCG) or Bochs, with the
//! serial console on stdout and in a log file, a timeout, and the run's status.
//!
//! The integration tests in `tests/` use this crate as a library.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub use hypervisor::status::{EndLine, RunStatus};

mod platforms;
pub mod terminal;
pub mod uplink;

pub use platforms::{detect_kvm, Platform, MACHINE_CPUS, MACHINE_MEMORY_MIB};
pub use uplink::Forward;

/// The hypervisor image that users run.
pub const HYPERVISOR_KERNEL: &str = env!("CARGO_BIN_FILE_HYPERVISOR_hypervisor");
/// A test build that takes a page fault right after bring-up.
pub const FAULT_TEST_KERNEL: &str = env!("CARGO_BIN_FILE_HYPERVISOR_hypervisor-fault-test");
/// Guest images built with the hypervisor, available to VM sets by these names.
pub const BUILT_IN_IMAGES: [(&str, &str); 4] = [
    ("test-guest.elf", env!("CARGO_BIN_FILE_TEST_GUEST_test-guest")),
    ("real-mode-guest.elf", env!("CARGO_BIN_FILE_TEST_GUEST_real-mode-guest")),
    ("multiboot-guest.elf", env!("CARGO_BIN_FILE_TEST_GUEST_multiboot-guest")),
    ("bench-guest.elf", env!("CARGO_BIN_FILE_TEST_GUEST_bench-guest")),
];
/// Name of the VM configuration inside the ramdisk.
pub const VM_CONFIG_FILE: &str = "vms.conf";

/// Which firmware boots the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS (SeaBIOS under QEMU, Bochs's BIOS).
    Bios,
    /// UEFI (OVMF under QEMU).
    Uefi,
}

impl Firmware {
    /// Parses `bios` or `uefi`.
    pub fn parse(text: &str) -> Result<Self, BootError> {
        match text {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            other => Err(BootError::Usage(format!("unknown firmware {other:?}: expected bios or uefi"))),
        }
    }
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// Everything that can go wrong before or around a run (not inside it: that is the serial log).
#[derive(Debug)]
pub enum BootError {
    /// A program is missing.
    MissingTool {
        /// Program name.
        tool: &'static str,
        /// Debian package that provides it.
        package: &'static str,
    },
    /// A firmware or ROM file is missing.
    MissingFile {
        /// Expected path.
        path: PathBuf,
        /// Debian package that provides it.
        package: &'static str,
    },
    /// A file could not be read or written.
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The bootloader could not build a disk image.
    Image(String),
    /// A platform was requested that cannot run here.
    PlatformUnavailable(String),
    /// Bad command-line usage.
    Usage(String),
    /// The VM configuration is invalid or names a missing image.
    Config(String),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::MissingTool { tool, package } => {
                write!(f, "{tool} not found: install the Debian package {package} (scripts/run.sh installs it)")
            }
            BootError::MissingFile { path, package } => write!(
                f,
                "{} not found: install the Debian package {package} (scripts/run.sh installs it)",
                path.display()
            ),
            BootError::Io { context, source } => write!(f, "{context}: {source}"),
            BootError::Image(e) => write!(f, "building the disk image failed: {e}"),
            BootError::PlatformUnavailable(why) => f.write_str(why),
            BootError::Usage(e) => f.write_str(e),
            BootError::Config(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for BootError {}

pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> BootError {
    let context = context.into();
    move |source| BootError::Io { context, source }
}

/// Files to pack into the ramdisk: `(name inside the archive, contents)`.
pub type RamdiskFiles = Vec<(String, Vec<u8>)>;

/// The ramdisk for a VM configuration file: the file itself as `vms.conf` plus every kernel
/// and initrd it names, from the built-in images or relative to the file's directory.
pub fn ramdisk_files(vm_config: Option<&Path>) -> Result<RamdiskFiles, BootError> {
    let Some(path) = vm_config else { return Ok(Vec::new()) };
    let text = fs::read_to_string(path).map_err(io_error(format!("reading VM configuration {}", path.display())))?;
    ramdisk_files_for(&text, path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| BootError::Config(format!("{}: {e}", path.display())))
}

/// The ramdisk for configuration text whose relative file names start at `base`.
pub fn ramdisk_files_for(config_text: &str, base: &Path) -> Result<RamdiskFiles, String> {
    let vms = hypervisor::vm::config::parse(config_text).map_err(|e| e.to_string())?;
    let mut files = vec![(VM_CONFIG_FILE.to_string(), config_text.as_bytes().to_vec())];
    for name in hypervisor::vm::config::referenced_files(&vms) {
        let source = match BUILT_IN_IMAGES.iter().find(|(built_in, _)| *built_in == name) {
            Some((_, artifact)) => PathBuf::from(artifact),
            None => base.join(name),
        };
        let data = fs::read(&source).map_err(|e| format!("image {name:?} ({}): {e}", source.display()))?;
        files.push((name.to_string(), data));
    }
    Ok(files)
}

/// Packs files into the cpio archive the hypervisor reads.
pub fn pack_ramdisk(files: &RamdiskFiles) -> Vec<u8> {
    let entries: Vec<(&str, &[u8])> = files.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    hypervisor::ramdisk::build(&entries)
}

/// Builds a bootable disk image of `kernel` for `firmware` with `ramdisk` at `out`. The image
/// carries the kernel without its debug information and symbols; the full ELF is written beside
/// the image as `<image>.debug`, for gdb ([`loadable_kernel`]).
/// An empty `ramdisk` puts none in the image.
pub fn build_image(kernel: &Path, firmware: Firmware, ramdisk: &[u8], out: &Path) -> Result<(), BootError> {
    let ramdisk_path = out.with_extension("ramdisk.cpio");
    fs::write(&ramdisk_path, ramdisk).map_err(io_error(format!("writing {}", ramdisk_path.display())))?;
    let kernel = &loadable_kernel(kernel, out)?;
    let with_ramdisk = !ramdisk.is_empty();
    let result = match firmware {
        Firmware::Bios => {
            let mut boot = bootloader::BiosBoot::new(kernel);
            if with_ramdisk {
                boot.set_ramdisk(&ramdisk_path);
            }
            boot.create_disk_image(out)
        }
        Firmware::Uefi => {
            let mut boot = bootloader::UefiBoot::new(kernel);
            if with_ramdisk {
                boot.set_ramdisk(&ramdisk_path);
            }
            boot.create_disk_image(out)
        }
    };
    result.map_err(|e| BootError::Image(format!("{e:#}")))
}

/// The kernel to put in the image at `out`: a copy without debug information or symbols.
/// The boot loader reads the whole file from the disk before it loads the segments, and in a
/// debug build nine tenths of it are DWARF: under an emulated BIOS that read alone took
/// seconds. The unstripped ELF goes to `<image>.debug`. Without an objcopy (the toolchain's
/// llvm-objcopy, or binutils') the full kernel is used, with a warning.
pub fn loadable_kernel(kernel: &Path, out: &Path) -> Result<PathBuf, BootError> {
    let symbols = out.with_extension("debug");
    let stripped = out.with_extension("kernel");
    let _ = fs::remove_file(&symbols);
    if fs::hard_link(kernel, &symbols).is_err() {
        fs::copy(kernel, &symbols).map_err(io_error(format!("writing {}", symbols.display())))?;
    }
    for tool in objcopy_candidates() {
        let status = Command::new(&tool).arg("--strip-all").arg(kernel).arg(&stripped).stderr(Stdio::null()).status();
        if status.is_ok_and(|s| s.success()) {
            return Ok(stripped);
        }
    }
    eprintln!(
        "boot: warning: no objcopy found (llvm-tools or binutils): the image carries the kernel's debug information"
    );
    Ok(kernel.to_path_buf())
}

/// The toolchain's llvm-objcopy (component llvm-tools), then binutils' objcopy.
fn objcopy_candidates() -> Vec<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc).args(["--print", "sysroot"]).output().ok().filter(|o| o.status.success());
    let mut tools: Vec<PathBuf> = sysroot
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("lib/rustlib"))
        .and_then(|dir| fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(|entry| Some(entry.ok()?.path().join("bin/llvm-objcopy")))
        .filter(|tool| tool.is_file())
        .collect();
    tools.push("objcopy".into());
    tools
}

/// CPUs the machine may have (`--cpus`).
pub const CPUS_RANGE: RangeInclusive<u32> = 1..=64;
/// RAM the machine may have, in MiB (`--memory`).
pub const MEMORY_MIB_RANGE: RangeInclusive<u64> = 64..=65536;

fn cpus_error(value: &str) -> BootError {
    BootError::Usage(format!(
        "--cpus {value:?}: expected a whole number of CPUs from {} to {}",
        CPUS_RANGE.start(),
        CPUS_RANGE.end()
    ))
}

fn memory_error(value: &str) -> BootError {
    BootError::Usage(format!(
        "--memory {value:?}: expected a whole number of MiB from {} to {}",
        MEMORY_MIB_RANGE.start(),
        MEMORY_MIB_RANGE.end()
    ))
}

/// A whole decimal number (digits only: no sign, no fraction, no suffix).
fn whole_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

/// Parses `--cpus N`: a whole number in [`CPUS_RANGE`].
pub fn parse_cpus(text: &str) -> Result<u32, BootError> {
    whole_number(text).filter(|n| CPUS_RANGE.contains(n)).ok_or_else(|| cpus_error(text))
}

/// Parses `--memory MIB`: a whole number of MiB in [`MEMORY_MIB_RANGE`].
pub fn parse_memory_mib(text: &str) -> Result<u64, BootError> {
    whole_number(text).filter(|n| MEMORY_MIB_RANGE.contains(n)).ok_or_else(|| memory_error(text))
}

/// The smallest disk `--disk` takes.
pub const MIN_DISK_BYTES: u64 = 1 << 20;

/// Checks a `--disk` image: an existing regular file, a whole number of 512-byte sectors and at
/// least 1 MiB. Returns its size in bytes.
pub fn check_disk(path: &Path) -> Result<u64, BootError> {
    let refuse = |why: String| BootError::Usage(format!("--disk {}: {why}", path.display()));
    let metadata = fs::metadata(path).map_err(|e| {
        refuse(if e.kind() == io::ErrorKind::NotFound {
            "no such file (create one with e.g. `truncate -s 1G FILE`)".into()
        } else {
            e.to_string()
        })
    })?;
    if !metadata.is_file() {
        return Err(refuse("not a regular file (the disk is a raw image file)".into()));
    }
    let size = metadata.len();
    if size % 512 != 0 {
        return Err(refuse(format!("{size} bytes is not a whole number of 512-byte sectors")));
    }
    if size < MIN_DISK_BYTES {
        return Err(refuse(format!("{size} bytes is smaller than the 1 MiB a disk needs at least")));
    }
    Ok(size)
}

/// One run of the hypervisor.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Emulator or accelerator.
    pub platform: Platform,
    /// Firmware path.
    pub firmware: Firmware,
    /// Hypervisor ELF to boot.
    pub kernel: PathBuf,
    /// Files for the ramdisk.
    pub ramdisk: RamdiskFiles,
    /// Wall-clock limit; the emulator is killed when it passes.
    pub timeout: Duration,
    /// Copy of the serial log (always written; defaults to the run directory).
    pub log_path: Option<PathBuf>,
    /// Echo serial output to stdout as it arrives.
    pub echo: bool,
    /// The echo goes to a terminal: the hypervisor runs with `console = raw` and the VM with
    /// the input is shown as its own bytes ([`terminal::TerminalView`]); the log keeps the
    /// prefixed, sanitized lines.
    pub raw_terminal: bool,
    /// Connect our stdin (terminal or pipe) to the guest's serial input (QEMU only).
    pub interactive: bool,
    /// Steps of a scripted console (QEMU only), how tests drive interactive guests: for each,
    /// once the log contains the string, paste the bytes. The log is matched as the emulator
    /// printed it, where lines end in "\r\n": match text within a line, not its end.
    pub typed_input: Vec<(String, Vec<u8>)>,
    /// The emulator's CPU model instead of the platform's default: QEMU `-cpu` (for tests of
    /// unusable CPUs) or Bochs `cpu: model=`.
    pub cpu_model: Option<String>,
    /// CPUs of the machine (QEMU `-smp`, Bochs `cpu: count=`), in [`CPUS_RANGE`].
    pub cpus: u32,
    /// RAM of the machine in MiB (QEMU `-m`, Bochs `megs:`), in [`MEMORY_MIB_RANGE`].
    pub memory_mib: u64,
    /// A raw image attached to the machine as its own disk (`--disk`): QEMU's virtio-blk-pci,
    /// Bochs's ata0-slave. VMs get regions of it (`disk = host:START+LEN`) and what they write
    /// stays in the file.
    pub disk: Option<PathBuf>,
    /// `--forward HOSTPORT:VM:GUESTPORT`: host ports forwarded to TCP ports of VMs on the
    /// uplink (QEMU only; see [`uplink`]).
    pub forwards: Vec<Forward>,
    /// Every piece of serial output as it arrives (raw, with CR LF line ends), for callers that
    /// act during the run, like a test that connects to a guest once it says it is ready.
    pub serial_tap: Option<std::sync::mpsc::Sender<Vec<u8>>>,
}

impl RunConfig {
    /// A quiet, non-interactive run of `kernel` with an empty ramdisk.
    pub fn new(platform: Platform, firmware: Firmware, kernel: impl Into<PathBuf>) -> Self {
        RunConfig {
            platform,
            firmware,
            kernel: kernel.into(),
            ramdisk: Vec::new(),
            timeout: Duration::from_secs(120),
            log_path: None,
            echo: false,
            raw_terminal: false,
            interactive: false,
            typed_input: Vec::new(),
            cpu_model: None,
            cpus: MACHINE_CPUS,
            memory_mib: MACHINE_MEMORY_MIB,
            disk: None,
            forwards: Vec::new(),
            serial_tap: None,
        }
    }

    /// Checks the machine size: [`cpus`](Self::cpus) in [`CPUS_RANGE`] and
    /// [`memory_mib`](Self::memory_mib) in [`MEMORY_MIB_RANGE`]; a usage error names the option.
    pub fn check_machine_size(&self) -> Result<(), BootError> {
        if !CPUS_RANGE.contains(&self.cpus) {
            return Err(cpus_error(&self.cpus.to_string()));
        }
        if !MEMORY_MIB_RANGE.contains(&self.memory_mib) {
            return Err(memory_error(&self.memory_mib.to_string()));
        }
        Ok(())
    }

    /// Checks the machine's size and its `--disk`, if any ([`check_disk`]).
    pub fn check(&self) -> Result<(), BootError> {
        self.check_machine_size()?;
        if let Some(disk) = &self.disk {
            check_disk(disk)?;
        }
        Ok(())
    }
}

/// What happened in a run.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Everything the machine wrote to COM1, with CR LF line ends turned into LF.
    pub serial: String,
    /// The hypervisor's end line, if it printed one.
    pub end: Option<(RunStatus, String)>,
    /// The emulator was killed by the timeout.
    pub timed_out: bool,
    /// How the emulator process ended.
    pub emulator_exit: String,
    /// The emulator's own diagnostics (stderr, Bochs log tail).
    pub emulator_messages: String,
    /// Wall-clock duration.
    pub elapsed: Duration,
    /// Where the serial log was written.
    pub log_path: PathBuf,
    /// What a terminal showed (or would have) with [`RunConfig::raw_terminal`]; empty without.
    pub terminal: Vec<u8>,
}

impl RunOutcome {
    /// The run ended with a success end line and, where the emulator carries a status, a
    /// matching one.
    pub fn succeeded(&self) -> bool {
        !self.timed_out && matches!(self.end, Some((RunStatus::Success, _)))
    }

    /// A one-line verdict for humans.
    pub fn summary(&self) -> String {
        match (&self.end, self.timed_out) {
            (_, true) => format!("timed out after {:.1} s without an end line", self.elapsed.as_secs_f64()),
            (Some((status, reason)), _) => format!(
                "hypervisor ended with {} ({reason}) after {:.1} s; emulator {}",
                if *status == RunStatus::Success { "success" } else { "failure" },
                self.elapsed.as_secs_f64(),
                self.emulator_exit
            ),
            (None, false) => format!("emulator {} without an end line from the hypervisor", self.emulator_exit),
        }
    }
}

/// A fresh directory for one run's images and logs, under `target/runs`.
pub fn run_directory() -> Result<PathBuf, BootError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/runs");
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let dir = root.join(format!("{stamp}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
    prune_old_runs(&root);
    Ok(dir)
}

/// Run directories kept; each holds disk images of several MiB.
const KEPT_RUNS: usize = 40;

/// Deletes the oldest run directories beyond [`KEPT_RUNS`], sparing any from the last ten
/// minutes (a parallel test may still be using it). Failures only cost disk space.
fn prune_old_runs(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else { return };
    let mut runs: Vec<(std::time::SystemTime, PathBuf)> =
        entries.filter_map(Result::ok).filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path()))).collect();
    if runs.len() <= KEPT_RUNS {
        return;
    }
    runs.sort();
    let recent = std::time::SystemTime::now() - Duration::from_secs(600);
    for (modified, path) in &runs[..runs.len() - KEPT_RUNS] {
        if *modified < recent {
            let _ = fs::remove_dir_all(path);
        }
    }
}

/// Builds the image and runs it to its end, its crash or the timeout.
pub fn run(config: &RunConfig) -> Result<RunOutcome, BootError> {
    config.check()?;
    let uplink = uplink::plan(config.platform, &config.ramdisk, &config.forwards)?;
    if config.platform == Platform::Bochs && uplink::uses_uplink(&uplink::vms_of(&config.ramdisk)?) {
        eprintln!(
            "boot: warning: the VM set has VMs on the uplink network, which needs QEMU (Bochs has no virtio-net \
             device): the hypervisor refuses them"
        );
    }
    platforms::check_available(config.platform, config.firmware)?;
    let dir = run_directory()?;
    let image = dir.join(format!("hypervisor-{}.img", config.firmware));
    let mut ramdisk = config.ramdisk.clone();
    if config.raw_terminal {
        ask_for_raw_console(&mut ramdisk);
    }
    let packed = pack_ramdisk(&ramdisk);
    // Under QEMU the ramdisk goes through fw_cfg, which the hypervisor reads by DMA: the boot
    // loader would copy it from the disk a byte at a time (about a second per MB on TCG).
    let fw_cfg_ramdisk = match config.platform {
        Platform::Kvm | Platform::Tcg => {
            let path = dir.join("ramdisk.cpio");
            fs::write(&path, &packed).map_err(io_error(format!("writing {}", path.display())))?;
            Some(path)
        }
        Platform::Bochs => None,
    };
    let in_image: &[u8] = if fw_cfg_ramdisk.is_some() { &[] } else { &packed };
    build_image(&config.kernel, config.firmware, in_image, &image)?;
    let log_path = config.log_path.clone().unwrap_or_else(|| dir.join("serial.log"));
    let launch = platforms::launch(config, &image, fw_cfg_ramdisk.as_deref(), &dir, uplink.as_ref())?;
    // scripts/bench.sh times the start (reset to the hypervisor's first line) from here.
    eprintln!("boot: emulator started");
    supervise(config, launch, log_path)
}

/// Adds `console = raw` to the VM set's host settings: a `[host]` section after the VMs, so the
/// line numbers of errors in the user's file stay right.
fn ask_for_raw_console(ramdisk: &mut RamdiskFiles) {
    if let Some((_, text)) = ramdisk.iter_mut().find(|(name, _)| name == VM_CONFIG_FILE) {
        text.extend_from_slice(b"\n[host]\nconsole = raw\n");
    }
}

/// A started emulator and where its serial output comes from.
pub(crate) struct Launch {
    pub child: Child,
    pub serial: SerialSource,
    /// Files whose contents explain an emulator failure (Bochs's log).
    pub diagnostics: Vec<PathBuf>,
}

/// QEMU writes the serial port to its stdout; Bochs writes it to a file.
pub(crate) enum SerialSource {
    Stdout,
    File(PathBuf),
}

fn supervise(config: &RunConfig, mut launch: Launch, log_path: PathBuf) -> Result<RunOutcome, BootError> {
    let start = Instant::now();
    let mut log = fs::File::create(&log_path).map_err(io_error(format!("creating {}", log_path.display())))?;
    let captured = Arc::new(Mutex::new(Vec::<u8>::new()));
    let echo = config.echo;
    let view = Arc::new(Mutex::new(config.raw_terminal.then(terminal::TerminalView::default)));
    let terminal_bytes = Arc::new(Mutex::new(Vec::<u8>::new()));

    let sink = {
        let captured = Arc::clone(&captured);
        let terminal_bytes = Arc::clone(&terminal_bytes);
        let tap = config.serial_tap.clone();
        move |bytes: &[u8]| {
            captured.lock().unwrap().extend_from_slice(bytes);
            if let Some(tap) = &tap {
                // A caller that stopped listening does not stop the run.
                let _ = tap.send(bytes.to_vec());
            }
            let shown = view.lock().unwrap().as_mut().map(|view| view.feed(bytes));
            if let Some(shown) = &shown {
                terminal_bytes.lock().unwrap().extend_from_slice(shown);
            }
            if echo {
                let mut out = io::stdout().lock();
                let _ = out.write_all(shown.as_deref().unwrap_or(bytes));
                let _ = out.flush();
            }
        }
    };
    let stderr = launch.child.stderr.take().map(|mut e| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = e.read_to_string(&mut text);
            text
        })
    });
    let mut reader: Option<thread::JoinHandle<()>> = None;
    let mut tail: Option<(fs::File, PathBuf)> = None;
    match &launch.serial {
        SerialSource::Stdout => {
            let mut out = launch.child.stdout.take().expect("stdout is piped");
            let sink = sink.clone();
            reader = Some(thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = out.read(&mut buf) {
                    sink(&buf[..n]);
                }
            }));
        }
        SerialSource::File(path) => tail = Some((wait_for_file(path)?, path.clone())),
    }

    let typist = match (config.typed_input.clone(), launch.child.stdin.take()) {
        (steps, Some(mut stdin)) if !steps.is_empty() => {
            let captured = Arc::clone(&captured);
            Some(thread::spawn(move || {
                for (after, bytes) in steps {
                    let seen = |log: &[u8]| log.windows(after.len()).any(|w| w == after.as_bytes());
                    while !seen(&captured.lock().unwrap()) {
                        thread::sleep(Duration::from_millis(50));
                    }
                    // All at once, like a paste: the console path must hold what the guest's
                    // 16-byte FIFO cannot take yet.
                    if stdin.write_all(&bytes).and_then(|()| stdin.flush()).is_err() {
                        return;
                    }
                }
            }))
        }
        _ => None,
    };
    let mut poll_tail = |sink: &dyn Fn(&[u8])| {
        if let Some((file, _)) = tail.as_mut() {
            let mut buf = Vec::new();
            if file.read_to_end(&mut buf).is_ok() && !buf.is_empty() {
                sink(&buf);
            }
        }
    };
    let deadline = start + config.timeout;
    let mut timed_out = false;
    let status = loop {
        poll_tail(&sink);
        if let Some(status) = launch.child.try_wait().map_err(io_error("waiting for the emulator"))? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = launch.child.kill();
            break launch.child.wait().ok();
        }
        thread::sleep(Duration::from_millis(20));
    };
    poll_tail(&sink);
    if let Some(reader) = reader {
        let _ = reader.join();
    }
    // A typist still waiting for its cue ends with the run: it holds no resources.
    drop(typist);
    let elapsed = start.elapsed();

    let serial_bytes = terminal::without_raw_records(&captured.lock().unwrap());
    log.write_all(&serial_bytes).map_err(io_error(format!("writing {}", log_path.display())))?;
    // The UART driver ends lines with CR LF; tests and parsers want plain lines.
    let serial = String::from_utf8_lossy(&serial_bytes).replace("\r\n", "\n");
    let mut emulator_messages = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
    for path in &launch.diagnostics {
        if let Ok(text) = fs::read_to_string(path) {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            emulator_messages.push_str(&format!("--- last lines of {} ---\n", path.display()));
            emulator_messages.push_str(&lines[from..].join("\n"));
            emulator_messages.push('\n');
        }
    }
    let end = EndLine::find_last(&serial).map(|e| (e.status, e.reason.to_string()));
    let emulator_exit = match (status, timed_out) {
        (_, true) => "killed by the timeout".to_string(),
        (Some(s), false) => platforms::describe_exit(config.platform, s),
        (None, false) => "ended".to_string(),
    };
    let terminal = std::mem::take(&mut *terminal_bytes.lock().unwrap());
    Ok(RunOutcome { serial, end, timed_out, emulator_exit, emulator_messages, elapsed, log_path, terminal })
}

/// Bochs creates its serial file only once it has started.
fn wait_for_file(path: &Path) -> Result<fs::File, BootError> {
    for _ in 0..500 {
        if let Ok(file) = fs::File::open(path) {
            return Ok(file);
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Create it ourselves so a run that never starts still has a (empty) log to show.
    fs::File::create(path).map_err(io_error(format!("creating {}", path.display())))?;
    fs::File::open(path).map_err(io_error(format!("opening {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hv-boot-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn ramdisk_carries_the_config_and_every_image_it_names() {
        let dir = scratch_dir("pack");
        fs::write(dir.join("initrd.img"), b"initrd bytes").unwrap();
        fs::create_dir_all(dir.join("mods")).unwrap();
        fs::write(dir.join("mods/m.bin"), b"module").unwrap();
        let config = "[vm a]\nkernel = test-guest.elf\ninitrd = initrd.img\n\
                      [vm b]\nkernel = multiboot-guest.elf\nmodules = mods/m.bin arg\n";
        let files = ramdisk_files_for(config, &dir).unwrap();
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [VM_CONFIG_FILE, "test-guest.elf", "initrd.img", "multiboot-guest.elf", "mods/m.bin"]);
        assert_eq!(files[0].1, config.as_bytes());
        assert_eq!(files[2].1, b"initrd bytes");
        assert_eq!(&files[1].1[..4], b"\x7fELF", "built-in images come from the build");

        let packed = pack_ramdisk(&files);
        let parsed = hypervisor::ramdisk::parse(&packed).unwrap();
        assert_eq!(hypervisor::ramdisk::find(&parsed, "mods/m.bin").unwrap().data, b"module");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_images_and_bad_configs_are_named() {
        let dir = scratch_dir("errors");
        let e = ramdisk_files_for("[vm a]\nkernel = nowhere.bin\n", &dir).unwrap_err();
        assert!(e.starts_with("image \"nowhere.bin\""), "{e}");
        let e = ramdisk_files_for("[vm a]\nkernel = k\nmemory = lots\n", &dir).unwrap_err();
        assert_eq!(e, "line 3, vm a, field memory: \"lots\" is not a size like 64M or 1G");
        let e = ramdisk_files(Some(&dir.join("absent.vms"))).unwrap_err();
        assert!(e.to_string().contains("absent.vms"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn platform_and_firmware_names() {
        assert_eq!(Platform::parse("bochs").unwrap(), Platform::Bochs);
        assert_eq!(Platform::parse("tcg").unwrap(), Platform::Tcg);
        assert!(Platform::parse("xen").unwrap_err().to_string().contains("expected auto, kvm, tcg or bochs"));
        assert_eq!(Firmware::parse("uefi").unwrap(), Firmware::Uefi);
        assert!(Firmware::parse("coreboot").unwrap_err().to_string().contains("expected bios or uefi"));
    }

    #[test]
    fn machine_size_options() {
        assert_eq!(parse_cpus("1").unwrap(), 1);
        assert_eq!(parse_cpus("64").unwrap(), 64);
        assert_eq!(parse_memory_mib("64").unwrap(), 64);
        assert_eq!(parse_memory_mib("65536").unwrap(), 65536);
        for bad in ["0", "65", "-1", "+2", "2.0", "two", "", " 2", "99999999999999999999"] {
            let e = parse_cpus(bad).unwrap_err();
            assert!(matches!(e, BootError::Usage(_)), "{bad}");
            assert_eq!(e.to_string(), format!("--cpus {bad:?}: expected a whole number of CPUs from 1 to 64"));
        }
        for bad in ["63", "65537", "0", "1024.5", "1G", "1024M", "-64", "", "99999999999999999999"] {
            let e = parse_memory_mib(bad).unwrap_err();
            assert!(matches!(e, BootError::Usage(_)), "{bad}");
            assert_eq!(e.to_string(), format!("--memory {bad:?}: expected a whole number of MiB from 64 to 65536"));
        }

        let mut config = RunConfig::new(Platform::Tcg, Firmware::Bios, "k");
        assert_eq!((config.cpus, config.memory_mib), (1, 1024), "the defaults are today's machine");
        assert!(config.check_machine_size().is_ok());
        config.cpus = 65;
        assert_eq!(
            config.check_machine_size().unwrap_err().to_string(),
            "--cpus \"65\": expected a whole number of CPUs from 1 to 64"
        );
        config.cpus = 64;
        config.memory_mib = 32;
        let e = config.check_machine_size().unwrap_err();
        assert_eq!(e.to_string(), "--memory \"32\": expected a whole number of MiB from 64 to 65536");
        let e = run(&config).unwrap_err();
        assert!(e.to_string().starts_with("--memory \"32\""), "run refuses before starting anything: {e}");
    }

    #[test]
    fn disk_option_checks_the_file() {
        let dir = scratch_dir("disk");
        let good = dir.join("disk.img");
        fs::File::create(&good).unwrap().set_len(2 << 20).unwrap();
        assert_eq!(check_disk(&good).unwrap(), 2 << 20);
        let one_mib = dir.join("small.img");
        fs::File::create(&one_mib).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(check_disk(&one_mib).unwrap(), 1 << 20, "1 MiB is enough");

        let message = |path: &Path| check_disk(path).unwrap_err().to_string();
        let absent = dir.join("absent.img");
        assert_eq!(
            message(&absent),
            format!("--disk {}: no such file (create one with e.g. `truncate -s 1G FILE`)", absent.display())
        );
        assert_eq!(
            message(&dir),
            format!("--disk {}: not a regular file (the disk is a raw image file)", dir.display())
        );
        let odd = dir.join("odd.img");
        fs::File::create(&odd).unwrap().set_len((2 << 20) + 100).unwrap();
        assert_eq!(
            message(&odd),
            format!("--disk {}: 2097252 bytes is not a whole number of 512-byte sectors", odd.display())
        );
        let tiny = dir.join("tiny.img");
        fs::File::create(&tiny).unwrap().set_len(512 * 1024).unwrap();
        assert_eq!(
            message(&tiny),
            format!("--disk {}: 524288 bytes is smaller than the 1 MiB a disk needs at least", tiny.display())
        );
        assert!(matches!(check_disk(&tiny), Err(BootError::Usage(_))));

        let mut config = RunConfig::new(Platform::Tcg, Firmware::Bios, "k");
        config.disk = Some(tiny.clone());
        let e = run(&config).unwrap_err();
        assert!(e.to_string().starts_with("--disk "), "run refuses before starting anything: {e}");
        config.disk = Some(good);
        assert!(config.check().is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn outcome_summary_names_timeouts_and_end_lines() {
        let mut outcome = RunOutcome {
            serial: String::new(),
            end: Some((RunStatus::Failure, "3 VMs ran, 1 failed".into())),
            timed_out: false,
            emulator_exit: "exited through isa-debug-exit with the failure code".into(),
            emulator_messages: String::new(),
            elapsed: Duration::from_millis(2500),
            log_path: PathBuf::from("x"),
            terminal: Vec::new(),
        };
        assert!(!outcome.succeeded());
        assert_eq!(
            outcome.summary(),
            "hypervisor ended with failure (3 VMs ran, 1 failed) after 2.5 s; emulator exited through \
             isa-debug-exit with the failure code"
        );
        outcome.timed_out = true;
        assert_eq!(outcome.summary(), "timed out after 2.5 s without an end line");
    }
}
