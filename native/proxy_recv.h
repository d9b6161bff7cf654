/*
 * proxy_recv.h: the PROXY protocol v1/v2 receiver (proxy_recv.c).
 *
 * A leaf: it needs nothing of the worker. The result codes and struct
 * ringd_proxy_info live in ringd_api.h (Python reads them through cffi);
 * ringd_api.h has no include guard (cffi's cdef reads it too), so it is
 * included here only if nobody did before.
 */
#ifndef RINGD_PROXY_RECV_H
#define RINGD_PROXY_RECV_H

#include <stdint.h>
#ifndef RINGD_ABI_VERSION
#include "ringd_api.h"
#endif

/* Same contract as ringd_proxy_parse (ringd_api.h), for the data path. */
int proxy_recv_parse(const uint8_t *buf, uint32_t len, struct ringd_proxy_info *out);

#endif
