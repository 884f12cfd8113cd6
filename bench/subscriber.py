"""WebSocket subscriber for the benchmarks: reads conn-tracer's /ws and counts what arrives.

Runs as its own process so its CPU is not mixed into the tracer's figure. It keeps retrying the
connection until the server accepts (so it can be started before `serve` and measure start-up),
prints ``{"ready": ...}`` once subscribed, a ``{"progress": ...}`` line every 250 ms, and a
``{"summary": ...}`` line on SIGTERM/SIGINT. Everything is per port of interest (``--ports``): an
event belongs to port P when either end is P.

Latency is ``time.monotonic_ns() - ts_ns`` at receive (of the read that brought it): the event's
``ts_ns`` is the kernel's ``bpf_ktime_get_ns()``, which is CLOCK_MONOTONIC, the same clock as
``time.monotonic_ns()``. Events without ``ts_ns`` fall back to the ISO ``ts`` against the wall
clock (microseconds only).

Only the fields counted here are decoded (msgspec, into a Struct): json.loads of every field cost
2.6 us per event here, 0.7 with msgspec, and under churn the subscriber shares the 2 cores with
what it measures (at 10,000 connections/s, 60,000 events/s: a sixth of a core saved per subscriber).

Frames are read by a plain asyncio Protocol: websockets' sans-io client does the opening handshake,
then every complete frame of each read is parsed here and handled in one pass (pings answered: the
server closes a client that does not). websockets' asyncio client, a queue hop and an await per
message, cost ~7 us of CPU per message with ?type=close at max churn and fell behind; this ~3 us.
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
from websockets.client import ClientProtocol
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri


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

    def handle(self, raw: bytes | memoryview, now: int) -> None:
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


class WSClient(asyncio.Protocol):
    """One /ws connection: websockets' sans-io client does the opening handshake, then the server's
    frames are parsed here, every complete one of each read in one pass (no per-message await)."""

    def __init__(self, url: str, sub: Subscriber, stop: asyncio.Event) -> None:
        self.uri = parse_uri(url)
        self.sub = sub
        self.stop = stop
        self.handshake = ClientProtocol(self.uri)
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = b""  # the start of a frame (or of the handshake's response) still incomplete
        self.fragments: list[bytes] | None = None  # a fragmented message so far
        self.is_open = False  # handshake done: from here on, losing the connection ends the run
        self.closing = False

    @classmethod
    async def open(cls, url: str, sub: Subscriber, stop: asyncio.Event) -> WSClient:
        ws = cls(url, sub, stop)
        await asyncio.get_running_loop().create_connection(lambda: ws, ws.uri.host, ws.uri.port,
                                                           ssl=True if ws.uri.secure else None)
        try:
            await ws.opened
        except BaseException:  # upgrade refused, or timed out: this attempt's socket goes
            assert ws.transport is not None
            ws.transport.abort()
            raise
        return ws

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.handshake.send_request(self.handshake.connect())
        transport.write(b"".join(self.handshake.data_to_send()))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        if not self.is_open:
            if self.opened.done():  # a refused attempt, being aborted: the rest of the response is not frames
                return
            end = data.find(b"\r\n\r\n") + 4
            if end == 3:
                self.buf = data
                return
            # websockets gets the response alone (checks 101, Sec-WebSocket-Accept...); what follows is frames.
            self.handshake.receive_data(data[:end])
            if self.handshake.state is not State.OPEN:
                status = data[:data.find(b"\r\n")].decode(errors="replace")
                self.opened.set_exception(self.handshake.handshake_exc or ConnectionError(status))
                self.buf = b""
                return
            self.sub.connected_ns = time.monotonic_ns()
            self.is_open = True
            self.opened.set_result(None)
            data = data[end:]
        self.buf = data[self.frames(data):]

    def frames(self, buf: bytes) -> int:
        """Handles every complete frame in buf; returns where the incomplete rest starts."""
        now = time.monotonic_ns()  # one receive time for everything this read brought
        handle = self.sub.handle
        view = memoryview(buf)  # payloads without copying them
        n = len(buf)
        i = 0
        while n - i >= 2:
            b0 = buf[i]
            length = buf[i + 1]
            h = i + 2
            if length >= 126:  # a 16- or 64-bit length follows, or the mask bit is set (never, from a server)
                if length == 126:
                    if h + 2 > n:
                        break
                    length = buf[h] << 8 | buf[h + 1]
                    h += 2
                elif length == 127:
                    length = int.from_bytes(buf[h:h + 8], "big")  # if cut short, h + 8 > n: waits below
                    h += 8
                else:
                    self.fail("masked frame from the server")
                    return n
            end = h + length
            if end > n:
                break
            if b0 == 0x81:  # FIN + text: a whole message, nearly every frame
                handle(view[h:end], now)
            else:
                self.other(b0, view[h:end], now)
                if self.closing:
                    return n
            i = end
        return i

    def other(self, b0: int, payload: memoryview, now: int) -> None:
        """Every frame but a whole text message: fragments, binary, ping, pong, close."""
        op = b0 & 0x0F
        fin = b0 & 0x80
        if b0 & 0x70:
            self.fail(f"reserved bits set in frame header {b0:#x}")
        elif op == Opcode.PING:  # the server closes a client that does not answer (ws_ping_interval_s)
            self.send(Frame(Opcode.PONG, bytes(payload)))
        elif op == Opcode.PONG:
            pass
        elif op == Opcode.CLOSE:
            try:
                close = Close.parse(bytes(payload))
            except Exception as exc:
                close = Close(CloseCode.PROTOCOL_ERROR, str(exc))
            self.sub.errors.append(f"closed: {close!r}")
            self.end(Close(CloseCode.NORMAL_CLOSURE, ""))
        elif op in (Opcode.TEXT, Opcode.BINARY) and self.fragments is None:
            if fin:
                self.sub.handle(payload, now)
            else:
                self.fragments = [bytes(payload)]
        elif op == Opcode.CONT and self.fragments is not None:
            self.fragments.append(bytes(payload))
            if fin:
                self.sub.handle(b"".join(self.fragments), now)
                self.fragments = None
        else:
            self.fail(f"unexpected frame opcode {op}")

    def send(self, frame: Frame) -> None:
        assert self.transport is not None
        self.transport.write(frame.serialize(mask=True))  # a client's frames must be masked

    def fail(self, why: str) -> None:
        self.sub.errors.append(f"protocol: {why}")
        self.end(Close(CloseCode.PROTOCOL_ERROR, why))

    def end(self, close: Close) -> None:
        """Sends our close frame and closes the socket (after what is buffered is sent); stops the run."""
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.send(Frame(Opcode.CLOSE, close.serialize()))
            self.transport.close()
        self.stop.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)
        if not self.is_open:  # a failed attempt: open() says why and the connector retries
            if not self.opened.done():
                self.opened.set_exception(ConnectionError(f"connection lost during the handshake: {exc!r}"))
            return
        if not self.closing:
            self.sub.errors.append(f"closed: connection lost ({exc!r})")
        self.closing = True
        self.stop.set()


async def run(url: str, sub: Subscriber, connect_timeout_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Frames are handled in data_received, so the loop gets control back after every read, however
    # large the backlog: an asyncio signal handler (and the reporter) run promptly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    client: WSClient | None = None

    async def reporter() -> None:
        while True:
            await asyncio.sleep(0.25)
            emit("progress", sub.progress())

    async def connector() -> None:
        nonlocal client
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                client = await asyncio.wait_for(WSClient.open(url, sub, stop), 5)
                break
            except Exception as exc:  # refused, 503 handshake, timeout...: retried until the deadline
                if time.monotonic() > deadline:
                    sub.errors.append(f"connect: {exc!r}")
                    stop.set()
                    return
                await asyncio.sleep(0.02)
        emit("ready", {"connected_ns": sub.connected_ns})

    tasks = [asyncio.create_task(reporter()), asyncio.create_task(connector())]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if client is not None:
        client.end(Close(CloseCode.NORMAL_CLOSURE, ""))
        await asyncio.wait([client.lost], timeout=1)


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
