"""Runs in the child right after fork, and never returns to the master's code.

Order matters: close what is not ours, pin to the CPU (so the ring's SQPOLL
thread and io-wq threads inherit the affinity), set the title, drop
privileges, then build the native config and enter the C loop. No Python runs
per connection; signals are not the control path (a Python handler cannot run
while we sit in the C call), so the worker ignores the operator's signals and
takes orders from the control socket.
"""
from __future__ import annotations

import grp
import os
import pwd
import signal
import sys
from dataclasses import dataclass

# worker exit codes the master understands
EXIT_OK = 0
EXIT_SETUP = 3        # the native loop could not start (errno logged)
EXIT_PRIVS = 4        # could not drop privileges
EXIT_CRASH = 70       # unexpected Python exception
EXIT_CRASH_HOOK = 99  # test hook (RINGD_TEST_CRASH_FILE)


@dataclass
class WorkerSpec:
    slot: int
    cpu: int
    sq_cpu: int             # CPU of the SQPOLL thread, -1 for no SQPOLL
    generation: int
    config: object          # ringd.config.Config
    shm: object             # ringd.native.SharedState
    acceptors: list         # (fd, listener index) of every socket it accepts on
    control_fd: int
    test_hooks: bool = False
    srclimit: object = None     # ringd.srclimit.SourceTable (inherited mapping), or None
    srclimit_column: int = 0    # this process's column in it


def _reset_signals() -> None:
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _close_others(keep: set[int]) -> None:
    """Close every fd we inherited but do not need, above stderr: the
    master's ends of other workers' control sockets above all, or a worker
    could keep another one's channel open after the master died."""
    lo = 3
    for fd in sorted(keep):
        if fd >= lo:
            os.closerange(lo, fd)
            lo = fd + 1
    os.closerange(lo, 1 << 20)


def _drop_privileges(user: str | None, group: str | None) -> None:
    if os.geteuid() != 0 or not (user or group):
        return
    pw = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getgid())
    if pw:
        os.initgroups(pw.pw_name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    if pw:
        os.setuid(pw.pw_uid)


def run(spec: WorkerSpec) -> int:
    """Returns the process exit code."""
    _reset_signals()
    _close_others({fd for fd, _ in spec.acceptors} | {spec.control_fd} | _log_fds())

    from ringd import log
    from ringd.native import build_worker_cfg, run_worker
    logger = log.get(worker=spec.slot, gen=spec.generation, cpu=spec.cpu, pid=os.getpid())

    if spec.cpu >= 0:
        try:
            os.sched_setaffinity(0, {spec.cpu})
        except OSError as e:
            logger.warning("worker_affinity_failed", error=e.strerror)
    try:
        from setproctitle import setproctitle
        setproctitle(f"ringd: worker {spec.slot} [gen {spec.generation}] cpu {spec.cpu}")
    except Exception:  # a cosmetic failure must not stop the worker
        pass

    crash_file = os.environ.get("RINGD_TEST_CRASH_FILE") if spec.test_hooks else None
    if crash_file and os.path.exists(crash_file):
        # test hook: a worker that dies at start while the file exists
        return EXIT_CRASH_HOOK

    cfg_r = spec.config.ringd
    try:
        _drop_privileges(cfg_r.user, cfg_r.group)
    except (KeyError, OSError) as e:
        logger.error("worker_privileges_failed", user=cfg_r.user, group=cfg_r.group,
                     error=str(e))
        return EXIT_PRIVS

    cfg, keep = build_worker_cfg(spec.config, spec.shm, spec.slot, spec.cpu, spec.sq_cpu,
                                 spec.acceptors, spec.control_fd, spec.test_hooks,
                                 srclimit=spec.srclimit, srclimit_column=spec.srclimit_column)
    rc = run_worker(cfg)
    del keep
    if rc < 0:
        # the event with the errno already went to the master
        return EXIT_SETUP
    return EXIT_OK


def _log_fds() -> set[int]:
    fds = set()
    from ringd import log
    fh = getattr(log.STREAM, "_fh", None)
    try:
        if fh is not None:
            fds.add(fh.fileno())
    except (ValueError, OSError):
        pass
    return fds


def child_main(spec: WorkerSpec) -> None:
    """Entry point after fork: run, then leave without unwinding the master's
    state (atexit handlers, asyncio loop, buffered files belong to the master)."""
    code = EXIT_CRASH
    try:
        code = run(spec)
    except BaseException:
        import traceback
        try:
            traceback.print_exc(file=sys.stderr)
        except Exception:
            pass
    finally:
        os._exit(code)
