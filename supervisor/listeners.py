"""Listening sockets, owned by the master.

One SO_REUSEPORT socket per listener per worker slot, so the kernel spreads
connections over the workers. Sockets are keyed by (address, slot): a reload
hands slot i of the new generation the very socket slot i of the old one used,
so no listening socket is closed and no queued connection is lost. When the
worker count goes down, the sockets of the slots that went away can be
adopted by the remaining workers rather than closed (the master decides, see
ringd.handover). A socket is closed only when no generation needs it, after
the workers that accepted on it have stopped.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from .config import Address, Config


class BindError(Exception):
    """A listening socket could not be created; the message names the key."""


@dataclass(frozen=True)
class SocketKey:
    family: int
    ip: str
    port: int
    slot: int


def _key(addr: Address, slot: int) -> SocketKey:
    return SocketKey(addr.family, addr.ip, addr.port, slot)


def bind_one(addr: Address, backlog: int) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            # like nginx: [::]:80 does not also take 0.0.0.0:80
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # inherited by accepted sockets: no Nagle delay on forwarded writes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(addr.sockaddr)
        sock.listen(backlog)
        # workers accept through io_uring, which polls by itself; a worker's
        # plain accept4() (listener_poke) must never block
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ListenerSockets:
    """Every listening socket the master holds, across generations."""

    def __init__(self) -> None:
        self._socks: dict[SocketKey, socket.socket] = {}
        self._backlog: dict[SocketKey, int] = {}

    def prepare(self, config: Config, slots: list[int] | None = None
                ) -> tuple[dict[SocketKey, socket.socket], list[SocketKey]]:
        """Bind whatever `config` needs (for `slots`, default all) that is not
        bound yet.

        Returns (all sockets the config uses, keys newly bound). On any failure
        the sockets bound by this call are closed again and BindError says which
        listener and why; the sockets already in use are untouched.
        """
        wanted: dict[SocketKey, socket.socket] = {}
        new: list[SocketKey] = []
        try:
            for li, lst in enumerate(config.listeners):
                for slot in (range(config.ringd.workers) if slots is None else slots):
                    k = _key(lst.listen, slot)
                    sock = self._socks.get(k)
                    if sock is None:
                        try:
                            sock = bind_one(lst.listen, lst.backlog)
                        except OSError as e:
                            raise BindError(_bind_message(config, li, lst.name, lst.listen,
                                                          e)) from None
                        self._socks[k] = sock
                        self._backlog[k] = lst.backlog
                        new.append(k)
                    elif self._backlog[k] != lst.backlog:
                        sock.listen(lst.backlog)   # listen() again resizes the queue
                        self._backlog[k] = lst.backlog
                    wanted[k] = sock
        except BindError:
            for k in new:
                self._socks.pop(k).close()
                self._backlog.pop(k, None)
            raise
        return wanted, new

    def adoptable(self, config: Config) -> set[SocketKey]:
        """Open sockets of slots this config no longer has (it runs fewer
        workers than an earlier one did) on addresses it still listens on.
        The remaining workers accept on them instead of closing them, which
        would reset whatever is queued there (unless tcp_migrate_req=1)."""
        n = config.ringd.workers
        addrs = {(lst.listen.family, lst.listen.ip, lst.listen.port) for lst in config.listeners}
        return {k for k in self._socks
                if k.slot >= n and (k.family, k.ip, k.port) in addrs}

    def acceptors_for(self, config: Config, slot: int, adopted: set[SocketKey]
                      ) -> list[tuple[int, int]]:
        """(fd, listener index) of every socket worker `slot` accepts on: its
        own, and the adopted ones that fall to it (slot j goes to j % workers)."""
        n = config.ringd.workers
        out = []
        for li, lst in enumerate(config.listeners):
            out.append((self._socks[_key(lst.listen, slot)].fileno(), li))
            for k in sorted(adopted, key=lambda k: k.slot):
                if k.slot % n == slot and (k.family, k.ip, k.port) == \
                        (lst.listen.family, lst.listen.ip, lst.listen.port) and k in self._socks:
                    out.append((self._socks[k].fileno(), li))
        return out

    def queued(self, key: SocketKey) -> int:
        """Connections waiting in the accept queue of a listening socket
        (TCP_INFO of a listener: tcpi_unacked is the queue length); 0 if the
        socket is gone or the kernel does not say."""
        sock = self._socks.get(key)
        if sock is None:
            return 0
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
            return struct.unpack_from("=I", info, 24)[0]   # after 8 bytes of u8 + 4 u32
        except (OSError, struct.error):
            return 0

    def keys(self) -> set[SocketKey]:
        """Every socket open now."""
        return set(self._socks)

    def all_fds(self) -> list[int]:
        return [s.fileno() for s in self._socks.values()]

    def retire(self, keep: set[SocketKey]) -> dict[SocketKey, int]:
        """Close every socket whose key is not in `keep`; returns each closed
        key with the connections that were queued on it at the close."""
        gone = {k: self.queued(k) for k in self._socks if k not in keep}
        for k in gone:
            self._socks.pop(k).close()
            self._backlog.pop(k, None)
        return gone

    def close_all(self) -> None:
        self.retire(set())


def keys_of(config: Config) -> set[SocketKey]:
    return {_key(lst.listen, slot) for lst in config.listeners
            for slot in range(config.ringd.workers)}


def bind_hint(e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        return " (another program is listening there)"
    if e.errno == errno.EACCES:
        return " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if e.errno == errno.EADDRNOTAVAIL:
        return " (no local interface has this address)"
    return ""


def _bind_message(config: Config, index: int, name: str, addr: Address, e: OSError) -> str:
    """'file:line: listener[i].listen: cannot listen on ...', like a config error."""
    reason = e.strerror or str(e)
    return (f"{config.where('listener', index, 'listen')}: cannot listen on {addr} "
            f"(listener \"{name}\"): {reason}{bind_hint(e)}")


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new (soft, hard)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard



