"""Configuration loader: one TOML file in, frozen dataclasses out.

The file is parsed once with ``tomllib`` and every key is checked here, so the rest
of ringd never sees a raw dict. A file with mistakes is rejected as a whole with a
``ConfigError`` that lists *every* problem found, each naming the key path
(``upstream.app.servers[1].weight``) and the line it sits on, so that one round of
edit-and-check fixes them all. ``ringd check`` and reload both go through ``load``.

``tomllib`` reports no positions for keys, so a small scanner (``_LineScanner``)
walks the raw text once and maps key paths to lines. It only has to understand
TOML that ``tomllib`` already accepted, and if it ever gets lost the cost is a
missing line number, never a failed load.

This module depends on the standard library only.
"""

import ast
import bisect
import difflib
import fractions
import grp
import ipaddress
import json
import os
import pwd
import re
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "Address",
    "AdminSettings",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "HealthCheck",
    "Listener",
    "RingSettings",
    "RingdSettings",
    "Server",
    "Upstream",
    "load",
    "loads",
    "read_file",
]


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file."""

    path: str  # key path, e.g. "listener[1].listen"; "" for file-level problems
    line: int | None  # 1-based line of the key (or its table); None if unknown
    message: str
    file: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.path:
            return f"{where}: {self.path}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A config file was rejected; ``errors`` holds every issue found (at least one)."""

    errors: list[ConfigIssue]

    def __init__(self, errors: list[ConfigIssue]) -> None:
        if not errors:
            raise ValueError("ConfigError needs at least one issue")
        self.errors = list(errors)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.errors)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint, resolved once at load time."""

    host: str  # as written; "0.0.0.0" for "*"
    port: int
    ip: str  # literal IP the host resolved to
    family: int  # socket.AF_INET or socket.AF_INET6

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def sockaddr(self) -> tuple:
        """Address tuple for ``socket.bind``/``connect`` in this address's family."""
        if self.family == socket.AF_INET6:
            return (self.ip, self.port, 0, 0)
        return (self.ip, self.port)


@dataclass(frozen=True, slots=True)
class Server:
    address: Address
    name: str  # the address text exactly as written in the file
    weight: int = 1
    backup: bool = False
    down: bool = False  # administratively off
    max_connections: int = 0  # 0 = unlimited


@dataclass(frozen=True, slots=True)
class HealthCheck:
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    port: int | None = None  # None: the server's own port
    send: bytes | None = None
    expect: bytes | None = None  # the reply must start with these bytes
    expect_regex: str | None = None  # or match this (bytes) regular expression
    # PROXY header first (v1 "UNKNOWN" / v2 LOCAL) when the upstream sends one;
    # None: yes when the upstream has proxy_protocol and no check port is set
    send_proxy: bool | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    balance: str = "round_robin"
    # Always at least one server after load; the default only keeps the field order
    # of the documented API (a field without a default cannot follow one with).
    servers: tuple[Server, ...] = ()
    connect_retries: int = 2
    proxy_protocol: str | None = None  # None, "v1" or "v2"
    max_fails: int = 1
    fail_timeout: float = 10.0
    health: HealthCheck | None = None
    rcvbuf: int = 0  # SO_RCVBUF of server sockets; 0 = the kernel's autotuning
    sndbuf: int = 0

    @property
    def proxy_version(self) -> int:
        """proxy_protocol as the data plane and the health checks number it: 0, 1 or 2."""
        return {"v1": 1, "v2": 2}.get(self.proxy_protocol or "", 0)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    listen: Address
    upstream: str
    backlog: int = 511
    max_connections: int = 10000
    connect_timeout: float = 5.0
    idle_timeout: float = 600.0
    access_log: bool = False
    rcvbuf: int = 0  # SO_RCVBUF of accepted client sockets; 0 = the kernel's autotuning
    sndbuf: int = 0


@dataclass(frozen=True, slots=True)
class RingdSettings:
    workers: int  # resolved count, also when written as "auto"
    workers_auto: bool
    pidfile: str = "/run/ringd/ringd.pid"
    control_socket: str = "/run/ringd/ringd.sock"
    log_format: str = "auto"
    log_level: str = "info"
    log_file: str | None = None
    drain_timeout: float = 30.0
    drain_after: float = 10.0  # `ringd drain`: keep accepting this long after /healthz turns 503
    user: str | None = None
    group: str | None = None
    max_draining_generations: int = 4
    watchdog_timeout: float = 10.0
    respawn_delay: float = 0.1
    respawn_delay_max: float = 30.0


@dataclass(frozen=True, slots=True)
class RingSettings:
    sqpoll: bool | str = "auto"  # True, False or "auto"
    sq_thread_idle: float = 0.01
    entries: int = 4096
    pipe_size: int = 1048576
    pipe_pool: int = 64
    copy_buffer_size: int = 16384
    splice_threshold: int = 65536
    notsent_lowat: int = 524288  # TCP_NOTSENT_LOWAT of both sockets; 0 = the kernel's default


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address | None = None


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    ringd: RingdSettings
    ring: RingSettings
    admin: AdminSettings
    listeners: tuple[Listener, ...]
    upstreams: tuple[Upstream, ...]
    # key path -> line, from the loader's scanner: for errors found after
    # loading (a port that cannot be bound) to name the line too
    lines: Any = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

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
        line = _find_line(self.lines, path)
        at = self.file if line is None else f"{self.file}:{line}"
        return f"{at}: {_format_path(path)}"


# --------------------------------------------------------------------------- schema

# The keys each table accepts, in the order the example file documents them.
TOP_KEYS = ("ringd", "ring", "admin", "listener", "upstream")
RINGD_KEYS = (
    "workers", "pidfile", "control_socket", "log_format", "log_level", "log_file",
    "drain_timeout", "drain_after", "user", "group", "max_draining_generations",
    "watchdog_timeout", "respawn_delay", "respawn_delay_max",
)
RING_KEYS = (
    "sqpoll", "sq_thread_idle", "entries", "pipe_size", "pipe_pool",
    "copy_buffer_size", "splice_threshold", "notsent_lowat",
)
ADMIN_KEYS = ("listen",)
LISTENER_KEYS = (
    "name", "listen", "upstream", "backlog", "max_connections", "connect_timeout",
    "idle_timeout", "access_log", "rcvbuf", "sndbuf",
)
UPSTREAM_KEYS = (
    "balance", "servers", "connect_retries", "proxy_protocol", "max_fails",
    "fail_timeout", "rcvbuf", "sndbuf", "health",
)
SERVER_KEYS = ("address", "weight", "backup", "down", "max_connections")
HEALTH_KEYS = (
    "interval", "timeout", "rise", "fall", "port", "send", "expect", "expect_regex", "send_proxy",
)

BALANCE_METHODS = ("round_robin", "least_conn", "hash", "random")
LOG_FORMATS = ("json", "console", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 1024

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
# Every duration must fit a 32-bit millisecond timer; 1000h is a round bound below that.
_MAX_DURATION = 1000 * 3600.0
_DURATION_HINT = 'expected a duration like "500ms", "30s", "2m"'
_DURATION_RE = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:ms|h|m|s))+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}
_SIZE_HINT = 'expected a size in bytes or a string like "64KiB", "1MiB"'
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL


# --------------------------------------------------------------------------- helpers

Path = tuple[str | int, ...]


def _format_path(path: Path) -> str:
    """("upstream", "app", "servers", 1) -> 'upstream.app.servers[1]'."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        else:
            key = part if _BARE_KEY_RE.fullmatch(part) else _quote(part)
            out.append(f".{key}" if out else key)
    return "".join(out)


def _quote(text: str, limit: int = 80) -> str:
    """A string as it would be written in TOML, shortened for messages."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def _got(value: Any) -> str:
    """Describe a value for 'expected X, got Y' messages."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"


class _Invalid(Exception):
    """Raised by a value converter; the message goes into a ConfigIssue."""


def _parse_duration(text: str) -> float | None:
    """'1.5s' -> 1.5, '500ms' -> 0.5, '1m30s' -> 90.0; None if it is not a duration."""
    text = text.strip()
    if not _DURATION_RE.fullmatch(text):
        return None
    total = 0.0
    for number, unit in _DURATION_PART_RE.findall(text):
        if unit == "ms":  # divide rather than multiply: 100 / 1000 is exactly 0.1
            total += float(number) / 1000.0
        else:
            total += float(number) * _DURATION_UNITS[unit]
    return total


def _parse_size(value: Any) -> int:
    """Bytes from an integer or a string like '64KiB'; 1024-based units only."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(f"{_SIZE_HINT}, got {_got(value)}")
    if isinstance(value, int):
        if value < 0:
            raise _Invalid(f"must not be negative, got {value}")
        return value
    match = _SIZE_RE.fullmatch(value.strip())
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise _Invalid(f"{_SIZE_HINT}, got {_quote(value)}")
    size = fractions.Fraction(match.group(1)) * _SIZE_UNITS[unit]
    if size.denominator != 1:
        raise _Invalid(f"{_quote(value)} is not a whole number of bytes")
    return int(size)


# Value converters: take the raw TOML value, return the checked value or raise _Invalid.

Converter = Callable[[Any], Any]


def _integer(lo: int, hi: int) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer {lo}..{hi}, got {_got(value)}")
        if not lo <= value <= hi:
            raise _Invalid(f"must be between {lo} and {hi}, got {value}")
        return value

    return convert


def _power_of_two(lo: int, hi: int) -> Converter:
    check = _integer(lo, hi)

    def convert(value: Any) -> int:
        value = check(value)
        if value & (value - 1):
            raise _Invalid(f"must be a power of two between {lo} and {hi}, got {value}")
        return value

    return convert


def _size(lo: int, hi: int, *, power_of_two: bool = False, zero: str | None = None) -> Converter:
    """A size in lo..hi; with `zero` (what 0 means), 0 is accepted too."""
    def convert(value: Any) -> int:
        size = _parse_size(value)
        if size == 0 and zero is not None:
            return 0
        shown = _quote(value) if isinstance(value, str) else str(value)
        if power_of_two and (size < lo or size > hi or size & (size - 1)):
            raise _Invalid(
                f"must be a power of two between {_fmt_size(lo)} and {_fmt_size(hi)}, got {shown}"
            )
        if not lo <= size <= hi:
            also = f"0 ({zero}) or " if zero is not None else ""
            raise _Invalid(f"must be {also}between {_fmt_size(lo)} and {_fmt_size(hi)}, got {shown}")
        return size

    return convert


# SO_RCVBUF / SO_SNDBUF (the kernel doubles the value and caps it at
# net.core.rmem_max / wmem_max) and TCP_NOTSENT_LOWAT; 0 leaves it to the kernel
_socket_buffer = _size(4096, 1 << 30, zero="the kernel's autotuning")
_notsent_lowat = _size(4096, 1 << 30, zero="the kernel's default")


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_got(value)}")
    return value


def _duration(*, allow_zero: bool) -> Converter:
    def convert(value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise _Invalid(f'{_DURATION_HINT}, got the number {value} (write "{value}s"?)')
        if not isinstance(value, str):
            raise _Invalid(f"{_DURATION_HINT}, got {_got(value)}")
        seconds = _parse_duration(value)
        if seconds is None:
            raise _Invalid(f"{_DURATION_HINT}, got {_quote(value)}")
        if seconds == 0 and not allow_zero:
            raise _Invalid(f"must be greater than 0, got {_quote(value)}")
        if seconds > _MAX_DURATION:
            raise _Invalid(f"must be at most {_fmt_seconds(_MAX_DURATION)}, got {_quote(value)}")
        return seconds

    return convert


def _choice(options: tuple[str, ...]) -> Converter:
    listed = ", ".join(f'"{o}"' for o in options)

    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            shown = _got(value) if not isinstance(value, str) else _quote(value)
            raise _Invalid(f"expected one of {listed}, got {shown}")
        return value

    return convert


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_got(value)}")
    if not value:
        raise _Invalid("must not be empty")
    return value


def _file_path(value: Any) -> str:
    value = _string(value)
    if "\0" in value:
        raise _Invalid("must not contain a NUL character")
    return value


def _socket_path(value: Any) -> str:
    value = _file_path(value)
    try:
        length = len(os.fsencode(value))
    except UnicodeError:
        raise _Invalid(f"{_quote(value)} cannot be encoded as a file name") from None
    if length > _SUN_PATH_MAX:
        raise _Invalid(
            f"a unix socket path can be at most {_SUN_PATH_MAX} bytes, this one has {length}"
        )
    return value


def _bytes_string(value: Any) -> bytes:
    return _string(value).encode("utf-8")


def _regex(value: Any) -> str:
    value = _string(value)
    try:
        re.compile(value.encode("utf-8"))
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise _Invalid(f"invalid regular expression {_quote(value)}: {exc}") from None
    return value


def _user(value: Any) -> str:
    value = _string(value)
    try:
        pwd.getpwnam(value)
    except (KeyError, ValueError):
        raise _Invalid(f"no such user {_quote(value)}") from None
    return value


def _group(value: Any) -> str:
    value = _string(value)
    try:
        grp.getgrnam(value)
    except (KeyError, ValueError):
        raise _Invalid(f"no such group {_quote(value)}") from None
    return value


def _cpu_count() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_WORKERS))


def _workers(value: Any) -> tuple[int, bool]:
    if value == "auto" and isinstance(value, str):
        return _cpu_count(), True
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= MAX_WORKERS:
            return value, False
        raise _Invalid(f"must be between 1 and {MAX_WORKERS}, got {value}")
    raise _Invalid(f'expected "auto" or an integer 1..{MAX_WORKERS}, got {_got(value)}')


def _sqpoll(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise _Invalid(f'expected true, false or "auto", got {_got(value)}')


def _proxy_protocol(value: Any) -> str | None:
    if value is False:
        return None
    if value in ("v1", "v2") and isinstance(value, str):
        return value
    raise _Invalid(f'expected false, "v1" or "v2", got {_got(value)}')


def _split_address(text: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or '*:port' -> (host, port); raises _Invalid."""
    bad = f"invalid address {_quote(text)}"
    if not text:
        raise _Invalid("invalid address: empty string")
    if any(ch.isspace() for ch in text):
        raise _Invalid(f"{bad}: contains whitespace")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid(f"{bad}: unbalanced brackets")
        host, rest = text[1:end], text[end + 1 :]
        if "[" in host or "]" in rest or "[" in rest:
            raise _Invalid(f"{bad}: unbalanced brackets")
        if not rest:
            raise _Invalid(f'{bad}: missing port (write "[{host}]:PORT")')
        if not rest.startswith(":"):
            raise _Invalid(f'{bad}: expected ":PORT" after "]"')
        port_text = rest[1:]
        if not host:
            raise _Invalid(f"{bad}: empty host")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise _Invalid(f"{bad}: brackets are only for IPv6 addresses") from None
    else:
        if "[" in text or "]" in text:
            raise _Invalid(f"{bad}: unbalanced brackets")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise _Invalid(f'{bad}: missing port (write "{text}:PORT")')
        if ":" in host:
            raise _Invalid(f'{bad}: write IPv6 addresses in brackets, like "[::1]:8080"')
        if not host:
            raise _Invalid(f'{bad}: empty host (write "*:{port_text}" for all addresses)')
    if not port_text:
        raise _Invalid(f"{bad}: missing port")
    if not port_text.isascii() or not port_text.isdigit():
        raise _Invalid(f"{bad}: port {_quote(port_text)} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise _Invalid(f"{bad}: port {port} is out of range 1..65535")
    return host, port


# --------------------------------------------------------------------------- line scanner


class _ScanStop(Exception):
    pass


def _find_line(lines: Any, path: Path) -> int | None:
    """The line of ``path``, or of its nearest prefix that has one."""
    for n in range(len(path), 0, -1):
        line = lines.get(path[:n])
        if line is not None:
            return line
    return None


class _LineScanner:
    """Map key paths to the 1-based line where each key, table or element starts.

    Paths use the same tuples as the checker: ("listener", 1, "listen") for the key
    in the second [[listener]], ("upstream", "app", "servers", 0) for the first array
    element. Prefixes get the line where they first appear, so a missing key can be
    reported on its table's line.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.lines: dict[Path, int] = {}
        self._newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        self._aot_count: dict[Path, int] = {}  # array-of-tables path -> elements seen

    def scan(self) -> dict[Path, int]:
        try:
            self._document()
        except (_ScanStop, IndexError, ValueError, RecursionError):
            pass  # keep what was found; the rest simply has no line numbers
        return self.lines

    def find(self, path: Path) -> int | None:
        return _find_line(self.lines, path)

    # -- low level

    def _line(self) -> int:
        return bisect.bisect_left(self._newlines, self.pos) + 1

    def _peek(self, s: str) -> bool:
        return self.text.startswith(s, self.pos)

    def _skip_space(self, newlines: bool) -> None:
        text, n = self.text, len(self.text)
        while self.pos < n:
            ch = text[self.pos]
            if ch in " \t" or (newlines and ch in "\r\n"):
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = n if end < 0 else end
            else:
                break

    def _expect(self, s: str) -> None:
        if not self._peek(s):
            raise _ScanStop
        self.pos += len(s)

    def _record(self, path: Path, line: int) -> None:
        for n in range(1, len(path)):
            self.lines.setdefault(path[:n], line)
        self.lines.setdefault(path, line)

    # -- keys

    def _key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self._skip_space(newlines=False)
            start = self.pos
            if self._peek('"'):
                self._basic_string()
                raw = self.text[start : self.pos]
                try:
                    parts.append(tomllib.loads(f"k = {raw}")["k"])
                except tomllib.TOMLDecodeError:
                    parts.append(raw[1:-1])
            elif self._peek("'"):
                self._literal_string()
                parts.append(self.text[start + 1 : self.pos - 1])
            else:
                match = _BARE_KEY_RE.match(self.text, self.pos)
                if not match:
                    raise _ScanStop
                parts.append(match.group())
                self.pos = match.end()
            self._skip_space(newlines=False)
            if not self._peek("."):
                return tuple(parts)
            self.pos += 1

    def _resolve(self, keys: tuple[str, ...]) -> Path:
        """Header keys -> path, inserting the current index of enclosing [[arrays]]."""
        path: Path = ()
        for key in keys:
            path = path + (key,)
            count = self._aot_count.get(path)
            if count:
                path = path + (count - 1,)
        return path

    # -- statements

    def _document(self) -> None:
        table: Path = ()
        while True:
            self._skip_space(newlines=True)
            if self.pos >= len(self.text):
                return
            line = self._line()
            if self._peek("[["):
                self.pos += 2
                keys = self._key()
                self._expect("]]")
                array = self._resolve(keys[:-1]) + (keys[-1],)
                index = self._aot_count.get(array, 0)
                self._aot_count[array] = index + 1
                table = array + (index,)
                self._record(table, line)
            elif self._peek("["):
                self.pos += 1
                keys = self._key()
                self._expect("]")
                table = self._resolve(keys)
                self.lines[table] = line  # an explicit header beats an earlier implicit mention
                self._record(table, line)
            else:
                keys = self._key()
                self._expect("=")
                path = table + keys
                self._record(path, line)
                self._skip_space(newlines=False)
                self._value(path)
            self._skip_space(newlines=False)

    def _value(self, path: Path) -> None:
        if self._peek('"""'):
            self._multiline('"""', escapes=True)
        elif self._peek("'''"):
            self._multiline("'''", escapes=False)
        elif self._peek('"'):
            self._basic_string()
        elif self._peek("'"):
            self._literal_string()
        elif self._peek("["):
            self._array(path)
        elif self._peek("{"):
            self._inline_table(path)
        else:
            start = self.pos
            text, n = self.text, len(self.text)
            while self.pos < n and text[self.pos] not in ",]}#\r\n":
                self.pos += 1
            if self.pos == start:
                raise _ScanStop

    def _array(self, path: Path) -> None:
        self.pos += 1
        index = 0
        while True:
            self._skip_space(newlines=True)
            if self._peek("]"):
                self.pos += 1
                return
            self._record(path + (index,), self._line())
            self._value(path + (index,))
            index += 1
            self._skip_space(newlines=True)
            if self._peek(","):
                self.pos += 1
            elif not self._peek("]"):
                raise _ScanStop

    def _inline_table(self, path: Path) -> None:
        self.pos += 1
        while True:
            self._skip_space(newlines=True)
            if self._peek("}"):
                self.pos += 1
                return
            line = self._line()
            keys = self._key()
            self._expect("=")
            self._record(path + keys, line)
            self._skip_space(newlines=False)
            self._value(path + keys)
            self._skip_space(newlines=True)
            if self._peek(","):
                self.pos += 1
            elif not self._peek("}"):
                raise _ScanStop

    # -- strings

    def _basic_string(self) -> None:
        text, n = self.text, len(self.text)
        self.pos += 1
        while self.pos < n:
            ch = text[self.pos]
            if ch == "\\":
                self.pos += 2
            elif ch == '"':
                self.pos += 1
                return
            elif ch == "\n":
                raise _ScanStop
            else:
                self.pos += 1
        raise _ScanStop

    def _literal_string(self) -> None:
        end = self.text.find("'", self.pos + 1)
        if end < 0:
            raise _ScanStop
        self.pos = end + 1

    def _multiline(self, quote: str, *, escapes: bool) -> None:
        text, n = self.text, len(self.text)
        self.pos += 3
        while self.pos < n:
            if escapes and text[self.pos] == "\\":
                self.pos += 2
            elif text.startswith(quote, self.pos):
                self.pos += 3
                # Up to two more quote characters belong to the string's content.
                for _ in range(2):
                    if self._peek(quote[0]):
                        self.pos += 1
                return
            else:
                self.pos += 1
        raise _ScanStop


# --------------------------------------------------------------------------- checker


class _Checker:
    """Walks the parsed document, collecting issues instead of stopping at the first."""

    def __init__(self, data: dict[str, Any], file: str, scanner: _LineScanner) -> None:
        self.data = data
        self.file = file
        self.scanner = scanner
        self.issues: list[ConfigIssue] = []
        self._resolved: dict[tuple[str, int], tuple[str, int]] = {}

    # -- reporting

    def error(self, path: Path, message: str) -> None:
        self.issues.append(
            ConfigIssue(
                path=_format_path(path),
                line=self.scanner.find(path),
                message=message,
                file=self.file,
            )
        )

    def table(self, value: Any, path: Path, expected: str = "a table") -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"expected {expected}, got {_got(value)}")
        return None

    def known_keys(self, table: dict[str, Any], path: Path, keys: tuple[str, ...]) -> None:
        for key in table:
            if key in keys:
                continue
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            self.error(path + (key,), f"unknown key{hint}")

    # -- getting values

    def take(
        self, table: dict[str, Any], path: Path, key: str, convert: Converter, into: dict[str, Any]
    ) -> None:
        """If ``key`` is present and valid, store its converted value in ``into``."""
        if key not in table:
            return
        try:
            into[key] = convert(table[key])
        except _Invalid as exc:
            self.error(path + (key,), str(exc))

    def require(self, table: dict[str, Any], path: Path, key: str, convert: Converter) -> Any:
        """The converted value of a required key, or None after reporting why not."""
        if key not in table:
            self.error(path + (key,), "missing required key")
            return None
        try:
            return convert(table[key])
        except _Invalid as exc:
            self.error(path + (key,), str(exc))
            return None

    def address(self, *, wildcard: bool) -> Converter:
        def convert(value: Any) -> Address:
            if not isinstance(value, str):
                raise _Invalid(f'expected an address like "127.0.0.1:8080", got {_got(value)}')
            host, port = _split_address(value)
            if host == "*":
                if not wildcard:
                    raise _Invalid(f'invalid address {_quote(value)}: "*" is only valid for listen')
                host = "0.0.0.0"
            ip, family = self._resolve(host, port)
            return Address(host=host, port=port, ip=ip, family=family)

        return convert

    def _resolve(self, host: str, port: int) -> tuple[str, int]:
        cached = self._resolved.get((host, port))
        if cached is not None:
            return cached
        family, flags = socket.AF_UNSPEC, 0
        try:
            literal = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if literal.version == 6 else socket.AF_INET
            flags = socket.AI_NUMERICHOST
        try:
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags)
        except socket.gaierror as exc:
            raise _Invalid(f"cannot resolve {_quote(host)}: {exc.strerror or exc}") from None
        except (OSError, UnicodeError, ValueError) as exc:
            raise _Invalid(f"cannot resolve {_quote(host)}: {exc}") from None
        for info_family, _type, _proto, _name, sockaddr in infos:
            if info_family in (socket.AF_INET, socket.AF_INET6):
                result = (str(sockaddr[0]), int(info_family))
                self._resolved[(host, port)] = result
                return result
        raise _Invalid(f"cannot resolve {_quote(host)}: no IPv4 or IPv6 address")

    # -- sections

    def run(self) -> Config | None:
        data = self.data
        self.known_keys(data, (), TOP_KEYS)
        ringd = self.ringd(data.get("ringd", {}))
        ring = self.ring(data.get("ring", {}))
        admin = self.admin(data.get("admin", {}))
        upstreams = self.upstreams(data.get("upstream"))
        listeners = self.listeners(data.get("listener"), upstreams)
        if admin.listen is not None:
            self.admin_conflicts(admin.listen, listeners)
        if self.issues:
            return None
        return Config(
            file=self.file,
            ringd=ringd,
            ring=ring,
            admin=admin,
            listeners=tuple(listeners),
            upstreams=tuple(u for u in upstreams.values() if u is not None),
            lines=MappingProxyType(dict(self.scanner.lines)),
        )

    def ringd(self, raw: Any) -> RingdSettings:
        path: Path = ("ringd",)
        table = self.table(raw, path) or {}
        self.known_keys(table, path, RINGD_KEYS)
        found: dict[str, Any] = {}
        self.take(table, path, "workers", _workers, found)
        self.take(table, path, "pidfile", _file_path, found)
        self.take(table, path, "control_socket", _socket_path, found)
        self.take(table, path, "log_format", _choice(LOG_FORMATS), found)
        self.take(table, path, "log_level", _choice(LOG_LEVELS), found)
        self.take(table, path, "log_file", _file_path, found)
        self.take(table, path, "drain_timeout", _duration(allow_zero=False), found)
        self.take(table, path, "drain_after", _duration(allow_zero=True), found)
        self.take(table, path, "user", _user, found)
        self.take(table, path, "group", _group, found)
        self.take(table, path, "max_draining_generations", _integer(1, 64), found)
        self.take(table, path, "watchdog_timeout", _duration(allow_zero=True), found)
        self.take(table, path, "respawn_delay", _duration(allow_zero=True), found)
        self.take(table, path, "respawn_delay_max", _duration(allow_zero=True), found)
        workers, auto = found.pop("workers", None) or (_cpu_count(), True)
        settings = RingdSettings(workers=workers, workers_auto=auto, **found)
        self.distinct_files(path, table, settings, ("pidfile", "control_socket", "log_file"))
        if settings.respawn_delay_max < settings.respawn_delay:
            key = "respawn_delay_max" if "respawn_delay_max" in table else "respawn_delay"
            self.error(
                path + (key,),
                f"respawn_delay_max ({_fmt_seconds(settings.respawn_delay_max)}) must not be "
                f"smaller than respawn_delay ({_fmt_seconds(settings.respawn_delay)})",
            )
        return settings

    def distinct_files(self, path: Path, table: dict[str, Any], settings: Any,
                       keys: tuple[str, ...]) -> None:
        """Keys naming files ringd creates must name different files: a pidfile
        on the control socket's path passes every other check, then start fails."""
        seen: dict[str, str] = {}
        for key in keys:
            value = getattr(settings, key)
            if value is None:
                continue
            where = os.path.normpath(os.path.abspath(value))
            other = seen.setdefault(where, key)
            if other == key:
                continue
            # report at the key written last, naming the other one and its line
            first, second = sorted((other, key), key=lambda k: self.scanner.find(path + (k,)) or 0)
            line = self.scanner.find(path + (first,))
            at = f"line {line}" if line and first in table else "its default"
            self.error(path + (second,),
                       f"{_quote(value)} is also ringd.{first} ({at}); they must be different files")

    def ring(self, raw: Any) -> RingSettings:
        path: Path = ("ring",)
        table = self.table(raw, path) or {}
        self.known_keys(table, path, RING_KEYS)
        found: dict[str, Any] = {}
        self.take(table, path, "sqpoll", _sqpoll, found)
        self.take(table, path, "sq_thread_idle", _duration(allow_zero=True), found)
        self.take(table, path, "entries", _power_of_two(8, 32768), found)
        self.take(table, path, "pipe_size", _size(4096, 1 << 30, power_of_two=True), found)
        self.take(table, path, "pipe_pool", _integer(0, 4096), found)
        self.take(table, path, "copy_buffer_size", _size(512, 1 << 20), found)
        self.take(table, path, "splice_threshold", _size(0, (1 << 63) - 1), found)
        self.take(table, path, "notsent_lowat", _notsent_lowat, found)
        return RingSettings(**found)

    def admin(self, raw: Any) -> AdminSettings:
        path: Path = ("admin",)
        table = self.table(raw, path) or {}
        self.known_keys(table, path, ADMIN_KEYS)
        found: dict[str, Any] = {}
        self.take(table, path, "listen", self.address(wildcard=True), found)
        return AdminSettings(**found)

    def upstreams(self, raw: Any) -> dict[str, Upstream | None]:
        """Every declared upstream name -> its Upstream, or None if it has errors."""
        path: Path = ("upstream",)
        if raw is None:
            return {}
        table = self.table(raw, path, "a table of upstreams ([upstream.NAME])")
        if table is None:
            return {}
        result: dict[str, Upstream | None] = {}
        for name, body in table.items():
            upath = path + (name,)
            before = len(self.issues)
            if not _NAME_RE.fullmatch(name):
                self.error(upath, f"invalid upstream name {_quote(name)}: use 1 to 64 of A-Z a-z 0-9 _ . -")
            body = self.table(body, upath, f"a table ([upstream.{_format_path((name,))}])")
            upstream = self.upstream(name, body, upath) if body is not None else None
            result[name] = upstream if len(self.issues) == before else None
        return result

    def upstream(self, name: str, table: dict[str, Any], path: Path) -> Upstream:
        self.known_keys(table, path, UPSTREAM_KEYS)
        found: dict[str, Any] = {}
        self.take(table, path, "balance", _choice(BALANCE_METHODS), found)
        self.take(table, path, "connect_retries", _integer(0, 16), found)
        self.take(table, path, "proxy_protocol", _proxy_protocol, found)
        self.take(table, path, "max_fails", _integer(0, 65535), found)
        self.take(table, path, "fail_timeout", _duration(allow_zero=False), found)
        self.take(table, path, "rcvbuf", _socket_buffer, found)
        self.take(table, path, "sndbuf", _socket_buffer, found)
        if "health" in table:
            health = self.table(table["health"], path + ("health",))
            if health is not None:
                found["health"] = self.health(health, path + ("health",))
        servers = self.servers(table, path + ("servers",))
        return Upstream(name=name, servers=servers, **found)

    def servers(self, table: dict[str, Any], path: Path) -> tuple[Server, ...]:
        if "servers" not in table:
            self.error(path, "missing required key")
            return ()
        raw = table["servers"]
        if not isinstance(raw, list):
            self.error(path, f"expected a non-empty array of servers, got {_got(raw)}")
            return ()
        if not raw:
            self.error(path, "must list at least one server")
            return ()
        servers: list[Server] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(raw):
            server = self.server(item, path + (index,))
            if server is None:
                continue
            if server.name in seen:
                self.error(
                    path + (index,),
                    f"duplicate server {_quote(server.name)} (also servers[{seen[server.name]}])",
                )
                continue
            seen[server.name] = index
            servers.append(server)
        if len(servers) == len(raw) and all(s.backup for s in servers):
            self.error(path, "every server is a backup: at least one must not be")
        return tuple(servers)

    def server(self, item: Any, path: Path) -> Server | None:
        convert = self.address(wildcard=False)
        if isinstance(item, str):
            try:
                return Server(address=convert(item), name=item)
            except _Invalid as exc:
                self.error(path, str(exc))
                return None
        if not isinstance(item, dict):
            self.error(
                path,
                f'expected an address string or a table like {{address = "host:port"}}, got {_got(item)}',
            )
            return None
        before = len(self.issues)
        self.known_keys(item, path, SERVER_KEYS)
        address = self.require(item, path, "address", convert)
        found: dict[str, Any] = {}
        self.take(item, path, "weight", _integer(1, 256), found)
        self.take(item, path, "backup", _boolean, found)
        self.take(item, path, "down", _boolean, found)
        self.take(item, path, "max_connections", _integer(0, 1_000_000), found)
        if len(self.issues) != before or address is None:
            return None
        return Server(address=address, name=item["address"], **found)

    def health(self, table: dict[str, Any], path: Path) -> HealthCheck:
        self.known_keys(table, path, HEALTH_KEYS)
        found: dict[str, Any] = {}
        self.take(table, path, "interval", _duration(allow_zero=False), found)
        self.take(table, path, "timeout", _duration(allow_zero=False), found)
        self.take(table, path, "rise", _integer(1, 100), found)
        self.take(table, path, "fall", _integer(1, 100), found)
        self.take(table, path, "port", _integer(1, 65535), found)
        self.take(table, path, "send", _bytes_string, found)
        self.take(table, path, "expect", _bytes_string, found)
        self.take(table, path, "expect_regex", _regex, found)
        self.take(table, path, "send_proxy", _boolean, found)
        if "expect" in table and "expect_regex" in table:
            self.error(path + ("expect_regex",), 'set either "expect" or "expect_regex", not both')
        return HealthCheck(**found)

    def listeners(self, raw: Any, upstreams: dict[str, Upstream | None]) -> list[Listener]:
        path: Path = ("listener",)
        if raw is None:
            self.error(path, "at least one [[listener]] is required")
            return []
        if not isinstance(raw, list):
            self.error(path, f"expected an array of tables ([[listener]]), got {_got(raw)}")
            return []
        if not raw:
            self.error(path, "at least one [[listener]] is required")
            return []
        listeners: list[Listener] = []
        referenced: set[str] = set()
        references_ok = True
        names: dict[str, int] = {}
        addresses: dict[tuple[str, int], int] = {}
        for index, item in enumerate(raw):
            lpath = path + (index,)
            table = self.table(item, lpath)
            if table is None:
                references_ok = False
                continue
            before = len(self.issues)
            self.known_keys(table, lpath, LISTENER_KEYS)
            name = self.require(table, lpath, "name", self.listener_name)
            listen = self.require(table, lpath, "listen", self.address(wildcard=True))
            upstream = self.require(table, lpath, "upstream", _string)
            if upstream is None:
                references_ok = False
            elif upstream not in upstreams:
                close = difflib.get_close_matches(upstream, list(upstreams), n=1, cutoff=0.6)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.error(lpath + ("upstream",), f"no upstream named {_quote(upstream)}{hint}")
            else:
                referenced.add(upstream)
            found: dict[str, Any] = {}
            self.take(table, lpath, "backlog", _integer(1, 65535), found)
            self.take(table, lpath, "max_connections", _integer(1, 1_000_000), found)
            self.take(table, lpath, "connect_timeout", _duration(allow_zero=False), found)
            self.take(table, lpath, "idle_timeout", _duration(allow_zero=False), found)
            self.take(table, lpath, "access_log", _boolean, found)
            self.take(table, lpath, "rcvbuf", _socket_buffer, found)
            self.take(table, lpath, "sndbuf", _socket_buffer, found)
            if name is not None:
                if name in names:
                    self.error(
                        lpath + ("name",),
                        f"duplicate listener name {_quote(name)} (also listener[{names[name]}])",
                    )
                else:
                    names[name] = index
            if listen is not None:
                key = (listen.ip, listen.port)
                if key in addresses:
                    self.error(
                        lpath + ("listen",),
                        f"{listen} is already used by listener[{addresses[key]}]",
                    )
                else:
                    addresses[key] = index
            if len(self.issues) == before:
                listeners.append(Listener(name=name, listen=listen, upstream=upstream, **found))
        if references_ok:
            # An upstream with errors of its own is not also reported as unused.
            for name, upstream in upstreams.items():
                if upstream is not None and name not in referenced:
                    self.error(("upstream", name), "not used by any listener")
        return listeners

    @staticmethod
    def listener_name(value: Any) -> str:
        value = _string(value)
        if not _NAME_RE.fullmatch(value):
            raise _Invalid(f"invalid name {_quote(value)}: use 1 to 64 of A-Z a-z 0-9 _ . -")
        return value

    def admin_conflicts(self, admin: Address, listeners: list[Listener]) -> None:
        wildcards = ("0.0.0.0", "::")
        for index, listener in enumerate(listeners):
            other = listener.listen
            if other.port != admin.port:
                continue
            if admin.ip == other.ip or admin.ip in wildcards or other.ip in wildcards:
                self.error(
                    ("admin", "listen"),
                    f"{admin} overlaps listener {_quote(listener.name)} on {other}",
                )
                return


# --------------------------------------------------------------------------- entry points

_TOML_AT_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_END_RE = re.compile(r"\s*\(at end of document\)\s*$")
_TUPLE_RE = re.compile(r"\((?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")(?:, (?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"))*,?\)")


def _syntax_issue(exc: tomllib.TOMLDecodeError, text: str, file: str) -> ConfigIssue:
    message = str(exc)
    line: int | None = None
    column: int | None = None
    match = _TOML_AT_RE.search(message)
    if match:
        line, column = int(match.group(1)), int(match.group(2))
        message = message[: match.start()]
    else:
        match = _TOML_END_RE.search(message)
        if match:
            line = max(1, len(text.splitlines()))
            message = message[: match.start()]

    def dotted(m: re.Match[str]) -> str:
        # tomllib shows key paths as Python tuples: ('upstream', 'app') -> "upstream.app"
        try:
            parts = ast.literal_eval(m.group())
        except (ValueError, SyntaxError):
            return m.group()
        if not isinstance(parts, tuple) or not all(isinstance(p, str) for p in parts):
            return m.group()
        return _quote(_format_path(tuple(parts)))

    message = _TUPLE_RE.sub(dotted, message).strip()
    if message:
        message = message[0].lower() + message[1:]
    if column is not None:
        message += f" (column {column})"
    return ConfigIssue(path="", line=line, message=f"TOML syntax error: {message}", file=file)


def _issue_order(issue: ConfigIssue) -> tuple[bool, int]:
    return (issue.line is None, issue.line or 0)


def _check_text(text: str, file: str) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_issue(exc, text, file)]) from None
    except RecursionError:
        raise ConfigError(
            [ConfigIssue("", None, "TOML syntax error: values are nested too deeply", file)]
        ) from None
    scanner = _LineScanner(text)
    scanner.scan()
    checker = _Checker(data, file, scanner)
    config = checker.run()
    if config is None:
        raise ConfigError(sorted(checker.issues, key=_issue_order))
    return config


def loads(text: str, file: str = "<string>") -> Config:
    """Check config ``text`` (named ``file`` in messages); raise ConfigError on any problem."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError([_decode_issue(bytes(text), exc, file)]) from None
    try:
        return _check_text(text, file)
    except ConfigError:
        raise
    except Exception as exc:
        # A bug here must still end in one clear line, never in a traceback at the user.
        raise ConfigError(
            [ConfigIssue("", None, f"internal error while checking the file: {exc!r}", file)]
        ) from exc


def _decode_issue(data: bytes, exc: UnicodeDecodeError, file: str) -> ConfigIssue:
    line = data.count(b"\n", 0, exc.start) + 1
    return ConfigIssue("", line, f"not valid UTF-8 (byte 0x{data[exc.start]:02x})", file)


# A config file is a few KiB; the bound keeps `ringd check -c /dev/zero` (or a
# runaway generated file) from eating the host's memory.
MAX_CONFIG_BYTES = 4 << 20

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of the config file at ``path``: a regular file of at most
    MAX_CONFIG_BYTES; anything else raises ConfigError with one clear line."""
    file = os.fsdecode(path)

    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigIssue("", None, message, file)])

    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise fail(f"cannot read config file: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
            raise fail(f"cannot read config file: it is {kind}, not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_CONFIG_BYTES:   # the size in stat may lie (/proc) or grow
            chunk = os.read(fd, min(1 << 20, MAX_CONFIG_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise fail(f"cannot read config file: larger than {_fmt_size(MAX_CONFIG_BYTES)} "
                       "(is this the right file?)")
        return b"".join(chunks)
    except OSError as exc:
        raise fail(f"cannot read config file: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> Config:
    """Read and check the config file at ``path``; raise ConfigError on any problem."""
    file = os.fsdecode(path)
    data = read_file(file)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError([_decode_issue(data, exc, file)]) from None
    return loads(text, file)
