"""What the workers' C loops report, and what the master makes of it.

C never prints: a worker sends fixed-size events (struct ringd_event: type,
err, a, b, c) over its control socket. ``EVENTS`` has one entry per
RINGD_EV_* type: the log event it becomes, its level, its fields (the
worker, generation and pid follow them on every line), and an optional
hook that changes state first. A hook that returns False keeps the line
out of the log (rate limits, events that are only state).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .connmove import fail_reason
from .native import PROXY_BAD, RING_MODES, Event, lib, setup_failure

PAUSE_LOG_EVERY = 5.0       # seconds between two accept_paused lines of one listener and worker


def _listener(w, i: int):
    cfg = w.gen.config
    return cfg.listeners[i].name if i < len(cfg.listeners) else i


def _server(w, i: int):
    return w.gen.servers[i] if i < len(w.gen.servers) else None


# --------------------------------------------------------------------------- hooks
# hook(events, worker, event) -> False to log nothing; anything else logs the line

def _ready(t: "WorkerEvents", w, ev: Event) -> None:
    t.master.worker_ready(w, RING_MODES.get(ev.a, str(ev.a)))


def _pause_rate_limit(t: "WorkerEvents", w, ev: Event) -> bool:
    key = (w.gen.number, w.slot, ev.a, ev.err)
    now = time.monotonic()
    if now - t.pause_logged.get(key, 0.0) < PAUSE_LOG_EVERY:
        return False
    t.pause_logged[key] = now
    return True


def _accept_stopped(t: "WorkerEvents", w, ev: Event) -> None:
    t.master.accept_stopped(w)


def _passive_down(t: "WorkerEvents", w, ev: Event) -> None:
    for c in t.master.components:
        c.on_passive_down(w.gen, ev.a)


def _handover_done(t: "WorkerEvents", w, ev: Event) -> None:
    t.master.connmove.worker_done(w, ev.a, ev.b, ev.c)


def _setup_failed(t: "WorkerEvents", w, ev: Event) -> None:
    w.fail_reason = f"worker {w.slot}: {setup_failure(ev, w.gen.config)}"


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Entry:
    event: str | None                                # the log event it becomes (None: none)
    level: str                                       # debug, info, warning, error
    fields: Callable[[object, Event], dict]          # (worker, event) -> the line's fields
    hook: Callable[["WorkerEvents", object, Event], bool | None] | None = None


EVENTS: dict[int, Entry] = {
    lib.RINGD_EV_READY: Entry(
        "worker_ready", "info", lambda w, ev: {"ring": w.ring_mode, "cpu": w.cpu}, _ready),
    lib.RINGD_EV_ACCEPT_PAUSED: Entry(
        "accept_paused", "warning",
        lambda w, ev: {"listener": _listener(w, ev.a),
                       "reason": "max_connections" if ev.err == 0 else ev.error,
                       "active": ev.b, "pauses": ev.c},
        _pause_rate_limit),
    lib.RINGD_EV_ACCEPT_RESUMED: Entry(
        "accept_resumed", "info", lambda w, ev: {"listener": _listener(w, ev.a), "after": ev.error}),
    lib.RINGD_EV_DRAINING: Entry("worker_draining", "info", lambda w, ev: {"active": ev.c}),
    lib.RINGD_EV_ACCEPT_STOPPED: Entry(None, "", lambda w, ev: {}, _accept_stopped),
    lib.RINGD_EV_EXITING: Entry(
        "worker_closed_connections", "warning", lambda w, ev: {"closed": ev.c},
        lambda t, w, ev: bool(ev.c)),
    lib.RINGD_EV_NO_SERVER: Entry(
        "no_server", "warning",
        lambda w, ev: {"listener": _listener(w, ev.a),
                       "upstream": (w.gen.config.upstreams[ev.b].name
                                    if ev.b < len(w.gen.config.upstreams) else ev.b),
                       "clients_closed": ev.c, "last_error": ev.error or "no server available"}),
    lib.RINGD_EV_CONNECT_FAIL: Entry(
        "connect_failed", "warning",
        lambda w, ev: {"upstream": s.upstream if (s := _server(w, ev.a)) else None,
                       "server": s.name if s else ev.a, "error": ev.error, "failures": ev.c}),
    lib.RINGD_EV_SERVER_FAILED: Entry(
        "server_down", "warning",
        lambda w, ev: {"upstream": s.upstream if (s := _server(w, ev.a)) else None,
                       "server": s.name if s else ev.a, "reason": "passive",
                       "error": ev.error, "fails": ev.c},
        _passive_down),
    lib.RINGD_EV_PIPE_SHRUNK: Entry(
        "pipe_size_reduced", "warning",
        lambda w, ev: {"size": ev.a, "error": ev.error,
                       "hint": "raise fs.pipe-user-pages-soft or run as root"}),
    lib.RINGD_EV_SETUP_FAILED: Entry(
        "worker_setup_failed", "error", lambda w, ev: {"reason": setup_failure(ev, w.gen.config)},
        _setup_failed),
    lib.RINGD_EV_ACCEPT_ERROR: Entry(
        "accept_error", "error", lambda w, ev: {"listener": _listener(w, ev.a), "error": ev.error}),
    # rate limited in the worker (one a second, with the count since the last)
    lib.RINGD_EV_PROXY_BAD: Entry(
        "proxy_header_refused", "debug",
        lambda w, ev: {"listener": _listener(w, ev.a), "peer": ev.peer,
                       "reason": PROXY_BAD.get(ev.b, str(ev.b)), "count": ev.c}),
    # one per old worker once its connections are handed over (connmove.py
    # logs the generation's handover_done line)
    lib.RINGD_EV_HANDOVER_DONE: Entry(
        "worker_handover_done", "debug",
        lambda w, ev: {"connections": ev.a, "kept": ev.b, "ms": ev.c}, _handover_done),
    # sent once per reason at the end of a worker's handover (so at most
    # six lines per worker and reload, whatever the number of connections)
    lib.RINGD_EV_HANDOVER_FAILED: Entry(
        "handover_failed", "warning",
        lambda w, ev: {"reason": fail_reason(ev.a), "connections": ev.c,
                       "hint": "these connections stay with the old worker until they end "
                               "or drain_timeout"}),
    # sent when the worker finds the master gone: nobody is left to read it
    lib.RINGD_EV_ORPHANED: Entry(None, "", lambda w, ev: {}),
}


class WorkerEvents:
    """Turns each event of a worker into its state change and log line."""

    def __init__(self, master, log):
        self.master = master
        self.log = log
        self.pause_logged: dict[tuple, float] = {}

    def handle(self, w, ev: Event) -> None:
        entry = EVENTS.get(ev.type)
        if entry is None:
            return
        if entry.hook is not None and entry.hook(self, w, ev) is False:
            return
        if entry.event is None:
            return
        getattr(self.log, entry.level)(entry.event, **entry.fields(w, ev),
                                       worker=w.slot, gen=w.gen.number, pid=w.pid)
