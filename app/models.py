"""Public data shapes: events and connections as API.md defines them."""

from __future__ import annotations

import functools
import json
import socket
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from app.bpf.event import (
    BYTES_RECEIVED,
    BYTES_RETRANS,
    BYTES_SENT,
    CGROUP_ID,
    CLOSE_REASON,
    CLOSE_REASON_NAMES,
    COMM,
    CONN_ID,
    CONNECT_US,
    DADDR,
    DPORT,
    EV_CLOSE,
    EVENT_TYPE_NAMES,
    FAMILY,
    FAMILY_NAMES,
    NETNS,
    PID,
    PREEXISTING_ID,
    RETRANS_SEGS,
    ROLE,
    ROLE_NAMES,
    RTTVAR_US,
    SADDR,
    SPORT,
    SRTT_US,
    STATE,
    TCP_STATES,
    TS_NS,
    TYPE,
    EventRecord,
)
from app.cgroups import CgroupPaths, container_id
from app.speedups import speedups

EventType = Literal["syn_sent", "syn_recv", "established", "data_queue", "close", "state_change"]
Family = Literal["ipv4", "ipv6"]
Role = Literal["client", "server"]
CloseReason = Literal["normal", "refused", "timeout", "reset", "unknown"]

EVENT_TYPES: tuple[str, ...] = tuple(EVENT_TYPE_NAMES.values())


# The fields events and connections share, each described once (the two models list them in their own
# order: the order of the JSON documents).
FamilyField = Annotated[Family, Field(description='"ipv4" or "ipv6"')]
RoleField = Annotated[Role, Field(description="client = active open (SYN_SENT), server = passive open (SYN_RECV)")]
SrcAddr = Annotated[str, Field(description="local address, from this socket's point of view")]
SrcPort = Annotated[int, Field(description="local port")]
DstAddr = Annotated[str, Field(description="remote address")]
DstPort = Annotated[int, Field(description="remote port")]
Pid = Annotated[int | None, Field(description="owning process id (server socket: the process using it); null while "
                                              "unknown")]
Comm = Annotated[str | None, Field(description="owning process name; null while unknown")]
BytesSent = Annotated[int, Field(description="payload bytes sent (tcp_sock.bytes_sent less bytes_retrans)")]
BytesReceived = Annotated[int, Field(description="payload bytes received (tcp_sock.bytes_received less a FIN)")]
BytesRetrans = Annotated[int, Field(description="bytes retransmitted (tcp_sock.bytes_retrans); not in bytes_sent")]
RetransSegs = Annotated[int, Field(description="segments retransmitted (tcp_sock.total_retrans)")]
SrttUs = Annotated[int | None, Field(description="smoothed RTT in us (tcp_sock.srtt_us >> 3); null before a sample")]
RttvarUs = Annotated[int | None, Field(description="RTT variance in us (tcp_sock.mdev_us >> 2); null before a sample")]
ConnectUs = Annotated[int | None, Field(description="SYN to ESTABLISHED in us (server: SYN-ACK to final ACK)")]
CloseReasonField = Annotated[CloseReason | None, Field(
    description="why it closed: normal|refused|timeout|reset|unknown (unknown: its close was not seen, the sweep "
                "found it gone); null while open")]
Netns = Annotated[int, Field(description="network namespace inode number")]
Cgroup = Annotated[str | None, Field(description="cgroup v2 path of the owner, e.g. /system.slice/nginx.service")]
ContainerId = Annotated[str | None, Field(description="the container id the cgroup path names, if any")]
Host = Annotated[str, Field(description="the agent's host name")]


class Event(BaseModel):
    """One thing the kernel saw happen to one TCP connection; counters and state as of this event."""

    seq: int = Field(0, description="strictly increasing within one run; assigned by the event hub")
    type: EventType = Field(description="what happened")
    ts: datetime = Field(description="when it happened (UTC)")
    ts_ns: int = Field(description="kernel CLOCK_MONOTONIC timestamp in ns")
    state: str = Field(description="TCP state after this event, e.g. ESTABLISHED")
    bytes_sent: BytesSent
    bytes_received: BytesReceived
    bytes_retrans: BytesRetrans = 0
    retrans_segs: RetransSegs = 0
    srtt_us: SrttUs = None
    rttvar_us: RttvarUs = None
    connect_us: ConnectUs = None
    close_reason: CloseReasonField = None
    conn_id: str = Field(description="the connection's id")
    family: FamilyField
    role: RoleField
    src_addr: SrcAddr
    src_port: SrcPort
    dst_addr: DstAddr
    dst_port: DstPort
    pid: Pid
    comm: Comm
    netns: Netns
    cgroup: Cgroup = None
    container_id: ContainerId = None
    host: Host = ""


class Connection(BaseModel):
    """A TCP connection as known from its events; counters and state as of its latest event."""

    id: str = Field(description="unique among all connections of one run")
    family: FamilyField
    role: RoleField
    state: str = Field(description="kernel TCP state name without the TCP_ prefix")
    src_addr: SrcAddr
    src_port: SrcPort
    dst_addr: DstAddr
    dst_port: DstPort
    pid: Pid
    comm: Comm
    bytes_sent: BytesSent
    bytes_received: BytesReceived
    bytes_retrans: BytesRetrans = 0
    retrans_segs: RetransSegs = 0
    srtt_us: SrttUs = None
    rttvar_us: RttvarUs = None
    connect_us: ConnectUs = None
    close_reason: CloseReasonField = None
    started_at: datetime = Field(description="when the first event of this connection was seen")
    closed_at: datetime | None = Field(description="null while open")
    duration_ms: float = Field(description="start to close, or to now while open")
    netns: Netns = 0
    cgroup: Cgroup = None
    container_id: ContainerId = None
    host: Host = ""
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


_REASON_JSON = {n: f'"{name}"' for n, name in CLOSE_REASON_NAMES.items()}


def rtt_values(rec: EventRecord) -> tuple[int | None, int | None, int | None]:
    """(srtt_us, rttvar_us, connect_us): the first two null before the first RTT sample (srtt 0), the
    last until ESTABLISHED."""
    srtt = rec[SRTT_US]
    return srtt or None, rec[RTTVAR_US] if srtt else None, rec[CONNECT_US] or None


def conn_id_text(conn_id: int) -> str:
    """The public id of a connection: c<n> as numbered by the kernel, p<n> for one found at start-up."""
    return f"c{conn_id}" if conn_id < PREEXISTING_ID else f"p{conn_id - PREEXISTING_ID}"


def conn_id_number(text: str) -> int | None:
    """conn_id_text() backwards; None for anything that is not such an id."""
    if len(text) < 2 or text[0] not in "cp" or not text[1:].isdigit() or len(text) > 21:
        return None
    n = int(text[1:])
    if n >= PREEXISTING_ID:
        return None
    return n if text[0] == "c" else PREEXISTING_ID + n


class Texts:
    """Text of the raw values in records, each formatted once (bounded caches)."""

    def __init__(self, wall_offset_ns: int, host: str = "", cgroups: CgroupPaths | None = None) -> None:
        # CLOCK_MONOTONIC (the kernel's ts_ns) + wall_offset_ns = UTC ns since the epoch.
        self.wall_offset_ns = wall_offset_ns
        self.host = host
        self.cgroups = cgroups if cgroups is not None else CgroupPaths()
        self._addrs: dict[bytes, str] = {}
        self._comms: dict[bytes, str] = {}
        self.tails: dict[int, str] = {}   # cgroup id -> steady_tail(), once resolved (read by the C writer)

    def cgroup_and_container(self, cgroup_id: int) -> tuple[str | None, str | None]:
        """The cgroup path of an id and the container id it names, if any."""
        path = self.cgroups.path(cgroup_id)
        return path, container_id(path) if path else None

    def steady_tail(self, cgroup_id: int) -> str:
        """The end of an event's JSON: cgroup, container and host (the cgroup part cached once resolved)."""
        tail = self.tails.get(cgroup_id)
        if tail is None:
            path, cid = self.cgroup_and_container(cgroup_id)
            tail = (f',"cgroup":{json_str(path) if path else "null"},'
                    f'"container_id":{json_str(cid) if cid else "null"},"host":{json_str(self.host)}}}')
            if path is not None or not cgroup_id:
                if len(self.tails) >= 4096:
                    self.tails.clear()
                self.tails[cgroup_id] = tail
        return tail

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
                f'"netns":{rec[NETNS]}{t.steady_tail(rec[CGROUP_ID])}')
        if len(self._steady) >= 65536:
            self._steady.clear()
        hit = self._steady[rec[CONN_ID]] = (pid, rec[SPORT], text)
        return hit

    def json_many(self, first_seq: int, recs: list[EventRecord]) -> list[str]:
        """The JSON of each event, numbered from first_seq; the same documents as Event.model_dump_json()."""
        if speedups is not None:
            return speedups.json_many(first_seq, recs, self.texts.wall_offset_ns, self._steady,  # type: ignore
                                      self.texts.tails, self.texts.steady_tail)
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
                       f'"bytes_received":{rec[BYTES_RECEIVED]},"bytes_retrans":{rec[BYTES_RETRANS]},'
                       f'"retrans_segs":{rec[RETRANS_SEGS]},"srtt_us":{rec[SRTT_US] or "null"},'
                       f'"rttvar_us":{rec[RTTVAR_US] if rec[SRTT_US] else "null"},'
                       f'"connect_us":{rec[CONNECT_US] or "null"},'
                       f'"close_reason":{_REASON_JSON.get(rec[CLOSE_REASON], "null")},{hit[2]}')
            if rec[TYPE] == EV_CLOSE:
                steady.pop(rec[CONN_ID], None)   # the connection is over: not asked for again
        return out

    def event(self, seq: int, rec: EventRecord) -> Event:
        """The public model (validated), for callers that want objects rather than text."""
        t = self.texts
        fam = rec[FAMILY]
        pid = rec[PID]
        srtt, rttvar, connect = rtt_values(rec)
        cgroup, container = t.cgroup_and_container(rec[CGROUP_ID])
        return Event.model_validate({
            "seq": seq, "type": EVENT_TYPE_NAMES[rec[TYPE]], "ts": t.ts(rec[TS_NS]), "ts_ns": rec[TS_NS],
            "state": TCP_STATES[rec[STATE]], "bytes_sent": rec[BYTES_SENT], "bytes_received": rec[BYTES_RECEIVED],
            "bytes_retrans": rec[BYTES_RETRANS], "conn_id": conn_id_text(rec[CONN_ID]), "family": FAMILY_NAMES[fam],
            "role": ROLE_NAMES[rec[ROLE]], "src_addr": t.addr(rec[SADDR], fam), "src_port": rec[SPORT],
            "dst_addr": t.addr(rec[DADDR], fam), "dst_port": rec[DPORT], "pid": pid or None,
            "comm": t.comm(rec[COMM]) if pid else None, "netns": rec[NETNS],
            "retrans_segs": rec[RETRANS_SEGS], "srtt_us": srtt, "rttvar_us": rttvar, "connect_us": connect,
            "close_reason": CLOSE_REASON_NAMES.get(rec[CLOSE_REASON]), "cgroup": cgroup, "container_id": container,
            "host": t.host,
        })

