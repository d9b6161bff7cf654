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


MODES = {"echo": _echo, "duplex": _duplex, "id": _id, "reset": _reset, "proxy": _proxy,
         "proxy_raw": _proxy_raw, "pong": _pong, "wrong": _wrong, "silent": _silent,
         "peer": _peer}


async def main(mode: str, ports: list[int], host: str) -> None:
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
