# Installs what the scripts need, idempotently, saying what it installs.
# Sourced by scripts/run.sh and scripts/test.sh.

# Debian packages by purpose.
QEMU_PACKAGES=(qemu-system-x86 ovmf)
BOCHS_PACKAGES=(bochs bochs-sdl bochsbios vgabios)

say() { printf '%s: %s\n' "${SCRIPT_NAME:-setup}" "$*" >&2; }

missing_packages() {
    local package
    for package in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" != "install ok installed" ]; then
            printf '%s\n' "$package"
        fi
    done
}

ensure_packages() {
    local missing
    missing=$(missing_packages "$@")
    [ -z "$missing" ] && return 0
    if ! command -v apt-get >/dev/null; then
        say "missing packages: $(echo $missing) — install them with your package manager (no apt-get here)"
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then sudo=(sudo); else
            say "missing packages: $(echo $missing) — run as root or install them: apt-get install $(echo $missing)"
            return 1
        fi
    fi
    say "installing Debian packages: $(echo $missing)"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    # shellcheck disable=SC2086
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
}

# The toolchain pinned in rust-toolchain.toml, with its components and target.
ensure_toolchain() {
    if ! command -v rustup >/dev/null; then
        say "rustup not found: install it from https://rustup.rs, then run this again"
        return 1
    fi
    local channel
    channel=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
    if ! rustup run "$channel" rustc --version >/dev/null 2>&1 \
        || ! rustup component list --toolchain "$channel" --installed 2>/dev/null | grep -q '^rust-src' \
        || ! rustup component list --toolchain "$channel" --installed 2>/dev/null | grep -q '^llvm-tools' \
        || ! rustup component list --toolchain "$channel" --installed 2>/dev/null | grep -q '^clippy' \
        || ! rustup target list --toolchain "$channel" --installed 2>/dev/null | grep -q '^x86_64-unknown-none'; then
        say "installing Rust $channel with rust-src, llvm-tools-preview, rustfmt, clippy and x86_64-unknown-none"
        rustup toolchain install "$channel" --profile minimal \
            -c rust-src -c llvm-tools-preview -c rustfmt -c clippy -t x86_64-unknown-none >&2
    fi
}
