"""Traffic totals for Prometheus, per closed connection: low-cardinality (role, close reason), bounded.

Fed the closes of each batch by the table (never per event); counted every _FOLD_AT closes and when read.
Connect latency and RTT are histograms of each closed connection's final connect_us and srtt_us.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from functools import partial
from operator import itemgetter, mul

from app.bpf.event import (
    BYTES_RECEIVED,
    BYTES_RETRANS,
    BYTES_SENT,
    CLOSE_REASON,
    CLOSE_REASON_NAMES,
    CONNECT_US,
    RETRANS_SEGS,
    ROLE,
    ROLE_NAMES,
    SRTT_US,
    EventRecord,
)
from app.speedups import speedups

# Seconds: 25 us (loopback) to 5 s (a SYN retried on a lossy path).
LATENCY_BUCKETS_S = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5, 5.0)
_BUCKETS_US = tuple(b * 1e6 for b in LATENCY_BUCKETS_S)


class Histogram:
    """Counts per bucket (the last is +Inf) and the sum, in seconds when exposed."""

    __slots__ = ("counts", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS_US) + 1)
        self.sum_us = 0

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


# bisect_left over (0, bucket bounds...): 0 for "no value" (connect_us or srtt_us not known), else 1 + bucket.
_BOUNDS_WITH_ZERO = (0, *_BUCKETS_US)
_bucket = partial(bisect_left, _BOUNDS_WITH_ZERO)
_role_reason = itemgetter(ROLE, CLOSE_REASON)
_FOLD_AT = 1024   # closes waiting to be counted, at most


class TrafficTotals:
    """Closed connections by role and close reason, their bytes and retransmissions, latency histograms.

    on_closes() only keeps the records (the table calls it once per batch, on the hot path); the totals are
    made a batch at a time with C-level map/sum/Counter instead of per-close Python code.
    """

    def __init__(self) -> None:
        self._pending: list[EventRecord] = []
        self.closed: dict[tuple[str, str], int] = {}
        self.bytes_sent = dict.fromkeys(ROLE_NAMES, 0)
        self.bytes_received = dict.fromkeys(ROLE_NAMES, 0)
        self.bytes_retrans = dict.fromkeys(ROLE_NAMES, 0)
        self.retrans_segs = dict.fromkeys(ROLE_NAMES, 0)
        self.connect = {r: Histogram() for r in ROLE_NAMES}
        self.rtt = {r: Histogram() for r in ROLE_NAMES}

    def on_closes(self, recs: list[EventRecord]) -> None:
        """The final records of connections that closed (the table calls it once per batch)."""
        self._pending += recs
        if len(self._pending) >= _FOLD_AT:
            self.fold()

    def closed_bytes(self) -> tuple[int, int]:
        """Payload bytes sent and received over every connection closed so far."""
        self.fold()
        return sum(self.bytes_sent.values()), sum(self.bytes_received.values())

    def fold(self) -> None:
        """Counts the closes kept since the last fold (in C where app._speedups is built)."""
        recs, self._pending = self._pending, []
        if not recs:
            return
        if speedups is not None:
            self._add_flat(speedups.traffic_fold(recs, _BUCKETS_US))
        else:
            self.fold_py(recs)

    def _add_flat(self, flat: list[int]) -> None:
        """Adds traffic_fold()'s flat list (its layout is described in app/_speedups.c)."""
        it = iter(flat)
        for role in ROLE_NAMES:
            for reason in range(6):
                n = next(it)
                if n:
                    key = (role, CLOSE_REASON_NAMES.get(reason, "unknown"))
                    self.closed[key] = self.closed.get(key, 0) + n
        for totals in (self.bytes_sent, self.bytes_received, self.bytes_retrans, self.retrans_segs):
            for role in ROLE_NAMES:
                totals[role] += next(it)
        for hists in (self.connect, self.rtt):
            for role in ROLE_NAMES:
                h = hists[role]
                for b in range(len(h.counts)):
                    h.counts[b] += next(it)
                h.sum_us += next(it)

    def fold_py(self, recs: list[EventRecord]) -> None:
        """fold() in Python: the reference for the C helper."""
        for (role, reason), n in Counter(map(_role_reason, recs)).items():
            key = (ROLE_NAMES[role], CLOSE_REASON_NAMES.get(reason, "unknown"))
            self.closed[key] = self.closed.get(key, 0) + n
        roles = list(map(itemgetter(ROLE), recs))   # 0 client, 1 server
        client, server = ROLE_NAMES
        for field, totals in ((BYTES_SENT, self.bytes_sent), (BYTES_RECEIVED, self.bytes_received),
                              (BYTES_RETRANS, self.bytes_retrans), (RETRANS_SEGS, self.retrans_segs)):
            values = list(map(itemgetter(field), recs))
            on_servers = sum(map(mul, values, roles))
            totals[server] += on_servers
            totals[client] += sum(values) - on_servers
        for field, hists in ((CONNECT_US, self.connect), (SRTT_US, self.rtt)):
            values = list(map(itemgetter(field), recs))
            for (role, b), n in Counter(zip(roles, map(_bucket, values), strict=True)).items():
                if b:
                    hists[ROLE_NAMES[role]].counts[b - 1] += n
            on_servers = sum(map(mul, values, roles))
            hists[server].sum_us += on_servers
            hists[client].sum_us += sum(values) - on_servers
