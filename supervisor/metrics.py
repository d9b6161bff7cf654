"""Prometheus metrics: a custom prometheus_client collector over the shared
memory the workers write. Nothing here runs per connection: a scrape reads
the counters of every live generation and adds what retired generations left
behind, so counters stay monotonic across reloads and worker restarts (a
respawned worker continues in its slot's counters; the master folds a
retired generation's totals in before its memory goes away).
"""
from __future__ import annotations

import platform
from collections import defaultdict

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from . import __version__, edge
from .lameduck import STATES as LAMEDUCK_STATES
from .native import END_REASONS, SERVER_STATES, probe

# per (listener, worker slot) counters, by struct field
LISTENER_COUNTERS = {
    "accepted": ("ringd_connections_accepted", "Connections accepted"),
    "connect_errors": ("ringd_connect_errors", "Failed connect attempts to servers (each retry counts)"),
    "connect_timeouts": ("ringd_connect_timeouts", "Connect attempts that timed out"),
    "no_server": ("ringd_no_server", "Clients closed because no server could be reached"),
    "accept_pauses": ("ringd_accept_pauses", "Times accepting was paused (max_connections, fd or memory shortage)"),
    "retries": ("ringd_connect_retries", "Connects retried on another server"),
}
# per current worker, by field of its shared memory record
WORKER_GAUGES = (
    ("ringd_pipes_in_use", "pipes_in_use", "Pipes held by connections"),
    ("ringd_worker_buffers_target", "bufs_target",
     "Provided buffers the worker keeps posted for copied reads: grows under load, shrinks when "
     "posted buffers go unused, back to its start at a trim"),
    ("ringd_worker_buffers_high_water", "bufs_high_water",
     "Most provided buffers posted or held at once since the worker started"),
)
SERVER_COUNTERS = {
    "connections": ("ringd_server_connections", "Connections established to the server"),
    "failures": ("ringd_server_failures", "Failed connects to the server"),
}


def _zero_listener():
    d = {k: 0 for k in LISTENER_COUNTERS}
    d.update(closed=[0] * len(END_REASONS), bytes_c2s=0, bytes_s2c=0, splice_bytes=0,
             copied_bytes=0)
    return d


class Totals:
    """What retired generations and dead workers leave behind."""

    def __init__(self) -> None:
        self.listener: dict[tuple[str, int], dict] = defaultdict(_zero_listener)
        self.server: dict[tuple[str, str], dict] = defaultdict(
            lambda: {"connections": 0, "failures": 0, "bytes_to": 0, "bytes_from": 0})
        self.route: dict[tuple[str, str], int] = defaultdict(int)
        self.access_dropped = 0

    def fold(self, gen) -> None:
        labels = edge.route_labels(gen.config)
        for slot in range(gen.shm.nworkers):
            st = gen.shm.lstats(slot)
            for li, lst in enumerate(gen.config.listeners):
                add_listener(self.listener[(lst.name, slot)], st[li])
            self.access_dropped += gen.shm.log_ring(slot).dropped
            add_routes(self.route, gen, slot, labels)
        for ref in gen.servers:
            s = gen.shm.server(ref.index)
            t = self.server[(ref.upstream, ref.name)]
            t["connections"] += s.connections
            t["failures"] += s.failures
            t["bytes_to"] += s.bytes_to
            t["bytes_from"] += s.bytes_from

    @classmethod
    def of(cls, gen) -> "Totals":
        """What `gen` has counted so far, as Totals of its own."""
        t = cls()
        t.fold(gen)
        return t

    def add(self, other: "Totals") -> None:
        for key, val in other.listener.items():
            acc = self.listener[key]
            for k, v in val.items():
                if k == "closed":
                    acc["closed"] = [a + b for a, b in zip(acc["closed"], v)]
                else:
                    acc[k] += v
        for key, val in other.server.items():
            for k, v in val.items():
                self.server[key][k] += v
        for key, n in other.route.items():
            self.route[key] += n
        self.access_dropped += other.access_dropped

    def to_json(self) -> dict:
        return {"listener": [[name, slot, val] for (name, slot), val in self.listener.items()],
                "server": [[up, name, val] for (up, name), val in self.server.items()],
                "route": [[listener, route, n] for (listener, route), n in self.route.items()],
                "access_dropped": self.access_dropped}

    @classmethod
    def from_json(cls, doc: dict) -> "Totals":
        """Inverse of to_json; counters this image does not know are dropped,
        counters it has and the document lacks start at 0."""
        t = cls()
        for name, slot, val in doc.get("listener", []):
            acc = t.listener[(str(name), int(slot))]
            for k in acc:
                if k == "closed":
                    got = [int(x) for x in val.get("closed", [])]
                    acc["closed"] = [got[i] if i < len(got) else 0
                                     for i in range(len(acc["closed"]))]
                elif k in val:
                    acc[k] += int(val[k])
        for up, name, val in doc.get("server", []):
            acc = t.server[(str(up), str(name))]
            for k in acc:
                if k in val:
                    acc[k] += int(val[k])
        for listener, route, n in doc.get("route", []):
            t.route[(str(listener), str(route))] += int(n)
        t.access_dropped = int(doc.get("access_dropped", 0))
        return t


def add_routes(acc: dict, gen, slot: int, labels: list[tuple[str, str]]) -> None:
    if not labels or gen.shm.nroutes != len(labels):
        return
    counts = gen.shm.route_conns(slot)
    for k, label in enumerate(labels):
        acc[label] += counts[k]


def route_connections(master, totals: Totals | None) -> dict[tuple[str, str], int]:
    """Connections routed, per (listener, route): retired generations + live ones."""
    acc: dict[tuple[str, str], int] = defaultdict(int)
    if totals is not None:
        for label, n in totals.route.items():
            acc[label] += n
    for gen in master.generations:
        labels = edge.route_labels(gen.config)
        for slot in range(gen.shm.nworkers):
            add_routes(acc, gen, slot, labels)
    return acc


def listener_closed(master, totals: Totals | None) -> dict[str, list[int]]:
    """Connections closed per reason, per listener name (all worker slots)."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0] * len(END_REASONS))
    if totals is not None:
        for (name, _slot), val in totals.listener.items():
            acc[name] = [a + b for a, b in zip(acc[name], val["closed"])]
    for gen in master.generations:
        for slot in range(gen.shm.nworkers):
            st = gen.shm.lstats(slot)
            for li, lst in enumerate(gen.config.listeners):
                acc[lst.name] = [a + st[li].closed[i] for i, a in enumerate(acc[lst.name])]
    return acc


def add_listener(acc: dict, st) -> None:
    for k in LISTENER_COUNTERS:
        acc[k] += getattr(st, k)
    for i in range(len(END_REASONS)):
        acc["closed"][i] += st.closed[i]
    for k in ("bytes_c2s", "bytes_s2c", "splice_bytes", "copied_bytes"):
        acc[k] += getattr(st, k)


class RingdCollector:
    def __init__(self, master, totals: Totals):
        self.master = master
        self.totals = totals
        feat = probe()
        self.liburing = feat.get("liburing", "")

    def describe(self):
        return []   # unchecked collector: metrics are built at scrape time

    def collect(self):
        m = self.master
        listener = defaultdict(_zero_listener)
        for key, val in self.totals.listener.items():
            acc = listener[key]
            for k, v in val.items():
                if k == "closed":
                    acc["closed"] = [a + b for a, b in zip(acc["closed"], v)]
                else:
                    acc[k] += v
        active = defaultdict(int)
        paused = defaultdict(int)
        for gen in m.generations:
            for slot in range(gen.shm.nworkers):
                st = gen.shm.lstats(slot)
                for li, lst in enumerate(gen.config.listeners):
                    add_listener(listener[(lst.name, slot)], st[li])
                    active[(lst.name, slot)] += st[li].active
                    paused[(lst.name, slot)] += st[li].accept_paused

        lw = ["listener", "worker"]
        for field, (name, doc) in LISTENER_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=lw)
            for (ln, slot), v in sorted(listener.items()):
                c.add_metric([ln, str(slot)], v[field])
            yield c
        c = CounterMetricFamily("ringd_connections_closed", "Connections closed, by reason",
                                labels=lw + ["reason"])
        for (ln, slot), v in sorted(listener.items()):
            for i, reason in enumerate(END_REASONS):
                c.add_metric([ln, str(slot), reason], v["closed"][i])
        yield c
        c = CounterMetricFamily("ringd_bytes", "Bytes forwarded",
                                labels=lw + ["direction"])
        for (ln, slot), v in sorted(listener.items()):
            c.add_metric([ln, str(slot), "client_to_server"], v["bytes_c2s"])
            c.add_metric([ln, str(slot), "server_to_client"], v["bytes_s2c"])
        yield c
        c = CounterMetricFamily("ringd_forwarded_bytes", "Bytes forwarded, by data path",
                                labels=lw + ["path"])
        for (ln, slot), v in sorted(listener.items()):
            c.add_metric([ln, str(slot), "splice"], v["splice_bytes"])
            c.add_metric([ln, str(slot), "copy"], v["copied_bytes"])
        yield c
        g = GaugeMetricFamily("ringd_connections_active", "Open client connections", labels=lw)
        for key in sorted(listener):
            g.add_metric([key[0], str(key[1])], active.get(key, 0))
        yield g
        g = GaugeMetricFamily("ringd_accept_paused", "1 while accepting is paused", labels=lw)
        for key in sorted(listener):
            g.add_metric([key[0], str(key[1])], paused.get(key, 0))
        yield g

        c = CounterMetricFamily("ringd_route_connections",
                                "Connections sent to a route's upstream by their TLS server name",
                                labels=["listener", "route"])
        for (ln, rn), v in sorted(route_connections(m, self.totals).items()):
            c.add_metric([ln, rn], v)
        yield c

        ho = m.connmove.counters()
        c = CounterMetricFamily("ringd_connections_handed_over",
                                "Connections moved to a newer generation on a reload "
                                "([ringd] handover)")
        c.add_metric([], ho["handed_over"])
        yield c
        c = CounterMetricFamily("ringd_handover_failures",
                                "Connections that stayed with their draining worker, by reason",
                                labels=["reason"])
        for reason, n in ho["failures"].items():
            c.add_metric([reason], n)
        yield c

        yield from self._servers()
        yield from self._process()
        yield from source_table_metrics(m.srclimit, m.source_table_no_column)

    def _servers(self):
        m = self.master
        records = {}
        if m.servers is not None:
            for snap in m.servers.snapshot():
                records[(snap["upstream"], snap["server"])] = snap
        srv = defaultdict(lambda: {"connections": 0, "failures": 0, "bytes_to": 0,
                                   "bytes_from": 0, "active": 0})
        for key, val in self.totals.server.items():
            for k, v in val.items():
                srv[key][k] += v
        state = {}
        for gen in m.generations:
            for ref in gen.servers:
                s = gen.shm.server(ref.index)
                t = srv[(ref.upstream, ref.name)]
                t["connections"] += s.connections
                t["failures"] += s.failures
                t["bytes_to"] += s.bytes_to
                t["bytes_from"] += s.bytes_from
                t["active"] += s.active
                if gen is m.active:
                    st = SERVER_STATES.get(s.state, "up")
                    if st == "up" and s.passive_down:
                        st = "down"
                    state[(ref.upstream, ref.name)] = st
        us = ["upstream", "server"]
        for field, (name, doc) in SERVER_COUNTERS.items():
            c = CounterMetricFamily(name, doc, labels=us)
            for key, v in sorted(srv.items()):
                c.add_metric(list(key), v[field])
            yield c
        c = CounterMetricFamily("ringd_server_bytes", "Bytes to and from the server",
                                labels=us + ["direction"])
        for key, v in sorted(srv.items()):
            c.add_metric(list(key) + ["to_server"], v["bytes_to"])
            c.add_metric(list(key) + ["from_server"], v["bytes_from"])
        yield c
        g = GaugeMetricFamily("ringd_server_active_connections", "Open connections to the server",
                              labels=us)
        for key, v in sorted(srv.items()):
            g.add_metric(list(key), v["active"])
        yield g
        g = GaugeMetricFamily("ringd_server_state", "1 for the server's current state",
                              labels=us + ["state"])
        up = GaugeMetricFamily("ringd_server_up", "1 if the server takes new connections",
                               labels=us)
        for key in sorted(state):
            for name in SERVER_STATES.values():
                g.add_metric(list(key) + [name], 1 if state[key] == name else 0)
            up.add_metric(list(key), 1 if state[key] == "up" else 0)
        yield g
        yield up
        lat = GaugeMetricFamily("ringd_server_check_latency_seconds",
                                "Duration of the last successful health check", labels=us)
        checks = CounterMetricFamily("ringd_server_checks", "Health checks run, by result",
                                     labels=us + ["result"])
        for key, rec in sorted(records.items()):
            if rec.get("last_latency_ms") is not None:
                lat.add_metric(list(key), rec["last_latency_ms"] / 1000.0)
            if rec.get("checks_enabled"):
                checks.add_metric(list(key) + ["ok"], rec["checks"] - rec["checks_failed"])
                checks.add_metric(list(key) + ["failed"], rec["checks_failed"])
        yield lat
        yield checks

    def _process(self):
        m = self.master
        g = GaugeMetricFamily("ringd_generation", "Current generation")
        g.add_metric([], m.active.number if m.active else 0)
        yield g
        c = CounterMetricFamily("ringd_reloads", "Reloads, by result", labels=["result"])
        c.add_metric(["ok"], m.reloads_ok)
        c.add_metric(["rejected"], m.reloads_rejected)
        yield c
        g = GaugeMetricFamily("ringd_host_state", "1 for the lame-duck state of this host: serving, "
                              "draining (ringd drain: /healthz 503, still accepting) or stopping",
                              labels=["state"])
        current = m.lameduck.state
        for st in LAMEDUCK_STATES:
            g.add_metric([st], 1 if st == current else 0)
        yield g
        c = CounterMetricFamily("ringd_upgrades", "In-place upgrades (ringd upgrade, SIGUSR2), by "
                                "result: ok, refused (the running master untouched), failed (the "
                                "new image runs, its workers did not start)", labels=["result"])
        for result in ("ok", "refused", "failed"):
            c.add_metric([result], m.upgrades.counts.get(result, 0))
        yield c
        c = CounterMetricFamily("ringd_worker_restarts", "Workers respawned after an unexpected exit")
        c.add_metric([], m.worker_restarts)
        yield c
        g = GaugeMetricFamily("ringd_workers", "Worker processes, by generation state",
                              labels=["state"])
        counts = defaultdict(int)
        for gen in m.generations:
            counts[gen.state] += len(gen.live())
        for st in ("starting", "active", "draining"):
            g.add_metric([st], counts.get(st, 0))
        yield g
        g = GaugeMetricFamily("ringd_worker_heartbeat", "Heartbeat ticks of each current worker",
                              labels=["worker"])
        if m.active:
            for w in m.active.live():
                g.add_metric([str(w.slot)], m.active.shm.worker(w.slot).heartbeat)
        yield g
        for name, field, text in WORKER_GAUGES:
            g = GaugeMetricFamily(name, text, labels=["worker"])
            if m.active:
                for w in m.active.live():
                    g.add_metric([str(w.slot)], getattr(m.active.shm.worker(w.slot), field))
            yield g
        c = CounterMetricFamily("ringd_worker_trims", "Times a current worker gave idle memory back "
                                "(pools, connection table, buffers); starts at 0 with each worker",
                                labels=["worker"])
        if m.active:
            for w in m.active.live():
                c.add_metric([str(w.slot)], m.active.shm.worker(w.slot).trims)
        yield c
        dropped = self.totals.access_dropped
        for gen in m.generations:
            for slot in range(gen.shm.nworkers):
                dropped += gen.shm.log_ring(slot).dropped
        c = CounterMetricFamily("ringd_access_log_dropped",
                                "Access log records lost because a worker's ring was full")
        c.add_metric([], dropped)
        yield c
        modes = sorted({w.ring_mode for gen in m.generations for w in gen.live() if w.ring_mode})
        info = InfoMetricFamily("ringd_build", "Version, liburing and ring mode")
        info.add_metric([], {"version": __version__, "liburing": self.liburing,
                             "ring_mode": ",".join(modes) or "none",
                             "python": platform.python_version()})
        yield info


def source_table_metrics(table, no_column: int = 0):
    """The per-source limit table (ringd.srclimit): the header's counters
    only, O(1) per scrape; and the worker processes the master started
    without a column of it."""
    if table is None:
        return
    h = table.header
    g = GaugeMetricFamily("ringd_source_table_size", "Sources the per-source limit table can hold")
    g.add_metric([], table.entries)
    yield g
    g = GaugeMetricFamily("ringd_source_table_entries",
                          "Sources in the per-source limit table (idle ones stay until reused)")
    g.add_metric([], h.used)
    yield g
    c = CounterMetricFamily("ringd_source_table_untracked",
                            "Connections admitted without per-source accounting: no room in the "
                            "table (or a slot lock not obtained in time)")
    c.add_metric([], h.untracked)
    yield c
    c = CounterMetricFamily("ringd_source_table_evictions",
                            "Idle sources replaced in the per-source limit table")
    c.add_metric([], h.evictions)
    yield c
    c = CounterMetricFamily("ringd_source_table_no_column",
                            "Worker processes started without a column of the per-source limit "
                            "table (all taken by processes alive at once): they admit every "
                            "connection uncounted")
    c.add_metric([], no_column)
    yield c


def make_registry(master, totals: Totals) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(RingdCollector(master, totals))
    return reg

