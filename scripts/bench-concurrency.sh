#!/usr/bin/env bash
# Concurrency benchmark: the wall time of a VM set (two Linux VMs and a test guest,
# guest-images/bench/set.vms) run at once, against its VMs run one after another, with 1 and
# with 2 host CPUs, on QEMU TCG (SVM). Each time is a whole `boot run` minus that of an empty
# set on the same machine (firmware and bring-up), so one after another is not charged three
# start-ups.
#
# Then the small Linux VM's own time from start to end (its exit table's first line) alone and
# beside a VM that spins with interrupts off and one that halts forever
# (guest-images/linux-beside-hostile.vms), with the same host CPU counts.
#
# Usage: scripts/bench-concurrency.sh [--cpus "1 2"]
# Progress goes to stderr; the result table to stdout.
set -euo pipefail
SCRIPT_NAME=bench-concurrency
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=../guest-images/linux/common.sh
. "$ROOT/guest-images/linux/common.sh"

CPU_COUNTS="1 2"
while [ $# -gt 0 ]; do
    case "$1" in
        --cpus) CPU_COUNTS=${2:-}; shift 2 || die "--cpus needs a list like \"1 2\"" ;;
        -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
        *) die "unknown argument: $1" ;;
    esac
done

say "images (cached in ${HV_CACHE})"
"$ROOT/guest-images/linux/small-kernel.sh" >/dev/null || die "building the small kernel failed"
"$ROOT/guest-images/linux/initramfs.sh" >/dev/null || die "building the initramfs failed"
command -v bc >/dev/null || ensure_packages bc
cd "$ROOT"
cargo build --quiet -p boot

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hv-bench-concurrency.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SET=guest-images/bench/set.vms
# One set per VM of the benchmark set, each alone (paths stay relative to guest-images/bench/).
awk -v dir="$WORK" '/^\[vm /{name=$2; sub(/\]$/, "", name); file=dir "/" name ".vms"} file {print > file}' "$SET"
for one in "$WORK"/*.vms; do
    sed -i "s|= \.\./|= $ROOT/guest-images/|" "$one"
done
# The Linux VM of the hostile set, alone (its paths are relative to guest-images/).
BESIDE=guest-images/linux-beside-hostile.vms
awk '/^\[vm /{keep = ($2 == "linux]")} keep' "$BESIDE" | sed "s|= linux/|= $ROOT/guest-images/linux/|" >"$WORK/alone.vms"
: >"$WORK/empty.vms"

# Seconds of one `boot run` (from boot's summary line); the run must end cleanly.
seconds() {
    local cpus=$1 vms=$2 out
    out=$(cargo run --quiet -p boot -- run --platform tcg --cpus "$cpus" --vms "$vms" --timeout 300 --quiet 2>&1) ||
        die "run of $vms with $cpus CPU(s) failed: $(printf '%s\n' "$out" | tail -n 3)"
    printf '%s\n' "$out" | sed -n 's/.*hypervisor ended with success .* after \([0-9.]*\) s.*/\1/p' | tail -n1
}

printf '%-6s %12s %18s %8s\n' "cpus" "at once (s)" "one after another" "ratio"
for cpus in $CPU_COUNTS; do
    say "$cpus CPU(s): empty set, the set at once, each VM alone"
    base=$(seconds "$cpus" "$WORK/empty.vms")
    together=$(seconds "$cpus" "$SET")
    sequential=0
    for one in "$WORK"/linux-a.vms "$WORK"/linux-b.vms "$WORK"/ticks.vms; do
        t=$(seconds "$cpus" "$one")
        sequential=$(echo "$sequential + $t - $base" | bc -l)
    done
    together=$(echo "$together - $base" | bc -l)
    printf '%-6s %12.1f %18.1f %8.2f\n' "$cpus" "$together" "$sequential" "$(echo "$together / $sequential" | bc -l)"
done

# Seconds from the Linux VM's start to its end (the first line of its exit table) in one run of
# set $2 on $1 CPUs; the other VMs of the set may fail (the hostile ones end by timeout).
linux_seconds() {
    local cpus=$1 vms=$2 log=$WORK/linux.log
    cargo run --quiet -p boot -- run --platform tcg --cpus "$cpus" --vms "$vms" --timeout 300 --quiet \
        --log "$log" >/dev/null 2>&1 || true
    grep -aq "VM-END vm=linux reason=power-off" "$log" || die "Linux did not power off in $vms with $cpus CPU(s)"
    tr -d '\r' <"$log" | sed -n 's/^vm linux: .*, \([0-9.]*\) s from start to end$/\1/p' | tail -n1
}

printf '\n%-6s %12s %24s %8s\n' "cpus" "Linux alone (s)" "beside spinner+sleeper" "ratio"
for cpus in $CPU_COUNTS; do
    say "$cpus CPU(s): Linux alone, then beside a spinning and a sleeping VM"
    alone=$(linux_seconds "$cpus" "$WORK/alone.vms")
    beside=$(linux_seconds "$cpus" "$BESIDE")
    printf '%-6s %15.1f %24.1f %8.2f\n' "$cpus" "$alone" "$beside" "$(echo "$beside / $alone" | bc -l)"
done
