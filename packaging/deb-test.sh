#!/bin/sh
# Acceptance test of the Debian package (`make deb-test`, after `make deb`).
#
# Builds the same tree a second time as the next package version (for the
# upgrade check), then runs packaging/deb_test.py as root with Debian's
# python3: install with apt-get, check, start as the unit does, forward,
# reload, stop, upgrade, remove, purge. Exit 77 means it cannot run here.
set -eu
prog=deb-test
. "$(dirname "$0")/common.sh"

if [ "$(id -u)" != 0 ]; then
    echo "deb-test: must run as root (it installs and removes the package)" >&2
    exit 77
fi

set -- "$out"/ringd_*.deb
[ -f "$1" ] || die "no package in $out: run make deb first"
[ $# = 1 ] || die "more than one package in $out: $*"
deb=$1
v1=$(dpkg-deb -f "$deb" Version)
v2="$v1+upgrade1"

say "building the upgrade package $v2"
RINGD_DEB_OUT="$out/upgrade" RINGD_DEB_VERSION="$v2" sh "$top/packaging/build-deb.sh" >"$out/upgrade-build.txt" 2>&1 || {
    tail -n 30 "$out/upgrade-build.txt" >&2
    die "building $v2 failed; see $out/upgrade-build.txt"
}
set -- "$out"/upgrade/ringd_*.deb
deb2=$1

exec /usr/bin/python3 "$top/packaging/deb_test.py" --deb "$deb" --upgrade-deb "$deb2" ${RINGD_DEB_TEST_KEEP:+--keep}
