"""An idle worker costs nothing (issue 14): no SQE while nothing is open, so
an SQPOLL poller that went to sleep stays asleep, and the loop wakes only
for the heartbeat the master's watchdog reads. Deadlines (idle_timeout) come
back at once with the first connection."""
from __future__ import annotations

import os
import time

import pytest

from harness import Backend, Ringd, connect, echo_roundtrip, free_ports, listener, upstream, wait_for
from ringd.native import idle_heartbeat_ms

IDLE_CPU_MAX = 0.005        # CPU-s per second per worker, the goal


def _cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of the process (the SQPOLL poller
    iou-sqp-PID is one of them), in ns, from schedstat."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    return total


@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
def test_an_idle_worker_costs_no_cpu_and_wakes_for_deadlines(tmp_path, sqpoll):
    bport, port = free_ports(2)
    conf = (f"[ring]\nsqpoll = {str(sqpoll).lower()}\n"
            + listener("web", port, "app", idle_timeout="600ms")
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=1) as r:
        [w] = r.status()["workers"]
        assert w["ring"] == ("sqpoll" if sqpoll else "defer_taskrun")
        pid = w["pid"]
        # some work first, so that there is memory to give back; the trim
        # (1 s after the last connection) is the last thing the tick waits for
        assert echo_roundtrip(port, b"warm") == b"warm"
        wait_for(lambda: r.status()["workers"][0]["trims"] >= 1, 10, what="idle trim")
        hb0 = r.status()["workers"][0]["heartbeat"]
        c0, t0 = _cpu_ns(pid), time.monotonic()
        time.sleep(3.0)     # the measurement window, not a wait for a condition
        c1, t1 = _cpu_ns(pid), time.monotonic()
        hb1 = r.status()["workers"][0]["heartbeat"]
        cpu = (c1 - c0) / 1e9 / (t1 - t0)
        assert cpu <= IDLE_CPU_MAX, f"idle worker used {cpu:.4f} CPU-s/s"
        # watchdog_timeout 10s: a heartbeat every second, not every 100 ms tick
        assert 2 <= hb1 - hb0 <= 6, (hb0, hb1)

        # the first connection after the long sleep gets its idle_timeout
        idle = connect(port)
        idle.sendall(b"i")
        assert idle.recv(1) == b"i"
        t0 = time.monotonic()
        idle.settimeout(5)
        try:
            assert idle.recv(1) == b""
        except ConnectionResetError:
            pass
        took = time.monotonic() - t0
        idle.close()
        assert 0.4 < took < 3.0, took
        assert echo_roundtrip(port, b"ok") == b"ok"
        r.assert_no_traceback()


@pytest.mark.parametrize("watchdog, ms", [(10.0, 1000), (3.0, 625), (1.0, 125), (0.5, 100),
                                          (0.0, 1000)])
def test_idle_heartbeat_leaves_the_watchdog_four_beats(watchdog, ms):
    assert idle_heartbeat_ms(watchdog) == ms
