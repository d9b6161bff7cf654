"""The pidfile: how the CLI finds the running master, and how a second
`ringd start` learns that one is already running."""
from __future__ import annotations

import os


class PidfileError(Exception):
    pass


def read(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PidfileError(f"cannot read pidfile {path}: {e.strerror}") from None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 0 else None


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


def is_ringd(pid: int) -> bool:
    """Is `pid` a ringd master (not some process that reused the pid)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return False
    return b"ringd" in cmd


def running(path: str) -> int | None:
    """The pid of a live ringd master recorded in `path`, else None."""
    pid = read(path)
    if pid is None or pid == os.getpid():
        return None
    if alive(pid) and is_ringd(pid):
        return pid
    return None


def write(path: str) -> None:
    """Claim the pidfile; refuse if a live master holds it, replace a stale one."""
    pid = running(path)
    if pid is not None:
        raise PidfileError(f"ringd is already running (pid {pid}, pidfile {path})")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        raise PidfileError(f"cannot write pidfile {path}: {e.strerror}") from None


def remove(path: str) -> None:
    """Remove the pidfile if it is still ours."""
    if read(path) == os.getpid():
        try:
            os.unlink(path)
        except OSError:
            pass        # gone already, or not ours to remove
