/*
 * ringd.h: the worker's internal types, shared by the C files of native/.
 *
 * One worker = one thread = one io_uring. Every connection is a slot in a
 * table with a free list; every SQE carries user_data = (op, slot, slot
 * generation), so a completion that arrives after its slot was reused is
 * recognised and dropped instead of touching the new connection.
 *
 * Which file owns what:
 *   worker.c      the loop (dispatch, tick, giving memory back) and the drain
 *                 lifecycle (drain, stop, orphaned, accept stopped, exit)
 *   control.c     the control socket: arm its recv, decode a command (and
 *                 the fd a handover command brings)
 *   handover.c    connection handover across generations: quiesce a
 *                 connection, send it (fds, held bytes, state) to the new
 *                 worker, adopt what an old worker sends, the answers
 *   listener.c    accepting: arm and cancel accepts, pause and resume
 *                 (max_connections, fd shortage), poke
 *   conn.c        a connection's life: accept -> the steps before connecting
 *                 -> connect (retries) -> PROXY header -> forwarding ->
 *                 closing -> free, and its access-log record
 *   preconnect.c  the steps before connecting: PROXY header received,
 *                 allow/deny, per-source limits, the SNI peek and route;
 *                 it returns verdicts, conn.c acts on them
 *   policy.c      the lookups of the compiled policy: address ranges,
 *                 route names (a leaf)
 *   balance.c     which server; passive health
 *   forward.c     the two directions of a forwarding connection: copy and
 *                 splice pumps, FIN forwarding
 *   idle.c        idle_timeout: the idle and probe lists, the sweep
 *   writable.c    waiting for destinations io_uring cannot poll (epoll)
 *   bufring.c     the provided buffers of the copy path
 *   pipes.c       the pipe pool, the plain buffer pool
 *   events.c      events to the master, rate limited where they repeat
 *   ring.c        ring setup, SQE helpers, clocks, ringd_probe
 *   proxy_send.c / proxy_recv.c   the PROXY protocol codec: the header we
 *                 send a server / the one a client sends us (leaves)
 *   tls_hello.c   the TLS ClientHello parser (a leaf)
 *   srclimit.c    the per-source limit table in shared memory, all workers
 *                 of the host (a leaf)
 * (preconnect.c calls policy.c, srclimit.c, tls_hello.c, proxy_recv.c and events.c.)
 *
 * Which way calls go: a file calls only the files to its right in
 *   worker -> control, listener, handover -> conn -> preconnect, balance, proxy_send, forward
 *          -> idle, writable, bufring, pipes -> events, ring
 * (writable.c and bufring.c hand the waits that are over back to the loop,
 * which calls forward.c). Two calls go up, each an end or an admission
 * decision: conn_close, from forward.c and idle.c (a direction or the idle
 * sweep ends its connection), and listener_pause / listener_maybe_resume,
 * from conn.c (a connection that finds no fd, or frees its slot, changes
 * whether its listener may accept). handover.c is called back by conn.c
 * when a moving connection's last op completed (handover_quiesced), when
 * one is closed while moving (handover_dropped), and when one that
 * connects while the worker drains may move (handover_offer).
 */
#ifndef RINGD_H
#define RINGD_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <liburing.h>

#include "ringd_api.h"
#include "tls_hello.h"
#include "proxy_recv.h"
#include "proxy_send.h"
#include "srclimit.h"

#define RINGD_TICK_MS 100
#define RINGD_BGID 1          /* buffer group of the copy path */

/* ------------------------------------------------------------ user_data */

enum op {
    OP_NONE = 0,
    OP_ACCEPT,          /* slot = listener index */
    OP_ACCEPT_CANCEL,
    OP_CTRL,            /* control socket recv */
    OP_TICK,            /* periodic timer */
    OP_CONNECT,
    OP_CONNECT_TIMEOUT, /* linked timeout of OP_CONNECT */
    OP_POLL_IN,         /* readiness of a direction's source (dir in bit) */
    OP_POLL_OUT,        /* writability of a direction's destination */
    OP_RECV,            /* copy mode: source socket -> buffer */
    OP_SEND,            /* copy mode: buffer -> destination socket */
    OP_HDR_SEND,        /* PROXY protocol header to the server */
    OP_CANCEL,          /* a cancel request's own completion */
    OP_NOP,
    OP_EPOLL,           /* the worker's epoll set is ready (writable.c) */
    OP_PRE_RECV,        /* preconnect.c: the client's first bytes (PROXY header, ClientHello) */
    OP_PRE_TIMEOUT,     /* linked timeout of OP_PRE_RECV (peek_timeout) */
    OP_PRE_SEND,        /* those bytes, to the server, before forwarding starts */
    OP_HANDOVER,        /* a handover socket is ready (handover.c): dir 0 the one
                           we hand over to, dir 1 one we take over from (slot = peer) */
};

/* bits 56..63 op, bit 55 direction, bits 32..54 slot generation, 0..31 slot */
static inline uint64_t ud_make(enum op op, unsigned dir, uint32_t slot, uint32_t gen)
{
    return ((uint64_t)op << 56) | ((uint64_t)(dir & 1) << 55) |
           ((uint64_t)(gen & 0x7fffff) << 32) | slot;
}
static inline enum op ud_op(uint64_t ud) { return (enum op)(ud >> 56); }
static inline unsigned ud_dir(uint64_t ud) { return (unsigned)(ud >> 55) & 1; }
static inline uint32_t ud_gen(uint64_t ud) { return (uint32_t)(ud >> 32) & 0x7fffff; }
static inline uint32_t ud_slot(uint64_t ud) { return (uint32_t)ud; }

/* ------------------------------------------------------------ connection */

/* A connection connects to at most 1 + connect_retries servers, and
 * connect_retries is at most 16 (config.py). So the servers it tried fit in
 * a short list, whatever the number of servers in its upstream. */
#define RINGD_MAX_TRIES 17

enum conn_state {
    CS_FREE = 0,
    CS_ACCEPTED,        /* the steps before connecting (conn.c, conn_preconnect) */
    CS_CONNECTING,      /* connect to a server in flight */
    CS_HEADER,          /* sending the PROXY protocol header */
    CS_FORWARDING,
    CS_CLOSING,         /* waiting for in-flight ops before closing fds */
    CS_MOVING,          /* handover.c: its ops are being cancelled, then it is sent */
    CS_HANDED,          /* handover.c: sent to the new worker, its answer pending */
    CS_ADOPTED,         /* handover.c: taken over, our answer not yet sent */
};

enum dir_mode { DM_COPY = 0, DM_SPLICE = 1 };

/* direction flags */
#define DF_IN_BUSY   0x01   /* a read (recv, or a poll for readable) is in flight */
#define DF_OUT_BUSY  0x02   /* a write (send, or a poll for writable) is in flight */
#define DF_EOF       0x04   /* the source sent FIN */
#define DF_SHUT      0x08   /* FIN forwarded to the destination */
#define DF_BARE_POLL 0x40   /* copy mode without a buffer ring: a poll, no buffer held */
#define DF_FULL_READ 0x80   /* copy mode: the last recv filled the buffer */
#define DF_POLL_FIRST 0x100 /* copy mode: the source is probably drained, poll first */
#define DF_NO_POLLOUT 0x200 /* the destination's peer half-closed: no POLL_ADD(POLLOUT) (writable.c) */
#define DF_OUT_EPOLL 0x400  /* waiting for the destination in the epoll set, not in the ring */
#define DF_EPOLL_ADDED 0x800 /* the destination is registered in the epoll set */

struct pipe_ref {
    int rfd, wfd;
    uint32_t cap;
};

/* One direction of a connection: src -> dst (0: client->server, 1: back). */
struct dir {
    int src, dst;
    uint8_t mode;           /* enum dir_mode */
    uint8_t small_reads;    /* splice mode: consecutive small splice-ins */
    uint16_t flags;         /* DF_* */
    uint32_t streak;        /* copy mode: bytes of consecutive full-buffer reads */
    struct pipe_ref pipe;   /* rfd < 0 when no pipe is held */
    uint32_t in_pipe;       /* bytes sitting in the pipe */
    char *buf;              /* copy mode buffer (NULL while idle) */
    uint16_t bid;           /* its id in the buffer ring, if it came from there */
    uint32_t buf_len;       /* bytes in buf */
    uint32_t buf_off;       /* bytes of buf already sent */
    uint64_t bytes;         /* bytes read from src */
};

struct conn {
    uint32_t gen;
    uint8_t state;          /* enum conn_state */
    uint8_t end_reason;     /* RINGD_END_* once closing */
    uint8_t tries;          /* servers tried: tried[0 .. tries) */
    uint8_t srv_counted;    /* counted in the server's active connections */
    uint16_t listener;
    int16_t inflight;       /* SQEs whose CQE we still expect */
    int cfd, sfd;
    int server;             /* index, -1 until chosen */
    int err;                /* errno that ended it, if any */
    uint32_t tried[RINGD_MAX_TRIES];   /* server indexes, in order */
    struct dir d[2];
    uint64_t last_ms;       /* monotonic ms of last activity */
    uint64_t kbase;         /* idle.c: bytes the kernel had moved at kbase_ms */
    uint64_t kbase_ms;
    uint64_t start_ns;      /* realtime, for the access log */
    uint64_t start_mono_us;
    struct conn *lru_prev, *lru_next;   /* per-listener idle or probe list (idle.c) */
    uint32_t next_free;
    uint8_t client[RINGD_ADDR_MAX];
    uint32_t client_len;
    uint8_t hdr[PROXY_SEND_MAX];   /* PROXY header being sent (proxy_send.c) */
    uint16_t hdr_len, hdr_off;
    /* preconnect.c: the steps before connecting and what they decided */
    uint32_t upstream;      /* the listener's upstream, or the one its route chose */
    uint8_t pre_step;       /* enum pre_step */
    struct prelude *pre;    /* the client's first bytes, held for the server; NULL: none */
    uint32_t src_ref;       /* per-source limit table ref; SRCLIMIT_REF_NONE: none */
    uint32_t src_from;      /* adopted, answer not out: the old worker's column */
};

/* preconnect.c: bytes read from the client before connecting (a PROXY
 * header is dropped from the front; what follows goes to the server first,
 * byte for byte). At most a PROXY v2 header and 16 KiB of ClientHello. */
#define PRE_BUF_MAX (RINGD_PROXY_V2_MAX + RINGD_TLS_MAX_EXAMINED)
enum pre_step { PRE_NONE = 0, PRE_PROXY, PRE_PEEK };
struct prelude {
    uint32_t len;           /* bytes held */
    uint32_t off;           /* of those, bytes sent to the server */
    uint64_t deadline_ms;   /* accept + peek_timeout */
    struct __kernel_timespec ts;   /* the linked timeout of the recv in flight */
    uint8_t dst[RINGD_ADDR_MAX];   /* the address the client connected to, from its */
    uint32_t dst_len;              /* PROXY header (0: none, use the socket's) */
    uint8_t buf[PRE_BUF_MAX];
};

/* ------------------------------------------------------------ worker */

/* one socket being accepted on (a listener has one or more) */
struct acceptor {
    int fd;
    uint32_t li;            /* its listener */
    bool armed;             /* an accept is in flight */
    bool multishot;         /* ... and it is a multishot one */
    bool cancel_sent;
};

struct listener_rt {
    bool paused;            /* by max_connections or an fd shortage */
    int pause_err;          /* errno that paused us, 0 for max_connections */
    uint64_t resume_at_ms;  /* for fd shortages: retry time */
    struct __kernel_timespec connect_ts;   /* linked timeout of connects */
    uint32_t active;
    struct conn lru_head;   /* sentinel of the idle list (idle.c) */
    struct conn probe_head; /* sentinel of the probe list (idle.c) */
};

struct upstream_rt {
    int32_t *cur_weight;    /* smooth weighted round robin state, [nservers] */
    uint32_t rr_next;       /* tie breaking */
    uint64_t no_server_pending;   /* events.c: the rate limited no-server event */
    uint64_t no_server_last_ms;
    int32_t no_server_err;        /* ... what the held-back count is sent with */
    uint32_t no_server_li;
};

struct ho_peer;         /* handover.c */

struct worker {
    const struct ringd_worker_cfg *cfg;
    struct io_uring ring;
    bool ring_ok;
    uint32_t ring_mode, ring_flags;
    bool cqe_skip;          /* IOSQE_CQE_SKIP_SUCCESS works (5.17+, IORING_FEAT_CQE_SKIP) */

    struct conn *conns;
    uint32_t nconns;
    uint32_t free_head;     /* UINT32_MAX = none */
    uint32_t high_water;    /* slots [0, high_water) have been used */
    size_t conns_bytes;     /* size of the mapping behind conns */
    uint32_t active;

    /* Giving memory back (worker.c, idle_trim). trim_due is set by the work
     * itself: every growth (a new table slot, a new pipe or pooled buffer,
     * a cold provided buffer touched again, a larger buffer-ring target)
     * and the last connection closing. A trim runs once nothing has grown
     * for IDLE_TRIM_MS. */
    bool trim_due;
    uint64_t quiet_since_ms;   /* last growth, or the worker going idle */
    uint64_t passes;           /* event loop iterations */
    uint32_t pipes_idle_min;   /* fewest idle pooled pipes since the last trim/growth */

    struct listener_rt *ls;
    struct acceptor *acc;
    uint32_t nacc;
    struct upstream_rt *us;

    /* pipe pool */
    struct pipe_ref *pipes;
    uint32_t npipes, pipe_max;
    uint32_t pipes_out;     /* pipes held by connections */

    /* fd budget: RLIMIT_NOFILE minus a reserve; accepting pauses before a
     * new connection could run the process out of fds */
    int64_t fd_budget;
    uint32_t pipe_size;

    /* copy buffers: a simple free list of copy_buffer_size blocks (used
     * only where the kernel has no buffer rings) */
    char **bufs;
    uint32_t nbufs, buf_max;

    /* provided buffer ring (bufring.c) */
    struct io_uring_buf_ring *br;
    bool br_registered;
    char *br_region;
    size_t br_region_bytes;
    uint32_t br_size, br_max;
    uint16_t *br_free;      /* LIFO stack of free buffer ids */
    uint8_t *br_is_cold;    /* [br_max] 1: the buffer's pages were dropped (or never touched) */
    uint16_t *br_ring_bid;  /* [ring entries] buffer id posted in each ring entry */
    uint16_t *br_scratch;   /* [br_max] buffer ids being trimmed */
    bool br_retract;        /* take the buffers posted above the target back */
    uint32_t br_nfree;
    uint32_t br_posted;     /* buffers in the ring, not yet taken by a recv */
    uint32_t br_target;     /* how many to keep posted */
    uint64_t br_grow_pass;  /* loop pass of the last target increase */
    bool br_dry;            /* a recv found the ring empty in this decay window */
    uint32_t br_posted_min; /* fewest posted in this decay window: the unused ones */
    uint32_t br_nfree_min;  /* lowest depth of the free stack since the last trim/growth */
    uint64_t br_decay_ms;   /* start of the decay window */
    uint64_t *br_wait;      /* recvs that found the ring empty (user_data tokens) */
    uint32_t br_nwait, br_wait_cap;

    /* writable.c: epoll set for destinations io_uring cannot poll */
    int epfd;
    bool ep_armed;

    /* control channel (control.c): a recvmsg, commands may carry an fd */
    int ctrl_fd;
    struct ringd_cmd ctrl_buf[4];
    bool ctrl_armed;
    struct msghdr ctrl_msg;
    struct iovec ctrl_iov;
    uint64_t ctrl_cmsg[8];  /* room for the control message of one or two fds */

    /* handover.c: connections to a newer generation (out) ... */
    int ho_fd;              /* -1: none */
    bool ho_armed;          /* a poll on ho_fd is in the ring */
    bool ho_blocked;        /* its send buffer is full: waiting for POLLOUT */
    bool ho_began;          /* the drain started the handover */
    bool ho_reported;       /* the HANDOVER_DONE event went out */
    uint32_t ho_pending;    /* connections MOVING or HANDED */
    uint64_t ho_start_ms;
    uint64_t ho_moved, ho_kept;
    uint64_t ho_failed[RINGD_HO_NREASONS];
    uint64_t *ho_queue;     /* quiesced connections waiting to be sent (ud tokens) */
    uint32_t ho_qhead, ho_qlen, ho_qcap;
    /* ... and from older ones (in) */
    struct ho_peer *ho_in;
    uint32_t ho_nin;

    /* timer (worker.c): the tick is the timeout of the loop's wait where
     * the kernel has IORING_FEAT_EXT_ARG (tick_wait), else a timeout SQE */
    struct __kernel_timespec tick_ts;
    bool tick_wait;
    uint64_t tick_last_ms;

    uint64_t now_ms;
    bool draining;
    bool stopping;
    uint64_t drain_deadline_ms;
    uint64_t closed_at_deadline;
    bool exit_loop;
    uint32_t accept_armed_count;
    bool accept_stopped;     /* draining and every accept cancelled */
    uint32_t rng;
    bool ignore_passive;     /* balance: last resort pass */
    /* balance: servers found full while reserving a place in this
     * conn_connect call (full[s] == full_epoch), skipped by its next picks */
    uint32_t *full;
    uint32_t full_epoch;

    /* events.c: the rate limited connect failure event */
    uint64_t cfail_pending;
    uint64_t cfail_last_ms;
    int cfail_last_err;
    uint32_t cfail_last_server;

    /* events.c: the rate limited bad-PROXY-header event (the last one's details) */
    uint64_t pbad_pending;
    uint64_t pbad_last_ms;
    uint32_t pbad_listener, pbad_error;
    uint8_t pbad_peer[16];  /* IPv6, or IPv4 as ::ffff:a.b.c.d */
};

/* ------------------------------------------------------------ the files
 *
 * In the order calls go (see the top of this file). worker.c has nothing
 * here: nothing calls it (ringd_worker_run is in ringd_api.h). */

/* control.c */
enum { CTRL_NONE, CTRL_CMD, CTRL_GONE };
void ctrl_arm(struct worker *w);
struct msghdr;
unsigned cmsg_take_fds(struct msghdr *mh, int *fds, unsigned max);   /* (handover.c too) */
int ctrl_recv(struct worker *w, struct io_uring_cqe *cqe, struct ringd_cmd *cmd, int *err,
              int *fd);

/* handover.c */
void handover_to(struct worker *w, int fd);
void handover_from(struct worker *w, int fd);
void handover_begin(struct worker *w);
void handover_offer(struct worker *w, struct conn *c);
void handover_quiesced(struct worker *w, struct conn *c);
void handover_dropped(struct worker *w, struct conn *c, bool was_handed);
void handover_on_cqe(struct worker *w, struct io_uring_cqe *cqe);
void handover_free(struct worker *w);

/* listener.c */
void listener_arm(struct worker *w, uint32_t li);
void listener_pause(struct worker *w, uint32_t li, int err);
void listener_maybe_resume(struct worker *w, uint32_t li);
void listener_stop_all(struct worker *w);
void listener_poke(struct worker *w);
void acceptors_close(struct worker *w);
void on_accept(struct worker *w, struct io_uring_cqe *cqe);

/* conn.c */
void conn_start(struct worker *w, uint32_t li, int cfd);
void conn_on_cqe(struct worker *w, struct io_uring_cqe *cqe);
void conn_close(struct worker *w, struct conn *c, int reason, int err);
void conn_close_all(struct worker *w, int reason);
struct conn *conn_alloc(struct worker *w, uint32_t li);
void conn_count_server(struct worker *w, struct conn *c, bool on);
void conn_release_slot(struct worker *w, struct conn *c);

static inline uint32_t conn_slot(struct worker *w, struct conn *c)
{
    return (uint32_t)(c - w->conns);
}

/* the user_data of a connection's op */
static inline uint64_t conn_ud(struct worker *w, struct conn *c, enum op op, unsigned dir)
{
    return ud_make(op, dir, conn_slot(w, c), c->gen);
}

static inline struct ringd_listener_stats *conn_lstats(struct worker *w, struct conn *c)
{
    return &w->cfg->lstats[c->listener];
}

/* preconnect.c: the verdicts of the steps before connecting; a negative
 * one is -RINGD_END_* (close with that reason, c->err set if any) */
#define PRE_CONNECT 0       /* connect to c->upstream */
#define PRE_WAIT 1          /* ops in flight: their completions go to pre_on_cqe */
int pre_begin(struct worker *w, struct conn *c);
int pre_on_cqe(struct worker *w, struct conn *c, struct io_uring_cqe *cqe);
void pre_cancel(struct worker *w, struct conn *c);
void pre_release(struct worker *w, struct conn *c);
void pre_free(struct worker *w, struct conn *c);

/* balance.c */
int balance_init(struct worker *w);
void balance_free(struct worker *w);
int balance_pick(struct worker *w, struct conn *c);
void balance_begin(struct worker *w);
void balance_mark_full(struct worker *w, uint32_t s);
bool conn_tried(const struct conn *c, uint32_t s);
void server_connect_failed(struct worker *w, int server, int err);

/* proxy_send.c, proxy_recv.c, tls_hello.c: leaves with headers of their own */

/* forward.c */
void forward_start(struct worker *w, struct conn *c);
void forward_on_cqe(struct worker *w, struct conn *c, struct io_uring_cqe *cqe);
void forward_cancel(struct worker *w, struct conn *c);
void forward_release(struct worker *w, struct conn *c);
void forward_writable(struct worker *w, uint64_t token);
void forward_retry_recv(struct worker *w, uint64_t token);
void forward_quiesce(struct worker *w, struct conn *c);
int forward_hold(struct worker *w, struct conn *c);
void forward_resume(struct worker *w, struct conn *c);

/* idle.c */
void conn_expire_idle(struct worker *w);
void lru_touch(struct worker *w, struct conn *c);
void lru_unlink(struct conn *c);

/* writable.c */
#define WRITABLE_BATCH 64
int writable_setup(struct worker *w);
void writable_free(struct worker *w);
int writable_wait(struct worker *w, struct conn *c, unsigned i, uint64_t token);
void writable_arm(struct worker *w);
void writable_on_cqe(struct worker *w, struct io_uring_cqe *cqe);
void writable_forget(struct worker *w, struct conn *c, unsigned i);
uint32_t writable_ready(struct worker *w, uint64_t *tokens, uint32_t max);

/* bufring.c */
int bufring_setup(struct worker *w);
void bufring_free(struct worker *w);
char *bufring_addr(struct worker *w, uint16_t bid);
void bufring_refill(struct worker *w);
void bufring_consumed(struct worker *w, uint16_t bid);
void bufring_release(struct worker *w, uint16_t bid);
void bufring_wait(struct worker *w, uint64_t token);
uint32_t bufring_service(struct worker *w, uint64_t **waiters);
void bufring_decay(struct worker *w);
bool bufring_trim(struct worker *w, bool idle);
bool bufring_at_rest(const struct worker *w);
bool bufring_retract_begin(struct worker *w);
void bufring_retract_end(struct worker *w);

/* pipes.c */
int pipe_get(struct worker *w, struct pipe_ref *out);
void pipe_put(struct worker *w, struct pipe_ref *p, bool dirty);
void pipe_pool_drain(struct worker *w);
uint32_t pipe_pool_trim(struct worker *w, uint32_t n);
char *buf_get(struct worker *w);
void buf_put(struct worker *w, char *b);
void buf_pool_drain(struct worker *w);

/* events.c */
void event_send(struct worker *w, uint32_t type, int32_t err, uint32_t a, uint32_t b, uint64_t c);
void event_no_server(struct worker *w, int err, uint32_t li, uint32_t upstream);
void event_connect_fail(struct worker *w, int server, int err);
void event_proxy_bad(struct worker *w, uint32_t li, uint32_t error, const uint8_t *peer,
                     uint32_t peer_len);
void events_tick(struct worker *w);
bool events_pending(const struct worker *w);

/* ring.c */
int ring_setup(struct worker *w);
struct io_uring_sqe *get_sqe(struct worker *w);
void sqe_quiet(struct worker *w, struct io_uring_sqe *sqe);
void sqe_cancel(struct worker *w, uint64_t target);
uint64_t mono_ms(void);
uint64_t mono_us(void);
uint64_t real_ns(void);

/* ------------------------------------------------------------ bookkeeping
 * (inline, for any file) */

/* Something grew (memory or fds the worker may later give back): a trim is
 * due once nothing grows for a while (worker.c, idle_trim). */
static inline void note_growth(struct worker *w)
{
    w->trim_due = true;
    w->quiet_since_ms = w->now_ms;
    /* the low-water marks measure what stays unused from now on */
    w->pipes_idle_min = w->npipes;
    w->br_nfree_min = w->br_nfree;
}

/* A connection needs 2 fds (its sockets) to be admitted. Pipes (2 fds per
 * splicing direction) are optional: with no fd to spare a direction copies
 * instead. So admission counts 2 per connection, and pipes only take what
 * is left after every listener could still accept one more connection. */
#define FDS_PER_CONN 2
static inline int64_t fd_headroom(const struct worker *w)
{
    return w->fd_budget - 2 * (int64_t)w->active - 2 * (int64_t)(w->pipes_out + w->npipes);
}

#endif
