"""The edge policy of the listeners, compiled for the data path.

The master turns a listener's allow/deny/trusted_proxies lists and its
[[listener.route]] tables into the flat structures the C loop searches
(ringd_api.h, native/policy.c), once per generation, so nothing of it runs
in Python per connection:

- an address list becomes a sorted array of disjoint ranges of 128-bit
  addresses (IPv4 as ::ffff:a.b.c.d), overlapping and adjacent networks
  merged: the worker finds an address by binary search, O(log n);
- the server names of a listener's routes become one open-addressing hash
  table keyed by (name, wildcard), "*.example.com" stored as "example.com"
  with wildcard set; the worker probes it once per label of the client's
  name: O(labels), whatever the number of routes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import Config, Listener
from .srclimit import listener_key

_MASK64 = (1 << 64) - 1
_V4_MAPPED = 0xFFFF << 32


def route_hash(name: bytes, wildcard: bool) -> int:
    """FNV-1a 64 of the name, mixed with the wildcard flag (as policy.c)."""
    h = 0xCBF29CE484222325
    for b in name:
        h ^= b
        h = (h * 0x100000001B3) & _MASK64
    return h ^ (0x9E3779B97F4A7C15 if wildcard else 0)


def address_ranges(networks) -> list[tuple[int, int]]:
    """Networks -> sorted, merged [first, last] ranges of 128-bit integers."""
    spans = []
    for net in networks:
        first, last = int(net.network_address), int(net.broadcast_address)
        if net.version == 4:
            first, last = first | _V4_MAPPED, last | _V4_MAPPED
        spans.append((first, last))
    spans.sort()
    merged: list[list[int]] = []
    for first, last in spans:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(a, b) for a, b in merged]


@dataclass(frozen=True)
class RouteTable:
    """A listener's route names as the C hash table wants them."""

    slots: list[tuple[int, int, int, bool, int]]   # (hash, off, len, wildcard, route) or None
    names: bytes
    max_probe: int


def route_table(listener: Listener) -> RouteTable:
    entries = []
    for index, route in enumerate(listener.routes):
        for pattern in route.sni:
            wildcard = pattern.startswith("*.")
            entries.append((pattern[2:] if wildcard else pattern, wildcard, index))
    size = 8
    while size < 2 * len(entries):      # load factor at most 1/2
        size *= 2
    slots: list = [None] * size
    names = bytearray()
    max_probe = 0
    for name, wildcard, route in entries:
        raw = name.encode("ascii")
        h = route_hash(raw, wildcard)
        i, probe = h & (size - 1), 0
        while slots[i] is not None:
            i, probe = (i + 1) & (size - 1), probe + 1
        slots[i] = (h, len(names), len(raw), wildcard, route)
        names += raw
        max_probe = max(max_probe, probe)
    return RouteTable(slots, bytes(names), max_probe)


def source_key(listener: Listener) -> int:
    """The per-source table key of a listener (ringd.srclimit.listener_key:
    a hash of its name, so its counts carry over a reload)."""
    return listener_key(listener.name)


def has_policy(listener: Listener) -> bool:
    return bool(listener.accept_proxy or listener.allow or listener.deny or listener.routes
                or listener.max_connections_per_source or listener.connection_rate_per_source)


def route_count(config: Config) -> int:
    return sum(len(lst.routes) for lst in config.listeners)


def route_labels(config: Config) -> list[tuple[str, str]]:
    """(listener, route name) of every route, in the order of the worker's counters."""
    return [(lst.name, r.name) for lst in config.listeners for r in lst.routes]


def fill_listener(ffi, lc, listener: Listener, up_index: dict[str, int], first_route: int,
                  keep: list) -> None:
    """Set the edge fields of one struct ringd_listener_cfg; cdata that must
    live as long as the worker goes into ``keep``."""
    if not has_policy(listener):
        return
    lc.edge = 1
    lc.accept_proxy = 1 if listener.accept_proxy else 0
    lc.peek_timeout_ms = max(1, int(listener.peek_timeout * 1000))
    lc.first_route = first_route
    for field, networks in (("trusted", listener.trusted_proxies), ("allow", listener.allow),
                            ("deny", listener.deny)):
        ranges = address_ranges(networks)
        if not ranges:
            continue
        arr = ffi.new("struct ringd_addr_range[]", len(ranges))
        for k, (first, last) in enumerate(ranges):
            arr[k].first[0], arr[k].first[1] = first >> 64, first & _MASK64
            arr[k].last[0], arr[k].last[1] = last >> 64, last & _MASK64
        lst = getattr(lc, field)
        lst.ranges = arr
        lst.n = len(ranges)
        keep.append(arr)
    if listener.routes:
        rt = route_table(listener)
        slots = ffi.new("struct ringd_route_name[]", len(rt.slots))
        for k, entry in enumerate(rt.slots):
            if entry is None:
                continue
            h, off, length, wildcard, route = entry
            slots[k].hash, slots[k].off, slots[k].len = h, off, length
            slots[k].wildcard, slots[k].route = 1 if wildcard else 0, route
        names = ffi.new("uint8_t[]", rt.names or b"\0")
        ups = ffi.new("uint32_t[]", [up_index[r.upstream] for r in listener.routes])
        table = ffi.new("struct ringd_route_table *")
        table.slots, table.mask, table.max_probe = slots, len(rt.slots) - 1, rt.max_probe
        table.names, table.nroutes, table.upstream = names, len(listener.routes), ups
        lc.routes = table
        keep.extend([slots, names, ups, table])
    lc.max_per_source = listener.max_connections_per_source
    rate = listener.connection_rate_per_source
    if rate is not None:
        lc.rate_count, lc.rate_ms = rate.count, rate.seconds * 1000
    lc.source_prefix_v6 = listener.source_prefix_v6
    lc.source_key = source_key(listener)


