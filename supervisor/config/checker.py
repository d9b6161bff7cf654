"""The checker: walks the parsed document with the model, and applies the
rules that span keys.

Each table is read field by field from its model class (ringd.config.model):
unknown keys are reported with the nearest known one, required keys when
missing, and each present key goes through its converter. What the model
cannot say for one key alone is here: names and addresses that must be
unique, listeners that must name an upstream (and upstreams that must be
used), the admin address against the listeners, files ringd creates that
must differ, respawn_delay_max against respawn_delay, expect against
expect_regex, and upstreams whose servers are all backups. Every problem is
collected, not only the first.
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

from . import model as m
from . import values as v
from .issues import ConfigIssue, Path, format_path, quote
from .model import AdminSettings, Config, HealthCheck, Listener, RingdSettings, RingSettings, \
    Route, Server, Upstream
from .scanner import LineScanner
from .values import Address, Invalid, got


class Checker:
    """Walks the parsed document, collecting issues instead of stopping at the first."""

    def __init__(self, data: dict[str, Any], file: str, scanner: LineScanner) -> None:
        self.data = data
        self.file = file
        self.scanner = scanner
        self.issues: list[ConfigIssue] = []
        self.resolve = v.Resolver()

    # -- reporting

    def error(self, path: Path, message: str) -> None:
        self.issues.append(
            ConfigIssue(
                path=format_path(path),
                line=self.scanner.find(path),
                message=message,
                file=self.file,
            )
        )

    def table(self, value: Any, path: Path, expected: str = "a table") -> dict[str, Any] | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"expected {expected}, got {got(value)}")
        return None

    def known_keys(self, table: dict[str, Any], path: Path, cls: type) -> None:
        """Report every key of ``table`` that the model class ``cls`` does not have."""
        keys = m.keys(cls)
        for key in table:
            if key in keys:
                continue
            close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            self.error(path + (key,), f"unknown key{hint}")

    # -- getting values

    def convert(self, convert: v.Converter, value: Any) -> Any:
        if isinstance(convert, v.address):
            return convert(value, self.resolve)
        return convert(value)

    def take(
        self, table: dict[str, Any], path: Path, key: str, convert: v.Converter, into: dict[str, Any]
    ) -> None:
        """If ``key`` is present and valid, store its converted value in ``into``."""
        if key not in table:
            return
        try:
            into[key] = self.convert(convert, table[key])
        except Invalid as exc:
            self.error(path + (key,), str(exc))

    def require(self, table: dict[str, Any], path: Path, key: str, convert: v.Converter) -> Any:
        """The converted value of a required key, or None after reporting why not."""
        if key not in table:
            self.error(path + (key,), "missing required key")
            return None
        try:
            return self.convert(convert, table[key])
        except Invalid as exc:
            self.error(path + (key,), str(exc))
            return None

    def required(self, cls: type, table: dict[str, Any], path: Path) -> dict[str, Any]:
        """The required keys of ``cls``: name -> converted value, or None if
        missing or invalid (reported)."""
        return {f.name: self.require(table, path, f.name, f.metadata["convert"])
                for f in m.key_fields(cls) if f.metadata["required"]}

    def optional(self, cls: type, table: dict[str, Any], path: Path) -> dict[str, Any]:
        """The optional plain keys of ``cls`` present in ``table``, converted
        (tables and arrays of tables, which have no converter, are left out)."""
        found: dict[str, Any] = {}
        for f in m.key_fields(cls):
            if not f.metadata["required"] and f.metadata["convert"] is not None:
                self.take(table, path, f.name, f.metadata["convert"], found)
        return found

    # -- sections

    def run(self) -> Config | None:
        data = self.data
        self.known_keys(data, (), Config)
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
        self.known_keys(table, path, RingdSettings)
        found = self.optional(RingdSettings, table, path)
        workers, auto = found.pop("workers", None) or (v.cpu_count(), True)
        settings = RingdSettings(workers=workers, workers_auto=auto, **found)
        self.distinct_files(path, table, settings, ("pidfile", "control_socket", "log_file"))
        if settings.respawn_delay_max < settings.respawn_delay:
            key = "respawn_delay_max" if "respawn_delay_max" in table else "respawn_delay"
            self.error(
                path + (key,),
                f"respawn_delay_max ({v.fmt_seconds(settings.respawn_delay_max)}) must not be "
                f"smaller than respawn_delay ({v.fmt_seconds(settings.respawn_delay)})",
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
                       f"{quote(value)} is also ringd.{first} ({at}); they must be different files")

    def ring(self, raw: Any) -> RingSettings:
        path: Path = ("ring",)
        table = self.table(raw, path) or {}
        self.known_keys(table, path, RingSettings)
        return RingSettings(**self.optional(RingSettings, table, path))

    def admin(self, raw: Any) -> AdminSettings:
        path: Path = ("admin",)
        table = self.table(raw, path) or {}
        self.known_keys(table, path, AdminSettings)
        return AdminSettings(**self.optional(AdminSettings, table, path))

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
            if not v.NAME_RE.fullmatch(name):
                self.error(upath, f"invalid upstream name {quote(name)}: use 1 to 64 of A-Z a-z 0-9 _ . -")
            body = self.table(body, upath, f"a table ([upstream.{format_path((name,))}])")
            upstream = self.upstream(name, body, upath) if body is not None else None
            result[name] = upstream if len(self.issues) == before else None
        return result

    def upstream(self, name: str, table: dict[str, Any], path: Path) -> Upstream:
        self.known_keys(table, path, Upstream)
        found = self.optional(Upstream, table, path)
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
            self.error(path, f"expected a non-empty array of servers, got {got(raw)}")
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
                    f"duplicate server {quote(server.name)} (also servers[{seen[server.name]}])",
                )
                continue
            seen[server.name] = index
            servers.append(server)
        if len(servers) == len(raw) and all(s.backup for s in servers):
            self.error(path, "every server is a backup: at least one must not be")
        return tuple(servers)

    def server(self, item: Any, path: Path) -> Server | None:
        if isinstance(item, str):
            try:
                return Server(address=self.convert(m.converter(Server, "address"), item), name=item)
            except Invalid as exc:
                self.error(path, str(exc))
                return None
        if not isinstance(item, dict):
            self.error(
                path,
                f'expected an address string or a table like {{address = "host:port"}}, got {got(item)}',
            )
            return None
        before = len(self.issues)
        self.known_keys(item, path, Server)
        address = self.required(Server, item, path)["address"]
        found = self.optional(Server, item, path)
        if len(self.issues) != before or address is None:
            return None
        return Server(address=address, name=item["address"], **found)

    def health(self, table: dict[str, Any], path: Path) -> HealthCheck:
        self.known_keys(table, path, HealthCheck)
        found = self.optional(HealthCheck, table, path)
        if "expect" in table and "expect_regex" in table:
            self.error(path + ("expect_regex",), 'set either "expect" or "expect_regex", not both')
        return HealthCheck(**found)

    def listeners(self, raw: Any, upstreams: dict[str, Upstream | None]) -> list[Listener]:
        path: Path = ("listener",)
        if raw is None:
            self.error(path, "at least one [[listener]] is required")
            return []
        if not isinstance(raw, list):
            self.error(path, f"expected an array of tables ([[listener]]), got {got(raw)}")
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
            self.known_keys(table, lpath, Listener)
            name, listen = self.required(Listener, table, lpath).values()
            found = self.optional(Listener, table, lpath)
            routes = self.routes(table.get("route"), lpath + ("route",), upstreams, referenced)
            if routes is None:
                references_ok = False
            else:
                found["routes"] = routes
            if "upstream" not in table and routes == ():
                self.error(lpath + ("upstream",), "missing required key (a listener without "
                           "[[listener.route]] needs an upstream)")
            upstream = found.get("upstream")
            if upstream is None:
                references_ok = references_ok and "upstream" not in table
            elif self.known_upstream(upstream, upstreams, lpath + ("upstream",)):
                referenced.add(upstream)
            if found.get("trusted_proxies") and not found.get("accept_proxy", False):
                self.error(lpath + ("trusted_proxies",),
                           "is set but accept_proxy is false: no PROXY header is read, so the "
                           "list would never be checked (set accept_proxy = true or remove it)")
            if name is not None:
                self.unique(names, name, index, lpath + ("name",), lambda first:
                            f"duplicate listener name {quote(name)} (also listener[{first}])")
            if listen is not None:
                self.unique(addresses, (listen.ip, listen.port), index, lpath + ("listen",),
                            lambda first: f"{listen} is already used by listener[{first}]")
            if len(self.issues) == before:
                listeners.append(Listener(name=name, listen=listen, **found))
        if references_ok:
            # An upstream with errors of its own is not also reported as unused.
            for name, upstream in upstreams.items():
                if upstream is not None and name not in referenced:
                    self.error(("upstream", name), "not used by any listener")
        return listeners

    def known_upstream(self, upstream: str, upstreams: dict[str, Upstream | None],
                       path: Path) -> bool:
        if upstream in upstreams:
            return True
        close = difflib.get_close_matches(upstream, list(upstreams), n=1, cutoff=0.6)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        self.error(path, f"no upstream named {quote(upstream)}{hint}")
        return False

    def routes(self, raw: Any, path: Path, upstreams: dict[str, Upstream | None],
               referenced: set[str]) -> tuple[Route, ...] | None:
        """The [[listener.route]] tables of one listener; None if an upstream
        reference could not be read (so unused upstreams are not reported)."""
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.error(path, f"expected an array of tables ([[listener.route]]), got {got(raw)}")
            return None
        routes: list[Route] = []
        names: dict[str, int] = {}
        snis: dict[str, int] = {}
        ok = True
        for index, item in enumerate(raw):
            rpath = path + (index,)
            table = self.table(item, rpath)
            if table is None:
                ok = False
                continue
            before = len(self.issues)
            self.known_keys(table, rpath, Route)
            sni, upstream = self.required(Route, table, rpath).values()
            found = self.optional(Route, table, rpath)
            if upstream is None:
                ok = False
            elif self.known_upstream(upstream, upstreams, rpath + ("upstream",)):
                referenced.add(upstream)
            label = found.pop("name", None) or upstream
            if label is not None:
                key = "name" if "name" in table else "upstream"
                self.unique(names, label, index, rpath + (key,), lambda first:
                            f"route name {quote(label)} is also route[{first}]'s: give each "
                            f"route a distinct name")
            for k, pattern in enumerate(sni or ()):
                self.unique(snis, pattern, index, rpath + ("sni", k), lambda first:
                            f"duplicate server name {quote(pattern)} (also in route[{first}])")
            if len(self.issues) == before:
                routes.append(Route(sni=sni, upstream=upstream, name=label))
        return tuple(routes) if ok else None

    def unique(self, seen: dict, value: Any, index: int, path: Path,
               message: Callable[[int], str]) -> None:
        """Remember where ``value`` first appeared; report it again at ``path``
        with ``message(index of the first)``."""
        if value in seen:
            self.error(path, message(seen[value]))
        else:
            seen[value] = index

    def admin_conflicts(self, admin: Address, listeners: list[Listener]) -> None:
        wildcards = ("0.0.0.0", "::")
        for index, listener in enumerate(listeners):
            other = listener.listen
            if other.port != admin.port:
                continue
            if admin.ip == other.ip or admin.ip in wildcards or other.ip in wildcards:
                self.error(
                    ("admin", "listen"),
                    f"{admin} overlaps listener {quote(listener.name)} on {other}",
                )
                return
