/*
 * proxy_send.c: the sending side of the PROXY protocol, v1 (text) and v2
 * (binary): the header that tells a server which client a connection is
 * for (HAProxy's proxy-protocol.txt). Built from two addresses the kernel
 * gave us, so unlike proxy_recv.c it meets no untrusted input.
 */
#include "proxy_send.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* The address and port of an IPv4 or IPv6 socket address, both in network
 * order; returns the size of the address. */
static uint16_t addr_of(const struct sockaddr *sa, const void **addr, uint16_t *port)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        *addr = &in->sin_addr;
        *port = in->sin_port;
        return 4;
    }
    const struct sockaddr_in6 *in6 = (const void *)sa;
    *addr = &in6->sin6_addr;
    *port = in6->sin6_port;
    return 16;
}

uint16_t proxy_send_build(unsigned version, const struct sockaddr *peer,
                          const struct sockaddr *local, uint8_t *out)
{
    static const uint8_t sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                     0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };
    bool ok = peer && local && local->sa_family == peer->sa_family &&
              (peer->sa_family == AF_INET || peer->sa_family == AF_INET6);
    const void *src = NULL, *dst = NULL;
    uint16_t sport = 0, dport = 0, n = 0;

    if (ok) {
        n = addr_of(peer, &src, &sport);
        addr_of(local, &dst, &dport);
    }

    if (version == 1) {
        char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
        if (!ok)
            return (uint16_t)snprintf((char *)out, PROXY_SEND_MAX, "PROXY UNKNOWN\r\n");
        int af = n == 4 ? AF_INET : AF_INET6;
        inet_ntop(af, src, s, sizeof(s));
        inet_ntop(af, dst, d, sizeof(d));
        return (uint16_t)snprintf((char *)out, PROXY_SEND_MAX, "PROXY %s %s %s %u %u\r\n",
                                  n == 4 ? "TCP4" : "TCP6", s, d, ntohs(sport), ntohs(dport));
    }

    /* v2: signature, version and command, family, length, addresses */
    uint16_t alen = ok ? (uint16_t)(2 * n + 4) : 0;
    memcpy(out, sig, 12);
    out[12] = ok ? 0x21 : 0x20;                     /* version 2, PROXY or LOCAL */
    out[13] = !ok ? 0x00 : n == 4 ? 0x11 : 0x21;    /* UNSPEC, TCP over IPv4 or IPv6 */
    out[14] = (uint8_t)(alen >> 8);
    out[15] = (uint8_t)(alen & 0xff);
    if (ok) {
        memcpy(out + 16, src, n);
        memcpy(out + 16 + n, dst, n);
        memcpy(out + 16 + 2 * n, &sport, 2);
        memcpy(out + 18 + 2 * n, &dport, 2);
    }
    return (uint16_t)(16 + alen);
}
