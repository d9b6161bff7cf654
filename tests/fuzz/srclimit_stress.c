/*
 * srclimit_stress.c: native/srclimit.c under real contention, in C, so the
 * critical sections race at full speed (a Python loop calls far too slowly
 * to hit them). Built by tests/test_srclimit.py with gcc (ASan + UBSan when
 * they work here) and run as:
 *
 *   srclimit_stress PROCS THREADS SECONDS
 *
 * PROCS forked processes x THREADS threads, each process in its own column
 * of one MAP_SHARED table, for about SECONDS:
 *
 *  1. race: everyone tries to take places of one source at once (no
 *     release); exactly max_open get in, and exactly rate_count for a rate.
 *  2. hammer: acquire/release on a few hot keys of a tiny table with
 *     max_open = 3; beside each key a shared "holders" count is raised after
 *     an admission and lowered before the release, so holders <= the true
 *     open count <= 3 at every instant: a holder count above 3 is a limit
 *     the table let through. At the end the table's counts equal what the
 *     processes still hold, and no release found nothing to release.
 *
 * Prints one line per check and exits 1 on the first failure.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "srclimit.h"

#define MAX_PROCS 32
#define KEYS 6
#define LIMIT 3

struct shared {
    atomic_int start;
    atomic_int ready;
    atomic_long race_ok;
    atomic_long race_rate_ok;
    atomic_long holders[KEYS];
    atomic_long over_limit;          /* holders seen above LIMIT */
    atomic_long ops;
    atomic_long untracked;
    long kept[MAX_PROCS][KEYS];      /* per process, what it still holds at the end */
};

static void *table;
static struct shared *sh;
static int nthreads;
static double seconds;

static void addr_of(int k, uint8_t a[16])
{
    memset(a, 0, 16);
    a[10] = a[11] = 0xff;
    a[12] = 10;
    a[15] = (uint8_t)k;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

struct thr {
    int col, id;
    long kept[KEYS];
};

static void *race(void *p)
{
    struct thr *t = p;
    uint8_t a[16], b[16];
    uint32_t ref;
    addr_of(100, a);
    addr_of(101, b);
    for (int i = 0; i < 2000; i++) {
        if (srclimit_acquire(table, t->col, 7, a, 97, 0, 0, 1000, &ref) == SRCLIMIT_OK)
            atomic_fetch_add(&sh->race_ok, 1);
        if (srclimit_acquire(table, t->col, 7, b, 0, 89, 1000, 1000, &ref) == SRCLIMIT_OK)
            atomic_fetch_add(&sh->race_rate_ok, 1);
    }
    return NULL;
}

static void *hammer(void *p)
{
    struct thr *t = p;
    unsigned seed = (unsigned)(t->col * 131 + t->id * 7 + 1);
    uint32_t held_ref[16];
    int held_key[16], nheld = 0;
    double end = now_s() + seconds;
    long ops = 0;
    while (1) {
        if ((ops & 255) == 0 && now_s() > end)
            break;
        ops++;
        int k = rand_r(&seed) % KEYS;
        uint8_t a[16];
        addr_of(k, a);
        uint32_t ref;
        int rc = srclimit_acquire(table, t->col, 9, a, LIMIT, 0, 0, 1, &ref);
        if (rc == SRCLIMIT_OK) {
            long h = atomic_fetch_add(&sh->holders[k], 1) + 1;
            if (h > LIMIT)
                atomic_fetch_add(&sh->over_limit, 1);
            held_ref[nheld] = ref;
            held_key[nheld++] = k;
        } else if (rc == SRCLIMIT_UNTRACKED) {
            atomic_fetch_add(&sh->untracked, 1);
        }
        if (nheld == 16 || (nheld && rand_r(&seed) % 2)) {
            int j = rand_r(&seed) % nheld;
            atomic_fetch_sub(&sh->holders[held_key[j]], 1);
            srclimit_release(table, t->col, held_ref[j]);
            held_ref[j] = held_ref[--nheld];
            held_key[j] = held_key[nheld];
        }
    }
    for (int j = 0; j < nheld; j++)
        t->kept[held_key[j]]++;
    atomic_fetch_add(&sh->ops, ops);
    return NULL;
}

static int child(int col, void *(*fn)(void *))
{
    pthread_t th[64];
    struct thr ts[64];
    memset(ts, 0, sizeof(ts));
    atomic_fetch_add(&sh->ready, 1);
    while (!atomic_load(&sh->start))
        ;
    for (int i = 0; i < nthreads; i++) {
        ts[i].col = col;
        ts[i].id = i;
        pthread_create(&th[i], NULL, fn, &ts[i]);
    }
    for (int i = 0; i < nthreads; i++) {
        pthread_join(th[i], NULL);
        for (int k = 0; k < KEYS; k++)
            sh->kept[col][k] += ts[i].kept[k];
    }
    return 0;
}

static int run(int procs, void *(*fn)(void *))
{
    pid_t pids[MAX_PROCS];
    atomic_store(&sh->start, 0);
    atomic_store(&sh->ready, 0);
    for (int i = 0; i < procs; i++) {
        pids[i] = fork();
        if (pids[i] == 0)
            _exit(child(i, fn));
    }
    while (atomic_load(&sh->ready) < procs)
        usleep(1000);
    atomic_store(&sh->start, 1);
    int bad = 0;
    for (int i = 0; i < procs; i++) {
        int st;
        waitpid(pids[i], &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            printf("FAIL child %d status %d\n", i, st);
            bad = 1;
        }
    }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s PROCS THREADS SECONDS\n", argv[0]);
        return 2;
    }
    int procs = atoi(argv[1]);
    nthreads = atoi(argv[2]);
    seconds = atof(argv[3]);
    if (procs < 1 || procs > MAX_PROCS || nthreads < 1 || nthreads > 64)
        return 2;
    sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);

    /* 1. race for the last places */
    uint64_t len = srclimit_bytes(64, MAX_PROCS);
    table = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (srclimit_init(table, len, 64, MAX_PROCS) || srclimit_check(table, len)) {
        printf("FAIL init\n");
        return 1;
    }
    if (run(procs, race))
        return 1;
    const struct ringd_srclimit_header *h = table;
    long untracked = (long)h->untracked;
    printf("race: open %ld/97 rate %ld/89 untracked %ld contended %lu\n",
           atomic_load(&sh->race_ok), atomic_load(&sh->race_rate_ok), untracked,
           (unsigned long)h->contended);
    /* an untracked admission (a lock given up on) may leave a place unused */
    if (atomic_load(&sh->race_ok) > 97 || atomic_load(&sh->race_rate_ok) > 89 ||
        (!untracked && (atomic_load(&sh->race_ok) != 97 || atomic_load(&sh->race_rate_ok) != 89))) {
        printf("FAIL race\n");
        return 1;
    }
    munmap(table, len);

    /* 2. hammer a tiny table */
    len = srclimit_bytes(8, MAX_PROCS);
    table = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    srclimit_init(table, len, 8, MAX_PROCS);
    h = table;
    if (run(procs, hammer))
        return 1;
    int bad = 0;
    for (int k = 0; k < KEYS; k++) {
        long kept = 0;
        for (int p = 0; p < procs; p++)
            kept += sh->kept[p][k];
        uint8_t a[16];
        uint32_t ref;
        addr_of(k, a);
        /* a column no process used, no limit: finds the key's slot */
        int rc = srclimit_acquire(table, MAX_PROCS - 1, 9, a, 0, 0, 0, 1, &ref);
        uint32_t open = rc == SRCLIMIT_OK ? srclimit_open(table, ref) - 1 : 0;
        srclimit_release(table, MAX_PROCS - 1, ref);
        if (rc != SRCLIMIT_OK || open != (uint32_t)kept) {
            printf("FAIL key %d: table %u, processes hold %ld (rc %d)\n", k, open, kept, rc);
            bad = 1;
        }
    }
    printf("hammer: ops %ld over_limit %ld untracked %ld contended %lu lock_timeouts %lu "
           "release_errors %lu\n", atomic_load(&sh->ops), atomic_load(&sh->over_limit),
           atomic_load(&sh->untracked), (unsigned long)h->contended,
           (unsigned long)h->lock_timeouts, (unsigned long)h->release_errors);
    if (atomic_load(&sh->over_limit) || h->release_errors ||
        (long)h->untracked != atomic_load(&sh->untracked) + 0 ||
        h->lock_timeouts != h->untracked)
        bad = 1;
    for (int p = 0; p < procs; p++)
        srclimit_clear_column(table, (uint32_t)p);
    struct ringd_srclimit_usage u;
    srclimit_usage(table, 1, &u);
    if (u.open) {
        printf("FAIL %lu open after clearing every column\n", (unsigned long)u.open);
        bad = 1;
    }
    printf(bad ? "FAIL\n" : "OK\n");
    return bad;
}
