# Over 450 lines: one module per area; this is the data path's, test by test.
"""The forwarding core end to end: real ringd, real backends, loopback."""
from __future__ import annotations

import concurrent.futures as cf
import ctypes
from pathlib import Path
import os
import re
import select
import subprocess
import socket
import struct
import sys
import time

import pytest

from harness import (Background, Backend, Ringd, connect, connect_nowait, duplex, echo_roundtrip,
                     fd_count, free_port, free_ports, listener, proc_threads, recv_all, rss_kib,
                     upstream, wait_for, cmdline)

NCPU = len(os.sched_getaffinity(0))
TCP_NOTSENT_LOWAT = 25     # <netinet/tcp.h>; the socket module lacks the name


def _conf(port, servers, ring="", lopts=None, uopts=None):
    return (f"[ring]\n{ring}\n" + listener("web", port, "app", **(lopts or {}))
            + upstream("app", servers, **(uopts or {})))


MODES = {
    # splice_threshold: 0 = splice from the first byte, default = copy then
    # splice, huge = copy only (buffer ring path)
    "splice": 'splice_threshold = 0',
    "adaptive": '',
    "copy": 'splice_threshold = "1GiB"',
    # a tiny notsent_lowat: sockets turn unwritable all the time (EAGAIN paths)
    "lowat4k": 'notsent_lowat = "4KiB"',
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
def test_payloads_arrive_intact_both_directions(tmp_path, sqpoll, mode):
    """1 B to several MiB, both directions at once, half-close, on every worker."""
    bport, port = free_ports(2)
    with Backend("duplex", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"],
                     ring=f"sqpoll = {str(sqpoll).lower()}\n{MODES[mode]}")
        with Ringd(tmp_path, conf, workers=2) as r:
            sizes = [(1, 1), (0, 1), (1, 0), (1000, 70000), (65536, 65536),
                     (3 * 1024 * 1024 + 7, 1), (1, 3 * 1024 * 1024 + 11),
                     (5 * 1024 * 1024, 5 * 1024 * 1024)]
            for send_n, recv_n in sizes:
                duplex(port, send_n, recv_n)
            # keep connecting until the kernel's REUSEPORT hash has used both workers
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                st = r.status()
                if all(w["accepted"] > 0 for w in st["workers"]):
                    break
                duplex(port, 4096, 4096)
            st = r.status()
            assert [w["accepted"] > 0 for w in st["workers"]] == [True, True], st["workers"]
            modes = {w["ring"] for w in st["workers"]}
            assert modes == {"sqpoll" if sqpoll else "defer_taskrun"}
            # with 8 concurrent flows as well
            with cf.ThreadPoolExecutor(8) as ex:
                list(ex.map(lambda n: duplex(port, n * 300000 + 1, n * 200000 + 3), range(8)))
            st = r.status()
            spliced = sum(w["splice_bytes"] for w in st["workers"])
            copied = sum(w["copied_bytes"] for w in st["workers"])
            if mode == "splice":
                assert copied == 0 and spliced > 0
            elif mode == "copy":
                assert spliced == 0 and copied > 0
            else:
                assert spliced > copied > 0
            assert {w["copy_path"] for w in st["workers"]} == {"buffer_ring"}
            r.assert_no_traceback()


@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
def test_workers_pinned_titled_and_ring_threads(tmp_path, sqpoll):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], ring=f"sqpoll = {str(sqpoll).lower()}")
        with Ringd(tmp_path, conf, workers=2) as r:
            assert cmdline(r.pid).startswith(f"ringd: master -c {r.conf}")
            st = r.status()
            cpus = sorted(os.sched_getaffinity(0))
            for w in st["workers"]:
                pid, slot = w["pid"], w["slot"]
                cpu = cpus[slot % len(cpus)]
                assert w["cpu"] == cpu
                assert os.sched_getaffinity(pid) == {cpu}
                assert cmdline(pid) == f"ringd: worker {slot} [gen 1] cpu {cpu}"
                sq = [t for t in proc_threads(pid) if t.startswith("iou-sqp")]
                assert len(sq) == (1 if sqpoll else 0), proc_threads(pid)
            assert echo_roundtrip(port, b"ping") == b"ping"


def _rss_anon_kib(pid: int) -> int:
    """Anonymous resident memory: the pools, table and buffers a trim gives back
    (VmRSS also counts file pages and the ring's shared mappings)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError(f"no RssAnon for {pid}")


def _workers_by_pid(r) -> dict[int, dict]:
    return {w["pid"]: w for w in r.status()["workers"]}


def _echo_burst(port: int, n: int, size: int = 6000) -> None:
    """n connections open at once, each echoes `size` bytes, then all close."""
    socks = []
    try:
        for _ in range(n):
            socks.append(connect(port, timeout=20))
        for i, s in enumerate(socks):
            s.sendall((b"%06d" % i) * (size // 6))
        for i, s in enumerate(socks):
            want = (b"%06d" % i) * (size // 6)
            got = b""
            while len(got) < len(want):
                chunk = s.recv(len(want) - len(got))
                assert chunk, f"connection {i} closed early"
                got += chunk
            assert got == want
    finally:
        for s in socks:
            s.close()


def _fully_trimmed(r) -> dict[int, dict] | None:
    """Every worker idle with its whole connection table given back."""
    ws = _workers_by_pid(r)
    return ws if all(w["active"] == 0 and w["conn_slots"] == 0 for w in ws.values()) else None


def test_thousand_concurrent_connections_and_return_to_idle(tmp_path):
    """After a burst, every worker gives its memory and fds back: the trim is
    due because the worker grew (not because a tick happened to see the
    burst), and it shows in the status trim count."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"])
        with Ringd(tmp_path, conf, workers=2) as r:
            pids = r.worker_pids()
            echo_roundtrip(port, b"warm")
            before = wait_for(lambda: _fully_trimmed(r), 10, what="warm-up trimmed")
            idle_fds = {p: fd_count(p) for p in pids}
            idle_anon = {p: _rss_anon_kib(p) for p in pids}

            _echo_burst(port, 1000)
            after = wait_for(
                lambda: (ws := _fully_trimmed(r)) and
                all(ws[p]["trims"] > before[p]["trims"] for p in pids) and ws,
                15, what="both workers trimmed after the burst")
            assert sum(w["accepted"] - before[p]["accepted"] for p, w in after.items()) == 1000
            assert all(after[p]["accepted"] > before[p]["accepted"] for p in pids), after
            for p in pids:
                assert fd_count(p) <= idle_fds[p], (p, fd_count(p), idle_fds)
                assert _rss_anon_kib(p) <= idle_anon[p] + 1024, (p, _rss_anon_kib(p), idle_anon)
                # the buffer ring is back to its starting target
                assert after[p]["bufs_target"] == before[p]["bufs_target"]
                assert after[p]["bufs_high_water"] > 0
            assert r.worker_pids() == pids
            r.assert_no_traceback()


@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
def test_memory_comes_back_while_a_connection_stays_open(tmp_path, sqpoll):
    """A worker that is never fully idle (one long-lived connection open
    before, during and after a burst) still gives back what the burst took."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], ring=f"sqpoll = {str(sqpoll).lower()}")
        with Ringd(tmp_path, conf, workers=1) as r:
            [pid] = r.worker_pids()
            echo_roundtrip(port, b"warm")
            idle = wait_for(lambda: _fully_trimmed(r), 10, what="warm-up trimmed")[pid]
            idle_anon = _rss_anon_kib(pid)
            with connect(port) as long:
                long.sendall(b"before")
                assert long.recv(16) == b"before"
                _echo_burst(port, 1000)
                long.sendall(b"during")
                assert long.recv(16) == b"during"
                peak = _workers_by_pid(r)[pid]
                assert peak["conn_slots"] > 500, peak
                # trimmed: the table down to the open connection, the buffer
                # ring's target back to its start and the buffers posted
                # above it taken back
                after = wait_for(
                    lambda: (w := _workers_by_pid(r)[pid])["active"] == 1 and
                    w["trims"] > peak["trims"] and w["conn_slots"] <= 2 and
                    w["bufs_target"] == idle["bufs_target"] and
                    w["bufs_posted"] <= w["bufs_target"] and w,
                    15, what="a trim with one connection open")
                anon = _rss_anon_kib(pid)
                assert anon <= idle_anon + 1536, (anon, idle_anon, after)
                long.sendall(b"after")
                assert long.recv(16) == b"after"
            r.assert_no_traceback()


def test_dead_first_server_is_skipped(tmp_path):
    dead, live, port = free_ports(3)
    with Backend("id", [live]):
        conf = _conf(port, [f"127.0.0.1:{dead}", f"127.0.0.1:{live}"],
                     uopts={"connect_retries": 2, "max_fails": 0})
        with Ringd(tmp_path, conf, workers=1) as r:
            for _ in range(20):
                s = connect(port)
                line = s.recv(64)
                s.close()
                assert line == f"ID {live}\n".encode()
            st = r.status()
            dead_srv = [s for s in st["servers"] if s["server"].endswith(f":{dead}")][0]
            assert dead_srv["failures"] >= 1
            r.wait_event("connect_failed")


def test_all_servers_dead_closes_client_promptly(tmp_path):
    d1, d2, port = free_ports(3)
    conf = _conf(port, [f"127.0.0.1:{d1}", f"127.0.0.1:{d2}"])
    with Ringd(tmp_path, conf, workers=1) as r:
        t0 = time.monotonic()
        s = connect(port, timeout=5)
        s.sendall(b"hello")
        try:
            data = s.recv(10)
        except ConnectionResetError:
            data = b""
        took = time.monotonic() - t0
        s.close()
        assert data == b""
        # refused at once: far below connect_timeout (5 s), room for a loaded 2-CPU host
        assert took < 3.0, took
        ev = r.wait_event("no_server")[0]
        assert ev["upstream"] == "app" and ev["listener"] == "web"
        st = r.status()
        assert sum(s["failures"] for s in st["servers"]) >= 2
        # the worker keeps serving once a server is back
        with Backend("echo", [d1]):
            assert echo_roundtrip(port, b"x") == b"x"


def _assert_serving(port: int):
    assert echo_roundtrip(port, b"still here") == b"still here"


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_reset_ends_only_its_connection(tmp_path, side):
    """A reset by the client, or by the server, ends that connection alone:
    the worker and its other connection carry on."""
    eport, rport, p1, p2 = free_ports(4)
    with Backend("echo", [eport]), Backend("reset", [rport]):
        conf = (listener("ok", p1, "good") + listener("bad", p2, "bad")
                + upstream("good", [f"127.0.0.1:{eport}"]) + upstream("bad", [f"127.0.0.1:{rport}"]))
        with Ringd(tmp_path, conf, workers=1) as r:
            pids = r.worker_pids()
            other = connect(p1)
            other.sendall(b"a")
            assert other.recv(1) == b"a"
            if side == "client":
                victim = connect(p1)
                victim.sendall(b"b" * 100000)
                victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                victim = connect(p2)            # its server resets the connection
                victim.sendall(b"x")
                try:
                    assert victim.recv(10) == b""
                except ConnectionResetError:
                    pass
            victim.close()
            wait_for(lambda: sum(w["active"] for w in r.status()["workers"]) == 1, 5,
                     what="reset connection gone")
            other.sendall(b"c")
            assert other.recv(1) == b"c"
            other.close()
            _assert_serving(p1)
            assert r.worker_pids() == pids


def test_idle_timeout_closes_idle_connection(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], lopts={"idle_timeout": "600ms"})
        with Ringd(tmp_path, conf, workers=1) as r:
            busy = connect(port)
            idle = connect(port)
            idle.sendall(b"i")
            assert idle.recv(1) == b"i"
            t0 = time.monotonic()

            def closed_after() -> float:
                try:
                    assert idle.recv(1) == b""
                except ConnectionResetError:
                    pass
                return time.monotonic() - t0
            idle.settimeout(5)
            closing = Background(closed_after)
            # keep `busy` active past the idle timeout (the pause is the pace
            # of its traffic, not a wait)
            for _ in range(8):
                busy.sendall(b"b")
                assert busy.recv(1) == b"b"
                time.sleep(0.15)
            took = closing.result(5)
            assert 0.4 < took < 3.0, took
            busy.sendall(b"z")
            assert busy.recv(1) == b"z"
            busy.close()
            idle.close()
            _assert_serving(port)


def test_connect_timeout_ends_only_its_connection(tmp_path):
    """A server whose accept queue is full drops SYNs: the connect times out."""
    port, bport = free_ports(2)
    black = socket.socket()
    black.bind(("127.0.0.1", 0))
    black.listen(0)
    bh = black.getsockname()[1]
    fillers = []
    try:
        # fill the accept queue (backlog 0: one connection) so further SYNs are dropped
        for _ in range(4):
            fillers.append(connect_nowait(bh))
        wait_for(lambda: select.select([], fillers, [], 0)[1], 5, what="accept queue full")
        with Backend("echo", [bport]):
            conf = (listener("slow", port, "hole", connect_timeout="300ms")
                    + upstream("hole", [f"127.0.0.1:{bh}"], connect_retries=1, max_fails=0))
            p2 = free_port()
            conf += listener("ok", p2, "good") + upstream("good", [f"127.0.0.1:{bport}"])
            with Ringd(tmp_path, conf, workers=1) as r:
                pids = r.worker_pids()
                s = connect(port, timeout=10)
                t0 = time.monotonic()
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
                took = time.monotonic() - t0
                s.close()
                # one attempt of 300 ms: retries go to other servers, there is none
                # (the bound leaves a loaded 2-CPU host room; connect_timeout's
                # default, 5 s, would be far above it)
                assert 0.25 < took < 3.0, took
                _assert_serving(p2)
                assert r.worker_pids() == pids
                ev = r.wait_event("connect_failed")[0]
                assert "ETIMEDOUT" in ev["error"]
    finally:
        for f in fillers:
            f.close()
        black.close()


def test_max_connections_stops_accepting_without_dropping(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], lopts={"max_connections": 3})
        with Ringd(tmp_path, conf, workers=1) as r:
            held = [connect(port) for _ in range(3)]
            for s in held:
                s.sendall(b"h")
                assert s.recv(1) == b"h"
            # the 4th sits in the kernel's queue: connected, but not served
            extra = connect(port)
            extra.sendall(b"q")
            extra.settimeout(0.5)
            with pytest.raises(socket.timeout):
                extra.recv(1)
            r.wait_event("accept_paused")
            held[0].close()
            extra.settimeout(5)
            assert extra.recv(1) == b"q"      # served once a slot was free
            for s in held[1:] + [extra]:
                s.close()


def test_fd_shortage_pauses_accepting_and_loses_nothing(tmp_path):
    """With a tiny RLIMIT_NOFILE, accepting pauses before the worker could run
    out of fds (connections wait in the kernel's queue) and resumes as fds come
    back: every client is served, none is accepted and dropped."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], lopts={"backlog": 1024})
        r = Ringd(tmp_path, conf, workers=1, wrap=["prlimit", "--nofile=128:128", "--"])
        with r:
            socks = [connect(port, timeout=20) for _ in range(90)]
            for i, s in enumerate(socks):
                s.sendall(b"%03d" % i)
            ev = r.wait_event("accept_paused", timeout=10)[0]
            assert "EMFILE" in ev["reason"]
            served = r.status()["workers"][0]["active"]
            assert 20 < served < 90, served
            # free the first ones: the queued clients get their turn
            for i, s in enumerate(socks):
                s.settimeout(20)
                got = b""
                while len(got) < 3:
                    chunk = s.recv(3 - len(got))
                    assert chunk, f"client {i} was dropped"
                    got += chunk
                assert got == b"%03d" % i
                s.close()
            st = r.status()["workers"][0]
            assert st["accepted"] == 90
            assert sum(1 for e in r.events("worker_exit")) == 0
            r.assert_no_traceback()


@pytest.mark.skipif(NCPU < 2, reason="needs 2 CPUs to show the poller on a CPU of its own")
def test_sqpoll_auto_gives_the_poller_its_own_cpu(tmp_path):
    bport, port = free_ports(2)
    cpus = sorted(os.sched_getaffinity(0))
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], ring='sqpoll = "auto"')
        # one worker on a 2+ CPU machine: the poller gets the second CPU
        with Ringd(tmp_path / "one", conf, workers=1) as r:
            w = r.status()["workers"][0]
            assert w["ring"] == "sqpoll" and w["cpu"] == cpus[0]
            task = Path(f"/proc/{w['pid']}/task")
            sq = [t for t in task.iterdir() if (t / "comm").read_text().startswith("iou-sqp")]
            assert len(sq) == 1
            assert os.sched_getaffinity(int(sq[0].name)) == {cpus[1]}
            assert os.sched_getaffinity(w["pid"]) == {cpus[0]}
            assert echo_roundtrip(port, b"auto") == b"auto"
        # as many workers as CPUs: no poller at all
        with Ringd(tmp_path / "all", conf, workers=NCPU) as r:
            assert {w["ring"] for w in r.status()["workers"]} == {"defer_taskrun"}
            assert echo_roundtrip(port, b"auto") == b"auto"


def test_quiet_spliced_connection_gives_its_pipes_back(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], ring="splice_threshold = 0")
        with Ringd(tmp_path, conf, workers=1) as r:
            s = connect(port)
            blob = os.urandom(4 << 20)

            def reader(n: int) -> bytes:
                got = bytearray()
                while len(got) < n:
                    chunk = s.recv(1 << 20)
                    assert chunk, f"EOF after {len(got)} of {n} bytes"
                    got.extend(chunk)
                return bytes(got)
            reading = Background(reader, len(blob))
            s.sendall(blob)
            assert reading.result(20) == blob
            # quiet now: within a few ticks no pipe is held
            wait_for(lambda: r.status()["workers"][0]["pipes_in_use"] == 0, 5,
                     what="pipes given back")
            # and the connection still works, both ways
            reading = Background(reader, len(blob))
            s.sendall(blob)
            assert reading.result(20) == blob
            s.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_to_the_configured_user(tmp_path):
    import pwd
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    bport, port = free_ports(2)
    with Backend("duplex", [bport]):
        conf = _conf(port, [f"127.0.0.1:{bport}"], ring="splice_threshold = 0")
        with Ringd(tmp_path, conf, workers=2,
                   extra_ringd=f'user = "nobody"\ngroup = "{__import__("grp").getgrgid(nobody.pw_gid).gr_name}"\n') as r:
            for w in r.status()["workers"]:
                status = Path(f"/proc/{w['pid']}/status").read_text()
                uid_line = next(l for l in status.splitlines() if l.startswith("Uid:"))
                assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4, uid_line
                # dumpable again after the drop, so the watchdog's SIGABRT leaves
                # a core: only then may a process of the same user read its environ
                probe = subprocess.run(
                    [sys.executable, "-c", "import os, sys; os.setgid(int(sys.argv[2])); "
                     "os.setuid(int(sys.argv[1])); open(sys.argv[3], 'rb').read()",
                     str(nobody.pw_uid), str(nobody.pw_gid), f"/proc/{w['pid']}/environ"],
                    capture_output=True, text=True, timeout=20)
                assert probe.returncode == 0, f"worker not dumpable: {probe.stderr[-200:]}"
            assert os.stat(f"/proc/{r.pid}").st_uid == 0        # the master keeps root
            duplex(port, 3 << 20, 3 << 20)                      # splicing as nobody works
            r.assert_no_traceback()


def _skmem(local_port: int | None = None, peer_port: int | None = None) -> list[dict]:
    """skmem of the established TCP sockets on 127.0.0.1 matching the ports
    (ss -m: rb = receive buffer, tb = send buffer, as the kernel has them)."""
    out = subprocess.run(["ss", "-tnmH", "state", "established"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    found = []
    # one socket per line, its skmem:(...) on the same or the next (indented) line
    for block in re.split(r"\n(?=\S)", out):
        addrs = re.findall(r"127\.0\.0\.1:(\d+)", block)
        mem = re.search(r"skmem:\(([^)]*)\)", block)
        if len(addrs) < 2 or not mem:
            continue
        local, peer = int(addrs[0]), int(addrs[1])
        if local_port not in (None, local) or peer_port not in (None, peer):
            continue
        fields = dict(re.findall(r"([a-z_]+)(\d+)", mem.group(1)))
        found.append({k: int(v) for k, v in fields.items()})
    return found


def test_socket_buffers_are_set_where_configured(tmp_path):
    """listener rcvbuf/sndbuf on the client side, upstream rcvbuf/sndbuf on the
    server side (the kernel doubles what was asked); another listener without
    the keys keeps the kernel's autotuned buffers."""
    bport, port, plain = free_ports(3)
    conf = (listener("tuned", port, "tuned", rcvbuf="96KiB", sndbuf="40KiB")
            + listener("plain", plain, "plain")
            + upstream("tuned", [f"127.0.0.1:{bport}"], rcvbuf="72KiB", sndbuf=57344)
            + upstream("plain", [f"127.0.0.1:{bport}"]))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=1):
        with connect(port) as tuned_c, connect(plain) as plain_c:
            for s in (tuned_c, plain_c):
                s.sendall(b"ping")
                assert s.recv(16) == b"ping"
            client_side = _skmem(local_port=port, peer_port=tuned_c.getsockname()[1])
            assert [(m["rb"], m["tb"]) for m in client_side] == [(2 * 96 * 1024, 2 * 40 * 1024)]
            plain_side = _skmem(local_port=plain, peer_port=plain_c.getsockname()[1])
            assert len(plain_side) == 1
            assert (plain_side[0]["rb"], plain_side[0]["tb"]) != (2 * 96 * 1024, 2 * 40 * 1024)
            to_servers = sorted((m["rb"], m["tb"]) for m in _skmem(peer_port=bport))
            assert len(to_servers) == 2, to_servers
            assert (2 * 72 * 1024, 2 * 57344) in to_servers
            # the other one is autotuned: not the configured sizes
            assert to_servers.count((2 * 72 * 1024, 2 * 57344)) == 1


def test_socket_buffer_above_the_sysctl_cap_is_reported(tmp_path):
    cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
    bport, port = free_ports(2)
    conf = (listener("web", port, "app", rcvbuf=2 * cap)
            + upstream("app", [f"127.0.0.1:{bport}"]))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=1) as r:
        [ev] = r.wait_event("socket_buffer_capped", timeout=10)
        assert (ev["where"], ev["key"], ev["configured"], ev["effective"]) == (
            "listener web", "rcvbuf", 2 * cap, cap)
        assert "net.core.rmem_max" in ev["hint"]
        assert echo_roundtrip(port, b"still forwards") == b"still forwards"


def _worker_sockets(pid: int) -> list[socket.socket]:
    """Copies of a worker's TCP sockets (pidfd_getfd(2); root or ptrace rights)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    socks = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(438, pidfd, int(name), 0)   # SYS_pidfd_getfd
            if fd < 0:
                continue
            s = socket.socket(fileno=fd)
            if s.type == socket.SOCK_STREAM and s.family == socket.AF_INET:
                socks.append(s)
            else:
                s.close()
    finally:
        os.close(pidfd)
    return socks


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd on another process needs root")
@pytest.mark.parametrize("lowat", [None, 0, 65536])
def test_notsent_lowat_on_both_sockets(tmp_path, lowat):
    """[ring] notsent_lowat (default 512KiB) is set on the listening socket,
    so accepted client sockets inherit it, and on every socket to a server;
    0 leaves the kernel's default (no limit)."""
    bport, port = free_ports(2)
    ring = "" if lowat is None else f"notsent_lowat = {lowat}"
    want = 524288 if lowat is None else lowat
    # no handover: the first probe's connection, if still open at the
    # reload, would move to generation 2 with its own (old) value
    with Backend("echo", [bport]), Ringd(tmp_path, _conf(port, [f"127.0.0.1:{bport}"], ring=ring),
                                         workers=1, extra_ringd="handover = false\n") as r:
        assert _lowats(r, port, bport) == {"listening": want, "client": want, "server": want}
        # a reload to another value (0 included) reaches the listening socket
        other = 0 if want else 131072
        r.write_config(_conf(port, [f"127.0.0.1:{bport}"], ring=f"notsent_lowat = {other}"))
        res = r.cli("reload", "-c", str(r.conf))
        assert res.returncode == 0, res.stderr
        wait_for(lambda: len(r.worker_pids(gen=2)) == 1, 10, what="generation 2 worker")
        assert _lowats(r, port, bport, gen=2) == {"listening": other, "client": other,
                                                   "server": other}


@pytest.mark.skipif(os.geteuid() != 0, reason="pidfd_getfd on another process needs root")
@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer_taskrun"])
def test_server_socket_options_in_both_ring_modes(tmp_path, sqpoll):
    """Every socket to a server gets TCP_NODELAY and [ring] notsent_lowat,
    and rcvbuf/sndbuf before its SYN, in both ring modes."""
    bport, port = free_ports(2)
    conf = (f"[ring]\nsqpoll = {str(sqpoll).lower()}\nnotsent_lowat = 65536\n"
            + listener("web", port, "app")
            + upstream("app", [f"127.0.0.1:{bport}"], rcvbuf=131072))
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=1) as r:
        for _ in range(3):      # not only the first connection of the worker
            with connect(port) as c:
                c.sendall(b"ping")
                assert c.recv(16) == b"ping"
                [pid] = r.worker_pids()
                found = []
                for s in _worker_sockets(pid):
                    with s:
                        try:
                            peer = s.getpeername()[1]
                        except OSError:
                            continue
                        if peer == bport:
                            found.append((s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
                                          s.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT),
                                          s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)))
                assert found == [(True, 65536, 2 * 131072)], found
        r.assert_no_traceback()


def _lowats(r, port: int, bport: int, gen: int | None = None) -> dict:
    """TCP_NOTSENT_LOWAT of a worker's listening socket and of both sockets of
    a fresh connection through it."""
    with connect(port) as c:
        c.sendall(b"ping")
        assert c.recv(16) == b"ping"
        [pid] = r.worker_pids(gen=gen)
        found = {}
        for s in _worker_sockets(pid):
            with s:
                try:
                    peer = s.getpeername()[1]
                except OSError:
                    peer = None
                role = ("listening" if peer is None and s.getsockname()[1] == port
                        else "client" if peer == c.getsockname()[1]
                        else "server" if peer == bport else None)
                if role:
                    found[role] = s.getsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT)
        return found
