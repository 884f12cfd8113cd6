"""GET /history: per-second counters of the last hour (history_seconds), for charts that survive a reload."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.deps import CoreDep, PlainInt

router = APIRouter(tags=["status"])


class HistoryColumns(BaseModel):
    """Per-second samples as columns: element i of every list belongs to second t[i]."""

    interval_s: int = Field(1, description="seconds per sample")
    t: list[int] = Field(description="start of each second, Unix epoch seconds (UTC), oldest first; "
                                     "a second the sampler missed is absent")
    opened: list[int] = Field(description="connections opened (syn_sent + syn_recv events) in that second")
    closed: list[int] = Field(description="close events in that second")
    events: list[int] = Field(description="events published in that second")
    bytes_sent: list[int] = Field(description="payload bytes sent, all connections together, in that second")
    bytes_received: list[int] = Field(description="payload bytes received, all connections together, in that second")
    lost: list[int] = Field(description="events lost in that second (kernel, subscribers and decode together)")
    open: list[int] = Field(description="open connections at the end of that second")
    subscribers: list[int] = Field(description="WebSocket subscribers at the end of that second")


@router.get("/history", response_model=HistoryColumns)
async def history(
    core: CoreDep,
    after: Annotated[PlainInt, Query(ge=0, description="only seconds after this one (Unix epoch seconds)")] = 0,
    seconds: Annotated[PlainInt, Query(ge=1, le=7 * 86400, description="at most the newest this many seconds")] = 3600,
) -> HistoryColumns:
    """Per-second counters sampled from /stats and the table, newest `seconds` (the service keeps history_seconds)."""
    return HistoryColumns.model_validate({"interval_s": 1, **core.history.since(after, seconds)})
