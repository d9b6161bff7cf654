# Over 450 lines: corpus generators and independent reference parsers for both parsers.
"""Inputs for the first-bytes parsers (native/tls_hello.c, native/proxy_recv.c).

Shared by tests/test_parsers.py (through cffi) and the sanitizer run (which
writes the same inputs as corpus files for a standalone driver):

- real ClientHellos from Python's ssl module (MemoryBIO), and a small TLS
  codec to rebuild them: other extensions, a post-quantum key share, other
  record framings and record versions;
- PROXY v1/v2 header builders;
- reference parsers written independently of the C (whole-buffer, Python
  idioms), which the C results are compared with on every input;
- a deterministic mutation corpus: prefixes, bit flips, length fields set
  to extremes, splices, garbage.
"""
from __future__ import annotations

import ipaddress
import random
import socket
import ssl
import struct

# ---------------------------------------------------------------- constants
# mirror of ringd_api.h; test_parsers.py checks them against the built library
TLS_NEED_MORE, TLS_FOUND, TLS_NO_SNI, TLS_NOT_TLS, TLS_MALFORMED = range(5)
TLS_MAX_EXAMINED = 16384
TLS_MAX_RECORDS = 64
E_RECORD, E_NOT_CLIENT_HELLO, E_TOO_LARGE, E_FRAGMENTED, E_BODY, E_EXTENSIONS, \
    E_SNI, E_ALPN, E_VERSIONS = range(1, 10)
F_SNI_INVALID, F_ALPN, F_ALPN_TRUNCATED, F_SUPPORTED_VERSIONS = 1, 2, 4, 8

PX_NEED_MORE, PX_OK, PX_NOT_PROXY, PX_MALFORMED = range(4)
PX_V1_MAX, PX_V2_MAX = 107, 4096
PE_V1_LINE, PE_V1_PROTO, PE_V1_ADDRESS, PE_V1_PORT, PE_V1_SYNTAX, PE_V2_VERSION, \
    PE_V2_COMMAND, PE_V2_FAMILY, PE_V2_LENGTH, PE_V2_TLV, PE_V2_CRC = range(1, 12)
V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

EXT_SNI, EXT_ALPN, EXT_KEY_SHARE, EXT_VERSIONS, EXT_PADDING = 0, 16, 51, 43, 21
X25519MLKEM768 = 0x11EC          # 1184-byte ML-KEM-768 key + 32-byte X25519 key


# ------------------------------------------------------- real ClientHellos

def ssl_hello(server_hostname: str | None = None, alpn: list[str] | None = None,
              ciphers: str | None = None, max_version=None) -> bytes:
    """The first flight of a real TLS client (OpenSSL through Python's ssl)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if ciphers:
        ctx.set_ciphers(ciphers)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# ---------------------------------------------------------- a small codec

def records(data: bytes) -> list[tuple[int, int, bytes]]:
    """(content type, version, fragment) of complete records."""
    out, p = [], 0
    while p + 5 <= len(data):
        ctype, ver, n = struct.unpack_from("!BHH", data, p)
        out.append((ctype, ver, data[p + 5:p + 5 + n]))
        p += 5 + n
    return out


def handshake(data: bytes) -> bytes:
    """The handshake bytes of a well-formed first flight."""
    return b"".join(frag for ctype, _, frag in records(data) if ctype == 0x16)


def frame(msg: bytes, sizes: list[int] | None = None, version: int = 0x0301) -> bytes:
    """Handshake bytes as records of the given fragment sizes (the last one
    takes the rest); one record without sizes."""
    out, p = [], 0
    for n in (sizes or []):
        out.append(struct.pack("!BHH", 0x16, version, n) + msg[p:p + n])
        p += n
    if p < len(msg):
        out.append(struct.pack("!BHH", 0x16, version, len(msg) - p) + msg[p:])
    return b"".join(out)


class Hello:
    """A decoded ClientHello handshake message, to change and re-encode."""

    def __init__(self, msg: bytes):
        assert msg[0] == 1
        body = msg[4:4 + int.from_bytes(msg[1:4], "big")]
        self.version = struct.unpack_from("!H", body, 0)[0]
        self.random = body[2:34]
        p = 34
        n = body[p]
        self.session_id = body[p + 1:p + 1 + n]
        p += 1 + n
        n = struct.unpack_from("!H", body, p)[0]
        self.ciphers = body[p + 2:p + 2 + n]
        p += 2 + n
        n = body[p]
        self.compression = body[p + 1:p + 1 + n]
        p += 1 + n
        self.extensions: list[tuple[int, bytes]] | None = None
        if p < len(body):
            self.extensions = []
            end = p + 2 + struct.unpack_from("!H", body, p)[0]
            p += 2
            while p < end:
                t, n = struct.unpack_from("!HH", body, p)
                self.extensions.append((t, body[p + 4:p + 4 + n]))
                p += 4 + n

    def encode(self) -> bytes:
        body = struct.pack("!H", self.version) + self.random
        body += bytes([len(self.session_id)]) + self.session_id
        body += struct.pack("!H", len(self.ciphers)) + self.ciphers
        body += bytes([len(self.compression)]) + self.compression
        if self.extensions is not None:
            ext = b"".join(struct.pack("!HH", t, len(d)) + d for t, d in self.extensions)
            body += struct.pack("!H", len(ext)) + ext
        return b"\x01" + len(body).to_bytes(3, "big") + body

    def ext(self, t: int) -> bytes | None:
        for et, d in self.extensions or []:
            if et == t:
                return d
        return None

    def set_ext(self, t: int, data: bytes | None, first: bool = False) -> "Hello":
        if self.extensions is None:
            self.extensions = []
        exts = [(et, d) for et, d in self.extensions if et != t]
        if data is not None:
            # pre_shared_key (41) must stay last
            if first:
                exts.insert(0, (t, data))
            else:
                at = len(exts) - 1 if exts and exts[-1][0] == 41 else len(exts)
                exts.insert(at, (t, data))
        self.extensions = exts
        return self


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + struct.pack("!H", len(n)) + n for n in names)
    return struct.pack("!H", len(entries)) + entries


def alpn_ext(*protos: bytes) -> bytes:
    entries = b"".join(bytes([len(p)]) + p for p in protos)
    return struct.pack("!H", len(entries)) + entries


def pq_key_share(hello: Hello, rng: random.Random) -> Hello:
    """Put an X25519MLKEM768 share in front of the client's key shares, as
    Chrome and Firefox do: the ClientHello grows by 1220 bytes to 1.7 KiB."""
    data = hello.ext(EXT_KEY_SHARE) or b"\x00\x00"
    shares = data[2:]
    key = bytes(rng.getrandbits(8) for _ in range(1216))
    shares = struct.pack("!HH", X25519MLKEM768, len(key)) + key + shares
    hello.set_ext(EXT_KEY_SHARE, struct.pack("!H", len(shares)) + shares)
    groups = hello.ext(10)
    if groups is not None:
        g = struct.pack("!H", X25519MLKEM768) + groups[2:]
        hello.set_ext(10, struct.pack("!H", len(g)) + g)
    return hello


def minimal_hello(version: int = 0x0301, extensions: list[tuple[int, bytes]] | None = None,
                  rng: random.Random | None = None) -> bytes:
    """An old-style ClientHello built by hand (TLS 1.0 client, or SSL 3.0
    without extensions), as a handshake message."""
    rng = rng or random.Random(0)
    h = Hello.__new__(Hello)
    h.version = version
    h.random = bytes(rng.getrandbits(8) for _ in range(32))
    h.session_id = b""
    h.ciphers = bytes.fromhex("002f0035000a")
    h.compression = b"\x00"
    h.extensions = extensions
    return h.encode()


# --------------------------------------------------------- PROXY builders

def proxy_v1(proto: str, src: str = "", dst: str = "", sport: int | str = 0,
             dport: int | str = 0) -> bytes:
    if proto == "UNKNOWN" and not src:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def proxy_v2(command: int = 1, fam: int = 0x11, src: str = "192.0.2.1",
             dst: str = "198.51.100.2", sport: int = 40000, dport: int = 443,
             tlvs: list[tuple[int, bytes]] = (), crc: bool = False,
             addr_block: bytes | None = None, length_delta: int = 0,
             version: int = 2) -> bytes:
    if addr_block is None:
        if fam in (0x11, 0x12):
            addr_block = socket.inet_pton(socket.AF_INET, src) + \
                socket.inet_pton(socket.AF_INET, dst) + struct.pack("!HH", sport, dport)
        elif fam in (0x21, 0x22):
            addr_block = socket.inet_pton(socket.AF_INET6, src) + \
                socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport)
        elif fam in (0x31, 0x32):
            addr_block = src.encode().ljust(108, b"\0") + dst.encode().ljust(108, b"\0")
        else:
            addr_block = b""
    tl = b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in tlvs)
    if crc:
        tl += b"\x03\x00\x04\x00\x00\x00\x00"
    payload = addr_block + tl
    hdr = V2_SIG + bytes([(version << 4) | command, fam]) + \
        struct.pack("!H", (len(payload) + length_delta) & 0xFFFF)
    out = bytearray(hdr + payload)
    if crc:
        out[-4:] = struct.pack("!I", crc32c(bytes(out)))
    return bytes(out)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ------------------------------------------------ reference: TLS ClientHello

class _Need(Exception):
    def __init__(self, lb: int):
        self.lb = lb


class _Bad(Exception):
    def __init__(self, code: int):
        self.code = code


class _NotTLS(Exception):
    pass


def _norm_name(raw: bytes) -> str | None:
    if raw.endswith(b"."):
        raw = raw[:-1]
    if not 1 <= len(raw) <= 253:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    labels = text.lower().split(".")
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
    if any(not 1 <= len(lab) <= 63 or set(lab) - allowed for lab in labels):
        return None
    return ".".join(labels)


def ref_tls(data: bytes) -> dict:
    """What ringd_tls_parse must answer for these bytes: a dict with the
    result and, for FOUND/NO_SNI, the fields; for NEED_MORE the exclusive
    lower bound `need_lb` (the C `need` may be larger, never past the end)."""
    try:
        return _ref_tls(data)
    except _NotTLS:
        return {"result": TLS_NOT_TLS}
    except _Bad as b:
        return {"result": TLS_MALFORMED, "error": b.code}
    except _Need as n:
        return {"result": TLS_NEED_MORE, "need_lb": max(n.lb, len(data) + 1)}


def _ref_tls(data: bytes) -> dict:
    limit = min(len(data), TLS_MAX_EXAMINED)

    def need(n):                   # bytes [0, n) must be there
        if n > limit:
            if len(data) >= TLS_MAX_EXAMINED:
                raise _Bad(E_TOO_LARGE)
            raise _Need(n)

    state = {"nrec": 0, "version": 0}

    def record_spans():
        pos = 0
        while True:
            if state["nrec"] == TLS_MAX_RECORDS:
                raise _Bad(E_FRAGMENTED)
            first = state["nrec"] == 0
            need(pos + 1)
            if data[pos] != 0x16:
                raise _NotTLS() if first else _Bad(E_RECORD)
            need(pos + 2)
            if data[pos + 1] != 3:
                raise _NotTLS() if first else _Bad(E_RECORD)
            need(pos + 5)
            (rlen,) = struct.unpack_from("!H", data, pos + 3)
            if not 1 <= rlen <= 16384:
                raise _Bad(E_RECORD)
            if first:
                state["version"] = struct.unpack_from("!H", data, 1)[0]
            state["nrec"] += 1
            yield pos + 5, pos + 5 + rlen
            pos += 5 + rlen

    msg = bytearray()
    total = None
    end = None
    for ds, de in record_spans():
        i = ds
        while total is None and i < de:
            need(i + 1)
            msg.append(data[i])
            i += 1
            if len(msg) == 1 and msg[0] != 1:
                raise _Bad(E_NOT_CLIENT_HELLO)
            if len(msg) == 4:
                total = 4 + int.from_bytes(msg[1:4], "big")
        if total is None:
            continue
        left = total - len(msg)
        if left <= de - i:
            end = i + left
            if end > TLS_MAX_EXAMINED:
                raise _Bad(E_TOO_LARGE)
            need(end)
            msg += data[i:end]
            break
        if de + 5 + left - (de - i) > TLS_MAX_EXAMINED:
            raise _Bad(E_TOO_LARGE)
        msg += data[i:de]
    info = {"result": TLS_NO_SNI, "record_version": state["version"], "records": state["nrec"],
            "hello_end": end, "name": b"", "alpn": b"", "alpn_count": 0, "flags": 0}
    try:
        _ref_body(bytes(msg[4:total]), info)
    except _Bad as b:
        return {"result": TLS_MALFORMED, "error": b.code, "record_version": state["version"]}
    return info


class _Reader:
    def __init__(self, b: bytes, err: int):
        self.b, self.p, self.err = b, 0, err

    def left(self) -> int:
        return len(self.b) - self.p

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise _Bad(self.err)
        out = self.b[self.p:self.p + n]
        self.p += n
        return out

    def num(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vec(self, size: int) -> bytes:
        return self.take(self.num(size))


def _ref_body(body: bytes, info: dict) -> None:
    r = _Reader(body, E_BODY)
    info["hello_version"] = info["max_version"] = r.num(2)
    r.take(32)
    if len(r.vec(1)) > 32:
        raise _Bad(E_BODY)
    suites = r.vec(2)
    if len(suites) < 2 or len(suites) % 2:
        raise _Bad(E_BODY)
    if not r.vec(1):
        raise _Bad(E_BODY)
    if not r.left():
        return
    r.err = E_EXTENSIONS
    exts = _Reader(r.vec(2), E_EXTENSIONS)
    if r.left():
        raise _Bad(E_EXTENSIONS)
    seen = set()
    while exts.left():
        etype = exts.num(2)
        data = exts.vec(2)
        if etype in (EXT_SNI, EXT_ALPN, EXT_VERSIONS):
            if etype in seen:
                raise _Bad(E_EXTENSIONS)
            seen.add(etype)
        if etype == EXT_SNI:
            _ref_sni(data, info)
        elif etype == EXT_ALPN:
            _ref_alpn(data, info)
        elif etype == EXT_VERSIONS:
            _ref_versions(data, info)


def _ref_sni(data: bytes, info: dict) -> None:
    r = _Reader(data, E_SNI)
    lst = _Reader(r.vec(2), E_SNI)
    if r.left() or not lst.left():
        raise _Bad(E_SNI)
    host = None
    while lst.left():
        ntype = lst.num(1)
        name = lst.vec(2)
        if not name:
            raise _Bad(E_SNI)
        if ntype == 0:
            if host is not None:
                raise _Bad(E_SNI)
            host = name
    if host is not None:
        norm = _norm_name(host)
        if norm is None:
            info["flags"] |= F_SNI_INVALID
        else:
            info["name"] = norm.encode()
            info["result"] = TLS_FOUND


def _ref_alpn(data: bytes, info: dict) -> None:
    r = _Reader(data, E_ALPN)
    raw = r.vec(2)
    if r.left() or len(raw) < 2:
        raise _Bad(E_ALPN)
    lst = _Reader(raw, E_ALPN)
    info["flags"] |= F_ALPN
    kept, full = b"", False
    while lst.left():
        proto = lst.vec(1)
        if not proto:
            raise _Bad(E_ALPN)
        info["alpn_count"] += 1
        entry = bytes([len(proto)]) + proto
        if not full and len(kept) + len(entry) <= 256:
            kept += entry
        else:
            full = True
            info["flags"] |= F_ALPN_TRUNCATED
    info["alpn"] = kept


def _ref_versions(data: bytes, info: dict) -> None:
    r = _Reader(data, E_VERSIONS)
    raw = r.vec(1)
    if r.left() or len(raw) < 2 or len(raw) % 2:
        raise _Bad(E_VERSIONS)
    vs = [v for (v,) in struct.iter_unpack("!H", raw)
          if not (v >> 8 == v & 0xFF and v & 0x0F == 0x0A)]
    info["flags"] |= F_SUPPORTED_VERSIONS
    if vs:
        info["max_version"] = max(vs)


# ------------------------------------------------------ reference: PROXY

def ref_proxy(data: bytes) -> dict:
    """What ringd_proxy_parse must answer: result, and for OK the header
    length, command, family and addresses (ip, port) or None."""
    for i in range(1, min(len(data), 12) + 1):
        seen = data[:i]
        if not (b"PROXY ".startswith(seen) or seen.startswith(b"PROXY ")) and \
                not V2_SIG.startswith(seen):
            return {"result": PX_NOT_PROXY}
    if data.startswith(V2_SIG):
        return _ref_v2(data)
    if data.startswith(b"PROXY "):
        return _ref_v1(data)
    return {"result": PX_NEED_MORE}


def _px_bad(code: int, version: int) -> dict:
    return {"result": PX_MALFORMED, "error": code, "version": version}


def _ref_v2(d: bytes) -> dict:
    if len(d) < 13:
        return {"result": PX_NEED_MORE}
    if d[12] >> 4 != 2:
        return _px_bad(PE_V2_VERSION, 2)
    cmd = d[12] & 15
    if cmd > 1:
        return _px_bad(PE_V2_COMMAND, 2)
    if len(d) < 14:
        return {"result": PX_NEED_MORE}
    sizes = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
    fam = d[13]
    if cmd == 1 and fam not in sizes:
        return _px_bad(PE_V2_FAMILY, 2)
    if len(d) < 16:
        return {"result": PX_NEED_MORE}
    (blen,) = struct.unpack_from("!H", d, 14)
    if 16 + blen > PX_V2_MAX or (cmd == 1 and blen < sizes[fam]):
        return _px_bad(PE_V2_LENGTH, 2)
    if len(d) < 16 + blen:
        return {"result": PX_NEED_MORE, "need": 16 + blen}
    hdr = d[:16 + blen]
    out = {"result": PX_OK, "version": 2, "header_len": 16 + blen, "command": cmd,
           "family": fam, "src": None, "dst": None, "authority": None, "alpn": None,
           "crc": False}
    if cmd == 0 or fam == 0:
        return out
    block = hdr[16:16 + sizes[fam]]
    if fam == 0x11:
        out["src"] = (socket.inet_ntop(socket.AF_INET, block[0:4]), struct.unpack("!H", block[8:10])[0])
        out["dst"] = (socket.inet_ntop(socket.AF_INET, block[4:8]), struct.unpack("!H", block[10:12])[0])
    elif fam == 0x21:
        out["src"] = (socket.inet_ntop(socket.AF_INET6, block[0:16]), struct.unpack("!H", block[32:34])[0])
        out["dst"] = (socket.inet_ntop(socket.AF_INET6, block[16:32]), struct.unpack("!H", block[34:36])[0])
    tlvs = hdr[16 + sizes[fam]:]
    p, crc_at = 0, None
    while p < len(tlvs):
        if len(tlvs) - p < 3:
            return _px_bad(PE_V2_TLV, 2)
        t = tlvs[p]
        (n,) = struct.unpack_from("!H", tlvs, p + 1)
        if p + 3 + n > len(tlvs):
            return _px_bad(PE_V2_TLV, 2)
        value = tlvs[p + 3:p + 3 + n]
        if t == 0x01 and out["alpn"] is None:
            out["alpn"] = value
        elif t == 0x02 and out["authority"] is None:
            out["authority"] = value
        elif t == 0x03:
            if n != 4 or crc_at is not None:
                return _px_bad(PE_V2_CRC, 2)
            crc_at = 16 + sizes[fam] + p + 3
        p += 3 + n
    if crc_at is not None:
        zeroed = hdr[:crc_at] + bytes(4) + hdr[crc_at + 4:]
        if crc32c(zeroed) != struct.unpack_from("!I", hdr, crc_at)[0]:
            return _px_bad(PE_V2_CRC, 2)
        out["crc"] = True
    return out


def _ref_port(s: bytes) -> int | None:
    if not s or len(s) > 5 or not s.isdigit() or (len(s) > 1 and s[:1] == b"0"):
        return None
    v = int(s)
    return v if v <= 65535 else None


def _ref_v4(s: bytes) -> str | None:
    parts = s.split(b".")
    if len(parts) != 4:
        return None
    for p in parts:
        if not p or len(p) > 3 or not p.isdigit() or (len(p) > 1 and p[:1] == b"0") \
                or int(p) > 255:
            return None
    return s.decode()


def _ref_v6(s: bytes) -> str | None:
    # Python's ipaddress is the judge, plus the spec's and inet_ntop's limits:
    # no zone, at most 4 hex digits a group, plain dotted quad at the end
    try:
        text = s.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "%" in text or not text or any(c not in "0123456789abcdefABCDEF:." for c in text):
        return None
    if "." in text:
        head, _, quad = text.rpartition(":")
        if _ref_v4(quad.encode()) is None:
            return None
    try:
        return socket.inet_ntop(socket.AF_INET6, ipaddress.IPv6Address(text).packed)
    except ValueError:
        return None


def _ref_v1(d: bytes) -> dict:
    line_end = None
    for i in range(6, min(len(d), PX_V1_MAX)):
        if d[i] == 0x0D:
            if i + 2 > PX_V1_MAX:
                return _px_bad(PE_V1_LINE, 1)
            if i + 1 >= len(d):
                return {"result": PX_NEED_MORE}
            if d[i + 1] != 0x0A:
                return _px_bad(PE_V1_LINE, 1)
            line_end = i
            break
        if d[i] == 0x0A:
            return _px_bad(PE_V1_LINE, 1)
        # byte classes, decided from what came before only
        word = d[6:i + 1]
        if word[:1] == b"U":
            if len(word) <= 7:
                if b"UNKNOWN"[:len(word)] != word:
                    return _px_bad(PE_V1_PROTO, 1)
            elif len(word) == 8 and word[7:8] != b" ":
                return _px_bad(PE_V1_PROTO, 1)
        else:
            if len(word) <= 5:
                if b"TCP4 "[:len(word)] != word and b"TCP6 "[:len(word)] != word:
                    return _px_bad(PE_V1_PROTO, 1)
            elif chr(d[i]) not in "0123456789abcdefABCDEF.: ":
                return _px_bad(PE_V1_LINE, 1)
    if line_end is None:
        if len(d) >= PX_V1_MAX:
            return _px_bad(PE_V1_LINE, 1)
        return {"result": PX_NEED_MORE}
    line = d[6:line_end]
    out = {"result": PX_OK, "version": 1, "header_len": line_end + 2, "command": 1,
           "family": 0, "src": None, "dst": None}
    if line.startswith(b"UNKNOWN"):
        return out
    if line[:5] not in (b"TCP4 ", b"TCP6 "):
        return _px_bad(PE_V1_PROTO, 1)
    fields = line[5:].split(b" ")
    if len(fields) != 4 or not all(fields):
        return _px_bad(PE_V1_SYNTAX, 1)
    six = line[3:4] == b"6"
    conv = _ref_v6 if six else _ref_v4
    src, dst = conv(fields[0]), conv(fields[1])
    if src is None or dst is None:
        return _px_bad(PE_V1_ADDRESS, 1)
    sport, dport = _ref_port(fields[2]), _ref_port(fields[3])
    if sport is None or dport is None:
        return _px_bad(PE_V1_PORT, 1)
    if not six:
        src, dst = str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst))
    out.update(family=0x21 if six else 0x11, src=(src, sport), dst=(dst, dport))
    return out


# ------------------------------------------------------------- the corpus

def base_hellos(rng: random.Random) -> list[bytes]:
    """Well-formed first flights: real ones from OpenSSL, rebuilt variants."""
    out = []
    real_sni = ssl_hello("Api.Example.COM", ["h2", "http/1.1"])
    out.append(real_sni)
    out.append(ssl_hello(None))
    out.append(ssl_hello("db.internal", max_version=ssl.TLSVersion.TLSv1_2))
    big = ssl_hello("big.example.net", [f"proto-{i:03d}-{'x' * 12}" for i in range(90)])
    out.append(big)
    msg = handshake(real_sni)
    out.append(frame(pq_key_share(Hello(msg), rng).encode()))
    pq = pq_key_share(Hello(msg), rng).encode()
    out.append(frame(pq, [len(pq) // 2]))
    out.append(frame(pq, [1, 700], version=0x0303))
    out.append(frame(minimal_hello(0x0301, [(EXT_SNI, sni_ext(b"old.example.org"))]),
                     version=0x0300))
    out.append(frame(minimal_hello(0x0300), version=0x0300))
    return out


def _length_fields(msg: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the length fields of a ClientHello message."""
    fields = [(1, 3)]
    h = Hello(msg)
    p = 4 + 34
    fields.append((p, 1))
    p += 1 + len(h.session_id)
    fields.append((p, 2))
    p += 2 + len(h.ciphers)
    fields.append((p, 1))
    p += 1 + len(h.compression)
    if h.extensions is not None:
        fields.append((p, 2))
        p += 2
        for t, d in h.extensions:
            fields.append((p + 2, 2))
            if t in (EXT_SNI, EXT_ALPN) and len(d) >= 2:
                fields.append((p + 4, 2))
                if t == EXT_SNI and len(d) >= 5:
                    fields.append((p + 7, 2))
                if t == EXT_ALPN and len(d) >= 3:
                    fields.append((p + 6, 1))
            if t == EXT_VERSIONS and d:
                fields.append((p + 4, 1))
            p += 4 + len(d)
    return fields


def tls_corpus(seed: int = 1, count: int = 2500) -> list[bytes]:
    """Well-formed hellos, their structured mutations and garbage."""
    rng = random.Random(seed)
    bases = base_hellos(rng)
    out = list(bases)
    msgs = [handshake(b) for b in bases]
    # duplicates, bad names, odd ALPN lists
    h = Hello(msgs[0])
    out.append(frame(Hello(msgs[0]).set_ext(EXT_SNI, sni_ext(b"a.example", b"b.example")).encode()))
    exts = list(h.extensions) + [(EXT_SNI, sni_ext(b"second.example"))]
    dup = Hello(msgs[0])
    dup.extensions = exts
    out.append(frame(dup.encode()))
    for name in (b"UPPER.Example.", b"under_score.example", b"a..b", b".lead", b"trail..",
                 b"sp ace.example", b"x" * 64 + b".example", b"\xff.example", b"1.2.3.4",
                 (b"a" * 63 + b".") * 3 + b"a" * 61, (b"a" * 63 + b".") * 3 + b"a" * 62,
                 b"*.example"):
        out.append(frame(Hello(msgs[0]).set_ext(EXT_SNI, sni_ext(name)).encode()))
    out.append(frame(Hello(msgs[0]).set_ext(EXT_SNI, sni_ext(b"x", name_type=7)).encode()))
    out.append(frame(Hello(msgs[0]).set_ext(EXT_ALPN, alpn_ext(*[b"p" * 200] * 3)).encode()))
    out.append(frame(Hello(msgs[0]).set_ext(EXT_ALPN, alpn_ext(b"h2", b"")).encode()))
    out.append(frame(Hello(msgs[0]).set_ext(EXT_SNI, b"").encode()))
    out.append(frame(Hello(msgs[0]).set_ext(EXT_VERSIONS, b"\x04\x0a\x0a\x7f\x1c").encode()))
    # near the 16 KiB bound, in one record and across records
    unpadded = len(Hello(msgs[0]).set_ext(EXT_PADDING, None).encode())
    for pad in (16384 - 5 - unpadded - 4, 16384 - 5 - unpadded - 3, 15000):
        m = Hello(msgs[0]).set_ext(EXT_PADDING, bytes(pad)).encode()
        if len(m) <= 16384:
            out.append(frame(m))
        out.append(frame(m, [4000, 4000, 4000]))
    # tiny fragments: the handshake header split, and more records than allowed
    out.append(frame(msgs[0], [1, 1, 1, 1]))
    out.append(frame(msgs[0], [8] * (TLS_MAX_RECORDS - 1)))
    out.append(frame(msgs[0], [8] * TLS_MAX_RECORDS))

    while len(out) < count:
        base = rng.choice(bases + out[len(bases):len(bases) + 40])
        kind = rng.randrange(8)
        b = bytearray(base)
        if not b:
            continue
        if kind == 0:                                   # a prefix
            out.append(bytes(b[:rng.randrange(len(b) + 1)]))
            continue
        if kind == 1:                                   # bit flips
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == 2:                                 # a length field set to an extreme
            msg = handshake(base)
            try:
                fields = _length_fields(msg)
            except (IndexError, struct.error, AssertionError):
                continue
            off, size = rng.choice(fields)
            orig = int.from_bytes(msg[off:off + size], "big")
            val = rng.choice([0, 1, (1 << (8 * size)) - 1, (1 << (8 * size)) - 2,
                              rng.randrange(1 << (8 * size)), orig + 1, orig + 1, orig + 2,
                              orig - 1, orig - 1]) % (1 << (8 * size))
            m = bytearray(msg)
            m[off:off + size] = val.to_bytes(size, "big")
            recs = records(base)
            sizes = [len(f) for _, _, f in recs][:-1]
            b = bytearray(frame(bytes(m), sizes, recs[0][1]))
        elif kind == 3:                                 # a record header field
            recs = records(base)
            if not recs:
                continue
            ri = rng.randrange(len(recs))
            pos = sum(5 + len(f) for _, _, f in recs[:ri])
            field = rng.choice([(0, 1), (1, 2), (3, 2)])
            val = rng.choice([0, 1, 0x14, 0x17, 0x0300, 0x0304, 0x4000, 0x4001, 0xFFFF])
            b[pos + field[0]:pos + field[0] + field[1]] = \
                (val & ((1 << (8 * field[1])) - 1)).to_bytes(field[1], "big")
        elif kind == 4:                                 # re-framed at random points
            msg = handshake(base)
            sizes, left = [], len(msg)
            while left > 1 and rng.random() < 0.6 and len(sizes) < 70:
                n = rng.randint(1, max(1, left - 1))
                sizes.append(n)
                left -= n
            b = bytearray(frame(msg, sizes, rng.choice([0x0300, 0x0301, 0x0303])))
        elif kind == 5:                                 # bytes cut out or inserted
            i = rng.randrange(len(b))
            if rng.random() < 0.5:
                del b[i:i + rng.randint(1, 8)]
            else:
                b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        elif kind == 6:                                 # garbage after a TLS-like start
            b = bytearray(b"\x16\x03" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))))
        else:                                           # garbage
            b = bytearray(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))))
        out.append(bytes(b))
    return out


def base_proxy_headers() -> list[bytes]:
    return [
        proxy_v1("TCP4", "192.0.2.1", "198.51.100.2", 56324, 443),
        proxy_v1("TCP4", "0.0.0.0", "255.255.255.255", 0, 65535),
        proxy_v1("TCP6", "2001:db8::1", "2001:db8:0:1:2:3:4:5", 1, 8443),
        proxy_v1("TCP6", "::ffff:192.0.2.7", "::", 65535, 0),
        proxy_v1("TCP6", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                 "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, 65535),
        proxy_v1("UNKNOWN"),
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        proxy_v2(),
        proxy_v2(fam=0x21, src="2001:db8::7", dst="2001:db8::8", sport=1, dport=2),
        proxy_v2(command=0, fam=0x00),
        proxy_v2(command=0, fam=0x11),
        proxy_v2(tlvs=[(0x02, b"api.example.com"), (0x01, b"h2"), (0x04, bytes(5))]),
        proxy_v2(tlvs=[(0xE0, b"x" * 40)], crc=True),
        proxy_v2(fam=0x31, src="/run/a.sock", dst="/run/b.sock"),
        proxy_v2(fam=0x12),
        proxy_v2(fam=0x00),
    ]


def proxy_corpus(seed: int = 2, count: int = 2500) -> list[bytes]:
    rng = random.Random(seed)
    bases = base_proxy_headers()
    payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    out = [b + payload for b in bases]
    # HAProxy's reg-test scenarios: a TLV past the header, a truncated TLV
    out.append(proxy_v2(tlvs=[(0x02, b"12345")], length_delta=0) + payload)
    out.append(proxy_v2(tlvs=[(0x02, b"1234512345")], length_delta=-5) + payload)
    out.append(proxy_v2(tlvs=[(0x02, b"1234")], length_delta=1) + b"\x00" + payload)
    out.append(proxy_v2(version=1) + payload)
    out.append(proxy_v2(command=2) + payload)
    out.append(proxy_v2(fam=0x13) + payload)
    out.append(proxy_v2(fam=0x11, addr_block=bytes(11)) + payload)
    out.append(proxy_v2(tlvs=[(0x03, b"\0\0\0\0\0")]) + payload)
    bad_crc = bytearray(proxy_v2(crc=True))
    bad_crc[20] ^= 1
    out.append(bytes(bad_crc) + payload)
    out.append(proxy_v2(length_delta=PX_V2_MAX) + payload)
    for line in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
                 b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
                 b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
                 b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", b"PROXY TCP4 ::1 ::1 1 2\r\n",
                 b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", b"PROXY TCP6 ::1:: ::1 1 2\r\n",
                 b"PROXY TCP6 12345::1 ::1 1 2\r\n", b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n",
                 b"PROXY TCP6 1:2:3:4:5:6:7:: ::1 1 2\r\n", b"PROXY TCP6 ::1.2.3.4 ::1 1 2\r\n",
                 b"PROXY TCP6 ::1.2.3.04 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                 b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY UNKNOWNX\r\n", b"PROXY UNKNOWN\r\n",
                 b"PROXY UNKNOWN garbage \x01\xff here\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2x\r\n",
                 b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP4\r\n", b"PROXY \r\n",
                 b"PROXY TCP4 " + b"1" * 100 + b"\r\n", b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n",
                 b"PROXY UNKNOWN " + b"a" * 93 + b"\r\n", b"PROXY UNKNOWN " + b"a" * 120,
                 b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXYTCP4",
                 b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH_9.2p1\r\n", b"\x16\x03\x01\x02\x00\x01",
                 V2_SIG[:11] + b"\x0b"):
        out.append(line + payload)
    while len(out) < count:
        base = rng.choice(out[:60])
        b = bytearray(base)
        if not b:
            continue
        kind = rng.randrange(6)
        if kind == 0:
            out.append(bytes(b[:rng.randrange(len(b) + 1)]))
            continue
        if kind == 1:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == 2 and base.startswith(V2_SIG):     # length or a TLV length
            orig = int.from_bytes(b[14:16], "big")
            if rng.random() < 0.5:
                b[14:16] = (rng.choice([0, 1, 11, 12, 35, 36, 0xFFFF, rng.randrange(0x10000),
                                        orig + 1, orig - 1, orig + 3, orig - 3])
                            % 0x10000).to_bytes(2, "big")
            else:
                hl = 16 + orig
                i = rng.randrange(16, max(17, hl))
                if i + 2 < len(b):
                    cur = int.from_bytes(b[i:i + 2], "big")
                    b[i:i + 2] = (rng.choice([0, 0xFFFF, rng.randrange(64), cur + 1, cur - 1])
                                  % 0x10000).to_bytes(2, "big")
        elif kind == 3:                                 # a character of a v1 line
            i = rng.randrange(len(b))
            b[i] = ord(rng.choice("0123456789abcdefABCDEF.: \r\nPROXYTCPUNKOW\x00\xff"))
        elif kind == 4:
            i = rng.randrange(len(b))
            if rng.random() < 0.5:
                del b[i:i + rng.randint(1, 6)]
            else:
                b[i:i] = bytes(rng.choice(b"0123456789.: :\r\n\x00") for _ in range(rng.randint(1, 6)))
        else:
            b = bytearray(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 120))))
            if rng.random() < 0.5:
                b[:0] = rng.choice([b"PROXY ", V2_SIG, V2_SIG + b"\x21\x11"])
        out.append(bytes(b))
    return out
