#!/usr/bin/env bash
# Install a prebuilt Asterisk 20 beside Debian's Asterisk 22 in the test root, so that the
# `asterisk` tests run on both LTS versions.
#
# The build (scripts/build-asterisk20.sh, or the ready one teams share as ../shared/asterisk/)
# is a tarball of /opt/asterisk20 for the same Debian sid root that scripts/provision-asterisk.sh
# makes: binary, modules and libraries under /opt/asterisk20, Debian's files untouched. It is
# unpacked there after its SHA256SUMS check; an installed copy with the same checksum is kept.
#
# Usage:   sudo scripts/provision-asterisk20.sh DIST_DIR     (DIST_DIR holds the tarball and SHA256SUMS)
# Env:     AGI_BITRIX_ASTERISK_ROOT   the root scripts/provision-asterisk.sh provisioned
# Needs:   root (chroot), that root already provisioned.
set -euo pipefail

DIST="${1:?usage: $0 DIST_DIR (the folder with asterisk-20.*-sid-amd64.tar.xz and SHA256SUMS)}"
ROOT="${AGI_BITRIX_ASTERISK_ROOT:-/var/cache/agi-bitrix/asterisk-root}"
PREFIX=opt/asterisk20
STAMP="$ROOT/$PREFIX/.agi-bitrix-sha256"

say() { echo "provision-asterisk20: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (chroot needs it); try: sudo $0 $DIST"
[ -x "$ROOT/usr/sbin/asterisk" ] || die "$ROOT is not provisioned; run scripts/provision-asterisk.sh first"
[ -f "$DIST/SHA256SUMS" ] || die "$DIST/SHA256SUMS is missing"

# The one Asterisk 20 tarball SHA256SUMS lists, and its checksum.
read -r SUM TARBALL < <(grep -E '^[0-9a-f]{64} +\*?asterisk-20\.[0-9.]+-sid-amd64\.tar\.xz$' "$DIST/SHA256SUMS" | head -1) \
    || die "$DIST/SHA256SUMS lists no asterisk-20.*-sid-amd64.tar.xz"
TARBALL="${TARBALL#\*}"
[ -f "$DIST/$TARBALL" ] || die "$DIST/$TARBALL is missing"
(cd "$DIST" && sha256sum --quiet -c <(grep -F " $TARBALL" SHA256SUMS)) >&2 \
    || die "$DIST/$TARBALL does not match its SHA256SUMS line: a broken copy; fetch or build it again"

# Prints the version and succeeds when the installed Asterisk 20 runs.
installed_version() {
    local version
    version="$(chroot "$ROOT" /$PREFIX/sbin/asterisk -V 2>&1)" || { say "'asterisk -V' fails: $version"; return 1; }
    case "$version" in
        "Asterisk 20."*) echo "$version" ;;
        *) say "expected Asterisk 20 in /$PREFIX, found: $version"; return 1 ;;
    esac
}

# Beside the provisioning of the root itself: the same lock.
exec 9>"$ROOT.lock"
flock 9

if [ "$(cat "$STAMP" 2>/dev/null)" = "$SUM" ] && version="$(installed_version)"; then
    say "ok: $version in $ROOT/$PREFIX"
    exit 0
fi

# Unpack beside the final place, then swap it in whole (the library RUNPATH is /opt/asterisk20).
NEW="$(mktemp -d "$ROOT/opt/.asterisk20.new.XXXXXX")"
trap 'rm -rf "$NEW"' EXIT
tar -xJf "$DIST/$TARBALL" -C "$NEW" || die "could not unpack $DIST/$TARBALL"
[ -x "$NEW/$PREFIX/sbin/asterisk" ] || die "$TARBALL holds no $PREFIX/sbin/asterisk"
echo "$SUM" > "$NEW/$PREFIX/.agi-bitrix-sha256"
if [ -e "$ROOT/$PREFIX" ]; then
    mv "$ROOT/$PREFIX" "$NEW/old"
fi
mv "$NEW/$PREFIX" "$ROOT/$PREFIX"
version="$(installed_version)" || die "the unpacked Asterisk 20 does not run in $ROOT (see above)"
say "installed $version from $TARBALL into $ROOT/$PREFIX"
