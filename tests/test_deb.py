"""The Debian package, end to end.

`make deb-test` (which runs `make deb` first) builds the package twice (the
second time as the next version), installs it with apt-get, runs ringd as the
systemd unit would, forwards traffic, reloads, upgrades, removes and purges
it; packaging/deb_test.py lists every check.
That takes minutes and changes the machine (packages, a system user, two
sysctls, restored afterwards), so it runs only when asked: RINGD_DEB_TEST=1,
as root, on Debian, without systemd as PID 1.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _why_not() -> str | None:
    if os.environ.get("RINGD_DEB_TEST") != "1":
        return "slow (builds, installs and purges the .deb): set RINGD_DEB_TEST=1 to run it"
    if os.geteuid() != 0:
        return "needs root: it installs and removes a Debian package"
    for tool in ("dpkg", "dpkg-deb", "apt-get", "make"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            return f"{tool} not found: needs a Debian system with dpkg and apt"
    if os.path.isdir("/run/systemd/system"):
        return "systemd runs as PID 1: the package would start ringd.service by itself"
    return None


@pytest.mark.timeout(1800)
@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
def test_deb_build_install_run_upgrade_purge():
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
    for key in ("RINGD_DEB_SOURCE", "RINGD_DEB_TEST_KEEP"):   # head (default) or worktree
        if key in os.environ:
            env[key] = os.environ[key]
    run = subprocess.run(["make", "-C", TOP, "deb-test"], env=env, capture_output=True,
                         text=True, timeout=1700)
    out = run.stdout + run.stderr
    if run.returncode != 0 and "SKIP " in out and "FAIL " not in out:
        pytest.skip(out.strip().splitlines()[-1])
    assert run.returncode == 0, f"make deb-test failed:\n{out[-8000:]}"
    assert "0 failed" in out
