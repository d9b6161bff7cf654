#!/usr/bin/env python3
# Over 450 lines: the benchmark driver, every scenario and mode behind one command line.
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
import shlex
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
import hostinfo                   # noqa: E402
import perfprof                   # noqa: E402
from systems import (Backends, HTTP_PATH, Procs, StartError, ab_systems,    # noqa: E402
                     all_systems, cpu_list, have)

SCENARIOS = ["idlecpu", "bulk1", "bulk8", "bulk1r", "keepalive", "close", "idle"]
# what --profile profiles (idle memory has no per-unit work to count)
PROFILE_SCENARIOS = ["idlecpu", "bulk1", "bulk8", "bulk1r", "keepalive", "close"]
LOADS = ("bulk1", "bulk8", "bulk1r", "keepalive", "close")


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
    ap.add_argument("--host-sysctl", action="append", default=[], metavar="KEY=VALUE",
                    help="a kernel setting applied for the whole run and put back at its "
                         "end (repeatable): a sysctl name (net.core.skb_defer_max=0) or an "
                         "absolute path under /sys (/sys/module/haltpoll/parameters/"
                         "guest_halt_poll_ns=200000); the report names it")
    ap.add_argument("--systems",
                    help="comma list out of direct,ringd_sqpoll,ringd_nosqpoll,haproxy,nginx,"
                         "haproxy_splice (HAProxy splicing every byte) (default: all but "
                         "haproxy_splice; in an A/B run: only the A/B variants)")
    ap.add_argument("--scenarios",
                    help=f"comma list out of {','.join(SCENARIOS)} (default: all; "
                         f"--profile: {','.join(PROFILE_SCENARIOS)})")
    ap.add_argument("--idle-seconds", type=float,
                    help="length of each idle-CPU window (default 3, quick 2)")
    ap.add_argument("--ringd", default=os.path.join(REPO, ".venv", "bin", "ringd"),
                    help="ringd executable (default .venv/bin/ringd)")
    prof = ap.add_argument_group(
        "profile mode", "where the work goes: per scenario and system, syscalls, io_uring "
        "SQEs/CQEs/enters, context switches (perf stat on tracepoints) and a perf record -g "
        "of the proxy's CPU, each in a pass of its own next to the timed pass")
    prof.add_argument("--profile", action="store_true",
                      help="profile mode (default 1 repetition); writes profile-*.md/.json")
    prof.add_argument("--perf-freq", type=int, default=1999,
                      help="perf record sampling frequency in Hz (default 1999)")
    prof.add_argument("--top", type=int, default=15, help="symbols listed per profile (15)")
    ab = ap.add_argument_group(
        "A/B runs", "two ringd builds and/or [ring] settings, interleaved (A then B, B then A "
        "in the next repetition); the report gives B/A per row with min-max over the "
        "repetitions; writes ab-*.md/.json")
    ab.add_argument("--ringd-a", metavar="PATH",
                    help="build A: a ringd executable, a venv, or a worktree with .venv "
                         "(default: --ringd)")
    ab.add_argument("--ringd-b", metavar="PATH", help="build B (default: --ringd)")
    ab.add_argument("--ring-a", action="append", default=[], metavar="'KEY = VALUE'",
                    help="an extra [ring] line for A only (repeatable)")
    ab.add_argument("--ring-b", action="append", default=[], metavar="'KEY = VALUE'",
                    help="an extra [ring] line for B only (repeatable)")
    ab.add_argument("--ab-modes", default="nosqpoll,sqpoll",
                    help="ring modes of the A/B pair: nosqpoll,sqpoll (default both)")
    ap.add_argument("--out", help="results directory (default bench/results, "
                                  "quick: bench/results/quick)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--note", default="",
                    help="a line printed in bold under the report's title (e.g. that the "
                         "machine was busy)")
    a = ap.parse_args(argv)
    a.ab = bool(a.ringd_a or a.ringd_b or a.ring_a or a.ring_b)
    a.reps = a.reps or (1 if a.quick or (a.profile and not a.ab) else 3)
    a.duration = a.duration or (2.0 if a.quick else 5.0)
    a.idle_seconds = a.idle_seconds or (2.0 if a.quick else 3.0)
    a.out = a.out or os.path.join(HERE, "results", "quick" if a.quick else "")
    if a.systems is None:
        a.systems = "" if a.ab else ",".join(s.key for s in all_systems()
                                             if s.key != "haproxy_splice")
    a.systems = [s for s in a.systems.split(",") if s]
    known = [s.key for s in all_systems()]
    for s in a.systems:
        if s not in known:
            ap.error(f"unknown system {s!r}")
    if a.scenarios is None:
        a.scenarios = ",".join(PROFILE_SCENARIOS if a.profile else SCENARIOS)
    a.scenarios = [s for s in a.scenarios.split(",") if s]
    for s in a.scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    a.ab_modes = [m for m in a.ab_modes.split(",") if m]
    for m in a.ab_modes:
        if m not in ("nosqpoll", "sqpoll"):
            ap.error(f"unknown --ab-modes entry {m!r} (nosqpoll, sqpoll)")
    for kv in a.host_sysctl:
        if "=" not in kv or not kv.split("=", 1)[0].strip():
            ap.error(f"--host-sysctl {kv!r}: want KEY=VALUE, e.g. net.core.skb_defer_max=0")
    if a.reps < 1 or a.workers < 1 or a.duration <= 0 or a.idle_seconds <= 0:
        ap.error("--reps, --workers, --duration and --idle-seconds must be positive")
    if a.ab:
        try:
            a.ab_sides = [ab_side("A", a.ringd_a or a.ringd, a.ring_a),
                          ab_side("B", a.ringd_b or a.ringd, a.ring_b)]
        except ValueError as e:
            ap.error(str(e))
        if a.ab_sides[0]["exe"] == a.ab_sides[1]["exe"] and a.ring_a == a.ring_b:
            ap.error("A and B are the same build with the same settings")
    return a


def ab_side(name: str, spec: str, ring: list[str]) -> dict:
    """Resolve an A/B build: a ringd executable, a venv (bin/ringd) or a
    worktree/checkout (.venv/bin/ringd); describe it by its git commit."""
    spec = os.path.abspath(spec)
    for cand in (spec, os.path.join(spec, "bin", "ringd"),
                 os.path.join(spec, ".venv", "bin", "ringd")):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            exe = cand
            break
    else:
        raise ValueError(f"--ringd-{name.lower()} {spec}: no ringd executable there (nor "
                         f"bin/ringd, .venv/bin/ringd); run `make venv` in that worktree")
    # the checkout the venv was built from: the venv's parent for .venv/bin/ringd
    d = os.path.dirname(os.path.dirname(exe))
    src = os.path.dirname(d) if os.path.basename(d) == ".venv" else d
    commit = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "native",
                            "supervisor", "worker"], capture_output=True, text=True).stdout
    return {"name": name, "exe": exe, "ring": list(ring), "source": src,
            "commit": (commit or "?") + (" (uncommitted changes)" if dirty.strip() else "")}


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
    # the commit that last changed what runs (a bench-only commit on top
    # leaves ringd itself as it was)
    code = out(["git", "-C", REPO, "log", "-1", "--format=%h", "--", "native",
                "supervisor", "worker", "pyproject.toml", "setup.py"])
    if code not in ("?", commit):
        commit += f" (ringd's code as of {code})"
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


busy_neighbours = hostinfo.busy_neighbours
loadavg = hostinfo.loadavg


# --------------------------------------------------------------------------- scenarios

class Runner:
    def __init__(self, opts, procs: Procs, backends: Backends):
        self.opts, self.procs, self.backends = opts, procs, backends
        self.data: dict = {}        # system key -> metric -> [values]
        self.by_rep: dict = {}      # system key -> metric -> {rep: value} (A/B ratios)
        self.details: list = []     # one record per measurement
        self.errors: list = []
        self.noisy: list = []       # sessions that started next to a test suite/build
        self.rep = 0

    def put(self, system, metric, value):
        self.data.setdefault(system.key, {}).setdefault(metric, []).append(value)
        if value is not None:
            self.by_rep.setdefault(system.key, {}).setdefault(metric, {})[self.rep] = value

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
        """Start of a load: wall clock and busy seconds of both CPU sets, and
        the wake-up IPIs the proxy's CPUs have received."""
        return (time.monotonic(), self.core_busy(), self.core_busy(self.opts.load_cpu_ids),
                hostinfo.wakeup_ipis(self.opts.proxy_cpu_ids))

    def put_ipis(self, system, scen, start, units: float) -> None:
        """Wake-up IPIs (function-call and reschedule interrupts) the proxy's
        CPUs received since busy_start, per unit: in a VM whose idle vCPUs
        halt, each one costs the CPU that sent it (the load's) an exit."""
        now = hostinfo.wakeup_ipis(self.opts.proxy_cpu_ids)
        if start[3] is not None and now is not None and units:
            self.put(system, f"{scen}_ipis", (now - start[3]) / units)

    def busy_end(self, system, scen, start):
        """How busy the proxy's CPUs and the load's CPUs were during the load
        (percent of their time). Tells which side set the pace: a load CPU at
        100 % while the proxy's CPU idles means the figure is the load's.
        Returns the busy seconds of the proxy's CPUs and of the load's CPUs
        (None, None if they are not separated)."""
        t0, p0, l0, _ = start
        if p0 is None:
            return None, None
        wall = time.monotonic() - t0
        proxy_s = self.core_busy() - p0
        load_s = self.core_busy(self.opts.load_cpu_ids) - l0
        self.put(system, f"{scen}_proxybusy",
                 100 * proxy_s / (wall * len(self.opts.proxy_cpu_ids)))
        self.put(system, f"{scen}_loadbusy", 100 * load_s / (wall * len(self.opts.load_cpu_ids)))
        return proxy_s, load_s

    def cpu_after(self, system, before):
        if not system.proxy:
            return None
        return procstat.cpu_delta(before, procstat.cpu_snapshot(system.pids()))

    # ------------------------------------------------------------------ loads

    def run_load(self, system, scen, wrap=()):
        """One load of a scenario; returns (result, units of work): MB moved
        for the bulk scenarios, requests (= connections for close) for wrk."""
        o = self.opts
        if scen.startswith("bulk"):
            streams = 8 if scen == "bulk8" else 1
            res = loads.iperf3(system.ports["bulk"], streams, o.duration, o.load_cpus,
                               reverse=scen == "bulk1r", wrap=wrap)
            return res, res["bytes"] / 1e6
        res = loads.wrk(system.ports["http"], HTTP_PATH, o.wrk_conns, o.duration,
                        o.load_cpus, close=scen == "close", wrap=wrap)
        return res, res["requests"]

    def bulk(self, system, rep, scen):
        before = self.cpu_before(system)
        busy = self.busy_start()
        res, _ = self.run_load(system, scen)
        core_s, load_s = self.busy_end(system, scen, busy)
        cpu = self.cpu_after(system, before)
        per = res["bytes"] * 8 / 1e10 if res["bytes"] else 0
        if system.proxy and core_s is not None and per:
            self.put(system, f"{scen}_core10g", core_s / per)
        if core_s is not None and per:
            # both CPU sets: on loopback a proxy can move TCP work to the load CPU
            self.put(system, f"{scen}_total10g", (core_s + load_s) / per)
            self.put(system, f"{scen}_load10g", load_s / per)
        self.put(system, f"{scen}_gbps", res["gbps"])
        rec = {"system": system.key, "rep": rep, "scenario": scen, **res}
        if cpu and per:
            per10g = cpu["proc_s"] / per
            self.put(system, f"{scen}_cpu10g", per10g)
            rec["cpu"] = cpu
            rec["cpu10g"] = per10g
            rec["cpu10g_tasks"] = cpu["tasks_s"] / per
        self.details.append(rec)
        return f"{res['gbps']:.2f} Gbit/s" + (f", {rec['cpu10g']:.3f} CPU-s/10Gbit"
                                              if "cpu10g" in rec else "")

    def http(self, system, rep, scen):
        before = self.cpu_before(system)
        busy = self.busy_start()
        res, _ = self.run_load(system, scen)
        core_s, load_s = self.busy_end(system, scen, busy)
        cpu = self.cpu_after(system, before)
        per = res["requests"] / 1e5
        self.put_ipis(system, scen, busy, res["requests"])
        if system.proxy and core_s is not None and per:
            self.put(system, f"{scen}_core100k", core_s / per)
        if core_s is not None and per:
            self.put(system, f"{scen}_total100k", (core_s + load_s) / per)
            self.put(system, f"{scen}_load100k", load_s / per)
        rec = {"system": system.key, "rep": rep, "scenario": scen, **res}
        self.put(system, f"{scen}_rps", res["rps"])
        self.put(system, f"{scen}_p50", res.get("p50_ms"))
        self.put(system, f"{scen}_p99", res.get("p99_ms"))
        if cpu and per:
            per100k = cpu["proc_s"] / per
            self.put(system, f"{scen}_cpu100k", per100k)
            rec["cpu"] = cpu
            rec["cpu100k"] = per100k
        errs = sum(res["errors"].values()) + res["non2xx"]
        self.put(system, f"{scen}_errors", errs)
        self.details.append(rec)
        return (f"{res['rps']:.0f} req/s, p50 {res.get('p50_ms', 0):.2f} ms, "
                f"p99 {res.get('p99_ms', 0):.2f} ms, errors {errs}")

    # ------------------------------------------------------------------ profile passes

    def count_pass(self, system, rep, scen):
        """The load again, counted: perf stat on the proxy's processes (every
        thread, io_uring's included), on the backends' processes, and around
        the load generator itself. Per unit of work of this pass's load."""
        tag = f"{system.key}-{scen}-{rep}"
        pev, lev = perfprof.proxy_events(), perfprof.load_events()
        counters = []
        try:
            pc = bc = None
            if system.proxy:
                pc = perfprof.Counter(self.procs, self.tmp, f"perf-proxy-{tag}", pev,
                                      pids=system.pids())
                counters.append(pc)
            bc = perfprof.Counter(self.procs, self.tmp, f"perf-backends-{tag}", lev,
                                  pids=self.backends.pids())
            counters.append(bc)
            # page flow per CPU side (whole CPUs: softirq and deferred frees
            # run in whatever task is there)
            pgev = perfprof.page_events()
            pg = {}
            if pgev and self.opts.separated:
                for side, cpus in (("load", self.opts.load_cpus),
                                   ("proxy", self.opts.proxy_cpus)):
                    pg[side] = perfprof.Counter(self.procs, self.tmp, f"perf-pages-{side}-{tag}",
                                                pgev, cpus=cpus)
                    counters.append(pg[side])
            wrap, client_out = perfprof.stat_wrap(self.tmp, f"perf-client-{tag}", lev)
            for c in counters:
                c.enable()
            before = self.cpu_before(system)
            tasks0 = procstat.task_snapshot(system.pids()) if system.proxy else None
            try:
                res, units = self.run_load(system, scen, wrap=wrap)
            finally:
                for c in counters:
                    c.disable()
            cpu = self.cpu_after(system, before)
            tasks1 = procstat.task_snapshot(system.pids()) if system.proxy else None
            prox = pc.result() if pc else {}
            back = bc.result()
            with open(client_out) as f:
                client = perfprof.parse_stat_csv(f.read(), lev)
            pages = {side: c.result() for side, c in pg.items()}
        finally:
            for c in counters:
                c.finish()
        if not units:
            raise loads.LoadError("the counted load moved nothing")

        def per(v):
            return None if v is None else v / units
        load_sys = (back.get("syscalls") or 0) + (client.get("syscalls") or 0)
        load_cs = (back.get("cs") or 0) + (client.get("cs") or 0)
        self.put(system, f"{scen}_p_load_sys", load_sys / units)
        self.put(system, f"{scen}_p_load_cs", load_cs / units)
        for side, counts in pages.items():
            for k, v in counts.items():
                if v is not None:
                    self.put(system, f"{scen}_p_{side}_{k}", v / units)
        rec = {"system": system.key, "rep": rep, "scenario": f"{scen} counted",
               "units": units, "load": res, "proxy": prox, "backends": back,
               "client": client, "pages": pages}
        if system.proxy:
            # coverage check: perf's task-clock of the proxy's threads against
            # /proc's CPU time of its processes over the same load. Far below
            # 100 % would mean the counters missed threads.
            if cpu and cpu["proc_s"] > 0 and prox.get("task_clock") is not None:
                rec["coverage"] = prox["task_clock"] / 1e3 / cpu["proc_s"]
                self.put(system, f"{scen}_p_coverage", 100 * rec["coverage"])
            for k in ("syscalls", "cs", "sqe", "cqe", "async", "pollarm", "taskadd",
                      "localrun"):
                if k in prox:
                    self.put(system, f"{scen}_p_{k}", per(prox[k]))
            self.put(system, f"{scen}_p_enter", per(prox.get("sys_io_uring_enter")))
            # the same switches split by kind, from each thread's status
            # (threads alive at both readings)
            d = procstat.task_delta(tasks0, tasks1, 1.0, None)
            procs_ = list(d["workers"].values())
            self.put(system, f"{scen}_p_vcs", sum(w["vol_per_s"] for w in procs_) / units)
            self.put(system, f"{scen}_p_ics", sum(w["invol_per_s"] for w in procs_) / units)
            known = sum(v or 0 for k, v in prox.items() if k.startswith("sys_"))
            rec["syscalls_per_unit"] = {k[4:]: v / units for k, v in prox.items()
                                        if k.startswith("sys_") and v}
            # the named events and the total are switched on together but not
            # atomically: a count of a few off either way is noise, not "other"
            rec["syscalls_per_unit"]["other"] = max(0.0, (prox.get("syscalls") or 0)
                                                    - known) / units
        self.details.append(rec)
        if not system.proxy:
            return f"load side {load_sys / units:.2f} syscalls/unit"
        ent = prox.get("sys_io_uring_enter") or 0
        return (f"{(prox.get('syscalls') or 0) / units:.2f} syscalls, "
                f"{(prox.get('sqe') or 0) / units:.2f} SQEs, {ent / units:.2f} enters, "
                f"{(prox.get('cs') or 0) / units:.2f} cs per unit")

    def record_pass(self, system, rep, scen):
        """The load again, sampled: perf record -g of the proxy's CPUs."""
        o = self.opts
        rec = perfprof.Recorder(self.procs, self.tmp, f"perf-record-{system.key}-{scen}-{rep}",
                                o.proxy_cpus, o.perf_freq)
        try:
            pids = set(system.pids())
            rec.enable()
            try:
                res, units = self.run_load(system, scen)
            finally:
                rec.disable()
            samples = rec.samples()
        finally:
            rec.finish()
        master = system.root.pid if len(pids) > 1 else None
        summ = perfprof.summarize(samples, pids, o.perf_freq, top=o.top, master=master)
        cats = summ["categories_pct"]
        self.put(system, f"{scen}_p_tcp_pct", cats.get("TCP/IP + socket layer", 0.0))
        # every category, 0 where it got no sample, so that medians over
        # repetitions exist for each (the report's "CPU per unit by category")
        for c in perfprof.CATEGORY_NAMES:
            self.put(system, f"{scen}_p_cat_{perfprof.slug(c)}", cats.get(c, 0.0))
        self.details.append({"system": system.key, "rep": rep, "scenario": f"{scen} profiled",
                             "units": units, "load": res, "profile": summ})
        top = summ["top_self"][0] if summ["top_self"] else ("-", "", 0)
        return (f"{summ['proxy_samples']} samples; TCP/IP {cats.get('TCP/IP + socket layer', 0):.0f} %"
                f"; top {top[0]} {top[2]:.1f} %")

    # ------------------------------------------------------------------ idle

    def idle_cpu(self, system, rep, when):
        """CPU of an idle proxy (no connection at all): CPU-seconds per second
        per worker process, io_uring's threads (the SQPOLL poller iou-sqp-*)
        included, from the threads' schedstat (ns). `when`: "fresh" right
        after the start, "after" once every load is over. In the profile mode
        the same window is counted with perf too (syscalls, enters per
        second)."""
        o = self.opts
        pids = system.pids()
        master = system.root.pid if len(pids) > 1 else None
        time.sleep(0.5 if when == "fresh" else 1.0)
        # profile mode: the same window counted, the workers and the master
        # apart (the per-worker figure must not carry the master's calls)
        counters = {}
        if o.profile:
            groups = {"workers": [p for p in pids if p != master]}
            if master is not None:
                groups["master"] = [master]
            for g, gp in groups.items():
                counters[g] = perfprof.Counter(
                    self.procs, self.tmp, f"perf-idle-{g}-{system.key}-{when}-{rep}",
                    perfprof.proxy_events(), pids=gp)
        counts = {}
        try:
            for c in counters.values():
                c.enable()
            before = procstat.task_snapshot(pids)
            t0 = time.monotonic()
            time.sleep(o.idle_seconds)
            after = procstat.task_snapshot(pids)
            secs = time.monotonic() - t0
            for c in counters.values():
                c.disable()
            counts = {g: c.result() for g, c in counters.items()}
        finally:
            for c in counters.values():
                c.finish()
        d = procstat.task_delta(before, after, secs, master)
        n = o.workers
        wk = d["workers"].values()
        per_worker = sum(w["cpu_per_s"] for w in wk) / n
        total = per_worker * n + (d["master"]["cpu_per_s"] if d["master"] else 0.0)
        tag = "idlecpu" if when == "fresh" else "idlecpu_after"
        self.put(system, f"{tag}_worker", per_worker)
        self.put(system, f"{tag}_total", total)
        self.put(system, f"{tag}_sqp", sum(w["by_class"]["iou-sqp"] for w in wk) / n)
        self.put(system, f"{tag}_wakeups",
                 sum(w["vol_per_s"] + w["invol_per_s"] for w in wk) / n)
        rec = {"system": system.key, "rep": rep, "scenario": tag, "idle": d}
        if counts:
            rec["counts_per_s"] = {g: {k: (v or 0) / secs for k, v in c.items()}
                                   for g, c in counts.items()}
            w = counts["workers"]
            self.put(system, f"{tag}_syscalls", (w.get("syscalls") or 0) / secs / n)
            self.put(system, f"{tag}_enters", (w.get("sys_io_uring_enter") or 0) / secs / n)
        self.details.append(rec)
        sqp = sum(w["by_class"]["iou-sqp"] for w in wk) / n
        return (f"{per_worker:.4f} CPU-s/s per worker (iou-sqp {sqp:.4f}), "
                f"whole proxy {total:.4f}")

    # ------------------------------------------------------------------ memory

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

    def step(self, system, rep, scen, what, fn) -> bool:
        """Run one measurement; print and record its outcome. False if the
        proxy died (the session ends)."""
        o = self.opts
        name = scen if what == "timed" else f"{scen} {what}"
        try:
            msg = fn()
        except (loads.LoadError, perfprof.PerfError, OSError,
                subprocess.SubprocessError) as e:
            msg = f"FAILED: {e}"
            self.errors.append(f"rep {rep} {system.label} {name}: {e}")
            self.details.append({"system": system.key, "rep": rep,
                                 "scenario": f"{name} failed", "error": str(e),
                                 "diag": system.diag(o)})
            if scen.startswith("bulk"):
                self.backends.restart_iperf()
        alive = not (system.proxy and system.root.poll() is not None)
        if not alive:
            msg += f"  [proxy exited with {system.root.returncode}]"
            self.errors.append(f"rep {rep} {system.label}: proxy exited "
                               f"{system.root.returncode} during {name}")
        print(f"  {system.label:18} {name:18} {msg}", flush=True)
        return alive

    def run_system(self, system, rep):
        o = self.opts
        self.rep = rep
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
            alive = True
            for scen in o.scenarios:
                if scen in ("idle", "idlecpu") and not system.proxy:
                    continue
                if scen == "idlecpu":
                    alive = self.step(system, rep, scen, "timed",
                                      lambda: self.idle_cpu(system, rep, "fresh"))
                elif scen == "idle":
                    alive = self.step(system, rep, scen, "timed",
                                      lambda: self.idle(system, rep))
                else:
                    fn = self.bulk if scen.startswith("bulk") else self.http
                    alive = self.step(system, rep, scen, "timed",
                                      lambda: fn(system, rep, scen))
                    if alive and o.profile:
                        alive = self.step(system, rep, scen, "counted",
                                          lambda: self.count_pass(system, rep, scen))
                    if alive and o.profile and system.proxy:
                        alive = self.step(system, rep, scen, "profiled",
                                          lambda: self.record_pass(system, rep, scen))
                if not alive:
                    break
            # the same idle measurement once the loads are over: a proxy
            # that keeps a timer or a poller busy after traffic shows here
            if (alive and system.proxy and "idlecpu" in o.scenarios
                    and any(s in LOADS or s == "idle" for s in o.scenarios)):
                self.wait_holder(0, 15)
                self.step(system, rep, "idlecpu", "after loads",
                          lambda: self.idle_cpu(system, rep, "after"))
            diag = system.diag(o)
            if diag is not None:
                self.details.append({"system": system.key, "rep": rep, "scenario": "end",
                                     "diag": diag})
                if diag.get("worker_restarts"):
                    self.errors.append(f"rep {rep} {system.label}: "
                                       f"{diag['worker_restarts']} worker restart(s)")
        finally:
            system.stop(self.procs)
        print(f"  {system.label:18} done in {time.monotonic() - t0:.1f}s "
              f"(elapsed {time.monotonic() - self.t_start:.0f}s)", flush=True)


# --------------------------------------------------------------------------- main

def check_tools(opts) -> list[str]:
    missing = [t for t in ("taskset", "iperf3", "wrk", "nginx") if not have(t)]
    if "haproxy" in opts.systems and not have("haproxy"):
        missing.append("haproxy")
    if any(s.startswith("ringd") for s in opts.systems) and not os.access(opts.ringd, os.X_OK):
        missing.append(opts.ringd + " (run `make venv`)")
    if opts.profile:
        why = perfprof.available()
        if why:
            missing.append(why)
    if not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        missing.append("libnginx-mod-stream")
    return missing


def main(argv=None) -> int:
    opts = parse_args(argv)
    # the note is printed under the title; the command shows where it went
    argv_shown = ["(the note above)" if i and sys.argv[i - 1] == "--note" else a
                  for i, a in enumerate(sys.argv)][1:]
    command = " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                        else sys.executable, os.path.relpath(os.path.abspath(__file__), REPO)]
                       + argv_shown)
    make = None
    if os.environ.get("MAKELEVEL"):          # started by `make bench` / `make bench-profile`
        target = os.environ.get("BENCH_MAKE_TARGET", "bench")
        args = shlex.join(a for a in argv_shown if not (target == "bench-profile"
                                                         and a == "--profile"))
        make = f"make {target}" + (f" BENCH_ARGS={shlex.quote(args)}" if args else "")
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
    if opts.ab:
        systems = ab_systems(opts.ab_sides[0], opts.ab_sides[1], opts.ab_modes) + systems
    if not systems:
        print("no systems selected", file=sys.stderr)
        return 2
    neighbours = busy_neighbours()
    try:
        sysctl_old = hostinfo.sysctl_set(opts.host_sysctl)
    except OSError as e:
        print(f"--host-sysctl: {e}", file=sys.stderr)
        return 2
    try:
        info = machine_info()
        # the syscall loop runs on the proxy's CPU, before any backend starts
        host = hostinfo.host(opts.proxy_cpu_ids[0])
        started = dt.datetime.now()
        passes = 3 if opts.profile else 1
        per_sys = (sum((opts.duration + 1.5) * passes if s in LOADS else
                       (2 * opts.idle_seconds + 2 if s == "idlecpu" else opts.duration + 1.5)
                       for s in opts.scenarios) + 4)
        print(f"ringd benchmark: {len(systems)} systems x {opts.reps} reps, {opts.duration:g}s "
              f"loads, {opts.idle_conns} idle conns; roughly "
              f"{per_sys * len(systems) * opts.reps / 60:.1f} min", flush=True)
        print(f"pinning: {opts.pin_note}", flush=True)
        print(f"host: {host['cpu_model']}, kernel {host['kernel']}, syscall "
              f"{host['syscall'].get('ns')} ns", flush=True)
        if neighbours:
            print("WARNING: other busy processes are running; figures will be noisy:\n  "
                  + "\n  ".join(neighbours[:5]), flush=True)

        tmp = tempfile.mkdtemp(prefix="ringd-bench-")
        os.chmod(tmp, 0o755)        # nginx workers run as nobody and read www/ from here
        perf_check = None
        if opts.profile:
            # the counters the profile relies on, on a workload of known counts
            perf_check = perfprof.self_check(tmp)
            print(f"perf counter check: {'exact' if perf_check.get('ok') else perf_check}",
                  flush=True)
        procs = Procs(tmp)
        backends = Backends(procs, tmp, opts.load_cpus)
        runner = Runner(opts, procs, backends)
        runner.tmp = tmp
        runner.t_start = time.monotonic()
        load_start = loadavg()
        interrupted = False
    except BaseException:
        hostinfo.sysctl_restore(sysctl_old)
        raise
    try:
        backends.start()
        for rep in range(1, opts.reps + 1):
            print(f"repetition {rep}/{opts.reps}", flush=True)
            order = systems
            if opts.ab and rep % 2 == 0:
                # B before A in every other repetition, so a drift of the host
                # during the run does not favour one side
                order = []
                for i in range(0, 2 * len(opts.ab_modes), 2):
                    order += [systems[i + 1], systems[i]]
                order += systems[2 * len(opts.ab_modes):]
            for system in order:
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
        hostinfo.sysctl_restore(sysctl_old)
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
        "host_sysctl": opts.host_sysctl,
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
        "host": host,
        "busy_note": opts.note,
        "idle_seconds": opts.idle_seconds,
        "profile": opts.profile,
        "perf_freq": opts.perf_freq,
        "perf_check": perf_check,
        "scenarios": opts.scenarios,
        "ab": ({"sides": opts.ab_sides, "modes": opts.ab_modes} if opts.ab else None),
    }
    os.makedirs(opts.out, exist_ok=True)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    md = report.markdown(meta, runner.data, runner.details, runner.by_rep)
    raw = {"meta": meta, "data": runner.data, "by_rep": runner.by_rep,
           "details": runner.details}
    kind = "ab" if opts.ab else "profile" if opts.profile else "bench"
    latest = "latest" if kind == "bench" else f"{kind}-latest"
    for name in (latest, f"{kind}-{stamp}"):
        with open(os.path.join(opts.out, f"{name}.md"), "w") as f:
            f.write(md)
        with open(os.path.join(opts.out, f"{name}.json"), "w") as f:
            json.dump(raw, f, indent=1, default=str)
    if not opts.no_plot and kind == "bench":
        png = os.path.join(opts.out, "latest.png")
        why = report.plot(meta, runner.data, png)
        print(f"plot: {png}" if why is None else f"plot skipped: {why}")
    print()
    print(md)
    print(f"written: {os.path.join(opts.out, latest + '.md')} (+ {kind}-{stamp}.md/.json); "
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
