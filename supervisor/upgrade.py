# Over 450 lines: both halves of one exec (what the old image sends, what the new one
# adopts) and the check between them, kept side by side so the format cannot drift.
"""In-place upgrade: `ringd upgrade` and SIGUSR2 re-execute the master.

The master execs the installed `ringd` program again, in place: the same
pid, so the pidfile, systemd's MAINPID and the workers' parent all stay.
Nothing is closed, nothing is bound again.

Old image (``Upgrades.upgrade``, a command of the master's loop):
  1. RELOADING=1 for systemd, ``upgrade_start``.
  2. The pre-exec check: the program that is about to be exec'ed runs as
     ``<program> upgrade-check -c FILE`` with the state document on stdin.
     It must start, import ringd._native and probe the kernel, load the
     config file, and prove it can read the state: its format, and the
     config text of every live generation. Any failure: ``upgrade_refused``
     with the reason, the master untouched, counted as
     ringd_upgrades_total{result="refused"}.
  3. The answer goes to the client first (its connection does not survive
     the exec), then the state is written to a memfd, the descriptors that
     must survive are made inheritable (all others are close-on-exec, as
     Python opens everything), the master's signals are blocked (their
     default action would kill the process while the new image starts up;
     the mask survives exec, so they stay pending), and execve() runs the
     same command line the master was started with. If execve fails, all
     that is undone and the upgrade counts as refused.

What crosses (the state document, JSON, ``FORMAT``): every listening socket
with its key, the control socket, the admin socket, the pidfile lock, each
live generation (its number, state, config text, shared-memory memfd, and
per worker pid, pidfd, control socket, slot, CPUs, state, times), the
counters (next generation, reloads, restarts, upgrades, the metrics of
retired generations), the per-source limit table (its memfd, and each
worker's column), server records, the lame-duck state, and whatever
else a component exports (Component.export_state: state and named fds, a
generic way for a component with a shared-memory table of its own).

New image (``Resume``, from ``ringd start`` when $RINGD_UPGRADE_STATE names
the memfd): it adopts all of that first (the control socket is served at
once, so `ringd status` works throughout), then starts a generation from
the re-read config exactly as a reload does; once it accepts, the adopted
generations drain as usual and are reaped (they are still children of this
pid). If the new workers fail, the adopted generation stays active, the
error is logged (``upgrade_failed``) and shown by status (``upgrade_error``),
counted as result="failed".

Format rules: unknown keys are ignored, missing keys take defaults, so
`FORMAT` rises only when an old reader would misread a document;
``min_reader`` says the lowest reader format that can adopt it. The check
runs the new code on the document before the exec: a format it cannot read
is refused while the old image still runs (after the exec there is no way
back). A generation whose shared memory has another RINGD_ABI_VERSION is
adopted *opaque*: drained through its control channel (whose structs never
change), reaped, never read; its counters are those the old image wrote
into the document before the exec (what it counts after is lost), its
access log records after the exec too.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from . import PACKAGE_VERSION, __version__
from . import config as config_mod
from . import log, notify, pidfile
from .generation import Generation, SlotState, WorkerProc
from .listeners import SocketKey
from .metrics import Totals
from .native import SharedState, lib, plan_cpus

FORMAT = 1              # of the documents this code writes
MIN_READER = 1          # the oldest reader format that can adopt them
OLDEST_READABLE = 1     # the oldest format this code can adopt
ENV = "RINGD_UPGRADE_STATE"     # the memfd's number, in the new image's environment
CHECK_TIMEOUT = 30.0    # the pre-exec check must answer within this
REPLY_GRACE = 2.0       # the client's answer is written before the exec, within this
# test hook: while it exists, the check fails ("import") or takes longer ("sleep N")
FAIL_HOOK = "RINGD_TEST_UPGRADE_FAIL_FILE"
# test hook: while it exists, the new image adopts every generation opaque, as
# if its shared memory had another layout
OPAQUE_HOOK = "RINGD_TEST_UPGRADE_OPAQUE_FILE"

# the master's signals; blocked across the exec, unblocked by the new image
# once its handlers are in place
SIGNALS = {signal.SIGHUP: "reload", signal.SIGQUIT: "graceful_stop",
           signal.SIGTERM: "fast_stop", signal.SIGINT: "fast_stop",
           signal.SIGUSR1: "reopen", signal.SIGUSR2: "upgrade"}


def start_command() -> tuple[list[str], list[str]]:
    """(program, argv): how this image was started. `program` runs ringd
    (for the check), `argv` is the whole command line, executed again as it
    was, so that files a package upgrade replaced are what runs.

    An installed console script (/usr/bin/ringd, .venv/bin/ringd) runs as
    itself (its #! line may have changed too); `python -m ringd` runs as the
    same interpreter with the same options."""
    args = sys.argv[1:]
    orig = list(sys.orig_argv)
    head = orig[:len(orig) - len(args)] if args else orig
    script = sys.argv[0]
    if "-m" not in head and script and os.access(script, os.X_OK) \
            and not script.endswith(".py"):
        program = [os.path.abspath(script)]
    elif "-m" in head:
        program = [sys.executable] + head[1:]
    else:
        program = [sys.executable] + head[1:-1] + [os.path.abspath(script)]
    return program, program + args


def _memfd(name: str, data: bytes = b"", inheritable: bool = False) -> int:
    fd = os.memfd_create(name, 0 if inheritable else os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_fd(fd: int, limit: int = 256 << 20) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, size = [], 0
    while size < limit:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
        size += len(b)
    return b"".join(chunks)


def _key(k: SocketKey) -> list:
    return [k.family, k.ip, k.port, k.slot]


def _unkey(v) -> SocketKey:
    return SocketKey(int(v[0]), str(v[1]), int(v[2]), int(v[3]))


# --------------------------------------------------------------------------- old image

class Upgrades:
    """The master's side of in-place upgrades: the command, the counts."""

    def __init__(self, master):
        self.master = master
        self.program, self.argv = start_command()
        self.counts = {"ok": 0, "refused": 0, "failed": 0}
        self.attempts = 0           # every request, refused ones too
        self.execs = 0              # images exec'ed in place (= `upgrades` in status)
        self.last: dict | None = None   # the last attempt: attempt, state, reason, ...
        self.error: str | None = None   # the last exec'ed upgrade's workers failed
        self._reply_sent: asyncio.Event | None = None

    def snapshot(self) -> dict:
        return dict(self.last) if self.last else {}

    def refuse_request(self, reason: str) -> None:
        """Refused before it was queued (a -c naming another file)."""
        self.attempts += 1
        self._refused(self.attempts, reason)

    def _refused(self, attempt: int, reason: str) -> tuple[bool, str]:
        self.counts["refused"] += 1
        self.last = dict(self.last or {}, attempt=attempt, state="refused", reason=reason,
                         at=time.time())
        self.master.log.error("upgrade_refused", attempt=attempt, reason=reason)
        return False, reason

    def reply_written(self) -> None:
        if self._reply_sent is not None:
            self._reply_sent.set()

    async def upgrade(self, fut) -> tuple[bool, str]:
        """The `upgrade` command. Returns only if the upgrade was refused or
        the exec failed; otherwise this process is the new image."""
        m = self.master
        self.attempts += 1
        attempt = self.attempts
        self.last = {"attempt": attempt, "state": "checking", "reason": "", "at": time.time(),
                     "program": " ".join(self.argv), "from_version": __version__,
                     "from_package": PACKAGE_VERSION}
        if m.stopping or m.lameduck.state == "stopping":
            return self._refused(attempt, "ringd is stopping")
        notify.reloading("upgrading in place")
        m.log.info("upgrade_start", attempt=attempt, program=self.argv[0], argv=self.argv,
                   version=__version__, package_version=PACKAGE_VERSION)
        try:
            ok, info = await self._check()
        except Exception as e:      # never let a bug here take the master down
            m.log.exception("upgrade_check_error", error=repr(e))
            ok, info = False, f"internal error: {e!r}"
        if not ok or m.stop_event.is_set():
            result = self._refused(attempt, info if not ok else "a stop was requested meanwhile")
            notify.ready(m._status_line())
            return result
        self.last.update(state="exec", to_version=info.get("version"),
                         to_package=info.get("package_version"))
        if fut is not None and not fut.done():
            # the client's connection closes with the exec: answer first
            self._reply_sent = asyncio.Event()
            fut.set_result((True, {"attempt": attempt, "pid": os.getpid(),
                                   "exec_started": m.exec_started, "upgrades": self.execs,
                                   "to_version": info.get("version"),
                                   "to_package": info.get("package_version")}))
            try:
                await asyncio.wait_for(self._reply_sent.wait(), REPLY_GRACE)
            except asyncio.TimeoutError:
                pass
            self._reply_sent = None
        # From here on the master's signals stay pending for the new image.
        # One that arrived just before the block is in asyncio's wakeup pipe:
        # let the loop turn it into a command first.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS))
        for _ in range(3):
            await asyncio.sleep(0)
        if m.stop_event.is_set():
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            result = self._refused(attempt, "a stop was requested meanwhile")
            notify.ready(m._status_line())
            return result
        # commands that waited behind this one: a client's is answered (its
        # connection does not survive the exec), a signal's is handed over
        pending = []
        while not m.commands.empty():
            cmd, waiting = m.commands.get_nowait()
            if waiting is None:
                pending.append(cmd)
            elif not waiting.done():
                waiting.set_result((False, "ringd re-executed itself (ringd upgrade) "
                                           "meanwhile: ask again"))
        m.log.info("upgrade_exec", attempt=attempt, argv=self.argv,
                   to_version=info.get("version"), to_package=info.get("package_version"),
                   opaque_generations=info.get("opaque", []), pending=pending or None)
        reason = self._exec(pending)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for cmd in pending:
            m.commands.put_nowait((cmd, None))
        result = self._refused(attempt, reason)
        notify.ready(m._status_line())
        return result

    async def _check(self) -> tuple[bool, dict | str]:
        """Run the new program's `upgrade-check` on the state document."""
        m = self.master
        doc, _ = export_state(m)
        argv = self.program + ["upgrade-check", "-c", m.config_path]
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)      # systemd hears the master, nobody else
        if m.test_hooks:
            env["RINGD_TEST_HOOKS"] = "1"
        fds = [_memfd("ringd-upgrade-check", json.dumps(doc).encode()),
               _memfd("ringd-upgrade-out"), _memfd("ringd-upgrade-err")]
        try:
            try:
                proc = subprocess.Popen(argv, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                        env=env, close_fds=True)
            except OSError as e:
                return False, f"cannot run {argv[0]}: {e.strerror or e}"
            timed_out = not await _wait_exit(proc, CHECK_TIMEOUT)
            rc = proc.wait()
            out = _read_fd(fds[1], 1 << 20).decode("utf-8", "replace")
            err = _read_fd(fds[2], 1 << 20).decode("utf-8", "replace")
        finally:
            for fd in fds:
                os.close(fd)
        if timed_out:
            return False, (f"the new program ({' '.join(argv[:3])} ...) did not finish its check "
                           f"within {CHECK_TIMEOUT:.0f}s")
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        if rc != 0:
            why = "; ".join(lines[-5:]) or f"exit status {rc}"
            return False, f"the new program's check failed: {why[-1500:]}"
        try:
            info = json.loads(out.strip().splitlines()[-1])
            if not isinstance(info, dict) or not info.get("ok"):
                raise ValueError(info)
        except (ValueError, IndexError):
            return False, f"the new program's check printed no answer: {out[-300:]!r}"
        return True, info

    def _exec(self, pending: list[str]) -> str:
        """execve the start command with the state (signals are blocked);
        returns why it failed."""
        m = self.master
        doc, fds = export_state(m)
        doc["pending"] = pending
        try:
            state = _memfd("ringd-upgrade-state", json.dumps(doc).encode(), inheritable=True)
        except OSError as e:
            return f"cannot write the state: {e.strerror}"
        env = dict(os.environ)
        env[ENV] = str(state)
        made: list[int] = []
        try:
            for fd in fds:
                os.set_inheritable(fd, True)
                made.append(fd)
            log.STREAM.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(self.argv[0], self.argv, env)
        except OSError as e:
            for fd in made:
                try:
                    os.set_inheritable(fd, False)
                except OSError:
                    pass
            os.close(state)
            return f"exec {self.argv[0]} failed: {e.strerror or e}"
        raise AssertionError("unreachable")     # pragma: no cover

    # ------------------------------------------------------------ new image

    async def complete(self) -> None:
        """New image, everything adopted: a generation of the new code from the
        re-read file, as a reload makes it; the adopted ones drain."""
        m = self.master
        attempt = (self.last or {}).get("attempt", self.attempts)
        self.last = dict(self.last or {}, state="starting", to_version=__version__,
                         to_package=PACKAGE_VERSION)
        try:
            ok, msg = await m._reload(done_event="upgrade_generation_ready")
        except Exception as e:
            m.log.exception("upgrade_error", error=repr(e))
            ok, msg = False, f"internal error: {e!r}"
        took = round(time.time() - (self.last.get("at") or time.time()), 3)
        if ok:
            self.counts["ok"] += 1
            self.error = None
            self.last.update(state="ok", reason=msg, done=time.time())
            m.log.info("upgrade_done", attempt=attempt, pid=os.getpid(),
                       generation=m.active.number, version=__version__,
                       package_version=PACKAGE_VERSION, seconds=took,
                       draining=[g.number for g in m.generations if g.state == "draining"])
        else:
            self.counts["failed"] += 1
            self.error = msg
            self.last.update(state="failed", reason=msg, done=time.time())
            m.log.error("upgrade_failed", attempt=attempt, reason=msg, seconds=took,
                        generation=m.active.number if m.active else None,
                        hint="the new image runs and keeps the adopted generation serving; "
                             "fix the cause, then ringd reload or ringd upgrade")
        notify.ready(m._status_line())

    def export(self) -> dict:
        return {"counts": self.counts, "attempts": self.attempts, "execs": self.execs,
                "last": self.last, "error": self.error}

    def adopt(self, doc: dict) -> None:
        for k, v in doc.get("counts", {}).items():
            self.counts[str(k)] = int(v)
        self.attempts = int(doc.get("attempts", 0))
        self.execs = int(doc.get("execs", 0)) + 1      # this image is one more
        self.last = doc.get("last") or None
        self.error = doc.get("error")


async def _wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for `proc` through a pidfd (no thread, no SIGCHLD); kill it after
    `timeout` seconds. True if it exited by itself."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(proc.pid)
    fut = loop.create_future()
    loop.add_reader(pidfd, lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except asyncio.TimeoutError:
        proc.kill()
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


# --------------------------------------------------------------------------- the document

def export_state(m) -> tuple[dict, list[int]]:
    """The state document of master `m` and the descriptors it names."""
    fds: list[int] = []

    def fd(n: int) -> int:
        fds.append(n)
        return n

    configs: dict[str, str] = {}
    gens = []
    for g in m.generations:
        text = g.config.source
        digest = hashlib.sha256(text.encode()).hexdigest()
        configs[digest] = text
        workers = []
        for w in g.live():
            workers.append({
                "slot": w.slot, "pid": w.pid, "pidfd": fd(w.pidfd), "ctrl": fd(w.ctrl.fileno()),
                "cpu": w.cpu, "sq_cpu": w.sq_cpu, "state": w.state, "started": w.started,
                "ready_at": w.ready_at, "ring_mode": w.ring_mode, "hb_value": w.hb_value,
                "hb_changed": w.hb_changed, "accept_stopped": w.accept_stopped,
                "killed": w.killed, "fail_reason": w.fail_reason,
                "source_column": w.source_column})
        gens.append({
            "number": g.number, "state": g.state, "config": digest,
            "nworkers": len(g.workers),
            "version": g.version, "package_version": g.package_version,
            "ctrl_version": g.ctrl_version,
            "abi": None if g.opaque else lib.RINGD_ABI_VERSION,
            "shm_fd": None if g.opaque else fd(g.shm.fd),
            "drain_started": g.drain_started, "fail_reasons": g.fail_reasons,
            "socket_keys": [_key(k) for k in g.socket_keys],
            "adopted": [_key(k) for k in g.adopted],
            "released_slots": sorted(g.released_slots),
            "slots": [{"crashes": st.crashes, "held_back": st.held_back} for st in g.slots],
            # what it counted until now: the next image keeps this if it cannot
            # read the segment itself
            "counters": Totals.of(g).to_json() if not g.opaque else {},
            "workers": workers})
    components, named = {}, {}
    for c in m.components:
        state, cfds = c.export_state()
        if c.state_key:
            components[c.state_key] = state
            for name, n in cfds.items():
                named[f"{c.state_key}/{name}"] = fd(n)
    listeners = m.sockets.export()
    for e in listeners:
        fd(e["fd"])
    doc = {
        "format": FORMAT, "min_reader": MIN_READER,
        "image": {"version": __version__, "package_version": PACKAGE_VERSION,
                  "abi": lib.RINGD_ABI_VERSION, "ctrl_version": lib.RINGD_CTRL_VERSION,
                  "exec_started": m.exec_started, "argv": m.upgrades.argv},
        "config_path": m.config_path,
        "log": list(log.SETTINGS),
        "master": {"started_at": m.started_at, "next_gen": m.next_gen,
                   "reloads_ok": m.reloads_ok, "reloads_rejected": m.reloads_rejected,
                   "worker_restarts": m.worker_restarts,
                   "source_table_no_column": m.source_table_no_column,
                   "active": m.active.number if m.active else None},
        "upgrades": m.upgrades.export(),
        # connection handover counters of retired generations (ringd.connmove)
        "connmove": m.connmove.export(),
        "pidfile": {"path": m.pidfile.path, "fd": fd(m.pidfile.fd)},
        # the per-source limit table (ringd.srclimit): one per master lifetime
        "srclimit": _source_table(m, fd),
        "control": {"path": m.control.path, "fd": fd(m.control.fileno())},
        "listeners": listeners,
        "handover": {"activity": [[a[0], a[1], a[2], n, t]
                                  for a, (n, t) in m.handover._activity.items()]},
        "configs": configs,
        "generations": gens,
        "components": components,
        "fds": named,
    }
    return doc, fds


def _source_table(m, fd) -> dict | None:
    if m.srclimit is None:
        return None
    n = m.srclimit.export_fd()
    os.set_inheritable(n, False)        # only across the exec itself (Upgrades._exec)
    return {"fd": fd(n), "version": lib.SRCLIMIT_VERSION}


class ResumeError(Exception):
    """The state document cannot be adopted by this code."""


def check_document(doc) -> tuple[dict[int, object], list[int]]:
    """What the new image will make of `doc`: ({generation: Config}, numbers
    of the generations it adopts opaque). ResumeError if it cannot adopt it."""
    if not isinstance(doc, dict):
        raise ResumeError("the state is not a JSON object")
    try:
        fmt, min_reader = int(doc.get("format", 0)), int(doc.get("min_reader", 0))
    except (TypeError, ValueError):
        raise ResumeError("the state has no readable format number") from None
    if min_reader > FORMAT:
        raise ResumeError(f"state format {fmt} needs a reader of format {min_reader}; "
                          f"this program reads up to format {FORMAT}")
    if fmt < OLDEST_READABLE:
        raise ResumeError(f"state format {fmt} is older than this program reads "
                          f"({OLDEST_READABLE}..{FORMAT})")
    configs, opaque = {}, []
    path = doc.get("config_path") or "<adopted>"
    for g in doc.get("generations", []):
        text = doc.get("configs", {}).get(g.get("config"))
        if text is None:
            raise ResumeError(f"generation {g.get('number')}: its config text is missing")
        try:
            configs[int(g["number"])] = config_mod.loads(text, path)
        except config_mod.ConfigError as e:
            raise ResumeError(f"generation {g.get('number')} runs a config this program "
                              f"rejects: {e}") from None
        if g.get("abi") != lib.RINGD_ABI_VERSION:
            opaque.append(int(g["number"]))
    return configs, opaque


class Resume:
    """The new image's side: the document, and adopting what it names."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.configs, self.opaque = check_document(doc)
        self.config_path = str(doc.get("config_path"))
        self.control_path = str(doc.get("control", {}).get("path"))
        self.control_fd = doc.get("control", {}).get("fd")
        self.log_settings = tuple(doc.get("log") or ("auto", "info", None))
        self.source_table_adopted = False

    @classmethod
    def from_fd(cls, fd: int) -> "Resume":
        try:
            data = _read_fd(fd)
        except OSError as e:
            raise ResumeError(f"cannot read the state (fd {fd}): {e.strerror}") from None
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ResumeError(f"the state is not JSON: {e}") from None
        return cls(doc)

    def active_config(self):
        """The config of the generation that was active, else None."""
        number = self.doc.get("master", {}).get("active")
        return self.configs.get(number) if number is not None else None

    def adopt_pidfile(self, m) -> pidfile.Pidfile:
        p = self.doc.get("pidfile", {})
        return pidfile.Pidfile.adopt(str(p.get("path")), int(p.get("fd", -1)))

    def adopt_sockets(self, m) -> None:
        for problem in m.sockets.adopt_exported(self.doc.get("listeners", [])):
            m.log.error("upgrade_socket_lost", problem=problem)
        if self.control_fd is not None:
            try:
                os.set_inheritable(int(self.control_fd), False)
            except OSError:
                self.control_fd = None
        now = time.monotonic()
        for fam, ip, port, n, t in self.doc.get("handover", {}).get("activity", []):
            m.handover._activity[(int(fam), str(ip), int(port))] = (int(n), min(float(t), now))

    def adopt_source_table(self, m) -> None:
        """The per-source limit table, with the columns of the workers that
        live on. A table this code cannot read (another layout) is left to
        the adopted workers, which keep counting in their mapping of it, and
        the new generation starts a table of its own (master start)."""
        self.source_table_adopted = False
        sdoc = self.doc.get("srclimit") or {}
        if sdoc.get("fd") is None:
            return
        from .srclimit import SourceTable, SourceTableError
        held = {int(w["source_column"]): int(w["pid"])
                for g in self.doc.get("generations", []) for w in g.get("workers", [])
                if w.get("source_column") is not None}
        fd = int(sdoc["fd"])
        try:
            m.srclimit = SourceTable.adopt(fd, held)
            self.source_table_adopted = True
        except SourceTableError as e:
            try:
                os.close(fd)
            except OSError:
                pass
            m.log.warning("source_table_not_adopted", reason=str(e),
                          hint="the adopted workers keep counting in the old table and the "
                               "new ones in a new table until the old generation has drained: "
                               "per-source limits apply to each half apart meanwhile")

    def import_components(self, m) -> None:
        fds: dict[str, dict[str, int]] = {}
        for name, n in self.doc.get("fds", {}).items():
            key, _, sub = name.partition("/")
            try:
                os.set_inheritable(int(n), False)
            except OSError:
                continue
            fds.setdefault(key, {})[sub] = int(n)
        states = self.doc.get("components", {})
        for c in m.components:
            if c.state_key:
                c.import_state(states.get(c.state_key, {}), fds.pop(c.state_key, {}))
        for key, left in fds.items():      # nobody here wants them
            for n in left.values():
                os.close(n)
            m.log.warning("upgrade_state_unused", component=key)
        mdoc = self.doc.get("master", {})
        m.started_at = float(mdoc.get("started_at", m.started_at))
        m.next_gen = int(mdoc.get("next_gen", m.next_gen))
        m.reloads_ok = int(mdoc.get("reloads_ok", 0))
        m.reloads_rejected = int(mdoc.get("reloads_rejected", 0))
        m.worker_restarts = int(mdoc.get("worker_restarts", 0))
        m.source_table_no_column = int(mdoc.get("source_table_no_column", 0))
        m.upgrades.adopt(self.doc.get("upgrades", {}))
        m.connmove.adopt(self.doc.get("connmove", {}))

    async def adopt_generations(self, m) -> None:
        """Every live generation and its workers; events they sent while the
        exec ran are read once all are in place (an event can close sockets,
        which must see every generation that still needs them)."""
        from .master import KILL_AFTER_DRAIN
        active_number = self.doc.get("master", {}).get("active")
        adopted = []
        for gdoc in self.doc.get("generations", []):
            try:
                gen = self._generation(m, gdoc)
            except Exception as e:      # a bug: keep going with the others
                m.log.exception("upgrade_adopt_error", gen=gdoc.get("number"), error=repr(e))
                continue
            m.generations.append(gen)
            if gen.number == active_number:
                gen.state = "active"
                m.active = gen
                m.config = gen.config
            adopted.append((gen, gdoc))
        for gen, gdoc in adopted:
            for c in m.components:
                c.prepare_generation(gen)       # server states into its table
            for wdoc in gdoc.get("workers", []):
                try:
                    self._worker(m, gen, wdoc)
                except Exception as e:
                    m.log.exception("upgrade_adopt_error", gen=gen.number,
                                    worker=wdoc.get("slot"), error=repr(e))
            if gen is m.active:
                self._respawn_missing(m, gen)
            elif gen.state == "draining":
                for w in gen.live():
                    left = gen.drain_started + gen.config.ringd.drain_timeout - time.monotonic()
                    m.loop.call_later(max(0.0, left) + KILL_AFTER_DRAIN, m._kill_if_alive, w,
                                      "drain deadline passed")
            m.log.info("generation_adopted", gen=gen.number, state=gen.state,
                       workers=[w.pid for w in gen.live()], version=gen.version,
                       package_version=gen.package_version, opaque=gen.opaque or None)
        for gen, _ in adopted:
            for w in gen.live():
                m._on_worker_event(w)       # what it said while the exec ran
        for gen in list(m.generations):
            m._check_generation_done(gen)

    def _generation(self, m, gdoc: dict) -> Generation:
        number = int(gdoc["number"])
        cfg = self.configs[number]
        nworkers = int(gdoc.get("nworkers", cfg.ringd.workers))
        if nworkers != cfg.ringd.workers:       # workers = "auto" on another CPU count
            import dataclasses
            cfg = dataclasses.replace(cfg, ringd=dataclasses.replace(cfg.ringd, workers=nworkers))
        shm, why = None, ""
        fd = gdoc.get("shm_fd")
        hook = os.environ.get(OPAQUE_HOOK) if m.test_hooks else None
        if fd is not None and hook and os.path.exists(hook):
            os.close(int(fd))
            why = "test hook: taken for another shared memory layout"
        elif fd is not None:
            os.set_inheritable(int(fd), False)
            adopted = SharedState.adopt(int(fd))
            if isinstance(adopted, SharedState):
                shm = adopted
            else:
                why = adopted
                os.close(int(fd))
        else:
            why = "no segment handed over (opaque already)"
        gen = Generation(number, cfg, shm)
        gen.opaque = shm is None
        if gen.opaque:
            m.log.warning("generation_opaque", gen=number, reason=why,
                          hint="drained through its control channel; its counters stop at "
                               "what the previous image saw")
            if m.admin is not None:
                m.admin.totals.add(Totals.from_json(gdoc.get("counters", {})))
        gen.state = str(gdoc.get("state", "draining"))
        gen.version = gdoc.get("version")
        gen.package_version = gdoc.get("package_version")
        gen.ctrl_version = int(gdoc.get("ctrl_version", 1))
        gen.drain_started = gdoc.get("drain_started")
        if gen.state == "draining" and gen.drain_started is None:
            gen.drain_started = time.monotonic()
        gen.fail_reasons = list(gdoc.get("fail_reasons", []))
        gen.socket_keys = {_unkey(k) for k in gdoc.get("socket_keys", [])} or gen.socket_keys
        gen.adopted = {_unkey(k) for k in gdoc.get("adopted", [])}
        gen.released_slots = set(gdoc.get("released_slots", []))
        for st, sdoc in zip(gen.slots, gdoc.get("slots", [])):
            st.crashes = int(sdoc.get("crashes", 0))
            st.held_back = bool(sdoc.get("held_back", False))
        return gen

    def _worker(self, m, gen: Generation, wdoc: dict) -> None:
        pidfd, ctrl_fd = int(wdoc["pidfd"]), int(wdoc["ctrl"])
        os.set_inheritable(pidfd, False)
        os.set_inheritable(ctrl_fd, False)
        slot = int(wdoc["slot"])
        if not 0 <= slot < len(gen.workers) or gen.workers[slot] is not None:
            raise ValueError(f"no free slot {slot} in generation {gen.number}")
        ctrl = socket.socket(fileno=ctrl_fd)
        ctrl.setblocking(False)
        state = str(wdoc.get("state", "ready"))
        w = WorkerProc(slot=slot, cpu=int(wdoc.get("cpu", -1)), sq_cpu=int(wdoc.get("sq_cpu", -1)),
                       gen=gen, pid=int(wdoc["pid"]), pidfd=pidfd, ctrl=ctrl, state=state,
                       ready=m.loop.create_future() if state == "starting" else None)
        for f in ("started", "ready_at", "hb_changed"):
            if wdoc.get(f) is not None:
                setattr(w, f, float(wdoc[f]))
        w.ring_mode = str(wdoc.get("ring_mode", ""))
        w.hb_value = int(wdoc.get("hb_value", -1))
        w.accept_stopped = bool(wdoc.get("accept_stopped", False))
        w.killed = str(wdoc.get("killed", ""))
        w.fail_reason = str(wdoc.get("fail_reason", ""))
        col = wdoc.get("source_column")
        # a column of the table this image adopted; of another table (not
        # adopted) it is none of ours: the worker keeps counting there
        if col is not None and m.srclimit is not None and self.source_table_adopted:
            w.source_column = int(col)
        gen.workers[slot] = w
        m.loop.add_reader(pidfd, m._on_worker_exit, w)
        m.loop.add_reader(ctrl_fd, m._on_worker_event, w)

    def requeue(self, m) -> None:
        """Signals the previous image took but had not handled yet."""
        for cmd in self.doc.get("pending", []):
            if cmd in SIGNALS.values():
                m.commands.put_nowait((cmd, None))

    def _respawn_missing(self, m, gen: Generation) -> None:
        """Slots of the active generation whose worker was down at the exec
        come back as they would have (the new generation replaces them all
        if it starts)."""
        plan = plan_cpus(gen.config)
        for slot, w in enumerate(gen.workers[:len(plan)]):
            if w is None:
                cpu, sq = plan[slot]
                gen.slots[slot].respawn = m.loop.call_later(
                    gen.config.ringd.respawn_delay, m._respawn, gen, slot, cpu, sq)


def resume_main(fd_text: str, test_hooks: bool) -> int:
    """`ringd start` in the image an upgrade exec'ed: adopt and run."""
    try:
        resume = Resume.from_fd(int(fd_text))
    except (ResumeError, ValueError) as e:
        # nothing adopted: the workers of the previous image see their
        # control channels close with this process and drain on their own
        print(f"ringd: cannot adopt the running master's state after the upgrade: {e}",
              file=sys.stderr)
        return 1
    try:
        log.configure(*resume.log_settings)
    except OSError:
        log.configure(resume.log_settings[0], resume.log_settings[1], None)
    cfg = resume.active_config()
    if cfg is None:
        try:
            cfg = config_mod.load(resume.config_path)
        except config_mod.ConfigError as e:
            log.get().error("upgrade_adopt_failed", reason=str(e))
            return 1
    from . import master
    return master.run(resume.config_path, cfg, test_hooks=test_hooks, resume=resume)


# --------------------------------------------------------------------------- the check

def check_main(config_path: str) -> int:
    """`ringd upgrade-check -c FILE` (hidden): run by a master before it execs
    this program in place. Reads the state document on stdin; prints one
    JSON line and exits 0, or says why not on stderr and exits 1."""
    hook = os.environ.get(FAIL_HOOK) if os.environ.get("RINGD_TEST_HOOKS") == "1" else None
    if hook and os.path.exists(hook):
        with open(hook) as f:
            what = f.read().strip() or "import"
        if what == "import":
            print("cannot import ringd._native: simulated failure (test hook)", file=sys.stderr)
            return 1
        if what.startswith("sleep "):       # a slow check: things happen meanwhile
            time.sleep(float(what.split()[1]))
    try:
        from . import native
        # everything the master imports, so that a broken module shows now
        from . import (accesslog, admin, control, health, master, metrics,  # noqa: F401
                       servers, status)
        from .worker import main as worker_main  # noqa: F401
    except ImportError as e:
        print(f"cannot import ringd: {e}", file=sys.stderr)
        return 1
    # the probe sets up a small ring: a kernel or seccomp policy without
    # io_uring shows here, before the exec
    feat = native.ffi.new("struct ringd_features *")
    ret = native.lib.ringd_probe(feat)
    if ret < 0:
        print(f"ringd._native cannot set up an io_uring: {os.strerror(-ret)}", file=sys.stderr)
        return 1
    try:
        config_mod.load(config_path)
    except config_mod.ConfigError as e:
        for issue in e.errors:
            print(str(issue), file=sys.stderr)
        return 1
    opaque: list[int] = []
    data = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    if data.strip():
        try:
            _, opaque = check_document(json.loads(data))
        except ValueError as e:
            print(f"the running master's state is not JSON: {e}", file=sys.stderr)
            return 1
        except ResumeError as e:
            print(f"cannot adopt the running master: {e}", file=sys.stderr)
            return 1
    print(json.dumps({"ok": True, "version": __version__, "package_version": PACKAGE_VERSION,
                      "abi": lib.RINGD_ABI_VERSION, "ctrl_version": lib.RINGD_CTRL_VERSION,
                      "state_format": FORMAT,
                      "liburing": f"{feat.liburing_major}.{feat.liburing_minor}",
                      "opaque": opaque}))
    return 0
