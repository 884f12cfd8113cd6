"""API docs that work offline: WS /ws described in OpenAPI, and ReDoc served without its CDN logo.

OpenAPI has no WebSocket operations, so WS /ws is described as its GET upgrade request. Swagger UI
(/docs) comes from fastapi-offline as it is; ReDoc 2.x draws its footer logo from its CDN whatever
the options, so /redoc gets the same bundle with that one URL replaced by an inline image.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, Response

from app.models import EVENT_TYPES

REDOC_CDN_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
INLINE_LOGO = "data:image/svg+xml,%3Csvg xmlns=%27http://www.w3.org/2000/svg%27 width=%271%27 height=%271%27/%3E"
OFFLINE_STATIC = "/static-offline-docs"   # where fastapi-offline mounts its files

WS_DESCRIPTION = """\
Live events over a WebSocket (this GET is the upgrade request; open it with a WebSocket client, e.g.
`.venv/bin/python -m websockets 'ws://127.0.0.1:8000/ws?type=close'`).

**Messages** (server to client, text, JSON):
- an event object (the same shape as `GET /events` items), one per message;
  with `batch=N` a JSON array of up to N of them (control messages included, in order);
- `{"type": "dropped", "count": N}`: this subscriber fell more than `subscriber_queue_events` behind
  and its N oldest undelivered events (that its filter wanted) were dropped;
- `{"type": "overwritten", "count": N, ...}`: a resume with `after` older than the replay buffer; N events
  were overwritten before they could be sent.

The client never needs to send anything. Resume after a disconnect with `after=<last seq seen>`:
held events after it come first, then live ones, with no gap and no duplicate.

**Close codes**: 1008 (policy violation) for a bad query parameter, with a reason naming it;
1001 (going away) when the service shuts down; 1013 (try again later) when the service cannot take
another subscriber now: reconnect with backoff.
"""


def _param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


WS_PARAMETERS = [
    _param("port", {"type": "integer", "minimum": 1, "maximum": 65535}, "only this port at either end"),
    _param("pid", {"type": "integer", "minimum": 1}, "only connections owned by this process"),
    _param("family", {"type": "string", "enum": ["ipv4", "ipv6", "4", "6"]}, "only this address family"),
    _param("role", {"type": "string", "enum": ["client", "server"]}, "client = active open, server = passive open"),
    _param("type", {"type": "string"}, f"comma-separated event types: {', '.join(EVENT_TYPES)}"),
    _param("host", {"type": "string", "minLength": 1, "maxLength": 253},
           "only this host (a fleet view; an agent keeps everything for its own name, nothing for another)"),
    _param("after", {"type": "integer", "minimum": 0}, "resume: first the held events with a larger seq, then live"),
    _param("batch", {"type": "integer", "minimum": 0, "maximum": 65536},
           "up to N events per message as a JSON array (0 or absent: one event per message)"),
    _param("token", {"type": "string"}, "bearer token, where the service requires one and no header can be sent"),
]


def ws_operation() -> dict[str, Any]:
    """The OpenAPI operation object describing WS /ws."""
    return {
        "tags": ["events"],
        "summary": "WS /ws: live events (WebSocket)",
        "description": WS_DESCRIPTION,
        "operationId": "ws_events",
        "parameters": WS_PARAMETERS,
        "responses": {
            "101": {"description": "Switching Protocols: the WebSocket is open and events follow"},
        },
    }


def add_ws_to_openapi(app: FastAPI) -> None:
    """Makes app.openapi() include WS /ws (generated once, like FastAPI's own schema)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None or "/ws" not in app.openapi_schema.get("paths", {}):
            schema = base()
            schema.setdefault("paths", {})["/ws"] = {"get": ws_operation()}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


@functools.cache
def redoc_bundle() -> bytes:
    """fastapi-offline's ReDoc bundle with its one CDN reference made local."""
    text = (files("fastapi_offline") / "static" / "redoc.standalone.js").read_text(encoding="utf-8")
    return text.replace(REDOC_CDN_LOGO, INLINE_LOGO).encode()


def add_offline_redoc(app: FastAPI, path: str = "/redoc") -> None:
    """GET /redoc with every asset from this service."""

    @app.get(f"{OFFLINE_STATIC}-redoc.js", include_in_schema=False)
    async def redoc_js() -> Response:
        return Response(redoc_bundle(), media_type="application/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get(path, include_in_schema=False)
    async def redoc_html() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{OFFLINE_STATIC}-redoc.js", with_google_fonts=False,
                              redoc_favicon_url=f"{OFFLINE_STATIC}/favicon.png")
