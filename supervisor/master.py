# Over 450 lines: the generation and worker-slot lifecycle is one state machine, kept in one file.
"""The master: the lifecycle of generations and worker slots.

One asyncio loop, one thread. Signal handlers and control-socket requests only
enqueue a command; a single task takes commands one at a time (reload, stop,
reopen logs). Worker exits are noticed through pidfds, worker events through
the control socketpairs, stalls through the heartbeat in shared memory.

Generations: every successful reload starts generation G+1 next to G, waits
until each new worker reports that it accepts, then tells G to drain. Several
old generations may drain at once, up to ringd.max_draining_generations. A
slot whose worker exits unexpectedly is respawned after a growing backoff,
and held back after HOLD_BACK_AFTER crashes in a row.

Beside it, each with one job: ringd.generation (the state of a generation
and its slots), ringd.events (what a worker's event means: log line and
state change), ringd.handover (which listening sockets stay open across
generations), ringd.upgrade (SIGUSR2 / ringd upgrade: the master re-executes
itself in place and the new image adopts all of this), ringd.fdstore
(systemd's fd store, sockets passed in after a crash), ringd.connmove
(introducing old workers to new ones so that established connections
move), ringd.preflight (host checks), and the components
(ringd.component: lame duck, server registry, health checks, admin
endpoint, access log), which the master calls through that one interface.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time

from . import config as config_mod
from . import fdstore, log, notify, pidfile, preflight
from .component import Component
from .config import Config, ConfigError
from .connmove import ConnectionHandover
from .events import WorkerEvents
from .generation import Generation, WorkerProc
from .handover import ADOPT_QUIET, SocketHandover
from .lameduck import DRAINING, LameDuck
from .listeners import BindError, ListenerSockets, bind_hint, raise_nofile
from .native import (EVENT_SIZE, WATCHDOG_PERIOD, decode_event, encode_cmd, lib, plan_cpus,
                     sqpoll_wanted)
from .status import collect as collect_status
from .upgrade import SIGNALS, Upgrades

READY_TIMEOUT = 15.0        # a new generation must accept within this
STOP_GRACE = 1.5            # fast stop: SIGKILL whatever is left after this
KILL_AFTER_DRAIN = 5.0      # drain: SIGKILL this long past the deadline
ABORT_GRACE = 5.0           # watchdog: SIGKILL this long after a SIGABRT that did not end it
ABORT_GRACE_DUMPING = 60.0  # ... unless it is still writing its core dump
STABLE_AFTER = 10.0         # a worker up this long resets its slot's crash count
HOLD_BACK_AFTER = 5         # consecutive crashes before we call a slot held back
RELEASE_SLOT_AFTER = 1.0    # a slot down longer than this gives its sockets up


# control-channel commands by the RINGD_CTRL_VERSION that introduced them: a
# generation adopted across ringd upgrade gets only what its workers know
CMD_SINCE = {lib.RINGD_CMD_DRAIN: 1, lib.RINGD_CMD_STOP: 1, lib.RINGD_CMD_POKE_ACCEPT: 1,
             lib.RINGD_CMD_HANDOVER_TO: 2, lib.RINGD_CMD_HANDOVER_FROM: 2}


class Master:
    def __init__(self, config_path: str, cfg: Config, *, test_hooks: bool = False,
                 resume=None):
        self.config_path = config_path
        self.config = cfg
        self.test_hooks = test_hooks
        self.resume = resume      # ringd.upgrade.Resume: this image was exec'ed in place
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
        self.source_table_no_column = 0   # worker processes started without a column
        self.started_at = time.time()     # the master (carried across ringd upgrade)
        self.exec_started = time.time()   # this image of it
        self.upgrades = Upgrades(self)
        self.pidfile_path = cfg.ringd.pidfile
        self.pidfile: pidfile.Pidfile | None = None
        self.control = None       # ringd.control.ControlServer
        self.admin = None         # ringd.admin.Admin
        self.servers = None       # ringd.servers.ServerRegistry (server states)
        self.health = None        # ringd.health.HealthChecker (active checks)
        # the per-source limit table, one per master lifetime (ringd.srclimit);
        # set before run() by a master that adopts it across an upgrade exec
        self.srclimit = None
        self.events = WorkerEvents(self, self.log)
        self._no_workers: asyncio.Event | None = None    # set once none is left (stop)
        adopt_quiet = ADOPT_QUIET
        if test_hooks and os.environ.get("RINGD_TEST_ADOPT_QUIET"):
            adopt_quiet = float(os.environ["RINGD_TEST_ADOPT_QUIET"])
        self.handover = SocketHandover(self, adopt_quiet)   # listening sockets across gens
        self.connmove = ConnectionHandover(self)    # established connections across gens
        # `ringd drain` / `ringd ready`: /healthz 503 while still accepting,
        # then a graceful stop (see lameduck.py)
        self.lameduck = LameDuck(
            stop=lambda: self._on_signal("graceful_stop"),
            is_stopping=lambda: self.stopping or bool(self.stop_event and self.stop_event.is_set()),
            log=self.log)
        # lame duck, then (in _run) servers, health, admin, access log
        self.components: list[Component] = [self.lameduck]

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        soft, hard = raise_nofile()
        self.log.info("start", config=self.config_path, pid=os.getpid(),
                      workers=self.config.ringd.workers, nofile=soft,
                      sqpoll=sqpoll_wanted(self.config),
                      upgraded_in_place=True if self.resume is not None else None)
        if self.resume is None:     # said once, by the first image
            preflight.migrate_hint(self.log)
            preflight.check_buffer_caps(self.config, self.log)
        try:
            # held (locked) until the master exits: see pidfile.py
            if self.resume is not None:
                self.pidfile = self.resume.adopt_pidfile(self)
            else:
                self.pidfile = pidfile.Pidfile.acquire(self.pidfile_path)
        except pidfile.PidfileError as e:
            self.log.error("start_failed", reason=str(e))
            return 1
        try:
            return await self._run()
        finally:
            self.pidfile.release()

    async def _run(self) -> int:
        resume = self.resume
        if resume is not None:
            # ringd upgrade: the sockets of the image before this one, no
            # bind; the per-source table too (else a new one below)
            resume.adopt_sockets(self)
            resume.adopt_source_table(self)
        else:
            passed = fdstore.listen_fds()      # systemd's fd store, after a crash
            if passed:
                adopted, rejected = self.sockets.adopt_passed(self.config, passed)
                self.log.info("listen_fds_adopted", sockets=sorted(fdstore.fd_name(k)
                                                                 for k in adopted))
                for name, why in rejected:
                    self.log.warning("listen_fd_closed", name=name, reason=why)
        if self.srclimit is None:
            from .srclimit import SourceTable, SourceTableError, columns_for_host
            try:
                self.srclimit = SourceTable.create(self.config.ringd.source_table_size,
                                                   columns_for_host(self.config.ringd.workers))
            except SourceTableError as e:
                where = self.config.where("ringd", "source_table_size")
                self.log.error("start_failed", reason=f"{where}: {e}")
                self.sockets.close_all(forget=False)
                return 1
        try:
            self.sockets.prepare(self.config)
        except BindError as e:
            self.log.error("start_failed", reason=str(e))
            self.sockets.close_all(forget=False)
            return 1
        for sig, cmd in SIGNALS.items():
            self.loop.add_signal_handler(sig, self._on_signal, cmd)
        # an upgrade blocked them across the exec; pending ones arrive now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNALS))

        from .control import ControlServer
        self.control = ControlServer(self, self.config.ringd.control_socket
                                     if resume is None else resume.control_path)
        try:
            await self.control.start(None if resume is None else resume.control_fd)
        except OSError as e:
            self.log.error("start_failed", reason=f"{self.config.where('ringd', 'control_socket')}: "
                                                  f"cannot listen on "
                                                  f"{self.config.ringd.control_socket}: {e.strerror}")
            self.sockets.close_all(forget=False)
            return 1

        from .accesslog import AccessLog
        from .admin import Admin
        from .health import HealthChecker
        from .servers import ServerRegistry
        self.admin = Admin(self)
        self.servers = ServerRegistry(self)
        self.health = HealthChecker(self, self.servers)
        self.components += [self.servers, self.health, self.admin, AccessLog(self)]
        if resume is not None:
            resume.import_components(self)     # the admin socket among them
        try:
            self.admin.bind(self.config.admin.listen)
        except OSError as e:
            self.log.error("start_failed", reason=f"{self.config.where('admin', 'listen')}: "
                                                  f"cannot listen on {self.config.admin.listen}: "
                                                  f"{e.strerror}{bind_hint(e)}")
            await self.control.stop()
            self.sockets.close_all(forget=False)
            return 1
        if resume is not None:
            await resume.adopt_generations(self)
            for c in self.components:
                await c.start()
            # the new code's generation, exactly like a reload
            await self.upgrades.complete()
            resume.requeue(self)
        else:
            gen = self._new_generation(self.config)
            ok, reason = await self._wait_ready(gen)
            if not ok:
                self.log.error("start_failed", reason=reason)
                await self._stop_all(fast=True)
                await self.control.stop()
                self.sockets.close_all(forget=False)
                return 1
            self._activate(gen)
            # a socket passed in ($LISTEN_FDS) for a slot this generation
            # neither has nor adopts (tcp_migrate_req=1): closed now, its
            # queue moves to the port's other sockets; left open, the kernel
            # would go on queueing connections there that nobody accepts
            self.handover.retire()
            for c in self.components:
                await c.start()
            self.log.info("ready", generation=gen.number, workers=len(gen.workers),
                          listeners=[str(lst.listen) for lst in self.config.listeners])
            notify.ready(self._status_line())

        watchdog = asyncio.create_task(self._watchdog())
        try:
            await self._command_loop()
        finally:
            watchdog.cancel()
            for c in self.components:
                await c.stop()
            await self.control.stop()
            # a deliberate stop takes the sockets out of systemd's fd store;
            # an error that ends the master leaves them there for Restart=
            self.sockets.close_all(forget=self.stopping)
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
            elif cmd == "upgrade":
                # returns only if the upgrade was refused or the exec failed
                result = await self.upgrades.upgrade(fut)
            else:
                result = (False, f"unknown command {cmd}")
            if fut is not None and not fut.done():
                fut.set_result(result)
            if cmd in ("graceful_stop", "fast_stop"):
                self._drain_queue()
                return

    def _drain_queue(self, why: str = "ringd is stopping") -> None:
        while not self.commands.empty():
            _, fut = self.commands.get_nowait()
            if fut is not None and not fut.done():
                fut.set_result((False, why))

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
        gen.adopted = self.handover.adoption(cfg)
        gen.socket_keys |= gen.adopted
        self.generations.append(gen)
        for c in self.components:
            c.prepare_generation(gen)   # e.g. server states, before any worker runs
        for slot, (cpu, sq_cpu) in enumerate(plan_cpus(cfg)):
            self._spawn(gen, slot, cpu, sq_cpu)
        return gen

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
        acceptors = self.sockets.acceptors_for(gen.config, slot, gen.adopted)
        column = self._source_column(gen, slot)     # freed again if the fork fails
        spec = WorkerSpec(slot=slot, cpu=cpu, sq_cpu=sq_cpu, generation=gen.number,
                          config=gen.config, shm=gen.shm, acceptors=acceptors,
                          control_fd=child.fileno(), test_hooks=self.test_hooks,
                          srclimit=self.srclimit if column is not None else None,
                          srclimit_column=column if column is not None else 0)
        sys.stdout.flush()
        sys.stderr.flush()
        log.STREAM.flush()
        try:
            pid = os.fork()
        except OSError:
            if column is not None:
                self.srclimit.release(column)
            raise
        if pid == 0:
            child_main(spec)        # never returns
        if column is not None:
            self.srclimit.bind(column, pid)
        child.close()
        parent.setblocking(False)
        pidfd = os.pidfd_open(pid)
        w = WorkerProc(slot=slot, cpu=cpu, sq_cpu=sq_cpu, gen=gen, pid=pid, pidfd=pidfd,
                       ctrl=parent, source_column=column,
                       ready=self.loop.create_future())
        gen.workers[slot] = w
        self.loop.add_reader(pidfd, self._on_worker_exit, w)
        self.loop.add_reader(parent.fileno(), self._on_worker_event, w)
        self.log.info("worker_spawn", worker=slot, gen=gen.number, pid=pid, cpu=cpu,
                      sqpoll_cpu=sq_cpu if sq_cpu >= 0 else None)
        return w

    def _source_column(self, gen: Generation, slot: int) -> int | None:
        """A column of the per-source limit table for the process about to
        be spawned; None (it runs without the table, admitting every
        connection untracked) when all are taken."""
        if self.srclimit is None:
            return None
        column = self.srclimit.assign()
        if column is None:
            self.source_table_no_column += 1
            self.log.warning("source_table_no_column", worker=slot, gen=gen.number,
                             columns=self.srclimit.columns,
                             hint="per-source limits are not enforced by this worker; "
                                  "too many worker processes alive at once")
        return column

    def _send(self, w: WorkerProc, cmd: int, arg: int = 0) -> None:
        if CMD_SINCE.get(cmd, lib.RINGD_CTRL_VERSION) > w.gen.ctrl_version:
            return      # an adopted worker of an older image would not know it
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
        self.handover.retire()

    def _retire_generation(self, gen: Generation) -> None:
        for c in self.components:
            c.fold_generation(gen)
        self.connmove.fold(gen)
        self.generations.remove(gen)
        gen.shm.close()

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
                self.events.handle(w, ev)

    def worker_ready(self, w: WorkerProc, ring_mode: str) -> None:
        """RINGD_EV_READY: `w` accepts (its ring in `ring_mode`)."""
        w.ring_mode = ring_mode
        if w.state == "starting":
            w.state = "ready"
        w.ready_at = time.monotonic()
        if w.ready is not None and not w.ready.done():
            w.ready.set_result(True)

    def accept_stopped(self, w: WorkerProc) -> None:
        """RINGD_EV_ACCEPT_STOPPED: `w` no longer accepts on its sockets."""
        w.accept_stopped = True
        self.handover.retire()
        # a wakeup for a connection may have gone to the worker that just
        # stopped: let the current workers look at their queues
        cur = self.active
        if cur is not None and cur is not w.gen:
            for nw in cur.live():
                if nw.state == "ready":
                    self._send(nw, lib.RINGD_CMD_POKE_ACCEPT)

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
        if self.srclimit is not None:
            # gone (the pidfd said so): whatever it counted per source goes with it
            self.srclimit.release(w.source_column)
            w.source_column = None
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
        self.connmove.worker_gone(w)
        self._check_generation_done(gen)
        self._count_exit()

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
            self.handover.retire()

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
                if gen.opaque:
                    continue        # its heartbeats are in memory this image does not read
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
            self.handover.note_activity()
            line = self._status_line()
            if line != last_status:         # systemd needs no repeats
                notify.status(line)
                last_status = line

    # ------------------------------------------------------------ reload

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
            self.upgrades.error = None      # the new code's workers run now
        else:
            self.reloads_rejected += 1
            self.log.error("reload_rejected", reason=msg, generation=self.active.number)
        notify.ready(self._status_line())
        return ok, msg

    async def _reload(self, done_event: str = "reload_ok") -> tuple[bool, str]:
        """Load the file, start a generation from it and, once it accepts,
        drain the running one. Also the second half of ringd upgrade (with
        done_event "upgrade_done"), in the new image."""
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as e:
            return False, str(e)
        preflight.check_buffer_caps(new, self.log)
        old_r = self.config.ringd
        for key in ("pidfile", "control_socket", "source_table_size"):
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
            self.handover.retire()
            self.admin.discard(admin_next)
            self._restore_log(log_before)
            return False, f"new workers failed: {reason}"
        old = self.active
        self._activate(gen)
        for c in self.components:
            c.on_generation(gen, old)
        await self.admin.switch(admin_next)
        if old is not None:
            self.connmove.pair(old, gen)    # [ringd] handover: before the drain command
            self._drain_generation(old, "reload")
        self._enforce_drain_bound()
        if log_after != log_before:
            self.log.info("log_reconfigured", format=new.ringd.log_format,
                          level=new.ringd.log_level, file=new.ringd.log_file)
        self.log.info(done_event, generation=gen.number, workers=len(gen.workers),
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
        await self._all_exited(timeout)
        for gen in self.generations:
            for w in gen.live():
                self._kill_if_alive(w, "did not stop in time")
        await self._all_exited(2.0)
        for gen in list(self.generations):
            gen.state = "draining"
            self._check_generation_done(gen)

    async def _all_exited(self, timeout: float) -> None:
        """Wait until no worker of any generation is left, at most `timeout`
        seconds: their exits arrive through the pidfds (_on_worker_exit)."""
        self._no_workers = asyncio.Event()
        self._count_exit()
        try:
            await asyncio.wait_for(self._no_workers.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            self._no_workers = None

    def _count_exit(self) -> None:
        if self._no_workers is not None and not any(g.live() for g in self.generations):
            self._no_workers.set()

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
        return collect_status(self)


def _log_settings(cfg: Config) -> tuple:
    """What log.configure takes, from a config."""
    return (cfg.ringd.log_format, cfg.ringd.log_level, cfg.ringd.log_file)


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


def run(config_path: str, cfg: Config, *, test_hooks: bool = False, resume=None) -> int:
    from setproctitle import setproctitle
    setproctitle(f"ringd: master -c {config_path}")
    master = Master(config_path, cfg, test_hooks=test_hooks, resume=resume)
    return asyncio.run(master.run())
