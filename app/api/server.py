"""`conn-tracer serve`: uvicorn around the app, with our own signal handling and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
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


class BindError(OSError):
    """The listening socket could not be had; the message is one line with the fix."""


def bind_listener(host: str, port: int) -> socket.socket:
    """Binds the API's socket before anything touches the kernel, so a taken port costs no BPF load."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot bind {host}:{port}: {exc.strerror}; fix --host (CONN_TRACER_HOST)") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart despite TIME_WAIT
        sock.bind(addr)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        shown = f"[{host}]" if ":" in host else host
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"port {port} on {shown} is already in use (another conn-tracer serve?); stop that "
                            f"process or choose another port with --port N (CONN_TRACER_PORT)") from None
        if exc.errno == errno.EACCES:
            raise BindError(f"no permission to bind port {port} on {shown}; run as root or use a port "
                            f"above 1023 (--port N)") from None
        raise BindError(f"cannot bind {shown}:{port}: {exc.strerror}; fix --host/--port") from None
    return sock


def run(settings: Settings, service: Core | None = None) -> int:
    """Serves until SIGINT/SIGTERM; 0 after a clean stop, 1 if the port or the tracer (or `service`) failed."""
    logging.basicConfig(level=logging.WARNING, format="conn-tracer: %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind_listener(settings.host, settings.port)
    except BindError as exc:
        sys.stderr.write(f"conn-tracer: {exc}\n")
        return 1
    app = create_app(settings, core=service)
    core: Core = app.state.core
    # No permessage-deflate: compressing every small event costs more CPU than it saves on loopback/LAN.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, ws="websockets-sansio",
                            lifespan="on", log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False, ws_per_message_deflate=False)
    server = _Server(config, core)
    logging.getLogger("uvicorn.error").addFilter(_StartFailed(core))
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except SystemExit as exc:
        # uvicorn exits with its own status (3) when the lifespan start-up fails; we report it.
        if core.start_error is None:
            return exc.code if isinstance(exc.code, int) else 1
    finally:
        core.stop()  # idempotent; covers a crash before the lifespan's own shutdown
        sock.close()
    if core.start_error is not None:
        sys.stderr.write(f"conn-tracer: {core.start_error}\n")
        return 1
    if not server.started:
        return 1  # e.g. the port is taken: uvicorn has said so
    return 0
