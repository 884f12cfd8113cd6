"""Pipeline: frames -> decode -> table -> hub, in order, bad records counted; no kernel."""

from __future__ import annotations

from app.bpf.event import CONN_ID, FLAG_SYN, FRAME, TYPE
from app.hub import EventHub
from app.pipeline import Pipeline
from app.table import ConnectionTable
from tests.evfactory import TEXTS, ev, frames, writer


def make() -> Pipeline:
    return Pipeline(ConnectionTable(TEXTS), EventHub(writer(), replay_events=10_000))


def test_batch_goes_to_table_and_hub_in_order() -> None:
    p = make()
    recs = [ev("established", i, i, flags=FLAG_SYN) for i in range(1, 11)]
    p.on_records(frames(*recs), len(recs))
    # Each record stands for its syn event too: 20 events, seq in ring order.
    assert (p.hub.seq, p.table.open_count, p.records, p.decode_errors) == (20, 10, 10, 0)
    recs = [r for c in p.hub.chunks for r in c.recs]
    assert [r[TYPE] for r in recs[:4]] == [1, 3, 1, 3]
    assert [r[CONN_ID] for r in recs][::2] == list(range(1, 11))


def test_bad_records_are_counted_not_fatal() -> None:
    p = make()
    bad = list(ev("close", 2))
    bad[TYPE] = 77   # no such event type
    p.on_records(frames(ev("established", 1), tuple(bad), ev("close", 1)), 3)
    assert (p.hub.seq, p.decode_errors, p.table.open_count, p.table.closed_count) == (2, 1, 0, 1)
    p.on_records(b"\0" * (FRAME.size - 1), 1)   # not even a whole frame: the batch is counted
    assert p.decode_errors == 2
