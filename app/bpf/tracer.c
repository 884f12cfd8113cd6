// conn-tracer kernel side: TCP life cycle -> BPF ring buffer.
//
// Compiled by bcc at start-up. Kernel struct fields are never read through the
// header layouts (the headers bcc compiles against may belong to another kernel):
// every offset below arrives as a -D flag computed from the running kernel's BTF
// by app/bpf/btf.py.
//
// Cost is the design constraint (issue 8): every program is a raw tracepoint (no
// perf buffer is filled for us), paths that emit nothing do one map lookup, a
// record is written in place in the ring (reserve/submit), one record per
// connection stands for both its syn_* and its established event, and user space
// is woken per batch of records, not per record.
//
// Flags set by the loader:
//   OFF_BYTES_RECEIVED, OFF_BYTES_SENT, OFF_BYTES_RETRANS   offsets in struct tcp_sock
//   OFF_SK_FLAGS, SOCK_DONE_BIT          sock_common.skc_flags and enum sock_flags.SOCK_DONE
//   OFF_SK_NET, OFF_NET_INUM             sock -> struct net * -> ns.inum
//   OFF_SK_PROTOCOL                      struct sock.sk_protocol (u16)
//   OFF_SKC_*, OFF_INET_SPORT            the connection's addresses, ports and state
//   SK_HEAD_SIZE                         bytes of struct sock read at once: covers every OFF_SKC_*/OFF_SK_FLAGS/OFF_SK_NET
//   DATA_QUEUE_KPROBE                    defined where kprobes work (tcp_data_queue)
//   DATA_QUEUE_INTERVAL_NS               in-kernel coalescing of data-queue events (0 = none)
//   STATE_EVENTS                         emit an event for every other state change too
//   FILTER_PORT, FILTER_PID, FILTER_FAMILY, FILTER_NETNS  start-up filters (0 = off)
//   OFF_SRTT_US, OFF_MDEV_US, OFF_TOTAL_RETRANS   tcp_sock RTT and retransmission counters
//   TCP_WINDOWS, TCPW*_OFF/SIZE, W_*, AT_*   the same counters grouped into one or two reads
//   OFF_SK_ERR                           struct sock.sk_err: why a socket closed
//   OFF_SKC_COOKIE                       sock_common.skc_cookie (set once sock_diag has dumped the socket)
//   OFF_SK_SOCKET, OFF_SOCKET_ALLOC_SOCKET, OFF_SOCKET_ALLOC_INODE, OFF_INODE_INO   sock -> its socket inode number
//   RINGBUF_PAGES, MAX_SOCKETS           sizes
//   WAKEUP_*                             when a record wakes the reader (see submit_flags)
//   EVENT_SIZE                           sizeof(struct event) as app/bpf/event.py describes it

#include <uapi/linux/ptrace.h>

#ifndef BPF_RB_NO_WAKEUP
#define BPF_RB_NO_WAKEUP 1
#define BPF_RB_FORCE_WAKEUP 2
#endif

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

// Kernel TCP states (include/net/tcp_states.h; part of the uapi-stable numbering).
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_CLOSE 7
#define ST_CLOSE_WAIT 8
#define ST_LISTEN 10

enum event_type {
    EV_SYN_SENT = 1,
    EV_SYN_RECV = 2,
    EV_ESTABLISHED = 3,
    EV_DATA_QUEUE = 4,
    EV_CLOSE = 5,
    EV_STATE_CHANGE = 6,
};

enum role { ROLE_CLIENT = 0, ROLE_SERVER = 1 };

// Why a connection closed, from sk_err and the transition (see close_reason()).
enum close_reason { CR_NONE = 0, CR_NORMAL = 1, CR_REFUSED = 2, CR_TIMEOUT = 3, CR_RESET = 4 };

#define EVF_FIN_RECEIVED 1        // SOCK_DONE: tcp_fin() ran (bytes_received already excludes the FIN)
#define EVF_PID_FROM_CONNECT 2
#define EVF_PID_FROM_LISTENER 4   // provisional: the first send/recv in process context replaces it
#define EVF_SYN 8                 // this record also stands for the syn_sent/syn_recv event at start_ns

// The one record shared with user space; app/bpf/event.py describes it and a test
// checks the two field by field. Byte counters are payload, computed here.
struct event {
    u64 ts_ns;           // bpf_ktime_get_ns() (CLOCK_MONOTONIC) of this event
    u64 start_ns;        // monotonic time the connection was first seen (its SYN)
    u64 conn_id;         // connection number, assigned at the first transition
    u64 bytes_sent;      // tcp_sock.bytes_sent less bytes_retrans: payload sent
    u64 bytes_received;  // tcp_sock.bytes_received less a received FIN: payload received
    u64 bytes_retrans;   // tcp_sock.bytes_retrans
    u64 cgroup_id;       // cgroup v2 id of the owner (where it was claimed), 0 if not known
    u32 pid;             // tgid of the owning process, 0 if not known yet
    u32 netns;           // network namespace inode
    u32 srtt_us;         // tcp_sock.srtt_us >> 3: smoothed RTT, 0 before the first sample
    u32 rttvar_us;       // tcp_sock.mdev_us >> 2
    u32 retrans_segs;    // tcp_sock.total_retrans
    u32 connect_us;      // SYN to ESTABLISHED (server: the SYN-ACK's RTT), 0 until known
    u8 saddr[16];        // local address (IPv4 in the first 4 bytes, the rest zero)
    u8 daddr[16];        // remote address
    u16 sport;           // local port, host order
    u16 dport;           // remote port, host order
    u8 family;           // 4 or 6
    u8 type;             // enum event_type
    u8 role;             // enum role
    u8 state;            // TCP state after this event
    u8 oldstate;         // TCP state before it (state changes only)
    u8 flags;            // EVF_*
    u8 close_reason;     // enum close_reason (close events), CR_NONE otherwise
    u8 _pad[1];
    char comm[16];
};

_Static_assert(sizeof(struct event) == EVENT_SIZE, "struct event differs from app/bpf/event.py");

// Per-socket facts, keyed by the struct sock pointer. LRU so that sockets whose
// CLOSE we never saw (e.g. lost to a full ring) cannot fill the map for good.
struct sock_info {
    u64 conn_id;
    u64 start_ns;
    u64 last_data_ns;      // time of the last data event (either direction): the coalescing clock
    u64 last_rx;           // payload bytes received at the last record
    u64 last_tx;           // payload bytes sent at the last record
    u64 cgroup_id;         // the owner's cgroup v2 id
    u32 pid;
    u32 netns;             // constant for a socket's life: read once
    u32 connect_us;        // set at ESTABLISHED
    u8 role;
    u8 syn_pending;        // the syn_* event rides on the first record with a real tuple
    u8 flags;
    u8 family;             // the tuple, kept from the first record that has it (sport != 0): a
    u16 sport;             // restarted loader finds what it needs to list the connection
    u16 dport;
    u8 saddr[16];
    u8 daddr[16];
    char comm[16];
};

// Who listens on (netns, port): a passive child's provisional owner until the
// process that accepted it sends or receives (prefork servers accept in workers).
struct listener_key {
    u32 netns;
    u16 port;
    u16 family;
};
struct owner {
    u64 cgroup_id;
    u32 pid;
    char comm[16];
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

// Sockets open before we attached, found by user space through sock_diag (which gives every socket
// it dumps a cookie): keyed by that cookie, with the id, role and owner user space listed them
// under. The first hook that misses `sockets` for such a socket takes it over (adopt()), so its
// bytes, state and close come from the kernel from then on. adopt_count[0] is the number of
// entries: while 0 (the usual case) a miss costs one array lookup.
struct adoptee {
    u64 conn_id;
    u64 start_ns;
    u64 cgroup_id;
    u32 pid;
    u8 role;
    u8 _pad[3];
    char comm[16];
};
BPF_TABLE("hash", u64, struct adoptee, adoptees, 16384);
BPF_ARRAY(adopt_count, u64, 1);

// Connects still waiting for their SYN-ACK. SYN_SENT carries no local port yet (KERNEL.md) and
// the syn event rides on the connection's next record, which for a connect that is not answered
// comes only at its timeout: user space reads this small map a few times a second, finds the
// port of each old entry by its socket inode (sock_diag), and lists the connection at once.
// Entries leave at ESTABLISHED or CLOSE; if the map is full a connect is simply not listed early.
struct pending_connect {
    u64 conn_id;
    u64 start_ns;
    u64 cgroup_id;
    u64 inode;
    u32 pid;
    u32 netns;
    u8 family;
    u8 _pad;
    u16 dport;
    u8 daddr[16];
    char comm[16];
};
BPF_TABLE("hash", u64, struct pending_connect, connecting, 4096);
// PIN_* (paths under bpffs, app/bpf/pins.py) make these outlive the loader: a restart
// keeps tracking the same sockets and numbering connections where it stopped.
#ifdef PIN_SOCKETS
BPF_TABLE_PINNED("lru_hash", struct listener_key, struct owner, listeners, 4096, PIN_LISTENERS);
BPF_TABLE_PINNED("lru_hash", u64, struct sock_info, sockets, MAX_SOCKETS, PIN_SOCKETS);
BPF_TABLE_PINNED("array", int, u64, ids, 2, PIN_IDS);
#else
BPF_TABLE("lru_hash", struct listener_key, struct owner, listeners, 4096);
BPF_TABLE("lru_hash", u64, struct sock_info, sockets, MAX_SOCKETS);
BPF_ARRAY(ids, u64, 2);
#endif

// ids[0]: the last connection number given; ids[1]: user space's CLOCK_MONOTONIC -> UTC offset,
// kept so that a restarted loader shows the same started_at for the same connection.

// counters[CTR_LOST]: records lost to a full ring buffer (this run's).
#define CTR_LOST 1
BPF_ARRAY(counters, u64, 2);

static __always_inline void count_lost(void) {
    int k = CTR_LOST;
    u64 *v = counters.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline u64 next_conn_id(void) {
    int k = 0;
    u64 *v = ids.lookup(&k);
    if (!v)
        return 0;
    return __sync_fetch_and_add(v, 1) + 1;
}

// Waking the reader costs an irq_work here and a context switch and a loop turn
// there: do it for the first record after WAKEUP_INTERVAL_NS without a wake-up, or
// once WAKEUP_RECORDS were written since the last one; otherwise the record waits
// for that wake-up or for the reader's own timer. While busy (the last window held
// at least WAKEUP_BUSY_RECORDS) the interval is WAKEUP_BUSY_INTERVAL_NS: fewer,
// larger batches when there is a lot to read, low latency when there is little.
// (Unsynchronised across CPUs on purpose: a race costs at most an extra or a later
// wake-up, never a record.)
struct wakeup_state {
    u64 last_ns;
    u64 records;
    u64 busy;
};
BPF_ARRAY(wakeup, struct wakeup_state, 1);

static __always_inline u64 submit_flags(u64 now) {
    int k = 0;
    struct wakeup_state *w = wakeup.lookup(&k);
    if (!w)
        return 0;
    u64 interval = w->busy ? WAKEUP_BUSY_INTERVAL_NS : WAKEUP_INTERVAL_NS;
    if (now - w->last_ns >= interval || ++w->records >= WAKEUP_RECORDS) {
        w->busy = w->records >= WAKEUP_BUSY_RECORDS;
        w->last_ns = now;
        w->records = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
}

static __always_inline u32 read_netns(const void *sk) {
    void *net = NULL;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_INUM);
    return inum;
}

static __always_inline u16 read_protocol(const void *sk) {
    u16 proto = 0;
    bpf_probe_read_kernel(&proto, sizeof(proto), (const char *)sk + OFF_SK_PROTOCOL);
    return proto;
}

static __always_inline u16 read_family(const void *sk) {
    u16 family = 0;
    bpf_probe_read_kernel(&family, sizeof(family), (const char *)sk + OFF_SKC_FAMILY);
    return family;
}

static __always_inline u16 read_sport_be(const void *sk) {
    // inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) releases the port and
    // zeroes skc_num before the CLOSE tracepoint fires; inet_sport stays.
    u16 sport = 0;
    bpf_probe_read_kernel(&sport, sizeof(sport), (const char *)sk + OFF_INET_SPORT);
    return sport;
}

#define HEAD_FIELD(head, off, type) (*(type *)((head) + (off)))

// The addresses, ports, family and flags all sit in the first SK_HEAD_SIZE bytes
// of struct sock (sock_common): one probe read instead of eight.
struct sk_head {
    u8 b[SK_HEAD_SIZE];
};

struct tuple {
    u8 saddr[16];
    u8 daddr[16];
    u16 sport;
    u16 dport;
    u8 family;
    u8 fin;
    u8 state;   // skc_state; at inet_sock_set_state still the old one (the store follows the tracepoint)
};

static __always_inline void read_tuple(struct tuple *t, const void *sk) {
    struct sk_head h;
    bpf_probe_read_kernel(&h, sizeof(h), sk);
    u16 family = HEAD_FIELD(h.b, OFF_SKC_FAMILY, u16);
    t->dport = bpf_ntohs(HEAD_FIELD(h.b, OFF_SKC_DPORT, u16));
    t->sport = bpf_ntohs(read_sport_be(sk));
    t->fin = (HEAD_FIELD(h.b, OFF_SK_FLAGS, unsigned long) >> SOCK_DONE_BIT) & 1;
    t->state = HEAD_FIELD(h.b, OFF_SKC_STATE, u8);
    if (family == AF_INET6) {
        t->family = 6;
        __builtin_memcpy(t->saddr, h.b + OFF_SKC_V6_RCV_SADDR, 16);
        __builtin_memcpy(t->daddr, h.b + OFF_SKC_V6_DADDR, 16);
    } else {
        t->family = 4;
        __builtin_memset(t->saddr, 0, 16);
        __builtin_memset(t->daddr, 0, 16);
        __builtin_memcpy(t->saddr, h.b + OFF_SKC_RCV_SADDR, 4);
        __builtin_memcpy(t->daddr, h.b + OFF_SKC_DADDR, 4);
    }
}

static __always_inline int passes_filters(const struct tuple *t, u32 pid) {
#if FILTER_FAMILY
    if (t->family != FILTER_FAMILY)
        return 0;
#endif
#if FILTER_PORT
    if (t->sport != FILTER_PORT && t->dport != FILTER_PORT)
        return 0;
#endif
#if FILTER_PID
    if (pid != FILTER_PID)
        return 0;
#endif
    return 1;
}

// The tcp_sock counters in (at most) two reads: app/bpf/btf.py tcp_windows() groups them.
#if TCP_WINDOWS
struct tcp_windows {
    u8 w0[TCPW0_SIZE];
    u8 w1[TCPW1_SIZE];
};
#define TCPW_FIELD(w, name, type) (*(type *)((W_##name ? (w)->w1 : (w)->w0) + AT_##name))
// Too big for the 512-byte BPF stack beside the rest of emit(): a per-CPU scratch buffer.
BPF_PERCPU_ARRAY(tcp_scratch, struct tcp_windows, 1);
#endif

// Writes one record for a tracked socket straight into the ring. If the socket's
// syn event is still pending, the record carries EVF_SYN: the kernel sets the
// local port and address only after the SYN_SENT / SYN_RECV transition, so this
// is the first record with the real tuple, and start_ns is the syn's time.
#define STATE_FROM_SOCKET 0xff

// `state` is the state after this event, or STATE_FROM_SOCKET to read it from the socket.
static __always_inline void emit(const void *sk, struct sock_info *si, u8 type, u8 oldstate, u8 state,
                                 u8 close_reason, u64 now) {
    struct tuple t;
    read_tuple(&t, sk);
    if (!passes_filters(&t, si->pid))
        return;
    u64 sent = 0, received = 0, retrans = 0;
    u32 srtt = 0, mdev = 0, retrans_segs = 0;
#if TCP_WINDOWS
    int z = 0;
    struct tcp_windows *w = tcp_scratch.lookup(&z);
    if (!w)
        return;
    bpf_probe_read_kernel(w->w0, sizeof(w->w0), (const char *)sk + TCPW0_OFF);
#if TCP_WINDOWS > 1
    bpf_probe_read_kernel(w->w1, sizeof(w->w1), (const char *)sk + TCPW1_OFF);
#endif
    sent = TCPW_FIELD(w, BYTES_SENT, u64);
    received = TCPW_FIELD(w, BYTES_RECEIVED, u64);
    retrans = TCPW_FIELD(w, BYTES_RETRANS, u64);
    srtt = TCPW_FIELD(w, SRTT_US, u32);
    mdev = TCPW_FIELD(w, MDEV_US, u32);
    retrans_segs = TCPW_FIELD(w, TOTAL_RETRANS, u32);
#else
    bpf_probe_read_kernel(&sent, sizeof(sent), (const char *)sk + OFF_BYTES_SENT);
    bpf_probe_read_kernel(&received, sizeof(received), (const char *)sk + OFF_BYTES_RECEIVED);
    bpf_probe_read_kernel(&retrans, sizeof(retrans), (const char *)sk + OFF_BYTES_RETRANS);
    bpf_probe_read_kernel(&srtt, sizeof(srtt), (const char *)sk + OFF_SRTT_US);
    bpf_probe_read_kernel(&mdev, sizeof(mdev), (const char *)sk + OFF_MDEV_US);
    bpf_probe_read_kernel(&retrans_segs, sizeof(retrans_segs), (const char *)sk + OFF_TOTAL_RETRANS);
#endif
    srtt >>= 3;   // the kernel keeps srtt << 3 and mdev << 2
    mdev >>= 2;
    if (type == EV_ESTABLISHED && !si->connect_us) {
        // Client: SYN sent to SYN-ACK received. Server: the passive child exists only from the
        // final ACK on, and its first RTT sample is the SYN-ACK's: SYN-ACK sent to final ACK.
        u64 c = si->role == ROLE_CLIENT ? (now - si->start_ns) / 1000 : srtt;
        si->connect_us = c ? (u32)c : 1;
    }

    if (!si->sport && t.sport) {
        // Kept even if this record is lost: the sweep and a restarted loader list the socket from it.
        si->family = t.family;
        si->sport = t.sport;
        si->dport = t.dport;
        __builtin_memcpy(si->saddr, t.saddr, 16);
        __builtin_memcpy(si->daddr, t.daddr, 16);
    }
    struct event *e = events.ringbuf_reserve(sizeof(struct event));
    if (!e) {
        count_lost();
        return;
    }
    e->ts_ns = now;
    e->start_ns = si->start_ns;
    e->conn_id = si->conn_id;
    // bytes_sent counts retransmitted bytes again; bytes_received advances with
    // rcv_nxt, which a received FIN moves by one (KERNEL.md). Payload is neither.
    e->bytes_sent = sent - (retrans < sent ? retrans : sent);
    e->bytes_received = received - (t.fin && received ? 1 : 0);
    e->bytes_retrans = retrans;
    e->cgroup_id = si->cgroup_id;
    e->pid = si->pid;
    e->netns = si->netns;
    e->srtt_us = srtt;
    e->rttvar_us = mdev;
    e->retrans_segs = retrans_segs;
    e->connect_us = si->connect_us;
    si->last_tx = e->bytes_sent;
    si->last_rx = e->bytes_received;
    // Any record carries the counters: the next data event is due an interval after it. A
    // connection shorter than the interval so costs no data event at all (its bytes come with
    // ESTABLISHED and CLOSE); a quiet one's last bytes are refreshed by user space's sweep.
    si->last_data_ns = now;
    __builtin_memcpy(e->saddr, t.saddr, 16);
    __builtin_memcpy(e->daddr, t.daddr, 16);
    e->sport = t.sport;
    e->dport = t.dport;
    e->family = t.family;
    e->type = type;
    e->role = si->role;
    e->state = state == STATE_FROM_SOCKET ? t.state : state;
    e->oldstate = oldstate;
    e->flags = si->flags | (t.fin ? EVF_FIN_RECEIVED : 0) | (si->syn_pending ? EVF_SYN : 0);
    e->close_reason = close_reason;
    e->_pad[0] = 0;
    __builtin_memcpy(e->comm, si->comm, sizeof(e->comm));
    si->syn_pending = 0;
    events.ringbuf_submit(e, submit_flags(now));
}

// Records the current process as the owner, but only from process context: the
// callers are connect() (SYN_SENT) and the send/recv syscall tracepoints.
static __always_inline void claim_owner(struct sock_info *si) {
    si->pid = bpf_get_current_pid_tgid() >> 32;
    si->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(si->comm, sizeof(si->comm));
}

// errno values sk_err takes (uapi asm-generic/errno*.h).
#define E_PIPE 32
#define E_CONNABORTED 103
#define E_CONNRESET 104
#define E_TIMEDOUT 110
#define E_CONNREFUSED 111

// Why a socket reaches CLOSE. tcp_reset() and tcp_write_err() set sk_err before tcp_done()
// moves the socket to CLOSE: an RST answering our SYN is ECONNREFUSED, one on a connection
// ECONNRESET (EPIPE in CLOSE_WAIT), retransmissions running out ETIMEDOUT (or the soft error
// that made them fail, e.g. EHOSTUNREACH). An abortive close of our own (SO_LINGER 0, unread
// data, tcp_abort) goes from ESTABLISHED/CLOSE_WAIT/SYN_RECV straight to CLOSE and sends the
// RST just after this tracepoint, with sk_err still 0. Orderly closes arrive from FIN_WAIT*,
// CLOSING, LAST_ACK (through TIME_WAIT or not).
static __always_inline u8 close_reason(const void *sk, int oldstate) {
    int err = 0;
    bpf_probe_read_kernel(&err, sizeof(err), (const char *)sk + OFF_SK_ERR);
    if (err == E_CONNREFUSED)
        return CR_REFUSED;
    if (err == E_CONNRESET || err == E_PIPE || err == E_CONNABORTED)
        return CR_RESET;
    if (err == E_TIMEDOUT || (err && oldstate == ST_SYN_SENT))
        return CR_TIMEOUT;
    if (oldstate == ST_ESTABLISHED || oldstate == ST_CLOSE_WAIT || oldstate == ST_SYN_RECV)
        return CR_RESET;
    return CR_NORMAL;
}

static __always_inline void note_connect(const void *sk, const struct sock_info *si) {
    struct pending_connect p = {.conn_id = si->conn_id, .start_ns = si->start_ns, .cgroup_id = si->cgroup_id,
                                .pid = si->pid, .netns = si->netns};
    __builtin_memcpy(p.comm, si->comm, sizeof(p.comm));
    struct tuple t;
    read_tuple(&t, sk);   // the remote end is set before SYN_SENT; the local port is not
    p.family = t.family;
    p.dport = t.dport;
    __builtin_memcpy(p.daddr, t.daddr, 16);
    void *sock = NULL;
    bpf_probe_read_kernel(&sock, sizeof(sock), (const char *)sk + OFF_SK_SOCKET);
    if (sock)
        bpf_probe_read_kernel(&p.inode, sizeof(p.inode),
                              (const char *)sock - OFF_SOCKET_ALLOC_SOCKET + OFF_SOCKET_ALLOC_INODE + OFF_INODE_INO);
    u64 key = (u64)sk;
    connecting.update(&key, &p);
}

static __always_inline struct sock_info *adopt(const void *sk, u64 key) {
    int z = 0;
    u64 *n = adopt_count.lookup(&z);
    if (!n || !*n)
        return NULL;
    u64 cookie = 0;
    bpf_probe_read_kernel(&cookie, sizeof(cookie), (const char *)sk + OFF_SKC_COOKIE);
    if (!cookie)
        return NULL;
    struct adoptee *a = adoptees.lookup(&cookie);
    if (!a)
        return NULL;
    struct sock_info si = {.conn_id = a->conn_id, .start_ns = a->start_ns, .cgroup_id = a->cgroup_id,
                           .pid = a->pid, .role = a->role};
    __builtin_memcpy(si.comm, a->comm, sizeof(si.comm));
    si.netns = read_netns(sk);
    sockets.update(&key, &si);
    adoptees.delete(&cookie);
    __sync_fetch_and_add(n, -1);
    return sockets.lookup(&key);
}

// raw_tp inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)
int ct_state(struct bpf_raw_tracepoint_args *ctx) {
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    u64 key = (u64)sk;

    if (newstate == ST_SYN_SENT || newstate == ST_SYN_RECV) {
        // Only these transitions create state; SCTP shares this tracepoint.
        if (read_protocol(sk) != IPPROTO_TCP)
            return 0;
        struct sock_info si = {};
        si.netns = read_netns(sk);
#if FILTER_NETNS
        if (si.netns != FILTER_NETNS)
            return 0;   // not tracked at all: every later hook misses its lookup
#endif
        si.conn_id = next_conn_id();
        si.start_ns = bpf_ktime_get_ns();
        si.syn_pending = 1;
        if (newstate == ST_SYN_SENT) {
            si.role = ROLE_CLIENT;
            // connect() runs in the caller's process context.
            claim_owner(&si);
            si.flags = EVF_PID_FROM_CONNECT;
            note_connect(sk, &si);
        } else {
            // The passive child is created in softirq (oldstate is the listener's
            // LISTEN, copied by the clone): whoever runs now is not the owner. The
            // listener's owner stands in until the first send/recv in process
            // context claims it. inet_sport is the listener's, copied too.
            si.role = ROLE_SERVER;
            struct owner *o = listeners.lookup(&(struct listener_key){
                .netns = si.netns, .port = bpf_ntohs(read_sport_be(sk)), .family = read_family(sk)});
            if (o) {
                si.pid = o->pid;
                si.cgroup_id = o->cgroup_id;
                __builtin_memcpy(si.comm, o->comm, sizeof(si.comm));
                si.flags = EVF_PID_FROM_LISTENER;
            }
        }
        sockets.update(&key, &si);
        return 0;
    }

    if (newstate == ST_LISTEN || oldstate == ST_LISTEN) {
        if (read_protocol(sk) != IPPROTO_TCP)
            return 0;
        // listen() runs in the owner's process context; the port is set by bind().
        struct listener_key lk = {.netns = read_netns(sk), .port = bpf_ntohs(read_sport_be(sk)),
                                  .family = read_family(sk)};
        if (newstate == ST_LISTEN) {
            struct owner o = {.pid = bpf_get_current_pid_tgid() >> 32, .cgroup_id = bpf_get_current_cgroup_id()};
            bpf_get_current_comm(o.comm, sizeof(o.comm));
            listeners.update(&lk, &o);
        } else {
            listeners.delete(&lk);
        }
        return 0;
    }

#ifndef STATE_EVENTS
    // Other transitions emit nothing: no lookup (a data event reads the state from the socket).
    if (newstate != ST_CLOSE && newstate != ST_ESTABLISHED)
        return 0;
#endif
    struct sock_info *si = sockets.lookup(&key);
    if (!si)
        si = adopt(sk, key);
    if (!si)
        return 0;   // non-TCP sockets, and sockets that opened before we attached and were not dumped

    if (si->syn_pending && si->role == ROLE_CLIENT)
        connecting.delete(&key);   // answered or failed: no longer pending
    if (newstate == ST_CLOSE) {
        emit(sk, si, EV_CLOSE, oldstate, newstate, close_reason(sk, oldstate), bpf_ktime_get_ns());
        sockets.delete(&key);
    } else if (newstate == ST_ESTABLISHED) {
        emit(sk, si, EV_ESTABLISHED, oldstate, newstate, CR_NONE, bpf_ktime_get_ns());
    } else {
        emit(sk, si, EV_STATE_CHANGE, oldstate, newstate, CR_NONE, bpf_ktime_get_ns());
    }
    return 0;
}

// At most one data event per connection per DATA_QUEUE_INTERVAL_NS, whichever direction moves:
// the caller has seen that one of the payload counters differs from the last record's.
static __always_inline int data_due(struct sock_info *si, u64 now) {
#if DATA_QUEUE_INTERVAL_NS > 0
    if (si->last_data_ns && now - si->last_data_ns < DATA_QUEUE_INTERVAL_NS)
        return 0;
#endif
    return 1;   // emit() restarts the clock
}

static __always_inline void on_data_queued(const void *sk) {
    u64 key = (u64)sk;
    struct sock_info *si = sockets.lookup(&key);
    if (!si)
        si = adopt(sk, key);
    if (!si)
        return;   // not a connection we track (listening sockets land here too)
    // sk_data_ready also fires for a bare FIN (to wake a reader for EOF): that is
    // no new data, and CLOSE reports the final counters anyway.
    u64 rx = 0;
    unsigned long skf = 0;
    bpf_probe_read_kernel(&rx, sizeof(rx), (const char *)sk + OFF_BYTES_RECEIVED);
    bpf_probe_read_kernel(&skf, sizeof(skf), (const char *)sk + OFF_SK_FLAGS);
    u64 payload = rx - (((skf >> SOCK_DONE_BIT) & 1) && rx ? 1 : 0);
    if (payload == si->last_rx)
        return;
    u64 now = bpf_ktime_get_ns();
    if (data_due(si, now))
        emit(sk, si, EV_DATA_QUEUE, 0, STATE_FROM_SOCKET, CR_NONE, now);
}

#ifdef DATA_QUEUE_KPROBE
// The original design: tcp_data_queue(struct sock *sk, struct sk_buff *skb).
int ct_dq_kprobe(struct pt_regs *ctx) {
    on_data_queued((const void *)PT_REGS_PARM1(ctx));
    return 0;
}
#else
// raw_tp sk_data_ready(const struct sock *sk): fires when TCP queues data for the
// reader. Untracked sockets (UDP, listeners, ...) miss the lookup and return.
int ct_data_ready(struct bpf_raw_tracepoint_args *ctx) {
    on_data_queued((const void *)ctx->args[0]);
    return 0;
}
#endif

// raw_tp sock_send_length / sock_recv_length(struct sock *sk, int ret, int flags):
// both fire from sock_sendmsg / sock_recvmsg, i.e. in the syscall's process.
static __always_inline struct sock_info *on_syscall_io(const void *sk) {
    u64 key = (u64)sk;
    struct sock_info *si = sockets.lookup(&key);
    if (!si)
        si = adopt(sk, key);
    if (si && (si->pid == 0 || (si->flags & EVF_PID_FROM_LISTENER))) {
        claim_owner(si);
        si->flags &= ~EVF_PID_FROM_LISTENER;
    }
    return si;
}

// A send is where the sent counter moves for a connection that only sends (its peer's ACKs
// wake no hook of ours): the data event that keeps bytes_sent live, coalesced like the
// receive side's.
int ct_send(struct bpf_raw_tracepoint_args *ctx) {
    const void *sk = (const void *)ctx->args[0];
    struct sock_info *si = on_syscall_io(sk);
    if (!si || (int)ctx->args[1] <= 0)
        return 0;
    u64 sent = 0, retrans = 0;
    bpf_probe_read_kernel(&sent, sizeof(sent), (const char *)sk + OFF_BYTES_SENT);
    bpf_probe_read_kernel(&retrans, sizeof(retrans), (const char *)sk + OFF_BYTES_RETRANS);
    if (sent - (retrans < sent ? retrans : sent) == si->last_tx)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (data_due(si, now))
        emit(sk, si, EV_DATA_QUEUE, 0, STATE_FROM_SOCKET, CR_NONE, now);
    return 0;
}

int ct_recv(struct bpf_raw_tracepoint_args *ctx) {
    on_syscall_io((const void *)ctx->args[0]);
    return 0;
}
