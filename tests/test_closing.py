"""How a connection that ends naturally is closed: with a FIN on both sides
(never a reset), and at the cost of no completion for its closes where the
kernel can skip them (IOSQE_CQE_SKIP_SUCCESS)."""
from __future__ import annotations

import concurrent.futures as cf
import socket
import time

import pytest

from harness import Backend, Ringd, connect, echo_roundtrip, free_ports, listener, upstream, wait_for
from ringd.native import probe

MODES = {"sqpoll": "true", "defer_taskrun": "false"}


def _each_mode(fn):
    with cf.ThreadPoolExecutor(len(MODES)) as ex:
        futures = [ex.submit(fn, m, v) for m, v in MODES.items()]
        return [f.result(timeout=120) for f in futures]


def test_natural_end_is_a_fin_on_both_sides(tmp_path):
    """The client half-closes, the server answers and half-closes: both read
    a clean EOF, neither a reset (the last FIN goes out with the close)."""

    def run(mode, sqpoll):
        port = free_ports(1)[0]
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{srv.getsockname()[1]}"]))
        with srv, Ringd(tmp_path / mode, conf, workers=1) as r:
            for k in range(20):
                with connect(port) as c:
                    c.sendall(b"request %d" % k)
                    c.shutdown(socket.SHUT_WR)
                    srv.settimeout(5)
                    b, _ = srv.accept()
                    with b:
                        b.settimeout(5)
                        got = b""
                        while chunk := b.recv(100):
                            got += chunk
                        assert got == b"request %d" % k
                        b.sendall(b"answer")
                        b.shutdown(socket.SHUT_WR)
                        assert c.recv(100) == b"answer"
                        assert c.recv(100) == b""            # the FIN, no reset
                        # ringd closed its side: the server reads an EOF too
                        # (it already had ringd's FIN; a reset would fail here)
                        assert b.recv(100) == b""
            wait_for(lambda: r.status()["workers"][0]["active"] == 0, 5, what="closed")
            st = r.status()["workers"][0]
            assert st["accepted"] == 20
            r.assert_no_traceback()

    _each_mode(run)


@pytest.mark.skipif(not probe()["cqe_skip"], reason="kernel without IOSQE_CQE_SKIP_SUCCESS")
def test_closes_cost_no_completion(tmp_path):
    """300 echo round trips one after the other: accept, connect and its
    linked timeout, a recv and a send each way and the two EOF recvs make 9
    completions; the two closes add none."""

    def run(mode, sqpoll):
        bport, port = free_ports(2)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{bport}"]))
        with Backend("echo", [bport]), Ringd(tmp_path / mode, conf, workers=1) as r:
            echo_roundtrip(port, b"warm")
            wait_for(lambda: r.status()["workers"][0]["active"] == 0, 5, what="warm-up closed")
            before = r.status()["workers"][0]
            t0 = time.monotonic()
            n = 300
            for k in range(n):
                assert echo_roundtrip(port, b"hello %d" % k) == b"hello %d" % k
            wait_for(lambda: r.status()["workers"][0]["active"] == 0, 5, what="closed")
            after = r.status()["workers"][0]
            ticks = (time.monotonic() - t0) / 0.1 + 2
            per_conn = (after["cqes"] - before["cqes"] - ticks) / n
            assert per_conn <= 9.2, (mode, per_conn)

    _each_mode(run)
