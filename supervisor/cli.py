"""The `ringd` command: start, check, reload, upgrade, stop, drain, ready, status, server."""
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
UPGRADE_WAIT = 120.0    # check (30 s at most) + exec + new workers ready (15 s at most) + margin


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import MAX_WEIGHT
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
    sp = sub.add_parser("upgrade", help="re-execute the master in place (like SIGUSR2): the "
                                        "installed program takes over, no connection dropped")
    common(sp)
    sp.add_argument("--timeout", metavar="SECONDS", type=float, default=UPGRADE_WAIT,
                    help=f"give up waiting for the outcome after this long (default "
                         f"{UPGRADE_WAIT:.0f})")
    sp = sub.add_parser("upgrade-check")        # run by the master before it execs: hidden
    sp.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    sp = sub.add_parser("stop", help="graceful stop (drain), or --now")
    common(sp)
    sp.add_argument("--now", action="store_true", help="close everything at once (SIGTERM)")
    sp.add_argument("--no-wait", action="store_true", help="do not wait for the master to exit")
    sp = sub.add_parser("server", help="runtime state of a server: drain, maint, ready, weight N")
    common(sp)
    sp.add_argument("target", metavar="UPSTREAM/SERVER",
                    help='e.g. app/10.0.0.11:8080 (the server as written in the file)')
    sp.add_argument("action", choices=["drain", "maint", "ready", "weight"])
    sp.add_argument("weight", nargs="?", type=int, help=f"for weight: 0..{MAX_WEIGHT}")
    sp = sub.add_parser("drain", help="lame duck: /healthz 503 now, keep accepting for --after, "
                                      "then stop accepting, drain and exit")
    common(sp)
    sp.add_argument("--after", metavar="DURATION",
                    help='keep accepting this long, e.g. "10s" (default ringd.drain_after); '
                         'a second drain with a shorter --after brings the stop forward')
    sp.add_argument("--no-wait", action="store_true",
                    help="return at once instead of waiting for ringd to exit")
    sp = sub.add_parser("ready", help="cancel a drain that still accepts: /healthz 200 again")
    common(sp)
    sp = sub.add_parser("status", help="show the master, workers and servers")
    common(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _err(msg: str) -> None:
    print(f"ringd: {msg}", file=sys.stderr)


class CliError(Exception):
    """One line for the user, exit status 1."""


def _peek(path: str | None) -> dict:
    """[ringd] of a config file without validating it: the CLI only needs to
    know where the running master is, even if the file is now broken."""
    return _peek_file(path or DEFAULT_CONFIG)[0]


def _peek_file(path: str) -> tuple[dict, str | None]:
    """([ringd] keys, None), or ({}, why the file cannot be read)."""
    from .config import ConfigError, read_file
    try:
        raw = read_file(path)
    except ConfigError as e:
        return {}, str(e)
    try:
        import tomllib
        section = tomllib.loads(raw.decode("utf-8", "replace")).get("ringd", {})
        return (section if isinstance(section, dict) else {}), None
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
    return found, None


def _locate(args) -> tuple[str, str, dict]:
    """(control socket, pidfile, origin) of the running master: -s/-p, else
    ringd.control_socket/ringd.pidfile of the -c file, else the defaults.
    `origin` holds what _origin() needs to say which defaults were used and
    why, so that nobody is told "ringd is not running" about a path they
    never chose."""
    path = args.config or DEFAULT_CONFIG
    peek, problem = _peek_file(path)
    if problem and args.config and not (args.socket or args.pidfile):
        # an explicit file we cannot read says nothing about where its master
        # is; guessing the default master could act on another ringd
        raise CliError(f"{problem} (it tells where the running master is; "
                       "or give -s SOCKET / -p PIDFILE)")
    sock = args.socket or peek.get("control_socket")
    pid = args.pidfile or peek.get("pidfile")
    origin = {"path": path, "problem": problem, "given": bool(args.config),
              "defaults": [k for k, v in (("control_socket", sock), ("pidfile", pid)) if not v]}
    return str(sock or DEFAULT_SOCKET), str(pid or DEFAULT_PIDFILE), origin


def _origin(origin: dict, *keys: str) -> str:
    """' (the default: FILE sets no ringd.KEY)' for the `keys` that were defaults."""
    keys = tuple(k for k in keys if k in origin["defaults"])
    if not keys:
        return ""
    path, problem = origin["path"], origin["problem"]
    if problem:
        why = f"{path} cannot be read: {problem.rsplit(': ', 1)[-1]}"
    elif len(keys) == 1:
        why = f"{path} sets no ringd.{keys[0]}"
    else:
        why = f"{path} sets neither ringd.{keys[0]} nor ringd.{keys[1]}"
    if not origin["given"]:
        why = f"no -c given, and {why}"
    return f" (the default{'s' if len(keys) > 1 else ''}: {why})"


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
    state = os.environ.pop("RINGD_UPGRADE_STATE", None)
    if state is not None:
        # this process is a master that ringd upgrade re-executed in place
        from .upgrade import resume_main
        return resume_main(state, args.test_hooks or os.environ.get("RINGD_TEST_HOOKS") == "1")
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



def _signal_target(e: Exception, pidpath: str, note: str) -> int:
    """The master to signal when its control socket did not answer (`e`):
    the pid holding the pidfile, or a CliError saying why there is none."""
    from . import pidfile
    try:
        pid = pidfile.running(pidpath)
    except pidfile.PidfileError as pe:
        raise CliError(f"{e}; and {pe}{note}") from None
    if pid is None:
        raise CliError(f"{e}; and no running master holds pidfile {pidpath}{note}")
    return pid

def cmd_reload(args) -> int:
    """The running master re-reads the file it was started with, as nginx -s
    reload and HAProxy's master do. A -c naming another file is refused (by
    the master, which knows its file): 'reload ok' always means that file
    was loaded."""
    from .control import ControlClientError, request, same_file
    sock, pidpath, origin = _locate(args)
    note = _origin(origin, "control_socket", "pidfile")
    req = {"cmd": "reload"}
    if args.config:
        req["config"] = os.path.abspath(args.config)
    try:
        reply = request(sock, req, timeout=120)
    except ControlClientError as e:
        # no control socket: fall back to the signal, outcome unknown
        pid = _signal_target(e, pidpath, note)
        running_file = _master_config(pid)
        if args.config and running_file and not same_file(args.config, running_file):
            raise CliError(f"reload rejected: the master (pid {pid}) runs {running_file}, not "
                           f"{args.config}; a reload re-reads {running_file}")
        os.kill(pid, signal.SIGHUP)
        print(f"sent SIGHUP to {pid}, which re-reads {running_file or 'its own file'}; "
              f"outcome unknown ({e}); see the log")
        return 0
    if reply.get("ok"):
        print(f"reload ok: {reply.get('message', '')}")
        return 0
    _err(f"reload rejected: {reply.get('error', 'unknown reason')}")
    return 1


def cmd_upgrade(args) -> int:
    """Ask the master to re-execute itself in place and wait for the outcome.
    The control connection closes with the exec, so the outcome comes from
    status: the attempt's state once the new image has its generation
    running (ok), or kept the adopted one (failed), or it was refused."""
    from .control import ControlClientError, request
    sock, pidpath, origin = _locate(args)
    note = _origin(origin, "control_socket", "pidfile")
    req = {"cmd": "upgrade"}
    if args.config:
        req["config"] = os.path.abspath(args.config)
    deadline = time.monotonic() + args.timeout
    try:
        reply = request(sock, req, timeout=args.timeout)
    except ControlClientError as e:
        if "garbled" in str(e) or "no answer" in str(e):
            raise CliError(f"upgrade: {e}; see ringd status and the log") from None
        pid = _signal_target(e, pidpath, note)
        os.kill(pid, signal.SIGUSR2)
        print(f"sent SIGUSR2 to {pid}; outcome unknown ({e}); see the log")
        return 0
    if not reply.get("ok"):
        _err(f"upgrade refused: {reply.get('error', 'unknown reason')}")
        return 1
    attempt = reply.get("attempt")
    print(f"upgrade: master pid {reply.get('pid')} checked the new program "
          f"(ringd {reply.get('to_version')}"
          f"{', package ' + reply['to_package'] if reply.get('to_package') else ''}) "
          f"and re-executes itself", flush=True)
    last_error = ""
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            st = request(sock, {"cmd": "status"}, timeout=max(1.0, deadline - time.monotonic()))
        except ControlClientError as e:
            last_error = str(e)     # the exec window: the socket queues, or answers late
            continue
        up = st.get("status", {}).get("upgrade") or {}
        if up.get("attempt") != attempt or up.get("state") not in ("ok", "failed", "refused"):
            continue
        s = st["status"]
        if up["state"] == "ok":
            print(f"upgrade ok: master pid {s['pid']} runs ringd {s.get('version')}"
                  f"{' (package ' + s['package_version'] + ')' if s.get('package_version') else ''}"
                  f" since {time.strftime('%H:%M:%S', time.localtime(s['exec_started']))}, "
                  f"generation {s['generation']}; {up.get('reason', '')}")
            return 0
        if up["state"] == "failed":
            _err(f"upgrade failed: the new program runs (pid {s['pid']}), but its workers did "
                 f"not start: {up.get('reason')}; the previous generation keeps serving")
        else:
            _err(f"upgrade refused: {up.get('reason')}")
        return 1
    _err(f"upgrade: no outcome within {args.timeout:.0f}s"
         f"{' (' + last_error + ')' if last_error else ''}; see ringd status and the log")
    return 1


def cmd_upgrade_check(args) -> int:
    from .upgrade import check_main
    return check_main(os.path.abspath(args.config))


def _master_config(pid: int) -> str | None:
    """The file a master runs, from its title "ringd: master -c FILE"."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        return None
    prefix = "ringd: master -c "
    if not title.startswith(prefix):
        return None
    return title[len(prefix):].strip() or None


def cmd_stop(args) -> int:
    from . import pidfile
    sock, pidpath, origin = _locate(args)
    note = _origin(origin, "pidfile")
    try:
        pid = pidfile.running(pidpath)
    except pidfile.PidfileError as e:
        _err(f"{e}{note}")
        return 1
    if pid is None:
        _err(f"ringd is not running (no master holds pidfile {pidpath}){note}")
        return 1
    os.kill(pid, signal.SIGTERM if args.now else signal.SIGQUIT)
    if args.no_wait:
        print(f"sent {'SIGTERM' if args.now else 'SIGQUIT'} to {pid}")
        return 0
    drain = _peek(args.config).get("drain_timeout", "30s")
    from .config import parse_duration
    try:
        limit = (parse_duration(str(drain)) or 30.0) + 15.0
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


def cmd_drain(args) -> int:
    payload = {"cmd": "drain"}
    if args.after is not None:
        from .config import parse_duration
        after = parse_duration(args.after)
        if after is None:
            _err(f'--after: expected a duration such as "10s" or "500ms", got "{args.after}"')
            return 2
        payload["after"] = after
    reply = _ask(args, payload)
    if reply is None:
        return 1
    print(reply.get("message", "draining"), flush=True)
    if args.no_wait:
        return 0
    # Wait for the master to exit, as `ringd stop` does: systemd's ExecStop
    # must not return before the drain is over (it sends KillSignal after).
    from . import pidfile
    from .control import ControlClientError, request
    pid = reply["pid"]
    sock, _, _ = _locate(args)
    left = reply["lameduck"].get("accept_stops_in") or 0.0
    limit = left + float(reply.get("drain_timeout", 30.0)) + 15.0
    start = time.monotonic()
    next_ping = start
    while time.monotonic() - start < limit:
        if not pidfile.alive(pid):
            print(f"ringd (pid {pid}) drained and stopped after {time.monotonic() - start:.1f}s")
            return 0
        if time.monotonic() >= next_ping:
            next_ping = time.monotonic() + 0.5
            try:
                state = request(sock, {"cmd": "ping"}, timeout=2).get("lameduck")
            except ControlClientError:
                state = None     # stopping: the socket goes away before the pid does
            if state == "serving":
                _err("drain cancelled (ringd ready): ringd goes on serving")
                return 1
        time.sleep(0.05)
    _err(f"ringd (pid {pid}) still running after {limit:.0f}s")
    return 1


def cmd_ready(args) -> int:
    reply = _ask(args, {"cmd": "ready"})
    if reply is None:
        return 1
    print(reply.get("message", "serving"))
    return 0


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
    sock, _, origin = _locate(args)
    try:
        reply = request(sock, payload, timeout=timeout)
    except ControlClientError as e:
        _err(f"{e}{_origin(origin, 'control_socket')}")
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
    if "exec_started" in st:
        pkg = f" (package {st['package_version']})" if st.get("package_version") else ""
        print(f"image ringd {st.get('version')}{pkg} since "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st['exec_started']))}  "
              f"upgrades {st.get('upgrades', 0)}")
        if st.get("upgrade_error"):
            print(f"last upgrade failed: {st['upgrade_error']} (the adopted generation serves)")
    ld = st.get("lameduck") or {}
    if ld.get("state") == "draining":
        print(f"host draining (lame duck): /healthz 503, accepting stops in "
              f"{ld['accept_stops_in']:.1f}s (ringd ready cancels)")
    elif ld.get("state") == "stopping":
        print("host stopping: accepting stopped, connections draining")
    gens = st.get("generations") or []
    if len(gens) > 1:
        # during a reload: where the connections are (a handover moves them
        # from the draining generations to the active one)
        print("generations: " + ", ".join(
            f"{g['generation']} {g['state']} ({g.get('connections', 0)} connections)"
            for g in gens))
    ho = st.get("handover") or {}
    failed = {r: n for r, n in (ho.get("failures") or {}).items() if n}
    if ho.get("handed_over") or failed:
        print(f"connections handed over on reloads {ho.get('handed_over', 0)}"
              + (", stayed: " + ", ".join(f"{r} {n}" for r, n in failed.items())
                 if failed else ""))
    print()
    rows = [[w["slot"], w["pid"], w["cpu"], w["generation"], w["state"], w["ring"], w["active"],
             w["accepted"], _bytes(w["bytes_c2s"]), _bytes(w["bytes_s2c"])]
            for w in st["workers"]]
    print(_table(rows, ["WORKER", "PID", "CPU", "GEN", "STATE", "RING", "ACTIVE", "ACCEPTED",
                        "BYTES IN", "BYTES OUT"]))
    if st.get("listeners"):
        print()
        rows = [[ls["listener"],
                 ", ".join(f"{r} {n}" for r, n in ls["refused"].items() if n) or "-",
                 ", ".join(f"{r} {n}" for r, n in ls["routes"].items()) or "-"]
                for ls in st["listeners"]]
        print(_table(rows, ["LISTENER", "REFUSED", "ROUTED"]))
    if st.get("servers"):
        print()
        rows = [[f"{s['upstream']}/{s['server']}", s["state"], s.get("admin"), s.get("weight"),
                 s["active"], s["connections"], s["failures"], s.get("last_check", "")]
                for s in st["servers"]]
        print(_table(rows, ["SERVER", "STATE", "ADMIN", "WEIGHT", "ACTIVE", "CONNS", "FAILS",
                            "LAST CHECK"]))
    src = st.get("source_table")
    if src and src.get("used"):
        print()
        print(f"source table: {src['live']} active sources ({src['used']} held) of "
              f"{src['size']}, {src['open']} connections open, untracked {src['untracked']}, "
              f"evictions {src['evictions']}")
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
             "status": cmd_status, "server": cmd_server, "drain": cmd_drain, "ready": cmd_ready,
             "upgrade": cmd_upgrade, "upgrade-check": cmd_upgrade_check}
    try:
        return verbs[args.verb](args)
    except CliError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
