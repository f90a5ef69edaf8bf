//! `boot`: build the hypervisor's disk images and run them.
//!
//! ```text
//! boot run   [--platform auto|kvm|tcg|bochs] [--firmware bios|uefi] [--vms FILE] [--timeout SECONDS]
//!            [--cpus N] [--memory MIB] [--disk FILE] [--forward HOSTPORT:VM:GUESTPORT]... [--log FILE]
//!            [--kernel hypervisor|fault-test] [--quiet]
//! boot image [--firmware bios|uefi] [--vms FILE] [--kernel ...] --out FILE
//! boot detect
//! ```

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use boot::{BootError, Firmware, Platform, RunConfig};

const USAGE: &str = "usage:
  boot run   [--platform auto|kvm|tcg|bochs] [--firmware bios|uefi] [--vms FILE] [--timeout SECONDS]
             [--cpus N] [--memory MIB] [--disk FILE] [--forward HOSTPORT:VM:GUESTPORT]... [--log FILE]
             [--kernel hypervisor|fault-test] [--quiet]
             --cpus: machine CPUs, 1 to 64 (default 1); --memory: machine RAM in MiB, 64 to 65536
             (default 1024); --disk: a raw image (e.g. from `truncate -s 1G FILE`) as the
             machine's own disk, which `disk = host:START+LEN` regions of the VM set read and
             write; --forward (QEMU only, repeatable): 127.0.0.1:HOSTPORT on this host reaches
             TCP port GUESTPORT of VM, which is on the uplink with its address given
             (`net = uplink ip=10.0.2.15`); on a terminal the VM with the input is shown raw
             (escape sequences intact), the log keeps prefixed lines
  boot image [--firmware bios|uefi] [--vms FILE] [--kernel hypervisor|fault-test] --out FILE
  boot detect";

/// Exit code when the run hit its timeout (as `timeout(1)` does).
const EXIT_TIMEOUT: u8 = 124;

#[derive(Debug)]
struct Options {
    platform: String,
    firmware: Firmware,
    vms: Option<PathBuf>,
    timeout: Duration,
    cpus: u32,
    memory_mib: u64,
    log: Option<PathBuf>,
    disk: Option<PathBuf>,
    forwards: Vec<boot::Forward>,
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
        cpus: boot::MACHINE_CPUS,
        memory_mib: boot::MACHINE_MEMORY_MIB,
        log: None,
        disk: None,
        forwards: Vec::new(),
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
            "--cpus" => o.cpus = boot::parse_cpus(value)?,
            "--memory" => o.memory_mib = boot::parse_memory_mib(value)?,
            "--log" => o.log = Some(value.into()),
            "--disk" => {
                let path = PathBuf::from(value);
                boot::check_disk(&path)?;
                o.disk = Some(path);
            }
            "--forward" => o.forwards.push(boot::Forward::parse(value)?),
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
    config.cpus = o.cpus;
    config.memory_mib = o.memory_mib;
    config.log_path = o.log;
    config.disk = o.disk;
    config.forwards = o.forwards;
    config.echo = !o.quiet;
    // On a terminal, full-screen programs in the VM with the input work (as with `xl console`).
    config.raw_terminal = config.echo && std::io::stdout().is_terminal() && o.vms.is_some();
    // Whatever stdin is (a terminal, a pipe, a file), it is the guests' console input, so a
    // scripted console (`printf ... | scripts/run.sh`) drives a guest as typing does.
    config.interactive = true;
    eprintln!(
        "boot: {} firmware on {platform}, {} CPU{}, {} MiB, timeout {:?}",
        o.firmware,
        o.cpus,
        if o.cpus == 1 { "" } else { "s" },
        o.memory_mib,
        o.timeout
    );
    for forward in &config.forwards {
        eprintln!(
            "boot: 127.0.0.1:{} on this host reaches TCP port {} of vm {} (over the uplink)",
            forward.host_port, forward.guest_port, forward.vm
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, BootError> {
        parse_options(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn machine_size_options() {
        let o = parse(&["--platform", "tcg"]).unwrap();
        assert_eq!((o.cpus, o.memory_mib), (1, 1024));
        let o = parse(&["--cpus", "2", "--memory", "1024", "--firmware", "uefi"]).unwrap();
        assert_eq!((o.cpus, o.memory_mib, o.firmware), (2, 1024, Firmware::Uefi));
        let e = parse(&["--cpus", "0"]).unwrap_err();
        assert!(matches!(e, BootError::Usage(_)));
        assert_eq!(e.to_string(), "--cpus \"0\": expected a whole number of CPUs from 1 to 64");
        let e = parse(&["--memory", "2G"]).unwrap_err();
        assert_eq!(e.to_string(), "--memory \"2G\": expected a whole number of MiB from 64 to 65536");
        assert!(parse(&["--cpus"]).unwrap_err().to_string().starts_with("--cpus needs a value"));
        assert!(USAGE.contains("[--cpus N] [--memory MIB]"));
    }

    #[test]
    fn disk_option() {
        assert_eq!(parse(&["--platform", "tcg"]).unwrap().disk, None);
        let file = std::env::temp_dir().join(format!("hv-boot-main-disk-{}.img", std::process::id()));
        std::fs::File::create(&file).unwrap().set_len(1 << 30).unwrap();
        let o = parse(&["--disk", file.to_str().unwrap(), "--cpus", "2"]).unwrap();
        assert_eq!((o.disk.as_deref(), o.cpus), (Some(file.as_path()), 2));
        std::fs::File::create(&file).unwrap().set_len(1000).unwrap();
        let e = parse(&["--disk", file.to_str().unwrap()]).unwrap_err();
        assert!(matches!(e, BootError::Usage(_)));
        assert!(e.to_string().ends_with("1000 bytes is not a whole number of 512-byte sectors"), "{e}");
        let e = parse(&["--disk", "/nonexistent/disk.img"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--disk /nonexistent/disk.img: no such file (create one with e.g. `truncate -s 1G FILE`)"
        );
        assert!(parse(&["--disk"]).unwrap_err().to_string().starts_with("--disk needs a value"));
        assert!(USAGE.contains("[--disk FILE]"));
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn forward_options_add_up() {
        assert!(parse(&["--platform", "tcg"]).unwrap().forwards.is_empty());
        let o = parse(&["--forward", "8080:web:80", "--cpus", "2", "--forward", "2222:db:22"]).unwrap();
        let given: Vec<String> = o.forwards.iter().map(ToString::to_string).collect();
        assert_eq!((given.as_slice(), o.cpus), (["8080:web:80".to_string(), "2222:db:22".to_string()].as_slice(), 2));
        let e = parse(&["--forward", "8080:web"]).unwrap_err();
        assert!(matches!(e, BootError::Usage(_)));
        assert!(e.to_string().starts_with("--forward \"8080:web\": not three fields"), "{e}");
        assert!(parse(&["--forward"]).unwrap_err().to_string().starts_with("--forward needs a value"));
        assert!(USAGE.contains("[--forward HOSTPORT:VM:GUESTPORT]..."));
    }
}
