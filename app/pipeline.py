"""The consume path: ring-buffer frames -> decode -> table -> hub. Never raises on one record.

The tracer hands over at most `read_batch_records` per loop turn and the loop serves HTTP and
WebSocket clients between batches, so there is no queue here: a record is either still in the
kernel ring (bounded, losses counted there) or processed.
"""

from __future__ import annotations

import logging

from app.bpf.event import CONN_ID, EV_SYN_SENT, TYPE, EventRecord
from app.decode import DecodeError, Decoder
from app.hub import EventHub
from app.table import ConnectionTable

log = logging.getLogger(__name__)

MAX_ANNOUNCED = 65536   # bounds the set if a connection's records never arrive (ring full)


class Pipeline:
    """`on_records` is what Tracer.start_reading() calls with each batch."""

    def __init__(self, table: ConnectionTable, hub: EventHub, decoder: Decoder | None = None) -> None:
        self.table = table
        self.hub = hub
        self.decoder = decoder or Decoder()
        self.apply_errors = 0
        self.bad_batches = 0
        self.records = 0
        # Connections whose syn_sent was published early (pending connects, from user space): the
        # copy their first kernel record carries is dropped, so each event is published once.
        self._announced: set[int] = set()

    @property
    def decode_errors(self) -> int:
        return self.decoder.bad_records

    def on_records(self, frames: bytes, count: int) -> None:
        self.records += count
        try:
            recs = self.decoder.decode(frames)
        except DecodeError:
            self.decoder.bad_records += count
            self.bad_batches += 1
            if self.bad_batches <= 10:   # the first few, not a flood
                log.warning("undecodable batch of %d records", count, exc_info=True)
            return
        if self._announced:
            recs = self._drop_announced(recs)
        self.publish(recs)

    def announce_syn(self, recs: list[EventRecord]) -> None:
        """Publishes syn_sent events made in user space (pending connects) ahead of their kernel copies."""
        for rec in recs:
            if len(self._announced) < MAX_ANNOUNCED:
                self._announced.add(rec[CONN_ID])
        self.publish(recs)

    def _drop_announced(self, recs: list[EventRecord]) -> list[EventRecord]:
        out = []
        for rec in recs:
            if rec[TYPE] == EV_SYN_SENT and rec[CONN_ID] in self._announced:
                self._announced.discard(rec[CONN_ID])
                continue
            out.append(rec)
        return out

    def publish(self, recs: list[EventRecord]) -> None:
        """Records to the table, then to the hub (which numbers them)."""
        try:
            self.table.apply_many(recs)
        except Exception:
            # A bug in our own code must not stop the reader; count it, loudly (but boundedly).
            self.apply_errors += 1
            if self.apply_errors <= 10:
                log.exception("applying a batch of %d events failed", len(recs))
        self.hub.publish_many(recs)
