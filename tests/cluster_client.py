"""Client side of the namespace cluster test (tests/netns_cluster.py), run inside
the client namespace as `python cluster_client.py VIP PORT`.

It talks JSON lines on stdin/stdout, one reply per request:

  {"op": "loop_start", "threads": 2, "pause": 0.01}
        short connections in a loop: connect, read the backend's "PEER <proxy
        host address>" line, one echo exchange, close; each is recorded as
        [start, end, peer or null, error]
  {"op": "loop_take"}     the records since the last take
  {"op": "loop_stop"}     stop the loop threads (and take what is left)
  {"op": "long_open", "tag": "A", "n": 8}
        n long-lived connections, each exchanging a few bytes every 100 ms until
        closed; the reply lists the proxy host each one went through
  {"op": "long_check", "tag": "A"}   per connection: peer, exchanges, error so far
  {"op": "long_close", "tag": "A"}   half-close each, expect the echo's EOF,
                                     report as long_check does
  {"op": "probe", "sources": ["192.0.2.10", ...], "per_source": 6}
        short connections from each source address: [source, proxy host,
        backend port, error] each (the `hash` balancing check)
  {"op": "quit"}

Times are time.monotonic(), the same clock as the orchestrator's (one kernel,
no time namespace). Every socket operation has a timeout.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time

# generous: on a loaded 2-core machine a process can stall for a second or
# two, and that is not what the figures are about
CONNECT_TIMEOUT = 3.0
IO_TIMEOUT = 5.0
LONG_PERIOD = 0.1


def _read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 256:
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def _peer_line(s: socket.socket) -> tuple[str, int]:
    """(proxy host address, backend port) from the backend's first line."""
    line = _read_line(s)
    parts = line.split()
    if len(parts) != 3 or parts[0] != b"PEER" or not line.endswith(b"\n"):
        raise ConnectionError(f"no PEER line from the backend: {line!r}")
    return parts[1].decode(), int(parts[2])


def _exchange(s: socket.socket, data: bytes) -> None:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(len(data) - len(got))
        if not chunk:
            raise ConnectionError(f"EOF after {len(got)} of {len(data)} echoed bytes")
        got += chunk
    if got != data:
        raise ConnectionError("echo differs")


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timeout"
    if isinstance(e, OSError) and e.errno is not None:
        return f"{type(e).__name__}: {e.strerror}"
    return f"{type(e).__name__}: {e}"


class Loop:
    def __init__(self, vip: str, port: int):
        self.vip, self.port = vip, port
        self.records: list[list] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self, threads: int, pause: float) -> None:
        self.stop.clear()
        for i in range(threads):
            t = threading.Thread(target=self._run, args=(i, pause), daemon=True)
            t.start()
            self.threads.append(t)

    def _one(self, i: int, n: int) -> list:
        t0 = time.monotonic()
        s = socket.socket()
        s.settimeout(CONNECT_TIMEOUT)
        peer, err = None, ""
        try:
            s.connect((self.vip, self.port))
            s.settimeout(IO_TIMEOUT)
            peer = _peer_line(s)[0]
            _exchange(s, b"loop %d %d\n" % (i, n))
            s.shutdown(socket.SHUT_WR)
            if s.recv(1) != b"":
                raise ConnectionError("data after the echo")
        except (OSError, ConnectionError) as e:
            err = _describe(e)
            peer = None
        finally:
            s.close()
        return [t0, time.monotonic(), peer, err]

    def _run(self, i: int, pause: float) -> None:
        n = 0
        while not self.stop.is_set():
            rec = self._one(i, n)
            n += 1
            with self.lock:
                self.records.append(rec)
            self.stop.wait(pause)

    def take(self) -> list:
        with self.lock:
            out, self.records = self.records, []
        return out

    def halt(self) -> list:
        self.stop.set()
        for t in self.threads:
            t.join(CONNECT_TIMEOUT + 2 * IO_TIMEOUT + 1)
        self.threads = []
        return self.take()


class LongFlow:
    def __init__(self, vip: str, port: int, n: int):
        self.n = n
        self.peer = None
        self.exchanges = 0
        self.error = ""
        self.error_at = None
        self.closed_ok = False
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.settimeout(CONNECT_TIMEOUT)
        self.sock.connect((vip, port))
        self.sock.settimeout(IO_TIMEOUT)
        self.peer = _peer_line(self.sock)[0]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                _exchange(self.sock, b"long %d %d\n" % (self.n, self.exchanges))
                self.exchanges += 1
                self.stop.wait(LONG_PERIOD)
        except (OSError, ConnectionError) as e:
            self.error = _describe(e)
            self.error_at = time.monotonic()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(IO_TIMEOUT + 1)
        if not self.error:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                if self.sock.recv(1) != b"":
                    raise ConnectionError("data after the echo")
                self.closed_ok = True
            except (OSError, ConnectionError) as e:
                self.error = _describe(e)
                self.error_at = time.monotonic()
        self.sock.close()

    def report(self) -> dict:
        return {"peer": self.peer, "exchanges": self.exchanges, "error": self.error,
                "error_at": self.error_at, "closed_ok": self.closed_ok}


def probe(vip: str, port: int, sources: list[str], per_source: int) -> list[list]:
    out = []
    for _ in range(per_source):
        for src in sources:
            s = socket.socket()
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.bind((src, 0))
                s.connect((vip, port))
                s.settimeout(IO_TIMEOUT)
                host, backend = _peer_line(s)
                _exchange(s, b"probe\n")
                out.append([src, host, backend, ""])
            except (OSError, ConnectionError) as e:
                out.append([src, None, None, _describe(e)])
            finally:
                s.close()
    return out


def main(vip: str, port: int) -> None:
    loop = Loop(vip, port)
    longs: dict[str, list[LongFlow]] = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        reply: dict = {"ok": True}
        try:
            if op == "loop_start":
                loop.start(req.get("threads", 2), req.get("pause", 0.01))
            elif op == "loop_take":
                reply["records"] = loop.take()
            elif op == "loop_stop":
                reply["records"] = loop.halt()
            elif op == "probe":
                reply["records"] = probe(vip, port, req["sources"], req.get("per_source", 6))
            elif op == "long_open":
                flows = longs.setdefault(req["tag"], [])
                for i in range(req["n"]):
                    flows.append(LongFlow(vip, port, len(flows)))
                reply["peers"] = [f.peer for f in flows]
            elif op == "long_check":
                reply["flows"] = [f.report() for f in longs.get(req["tag"], [])]
            elif op == "long_close":
                flows = longs.pop(req["tag"], [])
                for f in flows:
                    f.close()
                reply["flows"] = [f.report() for f in flows]
            elif op == "quit":
                loop.halt()
                for flows in longs.values():
                    for f in flows:
                        f.close()
                print(json.dumps(reply), flush=True)
                return
            else:
                reply = {"ok": False, "error": f"unknown op {op}"}
        except (OSError, ConnectionError) as e:
            reply = {"ok": False, "error": _describe(e)}
        reply["now"] = time.monotonic()
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
