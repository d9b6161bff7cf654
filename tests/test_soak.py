"""A short smoke of the soak (bench/soak.py; the full run is `make soak`):
45 s of mixed traffic through a real ringd with 2 workers, with every chaos
step of the long run compressed into it (reloads to 3, 1 and back to 2
workers, a storm of reloads that cuts a draining generation short, a worker
SIGKILL, a worker SIGSTOPped until the watchdog replaces it), every byte
checked, then a quiesced resource checkpoint compared with the start.

It asserts what the soak checks: no corrupted, lost or unexpectedly ended
connection, resources flat at the end (fds, pipes, RSS within the bounds
stated in bench/soak.py), every chaos step done, no worker dead that the soak
did not kill or stop. (Refusal times are timing, reported by the soak only.) The soak runs in its own process (it is asyncio and forks ringd and
the backends); its JSON report is read back.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOAK = REPO / "bench" / "soak.py"

@pytest.mark.timeout(420)
def test_soak_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(SOAK), "--duration", "45", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=400)
    if proc.returncode not in (0, 1):
        # the run itself failed (ringd or a backend did not start): an error,
        # not the expected failure
        raise RuntimeError(f"soak exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    (path,) = tmp_path.glob("soak-2*.json")
    report = json.loads(path.read_text())
    (sess,) = report["sessions"]
    outcomes = sess["outcomes"]
    bad = "\n".join(f"  {g['count']} x {g['outcome']} {g['kind']} (ringd {g['ringd']}, chaos "
                    f"{g['chaos']}), e.g. {g['examples'][0]['why']}" for g in sess["bad_groups"])
    assert sess["connections"] > 200, f"too little traffic: {sess['connections']} connections"
    assert outcomes["ok"] > 0 and outcomes["cut"] > 0 and outcomes["refused"] > 0, outcomes
    assert outcomes["corrupted"] == 0, f"{outcomes}\n{bad}"
    assert outcomes["lost"] == 0, f"{outcomes}\n{bad}"
    assert outcomes["killed_fin"] == 0, f"a killed worker's connection ended with a FIN: {outcomes}"
    assert outcomes["unexpected"] == 0, f"{outcomes}\n{bad}"
    # every check that decides the run (the refusal timing is reported only)
    failed = [f"{c['check']}: {c['detail']}" for c in sess["checks"]
              if c["gating"] and not c["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout[-3000:]
