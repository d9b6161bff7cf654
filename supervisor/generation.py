"""A generation and its worker slots, as the master keeps them (state only:
ringd.master changes it)."""
from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field

from . import PACKAGE_VERSION, __version__
from . import edge
from .config import Config
from .listeners import keys_of
from .native import SharedState, lib, server_table


@dataclass
class WorkerProc:
    slot: int
    cpu: int
    sq_cpu: int
    gen: "Generation"
    pid: int
    pidfd: int
    ctrl: socket.socket
    state: str = "starting"     # starting, ready, draining, exited
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    ring_mode: str = ""
    hb_value: int = -1
    hb_changed: float = field(default_factory=time.monotonic)
    accept_stopped: bool = False
    killed: str = ""            # why we killed it, if we did
    fail_reason: str = ""       # why it never became ready
    ready: asyncio.Future | None = None
    source_column: int | None = None    # its column of the per-source limit table


@dataclass
class SlotState:
    crashes: int = 0
    respawn: asyncio.TimerHandle | None = None
    held_back: bool = False


class Generation:
    def __init__(self, number: int, cfg: Config, shm: SharedState | None = None):
        self.number = number
        self.config = cfg
        self.servers = server_table(cfg)
        self.shm = shm or SharedState(number, cfg.ringd.workers, len(cfg.listeners),
                                      len(self.servers), nroutes=edge.route_count(cfg))
        # the image that forked the workers (another one after ringd upgrade)
        self.version = __version__
        self.package_version = PACKAGE_VERSION
        self.ctrl_version = lib.RINGD_CTRL_VERSION    # commands its workers understand
        # adopted across ringd upgrade from an image with another shared
        # memory layout: `shm` is a private zeroed segment that no worker
        # sees, the workers' own is never touched (see ringd.upgrade)
        self.opaque = False
        self.workers: list[WorkerProc | None] = [None] * cfg.ringd.workers
        self.slots = [SlotState() for _ in range(cfg.ringd.workers)]
        self.state = "starting"     # starting, active, draining, done
        self.drain_started: float | None = None
        self.socket_keys = keys_of(cfg)        # plus the adopted ones (ringd.handover)
        self.adopted: set = set()
        self.fail_reasons: list[str] = []
        # slots whose worker stays down for a while: their listening sockets
        # are closed so the kernel stops queueing connections nobody accepts
        # (with net.ipv4.tcp_migrate_req=1 the queued ones move to the others)
        self.released_slots: set[int] = set()

    def keys_in_use(self) -> set:
        n = len(self.workers)
        return {k for k in self.socket_keys if k.slot % n not in self.released_slots}

    def live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w is not None]
