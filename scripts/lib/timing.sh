# Timing helpers for the benchmark scripts (sourced): wall-clock stamps, waiting for a line on
# a live log, bounded waits for a process, medians.
# shellcheck shell=bash

now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# wait_for PATTERN FILE PID DEADLINE: polls FILE every 20 ms until a line contains PATTERN
# (extended regex; prints the time it was seen, returns 0), PID ends (1) or the clock passes DEADLINE (2).
wait_for() {
    local pattern=$1 file=$2 pid=$3 deadline=$4 t
    while :; do
        if grep -qE -- "$pattern" "$file" 2>/dev/null; then now; return 0; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            grep -qE -- "$pattern" "$file" 2>/dev/null && { now; return 0; }
            return 1
        fi
        t=$(now)
        awk -v t="$t" -v d="$deadline" 'BEGIN { exit !(t > d) }' && return 2
        sleep 0.02
    done
}

# wait_exit PID SECONDS: waits for PID to end (returns its status) or kills it (returns 124).
wait_exit() {
    local pid=$1 limit=$2 i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt $((limit * 10)) ]; do sleep 0.1; i=$((i + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        return 124
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    return $rc
}

# deadline_in SECONDS: the clock reading SECONDS from now, for wait_for.
deadline_in() { awk -v s="$(now)" -v t="$1" 'BEGIN { printf "%.6f", s + t }'; }

# bench_workspace NAME: makes WORK (a scratch directory, removed at exit), LOGS (kept logs, in
# the cache) and PIDS (emulators started; append to it, they are killed at exit).
bench_workspace() {
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    LOGS=$HV_CACHE/bench
    mkcache "$LOGS"
    PIDS=()
    trap bench_cleanup EXIT
}
bench_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

# The CPU QEMU TCG emulates, on bare QEMU as under the hypervisor (boot/src/platforms.rs,
# TCG_CPU): AMD family 16h with SVM and NPT.
TCG_CPU=qemu64,family=22,model=48,stepping=1,+svm,+npt,+xsave,+xsaveopt,+rdtscp,+rdrand
