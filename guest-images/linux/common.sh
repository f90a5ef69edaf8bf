# shellcheck shell=bash
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

# ensure_busybox: installs busybox-static and sets BUSYBOX (the static binary) and BB_VERSION
# (its package version, part of the cache keys of the images built from it).
ensure_busybox() {
    ensure_packages busybox-static
    BUSYBOX=/bin/busybox
    [ -x "$BUSYBOX" ] || die "$BUSYBOX missing although busybox-static is installed"
    ! LC_ALL=C ldd "$BUSYBOX" >/dev/null 2>&1 || die "$BUSYBOX is dynamically linked (busybox-static expected)"
    # shellcheck disable=SC2034 # for the caller
    BB_VERSION=$(dpkg-query -W -f='${Version}' busybox-static)
}

# stage_busybox ROOT: a busybox userland in ROOT: /bin/busybox plus a symlink per applet where
# `busybox --install -s` would put it, and bin, sbin, usr/bin, usr/sbin, proc, sys, tmp, root
# and etc. Sets BB_LINKS to the number of links. Needs ensure_busybox first.
stage_busybox() {
    local root=$1 applet
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,tmp,root,etc}
    chmod 1777 "$root/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    chmod 755 "$root/bin/busybox"
    BB_LINKS=0
    while IFS= read -r applet; do
        applet=${applet#/}
        [ -n "$applet" ] && [ "$applet" != bin/busybox ] || continue
        mkdir -p "$root/$(dirname "$applet")"
        [ -e "$root/$applet" ] || { ln -s /bin/busybox "$root/$applet"; BB_LINKS=$((BB_LINKS + 1)); }
    done < <("$BUSYBOX" --list-full)
    [ -e "$root/bin/sh" ] || die "busybox has no sh applet"
}

# use_distro_kernel: runs distro-kernel.sh and sets VMLINUZ (its bzImage), KVER (the kernel's
# release) and MODULES (its lib/modules/KVER, with modules.dep).
use_distro_kernel() {
    VMLINUZ=$(bash "$LINUX_DIR/distro-kernel.sh" | tail -n1) || die "distro-kernel.sh failed"
    [ -f "$VMLINUZ" ] || die "distro-kernel.sh printed no vmlinuz path"
    KVER=$(basename "$VMLINUZ" | sed 's/^vmlinuz-//')
    MODULES=$(dirname "$(dirname "$VMLINUZ")")/lib/modules/$KVER
    [ -s "$MODULES/modules.dep" ] || die "no modules.dep in $MODULES"
}

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

# resolve_modules NAME...: sets MODULE_ORDER to the modules.dep paths of the modules NAME...
# and of everything they need, in load order: each after everything it needs, each once.
# Names built into the kernel are skipped. Needs use_distro_kernel first.
resolve_modules() {
    local name line path i fields
    MODULE_ORDER=()
    for name in "$@"; do
        if is_builtin "$name"; then
            say "$name is built into $KVER"
            continue
        fi
        line=$(dep_line "$name")
        [ -n "$line" ] || die "$KVER has no module $name (not in modules.dep or modules.builtin)"
        read -r -a fields <<<"$line"
        for ((i = ${#fields[@]} - 1; i >= 0; i--)); do
            for path in "${MODULE_ORDER[@]}"; do [ "$path" != "${fields[i]}" ] || continue 2; done
            MODULE_ORDER+=("${fields[i]}")
        done
    done
    for path in "${MODULE_ORDER[@]}"; do
        [ -f "$MODULES/$path" ] || die "modules.dep names $path, which $MODULES lacks"
    done
}

# stage_modules ROOT: the modules of MODULE_ORDER in ROOT/lib/modules/KVER, uncompressed (for
# busybox's insmod), listed in load order in ROOT/etc/initramfs-modules for the /init to load.
stage_modules() {
    local root=$1 path stored
    : >"$root/etc/initramfs-modules"
    for path in "${MODULE_ORDER[@]}"; do
        stored=${path%.xz}
        stored=${stored%.gz}
        mkdir -p "$root/lib/modules/$KVER/$(dirname "$path")"
        case $path in
            *.ko) cp "$MODULES/$path" "$root/lib/modules/$KVER/$stored" ;;
            *.ko.xz) xz -dc "$MODULES/$path" >"$root/lib/modules/$KVER/$stored" ;;
            *.ko.gz) gzip -dc "$MODULES/$path" >"$root/lib/modules/$KVER/$stored" ;;
            *) die "cannot unpack module $path (.ko, .ko.xz and .ko.gz only)" ;;
        esac || die "cannot copy module $path"
        echo "$stored" >>"$root/etc/initramfs-modules"
    done
}

# module_names: the names of MODULE_ORDER, space-separated, in load order.
module_names() {
    local path
    for path in "${MODULE_ORDER[@]}"; do module_name "$path"; done | paste -sd' '
}

# newc_entry NAME MODE RDEVMAJOR RDEVMINOR INO: a newc cpio entry by hand (no data, owner root).
newc_entry() {
    local name=$1 mode=$2 major=$3 minor=$4 ino=$5 namesize pad
    namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
    printf '%s\0' "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}

# write_initramfs ROOT ARCHIVE: ROOT (with an /init) as a newc cpio, files recorded as owned
# by root, led by /dev and /dev/console (which the kernel opens for init's console before
# /init runs; no root needed to make it); checked, then gzip'd to ARCHIVE.gz. Sets
# INITRAMFS_ENTRIES to the number of entries. Needs cpio and gzip.
write_initramfs() {
    local root=$1 archive=$2 listing wanted
    {
        newc_entry dev $((8#040755)) 0 0 $((0x7fff0001))
        newc_entry dev/console $((8#020600)) 5 1 $((0x7fff0002))
        (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | sed 's|^\./||' \
            | cpio -o -H newc -R 0:0 --quiet --reproducible)
    } >"$archive" || die "cpio failed"

    # Check the archive before compressing it.
    listing=$(cpio -t --quiet <"$archive") || die "cpio -t cannot read the archive"
    for wanted in init bin/busybox bin/sh dev/console; do
        grep -qx "$wanted" <<<"$listing" || die "archive lacks /$wanted"
    done
    # shellcheck disable=SC2034 # for the caller
    INITRAMFS_ENTRIES=$(wc -l <<<"$listing")

    gzip -9 -n "$archive"
    gzip -t "$archive.gz" || die "gzip produced a broken archive"
    # grep reads the whole listing: with -q it would stop at the match and, under pipefail, fail
    # the pipeline whenever cpio then died writing to it (SIGPIPE).
    zcat "$archive.gz" | cpio -t --quiet 2>/dev/null | grep -x init >/dev/null \
        || die "compressed archive lacks /init"
}

# module_initramfs NAME INIT RECIPE KEY_EXTRA STAGE_EXTRA MODULE...: the distro kernel's
# initramfs NAME.cpio.gz, cached in $HV_CACHE/NAME/<hash>/ and published: busybox-static, INIT
# as /init, and the MODULEs with their dependencies (see stage_modules). STAGE_EXTRA, if not
# empty, is a function called with the staging root to add files; KEY_EXTRA (text) names what
# it adds in the cache key, as RECIPE numbers the recipe. Rebuilt when FORCE is 1.
module_initramfs() {
    local name=$1 init=$2 recipe=$3 key_extra=$4 stage_extra=$5 key base out root archive
    shift 5
    [ -r "$init" ] || die "init script not found: $init"
    ensure_packages cpio gzip xz-utils
    ensure_busybox
    use_distro_kernel
    resolve_modules "$@"
    key=$(hash_of_text "recipe=$recipe busybox=$BB_VERSION init=$(hash_of "$init") ${key_extra:+$key_extra }\
kernel=$KVER modules=${MODULE_ORDER[*]} files=$(cd "$MODULES" && hash_of "${MODULE_ORDER[@]}")")
    base=$HV_CACHE/$name
    out=$base/$key
    if [ "${FORCE:-0}" = 0 ] && [ -s "$out/$name.cpio.gz" ]; then
        say "up to date (hash $key, kernel $KVER, busybox-static $BB_VERSION)"
        publish "$name.cpio.gz" "$out/$name.cpio.gz"
        return 0
    fi

    mkcache "$base"
    WORK=$(mktemp -d "$base/.build.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    root=$WORK/root
    say "staging busybox-static $BB_VERSION, /init and ${#MODULE_ORDER[@]} modules of $KVER"
    stage_busybox "$root"
    cp "$init" "$root/init"
    chmod 755 "$root/init"
    [ -z "$stage_extra" ] || "$stage_extra" "$root"
    stage_modules "$root"

    archive=$WORK/$name.cpio
    say "load order: $(module_names)"
    say "writing the newc archive ($BB_LINKS applet links)"
    write_initramfs "$root" "$archive"
    rm -rf "$out"
    mkdir -p "$out"
    mv "$archive.gz" "$out/$name.cpio.gz"
    say "built: $(stat -c %s "$out/$name.cpio.gz") bytes, $INITRAMFS_ENTRIES entries"
    publish "$name.cpio.gz" "$out/$name.cpio.gz"
}
