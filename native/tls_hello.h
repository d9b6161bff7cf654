/*
 * tls_hello.h: the TLS ClientHello parser of the SNI peek (tls_hello.c).
 *
 * A leaf: it needs nothing of the worker. The result codes and struct
 * ringd_hello_info live in ringd_api.h (Python reads them through cffi);
 * ringd_api.h has no include guard (cffi's cdef reads it too), so it is
 * included here only if nobody did before.
 */
#ifndef RINGD_TLS_HELLO_H
#define RINGD_TLS_HELLO_H

#include <stdint.h>
#ifndef RINGD_ABI_VERSION
#include "ringd_api.h"
#endif

/* Same contract as ringd_tls_parse (ringd_api.h), for the data path. */
int tls_hello_parse(const uint8_t *buf, uint32_t len, struct ringd_hello_info *out);

/* Same contract as ringd_tls_name_normalize. */
int tls_name_normalize(const uint8_t *in, uint32_t len, uint8_t out[256]);

#endif
