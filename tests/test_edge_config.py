"""The edge keys of a listener: their errors (key path and line), and the
tables the master compiles from them (supervisor/edge.py) as the C lookups
(native/policy.c) see them."""
from __future__ import annotations

import ipaddress
import random
import socket
import struct
import time

import pytest

from ringd import config as cfg
from ringd import edge
from ringd._native import ffi, lib

BASE = """\
[[listener]]
name = "tls"
listen = "127.0.0.1:4443"
upstream = "dflt"
{listener}
[[listener.route]]
sni = ["api.example.com", "*.api.example.com"]
upstream = "api"
{routes}
[upstream.dflt]
servers = ["127.0.0.1:1"]
[upstream.api]
servers = ["127.0.0.1:2"]
[upstream.web]
servers = ["127.0.0.1:3"]
"""


def _load(listener: str = "", routes: str = '[[listener.route]]\nsni = ["w.example"]\n'
                                             'upstream = "web"\n'):
    return cfg.loads(BASE.format(listener=listener, routes=routes), "t.toml")


def _issues(listener: str = "", routes: str = "") -> list[str]:
    text = BASE.format(listener=listener, routes=routes or
                       '[[listener.route]]\nsni = ["w.example"]\nupstream = "web"\n')
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text, "t.toml")
    return [str(i) for i in info.value.errors]


def test_defaults_and_values():
    c = _load('peek_timeout = "250ms"\naccept_proxy = true\ntrusted_proxies = ["10.0.0.0/8"]\n'
              'allow = ["192.0.2.0/24", "2001:db8::/32"]\ndeny = ["192.0.2.7"]\n'
              'max_connections_per_source = 20\nconnection_rate_per_source = "600/m"\n'
              'source_prefix_v6 = 56\n')
    lst = c.listeners[0]
    assert lst.peek_timeout == 0.25 and lst.accept_proxy
    assert [str(n) for n in lst.allow] == ["192.0.2.0/24", "2001:db8::/32"]
    assert str(lst.deny[0]) == "192.0.2.7/32"
    assert lst.connection_rate_per_source == cfg.values.Rate(600, 60)
    assert (lst.max_connections_per_source, lst.source_prefix_v6) == (20, 56)
    assert [(r.name, r.upstream, r.sni) for r in lst.routes] == [
        ("api", "api", ("api.example.com", "*.api.example.com")), ("web", "web", ("w.example",))]
    d = cfg.loads('[[listener]]\nname = "a"\nlisten = "127.0.0.1:1"\nupstream = "u"\n'
                  '[upstream.u]\nservers = ["127.0.0.1:2"]\n').listeners[0]
    assert (d.peek_timeout, d.accept_proxy, d.trusted_proxies, d.allow, d.deny) == \
        (5.0, False, (), (), ())
    assert (d.max_connections_per_source, d.connection_rate_per_source, d.source_prefix_v6,
            d.routes) == (0, None, 64, ())
    assert not edge.has_policy(d)


def test_upstream_is_optional_with_routes_only():
    text = BASE.format(listener="", routes="").replace('upstream = "dflt"\n', "", 1)
    text = text.replace('[upstream.dflt]\nservers = ["127.0.0.1:1"]\n', "")
    text = text.replace('[upstream.web]\nservers = ["127.0.0.1:3"]\n', "")
    assert cfg.loads(text).listeners[0].upstream is None
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads('[[listener]]\nname = "a"\nlisten = "127.0.0.1:1"\n'
                  '[upstream.u]\nservers = ["127.0.0.1:2"]\n', "t.toml")
    assert "t.toml:1: listener[0].upstream: missing required key" in str(info.value.errors[0])


@pytest.mark.parametrize("listener, routes, expected", [
    ('allow = ["10.1.2.3/8"]', "",
     't.toml:5: listener[0].allow: [0]: "10.1.2.3/8" has host bits set (the network is "10.0.0.0/8")'),
    ('deny = ["10.0.0.0/33"]', "", "t.toml:5: listener[0].deny: [0]: invalid network"),
    ('deny = "10.0.0.0/8"', "", "t.toml:5: listener[0].deny: expected an array of networks"),
    ('trusted_proxies = ["10.0.0.1"]', "",
     "t.toml:5: listener[0].trusted_proxies: is set but accept_proxy is false"),
    ('connection_rate_per_source = "50/d"', "",
     't.toml:5: listener[0].connection_rate_per_source: expected a rate like "50/s"'),
    ('connection_rate_per_source = "0/s"', "",
     "t.toml:5: listener[0].connection_rate_per_source: the count must be between 1 and"),
    ('connection_rate_per_source = 50', "",
     "t.toml:5: listener[0].connection_rate_per_source: expected a rate"),
    ("source_prefix_v6 = 129", "", "t.toml:5: listener[0].source_prefix_v6: must be between 1 and 128"),
    ('peek_timeout = "0s"', "", "t.toml:5: listener[0].peek_timeout: must be greater than 0"),
    ("", '[[listener.route]]\nsni = ["x.example"]\nupstream = "nope"\n',
     't.toml:11: listener[0].route[1].upstream: no upstream named "nope"'),
    ("", '[[listener.route]]\nsni = ["API.example.com."]\nupstream = "web"\n',
     't.toml:10: listener[0].route[1].sni[0]: duplicate server name "api.example.com" (also in '
     'route[0])'),
    ("", '[[listener.route]]\nsni = ["a.*.example"]\nupstream = "web"\n',
     't.toml:10: listener[0].route[1].sni: [0]: invalid server name "a.*.example": "*" is '
     'allowed only as a whole first label'),
    ("", '[[listener.route]]\nsni = ["*example.com"]\nupstream = "web"\n',
     't.toml:10: listener[0].route[1].sni: [0]: invalid server name'),
    ("", '[[listener.route]]\nsni = ["x.example"]\nupstream = "api"\n',
     't.toml:11: listener[0].route[1].upstream: route name "api" is also route[0]\'s'),
    ("", '[[listener.route]]\nsni = []\nupstream = "web"\n',
     "t.toml:10: listener[0].route[1].sni: must list at least one server name"),
    ("", '[[listener.route]]\nupstream = "web"\nsnii = ["x"]\n',
     't.toml:11: listener[0].route[1].snii: unknown key (did you mean "sni"?)'),
])
def test_errors_name_key_and_line(listener, routes, expected):
    found = _issues(listener, routes)
    assert any(i.startswith(expected) for i in found), found


def test_address_ranges_merge_and_map_v4():
    nets = [ipaddress.ip_network(n) for n in
            ("10.0.0.0/9", "10.128.0.0/9", "10.0.0.0/24", "192.0.2.1/32", "192.0.2.2/32",
             "2001:db8::/64")]
    ranges = edge.address_ranges(nets)
    v4 = 0xFFFF << 32
    assert ranges[0] == (v4 | 0x0A000000, v4 | 0x0AFFFFFF)          # merged /9 + /9 + inside
    assert ranges[1] == (v4 | 0xC0000201, v4 | 0xC0000202)          # adjacent /32s merged
    assert len(ranges) == 3


def _sockaddr(ip: str) -> bytes:
    if ":" in ip:
        return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 1, 0) + \
            socket.inet_pton(socket.AF_INET6, ip) + struct.pack("=I", 0)
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", 1) + \
        socket.inet_pton(socket.AF_INET, ip) + bytes(8)


def _compiled(text: str):
    c = cfg.loads(text)
    keep: list = []
    lc = ffi.new("struct ringd_listener_cfg *")
    up_index = {u.name: i for i, u in enumerate(c.upstreams)}
    edge.fill_listener(ffi, lc, c.listeners[0], up_index, 0, keep)
    return c, lc, keep


def test_address_lookup_matches_python_on_random_lists():
    rng = random.Random(5)
    nets = set()
    for _ in range(2000):
        if rng.random() < 0.7:
            nets.add(ipaddress.ip_network((rng.getrandbits(32), rng.randint(8, 32)), strict=False))
        else:
            nets.add(ipaddress.ip_network((rng.getrandbits(128), rng.randint(16, 128)),
                                          strict=False))
    deny = ", ".join(f'"{n}"' for n in nets)
    _, lc, keep = _compiled(f'[[listener]]\nname = "a"\nlisten = "127.0.0.1:1"\nupstream = "u"\n'
                            f'deny = [{deny}]\n[upstream.u]\nservers = ["127.0.0.1:2"]\n')
    assert 0 < lc.deny.n <= len(nets)
    probes = [str(n.network_address) for n in list(nets)[:300]]
    probes += [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(3000)]
    probes += [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(1000)]
    for ip in probes:
        addr = ipaddress.ip_address(ip)
        want = any(addr in n for n in nets if n.version == addr.version)
        raw = _sockaddr(ip)
        assert lib.ringd_addr_in(ffi.addressof(lc, "deny"), raw, len(raw)) == want, ip
    # a v4-mapped IPv6 client matches IPv4 rules
    v4 = next(n for n in nets if n.version == 4)
    raw = _sockaddr(f"::ffff:{v4.network_address}")
    assert lib.ringd_addr_in(ffi.addressof(lc, "deny"), raw, len(raw)) == 1


def _route_conf(n: int) -> str:
    routes = "".join(f'[[listener.route]]\nsni = ["h{i}.example.com", "*.w{i}.example.net"]\n'
                     f'upstream = "u"\nname = "r{i}"\n' for i in range(n))
    return (f'[[listener]]\nname = "a"\nlisten = "127.0.0.1:1"\nupstream = "u"\n{routes}'
            f'[upstream.u]\nservers = ["127.0.0.1:2"]\n')


def _lookup(lc, name: str) -> int:
    raw = name.encode()
    return lib.ringd_route_lookup(lc.routes, raw, len(raw))


def test_route_lookup_exact_wildcard_first_wins():
    text = ('[[listener]]\nname = "a"\nlisten = "127.0.0.1:1"\nupstream = "u"\n'
            '[[listener.route]]\nsni = ["*.example.com"]\nupstream = "u"\nname = "wild"\n'
            '[[listener.route]]\nsni = ["api.example.com", "*.b.example.com"]\nupstream = "u"\n'
            'name = "exact"\n'
            '[upstream.u]\nservers = ["127.0.0.1:2"]\n')
    _, lc, keep = _compiled(text)
    assert _lookup(lc, "api.example.com") == 0          # the first route that matches wins
    assert _lookup(lc, "x.y.example.com") == 0
    assert _lookup(lc, "example.com") == -1              # "*." needs a label in front
    assert _lookup(lc, "api.example.co") == -1
    assert _lookup(lc, "") == -1
    assert edge.route_hash(b"api.example.com", False) == \
        lib.ringd_route_hash(b"api.example.com", 15, 0)
    assert edge.route_hash(b"example.com", True) == lib.ringd_route_hash(b"example.com", 11, 1)


def test_route_lookup_with_1000_routes_is_not_linear():
    _, lc, keep = _compiled(_route_conf(1000))
    assert lc.routes.max_probe < 16
    for i in (0, 1, 500, 999):
        assert _lookup(lc, f"h{i}.example.com") == i
        assert _lookup(lc, f"deep.x.w{i}.example.net") == i
    assert _lookup(lc, "h1000.example.com") == -1
    # the same lookups with 1 and with 1000 routes cost about the same
    _, small, keep2 = _compiled(_route_conf(1))

    def per_lookup(table) -> float:
        names = [f"n{i}.x.example.org".encode() for i in range(2000)]
        t0 = time.perf_counter()
        for raw in names:
            lib.ringd_route_lookup(table.routes, raw, len(raw))
        return time.perf_counter() - t0
    best = min(per_lookup(lc) for _ in range(5)) / min(per_lookup(small) for _ in range(5))
    assert best < 3, best
