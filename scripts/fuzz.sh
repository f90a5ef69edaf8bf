#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of everything that takes guest or file input.
#
#   scripts/fuzz.sh [--runs N] [TARGET...] [-- LIBFUZZER_OPTION...]
#
# Builds the targets of hypervisor/fuzz/ (all of them without TARGET; `ls
# hypervisor/fuzz/fuzz_targets`) with overflow checks and debug assertions on, then runs each
# for N executions (default 100000), seeded with its corpus in hypervisor/fuzz/corpus/<target>/.
# The repository's corpus is only read: what a run adds goes to a scratch directory that is
# removed afterwards. Prints one line per target (executions, time, coverage) and a total.
# On a crash, a hang (-timeout, 30 s) or running out of memory it stops with status 1 and the
# path of the input, kept in hypervisor/fuzz/artifacts/<target>/; rerun that input with
# `hypervisor/fuzz/target/x86_64-unknown-linux-gnu/release/<target> <file>` (FUZZ_VERBOSE=1
# says what each step did). Installs cargo-fuzz if it is missing.
set -euo pipefail
SCRIPT_NAME=fuzz.sh
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

FUZZ_DIR=hypervisor/fuzz
runs=100000
targets=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs=${2:?--runs needs a value}; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '/^set -euo pipefail/q; 2,$p' "$0"; exit 0 ;;
        -*) say "unknown option $1 (see --help)"; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done
case "$runs" in
    ''|*[!0-9]*) say "--runs needs a number of executions, not $runs"; exit 2 ;;
esac
all=()
for file in "$FUZZ_DIR"/fuzz_targets/*.rs; do
    all+=("$(basename "$file" .rs)")
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=("${all[@]}")
fi
for target in "${targets[@]}"; do
    if [ ! -f "$FUZZ_DIR/fuzz_targets/$target.rs" ]; then
        say "no fuzz target $target (targets: ${all[*]})"
        exit 2
    fi
done

ensure_toolchain
# libFuzzer itself is C++, built by libfuzzer-sys.
command -v c++ >/dev/null || ensure_packages g++
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

# No sanitizer: everything under test is safe Rust (no `unsafe` outside platform/), so
# AddressSanitizer would find nothing the bounds checks do not, at several times the cost.
# Overflow checks and debug assertions are on, as in the hypervisor's own dev builds.
build=(--release --debug-assertions --sanitizer none)
say "building ${#targets[@]} fuzz target(s)"
build_start=$(date +%s)
build_log=$(mktemp "${TMPDIR:-/tmp}/hypervisor-fuzz-build.XXXXXX")
if [ ${#targets[@]} -eq ${#all[@]} ]; then
    builds=("")
else
    builds=("${targets[@]}")
fi
for target in "${builds[@]}"; do
    if ! (cd "$FUZZ_DIR" && cargo fuzz build "${build[@]}" ${target:+"$target"}) >"$build_log" 2>&1; then
        cat "$build_log" >&2
        rm -f "$build_log"
        say "building the fuzz targets failed"
        exit 1
    fi
done
rm -f "$build_log"
say "built in $(($(date +%s) - build_start)) s"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/hypervisor-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

total_runs=0
total_ms=0
for target in "${targets[@]}"; do
    binary=$FUZZ_DIR/target/x86_64-unknown-linux-gnu/release/$target
    seeds=$FUZZ_DIR/corpus/$target
    artifacts=$FUZZ_DIR/artifacts/$target
    mkdir -p "$scratch/$target" "$artifacts"
    log=$scratch/$target.log
    start=$(date +%s%N)
    status=0
    # New inputs go to the first directory (scratch); the seeds are only read.
    "$binary" -runs="$runs" -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${extra[@]}" "$scratch/$target" "$seeds" >"$log" 2>&1 || status=$?
    ms=$((($(date +%s%N) - start) / 1000000))
    executed=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
    if [ "$status" -ne 0 ] || [ -z "$executed" ]; then
        tail -n 40 "$log" >&2
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        say "$target FAILED (status $status) after $((ms / 1000)) s${artifact:+: input kept in $artifact}"
        if [ -n "$artifact" ]; then
            say "reproduce: FUZZ_VERBOSE=1 $binary $artifact"
        fi
        exit 1
    fi
    line=$(printf '%-12s %10d executions in %7.1f s (%s)' "$target" "$executed" "$(echo "$ms" | awk '{print $1 / 1000}')" "${coverage:-cov: ?}")
    say "$line"
    total_runs=$((total_runs + executed))
    total_ms=$((total_ms + ms))
done
say "$(printf 'total        %10d executions in %7.1f s, no crash' "$total_runs" "$(echo "$total_ms" | awk '{print $1 / 1000}')")"
