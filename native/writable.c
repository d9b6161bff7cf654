/*
 * writable.c: waiting until a destination takes more, where io_uring's own
 * poll cannot do it.
 *
 * io_uring adds EPOLLRDHUP (with HUP and ERR) to every poll it arms, its
 * internal ones included. Once a socket's peer has half-closed (sent its
 * FIN: the socket is in CLOSE-WAIT) that condition holds for good. So, for
 * such a socket whose send buffer is full:
 *   - POLL_ADD(POLLOUT) completes at once, writable or not, every time: a
 *     busy loop (measured: 1.8 million completions a second for a client
 *     that had half-closed and read slowly);
 *   - a send is retried once through the poll, then handed to an io-wq
 *     thread where it blocks in sk_stream_wait_memory (seen with SQPOLL: the
 *     worker then waited seconds for completions, its tick included).
 * Half-closed clients are ordinary: one that sends its request, shuts its
 * side down and reads the answer (HTTP/1.0 style, `nc -N`, most test
 * clients). For their sockets writability comes from an epoll set of the
 * worker's own, which reports only what it is asked (EPOLLOUT, one shot),
 * and the ring watches the epoll fd with a single POLL_ADD. Sends to them go
 * out with MSG_DONTWAIT, so a full socket answers -EAGAIN and the direction
 * waits here instead of in a blocked io-wq thread.
 *
 * An epoll registration holds no reference to the socket: closing the fd
 * (after the connection's last completion) removes it. A wait is not an
 * operation in flight (c->inflight does not count it); its event carries
 * the connection's user_data, checked like a completion's.
 */
#include "ringd.h"

#include <errno.h>
#include <poll.h>
#include <sys/epoll.h>
#include <unistd.h>

int writable_setup(struct worker *w)
{
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    return w->epfd < 0 ? -errno : 0;
}

void writable_free(struct worker *w)
{
    if (w->epfd >= 0)
        close(w->epfd);
    w->epfd = -1;
}

/* Watch the epoll set from the ring (one POLL_ADD on its fd), unless that
 * is armed already. */
void writable_arm(struct worker *w)
{
    if (w->ep_armed || w->epfd < 0)
        return;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_poll_add(sqe, w->epfd, POLLIN);
    io_uring_sqe_set_data64(sqe, ud_make(OP_EPOLL, 0, 0, 0));
    w->ep_armed = true;
}

/* Wait until direction i's destination can take more: the token comes back
 * from writable_ready. */
int writable_wait(struct worker *w, struct conn *c, unsigned i, uint64_t token)
{
    struct dir *d = &c->d[i];
    struct epoll_event ev = { .events = EPOLLOUT | EPOLLONESHOT, .data.u64 = token };
    int op = (d->flags & DF_EPOLL_ADDED) ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;

    if (w->epfd < 0)
        return -EBADF;
    if (epoll_ctl(w->epfd, op, d->dst, &ev) < 0) {
        /* the flag can be stale across a mode switch: try the other verb */
        op = op == EPOLL_CTL_ADD ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
        if ((errno != EEXIST && errno != ENOENT) || epoll_ctl(w->epfd, op, d->dst, &ev) < 0)
            return -errno;
    }
    d->flags |= DF_EPOLL_ADDED | DF_OUT_EPOLL | DF_OUT_BUSY;
    writable_arm(w);
    return 0;
}

/* Direction i's destination leaves the epoll set (the connection moves to
 * another worker: the socket outlives our fd, and with it its entry). */
void writable_forget(struct worker *w, struct conn *c, unsigned i)
{
    if (w->epfd >= 0)
        epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->d[i].dst, NULL);
}

/* The ring's poll on the epoll set completed: it is no longer armed. The
 * loop then takes the ready tokens (writable_ready, while it returns a full
 * batch) and arms the poll again (writable_arm). */
void writable_on_cqe(struct worker *w, struct io_uring_cqe *cqe)
{
    (void)cqe;
    w->ep_armed = false;
}

/* Up to max tokens of waits that are over (one-shot: each comes once). */
uint32_t writable_ready(struct worker *w, uint64_t *tokens, uint32_t max)
{
    struct epoll_event evs[WRITABLE_BATCH];
    int n;

    if (max > WRITABLE_BATCH)
        max = WRITABLE_BATCH;
    n = epoll_wait(w->epfd, evs, (int)max, 0);
    for (int k = 0; k < n; k++)
        tokens[k] = evs[k].data.u64;
    return n > 0 ? (uint32_t)n : 0;
}
