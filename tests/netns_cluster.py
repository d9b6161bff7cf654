# Over 450 lines: the namespace cluster test is one script: topology, scenarios, cleanup.
"""Two ringd hosts behind an ECMP router with BGP, in network namespaces.

    python tests/netns_cluster.py [--workdir DIR] [--json FILE] [--keep]

as root (tests/test_cluster.py and `make cluster-test` run it). It builds

    client ns        router ns                          proxy host ns (x2)      backend ns
    192.0.2.2 ---- 192.0.2.1  [bird2, ECMP]   br0 ---- 198.51.100.2 / .3
                   198.51.100.1/24 (bridge)             VIP 203.0.113.10 on lo
                                                        ringd :80 -> backend
                                                        ExaBGP + healthcheck
                   203.0.113.129/30 ------------------------------------------- 203.0.113.130:8080

with documentation addresses only, inside namespaces of its own (named
rdc<pid>-<role>); nothing touches the host's network. The router runs bird2:
one eBGP session per proxy host (AS 64496 <-> AS 64497, documentation ASNs),
`merge paths` turns the two announcements into one multipath route, which a
small loop here copies into a resilient nexthop group (the kernel's
`type resilient`: adding a host moves only idle hash buckets) under
net.ipv4.fib_multipath_hash_policy = 1 (the 5-tuple picks the path, so one
client's connections spread over both hosts). nftables on the router pins
each connection to the next hop its first packet took (conntrack mark ->
fwmark -> a per-host table), so a withdrawal moves new connections only.
Each proxy host runs ExaBGP with packaging/bgp/exabgp.conf as shipped (only
its own address, the disable file's path and --no-syslog changed).

Scenarios, each printing its figures: both hosts announce; a planned drain
of host 1 (`ringd drain --after`); its return (`ringd start`); a drain
cancelled by `ringd ready`; host 1's ringd killed; host 1 cut off the network
(the BGP hold timer); and, with flow pinning switched off (a stateless
router), what a drain and a return break with a resilient group and with a
plain hash-threshold group. Exit status 0 when every acceptance check holds.

Everything started here is killed and every namespace deleted in `finally`,
also on SIGTERM/SIGINT and on the global deadline; namespaces left behind by
a run that was SIGKILLed are removed by the next run.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXABGP_EXAMPLE = ROOT / "packaging" / "bgp" / "exabgp.conf"

VIP = "203.0.113.10"
VIP_PORT = 80
ROUTER_AS, HOSTS_AS = 64496, 64497            # RFC 5398 documentation ASNs
CLIENT = ("192.0.2.2", "192.0.2.1")          # client, router side
LAN_ROUTER = "198.51.100.1"                  # router on the proxy hosts' segment
HOST_ADDRS = ("198.51.100.2", "198.51.100.3")
BACKEND = ("203.0.113.130", "203.0.113.129")  # backend, router side
BACKEND_PORTS = (8080, 8081)                  # one upstream, balance = "hash"
HASH_SOURCES = [f"192.0.2.{i}" for i in range(10, 18)]
BIRD_TABLE = 100                              # bird exports the multipath route here
RES_GROUP, MPATH_GROUP = 100, 200             # nexthop group ids
TWIN = 10                                     # host i: nexthop ids i+1 and i+1+TWIN
PIN_TABLE0 = 101                              # per-host tables for pinned flows
DRAIN_AFTER = 4.0                             # ringd drain --after in the scenarios
DEADLINE = 420                                # the whole run, seconds
PREFIX_RE = re.compile(r"^rdc(\d+)-")

# ip, bird, exabgp and nft live in /usr/sbin, which a non-login PATH may lack
os.environ["PATH"] = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"

VENV_BIN = Path(sys.executable).parent
RINGD = str(VENV_BIN / "ringd") if (VENV_BIN / "ringd").exists() else None


class ClusterError(Exception):
    pass


def now() -> float:
    return time.monotonic()


def say(text: str) -> None:
    """Print; a reader that went away (| head) must not abort the run."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def sh(*cmd: str, check: bool = True, timeout: float = 15, input: str | None = None) -> str:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def wait_until(pred, timeout: float, what: str, interval: float = 0.02):
    deadline = now() + timeout
    while now() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(interval)
    raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")


# ------------------------------------------------------------------ namespaces

def netns_list() -> list[str]:
    out = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def kill_netns(name: str) -> None:
    """Kill every process in a namespace of ours, then delete it."""
    for _ in range(3):
        pids = sh("ip", "netns", "pids", name, check=False).split()
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(0.2)
    sh("ip", "netns", "del", name, check=False)


def remove_stale() -> list[str]:
    """Namespaces of earlier runs whose process is gone (a SIGKILLed run)."""
    gone = []
    for name in netns_list():
        m = PREFIX_RE.match(name)
        if m and not _running_here(int(m.group(1))):
            kill_netns(name)
            gone.append(name)
    return gone


def _running_here(pid: int) -> bool:
    """Is `pid` a live (not zombie) run of this script?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and b"netns_cluster" in cmd


def cleanup_prefix(prefix: str) -> None:
    for name in netns_list():
        if name.startswith(prefix):
            kill_netns(name)


class Proc:
    """A process started inside a namespace, output to a log file."""

    def __init__(self, name: str, ns: str, argv: list[str], log: Path, env: dict | None = None,
                 stdin=None, stdout=None):
        self.name, self.ns, self.log = name, ns, log
        self.logfh = open(log, "ab")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = subprocess.Popen(["ip", "netns", "exec", ns] + argv, env=full_env,
                                  stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  stdout=stdout if stdout is not None else self.logfh,
                                  stderr=self.logfh, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 5) -> None:
        if self.p.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.p.wait(5)
        self.logfh.close()


# ------------------------------------------------------------------ router FIB

class RouterFib:
    """What the router's forwarding plane does with bird's multipath route.

    bird writes the route for the VIP into table BIRD_TABLE; this loop copies
    its next hops into a nexthop group and points the main table's VIP route
    at it. Modes:
      "resilient"  a resilient group (512 buckets, idle_timer 1s: a next hop
                   that joins takes over only buckets idle for a second) in
                   which every host appears twice (two nexthop objects, same
                   gateway): Linux hashes, and so marks buckets busy, only in
                   a group of two or more members, so a group of one host
                   would hand busy buckets to the next host that joins;
      "resilient-single"  the same group with each host once (shows that);
      "mpath"      a hash-threshold group, what bird itself installs.
    Every change is recorded with its time."""

    def __init__(self, ns: str, gateways: dict[str, int]):
        self.ns = ns
        self.ids = gateways                      # gateway address -> nexthop id
        self.mode = "resilient"
        self.current: tuple[str, ...] | None = None
        self.history: list[tuple[float, tuple[str, ...]]] = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.errors: list[str] = []
        self.mon = subprocess.Popen(["ip", "-n", ns, "monitor", "route"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _bird_gateways(self) -> tuple[str, ...]:
        out = sh("ip", "-n", self.ns, "-j", "route", "show", "table", str(BIRD_TABLE),
                 "exact", f"{VIP}/32", check=False)
        try:
            routes = json.loads(out or "[]")
        except ValueError:
            return self.current or ()
        gws: set[str] = set()
        for r in routes:
            if "gateway" in r:
                gws.add(r["gateway"])
            for nh in r.get("nexthops", []):
                if "gateway" in nh:
                    gws.add(nh["gateway"])
        return tuple(sorted(gws))

    def _apply(self, gws: tuple[str, ...]) -> None:
        ip = ["ip", "-n", self.ns]
        if not gws:
            sh(*ip, "route", "del", f"{VIP}/32", check=False)
            return
        ids = [self.ids[g] for g in gws]
        if self.mode == "resilient":
            ids += [i + TWIN for i in ids]
        members = "/".join(str(i) for i in sorted(ids))
        if self.mode.startswith("resilient"):
            sh(*ip, "nexthop", "replace", "id", str(RES_GROUP), "group", members,
               "type", "resilient", "buckets", "512", "idle_timer", "1")
            group = RES_GROUP
        else:
            sh(*ip, "nexthop", "replace", "id", str(MPATH_GROUP), "group", members)
            group = MPATH_GROUP
        sh(*ip, "route", "replace", f"{VIP}/32", "nhid", str(group))

    def sync(self, force: bool = False) -> None:
        with self.lock:
            gws = self._bird_gateways()
            if gws == self.current and not force:
                return
            try:
                self._apply(gws)
            except ClusterError as e:
                self.errors.append(str(e))
                return
            self.current = gws
            self.history.append((now(), gws))

    def set_mode(self, mode: str) -> None:
        self.mode = mode
        self.sync(force=True)

    def _run(self) -> None:
        fd = self.mon.stdout.fileno()
        while not self.stop_ev.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready and not os.read(fd, 65536):
                break
            self.sync()

    def gateways(self) -> tuple[str, ...]:
        return self.current or ()

    def wait(self, want: tuple[str, ...], timeout: float, what: str) -> float:
        """Time the FIB reached exactly `want` (waits for it)."""
        want = tuple(sorted(want))

        def reached():
            with self.lock:
                if self.current == want and self.history:
                    return self.history[-1][0]
            return None
        return wait_until(reached, timeout, f"router FIB {what} {want}")

    def close(self) -> None:
        self.stop_ev.set()
        if self.mon.poll() is None:
            self.mon.kill()
            self.mon.wait(5)
        self.thread.join(2)


# ------------------------------------------------------------------ client agent

class Client:
    def __init__(self, ns: str, log: Path):
        self.proc = Proc("client", ns, [sys.executable, str(HERE / "cluster_client.py"), VIP,
                                        str(VIP_PORT)], log,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.records: list[list] = []
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        for line in self.proc.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ask(self, timeout: float = 90, **req) -> dict:
        self.proc.p.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.p.stdin.flush()
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ClusterError(f"client agent: no answer to {req['op']} in {timeout}s") from None
        if line is None:
            raise ClusterError(f"client agent exited (see {self.proc.log})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ClusterError(f"client agent: {req['op']}: {reply.get('error')}")
        return reply

    def take(self) -> list[list]:
        recs = self.ask(op="loop_take")["records"]
        self.records += recs
        return recs

    def window(self, t0: float, t1: float) -> list[list]:
        self.take()
        return [r for r in self.records if t0 <= r[0] < t1]


# ------------------------------------------------------------------ proxy hosts

RINGD_CONF = """\
[ringd]
workers = 1
pidfile = "{dir}/ringd.pid"
control_socket = "{dir}/ringd.sock"
log_format = "json"
log_file = "{dir}/ringd.log"
drain_timeout = "15s"
drain_after = "10s"

[ring]
# two cores for everything here: no SQ poller spinning next to the loads
sqpoll = false

[admin]
listen = "127.0.0.1:9100"

[[listener]]
name = "vip"
listen = "{vip}:{port}"
upstream = "app"

# the same on every host: a client address maps to the same server whichever
# host ECMP sends it to
[upstream.app]
balance = "hash"
servers = ["{backend}:{bports[0]}", "{backend}:{bports[1]}"]
"""


class Host:
    def __init__(self, index: int, ns: str, addr: str, workdir: Path):
        self.index, self.ns, self.addr = index, ns, addr
        self.name = f"host{index + 1}"
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "ringd.toml"
        self.conf.write_text(RINGD_CONF.format(dir=self.dir, vip=VIP, port=VIP_PORT,
                                               backend=BACKEND[0], bports=BACKEND_PORTS))
        self.disable_file = self.dir / "exabgp.disabled"
        self.ringd: Proc | None = None
        self.exabgp: Proc | None = None
        self.starts = 0

    # ringd
    def events(self, name: str) -> list[dict]:
        out = []
        try:
            text = (self.dir / "ringd.log").read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                out.append(ev)
        return out

    def start_ringd(self) -> float:
        """Start ringd; returns the time it logged ready."""
        before = len(self.events("ready"))
        if self.ringd is not None and not self.ringd.alive():
            self.ringd.stop()       # the previous run (drained or killed): close its log
        self.starts += 1
        self.ringd = Proc(f"{self.name}-ringd", self.ns, [RINGD, "start", "-c", str(self.conf)],
                          self.dir / f"ringd-{self.starts}.out")
        wait_until(lambda: len(self.events("ready")) > before or not self.ringd.alive(), 20,
                   f"{self.name}: ringd ready")
        if not self.ringd.alive():
            raise ClusterError(f"{self.name}: ringd exited: {self.ringd.log.read_text()[-2000:]}")
        return now()

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        # pathname unix sockets and pids are not per network namespace
        return subprocess.run([RINGD, *args, "-c", str(self.conf)], capture_output=True,
                              text=True, timeout=timeout)

    def drain(self, after: float, wait: bool) -> subprocess.Popen:
        args = [RINGD, "drain", "-c", str(self.conf), "--after", f"{after}s"]
        if not wait:
            args.append("--no-wait")
        p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = []
        t = threading.Thread(target=lambda: line.append(p.stdout.readline()), daemon=True)
        t.start()
        t.join(10)
        if not line or not line[0].startswith("draining"):
            p.kill()
            raise ClusterError(f"{self.name}: ringd drain did not start: {line} "
                               f"{p.stderr.read() if p.poll() is not None else ''}")
        return p

    # ExaBGP, with the shipped example
    def start_exabgp(self) -> None:
        text = EXABGP_EXAMPLE.read_text()
        for old, new in ((HOST_ADDRS[0], self.addr),
                         ("/etc/exabgp/ringd.disabled", str(self.disable_file)),
                         ("healthcheck --name ringd", "healthcheck --no-syslog --name ringd")):
            if old not in text:
                raise ClusterError(f"{EXABGP_EXAMPLE}: {old!r} not found (example changed?)")
            text = text.replace(old, new)
        conf = self.dir / "exabgp.conf"
        conf.write_text(text)
        env = {"exabgp.daemon.user": "root", "exabgp.daemon.daemonize": "false",
               "exabgp.api.cli": "false", "exabgp.log.destination": "stdout"}
        self.exabgp = Proc(f"{self.name}-exabgp", self.ns, ["exabgp", str(conf)],
                           self.dir / "exabgp.log", env=env)


# ------------------------------------------------------------------ the lab

class Lab:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.prefix = f"rdc{os.getpid()}-"
        self.ns = {r: self.prefix + r for r in ("cli", "rtr", "h1", "h2", "be")}
        self.procs: list[Proc] = []
        self.fib: RouterFib | None = None
        self.client: Client | None = None
        self.hosts: list[Host] = []
        self.pinning = False

    def ip(self, role: str, *args: str, check: bool = True) -> str:
        return sh("ip", "-n", self.ns[role], *args, check=check)

    def sysctl(self, role: str, key: str, value: str) -> None:
        sh("ip", "netns", "exec", self.ns[role], "sysctl", "-q", "-w", f"{key}={value}")

    def build(self) -> None:
        for name in self.ns.values():
            sh("ip", "netns", "add", name)
        for role in self.ns:
            self.ip(role, "link", "set", "lo", "up")
        # veth pairs are created inside the namespaces, never in the host's
        self.ip("rtr", "link", "add", "c0", "type", "veth", "peer", "name", "r0",
                "netns", self.ns["cli"])
        self.ip("rtr", "link", "add", "b0", "type", "veth", "peer", "name", "r0",
                "netns", self.ns["be"])
        self.ip("rtr", "link", "add", "br0", "type", "bridge")
        for i, role in enumerate(("h1", "h2")):
            self.ip("rtr", "link", "add", f"h{i + 1}", "type", "veth", "peer", "name", "r0",
                    "netns", self.ns[role])
            self.ip("rtr", "link", "set", f"h{i + 1}", "master", "br0")
            self.ip("rtr", "link", "set", f"h{i + 1}", "up")
        for dev in ("c0", "b0", "br0"):
            self.ip("rtr", "link", "set", dev, "up")
        for role in ("cli", "be", "h1", "h2"):
            self.ip(role, "link", "set", "r0", "up")
        self.ip("rtr", "addr", "add", f"{CLIENT[1]}/24", "dev", "c0")
        self.ip("rtr", "addr", "add", f"{LAN_ROUTER}/24", "dev", "br0")
        self.ip("rtr", "addr", "add", f"{BACKEND[1]}/30", "dev", "b0")
        self.ip("cli", "addr", "add", f"{CLIENT[0]}/24", "dev", "r0")
        for src in HASH_SOURCES:
            self.ip("cli", "addr", "add", f"{src}/24", "dev", "r0")
        self.ip("cli", "route", "add", "default", "via", CLIENT[1])
        self.ip("be", "addr", "add", f"{BACKEND[0]}/30", "dev", "r0")
        self.ip("be", "route", "add", "default", "via", BACKEND[1])
        for i, role in enumerate(("h1", "h2")):
            self.ip(role, "addr", "add", f"{HOST_ADDRS[i]}/24", "dev", "r0")
            self.ip(role, "addr", "add", f"{VIP}/32", "dev", "lo")
            self.ip(role, "route", "add", "default", "via", LAN_ROUTER)
        self.sysctl("rtr", "net.ipv4.ip_forward", "1")
        self.sysctl("rtr", "net.ipv4.fib_multipath_hash_policy", "1")
        # replies of a pinned flow come back from a host the VIP route may no
        # longer list: no reverse-path filter on the router
        for conf in ("all", "default", "c0", "b0", "br0", "h1", "h2"):
            self.sysctl("rtr", f"net.ipv4.conf.{conf}.rp_filter", "0")
        for i, gw in enumerate(HOST_ADDRS):
            for nh_id in (i + 1, i + 1 + TWIN):
                self.ip("rtr", "nexthop", "add", "id", str(nh_id), "via", gw, "dev", "br0")
            self.ip("rtr", "route", "add", f"{VIP}/32", "via", gw, "dev", "br0",
                    "table", str(PIN_TABLE0 + i))
            self.ip("rtr", "rule", "add", "fwmark", str(i + 1), "lookup", str(PIN_TABLE0 + i),
                    "pref", str(100 + i))

    def set_pinning(self, on: bool) -> None:
        """Connection tracking on the router: the first packet's next hop is kept
        in the connection's mark; later packets are routed by that mark."""
        if on:
            elements = ", ".join(f"{gw} : {i + 1}" for i, gw in enumerate(HOST_ADDRS))
            rules = f"""
table ip rdc_pin {{
    map nexthop_mark {{
        type ipv4_addr : mark
        elements = {{ {elements} }}
    }}
    chain pin_pre {{
        type filter hook prerouting priority mangle; policy accept;
        ip daddr {VIP} ct mark != 0 meta mark set ct mark
    }}
    chain pin_fwd {{
        type filter hook forward priority mangle; policy accept;
        ip daddr {VIP} ct state new ct mark set rt ip nexthop map @nexthop_mark
    }}
}}
"""
            sh("ip", "netns", "exec", self.ns["rtr"], "nft", "-f", "-", input=rules)
        else:
            sh("ip", "netns", "exec", self.ns["rtr"], "nft", "delete", "table", "ip", "rdc_pin",
               check=False)
        self.pinning = on

    def bird_conf(self) -> str:
        peers = "\n".join(
            f"protocol bgp host{i + 1} from proxyhost {{ neighbor {gw} as {HOSTS_AS}; }}"
            for i, gw in enumerate(HOST_ADDRS))
        return f"""
router id {LAN_ROUTER};
log "{self.workdir}/router/bird.log" all;
protocol device {{ scan time 10; }}
# the multipath route goes to its own table; RouterFib turns it into a nexthop group
protocol kernel vip_fib {{
    kernel table {BIRD_TABLE};
    merge paths on;
    ipv4 {{ import none; export all; }};
}}
filter only_vip {{ if net = {VIP}/32 then accept; reject; }}
template bgp proxyhost {{
    local {LAN_ROUTER} as {ROUTER_AS};
    hold time 9;                    # the proxy hosts ask for 9 s too
    connect delay time 1;
    connect retry time 2;
    error wait time 1, 4;
    ipv4 {{ import filter only_vip; export none; }};
}}
{peers}
"""

    def start(self) -> None:
        d = self.workdir / "router"
        d.mkdir(parents=True, exist_ok=True)
        (d / "bird.conf").write_text(self.bird_conf())
        self.procs.append(Proc("backend", self.ns["be"],
                               [sys.executable, str(HERE / "backend.py"), f"--host={BACKEND[0]}",
                                "peer"] + [str(p) for p in BACKEND_PORTS],
                               self.workdir / "backend.log"))
        self.procs.append(Proc("bird", self.ns["rtr"],
                               ["bird", "-f", "-c", str(d / "bird.conf"), "-s",
                                str(d / "bird.ctl"), "-P", str(d / "bird.pid")],
                               d / "bird.out"))
        self.fib = RouterFib(self.ns["rtr"], {gw: i + 1 for i, gw in enumerate(HOST_ADDRS)})
        self.set_pinning(True)
        for i, role in enumerate(("h1", "h2")):
            h = Host(i, self.ns[role], HOST_ADDRS[i], self.workdir)
            self.hosts.append(h)
            h.start_ringd()
            h.start_exabgp()
        self.client = Client(self.ns["cli"], self.workdir / "client.log")
        self.fib.wait(HOST_ADDRS, 30, "both hosts announced")

    def cleanup(self) -> None:
        if self.client is not None:
            try:
                self.client.proc.p.stdin.close()
            except OSError:
                pass
        if self.fib is not None:
            self.fib.close()
        procs = list(self.procs)
        for h in self.hosts:
            procs += [p for p in (h.ringd, h.exabgp) if p is not None]
        if self.client is not None:
            procs.append(self.client.proc)
        for p in procs:
            p.kill()
        for p in procs:
            try:
                p.p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            p.logfh.close()
        for name in self.ns.values():
            kill_netns(name)


# ------------------------------------------------------------------ scenarios

def per_host(records: list[list]) -> dict:
    out: dict = {"host1": 0, "host2": 0, "failed": 0}
    errors: dict[str, int] = {}
    for r in records:
        if r[2] == HOST_ADDRS[0]:
            out["host1"] += 1
        elif r[2] == HOST_ADDRS[1]:
            out["host2"] += 1
        else:
            out["failed"] += 1
            errors[r[3]] = errors.get(r[3], 0) + 1
    if errors:
        out["errors"] = errors
    return out


def failures(records: list[list]) -> list[list]:
    return [r for r in records if r[2] is None]


def long_summary(flows: list[dict]) -> dict:
    out: dict = {"host1": 0, "host2": 0, "broken_host1": 0, "broken_host2": 0}
    errors: dict[str, int] = {}
    for f in flows:
        h = "host1" if f["peer"] == HOST_ADDRS[0] else "host2"
        out[h] += 1
        if f["error"]:
            out[f"broken_{h}"] += 1
            errors[f["error"]] = errors.get(f["error"], 0) + 1
    if errors:
        out["errors"] = errors
    return out


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000)


class Run:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.c = lab.client
        self.h1, self.h2 = lab.hosts
        self.fib = lab.fib
        self.results: list[dict] = []
        self.problems: list[str] = []

    def check(self, cond: bool, scenario: str, what: str) -> None:
        if not cond:
            self.problems.append(f"{scenario}: {what}")

    def open_long(self, tag: str, n: int, want_host1: int = 0) -> list[str]:
        peers = self.c.ask(op="long_open", tag=tag, n=n)["peers"]
        while want_host1 and peers.count(HOST_ADDRS[0]) < want_host1 and len(peers) < 4 * n:
            peers = self.c.ask(op="long_open", tag=tag, n=1)["peers"]
        return peers

    def first_on(self, host: str, after: float, timeout: float) -> float | None:
        def found():
            for r in self.c.window(after, now() + 1):
                if r[2] == host:
                    return r[0]
            return None
        try:
            return wait_until(found, timeout, f"a new connection on {host}", interval=0.05)
        except ClusterError:
            return None

    # -- 1
    def both_announce(self) -> None:
        name = "1 both hosts announce"
        t0 = now()
        time.sleep(3)
        recs = self.c.window(t0, now())
        counts = per_host(recs)
        # balance = "hash": each client address keeps its server, through either host
        probes = self.c.ask(op="probe", sources=HASH_SOURCES, per_source=8)["records"]
        servers: dict[str, set] = {}
        hosts: dict[str, set] = {}
        for src, host, backend, _err in probes:
            servers.setdefault(src, set()).add(backend)
            hosts.setdefault(src, set()).add(host)
        self.results.append({
            "scenario": name, "connections": counts, "router_paths": list(self.fib.gateways()),
            "hash_probe": {"client_addresses": len(HASH_SOURCES),
                           "connections": len(probes),
                           "failed": sum(1 for p in probes if p[1] is None),
                           "addresses_seen_through_both_hosts":
                               sum(1 for h in hosts.values() if len(h) == 2),
                           "addresses_with_one_server":
                               sum(1 for v in servers.values() if len(v) == 1),
                           "servers_used": len(set().union(*servers.values()))}})
        self.check(counts["failed"] == 0, name, f"{counts['failed']} failed connections")
        self.check(counts["host1"] > 0 and counts["host2"] > 0, name,
                   f"connections did not land on both hosts: {counts}")
        self.check(all(p[1] is not None for p in probes), name, "hash probe connections failed")
        self.check(all(len(v) == 1 for v in servers.values()), name,
                   f"a client address reached two servers: {servers}")
        self.check(sum(1 for h in hosts.values() if len(h) == 2) >= len(HASH_SOURCES) // 2, name,
                   f"too few client addresses went through both hosts: {hosts}")

    # -- 2
    def planned_drain(self) -> None:
        name = "2 planned drain of host 1 (ringd drain --after 4s)"
        peers = self.open_long("A", 8, want_host1=2)
        t0 = now()
        drain = self.h1.drain(DRAIN_AFTER, wait=True)
        t_ack = now()
        t_w = self.fib.wait((HOST_ADDRS[1],), 20, "host 1 withdrawn")
        wait_until(lambda: self.h1.events("lameduck_accept_stop"), 20, "host 1 stops accepting")
        t_stop = now()
        time.sleep(1.0)     # the open connections on host 1 keep working after that
        mid = self.c.ask(op="long_check", tag="A")["flows"]
        on_h1_alive = [f for f in mid if f["peer"] == HOST_ADDRS[0] and not f["error"]]
        flows = self.c.ask(op="long_close", tag="A")["flows"]
        try:
            out, err = drain.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            drain.kill()
            out, err = drain.communicate()
        t_exit = now()
        recs = self.c.window(t0, t_exit)
        on_h1 = [r for r in recs if r[2] == HOST_ADDRS[0]]
        last_h1 = max((r[0] for r in on_h1), default=None)
        between = [r for r in on_h1 if t_ack <= r[0] < t_w]
        lsum = long_summary(flows)
        self.results.append({
            "scenario": name, "connections": per_host(recs), "long_flows": lsum,
            "drain_to_withdraw_ms": ms(t_w - t_ack),
            "withdraw_to_shift_ms": ms(max(0.0, last_h1 - t_w)) if last_h1 else 0,
            "drain_to_last_new_connection_on_host1_ms": ms(last_h1 - t_ack) if last_h1 else None,
            "served_by_host1_between_drain_and_withdraw": len(between),
            "drain_to_accept_stop_ms": ms(t_stop - t_ack),
            "drain_to_host1_exit_ms": ms(t_exit - t_ack),
            "long_flows_on_host1_working_1s_after_accept_stop": len(on_h1_alive),
        })
        self.check(len(failures(recs)) == 0, name,
                   f"{len(failures(recs))} failed connections: {failures(recs)[:3]}")
        self.check(lsum["broken_host1"] + lsum["broken_host2"] == 0, name,
                   f"established flows broken: {lsum}")
        self.check(drain.returncode == 0 and "drained and stopped" in out, name,
                   f"ringd drain exit {drain.returncode}: {out!r} {err!r}")
        self.check(not last_h1 or last_h1 < t_stop, name,
                   "a connection reached host 1 after it stopped accepting")
        self.check(peers.count(HOST_ADDRS[0]) == lsum["host1"], name, "long flow count changed")

    # -- 3
    def comes_back(self) -> None:
        name = "3 host 1 comes back (ringd start)"
        peers = self.open_long("B", 8)
        t0 = now()
        t_ready = self.h1.start_ringd()
        t_ann = self.fib.wait(HOST_ADDRS, 20, "host 1 announced again")
        t_first = self.first_on(HOST_ADDRS[0], t_ann, 10)
        time.sleep(2.0)
        t1 = now()
        flows = self.c.ask(op="long_close", tag="B")["flows"]
        recs = self.c.window(t0, t1)
        after = self.c.window(t_ann + 0.5, t1)
        lsum = long_summary(flows)
        self.results.append({
            "scenario": name, "connections": per_host(recs),
            "connections_after_announce": per_host(after), "long_flows_on_host2": lsum,
            "start_to_ready_ms": ms(t_ready - t0), "ready_to_announce_ms": ms(t_ann - t_ready),
            "announce_to_first_new_connection_on_host1_ms":
                ms(t_first - t_ann) if t_first else None,
        })
        self.check(len(failures(recs)) == 0, name, f"{len(failures(recs))} failed connections")
        self.check(t_first is not None, name, "host 1 took no new connections")
        self.check(lsum["broken_host1"] + lsum["broken_host2"] == 0, name,
                   f"established flows broken: {lsum}")
        self.check(all(p == HOST_ADDRS[1] for p in peers), name,
                   "a long flow opened while host 1 was out went to host 1")

    # -- 4
    def cancelled_drain(self) -> None:
        name = "4 drain cancelled by ringd ready"
        self.open_long("G", 4)
        stops_before = len(self.h1.events("lameduck_accept_stop"))
        t0 = now()
        self.h1.drain(30, wait=False)
        t_w = self.fib.wait((HOST_ADDRS[1],), 20, "host 1 withdrawn")
        t_ready = now()
        res = self.h1.cli("ready")
        t_ann = self.fib.wait(HOST_ADDRS, 20, "host 1 announced again")
        t_first = self.first_on(HOST_ADDRS[0], t_ann, 10)
        t1 = now()
        flows = self.c.ask(op="long_close", tag="G")["flows"]
        recs = self.c.window(t0, t1)
        lsum = long_summary(flows)
        self.results.append({
            "scenario": name, "connections": per_host(recs), "long_flows": lsum,
            "drain_to_withdraw_ms": ms(t_w - t0), "ready_to_announce_ms": ms(t_ann - t_ready),
            "announce_to_first_new_connection_on_host1_ms":
                ms(t_first - t_ann) if t_first else None,
        })
        self.check(res.returncode == 0, name, f"ringd ready: {res.stderr.strip()}")
        self.check(len(failures(recs)) == 0, name, f"{len(failures(recs))} failed connections")
        self.check(lsum["broken_host1"] + lsum["broken_host2"] == 0, name,
                   f"established flows broken: {lsum}")
        self.check(self.h1.ringd.alive() and len(self.h1.events("lameduck_accept_stop"))
                   == stops_before, name, "host 1 stopped accepting anyway")

    # -- 5
    def ringd_killed(self) -> None:
        name = "5 host 1's ringd killed (kill -9, health check withdraws)"
        self.open_long("C", 8, want_host1=2)
        time.sleep(0.5)
        t_kill = now()
        self.h1.ringd.kill(signal.SIGKILL)
        t_w = self.fib.wait((HOST_ADDRS[1],), 20, "host 1 withdrawn")
        time.sleep(1.0)
        t1 = now()
        flows = self.c.ask(op="long_close", tag="C")["flows"]
        recs = self.c.window(t_kill, t1)
        fails = failures(recs)
        last_fail = max((r[1] for r in fails), default=None)
        lsum = long_summary(flows)
        self.results.append({
            "scenario": name, "connections": per_host(recs), "long_flows": lsum,
            "kill_to_withdraw_ms": ms(t_w - t_kill),
            "clients_failed_for_ms": ms(last_fail - t_kill) if last_fail else 0,
        })
        self.check(not [r for r in fails if r[0] > t_w + 0.1], name,
                   "connections failed after the withdrawal")
        self.h1.ringd.stop()
        self.h1.start_ringd()
        self.fib.wait(HOST_ADDRS, 20, "host 1 announced again")

    # -- 6
    def host_cut_off(self) -> None:
        name = "6 host 1 cut off the network (BGP hold timer 9s)"
        time.sleep(1.0)
        t_cut = now()
        rules = """
table inet rdc_dead {
    chain cut_in { type filter hook input priority -300; policy accept; iifname "r0" drop; }
    chain cut_out { type filter hook output priority -300; policy accept; oifname "r0" drop; }
}
"""
        sh("ip", "netns", "exec", self.h1.ns, "nft", "-f", "-", input=rules)
        try:
            t_w = self.fib.wait((HOST_ADDRS[1],), 30, "host 1 withdrawn by the hold timer")
            time.sleep(1.5)
            t1 = now()
        finally:
            sh("ip", "netns", "exec", self.h1.ns, "nft", "delete", "table", "inet", "rdc_dead",
               check=False)
        t_back0 = now()
        t_back = self.fib.wait(HOST_ADDRS, 60, "host 1 announced again")
        recs = self.c.window(t_cut, t1)
        fails = failures(recs)
        last_fail = max((r[0] for r in fails), default=None)
        self.results.append({
            "scenario": name, "connections": per_host(recs),
            "cut_to_withdraw_ms": ms(t_w - t_cut),
            "clients_failed_for_ms": ms(last_fail - t_cut) if last_fail else 0,
            "reconnect_to_announce_ms": ms(t_back - t_back0),
        })
        self.check(not [r for r in fails if r[0] > t_w + 0.1], name,
                   "connections failed after the withdrawal")
        self.check(t_w - t_cut < 12, name, f"withdrawn only after {t_w - t_cut:.1f}s")

    # -- 7
    def stateless_router(self) -> None:
        """Flow pinning off: what a router without connection tracking breaks."""
        self.lab.set_pinning(False)
        # 7a: a planned drain
        name = "7a planned drain, router without flow pinning"
        self.open_long("D", 8, want_host1=3)
        stops_before = len(self.h1.events("lameduck_accept_stop"))
        t0 = now()
        drain = self.h1.drain(DRAIN_AFTER, wait=False)
        drain.wait(10)
        t_w = self.fib.wait((HOST_ADDRS[1],), 20, "host 1 withdrawn")
        wait_until(lambda: len(self.h1.events("lameduck_accept_stop")) > stops_before, 20,
                   "host 1 stops accepting")
        time.sleep(1.0)
        t1 = now()
        flows = self.c.ask(op="long_close", tag="D")["flows"]
        recs = self.c.window(t0, t1)
        lsum = long_summary(flows)
        self.results.append({"scenario": name, "connections": per_host(recs),
                             "long_flows": lsum, "drain_to_withdraw_ms": ms(t_w - t0)})
        self.check(lsum["broken_host2"] == 0, name, f"flows on host 2 broken: {lsum}")
        self.check(lsum["broken_host1"] == lsum["host1"], name,
                   f"expected every flow on host 1 to break without pinning: {lsum}")
        # its broken flows never reach it again: stop it rather than wait drain_timeout
        self.h1.cli("stop", "--now")
        self.h1.ringd.stop()
        # 7b: host 1 comes back (ringd start) into the resilient group
        name = "7b host 1 returns (ringd start), resilient group, no flow pinning"
        self.returns(name, "resilient", lambda: self.h1.start_ringd(), expect_broken=False)
        # 7c, 7d: host 1 withdrawn and announced again with the ExaBGP disable file
        self.returns("7c host 1 returns, resilient group of one member, no flow pinning",
                     "resilient-single", None, expect_broken=None)
        self.returns("7d host 1 returns, hash-threshold group, no flow pinning",
                     "mpath", None, expect_broken=True)
        self.fib.set_mode("resilient")
        self.lab.set_pinning(True)

    def returns(self, name: str, mode: str, bring_back, expect_broken: bool | None) -> None:
        """Host 1 is out; 16 long flows go to host 2; host 1 is announced again:
        how many of those flows break?"""
        self.fib.set_mode(mode)
        if bring_back is None:
            self.h1.disable_file.touch()
            self.fib.wait((HOST_ADDRS[1],), 20, "host 1 withdrawn (ExaBGP disable file)")
            time.sleep(1.5)     # every bucket idle since host 1 left
        peers = self.open_long("R", 16)
        time.sleep(0.5)
        t0 = now()
        if bring_back is None:
            self.h1.disable_file.unlink()
        else:
            bring_back()
        t_ann = self.fib.wait(HOST_ADDRS, 20, "host 1 announced again")
        t_first = self.first_on(HOST_ADDRS[0], t_ann, 10)
        time.sleep(2.0)
        flows = self.c.ask(op="long_close", tag="R")["flows"]
        recs = self.c.window(t0, now())
        after = self.c.window(t_ann + 0.5, now())
        lsum = long_summary(flows)
        self.results.append({"scenario": name, "connections": per_host(recs),
                             "connections_after_announce": per_host(after),
                             "long_flows_on_host2": lsum,
                             "announce_to_first_new_connection_on_host1_ms":
                                 ms(t_first - t_ann) if t_first else None})
        self.check(all(p == HOST_ADDRS[1] for p in peers), name, "a long flow went to host 1")
        self.check(t_first is not None, name, "host 1 took no new connections")
        if expect_broken is False:
            self.check(lsum["broken_host2"] == 0, name, f"established flows broken: {lsum}")
            self.check(len(failures(recs)) == 0, name,
                       f"{len(failures(recs))} failed connections")
        elif expect_broken:
            self.check(lsum["broken_host2"] >= 1, name,
                       f"expected this return to break flows on host 2: {lsum}")


# ------------------------------------------------------------------ report

def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"== {r['scenario']}")
        for k, v in r.items():
            if k == "scenario":
                continue
            if isinstance(v, dict):
                v = ", ".join(f"{a} {b}" for a, b in v.items())
            lines.append(f"   {k.replace('_', ' ')}: {v}")
    return "\n".join(lines)


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bird = subprocess.run(["bird", "--version"], capture_output=True, text=True)
    exa = subprocess.run(["exabgp", "--version"], capture_output=True, text=True)
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": os.uname().release,
            "bird": (bird.stdout + bird.stderr).strip(),
            "exabgp": next((ln.split(":", 1)[1].strip() for ln in exa.stdout.splitlines()
                            if ln.startswith("ExaBGP")), "")}


def preflight() -> None:
    if os.geteuid() != 0:
        raise ClusterError("needs root (network namespaces)")
    if RINGD is None:
        raise ClusterError(f"no ringd next to {sys.executable}: run `make venv` and use .venv/bin/python")
    for tool in ("ip", "bird", "exabgp", "nft", "curl"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} is missing: `make cluster-test` installs it "
                               "(apt-get install bird2 exabgp nftables curl iproute2)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    def on_signal(sig, frame):
        raise KeyboardInterrupt(f"signal {sig}")

    def on_alarm(sig, frame):
        raise ClusterError(f"the whole run took longer than {DEADLINE}s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(DEADLINE)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ringd-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"ok": False, "results": [], "problems": [], "workdir": str(workdir)}
    lab = run = None
    t_start = now()
    try:
        preflight()
        stale = remove_stale()
        if stale:
            say(f"removed namespaces of an earlier run: {stale}")
        out["machine"] = machine()
        lab = Lab(workdir)
        lab.build()
        lab.start()
        run = Run(lab)
        lab.client.ask(op="loop_start", threads=2, pause=0.01)
        for step in (run.both_announce, run.planned_drain, run.comes_back, run.cancelled_drain,
                     run.ringd_killed, run.host_cut_off, run.stateless_router):
            done = len(run.results)
            step()
            say(render(run.results[done:]))
        lab.client.ask(op="loop_stop")
        out["results"] = run.results
        out["problems"] = run.problems + [f"router FIB: {e}" for e in lab.fib.errors]
        out["ok"] = not out["problems"]
    except (Exception, KeyboardInterrupt) as e:
        if not isinstance(e, ClusterError):
            say(traceback.format_exc())
        out["problems"].append(f"aborted: {type(e).__name__}: {e}")
        if run is not None:
            out["results"] = run.results
            out["problems"] += run.problems
    finally:
        signal.alarm(0)
        if lab is not None:
            lab.cleanup()
        left = [n for n in netns_list() if lab is not None and n.startswith(lab.prefix)]
        if left:
            out["problems"].append(f"namespaces left behind: {left}")
            out["ok"] = False
    out["seconds"] = round(now() - t_start, 1)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    if out["problems"]:
        say("PROBLEMS:\n  " + "\n  ".join(out["problems"]))
        say(f"logs kept in {workdir}")
    elif not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"cluster test {'passed' if out['ok'] else 'FAILED'} in {out['seconds']}s")
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
