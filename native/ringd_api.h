/*
 * ringd_api.h: everything Python and C share.
 *
 * This file is read twice: by the C compiler (through ringd.h) and by cffi's
 * cdef (native/build_native.py). Keep it cdef-compatible: no #include, no
 * #if, no macros other than plain integer constants, only fixed-width types.
 *
 * Shared memory layout (one MAP_SHARED segment per generation, backed by a
 * memfd so that a master that re-executes itself in place (ringd upgrade)
 * can map the same segment again; created by the master before it forks
 * the workers of that generation):
 *
 *   struct ringd_shm_header
 *   struct ringd_server_shm        [nservers]        (shared by all workers)
 *   then one block per worker, each starting on a 64-byte boundary so that
 *   workers never write the same cache line:
 *     struct ringd_worker_shm
 *     struct ringd_listener_stats  [nlisteners]
 *     struct ringd_worker_server   [nservers]
 *     struct ringd_log_ring
 *     struct ringd_log_record      [log_ring_records]
 *
 * Python computes the offsets with ffi.sizeof; C only ever sees the pointers
 * handed to it in struct ringd_worker_cfg.
 */

/* The layout of everything in the shared memory segment. Bump it with any
 * change to a struct in it (ringd_shm_header and below): a master image that
 * adopts a generation across `ringd upgrade` maps its segment only when the
 * number in the segment's first four bytes (ringd_shm_header.abi, which
 * stays the first field for good) equals its own; otherwise it treats the
 * generation as opaque: it drains it through the control channel and never
 * reads or writes its memory. */
#define RINGD_ABI_VERSION 4

/* The control channel (struct ringd_cmd, struct ringd_event and the
 * RINGD_CMD_* / RINGD_EV_* numbers). Both structs keep their layout for good
 * and numbers are never reused: a master image after `ringd upgrade`
 * drains workers forked by an older image through the same channel. A new
 * command gets a new number and raises this version; a worker ignores
 * commands it does not know, and the master sends a worker only the
 * commands of the version its generation was started with (carried across
 * the upgrade). 2: RINGD_CMD_HANDOVER_TO / _FROM (connection handover). */
#define RINGD_CTRL_VERSION 2

#define RINGD_ADDR_MAX 28          /* sizeof(struct sockaddr_in6) */

/* ring modes a worker may end up with (ringd_worker_shm.ring_mode) */
#define RINGD_RING_SQPOLL 1
#define RINGD_RING_DEFER_TASKRUN 2
#define RINGD_RING_COOP_TASKRUN 3
#define RINGD_RING_PLAIN 4

/* worker states (ringd_worker_shm.state) */
#define RINGD_WS_STARTING 0
#define RINGD_WS_ACCEPTING 1
#define RINGD_WS_DRAINING 2
#define RINGD_WS_EXITED 3

/* server states as the master publishes them (ringd_server_shm.state) */
#define RINGD_SRV_UP 0
#define RINGD_SRV_DOWN 1       /* health check failed */
#define RINGD_SRV_DRAIN 2      /* admin: no new connections, existing ones finish */
#define RINGD_SRV_MAINT 3      /* admin: off now */

/* balancing algorithms */
#define RINGD_BAL_ROUND_ROBIN 0
#define RINGD_BAL_LEAST_CONN 1
#define RINGD_BAL_HASH 2
#define RINGD_BAL_RANDOM 3

/* why a connection ended (index into ringd_listener_stats.closed[]) */
#define RINGD_END_DONE 0       /* both directions finished normally */
#define RINGD_END_RESET 1      /* a peer reset or an I/O error */
#define RINGD_END_TIMEOUT 2    /* idle timeout */
#define RINGD_END_DRAIN 3      /* still open at the drain deadline, or stop */
#define RINGD_END_CONNECT 4    /* no upstream server could be reached */
#define RINGD_END_RESOURCE 5   /* out of fds, memory or pipes */
/* refusals before any connect (preconnect.c): the client is reset */
#define RINGD_END_DENIED 6     /* allow/deny refused the client's address */
#define RINGD_END_PROXY_HEADER 7   /* PROXY header missing, malformed, late or from an untrusted peer */
#define RINGD_END_SOURCE_LIMIT 8   /* max_connections_per_source reached */
#define RINGD_END_SOURCE_RATE 9    /* connection_rate_per_source exceeded */
#define RINGD_END_NO_ROUTE 10  /* no route matched and the listener has no upstream */
#define RINGD_END_PEEK_TIMEOUT 11  /* no decision within peek_timeout and no upstream */
#define RINGD_END_NREASONS 12

/* master -> worker commands (struct ringd_cmd over the control socketpair) */
#define RINGD_CMD_DRAIN 1      /* arg: deadline in ms from now */
#define RINGD_CMD_STOP 2       /* close everything, exit */
#define RINGD_CMD_POKE_ACCEPT 4    /* accept what is queued now (see listener_poke) */
/* Connection handover (handover.c). Each comes with one fd (SCM_RIGHTS): an
 * end of a SOCK_SEQPACKET socketpair between an old worker and a new one.
 * arg: RINGD_HANDOVER_VERSION of the master that sent it. The old worker
 * hands its connections over on the next RINGD_CMD_DRAIN. */
#define RINGD_CMD_HANDOVER_TO 5    /* old worker: give your connections to this socket */
#define RINGD_CMD_HANDOVER_FROM 6  /* new worker: take connections from this socket */

/* version of the handover message (struct ho_msg in handover.c); a worker
 * refuses messages of a version it does not know (RINGD_HO_VERSION) */
#define RINGD_HANDOVER_VERSION 1

/* why a connection was not handed over (ringd_worker_shm.handover_failed[]) */
#define RINGD_HO_LISTENER 0        /* the new config has no listener of that name */
#define RINGD_HO_SERVER 1          /* ... or no such server (upstream name + address) */
#define RINGD_HO_FULL 2            /* the new worker is at max_connections */
#define RINGD_HO_VERSION 3         /* a message version the new worker does not know */
#define RINGD_HO_PEER 4            /* the new worker went away before it answered */
#define RINGD_HO_RESOURCE 5        /* out of fds, pipes or socket buffer */
#define RINGD_HO_NREASONS 6

/* worker -> master events (struct ringd_event) */
#define RINGD_EV_READY 1           /* a: ring mode, b: ring flags obtained */
#define RINGD_EV_ACCEPT_PAUSED 2   /* a: listener, err: errno (0 = max_connections) */
#define RINGD_EV_ACCEPT_RESUMED 3  /* a: listener */
#define RINGD_EV_DRAINING 4        /* c: active connections */
#define RINGD_EV_EXITING 5         /* c: connections closed by the deadline/stop */
#define RINGD_EV_NO_SERVER 6       /* a: listener, b: upstream, c: clients closed since last event */
#define RINGD_EV_CONNECT_FAIL 7    /* a: server, err: errno, c: failures since last event */
#define RINGD_EV_PIPE_SHRUNK 8     /* a: new pipe size, err: errno of F_SETPIPE_SZ */
#define RINGD_EV_SERVER_FAILED 9   /* a: server marked down by passive checks, c: fails */
#define RINGD_EV_SETUP_FAILED 10   /* err: errno, a: step */
#define RINGD_EV_ACCEPT_ERROR 11   /* a: listener, err: errno (not a pause) */
#define RINGD_EV_ORPHANED 12       /* the master went away; draining */
#define RINGD_EV_ACCEPT_STOPPED 13 /* draining: no accept armed any more, listener fds closed */
#define RINGD_EV_PROXY_BAD 14      /* a: listener (bits 0-15), why (16-23: RINGD_PROXY_E_*, 0 untrusted
                                      peer, 99 not PROXY, 100 late or EOF), refusals since the last
                                      event (24-31, at most 255); err, b, c: the 16 bytes of the
                                      last one's peer address (IPv4 as ::ffff:a.b.c.d), in that order */
#define RINGD_EV_HANDOVER_DONE 15  /* a: connections handed over, b: kept, c: ms it took */
#define RINGD_EV_HANDOVER_FAILED 16    /* a: RINGD_HO_* reason, c: connections kept for it */

struct ringd_cmd {
    uint32_t cmd;
    uint32_t arg;
};

struct ringd_event {
    uint32_t type;
    int32_t err;
    uint32_t a;
    uint32_t b;
    uint64_t c;
};

/* --------------------------------------------------------------- shm */

struct ringd_shm_header {
    uint32_t abi;
    uint32_t generation;
    uint32_t nworkers;
    uint32_t nlisteners;
    uint32_t nservers;
    uint32_t log_ring_records;
    uint64_t state_epoch;      /* bumped whenever a server's usability changes */
    uint32_t nroutes;          /* SNI routes of all listeners: uint64_t counters per worker */
    uint32_t reserved;
};

struct ringd_worker_shm {
    uint64_t heartbeat;        /* bumped by the C loop on every tick */
    int32_t pid;
    uint32_t state;            /* RINGD_WS_* */
    uint32_t ring_mode;        /* RINGD_RING_* */
    uint32_t ring_flags;       /* IORING_SETUP_* obtained */
    int32_t cpu;
    uint32_t pipe_size;        /* current pipe size target */
    uint64_t pipes_in_use;
    uint64_t pipes_idle;
    uint64_t pipes_created;
    uint64_t pipes_failed;
    uint64_t conns_active;     /* all listeners */
    uint64_t loops;            /* event loop iterations */
    uint64_t cqes;             /* completions handled */
    uint64_t buf_waits;        /* copy-path recvs that found no free buffer */
    uint64_t bufs_posted;      /* buffers in the provided buffer ring */
    uint32_t copy_mode;        /* 1: buffer ring, 2: poll + pooled buffer */
    uint32_t bufs_target;      /* buffer ring: buffers kept posted (grows on -ENOBUFS, decays) */
    uint64_t bufs_high_water;  /* most buffers posted or held at once since start */
    uint64_t trims;            /* times the worker gave memory back (see idle_trim) */
    uint64_t conn_slots;       /* connection table slots touched since the last trim */
    uint64_t handed_out;       /* connections handed over to a newer generation */
    uint64_t handed_in;        /* connections taken over from an older generation */
    uint64_t handover_failed[6];   /* RINGD_HO_*: connections that stayed, by reason */
    uint64_t reserved[2];
};

struct ringd_listener_stats {
    uint64_t accepted;
    uint64_t active;
    uint64_t closed[12];       /* RINGD_END_* */
    uint64_t bytes_c2s;        /* client -> server */
    uint64_t bytes_s2c;        /* server -> client */
    uint64_t connect_errors;   /* failed connect attempts (each retry counts) */
    uint64_t connect_timeouts;
    uint64_t no_server;        /* clients closed because no server was usable */
    uint64_t accept_pauses;
    uint64_t accept_paused;    /* 1 while this worker's accept is paused */
    uint64_t splice_bytes;
    uint64_t copied_bytes;
    uint64_t retries;          /* connects retried on another server */
    uint64_t routed;           /* connections that matched a route (SNI) */
    uint64_t peeks;            /* connections that waited for their first bytes */
    uint64_t reserved[4];
};

struct ringd_server_shm {
    uint32_t state;            /* RINGD_SRV_*, written by the master */
    uint32_t weight;           /* effective weight, written by the master (0 = use config) */
    int64_t active;            /* open connections, all workers (atomic) */
    uint64_t connections;      /* connections established (atomic) */
    uint64_t failures;         /* failed connects (atomic) */
    uint64_t fail_window_start;/* ms, monotonic clock: passive check window */
    uint32_t fail_window_count;
    uint32_t passive_down;     /* 1 while marked down by passive checks */
    uint64_t passive_down_since;  /* ms, monotonic */
    uint64_t bytes_to;         /* bytes sent to the server (atomic) */
    uint64_t bytes_from;       /* bytes received from the server (atomic) */
    uint64_t reserved[4];
};

/* this worker's share of a server (the master subtracts it when the worker dies) */
struct ringd_worker_server {
    int64_t active;
    uint64_t connections;
};

/* one access log record, written by the worker, read by the master */
struct ringd_log_record {
    uint64_t start_ns;         /* CLOCK_REALTIME */
    uint64_t duration_us;
    uint64_t bytes_c2s;
    uint64_t bytes_s2c;
    uint8_t client[28];        /* struct sockaddr_in or sockaddr_in6 */
    uint32_t client_len;
    int32_t server;            /* index, -1 if none */
    uint16_t listener;
    uint16_t end_reason;       /* RINGD_END_* */
    int32_t err;
};

/* single producer (worker) single consumer (master) ring of records */
struct ringd_log_ring {
    uint64_t head;             /* written by the worker */
    uint64_t tail;             /* written by the master */
    uint64_t dropped;          /* records lost because the ring was full */
    uint64_t reserved;
};

/* ------------------------------------------------------- worker config */

/* Edge policy of a listener, compiled by the master (supervisor/edge.py).
 *
 * An address list (allow, deny, trusted_proxies) is a sorted array of
 * disjoint, non-adjacent ranges of 128-bit addresses (IPv4 as ::ffff:a.b.c.d),
 * found by binary search: O(log n) per connection, whatever the list's
 * length. Words are in host order, [0] the high 64 bits. */
struct ringd_addr_range {
    uint64_t first[2];
    uint64_t last[2];
};

struct ringd_addr_list {
    const struct ringd_addr_range *ranges;
    uint32_t n;
    uint32_t reserved;
};

/* One server name of a route table: an open-addressing hash table with
 * linear probing, keyed by (name, wildcard). "*.example.com" is stored as
 * "example.com" with wildcard = 1. Lookup walks the labels of the name
 * (the name itself as exact, then each suffix after a dot as wildcard):
 * O(labels), not O(routes). */
struct ringd_route_name {
    uint64_t hash;             /* ringd_route_hash(name, wildcard); slot empty if len == 0 */
    uint32_t off;              /* the name in ringd_route_table.names */
    uint16_t len;
    uint8_t wildcard;
    uint8_t reserved;
    uint32_t route;            /* index in the listener's routes (the first route wins) */
    uint32_t reserved2;
};

struct ringd_route_table {
    const struct ringd_route_name *slots;   /* [mask + 1] */
    uint32_t mask;
    uint32_t max_probe;        /* longest probe sequence any stored name needs */
    const uint8_t *names;      /* the names, back to back, no NULs */
    uint32_t nroutes;
    uint32_t reserved;
    const uint32_t *upstream;  /* [nroutes] upstream index of each route */
};

struct ringd_listener_cfg {
    int32_t fd;                /* this worker slot's own socket */
    uint32_t upstream;
    uint32_t max_conns;        /* this worker's share */
    uint32_t connect_timeout_ms;
    uint32_t idle_timeout_ms;
    uint32_t access_log;
    uint32_t backlog;          /* listen() backlog: bounds a multishot accept burst */
    uint32_t rcvbuf;           /* SO_RCVBUF of accepted sockets, 0 = kernel autotuning */
    uint32_t sndbuf;           /* SO_SNDBUF of accepted sockets, 0 = kernel autotuning */
    /* edge policy (preconnect.c); all zero: none, connect at once */
    uint32_t edge;             /* 1: any of the below is set */
    uint32_t accept_proxy;     /* 1: a PROXY v1/v2 header is required first */
    uint32_t peek_timeout_ms;  /* bound of the PROXY header and of the SNI peek */
    uint32_t first_route;      /* this listener's routes in ringd_worker_cfg.route_conns */
    struct ringd_addr_list trusted;   /* n = 0: any peer may send the header */
    struct ringd_addr_list allow;     /* n = 0: everyone */
    struct ringd_addr_list deny;
    const struct ringd_route_table *routes;   /* NULL: no SNI routing */
    uint32_t max_per_source;   /* open connections per source, all workers; 0 = no limit */
    uint32_t rate_count;       /* new connections per source per rate_ms; 0 = no limit */
    uint32_t rate_ms;
    uint32_t source_prefix_v6; /* IPv6 sources are counted per this prefix */
    uint64_t source_key;       /* per-source table key of this listener (hash of its name) */
    uint64_t ident;            /* the listener's identity across configs (its name, hashed) */
};

#define RINGD_NO_UPSTREAM 0xffffffff   /* ringd_listener_cfg.upstream: routes only */

/* Every socket the worker accepts on: its own slot's socket of each
 * listener, plus sockets of slots that no longer exist (fewer workers than
 * before), which it adopts instead of closing them (that would reset what
 * is queued on them unless net.ipv4.tcp_migrate_req = 1). */
struct ringd_acceptor_cfg {
    int32_t fd;
    uint32_t listener;
};

struct ringd_upstream_cfg {
    uint32_t first_server;
    uint32_t nservers;
    uint32_t balance;          /* RINGD_BAL_* */
    uint32_t connect_retries;
    uint32_t proxy_protocol;   /* 0, 1 or 2 */
    uint32_t max_fails;        /* 0 = passive checks off */
    uint32_t fail_timeout_ms;
    uint32_t rcvbuf;           /* SO_RCVBUF of server sockets, 0 = kernel autotuning */
    uint32_t sndbuf;           /* SO_SNDBUF of server sockets, 0 = kernel autotuning */
};

struct ringd_server_cfg {
    uint8_t addr[28];          /* sockaddr_in / sockaddr_in6 */
    uint32_t addrlen;
    uint32_t weight;
    uint32_t backup;
    uint32_t down;
    uint32_t max_conns;        /* 0 = unlimited */
    uint32_t upstream;
    uint64_t ident;            /* identity across configs (upstream name + address, hashed) */
};

struct ringd_worker_cfg {
    int32_t worker_id;
    int32_t cpu;
    uint32_t generation;
    int32_t control_fd;
    uint32_t sqpoll;           /* 0 or 1 */
    int32_t sq_cpu;            /* CPU of the SQPOLL thread, -1: not pinned */
    uint32_t sq_thread_idle_ms;
    uint32_t entries;
    uint32_t pipe_size;
    uint32_t pipe_pool;
    uint32_t copy_buffer_size;
    uint32_t orphan_drain_ms;  /* drain deadline when the master vanishes */
    uint32_t heartbeat_ms;     /* an idle worker's longest sleep between heartbeats */
    uint64_t splice_threshold; /* bytes a direction copies before it splices */
    uint32_t notsent_lowat;    /* TCP_NOTSENT_LOWAT of both sockets, 0 = kernel default */
    uint32_t test_hooks;       /* 1: SIGUSR2 makes the loop stall (watchdog tests) */
    uint32_t nlisteners;
    uint32_t nupstreams;
    uint32_t nservers;
    uint32_t log_ring_records; /* capacity of each access log ring, power of two */
    const struct ringd_listener_cfg *listeners;
    uint32_t nacceptors;
    const struct ringd_acceptor_cfg *acceptors;
    const struct ringd_upstream_cfg *upstreams;
    const struct ringd_server_cfg *servers;
    struct ringd_shm_header *hdr;
    struct ringd_worker_shm *shm;
    struct ringd_listener_stats *lstats;      /* [nlisteners] of this worker */
    struct ringd_server_shm *srv;             /* [nservers], shared */
    struct ringd_worker_server *wsrv;         /* [nservers] of this worker */
    struct ringd_log_ring *log_ring;          /* this worker's ring header */
    struct ringd_log_record *log_records;     /* [log_ring_records] */
    /* the per-source limit table (srclimit.c), NULL when this worker has none
     * (no column was free): it then admits every connection untracked */
    void *srclimit;
    uint64_t srclimit_len;
    uint32_t srclimit_column;                 /* this process's column */
    uint64_t *route_conns;                    /* [nroutes] of this worker: connections routed */
    uint32_t nroutes;                         /* routes of all listeners */
    uint32_t reserved_edge;
};

struct ringd_features {
    uint32_t liburing_major;   /* the liburing ringd was built against */
    uint32_t liburing_minor;
    uint32_t have_cqe_skip;    /* IORING_FEAT_CQE_SKIP (5.17+) */
};

/* Run a worker until it is told to stop or has drained. Returns 0, or a
 * negative errno if setup failed (nothing was accepted in that case). */
int ringd_worker_run(const struct ringd_worker_cfg *cfg);

/* Fills *f (the liburing version even if the kernel has no io_uring).
 * Returns 0 or -errno. */
int ringd_probe(struct ringd_features *f);

/* Helpers for tests and tooling. */
uint64_t ringd_monotonic_ms(void);

/* ------------------------------------------------ first-bytes parsers
 *
 * Two pure parsers for the bytes a client sends first (tls_hello.c,
 * proxy_recv.c): no allocation, no globals, no I/O. The caller hands them
 * everything received so far, from the first byte of the connection, and
 * calls again with more bytes after a NEED_MORE; the answer for a given
 * byte string never depends on how it arrived. Neither reads past `len`.
 *
 * `need` on NEED_MORE is a lower bound of the total number of bytes (counted
 * from buf[0]) the header or ClientHello occupies, always > len; it is exact
 * once the length is known. A verdict (NOT_TLS, MALFORMED, ...) may still
 * come with any further byte: `need` only says when a complete answer can
 * come at the earliest.
 */

/* ringd_tls_parse results */
#define RINGD_TLS_NEED_MORE 0
#define RINGD_TLS_FOUND 1          /* ClientHello with a valid server_name */
#define RINGD_TLS_NO_SNI 2         /* valid ClientHello without (a usable) server_name */
#define RINGD_TLS_NOT_TLS 3        /* the first bytes are no TLS handshake record */
#define RINGD_TLS_MALFORMED 4      /* a TLS handshake record, but broken or too big */

#define RINGD_TLS_MAX_EXAMINED 16384   /* the ClientHello must end within these bytes */
#define RINGD_TLS_MAX_RECORDS 64       /* TLS records the ClientHello may span */
#define RINGD_TLS_NAME_MAX 253         /* text form of a 255-byte DNS name */
#define RINGD_TLS_ALPN_MAX 256         /* bytes of the ALPN list kept in ringd_hello_info */

/* ringd_hello_info.flags */
#define RINGD_HELLO_SNI_INVALID 1      /* server_name present, not a valid DNS name (NO_SNI) */
#define RINGD_HELLO_ALPN 2             /* an ALPN extension was present */
#define RINGD_HELLO_ALPN_TRUNCATED 4   /* alpn[] holds only the first entries */
#define RINGD_HELLO_SUPPORTED_VERSIONS 8   /* max_version comes from supported_versions */

/* ringd_hello_info.error (MALFORMED only): the first check that failed */
#define RINGD_TLS_E_RECORD 1           /* a later record is not a handshake record, or its length is 0 or > 2^14 */
#define RINGD_TLS_E_NOT_CLIENT_HELLO 2 /* handshake type is not client_hello (1) */
#define RINGD_TLS_E_TOO_LARGE 3        /* the ClientHello would end past RINGD_TLS_MAX_EXAMINED */
#define RINGD_TLS_E_FRAGMENTED 4       /* spread over more than RINGD_TLS_MAX_RECORDS records */
#define RINGD_TLS_E_BODY 5             /* a fixed ClientHello field overruns or is invalid */
#define RINGD_TLS_E_EXTENSIONS 6       /* the extension block overruns, leaves bytes, or repeats one we read */
#define RINGD_TLS_E_SNI 7              /* server_name extension structurally invalid */
#define RINGD_TLS_E_ALPN 8             /* ALPN extension structurally invalid */
#define RINGD_TLS_E_VERSIONS 9         /* supported_versions extension structurally invalid */

struct ringd_hello_info {
    uint32_t need;             /* NEED_MORE: see above */
    uint32_t hello_end;        /* FOUND/NO_SNI: stream bytes up to the ClientHello's last byte */
    uint32_t error;            /* MALFORMED: RINGD_TLS_E_* */
    uint32_t flags;            /* RINGD_HELLO_* */
    uint16_t record_version;   /* legacy version of the first record header (0x0301...) */
    uint16_t hello_version;    /* ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3) */
    uint16_t max_version;      /* highest non-GREASE supported_versions entry, else hello_version */
    uint16_t records;          /* TLS records the ClientHello spans */
    uint16_t name_len;         /* FOUND: bytes in name, 1..253 */
    uint16_t alpn_len;         /* bytes in alpn */
    uint16_t alpn_count;       /* protocols in the client's ALPN list (all, kept or not) */
    uint16_t reserved;
    uint8_t name[256];         /* FOUND: server_name lower-cased, no trailing dot, NUL-terminated */
    uint8_t alpn[256];         /* ALPN list in wire form (length byte, bytes, ...), whole entries */
};

/* ringd_proxy_parse results */
#define RINGD_PROXY_NEED_MORE 0
#define RINGD_PROXY_OK 1           /* consume header_len bytes, forward the rest */
#define RINGD_PROXY_NOT_PROXY 2    /* the first bytes start no PROXY header */
#define RINGD_PROXY_MALFORMED 3

#define RINGD_PROXY_V1_MAX 107     /* longest v1 line, CRLF included */
#define RINGD_PROXY_V2_MAX 4096    /* longest v2 header accepted (16 + addresses + TLVs) */

/* ringd_proxy_info.command */
#define RINGD_PROXY_CMD_LOCAL 0    /* v2 LOCAL: the sender's own connection (health check) */
#define RINGD_PROXY_CMD_PROXY 1    /* relayed connection (v1 always, v2 PROXY) */

/* ringd_proxy_info.flags */
#define RINGD_PROXY_F_CRC32C 1     /* a PP2_TYPE_CRC32C TLV was present and verified */

/* ringd_proxy_info.error (MALFORMED only) */
#define RINGD_PROXY_E_V1_LINE 1    /* no CRLF within 107 bytes, a bare CR or LF, a bad byte */
#define RINGD_PROXY_E_V1_PROTO 2   /* not TCP4, TCP6 or UNKNOWN */
#define RINGD_PROXY_E_V1_ADDRESS 3 /* an address that is not canonical for the family */
#define RINGD_PROXY_E_V1_PORT 4    /* not 0..65535, or a leading zero */
#define RINGD_PROXY_E_V1_SYNTAX 5  /* spaces, missing or extra fields */
#define RINGD_PROXY_E_V2_VERSION 6 /* version nibble is not 2 */
#define RINGD_PROXY_E_V2_COMMAND 7 /* command is neither LOCAL nor PROXY */
#define RINGD_PROXY_E_V2_FAMILY 8  /* family/protocol byte not one of the seven the spec lists */
#define RINGD_PROXY_E_V2_LENGTH 9  /* longer than RINGD_PROXY_V2_MAX, or too short for the addresses */
#define RINGD_PROXY_E_V2_TLV 10    /* a TLV overruns the header or is cut short */
#define RINGD_PROXY_E_V2_CRC 11    /* PP2_TYPE_CRC32C of the wrong size or not matching */

struct ringd_proxy_info {
    uint32_t need;             /* NEED_MORE: see above */
    uint32_t header_len;       /* OK: bytes to consume, exactly */
    uint32_t error;            /* MALFORMED: RINGD_PROXY_E_* */
    uint32_t flags;            /* RINGD_PROXY_F_* */
    uint8_t version;           /* 1 or 2 (once known) */
    uint8_t command;           /* RINGD_PROXY_CMD_* */
    uint8_t family;            /* v2: the family/protocol byte; v1: 0x11 TCP4, 0x21 TCP6, 0 UNKNOWN */
    uint8_t reserved;
    uint32_t src_len;          /* 0: no usable address carried, keep the socket's own */
    uint32_t dst_len;
    uint8_t src[28];           /* struct sockaddr_in or sockaddr_in6: the client */
    uint8_t dst[28];           /* the address the client connected to */
    uint16_t authority_off;    /* v2 PP2_TYPE_AUTHORITY value: offset in buf (0: absent) */
    uint16_t authority_len;
    uint16_t alpn_off;         /* v2 PP2_TYPE_ALPN value: offset in buf (0: absent) */
    uint16_t alpn_len;
};

/* Parse a TLS ClientHello from the first bytes of a connection: one of
 * RINGD_TLS_*; *out is filled (zeroed first). */
int ringd_tls_parse(const uint8_t *buf, uint32_t len, struct ringd_hello_info *out);

/* Normalise a host name the way ringd_tls_parse does (ASCII lower case,
 * one trailing dot removed) and validate it: labels of 1..63 bytes of
 * [a-z0-9_-], at most RINGD_TLS_NAME_MAX bytes in all. Writes the name and a
 * NUL to out[256]; returns its length, or -1 if it is not a valid name. */
int ringd_tls_name_normalize(const uint8_t *in, uint32_t len, uint8_t *out);

/* Parse a PROXY protocol v1 or v2 header: one of RINGD_PROXY_*; *out is
 * filled (zeroed first). */
int ringd_proxy_parse(const uint8_t *buf, uint32_t len, struct ringd_proxy_info *out);

/* ------------------------------------------------ per-source limit table
 *
 * native/srclimit.c (a leaf; the design is in its top comment). One table
 * per master lifetime in one MAP_SHARED memfd mapping, shared by every
 * worker process of every generation: the master creates it (init), each
 * worker process owns one column (the master hands it out at spawn and
 * clears it when it reaps the process), and counts its open connections per
 * source in that column.
 *
 * Key: (lkey, addr): lkey is a 64-bit hash of the listener's name (caller),
 * addr 16 bytes: IPv4 as v4-mapped (::ffff:a.b.c.d), IPv6 already masked by
 * the caller to the listener's source_prefix_v6.
 */

#define SRCLIMIT_MAGIC 0x52534c54      /* "RSLT" */
#define SRCLIMIT_VERSION 1
#define SRCLIMIT_MAX_ENTRIES 16777216  /* 2^24 */
#define SRCLIMIT_MAX_COLUMNS 1024
#define SRCLIMIT_PROBE_MAX 16          /* slots one key may occupy away from its home */
#define SRCLIMIT_REF_NONE 0xffffffff   /* ref of an untracked admission: release ignores it */

/* srclimit_acquire results */
#define SRCLIMIT_OK 0                  /* admitted and counted: release(ref) when it closes */
#define SRCLIMIT_OVER_OPEN 1           /* refused: max_open connections already open */
#define SRCLIMIT_OVER_RATE 2           /* refused: rate_count connections admitted in rate_ms */
#define SRCLIMIT_UNTRACKED 3           /* admitted, NOT counted (table full or lock held too long);
                                          *ref_out = SRCLIMIT_REF_NONE */

/* The table's first 128 bytes; the counters are written with atomics, and
 * Python reads them through cffi (a torn read of a counter is impossible on
 * 64-bit, an inconsistent snapshot across counters is fine for metrics). */
struct ringd_srclimit_header {
    uint32_t magic;            /* SRCLIMIT_MAGIC */
    uint32_t version;          /* SRCLIMIT_VERSION */
    uint32_t entries;          /* slots */
    uint32_t columns;          /* open-count columns per slot (one per worker process) */
    uint32_t entry_size;       /* bytes per slot, its column counts included */
    uint32_t probe_max;        /* min(entries, SRCLIMIT_PROBE_MAX) */
    uint64_t bytes;            /* srclimit_bytes(entries, columns) */
    uint64_t seed;             /* hash seed, random per table (hash flooding) */
    uint64_t reserved0[3];
    /* counters (second cache line) */
    uint64_t used;             /* slots that hold a key (never falls: idle keys stay until reused) */
    uint64_t evictions;        /* idle keys replaced by a new one */
    uint64_t untracked;        /* admissions not counted: full probe window or lock timeout */
    uint64_t contended;        /* slot locks that had to wait */
    uint64_t lock_timeouts;    /* slot locks given up on (part of untracked) */
    uint64_t release_errors;   /* releases of a ref/column that held no count (caller bug) */
    uint64_t forced_unlocks;   /* locks of a dead process freed by clear_column */
    uint64_t reserved1;
};

struct ringd_srclimit_usage {
    uint64_t live;             /* slots with an open connection or a rate window still running */
    uint64_t open;             /* open connections counted, all sources and columns */
    uint64_t used;             /* slots that hold a key */
};

/* Bytes a table of `entries` slots and `columns` columns needs (0: out of
 * range: entries 1..SRCLIMIT_MAX_ENTRIES, columns 1..SRCLIMIT_MAX_COLUMNS). */
uint64_t srclimit_bytes(uint32_t entries, uint32_t columns);

/* Master, once: lay out an empty table in len (>= srclimit_bytes) bytes of
 * zero-filled memory (a fresh memfd or anonymous mapping): only the header
 * is written, pages are taken as slots are used. Returns 0, or -EINVAL for
 * sizes out of range or memory that already holds a table. */
int srclimit_init(void *mem, uint64_t len, uint32_t entries, uint32_t columns);

/* Validate a table's header before using it: magic, version, sizes against
 * len. Returns 0 or -EINVAL (a worker then runs without the table). */
int srclimit_check(const void *mem, uint64_t len);

/* Admit a new connection of source (lkey, addr) counted in `column`, or
 * refuse it. max_open 0: no open limit; rate_count 0: no rate limit, else
 * at most rate_count admissions per rate_ms (sliding window). now_ms: a
 * monotonic clock shared by the processes (CLOCK_MONOTONIC). *ref_out: the
 * ref to release (SRCLIMIT_REF_NONE unless SRCLIMIT_OK). */
int srclimit_acquire(void *mem, uint32_t column, uint64_t lkey, const uint8_t *addr,
                     uint32_t max_open, uint32_t rate_count, uint32_t rate_ms,
                     uint64_t now_ms, uint32_t *ref_out);

/* The connection of `ref` (counted in `column`) closed. Never blocks. */
void srclimit_release(void *mem, uint32_t column, uint32_t ref);

/* The connection of `ref` now belongs to the process of to_column (a
 * connection handed to another worker): its count moves. Never blocks. */
void srclimit_move(void *mem, uint32_t from_column, uint32_t to_column, uint32_t ref);

/* Master, after reaping the process that owned `column` (and before giving
 * the column to another process): drop every count of that column and free
 * the slot locks the process died holding. */
void srclimit_clear_column(void *mem, uint32_t column);

/* The 16-byte addr of a client for acquire, from its struct sockaddr_in or
 * sockaddr_in6: IPv4 as ::ffff:a.b.c.d, an IPv4-mapped IPv6 address (a
 * dual-stack socket) likewise, any other IPv6 address with the bits past
 * prefix_v6 (1..128) cleared. Returns 0, or -1 for another family. */
int srclimit_source_addr(const void *sockaddr, uint32_t prefix_v6, uint8_t *out);

/* Open connections counted for `ref` (all columns), for tests and status. */
uint32_t srclimit_open(const void *mem, uint32_t ref);

/* Scan the table (no locks, a snapshot for status/metrics). */
void srclimit_usage(const void *mem, uint64_t now_ms, struct ringd_srclimit_usage *out);
/* ------------------------------------------------ edge policy lookups
 * (policy.c; exported for the tests and the master, which builds the
 * tables with the same hash) */

/* FNV-1a 64 of the name, mixed with the wildcard flag. */
uint64_t ringd_route_hash(const uint8_t *name, uint32_t len, uint32_t wildcard);

/* The first route (lowest index) of the table that `name` (normalised:
 * lower case, no trailing dot) matches, or -1. */
int32_t ringd_route_lookup(const struct ringd_route_table *t, const uint8_t *name, uint32_t len);

/* 1 if the sockaddr (AF_INET / AF_INET6) is in the list, else 0. */
int ringd_addr_in(const struct ringd_addr_list *l, const uint8_t *sa, uint32_t salen);
