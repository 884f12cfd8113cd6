"""The attach floor: one empty program on each raw tracepoint conn-tracer uses, nothing else.

Same hooks as app/bpf/tracer.c (inet_sock_set_state, sk_data_ready, sock_send_length,
sock_recv_length), each running a program that returns at once: the BPF time these programs
take per connection is what dispatching a program on those tracepoints costs before it does any
work (bpf_stats' own timing included), the part of conn-tracer's in-kernel time no code change
can remove. Prints ``ready`` once attached, and one JSON line on SIGINT/SIGTERM (no records).

Run as root with Debian's python3-bpfcc importable (the project venv has system site packages).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

HOOKS = ("inet_sock_set_state", "sk_data_ready", "sock_send_length", "sock_recv_length")
BPF_TEXT = "\n".join(f"RAW_TRACEPOINT_PROBE({hook}) {{ return 0; }}" for hook in HOOKS)


def main() -> int:
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        return 0
    from bcc import BPF  # imported late so --help works without root

    started = time.monotonic()
    bpf = BPF(text=BPF_TEXT)   # bcc attaches RAW_TRACEPOINT_PROBE functions itself
    compile_s = time.monotonic() - started
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while not stopping:
        time.sleep(0.1)
    print(json.dumps({"records": 0, "lost_kernel": 0, "compile_s": round(compile_s, 3)}), flush=True)
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
