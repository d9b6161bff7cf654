# Sourced by packaging/*.sh after they set `prog` (the name their messages
# start with): the environment and helpers every packaging script shares.

# Debian's tools and Debian's python3 only: a pyenv, a venv or ~/.local on
# PATH must not leak into a package build or test.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
unset PYTHONPATH PYTHONHOME PYTHONUSERBASE VIRTUAL_ENV PYENV_VERSION 2>/dev/null || true

# shellcheck disable=SC2034  # used by the scripts that source this file
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2034
out=${RINGD_DEB_OUT:-$top/packaging/out}

say() { printf '%s: %s\n' "$prog" "$*"; }
die() { printf '%s: error: %s\n' "$prog" "$*" >&2; exit 1; }
