"""GET /events: what the replay buffer still holds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import CoreDep
from app.models import Event

router = APIRouter(tags=["events"])


@router.get("/events", response_model=list[Event])
async def list_events(
    core: CoreDep,
    after: Annotated[int, Query(ge=0, description="only events with a larger seq")] = 0,
    limit: Annotated[int, Query(ge=0, le=1_000_000, description="at most this many")] = 1000,
) -> Response:
    """Events still held in the bounded replay buffer, oldest first."""
    items = core.hub.events_after(after, limit)
    # Each event was serialised once when published; join those texts instead of re-encoding.
    body = "[" + ",".join(i.json for i in items) + "]"
    return Response(body, media_type="application/json")
