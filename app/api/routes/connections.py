"""GET /connections, GET /connections/{id}, GET /connections/{id}/events."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from app.api.deps import CoreDep, PlainInt
from app.filters import FAMILY_ALIASES, Filter
from app.models import Connection, Event

# Every handler here is `async def` on purpose: it then runs on the event loop, the only thread that
# touches the table and the hub (a plain `def` would run in a worker thread, racing the reader).
router = APIRouter(tags=["connections"])

PortQ = Annotated[PlainInt | None, Query(ge=1, le=65535, description="local or remote port")]
PidQ = Annotated[PlainInt | None, Query(ge=1, le=2**31 - 1, description="owning process id")]
FamilyQ = Annotated[Literal["ipv4", "ipv6", "4", "6"] | None, Query(description="address family (4 and 6 also)")]
RoleQ = Annotated[Literal["client", "server"] | None, Query(description="client = active open")]
HostQ = Annotated[str | None, Query(min_length=1, max_length=253, description="only this host (fleet view)")]


@router.get("/connections", response_model=list[Connection])
async def list_connections(
    core: CoreDep,
    state: Annotated[Literal["open", "closed", "all"], Query(description="open, closed or all")] = "all",
    port: PortQ = None,
    pid: PidQ = None,
    family: FamilyQ = None,
    role: RoleQ = None,
    host: HostQ = None,
    limit: Annotated[PlainInt, Query(ge=0, le=1_000_000, description="at most this many")] = 1000,
) -> list[Connection]:
    """Connections, newest activity first; closed ones while held in the bounded history."""
    fam = FAMILY_ALIASES.get(family, family) if family is not None else None
    pred = core.predicate(Filter(port=port, pid=pid, family=fam, role=role, host=host))
    return core.table.query(state, pred, limit)


@router.get("/connections/{conn_id}", response_model=Connection,
            responses={404: {"description": "no such connection (never seen, or evicted from history)"}})
async def get_connection(core: CoreDep, conn_id: str) -> Connection:
    """One connection by id."""
    c = core.table.get(conn_id)
    if c is None:
        raise HTTPException(404, f"no connection {conn_id!r}")
    return c


@router.get("/connections/{conn_id}/events", response_model=list[Event],
            responses={404: {"description": "not a connection id (c<n> or p<n>)"}})
async def connection_events(
    core: CoreDep,
    conn_id: str,
    limit: Annotated[PlainInt, Query(ge=0, le=1_000_000, description="at most the newest this many")] = 1000,
) -> Response:
    """That connection's events still held in the replay buffer, oldest first ([] once they have all left it)."""
    key = core.conn_key(conn_id)
    if key is None:
        raise HTTPException(404, f"no connection {conn_id!r}: ids are c<n> or p<n> (<host>:c<n> in a fleet view)")
    return Response("[" + ",".join(core.hub.conn_events(key, limit)) + "]", media_type="application/json")
