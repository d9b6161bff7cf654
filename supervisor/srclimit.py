"""The per-source limit table, master side (the table is native/srclimit.c).

One table per master lifetime, in a memfd mapped MAP_SHARED: every worker
process of every generation counts its connections per source in it (the
workers inherit the mapping through fork), so limits hold across workers and
across reloads. Sized once from ``[ringd] source_table_size``; a reload that
changes the size is logged and takes effect at the next restart.

Columns: every worker process gets a column at spawn (``assign``) and the
master clears it when it reaps the process (``release``): the counts of a
worker that died, however it died, go with it. There are
``columns_for_host()`` columns, 4 per CPU (at least 16): enough for the
current generation, one starting and a few draining. A worker spawned when
all are taken runs without the table (its connections are admitted
untracked), which is logged.

The in-place upgrade (issue 12) hands the table to the next master image
across exec: ``export_fd()`` before the exec, ``SourceTable.adopt(fd,
held)`` after it, with the columns of the workers that survive.
"""
from __future__ import annotations

import hashlib
import ipaddress
import mmap
import os

from ringd._native import ffi, lib

MIN_COLUMNS = 16
COLUMNS_PER_CPU = 4
RESULTS = {
    lib.SRCLIMIT_OK: "ok",
    lib.SRCLIMIT_OVER_OPEN: "over_open",
    lib.SRCLIMIT_OVER_RATE: "over_rate",
    lib.SRCLIMIT_UNTRACKED: "untracked",
}
COUNTERS = ("used", "evictions", "untracked", "contended", "lock_timeouts", "release_errors",
            "forced_unlocks")


class SourceTableError(Exception):
    """The table could not be created or adopted (one line for the operator)."""


def columns_for_host(workers: int = 0) -> int:
    """Columns a table needs on this host: 4 per CPU or per configured
    worker, whichever is more, at least 16, at most SRCLIMIT_MAX_COLUMNS."""
    n = max(os.cpu_count() or 1, workers)
    return max(MIN_COLUMNS, min(lib.SRCLIMIT_MAX_COLUMNS, COLUMNS_PER_CPU * n))


def listener_key(name: str) -> int:
    """The 64-bit lkey of a listener: a hash of its name, so a listener keeps
    its counts across reloads (and two listeners never share them)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def source_address(ip: str, prefix_v6: int = 64) -> bytes:
    """The 16-byte addr of a client: IPv4 as ::ffff:a.b.c.d, IPv6 masked to
    prefix_v6 bits (tests and tooling; the worker does the same in C)."""
    a = ipaddress.ip_address(ip)
    if a.version == 4:
        return bytes(10) + b"\xff\xff" + a.packed
    if a.ipv4_mapped is not None:
        return a.packed
    bits = int.from_bytes(a.packed, "big")
    mask = ((1 << 128) - 1) ^ ((1 << (128 - prefix_v6)) - 1)
    return (bits & mask).to_bytes(16, "big")


class SourceTable:
    """A per-source limit table in a memfd (see the module docstring)."""

    def __init__(self, fd: int, mm: mmap.mmap, size: int):
        self._fd = fd
        self._mm = mm
        self.size = size
        self.ptr = ffi.cast("void *", ffi.from_buffer(mm))
        h = self.header
        self.entries = h.entries
        self.columns = h.columns
        self._owner: dict[int, int | None] = {}     # column in use -> pid (None: not forked yet)

    # ------------------------------------------------------------ life

    @classmethod
    def create(cls, entries: int, columns: int | None = None) -> "SourceTable":
        """A new, empty table of `entries` slots (memory is taken as slots
        are used, not now). Raises SourceTableError."""
        columns = columns or columns_for_host()
        size = lib.srclimit_bytes(entries, columns)
        if not size:
            raise SourceTableError(f"source table of {entries} entries and {columns} columns "
                                   "is out of range")
        fd = -1
        try:
            fd = os.memfd_create("ringd-source-table", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise SourceTableError(f"cannot create the source table ({size} bytes): "
                                   f"{e.strerror}") from e
        rc = lib.srclimit_init(ffi.cast("void *", ffi.from_buffer(mm)), size, entries, columns)
        if rc != 0:
            mm.close()
            os.close(fd)
            raise SourceTableError(f"cannot initialise the source table: {os.strerror(-rc)}")
        return cls(fd, mm, size)

    @classmethod
    def adopt(cls, fd: int, held: dict[int, int] | None = None) -> "SourceTable":
        """Map a table another master image created (``export_fd`` before
        an exec). The fd becomes ours (close-on-exec again). `held` maps the
        columns of worker processes that live on to their pids: those stay
        taken until ``release``; every other column is cleared now, since
        no process of ours can be counting in it. Raises SourceTableError."""
        try:
            size = os.fstat(fd).st_size
            os.set_inheritable(fd, False)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as e:
            raise SourceTableError(f"cannot map the inherited source table: {e}") from e
        if lib.srclimit_check(ffi.cast("void *", ffi.from_buffer(mm)), size) != 0:
            mm.close()
            raise SourceTableError("the inherited source table has an unknown layout")
        t = cls(fd, mm, size)
        held = dict(held or {})
        for col in range(t.columns):
            if col in held:
                t._owner[col] = held[col]
            else:
                lib.srclimit_clear_column(t.ptr, col)
        return t

    def export_fd(self) -> int:
        """The memfd, made inheritable, for a master image that will
        ``adopt`` it after exec; pass ``held_columns()`` along with it."""
        os.set_inheritable(self._fd, True)
        return self._fd

    def held_columns(self) -> dict[int, int]:
        """Columns in use -> the pid of the process counting in them."""
        return {c: p for c, p in self._owner.items() if p is not None}

    def close(self) -> None:
        self.ptr = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass    # a cdata view still exports it: the GC unmaps it later
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------ columns

    def assign(self) -> int | None:
        """A free column for a process about to be spawned, or None if all
        are taken (that process then runs without the table)."""
        for col in range(self.columns):
            if col not in self._owner:
                self._owner[col] = None
                return col
        return None

    def bind(self, column: int, pid: int) -> None:
        """The process of `column` was forked as `pid`."""
        self._owner[column] = pid

    def release(self, column: int | None) -> None:
        """The process of `column` was reaped (or never started): drop its
        counts and free the column."""
        if column is None or column not in self._owner:
            return
        lib.srclimit_clear_column(self.ptr, column)
        del self._owner[column]

    @property
    def columns_free(self) -> int:
        return self.columns - len(self._owner)

    # ------------------------------------------------------------ reading

    @property
    def header(self):
        return ffi.cast("struct ringd_srclimit_header *", self.ptr)

    def counters(self) -> dict:
        """The header counters and a scan of the slots (status, metrics)."""
        h = self.header
        out = {k: int(getattr(h, k)) for k in COUNTERS}
        u = ffi.new("struct ringd_srclimit_usage *")
        lib.srclimit_usage(self.ptr, lib.ringd_monotonic_ms(), u)
        out.update(size=self.entries, columns=self.columns,
                   columns_in_use=len(self._owner), live=u.live, open=u.open)
        return out
