"""The pidfile: how the CLI finds the running master, and how a second
`ringd start` learns that one is already running.

The master holds an exclusive flock(2) on the file for its whole life, and
the lock, not the number in the file, says whether a master runs: a file that
nobody holds is stale (its master died, even by kill -9, since the kernel
drops the lock with the process), whatever process now has that pid or
whatever it is called. Readers test the lock with a shared, non-blocking
flock that they drop at once; a master that meets one of those briefly
retries, so a `ringd status` never makes a start fail.

The lock belongs to the open file description. Workers are forked, so they
share it until worker/main.py closes every fd it does not need (it does, in
_close_others); the fd is O_CLOEXEC, so no program the master runs inherits
it. A master that re-executes itself in place (same pid) can keep the lock:
make the fd inheritable with Pidfile.keep_across_exec() before the exec, pass
its number on, and call Pidfile.adopt(path, fd) in the new image.
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

LOCK_RETRY = 1.0        # a reader's shared lock lasts microseconds; wait this long for it


class PidfileError(Exception):
    pass


def _open(path: str, flags: int) -> int:
    # O_NOFOLLOW: a root master must never truncate whatever a symlink points
    # at; O_NONBLOCK: a FIFO planted at the path must not block the open
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:      # from O_NOFOLLOW
        return "it is a symbolic link"
    return e.strerror or str(e)


def _same_file(fd: int, path: str) -> bool:
    """Is `fd` still the file at `path` (not unlinked or replaced meanwhile)?"""
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 0 else None


class Pidfile:
    """The master's claim on its pidfile: the path, and the fd holding the lock."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, path: str) -> "Pidfile":
        """Lock the pidfile and write our pid; PidfileError if a master holds it."""
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        except OSError as e:
            raise PidfileError(f"cannot write pidfile {path}: {_reason(e)}") from None
        deadline = time.monotonic() + LOCK_RETRY
        while True:
            try:
                fd = _open(path, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise PidfileError(f"cannot write pidfile {path}: {_reason(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise PidfileError(f"ringd is already running (pid {pid or 'unknown'} holds "
                                   f"pidfile {path})") from None
            if not _same_file(fd, path):
                os.close(fd)        # removed by the master that just exited: take the new one
                continue
            return cls._claim(path, fd)

    @classmethod
    def adopt(cls, path: str, fd: int) -> "Pidfile":
        """Take over `fd`, which already holds the lock on `path` (a master
        that re-executed itself and passed the fd across exec)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # a no-op on our own lock
        except BlockingIOError:
            raise PidfileError(f"fd {fd} does not hold the lock on pidfile {path}") from None
        except OSError as e:
            raise PidfileError(f"cannot adopt pidfile fd {fd}: {_reason(e)}") from None
        if not _same_file(fd, path):
            raise PidfileError(f"fd {fd} is not pidfile {path}")
        os.set_inheritable(fd, False)
        return cls._claim(path, fd)

    @classmethod
    def _claim(cls, path: str, fd: int) -> "Pidfile":
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            os.close(fd)
            raise PidfileError(f"cannot write pidfile {path}: {_reason(e)}") from None
        return cls(path, fd)

    def fileno(self) -> int:
        return self.fd

    def keep_across_exec(self) -> int:
        """Make the lock fd survive an exec of this process; returns it."""
        os.set_inheritable(self.fd, True)
        return self.fd

    def release(self) -> None:
        """Remove the file (if it is still ours) and drop the lock."""
        if self.fd < 0:
            return
        if _same_file(self.fd, self.path):
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1


def running(path: str) -> int | None:
    """The pid of the master holding the pidfile at `path`, else None."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PidfileError(f"cannot read pidfile {path}: {_reason(e)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass                # held: a master runs
        else:
            return None         # nobody holds it: stale (closing drops our lock)
        deadline = time.monotonic() + LOCK_RETRY
        pid = _read_pid(fd)
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.02)    # locked a moment ago, pid not written yet
            pid = _read_pid(fd)
        if pid is None:
            raise PidfileError(f"pidfile {path} is held by a process but holds no pid")
        return pid
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True
