"""TrafficTotals: the batched fold counts exactly what a per-close loop would."""

from __future__ import annotations

import os
import random
from bisect import bisect_left

import pytest

from app.bpf.event import CLOSE_REASON_NAMES, ROLE_NAMES, make_record
from app.speedups import speedups
from app.traffic import LATENCY_BUCKETS_S, TrafficTotals


def test_fold_equals_a_plain_count() -> None:
    rnd = random.Random(3)
    recs = [make_record(role=rnd.randint(0, 1), close_reason=rnd.randint(0, 5), bytes_sent=rnd.randint(0, 10**9),
                        bytes_received=rnd.randint(0, 10**6), bytes_retrans=rnd.randint(0, 99),
                        retrans_segs=rnd.randint(0, 3), connect_us=rnd.choice([0, 1, 25, 26, 999, 9 * 10**6]),
                        srtt_us=rnd.choice([0, 10, 100, 250, 100_000])) for _ in range(5000)]
    t = TrafficTotals()
    t.on_closes(recs[:1235])
    t.fold()   # folding in pieces changes nothing
    for r in recs[1235:]:
        t.on_closes([r])
    t.fold()
    bounds = [b * 1e6 for b in LATENCY_BUCKETS_S]
    for role_n, role in enumerate(ROLE_NAMES):
        mine = [r for r in recs if _role(r) == role_n]
        assert t.bytes_sent[role] == sum(_f(r, "bytes_sent") for r in mine)
        assert t.bytes_received[role] == sum(_f(r, "bytes_received") for r in mine)
        assert t.retrans_segs[role] == sum(_f(r, "retrans_segs") for r in mine)
        for reason_n, reason in CLOSE_REASON_NAMES.items():
            # A close record without a reason (0) counts as unknown too.
            numbers = (reason_n, 0) if reason == "unknown" else (reason_n,)
            assert t.closed.get((role, reason), 0) == sum(1 for r in mine if _f(r, "close_reason") in numbers)
        for field, hist in (("connect_us", t.connect[role]), ("srtt_us", t.rtt[role])):
            vals = [_f(r, field) for r in mine if _f(r, field)]
            want = [0] * (len(bounds) + 1)
            for v in vals:
                want[bisect_left(bounds, v)] += 1
            assert hist.counts == want and hist.sum_us == sum(vals)
    assert sum(t.closed.values()) == len(recs)


def _f(rec: tuple[object, ...], name: str) -> int:
    from app.bpf.event import RECORD_FIELDS
    v = rec[RECORD_FIELDS.index(name)]
    assert isinstance(v, int)
    return v


def _role(rec: tuple[object, ...]) -> int:
    return _f(rec, "role")


def test_the_c_fold_equals_the_python_one() -> None:
    if speedups is None:
        if os.environ.get("CONN_TRACER_REQUIRE_BPF") == "1" and os.environ.get("CONN_TRACER_PURE_PYTHON") != "1":
            pytest.fail("app._speedups is not built", pytrace=False)
        pytest.skip("app._speedups is not built here")
    rnd = random.Random(5)
    recs = [make_record(role=rnd.randint(0, 1), close_reason=rnd.randint(0, 7), bytes_sent=rnd.randint(0, 2**40),
                        connect_us=rnd.choice([0, 1, 25, 26, 10**7]), srtt_us=rnd.randint(0, 10**6))
            for _ in range(3000)]
    c, py = TrafficTotals(), TrafficTotals()
    c._pending = list(recs)
    c.fold()
    py.fold_py(list(recs))
    assert vars_of(c) == vars_of(py)


def vars_of(t: TrafficTotals) -> object:
    return (t.closed, t.bytes_sent, t.bytes_received, t.bytes_retrans, t.retrans_segs,
            {r: (h.counts, h.sum_us) for r, h in t.connect.items()},
            {r: (h.counts, h.sum_us) for r, h in t.rtt.items()})
