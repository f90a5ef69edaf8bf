//! The three ways to run the image: QEMU with nested KVM, QEMU TCG (SVM with NPT), Bochs (VMX).

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use crate::uplink::UplinkPlan;
use crate::{io_error, BootError, Firmware, Launch, RunConfig, RunStatus, SerialSource};

const QEMU: &str = "qemu-system-x86_64";
const QEMU_PACKAGE: &str = "qemu-system-x86";
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
const BOCHS: &str = "bochs";
const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const BOCHS_VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";
const BOCHS_SDL_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_sdl2_gui.so";
/// A Bochs model with VMX, EPT, VPID and unrestricted guest.
pub const BOCHS_CPU_MODEL: &str = "corei7_skylake_x";
/// The QEMU TCG CPU: SVM with nested paging (TCG has no VMX). It says AMD family 16h, a
/// family with SVM and NPT: qemu64's own family 15 (K8) has a GART, for which Linux probes
/// every slot of all 256 PCI buses through ports 0xcf8/0xcfc at boot, twice (33,000 exits).
/// scripts/lib/timing.sh names the same CPU for the bare-QEMU side of the benchmarks.
pub const TCG_CPU: &str = "qemu64,family=22,model=48,stepping=1,+svm,+npt,+xsave,+xsaveopt,+rdtscp,+rdrand";
/// Default RAM of the machine the hypervisor runs on, in MiB (`--memory`).
pub const MACHINE_MEMORY_MIB: u64 = 1024;
/// Default number of CPUs of the machine the hypervisor runs on (`--cpus`).
pub const MACHINE_CPUS: u32 = 1;

/// Where the hypervisor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// QEMU with `-enable-kvm -cpu host` on a host with nested virtualization.
    Kvm,
    /// QEMU's TCG emulator with SVM and NPT.
    Tcg,
    /// Bochs with a VMX CPU model.
    Bochs,
}

impl Platform {
    /// Parses `kvm`, `tcg`, `bochs`, or `auto` (nested KVM when usable, otherwise TCG).
    pub fn parse(text: &str) -> Result<Self, BootError> {
        match text {
            "kvm" => Ok(Platform::Kvm),
            "tcg" => Ok(Platform::Tcg),
            "bochs" => Ok(Platform::Bochs),
            "auto" => Ok(if detect_kvm().is_ok() { Platform::Kvm } else { Platform::Tcg }),
            other => Err(BootError::Usage(format!("unknown platform {other:?}: expected auto, kvm, tcg or bochs"))),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Platform::Kvm => "kvm",
            Platform::Tcg => "tcg",
            Platform::Bochs => "bochs",
        })
    }
}

/// Nested KVM is usable when /dev/kvm opens read-write, the host CPU has VMX or SVM, and the
/// KVM module has nested virtualization on. Returns why not otherwise.
pub fn detect_kvm() -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm cannot be opened read-write ({e})"))?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").map_err(|e| format!("/proc/cpuinfo: {e}"))?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let module = if flags.split_whitespace().any(|f| f == "vmx") {
        "kvm_intel"
    } else if flags.split_whitespace().any(|f| f == "svm") {
        "kvm_amd"
    } else {
        return Err("the host CPU shows neither vmx nor svm, so KVM cannot offer them to a nested guest".into());
    };
    let parameter = format!("/sys/module/{module}/parameters/nested");
    match fs::read_to_string(&parameter).map(|s| s.trim().to_string()) {
        Ok(v) if v == "Y" || v == "1" => Ok(()),
        Ok(v) => Err(format!("{parameter} is {v}: load {module} with nested=1")),
        Err(_) => Err(format!("{module} is not loaded ({parameter} missing)")),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|dir| Path::new(dir).join(program)).find(|p| p.is_file())
}

fn require_tool(tool: &'static str, package: &'static str) -> Result<(), BootError> {
    find_in_path(tool).map(|_| ()).ok_or(BootError::MissingTool { tool, package })
}

fn require_file(path: &str, package: &'static str) -> Result<(), BootError> {
    if Path::new(path).is_file() {
        Ok(())
    } else {
        Err(BootError::MissingFile { path: path.into(), package })
    }
}

/// Checks that everything the platform needs is installed, with a one-line hint if not.
pub(crate) fn check_available(platform: Platform, firmware: Firmware) -> Result<(), BootError> {
    match platform {
        Platform::Kvm | Platform::Tcg => {
            require_tool(QEMU, QEMU_PACKAGE)?;
            if firmware == Firmware::Uefi {
                require_file(OVMF, "ovmf")?;
            }
            if platform == Platform::Kvm {
                detect_kvm()
                    .map_err(|why| BootError::PlatformUnavailable(format!("nested KVM is not usable: {why}")))?;
            }
            Ok(())
        }
        Platform::Bochs => {
            if firmware == Firmware::Uefi {
                return Err(BootError::PlatformUnavailable(
                    "Bochs has no UEFI firmware: use --firmware bios with --platform bochs".into(),
                ));
            }
            require_tool(BOCHS, "bochs")?;
            require_file(BOCHS_BIOS, "bochsbios")?;
            require_file(BOCHS_VGA_BIOS, "vgabios")?;
            require_file(BOCHS_SDL_PLUGIN, "bochs-sdl")
        }
    }
}

/// Starts the emulator on `image`. Under QEMU, `fw_cfg_ramdisk` (when given) is the ramdisk,
/// passed as the fw_cfg file the hypervisor reads by DMA instead of from the image.
pub(crate) fn launch(
    config: &RunConfig,
    image: &Path,
    fw_cfg_ramdisk: Option<&Path>,
    dir: &Path,
    uplink: Option<&UplinkPlan>,
) -> Result<Launch, BootError> {
    match config.platform {
        Platform::Kvm | Platform::Tcg => launch_qemu(config, image, fw_cfg_ramdisk, uplink),
        Platform::Bochs => launch_bochs(config, image, dir),
    }
}

/// QEMU's command line (without the program) for booting `image` as `config` says, with the
/// ramdisk as a fw_cfg file if given, and the uplink's user network and NIC if there is one.
pub(crate) fn qemu_args(
    config: &RunConfig,
    image: &Path,
    fw_cfg_ramdisk: Option<&Path>,
    uplink: Option<&UplinkPlan>,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    let default_cpu = match config.platform {
        Platform::Kvm => {
            push(&["-enable-kvm"]);
            "host"
        }
        _ => {
            // QEMU 7.2's multi-threaded TCG sometimes runs an SVM host's code through a guest's
            // nested page tables when guests run on several CPUs at once (about one run in 30,
            // measured here); one TCG thread for all CPUs never does.
            push(&["-accel", if config.cpus > 1 { "tcg,thread=single" } else { "tcg" }]);
            TCG_CPU
        }
    };
    push(&["-cpu", config.cpu_model.as_deref().unwrap_or(default_cpu)]);
    if config.firmware == Firmware::Uefi {
        push(&["-bios", OVMF]);
    }
    push(&["-m", &config.memory_mib.to_string(), "-smp", &config.cpus.to_string()]);
    push(&["-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"]);
    push(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    if let Some(disk) = &config.disk {
        // The machine's own disk, for `host:` regions; writes and flushes reach the file.
        let mut drive = OsString::from("file=");
        drive.push(qemu_option_value(disk.as_os_str()));
        drive.push(",if=none,id=hostdisk,format=raw");
        args.extend([OsString::from("-drive"), drive]);
        args.extend(["-device", "virtio-blk-pci,drive=hostdisk"].map(OsString::from));
    }
    if let Some(ramdisk) = fw_cfg_ramdisk {
        let mut item = OsString::from(format!("name={},file=", hypervisor::ramdisk::FW_CFG_FILE));
        item.push(qemu_option_value(ramdisk.as_os_str()));
        args.extend([OsString::from("-fw_cfg"), item]);
    }
    if let Some(uplink) = uplink {
        args.extend(crate::uplink::qemu_args(uplink));
    }
    // The boot disk sits on an AHCI controller: the firmware reads it by DMA, where through
    // the default IDE controller every word of the image was one emulated port read.
    let mut drive = OsString::from("if=none,id=boot,format=raw,file=");
    drive.push(image);
    args.extend(["-device", "ahci,id=ahci", "-drive"].map(OsString::from));
    args.push(drive);
    args.extend(["-device", "ide-hd,drive=boot,bus=ahci.0,bootindex=0"].map(OsString::from));
    args
}

/// A value inside a QEMU option list, where a comma is written twice.
fn qemu_option_value(value: &std::ffi::OsStr) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut escaped = Vec::new();
    for &byte in value.as_bytes() {
        escaped.push(byte);
        if byte == b',' {
            escaped.push(b',');
        }
    }
    OsString::from_vec(escaped)
}

fn launch_qemu(
    config: &RunConfig,
    image: &Path,
    fw_cfg_ramdisk: Option<&Path>,
    uplink: Option<&UplinkPlan>,
) -> Result<Launch, BootError> {
    let mut qemu = Command::new(QEMU);
    qemu.args(qemu_args(config, image, fw_cfg_ramdisk, uplink))
        .stdin(if !config.typed_input.is_empty() {
            Stdio::piped()
        } else if config.interactive {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = qemu.spawn().map_err(io_error(format!("starting {QEMU}")))?;
    Ok(Launch { child, serial: SerialSource::Stdout, diagnostics: Vec::new() })
}

/// Bochs needs a CHS geometry that covers the image exactly: pad to whole 16-head, 63-sector
/// cylinders.
fn bochs_disk(image: &Path, dir: &Path) -> Result<(PathBuf, u64), BootError> {
    const CYLINDER: u64 = 16 * 63 * 512;
    let mut bytes = fs::read(image).map_err(io_error(format!("reading {}", image.display())))?;
    let cylinders = (bytes.len() as u64).div_ceil(CYLINDER);
    bytes.resize((cylinders * CYLINDER) as usize, 0);
    let disk = dir.join("bochs-disk.img");
    fs::write(&disk, bytes).map_err(io_error(format!("writing {}", disk.display())))?;
    Ok((disk, cylinders))
}

/// Bochs's line for the machine's own disk (`--disk`, `bytes` long) as ata0-slave. Its
/// geometry must not exceed the file, which is the user's and is not padded: whole 16-head,
/// 63-sector cylinders, as many as fit; LBA48 reaches every sector whatever the geometry.
pub(crate) fn bochs_host_disk(path: &Path, bytes: u64) -> String {
    const CYLINDER: u64 = 16 * 63 * 512;
    let cylinders = (bytes / CYLINDER).clamp(1, 65535);
    format!("ata0-slave: type=disk, path=\"{}\", mode=flat, cylinders={cylinders}, heads=16, spt=63\n", path.display())
}

/// The bochsrc for booting `disk` (of `cylinders` 16-head, 63-sector cylinders) as `config`
/// says, with the serial port written to `serial` and Bochs's own log to `bochs_log`;
/// `host_disk` is [`bochs_host_disk`]'s line or empty.
pub(crate) fn bochsrc(
    config: &RunConfig,
    disk: &Path,
    cylinders: u64,
    host_disk: &str,
    serial: &Path,
    bochs_log: &Path,
) -> String {
    format!(
        "megs: {}\n\
         cpu: model={}, count={}, ips=100000000, reset_on_triple_fault=0\n\
         romimage: file={BOCHS_BIOS}, options=fastboot\n\
         vgaromimage: file={BOCHS_VGA_BIOS}\n\
         ata0-master: type=disk, path=\"{}\", mode=flat, cylinders={cylinders}, heads=16, spt=63\n\
         {host_disk}\
         boot: disk\n\
         display_library: sdl2\n\
         com1: enabled=1, mode=file, dev=\"{}\"\n\
         clock: sync=none, time0=utc\n\
         log: \"{}\"\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=ignore\n\
         debug: action=ignore\n",
        config.memory_mib,
        config.cpu_model.as_deref().unwrap_or(BOCHS_CPU_MODEL),
        config.cpus,
        disk.display(),
        serial.display(),
        bochs_log.display()
    )
}

fn launch_bochs(config: &RunConfig, image: &Path, dir: &Path) -> Result<Launch, BootError> {
    let (disk, cylinders) = bochs_disk(image, dir)?;
    let serial = dir.join("bochs-serial.log");
    let bochs_log = dir.join("bochs.log");
    let host_disk = match &config.disk {
        Some(path) => bochs_host_disk(path, crate::check_disk(path)?),
        None => String::new(),
    };
    let bochsrc = bochsrc(config, &disk, cylinders, &host_disk, &serial, &bochs_log);
    let config_path = dir.join("bochsrc");
    fs::write(&config_path, bochsrc).map_err(io_error(format!("writing {}", config_path.display())))?;
    // Debian's Bochs is a debugger build: it reads commands from this file, not from a prompt.
    let commands = dir.join("bochs-commands");
    fs::write(&commands, "c\nq\n").map_err(io_error(format!("writing {}", commands.display())))?;
    let child = Command::new(BOCHS)
        .args(["-q", "-unlock", "-f"])
        .arg(&config_path)
        .arg("-rc")
        .arg(&commands)
        .current_dir(dir)
        .env("SDL_VIDEODRIVER", "dummy")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_error(format!("starting {BOCHS}")))?;
    Ok(Launch { child, serial: SerialSource::File(serial), diagnostics: vec![bochs_log] })
}

/// How the emulator's exit status reads, decoding QEMU's isa-debug-exit codes.
pub(crate) fn describe_exit(platform: Platform, status: ExitStatus) -> String {
    let code = status.code();
    match (platform, code) {
        (Platform::Kvm | Platform::Tcg, Some(c)) if c == RunStatus::Success.qemu_exit_code() => {
            "exited through isa-debug-exit with the success code".into()
        }
        (Platform::Kvm | Platform::Tcg, Some(c)) if c == RunStatus::Failure.qemu_exit_code() => {
            "exited through isa-debug-exit with the failure code".into()
        }
        (Platform::Kvm | Platform::Tcg, Some(0)) => "exited with code 0 (machine reset or powered off)".into(),
        (Platform::Bochs, Some(1)) => "exited with code 1 (shutdown port or fatal error)".into(),
        (_, Some(c)) => format!("exited with code {c}"),
        (_, None) => format!("ended by a signal ({status})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(config: &RunConfig) -> Vec<String> {
        qemu_args(config, Path::new("/tmp/hv.img"), None, None).into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    /// The value after `flag`, which must occur exactly once.
    fn value_of<'a>(args: &'a [String], flag: &str) -> &'a str {
        let at: Vec<usize> = (0..args.len()).filter(|&i| args[i] == flag).collect();
        assert_eq!(at.len(), 1, "{flag} once in {args:?}");
        &args[at[0] + 1]
    }

    #[test]
    fn qemu_gets_the_machine_size() {
        let mut config = RunConfig::new(Platform::Tcg, Firmware::Bios, "k");
        let args = args_of(&config);
        assert_eq!((value_of(&args, "-smp"), value_of(&args, "-m")), ("1", "1024"), "defaults: {args:?}");
        assert_eq!(value_of(&args, "-cpu"), TCG_CPU);
        assert_eq!(value_of(&args, "-accel"), "tcg");
        assert_eq!(value_of(&args, "-drive"), "if=none,id=boot,format=raw,file=/tmp/hv.img");
        assert!(!args.contains(&"-bios".to_string()));

        config.platform = Platform::Kvm;
        config.firmware = Firmware::Uefi;
        config.cpus = 2;
        config.memory_mib = 2048;
        let args = args_of(&config);
        assert_eq!((value_of(&args, "-smp"), value_of(&args, "-m")), ("2", "2048"), "{args:?}");
        assert_eq!((args[0].as_str(), value_of(&args, "-cpu")), ("-enable-kvm", "host"));
        assert_eq!(value_of(&args, "-bios"), OVMF);
        config.memory_mib = 1024;
        let line = args_of(&config).join(" ");
        assert!(line.contains("-m 1024 -smp 2"), "{line}");
    }

    #[test]
    fn qemu_gets_the_host_disk_as_virtio_blk() {
        let mut config = RunConfig::new(Platform::Tcg, Firmware::Bios, "k");
        assert!(!args_of(&config).iter().any(|a| a.contains("virtio-blk") || a.contains("hostdisk")));
        config.disk = Some(PathBuf::from("/data/my,disk.img"));
        let args = args_of(&config);
        let line = args.join(" ");
        assert!(
            line.contains(
                "-drive file=/data/my,,disk.img,if=none,id=hostdisk,format=raw -device virtio-blk-pci,drive=hostdisk"
            ),
            "{line}"
        );
        assert!(
            line.ends_with(
                "if=none,id=boot,format=raw,file=/tmp/hv.img -device ide-hd,drive=boot,bus=ahci.0,bootindex=0"
            ),
            "the firmware boots the image: {line}"
        );
        assert_eq!(args.iter().filter(|a| *a == "-drive").count(), 2);
    }

    #[test]
    fn qemu_gets_the_uplink_before_the_boot_image() {
        let mut config = RunConfig::new(Platform::Tcg, Firmware::Bios, "k");
        assert!(!args_of(&config).iter().any(|a| a.contains("netdev")), "no uplink, no NIC");
        config.disk = Some(PathBuf::from("/d/host.img"));
        let plan = UplinkPlan {
            forwards: vec![crate::uplink::HostForward { host_port: 18080, guest_ip: [10, 0, 2, 15], guest_port: 8080 }],
        };
        let args: Vec<String> = qemu_args(&config, Path::new("/tmp/hv.img"), None, Some(&plan))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = args.join(" ");
        assert!(
            line.contains(
                "-device virtio-blk-pci,drive=hostdisk -netdev user,id=uplink,hostfwd=tcp:127.0.0.1:18080-10.0.2.15:8080 \
                 -device virtio-net-pci,netdev=uplink,romfile= -device ahci,id=ahci -drive if=none,id=boot,format=raw,file=/tmp/hv.img"
            ),
            "{line}"
        );
        assert_eq!(value_of(&args, "-netdev"), "user,id=uplink,hostfwd=tcp:127.0.0.1:18080-10.0.2.15:8080");
    }

    #[test]
    fn bochs_gets_the_host_disk_as_ata0_slave() {
        let line = bochs_host_disk(Path::new("/d/host.img"), 1 << 30);
        // 1 GiB is 2080.5 cylinders of 16 x 63 sectors: the geometry stays inside the file.
        assert_eq!(line, "ata0-slave: type=disk, path=\"/d/host.img\", mode=flat, cylinders=2080, heads=16, spt=63\n");
        assert!(bochs_host_disk(Path::new("/d/h"), 1 << 20).contains("cylinders=2,"));
        assert!(bochs_host_disk(Path::new("/d/h"), 1 << 42).contains("cylinders=65535,"));
        let config = RunConfig::new(Platform::Bochs, Firmware::Bios, "k");
        let text = bochsrc(&config, Path::new("/d/disk.img"), 7, &line, Path::new("/d/s"), Path::new("/d/l"));
        assert!(text.contains("spt=63\nata0-slave: type=disk, path=\"/d/host.img\""), "{text}");
        assert!(text.contains("cylinders=2080, heads=16, spt=63\nboot: disk\n"), "{text}");
    }

    #[test]
    fn bochs_gets_the_machine_size() {
        let mut config = RunConfig::new(Platform::Bochs, Firmware::Bios, "k");
        let text = |config: &RunConfig| {
            bochsrc(config, Path::new("/d/disk.img"), 7, "", Path::new("/d/serial.log"), Path::new("/d/bochs.log"))
        };
        let default = text(&config);
        assert!(default.starts_with("megs: 1024\n"), "{default}");
        assert!(default.contains(&format!("cpu: model={BOCHS_CPU_MODEL}, count=1, ips=")), "{default}");
        assert!(default.contains("path=\"/d/disk.img\", mode=flat, cylinders=7, heads=16, spt=63\n"), "{default}");
        assert!(default.contains("com1: enabled=1, mode=file, dev=\"/d/serial.log\"\n"), "{default}");
        assert!(default.contains("log: \"/d/bochs.log\"\n"), "{default}");

        config.cpus = 2;
        config.memory_mib = 2048;
        let sized = text(&config);
        assert!(sized.contains("count=2,") && sized.starts_with("megs: 2048\n"), "{sized}");
        config.memory_mib = 1024;
        let sized = text(&config);
        assert!(sized.contains("megs: 1024\n") && sized.contains(", count=2, "), "{sized}");
        assert_eq!(sized.lines().filter(|l| l.starts_with("megs:") || l.starts_with("cpu:")).count(), 2);
    }
}
