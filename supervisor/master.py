"""The master: owns config, sockets, shared memory and the workers.

One asyncio loop, one thread. Signal handlers and control-socket requests only
enqueue a command; a single task takes commands one at a time (reload, stop,
reopen logs). Worker exits are noticed through pidfds, worker events through
the control socketpairs, stalls through the heartbeat in shared memory.

Generations: every successful reload starts generation G+1 next to G, waits
until each new worker reports that it accepts, then tells G to drain. Several
old generations may drain at once, up to ringd.max_draining_generations.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from . import config as config_mod
from . import log, notify, pidfile
from .config import Config, ConfigError
from .lameduck import DRAINING, LameDuck
from .listeners import BindError, ListenerSockets, bind_hint, keys_of, raise_nofile
from .native import (CMD_SIZE, EVENT_SIZE, RING_MODES, SharedState, decode_event, encode_cmd,
                     lib, plan_cpus, server_table, setup_failure, sqpoll_wanted)

READY_TIMEOUT = 15.0        # a new generation must accept within this
STOP_GRACE = 1.5            # fast stop: SIGKILL whatever is left after this
KILL_AFTER_DRAIN = 5.0      # drain: SIGKILL this long past the deadline
ABORT_GRACE = 5.0           # watchdog: SIGKILL this long after a SIGABRT that did not end it
ABORT_GRACE_DUMPING = 60.0  # ... unless it is still writing its core dump
WATCHDOG_PERIOD = 0.5
STABLE_AFTER = 10.0         # a worker up this long resets its slot's crash count
HOLD_BACK_AFTER = 5         # consecutive crashes before we call a slot held back
RELEASE_SLOT_AFTER = 1.0    # a slot down longer than this gives its sockets up
ADOPT_QUIET = 60.0          # tcp_migrate_req=0: a listener this long without a new
                            # connection is quiet: a reload lets its orphaned sockets go


@dataclass
class WorkerProc:
    slot: int
    cpu: int
    sq_cpu: int
    gen: "Generation"
    pid: int
    pidfd: int
    ctrl: socket.socket
    state: str = "starting"     # starting, ready, draining, exited
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    ring_mode: str = ""
    hb_value: int = -1
    hb_changed: float = field(default_factory=time.monotonic)
    accept_stopped: bool = False
    killed: str = ""            # why we killed it, if we did
    fail_reason: str = ""       # why it never became ready
    ready: asyncio.Future | None = None


@dataclass
class SlotState:
    crashes: int = 0
    respawn: asyncio.TimerHandle | None = None
    held_back: bool = False


class Generation:
    def __init__(self, number: int, cfg: Config):
        self.number = number
        self.config = cfg
        self.servers = server_table(cfg)
        self.shm = SharedState(number, cfg.ringd.workers, len(cfg.listeners), len(self.servers))
        self.workers: list[WorkerProc | None] = [None] * cfg.ringd.workers
        self.slots = [SlotState() for _ in range(cfg.ringd.workers)]
        self.state = "starting"     # starting, active, draining, done
        self.drain_started: float | None = None
        self.socket_keys = keys_of(cfg)        # plus the adopted ones, see Master
        self.adopted: set = set()
        self.fail_reasons: list[str] = []
        # slots whose worker stays down for a while: their listening sockets
        # are closed so the kernel stops queueing connections nobody accepts
        # (with net.ipv4.tcp_migrate_req=1 the queued ones move to the others)
        self.released_slots: set[int] = set()

    def keys_in_use(self) -> set:
        n = len(self.workers)
        return {k for k in self.socket_keys if k.slot % n not in self.released_slots}

    def live(self) -> list[WorkerProc]:
        return [w for w in self.workers if w is not None]


class Master:
    def __init__(self, config_path: str, cfg: Config, *, test_hooks: bool = False):
        self.config_path = config_path
        self.config = cfg
        self.test_hooks = test_hooks
        self.log = log.get()
        self.sockets = ListenerSockets()
        self.generations: list[Generation] = []
        self.active: Generation | None = None
        self.next_gen = 1
        self.commands: asyncio.Queue = asyncio.Queue()
        self.stopping = False
        self.stop_event: asyncio.Event | None = None
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reloads_ok = 0
        self.reloads_rejected = 0
        self.worker_restarts = 0
        self.started_at = time.time()
        self.pidfile_path = cfg.ringd.pidfile
        self.pidfile: pidfile.Pidfile | None = None
        self.control = None       # ringd.control.ControlServer
        self.admin = None         # ringd.admin.Admin
        self.servers = None       # ringd.servers.ServerRegistry (server states)
        self.health = None        # ringd.health.HealthChecker (active checks)
        self.extras: list = []    # components with start()/stop() (servers, health, admin)
        self._pause_logged: dict[tuple, float] = {}
        # per listening address: (connections accepted, when that last changed)
        self._activity: dict[tuple, tuple[int, float]] = {}
        self.adopt_quiet = ADOPT_QUIET
        if test_hooks and os.environ.get("RINGD_TEST_ADOPT_QUIET"):
            self.adopt_quiet = float(os.environ["RINGD_TEST_ADOPT_QUIET"])
        # `ringd drain` / `ringd ready`: /healthz 503 while still accepting,
        # then a graceful stop (see lameduck.py)
        self.lameduck = LameDuck(
            stop=lambda: self._on_signal("graceful_stop"),
            is_stopping=lambda: self.stopping or bool(self.stop_event and self.stop_event.is_set()),
            log=self.log)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        soft, hard = raise_nofile()
        self.log.info("start", config=self.config_path, pid=os.getpid(),
                      workers=self.config.ringd.workers, nofile=soft,
                      sqpoll=sqpoll_wanted(self.config))
        if _sysctl("net/ipv4/tcp_migrate_req") == "0":
            self.log.info("hint", setting="net.ipv4.tcp_migrate_req=0",
                          hint="set it to 1 so that connections queued on a listening socket "
                               "that closes (fewer workers, a removed listener) move to the "
                               "remaining sockets instead of being reset")
        self._check_buffer_caps(self.config)
        try:
            # held (locked) until the master exits: see pidfile.py
            self.pidfile = pidfile.Pidfile.acquire(self.pidfile_path)
        except pidfile.PidfileError as e:
            self.log.error("start_failed", reason=str(e))
            return 1
        try:
            return await self._run()
        finally:
            self.pidfile.release()

    async def _run(self) -> int:
        try:
            self.sockets.prepare(self.config)
        except BindError as e:
            self.log.error("start_failed", reason=str(e))
            return 1
        for sig, cmd in ((signal.SIGHUP, "reload"), (signal.SIGQUIT, "graceful_stop"),
                         (signal.SIGTERM, "fast_stop"), (signal.SIGINT, "fast_stop"),
                         (signal.SIGUSR1, "reopen")):
            self.loop.add_signal_handler(sig, self._on_signal, cmd)

        from .control import ControlServer
        self.control = ControlServer(self, self.config.ringd.control_socket)
        try:
            await self.control.start()
        except OSError as e:
            self.log.error("start_failed", reason=f"{self.config.where('ringd', 'control_socket')}: "
                                                  f"cannot listen on "
                                                  f"{self.config.ringd.control_socket}: {e.strerror}")
            self.sockets.close_all()
            return 1

        from .accesslog import AccessLog
        from .admin import Admin
        from .health import HealthChecker
        from .servers import ServerRegistry
        self.admin = Admin(self)
        try:
            self.admin.bind(self.config.admin.listen)
        except OSError as e:
            self.log.error("start_failed", reason=f"{self.config.where('admin', 'listen')}: "
                                                  f"cannot listen on {self.config.admin.listen}: "
                                                  f"{e.strerror}{bind_hint(e)}")
            await self.control.stop()
            self.sockets.close_all()
            return 1
        self.servers = ServerRegistry(self)
        self.health = HealthChecker(self, self.servers)
        self.extras += [self.servers, self.health, self.admin, AccessLog(self)]
        gen = self._new_generation(self.config)
        ok, reason = await self._wait_ready(gen)
        if not ok:
            self.log.error("start_failed", reason=reason)
            await self._stop_all(fast=True)
            await self.control.stop()
            self.sockets.close_all()
            return 1
        self._activate(gen)
        for extra in self.extras:
            await extra.start()
        self.log.info("ready", generation=gen.number, workers=len(gen.workers),
                      listeners=[str(lst.listen) for lst in self.config.listeners])
        notify.ready(self._status_line())

        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._command_loop()
        finally:
            watchdog.cancel()
            self.lameduck.close()
            for extra in self.extras:
                await extra.stop()
            await self.control.stop()
            self.sockets.close_all()
        self.log.info("exit", code=self.exit_code)
        return self.exit_code

    def _on_signal(self, cmd: str) -> None:
        # only enqueue: the command loop does the work
        if cmd in ("graceful_stop", "fast_stop"):
            self.stop_event.set()
        self.commands.put_nowait((cmd, None))

    async def _command_loop(self) -> None:
        while True:
            cmd, fut = await self.commands.get()
            if cmd == "reload":
                result = await self.reload()
            elif cmd == "graceful_stop":
                await self._stop_all(fast=False)
                result = (True, "stopped")
            elif cmd == "fast_stop":
                await self._stop_all(fast=True)
                result = (True, "stopped")
            elif cmd == "reopen":
                log.reopen()
                self.log.info("logs_reopened", file=log.STREAM.path)
                result = (True, "reopened")
            else:
                result = (False, f"unknown command {cmd}")
            if fut is not None and not fut.done():
                fut.set_result(result)
            if cmd in ("graceful_stop", "fast_stop"):
                self._drain_queue()
                return

    def _drain_queue(self) -> None:
        while not self.commands.empty():
            _, fut = self.commands.get_nowait()
            if fut is not None and not fut.done():
                fut.set_result((False, "ringd is stopping"))

    async def submit(self, cmd: str) -> tuple[bool, str]:
        """Queue a command and wait for its outcome (control socket)."""
        fut = self.loop.create_future()
        if cmd in ("graceful_stop", "fast_stop"):
            self.stop_event.set()
        await self.commands.put((cmd, fut))
        return await fut

    # ------------------------------------------------------------ generations

    def _new_generation(self, cfg: Config) -> Generation:
        gen = Generation(self.next_gen, cfg)
        self.next_gen += 1
        gen.adopted = self._adoption(cfg)
        gen.socket_keys |= gen.adopted
        self.generations.append(gen)
        if self.servers is not None:
            self.servers.prepare_generation(gen)  # server states before any worker runs
        for slot, (cpu, sq_cpu) in enumerate(plan_cpus(cfg)):
            self._spawn(gen, slot, cpu, sq_cpu)
        return gen

    def _adoption(self, cfg: Config) -> set:
        """Which sockets of slots that `cfg` no longer has (fewer workers than
        before) its workers adopt, that is keep accepting on.

        A listening socket closed while connections wait in its queue resets
        them, unless net.ipv4.tcp_migrate_req = 1: then the kernel moves them
        to another socket of the same port. So:
        - tcp_migrate_req = 1: none. Each such socket is closed as soon as the
          old workers stopped accepting on it; its queue moves over.
        - 0: all, except those of a listener that took no new connection for
          adopt_quiet seconds (the port is quiet). Those close once the old
          workers stopped accepting; the master checks that the queue is
          empty then, and logs what a late arrival lost if it was not.
        The workers accept on an adopted socket until they are replaced, so
        its queue is never looked at while nobody takes from it."""
        candidates = self.sockets.adoptable(cfg)
        if not candidates:
            return set()
        if _sysctl("net/ipv4/tcp_migrate_req") == "1":
            return set()
        self._note_activity()
        now = time.monotonic()
        keep = set()
        for k in candidates:
            _, changed = self._activity.get((k.family, k.ip, k.port), (0, now))
            if now - changed < self.adopt_quiet or self.sockets.queued(k):
                keep.add(k)
        if keep:
            self.log.info("listeners_adopted", sockets=_socket_names(keep),
                          hint="net.ipv4.tcp_migrate_req=0: closing them could reset queued "
                               "connections; they are kept until a reload finds their port "
                               f"quiet for {self.adopt_quiet:g}s (set it to 1 to close them "
                               "at once)")
        return keep

    def _note_activity(self) -> None:
        """Record when each listening address last accepted a connection
        (any worker of any generation), for _adoption."""
        totals: dict[tuple, int] = {}
        for gen in self.generations:
            for li, lst in enumerate(gen.config.listeners):
                addr = (lst.listen.family, lst.listen.ip, lst.listen.port)
                n = sum(gen.shm.lstats(w)[li].accepted for w in range(gen.shm.nworkers))
                totals[addr] = totals.get(addr, 0) + n
        now = time.monotonic()
        for addr, n in totals.items():
            old = self._activity.get(addr)
            if old is None or old[0] != n:
                self._activity[addr] = (n, now)
        for addr in list(self._activity):
            if addr not in totals:
                del self._activity[addr]

    def _activate(self, gen: Generation) -> None:
        gen.state = "active"
        self.active = gen
        self.config = gen.config

    async def _wait_ready(self, gen: Generation) -> tuple[bool, str]:
        """Wait until every worker of `gen` reported READY (or failed)."""
        futs = [w.ready for w in gen.live() if w.ready is not None]
        everyone = asyncio.gather(*futs)
        stop_wait = asyncio.ensure_future(self.stop_event.wait())
        try:
            await asyncio.wait([everyone, stop_wait], timeout=READY_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if all(f.done() and f.result() for f in futs):
            return True, ""
        if self.stop_event.is_set():
            return False, "stop requested while workers were starting"
        reasons = sorted(set(gen.fail_reasons))
        if not reasons:
            reasons = ["workers did not report ready within %.0fs" % READY_TIMEOUT]
        return False, "; ".join(reasons)

    def _spawn(self, gen: Generation, slot: int, cpu: int, sq_cpu: int) -> WorkerProc:
        from ringd.worker.main import WorkerSpec, child_main
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec = WorkerSpec(slot=slot, cpu=cpu, sq_cpu=sq_cpu, generation=gen.number,
                          config=gen.config, shm=gen.shm,
                          acceptors=self.sockets.acceptors_for(gen.config, slot, gen.adopted),
                          control_fd=child.fileno(), test_hooks=self.test_hooks)
        sys.stdout.flush()
        sys.stderr.flush()
        log.STREAM.flush()
        pid = os.fork()
        if pid == 0:
            child_main(spec)        # never returns
        child.close()
        parent.setblocking(False)
        pidfd = os.pidfd_open(pid)
        w = WorkerProc(slot=slot, cpu=cpu, sq_cpu=sq_cpu, gen=gen, pid=pid, pidfd=pidfd,
                       ctrl=parent,
                       ready=self.loop.create_future())
        gen.workers[slot] = w
        self.loop.add_reader(pidfd, self._on_worker_exit, w)
        self.loop.add_reader(parent.fileno(), self._on_worker_event, w)
        self.log.info("worker_spawn", worker=slot, gen=gen.number, pid=pid, cpu=cpu,
                      sqpoll_cpu=sq_cpu if sq_cpu >= 0 else None)
        return w

    def _send(self, w: WorkerProc, cmd: int, arg: int = 0) -> None:
        try:
            w.ctrl.send(encode_cmd(cmd, arg))
        except OSError:
            pass    # it is exiting; its exit is handled through the pidfd

    def _drain_generation(self, gen: Generation, reason: str) -> None:
        if gen.state in ("draining", "done"):
            return
        gen.state = "draining"
        gen.drain_started = time.monotonic()
        timeout = gen.config.ringd.drain_timeout
        active = sum(gen.shm.worker(w.slot).conns_active for w in gen.live())
        self.log.info("drain_start", gen=gen.number, reason=reason, workers=len(gen.live()),
                      active=active, timeout=timeout)
        for slot_state in gen.slots:
            if slot_state.respawn is not None:
                slot_state.respawn.cancel()
                slot_state.respawn = None
        for w in gen.live():
            w.state = "draining"
            self._send(w, lib.RINGD_CMD_DRAIN, int(timeout * 1000))
            self.loop.call_later(timeout + KILL_AFTER_DRAIN, self._kill_if_alive, w,
                                 "drain deadline passed")
        self._check_generation_done(gen)

    def _kill_if_alive(self, w: WorkerProc, why: str, sig: int = signal.SIGKILL) -> None:
        """Signal a worker (SIGKILL unless told otherwise) and log it. Workers
        that overran a drain deadline or a stop get SIGKILL straight away:
        their loop still runs (their heartbeat moves, else the watchdog would
        have aborted them), so a core dump would show nothing wrong."""
        if w.state == "exited":
            return
        w.killed = why
        self.log.warning("worker_kill", worker=w.slot, gen=w.gen.number, pid=w.pid, reason=why,
                         signal=signal.Signals(sig).name)
        try:
            os.kill(w.pid, sig)
        except ProcessLookupError:
            pass

    def _abort_if_alive(self, w: WorkerProc, why: str) -> None:
        """A wedged worker gets SIGABRT first: the core dump of its C loop is
        the only evidence of where it hung. SIGKILL follows after ABORT_GRACE
        if SIGABRT did not end it (a stopped process keeps SIGABRT pending)."""
        self._kill_if_alive(w, why, signal.SIGABRT)
        started = time.monotonic()

        def escalate() -> None:
            if w.state == "exited":
                return
            if _dumping_core(w.pid) and time.monotonic() - started < ABORT_GRACE_DUMPING:
                self.loop.call_later(ABORT_GRACE, escalate)     # let the core be written
                return
            self._kill_if_alive(w, f"{why}; still running {time.monotonic() - started:.0f}s "
                                   "after SIGABRT", signal.SIGKILL)
        self.loop.call_later(ABORT_GRACE, escalate)

    def _enforce_drain_bound(self) -> None:
        draining = [g for g in self.generations if g.state == "draining"]
        bound = self.config.ringd.max_draining_generations
        while len(draining) > bound:
            oldest = draining.pop(0)
            self.log.warning("drain_cut_short", gen=oldest.number, bound=bound,
                             active=sum(oldest.shm.worker(w.slot).conns_active
                                        for w in oldest.live()))
            for w in oldest.live():
                self._send(w, lib.RINGD_CMD_STOP)
                self.loop.call_later(STOP_GRACE, self._kill_if_alive, w, "stop timed out")

    def _check_generation_done(self, gen: Generation) -> None:
        if gen.state == "draining" and not gen.live():
            gen.state = "done"
            took = time.monotonic() - (gen.drain_started or time.monotonic())
            self.log.info("drain_done", gen=gen.number, seconds=round(took, 3))
            self._retire_generation(gen)
        self._retire_sockets()

    def _retire_generation(self, gen: Generation) -> None:
        for extra in self.extras:
            fold = getattr(extra, "fold_generation", None)
            if fold:
                fold(gen)
        self.generations.remove(gen)
        gen.shm.close()

    def _retire_sockets(self) -> None:
        """Close listening sockets no generation needs: only after every worker
        that accepted on them has stopped accepting."""
        keep: set = set()
        for gen in self.generations:
            # on a graceful stop even the current generation lets go of its
            # sockets once its workers stopped accepting: new clients are
            # refused at once (as nginx and HAProxy do) instead of queueing
            # on a socket nobody will accept from
            if gen.state in ("starting", "active") and not self.stopping:
                keep |= gen.keys_in_use()
                continue
            n = len(gen.workers)
            for w in gen.live():
                if not w.accept_stopped:
                    # its own socket and those it adopted (slot j goes to j % n)
                    keep |= {k for k in gen.socket_keys if k.slot % n == w.slot}
        gone = self.sockets.retire(keep)
        if not gone:
            return
        # a queue moves (tcp_migrate_req=1) only to a socket of the same
        # address that stays open
        migrate = _sysctl("net/ipv4/tcp_migrate_req") == "1"
        still_open = {(k.family, k.ip, k.port) for k in self.sockets.keys()}
        lost = {k: q for k, q in gone.items()
                if q and not (migrate and (k.family, k.ip, k.port) in still_open)}
        self.log.info("listeners_closed", sockets=_socket_names(gone),
                      queued=sum(gone.values()), queued_reset=sum(lost.values()))
        if lost and not self.stopping:
            self.log.warning("queued_connections_reset", connections=sum(lost.values()),
                             sockets=_socket_names(lost),
                             hint="the kernel resets what waits on a listening socket that "
                                  "closes, unless net.ipv4.tcp_migrate_req=1 and another "
                                  "socket of the port stays open")

    # ------------------------------------------------------------ events

    def _on_worker_event(self, w: WorkerProc) -> None:
        while True:
            try:
                data = w.ctrl.recv(EVENT_SIZE * 2)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove_reader(w.ctrl.fileno())
                return
            ev = decode_event(data)
            if ev is not None:
                self._handle_event(w, ev)

    def _handle_event(self, w: WorkerProc, ev) -> None:
        cfg = w.gen.config
        ctx = {"worker": w.slot, "gen": w.gen.number, "pid": w.pid}
        t = ev.type
        if t == lib.RINGD_EV_READY:
            w.ring_mode = RING_MODES.get(ev.a, str(ev.a))
            if w.state == "starting":
                w.state = "ready"
            w.ready_at = time.monotonic()
            self.log.info("worker_ready", ring=w.ring_mode, cpu=w.cpu, **ctx)
            if w.ready is not None and not w.ready.done():
                w.ready.set_result(True)
        elif t == lib.RINGD_EV_ACCEPT_PAUSED:
            name = cfg.listeners[ev.a].name if ev.a < len(cfg.listeners) else ev.a
            reason = "max_connections" if ev.err == 0 else ev.error
            key = (w.gen.number, w.slot, ev.a, ev.err)
            now = time.monotonic()
            if now - self._pause_logged.get(key, 0.0) >= 5.0:
                self._pause_logged[key] = now
                self.log.warning("accept_paused", listener=name, reason=reason, active=ev.b,
                                 pauses=ev.c, **ctx)
        elif t == lib.RINGD_EV_ACCEPT_RESUMED:
            name = cfg.listeners[ev.a].name if ev.a < len(cfg.listeners) else ev.a
            self.log.info("accept_resumed", listener=name, after=ev.error, **ctx)
        elif t == lib.RINGD_EV_DRAINING:
            self.log.info("worker_draining", active=ev.c, **ctx)
        elif t == lib.RINGD_EV_ACCEPT_STOPPED:
            w.accept_stopped = True
            self._retire_sockets()
            # a wakeup for a connection may have gone to the worker that just
            # stopped: let the current workers look at their queues
            cur = self.active
            if cur is not None and cur is not w.gen:
                for nw in cur.live():
                    if nw.state == "ready":
                        self._send(nw, lib.RINGD_CMD_POKE_ACCEPT)
        elif t == lib.RINGD_EV_EXITING:
            if ev.c:
                self.log.warning("worker_closed_connections", closed=ev.c, **ctx)
        elif t == lib.RINGD_EV_NO_SERVER:
            lst = cfg.listeners[ev.a].name if ev.a < len(cfg.listeners) else ev.a
            up = cfg.upstreams[ev.b].name if ev.b < len(cfg.upstreams) else ev.b
            self.log.warning("no_server", listener=lst, upstream=up, clients_closed=ev.c,
                             last_error=ev.error or "no server available", **ctx)
        elif t == lib.RINGD_EV_CONNECT_FAIL:
            srv = w.gen.servers[ev.a] if ev.a < len(w.gen.servers) else None
            self.log.warning("connect_failed", upstream=srv.upstream if srv else None,
                             server=srv.name if srv else ev.a, error=ev.error, failures=ev.c,
                             **ctx)
        elif t == lib.RINGD_EV_SERVER_FAILED:
            srv = w.gen.servers[ev.a] if ev.a < len(w.gen.servers) else None
            self.log.warning("server_down", upstream=srv.upstream if srv else None,
                             server=srv.name if srv else ev.a, reason="passive",
                             error=ev.error, fails=ev.c, **ctx)
            for extra in self.extras:
                hook = getattr(extra, "on_passive_down", None)
                if hook:
                    hook(w.gen, ev.a)
        elif t == lib.RINGD_EV_PIPE_SHRUNK:
            self.log.warning("pipe_size_reduced", size=ev.a, error=ev.error,
                             hint="raise fs.pipe-user-pages-soft or run as root", **ctx)
        elif t == lib.RINGD_EV_SETUP_FAILED:
            reason = setup_failure(ev, cfg)
            w.fail_reason = f"worker {w.slot}: {reason}"
            self.log.error("worker_setup_failed", reason=reason, **ctx)
        elif t == lib.RINGD_EV_ACCEPT_ERROR:
            name = cfg.listeners[ev.a].name if ev.a < len(cfg.listeners) else ev.a
            self.log.error("accept_error", listener=name, error=ev.error, **ctx)

    def _on_worker_exit(self, w: WorkerProc) -> None:
        self.loop.remove_reader(w.pidfd)
        core = False
        try:
            _, wstatus = os.waitpid(w.pid, 0)
            code = os.waitstatus_to_exitcode(wstatus)
            core = os.WIFSIGNALED(wstatus) and os.WCOREDUMP(wstatus)
        except ChildProcessError:
            code = None
        os.close(w.pidfd)
        # read what it said last before closing the channel
        self._on_worker_event(w)
        try:
            self.loop.remove_reader(w.ctrl.fileno())
        except (ValueError, OSError):
            pass
        w.ctrl.close()
        prev_state = w.state
        w.state = "exited"
        gen = w.gen
        if gen.workers[w.slot] is w:
            gen.workers[w.slot] = None
        lost = gen.shm.forget_worker(w.slot)
        if w.ready is not None and not w.ready.done():
            w.fail_reason = w.fail_reason or f"worker {w.slot}: {_describe_exit(code)}"
            gen.fail_reasons.append(w.fail_reason)
            w.ready.set_result(False)

        status = _describe_exit(code) + (" (core dumped)" if core else "")
        ctx = {"worker": w.slot, "gen": gen.number, "pid": w.pid, "cpu": w.cpu}
        expected = self.stopping or gen.state in ("draining", "done") or prev_state == "draining"
        if expected and not w.killed:
            self.log.info("worker_exit", status=status, **ctx)
        else:
            self.log.error("worker_exit", status=status, unexpected=True,
                           killed=w.killed or None, lost_connections=lost["connections_lost"],
                           **ctx)
            if gen.state == "active" and not self.stopping:
                self._schedule_respawn(gen, w)
        self._check_generation_done(gen)

    def _schedule_respawn(self, gen: Generation, w: WorkerProc) -> None:
        st = gen.slots[w.slot]
        lived = time.monotonic() - (w.ready_at or w.started)
        if w.ready_at is not None and lived >= STABLE_AFTER:
            st.crashes = 0
        st.crashes += 1
        r = gen.config.ringd
        delay = min(r.respawn_delay * (2 ** (st.crashes - 1)), r.respawn_delay_max)
        if st.crashes >= HOLD_BACK_AFTER:
            st.held_back = True
            self.log.error("slot_held_back", worker=w.slot, gen=gen.number, crashes=st.crashes,
                           retry_in=round(delay, 3),
                           hint="this slot keeps crashing; see the worker_exit events above")
        self.worker_restarts += 1
        st.respawn = self.loop.call_later(delay, self._respawn, gen, w.slot, w.cpu, w.sq_cpu)
        if (delay >= RELEASE_SLOT_AFTER or st.held_back) and w.slot not in gen.released_slots:
            gen.released_slots.add(w.slot)
            self.log.warning("slot_sockets_released", worker=w.slot, gen=gen.number,
                             hint="its connections go to the other workers until it is back")
            self._retire_sockets()

    def _respawn(self, gen: Generation, slot: int, cpu: int, sq_cpu: int) -> None:
        gen.slots[slot].respawn = None
        if gen.state != "active" or self.stopping or gen.workers[slot] is not None:
            return
        if slot in gen.released_slots:
            try:
                self.sockets.prepare(gen.config, slots=[slot])
            except BindError as e:
                delay = gen.config.ringd.respawn_delay_max
                self.log.error("respawn_bind_failed", worker=slot, gen=gen.number, reason=str(e),
                               retry_in=delay)
                gen.slots[slot].respawn = self.loop.call_later(delay, self._respawn, gen, slot,
                                                               cpu, sq_cpu)
                return
            gen.released_slots.discard(slot)
        w = self._spawn(gen, slot, cpu, sq_cpu)
        w.ready.add_done_callback(lambda f: self._respawned(gen, slot, f))

    def _respawned(self, gen: Generation, slot: int, fut: asyncio.Future) -> None:
        st = gen.slots[slot]
        if fut.result() and st.held_back:
            st.held_back = False
            self.log.info("slot_recovered", worker=slot, gen=gen.number)

    # ------------------------------------------------------------ watchdog

    async def _watchdog(self) -> None:
        last_status = ""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD)
            now = time.monotonic()
            for gen in list(self.generations):
                timeout = gen.config.ringd.watchdog_timeout
                for w in gen.live():
                    if w.state not in ("ready", "draining") or w.killed:
                        continue
                    hb = gen.shm.worker(w.slot).heartbeat
                    if hb != w.hb_value:
                        w.hb_value = hb
                        w.hb_changed = now
                    elif timeout > 0 and now - w.hb_changed > timeout:
                        self.log.error("worker_stalled", worker=w.slot, gen=gen.number,
                                       pid=w.pid, silent_for=round(now - w.hb_changed, 2))
                        self._abort_if_alive(w, "watchdog: heartbeat stalled")
            self._note_activity()
            line = self._status_line()
            if line != last_status:         # systemd needs no repeats
                notify.status(line)
                last_status = line

    # ------------------------------------------------------------ reload

    def _check_buffer_caps(self, cfg) -> None:
        """rcvbuf/sndbuf above net.core.rmem_max/wmem_max are capped by the
        kernel without an error (workers may not be root); say so once per load."""
        caps = {key: (sysctl, _sysctl(sysctl.replace(".", "/")))
                for key, sysctl in (("rcvbuf", "net.core.rmem_max"), ("sndbuf", "net.core.wmem_max"))}
        for kind, items in (("listener", cfg.listeners), ("upstream", cfg.upstreams)):
            for item in items:
                for key, (sysctl, cap) in caps.items():
                    want = getattr(item, key)
                    if want and cap and cap.isdigit() and want > int(cap):
                        self.log.warning("socket_buffer_capped", where=f"{kind} {item.name}",
                                         key=key, configured=want, effective=int(cap),
                                         hint=f"the kernel caps it at {sysctl}; raise that "
                                              "sysctl to get the configured size")

    def refuse_reload(self, reason: str) -> None:
        """A reload request refused before it started (ringd reload -c with
        another file): counted and logged like any rejected reload."""
        self.reloads_rejected += 1
        self.log.error("reload_rejected", reason=reason,
                       generation=self.active.number if self.active else None)

    async def reload(self) -> tuple[bool, str]:
        notify.reloading()
        self.log.info("reload_start", config=self.config_path)
        try:
            ok, msg = await self._reload()
        except Exception as e:  # never let a bug in reload take the master down
            self.log.exception("reload_failed", error=repr(e))
            ok, msg = False, f"internal error: {e!r}"
        if ok:
            self.reloads_ok += 1
        else:
            self.reloads_rejected += 1
            self.log.error("reload_rejected", reason=msg, generation=self.active.number)
        notify.ready(self._status_line())
        return ok, msg

    async def _reload(self) -> tuple[bool, str]:
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as e:
            return False, str(e)
        self._check_buffer_caps(new)
        old_r = self.config.ringd
        for key in ("pidfile", "control_socket"):
            if getattr(new.ringd, key) != getattr(old_r, key):
                self.log.warning("reload_ignored_key", key=f"ringd.{key}",
                                 hint="takes effect after a restart")
        # the log first, so that the new workers inherit the new log file; put
        # back if the reload fails further on
        log_before, log_after = log.SETTINGS, _log_settings(new)
        if log_after != log_before:
            try:
                log.configure(*log_after)
            except OSError as e:
                self._restore_log(log_before)
                return False, (f"{new.where('ringd', 'log_file')}: cannot open "
                               f"{new.ringd.log_file}: {e.strerror}")
        try:
            admin_next = self.admin.prebind(new.admin.listen)
        except OSError as e:
            self._restore_log(log_before)
            return False, (f"{new.where('admin', 'listen')}: cannot listen on {new.admin.listen}: "
                           f"{e.strerror}{bind_hint(e)}")
        try:
            _, new_keys = self.sockets.prepare(new)
        except BindError as e:
            self.admin.discard(admin_next)
            self._restore_log(log_before)
            return False, str(e)

        gen = self._new_generation(new)
        ok, reason = await self._wait_ready(gen)
        if not ok:
            # never leave a half-started generation: drain what did start
            gen.state = "active"   # so _drain_generation runs its course
            self._drain_generation(gen, "reload failed")
            self._retire_sockets()
            self.admin.discard(admin_next)
            self._restore_log(log_before)
            return False, f"new workers failed: {reason}"
        old = self.active
        self._activate(gen)
        for extra in self.extras:
            hook = getattr(extra, "on_generation", None)
            if hook:
                hook(gen, old)
        await self.admin.switch(admin_next)
        if old is not None:
            self._drain_generation(old, "reload")
        self._enforce_drain_bound()
        if log_after != log_before:
            self.log.info("log_reconfigured", format=new.ringd.log_format,
                          level=new.ringd.log_level, file=new.ringd.log_file)
        self.log.info("reload_ok", generation=gen.number, workers=len(gen.workers),
                      draining=[g.number for g in self.generations if g.state == "draining"])
        return True, f"generation {gen.number} running {self.config_path}"

    def _restore_log(self, settings: tuple) -> None:
        """A reload that switched the log failed later on: switch back."""
        if log.SETTINGS == settings:
            return
        try:
            log.configure(*settings)
        except OSError as e:      # it was open a moment ago; stderr is the fallback
            log.configure(settings[0], settings[1], None)
            self.log.error("log_file_lost", file=settings[2], error=e.strerror)

    # ------------------------------------------------------------ stop

    async def _stop_all(self, fast: bool) -> None:
        self.stopping = True
        self.stop_event.set()
        notify.stopping()
        timeout = STOP_GRACE if fast else self.config.ringd.drain_timeout + KILL_AFTER_DRAIN
        self.log.info("stopping", mode="fast" if fast else "graceful",
                      workers=sum(len(g.live()) for g in self.generations))
        for gen in self.generations:
            if gen.drain_started is None:
                gen.drain_started = time.monotonic()
            for st in gen.slots:
                if st.respawn is not None:
                    st.respawn.cancel()
                    st.respawn = None
            for w in gen.live():
                if fast:
                    self._send(w, lib.RINGD_CMD_STOP)
                else:
                    w.state = "draining"
                    self._send(w, lib.RINGD_CMD_DRAIN, int(self.config.ringd.drain_timeout * 1000))
        deadline = time.monotonic() + timeout
        while any(g.live() for g in self.generations) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for gen in self.generations:
            for w in gen.live():
                self._kill_if_alive(w, "did not stop in time")
        deadline = time.monotonic() + 2.0
        while any(g.live() for g in self.generations) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for gen in list(self.generations):
            gen.state = "draining"
            self._check_generation_done(gen)

    # ------------------------------------------------------------ status

    def _status_line(self) -> str:
        gen = self.active
        if gen is None:
            return "starting"
        draining = [g.number for g in self.generations if g.state == "draining"]
        live = len(gen.live())
        text = f"generation {gen.number}: {live}/{len(gen.workers)} workers"
        if draining:
            text += f", draining generations {draining}"
        if self.lameduck.state == DRAINING:
            text += ", lame duck (/healthz 503, still accepting)"
        return text

    def status(self) -> dict:
        from .status import collect
        return collect(self)


def _socket_names(keys) -> list[str]:
    return sorted(f"{k.ip}:{k.port}#{k.slot}" for k in keys)


def _log_settings(cfg: Config) -> tuple:
    """What log.configure takes, from a config."""
    return (cfg.ringd.log_format, cfg.ringd.log_level, cfg.ringd.log_file)


def _sysctl(name: str) -> str | None:
    try:
        with open(f"/proc/sys/{name}", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _dumping_core(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return any(line.split() == ["CoreDumping:", "1"] for line in f)
    except OSError:
        return False


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return {0: "exit 0", 3: "exit 3 (native setup failed)", 4: "exit 4 (privilege drop failed)",
            70: "exit 70 (crashed)"}.get(code, f"exit {code}")


def run(config_path: str, cfg: Config, *, test_hooks: bool = False) -> int:
    from setproctitle import setproctitle
    setproctitle(f"ringd: master -c {config_path}")
    master = Master(config_path, cfg, test_hooks=test_hooks)
    return asyncio.run(master.run())
