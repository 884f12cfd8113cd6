"""Per-second history of the service's counters (the last `history_seconds`), so a dashboard reload
does not start from zero.

It samples cumulative counters once a second and keeps the differences: nothing runs per event,
so its cost does not grow with the event rate (one pass over the open connections per second for
their byte counters, the table's only way to say how many bytes moved).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple


class Totals(NamedTuple):
    """Cumulative counters (since start) and gauges, read at one instant."""

    opened: int            # syn_sent + syn_recv events
    closed: int            # close events
    events: int            # every event (the hub's seq)
    bytes_sent: int
    bytes_received: int
    lost: int              # lost in the kernel + dropped to subscribers + undecodable
    open: int              # gauge: open connections
    subscribers: int       # gauge


# Counter fields become per-second differences; the last two are gauges, kept as read.
COUNTERS = ("opened", "closed", "events", "bytes_sent", "bytes_received", "lost")
GAUGES = ("open", "subscribers")
FIELDS = ("t", *COUNTERS, *GAUGES)


class History:
    """A bounded ring of per-second samples: (t, the counters' increase over that second, gauges)."""

    def __init__(self, seconds: int, read: Callable[[], Totals], clock: Callable[[], float] = time.time) -> None:
        self.seconds = seconds
        self.read = read
        self.clock = clock
        self.samples: deque[tuple[int, ...]] = deque(maxlen=seconds)
        self._last: Totals | None = None
        self._last_t = 0

    def sample(self) -> None:
        """Records the second that just ended (labelled with its start, epoch seconds)."""
        now = self.read()
        t = int(self.clock()) - 1
        last, self._last = self._last, now
        if last is None or t <= self._last_t:
            # The first read is the baseline (counts from before are not "this second"); a clock
            # that went back would make a second twice: skip rather than overwrite.
            self._last_t = max(self._last_t, t) if last is not None else t
            return
        self._last_t = t
        # max(0, ...): a counter can only shrink if a connection left the table unclosed (evicted).
        deltas = [max(0, getattr(now, f) - getattr(last, f)) for f in COUNTERS]
        self.samples.append((t, *deltas, now.open, now.subscribers))

    def since(self, after: int, limit_seconds: int) -> dict[str, list[int]]:
        """Samples with t > after, at most the newest `limit_seconds`, as columns named by FIELDS."""
        rows = [s for s in self.samples if s[0] > after][-limit_seconds:] if limit_seconds > 0 else []
        return {name: [r[i] for r in rows] for i, name in enumerate(FIELDS)}

    async def run(self) -> None:
        """Samples just after every whole second of the wall clock until cancelled."""
        self.sample()
        while True:
            now = self.clock()
            # 20 ms past the boundary: the second is over, and a late wake-up still lands in the next one.
            await asyncio.sleep(1.0 - (now % 1.0) + 0.02)
            self.sample()
