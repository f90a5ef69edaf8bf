#!/usr/bin/env bash
# Builds the root-on-virtio initramfs for Debian's distro kernel (distro-kernel.sh), as a
# distro's initrd does it: a gzip'd newc cpio with busybox-static, the kernel's modules for
# virtio-pci, virtio-blk and ext4 with their dependencies from modules.dep (listed in load
# order in /etc/initramfs-modules; stored uncompressed for busybox's insmod), and
# guest-images/linux/root-initramfs-init as /init, which loads them, mounts root= and
# switch_roots to it. Files are recorded as owned by root; no root or fakeroot needed.
# Output, cached by the hash of the recipe, the init, the busybox version and the modules:
#   $HV_CACHE/root-initramfs/<hash>/root-initramfs.cpio.gz
# Usage: guest-images/linux/root-initramfs.sh [--force]
# The last line on stdout is the absolute path of the archive.
set -euo pipefail
SCRIPT_NAME="root-initramfs"
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: root-initramfs.sh [--force])" ;;
esac

INIT=$LINUX_DIR/root-initramfs-init
# Bump when the recipe below changes in a way that changes the output.
RECIPE=2
# What mounting an ext4 root on a virtio-blk disk takes, beyond what the kernel has built in:
# the PCI transport, the disk driver and the file system. crc32c_generic stands for ext4's
# soft dependency on crypto-crc32c (metadata checksums; no module names it as a symbol
# dependency): the generic one loads on any CPU, crc32c-intel only with SSE4.2. virtio_rng
# takes a virtio entropy device if the VM has one (`devices = rng`).
ROOT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4 virtio_rng)

# Adds the mount point of the real root.
stage_newroot() { mkdir -p "$1/newroot"; }

module_initramfs root-initramfs "$INIT" "$RECIPE" "" stage_newroot "${ROOT_MODULES[@]}"
