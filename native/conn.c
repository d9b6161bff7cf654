/*
 * conn.c: the connection state machine.
 *
 *   accept -> CONNECTING -(proxy_protocol)-> HEADER -> FORWARDING -> CLOSING -> free
 *                 |  refused / timed out: next server (connect_retries)
 *                 '- no server left: close the client at once
 *
 * FORWARDING runs two independent directions (client->server, server->client).
 * A direction moves bytes in one of two modes:
 *
 *   DM_SPLICE  src socket -> pipe -> dst socket, never through user space.
 *              IORING_OP_SPLICE cannot poll (every one is punted to an io-wq
 *              thread), so the ring reports readiness (POLL_ADD) and this
 *              thread moves the bytes with non-blocking splice() calls.
 *   DM_COPY    recv into a buffer, send it on. Cheaper for small messages
 *              (two ops instead of three). A direction starts in copy mode and
 *              switches to splice once it has moved splice_threshold bytes in
 *              consecutive reads that each filled the whole buffer (a stream,
 *              not a series of messages); a spliced direction whose reads
 *              keep coming back small switches back to copy mode.
 *
 * EOF on a direction's source forwards a FIN (shutdown SHUT_WR) once the
 * bytes in flight are written; the connection ends when both directions have
 * done so, on a reset, or when it idles past idle_timeout.
 *
 * Closing never closes an fd that an in-flight op still uses: shutdown() wakes
 * every pending poll/recv/splice on the sockets, and the fds are closed when
 * the last expected completion has arrived (c->inflight == 0).
 */
#include "ringd.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

/* a splice that moves less than this is a message, not bulk */
#define SPLICE_BULK_READ 16384u
/* this many small splice-ins in a row send a direction back to copy mode */
#define SPLICE_BACK_AFTER 4

static void dir_read(struct worker *w, struct conn *c, unsigned i);
static void dir_write(struct worker *w, struct conn *c, unsigned i);
static void conn_connect(struct worker *w, struct conn *c);
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

static inline uint32_t conn_slot(struct worker *w, struct conn *c)
{
    return (uint32_t)(c - w->conns);
}

static inline uint64_t ud(struct worker *w, struct conn *c, enum op op, unsigned dir)
{
    return ud_make(op, dir, conn_slot(w, c), c->gen);
}

static inline struct ringd_listener_stats *lstats_of(struct worker *w, struct conn *c)
{
    return &w->cfg->lstats[c->listener];
}

/* ------------------------------------------------------------ start */

void conn_start(struct worker *w, uint32_t li, int cfd)
{
    const struct ringd_listener_cfg *lc = &w->cfg->listeners[li];
    struct ringd_listener_stats *st = &w->cfg->lstats[li];

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
        /* more completions than max_connections + slack: cannot track it */
        st->accepted++;
        st->closed[RINGD_END_RESOURCE]++;
        close(cfd);
        return;
    }

    uint32_t gen = (c->gen + 1) & 0x7fffff;
    memset(c, 0, sizeof(*c));
    c->gen = gen;
    c->state = CS_CONNECTING;
    c->listener = (uint16_t)li;
    c->cfd = cfd;
    c->sfd = -1;
    c->server = -1;
    for (unsigned i = 0; i < 2; i++) {
        c->d[i].pipe.rfd = c->d[i].pipe.wfd = -1;
        c->d[i].mode = w->cfg->splice_threshold == 0 ? DM_SPLICE : DM_COPY;
    }
    c->start_ns = real_ns();
    c->start_mono_us = mono_us();
    set_opt(cfd, SOL_SOCKET, SO_RCVBUF, lc->rcvbuf);
    set_opt(cfd, SOL_SOCKET, SO_SNDBUF, lc->sndbuf);

    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[lc->upstream];
    if (lc->access_log || up->proxy_protocol || up->balance == RINGD_BAL_HASH) {
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
    conn_connect(w, c);
}

/* ------------------------------------------------------------ connect */

/* (Un)count this connection in its server's active connections, once. */
static void srv_count(struct worker *w, struct conn *c, bool on)
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
    const struct ringd_listener_cfg *lc = &w->cfg->listeners[c->listener];
    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[lc->upstream];
    struct ringd_listener_stats *st = lstats_of(w, c);

    int idx = -1;
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
        event_no_server(w, c->err, c->listener, lc->upstream);
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
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    set_opt(fd, SOL_SOCKET, SO_RCVBUF, up->rcvbuf);
    set_opt(fd, SOL_SOCKET, SO_SNDBUF, up->sndbuf);
    set_opt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, w->cfg->notsent_lowat);
    c->sfd = fd;

    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_connect(sqe, fd, (const struct sockaddr *)sv->addr, sv->addrlen);
    io_uring_sqe_set_data64(sqe, ud(w, c, OP_CONNECT, 0));
    sqe->flags |= IOSQE_IO_LINK;
    sqe = get_sqe(w);
    io_uring_prep_link_timeout(sqe, &w->ls[c->listener].connect_ts, 0);
    io_uring_sqe_set_data64(sqe, ud(w, c, OP_CONNECT_TIMEOUT, 0));
    c->inflight += 2;
}

static void start_forwarding(struct worker *w, struct conn *c);

/* The PROXY protocol header for the server (proxy_send.c), from the client's
 * address and the address it connected to; one we could not read goes as
 * UNKNOWN (v1) or LOCAL (v2). */
static void proxy_header(struct conn *c, unsigned version)
{
    struct sockaddr_storage local;
    socklen_t llen = sizeof(local);
    const struct sockaddr *src = c->client_len > 0 ? (const struct sockaddr *)c->client : NULL;
    const struct sockaddr *dst = NULL;

    if (src && getsockname(c->cfd, (struct sockaddr *)&local, &llen) == 0)
        dst = (const struct sockaddr *)&local;
    c->hdr_len = proxy_send_build(version, src, dst, c->hdr);
    c->hdr_off = 0;
}

static void on_connect(struct worker *w, struct conn *c, int res)
{
    const struct ringd_listener_cfg *lc = &w->cfg->listeners[c->listener];
    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[lc->upstream];
    struct ringd_listener_stats *st = lstats_of(w, c);

    if (c->state == CS_CLOSING)
        return;
    if (res == 0) {
        struct ringd_server_shm *s = &w->cfg->srv[c->server];
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
            io_uring_sqe_set_data64(sqe, ud(w, c, OP_HDR_SEND, 0));
            c->inflight++;
        } else {
            start_forwarding(w, c);
        }
        return;
    }

    /* -ECANCELED: the linked timeout fired first */
    int err = res == -ECANCELED ? ETIMEDOUT : -res;
    st->connect_errors++;
    if (err == ETIMEDOUT)
        st->connect_timeouts++;
    c->err = err;
    srv_count(w, c, false);
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
        io_uring_sqe_set_data64(sqe, ud(w, c, OP_HDR_SEND, 0));
        c->inflight++;
        return;
    }
    start_forwarding(w, c);
}

static void start_forwarding(struct worker *w, struct conn *c)
{
    c->state = CS_FORWARDING;
    c->d[0].src = c->cfd;
    c->d[0].dst = c->sfd;
    c->d[1].src = c->sfd;
    c->d[1].dst = c->cfd;
    c->d[1].flags |= DF_POLL_FIRST;
    lru_touch(w, c);
    dir_read(w, c, 0);
    dir_read(w, c, 1);
}

/* ------------------------------------------------------------ directions */

static void count_bytes(struct worker *w, struct conn *c, unsigned i, uint32_t n, bool spliced)
{
    struct ringd_listener_stats *st = lstats_of(w, c);
    struct ringd_server_shm *s = &w->cfg->srv[c->server];

    if (i == 0) {
        st->bytes_c2s += n;
        __atomic_fetch_add(&s->bytes_to, n, __ATOMIC_RELAXED);
    } else {
        st->bytes_s2c += n;
        __atomic_fetch_add(&s->bytes_from, n, __ATOMIC_RELAXED);
    }
    if (spliced)
        st->splice_bytes += n;
    else
        st->copied_bytes += n;
}

/* Give a direction's copy buffer back (to the buffer ring's stack or the pool). */
static void dir_buf_release(struct worker *w, struct dir *d)
{
    if (!d->buf)
        return;
    if (w->br)
        bufring_release(w, d->bid);
    else
        buf_put(w, d->buf);
    d->buf = NULL;
}

/* FIN forwarded: the direction is finished. */
static void dir_shut(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];

    if (d->flags & DF_SHUT)
        return;
    d->flags |= DF_SHUT;
    bool last = (c->d[1 - i].flags & DF_SHUT) != 0;
    /* The last FIN goes out with the close that follows at once: both
     * sockets were read to their EOF, so close() sends a FIN, not a reset
     * (and with operations still in flight conn_close shuts both down). */
    if (!last)
        shutdown(d->dst, SHUT_WR);
    pipe_put(w, &d->pipe, d->in_pipe > 0);
    dir_buf_release(w, d);
    if (last)
        conn_close(w, c, RINGD_END_DONE, 0);
}

static void sqe_poll(struct worker *w, struct conn *c, unsigned i, int fd, unsigned mask,
                     enum op op)
{
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_poll_add(sqe, fd, mask);
    io_uring_sqe_set_data64(sqe, ud(w, c, op, i));
    c->inflight++;
}

static void splice_pump(struct worker *w, struct conn *c, unsigned i);

/* Has the peer of direction i's destination half-closed? Then io_uring
 * cannot wait for that socket to take more (writable.c). The other
 * direction's source is this one's destination; a poll that came back
 * with RDHUP and no POLLOUT tells it before that direction reads the EOF. */
static bool dst_half_closed(struct conn *c, unsigned i)
{
    return (c->d[i].flags & DF_NO_POLLOUT) || (c->d[1 - i].flags & DF_EOF);
}

static void dir_read(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];

    if (c->state != CS_FORWARDING || (d->flags & (DF_IN_BUSY | DF_EOF | DF_SHUT)))
        return;

    if (d->mode == DM_COPY) {
        if (d->buf_len > d->buf_off)
            return;           /* still writing the last chunk */
        if (w->br) {
            struct io_uring_sqe *sqe = get_sqe(w);
            io_uring_prep_recv(sqe, d->src, NULL, w->br_size, 0);
            /* the last read did not fill the buffer, so the socket is
             * probably empty: arm the poll instead of trying first */
            if (d->flags & DF_POLL_FIRST)
                sqe->ioprio |= IORING_RECVSEND_POLL_FIRST;
            sqe->flags |= IOSQE_BUFFER_SELECT;
            sqe->buf_group = RINGD_BGID;
            io_uring_sqe_set_data64(sqe, ud(w, c, OP_RECV, i));
            d->flags |= DF_IN_BUSY;
            c->inflight++;
            return;
        }
        if (!d->buf) {
            /* idle: wait for data without holding a buffer */
            sqe_poll(w, c, i, d->src, POLLIN, OP_POLL_IN);
            d->flags |= DF_IN_BUSY | DF_BARE_POLL;
            return;
        }
        struct io_uring_sqe *sqe = get_sqe(w);
        io_uring_prep_recv(sqe, d->src, d->buf, w->cfg->copy_buffer_size, 0);
        io_uring_sqe_set_data64(sqe, ud(w, c, OP_RECV, i));
        d->flags |= DF_IN_BUSY;
        c->inflight++;
        return;
    }

    /* splice mode: wait until the source is readable (the poll needs no
     * pipe: splice_pump takes one when there is something to move) */
    sqe_poll(w, c, i, d->src, POLLIN, OP_POLL_IN);
    d->flags |= DF_IN_BUSY;
}

/* copy mode: send what the last recv got */
static void dir_write(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];

    if (d->flags & (DF_OUT_BUSY | DF_SHUT) || d->buf_len <= d->buf_off)
        return;
    /* to a half-closed peer: -EAGAIN rather than a blocked io-wq thread */
    int flags = MSG_NOSIGNAL | (dst_half_closed(c, i) ? MSG_DONTWAIT : 0);
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_send(sqe, d->dst, d->buf + d->buf_off, d->buf_len - d->buf_off, flags);
    io_uring_sqe_set_data64(sqe, ud(w, c, OP_SEND, i));
    d->flags |= DF_OUT_BUSY;
    c->inflight++;
}

/* The source has hit EOF: forward it once everything read was written. */
static void dir_check_eof(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];

    if (!(d->flags & DF_EOF) || (d->flags & (DF_OUT_BUSY | DF_SHUT)))
        return;
    if (d->mode == DM_SPLICE ? d->in_pipe == 0 : d->buf_len <= d->buf_off)
        dir_shut(w, c, i);
}

/* Copy mode: after a chunk was fully sent, maybe switch the direction to
 * splice, else read the next chunk. */
static void dir_copy_done(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];

    d->buf_len = d->buf_off = 0;
    if (d->flags & DF_EOF) {
        dir_shut(w, c, i);
        return;
    }
    if (d->streak >= w->cfg->splice_threshold) {
        d->mode = DM_SPLICE;
        d->small_reads = 0;
        dir_buf_release(w, d);
        splice_pump(w, c, i);     /* more is probably waiting already */
        return;
    }
    if (w->br || !(d->flags & DF_FULL_READ)) {
        /* with a buffer ring the kernel picks a buffer when data arrives;
         * without one, a message (not a stream) waits holding no buffer */
        dir_buf_release(w, d);
    }
    dir_read(w, c, i);
}

/* The destination is full: wait until it takes more. */
static void wait_dst(struct worker *w, struct conn *c, unsigned i)
{
    if (dst_half_closed(c, i)) {
        int err = writable_wait(w, c, i, ud(w, c, OP_POLL_OUT, i));
        if (err < 0)
            conn_close(w, c, RINGD_END_RESOURCE, -err);
        return;
    }
    sqe_poll(w, c, i, c->d[i].dst, POLLOUT, OP_POLL_OUT);
    c->d[i].flags |= DF_OUT_BUSY;
}

/* writable.c: the destination a direction waited for takes more. */
void conn_writable(struct worker *w, uint64_t token)
{
    uint32_t slot = ud_slot(token);
    if (slot >= w->nconns)
        return;
    struct conn *c = &w->conns[slot];
    unsigned i = ud_dir(token);
    if (c->state != CS_FORWARDING || c->gen != ud_gen(token) || !(c->d[i].flags & DF_OUT_EPOLL))
        return;
    c->d[i].flags &= ~(DF_OUT_EPOLL | DF_OUT_BUSY);
    if (c->d[i].mode == DM_SPLICE)
        splice_pump(w, c, i);
    else
        dir_write(w, c, i);
}

/*
 * Splice mode. io_uring's own IORING_OP_SPLICE cannot poll: every one is
 * punted to an io-wq thread, two thread hand-offs per chunk. So the ring only
 * reports readiness (POLL_ADD), and the bytes are moved by plain non-blocking
 * splice() calls from this thread: source -> pipe -> destination, as long as
 * both sides take them (bounded, so one busy stream cannot starve the others),
 * then a poll is armed for whichever side blocked.
 */
#define PUMP_ROUNDS 8

static void splice_pump(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];
    bool src_dry = false, dst_full = false, moved_any = false;

    if (c->state != CS_FORWARDING || (d->flags & DF_SHUT))
        return;
    if (d->pipe.rfd < 0) {
        int err = pipe_get(w, &d->pipe);
        if (err < 0) {
            if (w->br) {
                /* no pipe to be had (fds, memory): copy instead of failing */
                d->mode = DM_COPY;
                d->streak = 0;
                dir_read(w, c, i);
                return;
            }
            conn_close(w, c, RINGD_END_RESOURCE, -err);
            return;
        }
        d->in_pipe = 0;
    }

    for (int round = 0; round < PUMP_ROUNDS; round++) {
        bool moved = false;
        if (!(d->flags & (DF_EOF | DF_IN_BUSY)) && !src_dry && d->in_pipe < d->pipe.cap) {
            ssize_t n = splice(d->src, NULL, d->pipe.wfd, NULL, d->pipe.cap - d->in_pipe,
                               SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
            if (n > 0) {
                d->in_pipe += (uint32_t)n;
                d->bytes += (uint64_t)n;
                if ((uint32_t)n < SPLICE_BULK_READ) {
                    if (d->small_reads < 255)
                        d->small_reads++;
                } else {
                    d->small_reads = 0;
                }
                moved = true;
            } else if (n == 0) {
                d->flags |= DF_EOF;
            } else if (errno == EAGAIN) {
                src_dry = true;
            } else if (errno != EINTR) {
                conn_close(w, c, RINGD_END_RESET, errno);
                return;
            }
        }
        /* write once reading is done for now (source dry, pipe full or EOF):
         * fewer, larger writes wake the receiver less often */
        bool read_done = src_dry || (d->flags & (DF_EOF | DF_IN_BUSY)) ||
                         d->in_pipe >= d->pipe.cap;
        if (read_done && d->in_pipe > 0 && !(d->flags & DF_OUT_BUSY) && !dst_full) {
            ssize_t m = splice(d->pipe.rfd, NULL, d->dst, NULL, d->in_pipe,
                               SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
            if (m > 0) {
                d->in_pipe -= (uint32_t)m;
                count_bytes(w, c, i, (uint32_t)m, true);
                moved = true;
            } else if (m < 0 && errno == EAGAIN) {
                dst_full = true;
            } else if (m < 0 && errno != EINTR) {
                conn_close(w, c, RINGD_END_RESET, errno);
                return;
            }
        }
        moved_any |= moved;
        if (!moved)
            break;
    }
    if (moved_any)
        lru_touch(w, c);

    if ((d->flags & DF_EOF) && d->in_pipe == 0) {
        dir_shut(w, c, i);
        return;
    }
    if (d->in_pipe == 0 && !(d->flags & DF_IN_BUSY) && w->cfg->splice_threshold &&
        d->small_reads >= SPLICE_BACK_AFTER) {
        /* the stream turned into messages: back to the copy path */
        pipe_put(w, &d->pipe, false);
        d->mode = DM_COPY;
        d->streak = 0;
        d->flags |= DF_POLL_FIRST;
        dir_read(w, c, i);
        return;
    }
    if (d->in_pipe > 0) {
        /* bytes left in the pipe: wait until the destination takes more
         * (at once if we only stopped for fairness) */
        if (!(d->flags & DF_OUT_BUSY)) {
            wait_dst(w, c, i);
            if (c->state != CS_FORWARDING)
                return;
        }
    } else {
        /* nothing in flight: the pipe goes back to the pool, even while a
         * poll for the source is armed, so a quiet connection holds none */
        pipe_put(w, &d->pipe, false);
    }
    /* room in the pipe (or none held): wait for the source */
    if (!(d->flags & (DF_EOF | DF_IN_BUSY)) && (d->pipe.rfd < 0 || d->in_pipe < d->pipe.cap))
        dir_read(w, c, i);
}

static void on_poll_in(struct worker *w, struct conn *c, unsigned i, int res)
{
    struct dir *d = &c->d[i];

    d->flags &= ~(DF_IN_BUSY | DF_BARE_POLL);
    if (c->state != CS_FORWARDING)
        return;
    if (res < 0) {
        conn_close(w, c, RINGD_END_RESET, -res);
        return;
    }
    lru_touch(w, c);
    if (d->mode == DM_COPY) {
        d->buf = buf_get(w);
        if (!d->buf) {
            conn_close(w, c, RINGD_END_RESOURCE, ENOMEM);
            return;
        }
        dir_read(w, c, i);
        return;
    }
    splice_pump(w, c, i);
}

static void on_poll_out(struct worker *w, struct conn *c, unsigned i, int res)
{
    struct dir *d = &c->d[i];

    d->flags &= ~DF_OUT_BUSY;
    if (c->state != CS_FORWARDING)
        return;
    if (res < 0) {
        conn_close(w, c, RINGD_END_RESET, -res);
        return;
    }
    if (!(res & POLLOUT) && (res & (POLLRDHUP | POLLHUP)))
        d->flags |= DF_NO_POLLOUT;
    splice_pump(w, c, i);
}

static void on_read_error(struct worker *w, struct conn *c, int err)
{
    conn_close(w, c, RINGD_END_RESET, err);
}

static void on_recv(struct worker *w, struct conn *c, unsigned i, int res, uint32_t cflags)
{
    struct dir *d = &c->d[i];

    d->flags &= ~DF_IN_BUSY;
    if (cflags & IORING_CQE_F_BUFFER) {
        d->bid = (uint16_t)(cflags >> IORING_CQE_BUFFER_SHIFT);
        d->buf = bufring_addr(w, d->bid);
        bufring_consumed(w, d->bid);
    }
    if (c->state != CS_FORWARDING)
        return;
    if (res > 0) {
        d->buf_len = (uint32_t)res;
        d->buf_off = 0;
        if ((uint32_t)res == w->cfg->copy_buffer_size) {
            d->flags |= DF_FULL_READ;
            d->flags &= ~DF_POLL_FIRST;
            d->streak += (uint32_t)res;
        } else {
            d->flags &= ~DF_FULL_READ;
            d->flags |= DF_POLL_FIRST;
            d->streak = 0;
        }
        d->bytes += (uint64_t)res;
        lru_touch(w, c);
        dir_write(w, c, i);
        return;
    }
    if (res == 0) {
        d->flags |= DF_EOF;
        dir_buf_release(w, d);
        dir_check_eof(w, c, i);
        return;
    }
    if (res == -ENOBUFS && w->br) {
        bufring_wait(w, ud(w, c, OP_RECV, i));
        return;
    }
    if (res == -EAGAIN || res == -EINTR) {
        dir_read(w, c, i);
        return;
    }
    on_read_error(w, c, -res);
}

/* A recv that found the buffer ring empty, now that buffers are back. */
void conn_retry_recv(struct worker *w, uint64_t token)
{
    uint32_t slot = ud_slot(token);
    if (slot >= w->nconns)
        return;
    struct conn *c = &w->conns[slot];
    if (c->state != CS_FORWARDING || c->gen != ud_gen(token))
        return;
    dir_read(w, c, ud_dir(token));
}

static void on_send(struct worker *w, struct conn *c, unsigned i, int res)
{
    struct dir *d = &c->d[i];

    d->flags &= ~DF_OUT_BUSY;
    if (c->state != CS_FORWARDING)
        return;
    if (res > 0) {
        d->buf_off += (uint32_t)res;
        count_bytes(w, c, i, (uint32_t)res, false);
        lru_touch(w, c);
        if (d->buf_off < d->buf_len) {
            dir_write(w, c, i);     /* partial: io_uring polls for room itself */
            return;
        }
        dir_copy_done(w, c, i);
        return;
    }
    if (res == -EAGAIN && dst_half_closed(c, i)) {
        wait_dst(w, c, i);
        return;
    }
    if (res == -EAGAIN || res == -EINTR || res == 0) {
        dir_write(w, c, i);
        return;
    }
    conn_close(w, c, RINGD_END_RESET, -res);
}

/* ------------------------------------------------------------ dispatch */

void conn_on_cqe(struct worker *w, struct io_uring_cqe *cqe)
{
    uint64_t u = cqe->user_data;
    uint32_t slot = ud_slot(u);
    enum op op = ud_op(u);
    unsigned i = ud_dir(u);

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
    case OP_POLL_IN:
        on_poll_in(w, c, i, cqe->res);
        break;
    case OP_POLL_OUT:
        on_poll_out(w, c, i, cqe->res);
        break;
    case OP_RECV:
        on_recv(w, c, i, cqe->res, cqe->flags);
        break;
    case OP_SEND:
        on_send(w, c, i, cqe->res);
        break;
    default:
        break;
    }
    if (c->state == CS_CLOSING)
        conn_maybe_free(w, c);
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
 */
static bool end_is_natural(int reason)
{
    return reason == RINGD_END_DONE || reason == RINGD_END_CONNECT;
}

static void cancel_op(struct worker *w, struct conn *c, enum op op, unsigned dir)
{
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_cancel64(sqe, ud(w, c, op, dir), 0);
    io_uring_sqe_set_data64(sqe, ud_make(OP_CANCEL, 0, 0, 0));
    sqe_quiet(w, sqe);
}

void conn_close(struct worker *w, struct conn *c, int reason, int err)
{
    if (c->state == CS_CLOSING || c->state == CS_FREE)
        return;
    bool natural = end_is_natural(reason);
    enum conn_state was = (enum conn_state)c->state;

    c->state = CS_CLOSING;
    c->end_reason = (uint8_t)reason;
    if (err && !c->err)
        c->err = err;
    lru_unlink(c);

    if (!natural) {
        struct linger lg = { 1, 0 };
        setsockopt(c->cfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
        if (c->sfd >= 0)
            setsockopt(c->sfd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
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
    case CS_CONNECTING:
        cancel_op(w, c, OP_CONNECT, 0);     /* its linked timeout goes with it */
        break;
    case CS_HEADER:
        cancel_op(w, c, OP_HDR_SEND, 0);
        break;
    case CS_FORWARDING:
        /* the op behind a busy flag depends on the mode; cancelling one that
         * is not in flight just finds nothing (-ENOENT) */
        for (unsigned i = 0; i < 2; i++) {
            if (c->d[i].flags & DF_IN_BUSY) {
                cancel_op(w, c, OP_RECV, i);
                cancel_op(w, c, OP_POLL_IN, i);
            }
            if (c->d[i].flags & DF_OUT_BUSY) {
                cancel_op(w, c, OP_SEND, i);
                cancel_op(w, c, OP_POLL_OUT, i);
            }
        }
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

    struct ringd_listener_stats *st = lstats_of(w, c);
    for (unsigned i = 0; i < 2; i++) {
        pipe_put(w, &c->d[i].pipe, c->d[i].in_pipe > 0);
        dir_buf_release(w, &c->d[i]);
    }
    /* closed through the ring: batched with the next submission, no
     * syscall of its own */
    sqe_close(w, c->cfd);
    if (c->sfd >= 0)
        sqe_close(w, c->sfd);
    srv_count(w, c, false);
    st->closed[c->end_reason]++;
    st->active--;
    w->active--;
    w->ls[c->listener].active--;
    w->cfg->shm->conns_active = w->active;
    if (w->active == 0)
        w->trim_due = true;     /* everything pooled is surplus now */
    access_log(w, c);

    c->state = CS_FREE;
    c->next_free = w->free_head;
    w->free_head = conn_slot(w, c);
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
