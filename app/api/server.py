"""`conn-tracer serve`: uvicorn around the app, with our own signal handling and exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.api.app import create_app
from app.api.reclaim import reclaimer
from app.api.security import startup_problem
from app.config import Settings
from app.service import Core

log = logging.getLogger(__name__)

# Shutdown budget (Docker kills at 10 s; we aim for 3 s whatever the clients do): WebSocket
# handlers get this long to close, then uvicorn this long for the rest.
WS_CLOSE_S = 1.0
GRACEFUL_S = 1
CLOSE_TIMEOUT_S = 2.0   # a client that does not answer our close frame is cut off after this
# asyncio accepts up to `backlog` connections per loop turn and then handles all their requests in
# the next: with uvicorn's 2048 one turn of a connection flood took over a second (and every
# request on an open connection waited for it). The kernel queue itself is settings.listen_backlog.
ACCEPT_BATCH = 32
WRITE_BUFFER_HIGH = 32 * 1024
PONG_FIN = b"\x8a"   # first byte of an unfragmented pong frame (FIN + opcode 0xA)


class WSProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with memory bounded for clients that do not read.

    uvicorn queues a pong per ping however full its write buffer is (a ping flood from a client
    that never reads grew it by 120 MB per million pings), and closes a connection by waiting for
    that buffer to drain, which never happens if the client does not read.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_timeout = CLOSE_TIMEOUT_S
        self._write_paused = False
        self._owed_pong: bytes | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # asyncio's default (64 KiB) per client that stops reading, times max_subscribers; the kernel's
        # socket buffer in front of it still takes the bursts.
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        reclaimer.poke()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_paused = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_paused = False
        if self._owed_pong is not None:
            pong, self._owed_pong = self._owed_pong, None
            self.transport.write(pong)

    def handle_ping(self) -> None:
        # We keep reading (so a client's close frame is seen however full our buffer is), but while
        # the buffer is full only the pong to the latest ping is kept, sent once there is room:
        # RFC 6455 5.5.3 allows answering only the most recent ping.
        output = self.conn.data_to_send()
        if not self._write_paused:
            self.transport.write(b"".join(output))
            return
        pongs = [frame for frame in output if frame[:1] == PONG_FIN]
        if pongs:
            self._owed_pong = pongs[-1]
        others = [frame for frame in output if frame[:1] != PONG_FIN]
        if others:
            self.transport.write(b"".join(others))

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._close_or_abort)

    def _close_or_abort(self) -> None:
        if self.transport.get_write_buffer_size():
            self.transport.abort()   # what is left would never be read
        else:
            self.transport.close()

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._close_or_abort()

    def shutdown(self) -> None:
        super().shutdown()
        self._close_or_abort()


class RateLimit(logging.Filter):
    """At most `burst` records of one message template per `window_s`; the next one says how many were left out.

    One misbehaving client (or 25,000 of them) must not be able to fill the disk through our log.
    """

    def __init__(self, burst: int = 5, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._seen: dict[tuple[str, str], list[float]] = {}   # key -> [window start, records in it]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = self.clock()
        ent = self._seen.get(key)
        if ent is not None and now - ent[0] < self.window_s:
            ent[1] += 1
            return ent[1] <= self.burst
        left_out = int(ent[1]) - self.burst if ent is not None and ent[1] > self.burst else 0
        if len(self._seen) >= 1024:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.window_s}
        self._seen[key] = [now, 1]
        if left_out:
            record.msg = f"{record.msg} ({left_out} similar messages left out before this one)"
        return True


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
            await self.core.close_websockets(1001, timeout_s=WS_CLOSE_S)
        finally:
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            for srv in self.servers:
                for tsock in srv.sockets:
                    # The kernel's queue; asyncio keeps accepting ACCEPT_BATCH per turn. (A dup: asyncio's
                    # socket wrapper hides listen().)
                    with socket.fromfd(tsock.fileno(), tsock.family, tsock.type) as dup:
                        dup.listen(self.core.settings.listen_backlog)
            host, port = self.config.host, self.config.port
            with contextlib.suppress(Exception):
                port = self.servers[0].sockets[0].getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            scheme = "https" if self.config.ssl_certfile else "http"
            sys.stderr.write(f"conn-tracer serving on {scheme}://{shown}:{port}/ "
                             f"(attach mode {self.core.attach_mode})\n")
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
    problem = startup_problem(settings)
    if problem is not None:
        sys.stderr.write(f"conn-tracer: {problem}\n")
        return 2
    try:
        sock = bind_listener(settings.host, settings.port)
    except BindError as exc:
        sys.stderr.write(f"conn-tracer: {exc}\n")
        return 1
    app = create_app(settings, core=service)
    core: Core = app.state.core
    # No permessage-deflate: compressing every small event costs more CPU than it saves on loopback/LAN.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, ws=WSProtocol,
                            lifespan="on", log_level="warning", timeout_graceful_shutdown=GRACEFUL_S,
                            access_log=False, ws_per_message_deflate=False,
                            ws_ping_interval=settings.ws_ping_interval_s or None,
                            ws_ping_timeout=settings.ws_ping_timeout_s,
                            ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key,
                            backlog=ACCEPT_BATCH)
    server = _Server(config, core)
    logging.getLogger("uvicorn.error").addFilter(_StartFailed(core))
    limit = RateLimit()
    for name in ("", "uvicorn", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(limit)
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
