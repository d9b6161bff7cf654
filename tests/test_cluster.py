"""Several ringd hosts behind an ECMP router with BGP, in network namespaces:
tests/netns_cluster.py as one test.

It takes about 70 s and needs root, bird2, ExaBGP, nftables and curl, so it
runs only with RINGD_CLUSTER_TEST=1: `make cluster-test` (which installs what
is missing) and CI (.ci/run) set it. The figures of every scenario are printed
(`pytest -s` shows them) and kept in the JSON report.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TIMEOUT = 480

pytestmark = pytest.mark.skipif(os.environ.get("RINGD_CLUSTER_TEST") != "1",
                                reason="set RINGD_CLUSTER_TEST=1 (or run `make cluster-test`)")


def test_two_hosts_behind_ecmp_drain_and_return_lose_no_connection(tmp_path):
    report = tmp_path / "cluster.json"
    proc = subprocess.Popen([sys.executable, str(HERE / "netns_cluster.py"),
                             "--workdir", str(tmp_path / "work"), "--json", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)       # it cleans up on SIGTERM
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"cluster test still running after {TIMEOUT}s:\n{out[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        # whatever happened to it, none of its namespaces may outlive it
        sys.path.insert(0, str(HERE))
        from netns_cluster import cleanup_prefix, netns_list
        cleanup_prefix(f"rdc{proc.pid}-")
        left = [n for n in netns_list() if n.startswith(f"rdc{proc.pid}-")]
    print(out)
    assert not left, f"namespaces left behind: {left}"
    assert report.exists(), out[-6000:]
    result = json.loads(report.read_text())
    assert result["ok"] and proc.returncode == 0, \
        "\n".join(result["problems"]) + "\n\n" + out[-6000:]
    # the acceptance figures, read back from the report
    by_name = {r["scenario"].split()[0]: r for r in result["results"]}
    assert by_name["1"]["connections"]["host1"] > 0 and by_name["1"]["connections"]["host2"] > 0
    for step in ("1", "2", "3", "4"):
        assert by_name[step]["connections"]["failed"] == 0, by_name[step]
    assert by_name["2"]["long_flows"]["broken_host1"] == 0
    assert by_name["3"]["long_flows_on_host2"]["broken_host2"] == 0
