/*
 * forward.c: the two directions of a connection in CS_FORWARDING
 * (client->server, server->client), independent of each other. A direction
 * moves bytes in one of two modes:
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
 * bytes in flight are written; when both directions have done so, or on a
 * reset or an I/O error, the direction ends the connection (conn_close, the
 * one call back into conn.c).
 *
 * What conn.c uses: forward_start (both directions start reading),
 * forward_on_cqe (completions of POLL_IN, POLL_OUT, RECV, SEND),
 * forward_cancel (cancel what the directions have in flight) and
 * forward_release (their pipes and buffers back). The loop hands back the
 * waits that are over: forward_writable (writable.c) and forward_retry_recv
 * (bufring.c).
 */
#include "ringd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

/* a splice that moves less than this is a message, not bulk */
#define SPLICE_BULK_READ 16384u
/* this many small splice-ins in a row send a direction back to copy mode */
#define SPLICE_BACK_AFTER 4

static void dir_read(struct worker *w, struct conn *c, unsigned i);
static void dir_write(struct worker *w, struct conn *c, unsigned i);

static void count_bytes(struct worker *w, struct conn *c, unsigned i, uint32_t n, bool spliced)
{
    struct ringd_listener_stats *st = conn_lstats(w, c);
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

/*
 * Is a send on direction i's source still in flight in the ring (the other
 * direction, in copy mode, writing to the same socket)? A reset sets the
 * socket's error and ends its reading side together; the first call to look
 * at the error takes it. If that is a send the ring runs while this thread
 * reads, the read finds no error left and returns 0, exactly as for a FIN,
 * and the send's -ECONNRESET comes later. Forwarding that "EOF" would give
 * the other peer a FIN before the reset: a transfer cut in the middle that
 * looks complete. So an EOF waits for the send in flight on its socket: a
 * send that fails ends the connection with a reset, one that does not tells
 * that no reset was taken and the EOF is a FIN (on_send forwards it then).
 * Polls and this thread's own splice() calls are no such risk: a poll does
 * not take the error, and a splice that takes it ends the connection at once.
 */
static bool src_send_inflight(const struct conn *c, unsigned i)
{
    const struct dir *o = &c->d[1 - i];

    return o->mode == DM_COPY && (o->flags & DF_OUT_BUSY) && !(o->flags & DF_OUT_EPOLL);
}

/* FIN forwarded: the direction is finished. */
static void dir_shut(struct worker *w, struct conn *c, unsigned i)
{
    struct dir *d = &c->d[i];

    if (d->flags & DF_SHUT)
        return;
    if (src_send_inflight(c, i))
        return;               /* on_send of the other direction comes back */
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
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, op, i));
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
            io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_RECV, i));
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
        io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_RECV, i));
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
    io_uring_sqe_set_data64(sqe, conn_ud(w, c, OP_SEND, i));
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
        int err = writable_wait(w, c, i, conn_ud(w, c, OP_POLL_OUT, i));
        if (err < 0)
            conn_close(w, c, RINGD_END_RESOURCE, -err);
        return;
    }
    sqe_poll(w, c, i, c->d[i].dst, POLLOUT, OP_POLL_OUT);
    c->d[i].flags |= DF_OUT_BUSY;
}

/* The destination a direction waited for takes more (writable.c, through
 * the loop). */
void forward_writable(struct worker *w, uint64_t token)
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
        bufring_wait(w, conn_ud(w, c, OP_RECV, i));
        return;
    }
    if (res == -EAGAIN || res == -EINTR) {
        dir_read(w, c, i);
        return;
    }
    on_read_error(w, c, -res);
}

/* A recv that found the buffer ring empty, now that buffers are back
 * (bufring.c, through the loop). */
void forward_retry_recv(struct worker *w, uint64_t token)
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
    if (res < 0 && res != -EAGAIN && res != -EINTR) {
        conn_close(w, c, RINGD_END_RESET, -res);
        return;
    }
    /* this send took no reset from its socket: an EOF the other direction
     * read from that socket meanwhile is a FIN, forward it (src_send_inflight) */
    dir_check_eof(w, c, 1 - i);
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


/* ------------------------------------------------------------ for conn.c */

/* The server is connected (and has its PROXY header): both directions
 * start reading. */
void forward_start(struct worker *w, struct conn *c)
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

/* A completion while the connection is being quiesced for a handover
 * (CS_MOVING: forward_quiesce cancelled its ops). Nothing new is started;
 * what the op did is kept: bytes a recv got before the cancel landed stay in
 * the buffer, bytes a send wrote are counted, a FIN a recv saw is noted. */
static void quiesce_cqe(struct worker *w, struct conn *c, struct io_uring_cqe *cqe)
{
    unsigned i = ud_dir(cqe->user_data);
    struct dir *d = &c->d[i];
    int res = cqe->res;
    bool benign = res == -ECANCELED || res == -EAGAIN || res == -EINTR || res == -ENOBUFS;

    switch (ud_op(cqe->user_data)) {
    case OP_POLL_IN:
        d->flags &= ~(DF_IN_BUSY | DF_BARE_POLL);
        break;
    case OP_POLL_OUT:
        d->flags &= ~DF_OUT_BUSY;
        if (res > 0 && !(res & POLLOUT) && (res & (POLLRDHUP | POLLHUP)))
            d->flags |= DF_NO_POLLOUT;
        break;
    case OP_RECV:
        d->flags &= ~DF_IN_BUSY;
        if (cqe->flags & IORING_CQE_F_BUFFER) {
            d->bid = (uint16_t)(cqe->flags >> IORING_CQE_BUFFER_SHIFT);
            d->buf = bufring_addr(w, d->bid);
            bufring_consumed(w, d->bid);
        }
        if (res > 0) {
            d->buf_len = (uint32_t)res;
            d->buf_off = 0;
            d->bytes += (uint64_t)res;
            if ((uint32_t)res == w->cfg->copy_buffer_size) {
                d->flags |= DF_FULL_READ;
                d->flags &= ~DF_POLL_FIRST;
            } else {
                d->flags &= ~DF_FULL_READ;
                d->flags |= DF_POLL_FIRST;
            }
        } else if (res == 0) {
            d->flags |= DF_EOF;
        } else if (!benign && !c->err) {
            c->err = -res;
        }
        return;
    case OP_SEND:
        d->flags &= ~DF_OUT_BUSY;
        if (res > 0) {
            d->buf_off += (uint32_t)res;
            count_bytes(w, c, i, (uint32_t)res, false);
        } else if (res < 0 && !benign && !c->err) {
            c->err = -res;
        }
        return;
    default:
        return;
    }
    if (res < 0 && !benign && !c->err)
        c->err = -res;
}

/* A completion of one of the directions' ops. */
void forward_on_cqe(struct worker *w, struct conn *c, struct io_uring_cqe *cqe)
{
    unsigned i = ud_dir(cqe->user_data);

    if (c->state == CS_MOVING) {
        quiesce_cqe(w, c, cqe);
        return;
    }
    switch (ud_op(cqe->user_data)) {
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
}

/* An abort: cancel the ops the directions have in flight. The op behind a
 * busy flag depends on the mode; cancelling one that is not in flight just
 * finds nothing (-ENOENT). */
void forward_cancel(struct worker *w, struct conn *c)
{
    for (unsigned i = 0; i < 2; i++) {
        if (c->d[i].flags & DF_IN_BUSY) {
            sqe_cancel(w, conn_ud(w, c, OP_RECV, i));
            sqe_cancel(w, conn_ud(w, c, OP_POLL_IN, i));
        }
        if (c->d[i].flags & DF_OUT_BUSY) {
            sqe_cancel(w, conn_ud(w, c, OP_SEND, i));
            sqe_cancel(w, conn_ud(w, c, OP_POLL_OUT, i));
        }
    }
}

/* The connection is being freed: the directions' pipes and buffers go back
 * (a pipe with bytes still in it is closed, not pooled). */
void forward_release(struct worker *w, struct conn *c)
{
    for (unsigned i = 0; i < 2; i++) {
        pipe_put(w, &c->d[i].pipe, c->d[i].in_pipe > 0);
        dir_buf_release(w, &c->d[i]);
    }
}

/* ------------------------------------------------------------ for handover.c */

/*
 * Handover, step 1: stop both directions where they are. Every op in
 * flight is cancelled (its completion, data included, comes back through
 * quiesce_cqe); a destination waited for in the epoll set leaves it (the
 * socket lives on in the new worker, so closing our fd would not take it
 * out of our set). The caller has set CS_MOVING.
 */
void forward_quiesce(struct worker *w, struct conn *c)
{
    for (unsigned i = 0; i < 2; i++) {
        struct dir *d = &c->d[i];
        if (d->flags & DF_OUT_EPOLL)
            d->flags &= ~DF_OUT_BUSY;
        if (d->flags & (DF_OUT_EPOLL | DF_EPOLL_ADDED))
            writable_forget(w, c, i);
        d->flags &= ~(DF_OUT_EPOLL | DF_EPOLL_ADDED);
    }
    forward_cancel(w, c);
}

/*
 * Handover, step 2 (nothing in flight any more): the bytes a copy-mode
 * direction holds (read, not yet written) go into a pipe, so that what
 * crosses to the new worker is always sockets plus pipes, and the new worker
 * needs no buffer of ours: it continues that direction in splice mode until
 * the pipe is empty, and then back in copy mode (small_reads). Empty pipes
 * and buffers go back to the pools. -errno if no pipe could be had (the
 * bytes stay in the buffer; forward_resume copes with both forms).
 */
int forward_hold(struct worker *w, struct conn *c)
{
    for (unsigned i = 0; i < 2; i++) {
        struct dir *d = &c->d[i];
        if (d->mode == DM_COPY && d->buf && d->buf_len > d->buf_off) {
            uint32_t n = d->buf_len - d->buf_off;
            if (d->pipe.rfd < 0) {
                int err = pipe_get(w, &d->pipe);
                if (err < 0)
                    return err;
                d->in_pipe = 0;
            }
            if (n > d->pipe.cap) {
                pipe_put(w, &d->pipe, false);
                return -ENOSPC;
            }
            ssize_t k = write(d->pipe.wfd, d->buf + d->buf_off, n);
            if (k != (ssize_t)n) {
                /* cannot happen with an empty pipe of cap >= n; if it
                 * does, what went in stays counted as the pipe's */
                if (k > 0) {
                    d->buf_off += (uint32_t)k;
                    d->in_pipe += (uint32_t)k;
                    d->mode = DM_SPLICE;
                }
                return -EIO;
            }
            d->in_pipe = n;
            d->buf_len = d->buf_off = 0;
            d->mode = DM_SPLICE;
            d->small_reads = SPLICE_BACK_AFTER;     /* copy again once it is empty */
        }
        if (d->buf_len <= d->buf_off) {
            d->buf_len = d->buf_off = 0;
            dir_buf_release(w, d);
        }
        if (d->pipe.rfd >= 0 && d->in_pipe == 0)
            pipe_put(w, &d->pipe, false);
    }
    return 0;
}

/*
 * A connection in CS_FORWARDING with nothing in flight goes on: in the new
 * worker after an adoption, or in the old one when the new one refused it.
 * Each direction re-arms exactly what its state calls for: nothing once its
 * FIN was forwarded; the FIN if its source ended and nothing is held; the
 * held bytes first (a pipe, or a copy buffer); else a read.
 */
void forward_resume(struct worker *w, struct conn *c)
{
    c->d[0].src = c->cfd;
    c->d[0].dst = c->sfd;
    c->d[1].src = c->sfd;
    c->d[1].dst = c->cfd;
    for (unsigned i = 0; i < 2; i++)
        c->d[i].flags &= ~(DF_IN_BUSY | DF_OUT_BUSY | DF_BARE_POLL | DF_OUT_EPOLL |
                           DF_EPOLL_ADDED);
    lru_touch(w, c);
    for (unsigned i = 0; i < 2 && c->state == CS_FORWARDING; i++) {
        struct dir *d = &c->d[i];
        if (d->flags & DF_SHUT)
            continue;
        if (d->mode == DM_SPLICE) {
            splice_pump(w, c, i);
        } else if (d->buf && d->buf_len > d->buf_off) {
            dir_write(w, c, i);
        } else if (d->flags & DF_EOF) {
            dir_check_eof(w, c, i);
        } else {
            dir_read(w, c, i);
        }
    }
}
