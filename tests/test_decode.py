"""decode.py on recorded-shape raw records: pure, no kernel."""

from __future__ import annotations

import json
import socket

import pytest

from app.decode import RECORD, DecodeError, Decoder
from app.models import Event, event_json


def record(**over: object) -> bytes:
    f: dict[str, object] = dict(
        ts_ns=5_000_000_000, conn_id=7, start_ns=4_000_000_000, bytes_sent=10, bytes_received=20, bytes_retrans=0,
        pid=42, netns=4026531840, saddr=socket.inet_pton(socket.AF_INET, "10.0.0.1"),
        daddr=socket.inet_pton(socket.AF_INET, "10.0.0.2"), sport=5555, dport=80, family=4, type=3,
        role=0, state=1, oldstate=2, flags=0, comm=b"curl",
    )
    f.update(over)
    return RECORD.pack(*f.values())


@pytest.mark.parametrize("name,over,want", [
    ("ipv4 established", {}, dict(type="established", family="ipv4", src_addr="10.0.0.1", src_port=5555,
                                  dst_addr="10.0.0.2", dst_port=80, role="client", state="ESTABLISHED",
                                  pid=42, comm="curl", bytes_sent=10, bytes_received=20, conn_id="c7")),
    ("ipv6 server", dict(family=6, role=1, type=2, state=3,
                         saddr=socket.inet_pton(socket.AF_INET6, "fd00::1"),
                         daddr=socket.inet_pton(socket.AF_INET6, "::ffff:1.2.3.4")),
     dict(family="ipv6", role="server", type="syn_recv", state="SYN_RECV", src_addr="fd00::1",
          dst_addr="::ffff:1.2.3.4")),
    ("FIN received is not payload", dict(flags=1, bytes_received=1235, type=5, state=7),
     dict(bytes_received=1234, type="close", state="CLOSE")),
    ("FIN alone", dict(flags=1, bytes_received=1), dict(bytes_received=0)),
    ("FIN flag without bytes never goes negative", dict(flags=1, bytes_received=0), dict(bytes_received=0)),
    ("retransmitted bytes are not payload twice", dict(bytes_sent=100040, bytes_retrans=40),
     dict(bytes_sent=100000, bytes_retrans=40)),
    ("unknown owner", dict(pid=0, comm=b"swapper/1"), dict(pid=None, comm=None)),
    ("data queue", dict(type=4), dict(type="data_queue")),
])
def test_decode(name: str, over: dict[str, object], want: dict[str, object]) -> None:
    ev = Decoder(wall_offset_ns=1_700_000_000_000_000_000).decode(record(**over))
    got = ev.model_dump()
    for k, v in want.items():
        assert got[k] == v, (name, k)


def test_timestamp_is_kernel_time_plus_offset() -> None:
    ev = Decoder(wall_offset_ns=1_700_000_000_000_000_000).decode(record(ts_ns=2_500_000_000))
    assert ev.ts_ns == 2_500_000_000
    assert ev.ts.timestamp() == pytest.approx(1_700_000_002.5)
    assert ev.model_dump_json().count('"ts":"2023-11-14T22:13:22.5') == 1


@pytest.mark.parametrize("raw,msg", [
    (b"\0" * 10, "record of 10 bytes"),
    (record(type=99), "unknown type"),
    (record(state=99), "unknown type/role/state"),
    (record(role=5), "unknown type/role/state"),
    (record(family=9), "unknown family"),
])
def test_bad_records_raise_decode_error(raw: bytes, msg: str) -> None:
    with pytest.raises(DecodeError, match=msg):
        Decoder(0).decode(raw)


def test_decoded_event_is_a_valid_event() -> None:
    # The decoder skips validation for speed; what it builds must still validate.
    ev = Decoder(0).decode(record(flags=1, type=5, state=7))
    assert Event.model_validate(ev.model_dump()).model_dump() == ev.model_dump()
    ev.seq = 9
    assert Event.model_validate_json(ev.model_dump_json()).seq == 9


@pytest.mark.parametrize("over", [
    {},
    dict(pid=0),
    dict(comm=b'we"ird\\name\x01'),
    dict(comm="caf\u00e9".encode()),
    dict(ts_ns=0),
    dict(family=6, saddr=socket.inet_pton(socket.AF_INET6, "fd00::1"), daddr=bytes(16)),
])
def test_event_json_is_the_models_json(over: dict[str, object]) -> None:
    ev = Decoder(wall_offset_ns=1_700_000_000_000_000_000).decode(record(**over))
    ev.__dict__["seq"] = 12
    assert json.loads(event_json(ev)) == json.loads(ev.model_dump_json())


def test_event_json_of_a_constructed_event() -> None:
    # Events not made by the decoder have no precomputed tail: event_json builds it.
    ev = Event.model_validate_json(Decoder(10**18).decode(record(pid=0)).model_dump_json())
    ev.seq = 3
    assert json.loads(event_json(ev)) == json.loads(ev.model_dump_json())
