"""EventHub: seq, replay, per-subscriber bounded queues, drop and resume semantics; no kernel."""

from __future__ import annotations

import json

from app.filters import Filter
from app.hub import EventHub, Subscriber
from tests.evfactory import ev, writer


def publish(hub: EventHub, n: int, port: int = 80) -> None:
    for i in range(n):
        hub.publish(ev("data_queue", i, i, dst_port=port))


def seqs(msgs: list[str]) -> list[int]:
    return [json.loads(m)["seq"] for m in msgs if "seq" in json.loads(m)]


def controls(msgs: list[str]) -> list[dict[str, object]]:
    return [d for d in map(json.loads, msgs) if d["type"] in ("dropped", "overwritten")]


def test_seq_strictly_increasing_and_serialised_once() -> None:
    hub = EventHub(writer(), replay_events=100)
    subs = [hub.subscribe() for _ in range(3)]
    publish(hub, 5)
    assert list(hub.seqs_held()) == [1, 2, 3, 4, 5]
    texts = [s.take() for s in subs]
    assert texts[0] == texts[1] == texts[2] and seqs(texts[0]) == [1, 2, 3, 4, 5]
    # The very same str objects: one serialisation per event, shared by every subscriber.
    assert all(a is b for a, b in zip(texts[0], texts[1], strict=True))
    assert hub.counts["data_queue"] == 5


def test_slow_subscriber_loses_oldest_and_is_told() -> None:
    hub = EventHub(writer(), replay_events=1000, subscriber_queue_events=10)
    slow, fast = hub.subscribe(), hub.subscribe()
    got_fast: list[str] = []
    for _ in range(5):
        publish(hub, 5)
        got_fast += fast.take()   # the fast one keeps up
    msgs = slow.take()
    assert controls(msgs) == [{"type": "dropped", "count": 15}]
    assert json.loads(msgs[0]) == {"type": "dropped", "count": 15}   # before the events it gets
    assert seqs(msgs) == list(range(16, 26))                          # the newest 10
    assert seqs(got_fast) == list(range(1, 26)) and not controls(got_fast)
    assert (slow.dropped_total, fast.dropped_total, hub.dropped_subscribers) == (15, 0, 15)
    publish(hub, 2)
    assert seqs(slow.take()) == [26, 27]  # no stale dropped notice


def test_filtered_subscriber() -> None:
    hub = EventHub(writer())
    sub = hub.subscribe(Filter(port=443).predicate())
    publish(hub, 3, port=80)
    publish(hub, 2, port=443)
    assert seqs(sub.take()) == [4, 5]


def drain(sub: Subscriber) -> list[str]:
    return sub.take()


def test_resume_no_gap_no_dup() -> None:
    hub = EventHub(writer(), replay_events=100)
    first = hub.subscribe()
    publish(hub, 10)
    got = first.take()[:6]           # client saw up to seq 6, then disconnected
    first.close()
    last = seqs(got)[-1]
    publish(hub, 5)                  # 11..15 while away
    again = hub.subscribe(after=last)
    publish(hub, 3)                  # 16..18 live
    resumed = again.take()
    assert not controls(resumed)
    assert seqs(got) + seqs(resumed) == list(range(1, 19))


def test_resume_filtered_and_after_latest() -> None:
    hub = EventHub(writer(), replay_events=100)
    publish(hub, 4, port=80)
    publish(hub, 2, port=443)
    sub = hub.subscribe(Filter(port=443).predicate(), after=0)
    assert seqs(sub.take()) == [5, 6]
    sub2 = hub.subscribe(after=6)
    assert sub2.take() == []
    publish(hub, 1)
    assert seqs(sub2.take()) == [7]


def test_resume_older_than_replay_says_overwritten() -> None:
    hub = EventHub(writer(), replay_events=10)
    publish(hub, 25)                 # held: 16..25
    sub = hub.subscribe(after=3)     # 4..15 are gone: 12 events
    msgs = sub.take()
    ctl = json.loads(msgs[0])
    assert ctl["type"] == "overwritten" and ctl["count"] == 12 and "message" in ctl
    assert seqs(msgs) == list(range(16, 26))


def test_events_after_oldest_first() -> None:
    hub = EventHub(writer(), replay_events=10)
    publish(hub, 25)
    assert seqs(hub.events_after(0, 3)) == [16, 17, 18]
    assert seqs(hub.events_after(20, 100)) == [21, 22, 23, 24, 25]
    assert hub.events_after(25, 10) == []


def test_unsubscribe_stops_delivery() -> None:
    hub = EventHub(writer())
    sub = hub.subscribe()
    sub.close()
    publish(hub, 3)
    assert sub.take() == [] and hub.subscribers == []


async def test_next_batch_wakes_and_ends_on_close() -> None:
    hub = EventHub(writer())
    sub = hub.subscribe()
    publish(hub, 2)
    assert seqs(await sub.next_batch()) == [1, 2]
    sub.close()
    assert await sub.next_batch() == []


def test_take_in_bounded_batches_keeps_order() -> None:
    hub = EventHub(writer(), replay_events=100, subscriber_queue_events=50)
    publish(hub, 30)
    resumed = hub.subscribe(after=0)          # 30 held events as backlog
    publish(hub, 10)                          # 10 live ones queued behind them
    batches = []
    while batch := resumed.take(max_events=8):
        batches.append(batch)
    assert all(len(b) <= 8 for b in batches)
    assert seqs([m for b in batches for m in b]) == list(range(1, 41))


def test_subscriber_counters() -> None:
    hub = EventHub(writer(), subscriber_queue_events=3)
    a, b = hub.subscribe(label="port=1"), hub.subscribe()
    publish(hub, 2)
    b.take()
    publish(hub, 3)
    b.take()
    assert (a.id, b.id, a.label) == (1, 2, "port=1")
    assert (a.behind, a.dropped_total, b.delivered, b.dropped_total) == (3, 2, 5, 0)
    assert hub.dropped_subscribers == 2


def test_filtered_slow_subscriber_is_told_only_about_its_own_events() -> None:
    hub = EventHub(writer(), replay_events=1000, subscriber_queue_events=10)
    sub = hub.subscribe(Filter(port=443).predicate())
    for i in range(30):
        hub.publish(ev("data_queue", i, i, dst_port=443 if i % 3 == 0 else 80))
    msgs = sub.take()
    # 20 events went by its bound of 10; 7 of those were on port 443 (seq 1, 4, ..., 19).
    assert controls(msgs) == [{"type": "dropped", "count": 7}]
    assert seqs(msgs) == [22, 25, 28]


def test_replay_bound_holds_with_a_subscriber_lagging_behind() -> None:
    hub = EventHub(writer(), replay_events=16, subscriber_queue_events=1000)
    sub = hub.subscribe(after=0)
    publish(hub, 40)
    assert 16 <= hub.held <= 18 and hub.first_seq == 41 - hub.held
    msgs = sub.take()
    assert controls(msgs)[0]["type"] == "dropped" and seqs(msgs) == list(range(41 - 16, 41))
    assert controls(msgs)[0]["count"] + len(seqs(msgs)) == 40


def test_old_chunks_keep_records_not_json_and_still_serve_them() -> None:
    hub = EventHub(writer(), replay_events=100_000)
    for b in range(40):
        hub.publish_many([ev("data_queue", b * 300 + i, i) for i in range(300)])
    kept = [c.texts is not None for c in hub.chunks]
    assert kept.count(True) <= 16 and not kept[0]
    first = hub.events_after(0, 3)            # from the oldest chunk: written again on demand
    assert seqs(first) == [1, 2, 3] and json.loads(first[0])["conn_id"] == "c0"
    live = hub.subscribe(after=11_990)
    assert seqs(live.take())[:2] == [11_991, 11_992]
