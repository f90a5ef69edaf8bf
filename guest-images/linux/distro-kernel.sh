#!/usr/bin/env bash
# Gets Debian's own 6.1 distro kernel without installing it: apt-get download of the newest
# linux-image-6.1.*-amd64 (the one linux-image-amd64 depends on), unpacked with dpkg-deb -x.
# Output: $HV_CACHE/distro-kernel/<package>_<version>/boot/vmlinuz-*
# Usage: guest-images/linux/distro-kernel.sh [--force]
# The last line on stdout is the absolute path of the vmlinuz (a bzImage).
set -euo pipefail
SCRIPT_NAME=distro-kernel
# shellcheck source=common.sh
. "$(dirname "$0")/common.sh"

FORCE=0
case "${1:-}" in
    "") ;;
    --force) FORCE=1 ;;
    -h | --help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $1 (usage: distro-kernel.sh [--force])" ;;
esac

command -v apt-cache >/dev/null && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
    || die "needs apt-cache, apt-get and dpkg-deb (a Debian system)"
ensure_packages xz-utils

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
if [ "$FORCE" = 0 ] && [ -n "$(find_vmlinuz)" ]; then
    say "up to date ($PACKAGE $VERSION)"
    publish distro-vmlinuz "$(find_vmlinuz)"
    exit 0
fi

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
ls "$WORK"/root/boot/vmlinuz-* >/dev/null 2>&1 || die "$(basename "$DEB") has no boot/vmlinuz-*"
# Keep the kernel, its config and System.map; drop the modules (not used: no initramfs modules).
rm -rf "$WORK/root/lib" "$WORK/root/usr"
rm -rf "$OUT"
mv "$WORK/root" "$OUT"
say "kernel $(basename "$(find_vmlinuz)"): $(stat -c %s "$(find_vmlinuz)") bytes"
publish distro-vmlinuz "$(find_vmlinuz)"
