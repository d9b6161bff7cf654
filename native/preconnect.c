/*
 * preconnect.c: the steps before connecting (state CS_ACCEPTED).
 *
 * With an edge policy on its listener, a new connection goes through, in
 * this order, before any server is involved:
 *
 *   1. accept_proxy: the peer must be in trusted_proxies (if set); its
 *      PROXY v1/v2 header is read (recv into c->pre) and parsed; the client
 *      address it carries replaces the socket's (LOCAL, UNKNOWN: kept).
 *   2. deny, then allow, on that address.
 *   3. the per-source limits (srclimit.c, shared by all workers).
 *   4. with routes: the first bytes are read (into c->pre, after what
 *      followed the PROXY header) until the ClientHello parser has an
 *      answer; a server name a route knows picks that route's upstream;
 *      anything else (no SNI, not TLS, malformed, no match, EOF) the
 *      listener's upstream at once. No answer within peek_timeout: the
 *      listener's upstream too (server-first protocols), or none.
 *
 * Steps 1 and 4 share one deadline (accept + peek_timeout), enforced by a
 * linked timeout on every recv. The bytes read are never lost: conn.c sends
 * them to the server first (OP_PRE_SEND), then forwards the rest, so the
 * server receives the client's stream byte for byte (minus the PROXY
 * header). Reading instead of MSG_PEEK costs no more syscalls (one recv
 * takes the whole first flight) and needs no wait for "more than the bytes
 * already queued", which a peek cannot express.
 *
 * Each function returns a verdict (ringd.h): PRE_CONNECT, PRE_WAIT, or
 * -RINGD_END_* to refuse. A refusal is always before any byte reached a
 * server; conn.c resets the client (SO_LINGER 0), so it sees an error.
 */
#include "ringd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define PBAD_UNTRUSTED 0        /* RINGD_EV_PROXY_BAD b: the peer is not trusted */
#define PBAD_NOT_PROXY 99       /* the first bytes are no PROXY header */
#define PBAD_TIMEOUT 100        /* no complete header before the deadline, or EOF */

static const struct ringd_listener_cfg *lcfg(struct worker *w, struct conn *c)
{
    return &w->cfg->listeners[c->listener];
}

static bool pre_alloc(struct worker *w, struct conn *c)
{
    if (c->pre)
        return true;
    /* malloc, not a pool: only connections of listeners with an edge policy
     * come here, and glibc serves 20 KiB from its arenas without a syscall */
    c->pre = malloc(sizeof(*c->pre));
    if (!c->pre)
        return false;
    c->pre->len = c->pre->off = 0;
    c->pre->dst_len = 0;
    c->pre->deadline_ms = w->now_ms + lcfg(w, c)->peek_timeout_ms;
    return true;
}

static void arm_recv(struct worker *w, struct conn *c)
{
    struct prelude *p = c->pre;
    uint64_t left = p->deadline_ms > w->now_ms ? p->deadline_ms - w->now_ms : 1;

    p->ts.tv_sec = (long long)(left / 1000);
    p->ts.tv_nsec = (long long)(left % 1000) * 1000000;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_recv(sqe, c->cfd, p->buf + p->len, PRE_BUF_MAX - p->len, 0);
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_PRE_RECV, 0));
    sqe->flags |= IOSQE_IO_LINK;
    sqe = get_sqe(w);
    io_uring_prep_link_timeout(sqe, &p->ts, 0);
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_PRE_TIMEOUT, 0));
    c->inflight += 2;
}

static int proxy_bad(struct worker *w, struct conn *c, uint32_t why)
{
    event_proxy_bad(w, c->listener, why, c->client, c->client_len);
    return -RINGD_END_PROXY_HEADER;
}

/* ------------------------------------------------------------ per-source limits */

/*
 * max_connections_per_source and connection_rate_per_source, counted in the
 * table all workers share (srclimit.c): the source is the client's address
 * (after a PROXY header), IPv6 cut to source_prefix_v6. A connection the
 * table could not track (full, or a slot lock held too long) is admitted:
 * the table counts those (untracked), a client is never refused for it.
 * The count is released when the connection is freed (pre_release).
 */
static int source_limits(struct worker *w, struct conn *c)
{
    const struct ringd_listener_cfg *lc = lcfg(w, c);
    uint8_t key[16];
    uint32_t ref = SRCLIMIT_REF_NONE;

    if (!w->cfg->srclimit || (!lc->max_per_source && !lc->rate_count))
        return PRE_CONNECT;
    if (c->client_len == 0 || srclimit_source_addr(c->client, lc->source_prefix_v6, key) < 0)
        return PRE_CONNECT;
    int r = srclimit_acquire(w->cfg->srclimit, w->cfg->srclimit_column, lc->source_key, key,
                             lc->max_per_source, lc->rate_count, lc->rate_ms, mono_ms(), &ref);
    if (r == SRCLIMIT_OVER_OPEN)
        return -RINGD_END_SOURCE_LIMIT;
    if (r == SRCLIMIT_OVER_RATE)
        return -RINGD_END_SOURCE_RATE;
    c->src_ref = ref;
    return PRE_CONNECT;
}

/* ------------------------------------------------------------ routes */

/* No route chose: the listener's own upstream, or refuse with `reason`. */
static int to_default(struct worker *w, struct conn *c, int reason)
{
    const struct ringd_listener_cfg *lc = lcfg(w, c);
    if (lc->upstream == RINGD_NO_UPSTREAM)
        return -reason;
    c->upstream = lc->upstream;
    return PRE_CONNECT;
}

/* The bytes so far: a route, the default, or wait for more. `final`: no
 * more bytes will come (EOF, deadline, buffer full). */
static int peek_decide(struct worker *w, struct conn *c, bool final, int reason)
{
    const struct ringd_listener_cfg *lc = lcfg(w, c);
    struct prelude *p = c->pre;
    struct ringd_hello_info hi;

    int r = ringd_tls_parse(p->buf, p->len, &hi);
    if (r == RINGD_TLS_NEED_MORE) {
        if (!final && p->len < PRE_BUF_MAX) {
            arm_recv(w, c);
            return PRE_WAIT;
        }
        return to_default(w, c, reason);
    }
    if (r == RINGD_TLS_FOUND) {
        int32_t rt = ringd_route_lookup(lc->routes, hi.name, hi.name_len);
        if (rt >= 0) {
            c->upstream = lc->routes->upstream[rt];
            conn_lstats(w, c)->routed++;
            if (w->cfg->route_conns)
                w->cfg->route_conns[lc->first_route + (uint32_t)rt]++;
            return PRE_CONNECT;
        }
    }
    return to_default(w, c, RINGD_END_NO_ROUTE);
}

/* ------------------------------------------------------------ the steps */

/* Steps 2 to 4, once the client's address is final. */
static int after_address(struct worker *w, struct conn *c)
{
    const struct ringd_listener_cfg *lc = lcfg(w, c);

    if (lc->deny.n && ringd_addr_in(&lc->deny, c->client, c->client_len))
        return -RINGD_END_DENIED;
    if (lc->allow.n && !ringd_addr_in(&lc->allow, c->client, c->client_len))
        return -RINGD_END_DENIED;
    int v = source_limits(w, c);
    if (v != PRE_CONNECT)
        return v;
    if (!lc->routes)
        return to_default(w, c, RINGD_END_NO_ROUTE);
    if (!pre_alloc(w, c))
        return -RINGD_END_RESOURCE;
    conn_lstats(w, c)->peeks++;
    c->pre_step = PRE_PEEK;
    if (c->pre->len)
        return peek_decide(w, c, false, RINGD_END_PEEK_TIMEOUT);
    arm_recv(w, c);
    return PRE_WAIT;
}

int pre_begin(struct worker *w, struct conn *c)
{
    const struct ringd_listener_cfg *lc = lcfg(w, c);

    if (!lc->edge)
        return PRE_CONNECT;
    if (lc->accept_proxy) {
        if (lc->trusted.n && !ringd_addr_in(&lc->trusted, c->client, c->client_len))
            return proxy_bad(w, c, PBAD_UNTRUSTED);
        if (!pre_alloc(w, c))
            return -RINGD_END_RESOURCE;
        c->pre_step = PRE_PROXY;
        arm_recv(w, c);
        return PRE_WAIT;
    }
    return after_address(w, c);
}

/* The PROXY header so far: replace the address and go on, wait, or refuse. */
static int proxy_decide(struct worker *w, struct conn *c)
{
    struct prelude *p = c->pre;
    struct ringd_proxy_info pi;

    int r = ringd_proxy_parse(p->buf, p->len, &pi);
    if (r == RINGD_PROXY_NEED_MORE) {
        arm_recv(w, c);     /* need <= RINGD_PROXY_V2_MAX < PRE_BUF_MAX: room left */
        return PRE_WAIT;
    }
    if (r == RINGD_PROXY_NOT_PROXY)
        return proxy_bad(w, c, PBAD_NOT_PROXY);
    if (r != RINGD_PROXY_OK)
        return proxy_bad(w, c, pi.error);
    if (pi.command == RINGD_PROXY_CMD_PROXY && pi.src_len > 0 && pi.src_len <= sizeof(c->client)) {
        memcpy(c->client, pi.src, pi.src_len);
        c->client_len = pi.src_len;
        if (pi.dst_len > 0 && pi.dst_len <= sizeof(p->dst)) {
            memcpy(p->dst, pi.dst, pi.dst_len);
            p->dst_len = pi.dst_len;
        }
    }
    /* exactly the header is consumed: what follows it is the client's stream */
    p->len -= pi.header_len;
    memmove(p->buf, p->buf + pi.header_len, p->len);
    return after_address(w, c);
}

int pre_on_cqe(struct worker *w, struct conn *c, struct io_uring_cqe *cqe)
{
    int res = cqe->res;

    if (ud_op(cqe->user_data) != OP_PRE_RECV || c->state != CS_ACCEPTED)
        return PRE_WAIT;        /* the linked timeout's own completion */
    bool proxy = c->pre_step == PRE_PROXY;
    if (res == -ECANCELED || res == -ETIME || res == 0) {
        /* the deadline passed (the linked timeout cancelled the recv), or EOF */
        if (proxy)
            return proxy_bad(w, c, PBAD_TIMEOUT);
        return peek_decide(w, c, true, res == 0 ? RINGD_END_NO_ROUTE : RINGD_END_PEEK_TIMEOUT);
    }
    if (res < 0) {
        c->err = -res;
        return -RINGD_END_RESET;
    }
    c->pre->len += (uint32_t)res;
    lru_touch(w, c);
    if (proxy)
        return proxy_decide(w, c);
    return peek_decide(w, c, false, RINGD_END_PEEK_TIMEOUT);
}

void pre_cancel(struct worker *w, struct conn *c)
{
    if (c->pre_step != PRE_NONE)
        sqe_cancel(w, conn_ud(w, c, OP_PRE_RECV, 0));   /* its linked timeout goes with it */
}

/* The first bytes are sent (or the connection is freed): the buffer goes.
 * At free, the per-source count goes too. */
void pre_release(struct worker *w, struct conn *c)
{
    free(c->pre);
    c->pre = NULL;
}

void pre_free(struct worker *w, struct conn *c)
{
    pre_release(w, c);
    if (c->src_ref != SRCLIMIT_REF_NONE && w->cfg->srclimit)
        srclimit_release(w->cfg->srclimit, w->cfg->srclimit_column, c->src_ref);
    c->src_ref = SRCLIMIT_REF_NONE;
}
