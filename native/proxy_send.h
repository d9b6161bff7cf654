/*
 * proxy_send.h: the PROXY protocol v1/v2 header ringd sends to a server
 * (proxy_send.c). The receiving side, which parses one a client sends, is
 * proxy_recv.c/proxy_recv.h: the two halves of the codec.
 *
 * A leaf: it needs nothing of the worker.
 */
#ifndef RINGD_PROXY_SEND_H
#define RINGD_PROXY_SEND_H

#include <stdint.h>
#include <sys/socket.h>

/* room for the longest header built: v1 at most 107 bytes ("PROXY TCP6"
 * with two full IPv6 addresses), v2 at most 52 (IPv6, no TLV) */
#define PROXY_SEND_MAX 108

/* Write the header of `version` (1 or 2) for a client at `peer` that
 * connected to `local` into out[PROXY_SEND_MAX]; returns its length. Either
 * address NULL, of different families, or neither IPv4 nor IPv6: the header
 * says UNKNOWN (v1) or LOCAL (v2), as the spec allows. */
uint16_t proxy_send_build(unsigned version, const struct sockaddr *peer,
                          const struct sockaddr *local, uint8_t *out);

#endif
