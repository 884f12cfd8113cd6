// churn: loopback TCP connection-churn load generator for the conn-tracer benchmarks.
//
// One process: M server threads (one SO_REUSEPORT listener + epoll each) on 127.0.0.1:PORT
// and N client threads, each looping connect -> send 8 bytes -> read 8 bytes -> close.
// Everything is bounded: by --count (total connections) and by --duration (hard time cap),
// and every blocking socket call has a timeout. Prints one JSON object on stdout.
//
// The client closes first (it reads the reply, then closes), so the client socket goes
// FIN_WAIT1 -> FIN_WAIT2 -> TIME_WAIT/CLOSE and the server socket CLOSE_WAIT -> LAST_ACK ->
// CLOSE: the ordinary active/passive close of a short request/response connection.
//
// Build: cc -O2 -pthread -o churn churn.c
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_THREADS 64
#define MSG_LEN 8

static int opt_port = 0;
static int opt_clients = 4;
static int opt_servers = 2;
static double opt_duration = 10.0;
static long long opt_count = 0;  // 0 = unlimited (time-bounded only)
static double opt_rate = 0.0;    // total connections/s over all clients; 0 = as fast as possible
static int opt_src_addrs = 8;    // client source addresses 127.0.0.2.. (0 = let the kernel pick)

static atomic_int stop_servers;
static atomic_int stop_clients;
static atomic_llong claimed;
static atomic_llong completed;
static atomic_llong err_connect;
static atomic_llong err_io;
static atomic_llong srv_accepted;
static atomic_llong srv_closed;
static atomic_int clients_done;
static int listen_fds[MAX_THREADS];

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "churn: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int make_listener(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    // One listener per server thread, the kernel spreads connections over them.
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) die("SO_REUSEPORT");
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void *server_main(void *arg) {
    int lfd = *(int *)arg;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[256];
    char buf[64];
    while (!atomic_load(&stop_servers)) {
        int n = epoll_wait(ep, evs, 256, 50);  // timeout so the stop flag is seen
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    atomic_fetch_add(&srv_accepted, 1);
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                // Reply once per request; keep the socket until the client's FIN arrives.
                if (write(fd, buf, r < MSG_LEN ? r : MSG_LEN) < 0) {
                    atomic_fetch_add(&err_io, 1);
                }
                if (!(evs[i].events & (EPOLLRDHUP | EPOLLHUP))) continue;
            } else if (r < 0 && errno == EAGAIN) {
                continue;
            }
            close(fd);  // EOF or error (closing also removes it from the epoll set)
            atomic_fetch_add(&srv_closed, 1);
        }
    }
    close(ep);
    return NULL;
}

static int io_all(int fd, char *buf, int len, int is_write) {
    int done = 0;
    while (done < len) {
        ssize_t r = is_write ? send(fd, buf + done, len - done, MSG_NOSIGNAL) : recv(fd, buf + done, len - done, 0);
        if (r <= 0) return -1;
        done += r;
    }
    return 0;
}

static void *client_main(void *arg) {
    int idx = (int)(intptr_t)arg;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(opt_port)};
    dst.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    // Each thread uses its own source address so the ~28k ephemeral ports (with loopback
    // TIME_WAIT reuse after 1 s) are not the limit at high rates.
    struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
    int use_src = opt_src_addrs > 0;
    if (use_src) src.sin_addr.s_addr = htonl(0x7f000002 + (idx % opt_src_addrs));
    struct timeval tmo = {.tv_sec = 2, .tv_usec = 0};
    double interval = opt_rate > 0 ? opt_clients / opt_rate : 0;
    double next = now_s();
    char msg[MSG_LEN] = "churn-01";
    char reply[MSG_LEN];
    while (!atomic_load(&stop_clients)) {
        if (opt_count > 0 && atomic_fetch_add(&claimed, 1) >= opt_count) break;
        if (interval > 0) {
            double t = now_s();
            // Absolute schedule keeps the average rate exact; a long stall does not turn
            // into an unbounded burst (lag is capped at 20 ms).
            if (next < t - 0.02) next = t;
            if (next > t) {
                struct timespec ts = {.tv_sec = (time_t)next, .tv_nsec = (long)((next - (time_t)next) * 1e9)};
                clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
            }
            next += interval;
        }
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            atomic_fetch_add(&err_connect, 1);
            usleep(1000);
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tmo, sizeof tmo);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tmo, sizeof tmo);
        if (use_src) {
            int one = 1;
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            bind(fd, (struct sockaddr *)&src, sizeof src);
        }
        if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
            atomic_fetch_add(&err_connect, 1);
            close(fd);
            usleep(1000);  // e.g. EADDRNOTAVAIL: back off instead of spinning
            continue;
        }
        if (io_all(fd, msg, MSG_LEN, 1) < 0 || io_all(fd, reply, MSG_LEN, 0) < 0) {
            atomic_fetch_add(&err_io, 1);
        } else {
            atomic_fetch_add(&completed, 1);
        }
        close(fd);
    }
    atomic_fetch_add(&clients_done, 1);
    return NULL;
}

static void usage(void) {
    fprintf(stderr,
            "usage: churn --port P [--clients N] [--servers M] [--duration S] [--count C]\n"
            "             [--rate R] [--src-addrs K]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (i + 1 >= argc) usage();
        const char *k = argv[i], *v = argv[++i];
        if (!strcmp(k, "--port")) opt_port = atoi(v);
        else if (!strcmp(k, "--clients")) opt_clients = atoi(v);
        else if (!strcmp(k, "--servers")) opt_servers = atoi(v);
        else if (!strcmp(k, "--duration")) opt_duration = atof(v);
        else if (!strcmp(k, "--count")) opt_count = atoll(v);
        else if (!strcmp(k, "--rate")) opt_rate = atof(v);
        else if (!strcmp(k, "--src-addrs")) opt_src_addrs = atoi(v);
        else usage();
    }
    if (opt_clients < 1 || opt_clients > MAX_THREADS || opt_servers < 1 || opt_servers > MAX_THREADS ||
        opt_duration <= 0 || opt_duration > 3600)
        usage();
    signal(SIGPIPE, SIG_IGN);

    listen_fds[0] = make_listener(opt_port);
    if (opt_port == 0) {
        struct sockaddr_in a;
        socklen_t l = sizeof a;
        getsockname(listen_fds[0], (struct sockaddr *)&a, &l);
        opt_port = ntohs(a.sin_port);
    }
    for (int i = 1; i < opt_servers; i++) listen_fds[i] = make_listener(opt_port);

    pthread_t srv[MAX_THREADS], cli[MAX_THREADS];
    for (int i = 0; i < opt_servers; i++) pthread_create(&srv[i], NULL, server_main, &listen_fds[i]);

    double t0 = now_s();
    for (int i = 0; i < opt_clients; i++) pthread_create(&cli[i], NULL, client_main, (void *)(intptr_t)i);
    // Hard time cap: poll until every client is done or the duration has passed.
    double deadline = t0 + opt_duration;
    for (;;) {
        if (atomic_load(&clients_done) == opt_clients) break;
        if (now_s() >= deadline) break;
        usleep(2000);
    }
    atomic_store(&stop_clients, 1);
    for (int i = 0; i < opt_clients; i++) pthread_join(cli[i], NULL);
    double elapsed = now_s() - t0;

    // Let the server sockets see their FINs (bounded: 2 s), then stop.
    double drain_until = now_s() + 2.0;
    while (atomic_load(&srv_closed) < atomic_load(&srv_accepted) && now_s() < drain_until) usleep(1000);
    atomic_store(&stop_servers, 1);
    for (int i = 0; i < opt_servers; i++) pthread_join(srv[i], NULL);
    for (int i = 0; i < opt_servers; i++) close(listen_fds[i]);

    long long done = atomic_load(&completed);
    printf("{\"port\": %d, \"clients\": %d, \"servers\": %d, \"rate_limit\": %.1f, \"connections\": %lld, "
           "\"errors_connect\": %lld, \"errors_io\": %lld, \"server_accepted\": %lld, \"server_closed\": %lld, "
           "\"listeners\": %d, \"duration_s\": %.4f, \"rate\": %.1f}\n",
           opt_port, opt_clients, opt_servers, opt_rate, done, atomic_load(&err_connect), atomic_load(&err_io),
           atomic_load(&srv_accepted), atomic_load(&srv_closed), opt_servers, elapsed,
           elapsed > 0 ? done / elapsed : 0.0);
    return 0;
}
