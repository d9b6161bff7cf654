"""The runtime control socket (a unix socket, mode 0660).

One JSON request per connection, one JSON reply: {"cmd": "reload"} ->
{"ok": false, "error": "..."}. The CLI (`ringd reload|stop|status|server|drain|ready|upgrade`)
talks to the master through it, so a rejected reload is reported to whoever
asked for it. Reads are bounded in size and time: a stuck or hostile client
cannot stall the master loop.

The listening socket outlives `ringd upgrade`: the next image of the master
serves the very same socket (start(fd)), so a client never finds the path
missing or refused while the master re-executes itself; it waits in the
socket's queue at most.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import stat

MAX_REQUEST = 64 * 1024
READ_TIMEOUT = 5.0


class ControlServer:
    def __init__(self, master, path: str):
        self.master = master
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.handlers: dict[str, object] = {
            "reload": self._reload,
            "stop": self._stop,
            "status": self._status,
            "ping": self._ping,
            "server": self._server,
            "drain": self._drain,
            "ready": self._ready,
            "upgrade": self._upgrade,
        }

    async def start(self, fd: int | None = None) -> None:
        """Listen on the path; or serve `fd`, the listening socket an earlier
        image of this master handed over across ringd upgrade."""
        if fd is not None:
            sock = socket.socket(fileno=fd)
            os.set_inheritable(fd, False)
            if sock.family == socket.AF_UNIX and sock.getsockname() == self.path:
                self.server = await asyncio.start_unix_server(self._client, sock=sock,
                                                              limit=MAX_REQUEST)
                return
            sock.close()        # not what it should be: listen afresh
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._remove_stale()
        self.server = await asyncio.start_unix_server(self._client, path=self.path,
                                                      limit=MAX_REQUEST)
        os.chmod(self.path, 0o660)

    def _remove_stale(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(17, f"{self.path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            try:
                s.connect(self.path)
            except OSError:
                os.unlink(self.path)     # nobody answers: stale
                return
        raise OSError(98, f"{self.path} is in use by a running ringd")

    def fileno(self) -> int:
        """The listening socket (to keep across ringd upgrade)."""
        return self.server.sockets[0].fileno()

    async def stop(self) -> None:
        if self.server is not None:
            await close_server(self.server)
            self.server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("request must be a JSON object")
                handler = self.handlers.get(req.get("cmd"))
                self.master.log.debug("control_request", cmd=str(req.get("cmd"))[:64])
                if handler is None:
                    reply = {"ok": False, "error": f"unknown command {req.get('cmd')!r}"}
                else:
                    reply = await handler(req)
            except ValueError as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
            if reply.get("exec"):
                # ringd upgrade: the answer is out, the exec may follow
                self.master.upgrades.reply_written()
        except (asyncio.TimeoutError, asyncio.LimitOverrunError, ConnectionError, OSError,
                asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()

    async def _reload(self, req) -> dict:
        """{"cmd": "reload"[, "config": FILE]}: the master re-reads its own
        file (nginx -s reload and HAProxy's master do the same); a FILE that
        is not that file is refused, never reported as reloaded."""
        given = req.get("config")
        mine = self.master.config_path
        if given is not None and (not isinstance(given, str) or not same_file(given, mine)):
            msg = (f"{given} is not the file this master runs ({mine}); a reload re-reads "
                   f"{mine}: edit that file, or restart ringd with -c {given}")
            self.master.refuse_reload(msg)
            return {"ok": False, "error": msg}
        ok, msg = await self.master.submit("reload")
        return {"ok": ok, "message" if ok else "error": msg}

    async def _upgrade(self, req) -> dict:
        """{"cmd": "upgrade"[, "config": FILE]}: re-execute the master in place.
        Answers {"ok": true, "exec": true, "attempt": N, ...} right before the
        exec (this connection does not survive it: the client learns the
        outcome from status), or {"ok": false, "error": ...} if refused."""
        given = req.get("config")
        mine = self.master.config_path
        if given is not None and (not isinstance(given, str) or not same_file(given, mine)):
            msg = (f"{given} is not the file this master runs ({mine}); an upgrade re-reads "
                   f"{mine}: edit that file, or restart ringd with -c {given}")
            self.master.upgrades.refuse_request(msg)
            return {"ok": False, "error": msg}
        ok, result = await self.master.submit("upgrade")
        if not ok:
            return {"ok": False, "error": result}
        return {"ok": True, "exec": True, **result}

    async def _stop(self, req) -> dict:
        cmd = "fast_stop" if req.get("now") else "graceful_stop"
        asyncio.get_running_loop().call_soon(
            lambda: asyncio.ensure_future(self.master.submit(cmd)))
        return {"ok": True, "message": "stopping", "pid": os.getpid()}

    async def _status(self, req) -> dict:
        return {"ok": True, "status": self.master.status()}

    async def _server(self, req) -> dict:
        """{"cmd": "server", "server": "UPSTREAM/SERVER", "action": "drain"|"maint"|
        "ready"|"weight", "weight": N}"""
        servers = self.master.servers
        target, action = req.get("server"), req.get("action")
        if not isinstance(target, str) or action not in ("drain", "maint", "ready", "weight"):
            return {"ok": False, "error": "usage: server UPSTREAM/SERVER drain|maint|ready|weight N"}
        try:
            rec = servers.lookup(target)
            if action == "weight":
                w = req.get("weight")
                rec = servers.set_weight(rec.upstream, rec.name, None if w is None else int(w))
            else:
                rec = servers.set_admin(rec.upstream, rec.name, action)
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if e.args else str(e)
            return {"ok": False, "error": str(msg)}
        return {"ok": True, "server": rec.snapshot()}

    async def _ping(self, req) -> dict:
        return {"ok": True, "pid": os.getpid(), "lameduck": self.master.lameduck.state}

    async def _drain(self, req) -> dict:
        """{"cmd": "drain", "after": SECONDS}: lame duck (/healthz 503) now, stop
        accepting after SECONDS (default ringd.drain_after), then a graceful stop."""
        after = req.get("after")
        if after is None:
            after = self.master.config.ringd.drain_after
        ok, msg = self.master.lameduck.drain(after)
        return {"ok": ok, "message" if ok else "error": msg, "pid": os.getpid(),
                "drain_timeout": self.master.config.ringd.drain_timeout,
                "lameduck": self.master.lameduck.snapshot()}

    async def _ready(self, req) -> dict:
        """{"cmd": "ready"}: cancel a lame-duck drain that still accepts."""
        ok, msg = self.master.lameduck.ready()
        return {"ok": ok, "message" if ok else "error": msg,
                "lameduck": self.master.lameduck.snapshot()}


async def close_server(server: asyncio.AbstractServer, timeout: float = 1.0) -> None:
    """Stop listening and give open clients `timeout` to finish."""
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), timeout)
    except asyncio.TimeoutError:
        pass


class ControlClientError(Exception):
    pass


def same_file(a: str, b: str) -> bool:
    """Do the paths name one file (symlinks and ./ resolved)?"""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.realpath(a) == os.path.realpath(b)


def request(path: str, payload: dict, timeout: float = 60.0) -> dict:
    """Send one request to a running master and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlClientError(f"no control socket at {path} (is ringd running?)") from None
        except OSError as e:
            raise ControlClientError(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            s.sendall(json.dumps(payload).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            raise ControlClientError(f"no answer from {path} within {timeout:.0f}s") from None
        except OSError as e:
            raise ControlClientError(f"control socket {path}: {e.strerror or e}") from None
    try:
        return json.loads(buf)
    except ValueError:
        raise ControlClientError(f"garbled answer from {path}") from None
