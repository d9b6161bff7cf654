"""Balancing end to end: real ringd with 1-2 workers, real backends, loopback.

Backends run in `id` mode (each connection first gets "ID <port>\\n"), so a
client knows which server it reached. Clients bind distinct 127.x.y.z source
addresses where the source matters (hash). PROXY protocol headers are
checked byte for byte against the spec (haproxy.org/download/2.6/doc/proxy-protocol.txt).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import struct
import time
from collections import Counter

import pytest

from harness import (Backend, Ringd, Traffic, backend_of, connect_nowait, free_port, free_ports, health_table, hold_id,
                     listener, read_line, servers_by_name, upstream, wait_for)

FAST_CHECKS = dict(interval="200ms", timeout="500ms", rise=1, fall=1)


def _addr(p: int) -> str:
    return f"127.0.0.1:{p}"


def _conf(port: int, servers: list, health: dict | None = None, **uopts) -> str:
    text = listener("web", port, "app") + upstream("app", servers, **uopts)
    if health is not None:
        text += health_table("app", **health)
    return text


def _spread(port: int, n: int, threads: int = 8, **kw) -> Counter:
    """n short connections (from `threads` clients at once): backend port -> count."""
    with cf.ThreadPoolExecutor(threads) as ex:
        return Counter(ex.map(lambda _: backend_of(port, **kw), range(n)))


def _state(r: Ringd, name: str) -> str:
    return servers_by_name(r.status())[name]["state"]


def _wait_state(r: Ringd, name: str, state: str, timeout: float = 10) -> None:
    wait_for(lambda: _state(r, name) == state, timeout, what=f"{name} {state}")


# --------------------------------------------------------------------------- round robin


def test_weights_1_2_3_over_6000_connections(tmp_path):
    b1, b2, b3, port = free_ports(4)
    with Backend("id", [b1, b2, b3]):
        servers = [{"address": _addr(b1), "weight": 1}, {"address": _addr(b2), "weight": 2},
                   {"address": _addr(b3), "weight": 3}]
        with Ringd(tmp_path, _conf(port, servers), workers=2) as r:
            got = _spread(port, 6000)
            assert sum(got.values()) == 6000
            for b, share in ((b1, 1 / 6), (b2, 2 / 6), (b3, 3 / 6)):
                assert abs(got[b] / 6000 - share) <= 0.05 * share, (got, b, share)
            st = r.status()
            # both workers took part (SO_REUSEPORT spreads by the client's port)
            assert all(w["accepted"] > 0 for w in st["workers"]), st["workers"]
            by = servers_by_name(st)
            assert [by[_addr(b)]["connections"] for b in (b1, b2, b3)] == \
                [got[b1], got[b2], got[b3]]
            r.assert_no_traceback()


# --------------------------------------------------------------------------- least_conn


def test_least_conn_sends_new_connections_away_from_a_busy_server(tmp_path):
    b1, b2, b3, port = free_ports(4)
    with Backend("id", [b1, b2, b3]):
        with Ringd(tmp_path, _conf(port, [_addr(b1), _addr(b2), _addr(b3)],
                                   balance="least_conn"), workers=2) as r:
            # least_conn itself spreads 30 held connections about evenly; keep
            # only those on b1 open, so that b1 alone holds long connections
            held = [hold_id(port) for _ in range(30)]
            on_b1 = [s for s, b in held if b == b1]
            counts = Counter(b for _, b in held)
            assert min(counts.values()) >= 8, counts
            for s, b in held:
                if b != b1:
                    s.close()
            try:
                wait_for(lambda: [servers_by_name(r.status())[_addr(b)]["active"]
                                  for b in (b1, b2, b3)] == [len(on_b1), 0, 0], 10,
                         what="only b1 holds connections")
                # short connections all go to the idle servers, both of them
                short = Counter(backend_of(port) for _ in range(40))
                assert short[b1] == 0, short
                assert short[b2] > 0 and short[b3] > 0, short
                wait_for(lambda: [servers_by_name(r.status())[_addr(b)]["active"]
                                  for b in (b2, b3)] == [0, 0], 10,
                         what="short connections gone")
                # held ones fill b2 and b3 up to b1's count before b1 gets any
                more = [hold_id(port) for _ in range(2 * len(on_b1))]
                try:
                    filled = Counter(b for _, b in more)
                    assert filled == {b2: len(on_b1), b3: len(on_b1)}, filled
                finally:
                    for s, _ in more:
                        s.close()
            finally:
                for s in on_b1:
                    s.close()
            r.assert_no_traceback()


# --------------------------------------------------------------------------- hash


def _mapping(port: int, sources: list[str], rounds: int = 2) -> dict[str, int]:
    out: dict[str, int] = {}
    for src in sources:
        seen = {backend_of(port, source=src) for _ in range(rounds)}
        assert len(seen) == 1, f"{src} reached {seen}"
        out[src] = seen.pop()
    return out


def test_hash_keeps_sources_and_moves_only_the_lost_servers_share(tmp_path):
    ports = free_ports(5)
    bports, port = ports[:4], ports[4]
    backends = {b: Backend("id", [b]).start() for b in bports}
    try:
        conf = _conf(port, [_addr(b) for b in bports], health=FAST_CHECKS, balance="hash",
                     max_fails=0)
        with Ringd(tmp_path, conf, workers=2) as r:
            sources = [f"127.0.{1 + i // 200}.{1 + i % 200}" for i in range(64)] + \
                      [f"127.{20 + i}.{i * 7 % 250}.{1 + i * 13 % 250}" for i in range(16)]
            before = _mapping(port, sources)
            per_server = Counter(before.values())
            assert set(per_server) == set(bports), per_server
            # take the server with the most clients away
            victim = per_server.most_common(1)[0][0]
            backends[victim].stop()
            _wait_state(r, _addr(victim), "down")
            during = _mapping(port, sources)
            moved = {s for s in sources if during[s] != before[s]}
            assert moved == {s for s in sources if before[s] == victim}
            assert victim not in during.values()
            # the moved clients spread over the others, not onto one of them
            assert len({during[s] for s in moved}) >= 2, Counter(during[s] for s in moved)
            backends[victim] = Backend("id", [victim]).start()
            _wait_state(r, _addr(victim), "up")
            assert _mapping(port, sources, rounds=1) == before
            r.assert_no_traceback()
    finally:
        for b in backends.values():
            b.stop()


# --------------------------------------------------------------------------- random


def test_random_uses_every_server(tmp_path):
    b1, b2, b3, port = free_ports(4)
    with Backend("id", [b1, b2, b3]):
        servers = [_addr(b1), _addr(b2), {"address": _addr(b3), "weight": 3}]
        with Ringd(tmp_path, _conf(port, servers, balance="random"), workers=2) as r:
            got = _spread(port, 1000, threads=4)
            assert sum(got.values()) == 1000
            # weights 1:1:3 (0.2, 0.2, 0.6); two choices pull it towards even
            # under load, so only loose bounds
            assert got[b1] >= 100 and got[b2] >= 100, got
            assert got[b3] > got[b1] and got[b3] > got[b2], got
            r.assert_no_traceback()


# --------------------------------------------------------------------------- per server options


def test_max_connections_per_server_is_respected(tmp_path):
    b1, b2, port = free_ports(3)
    with Backend("id", [b1, b2]):
        servers = [{"address": _addr(b1), "max_connections": 2}, _addr(b2)]
        with Ringd(tmp_path, _conf(port, servers), workers=2) as r:
            held = [hold_id(port) for _ in range(10)]
            try:
                counts = Counter(b for _, b in held)
                assert counts == {b1: 2, b2: 8}, counts
                assert servers_by_name(r.status())[_addr(b1)]["active"] == 2
                # a slot on b1 frees up: it is used again, and only once
                victim = next(s for s, b in held if b == b1)
                held.remove((victim, b1))
                victim.close()
                wait_for(lambda: servers_by_name(r.status())[_addr(b1)]["active"] == 1, 10,
                         what="b1 down to 1 connection")
                more = [hold_id(port) for _ in range(4)]
                held += more
                assert Counter(b for _, b in more)[b1] == 1, more
                assert servers_by_name(r.status())[_addr(b1)]["active"] == 2
            finally:
                for s, _ in held:
                    s.close()
            r.assert_no_traceback()


def test_max_connections_holds_under_a_burst(tmp_path):
    """40 clients connect at once through one worker: the limit must hold even
    while the connects to the servers are still in flight."""
    b1, b2, port = free_ports(3)
    with Backend("id", [b1, b2]):
        servers = [{"address": _addr(b1), "max_connections": 3}, _addr(b2)]
        with Ringd(tmp_path, _conf(port, servers), workers=1) as r:
            socks = []
            try:
                for _ in range(40):
                    socks.append(connect_nowait(port))
                reached = Counter()
                for s in socks:
                    s.setblocking(True)
                    s.settimeout(10)
                    line = read_line(s)
                    assert line.startswith(b"ID "), line
                    reached[int(line[3:])] += 1
                assert reached[b1] <= 3, reached
            finally:
                for s in socks:
                    s.close()


def test_down_server_gets_nothing(tmp_path):
    b1, b2, b3, port = free_ports(4)
    with Backend("id", [b1, b2, b3]):
        servers = [{"address": _addr(b1), "down": True}, _addr(b2), _addr(b3)]
        with Ringd(tmp_path, _conf(port, servers), workers=2) as r:
            got = _spread(port, 120, threads=4)
            # each worker alternates on its own: at most one apart per worker
            assert got[b1] == 0 and abs(got[b2] - got[b3]) <= 2, got
            by = servers_by_name(r.status())
            assert by[_addr(b1)]["state"] == "maint"
            assert by[_addr(b1)]["connections"] == 0 and by[_addr(b1)]["failures"] == 0


# --------------------------------------------------------------------------- backups


def test_backups_carry_traffic_only_while_every_primary_is_down(tmp_path):
    p1, p2, bk, port = free_ports(4)
    backends = {p: Backend("id", [p]).start() for p in (p1, p2, bk)}
    try:
        servers = [_addr(p1), _addr(p2), {"address": _addr(bk), "backup": True}]
        conf = _conf(port, servers, health=FAST_CHECKS, max_fails=0)
        kills = []

        def kill(p):
            t0 = time.monotonic()
            backends[p].stop()
            kills.append((t0, time.monotonic()))

        with Ringd(tmp_path, conf, workers=2) as r, Traffic(port) as bg:
            # `bg` keeps connecting all along: no new client may fail, also in
            # the moments between a primary dying and its check noticing it
            # (connections open on a backend while it is killed die with it)
            assert set(_spread(port, 40)) == {p1, p2}
            kill(p1)
            _wait_state(r, _addr(p1), "down")
            assert set(_spread(port, 40)) == {p2}          # one primary left: no backup
            kill(p2)
            _wait_state(r, _addr(p2), "down")
            assert set(_spread(port, 40)) == {bk}          # every primary down: backup
            backends[p1] = Backend("id", [p1]).start()
            _wait_state(r, _addr(p1), "up")
            assert set(_spread(port, 40)) == {p1}          # a primary is back
            bg.stop()
            assert not bg.failures_outside(kills), (kills, bg.failures[:5])
            assert len(bg.results) > 20
            r.assert_no_traceback()
    finally:
        for b in backends.values():
            b.stop()


# --------------------------------------------------------------------------- PROXY protocol

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _expected_header(version: str, family: int, src: tuple, dst: tuple) -> bytes:
    """The header as the spec defines it, built independently of ringd."""
    if version == "v1":
        proto = "TCP4" if family == socket.AF_INET else "TCP6"
        return f"PROXY {proto} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")
    if family == socket.AF_INET:
        fam, addrs = 0x11, socket.inet_pton(family, src[0]) + socket.inet_pton(family, dst[0])
    else:
        fam, addrs = 0x21, socket.inet_pton(family, src[0]) + socket.inet_pton(family, dst[0])
    body = addrs + struct.pack("!HH", src[1], dst[1])
    # ver 2 (high nibble), command PROXY (1); family/transport; length
    return V2_SIG + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_header_is_byte_exact(tmp_path, version, family):
    if family == "ipv6" and not _ipv6_loopback():
        pytest.skip("::1 is not available on this host (IPv6 disabled on lo)")
    bport, port = free_ports(2)
    with Backend("proxy_raw", [bport]):
        if family == "ipv4":
            fam, host, source = socket.AF_INET, "127.0.0.1", "127.0.0.9"
            lst = listener("web", port, "app")
        else:
            fam, host, source = socket.AF_INET6, "::1", None
            port = free_port("::1")
            lst = listener("web", port, "app").replace(f'"127.0.0.1:{port}"', f'"[::1]:{port}"')
        conf = lst + upstream("app", [_addr(bport)], proxy_protocol=version)
        with Ringd(tmp_path, conf, workers=2) as r:
            for i in range(4):
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.settimeout(10)
                try:
                    if source:
                        s.bind((source, 0))
                    s.connect((host, port))
                    src, dst = s.getsockname()[:2], s.getpeername()[:2]
                    payload = b"hello %d\n" % i
                    s.sendall(payload)          # sent before the header went out
                    info = json.loads(read_line(s))
                    assert "error" not in info, info
                    want = _expected_header(version, fam, src, dst)
                    assert bytes.fromhex(info["raw"]) == want, (info, want)
                    assert info["src"] == src[0] and info["sport"] == src[1]
                    assert info["dst"] == dst[0] and info["dport"] == port
                    got = b""
                    while len(got) < len(payload):
                        chunk = s.recv(64)
                        assert chunk, "connection closed before the echo"
                        got += chunk
                    assert got == payload
                finally:
                    s.close()
            r.assert_no_traceback()
