"""The worker-event table (ringd.events): one entry per RINGD_EV_* type, and
what the master makes of an event (its log line, its state change)."""
from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from ringd import config as config_mod
from ringd.events import EVENTS, WorkerEvents
from ringd.native import Event, lib, proxy_bad_event, server_table


class _Log:
    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def _worker():
    cfg = config_mod.loads('[[listener]]\nname = "web"\nlisten = "127.0.0.1:1"\nupstream = "app"\n'
                           '[upstream.app]\nservers = ["127.0.0.1:2"]\n')
    gen = SimpleNamespace(number=3, config=cfg, servers=server_table(cfg))
    return SimpleNamespace(slot=1, gen=gen, pid=4242, cpu=0, ring_mode="", fail_reason="")


def test_every_event_type_has_one_entry():
    types = {v for k, v in vars(lib).items() if k.startswith("RINGD_EV_")}
    assert types and set(EVENTS) == types


@pytest.mark.parametrize("ev, level, event, fields", [
    (Event(lib.RINGD_EV_NO_SERVER, 0, 0, 0, 7), "warning", "no_server",
     {"listener": "web", "upstream": "app", "clients_closed": 7,
      "last_error": "no server available"}),
    (Event(lib.RINGD_EV_CONNECT_FAIL, 111, 0, 0, 2), "warning", "connect_failed",
     {"upstream": "app", "server": "127.0.0.1:2", "error": "ECONNREFUSED: Connection refused",
      "failures": 2}),
    (Event(lib.RINGD_EV_ACCEPT_ERROR, 24, 5, 0, 0), "error", "accept_error",
     {"listener": 5, "error": "EMFILE: Too many open files"}),
    (proxy_bad_event(0 | 10 << 16 | 3 << 24,
                     *struct.unpack("=iIQ", bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1]))),
     "debug",
     "proxy_header_refused",
     {"listener": "web", "peer": "192.0.2.1", "count": 3,
      "reason": "v2: TLV overruns the header or is cut short"}),
])
def test_event_becomes_one_log_line(ev, level, event, fields):
    log = _Log()
    WorkerEvents(SimpleNamespace(components=[]), log).handle(_worker(), ev)
    assert log.lines == [(level, event, {**fields, "worker": 1, "gen": 3, "pid": 4242})]


def test_hooks_change_state_and_rate_limit():
    log = _Log()
    calls = []
    master = SimpleNamespace(
        components=[SimpleNamespace(on_passive_down=lambda gen, i: calls.append(("down", i)))],
        worker_ready=lambda w, mode: calls.append(("ready", mode)),
        accept_stopped=lambda w: calls.append(("stopped", w.slot)))
    events, w = WorkerEvents(master, log), _worker()
    events.handle(w, Event(lib.RINGD_EV_READY, 0, lib.RINGD_RING_DEFER_TASKRUN, 0, 0))
    events.handle(w, Event(lib.RINGD_EV_ACCEPT_STOPPED, 0, 0, 0, 0))       # state only
    events.handle(w, Event(lib.RINGD_EV_SERVER_FAILED, 111, 0, 0, 3))
    events.handle(w, Event(lib.RINGD_EV_SETUP_FAILED, 12, 2, 0, 0))
    for _ in range(3):                                                      # once per 5 s
        events.handle(w, Event(lib.RINGD_EV_ACCEPT_PAUSED, 0, 0, 10, 1))
    events.handle(w, Event(lib.RINGD_EV_EXITING, 0, 0, 0, 0))              # nothing closed
    assert calls == [("ready", "defer_taskrun"), ("stopped", 1), ("down", 0)]
    assert w.fail_reason.startswith("worker 1: io_uring_setup failed: ENOMEM")
    assert [e for _, e, _ in log.lines] == ["worker_ready", "server_down", "worker_setup_failed",
                                            "accept_paused"]
