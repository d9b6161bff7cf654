"""A master crash and a restart with fewer workers, inside a network namespace
of our own (where net.ipv4.tcp_migrate_req can be set without touching the
host). Run by tests/test_upgrade.py as
`unshare -n python tests/netns_crash.py TMPDIR MIGRATE`; prints "ok" or fails
with the assertion.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from test_upgrade import crash_and_restart  # noqa: E402


def main(tmp: Path, migrate: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(migrate)
    crash_and_restart(tmp, workers_after=1, migrate=migrate)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    print("ok", flush=True)
