"""Connections that ringd ends before their peers do: the idle timeout must
only end connections where nothing moves, and every cut (idle timeout,
drain deadline) must reach both peers as a reset, never as a FIN that an
EOF-delimited protocol would read as a complete transfer. Both ring modes,
side by side."""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import socket
import struct
import threading
import time

from harness import Backend, Ringd, connect, free_ports, listener, upstream, wait_for
from backend import pattern

MODES = {"sqpoll": "true", "defer_taskrun": "false"}


def _both_modes(fn, variants=("",)):
    """Run fn(name, sqpoll_value, variant) for both ring modes (and each
    variant) at once; re-raise the first failure."""
    runs = {(m, v): (sq, v) for m, sq in MODES.items() for v in variants}
    with cf.ThreadPoolExecutor(len(runs)) as ex:
        futures = {k: ex.submit(fn, "-".join(x for x in k if x).replace(" ", ""), *a)
                   for k, a in runs.items()}
        return {k: f.result(timeout=120) for k, f in futures.items()}


class SlowRead:
    """Reads `chunk` bytes every `interval` seconds (after `fast_after`
    seconds: as fast as it can), until EOF, a reset or `limit` seconds."""

    def __init__(self, sock: socket.socket, chunk: int = 4096, interval: float = 0.05,
                 fast_after: float = 1e9, limit: float = 60, shut_after: int | None = None):
        self.sock, self.chunk, self.interval = sock, chunk, interval
        self.fast_after, self.limit = fast_after, limit
        self.shut_after = shut_after     # half-close once this many bytes arrived
        self.data = bytearray()
        self.end = ""
        self.seconds = 0.0

    def run(self) -> "SlowRead":
        t0 = time.monotonic()
        self.sock.settimeout(5)
        while True:
            elapsed = time.monotonic() - t0
            if elapsed > self.limit:
                self.end = "limit"
                break
            fast = elapsed > self.fast_after
            try:
                got = self.sock.recv(1 << 20 if fast else self.chunk)
            except ConnectionResetError:
                self.end = "reset"
                break
            except socket.timeout:
                continue
            if not got:
                self.end = "eof"
                break
            self.data += got
            if self.shut_after is not None and len(self.data) >= self.shut_after:
                self.shut_after = None
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass      # reset meanwhile: the next recv says so
            if not fast:
                time.sleep(self.interval)
        self.seconds = time.monotonic() - t0
        return self


def _download(port: int, n: int, halfclose: bool = True) -> socket.socket:
    """A duplex-backend download of n bytes: the client sends the count (and,
    with halfclose, its EOF at once), the backend sends n bytes, then, once
    the client's EOF came, the SHA-256 of what it read (of nothing) and
    closes."""
    s = connect(port, timeout=10)
    s.sendall(struct.pack("!Q", n))
    if halfclose:
        s.shutdown(socket.SHUT_WR)
    return s


# client behaviour: (half-close at once, [ring] lines)
SLOW_READERS = {
    "open": (False, ""),
    "open-lowat0": (False, "notsent_lowat = 0"),
    "halfclosed": (True, ""),
}


def test_slow_readers_outlive_the_idle_timeout(tmp_path):
    """idle_timeout = 3s and clients reading 4 KiB every 50 ms (~80 KB/s)
    for 10 s, then as fast as they can. The kernel keeps sending from ringd's
    socket long after ringd's last write: the socket stays unwritable under
    notsent_lowat (with notsent_lowat = 0, until a third of the whole send
    buffer is free: many seconds at that pace). That is progress, not
    idleness. The download is larger than every buffer on the way, so ringd
    is in the middle of it the whole time. Every byte arrives, then the EOF.
    Clients that keep their side open, and one that half-closed at once."""
    n = 32 << 20

    def run(name, sqpoll, reader):
        halfclose, ring = SLOW_READERS[reader]
        bport, port = free_ports(2)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n{ring}\n"
                + listener("web", port, "app", idle_timeout="3s", access_log=True)
                + upstream("app", [f"127.0.0.1:{bport}"]))
        with Backend("duplex", [bport]), Ringd(tmp_path / name, conf, workers=1) as r:
            with _download(port, n, halfclose=halfclose) as s:
                rd = SlowRead(s, fast_after=10, limit=60, shut_after=None if halfclose else n)
                rd.run()
            assert rd.end == "eof", (name, rd.end, len(rd.data), rd.seconds,
                                     [(e["end"], e["duration_ms"], e["bytes_out"])
                                      for e in r.wait_event("access", timeout=5)])
            assert len(rd.data) == n + 32, (name, len(rd.data), rd.seconds, [
                (e["event"], e.get("status"), e.get("reason")) for e in r.log_lines()
                if e.get("level") in ("warning", "error")])
            assert hashlib.sha256(rd.data[:n]).digest() == \
                hashlib.sha256(pattern(n, seed=n)).digest(), name
            [ev] = r.wait_event("access", timeout=10)
            assert ev["end"] == "done", (name, ev)
            r.assert_no_traceback()

    _both_modes(run, variants=tuple(SLOW_READERS))


def test_a_reader_that_stops_is_reset_at_the_idle_timeout(tmp_path):
    """The other side of the progress check: a client that stops reading
    lets the buffers fill, then nothing moves (its zero window acknowledges
    nothing new), and the idle timeout resets the download."""

    def run(name, sqpoll, _):
        bport, port = free_ports(2)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n"
                + listener("web", port, "app", idle_timeout="1s", access_log=True)
                + upstream("app", [f"127.0.0.1:{bport}"]))
        with Backend("duplex", [bport]), Ringd(tmp_path / name, conf, workers=1) as r:
            with _download(port, 100 << 20) as s:
                s.settimeout(5)
                assert s.recv(4096)
                t0 = time.monotonic()
                [ev] = r.wait_event("access", timeout=15)
                took = time.monotonic() - t0
                assert ev["end"] == "timeout", (name, ev)
                assert 1.0 < took < 6.0, (name, took)
                rd = SlowRead(s, fast_after=0, limit=20).run()
                assert rd.end == "reset", (name, rd.end, len(rd.data))
            r.assert_no_traceback()

    _both_modes(run)


def test_idle_timeout_resets_both_peers(tmp_path):
    """A connection where nothing moves is closed at the idle timeout with a
    reset on both sides: the client's and the server's recv fail."""

    def run(mode, sqpoll, _):
        port = free_ports(1)[0]
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n"
                + listener("web", port, "app", idle_timeout="600ms")
                + upstream("app", [f"127.0.0.1:{srv.getsockname()[1]}"]))
        with srv, Ringd(tmp_path / mode, conf, workers=1) as r:
            with connect(port) as c:
                c.sendall(b"x")
                srv.settimeout(5)
                b, _ = srv.accept()
                with b:
                    b.settimeout(5)
                    assert b.recv(1) == b"x"
                    b.sendall(b"y")
                    assert c.recv(1) == b"y"
                    t0 = time.monotonic()
                    c.settimeout(5)
                    try:
                        got = c.recv(1)
                    except ConnectionResetError:
                        got = None
                    took = time.monotonic() - t0
                    assert got is None, f"{mode}: the client got {got!r} (EOF), not a reset"
                    assert 0.55 < took < 3.0, (mode, took)
                    try:
                        bgot = b.recv(1)
                    except ConnectionResetError:
                        bgot = None
                    assert bgot is None, f"{mode}: the server got {bgot!r} (EOF), not a reset"
            wait_for(lambda: r.status()["workers"][0]["active"] == 0, 5, what="closed")
            r.assert_no_traceback()

    _both_modes(run)


def test_drain_deadline_cut_is_a_reset(tmp_path):
    """drain_timeout = 2s and a reload during a slow download: at the
    deadline the old worker cuts the download, and the client must see a
    reset (after whatever was already on its way), never a clean EOF."""
    n = 100 << 20

    def run(mode, sqpoll, _):
        bport, port = free_ports(2)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{bport}"]))
        with Backend("duplex", [bport]), \
                Ringd(tmp_path / mode, conf, workers=1,
                      # the drain itself is under test: no handover
                      extra_ringd='drain_timeout = "2s"\nhandover = false\n') as r:
            with _download(port, n) as s:
                rd = SlowRead(s, fast_after=6, limit=30)
                t = threading.Thread(target=rd.run)
                t.start()
                wait_for(lambda: len(rd.data) > 65536, 10, what="download under way")
                res = r.cli("reload", "-c", str(r.conf))
                assert res.returncode == 0, res.stderr
                r.wait_event("worker_closed_connections", timeout=10, closed=1, gen=1)
                t.join(40)
            assert rd.end == "reset", (mode, rd.end, len(rd.data))
            assert len(rd.data) < n
            r.assert_no_traceback()

    _both_modes(run)


def test_client_reset_under_a_blocked_send_reaches_the_server_as_a_reset(tmp_path):
    """A client that uploads, reads nothing and then resets, while ringd's
    send of the server's reply to it is blocked (its window is shut) and the
    upload direction waits for more: the server must see a reset, never an
    EOF after the upload (a cut upload that looks complete). The reset's
    error is taken by whichever call looks first; when the ring's blocked
    send took it, the upload's read found only the end of the stream and
    ringd forwarded it as a FIN (the soak's client_reset "lost"; 16 of 20 in
    SQPOLL mode, 1 of 20 with DEFER_TASKRUN before the fix)."""
    rounds, up, down = 20, 1 << 20, 48 << 10

    def run(mode, sqpoll, _):
        port = free_ports(1)[0]
        srv = _server()
        # a small send buffer towards the client: its window shuts after a
        # few KiB and ringd's send of the reply stays in flight (copy mode:
        # the reply is below splice_threshold); the upload is spliced
        conf = (f"[ring]\nsqpoll = {sqpoll}\n"
                + listener("web", port, "app", sndbuf="4KiB")
                + upstream("app", [f"127.0.0.1:{srv.getsockname()[1]}"]))
        ends = {}
        with srv, Ringd(tmp_path / mode, conf, workers=1) as r:
            for _ in range(rounds):
                c = socket.socket()
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                c.settimeout(10)
                with c:
                    c.connect(("127.0.0.1", port))
                    b, _ = srv.accept()
                    with b:
                        b.settimeout(10)
                        reply = threading.Thread(target=_send_quietly, args=(b, down))
                        reply.start()
                        upload = threading.Thread(target=c.sendall, args=(b"u" * up,))
                        upload.start()
                        got = 0
                        while got < up:
                            chunk = b.recv(1 << 20)
                            assert chunk, f"{mode}: EOF after {got} of {up} upload bytes"
                            got += len(chunk)
                        upload.join(10)
                        assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        c.close()
                        try:
                            end = "eof" if not b.recv(1 << 16) else "data"
                        except ConnectionResetError:
                            end = "reset"
                        reply.join(10)
                        ends[end] = ends.get(end, 0) + 1
            wait_for(lambda: r.status()["workers"][0]["active"] == 0, 10, what="closed")
            r.assert_no_traceback()
        assert ends == {"reset": rounds}, f"{mode}: the server saw {ends}"

    _both_modes(run)


def _server() -> socket.socket:
    """A plain listening socket on 127.0.0.1 standing in for the server,
    so that the test sees exactly what ringd sends it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(10)
    return srv


def _send_quietly(sock: socket.socket, n: int) -> None:
    try:
        sock.sendall(b"d" * n)
    except OSError:
        pass      # the reset reached this side first


def _end_seen(s: socket.socket) -> str:
    try:
        return "eof" if not s.recv(1 << 16) else "data"
    except ConnectionResetError:
        return "reset"


def _open_pairs(port: int, srv: socket.socket, mode: str) -> list:
    """Three connections through ringd to srv, each (kind, client, server):
    one mid-download (the server has sent more than the sockets and pipes
    hold), one idle, one half-closed by its client (its FIN forwarded)."""
    pairs = []
    for kind in ("download", "idle", "halfclosed"):
        c = connect(port, timeout=10)
        c.sendall(b"x")
        b, _ = srv.accept()
        b.settimeout(10)
        assert b.recv(1) == b"x"
        if kind == "download":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            b.setblocking(False)
            try:
                while True:
                    b.send(b"d" * 65536)
            except BlockingIOError:
                pass
            b.settimeout(10)
        elif kind == "halfclosed":
            c.shutdown(socket.SHUT_WR)
            assert b.recv(1) == b"", f"{mode}: the client's FIN was not forwarded"
        pairs.append((kind, c, b))
    return pairs


# what both peers of _open_pairs' connections must see when ringd cuts them
CUT = {"download": ("reset", "reset"), "idle": ("reset", "reset"), "halfclosed": ("reset", "-")}


def _ends(pairs) -> dict:
    """How each connection of _open_pairs ended, per peer (client, server);
    closes them. The download's bytes already on their way are read first."""
    seen = {}
    for kind, c, b in pairs:
        with c, b:
            c.settimeout(10)
            end = "data"
            while end == "data":
                end = _end_seen(c)
            seen[kind] = (end, _end_seen(b) if kind != "halfclosed" else "-")
    return seen


def test_a_killed_worker_resets_its_connections_never_a_fin(tmp_path):
    """A worker that dies (SIGKILL here; the watchdog's kill or a crash are
    the same) closes nothing itself: the kernel closes its sockets, and
    without SO_LINGER 0 on them that is a FIN, which any protocol that ends
    at EOF reads as a complete transfer. Both peers must see a reset: a
    connection mid-download, one idle, one half-closed by its client. A
    natural end on the replacement worker is still a FIN on both sides."""
    import os
    import signal

    def run(mode, sqpoll, _):
        port = free_ports(1)[0]
        srv = _server()
        conf = (f"[ring]\nsqpoll = {sqpoll}\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{srv.getsockname()[1]}"]))
        with srv, Ringd(tmp_path / mode, conf, workers=1) as r:
            pairs = _open_pairs(port, srv, mode)
            victim = r.status()["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            seen = _ends(pairs)
            assert seen == CUT, f"{mode}: {seen}"
            wait_for(lambda: (lambda w: w["pid"] not in (None, victim) and w["state"] == "ready")(
                r.status()["workers"][0]), 10, what="worker replaced")
            with connect(port, timeout=10) as c:
                c.sendall(b"z")
                b, _ = srv.accept()
                with b:
                    b.settimeout(10)
                    assert b.recv(1) == b"z"
                    b.sendall(b"w")
                    b.shutdown(socket.SHUT_WR)
                    assert c.recv(1) == b"w"
                    assert c.recv(1) == b"", f"{mode}: no FIN after a natural end"
                    c.shutdown(socket.SHUT_WR)
                    assert b.recv(1) == b"", f"{mode}: the server got no FIN"

    _both_modes(run)


def test_a_fast_stop_and_a_drain_cut_short_reset_connections(tmp_path):
    """The other two ways ringd ends connections it did not see finish:
    `ringd stop --now`, and a generation cut short because more generations
    drain than max_draining_generations allows. Both peers of a download, an
    idle and a half-closed connection must see a reset, never a FIN."""

    def run(mode, sqpoll, variant):
        port = free_ports(1)[0]
        srv = _server()
        conf = (f"[ring]\nsqpoll = {sqpoll}\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{srv.getsockname()[1]}"]))
        # connections must stay in their generation: no handover
        extra = ('drain_timeout = "60s"\nmax_draining_generations = 1\nhandover = false\n')
        with srv, Ringd(tmp_path / mode, conf, workers=1, extra_ringd=extra) as r:
            pairs = _open_pairs(port, srv, mode)
            if variant == "stop-now":
                res = r.cli("stop", "--now", "-c", str(r.conf))
                assert res.returncode == 0, res.stderr
                seen = _ends(pairs)
                assert seen == CUT, f"{mode}: {seen}"
                assert r.wait_exit(15) == 0
                return
            # generation 1 drains with the three; generation 2 gets one of its
            # own, and the reload after that makes two draining generations
            assert r.cli("reload", "-c", str(r.conf)).returncode == 0
            wait_for(lambda: r.status()["generation"] == 2, 10, what="generation 2")
            keep = connect(port, timeout=10)
            keep.sendall(b"k")
            kb, _ = srv.accept()
            with keep, kb:
                kb.settimeout(10)
                assert kb.recv(1) == b"k"
                assert r.cli("reload", "-c", str(r.conf)).returncode == 0
                r.wait_event("drain_cut_short", timeout=10, gen=1)
                seen = _ends(pairs)
                assert seen == CUT, f"{mode}: {seen}"
                # generation 2's connection still forwards
                kb.sendall(b"w")
                keep.settimeout(10)
                assert keep.recv(1) == b"w"
            r.assert_no_traceback()

    _both_modes(run, variants=("stop-now", "cut-short"))
