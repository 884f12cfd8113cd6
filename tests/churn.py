"""Loopback connection churn for load tests: `python churn.py N [RATE] [PORT]` opens and closes N connections.

RATE: connections per second at most (0 = as fast as possible); PORT: listen port (0 = any).

Prints {"port": P} when listening and {"done": N, "seconds": S} at the end (JSON lines).
"""

from __future__ import annotations

import json
import socket
import sys
import time


def say(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    n = int(sys.argv[1])
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    want_port = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", want_port))
    ls.listen(512)
    port = ls.getsockname()[1]
    say({"port": port})
    t0 = time.monotonic()
    for i in range(n):
        if rate > 0:
            # Pacing, not synchronisation: keep the offered load at RATE.
            ahead = t0 + i / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        c = socket.create_connection(("127.0.0.1", port))
        s, _addr = ls.accept()
        # RST-free orderly close on both ends; SO_LINGER 0 would skip TIME_WAIT but emit resets.
        c.close()
        s.close()
    say({"done": n, "seconds": round(time.monotonic() - t0, 3)})


if __name__ == "__main__":
    main()
