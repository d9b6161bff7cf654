#!/usr/bin/env python3
"""ringd's CPU per new TLS connection: no routes, 1 route, 1,000 routes.

    .venv/bin/python bench/sni.py [--seconds 3] [--reps 3] [--clients 4]

One ringd worker (sqpoll off, DEFER_TASKRUN), an echo backend
(tests/backend.py), client threads that each loop: connect, send a real
ClientHello (Python's ssl, SNI set), read the echo, close. Measured: the CPU
time of ringd's processes (master + worker, /proc utime + stime) per
connection, for three listeners run interleaved:

  none     no [[listener.route]]: no peek, connect at once (the baseline)
  route1   one route; the name matches it
  route1k  1,000 routes of two names each (exact + wildcard); the client's
           name matches the last route's wildcard, so the lookup walks every
           label of the name

route1 - none is the cost of the peek (one recv into a buffer, the parse, one
extra send to the server); route1k - route1 the cost of a big table. Results
go to bench/results/sni-<time>.{md,json} and sni-latest.md. The host is
shared: the figures are only as steady as the other load on it."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))

import hostinfo                   # noqa: E402
import procstat                   # noqa: E402
from parser_corpus import ssl_hello   # noqa: E402

NAME = "x.edge999.example.net"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp: str, variant: str, port: int, bport: int) -> str:
    routes = {"none": 0, "route1": 1, "route1k": 1000}[variant]
    lines = [f'[ringd]\nworkers = 1\npidfile = "{tmp}/ringd.pid"\n'
             f'control_socket = "{tmp}/ringd.sock"\nlog_format = "json"\n'
             f'[ring]\nsqpoll = false\n'
             f'[[listener]]\nname = "tls"\nlisten = "127.0.0.1:{port}"\nupstream = "app"\n']
    first = 1000 - routes
    for i in range(first, 1000):
        lines.append(f'[[listener.route]]\nsni = ["h{i}.example.com", "*.edge{i}.example.net"]\n'
                     f'upstream = "app"\nname = "r{i}"\n')
    lines.append(f'[upstream.app]\nservers = ["127.0.0.1:{bport}"]\n')
    return "".join(lines)


class Load:
    def __init__(self, port: int, hello: bytes, clients: int):
        self.port, self.hello, self.clients = port, hello, clients
        self.count = 0
        self.errors = 0
        self.lock = threading.Lock()

    def run(self, seconds: float) -> int:
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=self._client, args=(stop,)) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
        return self.count

    def _client(self, stop: float) -> None:
        n = err = 0
        while time.monotonic() < stop:
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", self.port))
                s.sendall(self.hello)
                if not s.recv(16):
                    err += 1
                else:
                    n += 1
            except OSError:
                err += 1
            finally:
                s.close()
        with self.lock:
            self.count += n
            self.errors += err


def run_variant(opts, variant: str, hello: bytes, bport: int) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"ringd-sni-{variant}-")
    port = free_port()
    path = os.path.join(tmp, "ringd.toml")
    with open(path, "w") as f:
        f.write(config(tmp, variant, port, bport))
    log = open(os.path.join(tmp, "ringd.log"), "wb")
    proc = subprocess.Popen([opts.ringd, "start", "-c", path], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        Load(port, hello, 1).run(0.5)                    # warm up
        pids = procstat.tree(proc.pid)
        before = procstat.cpu_snapshot(pids)
        load = Load(port, hello, opts.clients)
        t0 = time.monotonic()
        n = load.run(opts.seconds)
        wall = time.monotonic() - t0
        cpu = procstat.cpu_delta(before, procstat.cpu_snapshot(pids))
        return {"variant": variant, "connections": n, "errors": load.errors,
                "conn_per_s": n / wall, "cpu_s": cpu["proc_s"],
                "cpu_us_per_conn": 1e6 * cpu["proc_s"] / n if n else None}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="load per run (3)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    ap.add_argument("--clients", type=int, default=4, help="client threads (4)")
    ap.add_argument("--ringd", default=os.path.join(REPO, ".venv", "bin", "ringd"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    opts = ap.parse_args()
    hello = ssl_hello(NAME)
    bport = free_port()
    backend = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "backend.py"), "echo",
                                str(bport)], stdout=subprocess.PIPE, text=True)
    try:
        assert backend.stdout.readline().strip() == "READY"
        rows = []
        for rep in range(opts.reps):
            for variant in ("none", "route1", "route1k"):
                r = run_variant(opts, variant, hello, bport)
                r["rep"] = rep
                rows.append(r)
                print(f"rep {rep} {variant:8} {r['connections']:6} conns "
                      f"{r['conn_per_s']:7.0f}/s  ringd {r['cpu_us_per_conn']:.1f} µs CPU/conn"
                      f"  errors {r['errors']}", flush=True)
    finally:
        backend.kill()
    host = hostinfo.host(None)
    med = {}
    for variant in ("none", "route1", "route1k"):
        vals = sorted(r["cpu_us_per_conn"] for r in rows if r["variant"] == variant)
        med[variant] = vals[len(vals) // 2]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    L = [f"# ringd CPU per new TLS connection: SNI routes ({stamp} UTC)", ""]
    L += hostinfo.header_lines(host)
    L += [f"- load: {opts.clients} client threads, {opts.seconds:g} s per run, {opts.reps} "
          f"interleaved repetitions; ClientHello {len(hello)} bytes, SNI {NAME}",
          f"- load average at the end: {os.getloadavg()}", "",
          "| listener | ringd CPU µs per connection (median) | runs (µs) | conn/s |",
          "|---|---|---|---|"]
    for variant in ("none", "route1", "route1k"):
        rs = [r for r in rows if r["variant"] == variant]
        L.append(f"| {variant} | {med[variant]:.1f} | "
                 + ", ".join(f"{r['cpu_us_per_conn']:.1f}" for r in rs) + " | "
                 + ", ".join(f"{r['conn_per_s']:.0f}" for r in rs) + " |")
    L += ["", f"peek (route1 - none): {med['route1'] - med['none']:+.1f} µs; "
          f"1,000 routes (route1k - route1): {med['route1k'] - med['route1']:+.1f} µs per connection"]
    text = "\n".join(L) + "\n"
    print(text)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, f"sni-{stamp}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(opts.out, "sni-latest.md"), "w") as f:
        f.write(text)
    with open(os.path.join(opts.out, f"sni-{stamp}.json"), "w") as f:
        json.dump({"host": host, "rows": rows, "median": med}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
