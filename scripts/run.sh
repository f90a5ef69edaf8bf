#!/usr/bin/env bash
# Boots the hypervisor and its VM set, with the serial console on this terminal.
#
#   scripts/run.sh [--platform auto|kvm|tcg|bochs] [--firmware bios|uefi] [--vms FILE] [--timeout SECONDS]
#                  [--cpus N] [--memory MIB] [--disk FILE] [--forward HOSTPORT:VM:GUESTPORT]... [--log FILE]
#
# Without --vms it boots Linux (the small 6.1 kernel and a busybox initramfs, built and cached
# by guest-images/linux/) to a shell on this terminal; leaving the shell powers the VM off.
# --platform auto (the default) uses QEMU with nested KVM when it is really usable and QEMU TCG
# (SVM with NPT) otherwise; bochs runs a VMX CPU model. The log is also written to
# target/runs/<run>/serial.log (or --log FILE). Exit status: 0 when the hypervisor ends with
# success, 1 on failure, 124 on timeout, 2 on a setup error.
# --cpus N (1 to 64, default 1) and --memory MIB (64 to 65536, default 1024) size the machine
# the hypervisor runs on: QEMU's -smp and -m, Bochs's cpu count and megs.
# --disk FILE attaches a raw image (e.g. from `truncate -s 1G disk.img`) as the machine's own
# disk (QEMU: virtio-blk-pci; Bochs: ata0-slave); VMs given `disk = host:START+LEN` read and
# write those bytes of FILE, so what they write is there on the next run.
# --forward HOSTPORT:VM:GUESTPORT (QEMU only, repeatable) makes TCP port GUESTPORT of VM reachable
# from this host at 127.0.0.1:HOSTPORT, through the uplink (QEMU's user network): VM must be on
# the network `uplink` with the address its guest takes, e.g. `net = uplink ip=10.0.2.15`.
set -euo pipefail
SCRIPT_NAME=run.sh
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

platform=auto vms=
args=(--timeout 86400)
while [ $# -gt 0 ]; do
    case "$1" in
        --platform) platform=${2:?--platform needs a value}; shift 2 ;;
        --vms) vms=${2:?--vms needs a value}; shift 2 ;;
        --firmware|--timeout|--cpus|--memory|--disk|--forward|--log|--kernel) args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --quiet) args+=("$1"); shift ;;
        -h|--help) sed -n '/^set -euo pipefail/q; 2,$p' "$0"; exit 0 ;;
        *) say "unknown option $1 (see --help)"; exit 2 ;;
    esac
done
if [ -n "$vms" ] && [ ! -f "$vms" ]; then
    say "VM set $vms not found"
    exit 2
fi

case "$platform" in
    bochs) ensure_packages "${BOCHS_PACKAGES[@]}" ;;
    *) ensure_packages "${QEMU_PACKAGES[@]}" ;;
esac
ensure_toolchain
if [ -z "$vms" ]; then
    say "no --vms: booting Linux to a shell (building the guest images if needed)"
    guest-images/linux/small-kernel.sh >/dev/null
    guest-images/linux/initramfs.sh >/dev/null
    vms=guest-images/linux.vms
    if [ "$platform" = bochs ]; then
        # Bochs's serial port writes to a file here, so nothing typed could reach the guest.
        say "Bochs takes no console input: Linux boots, runs its checks and powers off"
        vms=guest-images/linux-checks.vms
    fi
fi
say "building the hypervisor and its images"
cargo build --quiet -p boot
exec cargo run --quiet -p boot -- run --platform "$platform" --vms "$vms" "${args[@]}"
