# Over 450 lines: one module per area; the first-bytes parsers, case by case.
"""The first-bytes parsers of the data path, through cffi: the TLS ClientHello
parser of SNI routing (native/tls_hello.c) and the PROXY protocol receiver
(native/proxy_recv.c).

Real ClientHellos come from Python's ssl module; the PROXY scenarios follow
the spec and HAProxy's reg-tests (proxy_protocol_tlv_validation). Every
input of a generated corpus is also checked against a reference parser
written independently in Python (tests/parser_corpus.py), and the whole
corpus runs through a sanitizer build of the C at the end of this file.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

import parser_corpus as pc
from parser_corpus import (Hello, alpn_ext, frame, handshake, minimal_hello, pq_key_share,
                           proxy_v1, proxy_v2, sni_ext, ssl_hello)
from ringd._native import ffi, lib

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
DRIVER = Path(__file__).resolve().parent / "fuzz" / "parsers_fuzz.c"


# ------------------------------------------------------------- wrappers

def tls(data: bytes) -> dict:
    out = ffi.new("struct ringd_hello_info *")
    rc = lib.ringd_tls_parse(ffi.from_buffer("uint8_t[]", data), len(data), out)
    d = {"result": rc, "need": out.need, "error": out.error}
    if rc in (lib.RINGD_TLS_FOUND, lib.RINGD_TLS_NO_SNI):
        d.update(record_version=out.record_version, hello_version=out.hello_version,
                 max_version=out.max_version, records=out.records, hello_end=out.hello_end,
                 name=bytes(ffi.buffer(out.name, out.name_len)),
                 alpn=bytes(ffi.buffer(out.alpn, out.alpn_len)), alpn_count=out.alpn_count,
                 flags=out.flags)
    if rc == lib.RINGD_TLS_MALFORMED:
        d["record_version"] = out.record_version
    return d


def _sockaddr(raw, n: int):
    if n == 0:
        return None
    b = bytes(ffi.buffer(raw, n))
    (family,) = struct.unpack_from("=H", b)
    (port,) = struct.unpack_from("!H", b, 2)
    if family == socket.AF_INET:
        assert n == 16
        return socket.inet_ntop(socket.AF_INET, b[4:8]), port
    assert family == socket.AF_INET6 and n == 28
    return socket.inet_ntop(socket.AF_INET6, b[8:24]), port


def proxy(data: bytes) -> dict:
    out = ffi.new("struct ringd_proxy_info *")
    rc = lib.ringd_proxy_parse(ffi.from_buffer("uint8_t[]", data), len(data), out)
    d = {"result": rc, "need": out.need, "error": out.error, "version": out.version}
    if rc == lib.RINGD_PROXY_OK:
        d.update(header_len=out.header_len, command=out.command, family=out.family,
                 src=_sockaddr(out.src, out.src_len), dst=_sockaddr(out.dst, out.dst_len),
                 authority=data[out.authority_off:out.authority_off + out.authority_len]
                 if out.authority_off else None,
                 alpn=data[out.alpn_off:out.alpn_off + out.alpn_len] if out.alpn_off else None,
                 crc=bool(out.flags & lib.RINGD_PROXY_F_CRC32C))
    return d


def normalize(name: bytes) -> bytes | None:
    out = ffi.new("uint8_t[256]")
    n = lib.ringd_tls_name_normalize(ffi.from_buffer("uint8_t[]", name), len(name), out)
    return None if n < 0 else bytes(ffi.buffer(out, n))


def fed(parse, data: bytes, cuts) -> dict:
    """Feed the bytes as a client's reads would deliver them: parse what has
    arrived after each read (the parser is called again from the start),
    stop at the first verdict."""
    got = 0
    for cut in list(cuts) + [len(data)]:
        got = max(got, min(cut, len(data)))
        r = parse(data[:got])
        if r["result"] != 0:
            return r
        assert r["need"] > got
    return r


def byte_by_byte(parse, data: bytes) -> dict:
    return fed(parse, data, range(1, len(data)))


def random_splits(parse, data: bytes, rng: random.Random) -> dict:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    return fed(parse, data, cuts)


def same_result(a: dict, b: dict) -> bool:
    skip = {"need"}
    return {k: v for k, v in a.items() if k not in skip} == \
        {k: v for k, v in b.items() if k not in skip}


@pytest.fixture(scope="module")
def rng():
    return random.Random(13)


# -------------------------------------------------------------- constants

def test_constants_match_the_header():
    """parser_corpus mirrors ringd_api.h; the sanitizer driver and the
    reference parsers rely on it."""
    assert (pc.TLS_NEED_MORE, pc.TLS_FOUND, pc.TLS_NO_SNI, pc.TLS_NOT_TLS, pc.TLS_MALFORMED) == (
        lib.RINGD_TLS_NEED_MORE, lib.RINGD_TLS_FOUND, lib.RINGD_TLS_NO_SNI,
        lib.RINGD_TLS_NOT_TLS, lib.RINGD_TLS_MALFORMED)
    assert pc.TLS_MAX_EXAMINED == lib.RINGD_TLS_MAX_EXAMINED == 16384
    assert pc.TLS_MAX_RECORDS == lib.RINGD_TLS_MAX_RECORDS
    assert (pc.E_RECORD, pc.E_NOT_CLIENT_HELLO, pc.E_TOO_LARGE, pc.E_FRAGMENTED, pc.E_BODY,
            pc.E_EXTENSIONS, pc.E_SNI, pc.E_ALPN, pc.E_VERSIONS) == (
        lib.RINGD_TLS_E_RECORD, lib.RINGD_TLS_E_NOT_CLIENT_HELLO, lib.RINGD_TLS_E_TOO_LARGE,
        lib.RINGD_TLS_E_FRAGMENTED, lib.RINGD_TLS_E_BODY, lib.RINGD_TLS_E_EXTENSIONS,
        lib.RINGD_TLS_E_SNI, lib.RINGD_TLS_E_ALPN, lib.RINGD_TLS_E_VERSIONS)
    assert (pc.F_SNI_INVALID, pc.F_ALPN, pc.F_ALPN_TRUNCATED, pc.F_SUPPORTED_VERSIONS) == (
        lib.RINGD_HELLO_SNI_INVALID, lib.RINGD_HELLO_ALPN, lib.RINGD_HELLO_ALPN_TRUNCATED,
        lib.RINGD_HELLO_SUPPORTED_VERSIONS)
    assert (pc.PX_NEED_MORE, pc.PX_OK, pc.PX_NOT_PROXY, pc.PX_MALFORMED) == (
        lib.RINGD_PROXY_NEED_MORE, lib.RINGD_PROXY_OK, lib.RINGD_PROXY_NOT_PROXY,
        lib.RINGD_PROXY_MALFORMED)
    assert (pc.PX_V1_MAX, pc.PX_V2_MAX) == (lib.RINGD_PROXY_V1_MAX, lib.RINGD_PROXY_V2_MAX)
    assert (pc.PE_V1_LINE, pc.PE_V1_PROTO, pc.PE_V1_ADDRESS, pc.PE_V1_PORT, pc.PE_V1_SYNTAX,
            pc.PE_V2_VERSION, pc.PE_V2_COMMAND, pc.PE_V2_FAMILY, pc.PE_V2_LENGTH,
            pc.PE_V2_TLV, pc.PE_V2_CRC) == (
        lib.RINGD_PROXY_E_V1_LINE, lib.RINGD_PROXY_E_V1_PROTO, lib.RINGD_PROXY_E_V1_ADDRESS,
        lib.RINGD_PROXY_E_V1_PORT, lib.RINGD_PROXY_E_V1_SYNTAX, lib.RINGD_PROXY_E_V2_VERSION,
        lib.RINGD_PROXY_E_V2_COMMAND, lib.RINGD_PROXY_E_V2_FAMILY, lib.RINGD_PROXY_E_V2_LENGTH,
        lib.RINGD_PROXY_E_V2_TLV, lib.RINGD_PROXY_E_V2_CRC)


# ------------------------------------------------------------ TLS: real

def test_real_hello_with_sni_and_alpn(rng):
    data = ssl_hello("Api.Example.COM", ["h2", "http/1.1"])
    r = tls(data)
    assert r["result"] == lib.RINGD_TLS_FOUND
    assert r["name"] == b"api.example.com"
    assert r["alpn"] == b"\x02h2\x08http/1.1" and r["alpn_count"] == 2
    assert r["flags"] & lib.RINGD_HELLO_ALPN
    assert r["record_version"] == 0x0301 and r["hello_version"] == 0x0303
    assert r["max_version"] == 0x0304            # OpenSSL 3 offers TLS 1.3
    assert r["records"] == 1 and r["hello_end"] == len(data)
    assert same_result(byte_by_byte(tls, data), r)
    for _ in range(20):
        assert same_result(random_splits(tls, data, rng), r)
    # bytes after the ClientHello (none are sent before the server answers,
    # but a pipelining client could) change nothing
    assert same_result(tls(data + b"\x14\x03\x03\x00\x01\x01"), r)


def test_real_hello_without_sni(rng):
    data = ssl_hello(None)
    r = tls(data)
    assert r["result"] == lib.RINGD_TLS_NO_SNI and r["name"] == b""
    assert not r["flags"] & lib.RINGD_HELLO_SNI_INVALID
    assert same_result(byte_by_byte(tls, data), r)


def test_real_tls12_hello():
    data = ssl_hello("db.internal", max_version=ssl.TLSVersion.TLSv1_2)
    r = tls(data)
    assert r["result"] == lib.RINGD_TLS_FOUND and r["name"] == b"db.internal"
    assert r["max_version"] == 0x0303


def test_large_real_hello_many_alpn_entries(rng):
    """OpenSSL itself writes a 2.3 KiB ClientHello when asked for 90 ALPN
    protocols: more than one TCP segment on most paths. Only the first
    entries fit in alpn[]; the count says how many there were."""
    protos = [f"proto-{i:03d}-{'x' * 12}" for i in range(90)]
    data = ssl_hello("big.example.net", protos)
    assert len(data) > 1536
    r = tls(data)
    assert r["result"] == lib.RINGD_TLS_FOUND and r["name"] == b"big.example.net"
    assert r["alpn_count"] == 90
    assert r["flags"] & lib.RINGD_HELLO_ALPN_TRUNCATED
    kept, p = [], 0
    while p < len(r["alpn"]):
        kept.append(r["alpn"][p + 1:p + 1 + r["alpn"][p]].decode())
        p += 1 + r["alpn"][p]
    assert kept == protos[:len(kept)] and 200 < len(r["alpn"]) <= 256
    assert same_result(byte_by_byte(tls, data), r)
    for _ in range(20):
        assert same_result(random_splits(tls, data, rng), r)


def test_post_quantum_hello_in_one_two_and_three_records(rng):
    """An X25519MLKEM768 key share (1216 bytes) makes a 1.7 KiB ClientHello,
    which browsers send in one record and which middleboxes re-frame: the
    handshake message split across two and three records, down to records of
    one byte that split the handshake header itself."""
    msg = handshake(ssl_hello("PQ.example.com", ["h2"]))
    pq = pq_key_share(Hello(msg), rng).encode()
    assert 1536 < len(pq) < 2048
    framings = {
        "one record": frame(pq),
        "two records": frame(pq, [len(pq) // 2]),
        "three records": frame(pq, [600, 600]),
        "header split": frame(pq, [1, 2, 1, 900], version=0x0303),
        "record per 100 bytes": frame(pq, [100] * (len(pq) // 100)),
    }
    for what, data in framings.items():
        r = tls(data)
        assert r["result"] == lib.RINGD_TLS_FOUND, what
        assert r["name"] == b"pq.example.com" and r["alpn"] == b"\x02h2", what
        assert r["records"] == len(pc.records(data)), what
        assert r["hello_end"] == len(data), what
        assert same_result(byte_by_byte(tls, data), r), what
        for _ in range(10):
            assert same_result(random_splits(tls, data, rng), r), what


def test_need_is_a_lower_bound_and_exact_once_known():
    data = ssl_hello("need.example.com")
    for k in range(len(data)):
        r = tls(data[:k])
        assert r["result"] == lib.RINGD_TLS_NEED_MORE
        assert k < r["need"] <= len(data)
        if k >= 9:          # record and handshake header seen: one record holds it all
            assert r["need"] == len(data)
    two = frame(handshake(data), [100])
    # the record header alone does not bound the message (it may be shorter
    # than its record); the handshake header does
    assert tls(two[:5])["need"] == 9
    assert tls(two[:9])["need"] == len(two)      # in another record after these 100 bytes
    assert tls(two[:50])["need"] == len(two)


def test_old_record_versions():
    """SSL 3.0 and TLS 1.0 record versions in the record header, and old
    ClientHellos: TLS 1.0 with SNI, SSL 3.0 without any extension block."""
    data = frame(handshake(ssl_hello("v.example.com")), version=0x0300)
    r = tls(data)
    assert r["result"] == lib.RINGD_TLS_FOUND and r["record_version"] == 0x0300
    r = tls(frame(minimal_hello(0x0301, [(pc.EXT_SNI, sni_ext(b"Old.Example.org"))]),
                  version=0x0301))
    assert r["result"] == lib.RINGD_TLS_FOUND and r["name"] == b"old.example.org"
    assert r["hello_version"] == r["max_version"] == 0x0301
    r = tls(frame(minimal_hello(0x0300), version=0x0300))
    assert r["result"] == lib.RINGD_TLS_NO_SNI and r["hello_version"] == 0x0300


def test_names_are_normalised():
    msg = handshake(ssl_hello("x.example"))
    cases = {
        b"WWW.Example.ORG.": b"www.example.org",
        b"under_score.example": b"under_score.example",
        b"xn--bcher-kva.example": b"xn--bcher-kva.example",
        (b"a" * 63 + b".") * 3 + b"a" * 61: (b"a" * 63 + b".") * 3 + b"a" * 61,   # 253
    }
    for raw, want in cases.items():
        r = tls(frame(Hello(msg).set_ext(pc.EXT_SNI, sni_ext(raw)).encode()))
        assert r["result"] == lib.RINGD_TLS_FOUND and r["name"] == want, raw
        assert normalize(raw) == want
    # not a DNS name: the ClientHello is fine, but there is no name to route by
    for raw in (b"a..b", b".lead", b"two..", b"sp ace", b"x" * 64 + b".example",
                b"caf\xc3\xa9.example", b"*.example", (b"a" * 63 + b".") * 3 + b"a" * 62,
                b"a\x00b"):
        r = tls(frame(Hello(msg).set_ext(pc.EXT_SNI, sni_ext(raw)).encode()))
        assert r["result"] == lib.RINGD_TLS_NO_SNI, raw
        assert r["flags"] & lib.RINGD_HELLO_SNI_INVALID and r["name"] == b"", raw
        assert normalize(raw) is None, raw
    assert normalize(b"") is None and normalize(b".") is None
    assert normalize(b"A.") == b"a"


def test_not_tls_is_decided_from_the_first_bytes():
    for data in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n",
                 proxy_v1("TCP4", "192.0.2.1", "192.0.2.2", 1, 2), proxy_v2(),
                 b"\x80\x2e\x01\x03\x01", b"\x00", b"\x17\x03\x03\x00\x10"):
        assert tls(data)["result"] == lib.RINGD_TLS_NOT_TLS, data
        assert tls(data[:1])["result"] == lib.RINGD_TLS_NOT_TLS, data
    # 0x16 but no 0x03 after it: two bytes decide
    assert tls(b"\x16")["result"] == lib.RINGD_TLS_NEED_MORE
    assert tls(b"\x16\x02")["result"] == lib.RINGD_TLS_NOT_TLS
    assert tls(b"\x16\x03")["result"] == lib.RINGD_TLS_NEED_MORE
    assert tls(b"")["result"] == lib.RINGD_TLS_NEED_MORE and tls(b"")["need"] >= 1
    rnd = random.Random(5)
    for _ in range(200):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 64)))
        want = pc.TLS_NOT_TLS if data[0] != 0x16 or (len(data) > 1 and data[1] != 3) else None
        if want is not None:
            assert tls(data)["result"] == want


def _malformed(data: bytes, err: int, early: int | None = None):
    r = tls(data)
    assert r["result"] == lib.RINGD_TLS_MALFORMED and r["error"] == err, (r, data[:16])
    if early is not None:                       # decided with this many bytes
        assert tls(data[:early])["result"] == lib.RINGD_TLS_MALFORMED
        assert tls(data[:early - 1])["result"] == lib.RINGD_TLS_NEED_MORE


def test_malformed_hellos():
    data = ssl_hello("m.example.com", ["h2"])
    msg = handshake(data)
    # a handshake message that is not a ClientHello: the sixth byte says it
    _malformed(frame(b"\x02" + msg[1:]), pc.E_NOT_CLIENT_HELLO, early=6)
    # record length 0, or above 2^14
    _malformed(b"\x16\x03\x01\x00\x00" + msg, pc.E_RECORD, early=5)
    _malformed(b"\x16\x03\x01\x40\x01" + msg, pc.E_RECORD, early=5)
    # a ClientHello that cannot end within 16 KiB: refused once its length is
    # read, without waiting for the bytes
    huge = b"\x01\x00\x40\x00" + msg[4:]
    _malformed(frame(huge, [len(msg)]), pc.E_TOO_LARGE, early=9)
    # ... and one that just fits / just does not, padded for real
    room = 16384 - 5 - len(Hello(msg).set_ext(pc.EXT_PADDING, None).encode()) - 4
    fits = Hello(msg).set_ext(pc.EXT_PADDING, bytes(room)).encode()
    assert len(fits) == 16384 - 5
    assert tls(frame(fits))["result"] == lib.RINGD_TLS_FOUND
    over = Hello(msg).set_ext(pc.EXT_PADDING, bytes(room + 1)).encode()
    _malformed(frame(over), pc.E_TOO_LARGE, early=9)
    # across records the record headers count too
    _malformed(frame(fits, [8000]), pc.E_TOO_LARGE)
    # a record of another content type between the fragments
    two = frame(msg, [100])
    mixed = two[:105] + b"\x15" + two[106:]
    _malformed(mixed, pc.E_RECORD, early=106)
    _malformed(two[:105] + b"\x16\x02" + two[107:], pc.E_RECORD, early=107)
    # more records than RINGD_TLS_MAX_RECORDS
    _malformed(frame(msg, [4] * pc.TLS_MAX_RECORDS), pc.E_FRAGMENTED)
    assert tls(frame(msg, [4] * (pc.TLS_MAX_RECORDS - 1)))["result"] == lib.RINGD_TLS_FOUND
    # lengths that overrun their containers
    body_cut = bytearray(msg)
    body_cut[4 + 34] = 33                       # session id longer than 32
    _malformed(frame(bytes(body_cut)), pc.E_BODY)
    h = Hello(msg)
    h.ciphers = h.ciphers[:-1]                  # odd cipher suite length
    _malformed(frame(h.encode()), pc.E_BODY)
    h = Hello(msg)
    h.compression = b""
    _malformed(frame(h.encode()), pc.E_BODY)
    ext_over = bytearray(frame(msg))
    p = 5 + 4 + 34 + 1 + len(Hello(msg).session_id) + 2 + len(Hello(msg).ciphers) + 1 + 1
    ext_over[p:p + 2] = (int.from_bytes(ext_over[p:p + 2], "big") + 1).to_bytes(2, "big")
    _malformed(bytes(ext_over), pc.E_EXTENSIONS)
    trailing = msg + b"\x00"
    trailing = b"\x01" + (len(trailing) - 4).to_bytes(3, "big") + trailing[4:]
    _malformed(frame(trailing), pc.E_EXTENSIONS)
    # two server_name extensions, two host names, an empty list or name
    dup = Hello(msg)
    dup.extensions = dup.extensions + [(pc.EXT_SNI, sni_ext(b"other.example"))]
    _malformed(frame(dup.encode()), pc.E_EXTENSIONS)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_SNI, sni_ext(b"a.example", b"b.example")).encode()),
               pc.E_SNI)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_SNI, b"").encode()), pc.E_SNI)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_SNI, b"\x00\x00").encode()), pc.E_SNI)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_SNI, sni_ext(b"")).encode()), pc.E_SNI)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_SNI, sni_ext(b"abc")[:-1]).encode()), pc.E_SNI)
    # ALPN: empty protocol, empty list, overrun
    _malformed(frame(Hello(msg).set_ext(pc.EXT_ALPN, alpn_ext(b"h2", b"")).encode()), pc.E_ALPN)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_ALPN, b"\x00\x00").encode()), pc.E_ALPN)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_ALPN, b"\x00\x03\x05h2x").encode()), pc.E_ALPN)
    _malformed(frame(Hello(msg).set_ext(pc.EXT_VERSIONS, b"\x03\x03\x04\x03").encode()),
               pc.E_VERSIONS)
    # an unknown name type is skipped; a name that is not a host name is
    # still a valid ClientHello
    r = tls(frame(Hello(msg).set_ext(pc.EXT_SNI, sni_ext(b"x", name_type=9)).encode()))
    assert r["result"] == lib.RINGD_TLS_NO_SNI


def test_every_prefix_of_a_hello_waits(rng):
    """No prefix of a valid ClientHello is refused or answered early, in
    whatever framing."""
    msg = handshake(ssl_hello("p.example.com"))
    for data in (frame(msg), frame(msg, [3, 50, 1]), frame(msg, [200], version=0x0300)):
        for k in range(len(data)):
            r = tls(data[:k])
            assert r["result"] == lib.RINGD_TLS_NEED_MORE, k
            assert k < r["need"] <= len(data), k


def test_tls_corpus_matches_the_reference(rng):
    """A few thousand real, re-framed, truncated and mutated inputs: only the
    documented results, the same as the independent Python reference, and
    the same answer in one piece as in random pieces."""
    corpus = pc.tls_corpus(seed=1, count=2500)
    seen = set()
    for i, data in enumerate(corpus):
        got = tls(data)
        want = pc.ref_tls(data)
        seen.add(got["result"])
        assert got["result"] == want["result"], (i, got, want)
        if got["result"] == lib.RINGD_TLS_NEED_MORE:
            assert got["need"] > len(data)
            continue
        if got["result"] == lib.RINGD_TLS_MALFORMED:
            assert got["error"] == want["error"], (i, got, want)
            continue
        if got["result"] == lib.RINGD_TLS_NOT_TLS:
            continue
        for key in ("name", "alpn", "alpn_count", "flags", "record_version", "hello_version",
                    "max_version", "records", "hello_end"):
            assert got[key] == want[key], (i, key, got, want)
        if i % 5 == 0 and len(data) > 1:
            assert same_result(random_splits(tls, data, rng), got), i
    assert seen == {0, 1, 2, 3, 4}


# ------------------------------------------------------------------ PROXY

PAYLOAD = b"\x16\x03\x01\x00\x05hello after the header"


def _ok(data: bytes, **want):
    r = proxy(data + PAYLOAD)
    assert r["result"] == lib.RINGD_PROXY_OK, r
    assert r["header_len"] == len(data)
    for k, v in want.items():
        assert r[k] == v, (k, r)
    assert same_result(byte_by_byte(proxy, data + PAYLOAD), r)
    # the bytes after the header are not part of it, whatever they are
    assert same_result(proxy(data), r)
    return r


def _bad(data: bytes, err: int):
    r = proxy(data)
    assert r["result"] == lib.RINGD_PROXY_MALFORMED and r["error"] == err, (r, data)
    assert byte_by_byte(proxy, data)["result"] == lib.RINGD_PROXY_MALFORMED


def test_proxy_v1_ipv4_ipv6_unknown():
    _ok(proxy_v1("TCP4", "192.168.0.1", "192.168.0.11", 56324, 443), version=1, command=1,
        family=0x11, src=("192.168.0.1", 56324), dst=("192.168.0.11", 443))
    _ok(proxy_v1("TCP4", "255.255.255.255", "0.0.0.0", 65535, 0),
        src=("255.255.255.255", 65535), dst=("0.0.0.0", 0))
    _ok(proxy_v1("TCP6", "2001:db8::1", "2001:DB8:0:0:1:2:3:4", 1, 8443), family=0x21,
        src=("2001:db8::1", 1), dst=("2001:db8::1:2:3:4", 8443))
    # what inet_ntop (ringd's own sender) writes for a mapped address
    _ok(proxy_v1("TCP6", "::ffff:192.0.2.7", "::", 40000, 443),
        src=("::ffff:192.0.2.7", 40000), dst=("::", 443))
    longest = proxy_v1("TCP6", "ffff:" * 7 + "ffff", "ffff:" * 7 + "ffff", 65535, 65535)
    assert len(longest) == 104
    _ok(longest)
    _ok(proxy_v1("UNKNOWN"), version=1, src=None, dst=None, family=0)
    worst = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"
    assert len(worst) == 107
    _ok(worst, src=None)


def test_proxy_v1_refusals():
    for line, err in (
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", pc.PE_V1_LINE),          # LF alone
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", pc.PE_V1_LINE),         # CR alone
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", pc.PE_V1_SYNTAX),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", pc.PE_V1_SYNTAX),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", pc.PE_V1_SYNTAX),
            (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", pc.PE_V1_ADDRESS),     # leading zero
            (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", pc.PE_V1_ADDRESS),             # wrong family
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP6 ::1::2 ::1 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP6 12345::1 ::1 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP6 ::1.2.3.04 ::1 1 2\r\n", pc.PE_V1_ADDRESS),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", pc.PE_V1_PORT),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", pc.PE_V1_PORT),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2x\r\n", pc.PE_V1_LINE),        # not an address byte
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", pc.PE_V1_PROTO),
            (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", pc.PE_V1_PROTO),
            (b"PROXY UNKNOWNX\r\n", pc.PE_V1_PROTO),
            (b"PROXY TCP4\r\n", pc.PE_V1_PROTO),
            (b"PROXY \r\n", pc.PE_V1_PROTO)):
        _bad(line + PAYLOAD, err)
    # no CRLF in the first 107 bytes
    _bad(b"PROXY UNKNOWN " + b"a" * 93 + b"\r\n", pc.PE_V1_LINE)     # CRLF at 108
    _bad(b"PROXY UNKNOWN " + b"a" * 200, pc.PE_V1_LINE)
    assert proxy(b"PROXY UNKNOWN " + b"a" * 92)["result"] == lib.RINGD_PROXY_NEED_MORE
    assert proxy(b"PROXY UNKNOWN " + b"a" * 93)["result"] == lib.RINGD_PROXY_MALFORMED
    # a bad byte is refused when it arrives, not when the line ends
    assert proxy(b"PROXY TCP4 1.2.3.4 x")["result"] == lib.RINGD_PROXY_MALFORMED
    assert proxy(b"PROXY TCPX")["result"] == lib.RINGD_PROXY_MALFORMED


def test_proxy_v2_ipv4_ipv6_local():
    _ok(proxy_v2(src="127.0.0.1", dst="127.0.0.1", sport=42, dport=1337), version=2, command=1,
        family=0x11, src=("127.0.0.1", 42), dst=("127.0.0.1", 1337), crc=False)
    _ok(proxy_v2(fam=0x21, src="2001:db8::7", dst="::1", sport=65535, dport=0), family=0x21,
        src=("2001:db8::7", 65535), dst=("::1", 0))
    # LOCAL: the balancer's own health check; the block, family included, is
    # skipped unread
    _ok(proxy_v2(command=0, fam=0x00), command=0, src=None, dst=None)
    _ok(proxy_v2(command=0, fam=0x11), command=0, src=None)
    _ok(proxy_v2(command=0, fam=0xFF, addr_block=b"whatever it is"), command=0, src=None)
    # valid families ringd cannot use: no address (keep the socket's), as
    # the spec's fall back to UNSPEC says
    for fam in (0x00, 0x12, 0x22, 0x31, 0x32):
        addrs = {"src": "2001:db8::1", "dst": "2001:db8::2"} if fam == 0x22 else {}
        _ok(proxy_v2(fam=fam, **addrs), command=1, family=fam, src=None, dst=None)
    # an address block longer than the family needs (not TLVs)
    r = _ok(proxy_v2(addr_block=bytes(12) + b"\x04\x00\x00", fam=0x11))
    assert r["src"] == ("0.0.0.0", 0)


def test_proxy_v2_tlvs():
    """HAProxy's proxy_protocol_tlv_validation scenarios, and the TLVs a
    caller may want."""
    # a correct header with an AUTHORITY TLV
    hdr = bytes.fromhex("0d0a0d0a000d0a515549540a 2111 0014 7f0000017f000001002a0539"
                        "020005 3132333435".replace(" ", ""))
    _ok(hdr, authority=b"12345", src=("127.0.0.1", 42), dst=("127.0.0.1", 1337))
    # a TLV after the end of the header is payload, not header
    r = proxy(hdr + bytes.fromhex("0200053534333231"))
    assert r["result"] == lib.RINGD_PROXY_OK and r["header_len"] == len(hdr)
    assert r["authority"] == b"12345"
    # a TLV whose length runs past the header
    _bad(bytes.fromhex("0d0a0d0a000d0a515549540a 2111 0014 7f0000017f000001002a0539"
                       "02000a 31323334353132333435".replace(" ", "")), pc.PE_V2_TLV)
    # a header that ends inside a TLV: fewer than 3 bytes left for it
    _bad(bytes.fromhex("0d0a0d0a000d0a515549540a 2111 0014 7f0000017f000001002a0539"
                       "020004 31323334".replace(" ", "")) + b"\x00", pc.PE_V2_TLV)
    _bad(proxy_v2(tlvs=[(0x04, b"")], length_delta=-1) + b"\x00", pc.PE_V2_TLV)
    # TLVs ringd locates, and ones it skips
    _ok(proxy_v2(fam=0x21, src="::1", dst="::2",
                 tlvs=[(0x04, bytes(3)), (0x01, b"h2"), (0x02, b"api.example.com"),
                       (0x20, b"\x01\x00\x00\x00\x00\x21\x00\x07TLSv1.3"), (0xEA, b"vpce-1")]),
        alpn=b"h2", authority=b"api.example.com")
    # a value holding NUL bytes is just bytes
    _ok(proxy_v2(tlvs=[(0x02, b"pub\x00lic")]), authority=b"pub\x00lic")
    # CRC32C: verified when present
    _ok(proxy_v2(tlvs=[(0x02, b"crc.example")], crc=True), crc=True)
    bad = bytearray(proxy_v2(crc=True))
    bad[16] ^= 0x01                              # the source address changed in flight
    _bad(bytes(bad), pc.PE_V2_CRC)
    _bad(proxy_v2(tlvs=[(0x03, b"\x00\x00\x00")]), pc.PE_V2_CRC)
    assert pc.crc32c(b"123456789") == 0xE3069283    # the reference itself (RFC 3720 B.4)


def test_proxy_v2_refusals_are_early():
    good = proxy_v2()
    bad_version = good[:12] + b"\x11" + good[13:]
    _bad(bad_version, pc.PE_V2_VERSION)
    assert proxy(bad_version[:13])["result"] == lib.RINGD_PROXY_MALFORMED
    _bad(good[:12] + b"\x22" + good[13:], pc.PE_V2_COMMAND)
    _bad(good[:13] + b"\x13" + good[14:], pc.PE_V2_FAMILY)
    _bad(good[:13] + b"\x41" + good[14:], pc.PE_V2_FAMILY)
    assert proxy(good[:13] + b"\x13")["result"] == lib.RINGD_PROXY_MALFORMED
    # addresses shorter than the family needs
    _bad(proxy_v2(addr_block=bytes(11)), pc.PE_V2_LENGTH)
    _bad(proxy_v2(fam=0x21, addr_block=bytes(35)), pc.PE_V2_LENGTH)
    _bad(proxy_v2(fam=0x31, addr_block=bytes(215)), pc.PE_V2_LENGTH)
    # longer than RINGD_PROXY_V2_MAX: refused from the 16-byte header alone
    big = proxy_v2(tlvs=[(0xE0, bytes(pc.PX_V2_MAX))])
    assert proxy(big[:16])["result"] == lib.RINGD_PROXY_MALFORMED
    _bad(big, pc.PE_V2_LENGTH)
    fits = proxy_v2(tlvs=[(0xE0, bytes(pc.PX_V2_MAX - 16 - 12 - 3))])
    assert len(fits) == pc.PX_V2_MAX
    _ok(fits)
    # while the header is incomplete, need says how long it is
    assert proxy(good[:10])["need"] == 16
    assert proxy(good[:20])["need"] == len(good)


def test_not_proxy_is_decided_early():
    for data, nbytes in ((b"GET / HTTP/1.1\r\n\r\n", 1), (b"SSH-2.0-x\r\n", 1),
                         (b"\x16\x03\x01\x02\x00", 1), (b"PROXY\r\n", 6), (b"PROXYTCP4", 6),
                         (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1),
                         (b"PROX GET", 5), (pc.V2_SIG[:11] + b"\x0b" + b"\x21\x11", 12),
                         (b"\r\n\r\nGET", 5)):
        assert proxy(data)["result"] == lib.RINGD_PROXY_NOT_PROXY, data
        assert proxy(data[:nbytes])["result"] == lib.RINGD_PROXY_NOT_PROXY, data
        if nbytes > 1:
            assert proxy(data[:nbytes - 1])["result"] == lib.RINGD_PROXY_NEED_MORE, data
    assert proxy(b"")["result"] == lib.RINGD_PROXY_NEED_MORE
    rnd = random.Random(3)
    for _ in range(300):
        data = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 40)))
        if data[0] not in (ord("P"), 0x0D):
            assert proxy(data)["result"] == lib.RINGD_PROXY_NOT_PROXY


def test_proxy_byte_by_byte_and_in_pieces(rng):
    for hdr in pc.base_proxy_headers():
        whole = proxy(hdr + PAYLOAD)
        assert whole["result"] == lib.RINGD_PROXY_OK and whole["header_len"] == len(hdr)
        assert same_result(byte_by_byte(proxy, hdr + PAYLOAD), whole)
        for _ in range(10):
            assert same_result(random_splits(proxy, hdr + PAYLOAD, rng), whole)
        for k in range(len(hdr)):
            r = proxy(hdr[:k])
            assert r["result"] == lib.RINGD_PROXY_NEED_MORE, (hdr, k)
            assert k < r["need"] <= len(hdr), (hdr, k, r)


def test_proxy_corpus_matches_the_reference(rng):
    corpus = pc.proxy_corpus(seed=2, count=2500)
    seen = set()
    for i, data in enumerate(corpus):
        got = proxy(data)
        want = pc.ref_proxy(data)
        seen.add(got["result"])
        assert got["result"] == want["result"], (i, data, got, want)
        if got["result"] == lib.RINGD_PROXY_NEED_MORE:
            assert got["need"] > len(data)
            if "need" in want:
                assert got["need"] == want["need"]
        elif got["result"] == lib.RINGD_PROXY_MALFORMED:
            assert (got["error"], got["version"]) == (want["error"], want["version"]), \
                (i, data, got, want)
        elif got["result"] == lib.RINGD_PROXY_OK:
            for key in ("version", "header_len", "command", "family", "src", "dst"):
                assert got[key] == want[key], (i, key, data, got, want)
            if got["version"] == 2:
                for key in ("authority", "alpn", "crc"):
                    assert got[key] == want[key], (i, key, data, got, want)
        if i % 5 == 0 and len(data) > 1:
            assert same_result(random_splits(proxy, data, rng), got), i
    assert seen == {0, 1, 2, 3}


# ---------------------------------------------------- sanitizer + fuzzing

def _gcc_sanitizers(tmp_path: Path) -> str | None:
    """Why a sanitizer build cannot run here, or None if it can."""
    if not shutil.which("gcc"):
        return "gcc not installed"
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    r = subprocess.run(["gcc", "-fsanitize=address,undefined", str(probe), "-o",
                        str(tmp_path / "probe")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"gcc cannot link libasan/libubsan: {r.stderr.strip()[:200]}"
    r = subprocess.run([str(tmp_path / "probe")], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return f"sanitizer runtime does not start: {r.stderr.strip()[:200]}"
    return None


def build_fuzz_driver(out: Path) -> None:
    cmd = ["gcc", "-std=gnu11", "-g", "-O1", "-fno-omit-frame-pointer",
           "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
           "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", f"-I{NATIVE}",
           str(DRIVER), str(NATIVE / "tls_hello.c"), str(NATIVE / "proxy_recv.c"),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def write_pack(path: Path, inputs) -> None:
    with open(path, "wb") as f:
        for data in inputs:
            f.write(struct.pack("<I", len(data)) + data)


def test_parsers_under_asan_and_ubsan(tmp_path):
    """Both parsers, compiled with AddressSanitizer and UBSan, run over the
    corpus (every input through both, from heap blocks that end where the
    input ends, whole and prefix by prefix), with the driver checking the
    contract on every call. Any sanitizer report or contract violation
    fails."""
    why = _gcc_sanitizers(tmp_path)
    if why:
        pytest.skip(why)
    exe = tmp_path / "parsers_fuzz"
    build_fuzz_driver(exe)
    env = dict(os.environ, ASAN_OPTIONS="abort_on_error=0:detect_leaks=1:exitcode=99",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98")

    # the sanitizer is live: a read one byte past a heap block is caught
    r = subprocess.run([str(exe), "--selftest-overread"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode != 0 and ("AddressSanitizer" in r.stderr or "runtime error" in r.stderr), \
        r.stdout + r.stderr

    pack = tmp_path / "corpus.pack"
    write_pack(pack, pc.tls_corpus(seed=11, count=2000) + pc.proxy_corpus(seed=12, count=2000))
    r = subprocess.run([str(exe), str(pack)], capture_output=True, text=True, timeout=240,
                       env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-4000:]
    assert "all within the contract" in r.stderr
