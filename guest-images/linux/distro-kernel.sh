#!/usr/bin/env bash
# Gets Debian's own 6.1 distro kernel without installing it: apt-get download of the newest
# linux-image-6.1.*-amd64 (the one linux-image-amd64 depends on), unpacked with dpkg-deb -x.
# Keeps the modules a root-on-virtio initramfs draws on (see KEEP_MODULES) with what they
# depend on, indexed again by depmod for that subset.
# Output: $HV_CACHE/distro-kernel/<package>_<version>/boot/vmlinuz-*
#         $HV_CACHE/distro-kernel/<package>_<version>/lib/modules/<kernel version>/
# Usage: guest-images/linux/distro-kernel.sh [--force]
# Prints the modules directory, then, as the last line on stdout, the absolute path of the
# vmlinuz (a bzImage).
set -euo pipefail
SCRIPT_NAME=distro-kernel
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: distro-kernel.sh [--force])" ;;
esac

command -v apt-cache >/dev/null && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "needs apt-cache, apt-get and dpkg-deb (a Debian system)"
ensure_packages xz-utils kmod
DEPMOD=$(PATH=$PATH:/usr/sbin:/sbin command -v depmod) || die "depmod missing although kmod is installed"

# The module trees kept (relative to lib/modules/<version>/), plus every module they need:
# virtio transports and block/net/rng devices, file systems and what they use (lib, crypto),
# networking: some 170 of the 400 MB of modules; the rest is dropped.
KEEP_MODULES=(
    kernel/drivers/virtio kernel/drivers/block kernel/drivers/net kernel/drivers/char/hw_random
    kernel/fs kernel/lib kernel/crypto kernel/arch/x86/crypto kernel/net
)
# Bump when the recipe below changes in a way that changes the output; a cache directory
# stamped with another recipe (or none: kernels cached without their modules) is fetched again.
RECIPE=2
STAMP="recipe=$RECIPE modules=${KEEP_MODULES[*]}"

# The exact package: what the linux-image-amd64 metapackage depends on, if it is a 6.1 image;
# otherwise the highest-versioned linux-image-6.1.*-amd64 the package lists know.
resolve_package() {
    local dep
    dep=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-6\.1\.[^ ]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$dep" ]; then
        dep=$(apt-cache pkgnames linux-image-6.1. 2>/dev/null \
            | grep -E '^linux-image-6\.1\.[0-9]+-[0-9]+-amd64$' | sort -V | tail -n1)
    fi
    printf '%s' "$dep"
}
PACKAGE=$(resolve_package)
if [ -z "$PACKAGE" ]; then
    say "no linux-image-6.1.*-amd64 in the package lists; running apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    PACKAGE=$(resolve_package)
    [ -n "$PACKAGE" ] || die "no linux-image-6.1.*-amd64 package found (is this Debian 12 with main enabled?)"
fi
VERSION=$(apt-cache policy "$PACKAGE" | sed -n 's/^ *Candidate: //p')
[ -n "$VERSION" ] && [ "$VERSION" != "(none)" ] || die "$PACKAGE has no installable candidate version"

BASE=$HV_CACHE/distro-kernel
OUT=$BASE/${PACKAGE}_$VERSION
find_vmlinuz() { ls "$OUT"/boot/vmlinuz-* 2>/dev/null | head -n1; }
# lib/modules/<version>/ for boot/vmlinuz-<version>.
modules_dir() { printf '%s/lib/modules/%s' "$OUT" "$(basename "$1" | sed 's/^vmlinuz-//')"; }
publish_kernel() {
    publish distro-modules "$(modules_dir "$(find_vmlinuz)")"
    publish distro-vmlinuz "$(find_vmlinuz)"
}
if [ "$FORCE" = 0 ] && [ -n "$(find_vmlinuz)" ] && [ -s "$(modules_dir "$(find_vmlinuz)")/modules.dep" ] \
    && [ "$(cat "$OUT/.hv-recipe" 2>/dev/null || true)" = "$STAMP" ]; then
    say "up to date ($PACKAGE $VERSION)"
    publish_kernel
    exit 0
fi
[ ! -d "$OUT" ] || [ "$FORCE" = 1 ] || say "cached $PACKAGE $VERSION predates this recipe: fetching it again"

mkcache "$BASE"
WORK=$(mktemp -d "$BASE/.download.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
say "downloading $PACKAGE $VERSION"
# apt-get download runs as _apt when it can: give it a directory it may write to.
chmod 755 "$WORK"
APT_OPTS=()
# As root in a directory _apt cannot reach (e.g. under /root), download as root without a warning.
[ "$(id -u)" -ne 0 ] || APT_OPTS=(-o APT::Sandbox::User=root)
(cd "$WORK" && apt-get download -q "${APT_OPTS[@]}" "$PACKAGE=$VERSION" >&2) || die "apt-get download $PACKAGE=$VERSION failed"
DEB=$(ls "$WORK"/*.deb 2>/dev/null | head -n1)
[ -n "$DEB" ] || die "apt-get download left no .deb for $PACKAGE"
say "unpacking $(basename "$DEB") ($(stat -c %s "$DEB") bytes)"
mkdir "$WORK/root"
dpkg-deb -x "$DEB" "$WORK/root" || die "dpkg-deb -x $DEB failed"
VMLINUZ=$(ls "$WORK"/root/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$VMLINUZ" ] || die "$(basename "$DEB") has no boot/vmlinuz-*"
KVER=$(basename "$VMLINUZ" | sed 's/^vmlinuz-//')
MODULES=$WORK/root/lib/modules/$KVER
[ -d "$MODULES/kernel" ] || die "$(basename "$DEB") has no lib/modules/$KVER/kernel"
[ -r "$WORK/root/boot/System.map-$KVER" ] || die "$(basename "$DEB") has no boot/System.map-$KVER"

# Keep the kernel, its config, System.map and the chosen modules; the package ships no
# modules.dep (its postinst runs depmod), so index the whole tree first to find what the
# kept modules depend on (modules.dep lists each module's dependencies transitively).
rm -rf "$WORK/root/usr" "$MODULES/build" "$MODULES/source"
find "$WORK/root/lib" -mindepth 1 -maxdepth 1 ! -name modules -exec rm -rf {} +
"$DEPMOD" -b "$WORK/root" "$KVER" || die "depmod on the whole module tree failed"
total=$(du -sk "$MODULES" | cut -f1)
for dir in "${KEEP_MODULES[@]}"; do
    [ -d "$MODULES/$dir" ] || die "$(basename "$DEB") has no lib/modules/$KVER/$dir"
done
(cd "$MODULES" && find "${KEEP_MODULES[@]}" -name '*.ko*') | LC_ALL=C sort >"$WORK/chosen"
awk 'NR == FNR { chosen[$1] = 1; next }
     { module = $1; sub(/:$/, "", module) }
     module in chosen { print module; for (i = 2; i <= NF; i++) print $i }' \
    "$WORK/chosen" "$MODULES/modules.dep" | LC_ALL=C sort -u >"$WORK/kept"
(cd "$MODULES" && find kernel -name '*.ko*') | LC_ALL=C sort | LC_ALL=C comm -23 - "$WORK/kept" \
    | (cd "$MODULES" && xargs -r rm -f --)
find "$MODULES/kernel" -type d -empty -delete
# Index the subset again: each kept module must still find every dependency it had in the
# whole tree (compared as module-dependency pairs: depmod may list them in another order).
# Debian's System.map is a placeholder, so depmod -F -e cannot check symbols instead.
dep_pairs() {
    awk 'NR == FNR { kept[$1] = 1; next }
         { module = $1; sub(/:$/, "", module) }
         module in kept { print module; for (i = 2; i <= NF; i++) print module, $i }' \
        "$WORK/kept" "$MODULES/modules.dep" | LC_ALL=C sort
}
dep_pairs >"$WORK/deps.whole"
"$DEPMOD" -b "$WORK/root" "$KVER" || die "depmod on the kept modules failed"
dep_pairs | cmp -s - "$WORK/deps.whole" \
    || die "the kept modules' dependencies changed when the others were dropped"
say "kept $(wc -l <"$WORK/kept") modules ($(du -sk "$MODULES" | cut -f1) of $total KiB)"
echo "$STAMP" >"$WORK/root/.hv-recipe"
rm -rf "$OUT"
mv "$WORK/root" "$OUT"
say "kernel $(basename "$(find_vmlinuz)"): $(stat -c %s "$(find_vmlinuz)") bytes"
publish_kernel
