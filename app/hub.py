"""EventHub: sequence numbers, the bounded replay buffer, subscribers as cursors into it.

Single-threaded asyncio is the concurrency rule: publish_many() runs synchronously in the
ring-buffer reader callback and never awaits, so subscribe() can place its cursor with no
event slipping in between.

Nothing is allocated per event beyond its record: the replay buffer holds records in chunks
of consecutive seqs (with a slot for each event's JSON, made once, when first needed), and a
subscriber is a cursor, the next seq it will look at, so publishing costs O(subscribers) per
batch, not per event, and a slow subscriber holds no memory of its own. A subscriber more
than `subscriber_queue_events` behind loses its oldest events, counted and told.
"""

from __future__ import annotations

import asyncio
import json
from collections import _count_elements as count_elements  # type: ignore[attr-defined]
from collections import deque
from collections.abc import Iterator
from operator import itemgetter

from app.bpf.event import CONN_ID, EVENT_TYPE_NAMES, TYPE, EventRecord
from app.filters import Predicate
from app.models import EventWriter

# Small batches (a quiet host) are merged into the newest chunk up to this many events, which
# bounds the number of chunks (and so the cost of finding a seq) by replay_events / CHUNK_EVENTS.
CHUNK_EVENTS = 256
# JSON is kept for the newest chunks only (where subscribers read, several of them the same
# events); older events are written again if a late reader asks. A JSON text is about as big
# as its record: keeping it for the whole replay buffer doubled the service's memory.
TEXT_CHUNKS = 16


class Chunk:
    """Events first_seq, first_seq + 1, ...: their records, and their JSON once made (None before)."""

    __slots__ = ("first_seq", "recs", "texts")

    def __init__(self, first_seq: int, recs: list[EventRecord]) -> None:
        self.first_seq = first_seq
        self.recs = recs
        self.texts: list[str | None] | None = [None] * len(recs)   # None: not kept (an old chunk)


class Subscriber:
    """One consumer: a cursor into the hub's events, a filter, and what it has been told it lost."""

    def __init__(self, hub: EventHub, pred: Predicate | None, cursor: int, overwritten: int,
                 label: str = "") -> None:
        self.hub = hub
        self.id = hub.next_subscriber_id
        self.label = label
        self.pred = pred
        self.cursor = cursor   # the next seq this subscriber looks at
        # A resume may start further back than the live bound; it has that much slack until it catches up.
        self.max_behind = max(hub.queue_events, hub.seq + 1 - cursor)
        self.overwritten = overwritten
        self.dropped_pending = 0
        self.dropped_total = 0
        self.delivered = 0
        self.closed = False
        self.close_code: int | None = None  # set when the service asks it to go away
        self.done = asyncio.Event()   # set once closed: wakes a sender waiting for socket room
        self._wake = asyncio.Event()
        if overwritten or cursor <= hub.seq:
            self._wake.set()

    @property
    def behind(self) -> int:
        """Events published that this subscriber has not looked at yet."""
        return self.hub.seq + 1 - self.cursor

    def notify(self) -> None:
        """Called by publish_many() once per batch; O(1) unless this subscriber must lose events."""
        if self.behind > self.max_behind:
            self.drop_to(self.hub.seq + 1 - self.max_behind)
        self._wake.set()

    def drop_to(self, seq: int) -> None:
        """Skips the events before `seq` (too slow, or about to leave the replay buffer); counts what it lost."""
        if seq <= self.cursor:
            return
        pred = self.pred
        if pred is None:
            lost = seq - self.cursor
        else:
            lost = sum(1 for recs, _texts, _first, lo, hi in self.hub.segments(self.cursor, seq)
                       for r in recs[lo:hi] if pred(r))
        self.cursor = seq
        self.dropped_pending += lost
        self.dropped_total += lost
        self.hub.dropped_subscribers += lost

    def take(self, max_events: int = 1024) -> list[str]:
        """What is deliverable now (at most `max_events` events), as JSON texts, control messages first."""
        out: list[str] = []
        if self.closed:
            return out
        if self.overwritten:
            n, self.overwritten = self.overwritten, 0
            out.append(json.dumps({"type": "overwritten", "count": n,
                                   "message": f"{n} events after the requested seq are no longer "
                                              "in the replay buffer"}))
        if self.dropped_pending:
            # The dropped ones were older than everything still to come: say so before those.
            out.append(json.dumps({"type": "dropped", "count": self.dropped_pending}))
            self.dropped_pending = 0
        texts, self.cursor = self.hub.texts_from(self.cursor, max_events, self.pred)
        out.extend(texts)
        if self.behind <= self.hub.queue_events:
            self.max_behind = self.hub.queue_events
        if self.cursor > self.hub.seq:
            self._wake.clear()
        self.delivered += len(out)
        return out

    async def next_batch(self, max_events: int = 1024) -> list[str]:
        """Waits until something is deliverable, then takes it (at most `max_events` events); [] once closed."""
        # Yield once per batch even when more is ready, so the ring-buffer reader and HTTP handlers
        # interleave with a fast subscriber instead of waiting for its whole backlog.
        await asyncio.sleep(0)
        while not self.closed:
            await self._wake.wait()
            batch = self.take(max_events)
            if batch:
                return batch
        return []

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    """Assigns seq (the one place it is assigned), keeps the last `replay_events`, serves subscribers.

    The replay buffer gives up whole chunks: it holds at least `replay_events` (once that many were
    published) and at most one chunk more.
    """

    def __init__(self, writer: EventWriter, replay_events: int = 100_000,
                 subscriber_queue_events: int = 10_000) -> None:
        self.writer = writer
        self.replay_events = replay_events
        # A subscriber cannot be further behind than what the replay buffer still holds.
        self.queue_events = min(subscriber_queue_events, replay_events)
        self.chunks: deque[Chunk] = deque()
        self.chunk_events = max(1, min(CHUNK_EVENTS, replay_events // 8))
        self.held = 0
        self.seq = 0
        self._counts: dict[int, int] = dict.fromkeys(EVENT_TYPE_NAMES, 0)
        self.dropped_subscribers = 0
        self.refused_subscribers = 0   # turned away at max_subscribers (counted by the WebSocket route)
        self.subscribers: list[Subscriber] = []
        self.next_subscriber_id = 0

    @property
    def counts(self) -> dict[str, int]:
        """Events published, per event type name."""
        return {name: self._counts.get(n, 0) for n, name in EVENT_TYPE_NAMES.items()}

    @property
    def first_seq(self) -> int:
        """Seq of the oldest event still held (seq + 1 if none)."""
        return self.chunks[0].first_seq if self.chunks else self.seq + 1

    def publish_many(self, recs: list[EventRecord]) -> None:
        """Numbers and keeps a batch of events, in order, and wakes the subscribers; never blocks."""
        n = len(recs)
        if not n:
            return
        chunks = self.chunks
        last = chunks[-1] if chunks else None
        if last is not None and len(last.recs) < self.chunk_events and last.texts is not None:
            last.recs.extend(recs)
            last.texts.extend([None] * n)
        else:
            chunks.append(Chunk(self.seq + 1, list(recs)))
            if len(chunks) > TEXT_CHUNKS:
                chunks[-TEXT_CHUNKS - 1].texts = None
        self.seq += n
        self.held += n
        # Whole chunks leave once the rest still holds replay_events; a subscriber still on one
        # loses those events first (counted with its filter while they can still be tested).
        while self.held - len(chunks[0].recs) >= self.replay_events:
            end = chunks[0].first_seq + len(chunks[0].recs)
            for s in self.subscribers:
                if s.cursor < end:
                    s.drop_to(end)
            self.held -= len(chunks.popleft().recs)
        count_elements(self._counts, map(itemgetter(TYPE), recs))   # Counter's C loop, on our dict
        for s in self.subscribers:
            s.notify()

    def publish(self, rec: EventRecord) -> None:
        """One event."""
        self.publish_many([rec])

    def segments(self, start: int, end: int
                 ) -> Iterator[tuple[list[EventRecord], list[str | None] | None, int, int, int]]:
        """(recs, texts, first_seq, lo, hi) of each chunk part holding seqs start..end-1 (clipped to what is held)."""
        chunks = self.chunks
        if not chunks or start >= end:
            return
        # Walk from whichever end is nearer: subscribers are usually close to the newest events.
        if self.seq + 1 - start < start - chunks[0].first_seq:
            i = len(chunks) - 1
            while i > 0 and chunks[i].first_seq > start:
                i -= 1
        else:
            i = 0
            while i + 1 < len(chunks) and chunks[i + 1].first_seq <= start:
                i += 1
        for k in range(i, len(chunks)):
            c = chunks[k]
            first = c.first_seq
            if first >= end:
                break
            lo, hi = max(start - first, 0), min(end - first, len(c.recs))
            if lo < hi:
                yield c.recs, c.texts, first, lo, hi

    def texts_from(self, start: int, max_events: int, pred: Predicate | None = None,
                   max_scan: int = 65536) -> tuple[list[str], int]:
        """JSON of up to `max_events` events from seq `start` on (those `pred` accepts); and the next seq to look at.

        Each event's JSON is made once (in one call per run of events) and kept for other readers.
        A filter looks at no more than `max_scan` events per call, so one call's work is bounded.
        """
        out: list[str] = []
        start = max(start, self.first_seq)
        nxt = start
        json_many = self.writer.json_many
        for recs, texts, first, lo, hi in self.segments(start, start + (max_events if pred is None else max_scan)):
            if pred is None:
                hi = min(hi, lo + max_events - len(out))
                if texts is None:
                    out.extend(json_many(first + lo, recs[lo:hi]))
                else:
                    if None in texts[lo:hi]:
                        texts[lo:hi] = json_many(first + lo, recs[lo:hi])
                    out.extend(texts[lo:hi])  # type: ignore[arg-type]
            else:
                for j in range(lo, hi):
                    if pred(recs[j]):
                        text = texts[j] if texts is not None else None
                        if text is None:
                            text = json_many(first + j, [recs[j]])[0]
                            if texts is not None:
                                texts[j] = text
                        out.append(text)
                        if len(out) >= max_events:
                            hi = j + 1
                            break
            nxt = first + hi
            if len(out) >= max_events:
                break
        else:
            nxt = max(nxt, min(self.seq + 1, start + (max_events if pred is None else max_scan)))
        return out, nxt

    def subscribe(self, pred: Predicate | None = None, after: int | None = None, label: str = "") -> Subscriber:
        """Registers a subscriber; with `after`, held events after it come first (no gap, no dup)."""
        cursor, overwritten = self.seq + 1, 0
        if after is not None and after < self.seq:
            first = self.first_seq
            overwritten = max(0, first - 1 - after)
            cursor = max(after + 1, first)
        # Same synchronous step as the cursor's placement: nothing can be published in between.
        self.next_subscriber_id += 1
        sub = Subscriber(self, pred, cursor, overwritten, label)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        sub._wake.set()
        sub.done.set()
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def events_after(self, after: int, limit: int) -> list[str]:
        """JSON of the events after seq `after` still held, oldest first (GET /events)."""
        if after >= self.seq or limit <= 0:
            return []
        return self.texts_from(after + 1, limit)[0]

    def conn_events(self, conn_id: int, limit: int) -> list[str]:
        """JSON of the held events of one connection (by kernel number), oldest first, at most the newest `limit`."""
        found: list[str] = []
        json_many = self.writer.json_many
        # One scan of the whole buffer (~10 ms per 100,000 events here): a click in the dashboard, not a hot path.
        for c in self.chunks:
            recs, texts = c.recs, c.texts
            for j, r in enumerate(recs):
                if r[CONN_ID] == conn_id:
                    text = texts[j] if texts is not None else None
                    found.append(text if text is not None else json_many(c.first_seq + j, [r])[0])
        return found[-limit:] if limit > 0 else []

    def seqs_held(self) -> Iterator[int]:
        """Every seq the replay buffer holds, oldest first."""
        for c in self.chunks:
            yield from range(c.first_seq, c.first_seq + len(c.recs))
