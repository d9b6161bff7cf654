"""Lame-duck drain of the whole host: `ringd drain [--after D]` and `ringd ready`.

/healthz must answer 503 as soon as the drain is acknowledged (that is what a
BGP speaker or a load balancer watches), connections keep being accepted and
served for D, then accepting stops, open connections finish and ringd exits;
`ringd ready` cancels while it still accepts. Real processes on 127.0.0.1.
"""
from __future__ import annotations

import errno
import socket
import subprocess
import time

import pytest

from harness import (RINGD, Backend, Ringd, _readline_timeout, connect, echo_roundtrip,
                     free_ports, listener, upstream, wait_for)
from test_observability import http_get, scrape, total


def _conf(port: int, bport: int, aport: int) -> str:
    return (listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"])
            + f'\n[admin]\nlisten = "127.0.0.1:{aport}"\n')


def _roundtrip_held(s: socket.socket, data: bytes) -> None:
    """One echo exchange on a connection that stays open."""
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        assert chunk, "held connection closed"
        got += chunk
    assert got == data


def _refused(port: int) -> bool:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", port))
        return False
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    finally:
        s.close()


def _drain_cli(r: Ringd, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(RINGD + ["drain", "-c", str(r.conf), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sqpoll", [True, False], ids=["sqpoll", "defer"])
def test_drain_turns_healthz_503_at_once_serves_for_after_then_stops(tmp_path, sqpoll):
    bport, port, aport = free_ports(3)
    ring = f'\n[ring]\nsqpoll = {"true" if sqpoll else "false"}\n'
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, bport, aport) + ring, workers=2) as r:
            assert http_get(aport, "/healthz")[0] == 200
            before = connect(port)
            _roundtrip_held(before, b"before the drain\n")

            cli = _drain_cli(r, "--after", "3s")
            try:
                first = _readline_timeout(cli.stdout, 10)
                assert first.startswith("draining"), first
                # acknowledged: the very next health check sees it, no waiting
                t_ack = time.monotonic()
                code, body = http_get(aport, "/healthz")
                assert (code, body) == (503, "draining\n")
                st = r.status()
                assert st["lameduck"]["state"] == "draining"
                assert 0 < st["lameduck"]["accept_stops_in"] <= 3.0
                m = scrape(aport)
                assert total(m, "ringd_host_state", state="draining") == 1
                assert total(m, "ringd_host_state", state="serving") == 0
                shown = r.cli("status", "-c", str(r.conf)).stdout
                assert "host draining (lame duck)" in shown, shown

                # routers are still converging: whatever arrives is served
                served = 0
                during = []
                while time.monotonic() - t_ack < 2.0:
                    data = b"during the drain %d\n" % served
                    assert echo_roundtrip(port, data) == data
                    served += 1
                    if len(during) < 4:
                        s = connect(port)
                        _roundtrip_held(s, b"held from the window\n")
                        during.append(s)
                    time.sleep(0.05)
                assert served >= 10
                assert cli.poll() is None, "ringd drain returned before ringd exited"

                # then accepting stops: listeners close, new clients are refused
                stop_ev = r.wait_event("lameduck_accept_stop", timeout=10)[0]
                start_ev = r.events("lameduck_start")[0]
                assert stop_ev["drained_for"] >= 2.9, stop_ev
                # (one listening socket per worker: each closes once its worker
                # has stopped accepting)
                wait_for(lambda: _refused(port), 10, what="every listening socket closed")
                assert total(scrape(aport), "ringd_host_state", state="stopping") == 1
                assert r.status()["lameduck"]["state"] == "stopping"
                assert start_ev["after"] == 3.0

                # open connections, older and newer, finish undisturbed
                for i, s in enumerate([before] + during):
                    _roundtrip_held(s, b"after accepting stopped %d\n" % i)
                assert r.proc.poll() is None, "ringd exited with connections open"
                for s in [before] + during:
                    s.shutdown(socket.SHUT_WR)
                    assert s.recv(10) == b""
                    s.close()
                assert r.wait_exit(15) == 0
                out, err = cli.communicate(timeout=10)
                assert cli.returncode == 0, (out, err)
                assert "drained and stopped" in out
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait(5)
            r.assert_no_traceback()
            assert not r.events("worker_kill")


def test_ready_cancels_a_drain_that_still_accepts(tmp_path):
    bport, port, aport = free_ports(3)
    with Backend("echo", [bport]):
        with Ringd(tmp_path, _conf(port, bport, aport), workers=1,
                   extra_ringd='drain_after = "6s"\n') as r:
            # 6 s: the reload and the CLI calls below must all fit before the
            # deadline, and each CLI is a Python start on a possibly busy CPU
            cli = _drain_cli(r)          # --after from ringd.drain_after
            try:
                assert _readline_timeout(cli.stdout, 10).startswith("draining")
                deadline = time.monotonic() + 6.0
                assert http_get(aport, "/healthz")[0] == 503
                assert r.events("lameduck_start")[0]["after"] == 6.0
                # a reload while draining keeps the host a lame duck
                assert r.cli("reload", "-c", str(r.conf)).returncode == 0
                assert http_get(aport, "/healthz")[0] == 503
                ready = r.cli("ready", "-c", str(r.conf))
                assert ready.returncode == 0, ready.stderr
                assert "drain cancelled" in ready.stdout
                assert http_get(aport, "/healthz") == (200, "ok\n")
                # the waiting `ringd drain` notices and says so
                out, err = cli.communicate(timeout=10)
                assert cli.returncode == 1 and "cancelled" in err, (out, err)
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait(5)
            # past the cancelled deadline: still serving, still accepting
            time.sleep(max(0.0, deadline + 0.5 - time.monotonic()))
            assert not r.events("lameduck_accept_stop")
            assert echo_roundtrip(port, b"still here\n") == b"still here\n"
            assert r.status()["lameduck"]["state"] == "serving"
            assert r.cli("ready", "-c", str(r.conf)).returncode == 0   # nothing to cancel: fine

            # a second drain with a shorter --after brings the stop forward
            long = r.cli("drain", "-c", str(r.conf), "--after", "30s", "--no-wait")
            assert long.returncode == 0, long.stderr
            held = connect(port)
            _roundtrip_held(held, b"x\n")
            t0 = time.monotonic()
            now = r.cli("drain", "-c", str(r.conf), "--after", "0s", "--no-wait")
            assert now.returncode == 0, now.stderr
            r.wait_event("lameduck_shortened", timeout=5)
            r.wait_event("lameduck_accept_stop", timeout=5)
            assert time.monotonic() - t0 < 5
            wait_for(lambda: _refused(port), 10, what="accepting stopped")
            late = r.cli("ready", "-c", str(r.conf))
            assert late.returncode == 1 and "too late" in late.stderr, late
            assert len(late.stderr.strip().splitlines()) == 1
            r.wait_event("lameduck_ready_refused", timeout=5)
            _roundtrip_held(held, b"still served\n")
            held.close()
            assert r.wait_exit(15) == 0
            r.assert_no_traceback()


def test_drain_and_ready_errors_are_one_clear_line(tmp_path):
    bport, port, aport = free_ports(3)
    r = Ringd(tmp_path, _conf(port, bport, aport), workers=1)
    for args in (["drain"], ["ready"]):      # no master running
        res = r.cli(*args, "-c", str(r.conf))
        assert res.returncode == 1
        assert res.stderr.startswith("ringd: no control socket"), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    bad = r.cli("drain", "-c", str(r.conf), "--after", "10")
    assert bad.returncode == 2
    assert bad.stderr.strip() == 'ringd: --after: expected a duration such as "10s" or "500ms", got "10"'


def test_drain_after_key(tmp_path):
    from ringd.config import ConfigError, load
    bport, port, aport = free_ports(3)
    r = Ringd(tmp_path, _conf(port, bport, aport), workers=1)
    assert load(str(r.conf)).ringd.drain_after == 10.0
    r.extra_ringd = 'drain_after = "0s"\n'
    r.write_config(_conf(port, bport, aport))
    assert load(str(r.conf)).ringd.drain_after == 0.0
    r.extra_ringd = "drain_after = 5\n"
    r.write_config(_conf(port, bport, aport))
    with pytest.raises(ConfigError) as e:
        load(str(r.conf))
    assert "ringd.drain_after" in str(e.value) and '"5s"' in str(e.value)
