// conn-tracer kernel side: TCP life cycle -> BPF ring buffer.
//
// Compiled by bcc at start-up. Kernel struct fields are never read through the
// header layouts (the headers bcc compiles against may belong to another kernel):
// every offset below arrives as a -D flag computed from the running kernel's BTF
// by app/bpf/btf.py. Tracepoint arguments come from tracefs, so they are exact.
//
// Flags set by the loader:
//   OFF_BYTES_RECEIVED, OFF_BYTES_SENT, OFF_BYTES_RETRANS   offsets in struct tcp_sock
//   OFF_SK_FLAGS, SOCK_DONE_BIT          struct sock.sk_flags and enum sock_flags.SOCK_DONE
//   OFF_SK_NET, OFF_NET_INUM             sock -> struct net * -> ns.inum
//   OFF_SKC_*, OFF_INET_SPORT            the connection's addresses and ports
//   DATA_QUEUE_KPROBE                    defined where kprobes work (tcp_data_queue)
//   DATA_QUEUE_INTERVAL_NS               in-kernel coalescing of data-queue events (0 = none)
//   STATE_EVENTS                         emit an event for every other state change too
//   FILTER_PORT, FILTER_PID, FILTER_FAMILY  start-up filters (0 = off)
//   RINGBUF_PAGES, MAX_SOCKETS           sizes
//   EVENT_SIZE                           sizeof(struct event) as mirrored in app/decode.py

#include <uapi/linux/ptrace.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6

// Kernel TCP states (include/net/tcp_states.h; part of the uapi-stable numbering).
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_CLOSE 7
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

#define EVF_FIN_RECEIVED 1   // SOCK_DONE: tcp_fin() ran, bytes_received counts the FIN
#define EVF_PID_FROM_CONNECT 2
#define EVF_PID_FROM_LISTENER 4   // provisional: the first send/recv in process context replaces it

// The one record shared with user space. app/decode.py mirrors it; the
// static assert below fails the compile if the two ever disagree in size.
struct event {
    u64 ts_ns;           // bpf_ktime_get_ns() (CLOCK_MONOTONIC) of this event
    u64 conn_id;         // per-run connection number, assigned at the first transition
    u64 start_ns;        // monotonic time the connection was first seen
    u64 bytes_sent;      // tcp_sock.bytes_sent
    u64 bytes_received;  // tcp_sock.bytes_received (counts a received FIN; see flags)
    u64 bytes_retrans;   // tcp_sock.bytes_retrans: bytes_sent counts these a second time
    u32 pid;             // tgid of the owning process, 0 if not known yet
    u32 netns;           // network namespace inode
    u8 saddr[16];        // local address (IPv4 in the first 4 bytes)
    u8 daddr[16];        // remote address
    u16 sport;           // local port, host order
    u16 dport;           // remote port, host order
    u8 family;           // 4 or 6
    u8 type;             // enum event_type
    u8 role;             // enum role
    u8 state;            // TCP state after this event
    u8 oldstate;         // TCP state before it (state changes only)
    u8 flags;            // EVF_*
    u8 _pad[2];
    char comm[16];
};

_Static_assert(sizeof(struct event) == EVENT_SIZE, "struct event differs from app/decode.py");

// Per-socket facts, keyed by the struct sock pointer. LRU so that sockets whose
// CLOSE we never saw (e.g. lost to a full ring) cannot fill the map for good.
struct sock_info {
    u64 conn_id;
    u64 start_ns;
    u64 last_dq_ns;
    u64 last_dq_payload;   // payload bytes received at the last data-queue event
    u32 pid;
    u8 role;
    u8 state;
    u8 syn_pending;   // the syn_sent/syn_recv event waits for the first event with a real tuple
    u8 flags;
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
    u32 pid;
    char comm[16];
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_TABLE("lru_hash", struct listener_key, struct owner, listeners, 4096);
BPF_TABLE("lru_hash", u64, struct sock_info, sockets, MAX_SOCKETS);
// [0] next connection id, [1] events lost because the ring buffer was full.
BPF_ARRAY(counters, u64, 2);

static __always_inline void count_lost(void) {
    int k = 1;
    u64 *v = counters.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline u64 next_conn_id(void) {
    int k = 0;
    u64 *v = counters.lookup(&k);
    if (!v)
        return 0;
    return __sync_fetch_and_add(v, 1) + 1;
}

static __always_inline u32 read_netns(const void *sk) {
    void *net = NULL;
    u32 inum = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (const char *)sk + OFF_SK_NET);
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), (const char *)net + OFF_NET_INUM);
    return inum;
}

static __always_inline u8 read_fin_flag(const void *sk) {
    unsigned long skf = 0;
    bpf_probe_read_kernel(&skf, sizeof(skf), (const char *)sk + OFF_SK_FLAGS);
    return (skf >> SOCK_DONE_BIT) & 1 ? EVF_FIN_RECEIVED : 0;
}

// Reads the tuple from struct sock_common through BTF offsets.
static __always_inline void read_tuple(struct event *e, const void *sk) {
    u16 family = 0, sport = 0, dport = 0;
    bpf_probe_read_kernel(&family, sizeof(family), (const char *)sk + OFF_SKC_FAMILY);
    bpf_probe_read_kernel(&dport, sizeof(dport), (const char *)sk + OFF_SKC_DPORT);
    // inet_sport, not skc_num: tcp_set_state(TCP_CLOSE) releases the port and
    // zeroes skc_num before the CLOSE tracepoint fires; inet_sport stays.
    bpf_probe_read_kernel(&sport, sizeof(sport), (const char *)sk + OFF_INET_SPORT);
    e->sport = bpf_ntohs(sport);
    e->dport = bpf_ntohs(dport);
    if (family == AF_INET6) {
        e->family = 6;
        bpf_probe_read_kernel(e->saddr, 16, (const char *)sk + OFF_SKC_V6_RCV_SADDR);
        bpf_probe_read_kernel(e->daddr, 16, (const char *)sk + OFF_SKC_V6_DADDR);
    } else {
        e->family = 4;
        bpf_probe_read_kernel(e->saddr, 4, (const char *)sk + OFF_SKC_RCV_SADDR);
        bpf_probe_read_kernel(e->daddr, 4, (const char *)sk + OFF_SKC_DADDR);
    }
}

static __always_inline int passes_filters(const struct event *e) {
#if FILTER_FAMILY
    if (e->family != FILTER_FAMILY)
        return 0;
#endif
#if FILTER_PORT
    if (e->sport != FILTER_PORT && e->dport != FILTER_PORT)
        return 0;
#endif
#if FILTER_PID
    if (e->pid != FILTER_PID)
        return 0;
#endif
    return 1;
}

static __always_inline void submit(struct event *e) {
    if (!passes_filters(e))
        return;
    if (events.ringbuf_output(e, sizeof(*e), 0) != 0)
        count_lost();
}

// Builds and submits one event for a tracked socket. If the socket's syn event
// is still pending, it goes first, with this event's tuple (the kernel sets the
// local port and address only after the SYN_SENT / SYN_RECV transition).
static __always_inline void emit(const void *sk, struct sock_info *si, u8 type, u8 oldstate,
                                 u64 now) {
    struct event e = {};
    read_tuple(&e, sk);
    e.conn_id = si->conn_id;
    e.start_ns = si->start_ns;
    e.pid = si->pid;
    e.role = si->role;
    e.netns = read_netns(sk);
    __builtin_memcpy(e.comm, si->comm, sizeof(e.comm));

    if (si->syn_pending) {
        si->syn_pending = 0;
        e.ts_ns = si->start_ns;
        e.type = si->role == ROLE_CLIENT ? EV_SYN_SENT : EV_SYN_RECV;
        e.state = si->role == ROLE_CLIENT ? ST_SYN_SENT : ST_SYN_RECV;
        e.flags = si->flags;
        submit(&e);
    }

    e.ts_ns = now;
    e.type = type;
    e.state = si->state;
    e.oldstate = oldstate;
    bpf_probe_read_kernel(&e.bytes_sent, sizeof(e.bytes_sent), (const char *)sk + OFF_BYTES_SENT);
    bpf_probe_read_kernel(&e.bytes_received, sizeof(e.bytes_received),
                          (const char *)sk + OFF_BYTES_RECEIVED);
    bpf_probe_read_kernel(&e.bytes_retrans, sizeof(e.bytes_retrans), (const char *)sk + OFF_BYTES_RETRANS);
    e.flags = si->flags | read_fin_flag(sk);
    submit(&e);
}

// Records the current process as the owner, but only from process context: the
// callers are connect() (SYN_SENT) and the send/recv syscall tracepoints.
static __always_inline void claim_owner(struct sock_info *si) {
    si->pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(si->comm, sizeof(si->comm));
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    u64 key = (u64)args->skaddr;
    int newstate = args->newstate;
    int oldstate = args->oldstate;
    u64 now = bpf_ktime_get_ns();

    if (newstate == ST_SYN_SENT || newstate == ST_SYN_RECV) {
        struct sock_info si = {};
        si.conn_id = next_conn_id();
        si.start_ns = now;
        si.state = newstate;
        si.syn_pending = 1;
        if (newstate == ST_SYN_SENT) {
            si.role = ROLE_CLIENT;
            // connect() runs in the caller's process context.
            claim_owner(&si);
            si.flags = EVF_PID_FROM_CONNECT;
        } else {
            // The passive child is created in softirq: whoever runs now is not
            // the owner. The listener's owner stands in until the first
            // send/recv in process context claims it.
            si.role = ROLE_SERVER;
            struct listener_key lk = {.netns = read_netns(args->skaddr), .port = args->sport,
                                      .family = args->family};
            struct owner *o = listeners.lookup(&lk);
            if (o) {
                si.pid = o->pid;
                __builtin_memcpy(si.comm, o->comm, sizeof(si.comm));
                si.flags = EVF_PID_FROM_LISTENER;
            }
        }
        sockets.update(&key, &si);
        return 0;
    }

    if (newstate == ST_LISTEN || oldstate == ST_LISTEN) {
        // listen() runs in the owner's process context; the port is set by bind().
        struct listener_key lk = {.netns = read_netns(args->skaddr), .port = args->sport,
                                  .family = args->family};
        if (newstate == ST_LISTEN) {
            struct owner o = {.pid = bpf_get_current_pid_tgid() >> 32};
            bpf_get_current_comm(o.comm, sizeof(o.comm));
            listeners.update(&lk, &o);
        } else {
            listeners.delete(&lk);
        }
        return 0;
    }

    struct sock_info *si = sockets.lookup(&key);
    if (!si)
        return 0;   // sockets that opened before we attached
    si->state = newstate;

    if (newstate == ST_CLOSE) {
        emit(args->skaddr, si, EV_CLOSE, oldstate, now);
        sockets.delete(&key);
    } else if (newstate == ST_ESTABLISHED) {
        emit(args->skaddr, si, EV_ESTABLISHED, oldstate, now);
    } else {
#ifdef STATE_EVENTS
        emit(args->skaddr, si, EV_STATE_CHANGE, oldstate, now);
#endif
    }
    return 0;
}

static __always_inline void on_data_queued(const void *sk) {
    u64 key = (u64)sk;
    struct sock_info *si = sockets.lookup(&key);
    if (!si)
        return;   // not a connection we track (listening sockets land here too)
    u64 now = bpf_ktime_get_ns();
#if DATA_QUEUE_INTERVAL_NS > 0
    if (si->last_dq_ns && now - si->last_dq_ns < DATA_QUEUE_INTERVAL_NS)
        return;
#endif
    // sk_data_ready also fires for a bare FIN (to wake a reader for EOF): that is
    // no new data, and CLOSE reports the final counters anyway.
    u64 rx = 0;
    bpf_probe_read_kernel(&rx, sizeof(rx), (const char *)sk + OFF_BYTES_RECEIVED);
    u64 payload = rx - (read_fin_flag(sk) && rx ? 1 : 0);
    if (payload == si->last_dq_payload)
        return;
    si->last_dq_payload = payload;
    si->last_dq_ns = now;
    emit(sk, si, EV_DATA_QUEUE, 0, now);
}

#ifdef DATA_QUEUE_KPROBE
// The original design: tcp_data_queue(struct sock *sk, struct sk_buff *skb).
int kprobe__tcp_data_queue(struct pt_regs *ctx) {
    on_data_queued((const void *)PT_REGS_PARM1(ctx));
    return 0;
}
#else
// Without kprobes: sk_data_ready fires when TCP queues data for the reader.
TRACEPOINT_PROBE(sock, sk_data_ready) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    on_data_queued(args->skaddr);
    return 0;
}
#endif

static __always_inline void on_syscall_io(const void *sk, u16 protocol) {
    if (protocol != IPPROTO_TCP)
        return;
    u64 key = (u64)sk;
    struct sock_info *si = sockets.lookup(&key);
    if (si && (si->pid == 0 || (si->flags & EVF_PID_FROM_LISTENER))) {
        claim_owner(si);
        si->flags &= ~EVF_PID_FROM_LISTENER;
    }
}

// Both fire from sock_sendmsg / sock_recvmsg, i.e. in the syscall's process.
TRACEPOINT_PROBE(sock, sock_send_length) {
    on_syscall_io(args->sk, args->protocol);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    on_syscall_io(args->sk, args->protocol);
    return 0;
}
