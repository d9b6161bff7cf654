# Over 450 lines: every table and plot of a run's report, rendered from one JSON.
"""Turns the collected figures into the Markdown report and the PNG plot."""
from __future__ import annotations

import statistics

import hostinfo
import perfprof

# key, label, unit, which way is better, decimals
METRICS = [
    ("bulk1_gbps", "bulk, 1 stream", "Gbit/s", "higher", 2),
    ("bulk1_cpu10g", "bulk, 1 stream: proxy CPU", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk1_core10g", "bulk, 1 stream: proxy's CPU incl. softirq", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk1_total10g", "bulk, 1 stream: total CPU of both CPUs (proxy + load)", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk1_load10g", "bulk, 1 stream: of which the load CPU (info)", "CPU-s / 10 Gbit", "info", 3),
    ("bulk1_proxybusy", "bulk, 1 stream: proxy CPU busy (info)", "% of proxy CPUs", "info", 0),
    ("bulk1_loadbusy", "bulk, 1 stream: load CPU busy (info)", "% of load CPUs", "info", 0),
    ("bulk8_gbps", "bulk, 8 streams", "Gbit/s", "higher", 2),
    ("bulk8_cpu10g", "bulk, 8 streams: proxy CPU", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk8_core10g", "bulk, 8 streams: proxy's CPU incl. softirq", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk8_total10g", "bulk, 8 streams: total CPU of both CPUs (proxy + load)", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk8_load10g", "bulk, 8 streams: of which the load CPU (info)", "CPU-s / 10 Gbit", "info", 3),
    ("bulk8_proxybusy", "bulk, 8 streams: proxy CPU busy (info)", "% of proxy CPUs", "info", 0),
    ("bulk8_loadbusy", "bulk, 8 streams: load CPU busy (info)", "% of load CPUs", "info", 0),
    ("bulk1r_gbps", "bulk download (iperf3 -R), 1 stream", "Gbit/s", "higher", 2),
    ("bulk1r_cpu10g", "bulk download, 1 stream: proxy CPU", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk1r_core10g", "bulk download, 1 stream: proxy's CPU incl. softirq", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk1r_total10g", "bulk download, 1 stream: total CPU of both CPUs (proxy + load)", "CPU-s / 10 Gbit", "lower", 3),
    ("bulk1r_load10g", "bulk download, 1 stream: of which the load CPU (info)", "CPU-s / 10 Gbit", "info", 3),
    ("bulk1r_proxybusy", "bulk download, 1 stream: proxy CPU busy (info)", "% of proxy CPUs", "info", 0),
    ("bulk1r_loadbusy", "bulk download, 1 stream: load CPU busy (info)", "% of load CPUs", "info", 0),
    ("keepalive_rps", "keepalive 64 B", "req/s", "higher", 0),
    ("keepalive_p50", "keepalive p50", "ms", "lower", 2),
    ("keepalive_p99", "keepalive p99", "ms", "lower", 2),
    ("keepalive_cpu100k", "keepalive: proxy CPU", "CPU-s / 100k req", "lower", 3),
    ("keepalive_core100k", "keepalive: proxy's CPU incl. softirq", "CPU-s / 100k req", "lower", 3),
    ("keepalive_total100k", "keepalive: total CPU of both CPUs (proxy + load)", "CPU-s / 100k req", "lower", 3),
    ("keepalive_load100k", "keepalive: of which the load CPU (info)", "CPU-s / 100k req", "info", 3),
    ("keepalive_ipis", "keepalive: wake-up IPIs to the proxy's CPU (info)", "per request", "info", 3),
    ("keepalive_proxybusy", "keepalive: proxy CPU busy (info)", "% of proxy CPUs", "info", 0),
    ("keepalive_loadbusy", "keepalive: load CPU busy (info)", "% of load CPUs", "info", 0),
    ("close_rps", "Connection: close", "conn/s", "higher", 0),
    ("close_p99", "Connection: close p99", "ms", "lower", 2),
    ("close_cpu100k", "Connection: close: proxy CPU", "CPU-s / 100k conn", "lower", 3),
    ("close_core100k", "Connection: close: proxy's CPU incl. softirq", "CPU-s / 100k conn", "lower", 3),
    ("close_total100k", "Connection: close: total CPU of both CPUs (proxy + load)", "CPU-s / 100k conn", "lower", 3),
    ("close_load100k", "Connection: close: of which the load CPU (info)", "CPU-s / 100k conn", "info", 3),
    ("close_ipis", "Connection: close: wake-up IPIs to the proxy's CPU (info)", "per connection", "info", 3),
    ("close_proxybusy", "Connection: close: proxy CPU busy (info)", "% of proxy CPUs", "info", 0),
    ("close_loadbusy", "Connection: close: load CPU busy (info)", "% of load CPUs", "info", 0),
    ("idlecpu_worker", "idle: CPU per worker, fresh start", "CPU-s per s", "lower", 4),
    ("idlecpu_after_worker", "idle: CPU per worker, after the loads", "CPU-s per s", "lower", 4),
    ("idlecpu_sqp", "idle: of which SQPOLL thread (info)", "CPU-s per s", "info", 4),
    ("idlecpu_total", "idle: whole proxy incl. master, fresh (info)", "CPU-s per s", "info", 4),
    ("idlecpu_wakeups", "idle: context switches per worker, fresh", "per s", "lower", 1),
    ("idlecpu_syscalls", "idle: syscalls per worker, fresh (profile)", "per s", "lower", 1),
    ("idlecpu_enters", "idle: io_uring_enter per worker, fresh (profile)", "per s", "lower", 1),
    ("idle_mem_kib", "idle: memory/conn (PSS + pipes)", "KiB", "lower", 2),
    ("idle_pss_kib", "idle: PSS/conn", "KiB", "lower", 2),
    ("idle_rss_kib", "idle: RSS/conn", "KiB", "lower", 2),
    ("idle_pipe_kib", "idle: pipe capacity/conn", "KiB", "lower", 2),
    ("idle_kobj_kib", "idle: kernel io_kiocb + epoll items/conn (info)", "KiB", "lower", 2),
]
RINGD = [("ringd_sqpoll", "ringd sqpoll"), ("ringd_nosqpoll", "ringd no-sqpoll")]


def _vals(data, sys_key, metric):
    return [v for v in data.get(sys_key, {}).get(metric, []) if v is not None]


def med(data, sys_key, metric):
    v = _vals(data, sys_key, metric)
    return statistics.median(v) if v else None


def _num(x, dec):
    if x is None:
        return "–"
    if dec == 0:
        return f"{x:,.0f}"
    return f"{x:,.{dec}f}"


def _cell(data, sys_key, metric, dec):
    v = _vals(data, sys_key, metric)
    if not v:
        return "–"
    m = statistics.median(v)
    if len(v) == 1:
        return _num(m, dec)
    return f"{_num(m, dec)} [{_num(min(v), dec)}–{_num(max(v), dec)}]"


def _ratio(data, a, b, metric):
    x, y = med(data, a, metric), med(data, b, metric)
    if x is None or y is None or y == 0:
        return None
    return x / y


def _fmt_ratio(r):
    return "–" if r is None else f"{r:.2f}x"


def goals(data):
    """(goal text, target text, {ringd key: (ratio, met)}) rows."""
    rows = []

    def add(text, target, metric, other, op, limit):
        res = {}
        for key, _ in RINGD:
            r = _ratio(data, key, other, metric)
            met = None if r is None else (r >= limit if op == ">=" else r <= limit)
            res[key] = (r, met)
        rows.append((text, target, res))

    for s in ("1", "8"):
        n = "1 stream" if s == "1" else "8 streams"
        add(f"bulk {n}: throughput vs HAProxy", ">= 1.5x", f"bulk{s}_gbps", "haproxy", ">=", 1.5)
        add(f"bulk {n}: throughput vs direct", ">= 0.8x", f"bulk{s}_gbps", "direct", ">=", 0.8)
        add(f"bulk {n}: proxy CPU per byte vs HAProxy", "<= 0.4x", f"bulk{s}_cpu10g",
            "haproxy", "<=", 0.4)
        add(f"bulk {n}: proxy CPU per byte incl. softirq vs HAProxy", "<= 0.4x",
            f"bulk{s}_core10g", "haproxy", "<=", 0.4)
    add("keepalive req/s vs HAProxy", ">= 1.2x", "keepalive_rps", "haproxy", ">=", 1.2)
    add("keepalive p99 vs HAProxy", "<= 1.0x", "keepalive_p99", "haproxy", "<=", 1.0)
    add("conn/s (Connection: close) vs HAProxy", ">= 1.2x", "close_rps", "haproxy", ">=", 1.2)
    add("idle memory/conn (PSS + pipes) vs HAProxy", "<= 1.0x", "idle_mem_kib", "haproxy",
        "<=", 1.0)
    return rows


def _cpu_check(details):
    """Per proxy and bulk scenario: median seconds from the group totals, the
    per-task sum, and the io_uring threads' share."""
    out = {}
    for rec in details:
        cpu = rec.get("cpu")
        if not cpu or not rec["scenario"].startswith("bulk"):
            continue
        k = (rec["system"], rec["scenario"])
        e = out.setdefault(k, {"proc": [], "tasks": [], "sqp": [], "wrk": [], "names": set()})
        e["proc"].append(cpu["proc_s"])
        e["tasks"].append(cpu["tasks_s"])
        e["sqp"].append(cpu["by_class"]["iou-sqp"])
        e["wrk"].append(cpu["by_class"]["iou-wrk"])
        e["names"].update(n.rsplit("-", 1)[0] + "-*" for n in cpu["io_threads"])
    return out


def markdown(meta, data, details, by_rep=None) -> str:
    systems = meta["systems"]
    labels = dict(systems)
    m = meta["machine"]
    L = []
    kind = ("A/B run" if meta.get("ab") else "profile" if meta.get("profile")
            else "benchmark")
    L.append(f"# ringd {kind}" + (" (quick smoke run: not for conclusions)"
                                  if meta["quick"] else ""))
    L.append("")
    if meta.get("busy_note"):
        L.append(f"**{meta['busy_note']}**")
        L.append("")
    cmd = (f"`{meta['make']}` (which runs `{meta['command']}`)" if meta.get("make")
           else f"`{meta['command']}`")
    L.append(f"- command: {cmd} as root in the repository root (started {meta['started']}, "
             f"took {meta['elapsed_s']:.0f} s)")
    L.append(f"- machine: nproc {m['nproc']}, kernel {m['kernel']}, CPU \"{m['cpu']}\", "
             f"memory {m['memory']}")
    L.append(f"- software: ringd {m['ringd']}, liburing {m['liburing']}; {m['haproxy']}; "
             f"{m['nginx']}; {m['iperf3']}; {m['wrk']}")
    L += hostinfo.header_lines(meta.get("host"))
    if meta.get("host_sysctl"):
        L.append("- **kernel settings changed for this run** (`--host-sysctl`, put back at its "
                 "end): " + ", ".join(f"`{kv}`" for kv in meta["host_sysctl"]))
    L.append(f"- pinning: {meta['pinning']}")
    L.append(f"- every figure: median [min–max] of {meta['reps']} interleaved runs "
             f"(each repetition runs every system in turn); loads of {meta['duration_s']:g} s "
             f"(iperf3 -t, wrk -d); {meta['workers']} worker(s)/thread(s) per proxy")
    L.append(f"- load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}")
    if meta["neighbours"]:
        L.append("- **other busy processes were running** at the start (figures are noisier): "
                 + "; ".join(f"`{n}`" for n in meta["neighbours"][:3]))
    noisy = meta.get("noisy_sessions", [])
    L.append(f"- sessions that started while a test suite, compiler or pip ran: "
             f"{len(noisy)} of {meta.get('sessions', '?')}"
             + (f" ({', '.join(noisy[:8])}{', ...' if len(noisy) > 8 else ''})" if noisy else ""))
    L.append("")
    L.append("## Results")
    L.append("")
    L.append("| metric | unit | " + " | ".join(lab for _, lab in systems) + " |")
    L.append("|---|---|" + "---|" * len(systems))
    for key, label, unit, better, dec in METRICS:
        if not any(_vals(data, s, key) for s, _ in systems):
            continue
        arrow = {"higher": "↑", "lower": "↓"}.get(better, "")
        L.append(f"| {label} {arrow} | {unit} | "
                 + " | ".join(_cell(data, s, key, dec) for s, _ in systems) + " |")
    L.append("")
    L.append("↑ higher is better, ↓ lower is better. CPU figures are the proxy's own "
             "processes only (every thread, io_uring's included); direct has no proxy. "
             "\"total CPU of both CPUs\" = busy time (softirq included) of the proxy's CPU "
             "plus the load's CPU during the load, per unit: on loopback a proxy can move "
             "TCP work onto the load's CPU, which its own CPU figure would not show; on a "
             "busy machine it also counts whatever else ran there.")
    L.append("")
    L += goals14_section(data, labels, meta)

    present = [k for k, _ in RINGD if k in labels]
    others = [o for o in ("haproxy", "nginx", "haproxy_splice", "direct") if o in labels]
    if present and others:
        L.append("## Ratios (ringd median / other median)")
        L.append("")
        cols = [(r, o) for r in present for o in others]
        L.append("| metric | " + " | ".join(f"{labels[r]} / {labels[o]}" for r, o in cols) + " |")
        L.append("|---|" + "---|" * len(cols))
        for key, label, unit, better, dec in METRICS:
            if key.startswith("idle") and key not in ("idle_mem_kib", "idle_pss_kib"):
                continue
            if better == "info":
                continue
            cells = []
            for r, o in cols:
                if o == "direct" and not key.endswith(("_gbps", "_rps", "_p50", "_p99",
                                                       "_total10g", "_total100k")):
                    cells.append("–")
                else:
                    cells.append(_fmt_ratio(_ratio(data, r, o, key)))
            if all(c == "–" for c in cells):
                continue
            L.append(f"| {label} | " + " | ".join(cells) + " |")
        L.append("")

    if present and "haproxy" in labels and not meta.get("profile"):
        L.append("## Goals (issue 7)")
        L.append("")
        L.append("| goal | target | " + " | ".join(labels[k] for k in present) + " |")
        L.append("|---|---|" + "---|" * len(present))
        for text, target, res in goals(data):
            cells = []
            for k in present:
                r, met = res[k]
                # three decimals: 0.404x must not read as the 0.40x it misses
                cells.append("not measured" if met is None else
                             f"{r:.3f}x: **{'met' if met else 'not met'}**")
            L.append(f"| {text} | {target} | " + " | ".join(cells) + " |")
        L.append("")
        if meta["quick"]:
            L.append("A quick run has one short repetition: the verdicts above are a smoke "
                     "test, not the result.")
            L.append("")

    L += ab_section(meta, by_rep, labels)
    L += idle_section(details, labels, meta)
    L += profile_section(meta, data, details, labels)

    chk = _cpu_check(details)
    if chk:
        L.append("## CPU accounting check (bulk runs)")
        L.append("")
        L.append("Reported CPU = utime+stime of each proxy process from /proc/PID/stat "
                 "(thread-group totals, which include exited threads). Per task = the sum "
                 "over /proc/PID/task/*/stat of the threads alive at the end. io_uring's "
                 "SQPOLL (`iou-sqp-*`) and io-wq (`iou-wrk-*`) threads are threads of the "
                 "ring owner's process, so they appear both per task and in the totals.")
        L.append("")
        L.append("| system | scenario | reported CPU-s | per-task sum CPU-s | of which iou-sqp | "
                 "of which iou-wrk | io_uring threads seen |")
        L.append("|---|---|---|---|---|---|---|")
        for (sk, scen), e in sorted(chk.items()):
            L.append(f"| {labels.get(sk, sk)} | {scen} | {statistics.median(e['proc']):.2f} | "
                     f"{statistics.median(e['tasks']):.2f} | {statistics.median(e['sqp']):.2f} | "
                     f"{statistics.median(e['wrk']):.2f} | "
                     f"{', '.join(sorted(e['names'])) or 'none'} |")
        L.append("")

    idle = [d for d in details if d["scenario"] == "idle"]
    if idle:
        L.append("## Idle connections")
        L.append("")
        L.append(f"{meta['idle_conns']} connections opened through the proxy to a backend "
                 "that holds them; the proxy's processes are measured before (no connection) "
                 "and with all of them held, and the difference is divided by the count. "
                 "RSS/PSS from /proc/PID/smaps_rollup summed over the proxy's processes; "
                 "pipes = distinct pipe inodes among their fds, capacity read with "
                 "F_GETPIPE_SZ on /proc/PID/fd/N (capacity is an upper bound: the kernel "
                 "allocates pages only for bytes queued). Kernel socket memory is the same "
                 "for every proxy and not counted.")
        if meta["idle_note"]:
            L.append("")
            L.append(f"Count: {meta['idle_note']}.")
        L.append("")
        L.append("Kernel objects (informational, not in the goal): active objects of the "
                 "`io_kiocb` (io_uring requests) and `eventpoll_epi` (epoll items) slab caches "
                 "from /proc/slabinfo, before and with the connections held. These caches are "
                 "system-wide: the idle backend's own epoll adds 1 epoll item per connection "
                 "for every system, and io_uring keeps freed requests cached per ring, so "
                 "the figures are approximate.")
        L.append("")
        L.append("| system | base RSS KiB | base PSS KiB | pipes held: base → with conns "
                 "(capacity) | fds: base → with conns | io_kiocb/conn | epoll items/conn |")
        L.append("|---|---|---|---|---|---|---|")
        seen = set()
        for d in idle:
            if d["system"] in seen:
                continue
            seen.add(d["system"])
            b, f = d["base"], d["full"]
            ko = d.get("kernel_objects", {})
            L.append(f"| {labels.get(d['system'], d['system'])} | {b['rss_kib']:,} | "
                     f"{b['pss_kib']:,} | {b['pipes']} → {f['pipes']} "
                     f"({b['pipe_bytes'] / 1048576:.1f} → {f['pipe_bytes'] / 1048576:.1f} MiB) | "
                     f"{b['fds']} → {f['fds']} | {ko.get('io_kiocb', 0):.2f} | "
                     f"{ko.get('eventpoll_epi', 0):.2f} |")
        L.append("")
        L.append("(first repetition of each system shown)")
        L.append("")

    errs = [(d["system"], d["scenario"], d.get("errors"), d.get("non2xx"))
            for d in details if d.get("errors") and (sum(d["errors"].values()) or d["non2xx"])]
    if errs or meta["errors"]:
        L.append("## Errors")
        L.append("")
        for e in meta["errors"]:
            L.append(f"- {e}")
        for sk, scen, er, nx in errs:
            L.append(f"- {labels.get(sk, sk)} {scen}: wrk socket errors {er}, non-2xx {nx}")
        L.append("")

    L.append("## Settings")
    L.append("")
    L.append(f"- ringd: `[ringd] workers = {meta['workers']}`, `[ring] sqpoll = true|false`, "
             f"`pipe_size = \"{meta['pipe_size']}\"`"
             + "".join(f", `{line}`" for line in meta.get("ringd_ring", []))
             + ", other [ring] keys at their defaults "
             "(sq_thread_idle 10ms, entries 4096, pipe_pool 64, copy_buffer_size 16KiB, "
             "splice_threshold 64KiB, notsent_lowat 512KiB); listeners backlog 4096, max_connections 20000; "
             "`max_fails = 0`; started as root under `taskset`")
    hp = (f"tune.pipesize {meta['haproxy_pipesize']}" if meta["haproxy_pipesize"]
          else "tune.pipesize unset (kernel default, 64 KiB)")
    L.append(f"- HAProxy: `haproxy -db`, `nbthread {meta['workers']}`, `cpu-map`, `mode tcp`, "
             + "`option splice-auto`" + f", {hp}, maxpipes 64, maxconn = idle count + 10, `ulimit-n` = the hard limit, bind backlog 4096"
             + ("; \"HAProxy splice\": the same with `option splice-request` and "
                "`option splice-response` instead of `splice-auto` (every byte spliced, as ringd "
                "does), not a peer in the goals" if "haproxy_splice" in dict(meta["systems"])
                else ""))
    L.append(f"- nginx: `stream`, `worker_processes {meta['workers']}`, `worker_cpu_affinity`, "
             "`listen ... reuseport backlog=4096`, proxy buffers at defaults (16k)")
    rb = meta.get("client_rcvbuf")
    L.append(f"- client-side receive buffer: " + (
        f"{rb} bytes for every proxy (ringd listener `rcvbuf = {rb}`, HAProxy "
        f"`tune.rcvbuf.client {rb}`, nginx `listen ... rcvbuf={rb}`)" if rb
        else "the kernel's autotuning for every proxy (`--client-rcvbuf` unset)"))
    L.append(f"- loads: `iperf3 -P 1|8 -t {meta['duration_s']:g}` to an iperf3 server; "
             f"`wrk -t1 -c{meta['wrk_conns']} -d{meta['duration_s']:g}s --latency` for a 64-byte "
             "file from an nginx HTTP backend (1 worker, keepalive_requests unbounded), the "
             "same with `-H \"Connection: close\"`; all on 127.0.0.1")
    L.append("")
    return "\n".join(L)


def plot(meta, data, path):
    """Write the PNG; returns None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not available ({e})"
    panels = [k for k in ("bulk1_gbps", "bulk8_gbps", "bulk1_cpu10g", "bulk8_cpu10g",
                          "keepalive_rps", "keepalive_p99", "close_rps", "idle_mem_kib")]
    spec = {k: (label, unit, better) for k, label, unit, better, _ in METRICS}
    systems = meta["systems"]
    colors = {"direct": "#999999", "ringd_sqpoll": "#1f77b4", "ringd_nosqpoll": "#17becf",
              "haproxy": "#d62728", "nginx": "#2ca02c", "haproxy_splice": "#ff7f0e"}
    fig, axes = plt.subplots(2, 4, figsize=(17, 8))
    for ax, key in zip(axes.flat, panels):
        label, unit, better = spec[key]
        names, meds, lo, hi, cols = [], [], [], [], []
        for sk, lab in systems:
            v = _vals(data, sk, key)
            if not v:
                continue
            m = statistics.median(v)
            names.append(lab.replace(" ", "\n", 1))
            meds.append(m)
            lo.append(m - min(v))
            hi.append(max(v) - m)
            cols.append(colors.get(sk, "#777777"))
        ax.set_title(f"{label}\n({unit}, {'higher' if better == 'higher' else 'lower'} is better)",
                     fontsize=10)
        if not names:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            continue
        ax.bar(range(len(names)), meds, yerr=[lo, hi], color=cols, capsize=4)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    m = meta["machine"]
    fig.suptitle(f"ringd benchmark {meta['started']}: {m['nproc']} CPUs, kernel {m['kernel']}, "
                 f"{meta['workers']} worker(s); median of {meta['reps']} runs, bars = min–max",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- issue 14

PEERS = ("haproxy", "nginx")
IDLE_GOAL = 0.005          # CPU-s per second per worker (issue 14)


def _ringd_keys(labels):
    return [k for k in labels if k.startswith("ringd")]


def goals14(data, labels):
    """(goal, target, {ringd key: (text, met)}, floor) against the better
    peer of the same run (HAProxy or nginx, whichever is better on that row).
    floor, on the CPU rows of a profile run: {"limit": the goal's bound,
    "ringd": {ringd key: TCP floor or None}, "peer": (best peer's label, its
    TCP share %)}; else {}."""
    peers = [p for p in PEERS if p in labels]
    rows = []

    def vs_best(text, target, metric, better, limit, scen=None, load=None):
        """load: (scenario, per-unit suffix) of a rate row: the load CPU's
        busy share and its CPU per unit against the peer's are added, since
        where that CPU is saturated it sets the rate."""
        res = {}
        vals = {p: med(data, p, metric) for p in peers}
        vals = {p: v for p, v in vals.items() if v is not None}
        if not vals:
            return
        best = (min if better == "lower" else max)(vals, key=vals.get)
        floor = {}
        if scen and med(data, best, f"{scen}_p_tcp_pct") is not None:
            floor = {"limit": limit, "ringd": {},
                     "peer": (labels[best], med(data, best, f"{scen}_p_tcp_pct"))}
        for k in _ringd_keys(labels):
            x = med(data, k, metric)
            if x is None or not vals[best]:
                res[k] = ("not measured", None)
                continue
            r = x / vals[best]
            met = r <= limit if better == "lower" else r >= limit
            res[k] = (f"{r:.3f}x {labels[best]}", met)
            if load:
                busy = med(data, k, f"{load[0]}_loadbusy")
                lk, lp = (med(data, k, f"{load[0]}_load{load[1]}"),
                          med(data, best, f"{load[0]}_load{load[1]}"))
                if busy is not None and lk and lp:
                    res[k] = (res[k][0] + f" (load CPU {busy:.0f} % busy, doing "
                              f"{lk / lp:.3f}x the peer's load CPU work per unit)", met)
            if floor:
                # ringd's TCP/IP + socket-layer CPU per unit over the best
                # peer's whole CPU per unit: the ratio if nothing else cost
                tcp = med(data, k, f"{scen}_p_tcp_pct")
                floor["ringd"][k] = None if tcp is None else tcp / 100 * r
        rows.append((text, target, res, floor))

    vs_best("keepalive: proxy CPU per request vs best peer", "<= 0.8x",
            "keepalive_cpu100k", "lower", 0.8, "keepalive")
    vs_best("Connection: close: proxy CPU per connection vs best peer", "<= 0.8x",
            "close_cpu100k", "lower", 0.8, "close")
    for s, n in (("1", "1 stream"), ("8", "8 streams")):
        vs_best(f"bulk {n}: proxy CPU per byte vs best peer", "<= 0.6x",
                f"bulk{s}_cpu10g", "lower", 0.6, f"bulk{s}")
    for s, n in (("1", "1 stream"), ("8", "8 streams")):
        vs_best(f"bulk {n}: throughput vs best peer", ">= 1.0x", f"bulk{s}_gbps", "higher", 1.0,
                load=(f"bulk{s}", "10g"))
    vs_best("keepalive req/s vs best peer", ">= 1.0x", "keepalive_rps", "higher", 1.0,
            load=("keepalive", "100k"))
    vs_best("Connection: close conn/s vs best peer", ">= 1.0x", "close_rps", "higher", 1.0,
            load=("close", "100k"))
    vs_best("keepalive p99 vs best peer", "<= 1.0x", "keepalive_p99", "lower", 1.0)
    vs_best("Connection: close p99 vs best peer", "<= 1.0x", "close_p99", "lower", 1.0)
    for metric, text in (("idlecpu_worker", "idle CPU per worker, fresh start"),
                         ("idlecpu_after_worker", "idle CPU per worker, after the loads")):
        res = {}
        for k in _ringd_keys(labels):
            v = _vals(data, k, metric)
            if not v:
                res[k] = ("not measured", None)
            else:
                # every repetition must meet it, not only the median
                res[k] = (f"{max(v):.4f} (max)", max(v) <= IDLE_GOAL)
        if any(met is not None for _, met in res.values()):
            rows.append((text, f"<= {IDLE_GOAL} CPU-s/s", res, {}))
    return rows


def goals14_section(data, labels, meta):
    keys = _ringd_keys(labels)
    rows = goals14(data, labels)
    if not keys or not rows:
        return []
    floors = any(f for *_, f in rows)
    head = [labels[k] for k in keys]
    if floors:
        head += [f"TCP floor, {labels[k]}" for k in keys] + ["best peer's TCP share"]
    L = ["## Goals (issue 14)", "",
         "Ratios against the better of HAProxy and nginx on each row (the peer named); "
         "idle CPU against the absolute goal, the worst repetition counting.", "",
         "| goal | target | " + " | ".join(head) + " |",
         "|---|---|" + "---|" * len(head)]
    for text, target, res, floor in rows:
        cells = []
        for k in keys:
            t, met = res.get(k, ("not measured", None))
            cells.append(t if met is None else f"{t}: **{'met' if met else 'not met'}**")
            fl = floor["ringd"].get(k) if floor else None
            if fl is not None and fl > floor["limit"]:
                cells[-1] += f"; unreachable here: TCP work alone is {fl:.3f}x the best peer"
        if floors:
            fls = [floor["ringd"].get(k) if floor else None for k in keys]
            cells += ["–" if fl is None else f"{fl:.3f}x" for fl in fls]
            cells.append(f"{floor['peer'][1]:.1f} % ({floor['peer'][0]})" if floor else "–")
        L.append(f"| {text} | {target} | " + " | ".join(cells) + " |")
    L.append("")
    if floors:
        L += ["TCP floor = ringd's TCP/IP + socket-layer share (perf samples of the proxy's "
              "threads on its CPU, sampled pass) x ringd's proxy CPU per unit / the best peer's "
              "proxy CPU per unit, both CPU figures the goals' own (/proc utime+stime, timed "
              "pass): the ratio ringd would reach if everything it does beyond the TCP stack "
              "cost nothing. The samples include softirq work done in the proxy's context, "
              "which utime+stime may not fully charge to it; every share here is applied to "
              "the /proc base, for ringd and the peer alike. The best peer's TCP share is its "
              "TCP CPU over its own total: a floor equal to it means both spend the same CPU "
              "on TCP per unit.", ""]
    if meta.get("quick"):
        L += ["A quick run: the verdicts are a smoke test, not the result.", ""]
    return L


def idle_section(details, labels, meta):
    recs = [d for d in details if d["scenario"] in ("idlecpu", "idlecpu_after")]
    if not recs:
        return []
    L = ["## Idle CPU", "",
         f"Each proxy with its configuration and no connection at all, measured for "
         f"{meta.get('idle_seconds', '?')} s right after the start (\"fresh\") and again "
         "after its loads (\"after\"). CPU = on-CPU nanoseconds from "
         "/proc/PID/task/*/schedstat summed over every thread of the worker processes (the "
         "SQPOLL poller `iou-sqp-*` and io-wq `iou-wrk-*` are threads of the ringd worker, "
         "so they are in it), divided by the wall time and the worker count; the master "
         "(ringd master, nginx master) is shown apart. HAProxy runs one process whose threads "
         "are its workers. Context switches from each thread's status (voluntary + "
         "involuntary). Goal: <= 0.005 CPU-s per second per worker in every ring mode.", "",
         "| system | when | per worker CPU-s/s | of which iou-sqp | of which other threads "
         "| master CPU-s/s | ctx switches/s per worker | cross-check: ticks CPU-s/s "
         "(10 ms resolution) |",
         "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for d in recs:
        groups.setdefault((d["system"], d["scenario"]), []).append(d["idle"])
    n = max(1, meta.get("workers", 1))
    for (sk, scen), lst in groups.items():
        def m(f):
            return statistics.median(f(x) for x in lst)
        wk = lambda x: list(x["workers"].values())      # noqa: E731
        per = m(lambda x: sum(w["cpu_per_s"] for w in wk(x)) / n)
        sqp = m(lambda x: sum(w["by_class"]["iou-sqp"] for w in wk(x)) / n)
        thr = m(lambda x: sum(w["by_class"]["thread"] + w["by_class"]["iou-wrk"]
                              for w in wk(x)) / n)
        mas = m(lambda x: x["master"]["cpu_per_s"] if x["master"] else 0.0)
        cs = m(lambda x: sum(w["vol_per_s"] + w["invol_per_s"] for w in wk(x)) / n)
        tk = m(lambda x: sum(w["ticks_cpu_per_s"] for w in wk(x)) / n)
        L.append(f"| {labels.get(sk, sk)} | {'fresh' if scen == 'idlecpu' else 'after'} | "
                 f"{per:.4f} | {sqp:.4f} | {thr:.4f} | {mas:.4f} | {cs:.1f} | {tk:.3f} |")
    L += ["", f"(median of {meta['reps']} repetition(s))", ""]
    counted = [d for d in recs if d.get("counts_per_s")]
    if counted:
        L += ["Counted in the same window (profile mode: perf stat on the worker processes, "
              "all their threads, and on the master apart), per second, all workers "
              "together:", "",
              "| system | when | processes | syscalls/s | io_uring_enter/s | SQEs/s | CQEs/s | "
              "context switches/s | top syscalls/s |", "|---|---|---|---|---|---|---|---|---|"]
        for d in counted:
            for g, c in d["counts_per_s"].items():
                sc = sorted(((k[4:], v) for k, v in c.items() if k.startswith("sys_") and v),
                            key=lambda kv: -kv[1])[:4]
                L.append(f"| {labels.get(d['system'], d['system'])} | "
                         f"{'fresh' if d['scenario'] == 'idlecpu' else 'after'} | {g} | "
                         f"{c.get('syscalls', 0):.1f} | {c.get('sys_io_uring_enter', 0):.1f} | "
                         f"{c.get('sqe', 0):.1f} | {c.get('cqe', 0):.1f} | "
                         f"{c.get('cs', 0):.1f} | "
                         + ", ".join(f"{k} {v:.1f}" for k, v in sc) + " |")
        L.append("")
    return L


# --------------------------------------------------------------------------- profile

SCEN = {
    "bulk1": ("bulk, 1 stream (upload: client -> proxy -> iperf3 server)", "MB"),
    "bulk8": ("bulk, 8 streams", "MB"),
    "bulk1r": ("bulk download, 1 stream (iperf3 -R)", "MB"),
    "keepalive": ("keepalive 64 B (wrk, 50 connections)", "request"),
    "close": ("Connection: close (one connection per request)", "connection"),
}

# key suffix, label, better (lower everywhere), decimals
PROFILE_ROWS = [
    ("p_syscalls", "proxy syscalls", 2),
    ("p_enter", "of which io_uring_enter", 2),
    ("p_sqe", "io_uring SQEs submitted (io_uring_submit_req)", 2),
    ("p_cqe", "io_uring CQEs posted (io_uring_complete)", 2),
    ("p_async", "io-wq punts (io_uring_queue_async_work)", 3),
    ("p_pollarm", "internal poll arms (io_uring_poll_arm)", 2),
    ("p_taskadd", "task work queued (io_uring_task_add)", 2),
    ("p_localrun", "deferred task work runs (io_uring_local_work_run)", 2),
    ("p_cs", "proxy context switches", 3),
    ("p_vcs", "of which voluntary (/proc status)", 3),
    ("p_ics", "of which involuntary, i.e. preempted (/proc status)", 3),
    ("p_load_sys", "load side: syscalls of client + backends", 2),
    ("p_load_cs", "load side: context switches of client + backends", 3),
    ("p_load_pg_alloc", "load CPU: pages allocated (kmem:mm_page_alloc, any order)", 2),
    ("p_load_pg_zone", "load CPU: of which refilled from the buddy allocator under the zone lock "
     "(kmem:mm_page_alloc_zone_locked)", 2),
    ("p_load_pg_free", "load CPU: pages freed (kmem:mm_page_free)", 2),
    ("p_proxy_pg_alloc", "proxy CPU: pages allocated", 2),
    ("p_proxy_pg_free", "proxy CPU: pages freed", 2),
    ("p_tcp_pct", "TCP/IP + socket layer share of the proxy's CPU (perf record, %)", 1),
    ("p_coverage", "check: perf task-clock / /proc CPU of the proxy in the counted pass (%)", 0),
]


def profile_metric_labels():
    """{metric: (label, unit, better, decimals)} of the profile rows (for A/B)."""
    out = {}
    for scen, (lab, unit) in SCEN.items():
        for suf, text, dec in PROFILE_ROWS:
            pct = suf in ("p_tcp_pct", "p_coverage")
            out[f"{scen}_{suf}"] = (f"{lab.split(' (')[0]}: {text}",
                                    "%" if pct else f"per {unit}",
                                    "info" if pct else "lower", dec)
    return out


def _cpu_us(data, sk, scen, kind):
    """Median CPU µs per unit of a scenario from the timed pass: the
    proxy's processes (kind "cpu") or both CPUs (kind "total")."""
    if scen.startswith("bulk"):
        v = med(data, sk, f"{scen}_{kind}10g")
        return None if v is None else v * 1e6 / 1250.0       # 10 Gbit = 1250 MB
    v = med(data, sk, f"{scen}_{kind}100k")
    return None if v is None else v * 10.0                   # 1e6 µs / 1e5 units


def _by_category_us(data, scen, unit, cols, labels):
    """Rows "CPU per unit by category": the median share of each category
    (stored per repetition as {scen}_p_cat_<slug>) x the median proxy CPU per
    unit of the timed pass. Nothing for a run that stored no such keys."""
    share = {(k, c): med(data, k, f"{scen}_p_cat_{perfprof.slug(c)}")
             for k in cols for c in perfprof.CATEGORY_NAMES}
    if all(v is None for v in share.values()):
        return []
    cpu = {k: _cpu_us(data, k, scen, "cpu") for k in cols}
    L = [f"Proxy CPU per {unit} by category, µs (median share of the proxy's samples x "
         "median proxy CPU of the timed pass, /proc utime+stime; the goals' measure):", "",
         "| category | " + " | ".join(labels.get(k, k) for k in cols) + " |",
         "|---|" + "---|" * len(cols)]
    for c in perfprof.CATEGORY_NAMES:
        vals = [None if share[k, c] is None or cpu[k] is None else share[k, c] / 100 * cpu[k]
                for k in cols]
        if any(v for v in vals):
            L.append(f"| {c} | " + " | ".join(_num(v, 2) for v in vals) + " |")
    L.append("")
    return L


def profile_section(meta, data, details, labels):
    counted = [d for d in details if d["scenario"].endswith(" counted")]
    profiled = [d for d in details if d["scenario"].endswith(" profiled")]
    if not counted and not profiled:
        return []
    systems = [k for k, _ in meta["systems"]]
    sc_ns = (meta.get("host") or {}).get("syscall", {}).get("ns")
    L = ["## Profile: where the work goes, per unit", "",
         "Three passes of each load per system: the timed pass (the CPU figures of the "
         "results table, nothing attached), a counted pass and a sampled pass. Counts: "
         "`perf stat` on tracepoints (`raw_syscalls:sys_enter`, `syscalls:sys_enter_*`, "
         "`io_uring:*`) and the `context-switches` software event, attached to every "
         "process of the proxy (all threads, io_uring's poller and io-wq workers included, "
         "threads created later too), to the backends' processes, and around the load "
         "generator; started disabled and enabled through perf's control pipe for exactly "
         "the load. Not strace: strace stops the process at every syscall. Samples: "
         f"`perf record -g -e cpu-clock -F {meta.get('perf_freq')}` of the proxy's CPU(s) "
         "(the whole CPU, so softirq work done there is seen), reduced to the proxy's "
         "processes. Units: per MB (10^6 bytes received by the client) for bulk, per "
         "request for keepalive, per connection for close. Median over "
         f"{meta['reps']} repetition(s).", ""]
    chk = meta.get("perf_check")
    if chk:
        if chk.get("ok") is None:
            L += [f"Counter check not run: {chk.get('why')}.", ""]
        else:
            L += ["Counter check (a C program with known counts, run under the same perf "
                  "events before the benchmark): "
                  + "; ".join(f"{w}: expected {e:,}, counted {_num(c, 0)}"
                              for w, e, c in chk["rows"])
                  + (" — **exact**." if chk["ok"] else " — **MISMATCH: do not trust the "
                     "counts below.**"), ""]
    if sc_ns:
        L += [f"\"bare syscall cost\" = syscalls per unit x {sc_ns:.0f} ns (this host's "
              "getppid round trip) as a share of the proxy's CPU per unit: what the entry "
              "and exit alone cost, before any work inside the call.", ""]
    for scen, (title, unit) in SCEN.items():
        cs = [d for d in counted if d["scenario"] == f"{scen} counted"]
        ps = [d for d in profiled if d["scenario"] == f"{scen} profiled"]
        if not cs and not ps:
            continue
        cols = [k for k in systems if any(d["system"] == k for d in cs + ps)]
        L += [f"### {title}, per {unit}", "",
              f"| per {unit} | " + " | ".join(labels.get(k, k) for k in cols) + " |",
              "|---|" + "---|" * len(cols)]

        def row(text, vals, dec):
            if all(v is None for v in vals):
                return
            L.append(f"| {text} | " + " | ".join(_num(v, dec) for v in vals) + " |")

        row("proxy CPU, µs (timed pass)", [_cpu_us(data, k, scen, "cpu") for k in cols], 2)
        row("total CPU of both CPUs, µs (timed pass)",
            [_cpu_us(data, k, scen, "total") for k in cols], 2)
        for suf, text, dec in PROFILE_ROWS:
            row(text, [med(data, k, f"{scen}_{suf}") for k in cols], dec)
        if sc_ns:
            shares = []
            for k in cols:
                n, us = med(data, k, f"{scen}_p_syscalls"), _cpu_us(data, k, scen, "cpu")
                shares.append(None if n is None or not us else 100.0 * n * sc_ns / 1000 / us)
            row("bare syscall cost, % of proxy CPU", shares, 1)
        L.append("")
        # syscalls by name
        by = {}
        for d in cs:
            for name, v in (d.get("syscalls_per_unit") or {}).items():
                by.setdefault(name, {}).setdefault(d["system"], []).append(v)
        names = [n for n, per in by.items()
                 if any(statistics.median(v) >= 0.005 for v in per.values())]
        names.sort(key=lambda n: -max(statistics.median(v) for v in by[n].values()))
        if names:
            L += [f"Proxy syscalls per {unit} by name (tracepoint `syscalls:sys_enter_<name>`; "
                  "\"other\" = all syscalls minus the named ones):", "",
                  "| syscall | " + " | ".join(labels.get(k, k) for k in cols) + " |",
                  "|---|" + "---|" * len(cols)]
            for n in names:
                L.append(f"| {n} | " + " | ".join(
                    _num(statistics.median(by[n][k]), 3) if k in by[n] else "–"
                    for k in cols) + " |")
            L.append("")
        if ps:
            pcols = [k for k in cols if any(d["system"] == k for d in ps)]
            first = {k: next(d["profile"] for d in ps if d["system"] == k) for k in pcols}
            cats = []
            for k in pcols:
                for c in first[k]["categories_pct"]:
                    if c not in cats:
                        cats.append(c)
            L += ["Where the proxy's CPU goes (share of the proxy's samples; each sample "
                  "goes to the category of the frame nearest to the leaf that names one, "
                  "see bench/README.md):", "",
                  "| category | " + " | ".join(labels.get(k, k) for k in pcols) + " |",
                  "|---|" + "---|" * len(pcols)]
            for c in cats:
                L.append(f"| {c} | " + " | ".join(
                    f"{first[k]['categories_pct'].get(c, 0):.1f} %" for k in pcols) + " |")
            for t in ("worker threads", "SQPOLL thread (iou-sqp)", "io-wq workers (iou-wrk)",
                      "master process"):
                if any(first[k].get("threads_pct", {}).get(t) for k in pcols):
                    L.append(f"| *by thread: {t}* | " + " | ".join(
                        f"{first[k].get('threads_pct', {}).get(t, 0):.1f} %"
                        for k in pcols) + " |")
            L.append("| *samples of the proxy (CPU-s)* | " + " | ".join(
                f"{first[k]['proxy_samples']} ({first[k]['proxy_cpu_s']:.2f})"
                for k in pcols) + " |")
            L.append("| *busy samples on the proxy CPU: proxy / kernel threads / other "
                     "processes* | " + " | ".join(
                         "{:.0f} / {:.0f} / {:.0f} %".format(
                             *(first[k]["owners_pct_of_busy"].get(o, 0)
                               for o in ("proxy", "kernel threads", "other processes")))
                         for k in pcols) + " |")
            L.append("")
            L += _by_category_us(data, scen, unit, pcols, labels)
            top = max(len(first[k]["top_self"]) for k in pcols)
            L += ["Top symbols, self time (share of the proxy's samples; `[k]` kernel):", "",
                  "| # | " + " | ".join(labels.get(k, k) for k in pcols) + " |",
                  "|---|" + "---|" * len(pcols)]
            for i in range(top):
                cells = []
                for k in pcols:
                    t = first[k]["top_self"]
                    if i < len(t):
                        sym, dso, pct = t[i]
                        kk = " [k]" if dso.startswith("[kernel") else f" ({dso})"
                        cells.append(f"{pct:.1f} % `{sym}`{kk}")
                    else:
                        cells.append("")
                L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
            L.append("")
            L += ["Top kernel functions, inclusive (share of the proxy's samples with the "
                  "function anywhere on the stack):", "",
                  "| # | " + " | ".join(labels.get(k, k) for k in pcols) + " |",
                  "|---|" + "---|" * len(pcols)]
            top = max(len(first[k]["top_incl"]) for k in pcols)
            for i in range(top):
                cells = []
                for k in pcols:
                    t = first[k]["top_incl"]
                    cells.append(f"{t[i][1]:.1f} % `{t[i][0]}`" if i < len(t) else "")
                L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
            L.append("")
    return L


# --------------------------------------------------------------------------- A/B

def _all_specs():
    spec = {k: (label, unit, better, dec) for k, label, unit, better, dec in METRICS}
    spec.update(profile_metric_labels())
    return spec


def _floor(key):
    """Below this absolute value on both sides a ratio is noise, not a
    difference (idle CPU at 0.0003 vs 0.0005 CPU-s/s is the same nothing)."""
    if key.startswith("idlecpu") and not key.endswith("wakeups"):
        return 0.001 if not key.endswith(("syscalls", "enters")) else 1.0
    if key.endswith(("_p_async", "_p_pollarm", "_p_taskadd", "_p_localrun", "_p_cs",
                     "_p_vcs", "_p_ics", "_p_load_cs")):
        return 0.01
    return None


def ab_section(meta, by_rep, labels):
    ab = meta.get("ab")
    if not ab or not by_rep:
        return []
    a, b = ab["sides"]
    L = ["## A/B: B relative to A", ""]
    for side in (a, b):
        L.append(f"- **{side['name']}**: `{side['exe']}` (commit {side['commit']})"
                 + ("; extra [ring]: " + ", ".join(f"`{r}`" for r in side["ring"])
                    if side["ring"] else ""))
    L += ["",
          "Per row: medians of A and B, then B/A computed in each repetition (A and B ran "
          "back to back, in alternating order) with its median and min–max. Verdict: "
          "\"B better\" / \"B worse\" only when every repetition's ratio is on the same side "
          "of 1.0 in that direction; \"same\" when every ratio is within 0.5 % of 1.0; "
          "otherwise \"overlap\" (the difference is within the run-to-run noise). A ratio "
          "needs both sides measured in the same repetition; \"(1 run)\" marks a row where "
          "only one repetition had both. One repetition decides nothing; use --reps 5 or "
          "more.", ""]
    spec = _all_specs()
    for mode in ab["modes"]:
        ka, kb = f"ringd_a_{mode}", f"ringd_b_{mode}"
        ra, rb = by_rep.get(ka, {}), by_rep.get(kb, {})
        L += [f"### ring mode {'sqpoll' if mode == 'sqpoll' else 'no-sqpoll'}", "",
              "| metric | unit | A | B | B/A median [min–max] | verdict |",
              "|---|---|---|---|---|---|"]
        for key, (label, unit, better, dec) in spec.items():
            if key not in ra or key not in rb:
                continue
            reps = sorted(set(ra[key]) & set(rb[key]))
            ratios = [rb[key][r] / ra[key][r] for r in reps if ra[key][r]]
            ma = statistics.median(ra[key].values())
            mb = statistics.median(rb[key].values())
            floor = _floor(key)
            if not ratios:
                cell, verdict = "–", "–"
            elif floor is not None and max(ma, mb) < floor:
                cell, verdict = f"{statistics.median(ratios):.3f}x", f"both ~0 (< {floor:g})"
            else:
                cell = f"{statistics.median(ratios):.3f}x"
                if len(ratios) > 1:
                    cell += f" [{min(ratios):.3f}–{max(ratios):.3f}]"
                if better == "info":
                    verdict = "–"
                elif all(abs(r - 1) < 0.005 for r in ratios):
                    verdict = "same"
                elif all(r < 1 for r in ratios):
                    verdict = "**B better**" if better == "lower" else "**B worse**"
                elif all(r > 1 for r in ratios):
                    verdict = "**B worse**" if better == "lower" else "**B better**"
                else:
                    verdict = "overlap"
                if len(ratios) == 1 and verdict != "–":
                    verdict += " (1 run)"
            L.append(f"| {label} | {unit} | {_num(ma, dec)} | {_num(mb, dec)} | {cell} | "
                     f"{verdict} |")
        L.append("")
    return L


def main(argv=None) -> int:
    """Re-render a report from its JSON: python bench/report.py FILE.json
    (writes FILE.md next to it; the figures are the JSON's, unchanged)."""
    import json
    import sys
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].endswith(".json"):
        print("usage: python bench/report.py RESULTS.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        raw = json.load(f)
    md = markdown(raw["meta"], raw["data"], raw["details"], raw.get("by_rep"))
    out = args[0][:-5] + ".md"
    with open(out, "w") as f:
        f.write(md)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
