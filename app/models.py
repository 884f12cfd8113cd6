"""Public data shapes: events and connections as API.md defines them."""

from __future__ import annotations

import functools
import json
import socket
import time
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.bpf.event import (
    BYTES_RECEIVED,
    BYTES_RETRANS,
    BYTES_SENT,
    COMM,
    CONN_ID,
    DADDR,
    DPORT,
    EV_CLOSE,
    EVENT_TYPE_NAMES,
    FAMILY,
    FAMILY_NAMES,
    NETNS,
    PID,
    ROLE,
    ROLE_NAMES,
    SADDR,
    SPORT,
    STATE,
    TCP_STATES,
    TS_NS,
    TYPE,
    EventRecord,
)
from app.speedups import speedups

EventType = Literal["syn_sent", "syn_recv", "established", "data_queue", "close", "state_change"]
Family = Literal["ipv4", "ipv6"]
Role = Literal["client", "server"]

EVENT_TYPES: tuple[str, ...] = tuple(EVENT_TYPE_NAMES.values())


class Event(BaseModel):
    """One thing the kernel saw happen to one TCP connection."""

    seq: int = Field(0, description="strictly increasing within one run; assigned by the event hub")
    type: EventType = Field(description="what happened")
    ts: datetime = Field(description="when it happened (UTC)")
    ts_ns: int = Field(description="kernel CLOCK_MONOTONIC timestamp in ns")
    state: str = Field(description="TCP state after this event, e.g. ESTABLISHED")
    bytes_sent: int = Field(description="payload bytes sent (tcp_sock.bytes_sent less bytes_retrans)")
    bytes_received: int = Field(description="payload bytes received (tcp_sock.bytes_received less a FIN)")
    bytes_retrans: int = Field(0, description="bytes retransmitted (tcp_sock.bytes_retrans)")
    conn_id: str = Field(description="the connection's id")
    family: Family = Field(description='"ipv4" or "ipv6"')
    role: Role = Field(description="client = active open, server = passive open")
    src_addr: str = Field(description="local address")
    src_port: int = Field(description="local port")
    dst_addr: str = Field(description="remote address")
    dst_port: int = Field(description="remote port")
    pid: int | None = Field(description="owning process id, null while unknown")
    comm: str | None = Field(description="owning process name, null while unknown")
    netns: int = Field(description="network namespace inode number")


class Connection(BaseModel):
    """A TCP connection as known from its events."""

    id: str = Field(description="unique among all connections of one run")
    family: Family = Field(description='"ipv4" or "ipv6"')
    role: Role = Field(description="client = active open (SYN_SENT), server = passive open (SYN_RECV)")
    state: str = Field(description="kernel TCP state name without the TCP_ prefix")
    src_addr: str = Field(description="local address, from this socket's point of view")
    src_port: int = Field(description="local port")
    dst_addr: str = Field(description="remote address")
    dst_port: int = Field(description="remote port")
    pid: int | None = Field(description="owning process id (server socket: the process using it); null while unknown")
    comm: str | None = Field(description="owning process name; null while unknown")
    bytes_sent: int = Field(description="payload bytes sent, at the latest event")
    bytes_received: int = Field(description="payload bytes received, at the latest event")
    bytes_retrans: int = Field(0, description="bytes retransmitted, at the latest event")
    started_at: datetime = Field(description="when the first event of this connection was seen")
    closed_at: datetime | None = Field(description="null while open")
    duration_ms: float = Field(description="start to close, or to now while open")
    netns: int = Field(0, description="network namespace inode number")
    preexisting: bool = Field(False, description="already open when the tracer started (read from sock_diag)")
    events: int = Field(0, description="events seen for this connection")


# --- From internal records to public text -----------------------------------------
# Events are serialised only when something needs the text (a subscriber, /events,
# `trace --json`), and the fields that do not change over a connection's life are
# formatted once per connection. pydantic's model_dump_json would cost ~3.5 us per event;
# the output is the same JSON document (tests compare the two).

_second_prefix: dict[int, str] = {}


def iso_utc_parts(sec: int, us: int) -> str:
    """ISO 8601 UTC with a Z, as pydantic writes it (fraction only when non-zero)."""
    prefix = _second_prefix.get(sec)
    if prefix is None:
        if len(_second_prefix) > 64:   # consecutive events share a second; keep a few
            _second_prefix.clear()
        prefix = _second_prefix[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{prefix}.{us:06d}Z" if us else f"{prefix}Z"


@functools.lru_cache(maxsize=4096)
def json_str(s: str) -> str:
    """A JSON string literal (cached: the same names and ids recur)."""
    return json.dumps(s)


def conn_id_text(conn_id: int) -> str:
    """The public id of a connection: c<n> as numbered by the kernel, p<n> for one found at start-up."""
    return f"c{conn_id}" if conn_id >= 0 else f"p{-conn_id}"


def conn_id_number(text: str) -> int | None:
    """conn_id_text() backwards; None for anything that is not such an id."""
    if len(text) < 2 or text[0] not in "cp" or not text[1:].isdigit() or len(text) > 21:
        return None
    n = int(text[1:])
    return n if text[0] == "c" else -n


class Texts:
    """Text of the raw values in records, each formatted once (bounded caches)."""

    def __init__(self, wall_offset_ns: int) -> None:
        # CLOCK_MONOTONIC (the kernel's ts_ns) + wall_offset_ns = UTC ns since the epoch.
        self.wall_offset_ns = wall_offset_ns
        self._addrs: dict[bytes, str] = {}
        self._comms: dict[bytes, str] = {}

    def addr(self, raw: bytes, family: int) -> str:
        text = self._addrs.get(raw)
        if text is None:
            if len(self._addrs) >= 65536:
                self._addrs.clear()
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            text = self._addrs[raw] = socket.inet_ntop(af, raw[:4] if family == 4 else raw)
        return text

    def comm(self, raw: bytes) -> str:
        name = self._comms.get(raw)
        if name is None:
            if len(self._comms) >= 4096:   # process names repeat a lot
                self._comms.clear()
            name = self._comms[raw] = raw.split(b"\0", 1)[0].decode(errors="replace")
        return name

    def ts(self, mono_ns: int) -> datetime:
        wall_us = (mono_ns + self.wall_offset_ns) // 1000
        return datetime.fromtimestamp(wall_us // 1_000_000, UTC).replace(microsecond=wall_us % 1_000_000)


class EventWriter:
    """An event record with its seq -> the public Event, as JSON text or as a model."""

    def __init__(self, texts: Texts) -> None:
        self.texts = texts
        # conn_id -> (pid, src_port, JSON of the fields that stay the same over the connection)
        self._steady: dict[int, tuple[int, int, str]] = {}

    def _steady_json(self, rec: EventRecord) -> tuple[int, int, str]:
        t = self.texts
        fam = rec[FAMILY]
        pid = rec[PID]
        text = (f'"conn_id":"{conn_id_text(rec[CONN_ID])}","family":"{FAMILY_NAMES[fam]}",'
                f'"role":"{ROLE_NAMES[rec[ROLE]]}","src_addr":"{t.addr(rec[SADDR], fam)}","src_port":{rec[SPORT]},'
                f'"dst_addr":"{t.addr(rec[DADDR], fam)}","dst_port":{rec[DPORT]},'
                f'"pid":{pid or "null"},"comm":{json_str(t.comm(rec[COMM])) if pid else "null"},'
                f'"netns":{rec[NETNS]}}}')
        if len(self._steady) >= 65536:
            self._steady.clear()
        hit = self._steady[rec[CONN_ID]] = (pid, rec[SPORT], text)
        return hit

    def json_many(self, first_seq: int, recs: list[EventRecord]) -> list[str]:
        """The JSON of each event, numbered from first_seq; the same documents as Event.model_dump_json()."""
        if speedups is not None:
            return speedups.json_many(first_seq, recs, self.texts.wall_offset_ns, self._steady)  # type: ignore
        return self.json_many_py(first_seq, recs)

    def json_many_py(self, first_seq: int, recs: list[EventRecord]) -> list[str]:
        """json_many() in Python: the reference for the C helper."""
        out = []
        steady = self._steady
        offset = self.texts.wall_offset_ns
        for seq, rec in enumerate(recs, first_seq):
            hit = steady.get(rec[CONN_ID])
            if hit is None or hit[0] != rec[PID] or hit[1] != rec[SPORT]:
                hit = self._steady_json(rec)
            wall = rec[TS_NS] + offset
            ts = iso_utc_parts(wall // 1_000_000_000, wall // 1000 % 1_000_000)
            out.append(f'{{"seq":{seq},"type":"{EVENT_TYPE_NAMES[rec[TYPE]]}",'
                       f'"ts":"{ts}","ts_ns":{rec[TS_NS]},'
                       f'"state":"{TCP_STATES[rec[STATE]]}","bytes_sent":{rec[BYTES_SENT]},'
                       f'"bytes_received":{rec[BYTES_RECEIVED]},"bytes_retrans":{rec[BYTES_RETRANS]},{hit[2]}')
            if rec[TYPE] == EV_CLOSE:
                steady.pop(rec[CONN_ID], None)   # the connection is over: not asked for again
        return out

    def event(self, seq: int, rec: EventRecord) -> Event:
        """The public model (validated), for callers that want objects rather than text."""
        t = self.texts
        fam = rec[FAMILY]
        pid = rec[PID]
        return Event.model_validate({
            "seq": seq, "type": EVENT_TYPE_NAMES[rec[TYPE]], "ts": t.ts(rec[TS_NS]), "ts_ns": rec[TS_NS],
            "state": TCP_STATES[rec[STATE]], "bytes_sent": rec[BYTES_SENT], "bytes_received": rec[BYTES_RECEIVED],
            "bytes_retrans": rec[BYTES_RETRANS], "conn_id": conn_id_text(rec[CONN_ID]), "family": FAMILY_NAMES[fam],
            "role": ROLE_NAMES[rec[ROLE]], "src_addr": t.addr(rec[SADDR], fam), "src_port": rec[SPORT],
            "dst_addr": t.addr(rec[DADDR], fam), "dst_port": rec[DPORT], "pid": pid or None,
            "comm": t.comm(rec[COMM]) if pid else None, "netns": rec[NETNS],
        })
