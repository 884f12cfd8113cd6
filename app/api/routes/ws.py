"""WS /ws: live events, filtered, resumable with after=SEQ."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from app.api.frames import TextFrames, cut_reason
from app.api.reclaim import reclaimer
from app.filters import FilterError, parse_batch, parse_filter
from app.hub import Subscriber
from app.service import Core

router = APIRouter(tags=["events"])
log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008
GOING_AWAY = 1001
TRY_AGAIN_LATER = 1013
# Events taken from the hub per socket write: bounds one write and what a client that stops reading
# can hold in the transport buffer beyond its high-water mark (~128 x 550 B).
MESSAGES_PER_WRITE = 128
MAX_EVENTS_PER_BATCH_MESSAGE = 1024


async def _watch_disconnect(websocket: WebSocket, sub: Subscriber) -> None:
    # The client never needs to send; reading is only how we learn it went away.
    try:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        sub.close()




@router.websocket("/ws")
async def ws_events(websocket: WebSocket) -> None:
    """One JSON event per text message; query: port, pid, family, role, type (a,b), after, batch."""
    core: Core = websocket.app.state.core
    try:
        await _serve(websocket, core)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client went away (before or while we wrote): normal, and nothing to log
    finally:
        reclaimer.poke()


async def _serve(websocket: WebSocket, core: Core) -> None:
    try:
        params = dict(websocket.query_params)
        batch_size = parse_batch(params)
        filt, after = parse_filter(params)
    except FilterError as exc:
        # Accept first: a close before accept becomes an HTTP 403 and the client never sees the reason.
        await websocket.accept()
        await websocket.close(code=POLICY_VIOLATION, reason=cut_reason(str(exc)))
        return
    await websocket.accept()
    frames = TextFrames(websocket)
    if core.shutting_down:
        await websocket.close(code=GOING_AWAY, reason="server shutting down")
        return
    # A client that sent the upgrade and hung up has its FIN right behind the request: one loop
    # turn lets the protocol see it, and nothing is subscribed or written for it.
    await asyncio.sleep(0)
    if frames.gone:
        return
    hub = core.hub
    limit = core.settings.max_subscribers
    if len(hub.subscribers) >= limit:
        hub.refused_subscribers += 1
        log.warning("WebSocket subscriber refused: max_subscribers=%d reached", limit)
        await websocket.close(code=TRY_AGAIN_LATER,
                              reason=f"too many subscribers (max_subscribers={limit}); try again later")
        return
    sub = hub.subscribe(core.predicate(filt), after, label=str(websocket.query_params))
    core.websockets.add(websocket)
    watcher = asyncio.create_task(_watch_disconnect(websocket, sub))
    per_take = max(MESSAGES_PER_WRITE, min(batch_size, MAX_EVENTS_PER_BATCH_MESSAGE))
    try:
        # Take events only when the socket has room: a client that stops reading then costs its
        # transport buffer and no more, and a closed one is noticed before anything is written.
        while await frames.wait_writable(sub.done):
            batch = await sub.next_batch(per_take)
            if not batch or frames.gone:
                break
            if batch_size:
                # Opt-in for high-volume consumers: one JSON array per up to batch_size events.
                batch = ["[" + ",".join(batch[i:i + batch_size]) + "]" for i in range(0, len(batch), batch_size)]
            await frames.send(batch)
        if sub.close_code is not None:
            await frames.close(sub.close_code, "server shutting down")
    finally:
        sub.close()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        core.websockets.discard(websocket)
