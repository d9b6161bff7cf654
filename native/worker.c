/*
 * worker.c: ringd_worker_run(), the event loop of one worker.
 *
 * The loop is: submit what is queued and wait for at least one completion,
 * handle every completion that is ready, advance the CQ once. Everything
 * periodic (heartbeat, idle timeouts, resuming a paused accept, the drain
 * deadline, giving memory back) hangs off one tick, every RINGD_TICK_MS
 * while any of it has something to do.
 *
 * The tick costs nothing in the ring: where the kernel has
 * IORING_FEAT_EXT_ARG (5.11+) it is the timeout of the wait itself
 * (io_uring_submit_and_wait_timeout), so an idle worker submits no SQE and
 * an SQPOLL poller that went to sleep stays asleep. (A timeout SQE every
 * 100 ms woke the poller ten times a second, and each time it spun for
 * sq_thread_idle: 0.13 CPU-s per second per idle worker.) A worker with
 * nothing to watch (no connection, no paused accept, no drain, nothing to
 * trim or flush) wakes only for the heartbeat the master's watchdog reads,
 * every heartbeat_ms (the master derives it from watchdog_timeout). Older
 * kernels get the timeout SQE every RINGD_TICK_MS, as before.
 *
 * The drain lifecycle lives here too: the master's commands (drain, stop,
 * poke; control.c decodes them), draining on its own when the master is
 * gone, letting go of the listening sockets once no accept is armed, the
 * drain deadline, and leaving the loop.
 */
#include "ringd.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>

#define CONN_SLACK 64           /* accepts that race a pause still get a slot */
#define STOP_GRACE_MS 2000      /* stop: how long to wait for cancellations */
#define IDLE_TRIM_MS 1000       /* idle this long: give pooled memory and fds back */

static volatile sig_atomic_t stall_requested;

static void on_sigusr2(int sig)
{
    (void)sig;
    stall_requested = 1;
}

static void tick_arm(struct worker *w)
{
    if (w->tick_wait)
        return;     /* the loop's wait times out instead */
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_timeout(sqe, &w->tick_ts, 0, 0);
    io_uring_sqe_set_data64(sqe, ud_make(OP_TICK, 0, 0, 0));
}

/*
 * The connection table is an anonymous mapping handed out in slot order
 * (high_water). A free slot has no operation in flight (it was freed at
 * inflight == 0), so its page may be dropped: a late completion cannot name
 * it, and conn_start rewrites a slot completely. With no connection open the
 * whole table goes; otherwise everything above the highest slot in use, and
 * the free list is rebuilt lowest slot first so that the table stays short.
 */
static bool table_trim(struct worker *w)
{
    uint32_t top = w->high_water;

    while (top > 0 && w->conns[top - 1].state == CS_FREE)
        top--;
    if (top == w->high_water)
        return false;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t from = ((size_t)top * sizeof(struct conn) + page - 1) & ~(page - 1);
    size_t to = (size_t)w->high_water * sizeof(struct conn);
    if (to > from)
        madvise((char *)w->conns + from, to - from, MADV_DONTNEED);
    w->free_head = UINT32_MAX;
    for (uint32_t s = top; s-- > 0;) {
        if (w->conns[s].state == CS_FREE) {
            w->conns[s].next_free = w->free_head;
            w->free_head = s;
        }
    }
    w->high_water = top;
    w->cfg->shm->conn_slots = top;
    return true;
}

/*
 * Give memory and fds back once the worker has stopped growing. trim_due is
 * set by the work itself (note_growth: a new table slot, pipe or pooled
 * buffer, a cold provided buffer written again, a larger buffer-ring
 * target; and the last connection closing), never by sampling the number of
 * open connections: a burst that opens and closes between two ticks is
 * trimmed like any other. IDLE_TRIM_MS after the last growth:
 *   no connection open: everything pooled goes (pipes, copy buffers, the
 *     whole connection table, every provided buffer's pages);
 *   some open: what stayed unused since the last growth or trim (idle pipes
 *     at the bottom of the pool, free buffers at the bottom of the stack,
 *     table slots above the highest one in use, buffers posted above the
 *     buffer ring's target).
 * While connections are open more becomes unused as they finish (and the
 * buffer target comes down), so the trim repeats every IDLE_TRIM_MS; it
 * costs a look at the pools' low-water marks and the top of the table.
 * `trims` counts the ones that gave something back.
 */
static void idle_trim(struct worker *w)
{
    if (!w->trim_due || w->now_ms - w->quiet_since_ms < IDLE_TRIM_MS)
        return;
    bool idle = w->active == 0;
    bool gave = false;

    if (idle) {
        gave |= w->npipes > 0;
        pipe_pool_drain(w);
        if (w->nbufs > 0) {
            buf_pool_drain(w);
            malloc_trim(0);
            gave = true;
        }
    } else {
        gave |= pipe_pool_trim(w, w->pipes_idle_min) > 0;
    }
    gave |= bufring_trim(w, idle);
    gave |= table_trim(w);
    if (gave)
        w->cfg->shm->trims++;
    w->quiet_since_ms = w->now_ms;
    w->pipes_idle_min = w->npipes;
    w->trim_due = !idle;
}

static void on_tick(struct worker *w)
{
    w->tick_last_ms = w->now_ms;
    bufring_decay(w);
    idle_trim(w);
    w->cfg->shm->heartbeat++;
    conn_expire_idle(w);
    for (uint32_t li = 0; li < w->cfg->nlisteners; li++)
        listener_maybe_resume(w, li);
    if (w->draining && !w->stopping && w->now_ms >= w->drain_deadline_ms) {
        /* deadline: whatever is still open is closed and counted */
        w->stopping = true;
        conn_close_all(w, RINGD_END_DRAIN);
        w->drain_deadline_ms = w->now_ms;   /* as a stop: STOP_GRACE_MS to wind down */
    } else if (w->stopping && w->now_ms >= w->drain_deadline_ms + STOP_GRACE_MS) {
        w->exit_loop = true;    /* something never completed: leave anyway */
    }
    events_tick(w);
    tick_arm(w);
}

/* Whether the next tick has work to do before the heartbeat is due: what
 * on_tick watches, each part asked whether it is at rest. */
static bool tick_needed(const struct worker *w)
{
    if (w->active > 0 || w->draining || w->stopping || w->trim_due || events_pending(w))
        return true;
    for (uint32_t li = 0; li < w->cfg->nlisteners; li++)
        if (w->ls[li].paused)
            return true;
    return !bufring_at_rest(w);
}

/* The loop's wait with the tick as its timeout (tick_wait). Returns what
 * io_uring_submit_and_wait_timeout returns (-ETIME: the tick is due). */
static int wait_with_tick(struct worker *w)
{
    uint64_t period = RINGD_TICK_MS;
    struct io_uring_cqe *cqe;

    if (!tick_needed(w) && w->cfg->heartbeat_ms > period)
        period = w->cfg->heartbeat_ms;
    uint64_t due = w->tick_last_ms + period;
    uint64_t left = due > w->now_ms ? due - w->now_ms : 0;
    struct __kernel_timespec ts = {
        .tv_sec = (long long)(left / 1000),
        .tv_nsec = (long long)(left % 1000) * 1000000,
    };
    return io_uring_submit_and_wait_timeout(&w->ring, &cqe, 1, &ts, NULL);
}

/* ------------------------------------------------------------ drain lifecycle */

/* Once a draining worker has no accept armed, it lets go of its copies of
 * the listening sockets, so that the master alone decides when a socket that
 * is no longer configured really closes. */
static void check_accept_stopped(struct worker *w)
{
    if (!w->draining || w->accept_stopped || w->accept_armed_count > 0)
        return;
    w->accept_stopped = true;
    acceptors_close(w);
    event_send(w, RINGD_EV_ACCEPT_STOPPED, 0, 0, 0, w->active);
}

static void worker_begin_drain(struct worker *w, uint64_t deadline_ms)
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
    handover_begin(w);     /* if the master gave us a newer worker to hand over to */
    check_accept_stopped(w);
}

/* stop: stop accepting and close every connection now */
static void worker_stop(struct worker *w)
{
    if (w->stopping)
        return;
    w->stopping = true;
    w->draining = true;
    w->drain_deadline_ms = w->now_ms;
    w->cfg->shm->state = RINGD_WS_DRAINING;
    listener_stop_all(w);
    conn_close_all(w, RINGD_END_DRAIN);
    check_accept_stopped(w);
}

/* A command from the master, or the master gone (control.c). */
static void on_ctrl(struct worker *w, struct io_uring_cqe *cqe)
{
    struct ringd_cmd cmd;
    int err = 0, fd = -1;

    switch (ctrl_recv(w, cqe, &cmd, &err, &fd)) {
    case CTRL_GONE:
        /* EOF or error: the master is gone */
        if (!w->stopping) {
            event_send(w, RINGD_EV_ORPHANED, err, 0, 0, w->active);
            worker_begin_drain(w, w->now_ms + w->cfg->orphan_drain_ms);
        }
        return;
    case CTRL_CMD:
        switch (cmd.cmd) {
        case RINGD_CMD_DRAIN:
            worker_begin_drain(w, w->now_ms + cmd.arg);
            break;
        case RINGD_CMD_STOP:
            worker_stop(w);
            break;
        case RINGD_CMD_POKE_ACCEPT:
            listener_poke(w);
            break;
        case RINGD_CMD_HANDOVER_TO:
            handover_to(w, fd);
            fd = -1;
            break;
        case RINGD_CMD_HANDOVER_FROM:
            handover_from(w, fd);
            fd = -1;
            break;
        default:
            break;
        }
        if (fd >= 0)
            close(fd);      /* an fd no command of ours expects */
        break;
    default:
        break;
    }
    ctrl_arm(w);
}

/* ------------------------------------------------------------ the loop */

/* Destinations that take more again (writable.c): their directions go on. */
static void on_writable(struct worker *w, struct io_uring_cqe *cqe)
{
    uint64_t tokens[WRITABLE_BATCH];
    uint32_t n;

    writable_on_cqe(w, cqe);
    do {
        n = writable_ready(w, tokens, WRITABLE_BATCH);
        for (uint32_t k = 0; k < n; k++)
            forward_writable(w, tokens[k]);
    } while (n == WRITABLE_BATCH);
    writable_arm(w);
}

static void dispatch(struct worker *w, struct io_uring_cqe *cqe)
{
    switch (ud_op(cqe->user_data)) {
    case OP_ACCEPT:
        on_accept(w, cqe);
        check_accept_stopped(w);
        break;
    case OP_CTRL:
        on_ctrl(w, cqe);
        break;
    case OP_TICK:
        on_tick(w);
        break;
    case OP_EPOLL:
        on_writable(w, cqe);
        break;
    case OP_HANDOVER:
        handover_on_cqe(w, cqe);
        break;
    case OP_ACCEPT_CANCEL:
    case OP_CANCEL:
    case OP_NOP:
    case OP_NONE:
        break;
    default:
        conn_on_cqe(w, cqe);
        break;
    }
}

static unsigned reap_once(struct worker *w)
{
    struct io_uring_cqe *cqe;
    unsigned head, n = 0;

    io_uring_for_each_cqe(&w->ring, head, cqe) {
        dispatch(w, cqe);
        n++;
    }
    io_uring_cq_advance(&w->ring, n);
    w->cfg->shm->cqes += n;
    return n;
}

static void worker_reap(struct worker *w)
{
    /* completions that did not fit in the CQ wait in the kernel's overflow
     * list until an io_uring_enter with GETEVENTS moves them over */
    while (reap_once(w) > 0 || io_uring_cq_has_overflow(&w->ring)) {
        if (io_uring_cq_has_overflow(&w->ring))
            io_uring_get_events(&w->ring);
    }
}

/* After a batch of completions: the buffer ring is topped up, and the recvs
 * that found it empty try again (bufring.c keeps the list). */
static void retry_recvs(struct worker *w)
{
    uint64_t *waiters;
    uint32_t n = bufring_service(w, &waiters);

    for (uint32_t i = 0; i < n; i++)
        forward_retry_recv(w, waiters[i]);
    free(waiters);
}

/* Take back the buffers posted above the buffer ring's target (bufring.c
 * says why it goes this way). Between passes, never inside a completion
 * handler. */
static void retract_buffers(struct worker *w)
{
    worker_reap(w);
    if (!bufring_retract_begin(w))
        return;
    worker_reap(w);
    bufring_retract_end(w);
    retry_recvs(w);     /* recvs that found no ring meanwhile */
}

static int worker_alloc(struct worker *w)
{
    const struct ringd_worker_cfg *cfg = w->cfg;
    uint64_t total = CONN_SLACK;

    for (uint32_t li = 0; li < cfg->nlisteners; li++)
        total += cfg->listeners[li].max_conns;
    if (total > 0x7fffff)
        total = 0x7fffff;
    w->nconns = (uint32_t)total;
    /* an anonymous mapping: pages are only touched as slots are used, and
     * can be handed back to the kernel when the worker goes idle */
    w->conns_bytes = (size_t)w->nconns * sizeof(struct conn);
    w->conns = mmap(NULL, w->conns_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                    -1, 0);
    if (w->conns == MAP_FAILED)
        w->conns = NULL;
    else
        madvise(w->conns, w->conns_bytes, MADV_NOHUGEPAGE);   /* see bufring_setup */
    w->ls = calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof(struct listener_rt));
    w->nacc = cfg->nacceptors;
    w->acc = calloc(w->nacc ? w->nacc : 1, sizeof(struct acceptor));
    w->pipe_max = cfg->pipe_pool;
    w->pipes = calloc(w->pipe_max ? w->pipe_max : 1, sizeof(struct pipe_ref));
    w->buf_max = 256;
    w->bufs = calloc(w->buf_max, sizeof(char *));
    if (!w->conns || !w->ls || !w->acc || !w->pipes || !w->bufs)
        return -ENOMEM;

    w->free_head = UINT32_MAX;
    w->high_water = 0;

    for (uint32_t li = 0; li < cfg->nlisteners; li++) {
        struct listener_rt *l = &w->ls[li];
        uint32_t ms = cfg->listeners[li].connect_timeout_ms;
        l->lru_head.lru_next = l->lru_head.lru_prev = &l->lru_head;
        l->probe_head.lru_next = l->probe_head.lru_prev = &l->probe_head;
        l->connect_ts.tv_sec = ms / 1000;
        l->connect_ts.tv_nsec = (long long)(ms % 1000) * 1000000;
    }
    for (uint32_t ai = 0; ai < w->nacc; ai++) {
        w->acc[ai].fd = cfg->acceptors[ai].fd;
        w->acc[ai].li = cfg->acceptors[ai].listener < cfg->nlisteners
                            ? cfg->acceptors[ai].listener : 0;
        /* accepted sockets inherit it from the listening socket: no
         * syscall per connection (the newest generation's value wins; 0
         * too, which puts the kernel's default back after a reload) */
        int lowat = (int)cfg->notsent_lowat;
        setsockopt(w->acc[ai].fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
    }
    if (balance_init(w) < 0)
        return -ENOMEM;
    int err = writable_setup(w);
    if (err < 0)
        return err;

    struct rlimit rl;
    int64_t soft = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? (int64_t)rl.rlim_cur : 1024;
    /* reserve: stdio, control socket, ring, listeners, and some slack */
    w->fd_budget = soft - 32 - (int64_t)w->nacc;
    return 0;
}

static void worker_free(struct worker *w)
{
    handover_free(w);
    writable_free(w);
    pipe_pool_drain(w);
    buf_pool_drain(w);
    balance_free(w);
    if (w->conns)
        munmap(w->conns, w->conns_bytes);
    free(w->ls);
    free(w->acc);
    free(w->pipes);
    free(w->bufs);
}

int ringd_worker_run(const struct ringd_worker_cfg *cfg)
{
    struct worker w;
    int ret;

    /* Dropping privileges cleared the dumpable flag: set it back (as nginx
     * does after setuid) so the watchdog's SIGABRT leaves a core of a wedged
     * loop. A worker holds no secret a core could leak. */
    prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);

    memset(&w, 0, sizeof(w));
    w.cfg = cfg;
    w.ctrl_fd = cfg->control_fd;
    w.epfd = -1;
    w.ho_fd = -1;
    w.pipe_size = cfg->pipe_size ? cfg->pipe_size : 1048576;
    w.rng = (uint32_t)getpid() * 2654435761u | 1u;
    w.now_ms = mono_ms();
    w.tick_ts.tv_sec = 0;
    w.tick_ts.tv_nsec = RINGD_TICK_MS * 1000000LL;

    cfg->shm->pid = getpid();
    cfg->shm->cpu = cfg->cpu;
    cfg->shm->state = RINGD_WS_STARTING;
    cfg->shm->pipe_size = w.pipe_size;

    if (cfg->test_hooks) {
        struct sigaction sa;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = on_sigusr2;
        sigaction(SIGUSR2, &sa, NULL);
    }

    ret = worker_alloc(&w);
    if (ret < 0) {
        event_send(&w, RINGD_EV_SETUP_FAILED, -ret, 1, 0, 0);
        worker_free(&w);
        return ret;
    }
    ret = ring_setup(&w);
    if (ret < 0) {
        event_send(&w, RINGD_EV_SETUP_FAILED, -ret, 2, 0, 0);
        worker_free(&w);
        return ret;
    }
    cfg->shm->ring_mode = w.ring_mode;
    cfg->shm->ring_flags = w.ring_flags;
    /* copy path: provided buffers where the kernel has them (5.19+) */
    cfg->shm->copy_mode = bufring_setup(&w) == 0 ? 1 : 2;

    /* the tick as the wait's timeout needs IORING_FEAT_EXT_ARG (5.11) */
    w.tick_wait = (w.ring.features & IORING_FEAT_EXT_ARG) != 0;
    w.tick_last_ms = w.now_ms;
    ctrl_arm(&w);
    tick_arm(&w);
    for (uint32_t li = 0; li < cfg->nlisteners; li++)
        listener_arm(&w, li);
    ret = io_uring_submit(&w.ring);
    if (ret < 0) {
        event_send(&w, RINGD_EV_SETUP_FAILED, -ret, 3, 0, 0);
        io_uring_queue_exit(&w.ring);
        worker_free(&w);
        return ret;
    }
    cfg->shm->state = RINGD_WS_ACCEPTING;
    event_send(&w, RINGD_EV_READY, 0, w.ring_mode, w.ring_flags, 0);

    while (!w.exit_loop) {
        ret = w.tick_wait ? wait_with_tick(&w) : io_uring_submit_and_wait(&w.ring, 1);
        if (stall_requested) {
            /* test hook: behave like a wedged loop (no heartbeat, no I/O) */
            for (;;)
                pause();
        }
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY && ret != -ETIME) {
            event_send(&w, RINGD_EV_SETUP_FAILED, -ret, 4, 0, 0);
            break;
        }
        w.now_ms = mono_ms();

        reap_once(&w);
        if (w.tick_wait && w.now_ms - w.tick_last_ms >= RINGD_TICK_MS &&
            (tick_needed(&w) || w.now_ms - w.tick_last_ms >= w.cfg->heartbeat_ms))
            on_tick(&w);
        retry_recvs(&w);
        if (w.br_retract)
            retract_buffers(&w);
        w.passes++;
        cfg->shm->loops++;

        if (w.draining && w.active == 0 && w.accept_armed_count == 0)
            break;
    }

    cfg->shm->state = RINGD_WS_EXITED;
    event_send(&w, RINGD_EV_EXITING, 0, 0, 0, w.closed_at_deadline);
    bufring_free(&w);
    io_uring_queue_exit(&w.ring);
    worker_free(&w);
    return 0;
}
