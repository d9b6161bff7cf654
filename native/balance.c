/*
 * balance.c: choosing a server for a new connection, per worker, from the
 * shared server table the master keeps current (health, admin state, weight).
 *
 *   round_robin  smooth weighted round robin: each pick adds every usable
 *                server's weight to its running score, takes the highest and
 *                subtracts the total from it, which interleaves 5:1:1 as
 *                a a b a c a a rather than a a a a a b c.
 *   least_conn   fewest active connections (all workers) per unit of weight;
 *                ties go round robin.
 *   hash         weighted rendezvous hashing of the client address: every
 *                server scores the key, the best score wins; removing a server
 *                moves exactly the keys it held and nothing else.
 *   random       two weighted random candidates, the less loaded one wins.
 *
 * Backup servers are used only while no primary is usable. Servers already
 * tried for this connection (connect retries; a short list, see
 * RINGD_MAX_TRIES, so upstreams of any size work) are skipped. Servers marked
 * down by passive checks alone are still tried when nothing else is left.
 */
#include "ringd.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int balance_init(struct worker *w)
{
    const struct ringd_worker_cfg *cfg = w->cfg;

    w->us = calloc(cfg->nupstreams ? cfg->nupstreams : 1, sizeof(*w->us));
    w->full = calloc(cfg->nservers ? cfg->nservers : 1, sizeof(uint32_t));
    if (!w->us || !w->full)
        return -1;
    for (uint32_t u = 0; u < cfg->nupstreams; u++) {
        uint32_t n = cfg->upstreams[u].nservers;
        w->us[u].cur_weight = calloc(n ? n : 1, sizeof(int32_t));
        if (!w->us[u].cur_weight)
            return -1;
    }
    return 0;
}

void balance_free(struct worker *w)
{
    if (!w->us)
        return;
    for (uint32_t u = 0; u < w->cfg->nupstreams; u++)
        free(w->us[u].cur_weight);
    free(w->us);
    free(w->full);
    w->us = NULL;
    w->full = NULL;
}

bool conn_tried(const struct conn *c, uint32_t s)
{
    for (unsigned k = 0; k < c->tries; k++)
        if (c->tried[k] == s)
            return true;
    return false;
}

/* A new conn_connect: forget which servers the last one found full. */
void balance_begin(struct worker *w)
{
    if (++w->full_epoch == 0) {
        memset(w->full, 0, w->cfg->nservers * sizeof(uint32_t));
        w->full_epoch = 1;
    }
}

void balance_mark_full(struct worker *w, uint32_t s)
{
    w->full[s] = w->full_epoch;
}

static inline uint32_t srv_weight(struct worker *w, uint32_t s)
{
    uint32_t wt = w->cfg->srv[s].weight;
    return wt ? wt : w->cfg->servers[s].weight;
}

/* Usable for a new connection at all (health, admin, passive checks)? */
static bool srv_up(struct worker *w, const struct ringd_upstream_cfg *up, uint32_t s)
{
    const struct ringd_server_shm *sh = &w->cfg->srv[s];

    if (w->cfg->servers[s].down)
        return false;
    if (__atomic_load_n(&sh->state, __ATOMIC_RELAXED) != RINGD_SRV_UP)
        return false;
    if (!w->ignore_passive && __atomic_load_n(&sh->passive_down, __ATOMIC_RELAXED) &&
        w->now_ms - sh->passive_down_since < up->fail_timeout_ms)
        return false;
    return srv_weight(w, s) > 0;
}

/* ... and for this connection right now (not tried yet, below its limit)? */
static bool srv_usable(struct worker *w, struct conn *c, const struct ringd_upstream_cfg *up,
                       uint32_t s)
{
    if (w->full[s] == w->full_epoch || conn_tried(c, s))
        return false;
    uint32_t mx = w->cfg->servers[s].max_conns;
    if (mx && __atomic_load_n(&w->cfg->srv[s].active, __ATOMIC_RELAXED) >= (int64_t)mx)
        return false;
    return srv_up(w, up, s);
}

static uint32_t xorshift(struct worker *w)
{
    uint32_t x = w->rng;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    w->rng = x;
    return x;
}

/* 64-bit mix (splitmix64 finaliser) */
static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t hash_bytes(const uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t h = seed ^ 0x9e3779b97f4a7c15ULL;
    for (size_t i = 0; i < n; i++)
        h = mix64(h ^ p[i]) + i;
    return mix64(h);
}

/* the client's address without its port: the same host keeps its server */
static uint64_t client_key(struct conn *c)
{
    const struct sockaddr *sa = (const struct sockaddr *)c->client;
    if (c->client_len == 0)
        return 0;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const void *)sa;
        return hash_bytes((const uint8_t *)&in->sin_addr, 4, 4);
    }
    const struct sockaddr_in6 *in6 = (const void *)sa;
    return hash_bytes((const uint8_t *)&in6->sin6_addr, 16, 6);
}

static uint64_t server_key(struct worker *w, uint32_t s)
{
    const struct ringd_server_cfg *sv = &w->cfg->servers[s];
    return hash_bytes(sv->addr, sv->addrlen, 0x5eed);
}

static int pick_pass(struct worker *w, struct conn *c, const struct ringd_upstream_cfg *up,
                     struct upstream_rt *u, bool backup)
{
    int best = -1;
    uint32_t n = up->nservers;

    switch (up->balance) {
    case RINGD_BAL_LEAST_CONN: {
        int64_t best_a = 0;
        uint32_t best_w = 1;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t s = up->first_server + (u->rr_next + k) % n;
            if ((bool)w->cfg->servers[s].backup != backup || !srv_usable(w, c, up, s))
                continue;
            int64_t a = __atomic_load_n(&w->cfg->srv[s].active, __ATOMIC_RELAXED);
            uint32_t wt = srv_weight(w, s);
            /* a/wt < best_a/best_w, cross-multiplied */
            if (best < 0 || a * (int64_t)best_w < best_a * (int64_t)wt) {
                best = (int)s;
                best_a = a;
                best_w = wt;
            }
        }
        if (best >= 0)
            u->rr_next = (uint32_t)(best - (int)up->first_server + 1) % n;
        return best;
    }
    case RINGD_BAL_HASH: {
        uint64_t key = client_key(c);
        double best_score = -1.0;
        for (uint32_t s = up->first_server; s < up->first_server + n; s++) {
            if ((bool)w->cfg->servers[s].backup != backup || !srv_usable(w, c, up, s))
                continue;
            uint64_t h = mix64(key ^ server_key(w, s));
            /* uniform in (0,1); weighted score w / -ln(u) */
            double x = ((double)(h >> 11) + 0.5) / 9007199254740992.0;
            double score = (double)srv_weight(w, s) / -log(x);
            if (score > best_score) {
                best_score = score;
                best = (int)s;
            }
        }
        return best;
    }
    case RINGD_BAL_RANDOM: {
        uint64_t total = 0;
        for (uint32_t s = up->first_server; s < up->first_server + n; s++)
            if ((bool)w->cfg->servers[s].backup == backup && srv_usable(w, c, up, s))
                total += srv_weight(w, s);
        if (total == 0)
            return -1;
        int cand[2] = { -1, -1 };
        for (int k = 0; k < 2; k++) {
            uint64_t r = xorshift(w) % total;
            for (uint32_t s = up->first_server; s < up->first_server + n; s++) {
                if ((bool)w->cfg->servers[s].backup != backup || !srv_usable(w, c, up, s))
                    continue;
                uint32_t wt = srv_weight(w, s);
                if (r < wt) {
                    cand[k] = (int)s;
                    break;
                }
                r -= wt;
            }
        }
        if (cand[1] < 0 || cand[0] == cand[1])
            return cand[0];
        int64_t a0 = w->cfg->srv[cand[0]].active, a1 = w->cfg->srv[cand[1]].active;
        uint32_t w0 = srv_weight(w, (uint32_t)cand[0]), w1 = srv_weight(w, (uint32_t)cand[1]);
        return a1 * (int64_t)w0 < a0 * (int64_t)w1 ? cand[1] : cand[0];
    }
    case RINGD_BAL_ROUND_ROBIN:
    default: {
        int64_t total = 0;
        int32_t *cw = u->cur_weight;
        for (uint32_t k = 0; k < n; k++) {
            uint32_t s = up->first_server + k;
            if ((bool)w->cfg->servers[s].backup != backup || !srv_usable(w, c, up, s))
                continue;
            int32_t wt = (int32_t)srv_weight(w, s);
            cw[k] += wt;
            total += wt;
            if (best < 0 || cw[k] > cw[best - (int)up->first_server])
                best = (int)s;
        }
        if (best >= 0)
            cw[best - (int)up->first_server] -= (int32_t)total;
        return best;
    }
    }
}

int balance_pick(struct worker *w, struct conn *c)
{
    /* the listener's upstream, or the one a route chose (preconnect.c) */
    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[c->upstream];
    struct upstream_rt *u = &w->us[c->upstream];

    int s = pick_pass(w, c, up, u, false);
    if (s >= 0)
        return s;
    /* backups only while no primary is up. A full primary still counts as
     * up (load alone does not send a client to a backup), but one this
     * connection already tried does not: it just failed to connect, and a
     * retry after the last primary refused must reach a backup rather than
     * close the client before the health check has noticed. */
    for (uint32_t k = up->first_server; k < up->first_server + up->nservers; k++)
        if (!w->cfg->servers[k].backup && !conn_tried(c, k) && srv_up(w, up, k))
            return -1;
    s = pick_pass(w, c, up, u, true);
    if (s >= 0)
        return s;
    /* Everything is marked failed by passive checks alone: try them anyway
     * (as if unmarked), or a short blip of every server would become an
     * outage of fail_timeout after they are back. */
    w->ignore_passive = true;
    s = pick_pass(w, c, up, u, false);
    if (s < 0)
        s = pick_pass(w, c, up, u, true);
    w->ignore_passive = false;
    return s;
}

/* Passive health: max_fails failed connects within fail_timeout mark the
 * server down for fail_timeout (or until its active check passes). */
void server_connect_failed(struct worker *w, int server, int err)
{
    struct ringd_server_shm *s = &w->cfg->srv[server];
    const struct ringd_upstream_cfg *up = &w->cfg->upstreams[w->cfg->servers[server].upstream];

    __atomic_fetch_add(&s->failures, 1, __ATOMIC_RELAXED);
    event_connect_fail(w, server, err);
    if (up->max_fails == 0)
        return;
    if (w->now_ms - s->fail_window_start > up->fail_timeout_ms) {
        s->fail_window_start = w->now_ms;
        s->fail_window_count = 0;
    }
    uint32_t n = __atomic_add_fetch(&s->fail_window_count, 1, __ATOMIC_RELAXED);
    if (n < up->max_fails)
        return;
    if (!s->passive_down) {
        s->passive_down_since = w->now_ms;
        s->passive_down = 1;
        __atomic_fetch_add(&w->cfg->hdr->state_epoch, 1, __ATOMIC_RELAXED);
        event_send(w, RINGD_EV_SERVER_FAILED, err, (uint32_t)server, 0, n);
    } else if (w->now_ms - s->passive_down_since >= up->fail_timeout_ms) {
        s->passive_down_since = w->now_ms;    /* still failing after its time out */
    }
}
