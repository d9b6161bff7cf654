"""Upstreams with more servers than fit in a 64-bit mask: retries must never
go back to a server this connection already tried, and max_connections must
hold for every server, whatever its place in the list."""
from __future__ import annotations

import select
import socket
import time
from collections import Counter

from harness import (Backend, Ringd, connect, connect_nowait, free_ports, listener, read_line,
                     servers_by_name, upstream, wait_for)

NSERVERS = 100
ROUNDS = 20


def _addr(p: int) -> str:
    return f"127.0.0.1:{p}"


def _which_listener(listeners: list[socket.socket], timeout: float = 5) -> tuple[int, socket.socket]:
    """The listening socket that has a connection waiting, and that connection."""
    ready, _, _ = select.select(listeners, [], [], timeout)
    assert ready, "ringd connected to no server"
    assert len(ready) == 1, f"{len(ready)} servers got a connection"
    conn, _ = ready[0].accept()
    conn.settimeout(5)
    return listeners.index(ready[0]), conn


def test_retry_never_returns_to_a_failed_server_past_the_64th(tmp_path):
    """hash sends a client to the same server every time; when that server
    (one past index 63) refuses, the retry must go to another server instead
    of spending every retry on the same refusal."""
    listeners = []
    for _ in range(NSERVERS):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        listeners.append(s)
    ports = [s.getsockname()[1] for s in listeners]
    port = free_ports(1)[0]
    conf = (listener("web", port, "app")
            + upstream("app", [_addr(p) for p in ports], balance="hash", connect_retries=2,
                       max_fails=0))
    try:
        with Ringd(tmp_path, conf, workers=1) as r:
            # find a client address whose server sits past the 64th
            source = index = None
            for last in range(1, 60):
                src = f"127.0.0.{last}"
                with connect(port, source=src):
                    k, conn = _which_listener(listeners)
                    conn.close()
                if k >= 64:
                    source, index = src, k
                    break
            assert source is not None, "no source address hashed past server 63"
            listeners[index].close()          # that server now refuses
            rest = listeners[:index] + listeners[index + 1:]
            before = r.status()["workers"][0]
            with connect(port, source=source, timeout=5) as c:
                # the retry reached another server, and the client is served
                _, conn = _which_listener(rest)
                with conn:
                    c.sendall(b"x")
                    assert conn.recv(1) == b"x"
            after = r.status()["workers"][0]
            assert after["connect_errors"] - before["connect_errors"] == 1, (before, after)
            assert after["no_server"] == before["no_server"]
            r.assert_no_traceback()
    finally:
        for s in listeners:
            s.close()


def test_max_connections_holds_for_every_server_of_a_large_upstream(tmp_path):
    """100 servers with max_connections = 1, two workers racing for them
    (least_conn: both go for the same least loaded server): 100 clients at
    once get 100 different servers, the 101st none. Repeated: the race
    between the workers is what a reservation has to win."""
    *ports, port = free_ports(NSERVERS + 1)
    servers = [{"address": _addr(p), "max_connections": 1} for p in ports]
    conf = listener("web", port, "app") + upstream("app", servers, balance="least_conn",
                                                   max_fails=0)
    with Backend("id", ports), Ringd(tmp_path, conf, workers=2) as r:
        for _ in range(ROUNDS):
            socks = [connect_nowait(port) for _ in range(NSERVERS)]
            try:
                reached = Counter()
                for s in socks:
                    s.setblocking(True)
                    s.settimeout(10)
                    line = read_line(s)
                    assert line.startswith(b"ID "), f"a client got no server: {line!r}"
                    reached[int(line[3:])] += 1
                assert sorted(reached) == sorted(ports), reached.most_common(3)
                st = servers_by_name(r.status())
                assert all(st[_addr(p)]["active"] == 1 for p in ports)
                # everything is full: the next client is closed at once
                t0 = time.monotonic()
                with connect(port, timeout=5) as extra:
                    try:
                        assert extra.recv(16) == b""
                    except ConnectionResetError:
                        pass
                assert time.monotonic() - t0 < 2
            finally:
                for s in socks:
                    s.close()
            wait_for(lambda: all(s["active"] == 0 for s in r.status()["servers"]), 10,
                     what="servers released")
        r.assert_no_traceback()
