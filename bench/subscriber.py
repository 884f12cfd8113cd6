"""WebSocket subscriber for the benchmarks: reads conn-tracer's /ws and counts what arrives.

Runs as its own process so its CPU is not mixed into the tracer's figure. It keeps retrying the
connection until the server accepts (so it can be started before `serve` and measure start-up),
prints ``{"ready": ...}`` once subscribed, a ``{"progress": ...}`` line every 250 ms, and a
``{"summary": ...}`` line on SIGTERM/SIGINT. Everything is per port of interest (``--ports``): an
event belongs to port P when either end is P.

Latency is ``time.monotonic_ns() - ts_ns`` at receive: the event's ``ts_ns`` is the kernel's
``bpf_ktime_get_ns()``, which is CLOCK_MONOTONIC, the same clock as ``time.monotonic_ns()``.
Events without ``ts_ns`` fall back to the ISO ``ts`` against the wall clock (microseconds only).

Only the fields counted here are decoded (msgspec, into a Struct): json.loads of every field cost
2.6 us per event here, 0.7 with msgspec, and under churn the subscriber shares the 2 cores with
what it measures (at 10,000 connections/s, 60,000 events/s: a sixth of a core saved per subscriber).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from array import array
from datetime import datetime
from typing import Any

import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


class PortStats:
    """What arrived for one port."""

    def __init__(self) -> None:
        self.events = 0
        self.by_type: dict[str, int] = {}
        self.close_client = 0  # role=client, dst_port=P: the churn client's socket
        self.close_server = 0  # role=server, src_port=P: the socket the churn server accepted
        self.close_other = 0
        self.first_recv_ns = 0
        self.latency_ns = array("q")

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latency_ns)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] / 1e6

        return {
            "events": self.events,
            "by_type": self.by_type,
            "close_client": self.close_client,
            "close_server": self.close_server,
            "close_other": self.close_other,
            "first_recv_ns": self.first_recv_ns,
            "latency_ms": {"n": len(lat), "p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9),
                           "max": lat[-1] / 1e6 if lat else None},
        }


class Ev(msgspec.Struct, gc=False):
    """What the subscriber reads of an event (or of a control message such as {"type":"dropped"})."""

    type: str | None = None
    seq: int | None = None
    src_port: int | None = None
    dst_port: int | None = None
    role: str | None = None
    ts_ns: int | None = None
    ts: str | None = None
    count: int | None = None


_decode = msgspec.json.Decoder(list[Ev] | Ev).decode


class Subscriber:
    def __init__(self, ports: list[int]) -> None:
        self.ports = {p: PortStats() for p in ports}
        self.messages = 0
        self.dropped_messages = 0
        self.dropped_events = 0
        self.seq_gaps = 0  # events skipped in seq order (should equal dropped_events)
        self.seq_regressions = 0  # duplicates or reordering: must stay 0
        self.last_seq = -1
        self.latency_source = "ts_ns"
        self.connected_ns = 0
        self.errors: list[str] = []

    def handle(self, raw: str | bytes) -> None:
        now = time.monotonic_ns()
        self.messages += 1
        try:
            msg = _decode(raw)
        except msgspec.ValidationError as exc:   # valid JSON, not an event: say so, count nothing
            self.errors.append(f"message: {exc}")
            return
        # With ?batch=N a message is a JSON array of events (and control messages).
        for ev in msg if isinstance(msg, list) else (msg,):
            self.handle_one(ev, now)

    def handle_one(self, ev: Ev, now: int) -> None:
        etype = ev.type
        if etype == "dropped":
            self.dropped_messages += 1
            self.dropped_events += ev.count or 0
            return
        seq = ev.seq
        if seq is not None:
            if seq <= self.last_seq:
                self.seq_regressions += 1
            elif self.last_seq >= 0:
                self.seq_gaps += seq - self.last_seq - 1
            self.last_seq = max(self.last_seq, seq)
        sport = ev.src_port
        dport = ev.dst_port
        st = self.ports.get(sport) or self.ports.get(dport)  # type: ignore[arg-type]
        if st is None:
            return
        st.events += 1
        st.by_type[etype or ""] = st.by_type.get(etype or "", 0) + 1
        if not st.first_recv_ns:
            st.first_recv_ns = now
        if ev.ts_ns is not None:
            st.latency_ns.append(now - ev.ts_ns)
        elif ev.ts is not None:
            self.latency_source = "ts (wall clock)"
            ts = datetime.fromisoformat(ev.ts.replace("Z", "+00:00"))
            st.latency_ns.append(time.time_ns() - int(ts.timestamp() * 1e9))
        if etype == "close":
            role = ev.role
            if role == "client" and dport in self.ports:
                st.close_client += 1
            elif role == "server" and sport in self.ports:
                st.close_server += 1
            else:
                st.close_other += 1

    def progress(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "dropped_events": self.dropped_events,
            "closes": {str(p): s.close_client + s.close_server for p, s in self.ports.items()},
            "events": {str(p): s.events for p, s in self.ports.items()},
        }

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "dropped_messages": self.dropped_messages,
            "dropped_events": self.dropped_events,
            "seq_gaps": self.seq_gaps,
            "seq_regressions": self.seq_regressions,
            "latency_source": self.latency_source,
            "connected_ns": self.connected_ns,
            "errors": self.errors[:10],
            "ports": {str(p): s.summary() for p, s in self.ports.items()},
        }


def emit(kind: str, obj: Any) -> None:
    sys.stdout.write(json.dumps({kind: obj}) + "\n")
    sys.stdout.flush()


async def run(url: str, sub: Subscriber, connect_timeout_s: float) -> None:
    stop = asyncio.Event()
    # A plain flag set by a Python-level handler: with a backlog, recv() returns without ever
    # suspending, so a loop.add_signal_handler callback (and the reporter) would never run.
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    async def watch_flag() -> None:
        while not stopping:
            await asyncio.sleep(0.05)
        stop.set()

    async def reporter() -> None:
        while True:
            await asyncio.sleep(0.25)
            emit("progress", sub.progress())

    async def reader() -> None:
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                # No keepalive pings: a busy loop must not turn into a disconnect mid-run.
                ws = await connect(url, ping_interval=None, max_size=None, open_timeout=5)
                break
            except Exception as exc:  # refused, 503 handshake, timeout...: retried until the deadline
                if time.monotonic() > deadline:
                    sub.errors.append(f"connect: {exc!r}")
                    stop.set()
                    return
                await asyncio.sleep(0.02)
        sub.connected_ns = time.monotonic_ns()
        emit("ready", {"connected_ns": sub.connected_ns})
        try:
            async for msg in ws:
                sub.handle(msg)
                if stopping:
                    break
                if sub.messages % 256 == 0:
                    await asyncio.sleep(0)  # let the reporter and the stop watcher run
        except ConnectionClosed as exc:
            sub.errors.append(f"closed: {exc!r}")
        finally:
            await ws.close()
        stop.set()

    tasks = [asyncio.create_task(reporter()), asyncio.create_task(reader()), asyncio.create_task(watch_flag())]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ports", default="", help="comma-separated ports of interest")
    parser.add_argument("--connect-timeout", type=float, default=60.0)
    args = parser.parse_args()
    sub = Subscriber([int(p) for p in args.ports.split(",") if p])
    asyncio.run(run(args.url, sub, args.connect_timeout))
    emit("summary", sub.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
