"""`ringd check` and `ringd start` on broken files: one clear line per error
naming the key (and the line), a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from harness import free_port

RINGD = [sys.executable, "-m", "ringd"]


def _good(port: int) -> str:
    return textwrap.dedent(f"""\
        [ringd]
        workers = 1
        pidfile = "/tmp/ringd-cli-test.pid"
        control_socket = "/tmp/ringd-cli-test.sock"

        [[listener]]
        name = "web"
        listen = "127.0.0.1:{port}"
        upstream = "app"

        [upstream.app]
        servers = ["127.0.0.1:9"]
        """)


BROKEN = [
    # (edit of the good file, text the error must contain)
    (lambda t: t.replace('workers = 1', 'workers = "many"'), "ringd.workers"),
    (lambda t: t.replace('workers = 1', 'workers = 1\nbogus = 2'), "ringd.bogus: unknown key"),
    (lambda t: t.replace('listen = "127.0.0.1:', 'listen = "127.0.0.1:99999'), "listener[0].listen"),
    (lambda t: t.replace('upstream = "app"', 'upstream = "nope"'), "listener[0].upstream"),
    (lambda t: t.replace('["127.0.0.1:9"]', '["no-such-host.invalid:80"]'), "upstream.app.servers[0]"),
    (lambda t: t + "\n[upstream.unused]\nservers = [\"127.0.0.1:1\"]\n", "upstream.unused"),
    (lambda t: t.replace('[[listener]]', '[[listener]'), "TOML syntax error"),
    (lambda t: t.replace('servers = ["127.0.0.1:9"]',
                         'servers = [{ address = "127.0.0.1:9", weight = 0 }]'),
     "upstream.app.servers[0].weight"),
    (lambda t: t.replace('ringd-cli-test.sock', 'ringd-cli-test.pid'),
     'ringd.control_socket: "/tmp/ringd-cli-test.pid" is also ringd.pidfile (line 3)'),
]


@pytest.mark.parametrize("verb", ["check", "start"])
@pytest.mark.parametrize("case", range(len(BROKEN)))
def test_broken_files_give_one_clear_line(tmp_path, verb, case):
    edit, want = BROKEN[case]
    conf = tmp_path / "ringd.toml"
    conf.write_text(edit(_good(free_port())))
    res = subprocess.run(RINGD + [verb, "-c", str(conf)], capture_output=True, text=True,
                         timeout=30)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert want in out, out
    assert "Traceback" not in out
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith(str(conf)) for ln in lines), lines
    assert all(":" in ln.split(str(conf), 1)[1][:8] for ln in lines)   # file:line:


def test_missing_file_and_port_in_use(tmp_path):
    res = subprocess.run(RINGD + ["check", "-c", str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "nope.toml" in res.stderr and "Traceback" not in res.stderr
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        conf = tmp_path / "ringd.toml"
        conf.write_text(_good(busy.getsockname()[1]).replace(
            "/tmp/ringd-cli-test", str(tmp_path / "r")))
        res = subprocess.run(RINGD + ["start", "-c", str(conf)], capture_output=True,
                             text=True, timeout=30)
        out = res.stdout + res.stderr
        assert res.returncode == 1, out
        assert "listener[0].listen" in out and "Address already in use" in out
        n = conf.read_text().splitlines().index(f'listen = "127.0.0.1:{busy.getsockname()[1]}"') + 1
        assert f"{conf}:{n}: listener[0].listen: cannot listen on" in out, out
        assert "Traceback" not in out
        # the admin endpoint's port too
        conf.write_text(_good(free_port()).replace("/tmp/ringd-cli-test", str(tmp_path / "r"))
                        + f'\n[admin]\nlisten = "127.0.0.1:{busy.getsockname()[1]}"\n')
        res = subprocess.run(RINGD + ["start", "-c", str(conf)], capture_output=True,
                             text=True, timeout=30)
        out = res.stdout + res.stderr
        n = len(conf.read_text().splitlines())
        assert res.returncode == 1, out
        assert f"{conf}:{n}: admin.listen: cannot listen on" in out, out
    finally:
        busy.close()


def _limited_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


@pytest.mark.parametrize("verb", ["check", "start", "reload", "stop"])
def test_config_from_a_device_is_refused_not_read_forever(tmp_path, verb):
    """`ringd check -c /dev/zero` once grew to 24 GB before the OOM killer came."""
    where = [] if verb in ("check", "start") else ["-s", str(tmp_path / "no.sock"),
                                                   "-p", str(tmp_path / "no.pid")]
    res = subprocess.run(RINGD + [verb, "-c", "/dev/zero"] + where, capture_output=True,
                         text=True, timeout=30, preexec_fn=_limited_memory)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "MemoryError" not in res.stderr, res.stderr[-2000:]
    if verb in ("check", "start"):
        assert res.stderr.strip() == ("/dev/zero: cannot read config file: it is a character "
                                      "device, not a regular file")


def test_pidfile_lock_survives_exec_through_adopt(tmp_path):
    """The lock fd can be passed across an exec (a master re-executing itself)
    and adopted there; a second acquire is refused while it is held."""
    from ringd import pidfile
    path = str(tmp_path / "run" / "ringd.pid")
    held = pidfile.Pidfile.acquire(path)
    assert pidfile.running(path) == os.getpid()
    with pytest.raises(pidfile.PidfileError, match="already running"):
        pidfile.Pidfile.acquire(path)
    fd = held.keep_across_exec()
    code = ("import sys, time; from ringd import pidfile; "
            "p = pidfile.Pidfile.adopt(sys.argv[1], int(sys.argv[2])); "
            "print('adopted', flush=True); sys.stdin.read(); p.release()")
    child = subprocess.Popen([sys.executable, "-c", code, path, str(fd)], pass_fds=[fd],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "adopted"
        os.close(fd)                   # only the exec'd image holds it now
        assert pidfile.running(path) == child.pid
        child.stdin.close()
        child.wait(10)
        assert pidfile.running(path) is None and not os.path.exists(path)
    finally:
        child.kill()
    # symlinks are refused (a root master must not truncate what one points at)
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(pidfile.PidfileError, match="symbolic link"):
        pidfile.Pidfile.acquire(path)
