"""Public data shapes: events and connections as API.md defines them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

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
    started_at: datetime = Field(description="when the first event of this connection was seen")
    closed_at: datetime | None = Field(description="null while open")
    duration_ms: float = Field(description="start to close, or to now while open")
    netns: int = Field(0, description="network namespace inode number")
    preexisting: bool = Field(False, description="already open when the tracer started (read from sock_diag)")
    events: int = Field(0, description="events seen for this connection")
