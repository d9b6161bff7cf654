/*
 * tls_hello.c: the TLS ClientHello parser behind SNI routing.
 *
 * Input: the bytes a client sent so far, from the first one. Output: wait
 * (NEED_MORE), the server name (FOUND), no name (NO_SNI), not TLS at all
 * (NOT_TLS) or a broken/oversized ClientHello (MALFORMED). It is called again
 * from the start with more bytes after a NEED_MORE; it keeps no state.
 *
 * Two passes:
 *
 *   1. Walk the TLS record headers (RFC 8446 5.1) and the 4-byte handshake
 *      header (4), across as many records as the ClientHello spans, until the
 *      whole message is there. Every byte is looked at in stream order and
 *      every verdict depends only on the bytes before it, so a verdict reached
 *      on a prefix is the one the whole stream gives: the answer does not
 *      depend on how the bytes were split into reads. This pass touches
 *      nothing but record and handshake headers and copies nothing, so a
 *      client that trickles bytes costs O(records) per call, at most
 *      RINGD_TLS_MAX_RECORDS.
 *   2. Parse the complete message: in place when it sits in one record
 *      (nearly always), else from a copy of its fragments on the stack.
 *      Every length is checked against its enclosing container before use.
 *
 * Bounds: the ClientHello must end within the first RINGD_TLS_MAX_EXAMINED
 * bytes of the stream and span at most RINGD_TLS_MAX_RECORDS records; a
 * record holds 1..2^14 bytes. A post-quantum hybrid key share (X25519MLKEM768,
 * 1216 bytes) makes a ClientHello of 1.5-2 KiB: well within, whether it comes
 * in one record or several.
 *
 * Deliberately lenient: the record version's minor byte (SSL 3.0 .. TLS 1.3
 * and whatever follows all start with 3), unknown extensions, GREASE, unknown
 * server_name name types, host names with '_'. Deliberately strict: anything
 * whose length does not fit its container, bytes after the extension block,
 * an empty server_name list or ALPN list, an empty name or protocol, and a
 * second server_name, ALPN or supported_versions extension (a client that
 * sends two names could be routed by one and served by the other).
 *
 * An SSLv2-compatible ClientHello (first byte 0x80) is NOT_TLS: no client of
 * this century sends one, and it cannot carry a server name anyway.
 */
#include "tls_hello.h"

#include <stdbool.h>
#include <string.h>

#define TLS_CT_HANDSHAKE 0x16
#define TLS_HS_CLIENT_HELLO 1
#define TLS_RECORD_HDR 5
#define TLS_HS_HDR 4
#define TLS_RECORD_MAX 16384          /* 2^14: the largest record plaintext */

#define EXT_SERVER_NAME 0
#define EXT_ALPN 16
#define EXT_SUPPORTED_VERSIONS 43
#define SNI_HOST_NAME 0

#if RINGD_TLS_MAX_EXAMINED > 65535 || RINGD_TLS_ALPN_MAX > 256
#error "ringd_hello_info field widths assume these bounds"
#endif

static inline uint32_t be16(const uint8_t *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

/* ----------------------------------------------------- bounded reader */

/* A window of bytes still to read. Every read checks the window first; a
 * sub-window never reaches past its parent. */
struct rd {
    const uint8_t *p;
    uint32_t n;
};

static bool rd_u8(struct rd *r, uint32_t *v)
{
    if (r->n < 1)
        return false;
    *v = r->p[0];
    r->p++;
    r->n--;
    return true;
}

static bool rd_u16(struct rd *r, uint32_t *v)
{
    if (r->n < 2)
        return false;
    *v = be16(r->p);
    r->p += 2;
    r->n -= 2;
    return true;
}

static bool rd_take(struct rd *r, uint32_t n, struct rd *sub)
{
    if (r->n < n)
        return false;
    sub->p = r->p;
    sub->n = n;
    r->p += n;
    r->n -= n;
    return true;
}

/* a vector with a one- or two-byte length prefix (RFC 8446 3.4) */
static bool rd_vec8(struct rd *r, struct rd *sub)
{
    uint32_t n;
    return rd_u8(r, &n) && rd_take(r, n, sub);
}

static bool rd_vec16(struct rd *r, struct rd *sub)
{
    uint32_t n;
    return rd_u16(r, &n) && rd_take(r, n, sub);
}

/* ------------------------------------------------------------- names */

int tls_name_normalize(const uint8_t *in, uint32_t len, uint8_t out[256])
{
    uint32_t label = 0;

    if (len > 0 && in[len - 1] == '.')
        len--;
    if (len == 0 || len > RINGD_TLS_NAME_MAX)
        goto bad;
    for (uint32_t i = 0; i < len; i++) {
        uint8_t c = in[i];
        if (c == '.') {
            if (label == 0)
                goto bad;       /* leading dot or empty label */
            label = 0;
        } else {
            if (c >= 'A' && c <= 'Z')
                c = (uint8_t)(c + ('a' - 'A'));
            else if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
                       c == '_'))
                goto bad;
            if (++label > 63)
                goto bad;
        }
        out[i] = c;
    }
    if (label == 0)
        goto bad;               /* "name.." had one dot stripped, one left */
    out[len] = 0;
    return (int)len;
bad:
    memset(out, 0, 256);
    return -1;
}

/* --------------------------------------------------------- extensions */

/* server_name (RFC 6066 3): 1 with a valid host name, 0 without one (or an
 * invalid one, flagged), -1 if the structure is broken. */
static int parse_sni(struct rd data, struct ringd_hello_info *out)
{
    struct rd list;
    bool have_host = false;
    int found = 0;

    if (!rd_vec16(&data, &list) || data.n != 0 || list.n == 0)
        return -1;
    while (list.n) {
        uint32_t type;
        struct rd name;
        if (!rd_u8(&list, &type) || !rd_vec16(&list, &name) || name.n == 0)
            return -1;
        if (type != SNI_HOST_NAME)
            continue;
        if (have_host)
            return -1;          /* "MUST NOT contain more than one name of the same name_type" */
        have_host = true;
        int l = tls_name_normalize(name.p, name.n, out->name);
        if (l < 0) {
            out->flags |= RINGD_HELLO_SNI_INVALID;
        } else {
            out->name_len = (uint16_t)l;
            found = 1;
        }
    }
    return found;
}

/* application_layer_protocol_negotiation (RFC 7301 3.1): whole entries are
 * kept in out->alpn as long as they fit; 0, or -1 if the structure is broken. */
static int parse_alpn(struct rd data, struct ringd_hello_info *out)
{
    struct rd list;
    bool full = false;

    if (!rd_vec16(&data, &list) || data.n != 0 || list.n < 2)
        return -1;
    out->flags |= RINGD_HELLO_ALPN;
    while (list.n) {
        const uint8_t *entry = list.p;
        struct rd proto;
        if (!rd_vec8(&list, &proto) || proto.n == 0)
            return -1;
        out->alpn_count++;      /* list <= 16 KiB, entries >= 2 bytes: fits */
        if (!full && out->alpn_len + 1 + proto.n <= RINGD_TLS_ALPN_MAX) {
            memcpy(out->alpn + out->alpn_len, entry, 1 + proto.n);
            out->alpn_len = (uint16_t)(out->alpn_len + 1 + proto.n);
        } else {
            full = true;
            out->flags |= RINGD_HELLO_ALPN_TRUNCATED;
        }
    }
    return 0;
}

/* supported_versions (RFC 8446 4.2.1), client form: the highest version
 * that is not a GREASE value (RFC 8701: 0x?A?A with equal bytes). */
static int parse_versions(struct rd data, struct ringd_hello_info *out)
{
    struct rd list;
    uint32_t v, max = 0;

    if (!rd_vec8(&data, &list) || data.n != 0 || list.n < 2 || (list.n & 1))
        return -1;
    while (rd_u16(&list, &v)) {
        bool grease = (v >> 8) == (v & 0xff) && (v & 0x0f) == 0x0a;
        if (!grease && v > max)
            max = v;
    }
    out->flags |= RINGD_HELLO_SUPPORTED_VERSIONS;
    if (max)
        out->max_version = (uint16_t)max;
    return 0;
}

static int fail(struct ringd_hello_info *out, uint32_t err)
{
    /* nothing half-parsed leaks out of a MALFORMED */
    uint32_t rv = out->record_version;
    memset(out, 0, sizeof(*out));
    out->record_version = (uint16_t)rv;
    out->error = err;
    return RINGD_TLS_MALFORMED;
}

/* The ClientHello body (RFC 8446 4.1.2; TLS 1.0-1.2 have the same layout,
 * with the extension block optional). b/n: the message after its 4-byte
 * handshake header, exactly. */
static int parse_body(const uint8_t *b, uint32_t n, struct ringd_hello_info *out)
{
    struct rd r = { b, n }, v, exts;
    uint32_t ver;
    bool seen_sni = false, seen_alpn = false, seen_versions = false;
    int result = RINGD_TLS_NO_SNI;

    if (!rd_u16(&r, &ver))
        return fail(out, RINGD_TLS_E_BODY);
    out->hello_version = (uint16_t)ver;
    out->max_version = (uint16_t)ver;
    if (!rd_take(&r, 32, &v))                           /* random */
        return fail(out, RINGD_TLS_E_BODY);
    if (!rd_vec8(&r, &v) || v.n > 32)                   /* legacy_session_id */
        return fail(out, RINGD_TLS_E_BODY);
    if (!rd_vec16(&r, &v) || v.n < 2 || (v.n & 1))      /* cipher_suites */
        return fail(out, RINGD_TLS_E_BODY);
    if (!rd_vec8(&r, &v) || v.n < 1)                    /* compression_methods */
        return fail(out, RINGD_TLS_E_BODY);
    if (r.n == 0)
        return RINGD_TLS_NO_SNI;                        /* no extensions (TLS <= 1.2) */
    if (!rd_vec16(&r, &exts) || r.n != 0)
        return fail(out, RINGD_TLS_E_EXTENSIONS);

    while (exts.n) {
        uint32_t type;
        struct rd data;
        int rc;
        if (!rd_u16(&exts, &type) || !rd_vec16(&exts, &data))
            return fail(out, RINGD_TLS_E_EXTENSIONS);
        switch (type) {
        case EXT_SERVER_NAME:
            if (seen_sni)
                return fail(out, RINGD_TLS_E_EXTENSIONS);
            seen_sni = true;
            rc = parse_sni(data, out);
            if (rc < 0)
                return fail(out, RINGD_TLS_E_SNI);
            if (rc > 0)
                result = RINGD_TLS_FOUND;
            break;
        case EXT_ALPN:
            if (seen_alpn)
                return fail(out, RINGD_TLS_E_EXTENSIONS);
            seen_alpn = true;
            if (parse_alpn(data, out) < 0)
                return fail(out, RINGD_TLS_E_ALPN);
            break;
        case EXT_SUPPORTED_VERSIONS:
            if (seen_versions)
                return fail(out, RINGD_TLS_E_EXTENSIONS);
            seen_versions = true;
            if (parse_versions(data, out) < 0)
                return fail(out, RINGD_TLS_E_VERSIONS);
            break;
        default:
            break;
        }
    }
    return result;
}

/* A ClientHello spread over several records: copy its fragments together
 * (the walk in tls_hello_parse validated every record header on the way) and
 * parse the copy. Kept out of line so that the 16 KiB buffer is on the stack
 * only in this rare case. */
__attribute__((noinline))
static int parse_fragmented(const uint8_t *buf, uint32_t total, struct ringd_hello_info *out)
{
    uint8_t hs[RINGD_TLS_MAX_EXAMINED];
    uint32_t got = 0, p = 0;

    while (got < total) {
        uint32_t rlen = be16(buf + p + 3);
        uint32_t take = total - got < rlen ? total - got : rlen;
        memcpy(hs + got, buf + p + TLS_RECORD_HDR, take);
        got += take;
        p += TLS_RECORD_HDR + rlen;
    }
    return parse_body(hs + TLS_HS_HDR, total - TLS_HS_HDR, out);
}

int tls_hello_parse(const uint8_t *buf, uint32_t len, struct ringd_hello_info *out)
{
    const uint32_t avail = len < RINGD_TLS_MAX_EXAMINED ? len : RINGD_TLS_MAX_EXAMINED;
    uint32_t p = 0;             /* the current record header */
    uint32_t nrec = 0;
    uint32_t got = 0;           /* handshake bytes (header included) seen so far */
    uint32_t total = 0;         /* handshake message size with its header, once known */
    uint32_t lb = TLS_RECORD_HDR + TLS_HS_HDR;   /* lower bound of the end, for `need` */
    uint32_t end;               /* stream offset just past the ClientHello */
    uint8_t hh[TLS_HS_HDR];

    memset(out, 0, sizeof(*out));

    for (;;) {
        /* A record header at p, and the ClientHello is not complete yet. */
        if (nrec == RINGD_TLS_MAX_RECORDS)
            return fail(out, RINGD_TLS_E_FRAGMENTED);
        if (p >= avail)
            goto more;
        if (buf[p] != TLS_CT_HANDSHAKE) {
            if (nrec == 0)
                return RINGD_TLS_NOT_TLS;
            return fail(out, RINGD_TLS_E_RECORD);
        }
        if (p + 1 >= avail)
            goto more;
        if (buf[p + 1] != 3) {
            if (nrec == 0)
                return RINGD_TLS_NOT_TLS;
            return fail(out, RINGD_TLS_E_RECORD);
        }
        if (p + TLS_RECORD_HDR > avail)
            goto more;
        uint32_t rlen = be16(buf + p + 3);
        if (rlen == 0 || rlen > TLS_RECORD_MAX)
            return fail(out, RINGD_TLS_E_RECORD);
        if (nrec == 0)
            out->record_version = (uint16_t)be16(buf + 1);
        nrec++;

        uint32_t d = p + TLS_RECORD_HDR;        /* this record's data: [d, dend) */
        uint32_t dend = d + rlen;

        /* the handshake header, which may itself be split over records */
        while (got < TLS_HS_HDR && d < dend) {
            if (d >= avail) {
                lb = d + (TLS_HS_HDR - got);
                goto more;
            }
            hh[got++] = buf[d++];
            if (got == 1 && hh[0] != TLS_HS_CLIENT_HELLO)
                return fail(out, RINGD_TLS_E_NOT_CLIENT_HELLO);
            if (got == TLS_HS_HDR)
                total = TLS_HS_HDR + ((uint32_t)hh[1] << 16 | (uint32_t)hh[2] << 8 | hh[3]);
        }
        if (got < TLS_HS_HDR) {
            /* the header goes on in the next record */
            p = dend;
            lb = p + TLS_RECORD_HDR + (TLS_HS_HDR - got);
            continue;
        }

        /* Where the message ends at the earliest: here, or past at least
         * one more record header. */
        uint32_t left = total - got;
        if (left <= dend - d) {
            end = d + left;
            if (end > RINGD_TLS_MAX_EXAMINED)
                return fail(out, RINGD_TLS_E_TOO_LARGE);
            if (end > avail) {
                lb = end;
                goto more;
            }
            break;
        }
        lb = dend + TLS_RECORD_HDR + (left - (dend - d));
        if (lb > RINGD_TLS_MAX_EXAMINED)
            return fail(out, RINGD_TLS_E_TOO_LARGE);
        got += dend - d;
        p = dend;
    }

    out->records = (uint16_t)nrec;
    out->hello_end = end;
    if (nrec == 1)
        return parse_body(buf + TLS_RECORD_HDR + TLS_HS_HDR, total - TLS_HS_HDR, out);
    return parse_fragmented(buf, total, out);

more:
    if (len >= RINGD_TLS_MAX_EXAMINED)
        return fail(out, RINGD_TLS_E_TOO_LARGE);
    out->need = lb > len ? lb : len + 1;
    return RINGD_TLS_NEED_MORE;
}

int ringd_tls_parse(const uint8_t *buf, uint32_t len, struct ringd_hello_info *out)
{
    return tls_hello_parse(buf, len, out);
}

int ringd_tls_name_normalize(const uint8_t *in, uint32_t len, uint8_t *out)
{
    return tls_name_normalize(in, len, out);
}
