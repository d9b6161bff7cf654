"""The per-source limit table (native/srclimit.c, ringd/srclimit.py) through
cffi, on the real shared mapping (a memfd, MAP_SHARED) with real processes:
forked children count in their own columns of one table at the same time,
as the workers of a host do. Time is a `now_ms` the test passes, so rate
windows are exact and nothing sleeps."""
from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ringd._native import ffi, lib
from ringd.srclimit import SourceTable, SourceTableError, listener_key, source_address

OK, OVER_OPEN, OVER_RATE, UNTRACKED = (lib.SRCLIMIT_OK, lib.SRCLIMIT_OVER_OPEN,
                                       lib.SRCLIMIT_OVER_RATE, lib.SRCLIMIT_UNTRACKED)
NONE = lib.SRCLIMIT_REF_NONE
LK = listener_key("web")
ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
STRESS = Path(__file__).resolve().parent / "fuzz" / "srclimit_stress.c"


def addr(i: int) -> bytes:
    return source_address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}")


def acquire(t: SourceTable, col: int, a: bytes, *, max_open: int = 0, rate: int = 0,
            rate_ms: int = 0, now: int = 0, lkey: int = LK) -> tuple[int, int]:
    ref = ffi.new("uint32_t *")
    rc = lib.srclimit_acquire(t.ptr, col, lkey, a, max_open, rate, rate_ms, now, ref)
    return rc, ref[0]


def release(t: SourceTable, col: int, ref: int) -> None:
    lib.srclimit_release(t.ptr, col, ref)


@pytest.fixture
def table():
    made = []

    def make(entries: int = 1024, columns: int = 16) -> SourceTable:
        t = SourceTable.create(entries, columns)
        made.append(t)
        return t
    yield make
    for t in made:
        t.close()


def fork_children(n: int, body) -> list[int]:
    """Run body(i, wfd) in n children at once (each starts when all exist);
    return their exit codes. Every child is bounded and reaped."""
    go_r, go_w = os.pipe()
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(go_w)
                os.read(go_r, 1)        # the start gun: EOF when the parent closes it
                code = body(i)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(go_r)
    os.close(go_w)
    codes = []
    deadline = time.monotonic() + 60
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)
    return codes


class Results:
    """A small shared array the children write their tallies into."""

    def __init__(self, n: int, fields: int):
        import mmap
        self.fields = fields
        self.mm = mmap.mmap(-1, 8 * n * fields, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)

    def put(self, i: int, *vals: int) -> None:
        struct.pack_into(f"={self.fields}q", self.mm, 8 * i * self.fields, *vals)

    def get(self, i: int) -> tuple:
        return struct.unpack_from(f"={self.fields}q", self.mm, 8 * i * self.fields)


# ------------------------------------------------------------ one process

def test_open_limit_and_release(table):
    t = table()
    a = addr(1)
    refs = []
    for _ in range(3):
        rc, ref = acquire(t, 0, a, max_open=3)
        assert rc == OK
        refs.append(ref)
    assert len(set(refs)) == 1
    assert lib.srclimit_open(t.ptr, refs[0]) == 3
    assert acquire(t, 1, a, max_open=3) == (OVER_OPEN, NONE)
    # another source and another listener are counted apart
    assert acquire(t, 0, addr(2), max_open=3)[0] == OK
    assert acquire(t, 0, a, max_open=3, lkey=listener_key("other"))[0] == OK
    release(t, 0, refs.pop())
    assert acquire(t, 1, a, max_open=3)[0] == OK
    assert t.header.release_errors == 0
    release(t, 5, refs[0])                      # column 5 never counted it
    assert t.header.release_errors == 1
    assert lib.srclimit_open(t.ptr, refs[0]) == 3


@pytest.mark.parametrize("rate,window", [(50, 1000), (600, 60000)])
def test_rate_window_slides_and_recovers(table, rate, window):
    t = table()
    a = addr(7)
    now = 5_000_000
    admitted = [acquire(t, 0, a, rate=rate, rate_ms=window, now=now)[0] for _ in range(rate + 5)]
    assert admitted.count(OK) == rate and admitted[rate:] == [OVER_RATE] * 5
    # refused attempts do not count; the window is still full just before it ends
    assert acquire(t, 0, a, rate=rate, rate_ms=window, now=now + window - 1)[0] == OVER_RATE
    # a new window starts: the previous one still weighs fully at its start
    assert acquire(t, 0, a, rate=rate, rate_ms=window, now=now + window)[0] == OVER_RATE
    # half way through, half of it has slid out: exactly rate/2 more get in
    half = now + window + window // 2
    got = [acquire(t, 0, a, rate=rate, rate_ms=window, now=half)[0] for _ in range(rate)]
    assert got.count(OK) == rate // 2
    # two quiet windows later it is all gone
    later = now + 4 * window
    got = [acquire(t, 0, a, rate=rate, rate_ms=window, now=later)[0] for _ in range(rate + 1)]
    assert got.count(OK) == rate and got[-1] == OVER_RATE
    # open connections and the rate are separate: all of them are still open
    assert lib.srclimit_open(t.ptr, acquire(t, 0, a, now=later)[1]) == 2 * rate + rate // 2 + 1


def test_open_limit_checked_before_rate(table):
    t = table()
    a = addr(8)
    rc, first = acquire(t, 0, a, max_open=1, rate=10, rate_ms=1000, now=100)
    assert rc == OK
    for _ in range(20):
        assert acquire(t, 0, a, max_open=1, rate=10, rate_ms=1000, now=100)[0] == OVER_OPEN
    # the refusals used none of the rate: 9 more fit once the place is free
    _, ref = acquire(t, 0, a, max_open=1, rate=10, rate_ms=1000, now=100)
    assert ref == NONE
    release(t, 0, first)
    got = [acquire(t, 0, a, rate=10, rate_ms=1000, now=100)[0] for _ in range(10)]
    assert got.count(OK) == 9


def test_full_table_admits_untracked_and_counts(table):
    t = table(entries=4, columns=2)
    refs = [acquire(t, 0, addr(i), max_open=1)[1] for i in range(4)]
    assert NONE not in refs and len(set(refs)) == 4
    assert t.header.used == 4
    for i in range(4, 10):
        assert acquire(t, 0, addr(i), max_open=1) == (UNTRACKED, NONE)
    assert t.header.untracked == 6
    release(t, 0, NONE)                         # an untracked connection closes
    assert t.header.release_errors == 0
    # the tracked ones still hold their limit
    assert acquire(t, 1, addr(0), max_open=1)[0] == OVER_OPEN
    c = t.counters()
    assert c["untracked"] == 6 and c["used"] == 4 and c["live"] == 4 and c["open"] == 4


def test_eviction_reuses_idle_entries_only(table):
    t = table(entries=4, columns=2)
    now = 10_000
    # slot 0..3: two with an open connection, one idle, one with a live rate window
    # (all four are taken first: a new key may reuse an idle slot before an
    # empty one, whichever its probe meets first)
    r_open = [acquire(t, 0, addr(i), now=now)[1] for i in range(2)]
    _, r_idle = acquire(t, 0, addr(2), now=now)
    _, r_rate = acquire(t, 0, addr(3), rate=5, rate_ms=1000, now=now)
    assert len({*r_open, r_idle, r_rate}) == 4 and t.header.evictions == 0
    release(t, 0, r_idle)
    release(t, 0, r_rate)
    rc, ref = acquire(t, 0, addr(4), now=now)
    assert rc == OK and ref == r_idle and t.header.evictions == 1
    # the rate window of addr(3) runs until now + 2 windows: no room before
    assert acquire(t, 0, addr(5), now=now + 1999)[0] == UNTRACKED
    rc, ref = acquire(t, 0, addr(5), now=now + 2000)
    assert rc == OK and ref == r_rate and t.header.evictions == 2
    assert lib.srclimit_open(t.ptr, r_open[0]) == 1 and t.header.used == 4
    # an evicted source starts from nothing when it comes back
    assert acquire(t, 0, addr(2), now=now + 2000)[0] == UNTRACKED


def test_table_of_one_entry(table):
    t = table(entries=1, columns=1)
    assert t.header.probe_max == 1
    rc, ref = acquire(t, 0, addr(1), max_open=2)
    assert (rc, ref) == (OK, 0)
    assert acquire(t, 0, addr(2), max_open=2) == (UNTRACKED, NONE)
    release(t, 0, ref)
    assert acquire(t, 0, addr(2), max_open=2) == (OK, 0)
    assert acquire(t, 0, addr(2), max_open=2) == (OK, 0)
    assert acquire(t, 0, addr(2), max_open=2) == (OVER_OPEN, NONE)
    assert t.header.evictions == 1


def test_columns_at_the_bound(table):
    top = lib.SRCLIMIT_MAX_COLUMNS
    t = table(entries=8, columns=top)
    rc, ref = acquire(t, top - 1, addr(1), max_open=2)
    assert rc == OK
    assert acquire(t, 0, addr(1), max_open=2)[0] == OK
    assert acquire(t, 500, addr(1), max_open=2)[0] == OVER_OPEN
    # a column past the table is a caller bug: admitted untracked, counted
    assert acquire(t, top, addr(1), max_open=2) == (UNTRACKED, NONE)
    assert t.header.release_errors == 1
    lib.srclimit_clear_column(t.ptr, top - 1)
    assert lib.srclimit_open(t.ptr, ref) == 1


def test_sizes_out_of_range():
    top_e, top_c = lib.SRCLIMIT_MAX_ENTRIES, lib.SRCLIMIT_MAX_COLUMNS
    assert lib.srclimit_bytes(0, 1) == 0
    assert lib.srclimit_bytes(1, 0) == 0
    assert lib.srclimit_bytes(top_e + 1, 1) == 0
    assert lib.srclimit_bytes(1, top_c + 1) == 0
    assert lib.srclimit_bytes(top_e, top_c) > lib.srclimit_bytes(top_e, 1) > 0
    with pytest.raises(SourceTableError, match="out of range"):
        SourceTable.create(0, 16)


def test_check_refuses_a_bad_header(table):
    import mmap
    t = table(entries=64, columns=4)
    assert lib.srclimit_check(t.ptr, t.size) == 0
    assert lib.srclimit_check(t.ptr, t.size - 1) == -22         # shorter than the table
    assert lib.srclimit_check(ffi.NULL, t.size) == -22
    raw = ffi.buffer(ffi.cast("char *", t.ptr), t.size)
    good = bytes(raw[:128])
    for off, val in ((0, 0x12345678), (4, 2), (8, 0), (8, 65), (12, 0), (12, 5000), (16, 8),
                     (20, 3)):
        struct.pack_into("=I", raw, off, val)
        assert lib.srclimit_check(t.ptr, t.size) == -22, (off, val)
        raw[:128] = good
    struct.pack_into("=Q", raw, 24, 12345)                     # bytes
    assert lib.srclimit_check(t.ptr, t.size) == -22
    raw[:128] = good
    assert lib.srclimit_check(t.ptr, t.size) == 0
    # init refuses memory that already holds a table (adopt it instead)
    assert lib.srclimit_init(t.ptr, t.size, 64, 4) == -22
    mm = mmap.mmap(-1, 4096)
    assert lib.srclimit_init(ffi.from_buffer(mm), 100, 64, 4) == -22   # too short


def test_move_carries_the_count_to_the_new_column(table):
    t = table()
    rc, ref = acquire(t, 0, addr(1), max_open=1)
    assert rc == OK
    lib.srclimit_move(t.ptr, 0, 3, ref)
    lib.srclimit_clear_column(t.ptr, 0)         # the old process goes away
    assert acquire(t, 1, addr(1), max_open=1)[0] == OVER_OPEN
    lib.srclimit_move(t.ptr, 0, 3, ref)         # nothing left to move: an error, no change
    assert t.header.release_errors == 1 and lib.srclimit_open(t.ptr, ref) == 1
    release(t, 3, ref)
    assert lib.srclimit_open(t.ptr, ref) == 0
    assert acquire(t, 1, addr(1), max_open=1)[0] == OK


def test_memory_is_taken_as_slots_are_used(table):
    """A table of a million slots costs what its used slots touch: creating
    it, scanning it for status and clearing a column do not make it
    resident (the memfd's allocated blocks say what is)."""
    t = table(entries=1 << 20, columns=16)
    assert t.size > 100 << 20

    def allocated() -> int:
        return os.fstat(t._fd).st_blocks * 512
    assert allocated() <= 1 << 16
    refs = [acquire(t, 1, addr(i))[1] for i in range(50)]
    t.counters()
    lib.srclimit_clear_column(t.ptr, 1)
    assert allocated() <= 60 * 8192, allocated()
    assert t.counters()["open"] == 0 and t.counters()["used"] == 50
    assert NONE not in refs


# ------------------------------------------------------------ processes

def test_limits_hold_across_processes(table):
    """8 processes race for one source's places: exactly max_open get in,
    and exactly rate_count for the rate, whatever the interleaving."""
    t = table(entries=256, columns=16)
    n, tries = 8, 200
    res = Results(n, 3)

    def body(i):
        a = addr(1)
        ok = over = untracked = 0
        for _ in range(tries):
            rc, _ = acquire(t, i, a, max_open=37, now=1000)
            ok += rc == OK
            over += rc == OVER_OPEN
            untracked += rc == UNTRACKED
        rate_ok = 0
        for _ in range(tries):
            rc, _ = acquire(t, i, addr(2), rate=53, rate_ms=1000, now=1000)
            rate_ok += rc == OK
        res.put(i, ok, rate_ok, untracked)
        return 0

    assert fork_children(n, body) == [0] * n
    tallies = [res.get(i) for i in range(n)]
    untracked = sum(x[2] for x in tallies)
    assert sum(x[0] for x in tallies) == 37
    assert sum(x[1] for x in tallies) == 53
    assert untracked == t.header.untracked - 0
    _, ref = acquire(t, 0, addr(1), now=1000)
    assert lib.srclimit_open(t.ptr, ref) == 38


def test_concurrent_hammer_keeps_exact_counts(table):
    """6 processes acquire and release on a few hot keys as fast as they
    can (all on the same slots' locks) and each keeps a known number open at
    the end: the totals are exact, nothing lost, nothing left over."""
    t = table(entries=64, columns=16)
    n, rounds, keys = 6, 20000, 5
    res = Results(n, keys + 1)

    def body(i):
        rnd = random.Random(i)
        held = []
        untracked = 0
        for _ in range(rounds):
            k = rnd.randrange(keys)
            rc, ref = acquire(t, i, addr(k), now=1)
            if rc == UNTRACKED:
                untracked += 1
                continue
            assert rc == OK
            held.append((k, ref))
            if len(held) > 8 or rnd.random() < 0.5:
                _, r = held.pop(rnd.randrange(len(held)))
                release(t, i, r)
        kept = [0] * keys
        for k, _ in held:
            kept[k] += 1
        res.put(i, *kept, untracked)
        return 0

    assert fork_children(n, body) == [0] * n
    tallies = [res.get(i) for i in range(n)]
    for k in range(keys):
        _, ref = acquire(t, 15, addr(k), now=1)
        release(t, 15, ref)
        assert lib.srclimit_open(t.ptr, ref) == sum(x[k] for x in tallies), k
    h = t.header
    assert h.release_errors == 0
    assert h.untracked == sum(x[keys] for x in tallies) == h.lock_timeouts
    assert h.used == keys
    # the children are gone: clearing their columns leaves nothing open
    for i in range(n):
        lib.srclimit_clear_column(t.ptr, i)
    assert t.counters()["open"] == 0


def test_threads_of_one_process_share_a_column(table):
    t = table(entries=64, columns=4)
    errors = []

    def body(seed):
        rnd = random.Random(seed)
        try:
            for _ in range(5000):
                rc, ref = acquire(t, 2, addr(rnd.randrange(3)), now=1)
                if rc == OK:
                    release(t, 2, ref)
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=body, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors and not any(th.is_alive() for th in threads)
    assert t.counters()["open"] == 0 and t.header.release_errors == 0


def test_clear_column_frees_what_a_killed_process_held(table):
    """A worker SIGKILLed with 500 connections open from one source must
    not keep that source locked out: the master clears its column."""
    t = table(entries=256, columns=8)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for _ in range(500):
                assert acquire(t, 3, addr(9), max_open=500)[0] == OK
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert acquire(t, 0, addr(9), max_open=500) == (OVER_OPEN, NONE)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert acquire(t, 0, addr(9), max_open=500) == (OVER_OPEN, NONE)   # until it is cleared
    lib.srclimit_clear_column(t.ptr, 3)
    rc, ref = acquire(t, 0, addr(9), max_open=500)
    assert rc == OK and lib.srclimit_open(t.ptr, ref) == 1


def test_lock_of_a_dead_holder_times_out_then_clear_frees_it(table):
    """A process killed while it holds a slot lock: others give up on the
    lock after a bounded wait (the connection is admitted untracked,
    counted), and clear_column of the dead process's column frees it."""
    t = table(entries=1, columns=4)
    assert acquire(t, 1, addr(1))[0] == OK           # columns 1 and 2 have used the table
    assert acquire(t, 2, addr(1))[0] == OK
    # the lock word of slot 0 (the table's first slot, after the header and
    # the 64-byte column flags) as column 2 would leave it: column + 1
    raw = ffi.buffer(ffi.cast("char *", t.ptr), t.size)
    struct.pack_into("=I", raw, 128 + 64, 3)
    t0 = time.monotonic()
    assert acquire(t, 0, addr(1)) == (UNTRACKED, NONE)
    assert time.monotonic() - t0 < 0.5
    h = t.header
    assert (h.lock_timeouts, h.untracked, h.contended) == (1, 1, 1)
    lib.srclimit_clear_column(t.ptr, 1)               # another column: not its lock
    assert acquire(t, 0, addr(1))[0] == UNTRACKED
    lib.srclimit_clear_column(t.ptr, 2)
    assert h.forced_unlocks == 1
    rc, ref = acquire(t, 0, addr(1))
    assert rc == OK and lib.srclimit_open(t.ptr, ref) == 1      # column 2's count went too


def test_processes_killed_mid_operation_leave_no_stuck_lock(table):
    """Processes SIGKILLed at random points of acquire/release (some inside
    a slot lock): after clear_column every count is gone and no slot stays
    locked (a stuck lock would turn later acquires into lock timeouts)."""
    t = table(entries=4, columns=4)     # everything on the same few slots
    for round_ in range(12):
        pids = []
        for col in (1, 2):
            pid = os.fork()
            if pid == 0:
                try:
                    rnd = random.Random(round_ * 10 + col)
                    while True:
                        rc, ref = acquire(t, col, addr(rnd.randrange(6)), now=1)
                        if rc == OK and rnd.random() < 0.7:
                            release(t, col, ref)
                finally:
                    os._exit(1)
            pids.append(pid)
        time.sleep(0.02 + random.random() * 0.03)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            os.waitpid(pid, 0)
        lib.srclimit_clear_column(t.ptr, 1)
        lib.srclimit_clear_column(t.ptr, 2)
        assert t.counters()["open"] == 0, round_
    timeouts = t.header.lock_timeouts
    for i in range(6):
        rc, ref = acquire(t, 0, addr(i), now=1)
        assert rc in (OK, UNTRACKED)
        release(t, 0, ref)
    assert t.header.lock_timeouts == timeouts
    assert t.counters()["open"] == 0


# ------------------------------------------------------------ master side

def test_columns_are_assigned_per_process_and_cleared_on_release(table):
    t = table(entries=64, columns=3)
    cols = [t.assign() for _ in range(3)]
    assert sorted(cols) == [0, 1, 2] and t.assign() is None and t.columns_free == 0
    t.bind(cols[1], 4242)
    assert acquire(t, cols[1], addr(1), max_open=1)[0] == OK
    t.release(cols[1])
    assert t.columns_free == 1
    assert acquire(t, cols[0], addr(1), max_open=1)[0] == OK      # its count went with it
    assert t.assign() == cols[1]
    t.release(None)                                                # no column: nothing to do


def test_export_and_adopt_keep_held_columns(table):
    """The in-place upgrade: the next master image maps the same memfd; the
    columns of workers that live on keep their counts, the others are
    cleared."""
    t = table(entries=64, columns=4)
    for col in range(3):
        t.assign()
    t.bind(0, 100)
    t.bind(1, 101)
    t.bind(2, 102)
    for col in range(3):
        assert acquire(t, col, addr(1), max_open=10)[0] == OK
    fd = os.dup(t.export_fd())          # what survives the exec
    assert os.get_inheritable(t.export_fd())
    held = t.held_columns()
    del held[2]                         # the worker of column 2 died meanwhile
    t2 = SourceTable.adopt(fd, held)
    try:
        assert not os.get_inheritable(fd)
        assert (t2.entries, t2.columns, t2.held_columns()) == (64, 4, {0: 100, 1: 101})
        _, ref = acquire(t2, 3, addr(1), max_open=10)
        assert lib.srclimit_open(t2.ptr, ref) == 3          # columns 0, 1 and the new one
        assert lib.srclimit_open(t.ptr, ref) == 3           # one table, two mappings
        assert t2.assign() == 2
    finally:
        t2.close()


def test_adopt_refuses_what_is_no_table():
    fd = os.memfd_create("not-a-table", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(SourceTableError, match="unknown layout"):
            SourceTable.adopt(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("ip,prefix", [("192.0.2.1", 64), ("::ffff:192.0.2.1", 64),
                                       ("2001:db8:1:2:3:4:5:6", 64), ("2001:db8:1:2:3:4:5:6", 48),
                                       ("2001:db8:1:2:3:4:5:6", 128), ("2001:db8:ff:2::", 17),
                                       ("::1", 1), ("fe80::1", 127)])
def test_c_source_addr_matches_python(ip, prefix):
    import socket as so
    from ringd.native import sockaddr_bytes
    fam = so.AF_INET if "." in ip and ":" not in ip else so.AF_INET6
    raw = sockaddr_bytes(fam, ip, 443)
    out = ffi.new("uint8_t[16]")
    assert lib.srclimit_source_addr(raw, prefix, out) == 0
    assert bytes(out) == source_address(ip, prefix)
    assert lib.srclimit_source_addr(b"\x01\x00" + bytes(26), 64, out) == -1   # AF_UNIX


def test_source_address_forms():
    assert source_address("192.0.2.1") == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
    assert source_address("::ffff:192.0.2.1") == source_address("192.0.2.1")
    assert source_address("2001:db8:1:2:3:4:5:6") == source_address("2001:db8:1:2::", 64)
    assert source_address("2001:db8:1:2:3:4:5:6", 128) != source_address("2001:db8:1:2::")
    assert listener_key("a") != listener_key("b") and listener_key("a") == listener_key("a")


# ------------------------------------------------------------ full speed, in C

def test_contention_in_c_under_asan_and_ubsan(tmp_path):
    """tests/fuzz/srclimit_stress.c: 4 processes x 2 threads race for the
    last places of a source and hammer acquire/release on a tiny table at
    full speed (Python calls far too slowly to hit a critical section),
    built with ASan + UBSan where they work, else plainly: no admission
    beyond a limit, exact counts at the end, no release of nothing."""
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    exe = tmp_path / "srclimit_stress"
    base = ["gcc", "-std=gnu11", "-g", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror",
            f"-I{NATIVE}", str(STRESS), str(NATIVE / "srclimit.c"), "-o", str(exe)]
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    r = subprocess.run(base + san, capture_output=True, text=True, timeout=120)
    sanitized = r.returncode == 0 and subprocess.run(
        [str(exe), "1", "1", "0"], capture_output=True, timeout=60).returncode == 0
    if not sanitized:
        r = subprocess.run(base, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([str(exe), "4", "2", "1.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.endswith("OK\n"), r.stdout + r.stderr[-4000:]
    assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr


# ------------------------------------------------------------ in a running ringd

def _map_master_table(master_pid: int):
    """The running master's table, mapped here through /proc (the test runs
    as the master's user): the same memory its workers count in."""
    import mmap
    for name in os.listdir(f"/proc/{master_pid}/fd"):
        try:
            target = os.readlink(f"/proc/{master_pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:ringd-source-table"):
            fd = os.open(f"/proc/{master_pid}/fd/{name}", os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            finally:
                os.close(fd)
            ptr = ffi.cast("void *", ffi.from_buffer(mm))
            assert lib.srclimit_check(ptr, size) == 0
            return mm, ptr
    raise AssertionError("no source table memfd in the master")


def test_master_gives_each_worker_process_a_column_and_clears_it(tmp_path):
    """Every worker process gets its own column (old and new generations at
    once during a reload), and a worker SIGKILLed while counting connections
    of a source leaves no count behind once the master reaped it."""
    from harness import Backend, Ringd, free_ports, listener, upstream, wait_for
    bport, port, aport = free_ports(3)
    conf = (listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]) +
            f'\n[admin]\nlisten = "127.0.0.1:{aport}"\n')
    with Backend("echo", [bport]), \
            Ringd(tmp_path, conf, workers=2, extra_ringd="source_table_size = 2048\n") as r:
        st = r.status()
        src = st["source_table"]
        assert src["size"] == 2048 and src["columns"] >= 16 and src["columns_in_use"] == 2
        cols = {w["pid"]: w["source_column"] for w in st["workers"]}
        assert len(set(cols.values())) == 2 and None not in cols.values()
        mm, ptr = _map_master_table(st["pid"])
        try:
            victim, vcol = next(iter(cols.items()))
            ref = ffi.new("uint32_t *")
            a = addr(77)
            for _ in range(5):      # as if the victim had 5 connections open from 10.0.0.77
                assert lib.srclimit_acquire(ptr, vcol, LK, a, 5, 0, 0, 1, ref) == OK
            spare = src["columns"] - 1
            assert lib.srclimit_acquire(ptr, spare, LK, a, 5, 0, 0, 1, ref) == OVER_OPEN
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: all(w["pid"] not in (None, victim) and w["state"] == "ready"
                                 for w in r.status()["workers"]), 10, what="respawn")
            assert lib.srclimit_acquire(ptr, spare, LK, a, 5, 0, 0, 1, ref) == OK
            assert lib.srclimit_open(ptr, ref[0]) == 1
            lib.srclimit_release(ptr, spare, ref[0])
            st = r.status()
            assert st["source_table"]["columns_in_use"] == 2
            # a reload: the new generation's processes get columns of their own
            # while the old ones still hold theirs; the old ones are freed when reaped
            # (with a new source_table_size, which only a restart applies)
            old = {w["source_column"] for w in st["workers"]}
            r.conf.write_text(r.conf.read_text().replace("source_table_size = 2048",
                                                         "source_table_size = 4096"))
            assert r.cli("reload", "-c", str(r.conf)).returncode == 0
            r.wait_event("reload_ignored_key", key="ringd.source_table_size")
            wait_for(lambda: len(r.status()["generations"]) == 1, 15, what="old generation gone")
            st = r.status()
            new = {w["source_column"] for w in st["workers"]}
            assert len(new) == 2 and None not in new
            assert st["source_table"]["columns_in_use"] == 2
            assert st["source_table"]["size"] == 2048 and old  # same table across the reload
            out = r.cli("status", "-c", str(r.conf)).stdout
            assert "source table: 0 active sources (1 held) of 2048" in out, out
            from test_observability import scrape
            m = scrape(aport)
            assert m[("ringd_source_table_size", frozenset())] == 2048
            assert m[("ringd_source_table_entries", frozenset())] == 1
            assert m[("ringd_source_table_untracked_total", frozenset())] == 0
            assert m[("ringd_source_table_evictions_total", frozenset())] == 0
        finally:
            del ptr
            mm.close()


def test_worker_cfg_carries_the_table(tmp_path):
    from ringd import config as config_mod
    from ringd.native import SharedState, build_worker_cfg
    from harness import listener, upstream
    path = tmp_path / "c.toml"
    path.write_text('[ringd]\nworkers = 1\n' + listener("web", 1, "app") +
                    upstream("app", ["127.0.0.1:2"]))
    cfg = config_mod.load(str(path))
    shm = SharedState(1, 1, 1, 1)
    t = SourceTable.create(1024, 16)
    try:
        wc, keep = build_worker_cfg(cfg, shm, 0, 0, -1, [(5, 0)], 6, srclimit=t, srclimit_column=3)
        assert wc.srclimit == t.ptr and wc.srclimit_len == t.size and wc.srclimit_column == 3
        wc, keep = build_worker_cfg(cfg, shm, 0, 0, -1, [(5, 0)], 6)
        assert wc.srclimit == ffi.NULL
        struct.pack_into("=I", ffi.buffer(ffi.cast("char *", t.ptr), 8), 4, 99)   # version
        wc, keep = build_worker_cfg(cfg, shm, 0, 0, -1, [(5, 0)], 6, srclimit=t, srclimit_column=3)
        assert wc.srclimit == ffi.NULL       # a header that does not check out: no table
    finally:
        t.close()


def test_a_worker_started_with_every_column_taken_runs_uncounted(tmp_path):
    """More worker processes alive at once than the table has columns (here:
    generations kept draining by a connection each, no handover): the one
    that finds none still serves, admitting every connection uncounted, and
    the master says so in its log, in the metrics and in the status."""
    from harness import Backend, Ringd, connect, free_ports, listener, upstream, wait_for
    from test_observability import scrape
    bport, port, aport = free_ports(3)
    conf = (listener("web", port, "app") + upstream("app", [f"127.0.0.1:{bport}"]) +
            f'\n[admin]\nlisten = "127.0.0.1:{aport}"\n')
    extra = 'drain_timeout = "60s"\nmax_draining_generations = 64\nhandover = false\n'
    held = []
    with Backend("echo", [bport]), Ringd(tmp_path, conf, workers=1, extra_ringd=extra) as r:
        try:
            columns = r.status()["source_table"]["columns"]
            assert scrape(aport)[("ringd_source_table_no_column_total", frozenset())] == 0
            for _ in range(columns + 4):
                s = connect(port, timeout=10)
                s.sendall(b"h")
                assert s.recv(1) == b"h"
                held.append(s)
                assert r.cli("reload", "-c", str(r.conf)).returncode == 0
                if r.events("source_table_no_column"):
                    break
            ev = r.wait_event("source_table_no_column", timeout=10)[0]
            assert ev["columns"] == columns
            st = r.status()
            assert st["source_table"]["columns_in_use"] == columns
            assert [w["source_column"] for w in st["workers"]
                    if w["generation"] == st["generation"]] == [None]
            # the worker without a column serves
            with connect(port, timeout=10) as s:
                s.sendall(b"u")
                assert s.recv(1) == b"u"
            assert scrape(aport)[("ringd_source_table_no_column_total", frozenset())] == 1
            r.assert_no_traceback()
        finally:
            for s in held:
                s.close()
