"""Bare bcc ring-buffer consumer: the floor that conn-tracer's pipeline cost is compared with.

One TRACEPOINT_PROBE on sock:inet_sock_set_state emits a fixed-size record per TCP state change
into a BPF_RINGBUF_OUTPUT; user space consumes it with a ctypes callback that only counts. No
decoding, no table, no JSON: whatever CPU this process uses per record is the cost of bcc's ring
buffer path itself. Prints ``ready`` once attached, and one JSON summary line on SIGINT/SIGTERM.

With ``--empty``, the attach floor instead: an empty program on each raw tracepoint conn-tracer's
tracer.c uses (inet_sock_set_state, sk_data_ready, sock_send_length, sock_recv_length) and no
records. The BPF time those programs take per connection is what running a program on those
hooks costs before it does any work (bpf_stats' own timing included): the part of conn-tracer's
in-kernel time no change to its programs can remove.

Run as root with Debian's python3-bpfcc importable (the project venv has system site packages).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

BPF_TEXT = r"""
#define IPPROTO_TCP 6

// 64 bytes: about half of conn-tracer's record, same order of magnitude.
struct rec {
    u64 ts_ns;
    u64 skaddr;
    u32 pid;
    u16 sport;
    u16 dport;
    u16 family;
    u8 oldstate;
    u8 newstate;
    u8 _pad[4];
    u8 saddr[16];
    u8 daddr[16];
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(lost, u64, 1);

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    struct rec *r = events.ringbuf_reserve(sizeof(struct rec));
    if (!r) {
        int k = 0;
        u64 *v = lost.lookup(&k);
        if (v)
            __sync_fetch_and_add(v, 1);
        return 0;
    }
    r->ts_ns = bpf_ktime_get_ns();
    r->skaddr = (u64)args->skaddr;
    r->pid = bpf_get_current_pid_tgid() >> 32;
    r->sport = args->sport;
    r->dport = args->dport;
    r->family = args->family;
    r->oldstate = args->oldstate;
    r->newstate = args->newstate;
    __builtin_memcpy(r->saddr, args->saddr_v6, 16);
    __builtin_memcpy(r->daddr, args->daddr_v6, 16);
    events.ringbuf_submit(r, 0);
    return 0;
}
"""


EMPTY_HOOKS = ("inet_sock_set_state", "sk_data_ready", "sock_send_length", "sock_recv_length")
EMPTY_TEXT = "\n".join(f"RAW_TRACEPOINT_PROBE({hook}) {{ return 0; }}" for hook in EMPTY_HOOKS)


class Counter:
    """Holds the only state the callback touches."""

    def __init__(self) -> None:
        self.events = 0

    def on_event(self, ctx: Any, data: Any, size: int) -> int:
        self.events += 1
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1024, help="ring buffer pages (conn-tracer's default)")
    parser.add_argument("--empty", action="store_true", help="empty programs on tracer.c's hooks, no records")
    args = parser.parse_args()

    from bcc import BPF  # imported late so --help works without root

    started = time.monotonic()
    counter = Counter()
    if args.empty:
        bpf = BPF(text=EMPTY_TEXT)   # bcc attaches RAW_TRACEPOINT_PROBE functions itself
    else:
        bpf = BPF(text=BPF_TEXT, cflags=[f"-DRINGBUF_PAGES={args.pages}"])
        bpf["events"].open_ring_buffer(counter.on_event)
    compile_s = time.monotonic() - started

    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while not stopping:
        if args.empty:
            time.sleep(0.1)
        else:
            bpf.ring_buffer_poll(100)  # ms; the signal flag is checked between polls
    if not args.empty:
        bpf.ring_buffer_consume()  # whatever is still queued
    lost = 0 if args.empty else int(bpf["lost"][0].value)
    print(json.dumps({"events": counter.events, "lost_kernel": lost, "compile_s": round(compile_s, 3)}), flush=True)
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
