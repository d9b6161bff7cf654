# Over 450 lines: perf counting, sampling and the call-stack breakdown of the profile mode.
"""perf for the profile mode: counting (perf stat on tracepoints and
software events) and sampling (perf record -g of the proxy's CPU), both
started disabled and switched on and off through perf's control pipe, so the
window is exactly the load's; plus the parser that turns `perf script`
call stacks into top symbols and a breakdown of where the CPU goes.

Counts use tracepoints (raw_syscalls:sys_enter, syscalls:sys_enter_*,
io_uring:*), never strace: a tracepoint count costs a few ns per event, strace
stops the process at every syscall. Enabling any syscall tracepoint still
puts every task on the kernel's slower traced-syscall path, so the counting
and the sampling passes each run a load of their own, apart from the timed
pass whose CPU figures the report quotes."""
from __future__ import annotations

import collections
import os
import re
import select
import signal
import subprocess
import time

import hostinfo

# Syscalls counted one by one (the rest is "other" = raw_syscalls - these).
# The socket and event calls an epoll proxy makes, the ring's enter, and what
# a master process does while idle.
SYSCALLS = [
    "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
    "splice", "epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll",
    "accept", "accept4", "connect", "close", "shutdown", "setsockopt", "getsockopt",
    "socket", "getsockname", "getpeername", "fcntl", "ioctl", "pipe2",
    "io_uring_enter", "futex", "clock_nanosleep", "nanosleep", "getpid", "getrandom",
    "timerfd_settime", "madvise", "mmap", "munmap", "brk", "rt_sigprocmask",
    "sched_yield", "sendfile64",
    # HAProxy reads its thread's CPU clock (CLOCK_THREAD_CPUTIME_ID is no
    # vDSO call) and arms a timer; and whatever else a master does
    "clock_gettime", "gettimeofday", "timer_settime", "rt_sigreturn", "epoll_pwait2",
    "recvmmsg", "sendmmsg", "select", "pselect6", "tee", "vmsplice", "eventfd2",
    "openat", "newfstatat", "statx", "fstat", "lseek", "pread64", "wait4", "kill",
    "getrusage", "times", "prctl", "sched_getaffinity",
]

# io_uring tracepoints (kernel 6.18 names; submit_sqe is the pre-5.19 name)
IO_URING = {
    "sqe": ["io_uring:io_uring_submit_req", "io_uring:io_uring_submit_sqe"],
    "cqe": ["io_uring:io_uring_complete"],
    "async": ["io_uring:io_uring_queue_async_work"],
    "pollarm": ["io_uring:io_uring_poll_arm"],
    "taskadd": ["io_uring:io_uring_task_add"],
    "localrun": ["io_uring:io_uring_local_work_run"],
}


def _first(names: list[str]) -> str | None:
    for n in names:
        if hostinfo.tracepoint(n):
            return n
    return None


def proxy_events() -> dict:
    """{short name: perf event} for the proxy's processes, only what this
    kernel has."""
    ev = {"syscalls": "raw_syscalls:sys_enter", "cs": "context-switches",
          "task_clock": "task-clock"}
    for k, names in IO_URING.items():
        n = _first(names)
        if n:
            ev[k] = n
    for s in SYSCALLS:
        n = f"syscalls:sys_enter_{s}"
        if hostinfo.tracepoint(n):
            ev["sys_" + s] = n
    return ev


def load_events() -> dict:
    return {"syscalls": "raw_syscalls:sys_enter", "cs": "context-switches"}


# Where pages come from and go to, per CPU. On loopback the load's sender
# writes every byte into pages it allocates; a proxy that forwards those pages
# without copying them (splice) decides on which CPU they are freed, and a
# CPU that frees fewer pages than it allocates refills its per-CPU page lists
# from the buddy allocator under the zone lock, with pages no cache holds.
PAGE_EVENTS = {"pg_alloc": "kmem:mm_page_alloc",
               "pg_zone": "kmem:mm_page_alloc_zone_locked",
               "pg_free": "kmem:mm_page_free"}


def page_events() -> dict:
    return {k: v for k, v in PAGE_EVENTS.items() if hostinfo.tracepoint(v)}


def available() -> str | None:
    """None if the profile mode can run, else why not."""
    caps = hostinfo.perf_caps()
    if not caps["perf"]:
        return "perf is not installed (`make bench-profile` installs Debian's linux-perf)"
    if not caps["tracefs"]:
        return "tracefs is not mounted (mount -t tracefs none /sys/kernel/tracing)"
    if not hostinfo.tracepoint("raw_syscalls:sys_enter"):
        return "the kernel has no raw_syscalls:sys_enter tracepoint"
    return None


class PerfError(RuntimeError):
    pass


class _Controlled:
    """A perf process started with events disabled (-D -1) and a control
    pipe: enable()/disable() return once perf has acknowledged, so the
    measured window is exactly the one between them."""

    def __init__(self, procs, name: str, argv: list[str]):
        self.procs = procs
        cr, self.cw = os.pipe()
        self.ar, aw = os.pipe()
        # after "perf stat" / "perf record": start disabled, take commands
        argv = argv[:2] + ["-D", "-1", "--control", f"fd:{cr},{aw}"] + argv[2:]
        try:
            self.p = procs.start(name, argv, pass_fds=(cr, aw))
        finally:
            os.close(cr)
            os.close(aw)
        self.name = name

    def _cmd(self, word: str, timeout: float = 30.0) -> None:
        os.write(self.cw, word.encode() + b"\n")
        # perf answers "ack\n" once the command is done; it reads the control
        # pipe only after setting up every event, which takes a while with
        # many tracepoints on many threads
        deadline = time.monotonic() + timeout
        buf = b""
        while b"ack" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.p.poll() is not None:
                raise PerfError(f"{self.name}: no ack for {word!r} "
                                f"(perf {'exited ' + str(self.p.returncode) if self.p.poll() is not None else 'silent'}): "
                                + self.procs.log_tail(self.name, 400))
            r, _, _ = select.select([self.ar], [], [], left)
            if r:
                chunk = os.read(self.ar, 64)
                if not chunk:
                    raise PerfError(f"{self.name}: control pipe closed")
                buf += chunk

    def enable(self) -> None:
        self._cmd("enable")

    def disable(self) -> None:
        self._cmd("disable")

    def finish(self, timeout: float = 60.0) -> None:
        """Stop perf (SIGINT makes it write its output) and wait for it."""
        try:
            if self.p.poll() is None:
                self.p.send_signal(signal.SIGINT)
                try:
                    self.p.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.procs.stop(self.p.pid)
            for fd in (self.cw, self.ar):
                try:
                    os.close(fd)
                except OSError:
                    pass


def parse_stat_csv(text: str, events: dict) -> dict:
    """perf stat -x, output -> {short name: count or None}."""
    by_event = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        f = line.split(",")
        if len(f) < 3:
            continue
        try:
            by_event[f[2]] = float(f[0])
        except ValueError:
            by_event[f[2]] = None          # <not counted>, <not supported>
    return {k: by_event.get(ev) for k, ev in events.items()}


class Counter(_Controlled):
    """perf stat on a set of processes (every thread, threads created later
    included: perf's per-task events are inherited) or on CPUs."""

    def __init__(self, procs, tmp: str, name: str, events: dict,
                 pids: list[int] | None = None, cpus: str | None = None):
        self.events = events
        self.out = os.path.join(tmp, f"{name}.csv")
        target = ["-p", ",".join(map(str, pids))] if pids else ["-a", "-C", cpus]
        super().__init__(procs, name, ["perf", "stat", "-x,", "-o", self.out,
                                       "-e", ",".join(events.values())] + target)

    def result(self) -> dict:
        self.finish()
        try:
            with open(self.out) as f:
                return parse_stat_csv(f.read(), self.events)
        except OSError as e:
            raise PerfError(f"{self.name}: no output ({e}): "
                            + self.procs.log_tail(self.name, 400))


def stat_wrap(tmp: str, name: str, events: dict) -> tuple[list[str], str]:
    """argv prefix that counts a load generator for its whole life, and the
    output file."""
    out = os.path.join(tmp, f"{name}.csv")
    return ["perf", "stat", "-x,", "-o", out, "-e", ",".join(events.values()), "--"], out


class Recorder(_Controlled):
    """perf record -g of whole CPUs (the proxy's), sampling the cpu-clock
    software event (works without a PMU, as on most VMs)."""

    def __init__(self, procs, tmp: str, name: str, cpus: str, freq: int):
        self.data = os.path.join(tmp, f"{name}.data")
        self.freq = freq
        super().__init__(procs, name, ["perf", "record", "-q", "-B", "-e", "cpu-clock",
                                       "-F", str(freq), "-g", "-C", cpus, "-o", self.data])

    def samples(self, timeout: float = 120.0):
        self.finish()
        p = subprocess.run(["perf", "script", "-i", self.data,
                            "-F", "comm,pid,tid,ip,sym,dso"],
                           capture_output=True, text=True, timeout=timeout)
        try:
            os.unlink(self.data)
        except OSError:
            pass
        if p.returncode != 0 and not p.stdout:
            raise PerfError(f"perf script: {p.stderr.strip()[:300]}")
        return parse_script(p.stdout)


_HEAD = re.compile(r"^(?P<comm>.*?)\s+(?P<pid>-?\d+)/(?P<tid>-?\d+)\s*$")
_FRAME = re.compile(r"^\s*[0-9a-f]+\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")


def parse_script(text: str) -> list[tuple[str, int, int, list[tuple[str, str]]]]:
    """perf script output -> [(comm, pid, tid, [(sym, dso) leaf first])]."""
    out = []
    cur = None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                out.append(cur)
            cur = None
            continue
        if not line[0].isspace():
            m = _HEAD.match(line)
            if m:
                if cur:
                    out.append(cur)
                cur = (m["comm"], int(m["pid"]), int(m["tid"]), [])
            continue
        if cur is not None:
            m = _FRAME.match(line)
            if m:
                sym = m["sym"]
                sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
                cur[3].append((sym, os.path.basename(m["dso"])))
    if cur:
        out.append(cur)
    return out


# --------------------------------------------------------------------------- where the CPU goes

def _is_kernel(dso: str) -> bool:
    return dso.startswith("[kernel") or dso.startswith("[") and dso != "[unknown]"


# A sample goes to the category of the frame nearest to the leaf that names
# one (generic helpers such as memcpy, allocators and locks name none and take
# their caller's category). Order inside the list matters only for names that
# match two patterns. Heuristic by design; the top-symbol lists next to it show
# the raw data.
CATEGORIES = [
    ("mitigation thunks", re.compile(
        r"^(__x86_indirect_thunk|__x86_return_thunk|retbleed_|srso_|entry_untrain_ret|"
        r"__x86_indirect_call_thunk|its_return_thunk|its_static_thunk|clear_bhb_loop|"
        r"write_ibpb|entry_ibpb|__pfx_)")),
    ("syscall entry/exit", re.compile(
        r"^(entry_SYSCALL|do_syscall_64|syscall_exit_to_user_mode|exit_to_user_mode|"
        r"syscall_return_via_sysret|x64_sys_call|__x64_sys_getppid|"
        r"syscall_trace_enter|syscall_exit_work|irqentry_exit_to_user_mode|"
        r"arch_exit_to_user_mode)")),
    ("epoll", re.compile(r"^(ep_|do_epoll_|__x64_sys_epoll|__do_sys_epoll|__se_sys_epoll|"
                         r"__ep_|epoll_|ep_poll_callback)")),
    ("io_uring", re.compile(r"^(io_|__io_|io_uring|__x64_sys_io_uring|__do_sys_io_uring|"
                            r"tctx_task_work|__se_sys_io_uring)")),
    ("splice / pipe", re.compile(
        r"^(splice_|do_splice|__do_splice|__x64_sys_splice|__do_sys_splice|pipe_|__pipe_|"
        r"anon_pipe|iter_file_splice_write|generic_splice|copy_splice_read|"
        r"page_cache_pipe_buf|generic_pipe_buf|add_to_pipe|wait_for_space|"
        r"free_pipe_info|alloc_pipe_info|create_pipe_files|do_pipe2|__do_pipe|"
        r"round_pipe_size|pipe_fcntl)")),
    ("fd table / file refs", re.compile(
        r"^(__fput|fput|____fput|close_fd|file_close_fd|filp_close|filp_flush|fd_install|"
        r"alloc_fd|get_unused_fd|put_unused_fd|__fget|fget|fdget|__fdget|__x64_sys_close|"
        r"__do_sys_close|__close_range|do_dup2|alloc_file|alloc_empty_file|"
        r"file_free|__f_unlock_pos|expand_files|dput|__dentry_kill|d_alloc_pseudo|"
        r"new_inode_pseudo|alloc_inode|evict|destroy_inode|sock_alloc_file|"
        r"__sys_accept4_file|do_accept)")),
    ("TCP/IP + socket layer", re.compile(
        r"^(tcp_|__tcp_|tcp4_|ip_|__ip_|ipv4_|inet_|__inet_|inet6_|sock_|__sock_|sk_|__sk_|"
        r"skb_|__skb_|kfree_skb|consume_skb|__kfree_skb|__napi|napi_|net_rx_action|"
        r"__netif_|netif_|__dev_queue_xmit|dev_hard_start_xmit|loopback_xmit|"
        r"process_backlog|dst_|__sys_sendto|__sys_recvfrom|__sys_accept|"
        r"__sys_connect|__sys_shutdown|__sys_setsockopt|__sys_getsockopt|__sys_socket|"
        r"__sys_sendmsg|__sys_recvmsg|___sys_sendmsg|___sys_recvmsg|____sys_sendmsg|"
        r"____sys_recvmsg|__x64_sys_(sendto|recvfrom|accept|connect|shutdown|setsockopt|"
        r"getsockopt|socket|getsockname|getpeername|sendmsg|recvmsg)|security_socket_|"
        r"lock_sock|release_sock|__release_sock|__lock_sock|__sys_getsockname|"
        r"__sys_getpeername|sockfd_lookup|move_addr_to|__sock_release|sock_close|"
        r"do_sock_setsockopt|do_tcp_|nf_|__nf_|raw_v4|reqsk_|inet_csk|__neigh|neigh_|"
        r"validate_xmit|__qdisc|qdisc_|sch_direct|__local_bh_enable_ip|do_softirq|"
        r"handle_softirqs|__do_softirq|bpf_sk|cgroup_bpf|__cgroup_bpf|mem_cgroup_(charge|"
        r"uncharge)_skmem)")),
    ("scheduler / wakeups", re.compile(
        r"^(schedule|__schedule|try_to_wake_up|wake_up_|__wake_up|ttwu_|enqueue_|dequeue_|"
        r"pick_next_|finish_task_switch|__switch_to|switch_mm|context_switch|psi_|"
        r"update_curr|update_load_avg|select_task_rq|set_next_entity|put_prev_|"
        r"autoremove_wake_function|default_wake_function|check_preempt|resched_|"
        r"sched_|prepare_task_switch|raw_spin_rq)")),
    ("timers / interrupts", re.compile(
        r"^(hrtimer_|__hrtimer|tick_|__sysvec_|sysvec_|asm_sysvec|irq_|__irq|"
        r"run_timer|__run_timer|timerqueue|ktime_get|clockevents|lapic_)")),
]


# every category a sample can get, in the order the report lists them
CATEGORY_NAMES = [name for name, _ in CATEGORIES] + ["user space", "other kernel"]


def slug(name: str) -> str:
    """A category as a metric key part: "TCP/IP + socket layer" -> "tcp_ip_socket_layer"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def category(frames: list[tuple[str, str]]) -> str:
    if not frames:
        return "other kernel"
    leaf_dso = frames[0][1]
    if not _is_kernel(leaf_dso):
        return "user space"
    for sym, dso in frames:
        if not _is_kernel(dso):
            break
        for name, rx in CATEGORIES:
            if rx.match(sym):
                return name
    return "other kernel"


def summarize(samples, proxy_pids: set[int], freq: int, top: int = 15,
              master: int | None = None) -> dict:
    """Who ran on the proxy's CPUs, and for the proxy's own processes: CPU
    by category, top symbols (self), top kernel functions (inclusive)."""
    owners = collections.Counter()
    other_comms = collections.Counter()
    cats = collections.Counter()
    self_syms = collections.Counter()
    incl = collections.Counter()
    threads = collections.Counter()
    n_proxy = 0
    for comm, pid, _tid, frames in samples:
        if pid in proxy_pids:
            owner = "proxy"
        elif pid == 0:
            owner = "idle"
        elif comm.startswith(("ksoftirqd", "kworker", "rcu", "migration", "cpuhp",
                              "irq/", "kthreadd")):
            owner = "kernel threads"
            other_comms[comm.split("/")[0]] += 1
        else:
            owner = "other processes"
            other_comms[comm] += 1
        owners[owner] += 1
        if owner != "proxy":
            continue
        n_proxy += 1
        if pid == master:
            threads["master process"] += 1
        elif comm.startswith("iou-sqp"):
            threads["SQPOLL thread (iou-sqp)"] += 1
        elif comm.startswith("iou-wrk"):
            threads["io-wq workers (iou-wrk)"] += 1
        else:
            threads["worker threads"] += 1
        cats[category(frames)] += 1
        if frames:
            sym, dso = frames[0]
            self_syms[(sym, dso)] += 1
        seen = set()
        for sym, dso in frames:
            if _is_kernel(dso) and sym not in seen:
                seen.add(sym)
                incl[sym] += 1
    total = sum(owners.values())
    busy = total - owners["idle"]
    pct = (lambda n, d: 100.0 * n / d if d else 0.0)
    return {
        "freq": freq,
        "samples": total,
        "proxy_samples": n_proxy,
        "proxy_cpu_s": n_proxy / freq,
        "owners_pct_of_busy": {k: pct(v, busy) for k, v in owners.items() if k != "idle"},
        "others_top": other_comms.most_common(4),
        "categories_pct": {k: pct(v, n_proxy) for k, v in cats.most_common()},
        "threads_pct": {k: pct(v, n_proxy) for k, v in threads.most_common()},
        "top_self": [(s, d, pct(v, n_proxy)) for (s, d), v in self_syms.most_common(top)],
        "top_incl": [(s, pct(v, n_proxy)) for s, v in incl.most_common(top + 10)],
    }


# --------------------------------------------------------------------------- self check

# A known workload for the counters: N getppid() calls, then B batches of S
# NOP SQEs, each batch submitted and reaped with one io_uring_enter.
CHECK_C = r"""
#define _GNU_SOURCE
#include <liburing.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(void)
{
	struct io_uring ring;
	struct io_uring_cqe *cqe;
	if (io_uring_queue_init(64, &ring, 0) < 0)
		return 1;
	for (int i = 0; i < GETPPIDS; i++)
		syscall(SYS_getppid);
	for (int b = 0; b < BATCHES; b++) {
		for (int j = 0; j < PER_BATCH; j++)
			io_uring_prep_nop(io_uring_get_sqe(&ring));
		if (io_uring_submit_and_wait(&ring, PER_BATCH) != PER_BATCH)
			return 2;
		unsigned head, n = 0;
		io_uring_for_each_cqe(&ring, head, cqe)
			n++;
		io_uring_cq_advance(&ring, n);
	}
	io_uring_queue_exit(&ring);
	return 0;
}
"""
CHECK_N = {"GETPPIDS": 100000, "BATCHES": 100, "PER_BATCH": 32}


def self_check(tmp: str) -> dict:
    """Run the known workload under perf stat and compare: the counts the
    profile relies on must come out exact on this kernel. {"ok": bool,
    "rows": [(what, expected, counted)]} or {"ok": None, "why": ...}."""
    import shutil
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return {"ok": None, "why": "no C compiler"}
    src, exe = os.path.join(tmp, "perfcheck.c"), os.path.join(tmp, "perfcheck")
    with open(src, "w") as f:
        f.write(CHECK_C)
    defs = [f"-D{k}={v}" for k, v in CHECK_N.items()]
    p = subprocess.run([cc, "-O2", *defs, "-o", exe, src, "-luring"], capture_output=True,
                       text=True, timeout=60)
    if p.returncode != 0:
        return {"ok": None, "why": f"compile failed (liburing-dev?): {p.stderr.strip()[:200]}"}
    ev = {"getppid": "syscalls:sys_enter_getppid",
          "enter": "syscalls:sys_enter_io_uring_enter",
          "syscalls": "raw_syscalls:sys_enter"}
    for k, names in (("sqe", IO_URING["sqe"]), ("cqe", IO_URING["cqe"])):
        n = _first(names)
        if n:
            ev[k] = n
    out = os.path.join(tmp, "perfcheck.csv")
    p = subprocess.run(["perf", "stat", "-x,", "-o", out, "-e", ",".join(ev.values()), "--",
                        exe], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        return {"ok": None, "why": f"perf stat failed: {p.stderr.strip()[:200]}"}
    with open(out) as f:
        got = parse_stat_csv(f.read(), ev)
    n = CHECK_N
    sqes = n["BATCHES"] * n["PER_BATCH"]
    rows = [("getppid calls", n["GETPPIDS"], got.get("getppid")),
            ("io_uring_enter calls", n["BATCHES"], got.get("enter")),
            ("SQEs", sqes, got.get("sqe")),
            ("CQEs", sqes, got.get("cqe"))]
    ok = all(c is not None and int(c) == e for _, e, c in rows)
    # every syscall: at least the known ones, plus the process's start-up
    total = got.get("syscalls")
    rows.append(("all syscalls (>= the two above)", n["GETPPIDS"] + n["BATCHES"], total))
    ok = ok and total is not None and total >= n["GETPPIDS"] + n["BATCHES"]
    return {"ok": ok, "rows": rows}
