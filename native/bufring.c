/*
 * bufring.c: provided buffers for the copy path.
 *
 * A direction in copy mode posts a recv without a buffer; the kernel picks one
 * from this worker's buffer ring only when data arrives. So an idle
 * connection holds no buffer, and a message costs two ops (recv, send)
 * instead of three (poll, recv, send).
 *
 * The ring is FIFO: if we posted every buffer we own, the kernel would cycle
 * through all of them and touch every page. Instead we keep only `target`
 * buffers posted and refill from a LIFO stack of free buffer ids, so the
 * recently used (warm) buffers are the ones reused and the memory in use
 * follows the number of flows that actually have bytes in flight.
 *
 * The target follows demand both ways. When the ring runs dry (-ENOBUFS) the
 * recv waits in a list and the target doubles, at most once per loop pass
 * (one batch of completions that all found the ring empty is one shortage,
 * not one per recv). Once per decay window without the ring running dry,
 * the target comes down to twice what the window used. Buffers already
 * posted above a lowered target belong to the kernel until a recv picks one;
 * the next trim takes them back (bufring_retract_begin/_end).
 *
 * Memory goes back in idle_trim (worker.c) through bufring_trim: buffers
 * that sat at the bottom of the free stack since the last trim have their
 * pages dropped (MADV_DONTNEED; a buffer's contents never matter before a
 * recv fills it). With no connection at all, no recv can pick a buffer, so
 * the ring itself is emptied and re-registered with the starting target.
 * A buffer whose pages were dropped is "cold"; the kernel writing into one
 * again is growth (note_growth), which is what makes a trim due.
 *
 * liburing 2.3 has io_uring_register_buf_ring but no io_uring_setup_buf_ring:
 * we map the page-aligned ring ourselves. Kernels without buffer rings
 * (< 5.19) make setup fail and the copy path falls back to poll + recv into
 * a buffer taken from a plain pool.
 */
#include "ringd.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BR_ENTRIES 4096u        /* ring slots (power of two, max 32768) */
#define BR_MAX_BUFS 4096u       /* buffers we may ever own per worker */
#define BR_TARGET_START 32u
#define BR_DECAY_MS 1000u       /* the target comes down at most once per window */

/* IORING_REGISTER_PBUF_STATUS (Linux 6.8+; not in liburing 2.3): the
 * kernel's head of a buffer ring. Older kernels answer EINVAL. */
#define RINGD_REGISTER_PBUF_STATUS 26
struct ringd_buf_status {
    uint32_t buf_group;
    uint32_t head;
    uint32_t resv[8];
};

static int br_register(struct worker *w)
{
    struct io_uring_buf_reg reg;

    io_uring_buf_ring_init(w->br);
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)w->br;
    reg.ring_entries = BR_ENTRIES;
    reg.bgid = RINGD_BGID;
    int ret = io_uring_register_buf_ring(&w->ring, &reg, 0);
    w->br_registered = ret == 0;
    return ret;
}

/* Every buffer back on the free stack, lowest ids on top (reused first). */
static void br_reset_stack(struct worker *w)
{
    for (uint32_t i = 0; i < w->br_max; i++)
        w->br_free[i] = (uint16_t)(w->br_max - 1 - i);
    w->br_nfree = w->br_max;
    w->br_nfree_min = w->br_max;
    w->br_posted = 0;
    w->br_posted_min = 0;
    w->br_target = BR_TARGET_START;
    w->cfg->shm->bufs_target = w->br_target;
}

int bufring_setup(struct worker *w)
{
    uint32_t size = w->cfg->copy_buffer_size;
    size_t ring_bytes = BR_ENTRIES * sizeof(struct io_uring_buf);

    w->br_size = size;
    w->br_max = BR_MAX_BUFS;
    w->br = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (w->br == MAP_FAILED) {
        w->br = NULL;
        return -ENOMEM;
    }
    w->br_region_bytes = (size_t)w->br_max * size;
    w->br_region = mmap(NULL, w->br_region_bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    /* With transparent huge pages set to "always", the first buffer touched
     * in a 2 MiB stretch would cost 2 MiB, and dropping one buffer's pages
     * would split the huge page: memory would no longer follow buffer use. */
    if (w->br_region != MAP_FAILED)
        madvise(w->br_region, w->br_region_bytes, MADV_NOHUGEPAGE);
    w->br_free = calloc(w->br_max, sizeof(uint16_t));
    w->br_is_cold = calloc(w->br_max, sizeof(uint8_t));
    w->br_scratch = calloc(w->br_max, sizeof(uint16_t));
    w->br_ring_bid = calloc(BR_ENTRIES, sizeof(uint16_t));
    if (w->br_region == MAP_FAILED || !w->br_free || !w->br_is_cold || !w->br_scratch ||
        !w->br_ring_bid) {
        if (w->br_region == MAP_FAILED)
            w->br_region = NULL;
        bufring_free(w);
        return -ENOMEM;
    }
    /* nothing touched yet: every buffer is cold */
    memset(w->br_is_cold, 1, w->br_max);
    int ret = br_register(w);
    if (ret < 0) {
        bufring_free(w);
        return ret;
    }
    br_reset_stack(w);
    w->br_decay_ms = w->now_ms;
    bufring_refill(w);
    return 0;
}

void bufring_free(struct worker *w)
{
    if (w->br_registered)
        io_uring_unregister_buf_ring(&w->ring, RINGD_BGID);
    w->br_registered = false;
    if (w->br)
        munmap(w->br, BR_ENTRIES * sizeof(struct io_uring_buf));
    if (w->br_region)
        munmap(w->br_region, w->br_region_bytes);
    free(w->br_free);
    free(w->br_is_cold);
    free(w->br_scratch);
    free(w->br_ring_bid);
    free(w->br_wait);
    w->br = NULL;
    w->br_region = NULL;
    w->br_free = NULL;
    w->br_is_cold = NULL;
    w->br_scratch = NULL;
    w->br_ring_bid = NULL;
    w->br_wait = NULL;
}

char *bufring_addr(struct worker *w, uint16_t bid)
{
    return w->br_region + (size_t)bid * w->br_size;
}

/* Post free buffers until `target` are in the ring. Posting touches no
 * page of the buffer: only the kernel's write does (bufring_consumed). */
void bufring_refill(struct worker *w)
{
    int mask = io_uring_buf_ring_mask(BR_ENTRIES);
    int n = 0;

    if (!w->br_registered)
        return;
    while (w->br_posted < w->br_target && w->br_nfree > 0 && w->br_posted < BR_ENTRIES) {
        uint16_t bid = w->br_free[--w->br_nfree];
        /* which buffer sits in which ring entry, for bufring_retract_end */
        w->br_ring_bid[(uint16_t)(w->br->tail + n) & mask] = bid;
        io_uring_buf_ring_add(w->br, bufring_addr(w, bid), w->br_size, bid, mask, n);
        n++;
        w->br_posted++;
    }
    if (n)
        io_uring_buf_ring_advance(w->br, n);
    if (w->br_nfree < w->br_nfree_min)
        w->br_nfree_min = w->br_nfree;
    struct ringd_worker_shm *shm = w->cfg->shm;
    shm->bufs_posted = w->br_posted;
    uint64_t out = w->br_max - w->br_nfree;     /* posted or held by a connection */
    if (out > shm->bufs_high_water)
        shm->bufs_high_water = out;
}

/* The kernel handed a posted buffer to a recv (and wrote into it). */
void bufring_consumed(struct worker *w, uint16_t bid)
{
    if (w->br_posted > 0)
        w->br_posted--;
    if (w->br_posted < w->br_posted_min)
        w->br_posted_min = w->br_posted;
    if (bid < w->br_max && w->br_is_cold[bid]) {
        w->br_is_cold[bid] = 0;
        note_growth(w);
    }
}

void bufring_release(struct worker *w, uint16_t bid)
{
    if (w->br_nfree < w->br_max)
        w->br_free[w->br_nfree++] = bid;
}

/* A recv found the ring empty: remember it, and post more next time. */
void bufring_wait(struct worker *w, uint64_t token)
{
    /* (while a retract has the ring unregistered, an empty ring is no
     * shortage) */
    if (w->br_registered)
        w->br_dry = true;
    if (w->br_registered && w->br_grow_pass != w->passes && w->br_target < w->br_max) {
        w->br_grow_pass = w->passes;
        w->br_target *= 2;
        w->cfg->shm->bufs_target = w->br_target;
        note_growth(w);
    }
    if (w->br_nwait == w->br_wait_cap) {
        uint32_t cap = w->br_wait_cap ? w->br_wait_cap * 2 : 64;
        uint64_t *nw = realloc(w->br_wait, cap * sizeof(uint64_t));
        if (!nw)
            return;         /* the idle timeout will reap that connection */
        w->br_wait = nw;
        w->br_wait_cap = cap;
    }
    w->br_wait[w->br_nwait++] = token;
    w->cfg->shm->buf_waits++;
}

/* After a batch of completions: top the ring up. Returns how many recvs
 * found it empty, with their user_data tokens in *waiters for the loop to
 * retry (the caller frees the list), or 0 while there is nothing to give
 * them. */
uint32_t bufring_service(struct worker *w, uint64_t **waiters)
{
    *waiters = NULL;
    if (!w->br)
        return 0;
    if (!w->br_registered && br_register(w) == 0)
        w->br_posted = 0;     /* a retract could not register it again: retry */
    bufring_refill(w);
    if (w->br_nwait == 0 || w->br_posted == 0)
        return 0;
    uint32_t n = w->br_nwait;
    *waiters = w->br_wait;
    w->br_wait = NULL;
    w->br_nwait = 0;
    w->br_wait_cap = 0;
    return n;
}

/* Once per window: the ring never held fewer than br_posted_min unused
 * buffers, so target - br_posted_min were enough. Unless it ran dry, the
 * target comes down to twice that (a power of two, not below the start). */
void bufring_decay(struct worker *w)
{
    if (!w->br || w->now_ms - w->br_decay_ms < BR_DECAY_MS)
        return;
    if (!w->br_dry && w->br_target > BR_TARGET_START) {
        uint32_t used = w->br_target > w->br_posted_min ? w->br_target - w->br_posted_min : 0;
        uint32_t t = BR_TARGET_START;
        while (t < 2 * used && t < w->br_target)
            t *= 2;
        if (t < w->br_target) {
            w->br_target = t;
            w->cfg->shm->bufs_target = t;
        }
    }
    w->br_dry = false;
    w->br_posted_min = w->br_posted;
    w->br_decay_ms = w->now_ms;
}

/* Nothing left for the tick to do here: the target is back at its start
 * and no retraction or waiting recv is pending. */
bool bufring_at_rest(const struct worker *w)
{
    return !w->br || (w->br_target <= BR_TARGET_START && !w->br_retract && w->br_nwait == 0);
}

static int cmp_u16(const void *a, const void *b)
{
    return (int)*(const uint16_t *)a - (int)*(const uint16_t *)b;
}

/* Drop the pages of these buffers (ids sorted, adjacent ones in one call). */
static void drop_pages(struct worker *w, uint16_t *ids, uint32_t n)
{
    qsort(ids, n, sizeof(*ids), cmp_u16);
    for (uint32_t i = 0; i < n;) {
        uint32_t j = i + 1;
        while (j < n && ids[j] == ids[j - 1] + 1)
            j++;
        madvise(bufring_addr(w, ids[i]), (size_t)(j - i) * w->br_size, MADV_DONTNEED);
        for (uint32_t k = i; k < j; k++)
            w->br_is_cold[ids[k]] = 1;
        i = j;
    }
}

/*
 * Give buffer memory back; returns whether any was. idle: no connection is
 * open, so no recv can pick a buffer: every page goes, and the target
 * starts over. Otherwise only buffers that stayed on the free stack since
 * the last trim or growth, i.e. the bottom br_nfree_min entries of the LIFO
 * stack, which nothing popped in that time. Buffers posted above the target
 * are taken back by bufring_retract_begin/_end, which the loop runs once
 * every completion so far is handled.
 */
bool bufring_trim(struct worker *w, bool idle)
{
    bool gave = false;

    if (!w->br)
        return false;
    if (idle) {
        for (uint32_t b = 0; b < w->br_max && !gave; b++)
            gave = !w->br_is_cold[b];
        madvise(w->br_region, w->br_region_bytes, MADV_DONTNEED);
        memset(w->br_is_cold, 1, w->br_max);
        w->br_target = BR_TARGET_START;
        w->cfg->shm->bufs_target = w->br_target;
    } else {
        uint32_t n = 0;
        for (uint32_t i = 0; i < w->br_nfree_min && i < w->br_nfree; i++)
            if (!w->br_is_cold[w->br_free[i]])
                w->br_scratch[n++] = w->br_free[i];
        if (n) {
            drop_pages(w, w->br_scratch, n);
            gave = true;
        }
    }
    if (w->br_posted > w->br_target) {
        w->br_retract = true;
        gave = true;
    }
    w->br_nfree_min = w->br_nfree;
    return gave;
}

/* The kernel's head of the ring, or -1 where it cannot tell (before 6.8). */
static int br_kernel_head(struct worker *w)
{
    struct ringd_buf_status st;

    memset(&st, 0, sizeof(st));
    st.buf_group = RINGD_BGID;
    if (syscall(__NR_io_uring_register, w->ring.ring_fd, RINGD_REGISTER_PBUF_STATUS, &st, 1) < 0)
        return -1;
    return (int)(uint16_t)st.head;
}

/*
 * Take back the buffers posted above the target. The kernel cannot be asked
 * to hand one back, so the ring is unregistered and registered again with
 * only `target` posted. That is safe while recvs are armed: an armed recv
 * looks its buffer group up when data arrives and finds the new ring (or
 * none yet: it completes with -ENOBUFS and waits like any other). A recv
 * that took a buffer did so under the ring's lock, which unregistering takes
 * too, and posted its completion before letting go; once those completions
 * are handled, br_posted counts exactly the entries no recv took, the newest
 * br_posted ones (the kernel takes them in order). Where the kernel tells
 * its head (6.8+), a recv still holding a buffer it has not completed (only
 * an io-wq recv could) postpones the retract to a later trim.
 *
 * The event loop drives it between passes, never inside a completion
 * handler (worker.c, retract_buffers): it handles every completion so far,
 * bufring_retract_begin unregisters the ring (false: nothing to take back,
 * or postponed), the loop handles the completions again, and
 * bufring_retract_end takes the buffers back and registers the ring again;
 * then the recvs that found no ring meanwhile are retried (bufring_service).
 */
bool bufring_retract_begin(struct worker *w)
{
    w->br_retract = false;
    if (!w->br || !w->br_registered || w->br_posted <= w->br_target)
        return false;
    uint16_t tail = w->br->tail;    /* only we move it */
    int head = br_kernel_head(w);
    if (head >= 0 && (uint16_t)head != (uint16_t)(tail - w->br_posted))
        return false;
    io_uring_unregister_buf_ring(&w->ring, RINGD_BGID);
    w->br_registered = false;
    return true;
}

void bufring_retract_end(struct worker *w)
{
    int mask = io_uring_buf_ring_mask(BR_ENTRIES);
    uint16_t first = (uint16_t)(w->br->tail - w->br_posted);
    uint32_t n = w->br_posted;

    for (uint32_t k = 0; k < n; k++)
        w->br_scratch[k] = w->br_ring_bid[(uint16_t)(first + k) & mask];
    drop_pages(w, w->br_scratch, n);
    for (uint32_t k = 0; k < n; k++)
        bufring_release(w, w->br_scratch[k]);
    w->br_posted = 0;
    if (br_register(w) == 0)
        bufring_refill(w);
    w->br_posted_min = w->br_posted;
    w->cfg->shm->bufs_posted = w->br_posted;
}
