"""GET /events: what the replay buffer still holds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import CoreDep, PlainInt
from app.models import Event

router = APIRouter(tags=["events"])


@router.get("/events", response_model=list[Event])
async def list_events(
    core: CoreDep,
    after: Annotated[PlainInt, Query(ge=0, description="only events with a larger seq")] = 0,
    limit: Annotated[PlainInt, Query(ge=0, le=1_000_000, description="at most this many")] = 1000,
) -> Response:
    """Events still held in the bounded replay buffer, oldest first."""
    hub = core.hub
    # Each event is serialised once, by whoever needs it first; join those texts.
    body = "[" + ",".join(hub.events_after(after, limit)) + "]"
    return Response(body, media_type="application/json")
