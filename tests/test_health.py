# Over 450 lines: one module per area; states, registry, probes and end-to-end checks.
"""Health checks: the state model, the server registry's record keeping, the
checker's verdicts, single probes against real sockets, and end to end with a
real ringd and real backends.

End-to-end tests use short intervals (200-300 ms) and compare against the
bounds the issue states (fall * interval + timeout + 1 s, rise checks), which
are generous for checks that fail by a refused connect.
"""
from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace

import pytest

from harness import (Backend, Ringd, Traffic, backend_of, connect, free_ports, health_table,
                     listener, servers_by_name, upstream, wait_for)
from ringd import config as config_mod
from ringd.config import HealthCheck
from ringd.health import CheckFailed, CheckSpec, HealthChecker, probe
from ringd.servers import ServerRegistry
from ringd.native import SharedState, lib, server_table
from ringd.states import (TRANSITIONS, AdminState, Health, ServerState, effective_state,
                          transition)

WHO = b"WHO\n"      # what a client says to a `pong`/`wrong` backend to learn its port


def _addr(p: int) -> str:
    return f"127.0.0.1:{p}"


# =========================================================================== state model


def test_effective_state_precedence():
    H, A, S = Health, AdminState, ServerState
    assert effective_state(H.UP, A.READY) is S.UP
    assert effective_state(H.DOWN, A.READY) is S.DOWN
    assert effective_state(H.UP, A.DRAIN) is S.DRAIN
    assert effective_state(H.DOWN, A.DRAIN) is S.DOWN          # broken beats drained
    assert effective_state(H.DOWN, A.MAINT) is S.MAINT
    assert effective_state(H.UP, A.READY, weight=0) is S.DRAIN
    assert effective_state(H.UP, A.READY, weight=5) is S.UP
    assert effective_state(H.UP, A.READY, config_down=True) is S.MAINT
    assert [int(s) for s in S] == [lib.RINGD_SRV_UP, lib.RINGD_SRV_DOWN, lib.RINGD_SRV_DRAIN,
                                   lib.RINGD_SRV_MAINT]


def test_every_transition_is_named_once():
    pairs = {(a, b) for a in ServerState for b in ServerState if a != b}
    assert set(TRANSITIONS) == pairs
    names = [t.name for t in TRANSITIONS.values()]
    assert len(set(names)) == len(names)
    assert all(t.doc for t in TRANSITIONS.values())
    assert transition(ServerState.UP, ServerState.DOWN).name == "fail"
    assert transition(ServerState.DOWN, ServerState.UP).name == "rise"
    with pytest.raises(KeyError):
        transition(ServerState.UP, ServerState.UP)


def test_admin_state_parse():
    assert AdminState.parse(" Drain ") is AdminState.DRAIN
    with pytest.raises(ValueError, match="expected one of ready, drain, maint"):
        AdminState.parse("off")


# =========================================================================== the registry's records


def _cfg(servers: str, health: str = "") -> object:
    return config_mod.loads(f"""
[ringd]
workers = 2
[[listener]]
name = "web"
listen = "127.0.0.1:1"
upstream = "app"
[upstream.app]
servers = {servers}
{health}
""")


def _gen(number: int, cfg) -> SimpleNamespace:
    servers = server_table(cfg)
    return SimpleNamespace(number=number, config=cfg, servers=servers, state="active",
                           shm=SharedState(number, cfg.ringd.workers, len(cfg.listeners),
                                           len(servers)))


def _shm_states(gen) -> dict[str, int]:
    return {ref.name: gen.shm.server(ref.index).state for ref in gen.servers}


def test_records_survive_a_reload_and_publish_into_every_generation():
    g1 = _gen(1, _cfg('["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]'))
    master = SimpleNamespace(generations=[g1], active=g1)
    hc = ServerRegistry(master)
    hc.prepare_generation(g1)
    assert set(hc.records) == {("app", f"127.0.0.1:{p}") for p in (1001, 1002, 1003)}
    assert set(_shm_states(g1).values()) == {lib.RINGD_SRV_UP}      # servers start up

    epoch = g1.shm.header.state_epoch
    hc.set_admin("app", "127.0.0.1:1002", "drain")
    assert _shm_states(g1)["127.0.0.1:1002"] == lib.RINGD_SRV_DRAIN
    assert g1.shm.header.state_epoch == epoch + 1
    hc.set_admin("app", "127.0.0.1:1002", "drain")                  # no change, no bump
    assert g1.shm.header.state_epoch == epoch + 1
    hc.set_weight("app", "127.0.0.1:1003", 7)
    assert g1.shm.server(2).weight == 7

    # reload: 1001 goes, 1004 comes, 1003 is now `down = true` in the file
    g2 = _gen(2, _cfg('["127.0.0.1:1002", {address = "127.0.0.1:1003", down = true}, '
                      '"127.0.0.1:1004"]'))
    master.generations.append(g2)
    hc.prepare_generation(g2)
    s2 = _shm_states(g2)
    assert s2["127.0.0.1:1002"] == lib.RINGD_SRV_DRAIN           # admin state carried over
    assert s2["127.0.0.1:1003"] == lib.RINGD_SRV_MAINT           # its own file says down
    assert g2.shm.server(1).weight == 7                          # runtime weight carried over
    assert s2["127.0.0.1:1004"] == lib.RINGD_SRV_UP
    assert _shm_states(g1)["127.0.0.1:1003"] == lib.RINGD_SRV_UP  # g1's file does not
    master.active = g2
    hc.on_generation(g2, g1)
    assert hc.record("app", "127.0.0.1:1003").snapshot()["state"] == "maint"

    # one publish reaches every generation that has the server
    hc.set_admin("app", "127.0.0.1:1002", "maint")
    assert _shm_states(g1)["127.0.0.1:1002"] == _shm_states(g2)["127.0.0.1:1002"] \
        == lib.RINGD_SRV_MAINT
    assert hc.lookup("app/127.0.0.1:1002").admin is AdminState.MAINT
    with pytest.raises(KeyError):
        hc.lookup("app/127.0.0.1:9")
    with pytest.raises(ValueError):
        hc.set_weight("app", "127.0.0.1:1002", 1000)

    # g1 drained away: 1001 existed only there
    hc.fold_generation(g1)
    master.generations.remove(g1)
    assert ("app", "127.0.0.1:1001") not in hc.records
    assert ("app", "127.0.0.1:1002") in hc.records
    assert hc.counts["drain"] == 1 and hc.counts["maint_while_draining"] == 1


def test_rise_fall_and_the_first_check():
    g1 = _gen(1, _cfg('["127.0.0.1:1001"]'))
    master = SimpleNamespace(generations=[g1], active=g1)
    servers = ServerRegistry(master)
    hc = HealthChecker(master, servers)
    servers.prepare_generation(g1)
    rec = servers.record("app", "127.0.0.1:1001")
    spec = CheckSpec("127.0.0.1", socket.AF_INET, 1001, HealthCheck(rise=2, fall=3))
    shm = g1.shm.server(0)

    def check(ok: bool) -> int:
        hc._check_done(rec, spec, ok, "" if ok else "connect refused", "", 0.001)
        return shm.state

    # not confirmed yet: the first failed check takes it down at once
    assert check(False) == lib.RINGD_SRV_DOWN
    assert rec.downs == 1 and rec.reason == "connect refused"
    assert check(True) == lib.RINGD_SRV_DOWN          # 1 of rise=2
    assert check(True) == lib.RINGD_SRV_UP
    assert rec.ups == 1
    assert check(False) == lib.RINGD_SRV_UP           # confirmed now: fall=3 applies
    assert check(False) == lib.RINGD_SRV_UP
    assert check(True) == lib.RINGD_SRV_UP            # a success resets the count
    for _ in range(2):
        assert check(False) == lib.RINGD_SRV_UP
    assert check(False) == lib.RINGD_SRV_DOWN
    assert rec.checks == 9 and rec.checks_failed == 6 and rec.downs == 2
    assert servers.counts["fail"] == 2 and servers.counts["rise"] == 1

    # a successful check clears a passive-down mark set by a worker
    check(True), check(True)
    shm.passive_down = 1
    shm.fail_window_count = 4
    epoch = g1.shm.header.state_epoch
    check(True)
    assert shm.passive_down == 0 and shm.fail_window_count == 0
    assert g1.shm.header.state_epoch == epoch + 1
    # a drained server failing its checks shows DOWN, and DRAIN again once it passes
    servers.set_admin("app", "127.0.0.1:1001", "drain")
    for _ in range(3):
        check(False)
    assert shm.state == lib.RINGD_SRV_DOWN
    check(True), check(True)
    assert shm.state == lib.RINGD_SRV_DRAIN
    assert servers.counts["fail_while_draining"] == 1 and servers.counts["rise_while_draining"] == 1


def test_check_loops_follow_the_active_config():
    dead = free_ports(1)[0]
    health = '[upstream.app.health]\ninterval = "50ms"\ntimeout = "200ms"\nrise = 1\nfall = 1'

    async def main():
        g1 = _gen(1, _cfg(f'["127.0.0.1:{dead}"]', health))
        master = SimpleNamespace(generations=[g1], active=g1)
        servers = ServerRegistry(master)
        hc = HealthChecker(master, servers)
        await servers.start()
        await hc.start()
        try:
            rec = servers.record("app", f"127.0.0.1:{dead}")
            for _ in range(100):
                if rec.health is Health.DOWN:
                    break
                await asyncio.sleep(0.02)
            assert rec.health is Health.DOWN and rec.reason == "connect refused"
            assert g1.shm.server(0).state == lib.RINGD_SRV_DOWN
            assert len(hc._tasks) == 1
            # reload without a [health] table: checks stop, the server is usable again
            g2 = _gen(2, _cfg(f'["127.0.0.1:{dead}"]'))
            master.generations.append(g2)
            master.active = g2
            servers.on_generation(g2, g1)        # in the master's order
            hc.on_generation(g2, g1)
            assert not hc._tasks
            assert rec.health is Health.UP and rec.reason == "active checks disabled"
            assert g1.shm.server(0).state == g2.shm.server(0).state == lib.RINGD_SRV_UP
        finally:
            await hc.stop()

    _run(main())


# =========================================================================== single probes


async def _serve(handler):
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


def _spec(port: int, **kw) -> CheckSpec:
    kw.setdefault("timeout", 0.5)
    return CheckSpec("127.0.0.1", socket.AF_INET, port, HealthCheck(**kw))


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_probe_outcomes():
    async def reply_with(data: bytes, close: bool = False, read_first: bool = True):
        async def handler(r, w):
            try:
                if read_first:
                    await r.readline()
                w.write(data)
                await w.drain()
                if not close:
                    await r.read()      # until the checker resets us
            except ConnectionError:
                pass
            finally:
                w.close()
        return await _serve(handler)

    async def main():
        results = {}
        port = free_ports(1)[0]
        for name, spec_kw, server in [
            ("refused", {}, None),
            ("connect", {}, reply_with(b"")),
            ("prefix_ok", dict(send=b"PING\r\n", expect=b"+PONG"), reply_with(b"+PONG\r\n")),
            ("prefix_bad", dict(send=b"PING\r\n", expect=b"+PONG"), reply_with(b"-ERR no\r\n")),
            ("prefix_short", dict(send=b"PING\r\n", expect=b"+PONG"), reply_with(b"+PO", True)),
            ("regex_ok", dict(send=b"PING\r\n", expect_regex=r"role:master\r\n"),
             reply_with(b"# Replication\r\nrole:master\r\n")),
            ("regex_bad", dict(send=b"PING\r\n", expect_regex=r"role:master"),
             reply_with(b"role:slave\r\n", True)),
            ("regex_open", dict(send=b"PING\r\n", expect_regex=r"role:master", timeout=0.3),
             reply_with(b"role:slave\r\n")),
            ("silent", dict(send=b"PING\r\n", expect=b"+PONG", timeout=0.3), reply_with(b"")),
            ("closed", dict(expect=b"HELLO"), reply_with(b"", True, read_first=False)),
        ]:
            srv = None
            if server is not None:
                srv, p = await server
            else:
                p = port
            try:
                spec = _spec(p, **spec_kw)
                t0 = time.monotonic()
                try:
                    latency = await probe(spec)
                    results[name] = ("ok", latency)
                except CheckFailed as e:
                    results[name] = (e.reason, e.detail)
                results[name] += (time.monotonic() - t0,)
            finally:
                if srv is not None:
                    srv.close()
        return results

    res = _run(main())
    assert res["refused"][0] == "connect refused"
    assert res["connect"][0] == "ok"
    assert res["prefix_ok"][0] == "ok"
    assert res["prefix_bad"][0] == "unexpected reply" and "-ERR" in res["prefix_bad"][1]
    assert res["prefix_short"][0] == "unexpected reply"
    assert res["regex_ok"][0] == "ok"
    assert res["regex_bad"][0] == "unexpected reply"
    # a reply that stays open without matching: cut by the time-out, shown as a wrong reply
    assert res["regex_open"][0] == "unexpected reply" and "role:slave" in res["regex_open"][1]
    assert res["silent"][0] == "timeout" and "expected reply" in res["silent"][1]
    assert 0.25 <= res["silent"][2] < 3.0
    assert res["closed"][0] == "connection closed"


def test_probe_never_uses_the_default_executor():
    """The master forks: checks must not start threads (asyncio runs name
    resolution in a thread pool; literal addresses must not get there)."""
    async def main():
        loop = asyncio.get_running_loop()

        def no_executor(*a, **kw):
            raise AssertionError("run_in_executor called")
        srv, p = await _serve(lambda r, w: w.close())
        loop.run_in_executor = no_executor
        try:
            await probe(_spec(p))
            with pytest.raises(CheckFailed):
                await probe(_spec(free_ports(1)[0]))
        finally:
            srv.close()

    _run(main())


# =========================================================================== end to end


def _state(r: Ringd, name: str) -> str:
    return servers_by_name(r.status())[name]["state"]


def _wait_state(r: Ringd, name: str, state: str, timeout: float = 10) -> float:
    """Wait until `name` shows `state`; returns the monotonic time it was seen."""
    wait_for(lambda: _state(r, name) == state, timeout, interval=0.02,
             what=f"{name} {state}")
    return time.monotonic()


def _checks(r: Ringd) -> dict[str, int]:
    """Active checks run so far, per server (ringd status)."""
    return {name: s["checks"] for name, s in servers_by_name(r.status()).items()}


def _wait_checks(r: Ringd, more: int, names: list[str], timeout: float = 10) -> None:
    """Wait until each server in `names` has had `more` checks beyond now."""
    start = _checks(r)
    wait_for(lambda: all(c >= start[n] + more for n, c in _checks(r).items() if n in names),
             timeout, interval=0.02, what=f"{more} more checks of {names}")


def test_stopped_backend_is_out_in_time_and_back_after_rise(tmp_path):
    interval, timeout, rise, fall = 0.3, 0.5, 2, 3
    b1, b2, b3, port = free_ports(4)
    backends = {b: Backend("id", [b]).start() for b in (b1, b2, b3)}
    try:
        conf = (listener("web", port, "app")
                + upstream("app", [_addr(b1), _addr(b2), _addr(b3)], max_fails=0)
                + health_table("app", interval="300ms", timeout="500ms", rise=rise, fall=fall))
        with Ringd(tmp_path, conf, workers=2) as r, Traffic(port) as bg:
            _wait_checks(r, 1, [_addr(b) for b in (b1, b2, b3)])   # every server checked
            assert set(backend_of(port) for _ in range(30)) == {b1, b2, b3}
            t0 = time.monotonic()
            backends[b2].stop()
            stopped = time.monotonic()
            seen_down = _wait_state(r, _addr(b2), "down", timeout=15)
            assert seen_down - stopped <= fall * interval + timeout + 1.0, seen_down - stopped
            ev = r.wait_event("server_down", server=_addr(b2))[0]
            assert ev["reason"] == "connect refused" and ev["upstream"] == "app"
            assert ev["failures"] >= 1

            # no new connection is even tried on it once it is down
            before = servers_by_name(r.status())[_addr(b2)]
            got = {backend_of(port) for _ in range(60)}
            assert got == {b1, b3}
            after = servers_by_name(r.status())[_addr(b2)]
            assert (after["failures"], after["connections"]) == \
                (before["failures"], before["connections"])

            backends[b2] = Backend("id", [b2]).start()
            restarted = time.monotonic()
            seen_up = _wait_state(r, _addr(b2), "up", timeout=15)
            assert seen_up - restarted <= rise * interval + timeout + 1.0, seen_up - restarted
            ev = r.wait_event("server_up", server=_addr(b2))[0]
            assert ev["reason"] == f"{rise} checks passed" and ev["transition"] == "rise"
            got = [backend_of(port) for _ in range(60)]
            assert got.count(b2) >= 15, got

            bg.stop()
            assert not bg.failures_outside([(t0, stopped)]), bg.failures[:5]
            assert len(bg.results) > 50
            assert {b for _, b, _ in bg.results if b} == {b1, b2, b3}
            r.assert_no_traceback()
    finally:
        for b in backends.values():
            b.stop()


@pytest.mark.parametrize("kind,bad_mode,reason", [
    ("expect", "wrong", "unexpected reply"),
    ("expect_regex", "wrong", "unexpected reply"),
    ("expect", "silent", "timeout"),
])
def test_send_expect_marks_a_wrong_answer_down(tmp_path, kind, bad_mode, reason):
    g1, g2, bad, port = free_ports(4)
    check = {"expect": {"expect": "+PONG"}, "expect_regex": {"expect_regex": r"^\+PONG\r\n"}}
    with Backend("pong", [g1, g2]), Backend(bad_mode, [bad]):
        conf = (listener("web", port, "app")
                + upstream("app", [_addr(g1), _addr(g2), _addr(bad)])
                + health_table("app", interval="200ms", timeout="400ms", rise=2, fall=2,
                               send="PING\r\n", **check[kind]))
        with Ringd(tmp_path, conf, workers=2) as r:
            _wait_state(r, _addr(bad), "down")
            ev = r.wait_event("server_down", server=_addr(bad))[0]
            assert ev["reason"] == reason
            if bad_mode == "wrong":
                assert "-ERR loading" in ev["error"]
            _wait_checks(r, 2, [_addr(g1), _addr(g2)])      # a few more rounds of checks
            by = servers_by_name(r.status())
            assert by[_addr(g1)]["state"] == by[_addr(g2)]["state"] == "up"
            assert not r.events("server_down")[1:], r.events("server_down")
            got = {backend_of(port, hello=WHO) for _ in range(40)}
            assert got == {g1, g2}
            r.assert_no_traceback()


def test_all_servers_down_closes_new_clients_at_once_and_counts_them(tmp_path):
    b1, b2, port = free_ports(3)
    with Backend("wrong", [b1, b2]):
        conf = (listener("web", port, "app", connect_timeout="20s")
                + upstream("app", [_addr(b1), _addr(b2)])
                + health_table("app", interval="200ms", timeout="400ms", send="PING\r\n",
                               expect="+PONG"))
        with Ringd(tmp_path, conf, workers=2) as r:
            _wait_state(r, _addr(b1), "down")
            _wait_state(r, _addr(b2), "down")
            for _ in range(10):
                t0 = time.monotonic()
                s = connect(port, timeout=5)
                try:
                    try:
                        s.sendall(WHO)
                        data = s.recv(64)
                    except (ConnectionResetError, BrokenPipeError):
                        data = b""
                finally:
                    s.close()
                assert data == b"", data         # never sent to a server that is down
                # closed at once, not after a connect attempt (connect_timeout
                # 20 s): the bound leaves a loaded 2-CPU host room
                assert time.monotonic() - t0 < 3.0
            wait_for(lambda: sum(w["no_server"] for w in r.status()["workers"]) >= 10, 5,
                     what="no_server counted")
            ev = r.wait_event("no_server")[0]
            assert ev["upstream"] == "app"
            # the log is rate limited (one event a second per worker), but the
            # clients held back are told by the tick, not left for a next one
            wait_for(lambda: sum(e["clients_closed"] for e in r.events("no_server")) >= 10, 5,
                     what="every closed client in the no_server events")
            st = servers_by_name(r.status())
            assert st[_addr(b1)]["connections"] == st[_addr(b2)]["connections"] == 0
            r.assert_no_traceback()


def test_health_states_survive_a_reload(tmp_path):
    good, bad, port = free_ports(3)
    with Backend("pong", [good]), Backend("wrong", [bad]):
        def conf(idle: str) -> str:
            # timeout 2 s: the good server must not fail a check on a loaded host
            return (listener("web", port, "app", idle_timeout=idle)
                    + upstream("app", [_addr(good), _addr(bad)])
                    + health_table("app", interval="200ms", timeout="2s", send="PING\r\n",
                                   expect="+PONG"))
        r = Ringd(tmp_path, conf("60s"), workers=2)
        with r:
            _wait_state(r, _addr(bad), "down")
            with Traffic(port, hello=WHO) as bg:
                for i in range(3):
                    r.write_config(conf(f"{61 + i}s"))
                    res = r.cli("reload", "-c", str(r.conf))
                    assert res.returncode == 0, res.stderr
                    st = r.status()
                    assert st["generation"] == 2 + i
                    # the new generation's table says down from the start
                    assert servers_by_name(st)[_addr(bad)]["state"] == "down"
                    _wait_checks(r, 1, [_addr(bad)])   # and its checks go on failing
            # (whether reloads lose clients is test_reload.py's business; here:
            # the server that is down is never reached, in any generation)
            assert {b for _, b, _ in bg.results if b is not None} == {good}
            assert len(bg.results) > 20
            assert len(r.events("server_down")) == 1
            assert not r.events("server_up")
            r.assert_no_traceback()


def test_passive_down_is_cleared_by_the_next_active_check(tmp_path):
    b1, b2, port = free_ports(3)
    backends = {b: Backend("id", [b]).start() for b in (b1, b2)}
    try:
        conf = (listener("web", port, "app")
                + upstream("app", [_addr(b1), _addr(b2)], max_fails=1, fail_timeout="60s")
                + health_table("app", interval="300ms", timeout="500ms", rise=1, fall=100))
        with Ringd(tmp_path, conf, workers=2) as r:
            _wait_checks(r, 1, [_addr(b1), _addr(b2)])   # first checks done: fall=100 applies
            backends[b2].stop()
            # clients keep working (retry) and one of them trips the passive check
            wait_for(lambda: backend_of(port) == b1
                     and _state(r, _addr(b2)) == "down (passive)", 10,
                     what="b2 marked down by passive checks")
            r.wait_event("server_down", reason="passive")
            backends[b2] = Backend("id", [b2]).start()
            # back long before fail_timeout (60 s) because its active check passes
            _wait_state(r, _addr(b2), "up", timeout=5)
            ev = r.wait_event("server_up", server=_addr(b2))[0]
            assert ev["cleared"] == "passive down"
            assert b2 in {backend_of(port) for _ in range(20)}
            r.assert_no_traceback()
    finally:
        for b in backends.values():
            b.stop()


@pytest.mark.parametrize("version,send_proxy,state,expect", [
    ("v1", None, "up", '{"version": 1, "proto": "UNKNOWN"}'),
    ("v2", None, "up", '{"version": 2, "command": "LOCAL"'),
    ("v1", False, "down", '{"version": 1'),     # the server wants the header: no header, no pass
])
def test_checks_of_a_proxy_protocol_upstream_send_the_header(tmp_path, version, send_proxy,
                                                             state, expect):
    """Like HAProxy: checks carry a PROXY header (v1 UNKNOWN, v2 LOCAL: "use
    the connection's own addresses") when the upstream's traffic does."""
    srv, port = free_ports(2)
    extra = {} if send_proxy is None else {"send_proxy": send_proxy}
    with Backend("proxy", [srv]):
        conf = (listener("web", port, "app")
                + upstream("app", [_addr(srv)], proxy_protocol=version)
                + health_table("app", interval="200ms", timeout="400ms", rise=1, fall=1,
                               send="hello\n", expect=expect, **extra))
        with Ringd(tmp_path, conf, workers=1) as r:
            _wait_state(r, _addr(srv), state)
            if state == "down":
                ev = r.wait_event("server_down", server=_addr(srv))[0]
                assert ev["reason"] == "unexpected reply" and "error" in ev["error"]
            else:
                _wait_checks(r, 3, [_addr(srv)])     # a few more rounds, all passing
                assert not r.events("server_down")
            r.assert_no_traceback()


def test_check_proxy_header_choice():
    from ringd.health import _check_proxy
    def up(pp, **hc):
        return config_mod.Upstream(name="u", proxy_protocol=pp, health=HealthCheck(**hc))
    assert _check_proxy(up(None)) == 0
    assert _check_proxy(up("v1")) == 1 and _check_proxy(up("v2")) == 2
    # a check on another port (a status port) talks plain TCP, unless told to
    assert _check_proxy(up("v2", port=9000)) == 0
    assert _check_proxy(up("v2", port=9000, send_proxy=True)) == 2
    assert _check_proxy(up("v1", send_proxy=False)) == 0
    assert _check_proxy(up(None, send_proxy=True)) == 0     # nothing to speak
