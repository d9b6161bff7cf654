"""The config model: frozen dataclasses, one field per key.

Every field that is a key of the file is declared with ``key()``: its
default, its converter (ringd.config.values) and a one-line doc ride on the
field as metadata. The checker reads them to know which keys a table takes
and how to convert each, so a new key is one line here (plus its comment in
conf/ringd.toml and its entry in ringd.toml(5), which tests/test_config.py
holds against this model). Fields without ``key()`` are not keys: they are
derived while loading (``Server.name``, ``RingdSettings.workers_auto``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from types import MappingProxyType
from typing import Any

from . import values as v
from .issues import find_line, format_path
from .values import Address

__all__ = [
    "AdminSettings", "Config", "HealthCheck", "Listener", "RingSettings", "RingdSettings",
    "Route", "Server", "Upstream", "converter", "key", "key_fields", "keys",
]


def key(default: Any = MISSING, convert: v.Converter | None = None, doc: str = "", *,
        required: bool = False, name: str | None = None) -> Any:
    """A field that is a key of the file. ``convert`` None: a table or an
    array of tables the checker reads itself; ``name``: the key as written,
    when it is not the field's name."""
    return field(default=default, metadata=MappingProxyType(
        {"key": name, "convert": convert, "doc": doc, "required": required}))


def key_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of ``cls`` that are keys of the file, in declaration order."""
    return tuple(f for f in dataclasses.fields(cls) if "doc" in f.metadata)


def converter(cls: type, name: str) -> v.Converter:
    """The converter of key ``name`` of ``cls``."""
    return next(f.metadata["convert"] for f in key_fields(cls) if f.name == name)


def keys(cls: type) -> tuple[str, ...]:
    """The keys a table of ``cls`` accepts, as written in the file."""
    return tuple(f.metadata["key"] or f.name for f in key_fields(cls))


@dataclass(frozen=True, slots=True)
class Server:
    address: Address = key(convert=v.address(wildcard=False), required=True, doc="the server")
    name: str   # not a key: the address text exactly as written in the file
    weight: int = key(1, v.integer(1, v.MAX_WEIGHT), "share of connections against the others")
    backup: bool = key(False, v.boolean, "used only while no other server is up")
    down: bool = key(False, v.boolean, "administratively off")
    max_connections: int = key(0, v.integer(0, 1_000_000), "open connections at most; 0 = no limit")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    interval: float = key(2.0, v.duration(allow_zero=False), "time between two checks")
    timeout: float = key(1.0, v.duration(allow_zero=False), "a check fails after this long")
    rise: int = key(2, v.integer(1, 100), "successes in a row that bring a server up")
    fall: int = key(3, v.integer(1, 100), "failures in a row that take a server down")
    port: int | None = key(None, v.integer(1, 65535), "check this port (None: the server's)")
    send: bytes | None = key(None, v.bytes_string, "bytes to send after connecting")
    expect: bytes | None = key(None, v.bytes_string, "the reply must start with these bytes")
    expect_regex: str | None = key(None, v.regex, "or match this (bytes) regular expression")
    # PROXY header first (v1 "UNKNOWN" / v2 LOCAL) when the upstream sends one;
    # None: yes when the upstream has proxy_protocol and no check port is set
    send_proxy: bool | None = key(None, v.boolean, "a PROXY protocol header first")


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str   # not a key: the NAME of [upstream.NAME]
    balance: str = key("round_robin", v.choice(v.BALANCE_METHODS), "how a server is picked")
    # Always at least one server after load; the default only keeps the field order
    # of the documented API (a field without a default cannot follow one with).
    servers: tuple[Server, ...] = key((), doc="address strings or inline tables (Server)")
    connect_retries: int = key(2, v.integer(0, 16), "other servers tried after a failed connect")
    proxy_protocol: str | None = key(None, v.proxy_protocol, 'PROXY header: None, "v1" or "v2"')
    max_fails: int = key(1, v.integer(0, 65535), "failed connects that mark a server down")
    fail_timeout: float = key(10.0, v.duration(allow_zero=False), "window of max_fails")
    health: HealthCheck | None = key(None, doc="[upstream.NAME.health]: active checks")
    rcvbuf: int = key(0, v.socket_buffer, "SO_RCVBUF of server sockets; 0 = autotuning")
    sndbuf: int = key(0, v.socket_buffer, "SO_SNDBUF of server sockets; 0 = autotuning")

    @property
    def proxy_version(self) -> int:
        """proxy_protocol as the data plane and the health checks number it: 0, 1 or 2."""
        return {"v1": 1, "v2": 2}.get(self.proxy_protocol or "", 0)


@dataclass(frozen=True, slots=True)
class Route:
    sni: tuple[str, ...] = key(convert=v.sni_list, required=True,
                               doc='server names: exact, or "*.example.com" for any name below')
    upstream: str = key(convert=v.string, required=True, doc="the upstream these names go to")
    name: str = key("", v.name, "label in metrics (default: the upstream's name)")


@dataclass(frozen=True, slots=True)
class Listener:
    name: str = key(convert=v.name, required=True, doc="unique name in logs and metrics")
    listen: Address = key(convert=v.address(wildcard=True), required=True, doc="where to accept")
    # required unless the listener has routes (the checker)
    upstream: str | None = key(None, v.string, "the upstream it forwards to (when no route matches)")
    backlog: int = key(511, v.integer(1, 65535), "listen(2) queue length")
    max_connections: int = key(10000, v.integer(1, 1_000_000), "open connections, all workers")
    connect_timeout: float = key(5.0, v.duration(allow_zero=False), "per connect to a server")
    idle_timeout: float = key(600.0, v.duration(allow_zero=False), "close after this long silent")
    access_log: bool = key(False, v.boolean, "one log line per closed connection")
    rcvbuf: int = key(0, v.socket_buffer, "SO_RCVBUF of client sockets; 0 = autotuning")
    sndbuf: int = key(0, v.socket_buffer, "SO_SNDBUF of client sockets; 0 = autotuning")
    peek_timeout: float = key(5.0, v.duration(allow_zero=False), "longest wait for the first bytes")
    accept_proxy: bool = key(False, v.boolean, "a PROXY v1 or v2 header is required first")
    trusted_proxies: tuple = key((), v.cidr_list, "networks allowed to send it; [] = any")
    allow: tuple = key((), v.cidr_list, "networks served; [] = all")
    deny: tuple = key((), v.cidr_list, "networks refused (deny wins over allow)")
    max_connections_per_source: int = key(0, v.integer(0, 1_000_000),
                                          "open connections per client, all workers; 0 = no limit")
    connection_rate_per_source: v.Rate | None = key(None, v.rate,
                                                    'new connections per client: "50/s"; "" = no limit')
    source_prefix_v6: int = key(64, v.integer(1, 128), "IPv6 clients are counted per prefix")
    routes: tuple[Route, ...] = key((), name="route", doc="[[listener.route]]: SNI routes")

    @property
    def upstreams_used(self) -> tuple[str, ...]:
        """The default upstream (if any), then each route's."""
        return tuple(u for u in (self.upstream, *(r.upstream for r in self.routes)) if u)

    @property
    def needs_peek(self) -> bool:
        return bool(self.routes)


@dataclass(frozen=True, slots=True)
class RingdSettings:
    # the resolved count, also when written as "auto" (the checker fills in both)
    workers: int = key(convert=v.workers, doc='"auto" (one per CPU) or a number of workers')
    workers_auto: bool   # not a key: workers was "auto"
    pidfile: str = key("/run/ringd/ringd.pid", v.file_path, "the master's pid, locked")
    control_socket: str = key("/run/ringd/ringd.sock", v.socket_path, "unix socket of the CLI")
    log_format: str = key("auto", v.choice(v.LOG_FORMATS), "json, console or auto")
    log_level: str = key("info", v.choice(v.LOG_LEVELS), "lowest level logged")
    log_file: str | None = key(None, v.file_path, "log to this file instead of stderr")
    drain_timeout: float = key(30.0, v.duration(allow_zero=False), "longest a drain waits")
    handover: bool = key(True, v.boolean, "reload: move open connections to the new workers")
    drain_after: float = key(10.0, v.duration(allow_zero=True), "ringd drain: accept this long")
    user: str | None = key(None, v.user, "workers drop privileges to this user")
    group: str | None = key(None, v.group, "workers drop privileges to this group")
    max_draining_generations: int = key(4, v.integer(1, 64), "old generations draining at once")
    watchdog_timeout: float = key(10.0, v.duration(allow_zero=True), "abort a silent worker")
    respawn_delay: float = key(0.1, v.duration(allow_zero=True), "first respawn backoff")
    respawn_delay_max: float = key(30.0, v.duration(allow_zero=True), "longest respawn backoff")
    source_table_size: int = key(65536, v.integer(1024, 4194304),
                                 "per-source limit table entries (restart to change)")


@dataclass(frozen=True, slots=True)
class RingSettings:
    sqpoll: bool | str = key("auto", v.sqpoll, "SQ polling thread: true, false or auto")
    sq_thread_idle: float = key(0.01, v.duration(allow_zero=True), "SQPOLL idle before sleep")
    entries: int = key(4096, v.power_of_two(8, 32768), "submission queue entries per ring")
    pipe_size: int = key(1 << 20, v.size(4096, 1 << 30, power_of_two=True), "splice pipe size")
    pipe_pool: int = key(64, v.integer(0, 4096), "idle pipes kept per worker")
    copy_buffer_size: int = key(16384, v.size(512, 1 << 20), "copy path buffer per direction")
    splice_threshold: int = key(65536, v.size(0, (1 << 63) - 1), "bytes copied before splicing")
    notsent_lowat: int = key(524288, v.notsent_lowat, "TCP_NOTSENT_LOWAT; 0 = the kernel's")


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address | None = key(None, v.address(wildcard=True), "metrics/status endpoint")


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    ringd: RingdSettings = key(doc="[ringd]: the process")
    ring: RingSettings = key(doc="[ring]: the data plane of each worker")
    admin: AdminSettings = key(doc="[admin]: the admin endpoint")
    listeners: tuple[Listener, ...] = key(name="listener", doc="[[listener]]: where to accept")
    upstreams: tuple[Upstream, ...] = key(name="upstream", doc="[upstream.NAME]: servers")
    # key path -> line, from the loader's scanner: for errors found after
    # loading (a port that cannot be bound) to name the line too
    lines: Any = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)
    # the text it was loaded from: ringd upgrade hands it to the next image,
    # which loads it again for the generations it adopts
    source: str = field(default="", compare=False, repr=False)

    def upstream(self, name: str) -> Upstream:
        """The upstream called ``name``; KeyError if there is none."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)

    def where(self, *path: str | int) -> str:
        """'file:line: key.path' for a key of this config, as load errors
        begin (the line of the nearest enclosing table if the key itself was
        not written)."""
        line = find_line(self.lines, path)
        at = self.file if line is None else f"{self.file}:{line}"
        return f"{at}: {format_path(path)}"


# The keys each table accepts, in the order the model declares them.
TOP_KEYS = keys(Config)
RINGD_KEYS = keys(RingdSettings)
RING_KEYS = keys(RingSettings)
ADMIN_KEYS = keys(AdminSettings)
LISTENER_KEYS = keys(Listener)
ROUTE_KEYS = keys(Route)
UPSTREAM_KEYS = keys(Upstream)
SERVER_KEYS = keys(Server)
HEALTH_KEYS = keys(HealthCheck)
