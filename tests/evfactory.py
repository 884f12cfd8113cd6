"""Builds Events directly for unit tests (no kernel)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from app.models import Event

T0_NS = 1_000_000_000_000
T0 = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def ev(type_: str, conn: int, t_ms: float = 0.0, **kw: Any) -> Event:
    """An event of connection c<conn> at T0 + t_ms; fields overridable."""
    fields: dict[str, Any] = dict(
        seq=0, type=type_, ts=datetime.fromtimestamp(T0.timestamp() + t_ms / 1000, UTC),
        ts_ns=T0_NS + int(t_ms * 1_000_000), conn_id=f"c{conn}", family="ipv4", role="client",
        state={"syn_sent": "SYN_SENT", "syn_recv": "SYN_RECV", "close": "CLOSE"}.get(type_, "ESTABLISHED"),
        src_addr="10.0.0.1", src_port=40000 + conn, dst_addr="10.0.0.2", dst_port=80, pid=100, comm="cli",
        bytes_sent=0, bytes_received=0, netns=1,
    )
    fields.update(kw)
    return Event(**fields)
