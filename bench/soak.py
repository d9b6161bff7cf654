#!/usr/bin/env python3
"""ringd soak and chaos run: mixed traffic through a real ringd on 127.0.0.1
for a long time, with reloads, a worker SIGKILL and a worker SIGSTOP along
the way; every byte checked, every connection's outcome classified, the
resources of every ringd process sampled.

    .venv/bin/python bench/soak.py                   # 10 minutes (what `make soak` runs)
    .venv/bin/python bench/soak.py --duration 60     # a one-minute smoke
    .venv/bin/python bench/soak.py --ring both       # the whole run once per ring mode
    .venv/bin/python bench/soak.py --render bench/results/soak-X.json   # its report again

Exit status: 0 when every check passed, 1 when one failed (the report says
which), 2 when the run itself could not be done (ringd or a backend did not
start). See bench/README.md ("Soak") for how to read the report.

The protocol (tests/backend.py, mode `soak`): the client sends a 40-byte
header (seed, up_n, down_n, ...), the backend answers "SKHI" + seed, sends
down_n bytes of a deterministic stream while it reads and checks the client's
up_n bytes, then a trailer (SHA-256 of what it sent, SHA-256 and count of
what it read) and a FIN. So each side knows how many bytes to expect, and a
clean EOF before the trailer is a truncation, never a complete transfer.

Outcomes (each connection gets exactly one, decided after the run):

  ok            every promised byte arrived, both SHA-256 digests match, and
                the connection ended with a clean EOF where the protocol ends
  refused       a connection to a listener whose servers all refuse or drop
                SYNs was closed (FIN or reset) before any backend answered
  cut           the connection ended with an error (reset) where a cut is by
                design: the backend reset it (backend_reset), the client went
                idle or stalled past idle_timeout (idle, never_read, sink), it
                was open on a generation at its drain deadline or cut short,
                or on a worker the soak killed or stopped
  client_abort  the client reset it mid-transfer by design (client_reset)
  killed_fin    open on a worker that was killed (by the soak's SIGKILL, by
                the watchdog after the soak's SIGSTOP, or by the watchdog on
                its own: see the worker-death check) and ended by a clean EOF
                short of the promised bytes: the kernel closes a dead process's
                sockets, with a FIN unless they carry SO_LINGER 0. ringd arms
                it on every socket from the start and clears it only at a
                natural end, so a dead worker's connections are reset and
                this must be 0 (a check): an EOF-delimited protocol cannot
                tell such a FIN from a complete transfer
  corrupted     any byte differs: a received byte that is not the stream at
                its offset, an upload byte the backend found different, a
                digest in the trailer that does not match, bytes after the end
  lost          a clean EOF short of what the protocol promised (silent
                truncation: the client got a FIN before the trailer, or the
                backend got a FIN before up_n bytes), or a connection that was
                still going when its bound ran out (hung). A client whose own
                send failed with ECONNRESET saw a reset, even if its recv()
                then returns EOF (Linux reports a reset once, to whichever
                call comes first, and says EPIPE instead when a FIN came
                before the reset)
  unexpected    an error where nothing explains it: a reset on a connection
                that no chaos event touched, a data connection refused, an
                idle or stalled connection still open idle_timeout + 12.5 s
                after it went quiet

The run fails if corrupted, lost or unexpected is not 0, if a resource check
fails (see BOUNDS), if a chaos step did not happen (a reload rejected, a killed worker not replaced, the
watchdog not acting on the stopped worker), or if a worker died that the
soak neither killed nor stopped (ringd's log says which and why; a stall
watcher captures what a worker whose heartbeat stops is doing). The longest
wait for a refusal is checked against a bound too, but that check is timing:
it is reported ("over") without failing the run, since on a shared machine
it measures the machine as much as ringd.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import errno
import hashlib
import json
import math
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import hostinfo                                         # noqa: E402
import procstat                                         # noqa: E402
from backend import (SOAK_ECHO, SOAK_HDR, SOAK_HELLO, SOAK_HELLO_LEN,  # noqa: E402
                     SOAK_MAGIC, SOAK_STREAM, SOAK_TRAILER_LEN, Stream)
from harness import BACKEND, Ringd, free_ports, listener, upstream, wait_for  # noqa: E402

HOST = "127.0.0.1"
MiB = 1 << 20
KiB = 1 << 10

# Resource bounds. A checkpoint is taken with no traffic: the soak stops
# starting connections, waits for every client to finish, for ringd to
# report no open connection and a single generation, and for the workers'
# idle trim (1 s after the last connection closed, pipes and pools go back),
# then reads /proc. Every checkpoint is compared with the first one, taken
# before any traffic, at the same worker count (every chaos step leaves the
# worker count where it started).
BOUNDS = {
    # fds: the same config and worker count must mean the same fds. One more
    # is allowed for a control-socket connection that is being torn down.
    "master_fds": 1,
    "worker_fds": 1,
    # no pipe may be held by an idle ringd (the pool is trimmed when idle)
    "pipes": 0,
    # RSS in KiB. The master is Python: one-time growth (lazy imports, first
    # reload, first status call, logging buffers) is allowed, growth per
    # checkpoint is not: the end may exceed the start by at most this much.
    "master_rss_kib": 8 * 1024,
    # a worker is forked from the master, so it carries the master's growth;
    # on top of that only a small margin for a trimmed pool
    "worker_rss_kib": 8 * 1024 + 2 * 1024,
}
# Under load (one sample every 10 s) a worker may hold buffers and pipes for
# its open connections; the bound is loose and only catches runaway growth.
LOAD_BOUNDS = {"master_rss_kib": 16 * 1024, "worker_rss_kib": 64 * 1024}
# A held connection (idle, never_read, sink) is checked idle_timeout + 2.5 s
# after it went quiet; if ringd has not cut it yet, the client waits up to
# this much longer (a loaded machine delays timers) before it counts as not cut.
CUT_GRACE = 10.0
# A refusal may take what ringd promises (at once; connect_timeout per try)
# plus this, plus the client's own event-loop lag.
REFUSAL_SLACK = 2.0


# --------------------------------------------------------------------------- options

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600,
                    help="seconds of traffic per ring mode (default 600); checkpoints add to it")
    ap.add_argument("--checkpoint", type=float, default=60,
                    help="seconds of traffic between two quiesced checkpoints (default 60)")
    ap.add_argument("--ring", choices=["auto", "sqpoll", "nosqpoll", "both"], default="auto",
                    help='[ring] sqpoll = "auto" / true / false; "both" runs true, then false')
    ap.add_argument("--workers", type=int, default=2, help="ringd workers (default 2)")
    ap.add_argument("--concurrency", type=int, default=24,
                    help="client connections in flight (default 24)")
    ap.add_argument("--idle-timeout", type=float, default=3.0)
    ap.add_argument("--drain-timeout", type=float, default=4.0)
    ap.add_argument("--watchdog-timeout", type=float, default=5.0)
    ap.add_argument("--connect-timeout", type=float, default=1.0)
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help="connection kinds to run, comma-separated (default: all)")
    ap.add_argument("--chaos", default=",".join(CHAOS),
                    help="chaos steps to run, comma-separated, from " + ",".join(CHAOS)
                    + " (default: all; empty: none)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="directory for soak-*.md/.json and soak-latest.md (default bench/results)")
    ap.add_argument("--keep", action="store_true", help="keep ringd's logs and config (temp dir)")
    opts = ap.parse_args(argv)
    if opts.duration < 20:
        ap.error("--duration must be at least 20 s")
    if opts.seed is None:
        opts.seed = int(time.time()) & 0xFFFFFF
    opts.kinds = [k for k in opts.kinds.split(",") if k]
    opts.chaos = [c for c in opts.chaos.split(",") if c]
    for k in opts.kinds:
        if k not in KINDS:
            ap.error(f"--kinds: unknown kind {k!r} (known: {', '.join(KINDS)})")
    for c in opts.chaos:
        if c not in CHAOS:
            ap.error(f"--chaos: unknown step {c!r} (known: {', '.join(CHAOS)})")
    if not opts.kinds:
        ap.error("--kinds: at least one kind")
    return opts


# --------------------------------------------------------------------------- small helpers

def mono() -> float:
    return time.monotonic()


def errname(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def logsize(rng: random.Random, lo: int, hi: int) -> int:
    """A size between lo and hi, log-uniform (small sizes as likely as big ones)."""
    return int(math.exp(rng.uniform(math.log(lo + 1), math.log(hi + 1)))) - 1


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def out(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return p.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_info() -> dict:
    model = ""
    for line in out(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    commit = out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = out(["git", "-C", REPO, "status", "--porcelain", "--", "native", "supervisor",
                 "worker"])
    return {"cpu": model, "nproc": os.cpu_count(), "kernel": platform.release(),
            "commit": commit + (" (+ uncommitted changes in native/ supervisor/ worker/)"
                                if dirty else ""),
            "python": platform.python_version()}


def busy_neighbours() -> list[str]:
    return hostinfo.busy_neighbours(more=("bench/run.py",), unless=("soak",))


loadavg = hostinfo.loadavg


# --------------------------------------------------------------------------- /proc readers

def tcp_table() -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state hex) for every TCP socket."""
    table = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if len(p) < 10:
                        continue
                    inode = int(p[9])
                    if inode:
                        table[inode] = (int(p[1].rsplit(":", 1)[1], 16),
                                        int(p[2].rsplit(":", 1)[1], 16), p[3])
        except OSError:
            pass
    return table


def fd_targets(pid: int) -> list[str] | None:
    """What each open fd of a process is ("socket:[N]", "pipe:[N]", a path);
    None if the process is gone."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    out_ = []
    for fd in names:
        try:
            out_.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue        # closed meanwhile
    return out_


def socket_inodes(pid: int) -> list[int]:
    return [int(t[8:-1]) for t in fd_targets(pid) or [] if t.startswith("socket:[")]


def client_ports_of(pids: list[int], listen_ports: set[int]) -> set[int]:
    """Remote ports of the accepted client sockets that `pids` hold (sockets
    whose local port is one of ringd's listening ports)."""
    table = tcp_table()
    ports = set()
    for pid in pids:
        for ino in socket_inodes(pid):
            e = table.get(ino)
            if e and e[0] in listen_ports and e[2] != "0A":
                ports.add(e[1])
    return ports


def capture_stall(pid: int) -> dict:
    """What a worker whose heartbeat stopped is doing: each thread's state,
    wait channel, kernel stack and CPU time, and the busiest threads on the
    machine (with the CPU they last ran on)."""
    threads = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = []
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        t = {"tid": int(tid)}
        try:
            with open(base + "/stat") as f:
                raw = f.read()
            rest = raw.rsplit(")", 1)[1].split()
            t.update(comm=raw[raw.find("(") + 1:raw.rfind(")")], state=rest[0],
                     cpu_ticks=int(rest[11]) + int(rest[12]), last_cpu=int(rest[36]))
        except (OSError, IndexError, ValueError):
            continue
        for name in ("wchan", "stack"):
            try:
                with open(f"{base}/{name}") as f:
                    t[name] = f.read().strip()[:1500]
            except OSError:
                pass
        threads.append(t)
    # the threads that used the most CPU over the next 0.3 s, machine-wide
    def ticks() -> dict:
        snap = {}
        for p_ in os.listdir("/proc"):
            if not p_.isdigit():
                continue
            try:
                tids_ = os.listdir(f"/proc/{p_}/task")
            except OSError:
                continue
            for t_ in tids_:
                try:
                    with open(f"/proc/{p_}/task/{t_}/stat") as f:
                        raw = f.read()
                except OSError:
                    continue
                rest = raw.rsplit(")", 1)[1].split()
                snap[(p_, t_)] = (raw[raw.find("(") + 1:raw.rfind(")")],
                                  int(rest[11]) + int(rest[12]), rest[36], rest[0])
        return snap
    a = ticks()
    time.sleep(0.3)
    b = ticks()
    busy = sorted(((v[1] - a.get(k, (0, v[1]))[1], k, v) for k, v in b.items()), reverse=True)
    top = [f"pid {k[0]} tid {k[1]} {v[0]!r} state {v[3]} cpu {v[2]}: {d} ticks in 0.3 s"
           for d, k, v in busy[:8] if d > 0]
    with open("/proc/stat") as fh:
        cpus = {ln.split()[0]: [int(x) for x in ln.split()[1:9]]
                for ln in fh if ln.startswith("cpu") and ln[3] != " "}
    return {"pid": pid, "threads": threads, "top": top, "cpu_stat": cpus}


def proc_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def proc_figures(pid: int, table: dict) -> dict | None:
    """fds by kind, pipes, RSS of one process; None if it is gone."""
    kinds = {"tcp_listen": 0, "tcp": 0, "unix_or_other_socket": 0, "pipe": 0, "anon": 0,
             "file": 0}
    pipes = set()
    targets = fd_targets(pid)
    if targets is None:
        return None
    for t in targets:
        if t.startswith("socket:["):
            e = table.get(int(t[8:-1]))
            if e is None:
                kinds["unix_or_other_socket"] += 1
            elif e[2] == "0A":
                kinds["tcp_listen"] += 1
            else:
                kinds["tcp"] += 1
        elif t.startswith("pipe:"):
            kinds["pipe"] += 1
            pipes.add(t)
        elif t.startswith("anon_inode:"):
            kinds["anon"] += 1
        else:
            kinds["file"] += 1
    rss = anon = threads = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads = int(line.split()[1])
    except OSError:
        return None
    return {"pid": pid, "fds": sum(kinds.values()), "fd_kinds": kinds, "pipes": len(pipes),
            "rss_kib": rss, "rss_anon_kib": anon, "threads": threads}


# --------------------------------------------------------------------------- connections

KINDS = {
    # kind: (weight, listener)
    "short": (30, "data"),
    "bulk": (8, "data"),
    "halfclose": (10, "data"),
    "slow": (4, "data"),
    "echo": (5, "data"),
    "client_reset": (5, "data"),
    "backend_reset": (5, "data"),
    "idle": (3, "data"),
    "never_read": (3, "data"),
    "sink": (3, "sink"),
    "refuse": (3, "refuse"),
    "hole": (2, "hole"),
}
# chaos step groups: each leaves the worker count where it started
CHAOS = ("up", "kill", "down", "stop", "storm")
DATA_KINDS = ("short", "bulk", "halfclose", "slow", "echo")
STALL_KINDS = ("idle", "never_read", "sink")
OUTCOMES = ("ok", "refused", "cut", "client_abort", "killed_fin", "corrupted", "lost",
            "unexpected")
BAD_OUTCOMES = ("corrupted", "lost", "unexpected")


@dataclass(slots=True)
class Conn:
    seed: int
    kind: str
    listener: str
    bound: float
    t0: float = 0.0                 # monotonic, before connect()
    wall0: float = 0.0
    t_end: float = 0.0
    port: int = 0                   # the client's local port
    ttfb: float | None = None       # first byte from the backend (or refusal)
    reached: bool = False           # the backend's hello arrived
    end: str = ""                   # eof | reset:ERR | abort | open | timeout | error:...
    complete: bool = False
    corrupt: str = ""
    short_up: str = ""
    down_want: int = 0
    down_got: int = 0
    up_want: int = 0
    up_sent: int = 0
    up_checked: int = 0             # upload bytes confirmed by the trailer
    send_err: str = ""
    detail: str = ""
    tags: list = field(default_factory=list)
    outcome: str = ""
    why: str = ""
    ringd_end: str = ""             # from ringd's access log, when it could be matched
    backend_end: str = ""           # how the backend saw it: bytes sent, read, how it ended


class DownCheck:
    """Parses what the backend sends on a soak stream: hello, down_n bytes of
    the stream (checked at their offset as they arrive), the trailer."""

    def __init__(self, rec: Conn, down_n: int):
        self.rec = rec
        self.n = down_n
        self.stream = Stream(2 * rec.seed + 1)
        self.hello = bytearray()
        self.got = 0
        self.h = hashlib.sha256()
        self.tail = bytearray()

    def feed(self, data: bytes) -> None:
        rec = self.rec
        if len(self.hello) < SOAK_HELLO_LEN:
            take = SOAK_HELLO_LEN - len(self.hello)
            self.hello += data[:take]
            data = data[take:]
            if len(self.hello) == SOAK_HELLO_LEN:
                want = SOAK_HELLO + struct.pack("!Q", rec.seed)
                if bytes(self.hello) != want and not rec.corrupt:
                    rec.corrupt = f"hello {bytes(self.hello)!r} is not for seed {rec.seed}"
                rec.reached = True
        if data and self.got < self.n:
            take = min(len(data), self.n - self.got)
            part = data[:take]
            if not rec.corrupt:
                off = self.stream.first_difference(self.got, part)
                if off >= 0:
                    rec.corrupt = f"download byte {off} differs"
            self.h.update(part)
            self.got += take
            rec.down_got = self.got
            data = data[take:]
        if data:
            self.tail += data
            if len(self.tail) > SOAK_TRAILER_LEN and not rec.corrupt:
                rec.corrupt = f"{len(self.tail) - SOAK_TRAILER_LEN} bytes after the trailer"

    def finish(self, up_digest: bytes | None, up_n: int) -> None:
        """At a clean EOF: complete? trailer right?"""
        rec = self.rec
        if not rec.reached or self.got < self.n or len(self.tail) < SOAK_TRAILER_LEN:
            return
        t = bytes(self.tail[:SOAK_TRAILER_LEN])
        if t[:32] != self.h.digest() and not rec.corrupt:
            rec.corrupt = "download SHA-256 differs from the backend's"
        (count,) = struct.unpack("!Q", t[64:72])
        if count < up_n:
            rec.short_up = f"the backend read {count} of {up_n} upload bytes, then EOF"
            return
        if count > up_n and not rec.corrupt:
            rec.corrupt = f"the backend read {count} upload bytes, {up_n} were sent"
        elif up_digest is not None and t[32:64] != up_digest and not rec.corrupt:
            rec.corrupt = "upload SHA-256 differs from the backend's"
        rec.up_checked = count
        rec.complete = not rec.corrupt


def reset_seen_by_send(exc: BaseException | None) -> bool:
    """A send that failed with ECONNRESET consumed a reset that came before
    any FIN (after a FIN the kernel reports EPIPE instead); a recv() then
    returns b"" as if the stream had ended. So such a send error turns the
    client's EOF back into the reset it was."""
    return isinstance(exc, OSError) and exc.errno == errno.ECONNRESET


def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a client that gives up does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def probe(sock: socket.socket) -> tuple[str, bytes]:
    """State of a connection the client has not touched for a while, without
    waiting: ("reset:ERR"|"eof"|"open"|"data", data)."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        return "reset:" + errno.errorcode.get(err, str(err)), b""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return "open", b""
    except OSError as e:
        return "reset:" + errname(e), b""
    return ("eof", b"") if not data else ("data", data)


class Clients:
    """The client side of one soak session: connection kinds and their runs."""

    def __init__(self, sess: "Session"):
        self.sess = sess
        self.loop = asyncio.get_running_loop()
        self.ports = sess.ports

    async def connect(self, rec: Conn, rcvbuf: int = 0) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        rec.t0 = mono()
        rec.wall0 = time.time()
        rec.detail = "connecting"
        try:
            await self.loop.sock_connect(s, (HOST, self.ports[rec.listener]))
        except BaseException:
            s.close()
            raise
        rec.port = s.getsockname()[1]
        rec.detail = ""
        return s

    def release(self, s: socket.socket, graceful: bool) -> None:
        fd = s.fileno()
        if fd >= 0:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        if graceful:
            s.close()
        else:
            abort(s)

    # ----------------------------------------------------------- building blocks
    async def sender(self, s, rec: Conn, up_n: int, hdr: bytes | None,
                     abort_at: int | None = None, shut: bool = True) -> bytes | str:
        """Send the header and up_n stream bytes, then half-close. Returns the
        SHA-256 of what was sent, or "abort" when abort_at bytes were sent."""
        stream = Stream(2 * rec.seed)
        h = hashlib.sha256()
        if hdr:
            await self.loop.sock_sendall(s, hdr)
        off = 0
        while off < up_n:
            take = min(65536, up_n - off)
            if abort_at is not None:
                take = min(take, max(abort_at - off, 1))
            data = stream.slice(off, take)
            await self.loop.sock_sendall(s, data)
            h.update(data)
            off += take
            rec.up_sent = off
            if abort_at is not None and off >= abort_at:
                return "abort"
        if shut:
            s.shutdown(socket.SHUT_WR)
        return h.digest()

    async def reader(self, s, rec: Conn, chk: DownCheck, rate: float = 0.0,
                     abort_at: int | None = None, stop_at: int | None = None) -> str:
        size = 4096 if rate else 262144
        t_next = mono()
        while True:
            try:
                data = await self.loop.sock_recv(s, size)
            except OSError as e:
                return "reset:" + errname(e)
            if not data:
                return "eof"
            if rec.ttfb is None:
                rec.ttfb = mono() - rec.t0
            chk.feed(data)
            if abort_at is not None and chk.got >= abort_at:
                return "abort"
            if stop_at is not None and chk.got >= stop_at:
                return "stopped"
            if rate:
                t_next += len(data) / rate
                delay = t_next - mono()
                if delay > 0:
                    await asyncio.sleep(delay)

    async def stream(self, rec: Conn, *, up_n: int, down_n: int, reset_after: int = 0,
                     rcvbuf: int = 0, rate: float = 0.0, abort_down: int | None = None,
                     abort_up: int | None = None) -> None:
        """A full-duplex soak stream: send while reading, half-close after the
        upload, read to the end; optionally abort mid-way (client_reset)."""
        rec.up_want, rec.down_want = up_n, down_n
        s = await self.connect(rec, rcvbuf)
        chk = DownCheck(rec, down_n)
        hdr = SOAK_HDR.pack(SOAK_MAGIC, SOAK_STREAM, rec.seed, up_n, down_n, reset_after)
        send_t = asyncio.ensure_future(self.sender(s, rec, up_n, hdr, abort_at=abort_up))
        recv_t = asyncio.ensure_future(self.reader(s, rec, chk, rate=rate, abort_at=abort_down))
        graceful = False
        try:
            up_digest = None
            done, _ = await asyncio.wait({send_t, recv_t}, return_when=asyncio.FIRST_COMPLETED)
            if send_t in done and recv_t not in done:
                try:
                    r = send_t.result()
                except OSError as e:
                    rec.send_err = errname(e)
                    r = None
                if r == "abort":
                    rec.end = "abort"
                    return
                up_digest = r
                await recv_t
            elif send_t.done() and not send_t.cancelled() and send_t.exception() is None:
                up_digest = send_t.result()
            end = recv_t.result()
            if end == "eof" and send_t.done() and not send_t.cancelled() \
                    and reset_seen_by_send(send_t.exception()):
                end = "reset:ECONNRESET (seen by a send first)"
            rec.end = end
            if end == "abort":
                return
            if end == "eof":
                if not send_t.done():
                    # EOF while still sending: the reply can only be short
                    send_t.cancel()
                elif send_t.exception() is not None and not rec.send_err:
                    rec.send_err = errname(send_t.exception())
                chk.finish(up_digest if isinstance(up_digest, bytes) else None, up_n)
                graceful = rec.complete
        finally:
            for t in (send_t, recv_t):
                if not t.done():
                    t.cancel()
            await asyncio.gather(send_t, recv_t, return_exceptions=True)
            self.release(s, graceful)

    # ----------------------------------------------------------- kinds
    async def k_short(self, rec, rng):
        await self.stream(rec, up_n=logsize(rng, 0, 32 * KiB), down_n=logsize(rng, 0, 64 * KiB))

    async def k_bulk(self, rec, rng):
        await self.stream(rec, up_n=logsize(rng, 64 * KiB, 4 * MiB),
                          down_n=logsize(rng, 64 * KiB, 4 * MiB))

    async def k_halfclose(self, rec, rng):
        # the issue's lost-EOF workload: a small request, half-close, a reply
        # of 1 B..3 MiB read to the EOF
        await self.stream(rec, up_n=logsize(rng, 0, 1024), down_n=logsize(rng, 1, 3 * MiB))

    async def k_slow(self, rec, rng):
        # a slow reader (50-150 KB/s, 4 KiB reads) that must get every byte
        # although the transfer outlasts idle_timeout; half of them with a
        # small receive buffer, half with the kernel's autotuning
        rate = rng.uniform(50_000, 150_000)
        await self.stream(rec, up_n=0, down_n=int(rate * rng.uniform(5, 15)),
                          rcvbuf=16 * KiB if rng.random() < 0.5 else 0, rate=rate)

    async def k_client_reset(self, rec, rng):
        up_n = logsize(rng, 64 * KiB, 2 * MiB)
        down_n = logsize(rng, 64 * KiB, 2 * MiB)
        if rng.random() < 0.5:
            await self.stream(rec, up_n=up_n, down_n=down_n,
                              abort_down=rng.randint(1, down_n))
        else:
            await self.stream(rec, up_n=up_n, down_n=down_n, abort_up=rng.randint(1, up_n))

    async def k_backend_reset(self, rec, rng):
        down_n = logsize(rng, 1 * KiB, 2 * MiB)
        await self.stream(rec, up_n=logsize(rng, 0, 256 * KiB), down_n=down_n,
                          reset_after=rng.randint(0, down_n - 1) + 1)

    async def k_echo(self, rec, rng):
        """Interactive: messages echoed one at a time with pauses shorter than
        idle_timeout, then a half-close; all echoes and then an EOF are due."""
        s = await self.connect(rec)
        graceful = False
        try:
            msgs = [logsize(rng, 1, 16 * KiB) for _ in range(rng.randint(3, 12))]
            rec.up_want = rec.down_want = sum(msgs)
            hdr = SOAK_HDR.pack(SOAK_MAGIC, SOAK_ECHO, rec.seed, 0, 0, 0)
            stream = Stream(2 * rec.seed)
            try:
                await self.loop.sock_sendall(s, hdr)
                hello = await self._exactly(s, rec, SOAK_HELLO_LEN)
                if hello is None:
                    return
                if hello != SOAK_HELLO + struct.pack("!Q", rec.seed):
                    rec.corrupt = "hello is not for this connection"
                    return
                rec.reached = True
                rec.ttfb = mono() - rec.t0
                off = 0
                pause_max = min(0.8, self.sess.opts.idle_timeout / 3)
                for m in msgs:
                    data = stream.slice(off, m)
                    await self.loop.sock_sendall(s, data)
                    rec.up_sent = off + m
                    back = await self._exactly(s, rec, m)
                    if back is None:
                        return
                    if back != data:
                        rec.corrupt = f"echo of bytes {off}..{off + m} differs"
                        return
                    off += m
                    rec.down_got = off
                    await asyncio.sleep(rng.uniform(0.05, pause_max))
                s.shutdown(socket.SHUT_WR)
                try:
                    rest = await self.loop.sock_recv(s, 65536)
                except OSError as e:
                    rec.end = "reset:" + errname(e)
                    return
                if rest:
                    rec.corrupt = f"{len(rest)} bytes after the last echo"
                    rec.end = "eof"
                    return
                rec.end = "eof"
                rec.complete = True
                rec.up_checked = off
                graceful = True
            except OSError as e:
                rec.end = rec.end or "reset:" + errname(e)
        finally:
            self.release(s, graceful)

    async def _exactly(self, s, rec: Conn, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            try:
                data = await self.loop.sock_recv(s, n - len(buf))
            except OSError as e:
                rec.end = "reset:" + errname(e)
                return None
            if not data:
                rec.end = "eof"
                return None
            buf += data
        return bytes(buf)

    async def k_idle(self, rec, rng):
        """Half the upload, the whole (small) download, then idle past
        idle_timeout: the backend still owes the trailer, so a cut must be a
        reset."""
        up_n, down_n = 64 * KiB, 16 * KiB
        rec.up_want, rec.down_want = up_n, down_n
        s = await self.connect(rec)
        chk = DownCheck(rec, down_n)
        try:
            hdr = SOAK_HDR.pack(SOAK_MAGIC, SOAK_STREAM, rec.seed, up_n, down_n, 0)
            try:
                await self.sender(s, rec, up_n // 2, hdr, shut=False)
            except OSError as e:
                rec.end = "reset:" + errname(e)
                return
            end = await self.reader(s, rec, chk, stop_at=down_n)
            if end != "stopped":
                rec.end = end
                return
            await asyncio.sleep(self.sess.hold)
            state, data = await self.await_cut(s)
            if state == "data":
                chk.feed(data)
                rec.corrupt = rec.corrupt or f"{len(data)} bytes before the upload ended"
                state = "eof"
            rec.end = state
        finally:
            self.release(s, False)

    async def k_never_read(self, rec, rng):
        """Asks for 16 MiB and never reads (small receive buffer): no progress
        either way, so ringd must cut it at idle_timeout, with a reset."""
        down_n = 16 * MiB
        rec.down_want = down_n
        s = await self.connect(rec, rcvbuf=16 * KiB)
        chk = DownCheck(rec, down_n)
        try:
            hdr = SOAK_HDR.pack(SOAK_MAGIC, SOAK_STREAM, rec.seed, 0, down_n, 0)
            try:
                await self.sender(s, rec, 0, hdr)
            except OSError as e:
                rec.end = "reset:" + errname(e)
                return
            await asyncio.sleep(self.sess.hold)
            state, _ = await self.await_cut(s, errors_only=True)
            if state != "open":
                rec.end = state
                return
            # not reset: read what is there; a FIN (ringd closed it
            # gracefully) arrives only behind the queued bytes
            rec.detail = "read after the stall"
            try:
                rec.end = await asyncio.wait_for(self.reader(s, rec, chk), 20)
            except asyncio.TimeoutError:
                rec.end = "open"
            if rec.end == "eof":
                chk.finish(None, 0)
        finally:
            self.release(s, False)

    async def k_sink(self, rec, rng):
        """Uploads to a backend that never reads: ringd must cut it at
        idle_timeout, with a reset."""
        up_n = 8 * MiB
        rec.up_want = up_n
        s = await self.connect(rec)
        send_t = asyncio.ensure_future(self.sender(s, rec, up_n, None, shut=False))
        try:
            await asyncio.sleep(self.sess.hold)
            if send_t.done() and send_t.exception() is not None:
                rec.send_err = errname(send_t.exception())
            send_t.cancel()
            await asyncio.gather(send_t, return_exceptions=True)
            if send_t.done() and not send_t.cancelled() \
                    and reset_seen_by_send(send_t.exception()):
                rec.end = "reset:ECONNRESET (seen by a send first)"
                return
            state, data = await self.await_cut(s)
            if state == "data":
                rec.corrupt = f"{len(data)} bytes from a backend that never sends"
                state = "eof"
            rec.end = state
        finally:
            if not send_t.done():
                send_t.cancel()
                await asyncio.gather(send_t, return_exceptions=True)
            self.release(s, False)

    async def await_cut(self, s, errors_only: bool = False) -> tuple[str, bytes]:
        """The state of a held connection after the hold, waiting up to
        CUT_GRACE more seconds for a cut that a loaded machine may delay.
        errors_only: look only for a reset (a FIN waits behind unread bytes)."""
        deadline = mono() + CUT_GRACE
        while True:
            if errors_only:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                state = ("reset:" + errno.errorcode.get(err, str(err)), b"") if err \
                    else ("open", b"")
            else:
                state = probe(s)
            if state[0] != "open" or mono() >= deadline:
                return state
            await asyncio.sleep(0.25)

    async def k_refuse(self, rec, rng):
        """A listener whose every server refuses (or, `hole`, drops SYNs):
        the client must be closed, and soon."""
        s = await self.connect(rec)
        try:
            hdr = SOAK_HDR.pack(SOAK_MAGIC, SOAK_STREAM, rec.seed, 0, 0, 0)
            try:
                await self.loop.sock_sendall(s, hdr)
                data = await self.loop.sock_recv(s, 65536)
                rec.end = "eof" if not data else "data"
                if data:
                    rec.reached = True
            except OSError as e:
                rec.end = "reset:" + errname(e)
            rec.ttfb = mono() - rec.t0
        finally:
            self.release(s, False)

    k_hole = k_refuse

    def bound(self, kind: str) -> float:
        """How long a client of this kind may take before it counts as hung:
        its own nominal time plus a slack that covers a stopped worker
        (watchdog_timeout + respawn) and a loaded machine."""
        o = self.sess.opts
        slack = 15 + o.watchdog_timeout
        nominal = {"short": 2, "bulk": 10, "halfclose": 5, "slow": 17, "echo": 12,
                   "client_reset": 8, "backend_reset": 5,
                   "idle": self.sess.hold + CUT_GRACE + 2,
                   "never_read": self.sess.hold + CUT_GRACE + 22,
                   "sink": self.sess.hold + CUT_GRACE + 2,
                   "refuse": 1, "hole": o.connect_timeout * 2 + 1}[kind]
        return nominal + slack


# --------------------------------------------------------------------------- session

@dataclass
class Snap:
    what: str           # kill | stop | drain
    a: float            # monotonic interval the snapshot covers
    b: float
    ports: set
    info: str


class Session:
    """One ringd (one ring mode), its backends, traffic, chaos, checkpoints."""

    def __init__(self, opts, ring: str, tmp: str, rng: random.Random):
        self.opts = opts
        self.ring = ring
        self.tmp = tmp
        self.rng = rng
        self.hold = opts.idle_timeout + 2.5
        self.conns: list[Conn] = []
        self.snaps: list[Snap] = []
        self.events: list[dict] = []
        self.failures: list[str] = []
        self.checkpoints: list[dict] = []
        self.samples: list[dict] = []
        self.backend_events: list[str] = []
        self.backend_ends: dict[int, str] = {}      # seed -> how the backend saw it end
        self.lag_max = 0.0
        self.lags: list[tuple[float, float]] = []
        self.stop_windows: list[tuple[float, float]] = []
        self.deaths: list[dict] = []          # workers that died, not by the soak
        self.stopped_pids: set[int] = set()   # workers the soak stopped or killed
        self.stall_captures: list[dict] = []
        self.wall_start = 0.0
        self.procs: list[subprocess.Popen] = []
        self.ringd: Ringd | None = None
        self.holders: list[socket.socket] = []
        self.next_seed = 1
        self.t_start = 0.0
        self.traffic_on = False
        self.running = 0
        self.stopping = False    # the run is over: client slots end
        self.neighbours: set[str] = set()

    # ----------------------------------------------------------- setup
    def start_backend(self, mode: str, ports: list[int]) -> subprocess.Popen:
        errf = open(os.path.join(self.tmp, f"backend-{mode}.err"), "ab")
        p = subprocess.Popen([sys.executable, str(BACKEND), mode] + [str(x) for x in ports],
                             stdout=subprocess.PIPE, stderr=errf, text=True,
                             start_new_session=True)
        self.procs.append(p)
        line = []
        t = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(15)
        if not line or line[0].strip() != "READY":
            raise RuntimeError(f"backend {mode} did not start: {line!r}")
        if mode == "soak":
            def pump():
                for ln in p.stdout:
                    f = ln.split()
                    if len(f) == 6 and f[1] == "END" and f[2].isdigit():
                        self.backend_ends[int(f[2])] = f"sent {f[3]} got {f[4]} {f[5]}"
                    elif len(self.backend_events) < 20000:
                        self.backend_events.append(ln.strip())
            threading.Thread(target=pump, daemon=True).start()
        return p

    def config_body(self) -> str:
        p = self.ports
        o = self.opts
        sq = {"auto": '"auto"', "sqpoll": "true", "nosqpoll": "false"}[self.ring]
        ms = lambda s: f"{int(round(s * 1000))}ms"    # noqa: E731
        body = f"""
[ring]
sqpoll = {sq}

[admin]
listen = "{HOST}:{p['admin']}"
"""
        common = dict(idle_timeout=ms(o.idle_timeout), connect_timeout=ms(o.connect_timeout),
                      access_log=True)
        body += listener("data", p["data"], "data", **common)
        body += listener("sink", p["sink"], "sink", **common)
        body += listener("refuse", p["refuse"], "refuse", **common)
        body += listener("hole", p["hole"], "hole", **common)
        b = lambda k: f"{HOST}:{p[k]}"                  # noqa: E731
        body += upstream("data", [b("soak1"), b("soak2"), b("refused1"), b("hole1")],
                         connect_retries=2, max_fails=1, fail_timeout="5s")
        body += upstream("sink", [b("sinkb")], connect_retries=0)
        body += upstream("refuse", [b("refused1"), b("refused2")], connect_retries=1)
        body += upstream("hole", [b("hole1"), b("hole2")], connect_retries=1)
        return body

    def setup(self) -> None:
        names = ["data", "sink", "refuse", "hole", "admin", "soak1", "soak2", "refused1",
                 "refused2", "hole1", "hole2", "sinkb"]
        self.ports = dict(zip(names, free_ports(len(names))))
        self.listen_ports = {self.ports[k] for k in ("data", "sink", "refuse", "hole")}
        try:
            with open("/proc/sys/net/ipv4/tcp_migrate_req") as f:
                self.migrate_req = f.read().strip()
        except OSError:
            self.migrate_req = "?"
        # refusing servers: bound, never listening, so a connect gets a reset
        for k in ("refused1", "refused2"):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((HOST, self.ports[k]))
            self.holders.append(s)
        self.start_backend("soak", [self.ports["soak1"], self.ports["soak2"]])
        self.start_backend("sink", [self.ports["sinkb"]])
        self.start_backend("blackhole", [self.ports["hole1"], self.ports["hole2"]])
        o = self.opts
        extra = (f'drain_timeout = "{int(o.drain_timeout * 1000)}ms"\n'
                 f'watchdog_timeout = "{int(o.watchdog_timeout * 1000)}ms"\n'
                 'max_draining_generations = 2\nrespawn_delay = "100ms"\n')
        self.ringd = Ringd(os.path.join(self.tmp, "ringd"), self.config_body(),
                           workers=o.workers, extra_ringd=extra)
        # a longer bound than the tests' 20 s: on a machine shared with other
        # test suites, a start has been seen to take longer
        self.ringd.start(wait=False)
        r = self.ringd
        wait_for(lambda: r.events("ready") or r.proc.poll() is not None, 90, what="ringd ready")
        if r.proc.poll() is not None:
            raise RuntimeError(f"ringd exited at start: {r.log_text()[-2000:]}")

    def teardown(self) -> None:
        try:
            if self.ringd is not None:
                self.ringd.stop()
        except Exception as e:  # noqa: BLE001 (report, go on cleaning)
            self.failures.append(f"stopping ringd: {e!r}")
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        for s in self.holders:
            s.close()

    # ----------------------------------------------------------- ringd access
    async def status(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.ringd.status)

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def active_workers(self, st: dict) -> list[dict]:
        return [w for w in st["workers"] if w["generation"] == st["generation"]]

    def log_event(self, what: str, **kw) -> dict:
        ev = {"t": round(mono() - self.t_start, 2), "what": what, **kw}
        self.events.append(ev)
        print(f"  [{ev['t']:7.1f}s] {what} " + " ".join(f"{k}={v}" for k, v in kw.items()),
              flush=True)
        return ev

    # ----------------------------------------------------------- chaos
    async def ev_reload(self, workers: int) -> None:
        st = await self.status()
        old = [w["pid"] for w in self.active_workers(st) if w["pid"]]
        old_gen = st["generation"]
        self.ringd.workers = workers
        self.ringd.write_config(self.config_body())
        t0 = mono()
        res = await self.in_thread(lambda: self.ringd.cli("reload", "-c", str(self.ringd.conf)))
        t1 = mono()
        ports = await self.in_thread(client_ports_of, old, self.listen_ports)
        t2 = mono()
        self.snaps.append(Snap("drain", t1, t2, ports, f"gen {old_gen}"))
        ok = res.returncode == 0
        self.log_event("reload", workers=workers, ok=ok, took=f"{t1 - t0:.2f}s",
                       old_gen=old_gen, old_gen_conns=len(ports))
        if not ok:
            self.failures.append(f"reload to {workers} workers failed: "
                                 f"{(res.stdout + res.stderr).strip()[:300]}")

    async def _victim(self) -> dict | None:
        st = await self.status()
        ws = [w for w in self.active_workers(st) if w["pid"] and w["state"] == "ready"]
        return self.rng.choice(ws) if ws else None

    async def _wait_replaced(self, slot: int, pid: int, bound: float) -> float | None:
        t0 = mono()
        while mono() - t0 < bound:
            st = await self.status()
            for w in self.active_workers(st):
                if w["slot"] == slot and w["pid"] not in (None, pid) and w["state"] == "ready":
                    return mono() - t0
            await asyncio.sleep(0.1)
        return None

    async def _stop_victim(self, what: str) -> dict | None:
        """A ready worker of the active generation, SIGSTOPped. A worker can
        exit between the status read and the signal (the watchdog replacing a
        worker starved on a loaded machine, a drain): then another is picked."""
        for _ in range(5):
            w = await self._victim()
            if w is None:
                break
            self.stopped_pids.add(w["pid"])
            try:
                os.kill(w["pid"], signal.SIGSTOP)
                return w
            except ProcessLookupError:
                self.stopped_pids.discard(w["pid"])
                self.log_event("victim_gone", step=what, worker=w["slot"], pid=w["pid"])
                await asyncio.sleep(0.5)
        self.failures.append(f"{what}: no ready worker to {what}")
        return None

    async def ev_kill(self) -> None:
        """SIGKILL one worker. It is stopped first (a few ms) so the set of
        connections it holds can be read exactly: those are cut by design."""
        w = await self._stop_victim("kill")
        if w is None:
            return
        pid = w["pid"]
        a = mono()
        ports = await self.in_thread(client_ports_of, [pid], self.listen_ports)
        await asyncio.sleep(0.05)
        ports |= await self.in_thread(client_ports_of, [pid], self.listen_ports)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass        # a stopped process is only killed (the watchdog got there first)
        b = mono()
        self.snaps.append(Snap("kill", a, b, ports, f"worker {w['slot']} pid {pid}"))
        took = await self._wait_replaced(w["slot"], pid, 15)
        self.log_event("sigkill", worker=w["slot"], pid=pid, conns=len(ports),
                       replaced_after=f"{took:.2f}s" if took is not None else "never")
        if took is None:
            self.failures.append(f"worker {w['slot']} (pid {pid}) killed with SIGKILL was not "
                                 "replaced within 15 s")

    async def ev_stop(self) -> None:
        """SIGSTOP one worker and leave it stopped: the watchdog must notice
        the silent heartbeat after watchdog_timeout and replace it."""
        w = await self._stop_victim("stop")
        if w is None:
            return
        pid = w["pid"]
        a = mono()
        ports: set[int] = set()
        bound = self.opts.watchdog_timeout + 15
        while mono() - a < bound and proc_alive(pid):
            ports |= await self.in_thread(client_ports_of, [pid], self.listen_ports)
            await asyncio.sleep(0.2)
        gone = not proc_alive(pid)
        b = mono()
        if not gone:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.failures.append(f"watchdog: worker {w['slot']} (pid {pid}) SIGSTOPped for "
                                 f"{bound:.0f} s was not replaced")
        self.snaps.append(Snap("stop", a, b, ports, f"worker {w['slot']} pid {pid}"))
        took = await self._wait_replaced(w["slot"], pid, 15) if gone else None
        self.stop_windows.append((a, mono()))
        self.log_event("sigstop", worker=w["slot"], pid=pid, conns=len(ports),
                       killed_after=f"{b - a:.2f}s" if gone else "never",
                       replaced_after=f"{b - a + took:.2f}s" if took is not None else "never")
        if gone and took is None:
            self.failures.append(f"watchdog: stopped worker {w['slot']} killed but not "
                                 "replaced within 15 s")

    async def ev_storm(self) -> None:
        """Three reloads in a row, faster than drain_timeout: with
        max_draining_generations = 2 the oldest generation is cut short."""
        for n in (self.opts.workers + 1, max(1, self.opts.workers - 1), self.opts.workers):
            await self.ev_reload(n)
            await asyncio.sleep(0.3)

    async def run_event(self, ev: str) -> None:
        if ev.startswith("reload:"):
            await self.ev_reload(int(ev.split(":")[1]))
        elif ev == "kill":
            await self.ev_kill()
        elif ev == "stop":
            await self.ev_stop()
        elif ev == "storm":
            await self.ev_storm()

    def schedule(self) -> list[list[str]]:
        """Chaos steps per period. Each group leaves the worker count where it
        started, so every checkpoint sees the same configuration."""
        n = self.opts.workers
        back = f"reload:{n}"
        steps = {"up": [f"reload:{n + 1}", back], "down": [f"reload:{max(1, n - 1)}", back],
                 "kill": ["kill"], "stop": ["stop"], "storm": ["storm"]}
        order = ["up", "kill", "down", "stop", "storm", "up", "kill", "stop"]
        cycle = [steps[c] for c in order if c in self.opts.chaos]
        periods = max(1, int(round(self.opts.duration / self.opts.checkpoint)))
        if periods < 3:
            flat = [e for c in CHAOS if c in self.opts.chaos for e in steps[c]]
            return [flat] + [[] for _ in range(periods - 1)]
        return [cycle[i % len(cycle)] if cycle and i < periods - 2 else []
                for i in range(periods)]

    # ----------------------------------------------------------- traffic
    def pick_kind(self) -> str:
        kinds = self.opts.kinds
        return self.rng.choices(kinds, weights=[KINDS[k][0] for k in kinds])[0]

    async def one(self, clients: Clients) -> None:
        kind = self.pick_kind()
        rec = Conn(seed=self.next_seed, kind=kind, listener=KINDS[kind][1],
                   bound=clients.bound(kind))
        self.next_seed += 1
        self.conns.append(rec)
        rng = random.Random(self.opts.seed * 1_000_003 + rec.seed)
        self.running += 1
        try:
            await asyncio.wait_for(getattr(clients, "k_" + kind)(rec, rng), rec.bound)
        except asyncio.TimeoutError:
            rec.end = "timeout"
        except OSError as e:
            rec.end = rec.end or "error:" + errname(e)
        except Exception as e:  # noqa: BLE001 (a harness bug must not stop the run)
            rec.end = "error:harness"
            rec.detail = repr(e)[:200]
        finally:
            rec.t_end = mono()
            if not rec.t0:
                rec.t0 = rec.t_end
            self.running -= 1

    async def slot(self, clients: Clients, gate: asyncio.Event) -> None:
        # the flag, not only the task's cancellation, ends the loop: a cancel
        # that lands as asyncio.wait_for's inner task finishes can be lost
        # (Python 3.11), and the slot would then wait for the gate forever
        while not self.stopping:
            await gate.wait()
            if self.stopping:
                return
            await self.one(clients)
            await asyncio.sleep(self.rng.uniform(0, 0.02))

    async def stall_watch(self) -> None:
        """Every 0.5 s: a worker (not stopped by the soak) whose heartbeat has
        not moved for 1.5 s is captured once (capture_stall), up to 20 times."""
        last: dict[int, list] = {}
        while True:
            await asyncio.sleep(0.5)
            try:
                st = await self.status()
            except Exception:  # noqa: BLE001 (the master may be busy; try again)
                continue
            now = mono()
            for w in st["workers"]:
                pid = w["pid"]
                if not pid or pid in self.stopped_pids or w["state"] not in ("ready",
                                                                              "draining"):
                    continue
                prev = last.get(pid)
                if prev is None or prev[0] != w["heartbeat"]:
                    last[pid] = [w["heartbeat"], now, False]
                    continue
                if now - prev[1] >= 1.5 and not prev[2] and len(self.stall_captures) < 20:
                    prev[2] = True
                    cap = await self.in_thread(capture_stall, pid)
                    cap.update(t=round(now - self.t_start, 1), worker=w["slot"],
                               gen=w["generation"], cpu=w["cpu"],
                               silent_s=round(now - prev[1], 2))
                    self.stall_captures.append(cap)
                    self.log_event("stall", worker=w["slot"], gen=w["generation"], pid=pid,
                                   silent=f"{now - prev[1]:.1f}s", states="".join(
                                       t.get("state", "?") for t in cap["threads"]))

    async def lag_monitor(self) -> None:
        while True:
            t = mono()
            await asyncio.sleep(0.1)
            lag = mono() - t - 0.1
            if lag > self.lag_max:
                self.lag_max = lag
            if lag > 0.5:
                self.lags.append((round(t - self.t_start, 1), round(lag, 2)))

    # ----------------------------------------------------------- resources
    def read_resources(self) -> dict:
        st = self.ringd.status()
        table = tcp_table()
        master = proc_figures(self.ringd.pid, table)
        workers = []
        for w in st["workers"]:
            if not w["pid"]:
                continue
            f = proc_figures(w["pid"], table) or {}
            workers.append({"slot": w["slot"], "gen": w["generation"], "state": w["state"],
                            "cpu": w["cpu"], "active": w["active"],
                            "pipes_in_use": w["pipes_in_use"], **f})
        # CPU time so far (ticks) of every ringd process and thread class, and
        # of each CPU: a stall can then be told apart (a worker burning its
        # CPU, or a CPU taken by something else)
        # (a worker that exited between the status and /proc has no figures)
        pids = [self.ringd.pid] + [w["pid"] for w in workers if "pid" in w]
        cpu = {str(pid): {"comm": v["comm"], "ticks": v["proc"],
                          "by_class": {cls: sum(t for comm, t in v["tasks"].values()
                                                if procstat.thread_class(comm) == cls)
                                       for cls in ("thread", "iou-sqp", "iou-wrk")}}
               for pid, v in procstat.cpu_snapshot(pids).items()}
        with open("/proc/stat") as fh:
            cpus = {ln.split()[0]: [int(x) for x in ln.split()[1:9]]
                    for ln in fh if ln.startswith("cpu") and ln[3] != " "}
        return {"t": round(mono() - self.t_start, 1), "generation": st["generation"],
                "cpu_ticks": cpu, "cpu_stat": cpus,
                "generations": len(st["generations"]), "master": master, "workers": workers,
                "clients_in_flight": self.running,
                "connections_active": sum(w["active"] for w in st["workers"])}

    async def sampler(self) -> None:
        while True:
            await asyncio.sleep(10)
            try:
                s = await self.in_thread(self.read_resources)
                s["quiesced"] = False
                self.samples.append(s)
            except Exception as e:  # noqa: BLE001
                self.samples.append({"t": round(mono() - self.t_start, 1), "error": repr(e)})

    async def quiesce(self, gate: asyncio.Event, label: str) -> dict:
        """Stop starting connections, let every client finish, wait until ringd
        has nothing open and has trimmed, then read the resources."""
        gate.clear()
        t0 = mono()
        notes = []
        bound = max(c.bound for c in self.conns) + 5 if self.conns else 5
        while self.running and mono() - t0 < bound:
            await asyncio.sleep(0.1)
        if self.running:
            notes.append(f"{self.running} clients still running after {bound:.0f} s")
        t1 = mono()
        quiet = False
        last = None
        while mono() - t1 < 30:
            try:
                st = await self.status()
            except Exception as e:  # noqa: BLE001 (the master busy with a dying worker)
                last = repr(e)
                await asyncio.sleep(0.5)
                continue
            ws = self.active_workers(st)
            last = (len(st["generations"]), sum(w["active"] for w in st["workers"]),
                    [w["state"] for w in ws])
            if (len(st["generations"]) == 1 and last[1] == 0 and ws
                    and all(w["state"] == "ready" for w in ws)):
                quiet = True
                break
            await asyncio.sleep(0.2)
        if not quiet:
            notes.append(f"ringd not idle 30 s after the last client: generations, active, "
                         f"worker states = {last}")
        # the idle trim runs 1 s after a worker's last connection closed:
        # wait until the workers hold no pipe and two readings agree
        prev = None
        t2 = mono()
        res = None
        res_errors: list[str] = []
        while mono() - t2 < 15:
            await asyncio.sleep(1.0)
            try:
                res = await self.in_thread(self.read_resources)
            except Exception as e:  # noqa: BLE001 (read again)
                res_errors.append(repr(e))   # reported, not a failed checkpoint
                continue
            key = (res["master"]["fds"] if res["master"] else None,
                   tuple((w.get("fds"), w.get("pipes")) for w in res["workers"]))
            if key == prev and all(not w.get("pipes") for w in res["workers"]):
                break
            prev = key
        if res is None:     # never readable in 15 s: once more, and fail if it still is not
            res = await self.in_thread(self.read_resources)
        res["quiesced"] = True
        res["label"] = label
        res["quiesce_s"] = round(mono() - t0, 1)
        res["notes"] = notes
        res["read_errors"] = res_errors
        res["neighbours"] = busy_neighbours()
        res["loadavg"] = loadavg()
        self.neighbours.update(res["neighbours"])
        self.checkpoints.append(res)
        m = res["master"] or {}
        print(f"  [{res['t']:7.1f}s] checkpoint {label}: master fds {m.get('fds')} rss "
              f"{m.get('rss_kib', 0) / 1024:.1f} MiB; workers " + ", ".join(
                  f"{w['slot']}: fds {w.get('fds')} pipes {w.get('pipes')} rss "
                  f"{w.get('rss_kib', 0) / 1024:.1f} MiB" for w in res["workers"])
              + (f"; NOTE {'; '.join(notes)}" if notes else ""), flush=True)
        return res

    # ----------------------------------------------------------- the run
    async def run(self) -> None:
        self.t_start = mono()
        self.wall_start = time.time()
        st = await self.status()
        self.ring_modes = sorted({w["ring"] for w in st["workers"]})
        print(f"ring = {self.ring}: workers run {', '.join(self.ring_modes)}", flush=True)
        gate = asyncio.Event()
        await asyncio.sleep(1.5)
        await self.quiesce(gate, "start")
        clients = Clients(self)
        bg = [asyncio.ensure_future(self.lag_monitor()), asyncio.ensure_future(self.sampler()),
              asyncio.ensure_future(self.stall_watch())]
        bg += [asyncio.ensure_future(self.slot(clients, gate))
               for _ in range(self.opts.concurrency)]
        plan = self.schedule()
        period = self.opts.duration / len(plan)
        try:
            for i, group in enumerate(plan):
                gate.set()
                p0 = mono()
                print(f"period {i + 1}/{len(plan)}: {period:.0f} s of traffic"
                      + (f", chaos: {' '.join(group)}" if group else ", no chaos"), flush=True)
                for j, ev in enumerate(group):
                    at = p0 + period * (j + 1) / (len(group) + 1) * 0.9
                    await asyncio.sleep(max(0.0, at - mono()))
                    await self.run_event(ev)
                await asyncio.sleep(max(0.0, p0 + period - mono()))
                try:
                    self.samples.append({**await self.in_thread(self.read_resources),
                                         "quiesced": False,
                                         "label": f"before checkpoint {i + 1}"})
                except Exception as e:  # noqa: BLE001 (a worker dying as it is read)
                    self.samples.append({"t": round(mono() - self.t_start, 1),
                                         "label": f"before checkpoint {i + 1}",
                                         "error": repr(e)})
                label = "end" if i == len(plan) - 1 else f"{(i + 1) * period / 60:.1f} min"
                await self.quiesce(gate, label)
                self.progress()
        finally:
            # bounded: a task that outlives its cancel must not hang the run
            # (and hide whatever ended it) forever
            self.stopping = True
            gate.set()
            for t in bg:
                t.cancel()
            _, pending = await asyncio.wait(bg, timeout=30)
            if pending:
                print(f"soak: {len(pending)} client or monitor tasks still running 30 s "
                      "after the end; left behind", file=sys.stderr, flush=True)

    def progress(self) -> None:
        n = len(self.conns)
        done = [c for c in self.conns if c.end]
        by: dict[str, int] = {}
        for c in done:
            k = c.end.split(":")[0]
            by[k] = by.get(k, 0) + 1
        print(f"  {n} connections so far; endings: "
              + ", ".join(f"{k} {v}" for k, v in sorted(by.items())), flush=True)

    # ----------------------------------------------------------- after the run
    def metrics(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.ports['admin']}/metrics",
                                        timeout=10) as r:
                text = r.read().decode()
        except OSError as e:
            return {"error": repr(e)}
        want = ("ringd_connections_closed_total", "ringd_connections_accepted_total",
                "ringd_no_server_total", "ringd_connect_errors_total",
                "ringd_connect_timeouts_total", "ringd_connect_retries_total",
                "ringd_worker_restarts_total", "ringd_reloads_total",
                "ringd_access_log_dropped_total")
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name not in want:
                continue
            key = name
            if name == "ringd_connections_closed_total":
                key += "{" + line.split('reason="', 1)[1].split('"', 1)[0] + "}"
            if name == "ringd_reloads_total":
                key += "{" + line.split('result="', 1)[1].split('"', 1)[0] + "}"
            try:
                sums[key] = sums.get(key, 0) + float(line.rsplit(" ", 1)[1])
            except (ValueError, IndexError):
                pass
        return {k: int(v) for k, v in sorted(sums.items())}

    def read_log(self) -> dict:
        """Lifecycle events from ringd's log, and its access records keyed by
        client port (to annotate connections that did not end well)."""
        counts: dict[str, int] = {}
        access: dict[int, list[dict]] = {}
        errors = []
        lifecycle = []
        traceback = False
        try:
            fh = open(self.ringd.logfile, errors="replace")
        except OSError:
            return {"counts": {}, "errors": ["no log"], "traceback": False, "access": {}}
        with fh:
            for line in fh:
                if "Traceback" in line:
                    traceback = True
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                ev = e.get("event", "")
                if ev == "access":
                    try:
                        port = int(str(e.get("client", "")).rsplit(":", 1)[1])
                    except (IndexError, ValueError):
                        continue
                    access.setdefault(port, []).append(e)
                    counts["access"] = counts.get("access", 0) + 1
                    continue
                counts[ev] = counts.get(ev, 0) + 1
                if e.get("level") in ("error", "critical") and len(errors) < 30:
                    errors.append({k: v for k, v in e.items() if k not in ("logger",)})
                if ev not in ("connect_failed", "server_down", "server_up", "no_server") \
                        and len(lifecycle) < 3000:
                    lifecycle.append(e)
        return {"counts": counts, "errors": errors, "traceback": traceback, "access": access,
                "lifecycle": lifecycle}

    def classify(self, access: dict[int, list[dict]], lifecycle: list[dict]) -> None:
        by_seed = {c.seed: c for c in self.conns}
        for line in self.backend_events:
            p = line.split()
            if len(p) >= 3 and p[0] == "EV" and p[2].isdigit():
                c = by_seed.get(int(p[2]))
                if c is None:
                    continue
                if p[1] == "CORRUPT" and not c.corrupt:
                    c.corrupt = f"the backend found upload byte {p[3]} different"
                elif p[1] == "SHORT" and not c.short_up:
                    c.short_up = f"the backend got a clean EOF after {p[3]} of {p[4]} upload bytes"
        # workers that died although the soak neither killed nor stopped them
        # (the watchdog on a starved worker, a crash): what they held died
        # with them, unlogged
        victims = {ev["pid"] for ev in self.events if ev["what"] in ("sigkill", "sigstop")}
        self.deaths = []
        for e in lifecycle:
            if e.get("event") == "worker_exit" and e.get("unexpected") \
                    and e.get("pid") not in victims:
                try:
                    t = dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00"))
                except (KeyError, ValueError):
                    continue
                self.deaths.append({"wall": t.timestamp(), "timestamp": e["timestamp"],
                                    "t": round(t.timestamp() - self.wall_start, 1),
                                    **{k: e.get(k) for k in ("worker", "gen", "pid", "status",
                                                             "killed", "lost_connections")}})
        # every window in which the watchdog saw a worker silent (the soak's
        # SIGSTOP or not), from its last heartbeat to its exit: a refusal
        # queued behind such a worker waited for it, not for ringd's policy
        exits = {e.get("pid"): e for e in lifecycle if e.get("event") == "worker_exit"}
        for e in lifecycle:
            if e.get("event") != "worker_stalled":
                continue
            try:
                ts = dt.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                x = exits.get(e.get("pid"))
                te = (dt.datetime.fromisoformat(x["timestamp"].replace("Z", "+00:00")).timestamp()
                      if x else ts)
            except (KeyError, ValueError):
                continue
            to_mono = self.t_start - self.wall_start
            self.stop_windows.append((ts - float(e.get("silent_for", 0)) + to_mono,
                                      te + to_mono))
        for c in self.conns:
            for s in self.snaps:
                # the worker held this connection's socket when it was read;
                # a client that gave up just before may still have been
                # there (the worker had not seen the reset yet)
                if c.port in s.ports and c.t0 <= s.b and c.t_end >= s.a - 1.0:
                    c.tags.append(f"{s.what} ({s.info})")
            c.backend_end = self.backend_ends.get(c.seed, "")
            if c.port in access:
                # ringd accepts after the client connected (clocks: 0.5 s of
                # slack), and a stopped worker's queue waits for its successor
                near = [e for e in access[c.port] if e.get("listener") == c.listener
                        and -0.5 <= e.get("start", 0) - c.wall0
                        < 5 + 2 * self.opts.watchdog_timeout]
                if near:
                    e = min(near, key=lambda e: abs(e.get("start", 0) - c.wall0))
                    c.ringd_end = (f"end={e.get('end')} gen={e.get('gen')} worker={e.get('worker')}"
                                   f" accepted+{e.get('start', 0) - c.wall0:.2f}s"
                                   f" in={e.get('bytes_in')} out={e.get('bytes_out')}"
                                   f" {e.get('duration_ms')}ms" + (f" error={e['error']}"
                                                                  if e.get("error") else ""))
            if not c.ringd_end and c.port:
                # no record: ringd never closed it; open when a worker died?
                end_wall = c.wall0 + (c.t_end - c.t0)
                for d in self.deaths:
                    if c.wall0 <= d["wall"] and end_wall >= d["wall"] - 1.0:
                        c.tags.append(f"died (worker {d['worker']} gen {d['gen']} pid {d['pid']}"
                                      f", {d['killed'] or d['status']})")
            c.outcome, c.why = decide(c)


def decide(c: Conn) -> tuple[str, str]:
    """The outcome of one connection (see the module docstring)."""
    tags = " ".join(c.tags)
    worker_gone = "kill (" in tags or "stop (" in tags or "died (" in tags
    drained = "drain (" in tags
    got = f"{c.down_got} of {c.down_want} download bytes"
    if c.corrupt:
        return "corrupted", c.corrupt
    if c.end == "timeout":
        return "lost", f"hung: still going after its bound of {c.bound:.0f} s ({got}; {c.detail})"
    if c.end.startswith("error:"):
        return "unexpected", f"client error {c.end} {c.detail}"
    if c.kind in ("refuse", "hole"):
        if c.reached:
            return "unexpected", "a backend answered on a listener with no working server"
        return "refused", c.end
    if c.short_up:
        if worker_gone:
            return "killed_fin", c.short_up
        return "lost", c.short_up + (" (open at a drain deadline)" if drained else "")
    if c.end == "abort":
        return "client_abort", ""
    if c.end == "eof":
        if c.complete:
            if c.kind == "never_read":
                return "unexpected", ("not cut: every byte arrived after a stall longer than "
                                      "idle_timeout")
            return "ok", ""
        why = f"clean EOF after {got}" + (", no trailer" if c.kind in DATA_KINDS else "")
        if c.kind in STALL_KINDS:
            why = f"clean EOF where ringd cut a {c.kind} connection ({got}): a FIN, not a reset"
        if worker_gone:
            return "killed_fin", why
        return "lost", why + (" (open at a drain deadline)" if drained else "")
    if c.end.startswith("reset:"):
        if c.kind in STALL_KINDS or c.kind == "backend_reset":
            return "cut", c.end
        if worker_gone or drained:
            return "cut", c.end + " (" + tags + ")"
        if not c.reached:
            return "unexpected", f"{c.end} before the backend answered"
        if c.complete:
            return "unexpected", f"{c.end} after every byte arrived"
        return "unexpected", f"{c.end} after {got}"
    if c.end == "open":
        if worker_gone or drained:
            return "unexpected", "still open after its worker or generation went away"
        return "unexpected", (f"not cut: still open {c.bound:.0f} s bound aside, "
                              f"well past idle_timeout")
    return "unexpected", f"ended as {c.end!r} {c.detail}"


# --------------------------------------------------------------------------- figures and checks

def summarize(sess: Session, log: dict, metrics: dict) -> dict:
    conns = sess.conns
    outcomes = {o: 0 for o in OUTCOMES}
    by_kind: dict[str, dict[str, int]] = {}
    for c in conns:
        outcomes[c.outcome] += 1
        by_kind.setdefault(c.kind, {o: 0 for o in OUTCOMES})[c.outcome] += 1
    down_checked = sum(c.down_got for c in conns)
    up_checked = sum(c.up_checked for c in conns)

    def waits(kind, exclude_stops):
        out_ = []
        for c in conns:
            if c.kind != kind or c.outcome != "refused" or c.ttfb is None:
                continue
            if exclude_stops and (any(a - 0.5 <= c.t0 <= b for a, b in sess.stop_windows)
                                  or any(t.startswith(("kill", "stop", "died"))
                                         for t in c.tags)):
                continue
            out_.append(c.ttfb)
        return out_

    o = sess.opts
    bad = [c for c in conns if c.outcome in BAD_OUTCOMES]
    refusal = {}
    # ringd refuses at once when every server refuses, and after
    # connect_timeout per try (2 tries) when they drop SYNs; the bound adds
    # REFUSAL_SLACK for a loaded machine and the client's own loop lag
    for kind, nominal in (("refuse", 0.0), ("hole", o.connect_timeout * 2)):
        all_w, clean_w = waits(kind, False), waits(kind, True)
        slowest = sorted((c for c in conns if c.kind == kind and c.ttfb is not None),
                         key=lambda c: -c.ttfb)[:5]
        refusal[kind] = {"n": len(all_w), "max_s": round(max(all_w, default=0), 3),
                         "p99_s": round(pct(all_w, 99), 3),
                         "max_outside_stop_s": round(max(clean_w, default=0), 3),
                         "bound_s": round(nominal + REFUSAL_SLACK + sess.lag_max, 2),
                         "slowest": [{"wait_s": round(c.ttfb, 3),
                                      "t": round(c.t0 - sess.t_start, 1), "tags": c.tags,
                                      "end": c.end, "ringd": c.ringd_end} for c in slowest]}
    # connections that did not end well, grouped by outcome, kind, ringd's
    # end reason and chaos step; the JSON keeps up to 20 of each group
    groups: dict[tuple, list[Conn]] = {}
    for c in bad:
        reason = c.ringd_end.split(" ", 1)[0] if c.ringd_end else "end=?"
        chaos = c.tags[0].split(" ", 1)[0] if c.tags else "-"
        groups.setdefault((c.outcome, c.kind, reason, chaos), []).append(c)
    order = sorted(groups.items(), key=lambda kv: (BAD_OUTCOMES.index(kv[0][0]), -len(kv[1])))
    bad_groups = [{"outcome": k[0], "kind": k[1], "ringd": k[2], "chaos": k[3],
                   "count": len(v), "examples": [conn_dict(c, sess.t_start) for c in v[:20]]}
                  for k, v in order]
    ttfb = [c.ttfb for c in conns if c.kind in DATA_KINDS and c.ttfb is not None]
    killed = [c for c in conns if c.outcome == "killed_fin"]

    checks = []

    def check(name, ok, detail, gating=True):
        checks.append({"check": name, "ok": bool(ok), "detail": detail, "gating": gating})

    check("corrupted = 0", outcomes["corrupted"] == 0, f"{outcomes['corrupted']}")
    check("lost = 0", outcomes["lost"] == 0, f"{outcomes['lost']}")
    check("killed_fin = 0 (a dead worker's connections are reset)",
          outcomes["killed_fin"] == 0, f"{outcomes['killed_fin']}")
    check("unexpected = 0", outcomes["unexpected"] == 0, f"{outcomes['unexpected']}")
    for kind, r in refusal.items():
        # timing: reported, not gating (on a shared machine it measures the
        # machine as much as ringd; the slowest five are in the JSON)
        check(f"{kind}: longest refusal <= {r['bound_s']:.2f} s (outside a stopped, stalled "
              "or killed worker)",
              r["max_outside_stop_s"] <= r["bound_s"], f"{r['max_outside_stop_s']:.3f} s",
              gating=False)
    # resources: every quiesced checkpoint against the start. Listening
    # sockets are counted apart: after a reload to fewer workers ringd keeps
    # the orphaned slots' sockets (adopted by the remaining workers) while
    # net.ipv4.tcp_migrate_req = 0 and the port is not quiet for a minute
    # (its documented rule; closing them could reset queued connections), at
    # most one per listener and slot that existed.
    cps = sess.checkpoints
    start = cps[0]
    nlisteners = len(sess.listen_ports)
    max_slots = o.workers + (1 if ("up" in o.chaos or "storm" in o.chaos) else 0)
    adopt_ok = 0 if sess.migrate_req == "1" else nlisteners * (max_slots - o.workers)

    def split(f: dict) -> tuple[int, int]:
        listen = f["fd_kinds"]["tcp_listen"]
        return f["fds"] - listen, listen

    res_rows = []
    for cp in cps[1:]:
        notes = cp.get("notes") or []
        why = []
        ok = True
        m0, m = start["master"], cp["master"]
        if m is None:
            ok = False
            why.append("master gone")
        else:
            (o0, l0), (o1, l1) = split(m0), split(m)
            if o1 > o0 + BOUNDS["master_fds"] or l1 > l0 + adopt_ok:
                ok = False
                why.append(f"master fds {m0['fds']} -> {m['fds']} ({m['fd_kinds']})")
            if m["rss_kib"] > m0["rss_kib"] + BOUNDS["master_rss_kib"] or m["pipes"]:
                ok = False
                why.append(f"master RSS {m0['rss_kib']} -> {m['rss_kib']} KiB, "
                           f"{m['pipes']} pipes")
        w0 = {w["slot"]: w for w in start["workers"] if w["gen"] == start["generation"]}
        ws = {w["slot"]: w for w in cp["workers"] if w["gen"] == cp["generation"]}
        if set(ws) != set(w0):
            ok = False
            why.append(f"worker slots {sorted(w0)} -> {sorted(ws)}")
        listen0 = listen1 = 0
        for slot, w in ws.items():
            b = w0.get(slot)
            if b is None or "fds" not in w:
                ok = False
                continue
            (o0, l0), (o1, l1) = split(b), split(w)
            listen0 += l0
            listen1 += l1
            if o1 > o0 + BOUNDS["worker_fds"]:
                ok = False
                why.append(f"worker {slot} fds {b['fds']} -> {w['fds']} ({w['fd_kinds']})")
            if w["pipes"] > BOUNDS["pipes"] or w["pipes_in_use"]:
                ok = False
                why.append(f"worker {slot} holds {w['pipes']} pipes")
            if w["rss_kib"] > b["rss_kib"] + BOUNDS["worker_rss_kib"]:
                ok = False
                why.append(f"worker {slot} RSS {b['rss_kib']} -> {w['rss_kib']} KiB")
        if listen1 > listen0 + adopt_ok:
            ok = False
            why.append(f"workers' listening sockets {listen0} -> {listen1}")
        kept = (split(m)[1] - split(m0)[1]) if m is not None else 0
        if kept > 0 and ok:
            why.append(f"{kept} adopted listening sockets kept (allowed {adopt_ok}: "
                       f"tcp_migrate_req = {sess.migrate_req}, ringd keeps them while the "
                       "port is busy)")
        why += notes
        res_rows.append((cp["label"], ok and not notes, "; ".join(why)))
    for label, ok, why in res_rows:
        check(f"resources flat at checkpoint {label}", ok, why or "within bounds")
    # under load: loose bounds against runaway memory growth (fds and pipes
    # follow the open connections and the generations alive, so they are
    # only checked at the quiesced checkpoints)
    worst = ""
    ok_load = True
    base = max((w["rss_kib"] for w in start["workers"]), default=0)
    for s in sess.samples:
        if "master" not in s or not s["master"]:
            continue
        if s["master"]["rss_kib"] > start["master"]["rss_kib"] + LOAD_BOUNDS["master_rss_kib"]:
            ok_load = False
            worst = f"master RSS {s['master']['rss_kib']} KiB at {s['t']} s"
        for w in s["workers"]:
            if w.get("rss_kib", 0) > base + LOAD_BOUNDS["worker_rss_kib"]:
                ok_load = False
                worst = f"worker {w['slot']} gen {w['gen']} RSS {w['rss_kib']} KiB at {s['t']} s"
    check(f"under load: master RSS <= start + {LOAD_BOUNDS['master_rss_kib'] // 1024} MiB, "
          f"worker RSS <= start + {LOAD_BOUNDS['worker_rss_kib'] // 1024} MiB", ok_load,
          worst or "within bounds")
    check("every chaos step happened", not sess.failures, "; ".join(sess.failures) or "yes")
    check("no worker died unless the soak killed or stopped it", not sess.deaths,
          "; ".join(f"worker {d['worker']} gen {d['gen']} pid {d['pid']} at {d['t']} s: "
                    f"{d['killed'] or d['status']}, {d['lost_connections']} connections"
                    for d in sess.deaths) or "none")
    check("no traceback in ringd's log", not log["traceback"], "")

    return {
        "ring": sess.ring, "ring_modes": sess.ring_modes,
        "connections": len(conns), "outcomes": outcomes, "by_kind": by_kind,
        "bytes_checked": {"download": down_checked, "upload": up_checked},
        "refusal_wait": refusal,
        "ttfb_data_s": {"n": len(ttfb), "p50": round(pct(ttfb, 50), 4),
                        "p99": round(pct(ttfb, 99), 4), "max": round(max(ttfb, default=0), 3)},
        "loop_lag_max_s": round(sess.lag_max, 3), "loop_lags_over_0_5s": sess.lags[:50],
        "events": sess.events, "checkpoints": sess.checkpoints, "samples": sess.samples,
        "checks": checks, "ok": all(c["ok"] for c in checks if c["gating"]),
        "bad_groups": bad_groups, "bad_total": len(bad),
        "killed_fin": [conn_dict(c, sess.t_start) for c in killed[:50]],
        "ringd_log_counts": log["counts"], "ringd_log_errors": log["errors"],
        "ringd_log_lifecycle": log["lifecycle"],
        "ringd_metrics": metrics, "neighbours": sorted(sess.neighbours),
        "unexplained_worker_deaths": sess.deaths,
        "stall_captures": sess.stall_captures,
        "failures": sess.failures,
    }


def conn_dict(c: Conn, t_start: float) -> dict:
    return {"seed": c.seed, "kind": c.kind, "outcome": c.outcome, "why": c.why,
            "end": c.end, "t": round(c.t0 - t_start, 2), "duration_s": round(c.t_end - c.t0, 2),
            "port": c.port, "down": f"{c.down_got}/{c.down_want}",
            "up_sent": f"{c.up_sent}/{c.up_want}", "tags": c.tags, "ringd": c.ringd_end,
            "backend": c.backend_end, "send_err": c.send_err}


# --------------------------------------------------------------------------- report

def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def render(run: dict) -> str:
    m = run["machine"]
    L = []
    verdict = "PASS" if run["ok"] else "FAIL"
    L.append(f"# ringd soak: {verdict}")
    L.append("")
    L.append(f"- command: `{run['command']}`")
    L.append(f"- ringd commit {m['commit']}, started {run['started']} UTC, "
             f"{run['wall_s'] / 60:.1f} min wall clock")
    L.append(f"- machine: {m['cpu']}, {m['nproc']} CPUs, kernel {m['kernel']}, "
             f"Python {m['python']}; load average at start {run['loadavg_start']}, "
             f"at end {run['loadavg_end']}")
    o = run["options"]
    L.append(f"- ringd: {o['workers']} workers, idle_timeout {o['idle_timeout']} s, "
             f"drain_timeout {o['drain_timeout']} s, watchdog_timeout "
             f"{o['watchdog_timeout']} s, connect_timeout {o['connect_timeout']} s, "
             f"max_draining_generations 2; {o['concurrency']} client connections in flight; "
             f"random seed {o['seed']}")
    if list(o["kinds"]) != list(KINDS) or list(o["chaos"]) != list(CHAOS):
        L.append(f"- only these kinds: {', '.join(o['kinds'])}; chaos steps: "
                 f"{', '.join(o['chaos']) or 'none'}")
    L.append("")
    for s in run["sessions"]:
        L += render_session(s)
    L.append("## How to read this")
    L.append("")
    L.append("See bench/README.md, section \"Soak\": the outcomes, the resource bounds and "
             "why a checkpoint stops the traffic first.")
    L.append("")
    return "\n".join(L)


def render_session(s: dict) -> list[str]:
    L = []
    oc = s["outcomes"]
    L.append(f"## ring = {s['ring']} (workers ran: {', '.join(s['ring_modes'])}): "
             f"{'PASS' if s['ok'] else 'FAIL'}")
    L.append("")
    if s["neighbours"]:
        L.append(f"Other load seen on the machine during the run: {len(s['neighbours'])} "
                 "processes such as `" + s["neighbours"][0][:70] + "`: figures are noisy.")
        L.append("")
    L.append("| check | result | detail |")
    L.append("|---|---|---|")
    for c in s["checks"]:
        res = "ok" if c["ok"] else ("**FAILED**" if c["gating"] else "over (timing, not gating)")
        L.append(f"| {c['check']} | {res} | {c['detail'][:300]} |")
    L.append("")
    L.append(f"**{s['connections']:,} connections**; bytes checked: "
             f"{fmt_bytes(s['bytes_checked']['download'])} down, "
             f"{fmt_bytes(s['bytes_checked']['upload'])} up (every byte compared with the "
             "stream at its offset, and both SHA-256 digests of every complete transfer).")
    L.append("")
    L.append("| outcome | connections |")
    L.append("|---|---|")
    for k in OUTCOMES:
        L.append(f"| {k} | {oc[k]:,} |")
    L.append("")
    L.append("| kind | " + " | ".join(OUTCOMES) + " |")
    L.append("|---|" + "---|" * len(OUTCOMES))
    for kind in KINDS:
        row = s["by_kind"].get(kind)
        if row:
            L.append(f"| {kind} | " + " | ".join(f"{row[o]:,}" if row[o] else "" for o in OUTCOMES)
                     + " |")
    L.append("")
    r = s["refusal_wait"]
    L.append("Longest wait for a refusal (connect to close, as the client saw it):")
    L.append("")
    L.append("| listener | refusals | p99 | max | max outside a stopped, stalled or killed "
             "worker | bound |")
    L.append("|---|---|---|---|---|---|")
    for kind, desc in (("refuse", "refuse (servers reset the connect)"),
                       ("hole", "hole (servers drop SYNs)")):
        x = r[kind]
        L.append(f"| {desc} | {x['n']:,} | {x['p99_s']:.3f} s | {x['max_s']:.3f} s | "
                 f"{x['max_outside_stop_s']:.3f} s | {x['bound_s']:.2f} s |")
    t = s["ttfb_data_s"]
    L.append("")
    L.append(f"Data connections, time to the backend's first byte: p50 {t['p50'] * 1000:.1f} ms, "
             f"p99 {t['p99'] * 1000:.1f} ms, max {t['max']:.2f} s. Client event loop lag: "
             f"max {s['loop_lag_max_s']:.2f} s.")
    L.append("")
    L.append("### Chaos")
    L.append("")
    L.append("| t (s) | step | details |")
    L.append("|---|---|---|")
    for e in s["events"]:
        d = ", ".join(f"{k} {v}" for k, v in e.items() if k not in ("t", "what"))
        L.append(f"| {e['t']:.1f} | {e['what']} | {d} |")
    L.append("")
    for c in s.get("stall_captures", []):
        busiest = c["top"][0] if c["top"] else "none measurable"
        L.append(f"Heartbeat stalled (not by the soak): worker {c['worker']} (gen {c['gen']}, pid "
                 f"{c['pid']}, CPU {c['cpu']}) silent {c['silent_s']} s at {c['t']} s; its threads: "
                 + ", ".join(f"{t.get('comm')} {t.get('state')} wchan={t.get('wchan') or '-'}"
                             for t in c["threads"])
                 + f"; busiest thread on the machine over the next 0.3 s: {busiest} (stacks "
                   "in the JSON).")
        L.append("")
    for d in s.get("unexplained_worker_deaths", []):
        L.append(f"Not by the soak: at {d['t']} s worker {d['worker']} (gen {d['gen']}, pid "
                 f"{d['pid']}) ended: {d['killed'] or d['status']}, "
                 f"{d['lost_connections']} connections with it.")
        L.append("")
    L.append("### Resources (quiesced checkpoints)")
    L.append("")
    L.append("fds, RSS (MiB) and pipes of the master and each worker of the active "
             "generation, with no traffic and no open connection (see bounds below).")
    L.append("")
    slots = sorted({w["slot"] for cp in s["checkpoints"] for w in cp["workers"]})
    head = "| checkpoint | t (s) | master fds | master RSS | " + " | ".join(
        f"w{sl} fds | w{sl} RSS | w{sl} pipes" for sl in slots) + " | notes |"
    L.append(head)
    L.append("|" + "---|" * (head.count("|") - 1))
    for cp in s["checkpoints"]:
        m = cp["master"] or {}
        ws = {w["slot"]: w for w in cp["workers"] if w["gen"] == cp["generation"]}
        cells = []
        for sl in slots:
            w = ws.get(sl, {})
            cells += [str(w.get("fds", "")), f"{w.get('rss_kib', 0) / 1024:.1f}" if w else "",
                      str(w.get("pipes", ""))]
        L.append(f"| {cp['label']} | {cp['t']:.0f} | {m.get('fds')} | "
                 f"{m.get('rss_kib', 0) / 1024:.1f} | " + " | ".join(cells) + " | "
                 + "; ".join(cp.get("notes") or []) + " |")
    L.append("")
    L.append(f"Bounds, each checkpoint against the start: master fds +{BOUNDS['master_fds']}, "
             f"worker fds +{BOUNDS['worker_fds']} (listening sockets apart: adopted ones "
             f"are kept while net.ipv4.tcp_migrate_req = 0 and the port is busy, at most one "
             f"per listener and slot that existed), pipes {BOUNDS['pipes']}, master RSS "
             f"+{BOUNDS['master_rss_kib'] // 1024} MiB, worker RSS "
             f"+{BOUNDS['worker_rss_kib'] / 1024:.0f} MiB.")
    L.append("")
    L.append("### Resources under load (one sample per minute)")
    L.append("")
    L.append("| t (s) | open conns | clients | master fds | master RSS | workers (slot/gen: fds, RSS, "
             "pipes) |")
    L.append("|---|---|---|---|---|---|")
    last_min = -1
    for smp in s["samples"]:
        if "master" not in smp or not smp["master"]:
            continue
        minute = int(smp["t"] // 60)
        if minute == last_min:
            continue
        last_min = minute
        ws = "; ".join(f"{w['slot']}/{w['gen']}: {w.get('fds')}, "
                       f"{w.get('rss_kib', 0) / 1024:.1f}, {w.get('pipes')}"
                       for w in smp["workers"])
        L.append(f"| {smp['t']:.0f} | {smp['connections_active']} | {smp['clients_in_flight']} | "
                 f"{smp['master']['fds']} | {smp['master']['rss_kib'] / 1024:.1f} | {ws} |")
    L.append("")
    L.append("### ringd's own counters at the end")
    L.append("")
    met = s["ringd_metrics"]
    L.append(", ".join(f"`{k}` {v:,}" for k, v in met.items() if isinstance(v, int)) or str(met))
    L.append("")
    lc = s["ringd_log_counts"]
    keys = ("worker_exit", "worker_stalled", "reload_ok", "reload_rejected", "drain_start",
            "drain_done", "drain_cut_short", "no_server", "connect_failed", "access")
    L.append("Log events: " + ", ".join(f"{k} {lc.get(k, 0):,}" for k in keys))
    L.append("")
    if s["bad_total"]:
        L.append(f"### Connections that did not end as they should ({s['bad_total']:,})")
        L.append("")
        L.append("Grouped by outcome, kind, ringd's end reason (its access record) and the "
                 "chaos step they were caught in (`-`: none):")
        L.append("")
        L.append("| outcome | kind | ringd | chaos | connections |")
        L.append("|---|---|---|---|---|")
        for g in s["bad_groups"]:
            L.append(f"| {g['outcome']} | {g['kind']} | {g['ringd']} | {g['chaos']} | "
                     f"{g['count']:,} |")
        L.append("")
        L.append("Examples (up to two per group; the JSON has up to 20):")
        L.append("")
        L.append("| kind | outcome | why | t (s) | duration | ringd's access record | backend "
                 "| chaos |")
        L.append("|---|---|---|---|---|---|---|---|")
        n = 0
        for g in s["bad_groups"]:
            for c in g["examples"][:2]:
                if n >= 60:
                    break
                n += 1
                L.append(f"| {c['kind']} | {c['outcome']} | {c['why'][:160]} | {c['t']} | "
                         f"{c['duration_s']} s | {c['ringd'] or '-'} | {c['backend'] or '-'} | "
                         f"{'; '.join(c['tags']) or '-'} |")
        L.append("")
    kf = s["outcomes"]["killed_fin"]
    if kf:
        L.append(f"{kf} connections were open on a worker the soak killed and ended with a "
                 "clean EOF short of their promised bytes (`killed_fin`): a dead worker's "
                 "sockets closed with a FIN, although ringd arms SO_LINGER 0 on each of "
                 "them so that they are reset.")
        L.append("")
    return L


# --------------------------------------------------------------------------- main

async def run_session(opts, ring: str, tmp: str, rng: random.Random) -> dict:
    sess = Session(opts, ring, tmp, rng)
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(4))
    try:
        # inside: a setup that fails half-way (ringd not ready) still stops
        # the backends it started
        await loop.run_in_executor(None, sess.setup)
        await sess.run()
        metrics = await loop.run_in_executor(None, sess.metrics)
    finally:
        await loop.run_in_executor(None, sess.teardown)
    log = sess.read_log()
    sess.classify(log.pop("access"), log["lifecycle"])
    for ev in sess.events:
        if ev["what"] in ("sigstop", "sigkill"):
            for e in log["lifecycle"]:
                if e.get("pid") == ev["pid"] and e.get("event") in ("worker_stalled",
                                                                   "worker_exit"):
                    ev["ringd_" + e["event"]] = " ".join(
                        f"{k}={e[k]}" for k in ("silent_for", "status", "timestamp") if k in e)
    return summarize(sess, log, metrics)


def rerender(path: str) -> int:
    """Write FILE.md (and soak-latest.md beside it) again from FILE.json with
    this soak.py's report code; the figures are the JSON's. Checks from a
    version before the timing/gating split get it by name."""
    with open(path) as f:
        run = json.load(f)
    for sess in run["sessions"]:
        for c in sess["checks"]:
            c.setdefault("gating", not c["check"].startswith(("refuse:", "hole:")))
        sess["ok"] = all(c["ok"] for c in sess["checks"] if c["gating"])
    run["ok"] = all(sess["ok"] for sess in run["sessions"])
    md = render(run)
    for dst in (path[:-len(".json")] + ".md",
                os.path.join(os.path.dirname(path), "soak-latest.md")):
        with open(dst, "w") as f:
            f.write(md)
    print(f"re-rendered {path[:-len('.json')]}.md and soak-latest.md")
    return 0 if run["ok"] else 1


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--render":
        return rerender(args[1])
    opts = parse_args(argv)
    rings = ["sqpoll", "nosqpoll"] if opts.ring == "both" else [opts.ring]
    started = dt.datetime.now(dt.timezone.utc)
    t0 = mono()
    machine = machine_info()
    print(f"soak: {opts.duration:.0f} s of traffic per ring mode ({', '.join(rings)}), "
          f"checkpoint every {opts.checkpoint:.0f} s, seed {opts.seed}; ringd {machine['commit']}",
          flush=True)
    load0 = loadavg()
    neighbours = busy_neighbours()
    if neighbours:
        print("WARNING: other busy processes are running; timing figures will be noisy:\n  "
              + "\n  ".join(neighbours[:5]), flush=True)
    sessions = []
    tmp = tempfile.mkdtemp(prefix="ringd-soak-")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        for ring in rings:
            rng = random.Random(opts.seed)
            sdir = os.path.join(tmp, ring)
            os.makedirs(sdir, exist_ok=True)
            try:
                sessions.append(asyncio.run(run_session(opts, ring, sdir, rng)))
            except (RuntimeError, AssertionError, OSError) as e:
                print(f"soak: could not run (ring = {ring}): {e}", file=sys.stderr)
                return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        if not opts.keep:
            subprocess.run(["rm", "-rf", tmp], timeout=60)
        else:
            print(f"soak: logs kept in {tmp}")
    run = {
        "command": " ".join(["bench/soak.py"] + (argv if argv is not None else sys.argv[1:])),
        "started": started.strftime("%Y-%m-%d %H:%M"), "wall_s": round(mono() - t0, 1),
        "machine": machine, "loadavg_start": load0, "loadavg_end": loadavg(),
        "options": {k: getattr(opts, k) for k in ("duration", "checkpoint", "ring", "workers",
                                                  "concurrency", "idle_timeout",
                                                  "drain_timeout", "watchdog_timeout",
                                                  "connect_timeout", "seed", "kinds",
                                                  "chaos")},
        "bounds": BOUNDS, "load_bounds": LOAD_BOUNDS,
        "sessions": sessions, "ok": all(s["ok"] for s in sessions),
    }
    md = render(run)
    os.makedirs(opts.out, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(opts.out, f"soak-{stamp}")
    with open(base + ".json", "w") as f:
        json.dump(run, f, separators=(",", ":"), default=str)
    for path in (base + ".md", os.path.join(opts.out, "soak-latest.md")):
        with open(path, "w") as f:
            f.write(md)
    print()
    print(md)
    print(f"written: {base}.md, {base}.json and soak-latest.md in {opts.out}")
    return 0 if run["ok"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 (a bug of the soak itself: exit 2, not 1)
        import traceback
        traceback.print_exc()
        sys.exit(2)
