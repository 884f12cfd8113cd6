"""Dependency aliases for routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, WebSocket
from pydantic import BeforeValidator

from app.filters import plain_int
from app.service import Core


def get_core(request: Request) -> Core:
    return request.app.state.core  # type: ignore[no-any-return]


def get_core_ws(websocket: WebSocket) -> Core:
    return websocket.app.state.core  # type: ignore[no-any-return]


CoreDep = Annotated[Core, Depends(get_core)]
CoreWsDep = Annotated[Core, Depends(get_core_ws)]


def _plain_int(value: object) -> object:
    # Query values arrive as strings; pydantic's lax int would take "1_000", "+80" and " 80".
    return plain_int(value) if isinstance(value, str) else value


PlainInt = Annotated[int, BeforeValidator(_plain_int)]
