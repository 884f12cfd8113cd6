"""Traffic totals for Prometheus, per closed connection: low-cardinality (role, close reason), bounded.

Fed once per close by the table (never per event); read at scrape time. Connect latency and RTT are
histograms of each closed connection's final connect_us and srtt_us.
"""

from __future__ import annotations

from bisect import bisect_left

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

    def observe_us(self, us: int) -> None:
        self.counts[bisect_left(_BUCKETS_US, us)] += 1
        self.sum_us += us

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, n in zip((*(repr(b) for b in LATENCY_BUCKETS_S), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class TrafficTotals:
    """Closed connections by role and close reason, their bytes and retransmissions, latency histograms."""

    def __init__(self) -> None:
        self.closed: dict[tuple[str, str], int] = {}
        self.bytes_sent = dict.fromkeys(ROLE_NAMES, 0)
        self.bytes_received = dict.fromkeys(ROLE_NAMES, 0)
        self.bytes_retrans = dict.fromkeys(ROLE_NAMES, 0)
        self.retrans_segs = dict.fromkeys(ROLE_NAMES, 0)
        self.connect = {r: Histogram() for r in ROLE_NAMES}
        self.rtt = {r: Histogram() for r in ROLE_NAMES}

    def on_close(self, rec: EventRecord) -> None:
        role = ROLE_NAMES[rec[ROLE]]
        key = (role, CLOSE_REASON_NAMES.get(rec[CLOSE_REASON], "unknown"))
        self.closed[key] = self.closed.get(key, 0) + 1
        self.bytes_sent[role] += rec[BYTES_SENT]
        self.bytes_received[role] += rec[BYTES_RECEIVED]
        self.bytes_retrans[role] += rec[BYTES_RETRANS]
        self.retrans_segs[role] += rec[RETRANS_SEGS]
        if rec[CONNECT_US]:
            self.connect[role].observe_us(rec[CONNECT_US])
        if rec[SRTT_US]:
            self.rtt[role].observe_us(rec[SRTT_US])
