"""Several WebSocket text messages in one socket write, where the server lets us.

Under uvicorn's websockets-sansio protocol every ASGI send is one frame and one socket write:
~4 us of CPU per message here, most of a per-message subscriber's cost. When the connection is
served by that protocol (found through the ASGI `send` the app was called with), the frames of
a batch are written together, with the protocol's own framing, flow control and state checks.
Anywhere else (another server, the test client) each message is one ASGI send, as before.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

RAW_SEND = "conn_tracer.raw_send"
ABNORMAL_CLOSURE = 1006


class RawSendMiddleware:
    """Keeps the server's own `send` of each WebSocket connection in its scope (for TextFrames)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope = {**scope, RAW_SEND: send}
        await self.app(scope, receive, send)


def _sansio_protocol(send: Any) -> Any:
    """uvicorn's WebSocketsSansIOProtocol behind `send`, if it has what TextFrames uses; else None."""
    proto = getattr(send, "__self__", None)
    conn = getattr(proto, "conn", None)
    needed = ("transport", "writable", "disconnected", "close_sent")
    if conn is None or not all(hasattr(proto, a) for a in needed):
        return None
    return proto if hasattr(conn, "send_text") and hasattr(conn, "data_to_send") else None


class TextFrames:
    """Sends lists of text messages on one WebSocket, in order."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._proto = _sansio_protocol(websocket.scope.get(RAW_SEND))

    @property
    def batched(self) -> bool:
        return self._proto is not None

    async def send(self, texts: list[str]) -> None:
        """Each text as its own message; raises WebSocketDisconnect if the client is gone."""
        proto = self._proto
        if proto is None:
            for text in texts:
                await self.websocket.send_text(text)
            return
        await proto.writable.wait()   # the protocol's flow control: paused while the socket buffer is full
        if proto.disconnected or proto.close_sent or proto.transport.is_closing():
            raise WebSocketDisconnect(ABNORMAL_CLOSURE)
        conn = proto.conn
        try:
            for text in texts:
                conn.send_text(text.encode())
        except Exception as exc:   # websockets' InvalidState: the connection is closing
            raise WebSocketDisconnect(ABNORMAL_CLOSURE) from exc
        proto.transport.write(b"".join(conn.data_to_send()))
