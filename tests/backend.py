"""Test backend, run as its own process: `python backend.py MODE PORT [PORT...]`.

Modes (each listens on 127.0.0.1:PORT):
  echo    echo everything; on EOF from the client, finish echoing and send FIN
  duplex  the client first sends an 8-byte big-endian count N; the backend
          sends N bytes of a deterministic stream (see pattern()) while it
          reads everything the client sends until EOF; then it sends the
          32-byte SHA-256 of what it read and closes. Both directions at once,
          with half-close, checked by hashes on both ends.
  id      send "ID <port>\\n" at once, then echo
  reset   read 1 byte, then close with SO_LINGER 0 (a backend reset)
  proxy   parse a PROXY protocol v1/v2 header, reply with one JSON line
          describing it, then echo
  proxy_raw  as proxy, and the JSON line also has "raw": the header's exact
          bytes in hex (for byte-exact checks against the spec)
  pong    line based: "PING" -> "+PONG\r\n", any other line -> "ID <port>\n"
          (a healthy server for send/expect checks)
  wrong   line based: "PING" -> "-ERR loading\r\n", any other line ->
          "ID <port>\n" (serves clients but fails a send/expect check)
  silent  accept, read and discard, never answer (a check times out)
  peer    send "PEER <client address> <port>\n" at once, then echo (which proxy
          host a connection came through, and to which backend port, in the
          namespace cluster test)
  soak    the soak protocol (bench/soak.py). The client first sends a 40-byte
          header (SOAK_HDR: magic "SOAK", op, seed, up_n, down_n, reset_after);
          the backend answers "SKHI" + the seed (8 bytes, big-endian), then:
            op 0 (stream): sends down_n bytes of stream 2*seed+1 (pattern())
              while it reads the upload until EOF, checking every byte against
              stream 2*seed; then sends a 72-byte trailer: SHA-256 of what it
              sent, SHA-256 of what it read, the count it read (8 bytes), and
              closes (FIN). With reset_after = k + 1 it sends k bytes only and
              then resets (SO_LINGER 0), without a trailer.
            op 1 (echo): echoes everything (also checking it against stream
              2*seed) until EOF, then sends FIN.
          Events go to stdout, one line each, for the driver to read:
            "EV CORRUPT <seed> <offset>"   an upload byte differs
            "EV SHORT <seed> <got> <up_n>"  a clean EOF before up_n bytes
            "EV BADHDR <hex>"               not a soak header
            "EV END <seed> <sent> <got> <how>"  every connection, at its end:
              bytes handed to the socket and read, how it ended (done,
              reset-by-design, or the error)
  sink    accept and never read (connections are held, the oldest closed
          after 120 s or beyond 4,000 held)
  blackhole  listen with a full accept queue and never accept: the kernel
          drops every SYN, so a connect times out (the queue is filled by
          connections the backend opens to itself)
Prints "READY" on stdout once every port listens.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import sys

PATTERN_BLOCK = 65536


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes of a deterministic, non-repeating-looking stream."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest() * (PATTERN_BLOCK // 32)
        counter += 1
    return bytes(out[:n])


class Stream:
    """pattern(n, seed) read from any offset without building it all:
    pattern(a + b, seed)[a:a + b] == Stream(seed).slice(a, b)."""

    def __init__(self, seed: int):
        self.seed = seed
        self._k = -1
        self._block = b""

    def block(self, k: int) -> bytes:
        if k != self._k:
            self._block = (hashlib.sha256(f"{self.seed}:{k}".encode()).digest()
                           * (PATTERN_BLOCK // 32))
            self._k = k
        return self._block

    def slice(self, off: int, n: int) -> bytes:
        out = []
        while n > 0:
            k, o = divmod(off, PATTERN_BLOCK)
            take = min(n, PATTERN_BLOCK - o)
            out.append(self.block(k)[o:o + take])
            off += take
            n -= take
        return b"".join(out)

    def first_difference(self, off: int, data: bytes) -> int:
        """-1 if data is the stream at off, else the offset of the first byte
        that differs."""
        want = self.slice(off, len(data))
        if want == data:
            return -1
        for i, (a, b) in enumerate(zip(want, data)):
            if a != b:
                return off + i
        return off + min(len(want), len(data))


# soak protocol (see the module docstring and bench/soak.py)
SOAK_HDR = struct.Struct("!4sB3xQQQQ")     # magic, op, seed, up_n, down_n, reset_after
SOAK_MAGIC = b"SOAK"
SOAK_HELLO = b"SKHI"                      # + seed, 8 bytes
SOAK_HELLO_LEN = 12
SOAK_TRAILER_LEN = 72                     # sha256(sent) + sha256(read) + count read
SOAK_STREAM, SOAK_ECHO = 0, 1
_events_left = 10000                      # bounded output


def _event(*fields) -> None:
    global _events_left
    if _events_left > 0:
        _events_left -= 1
        print("EV", *fields, flush=True)


async def _echo(reader, writer, port):
    try:
        while True:
            data = await reader.read(262144)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
        # wait for the peer to close its side
        await asyncio.wait_for(reader.read(1), 30)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()


async def _duplex(reader, writer, port):
    try:
        hdr = await reader.readexactly(8)
        (n,) = struct.unpack("!Q", hdr)
        h = hashlib.sha256()

        async def send():
            data = pattern(n, seed=n)
            for off in range(0, n, 1 << 20):
                writer.write(data[off:off + (1 << 20)])
                await writer.drain()

        async def recv():
            while True:
                data = await reader.read(262144)
                if not data:
                    return
                h.update(data)

        await asyncio.gather(send(), recv())
        writer.write(h.digest())
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _id(reader, writer, port):
    writer.write(f"ID {port}\n".encode())
    await writer.drain()
    await _echo(reader, writer, port)


async def _peer(reader, writer, port):
    writer.write(f"PEER {writer.get_extra_info('peername')[0]} {port}\n".encode())
    await writer.drain()
    await _echo(reader, writer, port)


async def _reset(reader, writer, port):
    try:
        await reader.read(1)
    finally:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()


def parse_proxy_header(buf: bytes):
    """Returns (info dict, bytes consumed) or (None, 0) if incomplete.
    Raises ValueError on a malformed header."""
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    if buf.startswith(b"PROXY "):
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > 107:
                raise ValueError("v1 header longer than 107 bytes")
            return None, 0
        line = buf[:end].decode("ascii")
        parts = line.split(" ")
        if parts[1] == "UNKNOWN":
            return {"version": 1, "proto": "UNKNOWN"}, end + 2
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            raise ValueError(f"bad v1 header {line!r}")
        fam = socket.AF_INET if parts[1] == "TCP4" else socket.AF_INET6
        for a in parts[2:4]:
            socket.inet_pton(fam, a)
        for p in parts[4:6]:
            if not p.isdigit() or (len(p) > 1 and p[0] == "0") or int(p) > 65535:
                raise ValueError(f"bad port {p!r}")
        return {"version": 1, "proto": parts[1], "src": parts[2], "dst": parts[3],
                "sport": int(parts[4]), "dport": int(parts[5])}, end + 2
    if len(buf) < 16:
        if sig.startswith(buf[:12]):
            return None, 0
        raise ValueError("neither v1 nor v2 header")
    if buf[:12] != sig:
        raise ValueError("bad v2 signature")
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack("!H", buf[14:16])[0]
    if len(buf) < 16 + length:
        return None, 0
    if ver_cmd >> 4 != 2:
        raise ValueError("bad v2 version")
    cmd = ver_cmd & 0xF
    body = buf[16:16 + length]
    info = {"version": 2, "command": "PROXY" if cmd == 1 else "LOCAL", "family": fam,
            "length": length}
    if cmd == 1 and fam == 0x11:
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        info.update(proto="TCP4", src=socket.inet_ntop(socket.AF_INET, src),
                    dst=socket.inet_ntop(socket.AF_INET, dst), sport=sport, dport=dport)
    elif cmd == 1 and fam == 0x21:
        src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
        info.update(proto="TCP6", src=socket.inet_ntop(socket.AF_INET6, src),
                    dst=socket.inet_ntop(socket.AF_INET6, dst), sport=sport, dport=dport)
    return info, 16 + length


async def _proxy(reader, writer, port, raw=False):
    buf = b""
    try:
        while True:
            data = await reader.read(4096)
            if not data:
                return
            buf += data
            try:
                info, used = parse_proxy_header(buf)
            except ValueError as e:
                writer.write(json.dumps({"error": str(e)}).encode() + b"\n")
                await writer.drain()
                return
            if info is not None:
                break
        if raw:
            info["raw"] = buf[:used].hex()
        writer.write(json.dumps(info).encode() + b"\n")
        rest = buf[used:]
        if rest:
            writer.write(rest)
        await writer.drain()
        await _echo(reader, writer, port)
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _proxy_raw(reader, writer, port):
    await _proxy(reader, writer, port, raw=True)


async def _lines(reader, writer, port, ping_reply: bytes):
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.strip() == b"PING":
                writer.write(ping_reply)
            else:
                writer.write(f"ID {port}\n".encode())
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _pong(reader, writer, port):
    await _lines(reader, writer, port, b"+PONG\r\n")


async def _wrong(reader, writer, port):
    await _lines(reader, writer, port, b"-ERR loading\r\n")


async def _silent(reader, writer, port):
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _soak(reader, writer, port):
    try:
        hdr = await reader.readexactly(SOAK_HDR.size)
    except (ConnectionError, asyncio.IncompleteReadError):
        writer.close()
        return
    magic, op, seed, up_n, down_n, reset_after = SOAK_HDR.unpack(hdr)
    if magic != SOAK_MAGIC:
        _event("BADHDR", hdr.hex())
        writer.transport.abort()
        return
    up = Stream(2 * seed)
    state = {"got": 0, "sent": 0, "bad": False, "how": "done"}
    h_up = hashlib.sha256()

    def check(data: bytes) -> None:
        if not state["bad"]:
            off = up.first_difference(state["got"], data)
            if off >= 0:
                state["bad"] = True
                _event("CORRUPT", seed, off)
        h_up.update(data)
        state["got"] += len(data)

    def send(data: bytes) -> None:
        writer.write(data)
        state["sent"] += len(data)

    try:
        send(SOAK_HELLO + struct.pack("!Q", seed))
        if op == SOAK_ECHO:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                check(data)
                send(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
            await asyncio.wait_for(reader.read(1), 30)
            return

        down = Stream(2 * seed + 1)
        limit = down_n if not reset_after else min(down_n, reset_after - 1)

        async def send_down() -> bytes:
            h = hashlib.sha256()
            off = 0
            while off < limit:
                chunk = down.slice(off, min(262144, limit - off))
                h.update(chunk)
                send(chunk)
                await writer.drain()
                off += len(chunk)
            await writer.drain()
            return h.digest()

        async def recv() -> None:
            while True:
                data = await reader.read(262144)
                if not data:
                    if state["got"] < up_n:
                        _event("SHORT", seed, state["got"], up_n)
                    return
                check(data)

        if reset_after:
            # drain() then waits until the kernel has every byte: the reset
            # comes after exactly `limit` bytes were handed to the socket
            writer.transport.set_write_buffer_limits(high=0)
            receiving = asyncio.ensure_future(recv())
            try:
                await send_down()
            finally:
                receiving.cancel()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            state["how"] = "reset-by-design"
            return
        sent_digest, err = await asyncio.gather(send_down(), recv(), return_exceptions=True)
        for x in (sent_digest, err):
            if isinstance(x, BaseException):
                state["how"] = type(x).__name__
                return                  # reset or cut: no trailer
        send(sent_digest + h_up.digest() + struct.pack("!Q", state["got"]))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError) as e:
        state["how"] = type(e).__name__
    finally:
        print("EV END", seed, state["sent"], state["got"], state["how"], flush=True)
        writer.close()


def _listen(port: int, host: str, backlog: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(backlog)
    return ls


async def _serve_sink(ls: socket.socket) -> None:
    """Accept and never read; hold at most 4,000 connections, each 120 s."""
    ls.setblocking(False)
    loop = asyncio.get_running_loop()
    held: list[tuple[float, socket.socket]] = []

    async def accept():
        while True:
            conn, _ = await loop.sock_accept(ls)
            held.append((loop.time(), conn))

    async def reap():
        while True:
            now = loop.time()
            while held and (now - held[0][0] > 120 or len(held) > 4000):
                held.pop(0)[1].close()
            await asyncio.sleep(1)

    await asyncio.gather(accept(), reap())


def _blackhole(port: int, host: str) -> list[socket.socket]:
    """A listening socket whose accept queue is full (backlog 0, one
    connection queued, never accepted): the kernel drops further SYNs."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = _listen(port, host, 0)
    keep = [ls]
    for _ in range(2):
        c = socket.socket(fam, socket.SOCK_STREAM)
        c.setblocking(False)
        try:
            c.connect((host, port))
        except BlockingIOError:
            pass
        keep.append(c)
    return keep


MODES = {"echo": _echo, "duplex": _duplex, "id": _id, "reset": _reset, "proxy": _proxy,
         "proxy_raw": _proxy_raw, "pong": _pong, "wrong": _wrong, "silent": _silent,
         "peer": _peer, "soak": _soak}


async def main(mode: str, ports: list[int], host: str) -> None:
    if mode == "blackhole":
        keep = [_blackhole(p, host) for p in ports]
        await asyncio.sleep(0.2)      # the queued self-connections complete
        print("READY", flush=True)
        await asyncio.Event().wait()      # holds `keep` open until killed
        return
    if mode == "sink":
        socks = [_listen(p, host, 4096) for p in ports]
        print("READY", flush=True)
        await asyncio.gather(*(_serve_sink(ls) for ls in socks))
        return
    handler = MODES[mode]
    servers = []
    for port in ports:
        async def client(r, w, port=port):
            await handler(r, w, port)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        servers.append(await asyncio.start_server(client, host, port, reuse_address=True,
                                                  backlog=4096, family=fam))
    print("READY", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    args = sys.argv[1:]
    host = "127.0.0.1"
    if args and args[0].startswith("--host="):
        host = args.pop(0).split("=", 1)[1]
    try:
        asyncio.run(main(args[0], [int(p) for p in args[1:]], host))
    except KeyboardInterrupt:
        pass
