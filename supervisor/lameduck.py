"""Lame-duck drain of the whole host: `ringd drain [--after D]`, `ringd ready`.

When several hosts announce the same address (BGP + ECMP, or any load
balancer that health-checks GET /healthz), a host must leave the way a lame
duck does: first tell the world it is going (so that routers stop sending it
new connections), keep serving whatever still arrives while they converge,
and only then stop accepting and let the open connections finish.

States (one per master, independent of worker generations):

  serving   the normal state: /healthz answers 200 while every worker slot has
            an accepting worker.
  draining  `ringd drain`: /healthz answers 503 at once; ringd keeps accepting
            and forwarding for `after` seconds (the time the BGP speaker and the
            routers take to withdraw the host).
  stopping  accepting stopped: a graceful stop runs (as `ringd stop` / SIGQUIT:
            open connections run to their end or to drain_timeout), then ringd
            exits. Also entered by a plain stop.

Transitions:

  serving  --drain(after)-->  draining  a timer fires after `after` seconds
  draining --drain(after)-->  draining  the earlier deadline wins, so
                                        `ringd drain --after 0` stops accepting now
  draining --ready-------->   serving   timer cancelled, /healthz 200 again
  draining --timer-------->   stopping  the master's graceful stop is queued
  any      --stop--------->   stopping  (the master says so through is_stopping)
  stopping --ready-------->   refused: accepting has stopped; start ringd again

This module owns only the state and the timer; the master hands it two
callables (queue a graceful stop, and "is a stop under way") and asks it
whether /healthz may answer 200.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Callable

from .component import Component

SERVING = "serving"
DRAINING = "draining"
STOPPING = "stopping"
STATES = (SERVING, DRAINING, STOPPING)

MAX_AFTER = 1000 * 3600.0   # the bound of any duration in the file


class LameDuck(Component):
    def __init__(self, stop: Callable[[], None], is_stopping: Callable[[], bool], log):
        self._stop = stop                  # queues the master's graceful stop
        self._is_stopping = is_stopping
        self.log = log
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None     # monotonic time accepting stops
        self._since: float | None = None        # wall-clock start of the drain
        self._after: float | None = None
        self._expired = False                   # our own graceful stop is queued
        self.drains = 0
        self.cancelled = 0

    @property
    def state(self) -> str:
        if self._expired or self._is_stopping():
            return STOPPING
        return DRAINING if self._deadline is not None else SERVING

    def healthy(self) -> bool:
        """May /healthz answer 200 (as far as the lame duck is concerned)?"""
        return self.state == SERVING

    def drain(self, after: float) -> tuple[bool, str]:
        """Start (or shorten) a lame-duck drain; accepting stops in `after` seconds."""
        if not isinstance(after, (int, float)) or isinstance(after, bool) \
                or not math.isfinite(after) or not 0 <= after <= MAX_AFTER:
            return False, f"after must be a number of seconds from 0 to {MAX_AFTER:.0f}, got {after!r}"
        state = self.state
        if state == STOPPING:
            return False, "ringd is already stopping (accepting has stopped)"
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + after
        if state == DRAINING and deadline >= self._deadline:
            left = self._deadline - time.monotonic()
            return True, (f"already draining since {_ago(self._since)}; accepting stops in "
                          f"{max(left, 0.0):.1f}s (an earlier --after shortens it)")
        if self._timer is not None:
            self._timer.cancel()
        first = state == SERVING
        if first:
            self._since = time.time()
            self.drains += 1
        self._deadline = deadline
        self._after = after
        self._timer = loop.call_later(after, self._expire)
        self.log.info("lameduck_start" if first else "lameduck_shortened", after=round(after, 3),
                      healthz=503)
        return True, (f"draining: /healthz answers 503; accepting stops in {after:.1f}s, then the "
                      f"open connections drain and ringd exits (ringd ready cancels until then)")

    def ready(self) -> tuple[bool, str]:
        """Cancel a lame-duck drain that has not stopped accepting yet."""
        state = self.state
        if state == STOPPING:
            self.log.warning("lameduck_ready_refused", reason="accepting has stopped")
            return False, ("too late: ringd has stopped accepting and exits once its connections "
                           "are done; start it again after that")
        if state == SERVING:
            return True, "serving (there was no drain to cancel)"
        self._timer.cancel()
        self._timer = None
        left = self._deadline - time.monotonic()
        self._deadline = None
        self.cancelled += 1
        self.log.info("lameduck_cancelled", drained_for=round(time.time() - self._since, 3),
                      accepting_would_have_stopped_in=round(max(left, 0.0), 3), healthz=200)
        self._since = None
        return True, "serving: drain cancelled, /healthz answers 200 again"

    def _expire(self) -> None:
        self._timer = None
        if self._is_stopping():
            return
        self._expired = True
        self.log.info("lameduck_accept_stop", drained_for=round(time.time() - self._since, 3))
        self._stop()

    async def stop(self) -> None:
        """The master exits: no drain timer outlives it."""
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ringd upgrade: the state (and a running timer) survives the exec
    state_key = "lameduck"

    def export_state(self) -> tuple[dict, dict[str, int]]:
        # CLOCK_MONOTONIC is the host's, so the deadline means the same after the exec
        return {"deadline": self._deadline, "since": self._since, "after": self._after,
                "drains": self.drains, "cancelled": self.cancelled}, {}

    def import_state(self, state: dict, fds: dict[str, int]) -> None:
        self.drains = int(state.get("drains", 0))
        self.cancelled = int(state.get("cancelled", 0))
        deadline = state.get("deadline")
        if deadline is None or self._is_stopping():
            return
        self._deadline = float(deadline)
        self._since = state.get("since")
        self._after = state.get("after")
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, self._deadline - time.monotonic()), self._expire)

    def snapshot(self) -> dict:
        """For `ringd status`, GET /status and the metrics."""
        state = self.state
        left = None
        if self._deadline is not None and state == DRAINING:
            left = round(max(self._deadline - time.monotonic(), 0.0), 3)
        return {"state": state, "since": self._since, "after": self._after,
                "accept_stops_in": left, "drains": self.drains, "cancelled": self.cancelled}


def _ago(since: float | None) -> str:
    if since is None:
        return "?"
    return f"{time.time() - since:.1f}s ago"
