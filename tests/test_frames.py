"""TextFrames under the real uvicorn: the batched path is taken, and messages arrive whole and in order."""

from __future__ import annotations

import asyncio

import uvicorn
import websockets
from fastapi import FastAPI, WebSocket

from app.api.frames import RawSendMiddleware, TextFrames


async def test_batched_frames_under_uvicorn_sansio() -> None:
    seen: dict[str, bool] = {}
    app = FastAPI()
    app.add_middleware(RawSendMiddleware)

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        frames = TextFrames(websocket)
        seen["batched"] = frames.batched
        await frames.send([f"m{i}" for i in range(300)])
        await frames.send(["last"])
        await websocket.close()

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, ws="websockets-sansio",
                                           log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as client:
            got = [m async for m in client]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
    # If uvicorn's protocol changes shape, this says so instead of silently sending one message at a time.
    assert seen == {"batched": True}
    assert got == [f"m{i}" for i in range(300)] + ["last"]
