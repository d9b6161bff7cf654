"""What `ringd status` and GET /status show: read from the master's state
and the generations' shared memory, never from the workers directly."""
from __future__ import annotations

import os
import time

from . import PACKAGE_VERSION, __version__
from .native import END_REASONS, REFUSALS, SERVER_STATES, WORKER_STATES


def _listener_totals(gen, slot: int) -> dict:
    st = gen.shm.lstats(slot)
    keys = ("accepted", "active", "bytes_c2s", "bytes_s2c", "splice_bytes", "copied_bytes",
            "connect_errors", "no_server")
    tot = dict.fromkeys(keys, 0)
    for li in range(gen.shm.nlisteners):
        for k in keys:
            tot[k] += getattr(st[li], k)
    return tot


def _listeners(master) -> list[dict]:
    """Per listener of the active config: refusals by reason and connections
    per route, since the master started (retired generations included)."""
    from .metrics import listener_closed, route_connections   # metrics imports prometheus
    gen = master.active
    if gen is None:
        return []
    totals = master.admin.totals if master.admin is not None else None
    closed = listener_closed(master, totals)
    routes = route_connections(master, totals)
    out = []
    for lst in gen.config.listeners:
        counts = closed.get(lst.name, [0] * len(END_REASONS))
        out.append({
            "listener": lst.name,
            "refused": {r: counts[END_REASONS.index(r)] for r in REFUSALS},
            "routes": {r.name: routes.get((lst.name, r.name), 0) for r in lst.routes},
        })
    return out


def collect(master) -> dict:
    gens = []
    workers = []
    for gen in master.generations:
        gens.append({"generation": gen.number, "state": gen.state,
                     "workers": len(gen.live()), "version": gen.version,
                     "package_version": gen.package_version,
                     # adopted across ringd upgrade without reading its memory
                     "opaque": gen.opaque,
                     # open connections: during a handover they move from
                     # the draining generation to the active one (0 for an
                     # opaque one: its memory is not read)
                     "connections": sum(gen.shm.worker(w.slot).conns_active
                                        for w in gen.live())})
        for slot in range(len(gen.workers)):
            w = gen.workers[slot]
            shm = gen.shm.worker(slot)
            entry = {
                "slot": slot,
                "generation": gen.number,
                "pid": w.pid if w else None,
                "cpu": w.cpu if w else None,
                "state": w.state if w else ("held back" if gen.slots[slot].held_back
                                            else "respawning" if gen.state == "active"
                                            else "exited"),
                "ring": w.ring_mode if w else "",
                "loop_state": WORKER_STATES.get(shm.state, str(shm.state)),
                "heartbeat": shm.heartbeat,
                "copy_path": {1: "buffer_ring", 2: "pooled"}.get(shm.copy_mode, ""),
                "pipes_in_use": shm.pipes_in_use,
                "pipe_size": shm.pipe_size,
                "buf_waits": shm.buf_waits,
                "bufs_posted": shm.bufs_posted,
                "bufs_target": shm.bufs_target,       # buffer ring: kept posted
                "bufs_high_water": shm.bufs_high_water,   # most posted or held at once
                "conn_slots": shm.conn_slots,         # connection table slots touched
                "trims": shm.trims,                   # times memory was given back
                "loops": shm.loops,       # event loop iterations (one wait each)
                "cqes": shm.cqes,         # completions handled
                "source_column": w.source_column if w else None,   # in the source table
                # the code it runs: that of the master image that forked it
                "version": gen.version,
                "package_version": gen.package_version,
            }
            entry.update(_listener_totals(gen, slot))
            workers.append(entry)
    servers = []
    gen = master.active
    records = {}
    if master.servers is not None:
        records = {(r["upstream"], r["server"]): r for r in master.servers.snapshot()}
    if gen is not None:
        weights = {(u.name, srv.name): srv.weight for u in gen.config.upstreams
                   for srv in u.servers}
        for ref in gen.servers:
            s = gen.shm.server(ref.index)
            state = SERVER_STATES.get(s.state, str(s.state))
            if s.passive_down and state == "up":
                state = "down (passive)"
            cfg_weight = weights.get((ref.upstream, ref.name))
            rec = records.get((ref.upstream, ref.name), {})
            last = rec.get("last_check")
            servers.append({
                "upstream": ref.upstream, "server": ref.name, "state": state,
                "admin": rec.get("admin", "ready"), "health": rec.get("health", "up"),
                "weight": s.weight or cfg_weight, "active": s.active,
                "connections": s.connections, "failures": s.failures,
                "last_check": (f"{time.time() - last:.1f}s ago "
                               f"({rec.get('last_latency_ms')} ms)" if last else "-"),
                "last_error": rec.get("last_error", ""),
                "checks": rec.get("checks", 0),     # active checks run (all generations)
            })
    up = master.upgrades
    return {
        "listeners": _listeners(master),
        "pid": os.getpid(),
        "config": master.config_path,
        "version": __version__,                 # of the running master image
        "package_version": PACKAGE_VERSION,     # the Debian package's, when built as one
        "generation": master.active.number if master.active else None,
        "uptime": round(time.time() - master.started_at, 3),
        "exec_started": master.exec_started,    # epoch seconds this image started
        "upgrades": up.execs,                   # in-place re-executions so far
        "upgrade": up.snapshot(),               # the last attempt, {} if none
        "upgrade_error": up.error,              # its new workers failed: the adopted ones serve
        "reloads_ok": master.reloads_ok,
        "reloads_rejected": master.reloads_rejected,
        "worker_restarts": master.worker_restarts,
        "lameduck": master.lameduck.snapshot(),
        "generations": gens,
        "handover": master.connmove.counters(),
        "workers": workers,
        "servers": servers,
        "end_reasons": list(END_REASONS),
        # the per-source limit table: size, sources, counters (ringd.srclimit)
        "source_table": master.srclimit.counters() if master.srclimit is not None else None,
    }
