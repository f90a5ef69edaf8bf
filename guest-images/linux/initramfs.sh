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

ensure_packages busybox-static cpio gzip
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing although busybox-static is installed"
file_is_static() { ! LC_ALL=C ldd "$1" >/dev/null 2>&1; }
file_is_static "$BUSYBOX" || die "$BUSYBOX is dynamically linked (busybox-static expected)"
BB_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)

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
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,tmp,root,etc}
chmod 1777 "$ROOT/tmp"
cp "$BUSYBOX" "$ROOT/bin/busybox"
cp "$INIT" "$ROOT/init"
chmod 755 "$ROOT/init" "$ROOT/bin/busybox"
# One symlink per applet, where busybox itself would install it (`busybox --install -s`).
count=0
while IFS= read -r applet; do
    applet=${applet#/}
    [ -n "$applet" ] && [ "$applet" != bin/busybox ] || continue
    mkdir -p "$ROOT/$(dirname "$applet")"
    [ -e "$ROOT/$applet" ] || { ln -s /bin/busybox "$ROOT/$applet"; count=$((count + 1)); }
done < <("$BUSYBOX" --list-full)
[ -e "$ROOT/bin/sh" ] || die "busybox has no sh applet"

# newc entry by hand: newc_entry NAME MODE RDEVMAJOR RDEVMINOR INO (no data, owner root).
newc_entry() {
    local name=$1 mode=$2 major=$3 minor=$4 ino=$5 namesize pad
    namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

ARCHIVE=$WORK/initramfs.cpio
say "writing the newc archive ($count applet links)"
{
    newc_entry dev $((8#040755)) 0 0 $((0x7fff0001))
    newc_entry dev/console $((8#020600)) 5 1 $((0x7fff0002))
    (cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\./||' \
        | cpio -o -H newc -R 0:0 --quiet --reproducible)
} >"$ARCHIVE" || die "cpio failed"

# Check the archive before compressing it.
listing=$(cpio -t --quiet <"$ARCHIVE") || die "cpio -t cannot read the archive"
for wanted in init bin/busybox bin/sh dev/console; do
    grep -qx "$wanted" <<<"$listing" || die "archive lacks /$wanted"
done

gzip -9 -n "$ARCHIVE"
gzip -t "$ARCHIVE.gz" || die "gzip produced a broken archive"
zcat "$ARCHIVE.gz" | cpio -t --quiet 2>/dev/null | grep -qx init || die "compressed archive lacks /init"
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$ARCHIVE.gz" "$OUT/initramfs.cpio.gz"
say "built: $(stat -c %s "$OUT/initramfs.cpio.gz") bytes, $(wc -l <<<"$listing") entries"
publish initramfs.cpio.gz "$OUT/initramfs.cpio.gz"
