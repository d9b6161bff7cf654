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

from . import fdstore
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


_ABORT_ON_DEATH = struct.pack("ii", 1, 0)


def _accepted_sockets_inherit(sock: socket.socket) -> None:
    """Options every accepted socket inherits from its listening socket:
    no Nagle delay on forwarded writes, and SO_LINGER 0, so that the
    connections of a worker that dies (SIGKILL, the watchdog) are reset, not
    ended with a FIN that reads as a complete transfer. A worker clears it
    at a natural end only (native/conn.c, end_is_natural)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT_ON_DEATH)


def bind_one(addr: Address, backlog: int) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            # like nginx: [::]:80 does not also take 0.0.0.0:80
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _accepted_sockets_inherit(sock)
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
        self._stored: set[SocketKey] = set()     # in systemd's fd store (ringd.fdstore)

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
                        if fdstore.enabled() and fdstore.store(k, sock.fileno()):
                            self._stored.add(k)
                    elif self._backlog[k] != lst.backlog:
                        sock.listen(lst.backlog)   # listen() again resizes the queue
                        self._backlog[k] = lst.backlog
                    wanted[k] = sock
        except BindError:
            self._close({k: 0 for k in new}, forget=True)
            raise
        return wanted, new

    def adopt_passed(self, config: Config, passed: list[tuple[int, str]]
                     ) -> tuple[list[SocketKey], list[tuple[str, str]]]:
        """Take the listening sockets systemd passed in ($LISTEN_FDS, see
        ringd.fdstore) whose name and address are those of a listener of
        `config`; prepare() then binds only what is still missing. A slot
        beyond the configured workers (there were more before) is taken too:
        the first generation adopts it or lets it go as a reload with fewer
        workers would (ringd.handover), so what is queued on it is not lost.
        Returns (keys adopted, [(name, why)] of the fds closed instead)."""
        wanted = {(lst.listen.family, lst.listen.ip, lst.listen.port)
                  for lst in config.listeners}
        adopted, rejected = [], []
        for fd, name in passed:
            why, key, sock = _check_passed(fd, name, wanted)
            if why:
                rejected.append((name, why))
                if sock is not None:
                    sock.close()
                else:
                    os.close(fd)
                if fdstore.parse_name(name) is not None:
                    fdstore.remove(name)    # or systemd passes it again next time
                continue
            if key in self._socks:
                rejected.append((name, "a second socket for the same listener slot"))
                sock.close()
                continue
            self._socks[key] = sock
            self._backlog[key] = -1         # prepare() sets the configured backlog
            self._stored.add(key)           # systemd holds it already
            adopted.append(key)
        return adopted, rejected

    # ------------------------------------------------------------ ringd upgrade

    def export(self) -> list[dict]:
        """Every socket, for the next image of this master (ringd.upgrade):
        its key, backlog, fd and whether systemd stores it."""
        return [{"family": k.family, "ip": k.ip, "port": k.port, "slot": k.slot,
                 "backlog": self._backlog.get(k, -1), "fd": s.fileno(),
                 "stored": k in self._stored}
                for k, s in self._socks.items()]

    def adopt_exported(self, entries: list[dict]) -> list[str]:
        """The new image takes the sockets export() listed; returns what was
        wrong with the ones it could not take (closed)."""
        problems = []
        for e in entries:
            try:
                key = SocketKey(int(e["family"]), str(e["ip"]), int(e["port"]), int(e["slot"]))
                fd = int(e["fd"])
            except (KeyError, TypeError, ValueError):
                problems.append(f"unreadable socket entry {e!r}")
                continue
            try:
                sock = socket.socket(fileno=fd)
                os.set_inheritable(fd, False)
                if _sockname(sock) != (key.ip, key.port):
                    raise OSError(0, f"fd {fd} is {_sockname(sock)}")
                _accepted_sockets_inherit(sock)    # (an older image's may lack one)
            except OSError as err:
                problems.append(f"{key.ip}:{key.port}#{key.slot}: {err.strerror or err}")
                continue
            self._socks[key] = sock
            self._backlog[key] = int(e.get("backlog", -1))
            if e.get("stored"):
                self._stored.add(key)
        return problems

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
        """Close every socket whose key is not in `keep` (for good: out of
        systemd's fd store too); returns each closed key with the
        connections that were queued on it at the close."""
        gone = {k: self.queued(k) for k in self._socks if k not in keep}
        self._close(gone, forget=True)
        return gone

    def close_all(self, forget: bool = True) -> None:
        """Close every socket; `forget` False leaves them in systemd's fd
        store (the master dies of an error: a restart gets them back)."""
        self._close(dict.fromkeys(self._socks, 0), forget)

    def _close(self, keys, forget: bool) -> None:
        for k in keys:
            self._socks.pop(k).close()
            self._backlog.pop(k, None)
            if k in self._stored:
                self._stored.discard(k)
                if forget:
                    fdstore.remove(fdstore.fd_name(k))


def keys_of(config: Config) -> set[SocketKey]:
    return {_key(lst.listen, slot) for lst in config.listeners
            for slot in range(config.ringd.workers)}


def _sockname(sock: socket.socket) -> tuple[str, int]:
    name = sock.getsockname()
    return (name[0], name[1]) if isinstance(name, tuple) and len(name) >= 2 else ("?", -1)


def _check_passed(fd: int, name: str, wanted: set[tuple[int, str, int]]
                  ) -> tuple[str, SocketKey | None, socket.socket | None]:
    """(why not, key, socket) of an fd passed in by systemd."""
    parsed = fdstore.parse_name(name)
    if parsed is None:
        return f"not a name ringd gives ({fdstore.PREFIX}IP/PORT/SLOT)", None, None
    key = SocketKey(*parsed)
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        return f"not a socket ({e.strerror or e})", None, None
    try:
        if sock.type != socket.SOCK_STREAM or sock.family != key.family:
            return "not a TCP socket of the named family", None, sock
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "not listening", None, sock
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            return "bound without SO_REUSEPORT", None, sock
        if _sockname(sock) != (key.ip, key.port):
            return f"bound to {_sockname(sock)}, not the named address", None, sock
    except OSError as e:
        return f"cannot inspect it ({e.strerror or e})", None, sock
    if (key.family, key.ip, key.port) not in wanted:
        return "no listener of the config has this address", None, sock
    sock.setblocking(False)
    _accepted_sockets_inherit(sock)
    return "", key, sock


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



