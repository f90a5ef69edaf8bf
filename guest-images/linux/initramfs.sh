#!/usr/bin/env bash
# Builds the test initramfs: a gzip'd newc cpio with busybox-static (/bin/busybox plus a symlink
# per applet) and guest-images/linux/init as /init. No root or fakeroot needed: files are
# recorded as owned by root, and /dev/console (which the kernel opens for init's console
# before /init runs) is written as a hand-made newc entry.
# Output, cached by the hash of init and the busybox version:
#   $HV_CACHE/initramfs/<hash>/initramfs.cpio.gz
# Usage: guest-images/linux/initramfs.sh [--force]
# The last line on stdout is the absolute path of the archive.
set -euo pipefail
SCRIPT_NAME=initramfs
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: initramfs.sh [--force])" ;;
esac

INIT=$LINUX_DIR/init
[ -r "$INIT" ] || die "init script not found: $INIT"
RECIPE=1

ensure_packages cpio gzip
ensure_busybox

KEY=$(hash_of_text "recipe=$RECIPE busybox=$BB_VERSION init=$(hash_of "$INIT")")
BASE=$HV_CACHE/initramfs
OUT=$BASE/$KEY
if [ "$FORCE" = 0 ] && [ -s "$OUT/initramfs.cpio.gz" ]; then
    say "up to date (init hash $KEY, busybox-static $BB_VERSION)"
    publish initramfs.cpio.gz "$OUT/initramfs.cpio.gz"
    exit 0
fi

mkcache "$BASE"
WORK=$(mktemp -d "$BASE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
say "staging busybox-static $BB_VERSION and /init"
stage_busybox "$ROOT"
cp "$INIT" "$ROOT/init"
chmod 755 "$ROOT/init"

ARCHIVE=$WORK/initramfs.cpio
say "writing the newc archive ($BB_LINKS applet links)"
write_initramfs "$ROOT" "$ARCHIVE"
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$ARCHIVE.gz" "$OUT/initramfs.cpio.gz"
say "built: $(stat -c %s "$OUT/initramfs.cpio.gz") bytes, $INITRAMFS_ENTRIES entries"
publish initramfs.cpio.gz "$OUT/initramfs.cpio.gz"
