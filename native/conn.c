/*
 * conn.c: the life of a connection, from accept to free.
 *
 *   accept -> ACCEPTED -> CONNECTING -(proxy_protocol, first bytes)-> HEADER -> FORWARDING -> CLOSING -> free
 *                |            |  refused / timed out: next server (connect_retries)
 *                |            '- no server left: close the client at once
 *                '- the steps before connecting (preconnect.c): a refusal
 *                   closes the client at once
 *
 * On a reload a FORWARDING connection may leave instead: MOVING (its ops
 * cancelled) -> HANDED (sent to the new worker) -> gone, or back to
 * FORWARDING if the new worker refuses it; the new worker takes it in as
 * ADOPTED -> FORWARDING (handover.c).
 *
 * FORWARDING is forward.c: two independent directions (client->server,
 * server->client), each copying or splicing. The connection ends when both
 * directions have forwarded their FIN, on a reset, or when it idles past
 * idle_timeout (idle.c).
 *
 * Closing never closes an fd that an in-flight op still uses: shutdown() wakes
 * every pending poll/recv/splice on the sockets, and the fds are closed when
 * the last expected completion has arrived (c->inflight == 0).
 */
#include "ringd.h"

#include <errno.h>
#include <netinet/tcp.h>
#include <string.h>
#include <unistd.h>

static void conn_connect(struct worker *w, struct conn *c);
static void conn_forward(struct worker *w, struct conn *c);
static void conn_preconnect(struct worker *w, struct conn *c);
static void pre_verdict(struct worker *w, struct conn *c, int verdict);
static void send_first(struct worker *w, struct conn *c);
static void conn_maybe_free(struct worker *w, struct conn *c);

/* An integer socket option the config sets; 0 = not set, the kernel's own.
 * Fixed rcvbuf/sndbuf turn the kernel's autotuning off for that buffer; the
 * kernel doubles them and caps them at net.core.[rw]mem_max (the master
 * warns about the cap when it loads the config). */
static void set_opt(int fd, int level, int name, uint32_t value)
{
    if (value) {
        int v = (int)value;
        setsockopt(fd, level, name, &v, sizeof(v));
    }
}

/* ------------------------------------------------------------ start */

/* A free slot of the table, reset for a connection of listener li (sockets
 * and pipes none, no server yet); NULL if the table is full. */
struct conn *conn_alloc(struct worker *w, uint32_t li)
{
    const struct ringd_listener_cfg *lc = &w->cfg->listeners[li];
    struct conn *c;
    if (w->free_head != UINT32_MAX) {
        c = &w->conns[w->free_head];
        w->free_head = c->next_free;
    } else if (w->high_water < w->nconns) {
        /* slots are handed out in order and only then recycled, so the table
         * only touches as many pages as the peak number of connections */
        c = &w->conns[w->high_water++];
        w->cfg->shm->conn_slots = w->high_water;
        note_growth(w);
    } else {
        return NULL;
    }

    uint32_t gen = (c->gen + 1) & 0x7fffff;
    memset(c, 0, sizeof(*c));
    c->gen = gen;
    c->state = CS_ACCEPTED;
    c->listener = (uint16_t)li;
    c->cfd = -1;
    c->sfd = -1;
    c->server = -1;
    c->upstream = lc->upstream;
    c->src_ref = SRCLIMIT_REF_NONE;
    for (unsigned i = 0; i < 2; i++) {
        c->d[i].pipe.rfd = c->d[i].pipe.wfd = -1;
        c->d[i].mode = w->cfg->splice_threshold == 0 ? DM_SPLICE : DM_COPY;
    }
    return c;
}

/* The slot goes back on the free list (its fds and counts are settled). */
void conn_release_slot(struct worker *w, struct conn *c)
{
    c->state = CS_FREE;
    c->next_free = w->free_head;
    w->free_head = conn_slot(w, c);
}

void conn_start(struct worker *w, uint32_t li, int cfd)
{
    const struct ringd_listener_cfg *lc = &w->cfg->listeners[li];
    struct ringd_listener_stats *st = &w->cfg->lstats[li];

    struct conn *c = conn_alloc(w, li);
    if (!c) {
        /* more completions than max_connections + slack: cannot track it */
        st->accepted++;
        st->closed[RINGD_END_RESOURCE]++;
        close(cfd);
        return;
    }
    c->cfd = cfd;
    c->start_ns = real_ns();
    c->start_mono_us = mono_us();
    set_opt(cfd, SOL_SOCKET, SO_RCVBUF, lc->rcvbuf);
    set_opt(cfd, SOL_SOCKET, SO_SNDBUF, lc->sndbuf);

    /* the client's address, where something reads it; a listener with an
     * edge policy always does (a route may pick any upstream) */
    const struct ringd_upstream_cfg *up =
        lc->upstream == RINGD_NO_UPSTREAM ? NULL : &w->cfg->upstreams[lc->upstream];
    if (lc->access_log || lc->edge || up->proxy_protocol || up->balance == RINGD_BAL_HASH) {
        socklen_t len = sizeof(c->client);
        if (getpeername(cfd, (struct sockaddr *)c->client, &len) == 0)
            c->client_len = len;
    }

    w->active++;
    w->ls[li].active++;
    w->cfg->shm->conns_active = w->active;
    st->accepted++;
    st->active++;
    lru_touch(w, c);
    conn_preconnect(w, c);
}

/* ------------------------------------------------------------ before connecting */

/*
 * CS_ACCEPTED: the connection is counted and on the idle list; no server is
 * involved yet. The steps that decide about a connection from the client
 * alone (its address, the first bytes it sends) run here, in order. Each
 * one ends the connection (conn_close), or keeps it in CS_ACCEPTED while
 * ops of its own are in flight (conn_on_cqe hands their completions back
 * to it; conn_close must cancel them), or passes it to the next step. The
 * last step calls conn_connect. The steps are preconnect.c's: they answer
 * with a verdict, acted on here.
 */
static void conn_preconnect(struct worker *w, struct conn *c)
{
    pre_verdict(w, c, pre_begin(w, c));
}

static void pre_verdict(struct worker *w, struct conn *c, int verdict)
{
    if (verdict == PRE_CONNECT)
        conn_connect(w, c);
    else if (verdict < 0)
        conn_close(w, c, -verdict, c->err);
    /* PRE_WAIT: its ops are in flight */
}

/* ------------------------------------------------------------ connect */

/* (Un)count this connection in its server's active connections, once. */
void conn_count_server(struct worker *w, struct conn *c, bool on)
{
    if (c->server < 0 || (bool)c->srv_counted == on)
        return;
    int64_t d = on ? 1 : -1;
    __atomic_fetch_add(&w->cfg->srv[c->server].active, d, __ATOMIC_RELAXED);
    w->cfg->wsrv[c->server].active += d;
    c->srv_counted = on;
}

static void conn_connect(struct worker *w, struct conn *c)
{
    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[c->upstream];
    struct ringd_listener_stats *st = conn_lstats(w, c);

    int idx = -1;
    c->state = CS_CONNECTING;
    balance_begin(w);
    while (c->tries < RINGD_MAX_TRIES) {
        idx = balance_pick(w, c);
        if (idx < 0)
            break;
        /* Reserve a place under the server's max_connections atomically:
         * several workers may have picked it at once. Lost the race: it is
         * full after all, pick again (not a retry, nothing was tried). */
        uint32_t mx = w->cfg->servers[idx].max_conns;
        int64_t n = __atomic_add_fetch(&w->cfg->srv[idx].active, 1, __ATOMIC_RELAXED);
        if (!mx || n <= (int64_t)mx) {
            /* a connect in flight counts as active for the server, so that
             * least_conn and max_connections see it before it completes */
            w->cfg->wsrv[idx].active++;
            c->server = idx;
            c->srv_counted = 1;
            break;
        }
        __atomic_sub_fetch(&w->cfg->srv[idx].active, 1, __ATOMIC_RELAXED);
        balance_mark_full(w, (uint32_t)idx);
        idx = -1;
    }
    if (idx < 0) {
        st->no_server++;
        event_no_server(w, c->err, c->listener, c->upstream);
        conn_close(w, c, RINGD_END_CONNECT, c->err ? c->err : EHOSTUNREACH);
        return;
    }
    if (c->tries > 0)
        st->retries++;
    c->tried[c->tries++] = (uint32_t)idx;

    const struct ringd_server_cfg *sv = &w->cfg->servers[idx];
    int family = ((const struct sockaddr *)sv->addr)->sa_family;
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int err = errno;
        conn_close(w, c, RINGD_END_RESOURCE, err);
        if (err == EMFILE || err == ENFILE)
            listener_pause(w, c->listener, err);
        return;
    }
    int one = 1;
    const struct linger abort_on_death = { 1, 0 };     /* see end_is_natural */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &abort_on_death, sizeof(abort_on_death));
    set_opt(fd, SOL_SOCKET, SO_RCVBUF, up->rcvbuf);
    set_opt(fd, SOL_SOCKET, SO_SNDBUF, up->sndbuf);
    set_opt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, w->cfg->notsent_lowat);
    c->sfd = fd;

    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_connect(sqe, fd, (const struct sockaddr *)sv->addr, sv->addrlen);
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_CONNECT, 0));
    sqe->flags |= IOSQE_IO_LINK;
    sqe = get_sqe(w);
    io_uring_prep_link_timeout(sqe, &w->ls[c->listener].connect_ts, 0);
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_CONNECT_TIMEOUT, 0));
    c->inflight += 2;
}

/* Connected (and the PROXY header sent): forwarding starts. A connection
 * that gets there while the worker drains moves to the new generation like
 * the others did when the drain began (handover.c; it does nothing unless
 * there is a new worker to move to). */
static void conn_forward(struct worker *w, struct conn *c)
{
    forward_start(w, c);
    if (w->draining && c->state == CS_FORWARDING)
        handover_offer(w, c);
}

/* The PROXY protocol header for the server (proxy_send.c), from the client's
 * address and the address it connected to (both from the PROXY header the
 * client's balancer sent, if it did: an IPv6 client that came through an
 * IPv4 listener keeps its own family on both sides); one we could not read
 * goes as UNKNOWN (v1) or LOCAL (v2). */
static void proxy_header(struct conn *c, unsigned version)
{
    struct sockaddr_storage local;
    socklen_t llen = sizeof(local);
    const struct sockaddr *src = c->client_len > 0 ? (const struct sockaddr *)c->client : NULL;
    const struct sockaddr *dst = NULL;

    if (src && c->pre && c->pre->dst_len > 0)
        dst = (const struct sockaddr *)c->pre->dst;
    else if (src && getsockname(c->cfd, (struct sockaddr *)&local, &llen) == 0)
        dst = (const struct sockaddr *)&local;
    c->hdr_len = proxy_send_build(version, src, dst, c->hdr);
    c->hdr_off = 0;
}

static void on_connect(struct worker *w, struct conn *c, int res)
{
    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[c->upstream];
    struct ringd_listener_stats *st = conn_lstats(w, c);

    if (c->state == CS_CLOSING)
        return;
    if (res == 0) {
        struct ringd_server_shm *s = &w->cfg->srv[c->server];
        /* an earlier try's errno does not describe this connection: the
         * access record would name it as the end's cause, and a handover
         * takes any errno as "it failed while quiesced" and resets it */
        c->err = 0;
        __atomic_fetch_add(&s->connections, 1, __ATOMIC_RELAXED);
        w->cfg->wsrv[c->server].connections++;
        if (s->passive_down || s->fail_window_count) {
            s->fail_window_count = 0;
            if (s->passive_down) {
                s->passive_down = 0;
                __atomic_fetch_add(&w->cfg->hdr->state_epoch, 1, __ATOMIC_RELAXED);
            }
        }
        if (up->proxy_protocol) {
            proxy_header(c, up->proxy_protocol);
            c->state = CS_HEADER;
            struct io_uring_sqe *sqe = get_sqe(w);
            io_uring_prep_send(sqe, c->sfd, c->hdr, c->hdr_len, MSG_NOSIGNAL);
            io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_HDR_SEND, 0));
            c->inflight++;
        } else {
            send_first(w, c);
        }
        return;
    }

    /* -ECANCELED: the linked timeout fired first */
    int err = res == -ECANCELED ? ETIMEDOUT : -res;
    st->connect_errors++;
    if (err == ETIMEDOUT)
        st->connect_timeouts++;
    c->err = err;
    conn_count_server(w, c, false);
    server_connect_failed(w, c->server, err);
    close(c->sfd);
    c->sfd = -1;
    if (c->tries <= up->connect_retries)
        conn_connect(w, c);
    else
        conn_close(w, c, RINGD_END_CONNECT, err);
}

static void on_hdr_send(struct worker *w, struct conn *c, int res)
{
    if (c->state == CS_CLOSING)
        return;
    if (res < 0) {
        conn_close(w, c, RINGD_END_RESET, -res);
        return;
    }
    c->hdr_off += (uint16_t)res;
    if (c->hdr_off < c->hdr_len) {
        struct io_uring_sqe *sqe = get_sqe(w);
        io_uring_prep_send(sqe, c->sfd, c->hdr + c->hdr_off, c->hdr_len - c->hdr_off,
                           MSG_NOSIGNAL);
        io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_HDR_SEND, 0));
        c->inflight++;
        return;
    }
    send_first(w, c);
}

/* The bytes the steps before connecting read from the client go to the
 * server first (after the PROXY header we send, if any); then forwarding. */
static void send_first(struct worker *w, struct conn *c)
{
    struct prelude *p = c->pre;

    if (!p || p->off >= p->len) {
        pre_release(w, c);
        conn_forward(w, c);
        return;
    }
    c->state = CS_HEADER;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_send(sqe, c->sfd, p->buf + p->off, p->len - p->off, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_PRE_SEND, 0));
    c->inflight++;
}

static void on_pre_send(struct worker *w, struct conn *c, int res)
{
    if (c->state == CS_CLOSING)
        return;
    if (res < 0) {
        conn_close(w, c, RINGD_END_RESET, -res);
        return;
    }
    struct ringd_listener_stats *st = conn_lstats(w, c);
    c->pre->off += (uint32_t)res;
    c->d[0].bytes += (uint64_t)res;
    st->bytes_c2s += (uint64_t)res;
    st->copied_bytes += (uint64_t)res;
    __atomic_fetch_add(&w->cfg->srv[c->server].bytes_to, (uint64_t)res, __ATOMIC_RELAXED);
    send_first(w, c);
}

/* ------------------------------------------------------------ dispatch */

void conn_on_cqe(struct worker *w, struct io_uring_cqe *cqe)
{
    uint64_t u = cqe->user_data;
    uint32_t slot = ud_slot(u);
    enum op op = ud_op(u);

    if (slot >= w->nconns)
        return;
    struct conn *c = &w->conns[slot];
    if (c->state == CS_FREE || c->gen != ud_gen(u))
        return;               /* late completion for a reused slot */

    c->inflight--;

    switch (op) {
    case OP_CONNECT:
        on_connect(w, c, cqe->res);
        break;
    case OP_CONNECT_TIMEOUT:
        break;
    case OP_HDR_SEND:
        on_hdr_send(w, c, cqe->res);
        break;
    case OP_PRE_RECV:
    case OP_PRE_TIMEOUT:
        if (c->state == CS_ACCEPTED)
            pre_verdict(w, c, pre_on_cqe(w, c, cqe));
        break;
    case OP_PRE_SEND:
        on_pre_send(w, c, cqe->res);
        break;
    case OP_POLL_IN:
    case OP_POLL_OUT:
    case OP_RECV:
    case OP_SEND:
        forward_on_cqe(w, c, cqe);
        break;
    default:
        break;
    }
    if (c->state == CS_CLOSING)
        conn_maybe_free(w, c);
    else if (c->state == CS_MOVING && c->inflight == 0)
        handover_quiesced(w, c);
}

/* ------------------------------------------------------------ close */

/*
 * How a connection ends, by reason. Only two ends are natural:
 *   RINGD_END_DONE     both directions ended with the peers' own FINs, each
 *                      forwarded: the sockets close normally (FIN).
 *   RINGD_END_CONNECT  no server could be reached: the client is closed
 *                      before any byte reached a server, with a FIN as
 *                      HAProxy and nginx do (the kernel sends a reset
 *                      instead if the client's data is still unread).
 * Every other end may cut a transfer in the middle: RINGD_END_RESET (a peer
 * reset or an I/O error), RINGD_END_TIMEOUT (idle_timeout), RINGD_END_DRAIN
 * (the drain deadline, a drain cut short, stop, stop --now, the master gone),
 * RINGD_END_RESOURCE (out of fds, memory or pipes). Those abort both
 * sockets (SO_LINGER 0: a reset), so that both peers see an error; a FIN
 * would look like the end of the data to any protocol that ends at EOF.
 *
 * A worker that dies (SIGKILL, the watchdog, a crash) closes nothing
 * itself: the kernel closes its sockets, with a FIN unless they carry
 * SO_LINGER 0. So every socket carries it from the start (the listening
 * sockets have it and accepted sockets inherit it; conn_connect sets it on
 * the socket to the server; an adopted connection gets it in handover.c),
 * and only the natural end clears it, just before its FINs.
 */
static bool end_is_natural(int reason)
{
    return reason == RINGD_END_DONE || reason == RINGD_END_CONNECT;
}

void conn_close(struct worker *w, struct conn *c, int reason, int err)
{
    if (c->state == CS_CLOSING || c->state == CS_FREE)
        return;
    if (c->state == CS_HANDED || c->state == CS_ADOPTED) {
        /* (stop, drain deadline) whose it is, is being settled with the
         * other worker: let go of our copies without touching the sockets */
        handover_dropped(w, c, true);
        return;
    }
    if (c->state == CS_MOVING)
        handover_dropped(w, c, false);    /* still ours: closed like any other */
    bool natural = end_is_natural(reason);
    enum conn_state was = (enum conn_state)c->state;

    c->state = CS_CLOSING;
    c->end_reason = (uint8_t)reason;
    if (err && !c->err)
        c->err = err;
    lru_unlink(c);

    /* natural: the reset a dead worker's sockets would send is off now;
     * else: set again for a socket from an image that did not set it */
    struct linger lg = { natural ? 0 : 1, 0 };
    setsockopt(c->cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    if (c->sfd >= 0)
        setsockopt(c->sfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    if (c->inflight == 0) {
        conn_maybe_free(w, c);
        return;
    }
    /* Operations still pending hold the sockets: they must complete before
     * the fds close. shutdown() wakes them all, but SHUT_WR sends a FIN, and
     * a FIN followed by a reset is still read as a clean end by a peer that
     * stops at EOF. So an abort cancels the pending operations instead (the
     * reset goes out when the fds close), and only a natural end shuts down. */
    if (natural) {
        shutdown(c->cfd, SHUT_RDWR);
        if (c->sfd >= 0)
            shutdown(c->sfd, SHUT_RDWR);
        conn_maybe_free(w, c);
        return;
    }
    switch (was) {
    case CS_ACCEPTED:
        pre_cancel(w, c);
        break;
    case CS_CONNECTING:
        sqe_cancel(w, conn_ud(w, c, OP_CONNECT, 0));    /* its linked timeout goes with it */
        break;
    case CS_HEADER:
        sqe_cancel(w, conn_ud(w, c, c->hdr_off < c->hdr_len ? OP_HDR_SEND : OP_PRE_SEND, 0));
        break;
    case CS_FORWARDING:
        forward_cancel(w, c);
        break;
    default:
        break;
    }
    conn_maybe_free(w, c);
}

static void access_log(struct worker *w, struct conn *c)
{
    const struct ringd_worker_cfg *cfg = w->cfg;
    struct ringd_log_ring *r = cfg->log_ring;

    if (!r || !cfg->log_ring_records || !cfg->listeners[c->listener].access_log)
        return;
    uint64_t head = r->head;
    uint64_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    if (head - tail >= cfg->log_ring_records) {
        r->dropped++;
        return;
    }
    struct ringd_log_record *rec = &cfg->log_records[head & (cfg->log_ring_records - 1)];
    rec->start_ns = c->start_ns;
    rec->duration_us = mono_us() - c->start_mono_us;
    rec->bytes_c2s = c->d[0].bytes;
    rec->bytes_s2c = c->d[1].bytes;
    memcpy(rec->client, c->client, sizeof(rec->client));
    rec->client_len = c->client_len;
    rec->server = c->server;
    rec->listener = c->listener;
    rec->end_reason = c->end_reason;
    rec->err = c->err;
    __atomic_store_n(&r->head, head + 1, __ATOMIC_RELEASE);
}

/* Closes go through the ring (batched with the next submission) and, where
 * the kernel can skip it, post no completion unless they fail. There is no
 * IORING_OP_SHUTDOWN linked in front: the kernel always runs that op on an
 * io-wq thread (REQ_F_FORCE_ASYNC; a worker thread appears on the first
 * one), so the FIN of a direction is a plain shutdown(2) at the moment it
 * is due (dir_shut), which costs one syscall and no completion, and the
 * last FIN rides on the close itself. */
static void sqe_close(struct worker *w, int fd)
{
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_close(sqe, fd);
    io_uring_sqe_set_data64(sqe, ud_make(OP_NOP, 0, 0, 0));
    sqe_quiet(w, sqe);
}

static void conn_maybe_free(struct worker *w, struct conn *c)
{
    if (c->state != CS_CLOSING || c->inflight > 0)
        return;

    struct ringd_listener_stats *st = conn_lstats(w, c);
    forward_release(w, c);
    pre_free(w, c);
    /* closed through the ring: batched with the next submission, no
     * syscall of its own */
    sqe_close(w, c->cfd);
    if (c->sfd >= 0)
        sqe_close(w, c->sfd);
    conn_count_server(w, c, false);
    st->closed[c->end_reason]++;
    st->active--;
    w->active--;
    w->ls[c->listener].active--;
    w->cfg->shm->conns_active = w->active;
    if (w->active == 0)
        w->trim_due = true;     /* everything pooled is surplus now */
    access_log(w, c);

    conn_release_slot(w, c);
    listener_maybe_resume(w, c->listener);
}

void conn_close_all(struct worker *w, int reason)
{
    for (uint32_t s = 0; s < w->nconns; s++) {
        struct conn *c = &w->conns[s];
        if (c->state != CS_FREE && c->state != CS_CLOSING) {
            conn_close(w, c, reason, 0);
            w->closed_at_deadline++;
        }
    }
}
