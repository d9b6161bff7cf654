# Over 450 lines: most of it is tables of config errors, one case a line.
"""Tests for ringd.config: the TOML loader, its checks, and the line numbers it reports."""

import dataclasses
import importlib.util
import os
import random
import re
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _import_config():
    try:
        import ringd.config as module  # installed package
    except ImportError:
        package = ROOT / "supervisor" / "config"
        spec = importlib.util.spec_from_file_location(
            "ringd_config_under_test", package / "__init__.py",
            submodule_search_locations=[str(package)],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look the module up while building
        spec.loader.exec_module(module)
    return module


cfg = _import_config()

# Line numbers are part of what is tested: keep this text exactly as it is.
BASE = """\
[ringd]
workers = 2
[ring]
entries = 4096
[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "app"
[upstream.app]
servers = ["127.0.0.1:9001", "127.0.0.1:9002"]
"""


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def issues_of(text: str) -> list:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text, "t.toml")
    return info.value.errors


def one_issue(text: str):
    issues = issues_of(text)
    assert len(issues) == 1, "\n".join(map(str, issues))
    return issues[0]


# --------------------------------------------------------------------------- shipped files


def test_example_config_loads_with_documented_values():
    config = cfg.load(ROOT / "conf" / "ringd.toml")
    assert config.file == str(ROOT / "conf" / "ringd.toml")
    assert [l.name for l in config.listeners] == ["app"]
    listener = config.listeners[0]
    assert str(listener.listen) == "127.0.0.1:8080"
    app = config.upstream("app")
    assert [s.name for s in app.servers] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert app.health is not None
    assert app.health.send == b"PING\r\n"
    assert app.health.expect == b"+PONG"
    assert config.admin.listen is not None and config.admin.listen.port == 9100
    # The example spells out the defaults, so it must load to the same values.
    assert config.ring == cfg.RingSettings()
    assert dataclasses.replace(listener, name="x", listen=None, upstream="", routes=()) == \
        cfg.Listener(name="x", listen=None, upstream="")
    assert [r.sni for r in listener.routes] == [("app.example.com", "*.app.example.com")]
    assert app.connect_retries == 2 and app.proxy_protocol is None and app.fail_timeout == 10.0


def test_example_config_documents_every_key():
    text = (ROOT / "conf" / "ringd.toml").read_text()
    schema = (
        cfg.RINGD_KEYS + cfg.RING_KEYS + cfg.ADMIN_KEYS + cfg.LISTENER_KEYS
        + cfg.UPSTREAM_KEYS + cfg.SERVER_KEYS + cfg.HEALTH_KEYS + cfg.ROUTE_KEYS
    )
    for key in schema:
        if key in ("servers", "health", "route"):
            continue  # a table / array, documented by its own comment block
        assert re.search(rf"(?<![\w.]){key}\s*=", text), f"{key} is not in conf/ringd.toml"
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if re.match(r"[a-z0-9_]+\s*=", line):
            assert lines[number - 1].startswith("#"), f"line {number + 1} has no comment: {line}"
    # Both server forms and a health table are shown.
    assert re.search(r'^\s*"127\.0\.0\.1:9001",', text, re.M)
    assert re.search(r"^\s*\{ address = ", text, re.M)
    assert "[upstream.app.health]" in text


# The tables as conf/ringd.toml and ringd.toml(5) head them -> the keys the
# model gives them. An upstream's `health` is a table of its own; its servers'
# keys are documented with the upstream.
def _model_tables() -> dict[str, set[str]]:
    return {
        "[ringd]": set(cfg.RINGD_KEYS),
        "[ring]": set(cfg.RING_KEYS),
        "[admin]": set(cfg.ADMIN_KEYS),
        "[[listener]]": set(cfg.LISTENER_KEYS) - {"route"},
        "[[listener.route]]": set(cfg.ROUTE_KEYS),
        "[upstream.NAME]": (set(cfg.UPSTREAM_KEYS) - {"health"}) | set(cfg.SERVER_KEYS),
        "[upstream.NAME.health]": set(cfg.HEALTH_KEYS),
    }


def test_every_model_key_has_a_converter_default_and_doc():
    for cls in (cfg.RingdSettings, cfg.RingSettings, cfg.AdminSettings, cfg.Listener,
                cfg.Route, cfg.Upstream, cfg.Server, cfg.HealthCheck):
        fields = cfg.model.key_fields(cls)
        assert fields, cls
        for f in fields:
            assert f.metadata["doc"], f"{cls.__name__}.{f.name} has no doc"
            nested = f.name in ("servers", "health", "routes")
            assert (f.metadata["convert"] is None) == nested, f"{cls.__name__}.{f.name}"
            has_default = f.default is not dataclasses.MISSING
            assert has_default or f.metadata["required"] or f.name == "workers", f.name


def test_example_config_documents_exactly_the_model_keys():
    """conf/ringd.toml shows every key of the model (set or commented out,
    each under a comment) and no key the model does not have."""
    heads = {"[ringd]": "[ringd]", "[ring]": "[ring]", "[admin]": "[admin]",
             "[[listener]]": "[[listener]]", "[[listener.route]]": "[[listener.route]]",
             "[upstream.app]": "[upstream.NAME]",
             "[upstream.app.health]": "[upstream.NAME.health]"}
    found: dict[str, set[str]] = {}
    section = None
    lines = (ROOT / "conf" / "ringd.toml").read_text().splitlines()
    key_line = re.compile(r"(?:# )?([a-z0-9_]+) = ")
    for number, line in enumerate(lines):
        if line.startswith("["):
            section = heads[line.strip()]
            continue
        match = key_line.match(line)
        server_key = re.match(r"#   ([a-z0-9_]+)\s{2,}\S", line)   # the servers' key list
        if section is None or not (match or server_key):
            continue
        found.setdefault(section, set()).add((match or server_key).group(1))
        if match:
            above = lines[number - 1]
            assert above.startswith("#") and not key_line.match(above), \
                f"conf/ringd.toml:{number + 1}: {line!r} has no comment of its own"
    assert found == _model_tables()


def test_man_page_documents_exactly_the_model_keys():
    """ringd.toml(5) has an entry (.TP/.TQ, then the key) for every key of the
    model, in the section of its table, and none the model does not have."""
    found: dict[str, set[str]] = {}
    section = None
    previous = ""
    for line in (ROOT / "packaging" / "man" / "ringd.toml.5").read_text().splitlines():
        if line.startswith(".SH "):
            section = line[4:].split(":")[0].strip()
        elif previous in (".TP", ".TQ") and section in _model_tables():
            match = re.match(r'\.B[IR] +"?([a-z0-9_]+)"? *"? *=', line)
            if match:
                found.setdefault(section, set()).add(match.group(1))
        previous = line.strip()
    assert found == _model_tables()


def test_demo_config():
    config = cfg.load(ROOT / "conf" / "demo.toml")
    assert config.ringd.workers_auto is True
    assert config.ringd.workers == len(os.sched_getaffinity(0))
    assert config.ringd.pidfile == "/tmp/ringd-demo/ringd.pid"
    assert config.ringd.control_socket == "/tmp/ringd-demo/ringd.sock"
    assert config.ringd.log_format == "console"
    [listener] = config.listeners
    assert (listener.name, listener.upstream, listener.listen.sockaddr) == (
        "demo", "demo", ("127.0.0.1", 8080),
    )
    assert [s.address.port for s in config.upstream("demo").servers] == [8081, 8082]
    assert config.upstream("demo").health is not None
    assert config.upstream("demo").health.send is None  # plain TCP check
    assert config.admin.listen.sockaddr == ("127.0.0.1", 9100)


# --------------------------------------------------------------------------- values


def test_defaults():
    config = cfg.loads(
        '[[listener]]\nname = "a"\nlisten = "127.0.0.1:1"\nupstream = "u"\n'
        '[upstream.u]\nservers = ["127.0.0.1:2"]\n'
    )
    assert config.file == "<string>"
    r = config.ringd
    assert (r.workers, r.workers_auto) == (len(os.sched_getaffinity(0)), True)
    assert r.pidfile == "/run/ringd/ringd.pid"
    assert r.control_socket == "/run/ringd/ringd.sock"
    assert (r.log_format, r.log_level, r.log_file) == ("auto", "info", None)
    assert (r.drain_timeout, r.user, r.group) == (30.0, None, None)
    assert (r.max_draining_generations, r.watchdog_timeout) == (4, 10.0)
    assert (r.respawn_delay, r.respawn_delay_max) == (0.1, 30.0)
    assert config.ring == cfg.RingSettings(
        sqpoll="auto", sq_thread_idle=0.01, entries=4096, pipe_size=1 << 20, pipe_pool=64,
        copy_buffer_size=16384, splice_threshold=65536, notsent_lowat=524288,
    )
    assert config.admin.listen is None
    l = config.listeners[0]
    assert (l.backlog, l.max_connections, l.connect_timeout, l.idle_timeout, l.access_log) == (
        511, 10000, 5.0, 600.0, False,
    )
    u = config.upstream("u")
    assert (u.balance, u.connect_retries, u.proxy_protocol, u.max_fails, u.fail_timeout) == (
        "round_robin", 2, None, 1, 10.0,
    )
    assert u.health is None
    s = u.servers[0]
    assert (s.name, s.weight, s.backup, s.down, s.max_connections) == ("127.0.0.1:2", 1, False, False, 0)


def test_full_values_are_converted():
    text = edit('workers = 2', 'workers = 3\nlog_level = "debug"\nuser = "root"\ngroup = "root"\n'
                'watchdog_timeout = "0s"\nlog_file = "/tmp/x.log"')
    text = edit('entries = 4096', 'entries = 8\nsqpoll = "auto"\nsq_thread_idle = "0s"\n'
                'pipe_size = "64KiB"\npipe_pool = 0\ncopy_buffer_size = 512\nsplice_threshold = 0\n'
                'notsent_lowat = 0', text)
    text = edit('upstream = "app"', 'upstream = "app"\naccess_log = true\nidle_timeout = "1h"\n'
                'rcvbuf = "256KiB"\nsndbuf = 65536', text)
    text = edit(
        'servers = ["127.0.0.1:9001", "127.0.0.1:9002"]',
        'servers = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 256, backup = true,'
        ' down = true, max_connections = 7 }]\nbalance = "least_conn"\nproxy_protocol = "v2"\n'
        'max_fails = 0\nconnect_retries = 0\nrcvbuf = "1MiB"\nsndbuf = 0\n'
        '[upstream.app.health]\nport = 9999\nsend = "HEAD / HTTP/1.0\\r\\n\\r\\n"\n'
        'expect_regex = "^HTTP/1\\\\.[01] 200"\nrise = 1\nfall = 100\ninterval = "250ms"\n'
        'send_proxy = false\n',
        text,
    )
    config = cfg.loads(text)
    assert (config.ringd.workers, config.ringd.workers_auto) == (3, False)
    assert (config.ringd.user, config.ringd.group, config.ringd.watchdog_timeout) == ("root", "root", 0.0)
    assert config.ringd.log_file == "/tmp/x.log"
    assert config.ring == cfg.RingSettings(
        sqpoll="auto", sq_thread_idle=0.0, entries=8, pipe_size=65536, pipe_pool=0,
        copy_buffer_size=512, splice_threshold=0, notsent_lowat=0,
    )
    assert config.listeners[0].access_log is True and config.listeners[0].idle_timeout == 3600.0
    assert (config.listeners[0].rcvbuf, config.listeners[0].sndbuf) == (262144, 65536)
    app = config.upstream("app")
    assert app.servers[1] == cfg.Server(
        address=app.servers[1].address, name="127.0.0.1:9002", weight=256, backup=True,
        down=True, max_connections=7,
    )
    assert (app.balance, app.proxy_protocol, app.max_fails, app.connect_retries) == ("least_conn", "v2", 0, 0)
    assert (app.rcvbuf, app.sndbuf) == (1048576, 0)
    assert app.health == cfg.HealthCheck(
        interval=0.25, timeout=1.0, rise=1, fall=100, port=9999,
        send=b"HEAD / HTTP/1.0\r\n\r\n", expect=None, expect_regex=r"^HTTP/1\.[01] 200",
        send_proxy=False,
    )


@pytest.mark.parametrize(
    "text, seconds",
    [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("1m30s", 90.0), (".25s", 0.25), ("100ms", 0.1), ("0.5m", 30.0)],
)
def test_durations(text, seconds):
    config = cfg.loads(edit('upstream = "app"', f'upstream = "app"\nconnect_timeout = "{text}"'))
    assert config.listeners[0].connect_timeout == seconds


@pytest.mark.parametrize("value", ['"5"', '"5 s"', '"-1s"', '"1d"', '""', '"s"', '"1.s"', "5", "2.5"])
def test_bad_durations(value):
    issue = one_issue(edit('upstream = "app"', f'upstream = "app"\nidle_timeout = {value}'))
    assert (issue.path, issue.line) == ("listener[0].idle_timeout", 9)
    assert 'expected a duration like "500ms", "30s", "2m"' in issue.message


def test_bare_number_duration_suggests_unit():
    issue = one_issue(edit('upstream = "app"', 'upstream = "app"\nconnect_timeout = 5'))
    assert issue.message == 'expected a duration like "500ms", "30s", "2m", got the number 5 (write "5s"?)'


@pytest.mark.parametrize(
    "text, size",
    [("4096", 4096), ('"64KiB"', 65536), ('"1MiB"', 1 << 20), ('"1m"', 1 << 20), ('"512k"', 512 << 10),
     ('"1KB"', 1024), ('"2K"', 2048), ('"1g"', 1 << 30), ('"1GiB"', 1 << 30), ('"3 MB"', 3 << 20),
     ('"1.5k"', 1536), ('"100"', 100), ("0", 0)],
)
def test_sizes(text, size):
    config = cfg.loads(edit("entries = 4096", f"splice_threshold = {text}"))
    assert config.ring.splice_threshold == size


@pytest.mark.parametrize("value", ['"1.3k"', '"5x"', '"k"', '"1TiB"', "-1", "1.5", "true", '"-4k"'])
def test_bad_sizes(value):
    issue = one_issue(edit("entries = 4096", f"splice_threshold = {value}"))
    assert (issue.path, issue.line) == ("ring.splice_threshold", 4)


@pytest.mark.parametrize("text, network", [
    ("10.0.0.0/8", "10.0.0.0/8"),
    ("192.0.2.7", "192.0.2.7/32"),
    (" 192.0.2.0/24 ", "192.0.2.0/24"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("::1", "::1/128"),
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_cidr_converter(text, network):
    # for allow/deny lists: not a key yet, so the converter is tested alone
    assert str(cfg.values.cidr(text)) == network


@pytest.mark.parametrize("value, message", [
    ("10.1.2.3/8", '"10.1.2.3/8" has host bits set (the network is "10.0.0.0/8")'),
    ("10.0.0.0/33", 'invalid network "10.0.0.0/33": '),
    ("example.com", 'invalid network "example.com": '),
    ("", 'invalid network "": write it like "10.0.0.0/8" or "::1"'),
    ("10.0.0.0 /8", 'invalid network "10.0.0.0 /8": write it like'),
    (8, 'expected a network like "10.0.0.0/8" or an address, got the integer 8'),
])
def test_bad_cidrs(value, message):
    with pytest.raises(cfg.values.Invalid) as info:
        cfg.values.cidr(value)
    assert str(info.value).startswith(message), str(info.value)


def test_ipv6_and_wildcard_addresses():
    text = edit('listen = "127.0.0.1:8080"', 'listen = "[::1]:8080"')
    text = edit('"127.0.0.1:9002"', '"[::1]:9002"', text)
    text += '[admin]\nlisten = "*:9100"\n'
    config = cfg.loads(text)
    listen = config.listeners[0].listen
    assert (listen.host, listen.port, listen.ip, listen.family) == ("::1", 8080, "::1", socket.AF_INET6)
    assert str(listen) == "[::1]:8080"
    assert listen.sockaddr == ("::1", 8080, 0, 0)
    server = config.upstream("app").servers[1]
    assert server.name == "[::1]:9002" and server.address.family == socket.AF_INET6
    admin = config.admin.listen
    assert (admin.host, admin.ip, admin.family, str(admin)) == ("0.0.0.0", "0.0.0.0", socket.AF_INET, "0.0.0.0:9100")
    assert admin.sockaddr == ("0.0.0.0", 9100)


def test_host_names_are_resolved():
    config = cfg.loads(edit('"127.0.0.1:9002"', '"localhost:9002"'))
    server = config.upstream("app").servers[1]
    assert server.name == "localhost:9002"
    assert server.address.host == "localhost"
    assert server.address.ip in ("127.0.0.1", "::1")
    assert server.address.family in (socket.AF_INET, socket.AF_INET6)


def test_workers_auto_and_explicit():
    auto = cfg.loads(edit("workers = 2", 'workers = "auto"'))
    assert auto.ringd.workers == len(os.sched_getaffinity(0)) and auto.ringd.workers_auto
    fixed = cfg.loads(BASE)
    assert (fixed.ringd.workers, fixed.ringd.workers_auto) == (2, False)


def test_config_is_frozen_and_upstream_lookup():
    config = cfg.loads(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ringd.workers = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listeners[0].listen.port = 1
    assert config.upstream("app").name == "app"
    with pytest.raises(KeyError):
        config.upstream("nope")
    assert isinstance(config.upstreams, tuple) and isinstance(config.listeners, tuple)


def test_servers_as_array_of_tables():
    text = edit(
        'servers = ["127.0.0.1:9001", "127.0.0.1:9002"]',
        '[[upstream.app.servers]]\naddress = "127.0.0.1:9001"\n'
        '[[upstream.app.servers]]\naddress = "127.0.0.1:9002"\nweight = 0\n',
    )
    issue = one_issue(text)
    assert (issue.path, issue.line) == ("upstream.app.servers[1].weight", 14)


# --------------------------------------------------------------------------- one error each

CASES = [
    # (old line in BASE, replacement, path, line, text the message must contain)
    ("workers = 2", "workers = 0", "ringd.workers", 2, "between 1 and 1024, got 0"),
    ("workers = 2", 'workers = "many"', "ringd.workers", 2, 'expected "auto" or an integer'),
    ("workers = 2", "workers = true", "ringd.workers", 2, "the boolean true"),
    ("workers = 2", "workers = 2.0", "ringd.workers", 2, "the float 2.0"),
    ("workers = 2", 'log_format = "xml"', "ringd.log_format", 2, '"json", "console", "auto", got "xml"'),
    ("workers = 2", 'log_level = "trace"', "ringd.log_level", 2, "expected one of"),
    ("workers = 2", 'drain_timeout = "0s"', "ringd.drain_timeout", 2, "greater than 0"),
    ("workers = 2", "max_draining_generations = 65", "ringd.max_draining_generations", 2, "between 1 and 64"),
    ("workers = 2", 'user = "no-such-user-rgd"', "ringd.user", 2, 'no such user "no-such-user-rgd"'),
    ("workers = 2", 'group = "no-such-group-rgd"', "ringd.group", 2, 'no such group "no-such-group-rgd"'),
    ("workers = 2", f'control_socket = "/{"x" * 107}"', "ringd.control_socket", 2, "at most 107 bytes"),
    ("workers = 2", 'pidfile = ""', "ringd.pidfile", 2, "must not be empty"),
    ("workers = 2", 'respawn_delay = "1m"', "ringd.respawn_delay", 2, "must not be smaller than respawn_delay"),
    ("workers = 2", 'respawn_delay = "2s"\nrespawn_delay_max = "1s"', "ringd.respawn_delay_max", 3, "(1s)"),
    ("workers = 2", 'watchdog_timeout = "1001h"', "ringd.watchdog_timeout", 2, "at most 1000h"),
    ("workers = 2", "wrokers = 2", "ringd.wrokers", 2, 'unknown key (did you mean "workers"?)'),
    ("entries = 4096", "entries = 1000", "ring.entries", 4, "power of two between 8 and 32768, got 1000"),
    ("entries = 4096", "entries = 65536", "ring.entries", 4, "between 8 and 32768"),
    ("entries = 4096", "entries = 4", "ring.entries", 4, "between 8 and 32768"),
    ("entries = 4096", 'pipe_size = "3000"', "ring.pipe_size", 4, "power of two between 4KiB and 1GiB"),
    ("entries = 4096", "pipe_size = 2048", "ring.pipe_size", 4, "power of two"),
    ("entries = 4096", 'pipe_size = "2GiB"', "ring.pipe_size", 4, "power of two"),
    ("entries = 4096", 'copy_buffer_size = "2MiB"', "ring.copy_buffer_size", 4, "between 512 and 1MiB"),
    ("entries = 4096", "pipe_pool = 4097", "ring.pipe_pool", 4, "between 0 and 4096"),
    ("entries = 4096", 'sqpoll = "yes"', "ring.sqpoll", 4, 'expected true, false or "auto"'),
    ("entries = 4096", "sq_thread_idle = 10", "ring.sq_thread_idle", 4, "expected a duration"),
    ('name = "web"', 'name = "bad name!"', "listener[0].name", 6, 'invalid name "bad name!"'),
    ('name = "web"', f'name = "{"n" * 65}"', "listener[0].name", 6, "1 to 64"),
    ('name = "web"', "", "listener[0].name", 5, "missing required key"),
    ('listen = "127.0.0.1:8080"', "", "listener[0].listen", 5, "missing required key"),
    ('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1"', "listener[0].listen", 7,
     'invalid address "127.0.0.1": missing port'),
    ('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:70000"', "listener[0].listen", 7,
     'invalid address "127.0.0.1:70000": port 70000 is out of range 1..65535'),
    ('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:0"', "listener[0].listen", 7, "out of range"),
    ('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:http"', "listener[0].listen", 7, "is not a number"),
    ('listen = "127.0.0.1:8080"', 'listen = ":8080"', "listener[0].listen", 7, "empty host"),
    ('listen = "127.0.0.1:8080"', 'listen = "[::1:8080"', "listener[0].listen", 7,
     'invalid address "[::1:8080": unbalanced brackets'),
    ('listen = "127.0.0.1:8080"', 'listen = "::1]:8080"', "listener[0].listen", 7, "unbalanced brackets"),
    ('listen = "127.0.0.1:8080"', 'listen = "::1:8080"', "listener[0].listen", 7, "in brackets"),
    ('listen = "127.0.0.1:8080"', 'listen = "[::1]8080"', "listener[0].listen", 7, 'expected ":PORT"'),
    ('listen = "127.0.0.1:8080"', 'listen = "[web]:8080"', "listener[0].listen", 7, "only for IPv6"),
    ('listen = "127.0.0.1:8080"', 'listen = "no-such-host.invalid:80"', "listener[0].listen", 7,
     'cannot resolve "no-such-host.invalid": '),
    ('listen = "127.0.0.1:8080"', "listen = 8080", "listener[0].listen", 7, "the integer 8080"),
    ('upstream = "app"', 'upstream = "app"\nacces_log = true', "listener[0].acces_log", 9,
     'unknown key (did you mean "access_log"?)'),
    ('upstream = "app"', 'upstream = "app"\nbacklog = 0', "listener[0].backlog", 9, "between 1 and 65535"),
    ('upstream = "app"', 'upstream = "app"\nmax_connections = 1.5', "listener[0].max_connections", 9,
     "expected an integer 1..1000000"),
    ('upstream = "app"', 'upstream = "app"\nconnect_timeout = "0ms"', "listener[0].connect_timeout", 9,
     'must be greater than 0, got "0ms"'),
    ('upstream = "app"', 'upstream = "app"\naccess_log = "yes"', "listener[0].access_log", 9,
     'expected true or false, got the string "yes"'),
    ('servers = ["127.0.0.1:9001", "127.0.0.1:9002"]', "", "upstream.app.servers", 9, "missing required key"),
    ('servers = ["127.0.0.1:9001", "127.0.0.1:9002"]', "servers = []", "upstream.app.servers", 10,
     "at least one server"),
    ('servers = ["127.0.0.1:9001", "127.0.0.1:9002"]', 'servers = "127.0.0.1:9001"', "upstream.app.servers",
     10, "expected a non-empty array"),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001", 5', "upstream.app.servers[1]", 10,
     "expected an address string or a table"),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001", "*:9002"', "upstream.app.servers[1]", 10,
     '"*" is only valid for listen'),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001", "127.0.0.1:9001"', "upstream.app.servers[1]", 10,
     'duplicate server "127.0.0.1:9001" (also servers[0])'),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001",\n  { weight = 2 }', "upstream.app.servers[1].address",
     11, "missing required key"),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001",\n\n  { address = "127.0.0.1:9002", weight = 0 }',
     "upstream.app.servers[1].weight", 12, "between 1 and 256"),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001",\n  {address="127.0.0.1:9002", wieght=2}',
     "upstream.app.servers[1].wieght", 11, 'unknown key (did you mean "weight"?)'),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001", {address="127.0.0.1:9002", backup="no"}',
     "upstream.app.servers[1].backup", 10, "expected true or false"),
    ('"127.0.0.1:9001", "127.0.0.1:9002"', '"127.0.0.1:9001", {address="127.0.0.1:9002", max_connections=-1}',
     "upstream.app.servers[1].max_connections", 10, "between 0 and 1000000"),
    ('"127.0.0.1:9001", "127.0.0.1:9002"',
     '{ address = "127.0.0.1:9001", backup = true },\n { address = "127.0.0.1:9002", backup = true }',
     "upstream.app.servers", 10, "every server is a backup"),
    ("[upstream.app]", '[upstream.app]\nbalance = "roundrobin"', "upstream.app.balance", 10,
     '"round_robin", "least_conn", "hash", "random", got "roundrobin"'),
    ("[upstream.app]", "[upstream.app]\nproxy_protocol = true", "upstream.app.proxy_protocol", 10,
     'expected false, "v1" or "v2", got the boolean true'),
    ("[upstream.app]", '[upstream.app]\nproxy_protocol = "v3"', "upstream.app.proxy_protocol", 10, '"v3"'),
    ("[upstream.app]", "[upstream.app]\nconnect_retries = 17", "upstream.app.connect_retries", 10,
     "between 0 and 16"),
    ("[upstream.app]", "[upstream.app]\nmax_fails = -1", "upstream.app.max_fails", 10, "between 0"),
    ("[upstream.app]", '[upstream.app]\nfail_timeout = "0s"', "upstream.app.fail_timeout", 10, "greater than 0"),
    ("[upstream.app]", "[upstream.app]\nhealth.rise = 0", "upstream.app.health.rise", 10, "between 1 and 100"),
    ("[upstream.app]", "[upstream.app]\nhealth = { fall = 101 }", "upstream.app.health.fall", 10,
     "between 1 and 100"),
    ("[upstream.app]", "[upstream.app]\nhealth = true", "upstream.app.health", 10, "expected a table"),
    ("[upstream.app]", '[upstream.app]\nhealth.send_proxy = "v2"', "upstream.app.health.send_proxy", 10,
     'expected true or false, got the string "v2"'),
    ('upstream = "app"', 'upstream = "app"\nrcvbuf = "1KiB"', "listener[0].rcvbuf", 9,
     'must be 0 (the kernel\'s autotuning) or between 4KiB and 1GiB, got "1KiB"'),
    ('upstream = "app"', 'upstream = "app"\nsndbuf = -4096', "listener[0].sndbuf", 9, "must not be negative"),
    ("[upstream.app]", '[upstream.app]\nrcvbuf = "lots"', "upstream.app.rcvbuf", 10, 'got "lots"'),
    ("[upstream.app]", '[upstream.app]\nsndbuf = "2GiB"', "upstream.app.sndbuf", 10, "between 4KiB and 1GiB"),
    ("[upstream.app]", "[upstream.app]\nsrevers = 1", "upstream.app.srevers", 10, 'did you mean "servers"?'),
]


@pytest.mark.parametrize("old, new, path, line, message", CASES)
def test_single_error(old, new, path, line, message):
    issue = one_issue(edit(old, new))
    assert issue.path == path
    assert issue.line == line
    assert message in issue.message
    assert issue.file == "t.toml"
    assert str(issue) == f"t.toml:{line}: {path}: {issue.message}"


HEALTH_CASES = [
    # (lines appended after "[upstream.app.health]" on line 11, path, line, message)
    ("port = 0", "upstream.app.health.port", 12, "between 1 and 65535"),
    ("port = 65536", "upstream.app.health.port", 12, "between 1 and 65535"),
    ('interval = "0s"', "upstream.app.health.interval", 12, "greater than 0"),
    ("timeout = 1", "upstream.app.health.timeout", 12, "expected a duration"),
    ('rise = "2"', "upstream.app.health.rise", 12, 'got the string "2"'),
    ('expect = "A"\nexpect_regex = "A"', "upstream.app.health.expect_regex", 13, "not both"),
    ('expect_regex = "(unclosed"', "upstream.app.health.expect_regex", 12, "invalid regular expression"),
    ("send = 5", "upstream.app.health.send", 12, "expected a string"),
    ('expect = ""', "upstream.app.health.expect", 12, "must not be empty"),
    ('# a comment\nsend = """\nmulti\n[line]\n"""\nexpct = "x"', "upstream.app.health.expct", 17,
     'did you mean "expect"?'),
]


@pytest.mark.parametrize("lines, path, line, message", HEALTH_CASES)
def test_health_errors(lines, path, line, message):
    issue = one_issue(BASE + "[upstream.app.health]\n" + lines + "\n")
    assert (issue.path, issue.line) == (path, line)
    assert message in issue.message


def test_missing_upstream_and_unused_upstream():
    issues = issues_of(edit('upstream = "app"', 'upstream = "ap"'))
    assert [(i.path, i.line) for i in issues] == [("listener[0].upstream", 8), ("upstream.app", 9)]
    assert issues[0].message == 'no upstream named "ap" (did you mean "app"?)'
    assert issues[1].message == "not used by any listener"


def test_unused_upstream():
    issue = one_issue(BASE + '\n[upstream.other]\nservers = ["127.0.0.1:1"]\n')
    assert (issue.path, issue.line, issue.message) == ("upstream.other", 12, "not used by any listener")


def test_duplicate_listener_name_and_address():
    second = '[[listener]]\nname = "web"\nlisten = "127.0.0.1:8080"\nupstream = "app"\n'
    issues = issues_of(BASE + second)
    assert [(i.path, i.line) for i in issues] == [("listener[1].name", 12), ("listener[1].listen", 13)]
    assert issues[0].message == 'duplicate listener name "web" (also listener[0])'
    assert issues[1].message == "127.0.0.1:8080 is already used by listener[0]"


def test_misspelled_required_key_reports_both():
    issues = issues_of(edit('listen = "127.0.0.1:8080"', 'lisen = "127.0.0.1:8080"'))
    assert [(i.path, i.line, i.message) for i in issues] == [
        ("listener[0].listen", 5, "missing required key"),
        ("listener[0].lisen", 7, 'unknown key (did you mean "listen"?)'),
    ]


def test_second_listener_line_numbers():
    text = BASE + '[[listener]]\nname = "api"\nupstream = "app"\n'
    issue = one_issue(text)
    assert (issue.path, issue.line, issue.message) == ("listener[1].listen", 11, "missing required key")


def test_admin_errors():
    issue = one_issue(BASE + "[admin]\nlisten = \"127.0.0.1\"\n")
    assert (issue.path, issue.line) == ("admin.listen", 12)
    assert 'invalid address "127.0.0.1": missing port' in issue.message
    issue = one_issue(BASE + "[admin]\nlisten = \"*:8080\"\n")
    assert (issue.path, issue.line) == ("admin.listen", 12)
    assert 'overlaps listener "web"' in issue.message
    issue = one_issue(BASE + "[admin]\nport = 9100\n")
    assert (issue.path, issue.message) == ("admin.port", "unknown key")


def test_structure_errors():
    issue = one_issue(edit("[[listener]]", "[listener]"))
    assert (issue.path, issue.line) == ("listener", 5)
    assert issue.message == "expected an array of tables ([[listener]]), got a table"

    issue = one_issue(edit("[upstream.app]", "[[upstream.app]]"))
    assert (issue.path, issue.line) == ("upstream.app", 9)
    assert issue.message.startswith("expected a table ([upstream.app]), got an array")

    issues = issues_of('ringd = 5\nring = []\nlistener = 3\n[upstream.app]\nservers = ["127.0.0.1:1"]\n')
    assert [(i.path, i.line) for i in issues] == [("ringd", 1), ("ring", 2), ("listener", 3)]

    issue = one_issue(edit("[ringd]", "[listeners]\n[ringd]"))
    assert (issue.path, issue.line, issue.message) == (
        "listeners", 1, 'unknown key (did you mean "listener"?)',
    )

    issue = one_issue('[upstream.app]\nservers = ["127.0.0.1:1"]\n')
    assert (issue.path, issue.line, issue.message) == ("listener", None, "at least one [[listener]] is required")
    assert str(issue) == "t.toml: listener: at least one [[listener]] is required"

    issue = one_issue(BASE + '[upstream."bad name"]\nservers = ["127.0.0.1:1"]\n')
    assert (issue.path, issue.line) == ('upstream."bad name"', 11)


def test_listener_without_name_listen_upstream_reports_each():
    issues = issues_of(BASE + "[[listener]]\n")
    assert [(i.path, i.line) for i in issues] == [
        ("listener[1].name", 11), ("listener[1].listen", 11), ("listener[1].upstream", 11),
    ]


def test_listener_array_element_not_a_table():
    issue = one_issue(
        'listener = [1]\n[upstream.app]\nservers = ["127.0.0.1:1"]\n'
    )
    assert (issue.path, issue.line, issue.message) == ("listener[0]", 1, "expected a table, got the integer 1")


def test_multiple_errors_are_all_reported_in_line_order():
    text = edit("workers = 2", "workers = 0")
    text = edit("entries = 4096", "entries = 3", text)
    text = edit('listen = "127.0.0.1:8080"', 'listen = "127.0.0.1:99999"', text)
    text = edit('"127.0.0.1:9002"]', '{ address = "127.0.0.1:9002", weight = 300 }]', text)
    text += "[upstream.app.health]\nfall = 0\nbogus = 1\n"
    with pytest.raises(cfg.ConfigError) as info:
        cfg.loads(text, "m.toml")
    got = [(i.path, i.line) for i in info.value.errors]
    assert got == [
        ("ringd.workers", 2),
        ("ring.entries", 4),
        ("listener[0].listen", 7),
        ("upstream.app.servers[1].weight", 10),
        ("upstream.app.health.fall", 12),
        ("upstream.app.health.bogus", 13),
    ]
    lines = str(info.value).splitlines()
    assert len(lines) == 6
    assert lines[0] == "m.toml:2: ringd.workers: must be between 1 and 1024, got 0"


def test_quoted_and_dotted_keys_get_lines():
    text = edit("[upstream.app]", "[ \"upstream\" . 'app' ]  # quoted header keys")
    text += '"connect_retries" = 99\nhealth . "fall" = 0\n'
    issues = issues_of(text)
    assert [(i.path, i.line) for i in issues] == [
        ("upstream.app.connect_retries", 11),
        ("upstream.app.health.fall", 12),
    ]


def test_multiline_strings_and_comments_do_not_shift_lines():
    text = edit(
        "[upstream.app]",
        "[upstream.app]\n"
        "# [not.a.table] servers = 1\n"
        'balance = """\nx = 1\n[[fake]]\n"""  # ] ,\n'
        "connect_retries = '''\n'''\n",
    )
    issues = issues_of(text)
    assert [(i.path, i.line) for i in issues] == [
        ("upstream.app.balance", 11),
        ("upstream.app.connect_retries", 15),
    ]

# --------------------------------------------------------------------------- syntax and files


def test_toml_syntax_error_has_line():
    issue = one_issue("[ringd]\nworkers = 2\nlog_level = ?\n")
    assert (issue.path, issue.line) == ("", 3)
    assert issue.message.startswith("TOML syntax error: invalid value")
    assert "(at line" not in issue.message
    assert str(issue).startswith("t.toml:3: TOML syntax error: ")


def test_toml_duplicate_table_message_is_cleaned():
    issue = one_issue("[upstream.app]\na = 1\n[upstream.app]\n")
    assert issue.line == 3
    assert 'cannot declare "upstream.app" twice' in issue.message


def test_toml_error_at_end_of_document():
    issue = one_issue('[ringd]\nworkers = [1,\n2\n')
    assert issue.line == 3
    assert "unclosed array" in issue.message


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(missing)
    [issue] = info.value.errors
    assert (issue.path, issue.line, issue.file) == ("", None, str(missing))
    assert issue.message == "cannot read config file: No such file or directory"
    assert str(info.value) == f"{missing}: cannot read config file: No such file or directory"


def test_load_directory_and_bad_utf8(tmp_path):
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(tmp_path)
    assert "cannot read config file" in info.value.errors[0].message
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[ringd]\nlog_file = \"\xff\"\n")
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(str(bad))
    assert (info.value.errors[0].line, info.value.errors[0].message) == (2, "not valid UTF-8 (byte 0xff)")


def test_load_reads_file(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(BASE)
    assert cfg.load(path).file == str(path)


# --------------------------------------------------------------------------- never a traceback

ODD_VALUES = ["[1, \"a\"]", "{ x = 1 }", "1", "-5", "0", "1.5", "nan", "inf", "true", '"x"', '""',
              "1979-05-27", "1979-05-27T07:32:00Z", '"*:0"', '"[::1]"', "[]", "{}", "[[]]", '"\\u0000"']


def _assert_only_config_error(text: str) -> None:
    try:
        cfg.loads(text, "f.toml")
    except cfg.ConfigError as exc:
        assert exc.errors
        for issue in exc.errors:
            assert isinstance(issue, cfg.ConfigIssue)
            assert "internal error" not in issue.message, f"{issue}\n--- input:\n{text}"
            assert issue.line is None or issue.line >= 1


def test_never_a_traceback_for_odd_values():
    example = (ROOT / "conf" / "ringd.toml").read_text()
    example = re.sub(r"^# (user|group|port|expect_regex|log_file) =", r"\1 =", example, flags=re.M)
    example = example.replace('expect = "+PONG"\n', "")
    cfg.loads(example.replace('user = "ringd"', 'user = "root"').replace('group = "ringd"', 'group = "root"'))
    key_lines = [m for m in re.finditer(r"^(\w+) = (.*)$", example, flags=re.M)]
    assert len(key_lines) > 40
    for match in key_lines:
        for odd in ODD_VALUES:
            text = example[: match.start(2)] + odd + example[match.end(2):]
            _assert_only_config_error(text)


def test_never_a_traceback_for_odd_structure():
    samples = [
        "", "\n", "x", "[", "[[", "]]", "=", "a =", "listener = 1", "upstream = 1", "upstream = []",
        "upstream = { a = 1 }", "upstream = { a = { servers = 1 } }", "[upstream.a.servers]",
        "[[upstream.a.servers]]", "[[upstream]]", "[[ringd]]", "[[admin]]", "admin = 5",
        "[upstream.a]\nservers = [[1]]", "[upstream.a]\nservers = [{}]", "[upstream.a]\nservers = [{address = 1}]",
        "[upstream.a]\nservers = [\"\"]", "[upstream.a]\nservers = [\"[\"]", "[upstream.a]\nservers = [\"]:1\"]",
        "[upstream.a]\nservers = [\"[]:1\"]", "[upstream.a]\nservers = [\"[::1%lo]:1\"]",
        "[upstream.a]\nservers = [\"a:b:c\"]", "[upstream.a]\nservers = [\"host:+1\"]",
        "[upstream.a]\nservers = [\"host:١٢\"]", "[upstream.a]\nservers = [\"" + "a" * 300 + ":1\"]",
        "[upstream.a]\nservers = [\"" + "a." * 70 + ":1\"]", "[upstream.a]\nservers = [\"a\\u0000b:1\"]",
        "[upstream.a]\nhealth = []", "[upstream.a]\nhealth = [{}]", "[[upstream.a.health]]",
        "[upstream.a.health]\nexpect_regex = \"a{99999999999}\"", "[upstream.a.health]\nexpect_regex = \"(?P<\"",
        "[[listener]]\n[[listener]]\n[[listener.x]]", "[[listener]]\nname = []\nlisten = {}\nupstream = 1",
        "[[listener]]\nlisten = \"*:1\"\n[[listener]]\nlisten = \"0.0.0.0:1\"",
        "[ringd]\nuser = \"a\\u0000\"", "[ringd]\ncontrol_socket = \"\\ud7ff\"", "[ringd]\npidfile = \"a\\u0000\"",
        "a = " + "[" * 2000 + "]" * 2000, "a = " + "[" * 100000,
        "'''", '"""', "[a.'b'.\"c\"]\n[a.b.c]", "x = 1\n[x]",
        "[ringd]\nworkers = 99999999999999999999999999", "[ring]\npipe_size = \"99999999999999999999999GiB\"",
        "[ring]\nsplice_threshold = \"9" * 1 + "9" * 400 + "\"",
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"a\"\n[upstream.a]\nservers = [\"127.0.0.1:2\"]\n"
        "[upstream.a.health]\nport = 1\n[upstream.b]\n",
    ]
    for text in samples:
        _assert_only_config_error(text)
    # Random damage to a valid file: delete or duplicate a few characters.
    rng = random.Random(1234)
    example = (ROOT / "conf" / "ringd.toml").read_text()
    for _ in range(300):
        text = example
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text))
            if rng.random() < 0.5:
                text = text[:i] + text[i + rng.randint(1, 5):]
            else:
                text = text[:i] + rng.choice('[]{}"=,.\n#\'') + text[i:]
        _assert_only_config_error(text)


def test_bytes_input_and_error_object():
    config = cfg.loads(BASE.encode())
    assert config.ringd.workers == 2
    error = cfg.ConfigError([cfg.ConfigIssue("a.b", 3, "bad", "f.toml"), cfg.ConfigIssue("c", None, "worse", "f.toml")])
    assert str(error) == "f.toml:3: a.b: bad\nf.toml: c: worse"
    assert len(error.errors) == 2


def test_load_refuses_devices_pipes_and_huge_files(tmp_path):
    """`ringd check -c /dev/zero` once read until the OOM killer came."""
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load("/dev/zero")
    assert str(info.value) == ("/dev/zero: cannot read config file: it is a character device, "
                               "not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(cfg.ConfigError) as info:       # no writer: must not block in open()
        cfg.load(fifo)
    assert "it is a pipe (FIFO), not a regular file" in str(info.value)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(tmp_path)
    assert "it is a directory" in str(info.value)
    big = tmp_path / "big.toml"
    big.write_bytes(BASE.encode() + b"#" * cfg.MAX_CONFIG_BYTES)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(big)
    assert str(info.value) == f"{big}: cannot read config file: larger than 4MiB (is this the right file?)"
    exact = tmp_path / "exact.toml"
    exact.write_bytes(BASE.encode() + b"#" * (cfg.MAX_CONFIG_BYTES - len(BASE)))
    assert cfg.load(exact).ringd.workers == 2


def test_pidfile_control_socket_and_log_file_must_differ():
    text = edit("workers = 2\n", 'workers = 2\npidfile = "/run/x/ringd"\ncontrol_socket = "/run/x/ringd"\n')
    issue = one_issue(text)
    assert str(issue) == ('t.toml:4: ringd.control_socket: "/run/x/ringd" is also ringd.pidfile '
                          '(line 3); they must be different files')
    # written the other way round, and through a relative path that names the same file
    cwd = os.getcwd()
    text = edit("workers = 2\n", f'workers = 2\ncontrol_socket = "{cwd}/r.sock"\n'
                                 'log_file = "./r.sock"\n')
    assert str(one_issue(text)) == ('t.toml:4: ringd.log_file: "./r.sock" is also '
                                    'ringd.control_socket (line 3); they must be different files')
    # against a default
    text = edit("workers = 2\n", 'workers = 2\npidfile = "/run/ringd/ringd.sock"\n')
    assert str(one_issue(text)) == ('t.toml:3: ringd.pidfile: "/run/ringd/ringd.sock" is also '
                                    'ringd.control_socket (its default); they must be different files')


def test_where_names_file_line_and_key_for_later_errors():
    config = cfg.loads(BASE + '[[listener]]\nname = "b"\nlisten = "127.0.0.1:8081"\nupstream = "app"\n',
                       "t.toml")
    assert config.where("listener", 0, "listen") == "t.toml:7: listener[0].listen"
    assert config.where("listener", 1, "listen") == "t.toml:13: listener[1].listen"
    assert config.where("listener", 1, "backlog") == "t.toml:11: listener[1].backlog"   # its table
    assert config.where("admin", "listen") == "t.toml: admin.listen"                   # not written
