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

uint16_t proxy_send_build(unsigned version, const struct sockaddr *peer,
                          const struct sockaddr *local, uint8_t *out)
{
    bool ok = peer && local && local->sa_family == peer->sa_family &&
              (peer->sa_family == AF_INET || peer->sa_family == AF_INET6);

    if (version == 1) {
        char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
        int n;
        if (!ok) {
            n = snprintf((char *)out, PROXY_SEND_MAX, "PROXY UNKNOWN\r\n");
        } else if (peer->sa_family == AF_INET) {
            const struct sockaddr_in *p = (const void *)peer, *l = (const void *)local;
            inet_ntop(AF_INET, &p->sin_addr, src, sizeof(src));
            inet_ntop(AF_INET, &l->sin_addr, dst, sizeof(dst));
            n = snprintf((char *)out, PROXY_SEND_MAX, "PROXY TCP4 %s %s %u %u\r\n", src,
                         dst, ntohs(p->sin_port), ntohs(l->sin_port));
        } else {
            const struct sockaddr_in6 *p = (const void *)peer, *l = (const void *)local;
            inet_ntop(AF_INET6, &p->sin6_addr, src, sizeof(src));
            inet_ntop(AF_INET6, &l->sin6_addr, dst, sizeof(dst));
            n = snprintf((char *)out, PROXY_SEND_MAX, "PROXY TCP6 %s %s %u %u\r\n", src,
                         dst, ntohs(p->sin6_port), ntohs(l->sin6_port));
        }
        return (uint16_t)n;
    }

    static const uint8_t sig[12] = { 0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                     0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A };
    uint8_t *h = out;
    memcpy(h, sig, 12);
    uint16_t alen = 0;
    if (!ok) {
        h[12] = 0x20;     /* version 2, LOCAL */
        h[13] = 0x00;     /* UNSPEC */
    } else if (peer->sa_family == AF_INET) {
        const struct sockaddr_in *p = (const void *)peer, *l = (const void *)local;
        h[12] = 0x21;     /* version 2, PROXY */
        h[13] = 0x11;     /* TCP over IPv4 */
        memcpy(h + 16, &p->sin_addr, 4);
        memcpy(h + 20, &l->sin_addr, 4);
        memcpy(h + 24, &p->sin_port, 2);
        memcpy(h + 26, &l->sin_port, 2);
        alen = 12;
    } else {
        const struct sockaddr_in6 *p = (const void *)peer, *l = (const void *)local;
        h[12] = 0x21;
        h[13] = 0x21;     /* TCP over IPv6 */
        memcpy(h + 16, &p->sin6_addr, 16);
        memcpy(h + 32, &l->sin6_addr, 16);
        memcpy(h + 48, &p->sin6_port, 2);
        memcpy(h + 50, &l->sin6_port, 2);
        alen = 36;
    }
    h[14] = (uint8_t)(alen >> 8);
    h[15] = (uint8_t)(alen & 0xff);
    return (uint16_t)(16 + alen);
}
