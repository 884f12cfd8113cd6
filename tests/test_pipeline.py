"""Pipeline: records -> table -> hub, in chunks that yield to the loop, bounded backlog; no kernel."""

from __future__ import annotations

import asyncio
import socket

from app.decode import RECORD, Decoder
from app.hub import EventHub
from app.pipeline import Pipeline
from app.table import ConnectionTable


def record(conn: int, type_: int = 3, state: int = 1) -> bytes:
    a = socket.inet_aton("127.0.0.1") + bytes(12)
    f: dict[str, object] = dict(
        ts_ns=conn, conn_id=conn, start_ns=conn, bytes_sent=0, bytes_received=0, bytes_retrans=0, pid=1,
        netns=1, saddr=a, daddr=a, sport=1000, dport=80, family=4, type=type_, role=0, state=state,
        oldstate=0, flags=0, comm=b"x",
    )
    return RECORD.pack(*f.values())


def make(**kw: int) -> Pipeline:
    return Pipeline(ConnectionTable(), EventHub(replay_events=10_000), Decoder(0), **kw)


def test_outside_a_loop_processes_everything_and_counts_bad_records() -> None:
    p = make(chunk_records=4)
    p.on_records([record(i) for i in range(10)] + [b"junk"])
    assert (p.hub.seq, p.decode_errors, p.backlog, p.table.open_count) == (10, 1, 0, 10)


async def test_chunks_yield_to_the_loop_and_keep_order() -> None:
    p = make(chunk_records=100)
    p.on_records([record(i) for i in range(250)])
    assert p.hub.seq == 100 and p.backlog == 150       # first chunk at once, the rest later
    p.on_records([record(i) for i in range(250, 300)])  # arrives meanwhile: queued behind
    for _ in range(10):
        await asyncio.sleep(0)
    assert p.hub.seq == 300 and p.backlog == 0
    assert [int(i.json.split('"conn_id":"c')[1].split('"')[0]) for i in p.hub.replay] == list(range(300))


async def test_backlog_is_bounded() -> None:
    p = make(chunk_records=10, max_backlog_records=50)
    p.on_records([record(i) for i in range(45)])        # 10 done, 35 waiting
    p.on_records([record(i) for i in range(45, 65)])    # would exceed 50 waiting: shed
    assert p.backlog_dropped == 20
    p.flush()
    assert (p.hub.seq, p.backlog) == (45, 0)
