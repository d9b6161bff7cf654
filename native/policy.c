/*
 * policy.c: the lookups of a listener's edge policy, a leaf.
 *
 * The master compiles the policy (supervisor/edge.py): address lists become
 * sorted arrays of disjoint ranges, route names an open-addressing hash
 * table. Here are the two lookups the data path makes per connection, with
 * bounds that do not depend on the size of the lists:
 *   ringd_addr_in       binary search: O(log ranges)
 *   ringd_route_lookup  one hash probe per label of the name (each probe at
 *                       most max_probe slots, fixed when the table was built)
 */
#include "ringd.h"

#include <string.h>
#include <arpa/inet.h>

uint64_t ringd_route_hash(const uint8_t *name, uint32_t len, uint32_t wildcard)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (uint32_t i = 0; i < len; i++) {
        h ^= name[i];
        h *= 0x100000001b3ULL;
    }
    h ^= wildcard ? 0x9e3779b97f4a7c15ULL : 0;
    return h;
}

static int32_t table_find(const struct ringd_route_table *t, const uint8_t *name,
                          uint32_t len, uint32_t wildcard)
{
    uint64_t h = ringd_route_hash(name, len, wildcard);
    uint32_t i = (uint32_t)h & t->mask;
    for (uint32_t n = 0; n <= t->max_probe; n++, i = (i + 1) & t->mask) {
        const struct ringd_route_name *e = &t->slots[i];
        if (e->len == 0)
            return -1;
        if (e->hash == h && e->len == len && e->wildcard == wildcard &&
            memcmp(t->names + e->off, name, len) == 0)
            return (int32_t)e->route;
    }
    return -1;
}

int32_t ringd_route_lookup(const struct ringd_route_table *t, const uint8_t *name, uint32_t len)
{
    if (!t || !len)
        return -1;
    /* every pattern that matches: the name itself, then "*." + each suffix
     * below its first label; the first route (lowest index) wins */
    int32_t best = table_find(t, name, len, 0);
    for (uint32_t i = 0; i < len; i++) {
        if (name[i] != '.')
            continue;
        int32_t r = table_find(t, name + i + 1, len - i - 1, 1);
        if (r >= 0 && (best < 0 || r < best))
            best = r;
    }
    return best;
}

/* The address as two 64-bit words (IPv4 as ::ffff:a.b.c.d). */
static bool addr_words(const uint8_t *sa, uint32_t salen, uint64_t w[2])
{
    uint8_t b[16];
    sa_family_t family;

    if (salen < sizeof(sa_family_t))
        return false;
    memcpy(&family, sa, sizeof(family));
    if (family == AF_INET && salen >= sizeof(struct sockaddr_in)) {
        memset(b, 0, 10);
        b[10] = b[11] = 0xff;
        memcpy(b + 12, sa + offsetof(struct sockaddr_in, sin_addr), 4);
    } else if (family == AF_INET6 && salen >= sizeof(struct sockaddr_in6)) {
        memcpy(b, sa + offsetof(struct sockaddr_in6, sin6_addr), 16);
    } else {
        return false;
    }
    w[0] = w[1] = 0;
    for (int i = 0; i < 8; i++) {
        w[0] = (w[0] << 8) | b[i];
        w[1] = (w[1] << 8) | b[8 + i];
    }
    return true;
}

static int cmp128(const uint64_t a[2], const uint64_t b[2])
{
    if (a[0] != b[0])
        return a[0] < b[0] ? -1 : 1;
    if (a[1] != b[1])
        return a[1] < b[1] ? -1 : 1;
    return 0;
}

int ringd_addr_in(const struct ringd_addr_list *l, const uint8_t *sa, uint32_t salen)
{
    uint64_t a[2];
    if (!l || !l->n || !addr_words(sa, salen, a))
        return 0;
    /* the last range whose first address is <= a */
    uint32_t lo = 0, hi = l->n;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (cmp128(l->ranges[mid].first, a) <= 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 && cmp128(a, l->ranges[lo - 1].last) <= 0;
}
