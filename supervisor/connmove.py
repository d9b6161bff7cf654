"""Connection handover: a draining generation's established connections
move to the new one instead of waiting for drain_timeout ([ringd] handover).

The master only introduces the workers: for every old worker it makes a
SOCK_SEQPACKET socketpair, sends one end to the old worker
(RINGD_CMD_HANDOVER_TO) and the other to the new worker that takes over its
slot (RINGD_CMD_HANDOVER_FROM; slot j goes to j % workers, the same way the
listening sockets go), both with SCM_RIGHTS over the control channels, and
then tells the old generation to drain. The workers move the connections
themselves (native/handover.c) and report how it went; this module turns
that into one `handover_done` line per generation.

(ringd.handover is the other handover: listening sockets across
generations.)
"""
from __future__ import annotations

import socket
import time

from .native import encode_cmd, lib

FAIL_REASONS = ("listener_gone", "server_gone", "max_connections", "version", "peer_gone",
                "resource")


class ConnectionHandover:
    def __init__(self, master):
        self.master = master
        self.log = master.log
        # generation number -> what its workers reported
        self._runs: dict[int, dict] = {}
        # what retired generations counted (see counters())
        self._retired = {"handed_over": 0, "taken_over": 0,
                         "failures": dict.fromkeys(FAIL_REASONS, 0)}

    def fold(self, gen) -> None:
        """A generation retires: keep its counts (counters stay monotonic)."""
        for k, v in self._counts(gen).items():
            if k == "failures":
                for r, n in v.items():
                    self._retired["failures"][r] += n
            else:
                self._retired[k] += v

    def export(self) -> dict:
        """For ringd upgrade: the retired generations' counts."""
        return {"handed_over": self._retired["handed_over"],
                "taken_over": self._retired["taken_over"],
                "failures": dict(self._retired["failures"])}

    def adopt(self, doc: dict) -> None:
        """The new image after ringd upgrade: continue the counts."""
        self._retired["handed_over"] = int(doc.get("handed_over", 0))
        self._retired["taken_over"] = int(doc.get("taken_over", 0))
        for r, n in (doc.get("failures") or {}).items():
            if r in self._retired["failures"]:
                self._retired["failures"][r] = int(n)

    @staticmethod
    def _counts(gen) -> dict:
        out = {"handed_over": 0, "taken_over": 0, "failures": dict.fromkeys(FAIL_REASONS, 0)}
        for slot in range(gen.shm.nworkers):
            shm = gen.shm.worker(slot)
            out["handed_over"] += shm.handed_out
            out["taken_over"] += shm.handed_in
            for i, r in enumerate(FAIL_REASONS):
                out["failures"][r] += shm.handover_failed[i]
        return out

    def counters(self) -> dict:
        """Connections handed over and taken over, and failures by reason,
        since the master started (ringd status, metrics)."""
        out = {"handed_over": self._retired["handed_over"],
               "taken_over": self._retired["taken_over"],
               "failures": dict(self._retired["failures"])}
        for gen in self.master.generations:
            c = self._counts(gen)
            out["handed_over"] += c["handed_over"]
            out["taken_over"] += c["taken_over"]
            for r, n in c["failures"].items():
                out["failures"][r] += n
        return out

    def pair(self, old, new) -> int:
        """Connect each live worker of `old` to its successor in `new`.
        Returns how many old workers were paired."""
        if not new.config.ringd.handover:
            return 0
        from .master import CMD_SINCE
        if old.ctrl_version < CMD_SINCE[lib.RINGD_CMD_HANDOVER_TO]:
            # forked by an image from before handover (adopted across ringd
            # upgrade): its workers would not know the command; they drain
            self.log.info("handover_unsupported", gen=old.number, ctrl_version=old.ctrl_version)
            return 0
        n = len(new.workers)
        paired = []
        for w in old.live():
            if w.state not in ("ready", "starting"):
                continue
            target = new.workers[w.slot % n]
            if target is None or target.state != "ready":
                continue
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                # the new worker first: it must be listening when the old
                # one begins (it would find EOF otherwise and keep them all)
                socket.send_fds(target.ctrl, [encode_cmd(lib.RINGD_CMD_HANDOVER_FROM,
                                                         lib.RINGD_HANDOVER_VERSION)],
                                [b.fileno()])
                socket.send_fds(w.ctrl, [encode_cmd(lib.RINGD_CMD_HANDOVER_TO,
                                                    lib.RINGD_HANDOVER_VERSION)],
                                [a.fileno()])
                paired.append(w.slot)
            except OSError as e:
                self.log.warning("handover_setup_failed", worker=w.slot, gen=old.number,
                                 to_gen=new.number, error=e.strerror or str(e))
            finally:
                a.close()
                b.close()
        if paired:
            self._runs[old.number] = {"to": new.number, "waiting": set(paired), "moved": 0,
                                      "kept": 0, "ms": 0, "started": time.monotonic()}
        return len(paired)

    def worker_done(self, w, moved: int, kept: int, ms: int) -> None:
        """RINGD_EV_HANDOVER_DONE from an old worker."""
        run = self._runs.get(w.gen.number)
        if run is None:
            return
        run["moved"] += moved
        run["kept"] += kept
        run["ms"] = max(run["ms"], ms)
        run["waiting"].discard(w.slot)
        if not run["waiting"]:
            self._finish(w.gen.number)

    def worker_gone(self, w) -> None:
        """An old worker exited (perhaps before it reported)."""
        run = self._runs.get(w.gen.number)
        if run is not None and w.slot in run["waiting"]:
            run["waiting"].discard(w.slot)
            if not run["waiting"]:
                self._finish(w.gen.number)

    def _finish(self, gen: int) -> None:
        run = self._runs.pop(gen)
        self.log.info("handover_done", gen=gen, to_gen=run["to"], connections=run["moved"],
                      kept=run["kept"], ms=run["ms"])


def fail_reason(code: int) -> str:
    return FAIL_REASONS[code] if 0 <= code < len(FAIL_REASONS) else str(code)
