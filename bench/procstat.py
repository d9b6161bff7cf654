"""What a proxy costs, read from /proc: CPU time of every thread of its
processes, and the memory (RSS, PSS, pipes) its processes hold.

CPU is taken two ways for the same set of processes:

* per process: utime+stime from /proc/PID/stat. For a thread-group leader
  these fields are the whole group's time, live threads plus the threads that
  have already exited. io_uring's kernel-side threads (the SQPOLL poller
  `iou-sqp-PID` and the io-wq workers `iou-wrk-PID`) are created with
  create_io_thread(), i.e. as threads of the ring's owner, so they are part
  of that group and their time lands in these totals.
* per task: the sum of utime+stime over /proc/PID/task/*/stat. This shows
  where the time went (main thread, iou-sqp, iou-wrk), but an io-wq worker
  that exits between the two readings takes its time out of the per-task
  view (it survives only in the group totals), so the per-task sum can only
  be lower or equal.

The benchmark reports the per-process totals and keeps the per-task sum and
breakdown next to it, so a reader can see both agree (or by how much the
exited threads make them differ).
"""
from __future__ import annotations

import fcntl
import os

CLK_TCK = os.sysconf("SC_CLK_TCK")
F_GETPIPE_SZ = 1032          # <linux/fcntl.h>: F_LINUX_SPECIFIC_BASE + 8


def _stat_fields(path: str) -> tuple[str, list[str]] | None:
    """(comm, fields after the comm) of a /proc stat file; None if gone."""
    try:
        with open(path, "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    lpar, rpar = raw.find("("), raw.rfind(")")
    if lpar < 0 or rpar < 0:
        return None
    return raw[lpar + 1:rpar], raw[rpar + 2:].split()


def _ticks(fields: list[str]) -> int:
    # fields[0] is field 3 (state) of proc(5); utime is field 14, stime 15
    return int(fields[11]) + int(fields[12])


def tree(root: int) -> list[int]:
    """root and all its live descendants (processes, not threads)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _stat_fields(f"/proc/{name}/stat")
        if st is None:
            continue
        children.setdefault(int(st[1][1]), []).append(int(name))
    out, todo = [], [root]
    while todo and len(out) < 10000:
        pid = todo.pop()
        if not os.path.exists(f"/proc/{pid}"):
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def thread_class(comm: str) -> str:
    if comm.startswith("iou-sqp-"):
        return "iou-sqp"
    if comm.startswith("iou-wrk-"):
        return "iou-wrk"
    return "thread"


def cpu_snapshot(pids: list[int]) -> dict:
    """{pid: {"proc": ticks, "tasks": {tid: (comm, ticks)}}}"""
    snap = {}
    for pid in pids:
        st = _stat_fields(f"/proc/{pid}/stat")
        if st is None:
            continue
        tasks = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            tids = []
        for tid in tids:
            t = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            if t is not None:
                tasks[int(tid)] = (t[0], _ticks(t[1]))
        snap[pid] = {"comm": st[0], "proc": _ticks(st[1]), "tasks": tasks}
    return snap


def cpu_delta(before: dict, after: dict) -> dict:
    """CPU seconds spent between two snapshots by the processes in `after`.

    proc_s     from the group totals (the figure the benchmark reports)
    tasks_s    from the per-task sums (live threads only)
    by_class   per-task seconds split into thread / iou-sqp / iou-wrk
    io_threads names of io_uring threads seen in `after`
    lost_pids  processes present before but gone after (their time is lost)
    """
    proc = tasks = 0
    by_class = {"thread": 0, "iou-sqp": 0, "iou-wrk": 0}
    io_threads = set()
    for pid, a in after.items():
        b = before.get(pid)
        proc += a["proc"] - (b["proc"] if b else 0)
        for tid, (comm, t) in a["tasks"].items():
            old = b["tasks"].get(tid) if b else None
            d = t - (old[1] if old else 0)
            tasks += d
            cls = thread_class(comm)
            by_class[cls] += d
            if cls != "thread":
                io_threads.add(comm)
    return {
        "proc_s": proc / CLK_TCK,
        "tasks_s": tasks / CLK_TCK,
        "by_class": {k: v / CLK_TCK for k, v in by_class.items()},
        "io_threads": sorted(io_threads),
        "lost_pids": sorted(set(before) - set(after)),
    }


def _rollup_kib(pid: int) -> tuple[int, int]:
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return rss, pss


def pipe_capacity(pid: int, fd: str) -> int:
    """Capacity of a pipe another process holds. As root, opening
    /proc/PID/fd/N of a pipe opens the same pipe (as a FIFO would be opened);
    a non-blocking read-only open neither blocks nor takes data, and
    F_GETPIPE_SZ then tells its size. Returns 0 if that fails."""
    try:
        fd2 = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return fcntl.fcntl(fd2, F_GETPIPE_SZ)
    except OSError:
        return 0
    finally:
        os.close(fd2)


def memory(pids: list[int]) -> dict:
    """RSS and PSS (KiB) summed over `pids`, plus the pipes they hold: the
    number of distinct pipes, their summed capacity, and fd counts."""
    rss = pss = sockets = fds = 0
    pipes: dict[str, int] = {}
    for pid in pids:
        r, p = _rollup_kib(pid)
        rss += r
        pss += p
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for fd in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            fds += 1
            if target.startswith("socket:"):
                sockets += 1
            elif target.startswith("pipe:") and target not in pipes:
                pipes[target] = pipe_capacity(pid, fd)
    return {"rss_kib": rss, "pss_kib": pss, "pipes": len(pipes),
            "pipe_bytes": sum(pipes.values()), "sockets": sockets, "fds": fds}


def count_sockets(pid: int) -> int:
    """Socket fds a process holds (used to see how many connections the idle
    backend holds)."""
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
    except FileNotFoundError:
        pass
    return n


# Kernel objects a proxy holds per connection that no RSS shows: io_uring
# requests (an armed poll or recv per socket) and epoll items (one per
# registered fd). Both caches are system-wide, so the idle backend's own
# epoll items are in the epoll figure too (the same for every system).
SLAB_CACHES = ("io_kiocb", "eventpoll_epi")


def slab_objects() -> dict:
    """{cache: (active objects, object size)} for SLAB_CACHES; {} if
    /proc/slabinfo cannot be read."""
    out = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in SLAB_CACHES:
                    out[parts[0]] = (int(parts[1]), int(parts[3]))
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------- idle CPU

def _schedstat_ns(path: str) -> int | None:
    """On-CPU nanoseconds of one task (first field of /proc/.../schedstat):
    exact to the scheduler's clock, where utime+stime come in 10 ms ticks.
    An idle proxy's goal (5 ms of CPU per second per worker) is half a tick,
    so ticks alone cannot tell it apart from zero or from a miss."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _ctxt(path: str) -> tuple[int, int]:
    vol = invol = 0
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return vol, invol


def task_snapshot(pids: list[int]) -> dict:
    """Per process and per thread: ticks (utime+stime; the group total for the
    process), on-CPU ns (schedstat, live threads only), voluntary and
    involuntary context switches (per thread, from status).

    {pid: {"comm", "ppid", "proc_ticks", "tasks": {tid: {"comm", "ticks",
    "ns", "vol", "invol"}}}}"""
    snap = {}
    for pid in pids:
        st = _stat_fields(f"/proc/{pid}/stat")
        if st is None:
            continue
        tasks = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            tids = []
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            t = _stat_fields(base + "/stat")
            if t is None:
                continue
            vol, invol = _ctxt(base + "/status")
            tasks[int(tid)] = {"comm": t[0], "ticks": _ticks(t[1]),
                               "ns": _schedstat_ns(base + "/schedstat") or 0,
                               "vol": vol, "invol": invol}
        snap[pid] = {"comm": st[0], "ppid": int(st[1][1]), "proc_ticks": _ticks(st[1]),
                     "tasks": tasks}
    return snap


def task_delta(before: dict, after: dict, seconds: float, master: int | None) -> dict:
    """CPU-s per second and context switches per second between two
    task_snapshot()s, split into the master process (ringd master, nginx
    master; None for a single-process proxy) and the worker processes, and
    per thread class (thread, iou-sqp, iou-wrk)."""
    out = {"seconds": seconds, "workers": {}, "master": None}
    for pid, a in after.items():
        b = before.get(pid, {"proc_ticks": 0, "tasks": {}})
        ns = vol = invol = 0
        by_class = {"thread": 0.0, "iou-sqp": 0.0, "iou-wrk": 0.0}
        threads = []
        for tid, t in a["tasks"].items():
            o = b["tasks"].get(tid, {"ns": 0, "vol": 0, "invol": 0, "ticks": 0})
            d_ns = t["ns"] - o["ns"]
            ns += d_ns
            vol += t["vol"] - o["vol"]
            invol += t["invol"] - o["invol"]
            by_class[thread_class(t["comm"])] += d_ns / 1e9 / seconds
            threads.append({"comm": t["comm"], "cpu_per_s": d_ns / 1e9 / seconds,
                            "vol_per_s": (t["vol"] - o["vol"]) / seconds,
                            "invol_per_s": (t["invol"] - o["invol"]) / seconds})
        rec = {"comm": a["comm"],
               "cpu_per_s": ns / 1e9 / seconds,
               "ticks_cpu_per_s": (a["proc_ticks"] - b["proc_ticks"]) / CLK_TCK / seconds,
               "by_class": by_class,
               "vol_per_s": vol / seconds, "invol_per_s": invol / seconds,
               "threads": threads}
        if pid == master:
            out["master"] = rec
        else:
            out["workers"][pid] = rec
    return out
