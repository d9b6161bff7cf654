"""The one Python module that touches ringd._native.

It lays out the shared-memory segment of a generation, builds the C config a
worker runs with, and decodes worker events. Struct offsets and sizes always
come from cffi (``ffi.sizeof``/``ffi.offsetof``), never from hand-written
numbers, so the C header stays the single source of truth.
"""
from __future__ import annotations

import errno
import hashlib
import ipaddress
import mmap
import os
import socket
import struct
from dataclasses import dataclass

from ringd._native import ffi, lib

from . import edge
from .config import Config

BALANCE = {
    "round_robin": lib.RINGD_BAL_ROUND_ROBIN,
    "least_conn": lib.RINGD_BAL_LEAST_CONN,
    "hash": lib.RINGD_BAL_HASH,
    "random": lib.RINGD_BAL_RANDOM,
}
RING_MODES = {
    lib.RINGD_RING_SQPOLL: "sqpoll",
    lib.RINGD_RING_DEFER_TASKRUN: "defer_taskrun",
    lib.RINGD_RING_COOP_TASKRUN: "coop_taskrun",
    lib.RINGD_RING_PLAIN: "plain",
}
WORKER_STATES = {
    lib.RINGD_WS_STARTING: "starting",
    lib.RINGD_WS_ACCEPTING: "accepting",
    lib.RINGD_WS_DRAINING: "draining",
    lib.RINGD_WS_EXITED: "exited",
}
END_REASONS = ("done", "reset", "timeout", "drain", "connect", "resource",
               # refusals before any connect (preconnect.c)
               "denied", "proxy_header", "source_limit", "source_rate", "no_route", "peek_timeout")
REFUSALS = END_REASONS[6:]
SERVER_STATES = {
    lib.RINGD_SRV_UP: "up",
    lib.RINGD_SRV_DOWN: "down",
    lib.RINGD_SRV_DRAIN: "drain",
    lib.RINGD_SRV_MAINT: "maint",
}

EVENT_SIZE = ffi.sizeof("struct ringd_event")
CMD_SIZE = ffi.sizeof("struct ringd_cmd")
_ALIGN = 64
DEFAULT_LOG_RECORDS = 4096
WATCHDOG_PERIOD = 0.5       # the master reads every worker's heartbeat this often
HEARTBEAT_IDLE_MAX = 1.0    # an idle worker's heartbeat comes at least this often


def idle_heartbeat_ms(watchdog_timeout: float) -> int:
    """How long a worker with nothing to watch may sleep between heartbeats.

    The master notices a beat up to WATCHDOG_PERIOD late: a worker beating
    every (watchdog_timeout - WATCHDOG_PERIOD) / 4 is seen moving at least
    every quarter of the time left after that delay, so three late or
    skipped beats in a row are still no stall. Never below the 100 ms tick, never
    above HEARTBEAT_IDLE_MAX (the heartbeat is also a liveness figure in
    `ringd status` and the metrics); a disabled watchdog ("0s") gets the
    maximum."""
    period = HEARTBEAT_IDLE_MAX
    if watchdog_timeout > 0:
        period = min(period, (watchdog_timeout - WATCHDOG_PERIOD) / 4)
    return int(max(period, 0.1) * 1000)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


def sockaddr_bytes(family: int, ip: str, port: int) -> bytes:
    """struct sockaddr_in / sockaddr_in6 as the kernel wants them."""
    if family == socket.AF_INET:
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
            socket.inet_pton(socket.AF_INET, ip) + bytes(8)
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + \
        socket.inet_pton(socket.AF_INET6, ip) + struct.pack("=I", 0)


def sockaddr_text(raw: bytes, length: int) -> str:
    """Inverse of sockaddr_bytes, for logs: '1.2.3.4:5' or '[::1]:5'."""
    if length < 2:
        return "-"
    (family,) = struct.unpack_from("=H", raw, 0)
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, bytes(raw[4:8]))}:{port}"
    if family == socket.AF_INET6:
        return f"[{socket.inet_ntop(socket.AF_INET6, bytes(raw[8:24]))}]:{port}"
    return "-"


@dataclass(frozen=True)
class ServerRef:
    """A server's place in a generation's flat server table."""
    index: int
    upstream: str
    name: str


class SharedState:
    """The shared-memory segment of one generation (see ringd_api.h).

    It lives in a memfd, mapped MAP_SHARED before the workers are forked, so
    the workers share it through fork and a master that re-executes itself
    in place (ringd upgrade) can map it again from the fd it kept open
    (``adopt``). ``fd`` is that memfd (close-on-exec except across such an
    exec)."""

    def __init__(self, generation: int, nworkers: int, nlisteners: int, nservers: int,
                 log_records: int = DEFAULT_LOG_RECORDS, nroutes: int = 0, *,
                 fd: int | None = None):
        assert log_records & (log_records - 1) == 0
        self.generation = generation
        self.nworkers = nworkers
        self.nlisteners = nlisteners
        self.nservers = nservers
        self.log_capacity = log_records
        self.nroutes = nroutes

        s_hdr = ffi.sizeof("struct ringd_shm_header")
        s_srv = ffi.sizeof("struct ringd_server_shm")
        self._off_servers = _align(s_hdr)
        self._off_workers = _align(self._off_servers + s_srv * nservers)
        # inside a worker block
        self._w_lstats = ffi.sizeof("struct ringd_worker_shm")
        self._w_wsrv = self._w_lstats + ffi.sizeof("struct ringd_listener_stats") * nlisteners
        self._w_ring = _align(self._w_wsrv + ffi.sizeof("struct ringd_worker_server") * nservers)
        self._w_records = self._w_ring + ffi.sizeof("struct ringd_log_ring")
        self._w_routes = _align(self._w_records + ffi.sizeof("struct ringd_log_record") * log_records)
        self._block = _align(self._w_routes + 8 * nroutes)
        self.size = self._off_workers + self._block * nworkers

        fresh = fd is None
        if fresh:
            fd = os.memfd_create(f"ringd-gen{generation}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, self.size)
            except OSError:
                os.close(fd)
                raise
        self.fd = fd
        # (mmap keeps a duplicate of the fd of its own; close() closes both)
        self._mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = ffi.cast("char *", ffi.from_buffer(self._mm))
        if fresh:
            hdr = self.header
            hdr.abi = lib.RINGD_ABI_VERSION
            hdr.generation = generation
            hdr.nworkers = nworkers
            hdr.nlisteners = nlisteners
            hdr.nservers = nservers
            hdr.log_ring_records = log_records
            hdr.nroutes = nroutes

    @classmethod
    def adopt(cls, fd: int) -> "SharedState | str":
        """Map the segment in memfd `fd`, made by an earlier image of this
        master. Returns the SharedState, or why it cannot be read with this
        code's layout (another RINGD_ABI_VERSION, or a size that does not
        match the header); the fd is the caller's either way."""
        s_hdr = ffi.sizeof("struct ringd_shm_header")
        raw = os.pread(fd, s_hdr, 0)
        if len(raw) < 4:
            return "segment shorter than its header"
        (abi,) = struct.unpack_from("=I", raw, 0)
        if abi != lib.RINGD_ABI_VERSION:
            return f"shared memory ABI {abi}, this image has {lib.RINGD_ABI_VERSION}"
        if len(raw) < s_hdr:
            return "segment shorter than its header"
        hdr = ffi.from_buffer("struct ringd_shm_header *", bytearray(raw))
        log_records = hdr.log_ring_records
        if not log_records or log_records & (log_records - 1):
            return f"bad log ring size {log_records}"
        shm = cls.__new__(cls)
        try:
            cls.__init__(shm, hdr.generation, hdr.nworkers, hdr.nlisteners, hdr.nservers,
                         log_records, hdr.nroutes, fd=fd)
        except (OSError, ValueError) as e:
            return f"cannot map the segment: {e}"
        if os.fstat(fd).st_size != shm.size:
            shm.close(keep_fd=True)
            return "segment size does not match its header"
        return shm

    @property
    def header(self):
        return ffi.cast("struct ringd_shm_header *", self._base)

    def server(self, s: int):
        return ffi.cast("struct ringd_server_shm *",
                        self._base + self._off_servers) + s

    def _wbase(self, w: int):
        assert 0 <= w < self.nworkers
        return self._base + self._off_workers + self._block * w

    def worker(self, w: int):
        return ffi.cast("struct ringd_worker_shm *", self._wbase(w))

    def lstats(self, w: int):
        """Pointer to this worker's [nlisteners] listener stats."""
        return ffi.cast("struct ringd_listener_stats *", self._wbase(w) + self._w_lstats)

    def wsrv(self, w: int):
        return ffi.cast("struct ringd_worker_server *", self._wbase(w) + self._w_wsrv)

    def log_ring(self, w: int):
        return ffi.cast("struct ringd_log_ring *", self._wbase(w) + self._w_ring)

    def log_records(self, w: int):
        return ffi.cast("struct ringd_log_record *", self._wbase(w) + self._w_records)

    def route_conns(self, w: int):
        """Pointer to this worker's [nroutes] routed-connection counters."""
        return ffi.cast("uint64_t *", self._wbase(w) + self._w_routes)

    def bump_epoch(self) -> None:
        self.header.state_epoch += 1

    def forget_worker(self, w: int) -> dict:
        """A worker died: its open connections are gone. Fold them into the
        counters (as resets) and take its share out of the servers' active
        counts, so the slot's respawn starts from a truthful state."""
        lost = 0
        st = self.lstats(w)
        for li in range(self.nlisteners):
            active = st[li].active
            if active:
                st[li].closed[lib.RINGD_END_RESET] += active
                lost += active
                st[li].active = 0
            st[li].accept_paused = 0
        ws = self.wsrv(w)
        for s in range(self.nservers):
            if ws[s].active:
                self.server(s).active -= ws[s].active
                ws[s].active = 0
        wk = self.worker(w)
        wk.conns_active = 0
        wk.pipes_in_use = 0
        wk.pipes_idle = 0
        wk.state = lib.RINGD_WS_EXITED
        return {"connections_lost": lost}

    def close(self, keep_fd: bool = False) -> None:
        """Unmap (pointers taken from this segment must not be used after)
        and close the memfd, unless `keep_fd`."""
        self._base = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass        # a cdata view still exports it: GC unmaps it later
        if self.fd >= 0 and not keep_fd:
            os.close(self.fd)
        self.fd = -1


def server_table(config: Config) -> list[ServerRef]:
    table = []
    for up in config.upstreams:
        for srv in up.servers:
            table.append(ServerRef(len(table), up.name, srv.name))
    return table


def plan_cpus(config: Config) -> list[tuple[int, int]]:
    """(worker CPU, SQPOLL thread CPU or -1) for every worker slot.

    sqpoll = true: the poller shares its worker's CPU. false: no poller.
    "auto" (the default): a poller only where it gets a CPU of its own, i.e.
    with at least two usable CPUs per worker; worker i then runs on the i-th
    CPU and its poller on the (workers + i)-th. Measured on a 2-core host,
    a poller that shares the worker's CPU spins against the very thread that
    has to reap its completions (see README, "Performance")."""
    cpus = sorted(os.sched_getaffinity(0))
    n = config.ringd.workers
    mode = config.ring.sqpoll
    plan = []
    for slot in range(n):
        cpu = cpus[slot % len(cpus)]
        if mode is True:
            sq = cpu
        elif mode == "auto" and len(cpus) >= 2 * n:
            sq = cpus[n + slot]
        else:
            sq = -1
        plan.append((cpu, sq))
    return plan


def sqpoll_wanted(config: Config) -> bool:
    return any(sq >= 0 for _, sq in plan_cpus(config))


def ident(*parts: str) -> int:
    """A 64-bit identity that survives reloads and upgrades (a fixed hash
    of names and addresses, never an index): how a worker of a new
    generation finds the listener and server of a connection handed over to
    it. Changing this function breaks handover between versions."""
    raw = "\0".join(parts).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def listener_ident(name: str) -> int:
    return ident("listener", name)


def server_ident(upstream: str, address) -> int:
    return ident("server", upstream, str(address.family), address.ip, str(address.port))


def build_worker_cfg(config: Config, shm: SharedState, slot: int, cpu: int, sq_cpu: int,
                     acceptors: list[tuple[int, int]], control_fd: int,
                     test_hooks: bool = False, srclimit=None, srclimit_column: int = 0):
    """The struct ringd_worker_cfg for one worker, and the cdata objects that
    must stay alive as long as the C loop runs (returned together)."""
    keep = []
    nl = len(config.listeners)
    up_index = {u.name: i for i, u in enumerate(config.upstreams)}
    nworkers = shm.nworkers

    listeners = ffi.new("struct ringd_listener_cfg[]", max(nl, 1))
    first_route = 0
    for i, lst in enumerate(config.listeners):
        lc = listeners[i]
        lc.fd = next(fd for fd, li in acceptors if li == i)
        lc.upstream = up_index[lst.upstream] if lst.upstream else lib.RINGD_NO_UPSTREAM
        lc.max_conns = max(1, -(-lst.max_connections // nworkers))
        lc.connect_timeout_ms = max(1, int(lst.connect_timeout * 1000))
        lc.idle_timeout_ms = max(1, int(lst.idle_timeout * 1000))
        lc.access_log = 1 if lst.access_log else 0
        lc.backlog = lst.backlog
        lc.rcvbuf = lst.rcvbuf
        lc.sndbuf = lst.sndbuf
        lc.ident = listener_ident(lst.name)
        edge.fill_listener(ffi, lc, lst, up_index, first_route, keep)
        first_route += len(lst.routes)

    nsrv = sum(len(u.servers) for u in config.upstreams)
    upstreams = ffi.new("struct ringd_upstream_cfg[]", max(len(config.upstreams), 1))
    servers = ffi.new("struct ringd_server_cfg[]", max(nsrv, 1))
    k = 0
    for ui, up in enumerate(config.upstreams):
        uc = upstreams[ui]
        uc.first_server = k
        uc.nservers = len(up.servers)
        uc.balance = BALANCE[up.balance]
        uc.connect_retries = up.connect_retries
        uc.proxy_protocol = up.proxy_version
        uc.max_fails = up.max_fails
        uc.fail_timeout_ms = int(up.fail_timeout * 1000)
        uc.rcvbuf = up.rcvbuf
        uc.sndbuf = up.sndbuf
        for srv in up.servers:
            sc = servers[k]
            raw = sockaddr_bytes(srv.address.family, srv.address.ip, srv.address.port)
            ffi.memmove(sc.addr, raw, len(raw))
            sc.addrlen = len(raw)
            sc.weight = srv.weight
            sc.backup = 1 if srv.backup else 0
            sc.down = 1 if srv.down else 0
            sc.max_conns = srv.max_connections
            sc.upstream = ui
            sc.ident = server_ident(up.name, srv.address)
            k += 1

    ring = config.ring
    cfg = ffi.new("struct ringd_worker_cfg *")
    cfg.worker_id = slot
    cfg.cpu = cpu
    cfg.generation = shm.generation
    cfg.control_fd = control_fd
    cfg.sqpoll = 1 if sq_cpu >= 0 else 0
    cfg.sq_cpu = sq_cpu
    cfg.sq_thread_idle_ms = int(ring.sq_thread_idle * 1000)
    cfg.entries = ring.entries
    cfg.pipe_size = ring.pipe_size
    cfg.pipe_pool = ring.pipe_pool
    cfg.copy_buffer_size = ring.copy_buffer_size
    cfg.splice_threshold = min(ring.splice_threshold, (1 << 64) - 1)
    cfg.notsent_lowat = ring.notsent_lowat
    cfg.orphan_drain_ms = int(min(config.ringd.drain_timeout, 3.0) * 1000)
    cfg.heartbeat_ms = idle_heartbeat_ms(config.ringd.watchdog_timeout)
    cfg.test_hooks = 1 if test_hooks else 0
    cfg.nlisteners = nl
    cfg.nupstreams = len(config.upstreams)
    cfg.nservers = nsrv
    cfg.log_ring_records = shm.log_capacity
    cfg.listeners = listeners
    acc = ffi.new("struct ringd_acceptor_cfg[]", max(len(acceptors), 1))
    for k, (fd, li) in enumerate(acceptors):
        acc[k].fd = fd
        acc[k].listener = li
    cfg.nacceptors = len(acceptors)
    cfg.acceptors = acc
    cfg.upstreams = upstreams
    cfg.servers = servers
    cfg.hdr = shm.header
    cfg.shm = shm.worker(slot)
    cfg.lstats = shm.lstats(slot)
    cfg.srv = shm.server(0)
    cfg.wsrv = shm.wsrv(slot)
    cfg.log_ring = shm.log_ring(slot)
    cfg.log_records = shm.log_records(slot)
    # the per-source limit table: the mapping is inherited through fork;
    # a header that does not check out leaves the worker without it
    if srclimit is not None and lib.srclimit_check(srclimit.ptr, srclimit.size) == 0:
        cfg.srclimit = srclimit.ptr
        cfg.srclimit_len = srclimit.size
        cfg.srclimit_column = srclimit_column
    if shm.nroutes:
        cfg.route_conns = shm.route_conns(slot)
        cfg.nroutes = shm.nroutes
    keep.extend([listeners, upstreams, servers, acc])
    return cfg, keep


def run_worker(cfg) -> int:
    """Enter the C loop; returns 0 or a negative errno from setup."""
    return lib.ringd_worker_run(cfg)


@dataclass(frozen=True)
class Event:
    type: int
    err: int
    a: int
    b: int
    c: int
    peer: str = ""      # RINGD_EV_PROXY_BAD: the peer's address

    @property
    def error(self) -> str:
        if not self.err:
            return ""
        return f"{errno.errorcode.get(self.err, self.err)}: {os.strerror(self.err)}"


SETUP_STEPS = {1: "allocating connection table", 2: "io_uring_setup", 3: "first submit",
               4: "io_uring_enter"}


def setup_failure(ev: Event, config: Config) -> str:
    """One line for a worker's RINGD_EV_SETUP_FAILED. A ring that cannot be
    set up names the [ring] keys that shaped it, so the operator knows what
    to change."""
    reason = f"{SETUP_STEPS.get(ev.a, 'setup')} failed: {ev.error}"
    if ev.a != 2:
        return reason
    ring = config.ring
    sqpoll = ring.sqpoll if isinstance(ring.sqpoll, str) else str(ring.sqpoll).lower()
    reason += f" (ring.entries = {ring.entries}, ring.sqpoll = {sqpoll})"
    if ev.err == errno.ENOMEM:
        reason += ("; io_uring memory counts against the locked-memory limit of the workers' "
                   "user, summed over every live generation: raise LimitMEMLOCK= / ulimit -l, "
                   "or lower ring.entries")
    elif ev.err == errno.EINVAL:
        reason += "; the kernel refused the ring's size or flags: try a smaller ring.entries"
    return reason


def decode_event(data: bytes) -> Event | None:
    if len(data) < EVENT_SIZE:
        return None
    ev = ffi.from_buffer("struct ringd_event *", bytearray(data[:EVENT_SIZE]))
    if ev.type == lib.RINGD_EV_PROXY_BAD:
        return proxy_bad_event(ev.a, ev.err, ev.b, ev.c)
    return Event(ev.type, ev.err, ev.a, ev.b, ev.c)


def proxy_bad_event(a: int, err: int, b: int, c: int) -> Event:
    """RINGD_EV_PROXY_BAD as the worker packs it (ringd_api.h) ->
    Event(a=listener, b=why, c=refusals since the last, peer="ip")."""
    raw = struct.pack("=iIQ", err, b, c)
    ip = ipaddress.IPv6Address(raw)
    peer = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
    return Event(lib.RINGD_EV_PROXY_BAD, 0, a & 0xFFFF, (a >> 16) & 0xFF, a >> 24, peer)


# RINGD_EV_PROXY_BAD b -> what was wrong with the header
PROXY_BAD = {
    0: "untrusted peer (not in trusted_proxies)", 99: "not a PROXY header",
    100: "no complete header before peek_timeout, or EOF",
    1: "v1: bad line", 2: "v1: protocol not TCP4/TCP6/UNKNOWN", 3: "v1: bad address",
    4: "v1: bad port", 5: "v1: syntax", 6: "v2: version", 7: "v2: command", 8: "v2: family",
    9: "v2: length", 10: "v2: TLV overruns the header or is cut short", 11: "v2: CRC32C mismatch",
}


def encode_cmd(cmd: int, arg: int = 0) -> bytes:
    c = ffi.new("struct ringd_cmd *")
    c.cmd = cmd
    c.arg = max(0, min(int(arg), 0xFFFFFFFF))
    return bytes(ffi.buffer(c))


def probe() -> dict:
    """The liburing version (for the ringd_build metric) and whether the
    kernel skips successful completions (tests)."""
    f = ffi.new("struct ringd_features *")
    lib.ringd_probe(f)
    return {
        "liburing": f"{f.liburing_major}.{f.liburing_minor}",
        "cqe_skip": bool(f.have_cqe_skip),
    }
