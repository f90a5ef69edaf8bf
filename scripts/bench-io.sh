#!/usr/bin/env bash
# Virtio I/O benchmark, inside the hypervisor (QEMU TCG, SVM) against the same guests on bare
# QEMU TCG with QEMU's own virtio devices, in one invocation, with their ratios:
#   disk: sequential write and read MB/s of a virtio-blk disk;
#   net:  TCP throughput between two VMs on one network (10 MiB, busybox nc).
#
# Usage: scripts/bench-io.sh [--what disk|net|all] [--mib N] [--timeout SECONDS]
#   --what      which benchmarks (default all)
#   --mib       size of the scratch disk written and read, in MiB (default 64)
#   --timeout   per run (default 600)
# The guest is Debian's kernel with its root on virtio-blk (guest-images/linux/rootfs.sh,
# root-initramfs.sh) and hv.disk=bench: it writes the whole second disk with dd, 1 MiB
# blocks, O_DIRECT and a final fsync, then reads it back, printing a marker before and after
# each. The host times the markers as they reach the serial console (guest clocks do not see
# all the time the host spends for the guest). Inside the hypervisor the scratch disk is
# `blank:N M` (in RAM); on bare QEMU a sparse raw file. Progress goes to stderr, the table to
# stdout; the serial logs of the last runs are kept in $HV_CACHE/bench/.
# The network pair runs as guest-images/linux-net.vms does: on bare QEMU two QEMU processes on a
# socket network (guest-images/linux/bare-qemu-net.sh; the client times its send by its own
# clock, which on bare QEMU is the host's), inside the hypervisor both VMs in one QEMU, on one
# host thread (single-threaded TCG, see --cpus in the README), timed by the host on the
# client's send markers.
set -euo pipefail
SCRIPT_NAME=bench-io
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../guest-images/linux/common.sh
. "$ROOT/guest-images/linux/common.sh"
# shellcheck source=lib/timing.sh
. "$ROOT/scripts/lib/timing.sh"

WHAT=all MIB=64 TIMEOUT=600
usage() { sed -n '7,10p' "$0" | sed 's/^# \{0,1\}//' >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --what) WHAT=${2:-}; shift 2 || die "--what needs disk, net or all" ;;
        --mib) MIB=${2:-}; shift 2 || die "--mib needs a number" ;;
        --timeout) TIMEOUT=${2:-}; shift 2 || die "--timeout needs seconds" ;;
        -h | --help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done
if ! [[ "$MIB" =~ ^[1-9][0-9]*$ ]] || [ "$MIB" -gt 1024 ]; then die "--mib must be 1 to 1024"; fi
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds"
case "$WHAT" in disk | net | all) ;; *) die "--what must be disk, net or all, not '$WHAT'" ;; esac

CPU=$TCG_CPU
CMDLINE='console=ttyS0 root=/dev/vda ro hv.disk=bench panic=-1'

say "images: distro kernel, root file system, root-on-virtio and network initramfs"
KERNEL=$("$ROOT/guest-images/linux/distro-kernel.sh" | tail -n1) || die "distro-kernel.sh failed"
ROOTFS=$("$ROOT/guest-images/linux/rootfs.sh" | tail -n1) || die "rootfs.sh failed"
INITRD=$("$ROOT/guest-images/linux/root-initramfs.sh" | tail -n1) || die "root-initramfs.sh failed"
NET_INITRD=$("$ROOT/guest-images/linux/net-initramfs.sh" | tail -n1) || die "net-initramfs.sh failed"
command -v qemu-system-x86_64 >/dev/null || ensure_packages qemu-system-x86

bench_workspace hv-bench-io

# measure NAME LOG PID: waits for the four HV-BENCH markers on LOG and prints
# "write_MBps read_MBps", or returns 1 with what went wrong on stderr.
measure() {
    local name=$1 log=$2 pid=$3 deadline t_ws t_wd t_rs t_rd
    deadline=$(deadline_in "$TIMEOUT")
    t_ws=$(wait_for 'HV-BENCH: write start' "$log" "$pid" "$deadline") &&
        t_wd=$(wait_for 'HV-BENCH: write done' "$log" "$pid" "$deadline") &&
        t_rs=$(wait_for 'HV-BENCH: read start' "$log" "$pid" "$deadline") &&
        t_rd=$(wait_for 'HV-BENCH: read done' "$log" "$pid" "$deadline") || {
        tr -d '\r' <"$log" | tail -n 15 >&2
        say "$name: the markers did not all appear"
        return 1
    }
    awk -v m="$MIB" -v ws="$t_ws" -v wd="$t_wd" -v rs="$t_rs" -v rd="$t_rd" \
        'BEGIN { printf "%.2f %.2f\n", m * 1.048576 / (wd - ws), m * 1.048576 / (rd - rs) }'
}

# (a) Bare QEMU TCG with QEMU's virtio-blk-pci: a copy of the root, a sparse scratch disk.
BARE=""
run_bare() {
    local log=$WORK/bare.log pid
    cp "$ROOTFS" "$WORK/root.ext4"
    truncate -s "${MIB}M" "$WORK/scratch.img"
    qemu-system-x86_64 -accel tcg -cpu "$CPU" -m 512 -nographic -no-reboot \
        -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" \
        -drive "file=$WORK/root.ext4,if=virtio,format=raw,readonly=on" \
        -drive "file=$WORK/scratch.img,if=virtio,format=raw" </dev/null >"$log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    BARE=$(measure "bare QEMU" "$log" "$pid") || true
    wait_exit "$pid" 60 || true
    cp "$log" "$LOGS/io-bare.log"
}

# boot_hypervisor VMS OUT: starts the hypervisor on QEMU TCG with the VM set VMS in the
# background, its console to OUT; sets HV_PID.
HV_PID=
boot_hypervisor() {
    (cd "$ROOT" && exec cargo run -q -p boot -- run --platform tcg --cpus 2 --vms "$1" --timeout "$TIMEOUT") \
        </dev/null >"$2" 2>"$2.err" &
    HV_PID=$!
    PIDS+=("$HV_PID")
}

# (b) Inside the hypervisor: the same guest, the root image and a blank disk from its config.
HV=""
run_hypervisor() {
    local vms=$WORK/bench.vms out=$WORK/hv.out
    cat >"$vms" <<VMS
# Generated by scripts/bench-io.sh
[vm bench]
kernel = $KERNEL
initrd = $INITRD
cmdline = $CMDLINE
memory = 256M
disk = $ROOTFS read-only, blank:${MIB}M
VMS
    boot_hypervisor "$vms" "$out"
    HV=$(measure "inside the hypervisor" "$out" "$HV_PID") || true
    wait_exit "$HV_PID" 120 || true
    cp "$out" "$LOGS/io-hypervisor.log"
}

# (c) The network pair on bare QEMU: its own script, which checks the transfer; MB/s.
NET_BARE=""
run_net_bare() {
    local out
    out=$(bash "$ROOT/guest-images/linux/bare-qemu-net.sh" --logs "$WORK/net-bare") || {
        say "bare QEMU network pair failed"
        return 1
    }
    NET_BARE=$(sed -n 's/^HV-NET-THROUGHPUT: \([0-9.]*\) MB\/s$/\1/p' <<<"$out")
    cp "$WORK/net-bare/client.log" "$LOGS/net-bare-client.log"
}

# (d) The network pair inside the hypervisor: MB/s between the client's send markers, checked
# against the server's sum.
NET_HV=""
run_net_hypervisor() {
    local vms=$WORK/net.vms out=$WORK/net-hv.out deadline t_start t_done sent received
    sed -e "s|linux/out/distro-vmlinuz|$KERNEL|" -e "s|linux/out/net-initramfs.cpio.gz|$NET_INITRD|" \
        "$ROOT/guest-images/linux-net.vms" >"$vms"
    boot_hypervisor "$vms" "$out"
    deadline=$(deadline_in "$TIMEOUT")
    if t_start=$(wait_for 'HV-NET-SEND: start' "$out" "$HV_PID" "$deadline") &&
        t_done=$(wait_for 'HV-NET-SEND: done' "$out" "$HV_PID" "$deadline"); then
        wait_for 'HV-END' "$out" "$HV_PID" "$deadline" >/dev/null || true
        sent=$(tr -d '\r' <"$out" | sed -n 's/^\[client\] HV-NET-TX: //p')
        received=$(tr -d '\r' <"$out" | sed -n 's/^\[server\] HV-NET-RX: //p')
        if [ -n "$sent" ] && [ "$sent" = "$received" ]; then
            NET_HV=$(awk -v a="$t_start" -v b="$t_done" 'BEGIN { printf "%.2f", 10.48576 / (b - a) }')
        else
            say "inside the hypervisor: sent '$sent', received '$received'"
        fi
    else
        tr -d '\r' <"$out" | tail -n 15 >&2
        say "inside the hypervisor: the network pair did not send"
    fi
    wait_exit "$HV_PID" 120 || true
    cp "$out" "$LOGS/net-hypervisor.log"
}

say "building the hypervisor tools (cargo build -p boot)"
(cd "$ROOT" && cargo build -q -p boot) >"$WORK/build.log" 2>&1 || {
    tail -n 20 "$WORK/build.log" >&2
    die "cargo build -p boot failed"
}
ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v h="$1" -v b="$2" 'BEGIN { printf "%.2f", h / b }' || echo -; }
row() { printf '  %-22s %14s %24s %10s\n' "$1" "${2:--}" "${3:--}" "$(ratio "$3" "$2")"; }
ok=1
if [ "$WHAT" != net ]; then
    say "disk: bare QEMU TCG"
    run_bare
    say "disk: inside the hypervisor (QEMU TCG)"
    run_hypervisor
    read -r BARE_W BARE_R <<<"${BARE:-}"
    read -r HV_W HV_R <<<"${HV:-}"
fi
if [ "$WHAT" != disk ]; then
    say "network: bare QEMU TCG (two QEMUs)"
    run_net_bare || true
    say "network: inside the hypervisor (QEMU TCG)"
    run_net_hypervisor
fi
echo "virtio I/O, MB/s (MB = 10^6 bytes), hypervisor on QEMU TCG against bare QEMU TCG"
printf '  %-22s %14s %24s %10s\n' "" "bare QEMU TCG" "inside the hypervisor" "ratio"
if [ "$WHAT" != net ]; then
    row "disk write ($MIB MiB)" "${BARE_W:-}" "${HV_W:-}"
    row "disk read ($MIB MiB)" "${BARE_R:-}" "${HV_R:-}"
    [ -n "$BARE" ] && [ -n "$HV" ] || ok=0
    echo "  (disk: dd, 1 MiB blocks, O_DIRECT; logs $LOGS/io-bare.log, $LOGS/io-hypervisor.log)"
fi
if [ "$WHAT" != disk ]; then
    row "TCP, VM to VM (10 MiB)" "$NET_BARE" "$NET_HV"
    [ -n "$NET_BARE" ] && [ -n "$NET_HV" ] || ok=0
    echo "  (network: bare is two QEMU threads, the hypervisor's pair shares one; logs $LOGS/net-*.log)"
fi
[ "$ok" = 1 ]
