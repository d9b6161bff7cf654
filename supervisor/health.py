"""Active health checks: probes, and one check loop per checked server.

One ``HealthChecker`` lives in the master. It runs the checks the active
config asks for and reports every verdict to the server registry
(ringd.servers), which keeps the records and publishes the states to the
workers.

Checks run in the master's asyncio loop, one task per server (not one per
worker): a TCP connect, optionally followed by ``send`` and a reply that must
start with ``expect`` or match ``expect_regex``, all within ``timeout``, every
``interval``. ``fall`` consecutive failures take a server down, ``rise``
consecutive successes bring it back. A server starts UP but unconfirmed (as in
HAProxy): until its first check completes a single failure is enough, so a
server that is dead at start-up is out after one check, not after ``fall``.
A successful check also clears the workers' passive-down mark.

Rules for the master loop: no threads, and nothing that resolves names. The
config already resolved every server to ``address.ip``; connects here are
done by hand on a non-blocking socket, so asyncio's resolver (which runs in a
thread pool executor) is never involved.
"""
from __future__ import annotations

import asyncio
import errno
import os
import random
import re
import socket
import struct
import time
from dataclasses import dataclass

from . import log
from .component import Component
from .config import HealthCheck
from .servers import Key, ServerRecord, ServerRegistry
from .states import Health

__all__ = ["CheckFailed", "CheckSpec", "HealthChecker", "probe"]

REPLY_LIMIT = 16384         # expect_regex: give up (unexpected reply) past this many bytes
STOP_TIMEOUT = 2.0


# --------------------------------------------------------------------------- one check


@dataclass(frozen=True)
class CheckSpec:
    """What one server's check loop does; a change restarts the loop."""

    ip: str
    family: int
    port: int
    hc: HealthCheck
    proxy: int = 0      # PROXY header before the check: 0 none, 1 v1, 2 v2

    @property
    def sockaddr(self) -> tuple:
        if self.family == socket.AF_INET6:
            return (self.ip, self.port, 0, 0)
        return (self.ip, self.port)


class CheckFailed(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason, detail)
        self.reason = reason        # short, for logs: "connect refused", "timeout", ...
        self.detail = detail


def _errname(err: int) -> str:
    return f"{errno.errorcode.get(err, err)}: {os.strerror(err)}"


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple) -> None:
    """Non-blocking connect to a literal address (no resolver, no executor)."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
        fut = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err == errno.ECONNREFUSED:
        raise CheckFailed("connect refused", _errname(err))
    if err:
        raise CheckFailed("connect error", _errname(err))


# The PROXY protocol's headers for a connection the proxy opens itself (a
# health check): v1 "UNKNOWN", v2 command LOCAL; a receiver then takes the
# connection's own addresses.
PROXY_V1_CHECK = b"PROXY UNKNOWN\r\n"
PROXY_V2_CHECK = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])


def _check_proxy(up) -> int:
    """Like HAProxy: checks carry the PROXY header when the upstream's traffic
    does and the check goes to the traffic port; `send_proxy` overrides."""
    send = up.health.send_proxy
    if send is None:
        send = up.health.port is None
    return up.proxy_version if send else 0


def _shown(data: bytes, limit: int = 64) -> str:
    text = repr(data[:limit])
    return text + ("..." if len(data) > limit else "")


async def _expect(loop, sock: socket.socket, hc: HealthCheck, regex, buf: bytearray) -> None:
    """Read until the reply matches; what arrived is kept in `buf` (the
    caller reports it when the time-out cuts this short)."""
    while True:
        try:
            data = await loop.sock_recv(sock, 4096)
        except OSError as e:
            raise CheckFailed("connection reset", _errname(e.errno or 0)) from None
        if not data:
            if buf:
                raise CheckFailed("unexpected reply", f"closed after {_shown(bytes(buf))}")
            raise CheckFailed("connection closed", "closed without a reply")
        buf += data
        if hc.expect is not None:
            if len(buf) >= len(hc.expect):
                if buf.startswith(hc.expect):
                    return
                raise CheckFailed("unexpected reply", f"got {_shown(bytes(buf))}")
            if not hc.expect.startswith(buf):
                raise CheckFailed("unexpected reply", f"got {_shown(bytes(buf))}")
        else:
            if regex.search(buf):
                return
            if len(buf) >= REPLY_LIMIT:
                raise CheckFailed("unexpected reply",
                                  f"no match in {len(buf)} bytes: {_shown(bytes(buf))}")


async def probe(spec: CheckSpec, regex=None) -> float:
    """Run one check; returns its latency in seconds or raises CheckFailed."""
    loop = asyncio.get_running_loop()
    hc = spec.hc
    if hc.expect_regex is not None and regex is None:
        regex = re.compile(hc.expect_regex.encode("utf-8"))
    phase = ["connect"]
    reply = bytearray()
    try:
        sock = socket.socket(spec.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
    except OSError as e:
        raise CheckFailed("socket error", _errname(e.errno or 0)) from None

    async def run() -> None:
        await _connect(loop, sock, spec.sockaddr)
        header = {0: b"", 1: PROXY_V1_CHECK, 2: PROXY_V2_CHECK}[spec.proxy]
        if header or hc.send:
            phase[0] = "send"
            try:
                await loop.sock_sendall(sock, header + (hc.send or b""))
            except OSError as e:
                raise CheckFailed("connection reset", _errname(e.errno or 0)) from None
        if hc.expect is not None or hc.expect_regex is not None:
            phase[0] = "reply"
            await _expect(loop, sock, hc, regex, reply)

    t0 = loop.time()
    try:
        await asyncio.wait_for(run(), hc.timeout)
        return loop.time() - t0
    except asyncio.TimeoutError:
        if reply:
            # it did answer, just not what we expect (a regex can only give
            # up on a stream when the time is out)
            raise CheckFailed("unexpected reply", f"no match within {hc.timeout:g}s, "
                                                  f"got {_shown(bytes(reply))}") from None
        what = {"connect": "connect", "send": "send", "reply": "expected reply"}[phase[0]]
        raise CheckFailed("timeout", f"no {what} within {hc.timeout:g}s") from None
    finally:
        try:
            # close with a reset: a checker should leave no TIME_WAIT behind
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()


# --------------------------------------------------------------------------- checker


class HealthChecker(Component):
    """The master component that runs the check loops of the active config
    and reports their verdicts to the server registry (ringd.servers)."""

    def __init__(self, master, servers: ServerRegistry):
        self.master = master
        self.servers = servers
        self.log = log.get()
        self._tasks: dict[Key, tuple[CheckSpec, asyncio.Task]] = {}
        self._running = False

    # ------------------------------------------------------------ lifecycle hooks

    async def start(self) -> None:
        self._running = True
        self._reconcile()

    async def stop(self) -> None:
        self._running = False
        tasks = [t for _, t in self._tasks.values()]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    def on_generation(self, new_gen, old_gen) -> None:
        """A reload activated `new_gen`: checks follow its config (the
        registry has adopted it already)."""
        self._reconcile()

    def fold_generation(self, gen) -> None:
        """`gen` was dropped: stop checking servers the registry forgot."""
        for key in [k for k in self._tasks if k not in self.servers.records]:
            self._tasks.pop(key)[1].cancel()

    # ------------------------------------------------------------ check loops

    def _wanted(self) -> dict[Key, CheckSpec]:
        gen = self.master.active
        if gen is None:
            return {}
        out = {}
        for up in gen.config.upstreams:
            if up.health is None:
                continue
            for srv in up.servers:
                if srv.down:
                    continue        # administratively off in the file: not checked
                out[(up.name, srv.name)] = CheckSpec(srv.address.ip, srv.address.family,
                                                     up.health.port or srv.address.port,
                                                     up.health, _check_proxy(up))
        return out

    def _reconcile(self) -> None:
        """Make the running check loops match the active config."""
        if not self._running:
            return
        wanted = self._wanted()
        for key, (spec, task) in list(self._tasks.items()):
            if wanted.get(key) != spec:
                task.cancel()
                del self._tasks[key]
        for key, rec in self.servers.records.items():
            if key in wanted:
                if key not in self._tasks:
                    if not rec.checks_enabled:
                        # checks (re)start: the first verdict decides at once
                        rec.confirmed = False
                        rec.successes = rec.failures = 0
                    rec.checks_enabled = True
                    task = asyncio.ensure_future(self._check_loop(rec, wanted[key]))
                    self._tasks[key] = (wanted[key], task)
            else:
                rec.checks_enabled = False
                rec.successes = rec.failures = 0
                active = self.servers.in_generation(key, self.master.active)
                if rec.health is Health.DOWN and active:
                    # in the running config without checks (no [health] table,
                    # or `down = true`): nothing would ever bring it back.
                    # Servers only old generations still have keep their state.
                    self.servers.set_health(rec, Health.UP, "active checks disabled", "")

    async def _check_loop(self, rec: ServerRecord, spec: CheckSpec) -> None:
        loop = asyncio.get_running_loop()
        hc = spec.hc
        regex = re.compile(hc.expect_regex.encode("utf-8")) if hc.expect_regex else None
        # spread the first checks of many servers over one interval
        await asyncio.sleep(random.uniform(0, hc.interval))
        while True:
            started = loop.time()
            try:
                latency = await probe(spec, regex)
            except CheckFailed as e:
                self._check_done(rec, spec, False, e.reason, e.detail, loop.time() - started)
            except asyncio.CancelledError:
                raise
            except Exception as e:      # a bug here must not stop checking
                self.log.exception("health_check_error", upstream=rec.upstream,
                                   server=rec.name, error=repr(e))
            else:
                self._check_done(rec, spec, True, "", "", latency)
            await asyncio.sleep(max(0.0, started + hc.interval - loop.time()))

    def _check_done(self, rec: ServerRecord, spec: CheckSpec, ok: bool, reason: str,
                    detail: str, latency: float) -> None:
        if self.servers.records.get(rec.key) is not rec:
            return              # forgotten meanwhile
        hc = spec.hc
        rec.checks += 1
        rec.last_check = time.time()
        rec.last_latency = latency
        first = not rec.confirmed
        rec.confirmed = True
        if ok:
            rec.failures = 0
            rec.successes += 1
            if self.servers.clear_passive(rec):
                self.servers.counts["passive_clear"] += 1
                self.log.info("server_up", upstream=rec.upstream, server=rec.name,
                              reason="active check passed", cleared="passive down",
                              latency_ms=round(latency * 1000, 3))
            if rec.health is Health.DOWN and rec.successes >= hc.rise:
                self.servers.set_health(rec, Health.UP, f"{rec.successes} checks passed", "",
                                        latency=latency)
            return
        rec.checks_failed += 1
        rec.successes = 0
        rec.failures += 1
        rec.last_error = f"{reason}: {detail}" if detail else reason
        need = 1 if first else hc.fall
        if rec.health is Health.UP and rec.failures >= need:
            self.servers.set_health(rec, Health.DOWN, reason, detail, first=first)
