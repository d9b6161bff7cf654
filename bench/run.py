#!/usr/bin/env python3
"""ringd side-by-side benchmark: direct, ringd (SQPOLL on and off), HAProxy
and nginx on loopback, interleaved, with the proxy pinned to its own CPU(s).

    .venv/bin/python bench/run.py            # full run (what `make bench` does)
    .venv/bin/python bench/run.py --quick    # smoke run: 1 repetition, short loads

See bench/README.md for what is measured and how.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import loads                      # noqa: E402
import procstat                   # noqa: E402
import report                     # noqa: E402
from systems import (Backends, HTTP_PATH, Procs, StartError, all_systems,   # noqa: E402
                     cpu_list, have)

SCENARIOS = ["bulk1", "bulk8", "bulk1r", "keepalive", "close", "idle"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 repetition, 2 s loads, 2000 idle connections; "
                         "results go to bench/results/quick/")
    ap.add_argument("--reps", type=int, help="interleaved repetitions (default 3, quick 1)")
    ap.add_argument("--duration", type=float,
                    help="seconds per iperf3/wrk run (default 5, quick 2)")
    ap.add_argument("--workers", type=int, default=1,
                    help="workers/threads for every proxy (default 1)")
    ap.add_argument("--idle-conns", type=int,
                    help="idle connections (default: 10000, or what fits in the fd limit; "
                         "quick 2000)")
    ap.add_argument("--wrk-conns", type=int, default=50, help="wrk connections (default 50)")
    ap.add_argument("--pipe-size", default="1MiB", help="ringd [ring] pipe_size (default 1MiB)")
    ap.add_argument("--ringd-ring", action="append", default=[], metavar="'KEY = VALUE'",
                    help="an extra line for ringd's [ring] table, e.g. 'notsent_lowat = 0' "
                         "(repeatable; for A/B runs of ringd's settings)")
    ap.add_argument("--client-rcvbuf", type=int, default=0,
                    help="SO_RCVBUF of client-side sockets for every proxy (ringd listener "
                         "rcvbuf, HAProxy tune.rcvbuf.client, nginx listen rcvbuf=); "
                         "default 0: the kernel's autotuning")
    ap.add_argument("--haproxy-pipesize", type=int, default=0,
                    help="HAProxy tune.pipesize in bytes (default: unset, i.e. the "
                         "kernel's 64 KiB)")
    ap.add_argument("--systems", default="direct,ringd_sqpoll,ringd_nosqpoll,haproxy,nginx",
                    help="comma list out of the default")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="comma list out of the default")
    ap.add_argument("--ringd", default=os.path.join(REPO, ".venv", "bin", "ringd"),
                    help="ringd executable (default .venv/bin/ringd)")
    ap.add_argument("--out", help="results directory (default bench/results, "
                                  "quick: bench/results/quick)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    a = ap.parse_args(argv)
    a.reps = a.reps or (1 if a.quick else 3)
    a.duration = a.duration or (2.0 if a.quick else 5.0)
    a.out = a.out or os.path.join(HERE, "results", "quick" if a.quick else "")
    a.systems = [s for s in a.systems.split(",") if s]
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    if a.reps < 1 or a.workers < 1 or a.duration <= 0:
        ap.error("--reps, --workers and --duration must be positive")
    return a


# --------------------------------------------------------------------------- setup

def pinning(opts) -> None:
    """Proxy on CPUs 0..workers-1, load generators and backends on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    n = opts.workers
    opts.separated = len(cpus) > n
    if len(cpus) > n:
        opts.proxy_cpu_ids, opts.load_cpu_ids = cpus[:n], cpus[n:]
        opts.pin_note = (f"proxy (every process and thread, incl. io_uring threads) on CPU "
                         f"{cpu_list(cpus[:n])}; iperf3 client+server, wrk, the nginx HTTP "
                         f"backend, the idle backend and this harness on CPU "
                         f"{cpu_list(cpus[n:])} (taskset / cpu-map / worker_cpu_affinity)")
    else:
        opts.proxy_cpu_ids, opts.load_cpu_ids = cpus[:n] if n <= len(cpus) else cpus, cpus
        opts.pin_note = (f"{n} workers on {len(cpus)} CPUs: proxy pinned to CPU "
                         f"{cpu_list(opts.proxy_cpu_ids)}, loads NOT separated (all CPUs)")
    opts.proxy_cpus = cpu_list(opts.proxy_cpu_ids)
    opts.load_cpus = cpu_list(opts.load_cpu_ids)


def raise_nofile(opts) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    opts.nofile_hard = hard
    # One proxied idle connection costs the proxy 2 fds, all in one process
    # with one worker; keep 200 for listeners, logs, rings, epoll, pipes.
    fits = (hard - 200) // 2 // opts.workers * opts.workers
    fits = max(100, fits // 100 * 100)
    wanted = opts.idle_conns or (2000 if opts.quick else 10000)
    opts.idle_conns = min(wanted, fits * opts.workers)
    opts.idle_note = ""
    if opts.idle_conns < wanted:
        opts.idle_note = (f"{wanted} requested, {opts.idle_conns} used: each idle connection "
                          f"holds 2 fds in the proxy's single worker process, and the hard "
                          f"RLIMIT_NOFILE here is {hard} (root cannot raise it: no "
                          f"CAP_SYS_RESOURCE), so {wanted} would need {2 * wanted}+ fds in one "
                          f"process")
    # HAProxy refuses to start when 2*maxconn + 2*maxpipes + a few > its fd
    # limit, so its maxconn is the idle count plus a little, and maxpipes 64
    # (bulk with 8 streams needs at most 18 pipes)
    opts.proxy_maxconn = opts.idle_conns + 10


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass

    def out(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    commit = out(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "native",
                            "supervisor", "worker"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": model,
        "memory": mem,
        "ringd": commit + (" (with uncommitted changes in native/ supervisor/ worker/)"
                           if dirty.strip() else ""),
        "liburing": out(["dpkg-query", "-W", "-f=${Version}", "liburing-dev"]),
        "haproxy": out(["haproxy", "-v"]),
        "nginx": out(["nginx", "-v"]),
        "iperf3": out(["iperf3", "-v"]),
        "wrk": out(["wrk", "-v"]),
    }


def busy_neighbours() -> list[str]:
    """Other processes that would skew a benchmark (test suites, builds)."""
    me = os.getpid()
    seen = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if any(w in cmd for w in ("pytest", " gcc ", "cc1 ", "pip install")):
            seen.append(f"{name}: {cmd[:100]}")
    return seen


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --------------------------------------------------------------------------- scenarios

class Runner:
    def __init__(self, opts, procs: Procs, backends: Backends):
        self.opts, self.procs, self.backends = opts, procs, backends
        self.data: dict = {}        # system key -> metric -> [values]
        self.details: list = []     # one record per measurement
        self.errors: list = []
        self.noisy: list = []       # sessions that started next to a test suite/build

    def put(self, system, metric, value):
        self.data.setdefault(system.key, {}).setdefault(metric, []).append(value)

    def cpu_before(self, system):
        return procstat.cpu_snapshot(system.pids()) if system.proxy else None

    def core_busy(self, cpus=None) -> float | None:
        """Busy seconds (everything but idle and iowait, so softirq included)
        of a set of CPUs, by default the CPUs the proxy runs on alone. The
        network stack's softirq work that a proxy's send and receive calls
        cause is charged to no process when the kernel accounts IRQ time
        apart; this counts it."""
        if not self.opts.separated:
            return None
        ids = self.opts.proxy_cpu_ids if cpus is None else cpus
        tick = os.sysconf("SC_CLK_TCK")
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in ids:
                    v = [int(x) for x in vals[:8]]
                    busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        return busy / tick

    def busy_start(self):
        """Start of a load: wall clock and busy seconds of both CPU sets."""
        return (time.monotonic(), self.core_busy(), self.core_busy(self.opts.load_cpu_ids))

    def busy_end(self, system, scen, start):
        """How busy the proxy's CPUs and the load's CPUs were during the load
        (percent of their time). Tells which side set the pace: a load CPU at
        100 % while the proxy's CPU idles means the figure is the load's.
        Returns the proxy CPUs' busy seconds (None if not separated)."""
        t0, p0, l0 = start
        if p0 is None:
            return None
        wall = time.monotonic() - t0
        proxy_s = self.core_busy() - p0
        self.put(system, f"{scen}_proxybusy",
                 100 * proxy_s / (wall * len(self.opts.proxy_cpu_ids)))
        self.put(system, f"{scen}_loadbusy",
                 100 * (self.core_busy(self.opts.load_cpu_ids) - l0)
                 / (wall * len(self.opts.load_cpu_ids)))
        return proxy_s

    def cpu_after(self, system, before):
        if not system.proxy:
            return None
        return procstat.cpu_delta(before, procstat.cpu_snapshot(system.pids()))

    def bulk(self, system, rep, streams, reverse=False):
        scen = f"bulk{streams}" + ("r" if reverse else "")
        before = self.cpu_before(system)
        busy = self.busy_start()
        res = loads.iperf3(system.ports["bulk"], streams, self.opts.duration,
                           self.opts.load_cpus, reverse=reverse)
        core_s = self.busy_end(system, scen, busy)
        cpu = self.cpu_after(system, before)
        if system.proxy and core_s is not None and res["bytes"]:
            self.put(system, f"{scen}_core10g", core_s / (res["bytes"] * 8 / 1e10))
        self.put(system, f"{scen}_gbps", res["gbps"])
        rec = {"system": system.key, "rep": rep, "scenario": scen, **res}
        if cpu:
            per10g = cpu["proc_s"] / (res["bytes"] * 8 / 1e10)
            self.put(system, f"{scen}_cpu10g", per10g)
            rec["cpu"] = cpu
            rec["cpu10g"] = per10g
            rec["cpu10g_tasks"] = cpu["tasks_s"] / (res["bytes"] * 8 / 1e10)
        self.details.append(rec)
        return f"{res['gbps']:.2f} Gbit/s" + (f", {rec['cpu10g']:.3f} CPU-s/10Gbit" if cpu else "")

    def http(self, system, rep, close):
        scen = "close" if close else "keepalive"
        before = self.cpu_before(system)
        busy = self.busy_start()
        res = loads.wrk(system.ports["http"], HTTP_PATH, self.opts.wrk_conns,
                        self.opts.duration, self.opts.load_cpus, close=close)
        core_s = self.busy_end(system, scen, busy)
        cpu = self.cpu_after(system, before)
        if system.proxy and core_s is not None and res["requests"]:
            self.put(system, f"{scen}_core100k", core_s / (res["requests"] / 1e5))
        rec = {"system": system.key, "rep": rep, "scenario": scen, **res}
        self.put(system, f"{scen}_rps", res["rps"])
        self.put(system, f"{scen}_p50", res.get("p50_ms"))
        self.put(system, f"{scen}_p99", res.get("p99_ms"))
        if cpu and res["requests"]:
            per100k = cpu["proc_s"] / (res["requests"] / 1e5)
            self.put(system, f"{scen}_cpu100k", per100k)
            rec["cpu"] = cpu
            rec["cpu100k"] = per100k
        errs = sum(res["errors"].values()) + res["non2xx"]
        self.put(system, f"{scen}_errors", errs)
        self.details.append(rec)
        return (f"{res['rps']:.0f} req/s, p50 {res.get('p50_ms', 0):.2f} ms, "
                f"p99 {res.get('p99_ms', 0):.2f} ms, errors {errs}")

    def wait_holder(self, want, timeout):
        deadline = time.monotonic() + timeout
        n = self.backends.holder_conns()
        while n != want and time.monotonic() < deadline:
            time.sleep(0.02)
            n = self.backends.holder_conns()
        return n

    def idle(self, system, rep):
        n = self.opts.idle_conns
        left = self.wait_holder(0, 15)
        if left:
            raise loads.LoadError(f"idle backend still holds {left} connections")
        time.sleep(0.3)
        base = procstat.memory(system.pids())
        slab0 = procstat.slab_objects()
        t0 = time.monotonic()
        # open in steps the backend can keep up with, so its accept queue
        # (somaxconn) never overflows and no proxy connect has to retry a SYN
        socks = loads.open_idle(system.ports["idle"], n, timeout=60,
                                caught_up=lambda k: self.wait_holder(k, 20) >= k)
        try:
            held = self.wait_holder(n, 30)
            if held != n:
                raise loads.LoadError(f"backend holds {held} of {n} connections")
            opened = time.monotonic() - t0
            time.sleep(0.5)
            full = procstat.memory(system.pids())
            slab1 = procstat.slab_objects()
        finally:
            for s in socks:
                s.close()
        per = {
            "rss": (full["rss_kib"] - base["rss_kib"]) / n,
            "pss": (full["pss_kib"] - base["pss_kib"]) / n,
            "pipe": (full["pipe_bytes"] - base["pipe_bytes"]) / 1024 / n,
        }
        per["mem"] = per["pss"] + per["pipe"]
        kobj = {k: (slab1[k][0] - slab0[k][0]) / n for k in slab1 if k in slab0}
        kobj_kib = sum((slab1[k][0] - slab0[k][0]) * slab1[k][1] for k in kobj) / 1024 / n
        for k, v in per.items():
            self.put(system, f"idle_{k}_kib", v)
        if kobj:
            self.put(system, "idle_kobj_kib", kobj_kib)
        self.details.append({"system": system.key, "rep": rep, "scenario": "idle",
                             "conns": n, "open_seconds": opened, "base": base,
                             "full": full, "per_conn_kib": per, "kernel_objects": kobj,
                             "kernel_objects_kib": kobj_kib})
        self.wait_holder(0, 15)
        return (f"{n} conns: RSS {per['rss']:.2f} KiB/conn, PSS {per['pss']:.2f}, "
                f"pipes {full['pipes'] - base['pipes']:+d} ({per['pipe']:.2f} KiB/conn); "
                f"fds {base['fds']}->{full['fds']}")

    def run_system(self, system, rep):
        o = self.opts
        t0 = time.monotonic()
        if busy_neighbours():
            self.noisy.append(f"rep {rep} {system.label}")
        try:
            system.start(self.procs, self.tmp, o)
        except (StartError, OSError, subprocess.SubprocessError) as e:
            self.errors.append(f"rep {rep} {system.label}: start failed: {e}")
            print(f"  {system.label}: START FAILED: {e}", flush=True)
            system.stop(self.procs)
            return
        if system.info:
            self.details.append({"system": system.key, "rep": rep, "scenario": "start",
                                 "info": system.info})
        try:
            for scen in o.scenarios:
                if scen == "idle" and not system.proxy:
                    continue
                try:
                    if scen == "bulk1":
                        msg = self.bulk(system, rep, 1)
                    elif scen == "bulk8":
                        msg = self.bulk(system, rep, 8)
                    elif scen == "bulk1r":
                        msg = self.bulk(system, rep, 1, reverse=True)
                    elif scen == "keepalive":
                        msg = self.http(system, rep, close=False)
                    elif scen == "close":
                        msg = self.http(system, rep, close=True)
                    else:
                        msg = self.idle(system, rep)
                except loads.LoadError as e:
                    msg = f"FAILED: {e}"
                    self.errors.append(f"rep {rep} {system.label} {scen}: {e}")
                    self.details.append({"system": system.key, "rep": rep,
                                         "scenario": f"{scen} failed", "error": str(e),
                                         "diag": system.diag(o)})
                    if scen.startswith("bulk"):
                        self.backends.restart_iperf()
                if system.proxy and system.root.poll() is not None:
                    msg += f"  [proxy exited with {system.root.returncode}]"
                    self.errors.append(f"rep {rep} {system.label}: proxy exited "
                                       f"{system.root.returncode} during {scen}")
                print(f"  {system.label:16} {scen:9} {msg}", flush=True)
                if system.proxy and system.root.poll() is not None:
                    break
            diag = system.diag(o)
            if diag is not None:
                self.details.append({"system": system.key, "rep": rep, "scenario": "end",
                                     "diag": diag})
                if diag.get("worker_restarts"):
                    self.errors.append(f"rep {rep} {system.label}: "
                                       f"{diag['worker_restarts']} worker restart(s)")
        finally:
            system.stop(self.procs)
        print(f"  {system.label:16} done in {time.monotonic() - t0:.1f}s "
              f"(elapsed {time.monotonic() - self.t_start:.0f}s)", flush=True)


# --------------------------------------------------------------------------- main

def check_tools(opts) -> list[str]:
    missing = [t for t in ("taskset", "iperf3", "wrk", "nginx") if not have(t)]
    if "haproxy" in opts.systems and not have("haproxy"):
        missing.append("haproxy")
    if any(s.startswith("ringd") for s in opts.systems) and not os.access(opts.ringd, os.X_OK):
        missing.append(opts.ringd + " (run `make venv`)")
    if not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        missing.append("libnginx-mod-stream")
    return missing


def main(argv=None) -> int:
    opts = parse_args(argv)
    command = " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                        else sys.executable, os.path.relpath(os.path.abspath(__file__), REPO)]
                       + sys.argv[1:])
    make = None
    if os.environ.get("MAKELEVEL"):          # started by `make bench`
        args = " ".join(sys.argv[1:])
        make = "make bench" + (f" BENCH_ARGS='{args}'" if args else "")
    if os.geteuid() != 0:
        print("run as root (ringd's 1 MiB pipes, SQPOLL, nofile)", file=sys.stderr)
        return 2
    missing = check_tools(opts)
    if missing:
        print("missing: " + ", ".join(missing) + " (`make bench` installs them)",
              file=sys.stderr)
        return 2
    pinning(opts)
    raise_nofile(opts)
    os.sched_setaffinity(0, set(opts.load_cpu_ids))

    def on_term(signum, frame):
        raise KeyboardInterrupt(signum)
    # SIGINT explicitly too: a shell starts background jobs with it ignored
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)

    systems = [s for s in all_systems() if s.key in opts.systems]
    if not systems:
        print("no systems selected", file=sys.stderr)
        return 2
    neighbours = busy_neighbours()
    info = machine_info()
    started = dt.datetime.now()
    per_sys = (len(opts.scenarios) * (opts.duration + 1.5) + 4)
    print(f"ringd benchmark: {len(systems)} systems x {opts.reps} reps, {opts.duration:g}s "
          f"loads, {opts.idle_conns} idle conns; roughly "
          f"{per_sys * len(systems) * opts.reps / 60:.1f} min", flush=True)
    print(f"pinning: {opts.pin_note}", flush=True)
    if neighbours:
        print("WARNING: other busy processes are running; figures will be noisy:\n  "
              + "\n  ".join(neighbours[:5]), flush=True)

    tmp = tempfile.mkdtemp(prefix="ringd-bench-")
    os.chmod(tmp, 0o755)        # nginx workers run as nobody and read www/ from here
    procs = Procs(tmp)
    backends = Backends(procs, tmp, opts.load_cpus)
    runner = Runner(opts, procs, backends)
    runner.tmp = tmp
    runner.t_start = time.monotonic()
    load_start = loadavg()
    interrupted = False
    try:
        backends.start()
        for rep in range(1, opts.reps + 1):
            print(f"repetition {rep}/{opts.reps}", flush=True)
            for system in systems:
                runner.run_system(system, rep)
    except KeyboardInterrupt:
        print("interrupted: stopping everything this run started", file=sys.stderr)
        interrupted = True
    except StartError as e:
        print(f"benchmark aborted: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)           # let the cleanup finish
        for s in systems:
            s.stop(procs)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if interrupted:
        return 130
    elapsed = time.monotonic() - runner.t_start
    meta = {
        "command": command,
        "make": make,
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "machine": info,
        "pinning": opts.pin_note,
        "reps": opts.reps,
        "duration_s": opts.duration,
        "workers": opts.workers,
        "wrk_conns": opts.wrk_conns,
        "idle_conns": opts.idle_conns,
        "idle_note": opts.idle_note,
        "pipe_size": opts.pipe_size,
        "haproxy_pipesize": opts.haproxy_pipesize,
        "client_rcvbuf": opts.client_rcvbuf,
        "ringd_ring": opts.ringd_ring,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "neighbours": neighbours,
        "noisy_sessions": runner.noisy,
        "sessions": opts.reps * len(systems),
        "errors": runner.errors,
        "quick": opts.quick,
        "systems": [[s.key, s.label] for s in systems],
    }
    os.makedirs(opts.out, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    md = report.markdown(meta, runner.data, runner.details)
    raw = {"meta": meta, "data": runner.data, "details": runner.details}
    for name in ("latest", f"bench-{stamp}"):
        with open(os.path.join(opts.out, f"{name}.md"), "w") as f:
            f.write(md)
        with open(os.path.join(opts.out, f"{name}.json"), "w") as f:
            json.dump(raw, f, indent=1, default=str)
    if not opts.no_plot:
        png = os.path.join(opts.out, "latest.png")
        why = report.plot(meta, runner.data, png)
        print(f"plot: {png}" if why is None else f"plot skipped: {why}")
    print()
    print(md)
    print(f"written: {os.path.join(opts.out, 'latest.md')} (+ bench-{stamp}.md/.json); "
          f"{elapsed:.0f}s")
    if runner.errors:
        # the report is written and lists them; a failed measurement is a
        # finding, not a broken benchmark
        print(f"{len(runner.errors)} measurement(s) failed, see 'Errors' in the report:",
              file=sys.stderr)
        for e in runner.errors:
            print("  " + e, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
