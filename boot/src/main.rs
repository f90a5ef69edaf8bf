//! `boot`: build the hypervisor's disk images and run them.
//!
//! ```text
//! boot run   [--platform auto|kvm|tcg|bochs] [--firmware bios|uefi] [--vms FILE] [--timeout SECONDS]
//!            [--log FILE] [--kernel hypervisor|fault-test] [--quiet]
//! boot image [--firmware bios|uefi] [--vms FILE] [--kernel ...] --out FILE
//! boot detect
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use boot::{BootError, Firmware, Platform, RunConfig};

const USAGE: &str = "usage:
  boot run   [--platform auto|kvm|tcg|bochs] [--firmware bios|uefi] [--vms FILE] [--timeout SECONDS]
             [--log FILE] [--kernel hypervisor|fault-test] [--quiet]
  boot image [--firmware bios|uefi] [--vms FILE] [--kernel hypervisor|fault-test] --out FILE
  boot detect";

/// Exit code when the run hit its timeout (as `timeout(1)` does).
const EXIT_TIMEOUT: u8 = 124;

struct Options {
    platform: String,
    firmware: Firmware,
    vms: Option<PathBuf>,
    timeout: Duration,
    log: Option<PathBuf>,
    kernel: PathBuf,
    out: Option<PathBuf>,
    quiet: bool,
}

fn parse_options(args: &[String]) -> Result<Options, BootError> {
    let mut o = Options {
        platform: "auto".into(),
        firmware: Firmware::Bios,
        vms: None,
        timeout: Duration::from_secs(300),
        log: None,
        kernel: boot::HYPERVISOR_KERNEL.into(),
        out: None,
        quiet: false,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        if flag == "--quiet" {
            o.quiet = true;
            continue;
        }
        let value = args.next().ok_or_else(|| BootError::Usage(format!("{flag} needs a value\n{USAGE}")))?;
        match flag.as_str() {
            "--platform" => o.platform = value.clone(),
            "--firmware" => o.firmware = Firmware::parse(value)?,
            "--vms" => o.vms = Some(value.into()),
            "--timeout" => {
                let seconds: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| BootError::Usage(format!("--timeout {value:?}: expected a positive number")))?;
                o.timeout = Duration::from_secs_f64(seconds);
            }
            "--log" => o.log = Some(value.into()),
            "--kernel" => {
                o.kernel = match value.as_str() {
                    "hypervisor" => boot::HYPERVISOR_KERNEL.into(),
                    "fault-test" => boot::FAULT_TEST_KERNEL.into(),
                    other => return Err(BootError::Usage(format!("unknown kernel {other:?}"))),
                }
            }
            "--out" => o.out = Some(value.into()),
            other => return Err(BootError::Usage(format!("unknown option {other:?}\n{USAGE}"))),
        }
    }
    Ok(o)
}

fn run(o: Options) -> Result<ExitCode, BootError> {
    let platform = Platform::parse(&o.platform)?;
    if o.platform == "auto" {
        match boot::detect_kvm() {
            Ok(()) => eprintln!("boot: nested KVM is usable: running under QEMU with -enable-kvm -cpu host"),
            Err(why) => eprintln!("boot: nested KVM not usable ({why}): running under QEMU TCG"),
        }
    }
    let mut config = RunConfig::new(platform, o.firmware, &o.kernel);
    config.ramdisk = boot::ramdisk_files(o.vms.as_deref())?;
    config.timeout = o.timeout;
    config.log_path = o.log;
    config.echo = !o.quiet;
    config.interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    eprintln!("boot: {} firmware on {platform}, timeout {:?}", o.firmware, o.timeout);
    let outcome = boot::run(&config)?;
    if o.quiet || outcome.timed_out {
        println!("{}", outcome.serial);
    }
    if !outcome.emulator_messages.trim().is_empty() && !outcome.succeeded() {
        eprintln!("boot: emulator messages:\n{}", outcome.emulator_messages.trim_end());
    }
    eprintln!("boot: {}", outcome.summary());
    eprintln!("boot: serial log in {}", outcome.log_path.display());
    Ok(if outcome.timed_out {
        ExitCode::from(EXIT_TIMEOUT)
    } else if outcome.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn image(o: Options) -> Result<ExitCode, BootError> {
    let out = o.out.ok_or_else(|| BootError::Usage(format!("image needs --out FILE\n{USAGE}")))?;
    let ramdisk = boot::pack_ramdisk(&boot::ramdisk_files(o.vms.as_deref())?);
    boot::build_image(&o.kernel, o.firmware, &ramdisk, &out)?;
    eprintln!("boot: wrote {} ({} firmware)", out.display(), o.firmware);
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => parse_options(&args[1..]).and_then(run),
        Some("image") => parse_options(&args[1..]).and_then(image),
        Some("detect") => {
            match boot::detect_kvm() {
                Ok(()) => println!("kvm: usable (nested virtualization on)"),
                Err(why) => println!("kvm: not usable: {why}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(BootError::Usage(USAGE.into())),
    };
    result.unwrap_or_else(|e| {
        eprintln!("boot: error: {e}");
        ExitCode::from(2)
    })
}
