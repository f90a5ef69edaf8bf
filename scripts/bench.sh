#!/usr/bin/env bash
# Linux boot benchmark: time from start to the first "HV-LINUX-MARKER: userspace up" line on the
# serial console, on bare QEMU TCG and inside the hypervisor (QEMU TCG, SVM), and their ratio.
#
# Usage: scripts/bench.sh [--kernel small|distro] [--runs N] [--timeout SECONDS]
#                         [--hv-timeout SECONDS] [--bare-only]
#   --kernel      small (default): guest-images/linux/small-kernel.sh; distro: Debian's kernel
#   --runs        bare QEMU runs, the median is reported (default 3)
#   --timeout     per bare run (default 60)
#   --hv-timeout  the hypervisor run's --timeout (default 300)
#   --bare-only   skip the run inside the hypervisor
# Images are built (or taken from the cache, $HV_CACHE) by guest-images/linux/*.sh.
# Progress goes to stderr; the result table to stdout. Serial logs of the last runs: $HV_CACHE/bench/.
set -euo pipefail
SCRIPT_NAME=bench
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../guest-images/linux/common.sh
. "$ROOT/guest-images/linux/common.sh"
# shellcheck source=lib/timing.sh
. "$ROOT/scripts/lib/timing.sh"

KIND=small RUNS=3 TIMEOUT=60 HV_TIMEOUT=300 BARE_ONLY=0
usage() { sed -n '5,11p' "$0" | sed 's/^# \{0,1\}//' >&2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KIND=${2:-}; shift 2 || die "--kernel needs small or distro" ;;
        --runs) RUNS=${2:-}; shift 2 || die "--runs needs a number" ;;
        --timeout) TIMEOUT=${2:-}; shift 2 || die "--timeout needs seconds" ;;
        --hv-timeout) HV_TIMEOUT=${2:-}; shift 2 || die "--hv-timeout needs seconds" ;;
        --bare-only) BARE_ONLY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage; die "unknown argument: $1" ;;
    esac
done
case "$KIND" in small | distro) ;; *) die "--kernel must be small or distro, not '$KIND'" ;; esac
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--timeout must be a positive number of seconds"
[[ "$HV_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "--hv-timeout must be a positive number of seconds"

MARKER='HV-LINUX-MARKER: userspace up'
DONE_MARKER='HV-LINUX-MARKER: checks done'
CPU=$TCG_CPU
BARE_CMDLINE='console=ttyS0 panic=-1 quiet'
HV_CMDLINE='console=ttyS0 panic=-1'

say "images for the $KIND kernel"
KERNEL=$("$ROOT/guest-images/linux/$KIND-kernel.sh" | tail -n1) || die "building the $KIND kernel failed"
INITRD=$("$ROOT/guest-images/linux/initramfs.sh" | tail -n1) || die "building the initramfs failed"
[ -f "$KERNEL" ] && [ -f "$INITRD" ] || die "image scripts printed no usable paths ($KERNEL, $INITRD)"
command -v qemu-system-x86_64 >/dev/null || ensure_packages qemu-system-x86
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hv-bench.XXXXXX")
# The serial logs of the last runs are kept here.
LOGS=$HV_CACHE/bench
mkcache "$LOGS"
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT


# (a) Bare QEMU TCG: wall time from starting QEMU to the marker.
BARE_TIMES=()
BARE_NOTES=""
run_bare() {
    local i log start seen rc t
    for i in $(seq 1 "$RUNS"); do
        log=$WORK/bare-$i.log
        start=$(now)
        qemu-system-x86_64 -accel tcg -cpu "$CPU" -m 512 -nographic -no-reboot \
            -kernel "$KERNEL" -initrd "$INITRD" -append "$BARE_CMDLINE" </dev/null >"$log" 2>&1 &
        local pid=$!
        PIDS+=("$pid")
        rc=0
        seen=$(wait_for "$MARKER" "$log" "$pid" "$(awk -v s="$start" -v t="$TIMEOUT" 'BEGIN { printf "%.6f", s + t }')") || rc=$?
        if [ $rc -ne 0 ]; then
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            tail -n 20 "$log" | tr -d '\r' >&2
            say "bare run $i: no marker ($([ $rc -eq 2 ] && echo "timeout ${TIMEOUT}s" || echo "QEMU ended first"))"
            continue
        fi
        t=$(elapsed "$start" "$seen")
        BARE_TIMES+=("$t")
        # Let the guest finish its checks and power off; note it if it does not.
        rc=0
        wait_exit "$pid" "$TIMEOUT" || rc=$?
        local total
        total=$(elapsed "$start" "$(now)")
        grep -qF "$DONE_MARKER" "$log" || BARE_NOTES+=" run $i: no '$DONE_MARKER';"
        [ $rc -ne 124 ] || BARE_NOTES+=" run $i: did not power off;"
        say "bare run $i: marker after ${t}s, QEMU ended after ${total}s (status $rc)"
        cp "$log" "$LOGS/$KIND-bare.log"
    done
}

# (b) Inside the hypervisor: a VM set with the same kernel and initramfs, run on QEMU TCG (SVM).
# Times are taken on the live serial output: from the hypervisor's "starting" line to the
# marker (hypervisor boot + Linux boot inside it), and from the command's start (includes
# building the image and firmware). Not expected to work until the hypervisor boots Linux.
HV_TIME="" HV_TOTAL="" HV_STATUS="" HV_TABLE=""
run_inside_hypervisor() {
    local vms=$WORK/linux.vms out=$WORK/hv.out log=$WORK/hv-serial.log
    cat >"$vms" <<VMS
# Generated by scripts/bench.sh
[vm linux]
kernel = $KERNEL
initrd = $INITRD
cmdline = $HV_CMDLINE
memory = 256M
VMS
    say "building the hypervisor tools (cargo build -p boot)"
    if ! (cd "$ROOT" && cargo build -q -p boot) >"$WORK/build.log" 2>&1; then
        tail -n 20 "$WORK/build.log" >&2
        HV_STATUS="inside the hypervisor: build failed (cargo build -p boot)"
        return 1
    fi
    say "running inside the hypervisor (QEMU TCG, timeout ${HV_TIMEOUT}s)"
    local start pid rc hv_seen seen
    start=$(now)
    # Not --quiet: the serial log then only appears at the end, and the marker must be seen live.
    (cd "$ROOT" && exec cargo run -q -p boot -- run --platform tcg --vms "$vms" \
        --timeout "$HV_TIMEOUT" --log "$log") </dev/null >"$out" 2>"$WORK/hv.err" &
    pid=$!
    PIDS+=("$pid")
    # Image building happens before the emulator starts: allow for it on top of the run's timeout.
    local deadline
    deadline=$(awk -v s="$start" -v t="$HV_TIMEOUT" 'BEGIN { printf "%.6f", s + t + 300 }')
    rc=0
    hv_seen=$(wait_for "INFO +hypervisor .*starting" "$out" "$pid" "$deadline") || rc=$?
    if [ $rc -eq 0 ]; then
        rc=0
        seen=$(wait_for "$MARKER" "$out" "$pid" \
            "$(awk -v s="$hv_seen" -v t="$HV_TIMEOUT" 'BEGIN { printf "%.6f", s + t }')") || rc=$?
    fi
    if [ $rc -eq 0 ]; then
        HV_TIME=$(elapsed "$hv_seen" "$seen")
        HV_TOTAL=$(elapsed "$start" "$seen")
        HV_STATUS="inside the hypervisor: marker after ${HV_TIME}s from the hypervisor's start (${HV_TOTAL}s from the command)"
    else
        HV_STATUS="inside the hypervisor: did not reach the marker within ${HV_TIMEOUT} s"
    fi
    local hv_rc=0
    wait_exit "$pid" $((HV_TIMEOUT + 60)) || hv_rc=$?
    local serial=$out
    [ -s "$log" ] && serial=$log
    local vm_end
    vm_end=$(tr -d '\r' <"$serial" | grep -m1 '^VM-END vm=linux' || true)
    [ -z "$vm_end" ] || HV_STATUS+=$'\n'"  $vm_end"
    [ $hv_rc -eq 0 ] || HV_STATUS+=$'\n'"  boot run ended with exit status $hv_rc"
    # The exit-count table: the "vm linux:" line and the indented lines after it.
    HV_TABLE=$(tr -d '\r' <"$serial" | awk '/^vm linux:/ { p = 1; print; next } p && /^ / { print; next } p { exit }')
    cp "$serial" "$LOGS/$KIND-hypervisor.log" 2>/dev/null || true
    [ $rc -eq 0 ]
}

say "kernel: $KERNEL ($(stat -c %s "$KERNEL") bytes)"
say "initramfs: $INITRD ($(stat -c %s "$INITRD") bytes)"
say "bare QEMU TCG, $RUNS runs"
run_bare
BARE=$(printf '%s\n' "${BARE_TIMES[@]}" | median)
if [ "$BARE_ONLY" = 0 ]; then
    run_inside_hypervisor || say "$(head -n1 <<<"$HV_STATUS")"
else
    HV_STATUS="inside the hypervisor: skipped (--bare-only)"
fi

RATIO=""
[ -n "$BARE" ] && [ -n "$HV_TIME" ] && RATIO=$(awk -v b="$BARE" -v h="$HV_TIME" 'BEGIN { printf "%.1fx", h / b }')
echo "Linux boot to '$MARKER' ($KIND kernel: $KERNEL)"
printf '  %-34s %s\n' "bare QEMU TCG (median of $RUNS)" "$([ -n "$BARE" ] && echo "$BARE s" || echo "no marker")  [runs: ${BARE_TIMES[*]:-none}]"
printf '  %-34s %s\n' "inside the hypervisor (QEMU TCG)" "$([ -n "$HV_TIME" ] && echo "$HV_TIME s" || echo "-")"
printf '  %-34s %s\n' "ratio hypervisor / bare" "${RATIO:--}"
[ -z "$BARE_NOTES" ] || echo "  bare notes:$BARE_NOTES"
[ -z "$BARE" ] || echo "  (last bare serial log: $LOGS/$KIND-bare.log)"
echo "$HV_STATUS"
if [ -n "$HV_TABLE" ]; then
    echo "exit counts:"
    echo "$HV_TABLE"
elif [ "$BARE_ONLY" = 0 ]; then
    echo "exit counts: none (no 'vm linux:' table in the serial log)"
    if [ -s "$LOGS/$KIND-hypervisor.log" ]; then
        echo "last lines of the hypervisor's serial log ($LOGS/$KIND-hypervisor.log):"
        tr -d '\r' <"$LOGS/$KIND-hypervisor.log" | tail -n 8 | sed 's/^/  /'
    fi
fi
[ -n "$BARE" ] || exit 1
