/*
 * events.c: what the worker tells the master, a leaf every file may call.
 *
 * The C loop never prints: what the operator should see travels to the
 * master as a struct ringd_event on the control socket (control.c owns the
 * socket) and is logged there. Events that can come once per connection are
 * rate limited here: at most one a second, carrying the count since the
 * last one.
 */
#include "ringd.h"

#include <string.h>
#include <sys/socket.h>

#define EVENT_EVERY_MS 1000     /* a rate-limited event: at most this often */

void event_send(struct worker *w, uint32_t type, int32_t err, uint32_t a, uint32_t b, uint64_t c)
{
    struct ringd_event ev = { .type = type, .err = err, .a = a, .b = b, .c = c };

    if (w->ctrl_fd < 0)
        return;
    /* non-blocking: if the master cannot keep up, the event is lost, the
     * counters in shared memory still tell the story */
    (void)send(w->ctrl_fd, &ev, sizeof(ev), MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* Clients closed for want of a server, held back by the rate limit, go
 * out once it allows (from the next one, or from the tick). */
static void no_server_flush(struct worker *w, uint32_t upstream)
{
    struct upstream_rt *u = &w->us[upstream];

    if (u->no_server_pending && w->now_ms - u->no_server_last_ms >= EVENT_EVERY_MS) {
        event_send(w, RINGD_EV_NO_SERVER, u->no_server_err, u->no_server_li, upstream,
                   u->no_server_pending);
        u->no_server_pending = 0;
        u->no_server_last_ms = w->now_ms;
    }
}

/* A connection of listener li found no server in its upstream. */
void event_no_server(struct worker *w, int err, uint32_t li, uint32_t upstream)
{
    struct upstream_rt *u = &w->us[upstream];

    u->no_server_pending++;
    u->no_server_err = err;
    u->no_server_li = li;
    no_server_flush(w, upstream);
}

/* Connect failures held back by the rate limit go out once it allows. */
static void connect_fail_flush(struct worker *w)
{
    if (w->cfail_pending && w->now_ms - w->cfail_last_ms >= EVENT_EVERY_MS) {
        event_send(w, RINGD_EV_CONNECT_FAIL, w->cfail_last_err, w->cfail_last_server, 0,
                   w->cfail_pending);
        w->cfail_pending = 0;
        w->cfail_last_ms = w->now_ms;
    }
}

/* A connect to this server failed (the event names the last error and
 * server, with the count of failures since the last event). */
void event_connect_fail(struct worker *w, int server, int err)
{
    w->cfail_pending++;
    w->cfail_last_err = err;
    w->cfail_last_server = (uint32_t)server;
    connect_fail_flush(w);
}

static void proxy_bad_flush(struct worker *w)
{
    if (w->pbad_pending && w->now_ms - w->pbad_last_ms >= EVENT_EVERY_MS) {
        /* struct ringd_event keeps its layout for good (RINGD_CTRL_VERSION):
         * the peer's address rides in err, b and c, the rest in a */
        uint64_t n = w->pbad_pending < 255 ? w->pbad_pending : 255;
        struct ringd_event ev = { .type = RINGD_EV_PROXY_BAD,
                                  .a = (w->pbad_listener & 0xffff) | (w->pbad_error & 0xff) << 16 |
                                       (uint32_t)n << 24 };
        memcpy(&ev.err, w->pbad_peer, 4);
        memcpy(&ev.b, w->pbad_peer + 4, 4);
        memcpy(&ev.c, w->pbad_peer + 8, 8);
        if (w->ctrl_fd >= 0)
            (void)send(w->ctrl_fd, &ev, sizeof(ev), MSG_DONTWAIT | MSG_NOSIGNAL);
        w->pbad_pending = 0;
        w->pbad_last_ms = w->now_ms;
    }
}

/* A client's PROXY header was missing, malformed, late or untrusted (the
 * event names the last one's peer, with the count since the last event). */
void event_proxy_bad(struct worker *w, uint32_t li, uint32_t error, const uint8_t *peer,
                     uint32_t peer_len)
{
    sa_family_t family = 0;

    w->pbad_pending++;
    w->pbad_listener = li;
    w->pbad_error = error;
    /* the 16-byte address (IPv4 as ::ffff:a.b.c.d), or zeros */
    memset(w->pbad_peer, 0, sizeof(w->pbad_peer));
    if (peer_len >= sizeof(family))
        memcpy(&family, peer, sizeof(family));
    if (family == AF_INET && peer_len >= sizeof(struct sockaddr_in)) {
        w->pbad_peer[10] = w->pbad_peer[11] = 0xff;
        memcpy(w->pbad_peer + 12, peer + offsetof(struct sockaddr_in, sin_addr), 4);
    } else if (family == AF_INET6 && peer_len >= sizeof(struct sockaddr_in6)) {
        memcpy(w->pbad_peer, peer + offsetof(struct sockaddr_in6, sin6_addr), 16);
    }
    proxy_bad_flush(w);
}

void events_tick(struct worker *w)
{
    connect_fail_flush(w);
    proxy_bad_flush(w);
    for (uint32_t u = 0; u < w->cfg->nupstreams; u++)
        no_server_flush(w, u);
}

/* Rate-limited events held back that a tick must still send (worker.c
 * keeps ticking while there are). */
bool events_pending(const struct worker *w)
{
    if (w->cfail_pending || w->pbad_pending)
        return true;
    for (uint32_t u = 0; u < w->cfg->nupstreams; u++)
        if (w->us[u].no_server_pending)
            return true;
    return false;
}
