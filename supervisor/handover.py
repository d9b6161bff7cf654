"""The listening sockets across generations: which a new generation adopts,
and when one that no generation needs any more is closed.

Worker slot i of every generation accepts on the same SO_REUSEPORT socket,
so a reload closes none. Sockets go only when their listener or slot goes,
and only after every worker that accepted on them stopped accepting; what
is queued on them then moves to the port's other sockets if
net.ipv4.tcp_migrate_req=1, or is kept safe by adoption if it is 0.
"""
from __future__ import annotations

import time

from .config import Config
from .preflight import sysctl

ADOPT_QUIET = 60.0          # tcp_migrate_req=0: a listener this long without a new
                            # connection is quiet: a reload lets its orphaned sockets go


class SocketHandover:
    def __init__(self, master, adopt_quiet: float = ADOPT_QUIET):
        self.master = master
        self.log = master.log
        self.adopt_quiet = adopt_quiet
        # per listening address: (connections accepted, when that last changed)
        self._activity: dict[tuple, tuple[int, float]] = {}

    def adoption(self, cfg: Config) -> set:
        """Which sockets of slots that `cfg` no longer has (fewer workers than
        before) its workers adopt, that is keep accepting on.

        A listening socket closed while connections wait in its queue resets
        them, unless net.ipv4.tcp_migrate_req = 1: then the kernel moves them
        to another socket of the same port. So:
        - tcp_migrate_req = 1: none. Each such socket is closed as soon as the
          old workers stopped accepting on it; its queue moves over.
        - 0: all, except those of a listener that took no new connection for
          adopt_quiet seconds (the port is quiet). Those close once the old
          workers stopped accepting; the master checks that the queue is
          empty then, and logs what a late arrival lost if it was not.
        The workers accept on an adopted socket until they are replaced, so
        its queue is never looked at while nobody takes from it."""
        candidates = self.master.sockets.adoptable(cfg)
        if not candidates:
            return set()
        if sysctl("net/ipv4/tcp_migrate_req") == "1":
            return set()
        self.note_activity()
        now = time.monotonic()
        keep = set()
        for k in candidates:
            _, changed = self._activity.get((k.family, k.ip, k.port), (0, now))
            if now - changed < self.adopt_quiet or self.master.sockets.queued(k):
                keep.add(k)
        if keep:
            self.log.info("listeners_adopted", sockets=socket_names(keep),
                          hint="net.ipv4.tcp_migrate_req=0: closing them could reset queued "
                               "connections; they are kept until a reload finds their port "
                               f"quiet for {self.adopt_quiet:g}s (set it to 1 to close them "
                               "at once)")
        return keep

    def note_activity(self) -> None:
        """Record when each listening address last accepted a connection
        (any worker of any generation), for adoption()."""
        totals: dict[tuple, int] = {}
        for gen in self.master.generations:
            for li, lst in enumerate(gen.config.listeners):
                addr = (lst.listen.family, lst.listen.ip, lst.listen.port)
                n = sum(gen.shm.lstats(w)[li].accepted for w in range(gen.shm.nworkers))
                totals[addr] = totals.get(addr, 0) + n
        now = time.monotonic()
        for addr, n in totals.items():
            old = self._activity.get(addr)
            if old is None or old[0] != n:
                self._activity[addr] = (n, now)
        for addr in list(self._activity):
            if addr not in totals:
                del self._activity[addr]

    def retire(self) -> None:
        """Close listening sockets no generation needs: only after every worker
        that accepted on them has stopped accepting."""
        keep: set = set()
        for gen in self.master.generations:
            # on a graceful stop even the current generation lets go of its
            # sockets once its workers stopped accepting: new clients are
            # refused at once (as nginx and HAProxy do) instead of queueing
            # on a socket nobody will accept from
            if gen.state in ("starting", "active") and not self.master.stopping:
                keep |= gen.keys_in_use()
                continue
            n = len(gen.workers)
            for w in gen.live():
                if not w.accept_stopped:
                    # its own socket and those it adopted (slot j goes to j % n)
                    keep |= {k for k in gen.socket_keys if k.slot % n == w.slot}
        gone = self.master.sockets.retire(keep)
        if not gone:
            return
        # a queue moves (tcp_migrate_req=1) only to a socket of the same
        # address that stays open
        migrate = sysctl("net/ipv4/tcp_migrate_req") == "1"
        still_open = {(k.family, k.ip, k.port) for k in self.master.sockets.keys()}
        lost = {k: q for k, q in gone.items()
                if q and not (migrate and (k.family, k.ip, k.port) in still_open)}
        self.log.info("listeners_closed", sockets=socket_names(gone),
                      queued=sum(gone.values()), queued_reset=sum(lost.values()))
        if lost and not self.master.stopping:
            self.log.warning("queued_connections_reset", connections=sum(lost.values()),
                             sockets=socket_names(lost),
                             hint="the kernel resets what waits on a listening socket that "
                                  "closes, unless net.ipv4.tcp_migrate_req=1 and another "
                                  "socket of the port stays open")


def socket_names(keys) -> list[str]:
    return sorted(f"{k.ip}:{k.port}#{k.slot}" for k in keys)
