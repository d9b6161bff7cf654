# Over 450 lines: each system under test and backend with its config, start and stop.
"""The systems under test and the backends behind them: config generation
into a temp dir, start, readiness, process lookup, stop.

Every process is started in a session (process group) of its own and
remembered in a Procs registry; stopping sends SIGTERM to the group, then
SIGKILL after a grace period, so nothing outlives the benchmark."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from loads import HOST, http_probe
import procstat

HERE = os.path.dirname(os.path.abspath(__file__))
HTTP_PATH = "/64.bin"
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# Backends, shared by every system for the whole run.
PORT_IPERF = 18101
PORT_HTTP = 18102
PORT_IDLE = 18103


class StartError(RuntimeError):
    pass


def cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


class Procs:
    """Registry of everything this benchmark started."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.live: dict[int, tuple[str, subprocess.Popen, object]] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None,
              pass_fds: tuple = ()) -> subprocess.Popen:
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab")
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True, env=env, pass_fds=pass_fds)
        except OSError:
            log.close()
            raise
        self.live[p.pid] = (name, p, log)
        return p

    def log_tail(self, name: str, n: int = 1500) -> str:
        try:
            with open(os.path.join(self.logdir, f"{name}.log"), "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def stop(self, pid: int, grace: float = 5.0) -> None:
        entry = self.live.pop(pid, None)
        if entry is None:
            return
        _name, p, log = entry
        try:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            # the group may hold children that outlive the leader
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        finally:
            log.close()

    def stop_all(self) -> None:
        for pid in list(self.live):
            self.stop(pid, grace=3.0)


def wait_ports_free(ports: list[int], timeout: float = 15.0) -> None:
    """Wait until nothing listens on the ports (a torn-down io_uring can hold
    a listening socket for a moment after its process died). The probe binds
    without SO_REUSEPORT, so any listener, even a lingering one, makes it fail."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    who = subprocess.run(["ss", "-tanp", f"sport = :{port}"],
                                         capture_output=True, text=True).stdout
                    raise StartError(f"port {port} still in use after {timeout:.0f}s:\n{who}")
                time.sleep(0.1)
            finally:
                s.close()


def wait_listening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- backends

class Backends:
    """iperf3 server, an nginx HTTP server with a 64-byte file, and the idle
    holder; all pinned to the load CPUs."""

    def __init__(self, procs: Procs, tmp: str, load_cpus: str):
        self.procs, self.tmp, self.cpus = procs, tmp, load_cpus
        self.iperf = self.nginx = self.holder = None

    def start(self) -> None:
        wait_ports_free([PORT_IPERF, PORT_HTTP, PORT_IDLE], timeout=20)
        self.start_iperf()
        www = os.path.join(self.tmp, "www")
        os.makedirs(www, exist_ok=True)
        with open(os.path.join(www, HTTP_PATH.lstrip("/")), "wb") as f:
            f.write(b"0123456789abcdef" * 3 + b"ringd benchmark\n")   # 64 bytes
        conf = os.path.join(self.tmp, "nginx-backend.conf")
        # the backend's single worker goes on the first load CPU
        ncpu = os.cpu_count() or 1
        first = int(self.cpus.split(",")[0].split("-")[0])
        mask = "".join("1" if i == first else "0" for i in reversed(range(ncpu)))
        with open(conf, "w") as f:
            f.write(f"""# HTTP backend for the small-response scenarios (generated)
worker_processes 1;
worker_cpu_affinity {mask};
worker_rlimit_nofile 20000;
daemon off;
pid {self.tmp}/nginx-backend.pid;
error_log {self.tmp}/nginx-backend-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    default_type application/octet-stream;
    server {{
        listen {HOST}:{PORT_HTTP} backlog=4096;
        root {www};
    }}
}}
""")
        self.nginx = self.procs.start("nginx-backend", [
            "taskset", "-c", self.cpus, "nginx", "-c", conf,
            "-e", f"{self.tmp}/nginx-backend-error.log"])
        self.holder = self.procs.start("holder", [
            "taskset", "-c", self.cpus, sys.executable, os.path.join(HERE, "holder.py"),
            str(PORT_IDLE)])
        for port, name in ((PORT_IPERF, "iperf3"), (PORT_HTTP, "nginx-backend"),
                           (PORT_IDLE, "holder")):
            if not wait_listening(port, 10):
                raise StartError(f"backend {name} not listening on {port}: "
                                 + self.procs.log_tail(name))
        if not http_probe(PORT_HTTP, HTTP_PATH):
            raise StartError("nginx backend does not serve " + HTTP_PATH)

    def start_iperf(self) -> None:
        self.iperf = self.procs.start("iperf3-server", [
            "taskset", "-c", self.cpus, "iperf3", "-s", "-B", HOST, "-p", str(PORT_IPERF)])

    def restart_iperf(self) -> None:
        """An iperf3 server can stay 'busy' after a failed client; start anew."""
        if self.iperf is not None:
            self.procs.stop(self.iperf.pid)
        wait_ports_free([PORT_IPERF], timeout=10)
        self.start_iperf()
        if not wait_listening(PORT_IPERF, 10):
            raise StartError("iperf3 server did not come back")

    def pids(self) -> list[int]:
        """Every process of the backends (nginx master and worker included)."""
        out = []
        for p in (self.iperf, self.nginx, self.holder):
            if p is not None and p.poll() is None:
                out += procstat.tree(p.pid)
        return out

    def holder_conns(self) -> int:
        """Connections the idle backend holds (socket fds minus its listener)."""
        return max(0, procstat.count_sockets(self.holder.pid) - 1)


# --------------------------------------------------------------------------- systems

@dataclass
class System:
    key: str                 # short id used in results
    label: str               # shown in tables
    index: int               # selects this system's listening ports
    proxy: bool = True
    info: dict = field(default_factory=dict)
    root: subprocess.Popen | None = None

    @property
    def ports(self) -> dict:
        if not self.proxy:
            return {"bulk": PORT_IPERF, "http": PORT_HTTP, "idle": PORT_IDLE}
        base = 18200 + 10 * self.index
        return {"bulk": base + 1, "http": base + 2, "idle": base + 3}

    def pids(self) -> list[int]:
        return procstat.tree(self.root.pid) if self.root else []

    def start(self, procs: Procs, tmp: str, opts) -> None:
        if not self.proxy:
            return
        wait_ports_free(list(self.ports.values()))
        self._launch(procs, tmp, opts)
        self._ready(procs, tmp, opts)
        deadline = time.monotonic() + 10
        while not http_probe(self.ports["http"], HTTP_PATH):
            if self.root.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"{self.label} does not forward HTTP: "
                                 + procs.log_tail(self.key))
            time.sleep(0.1)

    def diag(self, opts) -> dict | None:
        """What the proxy says about itself (ringd: its status), for the
        record after each session and after a failure."""
        return None

    def stop(self, procs: Procs) -> None:
        if self.root is not None:
            procs.stop(self.root.pid)
            self.root = None

    # per system
    def _launch(self, procs, tmp, opts):
        raise NotImplementedError

    def _ready(self, procs, tmp, opts):
        for port in self.ports.values():
            if not wait_listening(port, 10):
                raise StartError(f"{self.label} not listening on {port}: "
                                 + procs.log_tail(self.key))

    def upstreams(self) -> list[tuple[str, int, int]]:
        """(name, listen port, backend port) per scenario kind."""
        return [("bulk", self.ports["bulk"], PORT_IPERF),
                ("http", self.ports["http"], PORT_HTTP),
                ("idle", self.ports["idle"], PORT_IDLE)]


class Direct(System):
    def __init__(self, index: int):
        super().__init__("direct", "direct", index, proxy=False)


class Ringd(System):
    """ringd in one ring mode. `exe` and `ring` select a build and extra
    [ring] lines (the A/B variants); None = the run's --ringd and no extras."""

    def __init__(self, index: int, sqpoll: bool, key: str | None = None,
                 label: str | None = None, exe: str | None = None, ring: tuple = ()):
        key = key or ("ringd_sqpoll" if sqpoll else "ringd_nosqpoll")
        label = label or ("ringd sqpoll" if sqpoll else "ringd no-sqpoll")
        super().__init__(key, label, index)
        self.sqpoll = sqpoll
        self.exe = exe
        self.ring = list(ring)

    def executable(self, opts) -> str:
        return self.exe or opts.ringd

    def conf_text(self, tmp: str, opts) -> str:
        d = os.path.join(tmp, self.key)
        lines = [
            f"# ringd under benchmark ({self.label}); generated by bench/run.py",
            "[ringd]",
            f"workers = {opts.workers}",
            f'pidfile = "{d}/ringd.pid"',
            f'control_socket = "{d}/ringd.sock"',
            'log_format = "json"',
            'log_level = "warning"',
            'watchdog_timeout = "0s"',
            "",
            "[ring]",
            f"sqpoll = {'true' if self.sqpoll else 'false'}",
            # a --ringd-ring/--ring-a/--ring-b pipe_size replaces --pipe-size
            *([f'pipe_size = "{opts.pipe_size}"']
              if not any(x.split("=")[0].strip() == "pipe_size"
                         for x in (*opts.ringd_ring, *self.ring)) else []),
            *opts.ringd_ring,
            *self.ring,
            "",
        ]
        for name, port, backend in self.upstreams():
            lines += [
                "[[listener]]",
                f'name = "{name}"',
                f'listen = "{HOST}:{port}"',
                f'upstream = "{name}"',
                "backlog = 4096",
                "max_connections = 20000",
                'idle_timeout = "10m"',
            ] + ([f"rcvbuf = {opts.client_rcvbuf}"] if opts.client_rcvbuf else []) + [
                "",
                f"[upstream.{name}]",
                f'servers = ["{HOST}:{backend}"]',
                "max_fails = 0",
                "",
            ]
        return "\n".join(lines)

    def _launch(self, procs, tmp, opts):
        d = os.path.join(tmp, self.key)
        os.makedirs(d, exist_ok=True)
        self.conf = os.path.join(d, "ringd.toml")
        with open(self.conf, "w") as f:
            f.write(self.conf_text(tmp, opts))
        chk = subprocess.run([self.executable(opts), "check", "-c", self.conf], capture_output=True,
                             text=True, timeout=30)
        if chk.returncode != 0:
            raise StartError(f"ringd check failed: {chk.stdout}{chk.stderr}")
        self.root = procs.start(self.key, ["taskset", "-c", opts.proxy_cpus,
                                           self.executable(opts), "start", "-c", self.conf])

    def _ready(self, procs, tmp, opts):
        deadline = time.monotonic() + 20
        last = ""
        while time.monotonic() < deadline:
            if self.root.poll() is not None:
                raise StartError(f"ringd exited {self.root.returncode}: "
                                 + procs.log_tail(self.key))
            st = subprocess.run([self.executable(opts), "status", "-c", self.conf, "--json"],
                                capture_output=True, text=True, timeout=10)
            last = st.stdout + st.stderr
            if st.returncode == 0:
                try:
                    doc = json.loads(st.stdout)
                except json.JSONDecodeError:
                    doc = {}
                ws = doc.get("workers", [])
                if len(ws) == opts.workers and all(w.get("state") == "ready" for w in ws):
                    self.info = {"ring": sorted({w.get("ring", "") for w in ws}),
                                 "worker_cpus": [w.get("cpu") for w in ws]}
                    return
            time.sleep(0.2)
        raise StartError("ringd workers not ready within 20s: " + last[-500:])

    def diag(self, opts) -> dict | None:
        try:
            st = subprocess.run([self.executable(opts), "status", "-c", self.conf, "--json"],
                                capture_output=True, text=True, timeout=10)
            doc = json.loads(st.stdout)
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError, AttributeError):
            return None
        return {k: doc.get(k) for k in ("worker_restarts", "workers", "servers")}


class HAProxy(System):
    """HAProxy as its documentation suggests (`option splice-auto`: splice
    while data waits in the socket, copy the rest), or, as `haproxy_splice`,
    splicing every byte as ringd does (`option splice-request/-response`)."""

    def __init__(self, index: int, splice_always: bool = False):
        super().__init__("haproxy_splice" if splice_always else "haproxy",
                         "HAProxy splice" if splice_always else "HAProxy", index)
        self.splice_always = splice_always

    def conf_text(self, opts) -> str:
        n = opts.workers
        threads = "1" if n == 1 else f"1-{n}"
        cpus = opts.proxy_cpu_ids
        cpu_map = (f"cpu-map 1/1 {cpus[0]}" if n == 1
                   else f"cpu-map auto:1/{threads} {cpu_list(cpus)}")
        lines = [
            "# HAProxy under benchmark; generated by bench/run.py",
            "global",
            f"    nbthread {n}",
            f"    {cpu_map}",
            f"    maxconn {opts.proxy_maxconn}",
            f"    ulimit-n {opts.nofile_hard}",
            "    maxpipes 64",
        ]
        if opts.haproxy_pipesize:
            lines.append(f"    tune.pipesize {opts.haproxy_pipesize}")
        if opts.client_rcvbuf:
            lines.append(f"    tune.rcvbuf.client {opts.client_rcvbuf}")
        lines += [
            "",
            "defaults",
            "    mode tcp",
            *(["    option splice-request", "    option splice-response"]
              if self.splice_always else ["    option splice-auto"]),
            "    timeout connect 5s",
            "    timeout client 10m",
            "    timeout server 10m",
            f"    maxconn {opts.proxy_maxconn}",
            "",
        ]
        for name, port, backend in self.upstreams():
            lines += [f"listen {name}",
                      f"    bind {HOST}:{port} backlog 4096",
                      f"    server s1 {HOST}:{backend}",
                      ""]
        return "\n".join(lines)

    def _launch(self, procs, tmp, opts):
        conf = os.path.join(tmp, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(self.conf_text(opts))
        # -db: foreground, no master process; the one process is the proxy
        self.root = procs.start(self.key, ["taskset", "-c", opts.proxy_cpus,
                                           "haproxy", "-db", "-f", conf])


class Nginx(System):
    def __init__(self, index: int):
        super().__init__("nginx", "nginx", index)

    def conf_text(self, tmp: str, opts) -> str:
        ncpu = os.cpu_count() or 1
        masks = []
        for c in opts.proxy_cpu_ids[:opts.workers]:
            masks.append("".join("1" if i == c else "0" for i in reversed(range(ncpu))))
        while len(masks) < opts.workers:          # more workers than proxy CPUs
            masks.append(masks[len(masks) % len(opts.proxy_cpu_ids)])
        servers = []
        rcvbuf = f" rcvbuf={opts.client_rcvbuf}" if opts.client_rcvbuf else ""
        for name, port, backend in self.upstreams():
            servers.append(f"""    server {{
        listen {HOST}:{port} reuseport backlog=4096{rcvbuf};
        proxy_pass {HOST}:{backend};
    }}""")
        return f"""# nginx stream proxy under benchmark; generated by bench/run.py
load_module {NGINX_STREAM_MODULE};
worker_processes {opts.workers};
worker_cpu_affinity {' '.join(masks)};
worker_rlimit_nofile {opts.nofile_hard};
daemon off;
pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy-error.log warn;
events {{ worker_connections {opts.nofile_hard}; }}
stream {{
    proxy_connect_timeout 5s;
    proxy_timeout 10m;
{chr(10).join(servers)}
}}
"""

    def _launch(self, procs, tmp, opts):
        conf = os.path.join(tmp, "nginx-proxy.conf")
        with open(conf, "w") as f:
            f.write(self.conf_text(tmp, opts))
        self.root = procs.start(self.key, ["taskset", "-c", opts.proxy_cpus, "nginx",
                                           "-c", conf, "-e", f"{tmp}/nginx-proxy-error.log"])


def all_systems() -> list[System]:
    """Every system; haproxy_splice (index 9, after the A/B variants' 5..8)
    runs only when --systems names it."""
    return [Direct(0), Ringd(1, sqpoll=True), Ringd(2, sqpoll=False), HAProxy(3), Nginx(4),
            HAProxy(9, splice_always=True)]


def ab_systems(a: dict, b: dict, modes: list[str]) -> list[System]:
    """The A/B variants of ringd, A and B next to each other per ring mode.
    a, b: {"exe": path, "ring": [lines], "name": "A"|"B"}; modes out of
    nosqpoll, sqpoll. Ports 18251.. (indexes 5..8), apart from the others."""
    out = []
    for i, mode in enumerate(modes):
        sq = mode == "sqpoll"
        for j, side in enumerate((a, b)):
            n = side["name"]
            out.append(Ringd(5 + 2 * i + j, sqpoll=sq, key=f"ringd_{n.lower()}_{mode}",
                             label=f"ringd {n} {'sqpoll' if sq else 'no-sqpoll'}",
                             exe=side["exe"], ring=tuple(side["ring"])))
    return out


def have(tool: str) -> bool:
    return shutil.which(tool) is not None
