/*
 * listener.c: accepting on this worker's SO_REUSEPORT sockets, and pausing.
 *
 * A listener has one socket per worker slot; a worker accepts on its own
 * slot's socket and on the sockets of slots that no longer exist (the
 * master assigns those "acceptors", see ringd_acceptor_cfg).
 *
 * A multishot accept takes everything in the kernel's queue in one burst, up
 * to the whole backlog, before we see the first completion. So it is armed
 * only while there is room for such a burst (connections under
 * max_connections and fds under RLIMIT_NOFILE); closer to a limit we accept
 * one connection at a time, each a decision, so no connection is ever accepted
 * that we then have to drop. At the limit, accepting pauses: the sockets stay
 * open, the kernel keeps queueing, and we resume when a connection closes.
 * Errors that say the process or system is short of fds or memory pause too,
 * retried on a timer instead of spinning on the error.
 */
#include "ringd.h"

#include <errno.h>
#include <unistd.h>

#define ACCEPT_RETRY_MS 250

/* connections we can still take: by max_connections and by fds */
static int64_t room(struct worker *w, uint32_t li, int *why)
{
    int64_t by_max = (int64_t)w->cfg->listeners[li].max_conns - w->ls[li].active;
    /* every acceptor may have one accept in flight */
    int64_t by_fds = fd_headroom(w) / FDS_PER_CONN - (int64_t)w->nacc;
    *why = by_fds < by_max ? EMFILE : 0;
    return by_fds < by_max ? by_fds : by_max;
}

static bool room_for_burst(struct worker *w, uint32_t li)
{
    int why;
    return room(w, li, &why) > 2 * (int64_t)w->cfg->listeners[li].backlog + 64;
}

static void acceptor_arm(struct worker *w, uint32_t ai)
{
    struct acceptor *a = &w->acc[ai];
    struct io_uring_sqe *sqe;

    if (a->armed || a->fd < 0)
        return;
    sqe = get_sqe(w);
    a->multishot = room_for_burst(w, a->li);
    if (a->multishot)
        io_uring_prep_multishot_accept(sqe, a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    else
        io_uring_prep_accept(sqe, a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    io_uring_sqe_set_data64(sqe, ud_make(OP_ACCEPT, 0, ai, 0));
    a->armed = true;
    a->cancel_sent = false;
    w->accept_armed_count++;
}

static void acceptor_cancel(struct worker *w, uint32_t ai)
{
    struct acceptor *a = &w->acc[ai];

    if (!a->armed || a->cancel_sent)
        return;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_cancel64(sqe, ud_make(OP_ACCEPT, 0, ai, 0), 0);
    io_uring_sqe_set_data64(sqe, ud_make(OP_ACCEPT_CANCEL, 0, ai, 0));
    a->cancel_sent = true;
}

void listener_arm(struct worker *w, uint32_t li)
{
    struct listener_rt *l = &w->ls[li];
    int why;

    if (l->paused || w->draining || w->stopping)
        return;
    if (room(w, li, &why) < 1) {
        listener_pause(w, li, why);
        return;
    }
    for (uint32_t ai = 0; ai < w->nacc; ai++)
        if (w->acc[ai].li == li)
            acceptor_arm(w, ai);
}

static void listener_cancel(struct worker *w, uint32_t li)
{
    for (uint32_t ai = 0; ai < w->nacc; ai++)
        if (w->acc[ai].li == li)
            acceptor_cancel(w, ai);
}

void listener_pause(struct worker *w, uint32_t li, int err)
{
    struct listener_rt *l = &w->ls[li];
    struct ringd_listener_stats *st = &w->cfg->lstats[li];

    if (l->paused) {
        if (err)
            l->resume_at_ms = w->now_ms + ACCEPT_RETRY_MS;
        return;
    }
    l->paused = true;
    l->pause_err = err;
    l->resume_at_ms = w->now_ms + ACCEPT_RETRY_MS;
    st->accept_pauses++;
    st->accept_paused = 1;
    listener_cancel(w, li);
    if (err == EMFILE || err == ENFILE)
        pipe_pool_drain(w);     /* idle pipes are fds we can give back */
    event_send(w, RINGD_EV_ACCEPT_PAUSED, err, li, l->active, st->accept_pauses);
}

/* Called when a connection of the listener closes and on every tick. */
void listener_maybe_resume(struct worker *w, uint32_t li)
{
    struct listener_rt *l = &w->ls[li];
    int why;

    if (!l->paused || w->draining || w->stopping)
        return;
    if (l->pause_err && w->now_ms < l->resume_at_ms)
        return;
    /* a little hysteresis, so that a listener at its limit does not flap */
    if (room(w, li, &why) < (l->pause_err ? 2 : 1))
        return;
    l->paused = false;
    w->cfg->lstats[li].accept_paused = 0;
    if (l->pause_err)
        event_send(w, RINGD_EV_ACCEPT_RESUMED, l->pause_err, li, l->active, 0);
    l->pause_err = 0;
    listener_arm(w, li);
}

/*
 * Accept whatever waits in the queues right now, with plain non-blocking
 * accept4() calls. Needed after a reload: while the old and the new worker of
 * a slot both wait on the same socket, the kernel wakes only one waiter per
 * new connection (accept waits are exclusive). If that one was the old
 * worker, about to cancel its accept, the wakeup is lost with it and the
 * connection would sit in the queue until the next one arrives. The master
 * pokes the new workers when an old one reports that it stopped accepting.
 */
void listener_poke(struct worker *w)
{
    for (uint32_t ai = 0; ai < w->nacc; ai++) {
        struct acceptor *a = &w->acc[ai];
        int why;
        if (a->fd < 0 || w->ls[a->li].paused || w->draining || w->stopping)
            continue;
        while (room(w, a->li, &why) >= 1) {
            int fd = accept4(a->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0)
                break;      /* EAGAIN: the queue is empty; errors: the armed accept sees them */
            conn_start(w, a->li, fd);
        }
    }
}

void listener_stop_all(struct worker *w)
{
    for (uint32_t ai = 0; ai < w->nacc; ai++)
        acceptor_cancel(w, ai);
}

/* Draining and no accept left in flight: let go of our copies of the
 * listening sockets (the master alone decides when one really closes). */
void acceptors_close(struct worker *w)
{
    for (uint32_t ai = 0; ai < w->nacc; ai++) {
        if (w->acc[ai].fd >= 0) {
            close(w->acc[ai].fd);
            w->acc[ai].fd = -1;
        }
    }
}

void on_accept(struct worker *w, struct io_uring_cqe *cqe)
{
    uint32_t ai = ud_slot(cqe->user_data);
    int res = cqe->res;

    if (ai >= w->nacc)
        return;
    struct acceptor *a = &w->acc[ai];
    uint32_t li = a->li;
    if (!(cqe->flags & IORING_CQE_F_MORE) && a->armed) {
        a->armed = false;
        w->accept_armed_count--;
    }

    if (res >= 0) {
        /* A connection accepted while we were pausing or draining is still
         * served: it left the kernel's queue, nobody else can take it. */
        conn_start(w, li, res);
        if (a->armed && a->multishot && !room_for_burst(w, li))
            acceptor_cancel(w, ai);     /* re-armed one at a time below */
    } else {
        switch (-res) {
        case ECANCELED:
            break;
        case EMFILE:
        case ENFILE:
        case ENOBUFS:
        case ENOMEM:
            listener_pause(w, li, -res);
            break;
        case EINTR:
        case EAGAIN:
        case ECONNABORTED:
        case EPROTO:
        case EPERM:
            break;
        default:
            /* unexpected: report and retry later rather than spin */
            event_send(w, RINGD_EV_ACCEPT_ERROR, -res, li, 0, 0);
            listener_pause(w, li, -res);
            break;
        }
    }
    if (!a->armed && !w->ls[li].paused && !w->draining && !w->stopping) {
        int why;
        if (room(w, li, &why) < 1)
            listener_pause(w, li, why);
        else
            acceptor_arm(w, ai);
    }
}
