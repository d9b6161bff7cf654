/*
 * control.c: the control channel between the master and this worker.
 *
 * A SOCK_SEQPACKET socketpair: the master sends struct ringd_cmd (drain,
 * stop, poke), the worker sends struct ringd_event (events.c). A recv on
 * the control socket stays armed in the ring; this file arms it and decodes
 * what it brings. What a command does, and what the worker does when the
 * master is gone (EOF: it drains on its own instead of living on as an
 * orphan), is the drain lifecycle in worker.c.
 */
#include "ringd.h"

#include <errno.h>
#include <string.h>

void ctrl_arm(struct worker *w)
{
    if (w->ctrl_fd < 0 || w->ctrl_armed)
        return;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_recv(sqe, w->ctrl_fd, w->ctrl_buf, sizeof(w->ctrl_buf[0]), 0);
    io_uring_sqe_set_data64(sqe, ud_make(OP_CTRL, 0, 0, 0));
    w->ctrl_armed = true;
}

/* The recv on the control socket completed. CTRL_CMD: a command in *cmd;
 * CTRL_NONE: nothing to do; either way the caller arms the recv again.
 * CTRL_GONE: EOF or an error (*err, 0 for EOF): the master is gone. */
int ctrl_recv(struct worker *w, struct io_uring_cqe *cqe, struct ringd_cmd *cmd, int *err)
{
    int res = cqe->res;

    w->ctrl_armed = false;
    if (res == -EINTR || res == -EAGAIN)
        return CTRL_NONE;
    if (res <= 0) {
        *err = res < 0 ? -res : 0;
        return CTRL_GONE;
    }
    if ((size_t)res < sizeof(struct ringd_cmd))
        return CTRL_NONE;
    memcpy(cmd, w->ctrl_buf, sizeof(*cmd));
    return CTRL_CMD;
}
