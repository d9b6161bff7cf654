"""The load generators: iperf3 (bulk), wrk (small requests, new
connections) and an in-process idle-connection opener. Each call is bounded
in time; none of them targets anything but 127.0.0.1."""
from __future__ import annotations

import json
import re
import selectors
import socket
import subprocess
import time

HOST = "127.0.0.1"


class LoadError(RuntimeError):
    pass


def _taskset(cpus: str | None, argv: list[str]) -> list[str]:
    return (["taskset", "-c", cpus] if cpus else []) + argv


def iperf3(port: int, streams: int, seconds: float, cpus: str | None,
           reverse: bool = False, wrap: list[str] = ()) -> dict:
    """One iperf3 client run; returns received bytes, seconds and Gbit/s.
    reverse (-R): the server sends and the client receives, i.e. the bytes
    flow backend -> proxy -> client, like a download. wrap: an argv prefix
    (the profile's perf stat)."""
    argv = list(wrap) + _taskset(cpus, ["iperf3", "-c", HOST, "-p", str(port), "-P", str(streams),
                           "-t", f"{seconds:g}", "-J", "--connect-timeout", "3000"]
                    + (["-R"] if reverse else []))
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 40)
    except subprocess.TimeoutExpired:
        raise LoadError(f"iperf3 did not finish within {seconds + 40:.0f}s")
    try:
        doc = json.loads(p.stdout)
    except json.JSONDecodeError:
        raise LoadError(f"iperf3 exit {p.returncode}: {p.stderr.strip()[:300]}")
    if doc.get("error"):
        raise LoadError(f"iperf3: {doc['error']}")
    recv = doc["end"]["sum_received"]
    return {"bytes": int(recv["bytes"]), "seconds": float(recv["seconds"]),
            "gbps": float(recv["bits_per_second"]) / 1e9,
            "retransmits": int(doc["end"].get("sum_sent", {}).get("retransmits", 0) or 0)}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise LoadError(f"wrk: cannot read latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict:
    res = {}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if not m:
        raise LoadError("wrk: no Requests/sec in output: " + out.strip()[-300:])
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m)", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)\s*$", out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["errors"] = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"),
                                               m.groups())} if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def wrk(port: int, path: str, conns: int, seconds: float, cpus: str | None,
        close: bool = False, wrap: list[str] = ()) -> dict:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "2s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}{path}")
    try:
        p = subprocess.run(list(wrap) + _taskset(cpus, argv), capture_output=True,
                           text=True, timeout=seconds + 40)
    except subprocess.TimeoutExpired:
        raise LoadError(f"wrk did not finish within {seconds + 40:.0f}s")
    if p.returncode != 0:
        raise LoadError(f"wrk exit {p.returncode}: {p.stderr.strip()[:300]}")
    return parse_wrk(p.stdout)


def http_probe(port: int, path: str, timeout: float = 2.0) -> bool:
    """One GET through whatever listens on `port`; True on a 200 whose body
    arrived whole (the benchmark's check that a proxy really forwards)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            buf = b""
            end = time.monotonic() + timeout
            while time.monotonic() < end and len(buf) < 65536:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return False
    head, _, body = buf.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.1 200") and len(body) == 64


def open_idle(port: int, count: int, timeout: float, step: int = 1000,
              caught_up=None) -> list[socket.socket]:
    """Open `count` TCP connections to 127.0.0.1:port, `step` at a time;
    after each step, `caught_up(k)` (if given) must confirm that the far end
    holds the first k. Returns the sockets once every one is established.
    Raises LoadError (after closing what it opened) on failure or past
    `timeout`."""
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    pending: dict[int, socket.socket] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < count:
            target = min(count, len(done) + step)
            while len(done) + len(pending) < target:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                err = s.connect_ex((HOST, port))
                if err not in (0, 115):         # 115 = EINPROGRESS
                    s.close()
                    raise LoadError(f"connect: errno {err} after {len(done)} connections")
                pending[s.fileno()] = s
                sel.register(s, selectors.EVENT_WRITE)
            while pending:
                if time.monotonic() > deadline:
                    raise LoadError(f"only {len(done)} of {count} idle connections "
                                    f"established within {timeout:.0f}s")
                for key, _ in sel.select(0.5):
                    s = key.fileobj
                    sel.unregister(s)
                    del pending[s.fileno()]
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        s.close()
                        raise LoadError(f"connect failed: errno {err} after "
                                        f"{len(done)} connections")
                    done.append(s)
            if caught_up is not None and not caught_up(len(done)):
                raise LoadError(f"the backend did not receive the first {len(done)} "
                                f"connections in time")
    except BaseException:
        for s in list(pending.values()) + done:
            s.close()
        raise
    finally:
        sel.close()
    return done
