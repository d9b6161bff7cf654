/*
 * pipes.c: the per-worker pipe pool and the copy-buffer pool.
 *
 * A direction holds a pipe only while it has bytes in flight; idle pipes go
 * back to a small stack and are reused. A pipe returned with data still in it
 * cannot be trusted (its bytes belong to a dead connection), so it is closed.
 *
 * Big pipes are what make splice cheap (fewer, larger ops), but F_SETPIPE_SZ
 * fails with EPERM once an unprivileged user passes fs.pipe-user-pages-soft.
 * Then we halve the target size down to the kernel default and say so once.
 */
#include "ringd.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PIPE_MIN_SIZE 65536u

int pipe_get(struct worker *w, struct pipe_ref *out)
{
    struct ringd_worker_shm *shm = w->cfg->shm;

    if (w->npipes > 0) {
        *out = w->pipes[--w->npipes];
        if (w->npipes < w->pipes_idle_min)
            w->pipes_idle_min = w->npipes;
        shm->pipes_idle = w->npipes;
        shm->pipes_in_use++;
        w->pipes_out++;
        return 0;
    }

    int fds[2];
    if (fd_headroom(w) < 2 + FDS_PER_CONN * (int64_t)w->cfg->nlisteners) {
        shm->pipes_failed++;
        return -EMFILE;
    }
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
        shm->pipes_failed++;
        return -errno;
    }
    int size = -1;
    for (;;) {
        size = fcntl(fds[1], F_SETPIPE_SZ, (int)w->pipe_size);
        if (size >= 0)
            break;
        int err = errno;
        if ((err != EPERM && err != ENOMEM) || w->pipe_size <= PIPE_MIN_SIZE) {
            /* keep the kernel's default size */
            size = fcntl(fds[1], F_GETPIPE_SZ);
            break;
        }
        w->pipe_size /= 2;
        shm->pipe_size = w->pipe_size;
        event_send(w, RINGD_EV_PIPE_SHRUNK, err, w->pipe_size, 0, 0);
    }
    out->rfd = fds[0];
    out->wfd = fds[1];
    out->cap = size > 0 ? (uint32_t)size : PIPE_MIN_SIZE;
    shm->pipes_created++;
    shm->pipes_in_use++;
    w->pipes_out++;
    note_growth(w);
    return 0;
}

void pipe_put(struct worker *w, struct pipe_ref *p, bool dirty)
{
    struct ringd_worker_shm *shm = w->cfg->shm;

    if (p->rfd < 0)
        return;
    shm->pipes_in_use--;
    w->pipes_out--;
    if (!dirty && w->npipes < w->pipe_max && p->cap >= w->pipe_size) {
        w->pipes[w->npipes++] = *p;
    } else {
        close(p->rfd);
        close(p->wfd);
    }
    shm->pipes_idle = w->npipes;
    p->rfd = p->wfd = -1;
    p->cap = 0;
}

void pipe_pool_drain(struct worker *w)
{
    while (w->npipes > 0) {
        struct pipe_ref *p = &w->pipes[--w->npipes];
        close(p->rfd);
        close(p->wfd);
    }
    w->cfg->shm->pipes_idle = 0;
}

/* Close the n pipes at the bottom of the idle stack: LIFO reuse takes from
 * the top, so these are the ones that sat unused longest. */
uint32_t pipe_pool_trim(struct worker *w, uint32_t n)
{
    if (n > w->npipes)
        n = w->npipes;
    for (uint32_t i = 0; i < n; i++) {
        close(w->pipes[i].rfd);
        close(w->pipes[i].wfd);
    }
    memmove(w->pipes, w->pipes + n, (w->npipes - n) * sizeof(w->pipes[0]));
    w->npipes -= n;
    w->cfg->shm->pipes_idle = w->npipes;
    return n;
}

char *buf_get(struct worker *w)
{
    if (w->nbufs > 0)
        return w->bufs[--w->nbufs];
    note_growth(w);
    return malloc(w->cfg->copy_buffer_size);
}

void buf_put(struct worker *w, char *b)
{
    if (!b)
        return;
    if (w->nbufs < w->buf_max)
        w->bufs[w->nbufs++] = b;
    else
        free(b);
}

void buf_pool_drain(struct worker *w)
{
    while (w->nbufs > 0)
        free(w->bufs[--w->nbufs]);
}
