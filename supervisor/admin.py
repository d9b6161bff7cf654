"""The admin HTTP listener ([admin] listen): /metrics, /healthz, /status.

A deliberately small HTTP/1.1 server on the master's asyncio loop: one request
per connection, bounded request size, bounded time, bounded number of clients,
so a slow or hostile scraper can never stall the master.

Fairness: the number of clients is bounded, but a new client is never turned
away for that. When all places are taken, the client that has waited longest
without sending a complete request goes (from the address that holds the most
places first): a local user who opens hundreds of idle connections only
evicts their own, and a health probe, which sends its request at once, gets
its answer. A request head must arrive within HEADER_TIMEOUT.
"""
from __future__ import annotations

import asyncio
import fcntl
import json
import socket
import termios
import time
from collections import Counter
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import log
from .component import Component
from .control import close_server
from .metrics import Totals, make_registry

MAX_HEADER = 8192
HEADER_TIMEOUT = 2.0        # the whole request head, from the connect on
TIMEOUT = 5.0               # sending the reply
MAX_CLIENTS = 64
EVICT_LOG_EVERY = 10.0      # seconds between two admin_clients_evicted events


@dataclass(eq=False)
class _Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str
    since: float
    replying: bool = False

    def has_bytes(self) -> bool:
        """Has part of a request arrived (read by asyncio or still in the
        socket)? Such a client is about to be served, not idle."""
        if getattr(self.reader, "_buffer", None):
            return True
        sock = self.writer.get_extra_info("socket")
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
        except (OSError, AttributeError, ValueError):
            return False
        return int.from_bytes(raw, "little") > 0


def bind_admin(addr) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr.sockaddr)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Admin(Component):
    """Metrics totals, the HTTP listener, and what they need from the master."""

    def __init__(self, master):
        self.master = master
        self.log = log.get()
        self.totals = Totals()
        self.registry = make_registry(master, self.totals)
        self.server: asyncio.AbstractServer | None = None
        self.sock: socket.socket | None = None
        self.addr = None
        self._clients: list[_Client] = []        # in arrival order
        self.evicted = 0
        self._evicted_unlogged = 0
        self._evict_logged_at = 0.0
        self.registry.register(_AdminCollector(self))

    def fold_generation(self, gen) -> None:
        self.totals.fold(gen)

    # ringd upgrade: the counters of retired generations, and the listening
    # socket (its queue survives the exec)
    state_key = "admin"

    def export_state(self) -> tuple[dict, dict[str, int]]:
        fds = {"listen": self.sock.fileno()} if self.sock is not None else {}
        return {"totals": self.totals.to_json(), "evicted": self.evicted}, fds

    def import_state(self, state: dict, fds: dict[str, int]) -> None:
        self.totals.add(Totals.from_json(state.get("totals", {})))
        self.evicted = int(state.get("evicted", 0))
        fd = fds.get("listen")
        if fd is None:
            return
        addr = self.master.config.admin.listen
        sock = socket.socket(fileno=fd)
        name = sock.getsockname()
        if addr is None or (name[0], name[1]) != (addr.ip, addr.port):
            sock.close()            # the config it was bound for is gone: bind() decides
            return
        self.sock, self.addr = sock, addr

    def bind(self, addr) -> None:
        """Bind before anything is forked (raises OSError with a clear errno);
        a socket adopted across ringd upgrade for this address is kept."""
        if self.sock is not None and addr == self.addr:
            return
        self.sock = bind_admin(addr) if addr is not None else None
        self.addr = addr

    async def start(self) -> None:
        if self.sock is not None:
            self.server = await asyncio.start_server(self._client, sock=self.sock,
                                                     limit=MAX_HEADER)
            self.log.info("admin_listen", address=str(self.addr))

    async def stop(self) -> None:
        if self.server is not None:
            await close_server(self.server)
            self.server = None
            self.sock = None

    def prebind(self, addr):
        """Reload, step 1: bind a changed [admin] listen (raises OSError, and
        the reload is rejected). Returns what switch() needs."""
        if addr == self.addr:
            return None
        return (addr, bind_admin(addr) if addr is not None else None)

    async def switch(self, prepared) -> None:
        """Reload, step 2 (the new generation runs): move to the new socket."""
        if prepared is None:
            return
        await self.stop()
        if self.sock is not None:
            self.sock.close()
        self.addr, self.sock = prepared
        await self.start()

    @staticmethod
    def discard(prepared) -> None:
        if prepared is not None and prepared[1] is not None:
            prepared[1].close()

    # http
    def healthy(self) -> bool:
        gen = self.master.active
        if gen is None or self.master.stopping or not self.master.lameduck.healthy():
            return False
        return all(w is not None and w.state == "ready" for w in gen.workers)

    def _evict_one(self) -> None:
        """Make room: the longest-waiting client that has sent nothing of a
        request yet, from the address holding the most places; then one whose
        request is still incomplete; only if every place is replying, the
        oldest of those (a reader too slow to take its reply)."""
        waiting = [c for c in self._clients if not c.replying]
        # one whose request is arriving (bytes in its buffer) is not idle: a
        # probe accepted behind a burst of idle connections must not lose its
        # place before the loop gets to read its request
        waiting = [c for c in waiting if not c.has_bytes()] or waiting or self._clients
        per_address = Counter(c.address for c in self._clients)
        most = max(per_address[c.address] for c in waiting)
        victim = next(c for c in waiting if per_address[c.address] == most)   # oldest first
        self._clients.remove(victim)
        victim.writer.transport.abort()     # its handler sees the reset and ends
        self.evicted += 1
        self._evicted_unlogged += 1
        now = time.monotonic()
        if now - self._evict_logged_at >= EVICT_LOG_EVERY:
            self.log.warning("admin_clients_evicted", count=self._evicted_unlogged,
                             address=victim.address, clients=MAX_CLIENTS,
                             hint="more admin clients than places: the ones waiting longest "
                                  "without a request are dropped")
            self._evict_logged_at = now
            self._evicted_unlogged = 0

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        me = _Client(reader, writer, str(peer[0]) if peer else "?", time.monotonic())
        if len(self._clients) >= MAX_CLIENTS:
            self._evict_one()
        self._clients.append(me)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEADER_TIMEOUT)
            me.replying = True
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._send(writer, 400, b"bad request\n")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            self.log.debug("admin_request", method=method[:16], path=target[:128],
                           address=me.address)
            if method not in ("GET", "HEAD"):
                await self._send(writer, 405, b"method not allowed\n")
                return
            if target == "/metrics":
                body = generate_latest(self.registry)
                await self._send(writer, 200, body, CONTENT_TYPE_LATEST, head_only=method == "HEAD")
            elif target == "/healthz":
                ok = self.healthy()
                why = b"draining\n" if self.master.lameduck.state != "serving" else b"unhealthy\n"
                await self._send(writer, 200 if ok else 503, b"ok\n" if ok else why,
                                 head_only=method == "HEAD")
            elif target == "/status":
                body = json.dumps(self.master.status(), indent=2).encode() + b"\n"
                await self._send(writer, 200, body, "application/json", head_only=method == "HEAD")
            else:
                await self._send(writer, 404, b"not found: try /metrics, /healthz, /status\n")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, OSError, UnicodeDecodeError):
            pass
        finally:
            if me in self._clients:
                self._clients.remove(me)
            writer.close()

    async def _send(self, writer, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                    head_only: bool = False) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable"}[code]
        hdr = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        writer.write(hdr if head_only else hdr + body)
        await asyncio.wait_for(writer.drain(), TIMEOUT)


class _AdminCollector:
    """The admin endpoint's own counters, next to the master's metrics."""

    def __init__(self, admin: Admin):
        self.admin = admin

    def collect(self):
        c = CounterMetricFamily("ringd_admin_clients_evicted",
                                "Admin clients dropped to make room for a new one")
        c.add_metric([], self.admin.evicted)
        yield c
        g = GaugeMetricFamily("ringd_admin_clients", "Open admin connections")
        g.add_metric([], len(self.admin._clients))
        yield g
