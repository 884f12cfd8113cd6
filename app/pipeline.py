"""The consume path: ring-buffer records -> decode -> table -> hub. Never raises on one record.

Batches are processed in chunks of `chunk_records`, yielding to the event loop between chunks: a
burst (the reader hands over everything in the ring buffer at once) must not stall HTTP handlers
or starve WebSocket senders into dropping. Records waiting for their turn are bounded by
`max_backlog_records`; beyond that, whole batches are shed and counted (`backlog_dropped`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from app.decode import Decoder
from app.hub import EventHub
from app.table import ConnectionTable

log = logging.getLogger(__name__)


class Pipeline:
    """`on_records` is what Tracer.start_reading() calls with each batch."""

    def __init__(self, table: ConnectionTable, hub: EventHub, decoder: Decoder | None = None,
                 chunk_records: int = 512, max_backlog_records: int = 262_144) -> None:
        self.table = table
        self.hub = hub
        self.decoder = decoder or Decoder(time.time_ns() - time.monotonic_ns())
        self.chunk_records = chunk_records
        self.max_backlog_records = max_backlog_records
        self.decode_errors = 0
        self.apply_errors = 0
        self.backlog_dropped = 0
        self.records = 0
        self._pending: deque[list[bytes]] = deque()
        self._pending_records = 0
        self._scheduled = False

    @property
    def backlog(self) -> int:
        """Records received but not yet processed."""
        return self._pending_records

    def on_records(self, batch: list[bytes]) -> None:
        if not batch:
            return
        if self._pending_records + len(batch) > self.max_backlog_records:
            # Overload: shed whole batches rather than grow without bound; losses are data.
            self.backlog_dropped += len(batch)
            return
        self._pending.append(batch)
        self._pending_records += len(batch)
        if not self._scheduled:
            self._run()

    def _run(self) -> None:
        self._scheduled = False
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # called outside a loop (benchmarks, tests): no one to yield to
        budget = self.chunk_records if loop is not None else None
        pending = self._pending
        while pending and (budget is None or budget > 0):
            batch = pending[0]
            if budget is not None and len(batch) > budget:
                chunk, pending[0] = batch[:budget], batch[budget:]
            else:
                chunk = pending.popleft()
            self._pending_records -= len(chunk)
            if budget is not None:
                budget -= len(chunk)
            self._process(chunk)
        if pending and loop is not None:
            self._scheduled = True
            loop.call_soon(self._run)

    def flush(self) -> None:
        """Processes everything still pending, now (shutdown)."""
        while self._pending:
            chunk = self._pending.popleft()
            self._pending_records -= len(chunk)
            self._process(chunk)

    def _process(self, batch: list[bytes]) -> None:
        # Locals: this loop is the hot path (benchmarked at >= 100k events/s).
        decode = self.decoder.decode
        apply = self.table.apply
        publish = self.hub.publish
        self.records += len(batch)
        for raw in batch:
            try:
                ev = decode(raw)
            except Exception:
                # Hubble's rule: the consume loop never dies on one bad record.
                self.decode_errors += 1
                if self.decode_errors <= 10:
                    log.warning("undecodable record of %d bytes", len(raw), exc_info=True)
                continue
            try:
                apply(ev)
                publish(ev)
            except Exception:
                # A bug in our own code must not stop the reader either; count it, loudly.
                self.apply_errors += 1
                log.exception("applying event %s failed", ev.conn_id)
