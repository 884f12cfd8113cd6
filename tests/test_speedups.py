"""The C helpers (app/_speedups.c) give exactly what their Python references give."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping

import pytest

from app.bpf.event import FLAG_SYN, FRAME, TYPE, EventRecord
from app.decode import Decoder
from app.speedups import speedups
from app.table import ConnectionTable, ConnEntry, ConnEntryPy
from tests.evfactory import TEXTS, ev, frames, writer

if speedups is None:
    if os.environ.get("CONN_TRACER_REQUIRE_BPF") == "1" and os.environ.get("CONN_TRACER_PURE_PYTHON") != "1":
        pytest.fail("app._speedups is not built (setup.sh installs gcc and python3-dev)", pytrace=False)
    pytest.skip("app._speedups is not built here", allow_module_level=True)


def varied(n: int, seed: int = 7) -> list[tuple[object, ...]]:
    rnd = random.Random(seed)
    comms = ["curl", "", 'we"ird\\name\x01', "caf\u00e9", "\U0001f600x", "tab\there", "a" * 15]
    out = []
    for _ in range(n):
        fam = rnd.choice(["ipv4", "ipv6"])
        addrs = ({"src_addr": "10.0.0.1", "dst_addr": "192.168.1.254"} if fam == "ipv4"
                 else {"src_addr": rnd.choice(["fd00::1", "::1", "::ffff:1.2.3.4"]), "dst_addr": "2001:db8::7"})
        out.append(ev(rnd.choice(["established", "data_queue", "close", "state_change"]), rnd.randint(1, 40),
                      rnd.uniform(0, 5000), start_ms=rnd.uniform(-10, 0), family=fam,
                      role=rnd.choice(["client", "server"]),
                      pid=rnd.choice([0, 1, 4_000_000]), comm=rnd.choice(comms), bytes_sent=rnd.randint(0, 2**40),
                      bytes_received=rnd.randint(0, 9), flags=rnd.choice([0, 1, FLAG_SYN, FLAG_SYN | 4]),
                      src_port=rnd.randint(1, 65535), srtt_us=rnd.choice([0, 1, 35, 2**31]),
                      rttvar_us=rnd.choice([0, 7, 2**32 - 1]), retrans_segs=rnd.choice([0, 3]),
                      connect_us=rnd.choice([0, 1, 812]), cgroup_id=rnd.choice([0, 1, 2**63]),
                      close_reason=rnd.randint(0, 5), **addrs))
    return out


def test_decode_matches_python() -> None:
    recs = varied(500)
    bad = list(recs[3])
    bad[TYPE] = 200   # unknown type
    raw = frames(*recs, tuple(bad), *recs[:5])
    c, py = Decoder(), Decoder()
    assert c.decode(raw) == py.decode_py(raw)
    assert c.bad_records == py.bad_records == 1


def test_json_matches_python() -> None:
    recs = Decoder().decode(frames(*varied(800)))
    c, py = writer(), writer()
    # In several calls, so the per-connection cache is exercised across them (and after closes).
    for lo in range(0, len(recs), 97):
        part = recs[lo:lo + 97]
        assert c.json_many(lo + 1, part) == py.json_many_py(lo + 1, part)


def test_json_rejects_what_is_not_a_record() -> None:
    with pytest.raises(TypeError):
        writer().json_many(1, [(1, 2, 3)])
    assert FRAME.size % 8 == 0


def test_json_numbers_at_digit_boundaries() -> None:
    values = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 12345, 2**32 - 1, 2**63, 10**19 - 1, 10**19, 2**64 - 1]
    recs = Decoder().decode(frames(*(ev("established", 1, 1.0, bytes_sent=v) for v in values)))
    texts = writer().json_many(1, recs)
    assert texts == writer().json_many_py(1, recs)
    assert [json.loads(t)["bytes_sent"] for t in texts] == values


def table_state(t: ConnectionTable) -> tuple[object, ...]:
    def entries(d: Mapping[int, ConnEntry]) -> list[tuple[object, ...]]:
        return [(k, c.rec, c.events, c.pid, c.comm, c.close_ns, c.preexisting, c.missing) for k, c in d.items()]

    return (entries(t._open), entries(t._closed), t.evicted_open, t.evicted_closed, t.traffic.closed_bytes(),
            dict(t.traffic.closed))


# The fleet view's records carry its HOST and TEXT after the kernel record's fields.
@pytest.mark.parametrize("tail", [(), ("hostA", '"x":1}')], ids=["agent", "fleet"])
@pytest.mark.parametrize("max_open,max_closed", [(262_144, 10_000), (7, 5), (3, 0)])
def test_table_apply_matches_python(max_open: int, max_closed: int, tail: tuple[str, ...]) -> None:
    """Creates, updates, closes, late events after a close, closes of unknown connections, a start-up
    twin and both bounds, in batches: the C loop leaves the table exactly as the Python one."""
    rnd = random.Random(3)
    recs: list[EventRecord] = []
    for conn in range(1, 60):
        t0 = rnd.uniform(0, 100)
        kinds = rnd.choice([["syn_sent", "established", "close"], ["established", "data_queue"], ["close"],
                            ["syn_recv", "established", "close", "data_queue"]])
        recs += [ev(k, conn, t0 + i, pid=rnd.choice([0, 7]), comm=rnd.choice(["a", "b"]),
                    bytes_sent=i * 10, close_reason=1) + tail for i, k in enumerate(kinds)]
    rnd.shuffle(recs)   # records of different connections interleave, and some arrive out of order
    pre = [ev("established", 1000 + i, -5.0, start_ms=-6.0) for i in range(3)]
    tables = []
    for apply in ("apply_many", "apply_many_py"):
        t = ConnectionTable(TEXTS, max_closed_connections=max_closed, max_open_connections=max_open)
        t.add_preexisting(pre)
        for lo in range(0, len(recs), 13):
            getattr(t, apply)(recs[lo:lo + 13])
        tables.append(table_state(t))
    assert tables[0] == tables[1]
    assert tables[0][0] and (tables[0][1] or max_closed == 0)   # something stayed open and closed


def test_conn_entry_is_the_python_shape() -> None:
    rec = ev("established", 1, 1.0, pid=9, comm="x")
    c, py = ConnEntry(rec), ConnEntryPy(rec)
    for name in ConnEntryPy.__slots__:
        assert getattr(c, name) == getattr(py, name), name
    assert ConnEntry(rec, preexisting=True).events == 0
    c.events += 2
    c.missing += 1
    c.close_ns = 5
    assert (c.events, c.missing, c.close_ns) == (3, 1, 5)
    with pytest.raises(TypeError):
        ConnEntry((1, 2))
