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
 * follows the number of flows that actually have bytes in flight. When the
 * ring runs dry (-ENOBUFS), the recv waits in a list and the target doubles.
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

#define BR_ENTRIES 4096u        /* ring slots (power of two, max 32768) */
#define BR_MAX_BUFS 4096u       /* buffers we may ever own per worker */
#define BR_TARGET_START 32u

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
    w->br_free = calloc(w->br_max, sizeof(uint16_t));
    if (w->br_region == MAP_FAILED || !w->br_free) {
        if (w->br_region == MAP_FAILED)
            w->br_region = NULL;
        bufring_free(w);
        return -ENOMEM;
    }
    io_uring_buf_ring_init(w->br);

    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)w->br;
    reg.ring_entries = BR_ENTRIES;
    reg.bgid = RINGD_BGID;
    int ret = io_uring_register_buf_ring(&w->ring, &reg, 0);
    if (ret < 0) {
        bufring_free(w);
        return ret;
    }
    w->br_registered = true;
    /* lowest ids on top of the stack: they are the ones reused */
    for (uint32_t i = 0; i < w->br_max; i++)
        w->br_free[i] = (uint16_t)(w->br_max - 1 - i);
    w->br_nfree = w->br_max;
    w->br_posted = 0;
    w->br_target = BR_TARGET_START;
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
    free(w->br_wait);
    w->br = NULL;
    w->br_region = NULL;
    w->br_free = NULL;
    w->br_wait = NULL;
}

char *bufring_addr(struct worker *w, uint16_t bid)
{
    return w->br_region + (size_t)bid * w->br_size;
}

/* Post free buffers until `target` are in the ring. */
void bufring_refill(struct worker *w)
{
    int mask = io_uring_buf_ring_mask(BR_ENTRIES);
    int n = 0;

    while (w->br_posted < w->br_target && w->br_nfree > 0 && w->br_posted < BR_ENTRIES) {
        uint16_t bid = w->br_free[--w->br_nfree];
        io_uring_buf_ring_add(w->br, bufring_addr(w, bid), w->br_size, bid, mask, n);
        n++;
        w->br_posted++;
    }
    if (n)
        io_uring_buf_ring_advance(w->br, n);
    w->cfg->shm->bufs_posted = w->br_posted;
}

/* The kernel handed a posted buffer to a recv. */
void bufring_consumed(struct worker *w)
{
    if (w->br_posted > 0)
        w->br_posted--;
}

void bufring_release(struct worker *w, uint16_t bid)
{
    if (w->br_nfree < w->br_max)
        w->br_free[w->br_nfree++] = bid;
}

/* A recv found the ring empty: remember it, and post more next time. */
void bufring_wait(struct worker *w, uint64_t token)
{
    if (w->br_target < w->br_max)
        w->br_target *= 2;
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

/* After a batch of completions: top the ring up, then retry the recvs that
 * found it empty (only if there is something to give them). */
void bufring_service(struct worker *w)
{
    if (!w->br)
        return;
    bufring_refill(w);
    if (w->br_nwait == 0 || w->br_posted == 0)
        return;
    uint32_t n = w->br_nwait;
    uint64_t *list = w->br_wait;
    w->br_wait = NULL;
    w->br_nwait = 0;
    w->br_wait_cap = 0;
    for (uint32_t i = 0; i < n; i++)
        conn_retry_recv(w, list[i]);
    free(list);
}

/* Idle worker: give the pages of the buffers back (contents are garbage). */
void bufring_trim(struct worker *w)
{
    if (w->br_region)
        madvise(w->br_region, w->br_region_bytes, MADV_DONTNEED);
}
