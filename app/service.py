"""The service lifecycle, outside the HTTP package: settings, tracer, table, hub, pipeline, WebSockets."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from app import sockdiag
from app.bpf.event import NETNS, STATE, EventRecord
from app.config import Settings
from app.history import History, Totals
from app.hub import EventHub
from app.models import EventWriter, Texts
from app.pipeline import Pipeline
from app.table import ConnectionTable, conn_key

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 10_000   # allocations between young-generation collections (CPython's default: 700)


class Source(Protocol):
    """What the API needs from a tracer (app.bpf.loader.Tracer, or a fake in tests)."""

    @property
    def attach_mode(self) -> str: ...

    @property
    def attached(self) -> bool: ...

    @property
    def reading(self) -> bool: ...

    def open(self) -> None: ...

    def start_reading(self, loop: asyncio.AbstractEventLoop, on_records: Callable[[bytes, int], None]) -> None: ...

    def drain(self) -> int: ...

    def lost_kernel(self) -> int: ...

    @property
    def resumed(self) -> bool: ...

    def tracked_sockets(self) -> list[tuple[int, EventRecord]]: ...

    def forget_sockets(self, keys: list[int]) -> None: ...

    def wall_offset(self, fresh_ns: int) -> int: ...

    def bad_records(self) -> int: ...

    def close(self) -> None: ...


TracerFactory = Callable[[Settings], Source]


def default_tracer_factory(settings: Settings) -> Source:
    from app.bpf.loader import Tracer  # only here: the API itself never imports bcc

    return Tracer(settings)


class Core:
    """Owns the components; the FastAPI lifespan drives start() and stop()."""

    def __init__(self, settings: Settings, tracer_factory: TracerFactory) -> None:
        self.settings = settings
        self.tracer_factory = tracer_factory
        self.tracer: Source | None = None
        # One mapping of the kernel's CLOCK_MONOTONIC to UTC for the whole run.
        self.texts = Texts(time.time_ns() - time.monotonic_ns(), settings.host_name)
        self.table = ConnectionTable(self.texts, settings.max_closed_connections, settings.max_open_connections)
        self.hub = EventHub(EventWriter(self.texts), settings.replay_events, settings.subscriber_queue_events)
        self.pipeline = Pipeline(self.table, self.hub)
        self.history = History(settings.history_seconds, self.totals)
        self._history_task: asyncio.Task[None] | None = None
        self.started_mono = time.monotonic()
        self.websockets: set[Any] = set()
        self.shutting_down = False
        self._refresh_task: asyncio.Task[None] | None = None
        self.registry: Any = None  # set by create_app
        self.start_error: BaseException | None = None

    @property
    def attach_mode(self) -> str:
        return self.tracer.attach_mode if self.tracer is not None else "detached"

    def lost_kernel(self) -> int:
        return self.tracer.lost_kernel() if self.tracer is not None else 0

    def decode_errors(self) -> int:
        """Records that could not be decoded: a foreign size in the ring, or values the decoder rejects."""
        return self.pipeline.decode_errors + (self.tracer.bad_records() if self.tracer is not None else 0)

    def totals(self) -> Totals:
        """The cumulative counters History samples once a second."""
        counts, table = self.hub.counts, self.table
        sent, received = table.byte_totals()
        return Totals(opened=counts["syn_sent"] + counts["syn_recv"], closed=counts["close"], events=self.hub.seq,
                      bytes_sent=sent, bytes_received=received,
                      lost=self.lost_kernel() + self.hub.dropped_subscribers + self.decode_errors(),
                      open=table.open_count, subscribers=len(self.hub.subscribers))

    def healthy(self) -> tuple[bool, str | None]:
        t = self.tracer
        if t is None or not t.attached:
            return False, "tracer not attached"
        if not t.reading:
            return False, "tracer not reading"
        return True, None

    async def start(self) -> None:
        """Open (compile+attach), load preexisting connections, start reading; undo on failure."""
        loop = asyncio.get_running_loop()
        try:
            tracer = self.tracer_factory(self.settings)
            tracer.open()
        except Exception as exc:
            self.start_error = exc
            raise
        self.tracer = tracer
        self.texts.wall_offset_ns = tracer.wall_offset(self.texts.wall_offset_ns)
        try:
            if tracer.resumed:
                self._restore(tracer)
            # After attach, so a connection opening meanwhile is either in the dump or seen by the
            # kernel (the table drops the sock_diag twin then); never missed.
            if self.settings.preexisting:
                self._load_preexisting()
            tracer.start_reading(loop, self.pipeline.on_records)
        except BaseException as exc:
            self.start_error = exc
            self.tracer = None
            tracer.close()
            raise
        # Every event allocates a record or two that live until the replay buffer lets them go: with
        # the default threshold (700) the collector ran so often that it took ~15% of the CPU
        # under churn (measured). Start-up objects move out of its sight for good.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        if self.settings.preexisting and self.settings.preexisting_refresh_s > 0:
            self._refresh_task = asyncio.create_task(self._refresh_loop())
        self._history_task = asyncio.create_task(self.history.run())

    def _restore(self, tracer: Source) -> None:
        """Lists again the connections an earlier run left in the pinned socket map, with their ids, roles,
        owners and start times; entries of sockets that closed meanwhile are dropped from the map."""
        tracked = tracer.tracked_sockets()
        try:
            alive = {conn_key(r): r for r in sockdiag.preexisting(sockdiag.dump(), {})}
        except OSError as exc:
            log.warning("sock_diag dump failed, restored connections not checked: %s", exc)
            alive = None
        own_netns = sockdiag.current_netns()
        keep, gone = [], []
        for key, rec in tracked:
            if alive is not None and rec[NETNS] == own_netns:
                now = alive.get(conn_key(rec))
                if now is None:
                    gone.append(key)
                    continue
                rec = (*rec[:STATE], now[STATE], *rec[STATE + 1:])
            keep.append(rec)
        tracer.forget_sockets(gone)
        n = self.table.restore(keep)
        log.info("restart: %d connections restored from the pinned socket map, %d gone meanwhile", n, len(gone))

    def _load_preexisting(self) -> None:
        try:
            socks = sockdiag.dump()
            owners = sockdiag.socket_owners()
        except OSError as exc:
            log.warning("sock_diag dump failed, preexisting connections not loaded: %s", exc)
            return
        n = self.table.add_preexisting(sockdiag.preexisting(socks, owners))
        log.info("%d preexisting connections from sock_diag", n)

    async def _refresh_loop(self) -> None:
        # sock_diag has no events: poll it, slowly, to notice preexisting connections closing.
        while self.table.preexisting_count:
            await asyncio.sleep(self.settings.preexisting_refresh_s)
            try:
                socks = await asyncio.to_thread(sockdiag.dump)
            except OSError as exc:
                log.warning("sock_diag refresh failed: %s", exc)
                continue
            self.table.refresh_preexisting({conn_key(r): r for r in sockdiag.preexisting(socks, {})})

    async def close_websockets(self, code: int = 1001, timeout_s: float = 3.0) -> None:
        """Asks every WebSocket handler to close with `code`, waits (bounded) until they have."""
        self.shutting_down = True
        for sub in list(self.hub.subscribers):
            sub.close_code = code
            sub.close()
        deadline = time.monotonic() + timeout_s
        while self.websockets and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Detach everything (safe twice)."""
        for task in (self._refresh_task, self._history_task):
            if task is not None:
                task.cancel()
        self._refresh_task = self._history_task = None
        if self.tracer is not None:
            try:
                # What is still in the ring: bounded, the programs keep writing until detached.
                for _ in range(64):
                    if not self.tracer.drain():
                        break
            finally:
                self.tracer.close()
