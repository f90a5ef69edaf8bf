#!/usr/bin/env bash
# Builds the small test kernel (bzImage) from Debian's linux-source-6.1:
#   make tinyconfig + small.config (merge_config.sh -m) + make olddefconfig, then bzImage.
# Output, cached by the fragment's hash and the source version:
#   $HV_CACHE/small-kernel/<source version>-<hash>/{bzImage,config,build.log}
# Usage: guest-images/linux/small-kernel.sh [--force]
# The last line on stdout is the absolute path of the bzImage.
set -euo pipefail
SCRIPT_NAME=small-kernel
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: small-kernel.sh [--force])" ;;
esac

FRAGMENT=$LINUX_DIR/small.config
[ -r "$FRAGMENT" ] || die "config fragment not found: $FRAGMENT"
# Bump when the recipe below changes in a way that changes the output.
RECIPE=1

ensure_packages linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev xz-utils

SRC_VERSION=$(dpkg-query -W -f='${Version}' linux-source-6.1)
TARBALL=$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1 || true)
[ -n "$TARBALL" ] || die "linux-source-6.1 is installed but /usr/src/linux-source-6.1.tar.* is missing"

KEY=$(hash_of_text "recipe=$RECIPE source=$SRC_VERSION fragment=$(hash_of "$FRAGMENT")")
BASE=$HV_CACHE/small-kernel
OUT=$BASE/$SRC_VERSION-$KEY
if [ "$FORCE" = 0 ] && [ -s "$OUT/bzImage" ]; then
    say "up to date (fragment hash $KEY, linux-source-6.1 $SRC_VERSION)"
    publish small-bzImage "$OUT/bzImage"
    exit 0
fi

# The source tree, unpacked once per source package version.
SRC=$HV_CACHE/src/linux-source-6.1-$SRC_VERSION
if [ ! -f "$SRC/Makefile" ]; then
    mkcache "$HV_CACHE/src"
    say "unpacking $TARBALL into $SRC"
    rm -rf "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xf "$TARBALL" -C "$SRC.tmp" --strip-components=1 || die "could not unpack $TARBALL"
    rm -rf "$SRC"
    mv "$SRC.tmp" "$SRC"
fi

# One out-of-tree build directory, reused so that fragment edits rebuild incrementally.
BUILD=$BASE/build
mkcache "$BUILD"
if [ "$(cat "$BUILD/.hv-source" 2>/dev/null || true)" != "$SRC_VERSION" ]; then
    say "new source version: clearing $BUILD"
    rm -rf "$BUILD"
    mkdir -p "$BUILD"
    echo "$SRC_VERSION" >"$BUILD/.hv-source"
fi
LOG=$BUILD/build.log
: >"$LOG"
JOBS=$(nproc)
MAKE=(make -C "$SRC" O="$BUILD" ARCH=x86_64)

run_logged() {
    if ! "$@" >>"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        die "failed: $* (whole log: $LOG)"
    fi
}

say "configuring: tinyconfig + $(basename "$FRAGMENT") + olddefconfig"
run_logged "${MAKE[@]}" tinyconfig
(cd "$SRC" && run_logged scripts/kconfig/merge_config.sh -m -O "$BUILD" "$BUILD/.config" "$FRAGMENT")
run_logged "${MAKE[@]}" olddefconfig

# Every =y option of the fragment must have survived (a missing dependency drops it silently).
dropped=()
while IFS= read -r option; do
    grep -qx "$option=y" "$BUILD/.config" || dropped+=("$option")
done < <(sed -n 's/^\(CONFIG_[A-Za-z0-9_]*\)=y[[:space:]]*$/\1/p' "$FRAGMENT")
[ ${#dropped[@]} -eq 0 ] || die "options of $(basename "$FRAGMENT") not =y after olddefconfig: ${dropped[*]}"
# Options the fragment turns off but that came back (informational only).
while IFS= read -r option; do
    if grep -qx "$option=y" "$BUILD/.config"; then
        say "note: $option is requested off but is =y (forced by a dependency or def_bool)"
    fi
done < <(sed -n 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1/p' "$FRAGMENT")

say "building bzImage with -j$JOBS (log: $LOG)"
start=$(date +%s)
run_logged "${MAKE[@]}" -j"$JOBS" bzImage
elapsed=$(($(date +%s) - start))

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$BUILD/arch/x86/boot/bzImage" "$OUT.tmp/bzImage"
cp "$BUILD/.config" "$OUT.tmp/config"
cp "$LOG" "$OUT.tmp/build.log"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
say "built in ${elapsed}s: bzImage $(stat -c %s "$OUT/bzImage") bytes"
publish small-bzImage "$OUT/bzImage"
