"""GET /events: what the replay buffer still holds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import CoreDep, PlainInt
from app.api.routes.connections import HostQ
from app.filters import Filter
from app.models import Event

router = APIRouter(tags=["events"])


@router.get("/events", response_model=list[Event])
async def list_events(
    core: CoreDep,
    after: Annotated[PlainInt, Query(ge=0, description="only events with a larger seq")] = 0,
    limit: Annotated[PlainInt, Query(ge=0, le=1_000_000, description="at most this many")] = 1000,
    host: HostQ = None,
) -> Response:
    """Events still held in the bounded replay buffer, oldest first."""
    hub = core.hub
    pred = core.predicate(Filter(host=host)) if host is not None else None
    if pred is None:
        texts = hub.events_after(after, limit)
    else:
        # texts_from() looks at a bounded number of events per call: go on to the newest or the limit.
        texts, nxt = [], max(after + 1, hub.first_seq)
        while len(texts) < limit and nxt <= hub.seq:
            more, nxt = hub.texts_from(nxt, limit - len(texts), pred)
            texts += more
    # Each event is serialised once, by whoever needs it first; join those texts.
    body = "[" + ",".join(texts) + "]"
    return Response(body, media_type="application/json")
