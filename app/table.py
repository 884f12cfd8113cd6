"""ConnectionTable: every open connection plus a bounded history of closed ones."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from app.filters import Predicate
from app.models import Connection, Event

FIELDS = ("id", "family", "role", "state", "src_addr", "src_port", "dst_addr", "dst_port", "pid", "comm",
          "bytes_sent", "bytes_received", "bytes_retrans", "started_at", "netns", "preexisting", "events")


class ConnRecord:
    """Internal, mutable record of one connection (slots: the table holds tens of thousands)."""

    __slots__ = (*FIELDS, "closed_at", "start_ns", "last_ns", "close_ns")

    id: str
    family: str
    role: str
    state: str
    src_addr: str
    src_port: int
    dst_addr: str
    dst_port: int
    pid: int | None
    comm: str | None
    bytes_sent: int
    bytes_received: int
    bytes_retrans: int
    started_at: datetime
    netns: int
    preexisting: bool
    events: int
    closed_at: datetime | None
    start_ns: int
    last_ns: int
    close_ns: int

    def to_model(self, now_ns: int) -> Connection:
        """The public shape; duration runs to now while open."""
        end = self.close_ns if self.closed_at is not None else max(now_ns, self.start_ns)
        d: dict[str, Any] = {f: getattr(self, f) for f in FIELDS}
        d["closed_at"] = self.closed_at
        d["duration_ms"] = (end - self.start_ns) / 1e6
        return Connection.model_construct(**d)


def record_from_event(ev: Event) -> ConnRecord:
    c = ConnRecord()
    c.id = ev.conn_id
    c.family = ev.family
    c.role = ev.role
    c.state = ev.state
    c.src_addr = ev.src_addr
    c.src_port = ev.src_port
    c.dst_addr = ev.dst_addr
    c.dst_port = ev.dst_port
    c.pid = ev.pid
    c.comm = ev.comm
    c.bytes_sent = ev.bytes_sent
    c.bytes_received = ev.bytes_received
    c.bytes_retrans = ev.bytes_retrans
    c.started_at = ev.ts
    c.netns = ev.netns
    c.preexisting = False
    c.events = 0
    c.closed_at = None
    c.start_ns = c.last_ns = ev.ts_ns
    c.close_ns = 0
    return c


class ConnectionTable:
    """Applies Events; open connections in a dict, closed ones in a bounded, oldest-evicted history.

    `max_open_connections` bounds memory too: if close events are lost (kernel ring buffer
    full), entries for connections that are gone would otherwise stay forever.
    """

    def __init__(self, max_closed_connections: int = 10_000, max_open_connections: int = 262_144) -> None:
        self.max_closed = max_closed_connections
        self.max_open = max_open_connections
        # Both ordered by last activity (open: move_to_end on each event; closed: by close time).
        self._open: OrderedDict[str, ConnRecord] = OrderedDict()
        self._closed: OrderedDict[str, ConnRecord] = OrderedDict()
        self.evicted_closed = 0
        self.evicted_open = 0
        # 4-tuple -> id of connections read from sock_diag at start-up, to drop such an entry if
        # the kernel reports the same socket too (it was opening while we attached).
        self._pre_keys: dict[tuple[Any, ...], str] = {}

    def apply(self, ev: Event) -> None:
        """Creates or updates the connection of `ev`; hot path."""
        cid = ev.conn_id
        op = self._open
        c = op.get(cid)
        if c is None:
            c = self._closed.get(cid)
            if c is None:
                c = record_from_event(ev)
                if self._pre_keys:
                    self._drop_preexisting_twin(c)
                op[cid] = c
                if len(op) > self.max_open:
                    op.popitem(last=False)
                    self.evicted_open += 1
            elif ev.type != "close":
                # A late event after close (e.g. a final data_queue): counters only.
                c.bytes_sent = ev.bytes_sent
                c.bytes_received = ev.bytes_received
                c.bytes_retrans = ev.bytes_retrans
                c.events += 1
                return
        else:
            op.move_to_end(cid)
        c.events += 1
        c.state = ev.state
        c.last_ns = ev.ts_ns
        c.bytes_sent = ev.bytes_sent
        c.bytes_received = ev.bytes_received
        c.bytes_retrans = ev.bytes_retrans
        # The kernel learns the local port after SYN_SENT; take addresses from the latest event.
        if ev.src_port:
            c.src_addr = ev.src_addr
            c.src_port = ev.src_port
        pid = ev.pid
        if pid is not None:
            # Once known the pid stays: a later event with pid None must not erase it.
            c.pid = pid
            c.comm = ev.comm
        if ev.type == "close" and c.closed_at is None:
            c.closed_at = ev.ts
            c.close_ns = ev.ts_ns
            op.pop(cid, None)
            self._add_closed(c)

    def _add_closed(self, c: ConnRecord) -> None:
        if self.max_closed <= 0:
            self.evicted_closed += 1
            return
        cl = self._closed
        cl[c.id] = c
        while len(cl) > self.max_closed:
            cl.popitem(last=False)
            self.evicted_closed += 1

    @staticmethod
    def key(c: ConnRecord) -> tuple[Any, ...]:
        return (c.netns, c.family, c.src_addr, c.src_port, c.dst_addr, c.dst_port)

    def _drop_preexisting_twin(self, c: ConnRecord) -> None:
        pid = self._pre_keys.pop(self.key(c), None)
        if pid is not None:
            twin = self._open.pop(pid, None)
            if twin is not None and c.pid is None:
                c.pid, c.comm = twin.pid, twin.comm

    def add_preexisting(self, items: Iterable[tuple[tuple[Any, ...], ConnRecord]]) -> int:
        """Adds connections found open at start-up (sockdiag), unless the kernel reported them; returns how many."""
        known = {self.key(c) for c in self._open.values()}
        n = 0
        for key, c in items:
            if key in known:
                continue
            self._open[c.id] = c
            self._pre_keys[key] = c.id
            n += 1
        return n

    def refresh_preexisting(self, alive: dict[tuple[Any, ...], ConnRecord]) -> int:
        """Updates preexisting connections from a fresh dump (by key); closes the gone ones."""
        gone: set[str] = set()
        for key, cid in list(self._pre_keys.items()):
            c = self._open.get(cid)
            if c is None:
                del self._pre_keys[key]
                continue
            fresh = alive.get(key)
            if fresh is None:
                gone.add(cid)
                del self._pre_keys[key]
            elif (fresh.bytes_sent, fresh.bytes_received, fresh.state) != (c.bytes_sent, c.bytes_received, c.state):
                c.bytes_sent, c.bytes_received, c.state = fresh.bytes_sent, fresh.bytes_received, fresh.state
                c.last_ns = fresh.last_ns
                c.pid, c.comm = fresh.pid or c.pid, fresh.comm or c.comm
                self._open.move_to_end(cid)
        return self.close_preexisting(gone)

    def close_preexisting(self, ids: set[str], now: datetime | None = None) -> int:
        """Marks these preexisting connections closed (gone from sock_diag); returns how many."""
        gone = [c for c in self._open.values() if c.preexisting and c.id in ids]
        now = now or datetime.now(UTC)
        now_ns = time.monotonic_ns()
        for c in gone:
            del self._open[c.id]
            c.state = "CLOSE"
            c.closed_at = now
            c.close_ns = now_ns
            c.last_ns = now_ns
            self._add_closed(c)
        return len(gone)

    @property
    def preexisting_count(self) -> int:
        return len(self._pre_keys)

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    def get(self, conn_id: str) -> Connection | None:
        c = self._open.get(conn_id) or self._closed.get(conn_id)
        return c.to_model(time.monotonic_ns()) if c is not None else None

    def query(self, state: str = "all", pred: Predicate | None = None, limit: int = 1000) -> list[Connection]:
        """Connections matching `state` (open|closed|all) and `pred`, newest activity first."""
        sources: list[Iterable[ConnRecord]] = []
        if state in ("open", "all"):
            sources.append(reversed(self._open.values()))
        if state in ("closed", "all"):
            sources.append(reversed(self._closed.values()))
        if limit <= 0:
            return []
        if len(sources) == 1:
            # Open ones are in last-activity order already; closed ones in close order.
            it: Iterable[ConnRecord] = sources[0]
        else:
            it = heapq.merge(*sources, key=lambda c: c.last_ns, reverse=True)
        out: list[Connection] = []
        now_ns = time.monotonic_ns()
        for c in it:
            if pred is None or pred(c):
                out.append(c.to_model(now_ns))
                if len(out) >= limit:
                    break
        return out


def wall_to_mono_ns(when: datetime) -> int:
    """CLOCK_MONOTONIC ns of a wall-clock time (for records that did not come from the kernel)."""
    delta = datetime.now(UTC) - when
    return time.monotonic_ns() - int(delta / timedelta(microseconds=1)) * 1000
