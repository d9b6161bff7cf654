"""The `ringd` command: start, check, reload, stop, status."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

DEFAULT_CONFIG = "/etc/ringd/ringd.toml"
DEFAULT_PIDFILE = "/run/ringd/ringd.pid"
DEFAULT_SOCKET = "/run/ringd/ringd.sock"


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="ringd", description="TCP reverse proxy on io_uring")
    p.add_argument("--version", action="version", version=f"ringd {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    def common(sp, config_required=False):
        sp.add_argument("-c", "--config", default=None if not config_required else DEFAULT_CONFIG,
                        help=f"configuration file (default {DEFAULT_CONFIG})")
        sp.add_argument("-p", "--pidfile", help="pidfile of the running master")
        sp.add_argument("-s", "--socket", help="control socket of the running master")

    sp = sub.add_parser("start", help="run in the foreground")
    sp.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    sp.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
    sp = sub.add_parser("check", help="validate a configuration file")
    sp.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    sp = sub.add_parser("reload", help="reload the configuration (like SIGHUP), report the outcome")
    common(sp)
    sp = sub.add_parser("stop", help="graceful stop (drain), or --now")
    common(sp)
    sp.add_argument("--now", action="store_true", help="close everything at once (SIGTERM)")
    sp.add_argument("--no-wait", action="store_true", help="do not wait for the master to exit")
    sp = sub.add_parser("server", help="runtime state of a server: drain, maint, ready, weight N")
    common(sp)
    sp.add_argument("target", metavar="UPSTREAM/SERVER",
                    help='e.g. app/10.0.0.11:8080 (the server as written in the file)')
    sp.add_argument("action", choices=["drain", "maint", "ready", "weight"])
    sp.add_argument("weight", nargs="?", type=int, help="for weight: 0..256")
    sp = sub.add_parser("status", help="show the master, workers and servers")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _err(msg: str) -> None:
    print(f"ringd: {msg}", file=sys.stderr)


def _peek(path: str | None) -> dict:
    """[ringd] of a config file without validating it: the CLI only needs to
    know where the running master is, even if the file is now broken."""
    from .config import ConfigError, read_file
    if not path:
        path = DEFAULT_CONFIG
    try:
        raw = read_file(path)
    except ConfigError:
        return {}
    try:
        import tomllib
        section = tomllib.loads(raw.decode("utf-8", "replace")).get("ringd", {})
        return section if isinstance(section, dict) else {}
    except Exception:
        pass
    # unparsable now (that may be why we are reloading): pick the two keys
    # we need line by line
    import re
    found = {}
    for line in raw.decode("utf-8", "replace").splitlines():
        m = re.match(r'\s*(pidfile|control_socket|drain_timeout)\s*=\s*"([^"]*)"', line)
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2)
    return found


def _locate(args) -> tuple[str, str]:
    peek = _peek(args.config)
    sock = args.socket or peek.get("control_socket") or DEFAULT_SOCKET
    pid = args.pidfile or peek.get("pidfile") or DEFAULT_PIDFILE
    return str(sock), str(pid)


def _load(path: str):
    """The parsed config, or None after printing one line per error."""
    from .config import ConfigError, load
    try:
        return load(path)
    except ConfigError as e:
        for issue in e.errors:
            print(str(issue), file=sys.stderr)
        return None


def cmd_check(args) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    print(f"{args.config}: ok ({len(cfg.listeners)} listeners, {len(cfg.upstreams)} upstreams, "
          f"{cfg.ringd.workers} workers)")
    return 0


def cmd_start(args) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return 1
    from . import log
    try:
        log.configure(cfg.ringd.log_format, cfg.ringd.log_level, cfg.ringd.log_file)
    except OSError as e:
        _err(f"ringd.log_file: cannot open {cfg.ringd.log_file}: {e.strerror}")
        return 1
    try:
        from . import native  # noqa: F401  (fails clearly if the extension is missing)
    except ImportError as e:
        _err(f"the native extension is missing or broken ({e}); reinstall ringd")
        return 1
    from . import master
    test_hooks = args.test_hooks or os.environ.get("RINGD_TEST_HOOKS") == "1"
    return master.run(os.path.abspath(args.config), cfg, test_hooks=test_hooks)


def cmd_reload(args) -> int:
    from .control import ControlClientError, request
    sock, pidpath = _locate(args)
    try:
        reply = request(sock, {"cmd": "reload"}, timeout=120)
    except ControlClientError as e:
        # no control socket: fall back to the signal, outcome unknown
        from . import pidfile
        try:
            pid = pidfile.running(pidpath)
        except pidfile.PidfileError as pe:
            _err(f"{e}; and {pe}")
            return 1
        if pid is None:
            _err(f"{e}; and no running master in pidfile {pidpath}")
            return 1
        os.kill(pid, signal.SIGHUP)
        print(f"sent SIGHUP to {pid}; outcome unknown ({e}); see the log")
        return 0
    if reply.get("ok"):
        print(f"reload ok: {reply.get('message', '')}")
        return 0
    _err(f"reload rejected: {reply.get('error', 'unknown reason')}")
    return 1


def cmd_stop(args) -> int:
    from . import pidfile
    sock, pidpath = _locate(args)
    try:
        pid = pidfile.running(pidpath)
    except pidfile.PidfileError as e:
        _err(str(e))
        return 1
    if pid is None:
        _err(f"ringd is not running (no master holds pidfile {pidpath})")
        return 1
    os.kill(pid, signal.SIGTERM if args.now else signal.SIGQUIT)
    if args.no_wait:
        print(f"sent {'SIGTERM' if args.now else 'SIGQUIT'} to {pid}")
        return 0
    drain = _peek(args.config).get("drain_timeout", "30s")
    from .config import _parse_duration
    try:
        limit = (_parse_duration(str(drain)) or 30.0) + 15.0
    except Exception:
        limit = 45.0
    wait = 10.0 if args.now else limit
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not pidfile.alive(pid):
            print(f"ringd (pid {pid}) stopped")
            return 0
        time.sleep(0.05)
    _err(f"ringd (pid {pid}) still running after {wait:.0f}s")
    return 1


def _table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[("-" if v is None else str(v)) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cols)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ask(args, payload: dict, timeout: float = 10) -> dict | None:
    """One request to the running master; None after printing why it failed."""
    from .control import ControlClientError, request
    sock, _ = _locate(args)
    try:
        reply = request(sock, payload, timeout=timeout)
    except ControlClientError as e:
        _err(str(e))
        return None
    if not reply.get("ok"):
        _err(reply.get("error", f"{payload.get('cmd')} failed"))
        return None
    return reply


def cmd_status(args) -> int:
    reply = _ask(args, {"cmd": "status"})
    if reply is None:
        return 1
    st = reply["status"]
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"master pid {st['pid']}  generation {st['generation']}  config {st['config']}")
    print(f"uptime {st['uptime']:.0f}s  reloads ok {st['reloads_ok']} rejected "
          f"{st['reloads_rejected']}  worker restarts {st['worker_restarts']}")
    print()
    rows = [[w["slot"], w["pid"], w["cpu"], w["generation"], w["state"], w["ring"], w["active"],
             w["accepted"], _bytes(w["bytes_c2s"]), _bytes(w["bytes_s2c"])]
            for w in st["workers"]]
    print(_table(rows, ["WORKER", "PID", "CPU", "GEN", "STATE", "RING", "ACTIVE", "ACCEPTED",
                        "BYTES IN", "BYTES OUT"]))
    if st.get("servers"):
        print()
        rows = [[f"{s['upstream']}/{s['server']}", s["state"], s.get("admin"), s.get("weight"),
                 s["active"], s["connections"], s["failures"], s.get("last_check", "")]
                for s in st["servers"]]
        print(_table(rows, ["SERVER", "STATE", "ADMIN", "WEIGHT", "ACTIVE", "CONNS", "FAILS",
                            "LAST CHECK"]))
    return 0


def cmd_server(args) -> int:
    if args.action == "weight" and args.weight is None:
        _err("weight needs a value: ringd server UPSTREAM/SERVER weight N")
        return 2
    reply = _ask(args, {"cmd": "server", "server": args.target, "action": args.action,
                        "weight": args.weight})
    if reply is None:
        return 1
    s = reply["server"]
    print(f"{s['upstream']}/{s['server']}: state {s['state']} (admin {s['admin']}, "
          f"health {s['health']}, weight {s['weight'] if s['weight'] is not None else 'config'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbs = {"start": cmd_start, "check": cmd_check, "reload": cmd_reload, "stop": cmd_stop,
             "status": cmd_status, "server": cmd_server}
    try:
        return verbs[args.verb](args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
