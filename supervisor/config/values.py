"""Value converters: one raw TOML value in, one checked Python value out.

Each converter takes what ``tomllib`` produced for one key and returns the
value ringd uses (seconds as a float, bytes as an int, a resolved
``Address``), or raises ``Invalid`` with the message a user sees after the
key path. Converters never look at other keys: rules between keys are the
checker's.
"""
from __future__ import annotations

import fractions
import grp
import ipaddress
import os
import pwd
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .issues import quote

BALANCE_METHODS = ("round_robin", "least_conn", "hash", "random")
LOG_FORMATS = ("json", "console", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 1024
MAX_WEIGHT = 256            # a server's weight, in the file and at runtime (ringd server)

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
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


def got(value: Any) -> str:
    """Describe a value for 'expected X, got Y' messages."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        return f"the string {quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def fmt_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def fmt_seconds(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    return f"{seconds:g}s"


class Invalid(Exception):
    """Raised by a value converter; the message goes into a ConfigIssue."""


def parse_duration(text: str) -> float | None:
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


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like '64KiB'; 1024-based units only."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"{_SIZE_HINT}, got {got(value)}")
    if isinstance(value, int):
        if value < 0:
            raise Invalid(f"must not be negative, got {value}")
        return value
    match = _SIZE_RE.fullmatch(value.strip())
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise Invalid(f"{_SIZE_HINT}, got {quote(value)}")
    size = fractions.Fraction(match.group(1)) * _SIZE_UNITS[unit]
    if size.denominator != 1:
        raise Invalid(f"{quote(value)} is not a whole number of bytes")
    return int(size)


# Value converters: take the raw TOML value, return the checked value or raise Invalid.

Converter = Callable[[Any], Any]


def integer(lo: int, hi: int) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer {lo}..{hi}, got {got(value)}")
        if not lo <= value <= hi:
            raise Invalid(f"must be between {lo} and {hi}, got {value}")
        return value

    return convert


def power_of_two(lo: int, hi: int) -> Converter:
    check = integer(lo, hi)

    def convert(value: Any) -> int:
        value = check(value)
        if value & (value - 1):
            raise Invalid(f"must be a power of two between {lo} and {hi}, got {value}")
        return value

    return convert


def size(lo: int, hi: int, *, power_of_two: bool = False, zero: str | None = None) -> Converter:
    """A size in lo..hi; with `zero` (what 0 means), 0 is accepted too."""
    def convert(value: Any) -> int:
        size = parse_size(value)
        if size == 0 and zero is not None:
            return 0
        shown = quote(value) if isinstance(value, str) else str(value)
        if power_of_two and (size < lo or size > hi or size & (size - 1)):
            raise Invalid(
                f"must be a power of two between {fmt_size(lo)} and {fmt_size(hi)}, got {shown}"
            )
        if not lo <= size <= hi:
            also = f"0 ({zero}) or " if zero is not None else ""
            raise Invalid(f"must be {also}between {fmt_size(lo)} and {fmt_size(hi)}, got {shown}")
        return size

    return convert


# SO_RCVBUF / SO_SNDBUF (the kernel doubles the value and caps it at
# net.core.rmem_max / wmem_max) and TCP_NOTSENT_LOWAT; 0 leaves it to the kernel
socket_buffer = size(4096, 1 << 30, zero="the kernel's autotuning")
notsent_lowat = size(4096, 1 << 30, zero="the kernel's default")


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {got(value)}")
    return value


def duration(*, allow_zero: bool) -> Converter:
    def convert(value: Any) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise Invalid(f'{_DURATION_HINT}, got the number {value} (write "{value}s"?)')
        if not isinstance(value, str):
            raise Invalid(f"{_DURATION_HINT}, got {got(value)}")
        seconds = parse_duration(value)
        if seconds is None:
            raise Invalid(f"{_DURATION_HINT}, got {quote(value)}")
        if seconds == 0 and not allow_zero:
            raise Invalid(f"must be greater than 0, got {quote(value)}")
        if seconds > _MAX_DURATION:
            raise Invalid(f"must be at most {fmt_seconds(_MAX_DURATION)}, got {quote(value)}")
        return seconds

    return convert


def choice(options: tuple[str, ...]) -> Converter:
    listed = ", ".join(f'"{o}"' for o in options)

    def convert(value: Any) -> str:
        if not isinstance(value, str) or value not in options:
            shown = got(value) if not isinstance(value, str) else quote(value)
            raise Invalid(f"expected one of {listed}, got {shown}")
        return value

    return convert


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {got(value)}")
    if not value:
        raise Invalid("must not be empty")
    return value


def name(value: Any) -> str:
    """A name for logs and metrics (listeners)."""
    value = string(value)
    if not NAME_RE.fullmatch(value):
        raise Invalid(f"invalid name {quote(value)}: use 1 to 64 of A-Z a-z 0-9 _ . -")
    return value


def file_path(value: Any) -> str:
    value = string(value)
    if "\0" in value:
        raise Invalid("must not contain a NUL character")
    return value


def socket_path(value: Any) -> str:
    value = file_path(value)
    try:
        length = len(os.fsencode(value))
    except UnicodeError:
        raise Invalid(f"{quote(value)} cannot be encoded as a file name") from None
    if length > _SUN_PATH_MAX:
        raise Invalid(
            f"a unix socket path can be at most {_SUN_PATH_MAX} bytes, this one has {length}"
        )
    return value


def bytes_string(value: Any) -> bytes:
    return string(value).encode("utf-8")


def regex(value: Any) -> str:
    value = string(value)
    try:
        re.compile(value.encode("utf-8"))
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise Invalid(f"invalid regular expression {quote(value)}: {exc}") from None
    return value


def _account(lookup: Callable[[str], Any], what: str) -> Converter:
    """A user or group name that exists on this host."""
    def convert(value: Any) -> str:
        value = string(value)
        try:
            lookup(value)
        except (KeyError, ValueError):
            raise Invalid(f"no such {what} {quote(value)}") from None
        return value

    return convert


user = _account(pwd.getpwnam, "user")
group = _account(grp.getgrnam, "group")


def cpu_count() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_WORKERS))


def workers(value: Any) -> tuple[int, bool]:
    if value == "auto" and isinstance(value, str):
        return cpu_count(), True
    if isinstance(value, int) and not isinstance(value, bool):
        if 1 <= value <= MAX_WORKERS:
            return value, False
        raise Invalid(f"must be between 1 and {MAX_WORKERS}, got {value}")
    raise Invalid(f'expected "auto" or an integer 1..{MAX_WORKERS}, got {got(value)}')


def sqpoll(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    raise Invalid(f'expected true, false or "auto", got {got(value)}')


def proxy_protocol(value: Any) -> str | None:
    if value is False:
        return None
    if value in ("v1", "v2") and isinstance(value, str):
        return value
    raise Invalid(f'expected false, "v1" or "v2", got {got(value)}')


def split_address(text: str) -> tuple[str, int]:
    """'host:port', '[v6]:port' or '*:port' -> (host, port); raises Invalid."""
    bad = f"invalid address {quote(text)}"
    if not text:
        raise Invalid("invalid address: empty string")
    if any(ch.isspace() for ch in text):
        raise Invalid(f"{bad}: contains whitespace")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise Invalid(f"{bad}: unbalanced brackets")
        host, rest = text[1:end], text[end + 1 :]
        if "[" in host or "]" in rest or "[" in rest:
            raise Invalid(f"{bad}: unbalanced brackets")
        if not rest:
            raise Invalid(f'{bad}: missing port (write "[{host}]:PORT")')
        if not rest.startswith(":"):
            raise Invalid(f'{bad}: expected ":PORT" after "]"')
        port_text = rest[1:]
        if not host:
            raise Invalid(f"{bad}: empty host")
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise Invalid(f"{bad}: brackets are only for IPv6 addresses") from None
    else:
        if "[" in text or "]" in text:
            raise Invalid(f"{bad}: unbalanced brackets")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise Invalid(f'{bad}: missing port (write "{text}:PORT")')
        if ":" in host:
            raise Invalid(f'{bad}: write IPv6 addresses in brackets, like "[::1]:8080"')
        if not host:
            raise Invalid(f'{bad}: empty host (write "*:{port_text}" for all addresses)')
    if not port_text:
        raise Invalid(f"{bad}: missing port")
    if not port_text.isascii() or not port_text.isdigit():
        raise Invalid(f"{bad}: port {quote(port_text)} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise Invalid(f"{bad}: port {port} is out of range 1..65535")
    return host, port


class Resolver:
    """Host names to addresses, each (host, port) looked up once per load."""

    def __init__(self) -> None:
        self._resolved: dict[tuple[str, int], tuple[str, int]] = {}

    def __call__(self, host: str, port: int) -> tuple[str, int]:
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
            raise Invalid(f"cannot resolve {quote(host)}: {exc.strerror or exc}") from None
        except (OSError, UnicodeError, ValueError) as exc:
            raise Invalid(f"cannot resolve {quote(host)}: {exc}") from None
        for info_family, _type, _proto, _name, sockaddr in infos:
            if info_family in (socket.AF_INET, socket.AF_INET6):
                result = (str(sockaddr[0]), int(info_family))
                self._resolved[(host, port)] = result
                return result
        raise Invalid(f"cannot resolve {quote(host)}: no IPv4 or IPv6 address")


class address:  # noqa: N801 - used like the other converter factories
    """Converter of "host:port" to an Address; host names go through the
    loader's Resolver (the checker passes it), so a load resolves each once."""

    def __init__(self, *, wildcard: bool) -> None:
        self.wildcard = wildcard   # "*:PORT" allowed (listen addresses)

    def __call__(self, value: Any, resolve: Callable[[str, int], tuple[str, int]] | None = None
                 ) -> Address:
        if not isinstance(value, str):
            raise Invalid(f'expected an address like "127.0.0.1:8080", got {got(value)}')
        host, port = split_address(value)
        if host == "*":
            if not self.wildcard:
                raise Invalid(f'invalid address {quote(value)}: "*" is only valid for listen')
            host = "0.0.0.0"
        ip, family = (resolve or Resolver())(host, port)
        return Address(host=host, port=port, ip=ip, family=family)


def cidr(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A network as "10.0.0.0/8" or "2001:db8::/32", or one address ("192.0.2.7" is
    192.0.2.7/32). Host bits must be zero: "10.1.2.3/8" is a typo more often
    than a wish, so it is refused with the network it would mean."""
    if not isinstance(value, str):
        raise Invalid(f'expected a network like "10.0.0.0/8" or an address, got {got(value)}')
    text = value.strip()
    if not text or any(ch.isspace() for ch in text):
        raise Invalid(f'invalid network {quote(value)}: write it like "10.0.0.0/8" or "::1"')
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise Invalid(f"invalid network {quote(value)}: {exc}") from None
        raise Invalid(f"{quote(value)} has host bits set (the network is {quote(str(loose))})") \
            from None


def cidr_list(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """An array of networks (see ``cidr``); the element at fault is named."""
    if not isinstance(value, list):
        raise Invalid(f'expected an array of networks like ["10.0.0.0/8"], got {got(value)}')
    found = []
    for index, item in enumerate(value):
        try:
            found.append(cidr(item))
        except Invalid as exc:
            raise Invalid(f"[{index}]: {exc}") from None
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``count`` new connections per ``seconds`` (a sliding window)."""

    count: int
    seconds: int

    def __str__(self) -> str:
        return f"{self.count}/{ {1: 's', 60: 'm', 3600: 'h'}[self.seconds] }"


_RATE_RE = re.compile(r"([0-9]+)\s*/\s*([smh])")
_RATE_UNITS = {"s": 1, "m": 60, "h": 3600}
_RATE_HINT = 'expected a rate like "50/s", "600/m" or "" (no limit)'


def rate(value: Any) -> Rate | None:
    """A rate "N/s", "N/m" or "N/h"; "" = no limit."""
    if not isinstance(value, str):
        raise Invalid(f"{_RATE_HINT}, got {got(value)}")
    if not value.strip():
        return None
    match = _RATE_RE.fullmatch(value.strip())
    if match is None:
        raise Invalid(f"{_RATE_HINT}, got {quote(value)}")
    count = int(match.group(1))
    if not 1 <= count <= 1_000_000:
        raise Invalid(f"the count must be between 1 and 1000000, got {quote(value)}")
    return Rate(count, _RATE_UNITS[match.group(2)])


# An SNI pattern: "example.com" or "*.example.com" (any name below it). The
# name part follows the rules of the data path's parser (ringd_tls_name_normalize).
_LABEL_RE = re.compile(r"[a-z0-9_-]{1,63}")


def sni_name(value: Any) -> str:
    """One server name of a route, normalised: lower case, no trailing dot."""
    if not isinstance(value, str):
        raise Invalid(f'expected a server name like "api.example.com", got {got(value)}')
    text = value.lower()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    if "*" in rest:
        raise Invalid(f'invalid server name {quote(value)}: "*" is allowed only as a whole '
                      f'first label ("*.example.com")')
    labels = rest.split(".")
    if not rest or len(rest) > 253 or not all(_LABEL_RE.fullmatch(lb) for lb in labels):
        raise Invalid(f"invalid server name {quote(value)}: labels of 1 to 63 of a-z 0-9 _ -, "
                      f"at most 253 bytes")
    return text


def sni_list(value: Any) -> tuple[str, ...]:
    """A non-empty array of server names (see ``sni_name``)."""
    if not isinstance(value, list):
        raise Invalid(f'expected an array of server names, got {got(value)}')
    if not value:
        raise Invalid("must list at least one server name")
    found = []
    for index, item in enumerate(value):
        try:
            found.append(sni_name(item))
        except Invalid as exc:
            raise Invalid(f"[{index}]: {exc}") from None
    return tuple(found)
