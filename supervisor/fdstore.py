"""The listening sockets and systemd: its fd store, and sockets passed in.

With $NOTIFY_SOCKET set, every listening socket the master binds is handed
to the service manager as well (``FDSTORE=1`` + ``FDNAME=``, the datagram
of sd_pid_notify_with_fds(3)), and taken out again (``FDSTOREREMOVE=1``)
when it goes away for good: its listener or slot left the config, or ringd
stops on purpose. If the master dies instead, systemd still holds the
sockets, so the clients that connect meanwhile wait in their accept queues;
the master that ``Restart=`` starts finds them in $LISTEN_FDS /
$LISTEN_FDNAMES (sd_listen_fds(3)) and accepts on them instead of binding
new ones, and every one of those clients is served.

The unit must allow the store (``FileDescriptorStoreMax=``, 0 by default,
so systemd ignores what it is sent otherwise): one socket per listener and
worker slot.

Names: ``ringd/<ip>/<port>/<slot>`` with the ':' of an IPv6 address written
as '_': systemd accepts printable ASCII except ':' (the separator of
$LISTEN_FDNAMES), at most 255 bytes. A socket is adopted only if its name
has this form and getsockname() says the same address.
"""
from __future__ import annotations

import os
import socket

from . import notify

PREFIX = "ringd/"
LISTEN_FDS_START = 3        # SD_LISTEN_FDS_START
ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")


def fd_name(key) -> str:
    """FDNAME of the listening socket of SocketKey `key`."""
    return f"{PREFIX}{key.ip.replace(':', '_')}/{key.port}/{key.slot}"


def parse_name(name: str) -> tuple[int, str, int, int] | None:
    """(family, ip, port, slot) from fd_name()'s form, else None."""
    if not name.startswith(PREFIX):
        return None
    parts = name[len(PREFIX):].split("/")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    ip = parts[0].replace("_", ":")
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        ip = socket.inet_ntop(family, socket.inet_pton(family, ip))
    except OSError:
        return None
    return family, ip, int(parts[1]), int(parts[2])


def enabled() -> bool:
    return notify.enabled()


def store(key, fd: int) -> bool:
    """Hand the listening socket `fd` of `key` to systemd's fd store."""
    return notify.send({"FDSTORE": 1, "FDNAME": fd_name(key)}, [fd])


def remove(name: str) -> bool:
    """Take every fd called `name` out of systemd's fd store."""
    return notify.send({"FDSTOREREMOVE": 1, "FDNAME": name})


def listen_fds() -> list[tuple[int, str]]:
    """sd_listen_fds_with_names(unset_environment=1): the (fd, name) pairs
    passed to this process, fds from 3 on, made close-on-exec. The variables
    are removed from the environment either way, so that no worker or later
    program sees them; fds meant for another pid ($LISTEN_PID) are left
    alone and not returned."""
    env = {k: os.environ.get(k) for k in ENV}
    for k in ENV:
        os.environ.pop(k, None)         # unsetenv: forked workers must not see them
    if not env["LISTEN_PID"] or not env["LISTEN_FDS"]:
        return []
    try:
        if int(env["LISTEN_PID"]) != os.getpid():
            return []
        n = int(env["LISTEN_FDS"])
    except ValueError:
        return []
    if n <= 0:
        return []
    names = (env["LISTEN_FDNAMES"] or "").split(":")
    if len(names) != n:
        names = ["unknown"] * n
    out = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue        # not open: nothing to adopt
        out.append((fd, names[i]))
    return out
