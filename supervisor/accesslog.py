"""The access log: workers write fixed-size records into a ring in shared
memory (never blocking, counting drops when it is full); the master drains
the rings a few times a second and emits one `access` event per connection."""
from __future__ import annotations

import asyncio

from . import log
from .component import Component
from .native import END_REASONS, ffi, sockaddr_text

DRAIN_PERIOD = 0.2


class AccessLog(Component):
    def __init__(self, master):
        self.master = master
        self.log = log.get()
        self._task: asyncio.Task | None = None
        self._wanted = asyncio.Event()    # set when a generation that logs is prepared

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.drain_all()

    async def _run(self) -> None:
        while True:
            # an idle master with no listener that logs sleeps here instead
            # of waking five times a second for nothing
            self._wanted.clear()
            if not self._logging():
                await self._wanted.wait()
            await asyncio.sleep(DRAIN_PERIOD)
            self.drain_all()

    @staticmethod
    def _logs(gen) -> bool:
        return any(lst.access_log for lst in gen.config.listeners)

    def _logging(self) -> bool:
        return any(self._logs(gen) for gen in self.master.generations)

    def prepare_generation(self, gen) -> None:
        if self._logs(gen):
            self._wanted.set()

    def drain_all(self) -> None:
        for gen in list(self.master.generations):
            self.drain_generation(gen)

    def fold_generation(self, gen) -> None:
        self.drain_generation(gen)

    def export_state(self) -> tuple[dict, dict[str, int]]:
        # ringd upgrade: log what is in the rings now; the next image goes
        # on from the rings' tails (in shared memory)
        self.drain_all()
        return {}, {}

    def drain_generation(self, gen) -> None:
        if not any(lst.access_log for lst in gen.config.listeners):
            return
        cap = gen.shm.log_capacity
        for slot in range(gen.shm.nworkers):
            ring = gen.shm.log_ring(slot)
            recs = gen.shm.log_records(slot)
            tail = ring.tail
            head = ring.head
            if head == tail:
                continue
            if head - tail > cap:        # cannot happen with a sane worker
                tail = head - cap
            while tail != head:
                self._emit(gen, slot, recs[tail & (cap - 1)])
                tail += 1
            ring.tail = tail      # the worker may reuse those records now

    def _emit(self, gen, slot: int, rec) -> None:
        lst = gen.config.listeners[rec.listener] if rec.listener < len(gen.config.listeners) else None
        server = gen.servers[rec.server].name if 0 <= rec.server < len(gen.servers) else None
        fields = {
            "listener": lst.name if lst else rec.listener,
            "client": sockaddr_text(bytes(ffi.buffer(rec.client)), rec.client_len),
            "server": server,
            "bytes_in": rec.bytes_c2s,
            "bytes_out": rec.bytes_s2c,
            "duration_ms": round(rec.duration_us / 1000.0, 3),
            "end": END_REASONS[rec.end_reason] if rec.end_reason < len(END_REASONS) else rec.end_reason,
            "start": rec.start_ns / 1e9,
            "worker": slot,
            "gen": gen.number,
        }
        if rec.err:
            import errno
            fields["error"] = errno.errorcode.get(rec.err, str(rec.err))
        self.log.info("access", **fields)
