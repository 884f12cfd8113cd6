"""Builds internal event records and ring frames for unit tests (no kernel)."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Any

from app.bpf.event import (
    EVENT_TYPE_NUMBERS,
    FAMILY_NUMBERS,
    FRAME,
    ROLE_NUMBERS,
    TCP_STATE_NUMBERS,
    EventRecord,
    make_record,
)
from app.models import EventWriter, Texts

T0_NS = 1_000_000_000_000
T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
# Texts whose clock maps T0_NS (kernel monotonic) to T0 (UTC).
TEXTS = Texts(int(T0.timestamp()) * 1_000_000_000 - T0_NS)
DEFAULT_STATES = {"syn_sent": "SYN_SENT", "syn_recv": "SYN_RECV", "close": "CLOSE"}


def writer() -> EventWriter:
    return EventWriter(TEXTS)


def _addr(text: str) -> bytes:
    fam = socket.AF_INET6 if ":" in text else socket.AF_INET
    return socket.inet_pton(fam, text).ljust(16, b"\0")


def ev(type_: str, conn: int, t_ms: float = 0.0, *, start_ms: float = 0.0, **kw: Any) -> EventRecord:
    """The record of an event of connection c<conn> at T0 + t_ms, as the kernel writes it; fields by public name."""
    f: dict[str, Any] = dict(
        type=type_, family="ipv4", role="client", state=DEFAULT_STATES.get(type_, "ESTABLISHED"),
        src_addr="10.0.0.1", src_port=40000 + conn, dst_addr="10.0.0.2", dst_port=80, pid=100, comm="cli",
        bytes_sent=0, bytes_received=0, bytes_retrans=0, netns=1, flags=0,
    )
    f.update(kw)
    if f["family"] == "ipv6" and "src_addr" not in kw:
        f["src_addr"], f["dst_addr"] = "fd00::1", "fd00::2"
    raw = dict(
        ts_ns=T0_NS + int(t_ms * 1_000_000), start_ns=T0_NS + int(start_ms * 1_000_000), conn_id=conn,
        bytes_sent=f["bytes_sent"], bytes_received=f["bytes_received"], bytes_retrans=f["bytes_retrans"],
        pid=f["pid"] or 0, netns=f["netns"], saddr=_addr(f["src_addr"]), daddr=_addr(f["dst_addr"]),
        sport=f["src_port"], dport=f["dst_port"], family=FAMILY_NUMBERS[f["family"]],
        type=EVENT_TYPE_NUMBERS[f["type"]], role=ROLE_NUMBERS[f["role"]], state=TCP_STATE_NUMBERS[f["state"]],
        oldstate=0, flags=f["flags"], comm=(f["comm"] or "").encode(),
        **{k: kw[k] for k in ("srtt_us", "rttvar_us", "retrans_segs", "connect_us", "cgroup_id", "close_reason")
           if k in kw},
    )
    return make_record(**raw)


def frames(*recs: EventRecord) -> bytes:
    """Records as the ring reader hands them over (headers are not looked at past the reader)."""
    return b"".join(FRAME.pack(*r) for r in recs)
