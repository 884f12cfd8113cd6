"""GET /: the dashboard (web/index.html), or a placeholder if it is not there."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

router = APIRouter(tags=["dashboard"])

PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>conn-tracer</title>
<h1>conn-tracer</h1><p>The dashboard files (web/index.html) are not installed. The API is here:
<a href="/docs">/docs</a>, <a href="/connections">/connections</a>, <a href="/stats">/stats</a>.</p>
"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> Response:
    """The dashboard."""
    page = request.app.state.web_dir / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return HTMLResponse(PLACEHOLDER)
