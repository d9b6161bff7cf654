"""Reloads that change the worker count, under load, inside a network
namespace of our own where net.ipv4.tcp_migrate_req can be set without
touching the host. Run by tests/test_reload.py as
`unshare -n python tests/netns_reload.py TMPDIR MIGRATE`; prints one JSON line.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Backend, Ringd, free_ports, listener, upstream  # noqa: E402
from test_reload import ShortClients  # noqa: E402


def main(tmp: Path, migrate: str) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    Path("/proc/sys/net/ipv4/tcp_migrate_req").write_text(migrate)
    bport, port = free_ports(2)
    conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"])
    with Backend("echo", [bport]):
        r = Ringd(tmp, conf, workers=2)
        with r:
            with ShortClients(port, 4) as sc:
                time.sleep(0.3)
                for i in range(20):
                    r.workers = 1 if i % 2 == 0 else 2
                    r.write_config(conf)
                    r.signal(signal.SIGHUP)
                    time.sleep(0.5)
                r.wait_event("reload_ok", count=20, timeout=30)
                time.sleep(0.5)
            rejected = len(r.events("reload_rejected"))
            closed = len(r.events("listeners_closed"))
    return {"ok": sc.ok, "failures": sc.failures[:10], "nfailures": len(sc.failures),
            "rejected": rejected, "listeners_closed": closed}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2])), flush=True)
