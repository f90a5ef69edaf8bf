#!/usr/bin/env bash
# Boots the hypervisor and its VM set, with the serial console on this terminal.
#
#   scripts/run.sh [--platform auto|kvm|tcg|bochs] [--firmware bios|uefi] [--vms FILE] [--timeout SECONDS]
#
# --platform auto (the default) uses QEMU with nested KVM when it is really usable and QEMU TCG
# (SVM with NPT) otherwise; bochs runs a VMX CPU model. The log is also written to
# target/runs/<run>/serial.log (or --log FILE). Exit status: 0 when the hypervisor ends with
# success, 1 on failure, 124 on timeout, 2 on a setup error.
set -euo pipefail
SCRIPT_NAME=run.sh
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

platform=auto vms=guest-images/default.vms
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --platform) platform=${2:?--platform needs a value}; shift 2 ;;
        --vms) vms=${2:?--vms needs a value}; shift 2 ;;
        --firmware|--timeout|--log|--kernel) args+=("$1" "${2:?$1 needs a value}"); shift 2 ;;
        --quiet) args+=("$1"); shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) say "unknown option $1 (see --help)"; exit 2 ;;
    esac
done
if [ ! -f "$vms" ]; then
    say "VM set $vms not found"
    exit 2
fi

case "$platform" in
    bochs) ensure_packages "${BOCHS_PACKAGES[@]}" ;;
    *) ensure_packages "${QEMU_PACKAGES[@]}" ;;
esac
ensure_toolchain
say "building the hypervisor and its images"
cargo build --quiet -p boot
exec cargo run --quiet -p boot -- run --platform "$platform" --vms "$vms" "${args[@]}"
