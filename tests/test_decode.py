"""decode.py and the public text of records (models.py), on recorded-shape frames: pure, no kernel."""

from __future__ import annotations

import json
import socket

import pytest

from app.bpf.event import FAMILY, FLAG_SYN, FRAME, ROLE, STATE, TYPE
from app.decode import DecodeError, Decoder
from app.models import Event
from tests.evfactory import T0, T0_NS, TEXTS, ev, frames, writer


def decode_one(**kw: object) -> list[Event]:
    w = writer()
    return [w.event(i, r) for i, r in enumerate(Decoder().decode(frames(ev(**kw))), 1)]  # type: ignore[arg-type]


@pytest.mark.parametrize("name,kw,want", [
    ("ipv4 established", dict(type_="established", conn=7),
     dict(type="established", family="ipv4", src_addr="10.0.0.1", src_port=40007, dst_addr="10.0.0.2",
          dst_port=80, role="client", state="ESTABLISHED", pid=100, comm="cli", conn_id="c7")),
    ("ipv6 server", dict(type_="data_queue", conn=8, family="ipv6", role="server", src_addr="fd00::1",
                         dst_addr="::ffff:1.2.3.4", bytes_received=9),
     dict(family="ipv6", role="server", type="data_queue", src_addr="fd00::1", dst_addr="::ffff:1.2.3.4",
          bytes_received=9)),
    ("unknown owner", dict(type_="close", conn=9, pid=0, comm="swapper/1"), dict(pid=None, comm=None)),
])
def test_decode(name: str, kw: dict[str, object], want: dict[str, object]) -> None:
    (got,) = decode_one(**kw)
    d = got.model_dump()
    for k, v in want.items():
        assert d[k] == v, (name, k)


def test_a_syn_flagged_record_is_two_events() -> None:
    # The kernel folds the syn event into the first record with the real tuple.
    rec = ev("established", 3, 5.0, start_ms=2.0, flags=FLAG_SYN | 2, bytes_sent=0)
    w = writer()
    syn, est = (w.event(i, r) for i, r in enumerate(Decoder().decode(frames(rec)), 1))
    assert (syn.type, syn.state, syn.seq, est.type, est.seq) == ("syn_sent", "SYN_SENT", 1, "established", 2)
    assert syn.ts_ns == est.ts_ns - 3_000_000 and (syn.src_port, syn.pid) == (est.src_port, est.pid)
    server = ev("close", 4, 5.0, role="server", flags=FLAG_SYN)
    assert [r[TYPE] for r in Decoder().decode(frames(server))] == [2, 5]   # syn_recv, close


def test_timestamp_is_kernel_time_plus_offset() -> None:
    (e,) = decode_one(type_="close", conn=1, t_ms=2500.0)
    assert e.ts.timestamp() == pytest.approx(T0.timestamp() + 2.5)
    assert e.model_dump_json().count('"ts":"2026-11-25T12:00:02.5') == 1


@pytest.mark.parametrize("field,value", [("type", 99), ("state", 99), ("role", 5), ("family", 9)])
def test_bad_records_are_counted_and_skipped(field: str, value: int) -> None:
    good = ev("close", 1)
    bad = list(good)
    bad[{"type": TYPE, "state": STATE, "role": ROLE, "family": FAMILY}[field]] = value
    d = Decoder()
    assert d.decode(frames(good, tuple(bad), good)) == [good, good]
    assert d.bad_records == 1


def test_frames_of_a_wrong_length_raise() -> None:
    with pytest.raises(DecodeError):
        Decoder().decode(b"\0" * (FRAME.size + 3))


@pytest.mark.parametrize("kw", [
    {},
    dict(pid=0),
    dict(comm='we"ird\\name\x01'),
    dict(comm="caf\u00e9"),
    dict(t_ms=-T0_NS / 1e6),   # ts_ns 0
    dict(family="ipv6", src_addr="fd00::1", dst_addr="::"),
])
def test_event_json_is_the_models_json(kw: dict[str, object]) -> None:
    rec = ev("data_queue", 12, **kw)  # type: ignore[arg-type]
    w = writer()
    assert json.loads(w.json_many(12, [rec])[0]) == json.loads(w.event(12, rec).model_dump_json())


def test_steady_part_follows_the_owner() -> None:
    # The fields that do not change are cached per connection, but not past a change of owner.
    w = writer()
    first = json.loads(w.json_many(1, [ev("established", 5, pid=0)])[0])
    later = json.loads(w.json_many(2, [ev("data_queue", 5, pid=77, comm="worker")])[0])
    assert (first["pid"], later["pid"], later["comm"]) == (None, 77, "worker")


def test_ipv4_address_text_from_16_bytes() -> None:
    raw = socket.inet_pton(socket.AF_INET, "1.2.3.4").ljust(16, b"\0")
    assert TEXTS.addr(raw, 4) == "1.2.3.4"
