"""Idle backend for the idle-connection scenario: accepts connections on
127.0.0.1:PORT and holds them open, reading and dropping whatever arrives and
closing a connection when its peer does. Runs until SIGTERM/SIGINT, or at the
latest after --max-seconds.

    python bench/holder.py PORT [--max-seconds S]
"""
from __future__ import annotations

import argparse
import resource
import select
import signal
import socket
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", args.port))
    lsock.listen(4096)
    lsock.setblocking(False)

    ep = select.epoll()
    ep.register(lsock.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    deadline = time.monotonic() + args.max_seconds
    while not stop and time.monotonic() < deadline:
        try:
            events = ep.poll(0.5)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == lsock.fileno():
                for _ in range(1024):          # drain the accept queue, bounded
                    try:
                        c, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:            # out of fds: try again later
                        break
                    c.setblocking(False)
                    conns[c.fileno()] = c
                    ep.register(c.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                data = c.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                del conns[fd]
                c.close()
    for c in conns.values():
        c.close()
    lsock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
