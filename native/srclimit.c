/*
 * srclimit.c: the per-source limit table: open connections and a rate
 * window per (listener, client address), shared by every worker process of
 * the host, for max_connections_per_source and connection_rate_per_source.
 *
 * Memory. One MAP_SHARED mapping (a memfd of the master, created once per
 * master lifetime, so the counts survive reloads: old and new generations
 * count in the same table while the old one drains). Layout:
 *
 *   struct ringd_srclimit_header        128 bytes (sizes, seed, counters)
 *   uint32_t col_used[columns]          1 once a column counted anything
 *                                       (rounded up to 64 bytes)
 *   slot [entries], entry_size bytes each:
 *     lock, used, key (lkey, addr[16]), rate window, open[columns]
 *
 * The memory must come zeroed (a fresh memfd or anonymous mapping) and init
 * writes only the header: pages are taken as slots are used, so a table no
 * listener uses costs address space, not memory, and the master's scans
 * (clear_column, usage) skip pages never written (mincore) rather than make
 * them resident. Bytes: about entries * (56 + 4 * columns); 65536 slots and
 * 16 columns: 7.5 MiB at most.
 *
 * Columns. Every worker process gets a column from the master at spawn
 * (a column per process, not per worker slot: during a drain the old and the
 * new worker of a slot live at the same time) and counts its open
 * connections in open[column] of the slot. A source's open total is the sum
 * of its row. When the master reaps a process it clears that column
 * (srclimit_clear_column): a worker SIGKILLed with 500 connections open from
 * one source leaves no trace, whatever it was doing when it died. The master
 * sizes the table with 4 columns per CPU (at least 16, at most
 * SRCLIMIT_MAX_COLUMNS): enough for two generations at once and a few more
 * draining. A process that finds no free column runs without the table.
 * A connection that moves to another process moves its count with
 * srclimit_move (the sum never drops below the truth while it moves).
 *
 * Concurrency: per-slot spinlocks with bounded waiting, not a lock-free
 * table. A slot holds several fields that change together (the key when it
 * is claimed, the two window counters), which lock-free code could only
 * update through a seqlock or double-width CAS; a lock held for a few dozen
 * instructions is simpler to get right and as fast uncontended (one CAS).
 * The lock word holds the holder's column + 1, so the master can free the
 * locks of a process that died holding one (clear_column). Waiting is
 * bounded: SPIN_PAUSE pause loops (a few microseconds), then sched_yield
 * (the holder may be preempted on this same CPU: during a drain the old and
 * the new worker of a slot share it) for at most WAIT_NS, 200 us, past which
 * one more time slice given away is the worst case. A lock not obtained in
 * time admits the connection untracked and counts it (lock_timeouts), so a
 * stuck or slow holder never stalls a worker's loop and locks can never
 * deadlock. Counts use atomics and are changed without the lock by release
 * and move (they only decrease the count, or increase one column before
 * decreasing another); increments by acquire happen under the slot lock,
 * after the limit check, so two processes cannot both take the last place.
 *
 * Lookup: open addressing with linear probing over at most probe_max
 * (SRCLIMIT_PROBE_MAX) slots from the key's home slot. An acquire locks the
 * home slot first and keeps it for the whole lookup: every acquire of a key
 * goes through its home, so two processes cannot insert the same new key
 * twice. Slots are never emptied, only reused, so a lookup stops at the first
 * empty slot. The hash (a 64-bit mix of the key with a random per-table
 * seed) is not a cryptographic PRF, but without the seed an attacker cannot
 * precompute addresses that collide in this table.
 *
 * Rate: a sliding window of two fixed windows of rate_ms (the way HAProxy's
 * conn_rate / freq_ctr estimates): estimate = previous window * (the part of
 * it still inside the sliding window) + current window. A connection is
 * admitted while estimate + 1 <= rate_count. Three integers per slot and ms
 * resolution; "50/s" (50, 1000) and "600/m" (600, 60000) behave alike, with
 * no burst above the rate that a token bucket of the same size would allow
 * at the start of a window. Only admitted connections count: a client that
 * keeps knocking above its rate gets in again as soon as its admitted
 * connections fall out of the window. rate_ms is clamped to 1 ms .. 1 day.
 *
 * Full table: a slot is reusable when no connection is open on it and its
 * rate window has expired (nothing it holds would change a decision). A new
 * key takes the first empty or reusable slot of its probe window (a reuse is
 * an eviction, counted). With neither, or a slot lock not obtained in time,
 * the connection is admitted UNTRACKED and counted (untracked): it is not
 * counted against its source and release ignores it. Refusing instead would
 * let anyone who fills the table (65536 addresses of one IPv6 /48) lock out
 * every new legitimate client; admitting means limits are not enforced for
 * sources that find no room, which the counter and its metric make visible
 * (raise source_table_size). The probe bound keeps every operation O(1).
 *
 * C never prints: the master reads the header counters.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "srclimit.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define HDR_SIZE 128
#define SPIN_PAUSE 256          /* pause loops before yielding the CPU */
#define SPIN_YIELD 64           /* sched_yield calls at most ... */
#define WAIT_NS 200000          /* ... and no more waiting than this */
#define RATE_MS_MAX 86400000u

_Static_assert(sizeof(struct ringd_srclimit_header) == HDR_SIZE, "srclimit header size");

struct slot {
    uint32_t lock;             /* 0 free, else the holder's column + 1 */
    uint32_t used;             /* 1: holds a key */
    uint64_t lkey;
    uint8_t addr[16];
    uint64_t win_start;        /* ms: start of the current rate window */
    uint32_t rate_ms;          /* window the counts belong to, 0: no rate kept */
    uint32_t rate_cur;         /* admitted in the current window */
    uint32_t rate_prev;        /* admitted in the previous window */
    uint32_t pad;
    uint32_t open[];           /* [columns]: open connections per process */
};

#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t entry_size(uint32_t columns)
{
    return (sizeof(struct slot) + (uint64_t)columns * sizeof(uint32_t) + 7) & ~(uint64_t)7;
}

static inline struct ringd_srclimit_header *hdr_of(const void *mem)
{
    return (struct ringd_srclimit_header *)mem;
}

static uint64_t slots_offset(uint32_t columns)
{
    return HDR_SIZE + (((uint64_t)columns * sizeof(uint32_t) + 63) & ~(uint64_t)63);
}

static inline uint32_t *col_used(const struct ringd_srclimit_header *h)
{
    return (uint32_t *)((char *)h + HDR_SIZE);
}

static inline struct slot *slot_at(const struct ringd_srclimit_header *h, uint32_t i)
{
    return (struct slot *)((char *)h + slots_offset(h->columns) + (size_t)i * h->entry_size);
}

uint64_t srclimit_bytes(uint32_t entries, uint32_t columns)
{
    if (entries < 1 || entries > SRCLIMIT_MAX_ENTRIES ||
        columns < 1 || columns > SRCLIMIT_MAX_COLUMNS)
        return 0;
    return slots_offset(columns) + (uint64_t)entries * entry_size(columns);
}

int srclimit_init(void *mem, uint64_t len, uint32_t entries, uint32_t columns)
{
    uint64_t need = srclimit_bytes(entries, columns);
    if (!mem || !need || len < need)
        return -EINVAL;
    struct ringd_srclimit_header *h = hdr_of(mem);
    if (h->magic)
        return -EINVAL;     /* not fresh memory: an existing table is adopted, not reset */
    memset(h, 0, HDR_SIZE);
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed)) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed = mix((uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 32) ^
                   (uint64_t)getpid() ^ (uint64_t)(uintptr_t)mem);
    }
    h->entries = entries;
    h->columns = columns;
    h->entry_size = (uint32_t)entry_size(columns);
    h->probe_max = entries < SRCLIMIT_PROBE_MAX ? entries : SRCLIMIT_PROBE_MAX;
    h->bytes = need;
    h->seed = seed;
    h->version = SRCLIMIT_VERSION;
    __atomic_store_n(&h->magic, SRCLIMIT_MAGIC, __ATOMIC_RELEASE);
    return 0;
}

int srclimit_check(const void *mem, uint64_t len)
{
    if (!mem || len < HDR_SIZE)
        return -EINVAL;
    const struct ringd_srclimit_header *h = hdr_of(mem);
    if (__atomic_load_n(&h->magic, __ATOMIC_ACQUIRE) != SRCLIMIT_MAGIC ||
        h->version != SRCLIMIT_VERSION)
        return -EINVAL;
    uint64_t need = srclimit_bytes(h->entries, h->columns);
    uint32_t probe = h->entries < SRCLIMIT_PROBE_MAX ? h->entries : SRCLIMIT_PROBE_MAX;
    if (!need || h->bytes != need || len < need ||
        h->entry_size != entry_size(h->columns) || h->probe_max != probe)
        return -EINVAL;
    return 0;
}

/* The column has taken a lock or a count since it was last cleared (set
 * before either, so clear_column may skip a column that never did). */
static inline void mark_column(struct ringd_srclimit_header *h, uint32_t column)
{
    uint32_t *cu = &col_used(h)[column];
    if (!LOAD(cu))
        __atomic_store_n(cu, 1, __ATOMIC_SEQ_CST);
}

/* ------------------------------------------------------------ locking */

static int slot_lock(struct ringd_srclimit_header *h, struct slot *s, uint32_t token)
{
    uint32_t z = 0;
    if (__atomic_compare_exchange_n(&s->lock, &z, token, false, __ATOMIC_ACQUIRE,
                                    __ATOMIC_RELAXED))
        return 1;
    ADD(&h->contended, 1);
    struct timespec t0, t;
    for (unsigned i = 0; i < SPIN_PAUSE + SPIN_YIELD; i++) {
        if (i < SPIN_PAUSE) {
            cpu_relax();
        } else {
            /* the holder may be preempted on this very CPU (the old and the
             * new worker of a slot share it during a drain): let it run */
            if (i == SPIN_PAUSE)
                clock_gettime(CLOCK_MONOTONIC, &t0);
            sched_yield();
            clock_gettime(CLOCK_MONOTONIC, &t);
            if ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) > WAIT_NS)
                break;
        }
        if (LOAD(&s->lock) == 0) {
            z = 0;
            if (__atomic_compare_exchange_n(&s->lock, &z, token, false, __ATOMIC_ACQUIRE,
                                            __ATOMIC_RELAXED))
                return 1;
        }
    }
    ADD(&h->lock_timeouts, 1);
    return 0;
}

static inline void slot_unlock(struct slot *s)
{
    __atomic_store_n(&s->lock, 0, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------ slots */

static uint32_t open_total(const struct ringd_srclimit_header *h, const struct slot *s)
{
    uint64_t sum = 0;
    for (uint32_t c = 0; c < h->columns; c++)
        sum += LOAD(&s->open[c]);
    return sum > UINT32_MAX ? UINT32_MAX : (uint32_t)sum;
}

/* Move the window pair forward to now (lock held, s->rate_ms > 0). */
static void window_advance(struct slot *s, uint64_t now)
{
    if (now < s->win_start)
        return;                 /* clocks of the same host never go back; be safe */
    uint64_t d = now - s->win_start;
    if (d < s->rate_ms)
        return;
    if (d < 2 * (uint64_t)s->rate_ms) {
        s->rate_prev = s->rate_cur;
        s->win_start += s->rate_ms;
    } else {
        s->rate_prev = 0;
        s->win_start = now;
    }
    s->rate_cur = 0;
}

/* Nothing in the slot would change a decision any more (lock held, or a
 * racy read for srclimit_usage). */
static bool slot_idle(const struct ringd_srclimit_header *h, const struct slot *s, uint64_t now)
{
    if (open_total(h, s))
        return false;
    uint32_t rms = s->rate_ms;
    if (!rms || (!s->rate_cur && !s->rate_prev))
        return true;
    return now >= s->win_start && now - s->win_start >= 2 * (uint64_t)rms;
}

static int admit(struct ringd_srclimit_header *h, struct slot *s, uint32_t i, uint32_t column,
                 uint32_t max_open, uint32_t rate_count, uint32_t rate_ms, uint64_t now,
                 uint32_t *ref_out)
{
    if (rate_count) {
        if (rate_ms < 1)
            rate_ms = 1;
        if (rate_ms > RATE_MS_MAX)
            rate_ms = RATE_MS_MAX;
        if (s->rate_ms != rate_ms) {        /* new key, or the listener's rate changed */
            s->rate_ms = rate_ms;
            s->win_start = now;
            s->rate_cur = 0;
            s->rate_prev = 0;
        }
        window_advance(s, now);
    } else if (s->rate_ms) {
        s->rate_ms = 0;
        s->rate_cur = 0;
        s->rate_prev = 0;
    }
    if (max_open && open_total(h, s) >= max_open)
        return SRCLIMIT_OVER_OPEN;
    if (rate_count) {
        uint64_t elapsed = now > s->win_start ? now - s->win_start : 0;
        if (elapsed > rate_ms)
            elapsed = rate_ms;
        /* estimate + 1 <= rate_count, scaled by rate_ms: < 2^32 * 2^27 * 3 */
        uint64_t scaled = (uint64_t)s->rate_prev * (rate_ms - elapsed) +
                          ((uint64_t)s->rate_cur + 1) * rate_ms;
        if (scaled > (uint64_t)rate_count * rate_ms)
            return SRCLIMIT_OVER_RATE;
        if (s->rate_cur < UINT32_MAX)
            s->rate_cur++;
    }
    ADD(&s->open[column], 1);
    *ref_out = i;
    return SRCLIMIT_OK;
}

static uint32_t home_of(const struct ringd_srclimit_header *h, uint64_t lkey, const uint8_t *addr)
{
    uint64_t a0, a1;
    memcpy(&a0, addr, 8);
    memcpy(&a1, addr + 8, 8);
    uint64_t x = mix(h->seed ^ lkey);
    x = mix(x ^ a0);
    x = mix(x ^ a1 ^ 0x9e3779b97f4a7c15ULL);
    return (uint32_t)(((x >> 32) * (uint64_t)h->entries) >> 32);
}

int srclimit_acquire(void *mem, uint32_t column, uint64_t lkey, const uint8_t *addr,
                     uint32_t max_open, uint32_t rate_count, uint32_t rate_ms,
                     uint64_t now_ms, uint32_t *ref_out)
{
    *ref_out = SRCLIMIT_REF_NONE;
    if (!mem)
        return SRCLIMIT_UNTRACKED;
    struct ringd_srclimit_header *h = hdr_of(mem);
    if (column >= h->columns) {
        ADD(&h->release_errors, 1);
        ADD(&h->untracked, 1);
        return SRCLIMIT_UNTRACKED;
    }
    mark_column(h, column);
    uint32_t token = column + 1;
    uint32_t home = home_of(h, lkey, addr);
    struct slot *hs = slot_at(h, home);
    if (!slot_lock(h, hs, token))
        goto untracked;

    struct slot *cand = NULL;           /* first empty or reusable slot, kept locked */
    uint32_t cand_i = 0;
    int rc;
    for (uint32_t k = 0, i = home; k < h->probe_max; k++) {
        struct slot *s = slot_at(h, i);
        if (k > 0 && !slot_lock(h, s, token))
            goto give_up;
        if (!s->used) {
            if (!cand) {
                cand = s;
                cand_i = i;
            } else if (s != hs) {
                slot_unlock(s);
            }
            break;                      /* slots are never emptied: the key is not further */
        }
        if (s->lkey == lkey && memcmp(s->addr, addr, 16) == 0) {
            rc = admit(h, s, i, column, max_open, rate_count, rate_ms, now_ms, ref_out);
            if (s != hs)
                slot_unlock(s);
            if (cand && cand != hs && cand != s)
                slot_unlock(cand);
            slot_unlock(hs);
            return rc;
        }
        if (!cand && slot_idle(h, s, now_ms)) {
            cand = s;
            cand_i = i;
        } else if (s != hs) {
            slot_unlock(s);
        }
        if (++i == h->entries)
            i = 0;
    }
    if (!cand) {
        slot_unlock(hs);
        goto untracked;
    }
    /* claim: an idle slot has no open count in any column, and nobody can
     * add one without its lock */
    if (cand->used)
        ADD(&h->evictions, 1);
    else
        ADD(&h->used, 1);
    cand->lkey = lkey;
    memcpy(cand->addr, addr, 16);
    cand->rate_ms = 0;
    cand->rate_cur = 0;
    cand->rate_prev = 0;
    cand->win_start = now_ms;
    __atomic_store_n(&cand->used, 1, __ATOMIC_RELEASE);
    rc = admit(h, cand, cand_i, column, max_open, rate_count, rate_ms, now_ms, ref_out);
    if (cand != hs)
        slot_unlock(cand);
    slot_unlock(hs);
    return rc;

give_up:
    if (cand && cand != hs)
        slot_unlock(cand);
    slot_unlock(hs);
untracked:
    ADD(&h->untracked, 1);
    return SRCLIMIT_UNTRACKED;
}

/* Take one from *p unless it is 0; false if it was 0. */
static bool dec_if_positive(uint32_t *p)
{
    uint32_t v = LOAD(p);
    while (v) {
        if (__atomic_compare_exchange_n(p, &v, v - 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return true;
    }
    return false;
}

void srclimit_release(void *mem, uint32_t column, uint32_t ref)
{
    if (!mem || ref == SRCLIMIT_REF_NONE)
        return;
    struct ringd_srclimit_header *h = hdr_of(mem);
    if (ref >= h->entries || column >= h->columns ||
        !dec_if_positive(&slot_at(h, ref)->open[column]))
        ADD(&h->release_errors, 1);
}

void srclimit_move(void *mem, uint32_t from_column, uint32_t to_column, uint32_t ref)
{
    if (!mem || ref == SRCLIMIT_REF_NONE || from_column == to_column)
        return;
    struct ringd_srclimit_header *h = hdr_of(mem);
    if (ref >= h->entries || from_column >= h->columns || to_column >= h->columns) {
        ADD(&h->release_errors, 1);
        return;
    }
    struct slot *s = slot_at(h, ref);
    mark_column(h, to_column);
    /* add first: the sum never drops below the truth, so the slot cannot be
     * taken as idle while its connection is on the way */
    ADD(&s->open[to_column], 1);
    if (!dec_if_positive(&s->open[from_column])) {
        dec_if_positive(&s->open[to_column]);
        ADD(&h->release_errors, 1);
    }
}

/* Which pages of the table hold anything: a page never written is not
 * resident (the memory came zeroed and is taken on first write), and every
 * slot byte on it is zero. The master's scans (clear_column, usage) skip
 * those instead of reading them, which would make the whole table resident.
 * Without mincore, everything counts as resident. */
struct resident {
    unsigned char *vec;
    uintptr_t base;
    uintptr_t psz;
};

static void resident_open(const struct ringd_srclimit_header *h, struct resident *r)
{
    memset(r, 0, sizeof(*r));
    long psz = sysconf(_SC_PAGESIZE);
    if (psz <= 0 || ((uintptr_t)h & ((uintptr_t)psz - 1)))
        return;
    size_t n = (h->bytes + (uint64_t)psz - 1) / (uint64_t)psz;
    r->vec = malloc(n);
    if (r->vec && mincore((void *)h, h->bytes, r->vec) != 0) {
        free(r->vec);
        r->vec = NULL;
    }
    r->base = (uintptr_t)h;
    r->psz = (uintptr_t)psz;
}

static inline bool resident(const struct resident *r, const void *p)
{
    return !r->vec || (r->vec[((uintptr_t)p - r->base) / r->psz] & 1);
}

static void resident_close(struct resident *r)
{
    free(r->vec);
}

void srclimit_clear_column(void *mem, uint32_t column)
{
    if (!mem)
        return;
    struct ringd_srclimit_header *h = hdr_of(mem);
    if (column >= h->columns)
        return;
    /* a column that never took a lock or a count has nothing to clear:
     * skip the scan, which would touch every page of the table */
    if (!LOAD(&col_used(h)[column]))
        return;
    uint32_t token = column + 1;
    struct resident r;
    resident_open(h, &r);
    for (uint32_t i = 0; i < h->entries; i++) {
        struct slot *s = slot_at(h, i);
        if (!resident(&r, s) && !resident(&r, &s->open[column]))
            continue;
        if (LOAD(&s->open[column]))
            __atomic_store_n(&s->open[column], 0, __ATOMIC_RELAXED);
        uint32_t t = token;
        /* the process died inside a critical section: whatever it left half
         * written (a window counter, a key being claimed) holds no count,
         * so the slot is merely reusable */
        if (LOAD(&s->lock) == token &&
            __atomic_compare_exchange_n(&s->lock, &t, 0, false, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED))
            ADD(&h->forced_unlocks, 1);
    }
    resident_close(&r);
    __atomic_store_n(&col_used(h)[column], 0, __ATOMIC_SEQ_CST);
}

int srclimit_source_addr(const void *sockaddr, uint32_t prefix_v6, uint8_t *out)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    sa_family_t family;
    memcpy(&family, sockaddr, sizeof(family));
    if (family == AF_INET) {
        struct sockaddr_in sin;
        memcpy(&sin, sockaddr, sizeof(sin));
        memcpy(out, mapped, 12);
        memcpy(out + 12, &sin.sin_addr, 4);
        return 0;
    }
    if (family != AF_INET6)
        return -1;
    struct sockaddr_in6 sin6;
    memcpy(&sin6, sockaddr, sizeof(sin6));
    memcpy(out, &sin6.sin6_addr, 16);
    if (memcmp(out, mapped, 12) == 0)
        return 0;                   /* an IPv4 client of a dual-stack socket */
    if (prefix_v6 < 1)
        prefix_v6 = 1;
    for (uint32_t bit = prefix_v6; bit < 128; bit++)
        out[bit / 8] &= (uint8_t)~(0x80u >> (bit % 8));
    return 0;
}

uint32_t srclimit_open(const void *mem, uint32_t ref)
{
    if (!mem || ref == SRCLIMIT_REF_NONE)
        return 0;
    const struct ringd_srclimit_header *h = hdr_of(mem);
    if (ref >= h->entries)
        return 0;
    return open_total(h, slot_at(h, ref));
}

void srclimit_usage(const void *mem, uint64_t now_ms, struct ringd_srclimit_usage *out)
{
    memset(out, 0, sizeof(*out));
    if (!mem)
        return;
    const struct ringd_srclimit_header *h = hdr_of(mem);
    if (!LOAD(&h->used))
        return;
    struct resident r;
    resident_open(h, &r);
    for (uint32_t i = 0; i < h->entries; i++) {
        const struct slot *s = slot_at(h, i);
        if (!resident(&r, s) || !__atomic_load_n(&s->used, __ATOMIC_ACQUIRE))
            continue;
        out->used++;
        uint32_t o = open_total(h, s);
        out->open += o;
        if (!slot_idle(h, s, now_ms))
            out->live++;
    }
    resident_close(&r);
}
