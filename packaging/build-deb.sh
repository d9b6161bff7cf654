#!/bin/sh
# Build the ringd Debian package (`make deb`).
#
# Exports a clean copy of the tree (the committed HEAD by default, like a
# fresh clone: no .venv/, build/ or half-done edits), turns
# packaging/debian into debian/, installs
# what the build needs from Debian (needs root for that step), runs
# dpkg-buildpackage -us -uc -b and lintian, and leaves the results in
# packaging/out/ (ringd_<version>_<arch>.deb, .changes, .buildinfo,
# lintian.txt, build.log).
#
# Environment:
#   RINGD_DEB_SOURCE   "head" (default): git archive HEAD; "worktree": the
#                      files git tracks plus untracked ones it does not
#                      ignore, as they are on disk (to try an uncommitted edit)
#   RINGD_DEB_OUT      where the results go (default packaging/out)
#   RINGD_DEB_VERSION  build as this package version: a changelog entry is
#                      added to the copy only (deb-test uses it for upgrades)
#   RINGD_DEB_KEEP=1   keep the temporary build directory
set -eu
prog=build-deb
. "$(dirname "$0")/common.sh"

[ "$(uname -s)" = Linux ] || die "ringd builds on Linux only"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this builds on Debian (bookworm)"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $*"
    fi
}

apt_updated=
apt_update() {
    [ -n "$apt_updated" ] && return 0
    say "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
}

# The tools around the build; the build's own dependencies come from
# debian/control further down.
missing=
for p in dpkg-dev build-essential fakeroot lintian; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt_update
    say "installing:$missing"
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

work=$(mktemp -d /tmp/ringd-deb.XXXXXX)
if [ "${RINGD_DEB_KEEP:-0}" = 1 ]; then
    say "keeping $work"
else
    trap 'rm -rf "$work"' EXIT
fi
src=$work/ringd
mkdir -p "$src"

source=${RINGD_DEB_SOURCE:-head}
if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    case "$source" in
    head)
        say "exporting HEAD ($(git -C "$top" rev-parse --short HEAD)) to $src"
        if [ -n "$(git -C "$top" status --porcelain --untracked-files=no)" ]; then
            say "note: uncommitted changes are not built (RINGD_DEB_SOURCE=worktree builds them)"
        fi
        git -C "$top" archive --format=tar HEAD | tar -xf - -C "$src"
        ;;
    worktree)
        say "copying the work tree (tracked and unignored files) to $src"
        # shellcheck disable=SC2016  # the inner sh expands $f, not this one
        (cd "$top" && git ls-files -z --cached --others --exclude-standard |
            xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done; true' sh |
            tar --null -T - -cf -) | tar -xf - -C "$src"
        ;;
    *)
        die "RINGD_DEB_SOURCE must be head or worktree, not $source"
        ;;
    esac
else
    say "not a git checkout: copying $top to $src"
    (cd "$top" && tar --exclude=./.git --exclude=./.venv --exclude=./build \
        --exclude='*.egg-info' --exclude=./packaging/out --exclude=__pycache__ \
        --exclude=.pytest_cache -cf - .) | tar -xf - -C "$src"
fi
[ -d "$src/packaging/debian" ] || die "packaging/debian is missing"
rm -rf "$src/debian"
mv "$src/packaging/debian" "$src/debian"

if [ -n "${RINGD_DEB_VERSION:-}" ]; then
    maint=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$src/debian/changelog" | head -n1)
    say "building as version $RINGD_DEB_VERSION"
    {
        printf 'ringd (%s) unstable; urgency=medium\n\n' "$RINGD_DEB_VERSION"
        printf '  * Rebuild as %s by packaging/build-deb.sh.\n\n' "$RINGD_DEB_VERSION"
        printf ' -- %s  %s\n\n' "$maint" "$(date -R)"
        cat "$src/debian/changelog"
    } > "$src/debian/changelog.new"
    mv "$src/debian/changelog.new" "$src/debian/changelog"
fi

cd "$src"
if ! dpkg-checkbuilddeps >/dev/null 2>&1; then
    apt_update
    say "installing the build dependencies of debian/control"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get build-dep -y -qq --no-install-recommends "$src"
fi
dpkg-checkbuilddeps

version=$(dpkg-parsechangelog -S Version)
arch=$(dpkg-architecture -qDEB_HOST_ARCH)
say "dpkg-buildpackage ringd $version ($arch); log in $out/build.log"
mkdir -p "$out"
rm -f "$out"/ringd_*.deb "$out"/ringd_*.changes "$out"/ringd_*.buildinfo "$out/lintian.txt"
if ! dpkg-buildpackage -us -uc -b >"$out/build.log" 2>&1; then
    tail -n 40 "$out/build.log" >&2
    die "dpkg-buildpackage failed; the whole log is $out/build.log"
fi

changes=$work/ringd_${version}_${arch}.changes
deb=$work/ringd_${version}_${arch}.deb
[ -f "$deb" ] || die "no $deb after the build"
cp "$deb" "$changes" "$work/ringd_${version}_${arch}.buildinfo" "$out/"

say "lintian"
# Not as root (lintian advises against it) when we can drop to nobody.
lint() {
    if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null 2>&1 && id nobody >/dev/null 2>&1; then
        mkdir -p "$work/lintian-home"
        chown nobody "$work/lintian-home"
        chmod 755 "$work"
        setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups \
            env HOME="$work/lintian-home" lintian "$@"
    else
        lintian "$@"
    fi
}
# The gate: any error or warning fails the build. (Not with --show-overrides:
# lintian 2.116 then counts overridden tags too.) A second run lists the
# overrides, each with the reason written above it in the overrides file.
set +e
lint --fail-on error,warning --display-info "$changes" >"$out/lintian.txt" 2>&1
lrc=$?
set -e
lint --fail-on none --show-overrides "$changes" 2>/dev/null |
    grep -E '^(O|N): ' | grep -v '^N: masked by screen' >"$work/overrides.txt" || true
if [ -s "$work/overrides.txt" ]; then
    { echo "overridden:"; cat "$work/overrides.txt"; } >>"$out/lintian.txt"
fi
sed 's/^/  /' "$out/lintian.txt"
[ "$lrc" = 0 ] || die "lintian reported errors or warnings (exit $lrc); see $out/lintian.txt"

say "done: $out/ringd_${version}_${arch}.deb"
