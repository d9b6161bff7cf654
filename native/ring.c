/*
 * ring.c: io_uring setup for a worker, the SQE helpers, clocks, and the
 * small feature probe the metrics and tests read (ringd_probe).
 */
#include "ringd.h"

#include <errno.h>
#include <string.h>
#include <time.h>

#ifndef RINGD_LIBURING_MAJOR
#define RINGD_LIBURING_MAJOR 2
#endif
#ifndef RINGD_LIBURING_MINOR
#define RINGD_LIBURING_MINOR 3
#endif

uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t real_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t ringd_monotonic_ms(void)
{
    return mono_ms();
}

static int try_init(struct worker *w, uint32_t mode, uint32_t flags, unsigned entries)
{
    const struct ringd_worker_cfg *cfg = w->cfg;
    struct io_uring_params p;
    int ret;

    memset(&p, 0, sizeof(p));
    /* A CQ four times the SQ absorbs bursts of completions. The kernel caps
     * CQ entries (IORING_MAX_CQ_ENTRIES, 65536 on 6.x) and refuses a larger
     * cq_entries with EINVAL unless asked to clamp: with [ring] entries at
     * 32768, the top of its documented range, the CQ gets the kernel's
     * maximum instead of failing the worker. */
    p.flags = flags | IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
    p.cq_entries = entries * 4;
    if (mode == RINGD_RING_SQPOLL) {
        p.sq_thread_idle = cfg->sq_thread_idle_ms;
        if (cfg->sq_cpu >= 0)
            p.sq_thread_cpu = (uint32_t)cfg->sq_cpu;
        else
            p.flags &= ~IORING_SETUP_SQ_AFF;
    }
    ret = io_uring_queue_init_params(entries, &w->ring, &p);
    if (ret == 0) {
        w->ring_mode = mode;
        w->ring_flags = p.flags;
        w->ring_ok = true;
        w->cqe_skip = (w->ring.features & IORING_FEAT_CQE_SKIP) != 0;
    }
    return ret;
}

/*
 * Try the wanted setup first, then step down. SQPOLL gets its poller pinned
 * to the worker's own CPU; without SQPOLL the worker is the only submitter,
 * so SINGLE_ISSUER | DEFER_TASKRUN lets completions run only when we ask,
 * in batches, instead of interrupting us (6.1+; else COOP_TASKRUN, 5.19+).
 * SUBMIT_ALL (5.18+) keeps a batch going past one bad SQE.
 */
int ring_setup(struct worker *w)
{
    static const struct { uint32_t mode, flags; } tries[] = {
        { RINGD_RING_SQPOLL, IORING_SETUP_SQPOLL | IORING_SETUP_SQ_AFF },
        { RINGD_RING_DEFER_TASKRUN, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN },
        { RINGD_RING_COOP_TASKRUN, IORING_SETUP_COOP_TASKRUN },
        { RINGD_RING_PLAIN, 0 },
    };
    unsigned entries = w->cfg->entries ? w->cfg->entries : 4096;
    int ret = -EINVAL;

    for (size_t i = w->cfg->sqpoll ? 0 : 1; i < sizeof(tries) / sizeof(tries[0]); i++) {
        ret = try_init(w, tries[i].mode, tries[i].flags | IORING_SETUP_SUBMIT_ALL, entries);
        if (ret == -EINVAL)
            ret = try_init(w, tries[i].mode, tries[i].flags, entries);
        if (ret == 0 || ret == -ENOMEM || ret == -EMFILE || ret == -ENFILE)
            return ret;   /* stepping down will not help with a shortage */
    }
    return ret;
}

/* Operations whose success needs no handling (closes, cancels) post a
 * completion only when they fail, where the kernel can skip it. */
void sqe_quiet(struct worker *w, struct io_uring_sqe *sqe)
{
    if (w->cqe_skip)
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
}

/* Cancel the op with this user_data; quiet: a cancel needs no handling. */
void sqe_cancel(struct worker *w, uint64_t target)
{
    struct io_uring_sqe *sqe = get_sqe(w);
    io_uring_prep_cancel64(sqe, target, 0);
    io_uring_sqe_set_data64(sqe, ud_make(OP_CANCEL, 0, 0, 0));
    sqe_quiet(w, sqe);
}

/* An SQE, submitting what is queued if the SQ ring is full. */
struct io_uring_sqe *get_sqe(struct worker *w)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);
    while (!sqe) {
        io_uring_submit(&w->ring);
        sqe = io_uring_get_sqe(&w->ring);
    }
    return sqe;
}

/* What the metrics and the tests read: the liburing we were built against,
 * and whether the kernel skips successful completions (one small ring). */
int ringd_probe(struct ringd_features *f)
{
    struct io_uring ring;
    struct io_uring_params p;
    int ret;

    memset(f, 0, sizeof(*f));
    f->liburing_major = RINGD_LIBURING_MAJOR;
    f->liburing_minor = RINGD_LIBURING_MINOR;

    memset(&p, 0, sizeof(p));
    ret = io_uring_queue_init_params(8, &ring, &p);
    if (ret < 0)
        return ret;
    f->have_cqe_skip = (p.features & IORING_FEAT_CQE_SKIP) != 0;
    io_uring_queue_exit(&ring);
    return 0;
}
