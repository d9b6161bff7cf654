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
#include <unistd.h>

/* A recvmsg, not a recv: the handover commands carry an fd (SCM_RIGHTS),
 * which a plain recv would drop. */
void ctrl_arm(struct worker *w)
{
    if (w->ctrl_fd < 0 || w->ctrl_armed)
        return;
    memset(&w->ctrl_msg, 0, sizeof(w->ctrl_msg));
    w->ctrl_iov.iov_base = w->ctrl_buf;
    w->ctrl_iov.iov_len = sizeof(w->ctrl_buf[0]);
    w->ctrl_msg.msg_iov = &w->ctrl_iov;
    w->ctrl_msg.msg_iovlen = 1;
    w->ctrl_msg.msg_control = w->ctrl_cmsg;
    w->ctrl_msg.msg_controllen = sizeof(w->ctrl_cmsg);
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_recvmsg(sqe, w->ctrl_fd, &w->ctrl_msg, MSG_CMSG_CLOEXEC);
    io_uring_sqe_set_data64(sqe, ud_make(OP_CTRL, 0, 0, 0));
    w->ctrl_armed = true;
}

/* The fds a received message brought (SCM_RIGHTS): the first `max` go into
 * fds, their count is returned; any more are closed. */
unsigned cmsg_take_fds(struct msghdr *mh, int *fds, unsigned max)
{
    unsigned n = 0;

    for (struct cmsghdr *cm = CMSG_FIRSTHDR(mh); cm; cm = CMSG_NXTHDR(mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t cnt = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const int *in = (const int *)CMSG_DATA(cm);
        for (size_t k = 0; k < cnt; k++) {
            if (n < max)
                fds[n++] = in[k];
            else
                close(in[k]);
        }
    }
    return n;
}

/* The first fd the message brought (-1: none); any others are closed. */
static int ctrl_take_fd(struct worker *w, int res)
{
    int fd = -1;

    if (res > 0)
        cmsg_take_fds(&w->ctrl_msg, &fd, 1);
    return fd;
}

/* The recv on the control socket completed. CTRL_CMD: a command in *cmd;
 * CTRL_NONE: nothing to do; either way the caller arms the recv again.
 * CTRL_GONE: EOF or an error (*err, 0 for EOF): the master is gone.
 * *fd: the fd the command brought, -1 for none; the caller owns it. */
int ctrl_recv(struct worker *w, struct io_uring_cqe *cqe, struct ringd_cmd *cmd, int *err,
              int *fd)
{
    int res = cqe->res;

    w->ctrl_armed = false;
    *fd = ctrl_take_fd(w, res);
    if (res == -EINTR || res == -EAGAIN)
        return CTRL_NONE;
    if (res <= 0) {
        *err = res < 0 ? -res : 0;
        return CTRL_GONE;
    }
    if ((size_t)res < sizeof(struct ringd_cmd)) {
        if (*fd >= 0)
            close(*fd);
        *fd = -1;
        return CTRL_NONE;
    }
    memcpy(cmd, w->ctrl_buf, sizeof(*cmd));
    return CTRL_CMD;
}
