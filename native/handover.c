/*
 * handover.c: established connections move to the new generation.
 *
 * When a generation drains, the master gives each old worker one end of a
 * SOCK_SEQPACKET socketpair (RINGD_CMD_HANDOVER_TO) and the new worker that
 * takes over its slot the other end (RINGD_CMD_HANDOVER_FROM). On the drain
 * command the old worker moves every connection that is forwarding:
 *
 *   FORWARDING -> MOVING: its ring ops are cancelled (forward_quiesce); their
 *                completions come back one by one, bytes a recv got before
 *                the cancel landed included (forward.c, quiesce_cqe).
 *   MOVING, nothing in flight: bytes held in a copy buffer go into a pipe
 *                (forward_hold), then one message goes out: a fixed, versioned
 *                header (struct ho_msg) and, as SCM_RIGHTS, both sockets and
 *                the pipes that hold bytes (a pipe keeps its bytes with its fd).
 *   HANDED:      the old worker keeps its fds and touches nothing until the
 *                new worker answers (struct ho_ack):
 *                  taken:   it closes its copies (no shutdown, no SO_LINGER:
 *                           the sockets live on in the new worker) and
 *                           forgets the connection: no access-log record, the
 *                           new worker writes the one record when it ends;
 *                  refused: it continues the connection itself (drains as
 *                           without handover), counted by reason;
 *                  the new worker gone (EOF): as refused, for every
 *                           connection not answered yet.
 * The new worker answers before it arms anything for a connection it takes:
 * until the answer is out, only the old worker may act on the sockets; after
 * it, only the new one. A connection is never in both, and never in none.
 *
 * Not moved (they finish in the old worker as before): connections still
 * before forwarding (accepted, connecting, sending the PROXY header; one that
 * gets to forwarding during the drain is offered then), and closing ones.
 * Refused by the new worker: listener or server not in the new config
 * (matched by identity, not index: the listener's name, the server's
 * upstream name and address, hashed by the master), its listener at
 * max_connections or its table full, a message version it does not know.
 */
#include "ringd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define HO_MAGIC 0x52484f43u      /* "RHOC" */
#define HO_ACK_MAGIC 0x52484f41u  /* "RHOA" */
#define HO_MAX_FDS 6              /* 2 sockets, 2 pipes of 2 fds */
#define HO_BATCH 64               /* messages taken per wakeup, per peer */

/* flags of a direction as they travel (the rest of dir.flags is local) */
#define HO_DIR_FLAGS (DF_EOF | DF_SHUT | DF_NO_POLLOUT | DF_POLL_FIRST)

/* ho_msg.flags */
#define HO_F_PROXY_SENT 1         /* the server got a PROXY header */

/*
 * The message, version 1. A new version may append fields (size says how
 * much the sender wrote) but never move one; a worker refuses a version
 * it does not know, and the connection stays with the old worker.
 */
struct ho_dir {
    uint32_t mode;          /* enum dir_mode */
    uint32_t flags;         /* HO_DIR_FLAGS */
    uint32_t in_pipe;       /* bytes in its pipe (then the pipe's 2 fds follow) */
    uint32_t small_reads;
    uint64_t bytes;         /* read from its source so far */
};

struct ho_msg {
    uint32_t magic;
    uint16_t version;       /* RINGD_HANDOVER_VERSION */
    uint16_t size;          /* sizeof(struct ho_msg) of the sender */
    uint32_t flags;         /* HO_F_* */
    uint32_t nfds;          /* fds attached: client, server, then the pipes */
    uint32_t slot, gen;     /* the sender's slot: echoed in the answer */
    uint64_t listener;      /* ringd_listener_cfg.ident */
    uint64_t server;        /* ringd_server_cfg.ident */
    uint64_t start_ns;      /* CLOCK_REALTIME at accept (access log) */
    uint64_t start_mono_us; /* CLOCK_MONOTONIC at accept (duration) */
    uint32_t client_len;
    uint8_t client[RINGD_ADDR_MAX];   /* the client (access log, PROXY) */
    uint32_t src_ref;       /* its count in the per-source table (srclimit) ... */
    uint32_t src_column;    /* ... in the sender's column */
    struct ho_dir d[2];
};

struct ho_ack {
    uint32_t magic;
    uint16_t version;
    uint16_t result;        /* 0: taken, else 1 + RINGD_HO_* */
    uint32_t slot, gen;     /* from the message */
};

/* the new worker's end of one old worker's socket */
struct ho_peer {
    int fd;                 /* -1: slot unused */
    bool armed;
    bool ack_pending;       /* the answer waits for room; reading stops meanwhile */
    struct ho_ack ack;
    uint32_t conn;          /* the adopted connection the answer is for, or UINT32_MAX */
};

static uint64_t tok(struct worker *w, struct conn *c)
{
    return ((uint64_t)c->gen << 32) | conn_slot(w, c);
}

static struct conn *by_token(struct worker *w, uint32_t slot, uint32_t gen)
{
    if (slot >= w->nconns)
        return NULL;
    struct conn *c = &w->conns[slot];
    return c->state != CS_FREE && c->gen == gen ? c : NULL;
}

/* ------------------------------------------------------------ out: the old worker */

void handover_to(struct worker *w, int fd)
{
    if (fd < 0)
        return;
    if (w->ho_fd >= 0 || w->ho_began) {
        close(fd);      /* one per drain: a second one is a master's mistake */
        return;
    }
    w->ho_fd = fd;
}

static void out_arm(struct worker *w)
{
    if (w->ho_fd < 0 || w->ho_armed)
        return;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_poll_add(sqe, w->ho_fd, POLLIN | (w->ho_blocked ? POLLOUT : 0));
    io_uring_sqe_set_data64(sqe, ud_make(OP_HANDOVER, 0, 0, 0));
    w->ho_armed = true;
}

/* Report once when nothing is left in flight: how many moved, how many
 * stayed and why, how long it took. */
static void out_check_done(struct worker *w)
{
    if (!w->ho_began || w->ho_reported || w->ho_pending > 0 || w->ho_qlen > 0)
        return;
    w->ho_reported = true;
    for (unsigned r = 0; r < RINGD_HO_NREASONS; r++) {
        if (w->ho_failed[r])
            event_send(w, RINGD_EV_HANDOVER_FAILED, 0, r, 0, w->ho_failed[r]);
    }
    event_send(w, RINGD_EV_HANDOVER_DONE, 0, (uint32_t)w->ho_moved, (uint32_t)w->ho_kept,
               w->now_ms - w->ho_start_ms);
    /* a connection that reaches forwarding later gets a report of its own */
    memset(w->ho_failed, 0, sizeof(w->ho_failed));
    w->ho_moved = w->ho_kept = 0;
}

/* The connection stays with us: forwarding goes on where it stopped. */
static void out_keep(struct worker *w, struct conn *c, unsigned reason)
{
    if (reason < RINGD_HO_NREASONS) {     /* (RINGD_HO_NREASONS: it failed on its own) */
        w->ho_failed[reason]++;
        w->cfg->shm->handover_failed[reason]++;
        w->ho_kept++;
    }
    w->ho_pending--;
    c->state = CS_FORWARDING;
    if (c->err) {
        conn_close(w, c, RINGD_END_RESET, c->err);
        return;
    }
    forward_resume(w, c);
}

/* The new worker took it: our copies of its fds close, it is forgotten. */
static void out_release(struct worker *w, struct conn *c)
{
    struct ringd_listener_stats *st = conn_lstats(w, c);

    for (unsigned i = 0; i < 2; i++) {
        /* closes our fds of a pipe that holds bytes; the new worker has them */
        pipe_put(w, &c->d[i].pipe, true);
        c->d[i].in_pipe = 0;
    }
    close(c->cfd);
    close(c->sfd);
    c->cfd = c->sfd = -1;
    conn_count_server(w, c, false);
    st->active--;
    w->active--;
    w->ls[c->listener].active--;
    w->cfg->shm->conns_active = w->active;
    w->cfg->shm->handed_out++;
    if (w->active == 0)
        w->trim_due = true;
    w->ho_moved++;
    w->ho_pending--;
    conn_release_slot(w, c);
}

/* The new worker is gone: everything not answered stays with us. */
static void out_peer_gone(struct worker *w)
{
    if (w->ho_fd >= 0) {
        close(w->ho_fd);
        w->ho_fd = -1;
    }
    w->ho_blocked = false;
    w->ho_qlen = 0;
    for (uint32_t s = 0; s < w->high_water; s++) {
        struct conn *c = &w->conns[s];
        if (c->state == CS_HANDED || (c->state == CS_MOVING && c->inflight == 0))
            out_keep(w, c, RINGD_HO_PEER);
        /* MOVING with ops in flight: handover_quiesced keeps it */
    }
    out_check_done(w);
}

static int send_conn(struct worker *w, struct conn *c)
{
    struct ho_msg m;
    int fds[HO_MAX_FDS];
    unsigned nfds = 0;

    memset(&m, 0, sizeof(m));
    m.magic = HO_MAGIC;
    m.version = RINGD_HANDOVER_VERSION;
    m.size = sizeof(m);
    m.flags = c->upstream < w->cfg->nupstreams && w->cfg->upstreams[c->upstream].proxy_protocol
                  ? HO_F_PROXY_SENT : 0;
    m.slot = conn_slot(w, c);
    m.gen = c->gen;
    m.listener = w->cfg->listeners[c->listener].ident;
    m.server = w->cfg->servers[c->server].ident;
    m.start_ns = c->start_ns;
    m.start_mono_us = c->start_mono_us;
    m.client_len = c->client_len;
    memcpy(m.client, c->client, sizeof(m.client));
    m.src_ref = c->src_ref;
    m.src_column = w->cfg->srclimit_column;
    fds[nfds++] = c->cfd;
    fds[nfds++] = c->sfd;
    for (unsigned i = 0; i < 2; i++) {
        struct dir *d = &c->d[i];
        m.d[i].mode = d->mode;
        m.d[i].flags = d->flags & HO_DIR_FLAGS;
        m.d[i].small_reads = d->small_reads;
        m.d[i].bytes = d->bytes;
        if (d->pipe.rfd >= 0 && d->in_pipe > 0) {
            m.d[i].in_pipe = d->in_pipe;
            fds[nfds++] = d->pipe.rfd;
            fds[nfds++] = d->pipe.wfd;
        }
    }
    m.nfds = nfds;

    union {
        char buf[CMSG_SPACE(sizeof(int) * HO_MAX_FDS)];
        struct cmsghdr align;
    } u;
    struct iovec iov = { .iov_base = &m, .iov_len = sizeof(m) };
    struct msghdr mh;
    memset(&mh, 0, sizeof(mh));
    memset(&u, 0, sizeof(u));
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);

    if (sendmsg(w->ho_fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
        return -errno;
    return 0;
}

/* Send what is quiesced, until the socket is full. */
static void out_flush(struct worker *w)
{
    while (w->ho_qlen > 0 && w->ho_fd >= 0 && !w->ho_blocked) {
        uint64_t t = w->ho_queue[w->ho_qhead];
        struct conn *c = by_token(w, (uint32_t)t, (uint32_t)(t >> 32));
        if (!c || c->state != CS_MOVING || c->inflight > 0) {
            w->ho_qhead = (w->ho_qhead + 1) % w->ho_qcap;
            w->ho_qlen--;
            continue;       /* closed meanwhile (stop, deadline) */
        }
        int err = send_conn(w, c);
        if (err == -EAGAIN || err == -ENOBUFS) {
            w->ho_blocked = true;
            break;
        }
        w->ho_qhead = (w->ho_qhead + 1) % w->ho_qcap;
        w->ho_qlen--;
        if (err == -EPIPE || err == -ECONNRESET || err == -ENOTCONN) {
            out_keep(w, c, RINGD_HO_PEER);
            out_peer_gone(w);
            return;
        }
        if (err < 0) {
            out_keep(w, c, RINGD_HO_RESOURCE);   /* e.g. too many fds in flight */
            continue;
        }
        c->state = CS_HANDED;
    }
    out_arm(w);
    out_check_done(w);
}

static bool queue_push(struct worker *w, uint64_t t)
{
    if (w->ho_qlen == w->ho_qcap) {
        uint32_t cap = w->ho_qcap ? w->ho_qcap * 2 : 64;
        uint64_t *q = malloc(cap * sizeof(*q));
        if (!q)
            return false;
        for (uint32_t k = 0; k < w->ho_qlen; k++)
            q[k] = w->ho_queue[(w->ho_qhead + k) % w->ho_qcap];
        free(w->ho_queue);
        w->ho_queue = q;
        w->ho_qcap = cap;
        w->ho_qhead = 0;
    }
    w->ho_queue[(w->ho_qhead + w->ho_qlen) % w->ho_qcap] = t;
    w->ho_qlen++;
    return true;
}

/* The drain began: offer every forwarding connection. */
void handover_begin(struct worker *w)
{
    if (w->ho_fd < 0 || w->ho_began)
        return;
    w->ho_began = true;
    w->ho_start_ms = w->now_ms;
    for (uint32_t s = 0; s < w->high_water; s++) {
        struct conn *c = &w->conns[s];
        if (c->state == CS_FORWARDING)
            handover_offer(w, c);
    }
    out_arm(w);
    out_check_done(w);
}

void handover_offer(struct worker *w, struct conn *c)
{
    if (w->ho_fd < 0 || !w->ho_began || c->state != CS_FORWARDING || c->server < 0)
        return;
    lru_unlink(c);          /* not the idle sweep's any more */
    c->state = CS_MOVING;
    if (w->ho_reported) {
        w->ho_reported = false;     /* a late one: its own report */
        w->ho_start_ms = w->now_ms;
    }
    w->ho_pending++;
    forward_quiesce(w, c);
    if (c->inflight == 0)
        handover_quiesced(w, c);
}

/* Its last op completed (conn.c): nothing in flight, send it. */
void handover_quiesced(struct worker *w, struct conn *c)
{
    if (c->err || w->ho_fd < 0) {
        /* it failed meanwhile (closed with its error), or nobody to send to */
        out_keep(w, c, c->err ? RINGD_HO_NREASONS : RINGD_HO_PEER);
        out_check_done(w);
        return;
    }
    if (forward_hold(w, c) < 0 || !queue_push(w, tok(w, c))) {
        out_keep(w, c, RINGD_HO_RESOURCE);
        out_check_done(w);
        return;
    }
    out_flush(w);
}

/* A moving or handed connection is closed by a stop or the drain deadline
 * (conn.c). Handed: whether the new worker has it is not known yet, so our
 * copies of the fds close without a shutdown or a reset, and no record is
 * written. Moving: still ours, conn_close goes on as for any connection. */
void handover_dropped(struct worker *w, struct conn *c, bool was_handed)
{
    if (c->state == CS_ADOPTED) {
        /* the new side, our answer not out yet: it becomes a refusal, so
         * the old worker keeps the connection, and its place in the
         * per-source limits goes back to the old worker's column, which the
         * old worker releases from when the connection ends */
        for (uint32_t p = 0; p < w->ho_nin; p++) {
            if (w->ho_in[p].conn == conn_slot(w, c)) {
                w->ho_in[p].conn = UINT32_MAX;
                w->ho_in[p].ack.result = 1 + RINGD_HO_PEER;
            }
        }
        if (c->src_ref != SRCLIMIT_REF_NONE && w->cfg->srclimit)
            srclimit_move(w->cfg->srclimit, w->cfg->srclimit_column, c->src_from, c->src_ref);
        c->src_ref = SRCLIMIT_REF_NONE;
    }
    if (c->state == CS_MOVING || c->state == CS_HANDED)
        w->ho_pending--;
    if (!was_handed) {
        out_check_done(w);
        return;
    }
    struct ringd_listener_stats *st = conn_lstats(w, c);
    for (unsigned i = 0; i < 2; i++) {
        pipe_put(w, &c->d[i].pipe, true);
        c->d[i].in_pipe = 0;
    }
    if (c->cfd >= 0)
        close(c->cfd);
    if (c->sfd >= 0)
        close(c->sfd);
    conn_count_server(w, c, false);
    st->active--;
    w->active--;
    w->ls[c->listener].active--;
    w->cfg->shm->conns_active = w->active;
    conn_release_slot(w, c);
    out_check_done(w);
}

static void out_on_cqe(struct worker *w, struct io_uring_cqe *cqe)
{
    w->ho_armed = false;
    if (w->ho_fd < 0)
        return;
    if (cqe->res > 0 && (cqe->res & POLLOUT))
        w->ho_blocked = false;
    for (;;) {
        struct ho_ack a;
        ssize_t n = recv(w->ho_fd, &a, sizeof(a), MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            break;
        if (n <= 0) {
            out_peer_gone(w);
            return;
        }
        if ((size_t)n < sizeof(a) || a.magic != HO_ACK_MAGIC)
            continue;
        struct conn *c = by_token(w, a.slot, a.gen);
        if (!c || c->state != CS_HANDED)
            continue;       /* dropped meanwhile (stop, deadline) */
        if (a.result == 0)
            out_release(w, c);
        else
            out_keep(w, c, a.result - 1u);
    }
    out_flush(w);
}

/* ------------------------------------------------------------ in: the new worker */

static void in_arm(struct worker *w, uint32_t p)
{
    struct ho_peer *hp = &w->ho_in[p];
    if (hp->fd < 0 || hp->armed)
        return;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_poll_add(sqe, hp->fd, hp->ack_pending ? POLLOUT : POLLIN);
    io_uring_sqe_set_data64(sqe, ud_make(OP_HANDOVER, 1, p, 0));
    hp->armed = true;
}

void handover_from(struct worker *w, int fd)
{
    if (fd < 0)
        return;
    uint32_t p = 0;
    while (p < w->ho_nin && w->ho_in[p].fd >= 0)
        p++;
    if (p == w->ho_nin) {
        struct ho_peer *n = realloc(w->ho_in, (w->ho_nin + 1) * sizeof(*n));
        if (!n) {
            close(fd);      /* the old worker finds EOF: it keeps its connections */
            return;
        }
        w->ho_in = n;
        w->ho_nin++;
    }
    memset(&w->ho_in[p], 0, sizeof(w->ho_in[p]));
    w->ho_in[p].fd = fd;
    w->ho_in[p].conn = UINT32_MAX;
    in_arm(w, p);
}

static int find_listener(struct worker *w, uint64_t ident)
{
    for (uint32_t li = 0; li < w->cfg->nlisteners; li++) {
        if (w->cfg->listeners[li].ident == ident)
            return (int)li;
    }
    return -1;
}

static int find_server(struct worker *w, uint64_t ident)
{
    for (uint32_t s = 0; s < w->cfg->nservers; s++) {
        if (w->cfg->servers[s].ident == ident)
            return (int)s;
    }
    return -1;
}

/* Take a connection over. Returns 0 and the connection (CS_ADOPTED, nothing
 * armed), or 1 + RINGD_HO_* (the fds stay the caller's to close). */
static unsigned adopt(struct worker *w, const struct ho_msg *m, size_t len, const int *fds,
                      unsigned nfds, struct conn **out)
{
    if (len < offsetof(struct ho_msg, d) + sizeof(m->d) || m->version != RINGD_HANDOVER_VERSION ||
        m->size < sizeof(*m))
        return 1 + RINGD_HO_VERSION;
    unsigned need = 2;
    for (unsigned i = 0; i < 2; i++)
        need += m->d[i].in_pipe > 0 ? 2 : 0;
    if (nfds != need || m->nfds != need)
        return 1 + RINGD_HO_RESOURCE;
    if (w->draining && (w->ho_fd < 0 || !w->ho_began))
        return 1 + RINGD_HO_PEER;      /* leaving too, with no one to pass it on to */
    int li = find_listener(w, m->listener);
    if (li < 0)
        return 1 + RINGD_HO_LISTENER;
    int s = find_server(w, m->server);
    if (s < 0)
        return 1 + RINGD_HO_SERVER;
    if (w->ls[li].active >= w->cfg->listeners[li].max_conns)
        return 1 + RINGD_HO_FULL;
    struct conn *c = conn_alloc(w, (uint32_t)li);
    if (!c)
        return 1 + RINGD_HO_FULL;

    struct ringd_listener_stats *st = &w->cfg->lstats[li];
    unsigned k = 0;
    c->state = CS_ADOPTED;
    c->cfd = fds[k++];
    c->sfd = fds[k++];
    /* an older image may not have set it: reset if this worker dies */
    const struct linger abort_on_death = { 1, 0 };
    setsockopt(c->cfd, SOL_SOCKET, SO_LINGER, &abort_on_death, sizeof(abort_on_death));
    setsockopt(c->sfd, SOL_SOCKET, SO_LINGER, &abort_on_death, sizeof(abort_on_death));
    c->server = s;
    c->upstream = w->cfg->servers[s].upstream;    /* (a route may have chosen it) */
    c->tried[0] = (uint32_t)s;
    c->tries = 1;
    c->start_ns = m->start_ns;
    c->start_mono_us = m->start_mono_us;
    c->client_len = m->client_len <= sizeof(c->client) ? m->client_len : 0;
    memcpy(c->client, m->client, sizeof(c->client));
    if (c->client_len == 0 && w->cfg->listeners[li].access_log) {
        /* the old config did not log it: the socket still knows */
        socklen_t alen = sizeof(c->client);
        if (getpeername(c->cfd, (struct sockaddr *)c->client, &alen) == 0)
            c->client_len = alen;
    }
    for (unsigned i = 0; i < 2; i++) {
        struct dir *d = &c->d[i];
        d->mode = m->d[i].mode == DM_SPLICE ? DM_SPLICE : DM_COPY;
        d->flags = (uint16_t)(m->d[i].flags & HO_DIR_FLAGS);
        d->small_reads = (uint8_t)(m->d[i].small_reads < 255 ? m->d[i].small_reads : 255);
        d->bytes = m->d[i].bytes;
        if (m->d[i].in_pipe > 0) {
            d->pipe.rfd = fds[k++];
            d->pipe.wfd = fds[k++];
            int cap = fcntl(d->pipe.wfd, F_GETPIPE_SZ);
            d->pipe.cap = cap > 0 ? (uint32_t)cap : m->d[i].in_pipe;
            d->in_pipe = m->d[i].in_pipe;
            w->pipes_out++;
            w->cfg->shm->pipes_in_use++;
        }
    }
    /* a connection that was counted against the server's max_connections
     * stays counted, even if that makes the server's count exceed it */
    c->srv_counted = 0;
    conn_count_server(w, c, true);
    /* its place in the per-source limits moves to our column (the table is
     * one for the host; the old worker forgets the ref once we answered) */
    if (m->src_ref != SRCLIMIT_REF_NONE && w->cfg->srclimit) {
        srclimit_move(w->cfg->srclimit, m->src_column, w->cfg->srclimit_column, m->src_ref);
        c->src_ref = m->src_ref;
        c->src_from = m->src_column;
    }
    w->active++;
    w->ls[li].active++;
    w->cfg->shm->conns_active = w->active;
    w->cfg->shm->handed_in++;
    st->active++;
    *out = c;
    return 0;
}

/* Our answer is out: the connection is ours, it goes on. */
static void in_start(struct worker *w, struct ho_peer *hp)
{
    uint32_t slot = hp->conn;
    hp->conn = UINT32_MAX;
    if (slot == UINT32_MAX)
        return;
    struct conn *c = &w->conns[slot];
    if (c->state != CS_ADOPTED)
        return;
    c->state = CS_FORWARDING;
    forward_resume(w, c);
    /* we began draining ourselves meanwhile: on to the next generation */
    if (w->draining && c->state == CS_FORWARDING)
        handover_offer(w, c);
}

static bool in_answer(struct worker *w, struct ho_peer *hp)
{
    ssize_t n = send(hp->fd, &hp->ack, sizeof(hp->ack), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == (ssize_t)sizeof(hp->ack)) {
        hp->ack_pending = false;
        in_start(w, hp);
        return true;
    }
    if (n < 0 && (errno == EAGAIN || errno == ENOBUFS || errno == EINTR)) {
        hp->ack_pending = true;
        return false;
    }
    /* the old worker is gone: it cannot act on the sockets any more, so
     * the connection is ours either way */
    hp->ack_pending = false;
    in_start(w, hp);
    return true;
}

static void close_fds(const int *fds, unsigned n)
{
    for (unsigned k = 0; k < n; k++)
        close(fds[k]);
}

static void in_on_cqe(struct worker *w, uint32_t p)
{
    struct ho_peer *hp = &w->ho_in[p];

    hp->armed = false;
    if (hp->fd < 0)
        return;
    if (hp->ack_pending && !in_answer(w, hp)) {
        in_arm(w, p);
        return;
    }
    for (int round = 0; round < HO_BATCH; round++) {
        struct ho_msg m;
        union {
            char buf[CMSG_SPACE(sizeof(int) * HO_MAX_FDS)];
            struct cmsghdr align;
        } u;
        struct iovec iov = { .iov_base = &m, .iov_len = sizeof(m) };
        struct msghdr mh;
        memset(&mh, 0, sizeof(mh));
        memset(&m, 0, sizeof(m));
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        ssize_t n = recvmsg(hp->fd, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            break;
        if (n <= 0) {
            /* the old worker is done (or gone) */
            close(hp->fd);
            hp->fd = -1;
            return;
        }
        int fds[HO_MAX_FDS];
        unsigned nfds = cmsg_take_fds(&mh, fds, HO_MAX_FDS);
        struct conn *c = NULL;
        unsigned r;
        if (m.magic != HO_MAGIC)
            r = 1 + RINGD_HO_VERSION;
        else if (mh.msg_flags & MSG_CTRUNC)
            r = 1 + RINGD_HO_RESOURCE;
        else
            r = adopt(w, &m, (size_t)n, fds, nfds, &c);
        if (r != 0)
            close_fds(fds, nfds);   /* ours only: the old worker keeps its own */
        hp->ack.magic = HO_ACK_MAGIC;
        hp->ack.version = RINGD_HANDOVER_VERSION;
        hp->ack.result = (uint16_t)r;
        hp->ack.slot = m.slot;
        hp->ack.gen = m.gen;
        hp->conn = c ? conn_slot(w, c) : UINT32_MAX;
        if (!in_answer(w, hp))
            break;
    }
    in_arm(w, p);
}

/* ------------------------------------------------------------ both */

void handover_on_cqe(struct worker *w, struct io_uring_cqe *cqe)
{
    uint64_t u = cqe->user_data;
    if (ud_dir(u) == 0) {
        out_on_cqe(w, cqe);
        return;
    }
    uint32_t p = ud_slot(u);
    if (p < w->ho_nin)
        in_on_cqe(w, p);
}

void handover_free(struct worker *w)
{
    if (w->ho_fd >= 0)
        close(w->ho_fd);
    w->ho_fd = -1;
    for (uint32_t p = 0; p < w->ho_nin; p++) {
        if (w->ho_in[p].fd >= 0)
            close(w->ho_in[p].fd);
    }
    free(w->ho_in);
    w->ho_in = NULL;
    w->ho_nin = 0;
    free(w->ho_queue);
    w->ho_queue = NULL;
}
