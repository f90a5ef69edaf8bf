# Shared helpers for the Linux guest image scripts (sourced, not run).
# Diagnostics go to stderr; only the output paths go to stdout.

HV_CACHE=${HV_CACHE:-$HOME/.cache/hypervisor-guests}
LINUX_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

say() { printf '%s: %s\n' "${SCRIPT_NAME:-linux}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${SCRIPT_NAME:-linux}" "$*" >&2; exit 1; }

# Prefix for commands that need root: nothing as root, sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root for: $* (no sudo here)"
    fi
}

# ensure_packages PKG...: apt-get install the Debian packages that are not installed yet.
ensure_packages() {
    local package missing=()
    for package in "$@"; do
        if [ "$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$package")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing packages: ${missing[*]} (no apt-get here; install them by hand)"
    say "installing Debian packages: ${missing[*]}"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; then
        say "install failed; refreshing the package lists and retrying"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
            || die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
            || die "could not install: ${missing[*]}"
    fi
}

# hash_of FILE... / hash_of_text TEXT: short sha256 used as a cache key.
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
hash_of_text() { printf '%s' "$1" | sha256sum | cut -c1-16; }

mkcache() { mkdir -p "$1" 2>/dev/null || die "cannot create cache directory $1"; }

# publish NAME PATH: points guest-images/linux/out/NAME at PATH (so VM sets in guest-images/
# can name the image by a fixed relative path) and prints PATH, the script's result.
publish() {
    mkdir -p "$LINUX_DIR/out" 2>/dev/null || die "cannot create $LINUX_DIR/out"
    # Parallel runs may race to replace the link; the result only has to point at PATH.
    ln -sfn "$2" "$LINUX_DIR/out/$1" 2>/dev/null || [ "$(readlink "$LINUX_DIR/out/$1")" = "$2" ] \
        || die "cannot link $LINUX_DIR/out/$1"
    echo "$2"
}
