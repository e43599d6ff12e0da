#!/usr/bin/env bash
# Provision a real Asterisk 22 for the test suite (tests/asterisk/).
#
# Debian 12 has no Asterisk package, but Debian unstable ("sid") carries Asterisk 22. This
# script builds a small Debian sid root file system containing it with mmdebstrap, in which
# the tests run Asterisk via chroot. The root is kept in a cache folder and rebuilt only
# when it is missing or broken (asterisk -V fails, or a module the tests load is absent).
#
# Usage:   sudo scripts/provision-asterisk.sh          (prints the root's path on its last line)
# Env:     AGI_BITRIX_ASTERISK_ROOT   cache folder (default /var/cache/agi-bitrix/asterisk-root)
#          AGI_BITRIX_DEBIAN_MIRROR   Debian mirror (default http://deb.debian.org/debian)
# Needs:   root (mmdebstrap and chroot), network access to the Debian mirror.
set -euo pipefail

ROOT="${AGI_BITRIX_ASTERISK_ROOT:-/var/cache/agi-bitrix/asterisk-root}"
MIRROR="${AGI_BITRIX_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="asterisk,asterisk-modules"
MODULE_DIR="usr/lib/x86_64-linux-gnu/asterisk/modules"
# Modules the test Asterisk loads (MODULES in agi_bitrix/testing/pbx_harness.py); a root without any of them counts as broken.
REQUIRED_MODULES="res_speech res_agi pbx_config app_verbose app_userevent app_dial app_queue
  app_stack app_exec func_callerid func_channel func_strings func_logic func_global func_base64
  func_timeout func_version func_db app_playtones res_clioriginate bridge_simple bridge_native_rtp bridge_builtin_features
  chan_bridge_media"

say() { echo "provision-asterisk: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# Prints nothing and succeeds when the root at $1 is usable; otherwise says why and fails.
check_root() {
    local root="$1" version module
    [ -x "$root/usr/sbin/asterisk" ] || { say "no $root/usr/sbin/asterisk"; return 1; }
    version="$(chroot "$root" /usr/sbin/asterisk -V 2>&1)" \
        || { say "'asterisk -V' fails in $root: $version"; return 1; }
    case "$version" in
        "Asterisk 22."*) ;;
        *) say "expected Asterisk 22, found: $version"; return 1 ;;
    esac
    for module in $REQUIRED_MODULES; do
        [ -f "$root/$MODULE_DIR/$module.so" ] || { say "module $module.so missing in $root"; return 1; }
    done
    say "ok: $version in $root"
}

[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap and chroot need it); try: sudo $0"

mkdir -p "$(dirname "$ROOT")"
# One provisioning at a time: parallel test runs wait here instead of building twice.
exec 9>"$ROOT.lock"
flock 9

if [ -d "$ROOT" ] && check_root "$ROOT"; then
    echo "$ROOT"
    exit 0
fi

if ! command -v mmdebstrap >/dev/null; then
    say "installing mmdebstrap (apt-get update && apt-get install -y mmdebstrap)"
    apt-get update -q >&2 || die "apt-get update failed; is a Debian mirror reachable?"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mmdebstrap >&2 \
        || die "could not install mmdebstrap with apt-get"
fi

# Build beside the final place (same file system) so that the final rename is atomic.
BUILD="$(mktemp -d "$ROOT.build.XXXXXX")"
trap 'rm -rf "$BUILD"' EXIT
rmdir "$BUILD"   # mmdebstrap wants to create its target itself
say "building Debian sid root with $PACKAGES from $MIRROR into $BUILD (under a minute, ~350 MB)"
started=$SECONDS
# sid's Release file is sometimes past its Valid-Until date; apt would refuse it.
mmdebstrap --variant=apt --include="$PACKAGES" \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    sid "$BUILD" "$MIRROR" >&2 \
    || die "mmdebstrap failed (see its output above); check network access to $MIRROR"
check_root "$BUILD" || die "the freshly built root is not usable (see above)"

if [ -e "$ROOT" ]; then
    say "replacing broken root $ROOT"
    mv "$ROOT" "$ROOT.broken.$$"
    rm -rf "$ROOT.broken.$$"
fi
mv "$BUILD" "$ROOT"
say "built $ROOT in $((SECONDS - started)) s, $(du -sh "$ROOT" | cut -f1)"
echo "$ROOT"
