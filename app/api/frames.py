"""Several WebSocket text messages in one socket write, where the server lets us.

Under uvicorn's websockets-sansio protocol every ASGI send is one frame and one socket write:
~4 us of CPU per message here, most of a per-message subscriber's cost. When the connection is
served by that protocol (found through the ASGI `send` the app was called with), the frames of
a batch are written together, with the protocol's own framing, flow control and state checks.
Anywhere else (another server, the test client) each message is one ASGI send, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

RAW_SEND = "conn_tracer.raw_send"
ABNORMAL_CLOSURE = 1006
MAX_CLOSE_REASON_BYTES = 123   # RFC 6455 5.5: a control frame's payload is <= 125 bytes, 2 of them the code


def cut_reason(reason: str) -> str:
    """`reason` cut to what a close frame can carry (123 bytes of UTF-8), on a character boundary."""
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return raw[:MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."


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

    @property
    def gone(self) -> bool:
        """True once the connection is known to be closed or closing (sansio protocol only)."""
        proto = self._proto
        return proto is not None and (proto.disconnected or proto.close_sent or proto.transport.is_closing())

    async def wait_writable(self, stop: asyncio.Event) -> bool:
        """Waits until the socket buffer has room or `stop` is set; True if a write may follow.

        Data is taken from the hub only once it can be written, so a client that stops reading
        holds no more than the transport's buffer, not a batch of events as well.
        """
        proto = self._proto
        if proto is None:
            return not stop.is_set()
        if not proto.writable.is_set() and not stop.is_set():
            waiters = {asyncio.ensure_future(proto.writable.wait()), asyncio.ensure_future(stop.wait())}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
        return not stop.is_set() and not self.gone

    async def close(self, code: int, reason: str) -> None:
        """Closes with `code`; a client that does not read (full buffer) is cut off at once instead."""
        proto = self._proto
        if proto is not None and not proto.writable.is_set():
            # The close frame could never reach it, and uvicorn's close would wait for room forever.
            proto.transport.abort()
            return
        await self.websocket.close(code=code, reason=cut_reason(reason))

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
