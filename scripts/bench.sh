#!/usr/bin/env bash
# Boot benchmark, in one invocation: Linux booted to "HV-LINUX-MARKER: userspace up" on bare
# QEMU TCG and inside the hypervisor (QEMU TCG, SVM), the same kernel, initramfs, command line
# and CPU on both sides, the median of N runs each, and their ratio; the exits each boot took
# inside; the time from reset to the hypervisor's first log line; and micro-benchmarks: the
# bench guest on bare QEMU and inside on each backend, the IPI round trip inside.
#
# Usage: scripts/bench.sh [--kernel small|distro|all] [--runs N] [--timeout SECONDS]
#                         [--bare-only] [--no-micro] [--micro-only]
#   --kernel      small (guest-images/linux/small-kernel.sh), distro (Debian's), all (default)
#   --runs        runs per side and configuration; medians are reported (default 3)
#   --timeout     per run (default 120)
#   --bare-only   skip the runs inside the hypervisor (and the micro-benchmarks)
#   --no-micro    skip the micro-benchmarks; --micro-only runs only them
# Each kernel boots with "console=ttyS0 panic=-1 hv.quick=1" and again with "quiet" added
# (hv.quick=1: /init powers off at the marker, so an exit count is the boot's). Bare times
# run from starting QEMU (it loads the kernel itself); inside, from the hypervisor's first log
# line (the firmware and boot loader before it are the "reset to first line" row).
# Progress goes to stderr, the tables to stdout; the last serial logs go to $HV_CACHE/bench/.
set -euo pipefail
SCRIPT_NAME=bench
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../guest-images/linux/common.sh
. "$ROOT/guest-images/linux/common.sh"
# shellcheck source=lib/timing.sh
. "$ROOT/scripts/lib/timing.sh"

KINDS="small distro" RUNS=3 TIMEOUT=120 BARE_ONLY=0 MICRO=1 BOOTS=1
usage() { sed -n '8,14p' "$0" | sed 's/^# \{0,1\}//' >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KINDS=${2:-}; shift 2 || die "--kernel needs small, distro or all" ;;
        --runs) RUNS=${2:-}; shift 2 || die "--runs needs a number" ;;
        --timeout) TIMEOUT=${2:-}; shift 2 || die "--timeout needs seconds" ;;
        --bare-only) BARE_ONLY=1 MICRO=0; shift ;;
        --no-micro) MICRO=0; shift ;;
        --micro-only) BOOTS=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done
case "$KINDS" in small | distro) ;; all) KINDS="small distro" ;; "small distro") ;; *) die "--kernel must be small, distro or all, not '$KINDS'" ;; esac
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds"

MARKER='HV-LINUX-MARKER: userspace up'
FIRST_LINE='INFO +hypervisor .*starting'
BASE_CMDLINE='console=ttyS0 panic=-1 hv.quick=1'
command -v qemu-system-x86_64 >/dev/null || ensure_packages qemu-system-x86
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"

bench_workspace hv-bench

if [ "$BARE_ONLY" = 0 ]; then
    say "building the hypervisor tools (cargo build -p boot)"
    (cd "$ROOT" && cargo build -q -p boot) >"$WORK/build.log" 2>&1 || { tail -n 20 "$WORK/build.log" >&2; die "cargo build -p boot failed"; }
fi
# Runs the built boot tool (no cargo in the timed path).
boot_tool() { "$ROOT/target/debug/boot" "$@"; }

# bare_run KERNEL INITRD CMDLINE LOG: seconds from starting QEMU to the marker, or nothing.
bare_run() {
    local start pid seen rc=0
    start=$(now)
    qemu-system-x86_64 -accel tcg -cpu "$TCG_CPU" -m 512 -nographic -no-reboot \
        -kernel "$1" -initrd "$2" -append "$3" </dev/null >"$4" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    seen=$(wait_for "$MARKER" "$4" "$pid" "$(deadline_in "$TIMEOUT")") || rc=$?
    wait_exit "$pid" 30 >/dev/null || true
    [ $rc -eq 0 ] && elapsed "$start" "$seen"
}

# hv_run VMS LOG: "START BOOT EXITS": seconds from the emulator's start to the hypervisor's
# first line, from that line to the marker, and the VM's exit count; nothing on failure.
hv_run() {
    local err=$WORK/hv.err pid started first seen rc=0
    : >"$2"
    boot_tool run --platform tcg --vms "$1" --timeout "$TIMEOUT" </dev/null >"$2" 2>"$err" &
    pid=$!
    PIDS+=("$pid")
    started=$(wait_for "boot: emulator started" "$err" "$pid" "$(deadline_in 120)") || rc=$?
    [ $rc -eq 0 ] && { first=$(wait_for "$FIRST_LINE" "$2" "$pid" "$(deadline_in "$TIMEOUT")") || rc=$?; }
    [ $rc -eq 0 ] && { seen=$(wait_for "$MARKER" "$2" "$pid" "$(deadline_in "$TIMEOUT")") || rc=$?; }
    wait_exit "$pid" $((TIMEOUT + 30)) >/dev/null || true
    [ $rc -eq 0 ] || return 0
    local exits
    exits=$(tr -d '\r' <"$2" | sed -n 's/^vm [^ ]*: \([0-9]*\) exits;.*/\1/p' | head -n1)
    echo "$(elapsed "$started" "$first") $(elapsed "$first" "$seen") ${exits:--}"
}

ROWS=() START_TIMES=()
bench_kernel() {
    local kind=$1 kernel initrd
    say "images for the $kind kernel"
    kernel=$("$ROOT/guest-images/linux/$kind-kernel.sh" | tail -n1) || die "building the $kind kernel failed"
    initrd=$("$ROOT/guest-images/linux/initramfs.sh" | tail -n1) || die "building the initramfs failed"
    local variant
    for variant in console quiet; do
        local cmdline=$BASE_CMDLINE
        [ "$variant" = console ] || cmdline+=" quiet"
        local bare=() inside=() exits=() i result
        for i in $(seq 1 "$RUNS"); do
            result=$(bare_run "$kernel" "$initrd" "$cmdline" "$WORK/bare.log")
            say "$kind/$variant bare run $i: ${result:-no marker}"
            [ -z "$result" ] || bare+=("$result")
            cp "$WORK/bare.log" "$LOGS/$kind-$variant-bare.log"
        done
        if [ "$BARE_ONLY" = 0 ]; then
            cat >"$WORK/linux.vms" <<VMS
# Generated by scripts/bench.sh
[vm linux]
kernel = $kernel
initrd = $initrd
cmdline = $cmdline
memory = 256M
VMS
            for i in $(seq 1 "$RUNS"); do
                result=$(hv_run "$WORK/linux.vms" "$WORK/hv.log")
                say "$kind/$variant hypervisor run $i: ${result:-no marker} (start, boot, exits)"
                cp "$WORK/hv.log" "$LOGS/$kind-$variant-hypervisor.log"
                [ -n "$result" ] || continue
                local start boot count
                read -r start boot count <<<"$result"
                START_TIMES+=("$start")
                inside+=("$boot")
                exits+=("$count")
            done
        fi
        local bare_median inside_median exits_median ratio=-
        bare_median=$(printf '%s\n' "${bare[@]}" | median)
        inside_median=$(printf '%s\n' "${inside[@]}" | median)
        exits_median=$(printf '%s\n' "${exits[@]}" | median)
        [ -z "$bare_median" ] || [ -z "$inside_median" ] ||
            ratio=$(awk -v b="$bare_median" -v h="$inside_median" 'BEGIN { printf "%.2f", h / b }')
        ROWS+=("$(printf '  %-7s %-8s %8s %8s %7s %8s   bare [%s] inside [%s]' "$kind" "$variant" \
            "${bare_median:--}" "${inside_median:--}" "$ratio" "${exits_median:--}" "${bare[*]}" "${inside[*]}")")
    done
}

# The micro-benchmarks: the bench guest (guest-images/test-guest/src/bin/bench_guest.rs) on bare
# QEMU TCG and inside the hypervisor on each backend, and the test guest's IPI round trip
# (cases=smp,bench on four vCPUs) inside. MICRO_CYCLES[SIDE/WHAT] = cycles.
declare -A MICRO_CYCLES=()
MICRO_WHATS=()
# take_micro SIDE LOG: records LOG's "HV-BENCH WHAT: N cycles" lines (with or without a VM prefix).
take_micro() {
    local what cycles seen=0
    while IFS=$'\t' read -r what cycles; do
        [[ " ${MICRO_WHATS[*]} " == *" $what "* ]] || MICRO_WHATS+=("$what")
        MICRO_CYCLES[$1/$what]=$cycles
        seen=1
    done < <(tr -d '\r' <"$2" | sed -n 's/^\(\[[a-z]*\] \)\{0,1\}HV-BENCH \(.*\): \([0-9]*\) cycles$/\2\t\3/p' \
        | sed 's/ /_/g')
    [ $seen = 1 ] || say "no micro-benchmark results on $1 (log: $2)"
}
micro_bare() {
    say "micro-benchmarks on bare QEMU TCG"
    local log=$LOGS/micro-bare.log
    timeout 300 qemu-system-x86_64 -accel tcg -cpu "$TCG_CPU" -m 64 -display none -monitor none -no-reboot \
        -serial "file:$log" -device isa-debug-exit,iobase=0xf4,iosize=4 \
        -kernel "$(built_image bench-guest)" </dev/null >/dev/null 2>&1 || true
    take_micro bare "$log"
}
micro_inside() {
    cat >"$WORK/micro.vms" <<'VMS'
# Generated by scripts/bench.sh
[vm bench]
kernel = bench-guest.elf
memory = 16M
VMS
    cat >"$WORK/ipi.vms" <<'VMS'
# Generated by scripts/bench.sh
[vm bench]
kernel = test-guest.elf
cmdline = cases=smp,bench
memory = 64M
vcpus = 4
devices = test
VMS
    local set
    for set in micro ipi; do
        say "micro-benchmarks on $1 ($set)"
        boot_tool run --platform "$1" --vms "$WORK/$set.vms" --timeout 600 </dev/null >"$LOGS/$set-$1.log" 2>&1 || true
        take_micro "$1" "$LOGS/$set-$1.log"
    done
}
# built_image NAME: the path of a guest binary cargo built for the boot tool.
built_image() {
    local path
    path=$(find "$ROOT/target/x86_64-unknown-none" -path "*/artifact/test-guest-*/bin/${1//-/_}-*" ! -name '*.d' \
        -printf '%T@ %p\n' 2>/dev/null | sort -nr | head -n1 | cut -d' ' -f2-)
    [ -n "$path" ] || die "no built $1 (cargo build -p boot builds it)"
    echo "$path"
}

if [ "$BOOTS" = 1 ]; then
    for kind in $KINDS; do bench_kernel "$kind"; done
    echo "Linux boot to '$MARKER', QEMU TCG, CPU $TCG_CPU (median of $RUNS runs per side)"
    printf '  %-7s %-8s %8s %8s %7s %8s\n' kernel cmdline "bare s" "inside s" ratio exits
    printf '%s\n' "${ROWS[@]}"
    echo "  (console: '$BASE_CMDLINE'; quiet: the same plus 'quiet')"
    if [ "$BARE_ONLY" = 0 ]; then
        echo "Reset to the hypervisor's first log line (BIOS image, QEMU TCG): median $(printf '%s\n' "${START_TIMES[@]}" | median) s [${START_TIMES[*]}]"
    fi
fi
if [ "$MICRO" = 1 ]; then
    micro_bare
    micro_inside tcg
    micro_inside bochs
    echo "Micro-benchmarks (guest TSC cycles; bare: the same bench guest on bare QEMU TCG, which has no IPI figure)"
    printf '  %-48s %10s %12s %9s %13s\n' "" "tcg bare" "tcg inside" ratio "bochs inside"
    for what in "${MICRO_WHATS[@]}"; do
        bare=${MICRO_CYCLES[bare/$what]:--} tcg=${MICRO_CYCLES[tcg/$what]:--} ratio=-
        [ "$bare" = - ] || [ "$tcg" = - ] || ratio=$(awk -v b="$bare" -v h="$tcg" 'BEGIN { printf "%.1f", h / b }')
        printf '  %-48s %10s %12s %9s %13s\n' "${what//_/ }" "$bare" "$tcg" "$ratio" "${MICRO_CYCLES[bochs/$what]:--}"
    done
fi
