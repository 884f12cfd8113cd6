"""Dependency aliases for routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, WebSocket

from app.service import Core


def get_core(request: Request) -> Core:
    return request.app.state.core  # type: ignore[no-any-return]


def get_core_ws(websocket: WebSocket) -> Core:
    return websocket.app.state.core  # type: ignore[no-any-return]


CoreDep = Annotated[Core, Depends(get_core)]
CoreWsDep = Annotated[Core, Depends(get_core_ws)]
