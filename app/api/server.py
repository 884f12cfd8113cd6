"""`conn-tracer serve`: uvicorn around the app, with our own signal handling and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Generator

import uvicorn

from app.api.app import create_app
from app.config import Settings
from app.service import Core

log = logging.getLogger(__name__)


class _StartFailed(logging.Filter):
    """Hides uvicorn's traceback for a start failure we report in one line ourselves."""

    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core

    def filter(self, record: logging.LogRecord) -> bool:
        return self.core.start_error is None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, core: Core) -> None:
        super().__init__(config)
        self.core = core
        self._stopping = False

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises captured signals after shutdown (exit status 143 on SIGTERM); we want
        # exit 0, and WebSockets closed with 1001 before uvicorn's own 1012 connection shutdown.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self._stopping:
            self.force_exit = True  # a second Ctrl-C: do not wait for anything
            self.should_exit = True
            return
        self._stopping = True
        asyncio.ensure_future(self._graceful())

    async def _graceful(self) -> None:
        try:
            await self.core.close_websockets(1001)
        finally:
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.config.host, self.config.port
            with contextlib.suppress(Exception):
                port = self.servers[0].sockets[0].getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            sys.stderr.write(f"conn-tracer serving on http://{shown}:{port}/ (attach mode {self.core.attach_mode})\n")
            sys.stderr.flush()


def run(settings: Settings, service: Core | None = None) -> int:
    """Serves until SIGINT/SIGTERM; 0 after a clean stop, 1 if the tracer (or `service`) could not start."""
    logging.basicConfig(level=logging.WARNING, format="conn-tracer: %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, core=service)
    core: Core = app.state.core
    # No permessage-deflate: compressing every small event costs more CPU than it saves on loopback/LAN.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, ws="websockets-sansio",
                            lifespan="on", log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False, ws_per_message_deflate=False)
    server = _Server(config, core)
    logging.getLogger("uvicorn.error").addFilter(_StartFailed(core))
    try:
        asyncio.run(server.serve())
    except SystemExit as exc:
        # uvicorn exits with its own status (3) when the lifespan start-up fails; we report it.
        if core.start_error is None:
            return exc.code if isinstance(exc.code, int) else 1
    finally:
        core.stop()  # idempotent; covers a crash before the lifespan's own shutdown
    if core.start_error is not None:
        sys.stderr.write(f"conn-tracer: {core.start_error}\n")
        return 1
    if not server.started:
        return 1  # e.g. the port is taken: uvicorn has said so
    return 0
