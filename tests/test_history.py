"""History: per-second differences of sampled counters, bounded, queried by time (no kernel needed)."""

from __future__ import annotations

import asyncio

import pytest

from app.history import FIELDS, History, Totals


def totals(opened: int = 0, closed: int = 0, sent: int = 0, open_: int = 0, lost: int = 0) -> Totals:
    return Totals(opened=opened, closed=closed, events=opened + closed, bytes_sent=sent, bytes_received=sent,
                  lost=lost, open=open_, subscribers=1)


class Feed:
    """Hands History one prepared reading per sample, at a clock the test sets."""

    def __init__(self, readings: list[tuple[float, Totals]]) -> None:
        self.readings = readings
        self.i = -1

    def read(self) -> Totals:
        self.i += 1
        return self.readings[self.i][1]

    def clock(self) -> float:
        return self.readings[max(self.i, 0)][0]


@pytest.mark.parametrize("readings, want", [
    # the first reading is only the baseline
    ([(100.02, totals(5, 1, 1000, 4))], []),
    # one second later: differences for counters, gauges as read; labelled with the second's start
    ([(100.02, totals(5, 1, 1000, 4)), (101.02, totals(8, 3, 1500, 5))], [(100, 3, 2, 5, 500, 500, 0, 5, 1)]),
    # a missed second leaves a gap, not a made-up zero
    ([(100.02, totals()), (101.02, totals(1)), (103.03, totals(4))],
     [(100, 1, 0, 1, 0, 0, 0, 0, 1), (102, 3, 0, 3, 0, 0, 0, 0, 1)]),
    # the clock going back never writes a second twice; a shrinking counter counts as 0
    ([(100.02, totals(sent=900)), (101.02, totals(sent=1000)), (100.5, totals(sent=1200)),
      (102.02, totals(sent=800))],
     [(100, 0, 0, 0, 100, 100, 0, 0, 1), (101, 0, 0, 0, 0, 0, 0, 0, 1)]),
])
def test_samples(readings: list[tuple[float, Totals]], want: list[tuple[int, ...]]) -> None:
    feed = Feed(readings)
    h = History(60, feed.read, feed.clock)
    for _ in readings:
        h.sample()
    assert list(h.samples) == want


def test_bounded_and_queried_by_time() -> None:
    n = [0]

    def read() -> Totals:
        n[0] += 1
        return totals(opened=n[0] * 2, open_=n[0])

    clock = [1000.02]
    h = History(60, read, lambda: clock[0])
    for _ in range(100):
        h.sample()
        clock[0] += 1
    assert len(h.samples) == 60 and h.samples[0][0] == 1039 and h.samples[-1][0] == 1098
    cols = h.since(1090, 5)
    assert list(cols) == list(FIELDS)
    assert cols["t"] == [1094, 1095, 1096, 1097, 1098] and cols["opened"] == [2] * 5
    assert h.since(1098, 10)["t"] == [] and h.since(0, 0)["t"] == []


async def test_run_samples_after_each_second_until_cancelled() -> None:
    h = History(60, lambda: totals())
    task = asyncio.create_task(h.run())
    try:
        deadline = asyncio.get_running_loop().time() + 3.5
        while not h.samples and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert h.samples, "no sample within 3.5 s"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
