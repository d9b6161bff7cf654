"""Server states and the transitions between them, in one dependency-free module.

A server's *effective* state is what the master publishes into the shared
memory table (``ringd_server_shm.state``) and what a worker looks at when it
picks a server for a new connection. It is derived from three inputs that are
kept apart, because they have different owners:

  health   "up" or "down", owned by the active health checks
           (``fall`` consecutive failures -> down, ``rise`` successes -> up);
  admin    "ready", "drain" or "maint", owned by the operator
           (runtime admin commands; ``down = true`` in the file counts as maint);
  weight   an optional runtime weight; 0 takes the server out of rotation
           like ``drain``.

Precedence, strongest first: MAINT > DOWN > DRAIN > UP. A drained server whose
checks fail shows DOWN (it is broken, which matters more than being drained);
a server in maintenance shows MAINT whatever its checks say.

Passive checks (``max_fails`` within ``fail_timeout``) are not a state here:
the workers set a flag next to the state in shared memory, and it expires on
its own. They appear below as two named events so that logs and counters can
use the same vocabulary.

The numeric values of ``ServerState`` are the ``RINGD_SRV_*`` constants of
native/ringd_api.h (checked by ringd.servers at import time).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "AdminState",
    "Health",
    "PASSIVE_CLEAR",
    "PASSIVE_FAIL",
    "ServerState",
    "TRANSITIONS",
    "Transition",
    "effective_state",
    "transition",
]


class ServerState(enum.IntEnum):
    """What workers see; values are RINGD_SRV_* (native/ringd_api.h)."""

    UP = 0      # takes new connections
    DOWN = 1    # health checks failed: no new connections
    DRAIN = 2   # admin: no new connections, open ones run to their end
    MAINT = 3   # admin: off (open connections are not cut by ringd either)

    @property
    def label(self) -> str:
        return self.name.lower()


class Health(enum.Enum):
    """Verdict of the active checks. Servers start UP, as in HAProxy."""

    UP = "up"
    DOWN = "down"


class AdminState(enum.Enum):
    """What the operator asked for."""

    READY = "ready"   # normal operation
    DRAIN = "drain"   # finish what is open, take nothing new
    MAINT = "maint"   # out of service

    @classmethod
    def parse(cls, text: str) -> "AdminState":
        """'ready' | 'drain' | 'maint' (case-insensitive); ValueError otherwise."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            allowed = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown admin state {text!r} (expected one of {allowed})") from None


def effective_state(health: Health, admin: AdminState, weight: int | None = None,
                    config_down: bool = False) -> ServerState:
    """The one rule that turns the inputs into the published state.

    ``weight`` is the runtime override (None: the weight from the file);
    ``config_down`` is ``down = true`` in the file of the newest generation.
    """
    if config_down or admin is AdminState.MAINT:
        return ServerState.MAINT
    if health is Health.DOWN:
        return ServerState.DOWN
    if admin is AdminState.DRAIN or weight == 0:
        return ServerState.DRAIN
    return ServerState.UP


@dataclass(frozen=True)
class Transition:
    name: str
    src: ServerState | None     # None: not a change of the published state
    dst: ServerState | None
    doc: str


_S = ServerState

# Every change of the effective state, by (from, to). The name is what logs
# and counters use; the comment says what causes it.
TRANSITIONS: dict[tuple[ServerState, ServerState], Transition] = {t: Transition(n, *t, d) for t, n, d in (
    # --- health checks
    ((_S.UP, _S.DOWN), "fail",
     "`fall` consecutive active checks failed (or the very first check of a server "
     "not confirmed yet): new connections go elsewhere"),
    ((_S.DOWN, _S.UP), "rise",
     "`rise` consecutive active checks passed: back in rotation"),
    ((_S.DRAIN, _S.DOWN), "fail_while_draining",
     "a drained server also failed its checks; DOWN wins over DRAIN"),
    ((_S.DOWN, _S.DRAIN), "rise_while_draining",
     "checks pass again but the admin drain still holds the server out of rotation"),
    # --- operator (runtime admin commands, runtime weight, `down` in the file)
    ((_S.UP, _S.DRAIN), "drain",
     "admin drain or runtime weight 0: open connections finish, no new ones"),
    ((_S.DRAIN, _S.UP), "ready",
     "admin ready (or a non-zero weight) on a healthy drained server"),
    ((_S.UP, _S.MAINT), "maint",
     "admin maint, or `down = true` in the reloaded file"),
    ((_S.DOWN, _S.MAINT), "maint_while_down",
     "a failing server put into maintenance; checks keep running meanwhile"),
    ((_S.DRAIN, _S.MAINT), "maint_while_draining",
     "maintenance after a drain (the usual way to take a server out gently)"),
    ((_S.MAINT, _S.UP), "ready_from_maint",
     "maintenance ended and the checks (which kept running) say the server is up"),
    ((_S.MAINT, _S.DOWN), "ready_but_down",
     "maintenance ended but the checks say the server is down: it stays out "
     "until `rise` checks pass"),
    ((_S.MAINT, _S.DRAIN), "drain_from_maint",
     "admin drain on a server in maintenance: stays out of rotation, shown as draining"),
)}

# Passive checks: a flag the workers keep beside the state (not a state).
PASSIVE_FAIL = Transition(
    "passive_fail", None, None,
    "a worker saw `max_fails` failed connects within `fail_timeout` and set "
    "passive_down: workers skip the server until the flag clears")
PASSIVE_CLEAR = Transition(
    "passive_clear", None, None,
    "passive_down cleared by a successful active check, by a successful connect "
    "from a worker, or ignored once `fail_timeout` has passed")


def transition(src: ServerState, dst: ServerState) -> Transition:
    """The named transition from ``src`` to ``dst`` (KeyError if src == dst)."""
    return TRANSITIONS[(src, dst)]
