#!/usr/bin/env bash
# Builds the test root file system: a 12 MiB ext4 image with busybox-static (/bin/busybox plus
# a symlink per applet), guest-images/linux/root-init as /sbin/init, an empty /data for its
# disk checks and /dev/console. No root needed: mke2fs -d copies a staged tree, and debugfs
# makes every file owned by root and adds the device node.
# Boot a copy of it: hv.disk=write changes the file system.
# Output, cached by the hash of the recipe, root-init, busybox and e2fsprogs versions:
#   $HV_CACHE/rootfs/<hash>/rootfs.ext4
# Usage: guest-images/linux/rootfs.sh [--force]
# The last line on stdout is the absolute path of the image.
set -euo pipefail
SCRIPT_NAME=rootfs
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: rootfs.sh [--force])" ;;
esac

INIT=$LINUX_DIR/root-init
[ -r "$INIT" ] || die "init script not found: $INIT"
# Bump when the recipe below changes in a way that changes the output.
RECIPE=2
SIZE=12M

ensure_packages e2fsprogs
ensure_busybox
export PATH=$PATH:/usr/sbin:/sbin
command -v mke2fs >/dev/null && command -v debugfs >/dev/null && command -v e2fsck >/dev/null \
    || die "mke2fs, debugfs or e2fsck missing although e2fsprogs is installed"
E2FS_VERSION=$(dpkg-query -W -f='${Version}' e2fsprogs)

KEY=$(hash_of_text "recipe=$RECIPE busybox=$BB_VERSION e2fsprogs=$E2FS_VERSION init=$(hash_of "$INIT")")
BASE=$HV_CACHE/rootfs
OUT=$BASE/$KEY
if [ "$FORCE" = 0 ] && [ -s "$OUT/rootfs.ext4" ]; then
    say "up to date (hash $KEY, busybox-static $BB_VERSION, e2fsprogs $E2FS_VERSION)"
    publish rootfs.ext4 "$OUT/rootfs.ext4"
    exit 0
fi

mkcache "$BASE"
WORK=$(mktemp -d "$BASE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
say "staging busybox-static $BB_VERSION and /sbin/init"
stage_busybox "$ROOT"
rm -f "$ROOT/sbin/init"
cp "$INIT" "$ROOT/sbin/init"
chmod 755 "$ROOT/sbin/init"
mkdir -p "$ROOT/dev" "$ROOT/data"

IMAGE=$WORK/rootfs.ext4
say "making a $SIZE ext4 image ($BB_LINKS applet links)"
truncate -s "$SIZE" "$IMAGE"
mke2fs -q -F -t ext4 -L hv-root -E root_owner=0:0 -d "$ROOT" "$IMAGE" >&2 || die "mke2fs failed"
# mke2fs -d keeps the stager's uid and gid: make every inode root's, then add the console
# (what the kernel opens for init when it mounts this root itself, without an initramfs).
{
    (cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\.||') | while IFS= read -r path; do
        printf 'set_inode_field "%s" uid 0\nset_inode_field "%s" gid 0\n' "$path" "$path"
    done
    printf 'cd /dev\nmknod console c 5 1\nset_inode_field /dev/console mode 020600\n'
} >"$WORK/debugfs.cmds"
debugfs -w -f "$WORK/debugfs.cmds" "$IMAGE" >"$WORK/debugfs.log" 2>&1 || die "debugfs failed"
# debugfs echoes each command and goes on after a failed one: anything else is an error.
if grep -v -e '^debugfs[: ]' -e '^Allocated inode: ' "$WORK/debugfs.log" >&2; then
    die "debugfs reported errors (above)"
fi

# Check the image: a clean file system, our init, root-owned files, the console.
e2fsck -fn "$IMAGE" >"$WORK/e2fsck.log" 2>&1 || { cat "$WORK/e2fsck.log" >&2; die "e2fsck finds the image broken"; }
debugfs -R "cat /sbin/init" "$IMAGE" 2>/dev/null | cmp -s - "$INIT" || die "image's /sbin/init is not $INIT"
for path in /bin/busybox /bin/sh /data /dev/console; do
    stat=$(debugfs -R "stat $path" "$IMAGE" 2>/dev/null)
    grep -q 'User: *0 *Group: *0 ' <<<"$stat" || die "image's $path is missing or not owned by root"
done
grep -q 'Type: character special' <<<"$stat" || die "image's /dev/console is not a character device"

rm -rf "$OUT"
mkdir -p "$OUT"
mv "$IMAGE" "$OUT/rootfs.ext4"
say "built: $(stat -c %s "$OUT/rootfs.ext4") bytes ($(du -k "$OUT/rootfs.ext4" | cut -f1) KiB allocated)"
publish rootfs.ext4 "$OUT/rootfs.ext4"
