"""Edge routing end to end: SNI routes, the peek, PROXY headers received,
allow/deny. Real ringd, real backends, real ClientHellos from Python's ssl.

The backends are tests/backend.py "id" servers: they greet with "ID <port>"
and echo, so every case checks both where a connection went and that the
server received the client's bytes byte for byte."""
from __future__ import annotations

import json
import random
import socket
import struct
import time

import pytest

from harness import Backend, Ringd, connect, free_ports, recv_all, upstream, wait_for
from parser_corpus import Hello, frame, handshake, pq_key_share, proxy_v1, proxy_v2, sni_ext, \
    ssl_hello

MODES = pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
QUICK = 1.0     # a decision that needs no wait arrives well within this


def _listener(name, port, up=None, routes=(), host="127.0.0.1", **opts) -> str:
    where = f"[{host}]" if ":" in host else host
    lines = [f'\n[[listener]]\nname = "{name}"\nlisten = "{where}:{port}"\n']
    if up:
        lines.append(f'upstream = "{up}"\n')
    for k, v in opts.items():
        lines.append(f"{k} = {json.dumps(v)}\n")
    for sni, rup in routes:
        lines.append(f'[[listener.route]]\nsni = {json.dumps(list(sni))}\nupstream = "{rup}"\n')
    return "".join(lines)


def _ring(sqpoll: bool) -> str:
    return f"[ring]\nsqpoll = {str(sqpoll).lower()}\n"


def _exchange(port: int, data: bytes, pieces: int = 1, timeout: float = 5.0,
              source: str | None = None) -> tuple[str, bytes, float]:
    """Send `data` (in `pieces` sends), read the greeting line and the echo
    of data. Returns (greeting, echo, seconds to the greeting)."""
    s = connect(port, timeout=timeout, source=source)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    try:
        step = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
            if pieces > 1:
                time.sleep(0.002)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        took = time.monotonic() - t0
        line, _, rest = buf.partition(b"\n")
        while len(rest) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        return line.decode(), rest, took
    finally:
        s.close()


def _refused(port: int, data: bytes = b"", source: str | None = None,
             timeout: float = 5.0) -> float:
    """Connect, send data; the connection must end without a byte from a
    server. Returns the seconds it took."""
    t0 = time.monotonic()
    try:
        s = connect(port, timeout=timeout, source=source)
    except ConnectionResetError:
        # the reset came before connect() returned: refused at once
        return time.monotonic() - t0
    try:
        if data:
            try:
                s.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0
        try:
            got = s.recv(4096)
        except ConnectionResetError:
            got = b""
        assert got == b"", got
        return time.monotonic() - t0
    finally:
        s.close()


def _closed_count(r: Ringd, listener: str, reason: str) -> int:
    for ls in r.status()["listeners"]:
        if ls["listener"] == listener:
            return ls["refused"][reason]
    raise KeyError(listener)


def _with_sni(name: bytes) -> bytes:
    """A real ClientHello whose server_name is exactly `name` (any case, dots)."""
    h = Hello(handshake(ssl_hello("placeholder.invalid")))
    h.set_ext(0, sni_ext(name))
    return frame(h.encode())


def _big_hello(name: str, split: int | None) -> bytes:
    """A post-quantum sized ClientHello (> 1.5 KiB), in one record or two."""
    h = pq_key_share(Hello(handshake(ssl_hello(name))), random.Random(7))
    msg = h.encode()
    assert len(msg) > 1536
    return frame(msg, [split] if split else None)


@pytest.fixture
def backends():
    ports = free_ports(3)
    with Backend("id", ports):
        yield ports


def _routes_conf(port, bports, **opts):
    a, b, c = bports
    return (_listener("tls", port, "dflt", routes=[(["api.example.com"], "api"),
                                                   (["*.example.org", "www.example.net"], "wild")],
                      **opts)
            + upstream("api", [f"127.0.0.1:{a}"]) + upstream("wild", [f"127.0.0.1:{b}"])
            + upstream("dflt", [f"127.0.0.1:{c}"]))


@MODES
def test_sni_routes_pick_the_upstream_and_the_server_gets_the_exact_bytes(tmp_path, backends,
                                                                         sqpoll):
    a, b, c = backends
    port = free_ports(1)[0]
    conf = _ring(sqpoll) + _routes_conf(port, backends, peek_timeout="5s")
    cases = [
        ("exact", ssl_hello("api.example.com"), 1, a),
        ("upper case and trailing dot", _with_sni(b"API.Example.COM."), 1, a),
        ("wildcard, one label", ssl_hello("x.example.org"), 1, b),
        ("wildcard, deeper", ssl_hello("a.b.example.org"), 1, b),
        ("wildcard does not match its base", ssl_hello("example.org"), 1, c),
        ("second name of a route", ssl_hello("www.example.net"), 1, b),
        ("no match", ssl_hello("other.example.com"), 1, c),
        ("no SNI", ssl_hello(None), 1, c),
        ("small pieces", ssl_hello("api.example.com"), 40, a),
        ("post-quantum size, one record, pieces", _big_hello("api.example.com", None), 12, a),
        ("post-quantum size, two records", _big_hello("x.example.org", 700), 1, b),
        ("two records, pieces", _big_hello("api.example.com", 1000), 9, a),
        ("SSL 3.0 record version", frame(handshake(ssl_hello("api.example.com")),
                                         version=0x0300), 1, a),
        ("not TLS", b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n", 1, c),
    ]
    with Ringd(tmp_path, conf, workers=2) as r:
        for what, data, pieces, want in cases:
            for _ in range(2):
                greeting, echo, took = _exchange(port, data + b"after the hello", pieces)
                assert greeting == f"ID {want}", what
                assert echo == data + b"after the hello", what
                assert took < QUICK + 0.1 * pieces, (what, took)
        st = {ls["listener"]: ls for ls in r.status()["listeners"]}["tls"]
        assert st["routes"] == {"api": 12, "wild": 8}
        assert not any(st["refused"].values())
        r.assert_no_traceback()


@MODES
def test_silent_client_goes_to_the_default_upstream_after_peek_timeout(tmp_path, backends,
                                                                      sqpoll):
    """A server-first protocol: the client waits for the server's greeting."""
    port = free_ports(1)[0]
    conf = _ring(sqpoll) + _routes_conf(port, backends, peek_timeout="300ms")
    with Ringd(tmp_path, conf, workers=2) as r:
        for _ in range(3):
            s = connect(port, timeout=5)
            t0 = time.monotonic()
            assert s.recv(100) == f"ID {backends[2]}\n".encode()
            took = time.monotonic() - t0
            assert 0.25 <= took < 2.0, took
            s.sendall(b"hello")
            assert s.recv(100) == b"hello"
            s.close()
        assert not any(_closed_count(r, "tls", k) for k in ("peek_timeout", "no_route"))


@MODES
def test_without_a_default_upstream_refusals_are_closed_and_counted(tmp_path, backends, sqpoll):
    a = backends[0]
    port = free_ports(1)[0]
    conf = (_ring(sqpoll) + _listener("tls", port, None, routes=[(["api.example.com"], "api")],
                                      peek_timeout="300ms")
            + upstream("api", [f"127.0.0.1:{a}"]))
    with Ringd(tmp_path, conf, workers=2) as r:
        assert _exchange(port, ssl_hello("api.example.com"))[0] == f"ID {a}"
        for data in (ssl_hello("nope.example.com"), ssl_hello(None), b"SSH-2.0-x\r\n"):
            assert _refused(port, data) < QUICK
        took = _refused(port)               # silent: the deadline closes it
        assert 0.25 <= took < 2.0, took
        wait_for(lambda: _closed_count(r, "tls", "no_route") == 3
                 and _closed_count(r, "tls", "peek_timeout") == 1, 5, what="refusals counted")


# ------------------------------------------------------------------ PROXY received

def _proxy_conf(port, bport, sqpoll, **opts):
    return (_ring(sqpoll) + _listener("edge", port, "app", accept_proxy=True, access_log=True,
                                      peek_timeout="2s", **opts)
            + upstream("app", [f"127.0.0.1:{bport}"], proxy_protocol="v2"))


def _upstream_header(port: int, data: bytes, pieces: int = 1) -> dict:
    """Send a PROXY header + payload; the backend answers with the header
    ringd sent it (JSON), then echoes the payload."""
    s = connect(port, timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        step = max(1, -(-len(data) // pieces))
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
            time.sleep(0.002 if pieces > 1 else 0)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, buf
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        while len(rest) < 7:
            chunk = s.recv(4096)
            if not chunk:
                break
            rest += chunk
        info = json.loads(line)
        info["echo"] = rest
        return info
    finally:
        s.close()


@MODES
def test_proxy_header_replaces_the_client_address(tmp_path, sqpoll):
    bport, port = free_ports(2)
    with Backend("proxy", [bport]), Ringd(tmp_path, _proxy_conf(port, bport, sqpoll)) as r:
        cases = [
            (proxy_v1("TCP4", "192.0.2.7", "198.51.100.1", 4321, 443), "192.0.2.7", 1),
            (proxy_v1("TCP6", "2001:db8::7", "2001:db8::1", 4321, 443), "2001:db8::7", 1),
            (proxy_v2(src="192.0.2.8", dst="198.51.100.2", sport=555), "192.0.2.8", 1),
            (proxy_v2(fam=0x21, src="2001:db8::8", dst="2001:db8::2",
                      tlvs=[(0x02, b"example.com"), (0xE0, b"x" * 300)], crc=True),
             "2001:db8::8", 1),
            (proxy_v2(src="192.0.2.9", tlvs=[(0x01, b"h2")]), "192.0.2.9", 25),
            (proxy_v2(command=0, fam=0x00), "127.0.0.1", 1),     # LOCAL: the socket's own
            (proxy_v1("UNKNOWN"), "127.0.0.1", 1),
        ]
        for header, src, pieces in cases:
            info = _upstream_header(port, header + b"payload", pieces)
            assert info.get("src") == src, (header, info)
            assert info["echo"] == b"payload"
        # the address the client connected to travels on too
        info = _upstream_header(port, proxy_v1("TCP4", "192.0.2.7", "198.51.100.1", 4321, 443)
                                + b"payload")
        assert (info["dst"], info["sport"], info["dport"]) == ("198.51.100.1", 4321, 443)
        evs = r.wait_event("access", count=len(cases) + 1)
        clients = sorted(e["client"].rsplit(":", 1)[0] for e in evs)
        assert "192.0.2.7" in clients and "[2001:db8::8]" in clients
        assert any(e["client"] == "192.0.2.8:555" for e in evs)
        assert _closed_count(r, "edge", "proxy_header") == 0


@MODES
def test_bad_proxy_headers_are_closed_at_once_and_counted(tmp_path, sqpoll):
    bport, port = free_ports(2)
    good = proxy_v2()
    tlv_overrun = bytearray(proxy_v2(tlvs=[(0x02, b"abcd")]))
    tlv_overrun[-5:-3] = struct.pack("!H", 40)          # the TLV claims 40 bytes, has 4
    truncated = proxy_v2(tlvs=[(0x02, b"abcd")])[:-6] + b"\x02"   # header length cuts a TLV
    truncated = truncated[:14] + struct.pack("!H", len(truncated) - 16) + truncated[16:]
    bad = [
        b"GET / HTTP/1.0\r\n\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 1\r\n",
        bytes(tlv_overrun),
        truncated,
        good[:12] + b"\x31" + good[13:],                  # version 3
        b"\x00" * 20,
    ]
    with Backend("proxy", [bport]), Ringd(tmp_path, _proxy_conf(port, bport, sqpoll)) as r:
        for data in bad:
            assert _refused(port, data + b"payload") < QUICK, data
        assert 1.5 < _refused(port, b"PROXY TCP4 ") < 4        # incomplete: the deadline
        wait_for(lambda: _closed_count(r, "edge", "proxy_header") == len(bad) + 1, 5,
                 what="refusals counted")
        ev = r.wait_event("proxy_header_refused")[0]
        assert ev["peer"] == "127.0.0.1" and ev["level"] == "debug" and ev["count"] >= 1
        assert _upstream_header(port, good + b"payload")["src"] == "192.0.2.1"


def test_untrusted_peer_may_not_send_a_header(tmp_path):
    bport, port = free_ports(2)
    conf = _proxy_conf(port, bport, False, trusted_proxies=["127.0.0.2/32", "10.0.0.0/8"])
    with Backend("proxy", [bport]), Ringd(tmp_path, conf) as r:
        assert _refused(port, proxy_v2() + b"x", source="127.0.0.1") < QUICK
        s = connect(port, timeout=5, source="127.0.0.2")
        s.sendall(proxy_v2(src="192.0.2.44") + b"payload")
        assert json.loads(s.recv(4096).split(b"\n")[0])["src"] == "192.0.2.44"
        s.close()
        wait_for(lambda: _closed_count(r, "edge", "proxy_header") == 1, 5, what="counted")


# ------------------------------------------------------------------ allow / deny

@MODES
def test_allow_and_deny_on_the_socket_address(tmp_path, sqpoll):
    bport, port = free_ports(2)
    conf = (_ring(sqpoll) + _listener("web", port, "app", allow=["127.0.0.0/30", "10.0.0.0/8"],
                                      deny=["127.0.0.2"], access_log=True)
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("id", [bport]), Ringd(tmp_path, conf) as r:
        assert _exchange(port, b"hi", source="127.0.0.1")[0] == f"ID {bport}"
        assert _exchange(port, b"hi", source="127.0.0.3")[0] == f"ID {bport}"
        assert _refused(port, b"hi", source="127.0.0.2") < QUICK      # denied wins
        assert _refused(port, b"hi", source="127.0.0.4") < QUICK      # not allowed
        wait_for(lambda: _closed_count(r, "web", "denied") == 2, 5, what="denied counted")
        evs = r.wait_event("access", count=4)
        denied = sorted(e["client"].split(":")[0] for e in evs if e["end"] == "denied")
        assert denied == ["127.0.0.2", "127.0.0.4"]
        assert all(e["server"] in (None, "-", "") for e in evs if e["end"] == "denied"), evs


def _greeting(port: int, data: bytes) -> str:
    s = connect(port, timeout=5)
    try:
        s.sendall(data)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(100)
            assert chunk, buf
            buf += chunk
        return buf.partition(b"\n")[0].decode()
    finally:
        s.close()


def test_hash_balancing_uses_the_proxy_supplied_address(tmp_path):
    p1, p2, port = free_ports(3)
    conf = (_listener("edge", port, "app", accept_proxy=True)
            + upstream("app", [f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"], balance="hash"))
    with Backend("id", [p1, p2]), Ringd(tmp_path, conf):
        seen = {}
        for i in range(12):
            src = f"192.0.2.{10 + i}"
            firsts = {_greeting(port, proxy_v2(src=src, sport=1000 + k)) for k in range(3)}
            assert len(firsts) == 1, (src, firsts)      # one client, one server
            seen[src] = firsts.pop()
        assert set(seen.values()) == {f"ID {p1}", f"ID {p2}"}   # and the clients spread


def test_allow_and_deny_on_a_proxy_supplied_address(tmp_path):
    bport, port = free_ports(2)
    conf = _proxy_conf(port, bport, False, allow=["192.0.2.0/24"], deny=["192.0.2.66"])
    with Backend("proxy", [bport]), Ringd(tmp_path, conf) as r:
        assert _upstream_header(port, proxy_v2(src="192.0.2.5") + b"payload")["src"] == "192.0.2.5"
        assert _refused(port, proxy_v2(src="192.0.2.66") + b"payload") < QUICK
        assert _refused(port, proxy_v2(src="198.51.100.1") + b"payload") < QUICK
        # the socket's own address (LOCAL) is not in allow either
        assert _refused(port, proxy_v2(command=0, fam=0) + b"payload") < QUICK
        wait_for(lambda: _closed_count(r, "edge", "denied") == 3, 5, what="denied counted")


# ------------------------------------------------------------------ reload, metrics

def test_reload_changes_routes_and_policy_and_metrics_count(tmp_path, backends):
    import signal
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request

    a, b, c = backends
    port, admin = free_ports(2)
    admin_conf = f'\n[admin]\nlisten = "127.0.0.1:{admin}"\n'
    first = _routes_conf(port, backends) + admin_conf
    with Ringd(tmp_path, first) as r:
        assert _exchange(port, ssl_hello("api.example.com"))[0] == f"ID {a}"
        assert _exchange(port, ssl_hello("x.example.org"))[0] == f"ID {b}"
        # reload: api.example.com moves to "wild", and 127.0.0.1 is denied
        second = (_listener("tls", port, "dflt", routes=[(["api.example.com"], "wild")],
                            deny=["127.0.0.5"])
                  + upstream("wild", [f"127.0.0.1:{b}"]) + upstream("dflt", [f"127.0.0.1:{c}"])
                  + admin_conf)
        r.write_config(second)
        r.signal(signal.SIGHUP)
        r.wait_event("reload_ok", timeout=30)
        assert _exchange(port, ssl_hello("api.example.com"))[0] == f"ID {b}"
        assert _exchange(port, ssl_hello("x.example.org"))[0] == f"ID {c}"
        assert _refused(port, b"x", source="127.0.0.5") < QUICK
        # a bad reload is rejected with key and line; the running config stays
        r.write_config(second.replace('upstream = "wild"\n', 'upstream = "wilde"\n', 1))
        r.signal(signal.SIGHUP)
        ev = r.wait_event("reload_rejected", timeout=30)[0]
        assert 'route[0].upstream: no upstream named "wilde"' in ev["reason"]
        assert _exchange(port, ssl_hello("api.example.com"))[0] == f"ID {b}"

        def samples():
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            out = {}
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    key = (s.name, frozenset(s.labels.items()))
                    out[key] = out.get(key, 0) + s.value
            return out

        def summed(name, **labels):
            return sum(v for (n, ls), v in samples().items()
                       if n == name and all((k, x) in ls for k, x in labels.items()))
        # counters carry over the reload (the first generation's are folded in)
        wait_for(lambda: summed("ringd_route_connections_total", listener="tls", route="api") == 1
                 and summed("ringd_route_connections_total", listener="tls", route="wild") == 3
                 and summed("ringd_connections_closed_total", listener="tls",
                            reason="denied") == 1, 20, what="metrics")
        st = {ls["listener"]: ls for ls in r.status()["listeners"]}["tls"]
        assert st["routes"] == {"wild": 3} and st["refused"]["denied"] == 1
        out = r.cli("status", "-c", str(r.conf))
        assert "LISTENER" in out.stdout and "denied 1" in out.stdout, out.stdout + out.stderr


@MODES
def test_many_concurrent_routed_clients_keep_their_bytes(tmp_path, backends, sqpoll):
    """40 clients at once, each a ClientHello in pieces then 200 KB: every
    one reaches its route's server, and the echo is the bytes sent."""
    import concurrent.futures as cf
    import hashlib

    a, b, c = backends
    port = free_ports(1)[0]
    conf = _ring(sqpoll) + _routes_conf(port, backends, peek_timeout="5s")
    names = [("api.example.com", a), ("q.example.org", b), ("none.example", c), (None, c)]

    def client(i: int):
        name, want = names[i % len(names)]
        hello = _big_hello(name, 900) if name and i % 3 == 0 else ssl_hello(name)
        body = random.Random(i).randbytes(200_000)
        data = hello + body
        s = connect(port, timeout=20)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for k in range(0, len(hello), 97):
                s.sendall(hello[k:k + 97])
                time.sleep(0.001)
            sender = threading.Thread(target=s.sendall, args=(body,))
            sender.start()
            got = b""
            while len(got) < len(f"ID {want}\n") + len(data):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
            sender.join(20)
            line, _, rest = got.partition(b"\n")
            return line.decode(), f"ID {want}", hashlib.sha256(rest).digest(), \
                hashlib.sha256(data).digest()
        finally:
            s.close()

    import threading
    with Ringd(tmp_path, conf, workers=2) as r:
        with cf.ThreadPoolExecutor(40) as ex:
            for line, want, got, sent in ex.map(client, range(40), timeout=90):
                assert line == want and got == sent
        st = {ls["listener"]: ls for ls in r.status()["listeners"]}["tls"]
        assert st["routes"] == {"api": 10, "wild": 10} and not any(st["refused"].values())
        r.assert_no_traceback()


# ------------------------------------------------------------------ corpora through the data path

def _send_all_then_read(port: int, data: bytes) -> bytes | None:
    """Send data, half-close, read to EOF; None if ringd reset the client."""
    try:
        s = connect(port, timeout=10)
    except ConnectionResetError:
        return None
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s)
        except (ConnectionResetError, BrokenPipeError):
            return None
        except OSError as e:
            if e.errno == 107:          # ENOTCONN: the reset came before shutdown()
                return None
            raise
    finally:
        s.close()


def test_mutated_client_hellos_through_the_worker(tmp_path, backends):
    """Truncated and mutated ClientHellos (the parser corpus) through a
    listener with routes: each reaches a server (a route or the default)
    with its bytes intact; no worker dies."""
    from parser_corpus import PX_OK, proxy_corpus, ref_proxy, tls_corpus

    import concurrent.futures as cf
    a, b, c = backends
    port = free_ports(1)[0]
    conf = _routes_conf(port, backends, peek_timeout="2s")
    corpus = tls_corpus(seed=11, count=400)[::2]
    with Ringd(tmp_path, conf, workers=2) as r:
        with cf.ThreadPoolExecutor(8) as ex:
            for data, got in zip(corpus, ex.map(lambda d: _send_all_then_read(port, d), corpus,
                                                timeout=120)):
                assert got is not None, data
                line, _, rest = got.partition(b"\n")
                assert line.decode() in (f"ID {a}", f"ID {b}", f"ID {c}") and rest == data
        st = r.status()
        assert st["worker_restarts"] == 0 and not any(st["listeners"][0]["refused"].values())

    # PROXY headers: a header the reference parser accepts is served, any
    # other is refused; nothing else happens
    pport = free_ports(1)[0]
    conf = _listener("edge", pport, "dflt", accept_proxy=True, peek_timeout="1s") + \
        upstream("dflt", [f"127.0.0.1:{c}"])
    corpus = proxy_corpus(seed=12, count=400)[::2]
    with Ringd(tmp_path / "proxy", conf, workers=2) as r:
        with cf.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(lambda d: _send_all_then_read(pport, d), corpus, timeout=120))
        for data, got in zip(corpus, results):
            ok = ref_proxy(data)["result"] == PX_OK
            assert (got is not None and got.startswith(f"ID {c}\n".encode())) == ok, (data, got)
        assert r.status()["worker_restarts"] == 0


def test_allow_and_deny_on_ipv6(tmp_path):
    bport, p1, p2 = free_ports(3)
    conf = (_listener("in", p1, "app", host="::1", allow=["::1/128"], deny=["2001:db8::/32"])
            + _listener("out", p2, "app", host="::1", deny=["::/1"])
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("id", [bport]), Ringd(tmp_path, conf) as r:
        s = connect(p1, host="::1", timeout=5)
        s.sendall(b"x")
        assert s.recv(100).startswith(f"ID {bport}".encode())
        s.close()
        try:
            s = connect(p2, host="::1", timeout=5)
            s.sendall(b"x")
            assert s.recv(100) == b""
            s.close()
        except ConnectionResetError:
            pass            # reset even before connect() returned, or at the send
        wait_for(lambda: _closed_count(r, "out", "denied") == 1, 5, what="denied counted")
