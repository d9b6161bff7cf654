/*
 * proxy_recv.c: the receiving side of the PROXY protocol, v1 and v2
 * (HAProxy's proxy-protocol.txt, 2020/03/05 revision).
 *
 * Input: the bytes the peer sent so far, from the first one. Output: wait
 * (NEED_MORE), a header (OK: its exact length, the command, the addresses),
 * no PROXY header at all (NOT_PROXY) or a broken one (MALFORMED). Called
 * again from the start with more bytes after a NEED_MORE; it keeps no state.
 *
 * Detection is by prefix, byte by byte: "PROXY " starts v1, the 12-byte
 * signature starts v2; the first byte that fits neither gives NOT_PROXY.
 * Like tls_hello.c, every verdict depends only on the bytes before the one
 * that decided it, so the answer does not depend on how the bytes arrived,
 * and a broken header is refused as early as it can be (a v1 line with a
 * character that cannot occur in it, a bad v2 version, command, family or
 * length), without waiting for a CRLF or for the announced length.
 *
 * v1 (section 2.1), strict: exactly one space between fields; "TCP4" with
 * dotted quads of 0..255 without leading zeros; "TCP6" with 1..4 hex digits
 * per group, at most one "::" (standing for at least one group), optionally
 * a dotted quad in the last 32 bits (inet_ntop writes "::ffff:192.0.2.1" for
 * mapped addresses); ports 0..65535 without leading zeros; CRLF within the
 * first 107 bytes, a lone CR or LF is refused. "UNKNOWN" may be followed by
 * anything up to the CRLF (the spec says to ignore it) and carries no
 * address.
 *
 * v2 (section 2.2): version 2; command LOCAL or PROXY; for PROXY the
 * family/protocol byte must be one of the seven the spec lists and the
 * address block at least as long as the family needs. Addresses are returned
 * for TCP over IPv4 and IPv6. UNSPEC, UDP and UNIX are valid but carry no
 * address ringd can use: the spec lets a receiver "fall back to the UNSPEC
 * mode" for those, so they are OK with no address (src_len = 0: keep the
 * socket's own), as HAProxy does; the family byte says which it was. UNIX
 * and UDP blocks are skipped by their fixed size and TLVs after them are
 * walked; an UNSPEC block has no layout, so it is skipped whole. A LOCAL
 * header is OK with no address and its block, family included, is skipped
 * unread as the spec says. A header longer than RINGD_PROXY_V2_MAX is
 * MALFORMED (the cloud balancers that add TLVs stay far below it).
 *
 * TLVs (after the address block of a PROXY header) are walked, never
 * trusted: a TLV whose length runs past the header, or fewer than 3 bytes
 * left for a TLV header, is MALFORMED (HAProxy's reg-test
 * proxy_protocol_tlv_validation checks both). PP2_TYPE_CRC32C is verified
 * (a mismatch is MALFORMED, as the spec requires of a receiver that supports
 * it); the first AUTHORITY and ALPN values are located for the caller; all
 * other TLVs are skipped.
 */
#include "proxy_recv.h"

#include <stdbool.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>

#define V2_HDR 16
#define PP2_TYPE_ALPN 0x01
#define PP2_TYPE_AUTHORITY 0x02
#define PP2_TYPE_CRC32C 0x03

#define V1_MIN 15                       /* "PROXY UNKNOWN\r\n" */
#define V1_PROTO_AT 6                   /* the protocol word starts after "PROXY " */

#if RINGD_PROXY_V2_MAX > 65535
#error "ringd_proxy_info offsets are 16 bits"
#endif

static const uint8_t v2sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                   0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };
static const uint8_t v1sig[6] = { 'P', 'R', 'O', 'X', 'Y', ' ' };

static inline uint32_t be16(const uint8_t *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

static int bad(struct ringd_proxy_info *out, uint32_t err)
{
    uint8_t version = out->version;
    memset(out, 0, sizeof(*out));
    out->version = version;
    out->error = err;
    return RINGD_PROXY_MALFORMED;
}

static void set_in4(uint8_t *dst, uint32_t *dlen, const uint8_t addr[4], uint32_t port)
{
    struct sockaddr_in sin;
    uint8_t pb[2] = { (uint8_t)(port >> 8), (uint8_t)port };

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    memcpy(&sin.sin_addr, addr, 4);
    memcpy(&sin.sin_port, pb, 2);
    memcpy(dst, &sin, sizeof(sin));
    *dlen = sizeof(sin);
}

static void set_in6(uint8_t *dst, uint32_t *dlen, const uint8_t addr[16], uint32_t port)
{
    struct sockaddr_in6 sin6;
    uint8_t pb[2] = { (uint8_t)(port >> 8), (uint8_t)port };

    memset(&sin6, 0, sizeof(sin6));
    sin6.sin6_family = AF_INET6;
    memcpy(&sin6.sin6_addr, addr, 16);
    memcpy(&sin6.sin6_port, pb, 2);
    memcpy(dst, &sin6, sizeof(sin6));
    *dlen = sizeof(sin6);
}

_Static_assert(sizeof(struct sockaddr_in6) <= RINGD_ADDR_MAX, "address field too small");

/* ----------------------------------------------------------------- v2 */

/* CRC32C (Castagnoli, reflected 0x82F63B78), RFC 4960 appendix B. Bit by
 * bit: it runs over at most RINGD_PROXY_V2_MAX bytes, and only for headers
 * that carry the TLV. The checksum field itself counts as zeros. */
static uint32_t crc32c(const uint8_t *p, uint32_t n, uint32_t skip_at)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t b = (i >= skip_at && i < skip_at + 4) ? 0 : p[i];
        crc ^= b;
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
    }
    return ~crc;
}

/* bytes of the address block a PROXY command needs for a family/protocol
 * byte; -1 for a byte the spec does not list */
static int v2_addr_size(uint8_t fam)
{
    switch (fam) {
    case 0x00: return 0;        /* UNSPEC */
    case 0x11: case 0x12: return 12;    /* TCP4, UDP4 */
    case 0x21: case 0x22: return 36;    /* TCP6, UDP6 */
    case 0x31: case 0x32: return 216;   /* UNIX stream, UNIX datagram */
    default: return -1;
    }
}

static int parse_v2(const uint8_t *buf, uint32_t len, struct ringd_proxy_info *out)
{
    out->version = 2;
    if (len < 13)
        goto more16;
    if ((buf[12] >> 4) != 2)
        return bad(out, RINGD_PROXY_E_V2_VERSION);
    uint8_t cmd = buf[12] & 0x0f;
    if (cmd > 1)
        return bad(out, RINGD_PROXY_E_V2_COMMAND);
    if (len < 14)
        goto more16;
    uint8_t fam = buf[13];
    int asize = v2_addr_size(fam);
    if (cmd == RINGD_PROXY_CMD_PROXY && asize < 0)
        return bad(out, RINGD_PROXY_E_V2_FAMILY);
    if (len < V2_HDR)
        goto more16;
    uint32_t blen = be16(buf + 14);
    uint32_t total = V2_HDR + blen;
    if (total > RINGD_PROXY_V2_MAX)
        return bad(out, RINGD_PROXY_E_V2_LENGTH);
    if (cmd == RINGD_PROXY_CMD_PROXY && blen < (uint32_t)asize)
        return bad(out, RINGD_PROXY_E_V2_LENGTH);
    if (len < total) {
        out->need = total;
        return RINGD_PROXY_NEED_MORE;
    }

    out->command = cmd;
    out->family = fam;
    out->header_len = total;
    if (cmd == RINGD_PROXY_CMD_LOCAL || fam == 0x00)
        return RINGD_PROXY_OK;  /* no address; a LOCAL block is skipped unread */

    const uint8_t *a = buf + V2_HDR;
    if (fam == 0x11) {
        set_in4(out->src, &out->src_len, a, be16(a + 8));
        set_in4(out->dst, &out->dst_len, a + 4, be16(a + 10));
    } else if (fam == 0x21) {
        set_in6(out->src, &out->src_len, a, be16(a + 32));
        set_in6(out->dst, &out->dst_len, a + 16, be16(a + 34));
    }

    uint32_t p = V2_HDR + (uint32_t)asize, crc_at = 0;
    while (p < total) {
        if (total - p < 3)
            return bad(out, RINGD_PROXY_E_V2_TLV);       /* truncated TLV header */
        uint8_t type = buf[p];
        uint32_t tlen = be16(buf + p + 1);
        uint32_t v = p + 3;
        if (tlen > total - v)
            return bad(out, RINGD_PROXY_E_V2_TLV);       /* value runs past the header */
        switch (type) {
        case PP2_TYPE_ALPN:
            if (!out->alpn_off) {
                out->alpn_off = (uint16_t)v;
                out->alpn_len = (uint16_t)tlen;
            }
            break;
        case PP2_TYPE_AUTHORITY:
            if (!out->authority_off) {
                out->authority_off = (uint16_t)v;
                out->authority_len = (uint16_t)tlen;
            }
            break;
        case PP2_TYPE_CRC32C:
            if (tlen != 4 || crc_at)
                return bad(out, RINGD_PROXY_E_V2_CRC);
            crc_at = v;
            break;
        default:
            break;
        }
        p = v + tlen;
    }
    if (crc_at) {
        uint32_t want = (uint32_t)buf[crc_at] << 24 | (uint32_t)buf[crc_at + 1] << 16 |
                        (uint32_t)buf[crc_at + 2] << 8 | buf[crc_at + 3];
        if (crc32c(buf, total, crc_at) != want)
            return bad(out, RINGD_PROXY_E_V2_CRC);
        out->flags |= RINGD_PROXY_F_CRC32C;
    }
    return RINGD_PROXY_OK;

more16:
    out->need = V2_HDR;
    return RINGD_PROXY_NEED_MORE;
}

/* ----------------------------------------------------------------- v1 */

static inline bool is_digit(uint8_t c)
{
    return c >= '0' && c <= '9';
}

static inline int hex_val(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* a decimal number without leading zeros, at most max_digits digits */
static bool parse_dec(const uint8_t *s, uint32_t n, uint32_t max_digits, uint32_t max,
                      uint32_t *v)
{
    uint32_t x = 0;
    if (n == 0 || n > max_digits || (n > 1 && s[0] == '0'))
        return false;
    for (uint32_t i = 0; i < n; i++) {
        if (!is_digit(s[i]))
            return false;
        x = x * 10 + (uint32_t)(s[i] - '0');
    }
    if (x > max)
        return false;
    *v = x;
    return true;
}

/* exactly four decimal numbers 0..255 separated by single dots */
static bool parse_ipv4(const uint8_t *s, uint32_t n, uint8_t out[4])
{
    uint32_t i = 0;
    for (int part = 0; part < 4; part++) {
        uint32_t start = i, v;
        while (i < n && s[i] != '.')
            i++;
        if (!parse_dec(s + start, i - start, 3, 255, &v))
            return false;
        out[part] = (uint8_t)v;
        if (part < 3) {
            if (i >= n)
                return false;
            i++;                /* the dot */
        }
    }
    return i == n;
}

/* RFC 4291 2.2 text forms: 8 groups of 1..4 hex digits, one "::" for one or
 * more zero groups, and optionally a dotted quad as the last 32 bits */
static bool parse_ipv6(const uint8_t *s, uint32_t n, uint8_t out[16])
{
    uint16_t g[8];
    int ng = 0, gap = -1;
    uint32_t i = 0;

    if (n < 2)
        return false;
    if (s[0] == ':') {
        if (s[1] != ':')
            return false;
        gap = 0;
        i = 2;
    }
    while (i < n) {
        uint32_t start = i;
        uint32_t v = 0;
        int h;
        while (i < n && (h = hex_val(s[i])) >= 0) {
            v = (v << 4) | (uint32_t)h;
            if (i - start == 4)
                return false;   /* a fifth hex digit */
            i++;
        }
        if (i < n && s[i] == '.') {
            /* the dotted quad: last, and two groups' worth */
            uint8_t q[4];
            if (ng > 6 || !parse_ipv4(s + start, n - start, q))
                return false;
            g[ng++] = (uint16_t)(q[0] << 8 | q[1]);
            g[ng++] = (uint16_t)(q[2] << 8 | q[3]);
            i = n;
            break;
        }
        if (i == start || ng == 8)
            return false;
        g[ng++] = (uint16_t)v;
        if (i == n)
            break;
        if (s[i] != ':')
            return false;
        i++;
        if (i < n && s[i] == ':') {
            if (gap >= 0)
                return false;   /* a second "::" */
            gap = ng;
            i++;
        } else if (i == n) {
            return false;       /* a trailing single colon */
        }
    }
    if (gap < 0 ? ng != 8 : ng > 7)
        return false;

    memset(out, 0, 16);
    for (int j = 0, k = 0; j < ng; j++, k++) {
        if (j == gap)
            k += 8 - ng;        /* the zero groups "::" stands for */
        out[2 * k] = (uint8_t)(g[j] >> 8);
        out[2 * k + 1] = (uint8_t)g[j];
    }
    return true;
}

/* The protocol words, with what must follow them. */
#define KW_TCP4 0
#define KW_TCP6 1
#define KW_UNKNOWN 2
static const char *const v1_words[3] = { "TCP4 ", "TCP6 ", "UNKNOWN" };
static const uint32_t v1_word_len[3] = { 5, 5, 7 };

/* May byte c stand at offset off (from the protocol word) of a v1 line whose
 * candidate words are `mask` (bits KW_*)? Returns the narrowed mask, 0 if no
 * word fits. After "UNKNOWN" must come a space (or the CRLF, handled by the
 * caller) and then anything; after "TCPx " only address and port bytes. */
static unsigned v1_step(unsigned mask, uint32_t off, uint8_t c)
{
    unsigned next = 0;
    for (int k = 0; k < 3; k++) {
        if (!(mask & (1u << k)))
            continue;
        uint32_t wl = v1_word_len[k];
        bool ok;
        if (off < wl)
            ok = (uint8_t)v1_words[k][off] == c;
        else if (k == KW_UNKNOWN)
            ok = off > wl || c == ' ';
        else
            ok = c == ' ' || c == '.' || c == ':' || hex_val(c) >= 0;
        if (ok)
            next |= 1u << k;
    }
    return next;
}

/* the next space-separated field of [*pos, end): no empty fields */
static bool next_field(const uint8_t *line, uint32_t *pos, uint32_t end, bool last,
                       uint32_t *fs, uint32_t *fn)
{
    uint32_t i = *pos;
    while (i < end && line[i] != ' ')
        i++;
    if (i == *pos)
        return false;
    *fs = *pos;
    *fn = i - *pos;
    if (last) {
        if (i != end)
            return false;
        *pos = i;
    } else {
        if (i == end)
            return false;
        *pos = i + 1;           /* past the single space */
    }
    return true;
}

static int parse_v1(const uint8_t *buf, uint32_t len, struct ringd_proxy_info *out)
{
    uint32_t n = len < RINGD_PROXY_V1_MAX ? len : RINGD_PROXY_V1_MAX;
    unsigned mask = 7;
    uint32_t eol = 0;

    out->version = 1;
    for (uint32_t i = V1_PROTO_AT; i < n; i++) {
        uint8_t c = buf[i];
        if (c == '\r') {
            if (i + 2 > RINGD_PROXY_V1_MAX)
                return bad(out, RINGD_PROXY_E_V1_LINE);  /* the LF would be byte 108 */
            if (i + 1 >= len) {
                out->need = i + 2;
                return RINGD_PROXY_NEED_MORE;
            }
            if (buf[i + 1] != '\n')
                return bad(out, RINGD_PROXY_E_V1_LINE);
            eol = i;
            break;
        }
        if (c == '\n')
            return bad(out, RINGD_PROXY_E_V1_LINE);
        uint32_t off = i - V1_PROTO_AT;
        unsigned next = v1_step(mask, off, c);
        if (!next) {
            /* in the protocol word (or the space after UNKNOWN), or an
             * address/port byte that cannot be one */
            bool word = off < 5 || (mask == (1u << KW_UNKNOWN) && off <= 7);
            return bad(out, word ? RINGD_PROXY_E_V1_PROTO : RINGD_PROXY_E_V1_LINE);
        }
        mask = next;
    }
    if (!eol) {
        if (len >= RINGD_PROXY_V1_MAX)
            return bad(out, RINGD_PROXY_E_V1_LINE);      /* no CRLF in 107 bytes */
        uint32_t min = (mask == (1u << KW_TCP4)) ? 32 : V1_MIN;
        out->need = len + 1 > min ? len + 1 : min;
        return RINGD_PROXY_NEED_MORE;
    }

    /* A complete line: [0, eol) then CRLF. */
    uint32_t words = eol - V1_PROTO_AT;
    if ((mask & (1u << KW_UNKNOWN)) && words >= 7) {
        out->command = RINGD_PROXY_CMD_PROXY;
        out->header_len = eol + 2;
        return RINGD_PROXY_OK;      /* UNKNOWN [anything]: the socket's addresses */
    }
    if (!(mask & 3) || words < 5)
        return bad(out, RINGD_PROXY_E_V1_PROTO);

    bool v6 = (mask & (1u << KW_TCP6)) != 0;
    uint32_t pos = V1_PROTO_AT + 5, s1, n1, s2, n2, s3, n3, s4, n4, sport, dport;
    if (!next_field(buf, &pos, eol, false, &s1, &n1) ||
        !next_field(buf, &pos, eol, false, &s2, &n2) ||
        !next_field(buf, &pos, eol, false, &s3, &n3) ||
        !next_field(buf, &pos, eol, true, &s4, &n4))
        return bad(out, RINGD_PROXY_E_V1_SYNTAX);

    uint8_t src[16], dst[16];
    bool ok = v6 ? parse_ipv6(buf + s1, n1, src) && parse_ipv6(buf + s2, n2, dst)
                 : parse_ipv4(buf + s1, n1, src) && parse_ipv4(buf + s2, n2, dst);
    if (!ok)
        return bad(out, RINGD_PROXY_E_V1_ADDRESS);
    if (!parse_dec(buf + s3, n3, 5, 65535, &sport) || !parse_dec(buf + s4, n4, 5, 65535, &dport))
        return bad(out, RINGD_PROXY_E_V1_PORT);

    out->command = RINGD_PROXY_CMD_PROXY;
    out->header_len = eol + 2;
    if (v6) {
        out->family = 0x21;
        set_in6(out->src, &out->src_len, src, sport);
        set_in6(out->dst, &out->dst_len, dst, dport);
    } else {
        out->family = 0x11;
        set_in4(out->src, &out->src_len, src, sport);
        set_in4(out->dst, &out->dst_len, dst, dport);
    }
    return RINGD_PROXY_OK;
}

/* ------------------------------------------------------------- entry */

int proxy_recv_parse(const uint8_t *buf, uint32_t len, struct ringd_proxy_info *out)
{
    bool v1 = true, v2 = true;

    memset(out, 0, sizeof(*out));
    for (uint32_t i = 0; i < len && i < sizeof(v2sig); i++) {
        if (i < sizeof(v1sig) && buf[i] != v1sig[i])
            v1 = false;
        if (buf[i] != v2sig[i])
            v2 = false;
        if (!v1 && !v2)
            return RINGD_PROXY_NOT_PROXY;
    }
    if (v2 && len >= sizeof(v2sig))
        return parse_v2(buf, len, out);
    if (v1 && len >= sizeof(v1sig))
        return parse_v1(buf, len, out);
    out->need = v1 ? V1_MIN : V2_HDR;     /* both fit an empty buffer: the smaller */
    return RINGD_PROXY_NEED_MORE;
}

int ringd_proxy_parse(const uint8_t *buf, uint32_t len, struct ringd_proxy_info *out)
{
    return proxy_recv_parse(buf, len, out);
}
