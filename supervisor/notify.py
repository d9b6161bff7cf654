"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, with
file descriptors attached for systemd's fd store (sd_pid_notify_with_fds)."""
from __future__ import annotations

import array
import os
import socket
import time

SEND_TIMEOUT = 2.0      # a service manager that does not read must not stall the master


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]       # abstract namespace
    return addr


def enabled() -> bool:
    return _address() is not None


def send(fields: dict, fds: list[int] | tuple = ()) -> bool:
    """One datagram of KEY=VALUE lines, with `fds` as SCM_RIGHTS; True if sent."""
    addr = _address()
    if addr is None:
        return False
    msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(SEND_TIMEOUT)
            s.connect(addr)
            if fds:
                s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds))])
            else:
                s.sendall(msg)
        return True
    except OSError:
        return False


def notify(**fields: str | int) -> bool:
    """notify(READY=1, STATUS="...") -> True if a datagram was sent."""
    return send(fields)


def ready(status: str) -> bool:
    return notify(READY=1, STATUS=status)


def reloading(status: str = "reloading") -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status)


def stopping(status: str = "stopping") -> bool:
    return notify(STOPPING=1, STATUS=status)


def status(text: str) -> bool:
    return notify(STATUS=text)
