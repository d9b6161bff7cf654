"""Per-source limits end to end: max_connections_per_source and
connection_rate_per_source hold across the workers of a listener (the
shared table of native/srclimit.c), on the socket's address and on a
PROXY-supplied one; refusals are immediate and counted."""
from __future__ import annotations

import time

import pytest

from harness import Backend, Ringd, connect, free_ports, upstream, wait_for
from parser_corpus import proxy_v2
from test_edge_routing import MODES, QUICK, _closed_count, _listener, _refused, _ring


def _open(port: int, source: str = "127.0.0.1", header: bytes = b""):
    """A connection that got through to the echo backend (held open)."""
    s = connect(port, timeout=5, source=source)
    s.sendall(header + b"ping")
    assert s.recv(10) == b"ping"
    return s


@MODES
def test_connection_limit_holds_across_workers_and_frees_on_close(tmp_path, sqpoll):
    bport, port = free_ports(2)
    conf = (_ring(sqpoll) + _listener("web", port, "app", max_connections_per_source=6)
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=2) as r:
        held = [_open(port) for _ in range(6)]
        try:
            active = [w["active"] for w in r.status()["workers"]]
            assert sum(active) == 6, active     # the 6 held, over the workers (spread shown)
            for _ in range(3):
                assert _refused(port, b"ping") < QUICK
            other = _open(port, source="127.0.0.2")         # another source is not affected
            other.close()
            held.pop().close()                              # a slot frees when one closes
            wait_for(lambda: _try_open(port), 5, what="a freed slot")
            wait_for(lambda: _closed_count(r, "web", "source_limit") >= 3, 5, what="counted")
        finally:
            for s in held:
                s.close()


def _try_open(port: int) -> bool:
    try:
        s = _open(port)
    except (ConnectionResetError, AssertionError, OSError):
        return False
    s.close()
    return True


@MODES
def test_rate_limit_refuses_then_recovers(tmp_path, sqpoll):
    bport, port = free_ports(2)
    conf = (_ring(sqpoll) + _listener("web", port, "app", connection_rate_per_source="5/s")
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=2) as r:
        # Five within one second, then the sixth is refused. A busy CPU can
        # stretch the five past the window: then wait for it to recover and
        # try again (bounded), rather than call a slow machine a failure.
        for attempt in range(5):
            t0 = time.monotonic()
            for _ in range(5):
                _open(port).close()
            if time.monotonic() - t0 < 1.0:
                break
            time.sleep(2.1)     # both windows of the sliding count are empty again
        else:
            pytest.fail("five connections never fitted in one second")
        assert _refused(port, b"ping") < QUICK
        _open(port, source="127.0.0.2").close()
        wait_for(lambda: _try_open(port), 3, what="the window recovers")
        assert _closed_count(r, "web", "source_rate") >= 1


def test_limit_applies_to_the_proxy_supplied_address(tmp_path):
    bport, port = free_ports(2)
    conf = (_listener("edge", port, "app", accept_proxy=True, max_connections_per_source=1)
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=2) as r:
        a = _open(port, header=proxy_v2(src="192.0.2.1"))
        b = _open(port, header=proxy_v2(src="192.0.2.2"))     # same socket address, other client
        assert _refused(port, proxy_v2(src="192.0.2.1") + b"ping") < QUICK
        a.close()
        b.close()
        wait_for(lambda: _closed_count(r, "edge", "source_limit") == 1, 5, what="counted")
