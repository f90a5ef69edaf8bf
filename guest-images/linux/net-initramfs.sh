#!/usr/bin/env bash
# Builds the network test initramfs for Debian's distro kernel (distro-kernel.sh): a gzip'd
# newc cpio with busybox-static, the kernel's modules for virtio-pci and virtio-net with their
# dependencies from modules.dep (listed in load order in /etc/initramfs-modules; stored
# uncompressed for busybox's insmod), /www/index.html (HV-NET-SERVICE-OK) for the guest's HTTP
# service and guest-images/linux/net-init as /init, which loads them, configures eth0 and, as
# the kernel command line says, serves or runs the checks between two VMs (see net-init).
# Files are recorded as owned by root; no root or fakeroot needed.
# Output, cached by the hash of the recipe, the init, the busybox version and the modules:
#   $HV_CACHE/net-initramfs/<hash>/net-initramfs.cpio.gz
# Usage: guest-images/linux/net-initramfs.sh [--force]
# The last line on stdout is the absolute path of the archive.
set -euo pipefail
SCRIPT_NAME=net-initramfs
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: net-initramfs.sh [--force])" ;;
esac

INIT=$LINUX_DIR/net-init
# Bump when the recipe below changes in a way that changes the output.
RECIPE=1
# A virtio-net NIC on PCI, beyond what the kernel has built in: the PCI transport and the
# driver (which brings virtio_ring, virtio, failover and net_failover).
NET_MODULES=(virtio_pci virtio_net)
# The page the guest serves on port 8080.
SERVICE_PAGE=HV-NET-SERVICE-OK

# Adds the service's page.
stage_page() {
    mkdir -p "$1/www"
    echo "$SERVICE_PAGE" >"$1/www/index.html"
}

module_initramfs net-initramfs "$INIT" "$RECIPE" "page=$SERVICE_PAGE" stage_page "${NET_MODULES[@]}"
