# Over 450 lines: one module per area; reloads, drains and supervision, test by test.
"""Reload, drain and supervision: real signals against a real master."""
from __future__ import annotations

import os
from pathlib import Path
import signal
import socket
import threading
import time

import pytest

from harness import (RINGD as RINGD_CLI, Background, Backend, Ringd, children_of_any, cmdline,
                     connect, duplex, echo_roundtrip, free_port, free_ports, listener, upstream,
                     wait_for)


def _conf(port, servers, lopts=None):
    return listener("web", port, "app", **(lopts or {})) + upstream("app", servers)


class ShortClients:
    """Threads opening short echo connections in a loop; counts failures."""

    def __init__(self, port: int, n: int = 4):
        self.port = port
        self.n = n
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(n)]
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set() and k < 100000:
            k += 1
            msg = b"%d-%d" % (i, k)
            try:
                got = echo_roundtrip(self.port, msg, timeout=10)
                if got != msg:
                    raise AssertionError(f"got {got!r} want {msg!r}")
                with self._lock:
                    self.ok += 1
            except Exception as e:  # recorded, asserted by the test
                with self._lock:
                    self.failures.append(f"{type(e).__name__}: {e}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(20)
        if exc[0] is None:
            assert not any(t.is_alive() for t in self._threads), "a client thread hangs"

    def wait_ok(self, more: int, timeout: float = 10) -> None:
        """Wait until `more` round trips beyond the ones done so far succeeded."""
        start = self.ok
        wait_for(lambda: self.ok >= start + more, timeout, what=f"{more} more round trips")


class LongStreams:
    """Streams that exchange data for a while (duplex, hashed both ways)."""

    def __init__(self, port: int, n: int = 3, size: int = 40 * 1024 * 1024):
        self.port = port
        self.errors: list[str] = []
        self.done = 0
        self._threads = [threading.Thread(target=self._run, args=(size + i,), daemon=True)
                         for i in range(n)]

    def _run(self, size: int) -> None:
        try:
            duplex(self.port, size, size, timeout=60)
            self.done += 1
        except Exception as e:
            self.errors.append(f"{type(e).__name__}: {e}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), \
            f"streams still running after {timeout}s"

    def __exit__(self, *exc):
        if exc[0] is None:
            self.join(60)


def test_twenty_reloads_under_load_drop_nothing(tmp_path):
    eport, dport, p_short, p_long = free_ports(4)
    with Backend("echo", [eport]), Backend("duplex", [dport]):
        conf = (listener("short", p_short, "echo") + listener("long", p_long, "dup")
                + upstream("echo", [f"127.0.0.1:{eport}"]) + upstream("dup", [f"127.0.0.1:{dport}"]))
        with Ringd(tmp_path, conf, workers=2, extra_ringd='drain_timeout = "60s"\n') as r:
            master = r.pid
            with ShortClients(p_short, 4) as sc, LongStreams(p_long, 3) as ls:
                sc.wait_ok(4)                       # the load runs
                for i in range(20):
                    r.signal(signal.SIGHUP)
                    time.sleep(0.5)                 # the pace of the reloads, not a wait
                r.wait_event("reload_ok", count=20, timeout=30)
                sc.wait_ok(20)                      # and goes on after the last one
                ls.join(90)
            assert sc.failures == [], sc.failures[:5]
            assert sc.ok > 100, sc.ok
            assert ls.errors == [] and ls.done == 3, ls.errors
            assert r.proc.poll() is None and r.pid == master
            assert r.events("reload_rejected") == []
            # every old generation drains away
            wait_for(lambda: [g["generation"] for g in r.status()["generations"]] == [21], 30,
                     what="only generation 21 left")
            assert len(children_of_any(master)) == 2
            r.assert_no_traceback()


def test_reload_changes_servers_old_connections_keep_theirs(tmp_path):
    a, b, port = free_ports(3)
    with Backend("id", [a]), Backend("id", [b]):
        with Ringd(tmp_path, _conf(port, [f"127.0.0.1:{a}"]), workers=2) as r:
            old = connect(port)
            assert old.recv(64) == f"ID {a}\n".encode()
            r.write_config(_conf(port, [f"127.0.0.1:{b}"]))
            res = r.cli("reload", "-c", str(r.conf))
            assert res.returncode == 0, res.stderr
            assert "generation 2" in res.stdout
            for _ in range(10):
                s = connect(port)
                assert s.recv(64) == f"ID {b}\n".encode()
                s.close()
            # the old connection still talks to its old server
            old.sendall(b"still a")
            got = b""
            while len(got) < 7:
                got += old.recv(64)
            assert got == b"still a"
            old.close()
            wait_for(lambda: len(r.status()["generations"]) == 1, 15, what="gen 1 drained")


@pytest.mark.parametrize("breakage", ["bad_value", "unparsable", "port_in_use", "missing_upstream"])
def test_broken_reload_is_rejected_and_old_workers_keep_serving(tmp_path, breakage):
    bport, port, busy_port = free_ports(3)
    busy = socket.socket()
    busy.bind(("127.0.0.1", busy_port))
    busy.listen(1)
    try:
        with Backend("echo", [bport]):
            good = _conf(port, [f"127.0.0.1:{bport}"])
            with Ringd(tmp_path, good, workers=2) as r:
                pids = sorted(r.worker_pids())
                if breakage == "bad_value":
                    r.write_config(good.replace('upstream = "app"', 'upstream = "app"\nbacklog = -5'))
                    want = ["listener[0].backlog"]
                elif breakage == "unparsable":
                    r.write_config(good + "\n[[listener]\nname = \n")
                    n = r.conf.read_text().splitlines().index("[[listener]") + 1
                    want = [f"ringd.toml:{n}: TOML syntax error"]
                elif breakage == "missing_upstream":
                    r.write_config(good + listener("x", free_port(), "nope"))
                    want = ["listener[1].upstream"]
                else:
                    r.write_config(good + listener("x", busy_port, "app"))
                    n = r.conf.read_text().splitlines().index(
                        f'listen = "127.0.0.1:{busy_port}"') + 1
                    # file:line like every config error
                    want = [f"{r.conf}:{n}: listener[1].listen: cannot listen on "
                            f"127.0.0.1:{busy_port}", "Address already in use"]
                res = r.cli("reload", "-c", str(r.conf))
                assert res.returncode == 1
                assert "reload rejected" in res.stderr
                for w in want:
                    assert w in res.stderr, res.stderr
                assert "Traceback" not in res.stderr
                ev = r.wait_event("reload_rejected")[0]
                for w in want:
                    assert w in ev["reason"]
                # SIGHUP takes the same path
                r.signal(signal.SIGHUP)
                r.wait_event("reload_rejected", count=2)
                assert sorted(r.worker_pids()) == pids
                assert r.status()["generation"] == 1
                assert echo_roundtrip(port, b"alive") == b"alive"
                r.assert_no_traceback()
                # and a fixed file reloads fine afterwards
                r.write_config(good)
                assert r.cli("reload", "-c", str(r.conf)).returncode == 0
    finally:
        busy.close()


def test_killed_worker_is_replaced_on_same_cpu(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=2) as r:
            st = r.status()
            victim = st["workers"][0]
            survivor = st["workers"][1]
            with ShortClients(port, 2) as sc:
                sc.wait_ok(4)
                t0 = time.monotonic()
                os.kill(victim["pid"], signal.SIGKILL)

                def replaced():
                    ws = r.status()["workers"]
                    w0 = ws[0]
                    return w0["pid"] not in (None, victim["pid"]) and w0["state"] == "ready" and w0
                neww = wait_for(replaced, 10, what="worker 0 replaced")
                took = time.monotonic() - t0
                sc.wait_ok(20)                      # traffic goes on after the replacement
            # respawn_delay is 100 ms; the bound leaves a loaded 2-CPU host room
            assert took < 4.0, took
            assert neww["cpu"] == victim["cpu"]
            assert os.sched_getaffinity(neww["pid"]) == {victim["cpu"]}
            assert r.status()["workers"][1]["pid"] == survivor["pid"]
            # connections on the surviving worker never failed; the killed
            # worker's own in-flight connections may have
            assert len(sc.failures) <= 2, sc.failures
            ev = r.wait_event("worker_exit")[0]
            assert ev["unexpected"] is True and "SIGKILL" in ev["status"]
            assert r.status()["worker_restarts"] == 1


def test_killed_master_takes_workers_with_it(tmp_path, ringd):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        r = ringd(_conf(port, [f"127.0.0.1:{bport}"]), workers=2)
        try:
            pids = r.worker_pids()
            os.kill(r.pid, signal.SIGKILL)
            r.proc.wait(5)
            wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and
                                     "ringd" in cmdline(p) for p in pids), 6,
                     what="orphaned workers gone")
        finally:
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def test_quit_lets_a_stream_finish_then_exits_zero(tmp_path, ringd):
    dport, port = free_ports(2)
    with Backend("duplex", [dport]):
        r = ringd(_conf(port, [f"127.0.0.1:{dport}"]), workers=1,
                  extra_ringd='drain_timeout = "20s"\n')
        import hashlib
        import struct
        from harness import pattern, recv_all

        def stream() -> bool:
            s = connect(port, timeout=30)
            s.sendall(struct.pack("!Q", 1000))
            # keep sending slowly (the pace of the client) for ~1.5 s
            # after QUIT arrives
            data = pattern(300000, seed=1)
            for off in range(0, len(data), 20000):
                s.sendall(data[off:off + 20000])
                time.sleep(0.1)
            s.shutdown(socket.SHUT_WR)
            got = recv_all(s)
            s.close()
            return got[1000:] == hashlib.sha256(data).digest()
        streaming = Background(stream)
        wait_for(lambda: r.status()["workers"][0]["active"] == 1, 10, what="stream open")
        r.signal(signal.SIGQUIT)
        r.wait_event("stopping", timeout=5, mode="graceful")
        assert streaming.result(30) is True
        assert r.wait_exit(25) == 0
        assert not os.path.exists(r.pidfile)


def test_term_exits_fast_even_with_open_connections(tmp_path, ringd):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        r = ringd(_conf(port, [f"127.0.0.1:{bport}"]), workers=2,
                  extra_ringd='drain_timeout = "60s"\n')
        held = [connect(port) for _ in range(5)]
        for s in held:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        pids = r.worker_pids()
        t0 = time.monotonic()
        r.signal(signal.SIGTERM)
        assert r.wait_exit(10) == 0
        # not the 60 s drain: the stop grace is 1.5 s (plus room for a loaded host)
        assert time.monotonic() - t0 < 5.0
        for p in pids:
            assert not os.path.exists(f"/proc/{p}") or "ringd" not in cmdline(p)
        for s in held:
            s.close()


def test_watchdog_replaces_a_stalled_worker(tmp_path):
    """A wedged worker gets SIGABRT (its core dump is the evidence), then
    SIGKILL if that did not end it; the events say which signal did."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        # no core files from this test, whatever the host's limit
        r = Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=2,
                  extra_ringd='watchdog_timeout = "1s"\n', test_hooks=True,
                  wrap=["prlimit", "--core=0", "--"])
        with r:
            victim = r.status()["workers"][1]
            os.kill(victim["pid"], signal.SIGUSR2)     # test hook: the C loop wedges
            ev = r.wait_event("worker_stalled", timeout=10)[0]
            assert ev["pid"] == victim["pid"]
            kill = r.wait_event("worker_kill", pid=victim["pid"])[0]
            assert kill["signal"] == "SIGABRT" and "watchdog" in kill["reason"]
            ex = r.wait_event("worker_exit", pid=victim["pid"])[0]
            assert ex["status"].startswith("killed by SIGABRT"), ex

            def replaced(slot, pid):
                w = r.status()["workers"][slot]
                return w["pid"] not in (None, pid) and w["state"] == "ready"
            wait_for(lambda: replaced(1, victim["pid"]), 5, what="stalled worker replaced")
            assert echo_roundtrip(port, b"ok") == b"ok"

            # a stopped worker keeps SIGABRT pending: SIGKILL after the grace ends it
            victim = r.status()["workers"][0]
            os.kill(victim["pid"], signal.SIGSTOP)
            try:
                kills = r.wait_event("worker_kill", count=2, timeout=20, pid=victim["pid"])
            except AssertionError:
                os.kill(victim["pid"], signal.SIGKILL)       # never leave it stopped
                raise
            assert [k["signal"] for k in kills] == ["SIGABRT", "SIGKILL"]
            assert "after SIGABRT" in kills[1]["reason"]
            ex = r.wait_event("worker_exit", pid=victim["pid"])[0]
            assert ex["status"] == "killed by SIGKILL", ex
            wait_for(lambda: replaced(0, victim["pid"]), 5, what="stopped worker replaced")
            assert echo_roundtrip(port, b"ok") == b"ok"
            # the SIGABRT'd worker was never also sent SIGKILL
            assert len(r.events("worker_kill")) == 3


def test_reload_changes_worker_count_and_listeners(tmp_path):
    bport, p1, p2 = free_ports(3)
    with Backend("echo", [bport]):
        base = listener("a", p1, "app") + upstream("app", [f"127.0.0.1:{bport}"])
        with Ringd(tmp_path, base, workers=2) as r:
            r.workers = 1
            r.write_config(listener("b", p2, "app") + upstream("app", [f"127.0.0.1:{bport}"]))
            res = r.cli("reload", "-c", str(r.conf))
            assert res.returncode == 0, res.stderr
            assert echo_roundtrip(p2, b"new") == b"new"
            st = r.status()
            assert len([w for w in st["workers"] if w["generation"] == st["generation"]]) == 1
            wait_for(lambda: len(r.status()["generations"]) == 1, 15, what="gen 1 gone")
            # the removed listener's sockets are closed
            r.wait_event("listeners_closed")
            with pytest.raises(ConnectionRefusedError):
                connect(p1, timeout=2)


def test_draining_generations_are_bounded(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        r = Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=1,
                  # connections that keep old generations draining: no handover
                  extra_ringd='drain_timeout = "60s"\nmax_draining_generations = 2\n'
                              'handover = false\n')
        with r:
            held = []
            for _ in range(4):
                s = connect(port)
                s.sendall(b"h")
                assert s.recv(1) == b"h"
                held.append(s)
                assert r.cli("reload", "-c", str(r.conf)).returncode == 0
            # 4 reloads with a held connection each: at most 2 generations drain
            wait_for(lambda: len([g for g in r.status()["generations"]
                                  if g["state"] == "draining"]) <= 2, 10, what="drain bound")
            assert r.events("drain_cut_short")
            for s in held:
                s.close()


def test_cli_check_status_second_start_and_stale_pidfile(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        r = Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=2)
        res = r.cli("check", "-c", str(r.conf))
        assert res.returncode == 0 and "ok" in res.stdout
        # a stale pidfile (dead pid) is replaced
        r.pidfile.write_text("999999\n")
        with r:
            assert int(r.pidfile.read_text()) == r.pid
            res = r.cli("start", "-c", str(r.conf), timeout=20)
            assert res.returncode == 1
            assert "already running" in res.stdout + res.stderr
            res = r.cli("status", "-c", str(r.conf))
            assert res.returncode == 0
            assert f"master pid {r.pid}" in res.stdout
            assert res.stdout.split("SERVER")[0].count(" ready ") == 2
            import json
            res = r.cli("status", "-c", str(r.conf), "--json")
            st = json.loads(res.stdout)
            assert len(st["workers"]) == 2
            res = r.cli("stop", "-c", str(r.conf))
            assert res.returncode == 0, res.stderr
            assert r.wait_exit(10) == 0
        res = r.cli("reload", "-c", str(r.conf))
        assert res.returncode == 1
        assert "no control socket" in res.stderr and "no running master" in res.stderr


def test_sd_notify_protocol(tmp_path):
    bport, port = free_ports(2)
    nsock = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(nsock))
    srv.settimeout(10)
    msgs: list[str] = []

    def collect_until(pred, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msgs.append(srv.recv(4096).decode())
            except socket.timeout:
                break
            if pred():
                return
        raise AssertionError(f"notify messages: {msgs}")
    try:
        with Backend("echo", [bport]):
            r = Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=1,
                      env={"NOTIFY_SOCKET": str(nsock)})
            with r:
                collect_until(lambda: any("READY=1" in m for m in msgs))
                r.signal(signal.SIGHUP)
                collect_until(lambda: sum("READY=1" in m for m in msgs) >= 2)
                rel = [m for m in msgs if "RELOADING=1" in m]
                assert rel and "MONOTONIC_USEC=" in rel[0]
                assert msgs.index(rel[0]) < max(i for i, m in enumerate(msgs) if "READY=1" in m)
                r.signal(signal.SIGTERM)
                collect_until(lambda: any("STOPPING=1" in m for m in msgs))
                assert any("STATUS=" in m for m in msgs)
    finally:
        srv.close()


def test_crash_looping_slot_is_held_back_and_recovers(tmp_path):
    bport, port = free_ports(2)
    crash = tmp_path / "crash-now"
    with Backend("echo", [bport]):
        r = Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=2, test_hooks=True,
                  extra_ringd='respawn_delay = "50ms"\nrespawn_delay_max = "800ms"\n',
                  env={"RINGD_TEST_CRASH_FILE": str(crash)})
        with r:
            victim = r.status()["workers"][1]
            crash.write_text("1")
            os.kill(victim["pid"], signal.SIGKILL)
            ev = r.wait_event("slot_held_back", timeout=15)[0]
            assert ev["worker"] == 1

            def exits() -> int:
                return len([e for e in r.events("worker_exit") if e.get("worker") == 1])
            # backing off, not burning CPU: the next exits come respawn_delay_max
            # (800 ms) apart, so there is a handful of them, not hundreds
            seen = [(exits(), time.monotonic())]
            for _ in range(2):
                n = seen[-1][0]
                wait_for(lambda: exits() > n, 10, interval=0.02, what="the next crash")
                seen.append((exits(), time.monotonic()))
            gaps = [b[1] - a[1] for a, b in zip(seen[1:], seen[2:])]
            assert all(g >= 0.5 for g in gaps), gaps
            assert 5 <= seen[-1][0] <= 12, seen
            # slot 0 kept serving all along
            assert echo_roundtrip(port, b"ok") == b"ok"
            crash.unlink()
            r.wait_event("slot_recovered", timeout=10, worker=1)
            wait_for(lambda: r.status()["workers"][1]["state"] == "ready", 5, what="slot 1 up")


def test_usr1_reopens_the_log_file(tmp_path, ringd):
    bport, port = free_ports(2)
    logf = tmp_path / "out" / "ringd.log"
    with Backend("echo", [bport]):
        r = ringd(_conf(port, [f"127.0.0.1:{bport}"]), workers=1,
                  extra_ringd=f'log_file = "{logf}"\n', wait=False)
        wait_for(lambda: logf.exists() and '"event": "ready"' in logf.read_text(), 20,
                 what="ready in log_file")
        rotated = logf.with_suffix(".log.1")
        os.rename(logf, rotated)
        r.signal(signal.SIGUSR1)
        wait_for(lambda: logf.exists() and "logs_reopened" in logf.read_text(), 10,
                 what="log reopened")
        r.signal(signal.SIGHUP)
        wait_for(lambda: "reload_ok" in logf.read_text(), 20, what="reload logged in new file")
        assert "reload_ok" not in rotated.read_text()
        import json
        for line in logf.read_text().splitlines():
            json.loads(line)


def test_sequential_client_never_waits_across_reloads(tmp_path):
    """One client at a time (nothing else arriving to wake a worker up):
    a connection that lands while a slot changes hands must still be served
    at once, not sit in the queue until the next client comes."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=2) as r:
            slow: list[float] = []
            stop = threading.Event()

            def client():
                k = 0
                while not stop.is_set() and k < 20000:
                    k += 1
                    t0 = time.monotonic()
                    try:
                        assert echo_roundtrip(port, b"%d" % k, timeout=3) == b"%d" % k
                    except Exception as e:
                        slow.append(-1.0)
                        continue
                    dt = time.monotonic() - t0
                    # A connection left in a queue nobody watches waits for
                    # the next client, which never comes while this one waits:
                    # it fails at the 3 s timeout. 2 s tells that apart from a
                    # busy shared CPU's scheduling delays (not a speed bound).
                    if dt > 2.0:
                        slow.append(dt)
            clients = Background(client)
            for _ in range(30):
                r.signal(signal.SIGHUP)
                time.sleep(0.25)                    # the pace of the reloads, not a wait
            r.wait_event("reload_ok", count=30, timeout=30)
            stop.set()
            clients.result(10)
            assert slow == [], slow


def _netns_available() -> bool:
    import shutil
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    res = __import__("subprocess").run(["unshare", "-n", "true"], capture_output=True)
    return res.returncode == 0


@pytest.mark.skipif(not _netns_available(),
                    reason="needs root and unshare -n (a network namespace of our own)")
@pytest.mark.parametrize("migrate", ["0", "1"], ids=["tcp_migrate_req=0", "tcp_migrate_req=1"])
def test_reloads_changing_worker_count_drop_nothing(tmp_path, migrate):
    """Shrinking from 2 workers to 1 leaves slot 1's listening socket without
    its worker. With net.ipv4.tcp_migrate_req = 0 the remaining worker adopts
    it (closing it would reset what is queued there); with 1 it is closed once
    the old worker stopped accepting and the kernel moves its queue.
    20 reloads alternating 2 and 1 workers under load fail no connection,
    with the sysctl off and on (set in a network namespace of our own)."""
    import json
    import subprocess
    import sys
    res = subprocess.run(["unshare", "-n", sys.executable,
                          str(Path(__file__).parent / "netns_reload.py"), str(tmp_path), migrate],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rejected"] == 0
    assert out["nfailures"] == 0, out
    if migrate == "0":
        assert out["listeners_closed"] == 0    # slot 1's socket is adopted, never closed
    else:
        assert out["listeners_closed"] >= 5    # closed, its queue moved by the kernel
    assert out["ok"] > 100


def test_reload_applies_log_level_and_format(tmp_path):
    """log_level and log_format reload on their own, not only with log_file."""
    import json
    import textwrap
    bport, port = free_ports(2)
    conf = _conf(port, [f"127.0.0.1:{bport}"])
    with Backend("echo", [bport]):
        r = Ringd(tmp_path, conf, workers=1)

        def write(level: str, fmt: str, extra: str = "") -> None:
            text = (r.header() + extra + textwrap.dedent(conf)).replace(
                'log_level = "debug"', f'log_level = "{level}"').replace(
                'log_format = "json"', f'log_format = "{fmt}"')
            r.write_config(text, raw=True)

        def reload_ok() -> None:
            res = r.cli("reload", "-c", str(r.conf))
            assert res.returncode == 0, res.stderr

        def lines_since(mark: int) -> list[str]:
            return [ln for ln in r.log_text()[mark:].splitlines() if ln.strip()]

        write("info", "json")
        with r:
            r.status()
            assert r.events("control_request") == []          # debug: not logged at info
            write("debug", "json")
            reload_ok()
            r.status()
            r.wait_event("control_request", cmd="status")
            # json -> console: the lines after the switch are not JSON
            write("debug", "console")
            mark = len(r.log_text())
            reload_ok()
            r.status()
            wait_for(lambda: any("control_request" in ln and not ln.startswith("{")
                                 for ln in lines_since(mark)), 10, what="console lines")
            assert any("reload_ok" in ln and not ln.startswith("{") for ln in lines_since(mark))
            # console -> json at level warning: info and debug events stop
            write("warning", "json")
            reload_ok()
            mark = len(r.log_text())
            reloads = r.status()["reloads_ok"]
            r.signal(signal.SIGHUP)
            # reload_ok is info, not logged now: the status says when it is done
            wait_for(lambda: r.status()["reloads_ok"] == reloads + 1, 20, what="reload done")
            for ln in lines_since(mark):
                ev = json.loads(ln)
                assert ev["level"] in ("warning", "error"), ev
            # a log_file that cannot be opened rejects the reload; logging goes on as before
            write("info", "json", extra=f'log_file = "{tmp_path}/ringd.toml/x.log"\n')
            res = r.cli("reload", "-c", str(r.conf))
            assert res.returncode == 1
            n = r.conf.read_text().splitlines().index(f'log_file = "{tmp_path}/ringd.toml/x.log"') + 1
            assert f"{r.conf}:{n}: ringd.log_file: cannot open" in res.stderr, res.stderr
            ev = r.wait_event("reload_rejected")[0]
            assert "ringd.log_file" in ev["reason"]
            r.assert_no_traceback()


def test_pidfile_lock_decides_not_the_pid_in_it(tmp_path):
    """A master holds a lock on its pidfile; a live process that merely has the
    recorded pid (and even "ringd" in its command line) is not a master."""
    import subprocess
    import sys
    bport, port = free_ports(2)
    decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "ringd",
                              "master"])
    try:
        with Backend("echo", [bport]):
            r = Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"]), workers=2)
            r.pidfile.write_text(f"{decoy.pid}\n")
            assert "ringd" in cmdline(decoy.pid)
            # stop and reload (no control socket) must not signal the decoy
            res = r.cli("stop", "-c", str(r.conf))
            assert res.returncode == 1 and "not running" in res.stderr, res.stderr
            res = r.cli("reload", "-c", str(r.conf))
            assert res.returncode == 1 and "no running master" in res.stderr, res.stderr
            assert decoy.poll() is None
            # start takes the unlocked (stale) file over
            with r:
                assert int(r.pidfile.read_text()) == r.pid
                res = r.cli("start", "-c", str(r.conf), timeout=20)
                assert res.returncode == 1
                assert "already running" in res.stdout + res.stderr
                assert int(r.pidfile.read_text()) == r.pid
                # no worker holds the pidfile (and with it the lock)
                for wpid in r.worker_pids():
                    fds = Path(f"/proc/{wpid}/fd")
                    held = [os.readlink(fds / fd) for fd in os.listdir(fds)]
                    assert str(r.pidfile) not in held, held
                # a master killed with -9 leaves a file nobody holds: not running,
                # even while its workers are still draining
                os.kill(r.pid, signal.SIGKILL)
                r.proc.wait(5)
                assert r.pidfile.exists()
                res = r.cli("stop", "-c", str(r.conf))
                assert res.returncode == 1 and "not running" in res.stderr, res.stderr
            assert decoy.poll() is None
    finally:
        decoy.kill()
        decoy.wait(5)


def test_reload_with_another_file_is_refused_never_ok(tmp_path):
    """`ringd reload -c FILE` once printed "reload ok" for any FILE that named
    the master's socket, while the master re-read its own file. The master
    re-reads its own file (as nginx -s reload does) and refuses another one."""
    import subprocess
    import sys
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        with Ringd(tmp_path / "a", _conf(port, [f"127.0.0.1:{bport}"]), workers=1) as r:
            header = r.header()
            broken = tmp_path / "broken.toml"
            broken.write_text(header + "[[listener]\n")
            valid = tmp_path / "valid.toml"
            valid.write_text(header + _conf(free_port(), [f"127.0.0.1:{bport}"]))
            for other in (broken, valid):
                res = r.cli("reload", "-c", str(other))
                assert res.returncode == 1, res.stdout
                assert "reload ok" not in res.stdout
                assert (f"reload rejected: {other} is not the file this master runs "
                        f"({r.conf})") in res.stderr, res.stderr
            assert r.status()["generation"] == 1
            assert r.status()["reloads_rejected"] == 2
            assert len(r.events("reload_rejected")) == 2
            # the same file under another name is the same file
            link = tmp_path / "link.toml"
            link.symlink_to(r.conf)
            res = r.cli("reload", "-c", str(link))
            assert res.returncode == 0 and f"generation 2 running {r.conf}" in res.stdout, res
            res = subprocess.run(RINGD_CLI + ["reload", "-c", "ringd.toml"], cwd=r.tmp,
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            # no -c: the master's own file
            res = r.cli("reload", "-s", str(r.sock))
            assert res.returncode == 0 and "generation 4" in res.stdout, res
            # no control socket: the SIGHUP fallback checks the master's title first
            os.unlink(r.sock)
            res = r.cli("reload", "-c", str(valid), "-p", str(r.pidfile))
            assert res.returncode == 1 and f"runs {r.conf}, not {valid}" in res.stderr, res
            res = r.cli("reload", "-c", str(r.conf))
            assert res.returncode == 0 and f"which re-reads {r.conf}" in res.stdout, res
            r.wait_event("reload_ok", count=4)
            assert r.proc.poll() is None


def test_reload_message_says_which_defaults_it_used(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    import subprocess
    res = subprocess.run(RINGD_CLI + ["reload", "-c", str(empty)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1
    # (a master that runs at the default socket refuses another file)
    assert (f"(the defaults: {empty} sets neither ringd.control_socket nor ringd.pidfile)"
            in res.stderr or "is not the file this master runs" in res.stderr), res.stderr
    res = subprocess.run(RINGD_CLI + ["reload", "-c", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr.strip() == (f"ringd: {tmp_path}/missing.toml: cannot read config file: No "
                                  "such file or directory (it tells where the running master "
                                  "is; or give -s SOCKET / -p PIDFILE)")


@pytest.mark.skipif(not _netns_available(),
                    reason="needs root and unshare -n (a network namespace of our own)")
@pytest.mark.parametrize("migrate", ["0", "1"], ids=["tcp_migrate_req=0", "tcp_migrate_req=1"])
def test_shrinking_worker_count_gives_sockets_back(tmp_path, migrate):
    """After 8 -> 2 workers the master and each worker once kept the listening
    sockets of all 8 slots forever. With tcp_migrate_req=1 they close as soon
    as the old workers stopped accepting (the kernel moves their queues); with
    0 they stay adopted while the port is busy and go at the first reload
    after it has been quiet. No connection fails either way (2 listeners,
    short connections all along)."""
    import json
    import subprocess
    import sys
    res = subprocess.run(["unshare", "-n", sys.executable,
                          str(Path(__file__).parent / "netns_shrink.py"), str(tmp_path), migrate],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["nfailures"] == 0, out
    assert out["ok"] > 100, out
    base = out["base"]
    assert base["master_listen"] == 4 and base["workers_listen"] == [2, 2], base
    assert out["at8"]["master_listen"] == 16
    if migrate == "1":
        assert out["listeners_adopted"] == 0
        assert out["after"]["master_listen"] == 4 and out["after"]["workers_listen"] == [2, 2]
        final = out["after_idle"]
    else:
        # busy port: kept (closing could reset what is queued), never lost
        assert out["after"]["master_listen"] == 16 and out["after"]["workers_listen"] == [8, 8]
        assert out["listeners_adopted"] == 1
        final = out["after_quiet_reload"]
    assert final["master_fds"] == base["master_fds"], out
    assert final["worker_fds"] == base["worker_fds"], out
    assert final["workers_listen"] == [2, 2]
    assert out["queued_reset"] == 0
    assert all(reset == 0 for _, reset in out["listeners_closed"]), out["listeners_closed"]
    assert out["final_roundtrip"] == ["still here", "still here"]
