//! Persistent storage on the machine's own disk: a VM whose root file system is a
//! `host:START+LEN` region of the file given as `boot run --disk` writes to it, and the next
//! run, a new machine on the same file, finds what it wrote; a read-only region refuses writes
//! and the file stays byte for byte as it was. The bytes of the file outside the region are
//! never touched.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{boot_set_with_disk, Log, Platform, RunOutcome, RunStatus, TIMEOUT};

const MIB: u64 = 1 << 20;
/// The root file system's region; the rest of the 48 MiB file is its neighbour.
const REGION_MIB: u64 = 32;
const DISK_MIB: u64 = 48;

fn ensure_image(script: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/linux").join(script);
    let output = Command::new("bash").arg(&path).output().unwrap_or_else(|e| panic!("running {script}: {e}"));
    if !output.status.success() {
        panic!("{script} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
}

fn root_vm(disk: &str, cmdline: &str) -> String {
    format!(
        "[vm root]\n\
         kernel  = linux/out/distro-vmlinuz\n\
         initrd  = linux/out/root-initramfs.cpio.gz\n\
         cmdline = console=ttyS0 {cmdline} panic=-1\n\
         memory  = 256M\n\
         disk    = {disk}\n"
    )
}

/// A fresh disk file: the pristine root file system at offset 0, a byte pattern after it.
fn fresh_disk(name: &str) -> PathBuf {
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images/linux/out/rootfs.ext4");
    let image = fs::read(&rootfs).unwrap_or_else(|e| panic!("{}: {e}", rootfs.display()));
    assert!(image.len() as u64 <= REGION_MIB * MIB, "the root file system outgrew its {REGION_MIB} MiB region");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/host-disk-tests");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}.img", std::process::id()));
    let mut file = fs::File::create(&path).unwrap();
    file.write_all(&image).unwrap();
    file.seek(SeekFrom::Start(REGION_MIB * MIB)).unwrap();
    file.write_all(&neighbour()).unwrap();
    assert_eq!(file.metadata().unwrap().len(), DISK_MIB * MIB);
    path
}

fn neighbour() -> Vec<u8> {
    (0..(DISK_MIB - REGION_MIB) * MIB).map(|i| (i % 253) as u8).collect()
}

fn boot_root(platform: Platform, disk: &Path, region: &str, cmdline: &str, cpu_model: Option<&str>) -> RunOutcome {
    let outcome = boot_set_with_disk(platform, &root_vm(region, cmdline), Some(disk), cpu_model, TIMEOUT * 3);
    let log = Log(&outcome);
    log.guest_kernels_are_quiet()
        .line_with_all(&["INFO  host disk: ", &format!(", {} sectors (48 MiB)", DISK_MIB * MIB / 512)])
        .contains("[root] HV-ROOT-MARKER: userspace up on /dev/vda\n")
        .contains("[root] HV-ROOT-MARKER: checks done\n")
        .vm_ended("root", "power-off")
        .ended(RunStatus::Success, "1 VMs ran, all ended cleanly");
    outcome
}

/// The value after `marker` on the root VM's console.
fn marker<'a>(outcome: &'a RunOutcome, marker: &str) -> &'a str {
    let prefix = format!("[root] {marker}: ");
    outcome.serial.lines().find_map(|l| l.strip_prefix(&prefix)).map(str::trim).unwrap_or_else(|| {
        Log(outcome).contains(&prefix);
        unreachable!()
    })
}

/// Write, then verify in a new run on the same file, then a read-only run that changes nothing.
fn data_survives_power_off(platform: Platform, cpu_model: Option<&str>, read_only_run: bool) {
    for script in ["distro-kernel.sh", "rootfs.sh", "root-initramfs.sh"] {
        ensure_image(script);
    }
    let disk = fresh_disk(&format!("{platform}"));
    let region = format!("host:0M+{REGION_MIB}M");

    let written = boot_root(platform, &disk, &region, "root=/dev/vda rw hv.disk=write", cpu_model);
    let sum = marker(&written, "HV-ROOT-WRITE").to_string();
    assert!(sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()), "HV-ROOT-WRITE: {sum:?}");
    Log(&written).line_with_all(&["vm root: disk vda = host:0M+32M (host disk bytes 0x0..0x2000000) at PCI"]);
    eprintln!("{platform}: write run took {:.1} s", written.elapsed.as_secs_f64());

    let verified = boot_root(platform, &disk, &region, "root=/dev/vda rw hv.disk=verify", cpu_model);
    assert_eq!(marker(&verified, "HV-ROOT-VERIFY"), sum, "the next run did not find what the first one wrote");
    eprintln!("{platform}: verify run took {:.1} s", verified.elapsed.as_secs_f64());

    if read_only_run {
        let before = fs::read(&disk).unwrap();
        let read_only =
            boot_root(platform, &disk, &format!("{region} read-only"), "root=/dev/vda ro hv.disk=readonly", cpu_model);
        assert_eq!(marker(&read_only, "HV-ROOT-READONLY"), "refused");
        Log(&read_only).line_with_all(&["vm root: disk vda = host:0M+32M", ", read-only) at PCI"]);
        assert!(fs::read(&disk).unwrap() == before, "the read-only run changed the disk file");
        eprintln!("{platform}: read-only run took {:.1} s", read_only.elapsed.as_secs_f64());
    }
    let bytes = fs::read(&disk).unwrap();
    assert!(bytes[(REGION_MIB * MIB) as usize..] == neighbour()[..], "bytes outside the VM's region changed");
    let _ = fs::remove_file(&disk);
}

/// QEMU TCG (SVM): the host disk is a virtio-blk PCI device.
#[test]
fn svm_root_on_a_host_disk_region_survives_power_off() {
    data_survives_power_off(Platform::Tcg, None, true);
}

/// Bochs (VMX): the host disk is an ATA drive (ata0-slave) driven by PIO. Boots of the distro
/// kernel take minutes there: one write and one verify run. Tiger Lake, as in the Linux tests:
/// Bochs's Skylake lacks IBRS and the distro kernel rightly warns about it.
#[test]
fn vmx_root_on_a_host_disk_region_survives_power_off() {
    data_survives_power_off(Platform::Bochs, Some("tigerlake"), false);
}

/// A VM set that needs more of the host disk than there is is refused at build time, naming
/// the VM, the region and the disk's size; without `--disk` the error says so.
#[test]
fn svm_regions_the_host_disk_cannot_hold_are_refused() {
    ensure_image("distro-kernel.sh");
    ensure_image("root-initramfs.sh");
    let disk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/host-disk-tests");
    fs::create_dir_all(&disk).unwrap();
    let disk = disk.join(format!("small-{}.img", std::process::id()));
    fs::File::create(&disk).unwrap().set_len(16 * MIB).unwrap();
    let set = root_vm("host:8M+16M", "root=/dev/vda");
    let outcome = boot_set_with_disk(Platform::Tcg, &set, Some(&disk), None, Duration::from_secs(120));
    Log(&outcome)
        .contains("host disk: virtio-blk at ")
        .contains("VM-END vm=root reason=error status=0 detail=\"error: vm root: disk host:8M+16M: the host disk has 16 MiB\"")
        .ended(RunStatus::Failure, "1 VMs ran, 1 failed");
    let outcome = boot_set_with_disk(Platform::Tcg, &set, None, None, Duration::from_secs(120));
    Log(&outcome).contains("no host disk\n").contains(
        "detail=\"error: vm root: disk host:8M+16M: there is no host disk (the hypervisor was started without --disk FILE)\"",
    );
    let _ = fs::remove_file(&disk);
}
