"""WS /ws: live events, filtered, resumable with after=SEQ."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from app.api.frames import TextFrames
from app.filters import FilterError, parse_batch, parse_filter
from app.hub import Subscriber
from app.service import Core

router = APIRouter(tags=["events"])

POLICY_VIOLATION = 1008
MESSAGES_PER_WRITE = 256   # bounds one socket write (and the time between flow-control checks)


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
        params = dict(websocket.query_params)
        batch_size = parse_batch(params)
        filt, after = parse_filter(params)
    except FilterError as exc:
        # Accept first: a close before accept becomes an HTTP 403 and the client never sees the reason.
        await websocket.accept()
        await websocket.close(code=POLICY_VIOLATION, reason=str(exc)[:120])
        return
    await websocket.accept()
    if core.shutting_down:
        await websocket.close(code=1001, reason="server shutting down")
        return
    sub = core.hub.subscribe(core.predicate(filt), after, label=str(websocket.query_params))
    core.websockets.add(websocket)
    watcher = asyncio.create_task(_watch_disconnect(websocket, sub))
    frames = TextFrames(websocket)
    try:
        while True:
            batch = await sub.next_batch()
            if not batch:
                break
            if batch_size:
                # Opt-in for high-volume consumers: one JSON array per up to batch_size events.
                batch = ["[" + ",".join(batch[i:i + batch_size]) + "]" for i in range(0, len(batch), batch_size)]
            for i in range(0, len(batch), MESSAGES_PER_WRITE):
                if sub.closed:
                    break  # the client left mid-batch: writing on would only hit a dead transport
                await frames.send(batch[i:i + MESSAGES_PER_WRITE])
        if sub.close_code is not None:
            await websocket.close(code=sub.close_code, reason="server shutting down")
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client went away mid-send: normal
    finally:
        sub.close()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        core.websockets.discard(websocket)
