/*
 * control.c: the control channel between the master and this worker.
 *
 * A SOCK_SEQPACKET socketpair: the master sends struct ringd_cmd (drain,
 * stop), the worker sends struct ringd_event (ready, accept paused, ...;
 * events.c). A recv on the control socket stays
 * armed in the ring; EOF on it means the master is gone, and the worker
 * drains on its own instead of living on as an orphan.
 */
#include "ringd.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

void ctrl_arm(struct worker *w)
{
    if (w->ctrl_fd < 0 || w->ctrl_armed)
        return;
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_recv(sqe, w->ctrl_fd, w->ctrl_buf, sizeof(w->ctrl_buf[0]), 0);
    io_uring_sqe_set_data64(sqe, ud_make(OP_CTRL, 0, 0, 0));
    w->ctrl_armed = true;
}

/* Once a draining worker has no accept armed, it lets go of its copies of
 * the listening sockets, so that the master alone decides when a socket that
 * is no longer configured really closes. */
void check_accept_stopped(struct worker *w)
{
    if (!w->draining || w->accept_stopped || w->accept_armed_count > 0)
        return;
    w->accept_stopped = true;
    acceptors_close(w);
    event_send(w, RINGD_EV_ACCEPT_STOPPED, 0, 0, 0, w->active);
}

void worker_begin_drain(struct worker *w, uint64_t deadline_ms)
{
    if (w->draining) {
        if (deadline_ms < w->drain_deadline_ms)
            w->drain_deadline_ms = deadline_ms;
        return;
    }
    w->draining = true;
    w->drain_deadline_ms = deadline_ms;
    w->cfg->shm->state = RINGD_WS_DRAINING;
    listener_stop_all(w);
    event_send(w, RINGD_EV_DRAINING, 0, 0, 0, w->active);
    check_accept_stopped(w);
}

void ctrl_on_cqe(struct worker *w, struct io_uring_cqe *cqe)
{
    int res = cqe->res;

    w->ctrl_armed = false;
    if (res == -EINTR || res == -EAGAIN) {
        ctrl_arm(w);
        return;
    }
    if (res <= 0) {
        /* EOF or error: the master is gone */
        if (!w->stopping) {
            event_send(w, RINGD_EV_ORPHANED, res < 0 ? -res : 0, 0, 0, w->active);
            worker_begin_drain(w, w->now_ms + w->cfg->orphan_drain_ms);
        }
        return;
    }
    if ((size_t)res >= sizeof(struct ringd_cmd)) {
        struct ringd_cmd cmd;
        memcpy(&cmd, w->ctrl_buf, sizeof(cmd));
        switch (cmd.cmd) {
        case RINGD_CMD_DRAIN:
            worker_begin_drain(w, w->now_ms + cmd.arg);
            break;
        case RINGD_CMD_STOP:
            if (!w->stopping) {
                w->stopping = true;
                w->draining = true;
                w->drain_deadline_ms = w->now_ms;
                w->cfg->shm->state = RINGD_WS_DRAINING;
                listener_stop_all(w);
                conn_close_all(w, RINGD_END_DRAIN);
                check_accept_stopped(w);
            }
            break;
        case RINGD_CMD_POKE_ACCEPT:
            listener_poke(w);
            break;
        default:
            break;
        }
    }
    ctrl_arm(w);
}
