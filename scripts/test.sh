#!/usr/bin/env bash
# Runs every check and test: formatting, lints (host and bare-metal), a short fuzzing run of
# every fuzz target, host unit tests, and the integration tests that boot the real images under
# QEMU TCG (SVM) and Bochs (VMX).
set -euo pipefail
SCRIPT_NAME=test.sh
cd "$(dirname "$0")/.."
source scripts/lib/setup.sh

ensure_packages "${QEMU_PACKAGES[@]}" "${BOCHS_PACKAGES[@]}"
ensure_toolchain

step() { say "== $*"; }
step "cargo fmt --check"
cargo fmt --all --check
step "clippy (host)"
cargo clippy --quiet --workspace --all-targets -- -D warnings
step "clippy (bare metal)"
cargo clippy --quiet -p hypervisor --target x86_64-unknown-none -- -D warnings
step "Linux guest images (built once, cached in ${HV_CACHE:-$HOME/.cache/hypervisor-guests})"
guest-images/linux/small-kernel.sh >/dev/null
guest-images/linux/distro-kernel.sh >/dev/null
guest-images/linux/initramfs.sh >/dev/null
step "fuzzing: every fuzz target for 30000 executions (scripts/fuzz.sh)"
scripts/fuzz.sh --runs 30000
step "tests"
cargo test --workspace
say "all checks passed"
