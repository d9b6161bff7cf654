# Over 450 lines: every helper the end-to-end tests share, behind one import.
"""Real processes on loopback: ringd itself, test backends, and clients.

Every wait here is bounded: a hung test is a failed test.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BACKEND = HERE / "backend.py"
sys.path.insert(0, str(HERE))
from backend import pattern  # noqa: E402

RINGD = [sys.executable, "-m", "ringd"]


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def wait_for(pred, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Background:
    """fn(*args) in a daemon thread (a hung one cannot keep pytest alive).
    result(timeout) returns what fn returned, raises what it raised, and
    fails the test if fn has not finished within `timeout` seconds: an
    assert inside fn counts, and a join is never left unchecked."""

    def __init__(self, fn, *args):
        self._out: list = []
        self._err: list[BaseException] = []

        def run():
            try:
                self._out.append(fn(*args))
            except BaseException as e:      # handed to result()
                self._err.append(e)
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"background task still running after {timeout}s")
        if self._err:
            raise self._err[0]
        return self._out[0]


class Backend:
    """tests/backend.py in its own process."""

    def __init__(self, mode: str, ports: list[int], host: str = "127.0.0.1"):
        self.mode = mode
        self.ports = ports
        self.host = host
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Backend":
        args = [sys.executable, str(BACKEND)]
        if self.host != "127.0.0.1":
            args.append(f"--host={self.host}")
        self.proc = subprocess.Popen(args + [self.mode] + [str(p) for p in self.ports],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = _readline_timeout(self.proc.stdout, 10)
        assert line.strip() == "READY", f"backend did not start: {line!r}"
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _readline_timeout(stream, timeout: float) -> str:
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else ""


class Ringd:
    """A ringd master started as `ringd start -c FILE`, JSON logs to a file."""

    def __init__(self, tmp: Path, body: str, *, workers: int = 2, extra_ringd: str = "",
                 env: dict | None = None, test_hooks: bool = False,
                 wrap: list[str] | None = None, pass_fds: tuple = ()):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.conf = self.tmp / "ringd.toml"
        self.pidfile = self.tmp / "ringd.pid"
        self.sock = self.tmp / "ringd.sock"
        self.logfile = self.tmp / "ringd.log"
        self.workers = workers
        self.extra_ringd = extra_ringd
        self.test_hooks = test_hooks
        self.env = env or {}
        self.wrap = wrap or []       # e.g. ["prlimit", "--nofile=128:128", "--"]
        self.pass_fds = pass_fds     # open fds the wrapper (or ringd) inherits
        self.proc: subprocess.Popen | None = None
        self.write_config(body)

    def header(self) -> str:
        return textwrap.dedent(f"""\
            [ringd]
            workers = {self.workers}
            pidfile = "{self.pidfile}"
            control_socket = "{self.sock}"
            log_format = "json"
            log_level = "debug"
            """) + self.extra_ringd + "\n"

    def write_config(self, body: str, raw: bool = False) -> None:
        text = body if raw else self.header() + textwrap.dedent(body)
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.conf)

    def start(self, wait: bool = True) -> "Ringd":
        env = dict(os.environ)
        env.update(self.env)
        if self.test_hooks:
            env["RINGD_TEST_HOOKS"] = "1"
        self._logfh = open(self.logfile, "ab")
        self.proc = subprocess.Popen(self.wrap + RINGD + ["start", "-c", str(self.conf)],
                                     stdout=self._logfh, pass_fds=self.pass_fds,
                                     stderr=subprocess.STDOUT, env=env)
        if wait:
            wait_for(lambda: self.events("ready") or self.proc.poll() is not None, 20,
                     what="ringd ready")
            assert self.proc.poll() is None, f"ringd exited: {self.log_text()}"
        return self

    # --------------------------------------------------------------- logs
    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"event": "<not json>", "raw": line})
        return out

    def events(self, name: str) -> list[dict]:
        return [e for e in self.log_lines() if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 10, count: int = 1, **match) -> list[dict]:
        def found():
            evs = [e for e in self.events(name)
                   if all(e.get(k) == v for k, v in match.items())]
            return evs if len(evs) >= count else None
        return wait_for(found, timeout, what=f"log event {name} {match}")

    # --------------------------------------------------------------- control
    def request(self, payload: dict, timeout: float = 30) -> dict:
        from ringd.control import request     # the CLI's own client
        return request(str(self.sock), payload, timeout=timeout)

    def status(self) -> dict:
        reply = self.request({"cmd": "status"})
        assert reply["ok"], reply
        return reply["status"]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(RINGD + list(args), capture_output=True, text=True,
                              timeout=timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self, gen: int | None = None) -> list[int]:
        st = self.status()
        g = gen if gen is not None else st["generation"]
        return [w["pid"] for w in st["workers"] if w["generation"] == g and w["pid"]]

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._logfh.close()
        # no worker may outlive the master
        for pid in children_of_any(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def assert_no_traceback(self) -> None:
        text = self.log_text()
        assert "Traceback" not in text, text[-4000:]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def children_of_any(ppid: int) -> list[int]:
    """Processes whose title says they are ringd workers of master `ppid`
    (or whose parent is ppid)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == ppid:
            out.append(int(d.name))
    return out


def proc_threads(pid: int) -> list[str]:
    names = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            names.append((t / "comm").read_text().strip())
        except OSError:
            pass
    return names


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


# ------------------------------------------------------------------- clients

def connect(port: int, host: str = "127.0.0.1", timeout: float = 10,
            source: str | None = None) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def connect_nowait(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A non-blocking socket whose connect is under way (not yet accepted)."""
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    return s


def recv_all(s: socket.socket, limit: int = 1 << 30) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        data = s.recv(1 << 20)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def duplex(port: int, send_n: int, recv_n: int, timeout: float = 30,
           host: str = "127.0.0.1") -> None:
    """Against a `duplex` backend: send send_n bytes while receiving recv_n,
    half-close, and check both directions by SHA-256."""
    s = connect(port, host, timeout)
    payload = pattern(send_n, seed=send_n + 7)

    def sender():
        s.sendall(struct.pack("!Q", recv_n))
        view = memoryview(payload)
        for off in range(0, len(view), 1 << 20):
            s.sendall(view[off:off + (1 << 20)])
        s.shutdown(socket.SHUT_WR)

    sending = Background(sender)
    try:
        got = recv_all(s)
        sending.result(timeout)
    finally:
        s.close()
    assert len(got) == recv_n + 32, f"got {len(got)} bytes, want {recv_n} + 32"
    body, digest = got[:recv_n], got[recv_n:]
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(recv_n, seed=recv_n)).digest(), \
        "server->client bytes differ"
    assert digest == hashlib.sha256(payload).digest(), "client->server bytes differ"


def echo_roundtrip(port: int, data: bytes, timeout: float = 10, host: str = "127.0.0.1") -> bytes:
    s = connect(port, host, timeout)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)
    finally:
        s.close()


def listener(name: str, port: int, upstream: str, **opts) -> str:
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in opts.items())
    return f"""
[[listener]]
name = "{name}"
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
{extra}"""


def upstream(name: str, servers: list, **opts) -> str:
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in opts.items())
    return f"""
[upstream.{name}]
servers = {_toml(servers)}
{extra}"""


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    raise TypeError(v)


# ------------------------------------------------------------------- balancing helpers

def health_table(upstream_name: str, **opts) -> str:
    """A [upstream.NAME.health] table (durations as strings: "200ms")."""
    extra = "".join(f"{k} = {_toml(v)}\n" for k, v in opts.items())
    return f"""
[upstream.{upstream_name}.health]
{extra}"""


def read_line(s: socket.socket, limit: int = 4096) -> bytes:
    """Bytes up to and including the first newline (or EOF)."""
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < limit:
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def hold_id(port: int, host: str = "127.0.0.1", source: str | None = None,
            hello: bytes = b"", timeout: float = 10) -> tuple[socket.socket, int]:
    """Connect through ringd to an `id` (or, with hello=b"WHO\\n", a `pong`/`wrong`)
    backend; return the open socket and the port of the backend it reached."""
    s = connect(port, host, timeout, source=source)
    try:
        if hello:
            s.sendall(hello)
        line = read_line(s)
        assert line.startswith(b"ID ") and line.endswith(b"\n"), \
            f"no ID line from the backend: {line!r}"
        return s, int(line[3:])
    except BaseException:
        s.close()
        raise


def backend_of(port: int, host: str = "127.0.0.1", source: str | None = None,
               hello: bytes = b"", timeout: float = 10) -> int:
    """One short connection: which backend port did it reach?"""
    s, backend = hold_id(port, host, source, hello, timeout)
    s.close()
    return backend


def servers_by_name(status: dict) -> dict[str, dict]:
    """ringd status "servers" keyed by server name (upstream names must not clash)."""
    return {s["server"]: s for s in status["servers"]}


class Traffic:
    """Short connections in a background thread, one after the other, until
    stop(): each records (monotonic start time, backend port or None, error)."""

    def __init__(self, port: int, hello: bytes = b"", pause: float = 0.005,
                 host: str = "127.0.0.1", timeout: float = 5):
        self.port, self.hello, self.pause = port, hello, pause
        self.host, self.timeout = host, timeout
        self.results: list[tuple[float, int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                self.results.append((t, backend_of(self.port, self.host, hello=self.hello,
                                                   timeout=self.timeout), ""))
            except (OSError, AssertionError) as e:
                self.results.append((t, None, repr(e)))
            self._stop.wait(self.pause)

    def start(self) -> "Traffic":
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int | None, str]]:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        return self.results

    @property
    def failures(self) -> list[tuple[float, int | None, str]]:
        return [r for r in self.results if r[1] is None]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def failures_outside(self, windows: list[tuple[float, float]],
                         before: float = 1.0) -> list[tuple[float, int | None, str]]:
        """Failures of connections that did not start within `before` seconds
        ahead of, or during, one of the (start, end) windows (e.g. while a
        backend was being killed: what it had open dies with it)."""
        return [f for f in self.failures
                if not any(a - before <= f[0] <= b for a, b in windows)]
