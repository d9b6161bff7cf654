"""What kind of host a table comes from: CPU model, kernel, the CPU
vulnerability mitigations the kernel applies, what one trivial syscall
costs here, and what perf can measure.

The same commit gives different ratios on different hosts (issue 14: 2x ahead
on an AMD EPYC VM with SRSO "safe RET", level on an Intel Xeon VM with cheap
syscalls), so every report starts with these lines."""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import tempfile

# A tight loop of getppid(2) through syscall(2) (glibc does not cache
# getppid, and syscall() rules out any vDSO or library shortcut), and the same
# loop with the syscall replaced by a compiler barrier, so the loop's own cost
# can be subtracted. Timed with the thread's CPU clock, not the wall clock: on
# a shared CPU a round that is preempted would otherwise count the other
# task's time. Best of 15 short rounds.
SYSCALL_LOOP_C = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 200000;
	double best_sys = 1e9, best_nop = 1e9;
	for (int round = 0; round < 15; round++) {
		double t0 = now();
		for (long i = 0; i < n; i++)
			syscall(SYS_getppid);
		double t1 = now();
		for (long i = 0; i < n; i++)
			__asm__ __volatile__("" ::: "memory");
		double t2 = now();
		if (t1 - t0 < best_sys)
			best_sys = t1 - t0;
		if (t2 - t1 < best_nop)
			best_nop = t2 - t1;
	}
	printf("%.2f %.2f\n", best_sys / n * 1e9, best_nop / n * 1e9);
	return 0;
}
"""


def syscall_cost(cpu: int | None = None, iterations: int = 200000) -> dict:
    """ns per getppid() syscall round trip on `cpu` (the proxy's CPU), loop
    overhead subtracted. Compiled at run time into a temp dir (no binary is
    kept); {"ns": None, "why": ...} when there is no C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return {"ns": None, "why": "no C compiler (cc/gcc) found"}
    with tempfile.TemporaryDirectory(prefix="ringd-bench-sc-") as d:
        src, exe = os.path.join(d, "sc.c"), os.path.join(d, "sc")
        with open(src, "w") as f:
            f.write(SYSCALL_LOOP_C)
        p = subprocess.run([cc, "-O2", "-o", exe, src], capture_output=True, text=True,
                           timeout=60)
        if p.returncode != 0:
            return {"ns": None, "why": f"compile failed: {p.stderr.strip()[:200]}"}
        argv = [exe, str(iterations)]
        if cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(cpu)] + argv
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            total, loop = (float(x) for x in p.stdout.split())
        except (subprocess.SubprocessError, ValueError, OSError) as e:
            return {"ns": None, "why": f"run failed: {e}"}
    return {"ns": round(total - loop, 1), "loop_ns": loop, "cpu": cpu,
            "method": f"getppid via syscall(2), thread CPU time, best of 15 x "
                      f"{iterations:,}, loop overhead ({loop:.2f} ns) subtracted"}


def lscpu() -> dict:
    out = {}
    try:
        p = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10)
        for line in p.stdout.splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def vulnerabilities() -> dict:
    """{name: kernel's line} for every /sys/devices/system/cpu/vulnerabilities/*."""
    out = {}
    for path in sorted(glob.glob("/sys/devices/system/cpu/vulnerabilities/*")):
        try:
            with open(path) as f:
                out[os.path.basename(path)] = f.read().strip()
        except OSError:
            pass
    return out


def tracefs() -> str | None:
    for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def tracepoint(name: str) -> bool:
    """True if the kernel has the tracepoint `group:event`."""
    d = tracefs()
    group, _, event = name.partition(":")
    return bool(d) and os.path.isdir(os.path.join(d, "events", group, event))


def perf_caps() -> dict:
    """Which perf measurements work here. On many VMs the PMU is not exposed
    ("<not supported>" for cycles and instructions): the profile then samples
    with the cpu-clock software event and counts with tracepoints only."""
    perf = shutil.which("perf")
    caps = {"perf": perf, "version": None, "hw_counters": False, "tracefs": tracefs()}
    if not perf:
        return caps
    try:
        v = subprocess.run([perf, "--version"], capture_output=True, text=True, timeout=10)
        caps["version"] = v.stdout.strip()
        p = subprocess.run([perf, "stat", "-x,", "-e", "instructions,cycles", "true"],
                           capture_output=True, text=True, timeout=20)
        lines = [l for l in p.stderr.splitlines() if "," in l and not l.startswith("#")]
        caps["hw_counters"] = bool(lines) and all(
            l.split(",")[0].strip().replace(".", "").isdigit() for l in lines)
        caps["hw_probe"] = "; ".join(l.strip() for l in lines)[:200]
    except (OSError, subprocess.SubprocessError):
        pass
    return caps


# kernel settings that move the bulk figures (where pages are freed, buffer sizes)
SYSCTLS = ("net.core.skb_defer_max", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
           "net.core.rmem_max", "net.core.wmem_max", "fs.pipe-max-size",
           # in a VM: how long an idle vCPU polls before it halts (0: at once,
           # and every wake-up of it costs the waker an IPI)
           "/sys/module/haltpoll/parameters/guest_halt_poll_ns",
           "/sys/devices/system/cpu/cpuidle/current_driver")


def sysctl_path(key: str) -> str:
    """/proc/sys/... for a dotted sysctl name; an absolute path (a module
    parameter under /sys, e.g. /sys/module/haltpoll/parameters/guest_halt_poll_ns)
    as it is."""
    return key if key.startswith("/") else "/proc/sys/" + key.replace(".", "/")


def sysctl_get(key: str) -> str | None:
    try:
        with open(sysctl_path(key)) as f:
            return " ".join(f.read().split())
    except OSError:
        return None


def sysctl_set(settings: list[str]) -> dict:
    """Apply KEY=VALUE settings; return {key: old value} for sysctl_restore.
    Raises OSError (after putting back what it changed) if one cannot be set."""
    old = {}
    try:
        for kv in settings:
            key, value = kv.split("=", 1)
            key = key.strip()
            prev = sysctl_get(key)
            if prev is None:
                raise OSError(f"{key}: no such kernel setting ({sysctl_path(key)})")
            with open(sysctl_path(key), "w") as f:
                f.write(value.strip())
            old[key] = prev
    except OSError:
        sysctl_restore(old)
        raise
    return old


def sysctl_restore(old: dict) -> None:
    for key, value in old.items():
        try:
            with open(sysctl_path(key), "w") as f:
                f.write(value)
        except OSError as e:
            print(f"could not put back {key} = {value}: {e}", file=sys.stderr)


def wakeup_ipis(cpus) -> int | None:
    """Function-call (CAL) plus reschedule (RES) interrupts received so far
    by the given CPUs, from /proc/interrupts; None where it has no such rows."""
    total, seen = 0, False
    try:
        with open("/proc/interrupts") as f:
            head = f.readline().split()          # CPU0 CPU1 ...
            cols = {int(h[3:]): i for i, h in enumerate(head) if h.startswith("CPU")}
            for line in f:
                parts = line.split()
                if parts and parts[0] in ("CAL:", "RES:"):
                    seen = True
                    for c in cpus:
                        if c in cols and cols[c] + 1 < len(parts):
                            total += int(parts[cols[c] + 1])
    except (OSError, ValueError):
        return None
    return total if seen else None


def host(proxy_cpu: int | None) -> dict:
    """Everything the report header prints about the host."""
    ls = lscpu()
    return {
        "cpu_model": ls.get("Model name", "?"),
        "vendor": ls.get("Vendor ID", "?"),
        "hypervisor": ls.get("Hypervisor vendor", "none"),
        "cpus": ls.get("CPU(s)", str(os.cpu_count())),
        "kernel": platform.release(),
        "vulnerabilities": vulnerabilities(),
        "syscall": syscall_cost(proxy_cpu),
        "perf": perf_caps(),
        "sysctls": {k: sysctl_get(k) for k in SYSCTLS},
    }


def header_lines(h: dict) -> list[str]:
    """Markdown bullet lines for the report header."""
    if not h:
        return []
    sc = h.get("syscall", {})
    cost = (f"**{sc['ns']:.0f} ns** per syscall round trip on CPU {sc.get('cpu')} "
            f"({sc.get('method')})" if sc.get("ns") is not None
            else f"not measured ({sc.get('why')})")
    L = [f"- host: CPU \"{h['cpu_model']}\" ({h['vendor']}, {h['cpus']} CPUs, hypervisor "
         f"{h['hypervisor']}), kernel {h['kernel']}",
         f"- syscall cost: {cost}"]
    p = h.get("perf", {})
    if p.get("perf"):
        L.append(f"- perf: {p.get('version')}; hardware counters "
                 + ("available" if p.get("hw_counters") else
                    "**not supported** here (profiles sample the cpu-clock software event, "
                    "counts come from tracepoints and software events)")
                 + f"; tracefs {p.get('tracefs') or 'not mounted'}")
    sc = h.get("sysctls")
    if sc:
        L.append("- kernel settings: " + "; ".join(f"`{k} = {v}`" for k, v in sc.items()
                                                   if v is not None))
    vul = h.get("vulnerabilities", {})
    if vul:
        # every file's line; the many "Not affected" ones folded into one
        L.append("- CPU vulnerabilities (/sys/devices/system/cpu/vulnerabilities/*):")
        for k, v in vul.items():
            if v != "Not affected":
                L.append(f"  - {k}: {v}")
        fine = [k for k, v in vul.items() if v == "Not affected"]
        if fine:
            L.append(f"  - Not affected: {', '.join(fine)}")
    return L


BUSY = ("pytest", " gcc ", "cc1 ", "pip install")


def busy_neighbours(more: tuple = (), unless: tuple = ()) -> list[str]:
    """Other processes that load this machine and so skew timing figures
    (test suites, builds; `more` adds command-line words, `unless` exempts)."""
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
        if any(w in cmd for w in BUSY + more) and not any(w in cmd for w in unless):
            seen.append(f"{name}: {cmd[:100]}")
    return seen


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
