# Over 450 lines: the in-place upgrade and the fd store, each acceptance case of issue 12 in full.
"""ringd upgrade (in-place re-exec of the master) and systemd's fd store.

Real processes throughout: the master re-executes `python -m ringd` from the
venv; the stand-in for systemd is a datagram socket that keeps what it is
sent with FDSTORE=1 and hands it back through $LISTEN_FDS to a restarted
master, the way sd_listen_fds(3) describes."""
from __future__ import annotations

import array
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness import (RINGD, Backend, Ringd, children_of_any, cmdline, echo_roundtrip, fd_count,
                     free_ports, listener, upstream, wait_for)
from test_reload import ShortClients

MODES = {"sqpoll": "true", "defer_taskrun": "false"}


def _conf(port: int, bport: int, sqpoll: str = "false", admin: int | None = None) -> str:
    text = f"[ring]\nsqpoll = {sqpoll}\n"
    if admin:
        text += f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
    return text + listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"])


class _Stamped(list):
    """ShortClients.failures that say when each happened."""

    def append(self, item) -> None:
        super().append(f"{item} (at {time.time():.3f})")


def _load(port: int, n: int) -> ShortClients:
    sc = ShortClients(port, n)
    sc.failures = _Stamped()
    return sc


def _explain(r: Ringd, failures: list[str]) -> str:
    """The first failures, and what ringd logged from 12 s (a client's
    timeout and then some) before the first of them to the last."""
    import datetime
    import re
    times = [float(m.group(1)) for f in failures for m in [re.search(r"\(at ([0-9.]+)\)$", f)]
             if m]
    if not times:
        return repr(failures[:5])
    lo, hi = min(times) - 12, max(times) + 1
    lines = []
    for e in r.log_lines():
        try:
            t = datetime.datetime.fromisoformat(e["timestamp"].rstrip("Z")).replace(
                tzinfo=datetime.timezone.utc).timestamp()
        except (KeyError, ValueError):
            continue
        if lo <= t <= hi:
            lines.append(f"{t:.3f} {e.get('event')} " + " ".join(
                f"{k}={v}" for k, v in e.items() if k not in ("event", "timestamp", "level")))
    return f"{len(failures)} failures: {failures[:5]}\n" + "\n".join(lines[-150:])


def _upgrade(r: Ringd, timeout: float = 90) -> subprocess.CompletedProcess:
    return r.cli("upgrade", "-c", str(r.conf), timeout=timeout)


class SlowStream:
    """One echo connection that keeps sending chunks until stop(), then
    half-closes; every byte that comes back is hashed against what was sent."""

    def __init__(self, port: int, chunk: int = 32768, pause: float = 0.02):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sent = hashlib.sha256()
        self.got = hashlib.sha256()
        self.nsent = self.ngot = 0
        self.error = ""
        self._stop = threading.Event()
        self._chunk, self._pause = chunk, pause
        self._w = threading.Thread(target=self._write, daemon=True)
        self._r = threading.Thread(target=self._read, daemon=True)
        self._w.start()
        self._r.start()

    def _write(self) -> None:
        k = 0
        try:
            while not self._stop.is_set() and k < 100000:
                data = hashlib.sha256(b"%d" % k).digest() * (self._chunk // 32)
                self.sock.sendall(data)
                self.sent.update(data)
                self.nsent += len(data)
                k += 1
                self._stop.wait(self._pause)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.error = f"send: {e!r}"

    def _read(self) -> None:
        try:
            while True:
                b = self.sock.recv(1 << 20)
                if not b:
                    return
                self.got.update(b)
                self.ngot += len(b)
        except OSError as e:
            self.error = f"recv: {e!r}"

    def finish(self, timeout: float = 30) -> None:
        self._stop.set()
        self._w.join(timeout)
        self._r.join(timeout)
        self.sock.close()
        assert not self._w.is_alive() and not self._r.is_alive(), "stream hangs"
        assert self.error == "", self.error
        assert self.ngot == self.nsent and self.got.digest() == self.sent.digest(), \
            f"stream: sent {self.nsent} bytes, got {self.ngot} back, hashes differ"


def _metric(r: Ringd, admin: int, name: str) -> float:
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


# --------------------------------------------------------------------------- (a)

@pytest.mark.parametrize("mode", MODES)
def test_upgrade_under_load_drops_nothing(tmp_path, mode):
    """`ringd upgrade` under 4 short-connection loops and a long stream: exit
    0, same master pid, a new image and generation, the old one drained once
    the stream ends; no failure, the stream's bytes intact, counters monotonic."""
    bport, port, admin = free_ports(3)
    with Backend("echo", [bport]):
        conf = _conf(port, bport, MODES[mode], admin)
        with Ringd(tmp_path, conf, workers=2, extra_ringd='drain_timeout = "60s"\n') as r:
            before = r.status()
            old_pids = set(r.worker_pids())
            with _load(port, 4) as sc:
                sc.wait_ok(8)
                stream = SlowStream(port)
                wait_for(lambda: stream.ngot > 100000, 10, what="stream flowing")
                accepted = _metric(r, admin, "ringd_connections_accepted_total")
                res = _upgrade(r)
                assert res.returncode == 0, res.stdout + res.stderr
                assert "upgrade ok" in res.stdout
                sc.wait_ok(20)                  # served by the new generation
                after = r.status()
                got_before_end = stream.ngot
                wait_for(lambda: stream.ngot > got_before_end + 100000, 10,
                         what="the stream flows on after the upgrade")
                stream.finish()
            assert sc.failures == [], _explain(r, sc.failures)
            assert after["pid"] == before["pid"] == r.pid and r.proc.poll() is None
            assert after["exec_started"] > before["exec_started"]
            assert after["upgrades"] == 1 and after["upgrade"]["state"] == "ok"
            assert after["generation"] == 2
            new_pids = set(r.worker_pids(2))
            assert new_pids and not new_pids & old_pids
            assert all(p in children_of_any(r.pid) for p in new_pids)
            # the old generation drains once the stream is done, and is reaped
            wait_for(lambda: [g["generation"] for g in r.status()["generations"]] == [2], 20,
                     what="generation 1 drained")
            assert not [p for p in old_pids if os.path.exists(f"/proc/{p}")
                        and "ringd" in cmdline(p)]
            assert _metric(r, admin, "ringd_connections_accepted_total") >= accepted
            assert _metric(r, admin, 'ringd_upgrades_total{result="ok"}') == 1
            for ev in ("upgrade_start", "upgrade_exec", "generation_adopted", "upgrade_done"):
                assert r.events(ev), ev
            assert r.events("upgrade_refused") == [] and r.events("upgrade_failed") == []
            r.assert_no_traceback()


# --------------------------------------------------------------------------- (b)

class NotifyStandIn:
    """$NOTIFY_SOCKET of a pretend systemd: keeps the fds sent with
    FDSTORE=1 by FDNAME (a name sent again replaces the old fd), drops them
    on FDSTOREREMOVE=1, and records every message."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.store: dict[str, int] = {}
        self.messages: list[dict] = []
        self.removed: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except socket.timeout:
                continue
            except OSError:
                return
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in msg.decode().split("\n") if "=" in line)
            with self._lock:
                self.messages.append(fields)
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTORE") == "1" and fds:
                    old = self.store.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.store[name] = fds[0]
                    for extra in fds[1:]:
                        os.close(extra)
                    continue
                for fd in fds:
                    os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
                    self.removed.append(name)
                    old = self.store.pop(name, None)
                    if old is not None:
                        os.close(old)

    def said(self, key: str, value: str = "1") -> int:
        with self._lock:
            return sum(1 for m in self.messages if m.get(key) == value)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()
        for fd in self.store.values():
            os.close(fd)
        self.store.clear()


# sd_listen_fds as systemd sets it up: the fds at 3, 4, ... and LISTEN_PID the
# pid of the program it executes (this wrapper's, which exec keeps)
LISTEN_WRAPPER = r"""
import fcntl, os, sys
n = int(sys.argv[1])
fds = [int(x) for x in sys.argv[2:2 + n]]
names = sys.argv[2 + n:2 + 2 * n]
cmd = sys.argv[2 + 2 * n:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(n), LISTEN_FDNAMES=":".join(names), LISTEN_PID=str(os.getpid()))
os.execv(cmd[0], cmd)
"""


def test_master_crash_with_fd_store_loses_no_client(tmp_path):
    """SIGKILL the master; 50 clients connect while nothing runs; a new
    master started with the stored sockets in $LISTEN_FDS serves every one
    (none refused or reset). A stored socket no listener wants is closed and
    taken out of the store."""
    crash_and_restart(tmp_path, workers_after=2)


def _netns_available() -> bool:
    import shutil
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _netns_available(),
                    reason="needs root and unshare -n (a network namespace of our own)")
@pytest.mark.parametrize("migrate", ["0", "1"], ids=["tcp_migrate_req=0", "tcp_migrate_req=1"])
def test_master_crash_restarted_with_fewer_workers(tmp_path, migrate):
    """The crash above, but the new master runs 1 worker where the dead one
    ran 2: the socket of slot 1 comes back from the store with clients
    queued on it. With tcp_migrate_req=0 the worker adopts it, with 1 it is
    closed at once and the kernel moves its queue to slot 0's socket (left
    open, new clients would keep landing on a socket nobody accepts from).
    Every client is served either way. Runs in a network namespace of its
    own (tests/netns_crash.py), where the sysctl can be set."""
    from pathlib import Path
    res = subprocess.run(["unshare", "-n", sys.executable,
                          str(Path(__file__).parent / "netns_crash.py"), str(tmp_path), migrate],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "ok", res.stdout[-2000:]


def crash_and_restart(tmp_path, workers_after: int, migrate: str | None = None) -> None:
    """SIGKILL a 2-worker master whose sockets a stand-in for systemd
    stores, connect 50 clients, start a master of `workers_after` workers
    with the stored sockets in $LISTEN_FDS: every client is served. With
    `migrate` (the namespace's tcp_migrate_req) it also checks what became
    of the slots beyond `workers_after`."""
    bport, port, stray_port = free_ports(3)
    notify = NotifyStandIn(str(tmp_path / "notify.sock"))
    clients: list[socket.socket] = []
    stray = socket.socket()
    try:
        with Backend("echo", [bport]):
            r1 = Ringd(tmp_path / "a", _conf(port, bport), workers=2,
                       env={"NOTIFY_SOCKET": notify.path})
            r1.start()
            wait_for(lambda: len(notify.store) == 2 and notify.said("READY"), 10,
                     what="both listening sockets stored")
            assert sorted(notify.store) == [f"ringd/127.0.0.1/{port}/0",
                                            f"ringd/127.0.0.1/{port}/1"]
            workers = r1.worker_pids()
            os.kill(r1.pid, signal.SIGKILL)
            r1.proc.wait(5)
            r1.stop()
            # the orphaned workers notice, stop accepting and exit
            wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and "ringd" in cmdline(p)
                                     for p in workers), 10, what="orphaned workers gone")
            for i in range(50):
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
                c.sendall(b"client %d\n" % i)
                c.shutdown(socket.SHUT_WR)
                clients.append(c)
            # a stored socket that the config does not have (a removed listener)
            stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            stray.bind(("127.0.0.1", stray_port))
            stray.listen(8)
            stray_name = f"ringd/127.0.0.1/{stray_port}/0"
            names = sorted(notify.store) + [stray_name]
            fds = [notify.store[n] for n in sorted(notify.store)] + [stray.fileno()]
            wrap = [sys.executable, "-c", LISTEN_WRAPPER, str(len(fds))] + \
                [str(fd) for fd in fds] + names
            r2 = Ringd(tmp_path / "b", _conf(port, bport), workers=workers_after,
                       env={"NOTIFY_SOCKET": notify.path}, wrap=wrap, pass_fds=tuple(fds))
            r2.start()
            try:
                for i, c in enumerate(clients):
                    c.settimeout(15)
                    got = b""
                    while True:
                        b = c.recv(4096)        # a reset raises here
                        if not b:
                            break
                        got += b
                    assert got == b"client %d\n" % i, (i, got)
                ev = r2.wait_event("listen_fds_adopted")[0]
                assert sorted(ev["sockets"]) == sorted(names[:2])
                closed = r2.wait_event("listen_fd_closed")[0]
                assert closed["name"] == stray_name
                wait_for(lambda: stray_name in notify.removed, 5, what="stray taken out")
                # the environment of the workers holds no LISTEN_* variable
                wpid = r2.worker_pids()[0]
                env = open(f"/proc/{wpid}/environ", "rb").read().split(b"\0")
                assert not [e for e in env if e.startswith(b"LISTEN_")]
                assert echo_roundtrip(port, b"after") == b"after"
                if migrate == "1":      # the extra slots' sockets are closed, out of the store
                    extra = [n for n in names[:2] if int(n.rsplit("/", 1)[1]) >= workers_after]
                    wait_for(lambda: all(n in notify.removed for n in extra), 5,
                             what="extra slots taken out of the store")
                    assert r2.events("listeners_adopted") == []
                    closed = [s for e in r2.events("listeners_closed") for s in e["sockets"]]
                    assert all(f"127.0.0.1:{port}#{n.rsplit('/', 1)[1]}" in closed
                               for n in extra), closed
                elif migrate == "0" and workers_after < 2:     # adopted, still stored
                    assert r2.events("listeners_adopted")
                    assert not [n for n in names[:2] if n in notify.removed]
                # new clients after the restart: none lands on a socket nobody accepts from
                for i in range(20):
                    assert echo_roundtrip(port, b"late %d" % i) == b"late %d" % i
                r2.assert_no_traceback()
            finally:
                r2.stop()
    finally:
        for c in clients:
            c.close()
        stray.close()
        notify.close()


def test_fd_store_follows_listeners_and_stop(tmp_path):
    """Sockets a reload drops leave the store (FDSTOREREMOVE=1); an upgrade
    stores nothing again; a graceful stop takes every socket out."""
    bport, p1, p2 = free_ports(3)
    notify = NotifyStandIn(str(tmp_path / "notify.sock"))
    try:
        with Backend("echo", [bport]):
            two = _conf(p1, bport) + listener("other", p2, "app")
            r = Ringd(tmp_path, two, workers=2, env={"NOTIFY_SOCKET": notify.path})
            with r:
                wait_for(lambda: len(notify.store) == 4, 10, what="4 sockets stored")
                stored = notify.said("FDSTORE")
                res = _upgrade(r)
                assert res.returncode == 0, res.stderr
                assert notify.said("FDSTORE") == stored     # nothing stored twice
                assert notify.said("RELOADING") >= 1 and notify.said("READY") >= 2
                r.write_config(_conf(p1, bport))
                assert r.cli("reload", "-c", str(r.conf)).returncode == 0
                wait_for(lambda: sorted(notify.removed) == [f"ringd/127.0.0.1/{p2}/0",
                                                            f"ringd/127.0.0.1/{p2}/1"], 10,
                         what="the dropped listener's sockets removed")
                r.signal(signal.SIGQUIT)
                assert r.wait_exit(20) == 0
            assert notify.store == {}
    finally:
        notify.close()


# --------------------------------------------------------------------------- (c)

def test_broken_new_program_is_refused_and_old_master_serves(tmp_path):
    """A pre-exec check that fails (a file the new program rejects, an
    import that fails) refuses the upgrade with the reason; nothing changes."""
    bport, port, admin = free_ports(3)
    hook = tmp_path / "fail-import"
    with Backend("echo", [bport]):
        good = _conf(port, bport, admin=admin)
        with Ringd(tmp_path, good, workers=2, test_hooks=True,
                   env={"RINGD_TEST_UPGRADE_FAIL_FILE": str(hook)}) as r:
            before = r.status()
            pids = sorted(r.worker_pids())
            with _load(port, 2) as sc:
                sc.wait_ok(4)
                r.write_config(good + "\n[ringd.bogus]\n")
                res = _upgrade(r)
                assert res.returncode == 1
                assert "upgrade refused" in res.stderr and "ringd.bogus" in res.stderr, res.stderr
                r.write_config(good)
                hook.write_text("import")
                res = _upgrade(r)
                assert res.returncode == 1
                assert "cannot import ringd._native" in res.stderr, res.stderr
                r.signal(signal.SIGUSR2)            # the same check, nobody to tell
                r.wait_event("upgrade_refused", count=3)
                sc.wait_ok(10)
            assert sc.failures == [], _explain(r, sc.failures)
            after = r.status()
            assert after["pid"] == before["pid"] and after["exec_started"] == before["exec_started"]
            assert after["upgrades"] == 0 and after["upgrade"]["state"] == "refused"
            assert sorted(r.worker_pids()) == pids and after["generation"] == 1
            assert _metric(r, admin, 'ringd_upgrades_total{result="refused"}') == 3
            reasons = [e["reason"] for e in r.events("upgrade_refused")]
            assert "ringd.bogus" in reasons[0] and "ringd._native" in reasons[1]
            assert r.events("upgrade_exec") == []
            hook.unlink()
            res = _upgrade(r)                       # and once fixed, it goes through
            assert res.returncode == 0, res.stderr
            r.assert_no_traceback()


def test_signals_during_an_upgrade_are_not_lost(tmp_path):
    """A SIGHUP that arrives while the check runs is handed to the new image,
    which reloads after its own generation is up; a stop that arrives while
    the check runs wins: the upgrade is refused and ringd stops."""
    bport, port = free_ports(2)
    slow = tmp_path / "slow"
    slow.write_text("sleep 1.5")
    with Backend("echo", [bport]):
        with Ringd(tmp_path / "a", _conf(port, bport), workers=2, test_hooks=True,
                   env={"RINGD_TEST_UPGRADE_FAIL_FILE": str(slow)}) as r:
            r.signal(signal.SIGUSR2)
            r.wait_event("upgrade_start")
            r.signal(signal.SIGHUP)             # queued behind the upgrade
            assert r.wait_event("upgrade_exec", timeout=20)[0]["pending"] == ["reload"]
            r.wait_event("upgrade_done", timeout=20)
            r.wait_event("reload_ok", timeout=20)
            st = r.status()
            assert st["upgrades"] == 1 and st["reloads_ok"] == 1 and st["generation"] == 3
            assert echo_roundtrip(port, b"x") == b"x"
        r = Ringd(tmp_path / "b", _conf(port, bport), workers=2, test_hooks=True,
                  env={"RINGD_TEST_UPGRADE_FAIL_FILE": str(slow)})
        with r:
            upgrading = subprocess.Popen(RINGD + ["upgrade", "-c", str(r.conf)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            r.wait_event("upgrade_start")
            r.signal(signal.SIGQUIT)
            assert r.wait_exit(20) == 0
            out, err = upgrading.communicate(timeout=30)
            assert upgrading.returncode == 1 and "a stop was requested" in err, (out, err)
            assert r.events("upgrade_exec") == []


def test_new_workers_failing_keep_the_adopted_generation(tmp_path):
    """After the exec the new image cannot start workers: it keeps the
    adopted generation serving, `ringd upgrade` exits 1 and status shows
    upgrade_error until a reload succeeds."""
    bport, port = free_ports(2)
    crash = tmp_path / "crash"
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, bport), workers=2, test_hooks=True,
                   env={"RINGD_TEST_CRASH_FILE": str(crash)}) as r:
            before = r.status()
            pids = sorted(r.worker_pids())
            with _load(port, 2) as sc:
                sc.wait_ok(4)
                crash.write_text("")
                res = _upgrade(r)
                assert res.returncode == 1
                assert "upgrade failed" in res.stderr, res.stderr
                sc.wait_ok(10)
            assert sc.failures == [], _explain(r, sc.failures)
            st = r.status()
            assert st["pid"] == before["pid"] and st["exec_started"] > before["exec_started"]
            assert st["upgrade_error"] and st["upgrade"]["state"] == "failed"
            assert st["generation"] == 1 and sorted(r.worker_pids(1)) == pids
            assert r.wait_event("upgrade_failed")[0]["reason"].startswith("new workers failed")
            crash.unlink()
            assert r.cli("reload", "-c", str(r.conf)).returncode == 0
            assert r.status()["upgrade_error"] is None
            assert echo_roundtrip(port, b"fixed") == b"fixed"


def test_generation_of_another_memory_layout_is_drained_opaque(tmp_path):
    """A generation whose shared memory the new image cannot read (another
    RINGD_ABI_VERSION; simulated) is drained through its control channel and
    reaped; its counters stop where the old image left them, never go back."""
    bport, port, admin = free_ports(3)
    hook = tmp_path / "opaque"
    hook.write_text("")
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, bport, admin=admin), workers=2, test_hooks=True,
                   # the old generation must keep its stream (no handover)
                   extra_ringd='drain_timeout = "30s"\nhandover = false\n',
                   env={"RINGD_TEST_UPGRADE_OPAQUE_FILE": str(hook)}) as r:
            for i in range(20):
                assert echo_roundtrip(port, b"%d" % i) == b"%d" % i
            accepted = _metric(r, admin, "ringd_connections_accepted_total")
            assert accepted >= 20
            stream = SlowStream(port)
            wait_for(lambda: stream.ngot > 50000, 10, what="stream flowing")
            old = set(r.worker_pids(1))
            res = _upgrade(r)
            assert res.returncode == 0, res.stderr
            gens = {g["generation"]: g for g in r.status()["generations"]}
            assert gens[1]["opaque"] is True and gens[2]["opaque"] is False
            assert r.wait_event("generation_opaque")[0]["gen"] == 1
            got = stream.ngot
            wait_for(lambda: stream.ngot > got + 50000, 10, what="stream on the opaque generation")
            stream.finish()
            wait_for(lambda: list(gens_of(r)) == [2], 20, what="opaque generation drained")
            assert not [p for p in old if os.path.exists(f"/proc/{p}") and "ringd" in cmdline(p)]
            assert _metric(r, admin, "ringd_connections_accepted_total") >= accepted
            r.assert_no_traceback()


def test_source_table_is_handed_over(tmp_path):
    """The per-source limit table belongs to the master, so it crosses the
    exec: the same memory after the upgrade, the counts of an old worker
    held in its column while it drains, cleared once it is reaped, the new
    workers in columns of their own. (Counts are made through the table
    itself, as test_srclimit does, in the column of the old worker that
    holds an open connection, so that it lives on.)"""
    from ringd._native import ffi, lib
    from ringd.srclimit import listener_key, source_address
    from test_srclimit import _map_master_table
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, bport), workers=2,
                   # old workers must keep their connections (no handover)
                   extra_ringd='source_table_size = 2048\ndrain_timeout = "60s"\n'
                               'handover = false\n') as r:
            held_conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            held_conn.sendall(b"hold\n")
            assert held_conn.recv(16) == b"hold\n"
            st = r.status()
            busy = [w for w in st["workers"] if w["active"] == 1]
            assert len(busy) == 1, st["workers"]
            col, pid = busy[0]["source_column"], busy[0]["pid"]
            mm, ptr = _map_master_table(r.pid)
            try:
                lk, a = listener_key("web"), source_address("10.0.0.9")
                ref = ffi.new("uint32_t *")
                for _ in range(3):      # as if that worker had 3 connections from 10.0.0.9
                    assert lib.srclimit_acquire(ptr, col, lk, a, 3, 0, 0, 1, ref) == \
                        lib.SRCLIMIT_OK
                spare = st["source_table"]["columns"] - 1
                table_fds = _table_fds(r.pid)
                res = _upgrade(r)
                assert res.returncode == 0, res.stderr
                assert r.events("source_table_not_adopted") == []
                after = r.status()
                assert after["source_table"]["size"] == 2048
                old = [w for w in after["workers"] if w["generation"] == 1 and w["pid"]]
                assert [(w["pid"], w["source_column"]) for w in old] == [(pid, col)]
                new_cols = {w["source_column"] for w in after["workers"]
                            if w["generation"] == 2}
                assert len(new_cols) == 2 and None not in new_cols and col not in new_cols
                # the same memory, as this mapping and a fresh one show: the counts are there
                assert lib.srclimit_acquire(ptr, spare, lk, a, 3, 0, 0, 1, ref) == \
                    lib.SRCLIMIT_OVER_OPEN
                m2, p2 = _map_master_table(r.pid)
                try:
                    assert lib.srclimit_acquire(p2, spare, lk, a, 3, 0, 0, 1, ref) == \
                        lib.SRCLIMIT_OVER_OPEN
                finally:
                    del p2
                    m2.close()
                # the connection ends, the old worker is reaped, its column cleared
                held_conn.close()
                wait_for(lambda: gens_of(r) == [2], 20, what="generation 1 reaped")
                assert lib.srclimit_acquire(ptr, spare, lk, a, 3, 0, 0, 1, ref) == \
                    lib.SRCLIMIT_OK
                lib.srclimit_release(ptr, spare, ref[0])
                assert r.status()["source_table"]["columns_in_use"] == 2
                assert _table_fds(r.pid) == table_fds       # none leaked, none new
            finally:
                held_conn.close()
                del ptr
                mm.close()
            r.assert_no_traceback()


def _table_fds(pid: int) -> int:
    """Descriptors of the master on a source-table memfd (its own and the
    one Python's mmap keeps)."""
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:ringd-source-table")
        except OSError:
            pass
    return n


def gens_of(r: Ringd) -> list[int]:
    return [g["generation"] for g in r.status()["generations"]]


# --------------------------------------------------------------------------- (d)

@pytest.mark.parametrize("mode", MODES)
def test_twenty_upgrades_and_reloads_interleaved(tmp_path, mode):
    """10 upgrades and 10 reloads, alternating, under load: no failure, the
    master's fd count back where it started, every worker ever seen either a
    child of the master or gone."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, bport, MODES[mode]), workers=2) as r:
            master = r.pid
            start_fds = fd_count(master)
            seen: set[int] = set(r.worker_pids())
            with _load(port, 4) as sc:
                sc.wait_ok(8)
                for i in range(20):
                    if i % 2 == 0:
                        res = _upgrade(r)
                    else:
                        res = r.cli("reload", "-c", str(r.conf))
                    assert res.returncode == 0, (i, res.stdout, res.stderr)
                    seen |= {w["pid"] for w in r.status()["workers"] if w["pid"]}
                sc.wait_ok(20)
            assert sc.failures == [], _explain(r, sc.failures)
            assert sc.ok > 100, sc.ok
            st = r.status()
            assert st["pid"] == master and st["upgrades"] == 10 and st["reloads_ok"] == 10
            wait_for(lambda: gens_of(r) == [21], 30, what="only generation 21 left")
            wait_for(lambda: fd_count(master) == start_fds, 10,
                     what=f"master fd count back to {start_fds}")
            kids = set(children_of_any(master))
            for pid in seen:
                alive = os.path.exists(f"/proc/{pid}") and "ringd" in cmdline(pid)
                assert not alive or pid in kids, f"worker {pid} outlived its generation"
            assert len(kids) == 2
            assert r.events("upgrade_refused") == [] and r.events("reload_rejected") == []
            r.assert_no_traceback()


def test_fd_names_round_trip():
    from ringd.fdstore import fd_name, parse_name
    from ringd.listeners import SocketKey
    for key in (SocketKey(socket.AF_INET, "127.0.0.1", 8080, 0),
                SocketKey(socket.AF_INET6, "::1", 443, 7),
                SocketKey(socket.AF_INET6, "2001:db8::5", 1, 1023)):
        name = fd_name(key)
        assert ":" not in name and len(name) <= 255 and name.isprintable()
        assert parse_name(name) == (key.family, key.ip, key.port, key.slot)
    for bad in ("ringd/x/1/0", "ringd/127.0.0.1/1", "other/127.0.0.1/1/0", "unknown", ""):
        assert parse_name(bad) is None
