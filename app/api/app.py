"""The app factory: routers, the lifespan that owns the tracer, validation messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api.docs import add_offline_redoc, add_ws_to_openapi
from app.api.frames import RawSendMiddleware
from app.api.metrics import make_registry
from app.api.routes import connections, events, history, status, web, ws
from app.api.security import Guard, load_token
from app.config import Settings
from app.service import Core, TracerFactory, default_tracer_factory

_APP_DIR = Path(__file__).resolve().parents[1]
# Installed from a wheel the dashboard is app/web (setup.py maps it there); in the source tree, web/ beside app/.
DEFAULT_WEB_DIR = next((d for d in (_APP_DIR / "web", _APP_DIR.parent / "web") if (d / "index.html").is_file()),
                       _APP_DIR.parent / "web")


def validation_message(exc: RequestValidationError) -> str:
    """One line naming the bad parameter(s), e.g. "invalid query parameter port: ..."."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 else ".".join(loc)
        parts.append(f"invalid {where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Keep FastAPI's `detail` (loc names the parameter) and add a readable one-line message.
    # jsonable_encoder: a custom validator's error carries its exception object in `ctx`.
    return JSONResponse({"detail": jsonable_encoder(exc.errors()), "message": validation_message(exc)},
                        status_code=422)


def create_app(settings: Settings | None = None, tracer_factory: TracerFactory = default_tracer_factory,
               core: Core | None = None) -> FastAPI:
    """Builds the app; the lifespan opens the tracer at start-up and closes it at shutdown.

    `core` serves an already built service instead (the fleet view: app.fleet.FleetCore). Raises
    AccessError if the token settings are unusable (serve checks them first, in one line).
    """
    if core is not None:
        settings = core.settings
    settings = settings or Settings.model_validate({})
    token = load_token(settings)
    core = core or Core(settings, tracer_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await core.start()
        try:
            yield
        finally:
            await core.close_websockets(1001, timeout_s=1.0)   # serve's SIGTERM handler has done it already
            core.stop()
            await core.aclose()

    # FastAPIOffline: /docs loads Swagger UI from the installed fastapi-offline package (under
    # /static-offline-docs), never from a CDN; /redoc likewise, through app/api/docs.py.
    app = FastAPIOffline(title="conn-tracer", version=__version__, lifespan=lifespan, redoc_url=None,
                         description="Every TCP connection on this host, from eBPF: connections, events, stats. "
                                     "Live events: `WS /ws` (described under GET /ws).")
    app.state.core = core
    core.registry = make_registry(core)
    web_dir = settings.web_dir or DEFAULT_WEB_DIR
    app.state.web_dir = web_dir
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_middleware(RawSendMiddleware)
    # Outermost: nothing reaches a route (or the dashboard) before Host, Origin and token are checked.
    app.add_middleware(Guard, settings=settings, token=token, index_html=web_dir / "index.html")
    for r in (connections.router, events.router, status.router, history.router, ws.router, web.router):
        app.include_router(r)
    add_ws_to_openapi(app)
    add_offline_redoc(app)
    if web_dir.is_dir():
        app.mount("/static", StaticFiles(directory=web_dir), name="static")
    return app
