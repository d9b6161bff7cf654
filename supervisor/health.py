"""Active health checks, and the one record per server that decides its state.

One ``HealthChecker`` lives in the master (a ``Master.extras`` component). It
keeps a ``ServerRecord`` per (upstream name, server name) for as long as some
live generation has that server, so health verdicts, admin states and runtime
weights survive reloads. Whatever changes a record ends in ``publish()``,
which computes the effective state (see ringd.states) and writes it into the
shared server table of *every* live generation that has the server, bumping
that generation's state epoch when something changed. Workers read the table
when they pick a server; no Python runs per connection.

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
from collections import Counter
from dataclasses import dataclass, field

from . import log
from .config import MAX_WEIGHT, HealthCheck
from .native import lib
from .states import AdminState, Health, ServerState, Transition, effective_state, transition

__all__ = ["CheckSpec", "HealthChecker", "ServerRecord", "probe"]

# ringd.states must agree with the C header
assert [int(s) for s in (ServerState.UP, ServerState.DOWN, ServerState.DRAIN,
                         ServerState.MAINT)] == [lib.RINGD_SRV_UP, lib.RINGD_SRV_DOWN,
                                                  lib.RINGD_SRV_DRAIN, lib.RINGD_SRV_MAINT]

REPLY_LIMIT = 16384         # expect_regex: give up (unexpected reply) past this many bytes
GEN_WATCH_PERIOD = 0.02     # how often to look for a generation the master just created
STOP_TIMEOUT = 2.0

Key = tuple[str, str]       # (upstream name, server name)


# --------------------------------------------------------------------------- record


@dataclass
class ServerRecord:
    """Everything the master knows about one server, across generations."""

    upstream: str
    name: str
    # --- active health checks
    health: Health = Health.UP
    confirmed: bool = False          # False until a check has completed since checks started
    checks_enabled: bool = False     # the active config has a [health] table for it
    successes: int = 0               # consecutive
    failures: int = 0                # consecutive
    checks: int = 0
    checks_failed: int = 0
    last_check: float | None = None  # wall clock (time.time())
    last_latency: float | None = None   # seconds the last check took
    last_error: str = ""             # last failed check or passive event
    reason: str = "start"            # why `health` is what it is
    last_change: float | None = None # wall clock of the last health change
    downs: int = 0                   # health up -> down (active checks)
    ups: int = 0                     # health down -> up
    passive_downs: int = 0           # workers marked it down (max_fails)
    # --- operator
    admin: AdminState = AdminState.READY
    weight: int | None = None        # runtime weight; None = the config's
    config_down: bool = False        # `down = true` in the active config
    # --- what was published last (None: never)
    state: ServerState | None = None
    transitions: int = 0             # changes of the effective state

    @property
    def key(self) -> Key:
        return (self.upstream, self.name)

    def effective(self, config_down: bool | None = None) -> ServerState:
        down = self.config_down if config_down is None else config_down
        return effective_state(self.health, self.admin, self.weight, down)

    def snapshot(self) -> dict:
        return {
            "upstream": self.upstream,
            "server": self.name,
            "state": self.effective().label,
            "health": self.health.value,
            "admin": "maint (config)" if self.config_down else self.admin.value,
            "weight": self.weight,
            "checks_enabled": self.checks_enabled,
            "confirmed": self.confirmed,
            "consecutive_successes": self.successes,
            "consecutive_failures": self.failures,
            "checks": self.checks,
            "checks_failed": self.checks_failed,
            "last_check": self.last_check,
            "last_latency_ms": None if self.last_latency is None
            else round(self.last_latency * 1000, 3),
            "last_error": self.last_error,
            "reason": self.reason,
            "last_change": self.last_change,
            "downs": self.downs,
            "ups": self.ups,
            "passive_downs": self.passive_downs,
            "transitions": self.transitions,
        }


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


@dataclass
class _GenView:
    gen: object                                    # ringd.master.Generation
    index: dict[Key, tuple[int, bool]] = field(default_factory=dict)   # -> (slot, down)


class HealthChecker:
    """The master component: records, check loops, publishing.

    API for runtime admin commands (all synchronous, call from the master loop):
      lookup("UP/SRV") / record(upstream, server) -> ServerRecord  (KeyError)
      set_admin(upstream, server, "ready" | "drain" | "maint")      -> ServerRecord
      set_weight(upstream, server, N | None)   N in 0..MAX_WEIGHT, None = the config's
      snapshot() -> list of dicts (status), counts -> Counter of transitions
    """

    def __init__(self, master):
        self.master = master
        self.log = log.get()
        self.records: dict[Key, ServerRecord] = {}
        self.counts: Counter = Counter()               # transition name -> times
        self._views: dict[int, _GenView] = {}          # generation number -> view
        self._tasks: dict[Key, tuple[CheckSpec, asyncio.Task]] = {}
        self._watch: asyncio.Task | None = None
        self._running = False

    # ------------------------------------------------------------ lifecycle hooks

    async def start(self) -> None:
        self._running = True
        for gen in list(self.master.generations):
            self.prepare_generation(gen)
        self._reconcile()
        self._watch = asyncio.ensure_future(self._watch_generations())

    async def stop(self) -> None:
        self._running = False
        tasks = [t for _, t in self._tasks.values()]
        if self._watch is not None:
            tasks.append(self._watch)
        self._tasks.clear()
        self._watch = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)

    def prepare_generation(self, gen) -> None:
        """Adopt a generation: create records for its servers and write the
        current states into its table. Idempotent. Best called by the master
        right after it creates the generation and before it forks the
        workers; until then the watcher task adopts new generations within
        GEN_WATCH_PERIOD, and on_generation() at the latest."""
        if gen.number in self._views or gen.state == "done":
            return
        down = {(u.name, s.name): s.down for u in gen.config.upstreams for s in u.servers}
        view = _GenView(gen, {(r.upstream, r.name): (r.index, down[(r.upstream, r.name)])
                              for r in gen.servers})
        self._views[gen.number] = view
        for key, (_, is_down) in view.index.items():
            rec = self.records.get(key)
            if rec is None:
                # config_down of known servers follows the active generation
                # (on_generation), not one that is still starting
                rec = self.records[key] = ServerRecord(*key, config_down=is_down)
            self.publish(rec)

    def on_generation(self, new_gen, old_gen) -> None:
        """A reload activated `new_gen`: checks follow its config."""
        self.prepare_generation(new_gen)
        view = self._views.get(new_gen.number)
        if view is not None:
            for key, (_, is_down) in view.index.items():
                rec = self.records[key]
                if rec.config_down != is_down:
                    rec.config_down = is_down
                    t = self.publish(rec)
                    self.log.info("server_config_down" if is_down else "server_config_up",
                                  upstream=rec.upstream, server=rec.name,
                                  state=rec.state.label if rec.state is not None else None,
                                  transition=t.name if t else None)
        self._reconcile()

    def fold_generation(self, gen) -> None:
        """`gen` is about to be dropped: forget it, and the servers only it had."""
        self._views.pop(gen.number, None)
        still = set()
        for view in self._views.values():
            still.update(view.index)
        for key in list(self.records):
            if key not in still:
                del self.records[key]
                entry = self._tasks.pop(key, None)
                if entry is not None:
                    entry[1].cancel()

    def on_passive_down(self, gen, server_index: int) -> None:
        """A worker of `gen` marked a server down by passive checks (the master
        logs it as server_down reason=passive); count it here."""
        if server_index >= len(gen.servers):
            return
        ref = gen.servers[server_index]
        rec = self.records.get((ref.upstream, ref.name))
        if rec is None:
            return
        fails = 0
        view = self._views.get(gen.number)
        if view is not None:
            fails = int(gen.shm.server(server_index).fail_window_count)
        rec.passive_downs += 1
        rec.last_error = f"passive: {fails} failed connects"
        self.counts["passive_fail"] += 1

    # ------------------------------------------------------------ admin API

    def record(self, upstream: str, server: str) -> ServerRecord:
        return self.records[(upstream, server)]

    def lookup(self, text: str) -> ServerRecord:
        """'UPSTREAM/SERVER' (server as written in the file) -> its record."""
        upstream, sep, server = text.partition("/")
        if not sep:
            raise KeyError(f"expected UPSTREAM/SERVER, got {text!r}")
        try:
            return self.record(upstream, server)
        except KeyError:
            raise KeyError(f"no server {server!r} in upstream {upstream!r}") from None

    def set_admin(self, upstream: str, server: str, admin: AdminState | str) -> ServerRecord:
        rec = self.record(upstream, server)
        if not isinstance(admin, AdminState):
            admin = AdminState.parse(admin)
        old = rec.admin
        rec.admin = admin
        t = self.publish(rec)
        self.log.info("server_admin", upstream=upstream, server=server, admin=admin.value,
                      was=old.value, state=rec.state.label if rec.state is not None else None,
                      transition=t.name if t else None)
        return rec

    def set_weight(self, upstream: str, server: str, weight: int | None) -> ServerRecord:
        rec = self.record(upstream, server)
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)
                                   or not 0 <= weight <= MAX_WEIGHT):
            raise ValueError(f"weight must be an integer 0..{MAX_WEIGHT}, got {weight!r}")
        old = rec.weight
        rec.weight = weight
        t = self.publish(rec)
        self.log.info("server_weight", upstream=upstream, server=server, weight=weight,
                      was=old, state=rec.state.label if rec.state is not None else None,
                      transition=t.name if t else None)
        return rec

    def snapshot(self) -> list[dict]:
        return [rec.snapshot() for rec in self.records.values()]

    # ------------------------------------------------------------ publishing

    def _live_views(self):
        live = {g.number for g in self.master.generations if g.state != "done"}
        for number in list(self._views):
            if number not in live:
                # retired without fold_generation (should not happen): never
                # touch its shared memory again
                del self._views[number]
        return list(self._views.values())

    def publish(self, rec: ServerRecord) -> Transition | None:
        """Compute `rec`'s effective state and write it (and the runtime
        weight) into every live generation that has the server; bump a
        generation's epoch when its table changed. Returns the named
        transition if the effective state (as the active config sees it)
        changed, else None."""
        weight = rec.weight or 0            # 0 in shm = the config's weight
        for view in self._live_views():
            entry = view.index.get(rec.key)
            if entry is None:
                continue
            slot, is_down = entry
            state = int(rec.effective(config_down=is_down))
            s = view.gen.shm.server(slot)
            changed = False
            if s.state != state:
                s.state = state
                changed = True
            if s.weight != weight:
                s.weight = weight
                changed = True
            if changed:
                view.gen.shm.bump_epoch()
        new = rec.effective()
        old, rec.state = rec.state, new
        if old is None or old == new:
            return None
        t = transition(old, new)
        rec.transitions += 1
        self.counts[t.name] += 1
        return t

    def _clear_passive(self, rec: ServerRecord) -> bool:
        cleared = False
        for view in self._live_views():
            entry = view.index.get(rec.key)
            if entry is None:
                continue
            s = view.gen.shm.server(entry[0])
            if s.passive_down:
                s.passive_down = 0
                s.fail_window_count = 0
                view.gen.shm.bump_epoch()
                cleared = True
        return cleared

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
        active = self._views.get(self.master.active.number) if self.master.active else None
        for key, (spec, task) in list(self._tasks.items()):
            if wanted.get(key) != spec:
                task.cancel()
                del self._tasks[key]
        for key, rec in self.records.items():
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
                if rec.health is Health.DOWN and active is not None and key in active.index:
                    # in the running config without checks (no [health] table,
                    # or `down = true`): nothing would ever bring it back.
                    # Servers only old generations still have keep their state.
                    self._set_health(rec, Health.UP, "active checks disabled", "")

    async def _watch_generations(self) -> None:
        while True:
            await asyncio.sleep(GEN_WATCH_PERIOD)
            for gen in list(self.master.generations):
                if gen.number not in self._views and gen.state != "done":
                    self.prepare_generation(gen)

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
        if self.records.get(rec.key) is not rec:
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
            if self._clear_passive(rec):
                self.counts["passive_clear"] += 1
                self.log.info("server_up", upstream=rec.upstream, server=rec.name,
                              reason="active check passed", cleared="passive down",
                              latency_ms=round(latency * 1000, 3))
            if rec.health is Health.DOWN and rec.successes >= hc.rise:
                self._set_health(rec, Health.UP, f"{rec.successes} checks passed", "",
                                 latency=latency)
            return
        rec.checks_failed += 1
        rec.successes = 0
        rec.failures += 1
        rec.last_error = f"{reason}: {detail}" if detail else reason
        need = 1 if first else hc.fall
        if rec.health is Health.UP and rec.failures >= need:
            self._set_health(rec, Health.DOWN, reason, detail, first=first)

    def _set_health(self, rec: ServerRecord, health: Health, reason: str, detail: str,
                    latency: float | None = None, first: bool = False) -> None:
        rec.health = health
        rec.reason = reason
        rec.last_change = time.time()
        if health is Health.DOWN:
            rec.downs += 1
        else:
            rec.ups += 1
        t = self.publish(rec)
        ctx = {"upstream": rec.upstream, "server": rec.name, "reason": reason,
               "state": rec.state.label if rec.state is not None else None,
               "transition": t.name if t else None,
               "downs": rec.downs, "ups": rec.ups}
        if health is Health.DOWN:
            self.log.warning("server_down", error=detail or None,
                             failures=rec.failures, first_check=first or None, **ctx)
        else:
            self.log.info("server_up", latency_ms=None if latency is None
                          else round(latency * 1000, 3), **ctx)
