"""The C helpers (app/_speedups.c) give exactly what their Python references give."""

from __future__ import annotations

import os
import random

import pytest

from app.bpf.event import FLAG_SYN, FRAME, TYPE
from app.decode import Decoder
from app.speedups import speedups
from tests.evfactory import ev, frames, writer

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
