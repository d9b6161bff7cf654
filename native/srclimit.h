/*
 * srclimit.h: the per-source limit table (srclimit.c).
 *
 * A leaf: it needs nothing of the worker but libc. The API, the result codes
 * and the header struct live in ringd_api.h (Python creates the table and
 * reads its counters through cffi); ringd_api.h has no include guard (cffi's
 * cdef reads it too), so it is included here only if nobody did before.
 *
 * The data path calls, per connection of a listener with per-source limits:
 *   srclimit_acquire(...)            after accept (and the PROXY header),
 *                                    before connecting; SRCLIMIT_OVER_* closes
 *   srclimit_release(col, ref)       when that connection is freed, with the
 *                                    ref acquire returned (REF_NONE: no-op)
 *   srclimit_move(from, to, ref)     if the connection changes process
 * The master calls srclimit_bytes/init once, srclimit_clear_column after it
 * reaps a worker process, srclimit_usage for status and metrics.
 */
#ifndef RINGD_SRCLIMIT_H
#define RINGD_SRCLIMIT_H

#include <stddef.h>
#include <stdint.h>
#ifndef RINGD_ABI_VERSION
#include "ringd_api.h"
#endif

#endif
