"""EventHub: sequence numbers, the bounded replay buffer, bounded per-subscriber queues.

Single-threaded asyncio is the concurrency rule: publish() runs synchronously in the
ring-buffer reader callback and never awaits, so subscribe() can snapshot the replay
buffer and register in one step with no event slipping between the two.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter, deque
from operator import itemgetter

from app.bpf.event import EVENT_TYPE_NAMES, TYPE, EventRecord
from app.filters import Predicate
from app.models import EventWriter


class HubItem:
    """One published event: its seq and record; its JSON is made once, when first needed."""

    __slots__ = ("seq", "rec", "text")

    def __init__(self, seq: int, rec: EventRecord) -> None:
        self.seq = seq
        self.rec = rec
        self.text: str | None = None


class Subscriber:
    """A bounded queue of items for one consumer; overflow drops the oldest undelivered."""

    def __init__(self, hub: EventHub, pred: Predicate | None, maxlen: int, backlog: list[HubItem],
                 overwritten: int, label: str = "") -> None:
        self.hub = hub
        self.id = hub.next_subscriber_id
        self.label = label
        self.pred = pred
        self.maxlen = maxlen
        self.queue: deque[HubItem] = deque(maxlen=maxlen)
        # Replay items (resume) are sent before the live queue; they are already held by
        # the replay buffer, so keeping them apart costs no extra bound.
        self.backlog = backlog
        self.overwritten = overwritten
        self.dropped_pending = 0
        self.dropped_total = 0
        self.delivered = 0
        self.closed = False
        self.close_code: int | None = None  # set when the service asks it to go away
        self._wake = asyncio.Event()
        if backlog or overwritten:
            self._wake.set()

    def offer(self, items: list[HubItem]) -> None:
        """Called by publish_many() with this subscriber's share of a batch; never blocks."""
        q = self.queue
        over = len(q) + len(items) - self.maxlen
        if over > 0:
            # deque(maxlen) discards the oldest on extend; count them.
            self.dropped_pending += over
            self.dropped_total += over
            self.hub.dropped_subscribers += over
        q.extend(items)
        self._wake.set()

    def take(self, max_events: int = 1024) -> list[str]:
        """What is deliverable now (at most `max_events` events), as JSON texts, control messages first."""
        out: list[str] = []
        if self.overwritten:
            n, self.overwritten = self.overwritten, 0
            out.append(json.dumps({"type": "overwritten", "count": n,
                                   "message": f"{n} events after the requested seq are no longer "
                                              "in the replay buffer"}))
        if self.backlog:
            chunk, self.backlog = self.backlog[:max_events], self.backlog[max_events:]
            out.extend(self.hub.texts(chunk))
            if self.backlog:
                return out  # the wake flag stays set: more to come
        if self.dropped_pending:
            # The dropped ones were older than everything still queued: say so before those.
            out.append(json.dumps({"type": "dropped", "count": self.dropped_pending}))
            self.dropped_pending = 0
        q = self.queue
        n = min(len(q), max(0, max_events - len(out)))
        pop = q.popleft
        out.extend(self.hub.texts([pop() for _ in range(n)]))
        if not q:
            self._wake.clear()
        self.delivered += len(out)
        return out

    async def next_batch(self) -> list[str]:
        """Waits until something is deliverable, then takes it; [] once closed."""
        # Yield once per batch even when more is ready, so the ring-buffer reader and HTTP handlers
        # interleave with a fast subscriber instead of waiting for its whole backlog.
        await asyncio.sleep(0)
        while not self.closed:
            await self._wake.wait()
            batch = self.take()
            if batch:
                return batch
        return []

    def close(self) -> None:
        self.hub.unsubscribe(self)


class EventHub:
    """Assigns seq (the one place it is assigned), keeps the last `replay_events`, fans out to subscribers."""

    def __init__(self, writer: EventWriter, replay_events: int = 100_000,
                 subscriber_queue_events: int = 10_000) -> None:
        self.writer = writer
        self.replay: deque[HubItem] = deque(maxlen=replay_events)
        self.queue_events = subscriber_queue_events
        self.seq = 0
        self._counts: dict[int, int] = dict.fromkeys(EVENT_TYPE_NAMES, 0)
        self.dropped_subscribers = 0
        self.subscribers: list[Subscriber] = []
        self.next_subscriber_id = 0

    @property
    def counts(self) -> dict[str, int]:
        """Events published, per event type name."""
        return {name: self._counts.get(n, 0) for n, name in EVENT_TYPE_NAMES.items()}

    def publish_many(self, recs: list[EventRecord]) -> None:
        """Numbers and fans out a batch of events, in order; synchronous, never blocks."""
        first = self.seq + 1
        self.seq += len(recs)
        items = list(map(HubItem, range(first, self.seq + 1), recs))
        self.replay.extend(items)
        counts = self._counts
        for t, n in Counter(map(itemgetter(TYPE), recs)).items():
            counts[t] = counts.get(t, 0) + n
        for s in self.subscribers:
            pred = s.pred
            mine = items if pred is None else [i for i in items if pred(i.rec)]
            if mine:
                s.offer(mine)

    def publish(self, rec: EventRecord) -> HubItem:
        """One event; returns its item."""
        self.publish_many([rec])
        return self.replay[-1]

    def texts(self, items: list[HubItem]) -> list[str]:
        """The JSON of each item, made now (in one call) for those that were not made before."""
        todo = [i for i in items if i.text is None]
        if todo:
            # Consecutive seqs are the common case (an unfiltered subscriber): one run per call.
            start = 0
            for k in range(1, len(todo) + 1):
                if k == len(todo) or todo[k].seq != todo[k - 1].seq + 1:
                    run = todo[start:k]
                    for item, text in zip(run, self.writer.json_many(run[0].seq, [i.rec for i in run]), strict=True):
                        item.text = text
                    start = k
        return [i.text for i in items]  # type: ignore[misc]

    @property
    def first_seq(self) -> int:
        """Seq of the oldest event still held (seq + 1 if none)."""
        return self.replay[0].seq if self.replay else self.seq + 1

    def since(self, after: int) -> tuple[list[HubItem], int]:
        """Items with seq > after still held, and how many after `after` were overwritten."""
        first = self.first_seq
        overwritten = max(0, first - 1 - after)
        if after >= self.seq:
            return [], 0
        # The replay buffer holds consecutive seqs, so the start index is arithmetic.
        start = max(0, after + 1 - first)
        return list(itertools.islice(self.replay, start, None)), overwritten

    def subscribe(self, pred: Predicate | None = None, after: int | None = None, label: str = "") -> Subscriber:
        """Registers a subscriber; with `after`, held events after it come first (no gap, no dup)."""
        backlog: list[HubItem] = []
        overwritten = 0
        if after is not None:
            items, overwritten = self.since(after)
            backlog = [i for i in items if pred(i.rec)] if pred is not None else items
        # Same synchronous step as the snapshot: nothing can be published in between.
        self.next_subscriber_id += 1
        sub = Subscriber(self, pred, self.queue_events, backlog, overwritten, label)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        sub._wake.set()
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def events_after(self, after: int, limit: int) -> list[HubItem]:
        """Oldest first, for GET /events."""
        if after >= self.seq or limit <= 0:
            return []
        start = max(0, after + 1 - self.first_seq)
        return list(itertools.islice(self.replay, start, start + limit))
