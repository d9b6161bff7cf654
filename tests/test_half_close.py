"""Clients that half-close: send, shut their side down, read the answer.

Their socket on ringd's side is in CLOSE-WAIT, and io_uring adds EPOLLRDHUP
to every poll it arms: a POLL_ADD(POLLOUT) on it completes at once whether
the socket takes more or not, and a send that finds it full ends up blocked
in an io-wq thread. ringd waits for such destinations in an epoll set of its
own (native/writable.c). Both ring modes, side by side."""
from __future__ import annotations

import concurrent.futures as cf
import random
import socket
import struct
import threading
import time

from harness import Backend, Ringd, connect, free_ports, listener, upstream

MODES = {"sqpoll": "true", "defer_taskrun": "false"}
ROUNDS = 6
CONCURRENT = 64


def _each_mode(fn):
    with cf.ThreadPoolExecutor(len(MODES)) as ex:
        futures = [ex.submit(fn, m, v) for m, v in MODES.items()]
        return [f.result(timeout=180) for f in futures]


def _round_trip(port: int, n: int, seed: int) -> str | None:
    """Echo n bytes with a half-close; None if every byte and the EOF came back."""
    rng = random.Random(seed)
    data = rng.randbytes(n)
    slow = rng.random() < 0.5          # some readers leave ringd's socket full
    got = bytearray()
    err: list[str] = []
    with connect(port, timeout=20) as s:
        def reader():
            try:
                while True:
                    chunk = s.recv(65536 if slow else 1 << 20)
                    if not chunk:
                        return
                    got.extend(chunk)
                    if slow:
                        time.sleep(0.002)
            except OSError as e:
                err.append(repr(e))
        t = threading.Thread(target=reader)
        t.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        t.join(30)
    if err or t.is_alive():
        what = "no EOF" if bytes(got) == data else "short"
        return f"{n} B: {what} after {len(got)} B ({err[0] if err else 'timed out'})"
    return None if bytes(got) == data else f"{n} B: got {len(got)} B, bytes differ"


def test_half_closed_round_trips_end_with_every_byte_and_the_eof(tmp_path):
    """64 concurrent echo round trips of 1 B to 3 MiB, each client
    half-closing after it sent, 6 times, in both ring modes at once: every
    byte comes back, then the EOF, nothing stays open, and the workers do
    not spin on their polls."""

    def run(mode, sqpoll):
        bport, port = free_ports(2)
        conf = (f"[ring]\nsqpoll = {sqpoll}\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{bport}"]))
        with Backend("echo", [bport]), Ringd(tmp_path / mode, conf, workers=2) as r:
            failures = []
            for rnd in range(ROUNDS):
                rng = random.Random(rnd)
                sizes = [max(1, int(2 ** rng.uniform(0, 21.6))) for _ in range(CONCURRENT)]
                with cf.ThreadPoolExecutor(CONCURRENT) as ex:
                    res = ex.map(lambda a: _round_trip(port, *a),
                                 [(n, rnd * 1000 + k) for k, n in enumerate(sizes)])
                    failures += [f for f in res if f]
            assert not failures, f"{mode}: {len(failures)} of {ROUNDS * CONCURRENT}: {failures[:5]}"
            st = r.status()
            assert sum(w["active"] for w in st["workers"]) == 0, (mode, st["workers"])
            # a busy loop on a poll shows as completions by the million
            cqes = sum(w["cqes"] for w in st["workers"])
            assert cqes < 200 * ROUNDS * CONCURRENT, (mode, cqes)
            r.assert_no_traceback()

    _each_mode(run)


def test_full_socket_of_a_half_closed_client_is_waited_for_not_polled_in_a_loop(tmp_path):
    """A client that half-closed and reads 4 KiB every 50 ms from a large
    download: ringd's socket to it stays full. Over 3 s the worker must
    handle a few dozen completions (ticks, writes), not a busy loop of
    polls that come back at once with EPOLLRDHUP."""

    def run(mode, sqpoll):
        bport, port = free_ports(2)
        conf = (f"[ring]\nsqpoll = {sqpoll}\nnotsent_lowat = 0\n" + listener("web", port, "app")
                + upstream("app", [f"127.0.0.1:{bport}"]))
        with Backend("duplex", [bport]), Ringd(tmp_path / mode, conf, workers=1) as r:
            with connect(port, timeout=10) as s:
                s.sendall(struct.pack("!Q", 64 << 20))
                s.shutdown(socket.SHUT_WR)
                s.settimeout(10)
                got = 0
                while got < 1 << 20:          # the pipe and buffers are full by now
                    got += len(s.recv(1 << 20))
                before = r.status()["workers"][0]
                t0 = time.monotonic()
                while time.monotonic() - t0 < 3:
                    chunk = s.recv(4096)
                    assert chunk
                    time.sleep(0.05)
                after = r.status()["workers"][0]
            cqes = after["cqes"] - before["cqes"]
            assert cqes < 1000, f"{mode}: {cqes} completions in 3 s"
            r.assert_no_traceback()

    _each_mode(run)
