"""GET /stats, GET /healthz, GET /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import CoreDep
from app.api.schemas import ExportStats, Health, HostStats, Stats, SubscriberStats

router = APIRouter(tags=["status"])


@router.get("/stats", response_model=Stats)
async def stats(core: CoreDep) -> Stats:
    """Counters since start, losses per place they happen."""
    hub, table = core.hub, core.table
    return Stats(
        events=hub.counts,
        lost_kernel=core.lost_kernel(),
        lost_recursion=core.recursion_misses(),
        dropped_subscribers=hub.dropped_subscribers,
        decode_errors=core.decode_errors(),
        connections_open=table.open_count,
        connections_closed_kept=table.closed_count,
        connections_preexisting=table.preexisting_count,
        subscribers=len(hub.subscribers),
        refused_subscribers=hub.refused_subscribers,
        seq=hub.seq,
        replay_events_held=hub.held,
        replay_first_seq=hub.first_seq,
        uptime_s=round(time.monotonic() - core.started_mono, 3),
        attach_mode=core.attach_mode,
        subscriber_queues=[SubscriberStats(id=sub.id, filter=sub.label, queued=sub.behind, delivered=sub.delivered,
                                           dropped=sub.dropped_total) for sub in hub.subscribers],
        lost_export=core.lost_export(),
        export=ExportStats.model_validate(exp) if (exp := core.export_stats()) is not None else None,
        hosts={h: HostStats.model_validate(v) for h, v in hosts.items()} if (hosts := core.host_stats()) else None,
    )


@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "not tracing"}})
async def healthz(core: CoreDep) -> JSONResponse:
    """200 while the tracer is attached and reading, 503 otherwise."""
    ok, reason = core.healthy()
    body = Health(status="ok" if ok else "unavailable", attach_mode=core.attach_mode, reason=reason)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}})
async def metrics(core: CoreDep) -> Response:
    """Prometheus text exposition of the /stats counters."""
    return Response(generate_latest(core.registry), media_type=CONTENT_TYPE_LATEST)
