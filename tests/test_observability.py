"""Metrics, /healthz, /status, ringd status, the access log."""
from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from harness import (Backend, Ringd, connect, echo_roundtrip, free_ports, listener, recv_all,
                     upstream, wait_for)


def _admin(port: int) -> str:
    return f'\n[admin]\nlisten = "127.0.0.1:{port}"\n'


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(port: int) -> dict:
    """{(name, frozenset(labels.items())): value} of every sample."""
    status, text = http_get(port, "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == v2 for k, v2 in labels.items()))


def test_metrics_count_bytes_and_connections_exactly_across_reload_and_kill(tmp_path):
    bport, port, aport = free_ports(3)
    with Backend("echo", [bport]):
        conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]) + _admin(aport)
        with Ringd(tmp_path, conf, workers=2) as r:
            sent = 0
            conns = 0

            def traffic(n: int, size: int):
                nonlocal sent, conns
                for i in range(n):
                    data = os.urandom(size + i)
                    assert echo_roundtrip(port, data) == data
                    sent += len(data)
                    conns += 1

            def check():
                def settled():
                    m = scrape(aport)
                    return (total(m, "ringd_connections_closed_total") == conns and m) or None
                m = wait_for(settled, 10, what="all connections closed in metrics")
                assert total(m, "ringd_connections_accepted_total", listener="web") == conns
                assert total(m, "ringd_bytes_total", direction="client_to_server") == sent
                assert total(m, "ringd_bytes_total", direction="server_to_client") == sent
                assert total(m, "ringd_connections_closed_total", reason="done") == conns
                assert total(m, "ringd_server_connections_total") == conns
                assert total(m, "ringd_connections_active") == 0
                return m

            traffic(30, 1000)
            check()
            # a reload: generation 1's counts are folded in once it is gone
            assert r.cli("reload", "-c", str(r.conf)).returncode == 0
            wait_for(lambda: len(r.status()["generations"]) == 1, 15, what="gen 1 retired")
            traffic(20, 70000)
            m = check()
            assert total(m, "ringd_reloads_total", result="ok") == 1
            assert total(m, "ringd_generation") == 2
            # a killed worker: its slot's counters carry on
            victim = r.status()["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: r.status()["workers"][0]["pid"] not in (None, victim)
                     and r.status()["workers"][0]["state"] == "ready", 5, what="respawn")
            traffic(20, 5000)
            m = check()
            assert total(m, "ringd_worker_restarts_total") == 1
            info = [lbl for (n, lbl), v in m.items() if n == "ringd_build_info"]
            assert info and dict(info[0])["liburing"].startswith("2.")


def test_healthz_and_status_endpoints(tmp_path):
    bport, port, aport = free_ports(3)
    crash = tmp_path / "crash"
    with Backend("echo", [bport]):
        conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]) + _admin(aport)
        r = Ringd(tmp_path, conf, workers=2, test_hooks=True,
                  extra_ringd='respawn_delay = "1s"\n',
                  env={"RINGD_TEST_CRASH_FILE": str(crash)})
        with r:
            assert http_get(aport, "/healthz")[0] == 200
            code, body = http_get(aport, "/status")
            st = json.loads(body)
            assert code == 200 and st["generation"] == 1 and len(st["workers"]) == 2
            assert http_get(aport, "/nope")[0] == 404
            # loop counters (bytes per wakeup = bytes / loops): present and counting
            before = {w["slot"]: (w["loops"], w["cqes"]) for w in st["workers"]}
            assert echo_roundtrip(port, b"count me") == b"count me"
            after = {w["slot"]: (w["loops"], w["cqes"]) for w in r.status()["workers"]}
            assert any(after[k][0] > before[k][0] and after[k][1] > before[k][1] for k in after)
            crash.write_text("x")
            os.kill(st["workers"][1]["pid"], signal.SIGKILL)
            wait_for(lambda: http_get(aport, "/healthz")[0] == 503, 5, what="503 with a dead slot")
            crash.unlink()
            wait_for(lambda: http_get(aport, "/healthz")[0] == 200, 10, what="200 again")


def test_admin_listener_is_bounded(tmp_path):
    """A client that sends nothing (or garbage) cannot stall the master."""
    bport, port, aport = free_ports(3)
    with Backend("echo", [bport]):
        conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]) + _admin(aport)
        with Ringd(tmp_path, conf, workers=1) as r:
            idle = [connect(aport) for _ in range(10)]
            junk = connect(aport)
            junk.sendall(b"x" * 20000)
            t0 = time.monotonic()
            assert http_get(aport, "/healthz")[0] == 200
            assert r.status()["generation"] == 1
            assert echo_roundtrip(port, b"fine") == b"fine"
            assert time.monotonic() - t0 < 3
            # the silent ones are dropped after the read timeout
            idle[0].settimeout(10)
            assert recv_all(idle[0]) == b""
            for s in idle + [junk]:
                s.close()


def test_status_cli_shows_workers_and_servers(tmp_path):
    a, b, port = free_ports(3)
    with Backend("echo", [a]):
        conf = listener("web", port, "app") + upstream(
            "app", [f"127.0.0.1:{a}", {"address": f"127.0.0.1:{b}", "weight": 3}])
        with Ringd(tmp_path, conf, workers=2) as r:
            echo_roundtrip(port, b"x")
            res = r.cli("status", "-c", str(r.conf))
            assert res.returncode == 0, res.stderr
            out = res.stdout
            for w in r.status()["workers"]:
                assert str(w["pid"]) in out
            assert f"app/127.0.0.1:{a}" in out and f"app/127.0.0.1:{b}" in out
            st = json.loads(r.cli("status", "-c", str(r.conf), "--json").stdout)
            assert {s["server"] for s in st["servers"]} == {f"127.0.0.1:{a}", f"127.0.0.1:{b}"}
            assert all(w["state"] == "ready" and w["cpu"] is not None for w in st["workers"])


def test_access_log_matches_connections(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = listener("web", port, "app", access_log=True) + upstream("app", [f"127.0.0.1:{bport}"])
        with Ringd(tmp_path, conf, workers=2) as r:
            sizes = [1, 100, 5000, 70000, 300000]
            for n in sizes:
                assert echo_roundtrip(port, b"a" * n) == b"a" * n
            # and one the client resets
            import socket
            import struct
            s = connect(port)
            s.sendall(b"z" * 10)
            assert s.recv(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            evs = r.wait_event("access", count=len(sizes) + 1)
            done = sorted(e["bytes_in"] for e in evs if e["end"] == "done")
            assert done == sizes
            for e in evs:
                if e["end"] == "done":
                    assert e["bytes_out"] == e["bytes_in"]
                assert e["listener"] == "web" and e["server"] == f"127.0.0.1:{bport}"
                assert e["client"].startswith("127.0.0.1:")
                assert e["duration_ms"] >= 0
            resets = [e for e in evs if e["end"] == "reset"]
            assert len(resets) == 1 and resets[0]["bytes_in"] == 10


def test_worker_memory_metrics_follow_the_status(tmp_path):
    """The buffer ring's target and high-water mark and the trim count of
    each worker are metrics too (the same figures as `ringd status`), so a
    worker whose memory does not come back shows on a dashboard."""
    bport, port, aport = free_ports(3)
    with Backend("echo", [bport]):
        conf = (listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"])
                + _admin(aport))
        with Ringd(tmp_path, conf, workers=1) as r:
            before = r.status()["workers"][0]
            socks = [connect(port, timeout=10) for _ in range(60)]
            for s in socks:
                s.sendall(b"m" * 3000)
            for s in socks:
                assert recv_all(s, 3000) == b"m" * 3000
                s.close()
            w = wait_for(lambda: (x := r.status()["workers"][0])["trims"] > before["trims"]
                         and x["active"] == 0 and x, 15, what="a trim after the burst")
            m = scrape(aport)
            lbl = frozenset({"worker": "0"}.items())
            assert m[("ringd_worker_trims_total", lbl)] == w["trims"], m
            assert m[("ringd_worker_buffers_target", lbl)] == w["bufs_target"]
            assert m[("ringd_worker_buffers_high_water", lbl)] == w["bufs_high_water"] > 0


def test_access_log_turned_on_by_a_reload_logs(tmp_path):
    """Without a listener that logs, the master does not poll the access
    log rings; a reload that turns access_log on must start it."""
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        quiet = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"])
        with Ringd(tmp_path, quiet, workers=1) as r:
            assert echo_roundtrip(port, b"before") == b"before"
            r.write_config(listener("web", port, "app", access_log=True)
                           + upstream("app", [f"127.0.0.1:{bport}"]))
            r.signal(signal.SIGHUP)
            r.wait_event("reload_ok")
            assert echo_roundtrip(port, b"after!!") == b"after!!"
            (ev,) = r.wait_event("access", timeout=5)
            assert ev["bytes_in"] == 7 and ev["end"] == "done", ev
            time.sleep(0.5)
            assert len(r.events("access")) == 1, r.events("access")


def test_json_logs_are_valid_json_lines(tmp_path):
    bport, port = free_ports(2)
    with Backend("echo", [bport]):
        conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"])
        with Ringd(tmp_path, conf, workers=2) as r:
            r.signal(signal.SIGHUP)
            r.wait_event("reload_ok")
        lines = [ln for ln in r.log_text().splitlines() if ln.strip()]
        assert len(lines) > 10
        for ln in lines:
            ev = json.loads(ln)
            assert "event" in ev and "timestamp" in ev and "level" in ev
        names = {json.loads(ln)["event"] for ln in lines}
        assert {"start", "worker_spawn", "worker_ready", "ready", "reload_ok", "drain_start",
                "drain_done", "worker_exit", "exit"} <= names


def test_server_drain_ready_and_state_survives_reload(tmp_path):
    a, b, port = free_ports(3)
    with Backend("id", [a]), Backend("id", [b]):
        conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{a}", f"127.0.0.1:{b}"])
        with Ringd(tmp_path, conf, workers=2) as r:
            def who() -> int:
                s = connect(port)
                line = s.recv(64)
                s.close()
                return int(line.split()[1])
            assert {who() for _ in range(20)} == {a, b}
            stream = connect(port)
            first = int(stream.recv(64).split()[1])
            other = b if first == a else a
            res = r.cli("server", "-c", str(r.conf), f"app/127.0.0.1:{first}", "drain")
            assert res.returncode == 0, res.stderr
            assert "state drain" in res.stdout
            assert {who() for _ in range(20)} == {other}
            # the existing stream keeps working
            stream.sendall(b"still")
            assert stream.recv(64) == b"still"
            # the runtime state survives a reload
            assert r.cli("reload", "-c", str(r.conf)).returncode == 0
            assert {who() for _ in range(20)} == {other}
            st = {s["server"]: s for s in r.status()["servers"]}
            assert st[f"127.0.0.1:{first}"]["state"] == "drain"
            res = r.cli("status", "-c", str(r.conf))
            assert "drain" in res.stdout
            stream.sendall(b"after reload")
            assert stream.recv(64) == b"after reload"
            stream.close()
            assert r.cli("server", "-c", str(r.conf), f"app/127.0.0.1:{first}", "ready").returncode == 0
            assert {who() for _ in range(20)} == {a, b}
            # maint takes it out too; weight 0 as well; bad input is refused clearly
            assert r.cli("server", "-c", str(r.conf), f"app/127.0.0.1:{first}", "maint").returncode == 0
            assert {who() for _ in range(10)} == {other}
            assert r.cli("server", "-c", str(r.conf), f"app/127.0.0.1:{first}", "ready").returncode == 0
            res = r.cli("server", "-c", str(r.conf), "app/127.0.0.1:1", "drain")
            assert res.returncode == 1 and "no server" in res.stderr
            res = r.cli("server", "-c", str(r.conf), f"app/127.0.0.1:{first}", "weight", "999")
            assert res.returncode == 1 and "weight" in res.stderr
            res = r.cli("server", "-c", str(r.conf), f"app/127.0.0.1:{first}", "weight", "3")
            assert res.returncode == 0
            st = {s["server"]: s for s in r.status()["servers"]}
            assert st[f"127.0.0.1:{first}"]["weight"] == 3


def test_healthz_answers_while_idle_connections_flood_the_admin_port(tmp_path):
    """Any local user could make /healthz reset at once by holding 64 idle
    connections to the admin port. Idle ones are evicted, oldest first."""
    from harness import connect_nowait
    bport, port, aport = free_ports(3)
    with Backend("echo", [bport]):
        conf = listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]) + _admin(aport)
        with Ringd(tmp_path, conf, workers=1) as r:
            idle = [connect_nowait(aport) for _ in range(250)]
            try:
                r.wait_event("admin_clients_evicted", timeout=10)
                for round_ in range(5):
                    t0 = time.monotonic()
                    assert http_get(aport, "/healthz") == (200, "ok\n")
                    took = time.monotonic() - t0
                    assert took < 3.0, took          # prompt, with room for a loaded CI host
                    idle += [connect_nowait(aport) for _ in range(100)]
                # a slow sender (one byte now and then) is dropped at the header timeout
                slow = connect(aport)
                slow.sendall(b"G")
                slow.settimeout(10)
                t0 = time.monotonic()
                assert recv_all(slow) == b""
                assert time.monotonic() - t0 < 8
                slow.close()
                samples = scrape(aport)
                assert total(samples, "ringd_admin_clients_evicted_total") >= 100
                assert total(samples, "ringd_admin_clients") <= 64
                assert r.status()["generation"] == 1
            finally:
                for s in idle:
                    s.close()
            r.assert_no_traceback()
