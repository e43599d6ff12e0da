#!/usr/bin/env bash
# Build the prebuilt Asterisk 20 that scripts/provision-asterisk20.sh installs (what teams share
# as ../shared/asterisk/), from an official Asterisk 20 source tarball or an exported source tree.
#
# It compiles in a throwaway copy of the test root (scripts/provision-asterisk.sh), so the build
# links exactly the libraries Debian's Asterisk 22 there uses, and writes
# asterisk-20.x.y-sid-amd64.tar.xz (paths under opt/asterisk20/) and SHA256SUMS into OUT_DIR.
# scripts/build-asterisk.sh does the build itself (configure, menuselect, make, pack).
#
# Usage:   sudo scripts/build-asterisk20.sh SOURCE OUT_DIR
#            SOURCE   asterisk-20.x.y.tar.gz (https://downloads.asterisk.org/pub/telephony/asterisk/releases/)
#                     or a source tree (with its .version file)
#            OUT_DIR  e.g. ../shared/asterisk, where scripts/test looks for it
# Needs:   root, network access to the Debian mirror (build dependencies), ~1.5 GB in /var/tmp,
#          about 5 minutes on 2 cores.
set -euo pipefail

SOURCE="${1:?usage: $0 SOURCE(asterisk-20.x.y.tar.gz or tree) OUT_DIR}"
OUT="${2:?usage: $0 SOURCE OUT_DIR}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${AGI_BITRIX_ASTERISK_ROOT:-/var/cache/agi-bitrix/asterisk-root}"

say() { echo "build-asterisk20: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (chroot); try: sudo $0 $*"
"$HERE/provision-asterisk.sh" >/dev/null || die "the test root could not be provisioned"

WORK="$(mktemp -d /var/tmp/agi-bitrix-build-asterisk20.XXXXXX)"
cleanup() {
    mountpoint -q "$WORK/root/proc" && umount "$WORK/root/proc"
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT

if [ -d "$SOURCE" ]; then
    SRC="$(cd "$SOURCE" && pwd)"
else
    mkdir "$WORK/src"
    tar -xzf "$SOURCE" -C "$WORK/src" --strip-components=1 || die "could not unpack $SOURCE"
    SRC="$WORK/src"
fi
case "$(cat "$SRC/.version" 2>/dev/null)" in
    20.*) ;;
    *) die "$SOURCE is not an Asterisk 20 source (its .version: $(cat "$SRC/.version" 2>/dev/null || echo missing))" ;;
esac

say "copying the test root to $WORK/root (the build installs its -dev packages there)"
cp -a "$ROOT" "$WORK/root"
mkdir -p "$OUT"
PREFIX=/opt/asterisk20 "$HERE/build-asterisk.sh" "$SRC" "$WORK/root" "$OUT"
say "done: $(cat "$OUT/SHA256SUMS"); install it with: sudo scripts/provision-asterisk20.sh $OUT"
