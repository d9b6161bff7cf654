"""The server registry: one record per server that decides its state.

One ``ServerRegistry`` lives in the master. It keeps a ``ServerRecord`` per
(upstream name, server name) for as long as some live generation has that
server, so health verdicts, admin states and runtime weights survive reloads.
Whatever changes a record ends in ``publish()``, which computes the
effective state (see ringd.states) and writes it into the shared server
table of *every* live generation that has the server, bumping that
generation's state epoch when something changed. Workers read the table when
they pick a server; no Python runs per connection.

Three parties change records: the active health checks (ringd.health)
report their verdicts through ``set_health``/``clear_passive``; the workers'
passive checks arrive as events (``on_passive_down``); the operator uses the
admin API below (``ringd server UPSTREAM/SERVER drain|maint|ready|weight N``).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from . import log
from .component import Component
from .config import MAX_WEIGHT
from .native import lib
from .states import AdminState, Health, ServerState, Transition, effective_state, transition

__all__ = ["Key", "ServerRecord", "ServerRegistry"]

# ringd.states must agree with the C header
assert [int(s) for s in (ServerState.UP, ServerState.DOWN, ServerState.DRAIN,
                         ServerState.MAINT)] == [lib.RINGD_SRV_UP, lib.RINGD_SRV_DOWN,
                                                  lib.RINGD_SRV_DRAIN, lib.RINGD_SRV_MAINT]

Key = tuple[str, str]       # (upstream name, server name)


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


# the plain fields of a ServerRecord that cross an upgrade as they are
_RECORD_FIELDS = ("upstream", "name", "confirmed", "checks_enabled", "successes", "failures",
                  "checks", "checks_failed", "last_check", "last_latency", "last_error", "reason",
                  "last_change", "downs", "ups", "passive_downs", "weight", "config_down",
                  "transitions")


@dataclass
class _GenView:
    gen: object                                    # ringd.master.Generation
    index: dict[Key, tuple[int, bool]] = field(default_factory=dict)   # -> (slot, down)


class ServerRegistry(Component):
    """The master component that owns the server records and publishes them.

    Admin API (all synchronous, call from the master loop):
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

    # ------------------------------------------------------------ lifecycle hooks

    async def start(self) -> None:
        for gen in list(self.master.generations):
            self.prepare_generation(gen)

    def prepare_generation(self, gen) -> None:
        """Adopt a generation: create records for its servers and write the
        current states into its table. Idempotent. The master calls it right
        after it creates the generation, before it forks the workers, so a
        worker never sees a table without the current states."""
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
        """A reload activated `new_gen`: `down = true` follows its config."""
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

    def fold_generation(self, gen) -> None:
        """`gen` is about to be dropped: forget it, and the servers only it had."""
        self._views.pop(gen.number, None)
        still = set()
        for view in self._views.values():
            still.update(view.index)
        for key in list(self.records):
            if key not in still:
                del self.records[key]

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

    def in_generation(self, key: Key, gen) -> bool:
        """Has generation `gen` the server `key`?"""
        view = self._views.get(gen.number) if gen is not None else None
        return view is not None and key in view.index

    # ------------------------------------------------------------ ringd upgrade

    state_key = "servers"

    def export_state(self) -> tuple[dict, dict[str, int]]:
        records = []
        for rec in self.records.values():
            d = {f: getattr(rec, f) for f in _RECORD_FIELDS}
            d["health"] = rec.health.value
            d["admin"] = rec.admin.value
            d["state"] = None if rec.state is None else int(rec.state)
            records.append(d)
        return {"records": records, "counts": dict(self.counts)}, {}

    def import_state(self, state: dict, fds: dict[str, int]) -> None:
        """Records come back before any generation is prepared, so that
        prepare_generation publishes the states they had (no transition)."""
        for d in state.get("records", []):
            try:
                rec = ServerRecord(str(d["upstream"]), str(d["name"]))
                for f in _RECORD_FIELDS:
                    if f in d and f not in ("upstream", "name"):
                        setattr(rec, f, d[f])
                rec.health = Health(d.get("health", "up"))
                rec.admin = AdminState(d.get("admin", "ready"))
                rec.state = None if d.get("state") is None else ServerState(d["state"])
            except (KeyError, ValueError, TypeError):
                continue        # a record this image cannot read starts afresh
            self.records[rec.key] = rec
        self.counts.update({str(k): int(v) for k, v in state.get("counts", {}).items()})

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

    def clear_passive(self, rec: ServerRecord) -> bool:
        """A check passed: lift the workers' passive-down mark on `rec`'s
        server in every generation; True if one was set."""
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

    def set_health(self, rec: ServerRecord, health: Health, reason: str, detail: str,
                   latency: float | None = None, first: bool = False) -> None:
        """The active checks' verdict on `rec` changed: record, publish, log."""
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
