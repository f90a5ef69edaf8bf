#!/usr/bin/env bash
# Builds the root-on-virtio initramfs for Debian's distro kernel (distro-kernel.sh), as a
# distro's initrd does it: a gzip'd newc cpio with busybox-static, the kernel's modules for
# virtio-pci, virtio-blk and ext4 with their dependencies from modules.dep (listed in load
# order in /etc/initramfs-modules; stored uncompressed for busybox's insmod), and
# guest-images/linux/root-initramfs-init as /init, which loads them, mounts root= and
# switch_roots to it. Files are recorded as owned by root; no root or fakeroot needed.
# Output, cached by the hash of the recipe, the init, the busybox version and the modules:
#   $HV_CACHE/root-initramfs/<hash>/root-initramfs.cpio.gz
# Usage: guest-images/linux/root-initramfs.sh [--force]
# The last line on stdout is the absolute path of the archive.
set -euo pipefail
SCRIPT_NAME="root-initramfs"
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: root-initramfs.sh [--force])" ;;
esac

INIT=$LINUX_DIR/root-initramfs-init
[ -r "$INIT" ] || die "init script not found: $INIT"
# Bump when the recipe below changes in a way that changes the output.
RECIPE=1
# What mounting an ext4 root on a virtio-blk disk takes, beyond what the kernel has built in:
# the PCI transport, the disk driver and the file system. crc32c_generic stands for ext4's
# soft dependency on crypto-crc32c (metadata checksums; no module names it as a symbol
# dependency): the generic one loads on any CPU, crc32c-intel only with SSE4.2.
ROOT_MODULES=(virtio_pci virtio_blk crc32c_generic ext4)

ensure_packages cpio gzip xz-utils
ensure_busybox

VMLINUZ=$(bash "$LINUX_DIR/distro-kernel.sh" | tail -n1) || die "distro-kernel.sh failed"
[ -f "$VMLINUZ" ] || die "distro-kernel.sh printed no vmlinuz path"
KVER=$(basename "$VMLINUZ" | sed 's/^vmlinuz-//')
MODULES=$(dirname "$(dirname "$VMLINUZ")")/lib/modules/$KVER
[ -s "$MODULES/modules.dep" ] || die "no modules.dep in $MODULES"

# module_name PATH: the name the kernel gives kernel/.../NAME.ko[.xz] ('-' reads as '_').
module_name() { basename "$1" | sed 's/\.ko\(\.[a-z]*\)\{0,1\}$//; s/-/_/g'; }
# dep_line NAME: NAME's modules.dep line without the colon: its path, then its dependencies,
# each needing the ones after it (the order modprobe loads them in, last first).
dep_line() {
    awk -v want="$1" '{ path = $1; sub(/:$/, "", path); name = path; sub(/.*\//, "", name)
                        sub(/\.ko(\.[a-z]+)?$/, "", name); gsub(/-/, "_", name) }
                      name == want { $1 = path; print; exit }' "$MODULES/modules.dep"
}
is_builtin() {
    local path
    while IFS= read -r path; do
        [ "$(module_name "$path")" = "$1" ] && return 0
    done <"$MODULES/modules.builtin"
    return 1
}

# The load order: each module after everything it needs, each once.
ORDER=()
add_module() {
    local path
    for path in "${ORDER[@]}"; do [ "$path" != "$1" ] || return 0; done
    ORDER+=("$1")
}
for name in "${ROOT_MODULES[@]}"; do
    if is_builtin "$name"; then
        say "$name is built into $KVER"
        continue
    fi
    line=$(dep_line "$name")
    [ -n "$line" ] || die "$KVER has no module $name (not in modules.dep or modules.builtin)"
    read -r -a fields <<<"$line"
    for ((i = ${#fields[@]} - 1; i >= 1; i--)); do add_module "${fields[i]}"; done
    add_module "${fields[0]}"
done
for path in "${ORDER[@]}"; do
    [ -f "$MODULES/$path" ] || die "modules.dep names $path, which $MODULES lacks"
done

KEY=$(hash_of_text "recipe=$RECIPE busybox=$BB_VERSION init=$(hash_of "$INIT") kernel=$KVER \
modules=${ORDER[*]} files=$(cd "$MODULES" && hash_of "${ORDER[@]}")")
BASE=$HV_CACHE/root-initramfs
OUT=$BASE/$KEY
if [ "$FORCE" = 0 ] && [ -s "$OUT/root-initramfs.cpio.gz" ]; then
    say "up to date (hash $KEY, kernel $KVER, busybox-static $BB_VERSION)"
    publish root-initramfs.cpio.gz "$OUT/root-initramfs.cpio.gz"
    exit 0
fi

mkcache "$BASE"
WORK=$(mktemp -d "$BASE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT=$WORK/root
say "staging busybox-static $BB_VERSION, /init and ${#ORDER[@]} modules of $KVER"
stage_busybox "$ROOT"
cp "$INIT" "$ROOT/init"
chmod 755 "$ROOT/init"
mkdir -p "$ROOT/newroot"
: >"$ROOT/etc/initramfs-modules"
for path in "${ORDER[@]}"; do
    stored=${path%.xz}
    stored=${stored%.gz}
    mkdir -p "$ROOT/lib/modules/$KVER/$(dirname "$path")"
    case $path in
        *.ko) cp "$MODULES/$path" "$ROOT/lib/modules/$KVER/$stored" ;;
        *.ko.xz) xz -dc "$MODULES/$path" >"$ROOT/lib/modules/$KVER/$stored" ;;
        *.ko.gz) gzip -dc "$MODULES/$path" >"$ROOT/lib/modules/$KVER/$stored" ;;
        *) die "cannot unpack module $path (.ko, .ko.xz and .ko.gz only)" ;;
    esac || die "cannot copy module $path"
    echo "$stored" >>"$ROOT/etc/initramfs-modules"
done

ARCHIVE=$WORK/root-initramfs.cpio
say "load order: $(for path in "${ORDER[@]}"; do module_name "$path"; done | paste -sd' ')"
say "writing the newc archive ($BB_LINKS applet links)"
write_initramfs "$ROOT" "$ARCHIVE"
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$ARCHIVE.gz" "$OUT/root-initramfs.cpio.gz"
say "built: $(stat -c %s "$OUT/root-initramfs.cpio.gz") bytes, $INITRAMFS_ENTRIES entries"
publish root-initramfs.cpio.gz "$OUT/root-initramfs.cpio.gz"
