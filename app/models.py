"""Public data shapes: events and connections as API.md defines them."""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, PrivateAttr

EventType = Literal["syn_sent", "syn_recv", "established", "data_queue", "close", "state_change"]
Family = Literal["ipv4", "ipv6"]
Role = Literal["client", "server"]

EVENT_TYPES: tuple[str, ...] = ("syn_sent", "syn_recv", "established", "data_queue", "close", "state_change")

# Kernel TCP state numbers (include/net/tcp_states.h) to names without the TCP_ prefix.
TCP_STATES: dict[int, str] = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}


class Event(BaseModel):
    """One thing the kernel saw happen to one TCP connection."""

    seq: int = Field(0, description="strictly increasing within one run; assigned by the event hub")
    type: EventType = Field(description="what happened")
    ts: datetime = Field(description="when it happened (UTC)")
    ts_ns: int = Field(description="kernel CLOCK_MONOTONIC timestamp in ns")
    conn_id: str = Field(description="the connection's id")
    family: Family = Field(description='"ipv4" or "ipv6"')
    role: Role = Field(description="client = active open, server = passive open")
    state: str = Field(description="TCP state after this event, e.g. ESTABLISHED")
    src_addr: str = Field(description="local address")
    src_port: int = Field(description="local port")
    dst_addr: str = Field(description="remote address")
    dst_port: int = Field(description="remote port")
    pid: int | None = Field(description="owning process id, null while unknown")
    comm: str | None = Field(description="owning process name, null while unknown")
    bytes_sent: int = Field(description="payload bytes sent (tcp_sock.bytes_sent less bytes_retrans)")
    bytes_received: int = Field(description="payload bytes received (tcp_sock.bytes_received less a FIN)")
    bytes_retrans: int = Field(0, description="bytes retransmitted (tcp_sock.bytes_retrans)")
    netns: int = Field(description="network namespace inode number")

    # The JSON after "seq", written by the decoder (see event_json). Decoded events
    # are not changed afterwards, except for seq, which is not in it.
    _json_tail: str | None = PrivateAttr(default=None)


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


# --- Fast JSON for the event hot path -------------------------------------------
# The hub serialises every event once; pydantic's model_dump_json costs ~3.5 us per
# event. The decoder writes everything after "seq" while it holds the raw values
# (Event._json_tail); the hub only prepends the seq. The output is the same JSON
# document as model_dump_json (tests compare the two).

_EVENT_JSON_TAIL = (
    '"type":"%s","ts":"%s","ts_ns":%d,"conn_id":%s,"family":"%s","role":"%s","state":"%s",'
    '"src_addr":"%s","src_port":%d,"dst_addr":"%s","dst_port":%d,"pid":%s,"comm":%s,'
    '"bytes_sent":%d,"bytes_received":%d,"bytes_retrans":%d,"netns":%d}'
)
_second_prefix: dict[int, str] = {}


def iso_utc_parts(sec: int, us: int) -> str:
    """ISO 8601 UTC with a Z, as pydantic writes it (fraction only when non-zero)."""
    prefix = _second_prefix.get(sec)
    if prefix is None:
        if len(_second_prefix) > 64:   # consecutive events share a second; keep a few
            _second_prefix.clear()
        prefix = _second_prefix[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{prefix}.{us:06d}Z" if us else f"{prefix}Z"


def iso_utc(ts: datetime) -> str:
    """iso_utc_parts() of a datetime (naive ones are taken as UTC)."""
    aware = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return iso_utc_parts(int(aware.timestamp()), ts.microsecond)


@functools.lru_cache(maxsize=4096)
def json_str(s: str) -> str:
    """A JSON string literal (cached: the same names and ids recur)."""
    return json.dumps(s)


def event_json_tail(type_: str, ts_text: str, ts_ns: int, conn_id: str, family: str, role: str, state: str,
                    src_addr: str, src_port: int, dst_addr: str, dst_port: int, pid: int | None,
                    comm: str | None, bytes_sent: int, bytes_received: int, bytes_retrans: int, netns: int) -> str:
    """An event's JSON after `{"seq":N,`. Addresses, names and states are plain ASCII by construction."""
    return _EVENT_JSON_TAIL % (
        type_, ts_text, ts_ns, json_str(conn_id), family, role, state, src_addr, src_port, dst_addr, dst_port,
        "null" if pid is None else int(pid), "null" if comm is None else json_str(comm),
        bytes_sent, bytes_received, bytes_retrans, netns,
    )


def event_json(ev: Event) -> str:
    """ev.model_dump_json(), several times faster."""
    d = ev.__dict__
    priv = ev.__pydantic_private__
    tail = priv.get("_json_tail") if priv else None
    if tail is None:
        tail = event_json_tail(d["type"], iso_utc(d["ts"]), d["ts_ns"], d["conn_id"], d["family"], d["role"],
                               d["state"], d["src_addr"], d["src_port"], d["dst_addr"], d["dst_port"], d["pid"],
                               d["comm"], d["bytes_sent"], d["bytes_received"], d["bytes_retrans"], d["netns"])
    return f'{{"seq":{d["seq"]},{tail}'
