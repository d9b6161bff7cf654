/*
 * idle.c: idle_timeout, where "idle" means that no byte moved in either
 * direction, not only that this worker did not read or write.
 *
 * A slow reader drains the kernel's send queue of ringd's socket long after
 * ringd's last write: with a large send buffer and TCP_NOTSENT_LOWAT the
 * socket may not turn writable for many seconds while the transfer is
 * moving (80 KB/s against a 3 s idle_timeout was cut at 8 s). So the worker's
 * own activity (lru_touch on every read and write) is only the first half;
 * the kernel's counters of both sockets (TCP_INFO bytes_acked, what the
 * peer acknowledged of what we sent, plus bytes_received, what the peer
 * sent us) are the second. Reading them costs two getsockopt calls, so it
 * is done only for connections the worker has not touched for a while:
 *
 *   idle list (per listener, oldest first): touched by the worker. Once a
 *     connection sits there PROBE_AFTER (a quarter of idle_timeout, at most
 *     1 s) it gets a snapshot of the counters and moves to
 *   probe list (oldest snapshot first): when its snapshot is idle_timeout
 *     old, the counters are read again. Moved: the kernel is still making
 *     progress; a new snapshot, back of the probe list. Unchanged: nothing
 *     moved for idle_timeout, the connection is closed with a reset (a FIN
 *     would look like the end of the data).
 *
 * So a connection closes after at least idle_timeout without progress, at
 * most a quarter of idle_timeout (capped at 1 s) plus a tick later. A
 * connection whose peer stopped reading (zero window) makes no progress:
 * window probes acknowledge nothing new. Any read or write by the worker
 * moves the connection back to the idle list.
 */
#include "ringd.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <linux/tcp.h>

#define PROBE_AFTER_MAX_MS 1000u

void lru_unlink(struct conn *c)
{
    if (c->lru_prev) {
        c->lru_prev->lru_next = c->lru_next;
        c->lru_next->lru_prev = c->lru_prev;
        c->lru_prev = c->lru_next = NULL;
    }
}

static void list_append(struct conn *head, struct conn *c)
{
    c->lru_prev = head->lru_prev;
    c->lru_next = head;
    head->lru_prev->lru_next = c;
    head->lru_prev = c;
}

void lru_touch(struct worker *w, struct conn *c)
{
    struct conn *head = &w->ls[c->listener].lru_head;

    c->last_ms = w->now_ms;
    if (head->lru_prev == c)
        return;               /* already the newest (and not on the probe list) */
    lru_unlink(c);
    list_append(head, c);
}

/* Bytes the kernel has moved on this socket so far, both ways. */
static uint64_t sock_progress(int fd)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    const socklen_t need = offsetof(struct tcp_info, tcpi_bytes_received) +
                           sizeof(ti.tcpi_bytes_received);

    if (fd < 0)
        return 0;
    memset(&ti, 0, sizeof(ti));
    if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 || len < need)
        return 0;             /* (kernels before 4.1: the worker's activity alone) */
    return ti.tcpi_bytes_acked + ti.tcpi_bytes_received;
}

static uint64_t conn_progress(struct conn *c)
{
    return sock_progress(c->cfd) + sock_progress(c->sfd);
}

void conn_expire_idle(struct worker *w)
{
    for (uint32_t li = 0; li < w->cfg->nlisteners; li++) {
        struct listener_rt *l = &w->ls[li];
        uint64_t limit = w->cfg->listeners[li].idle_timeout_ms;
        uint64_t probe_after = limit / 4 < PROBE_AFTER_MAX_MS ? limit / 4 : PROBE_AFTER_MAX_MS;
        struct conn *c = l->lru_head.lru_next;

        while (c != &l->lru_head && w->now_ms - c->last_ms >= probe_after) {
            struct conn *next = c->lru_next;
            c->kbase = conn_progress(c);
            c->kbase_ms = w->now_ms;
            lru_unlink(c);
            list_append(&l->probe_head, c);
            c = next;
        }
        c = l->probe_head.lru_next;
        while (c != &l->probe_head && w->now_ms - c->kbase_ms >= limit) {
            struct conn *next = c->lru_next;
            uint64_t k = conn_progress(c);
            lru_unlink(c);
            if (k != c->kbase) {
                c->kbase = k;
                c->kbase_ms = w->now_ms;
                c->last_ms = w->now_ms;
                list_append(&l->probe_head, c);
            } else {
                conn_close(w, c, RINGD_END_TIMEOUT, ETIMEDOUT);
            }
            c = next;
        }
    }
}
