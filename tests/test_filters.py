"""Filter predicates and WebSocket query parsing, table-driven."""

from __future__ import annotations

import pytest

from app.filters import Filter, FilterError, parse_filter
from tests.evfactory import ev

E4 = ev("established", 1, src_port=40001, dst_port=80, pid=7, family="ipv4", role="client")
E6 = ev("data_queue", 2, src_port=443, dst_port=50000, pid=None, comm=None, family="ipv6", role="server",
        src_addr="fd00::1", dst_addr="fd00::2")


@pytest.mark.parametrize(("name", "filt", "want4", "want6"), [
    ("no filter", Filter(), True, True),
    ("src port", Filter(port=40001), True, False),
    ("dst port", Filter(port=80), True, False),
    ("port either end", Filter(port=50000), False, True),
    ("pid", Filter(pid=7), True, False),
    ("pid never matches unknown", Filter(pid=8), False, False),
    ("family", Filter(family="ipv6"), False, True),
    ("role", Filter(role="client"), True, False),
    ("types", Filter(types=frozenset({"data_queue", "close"})), False, True),
    ("combined all match", Filter(port=80, pid=7, family="ipv4", role="client"), True, False),
    ("combined one fails", Filter(port=80, pid=7, family="ipv6"), False, False),
])
def test_predicate(name: str, filt: Filter, want4: bool, want6: bool) -> None:
    pred = filt.predicate()
    got = [pred is None or pred(e) for e in (E4, E6)]
    assert got == [want4, want6], name


def test_no_filter_is_none() -> None:
    assert Filter().predicate() is None


@pytest.mark.parametrize(("params", "want", "after"), [
    ({}, Filter(), None),
    ({"port": "443"}, Filter(port=443), None),
    ({"pid": "12", "family": "ipv6", "role": "server"}, Filter(pid=12, family="ipv6", role="server"), None),
    ({"type": "close, syn_sent"}, Filter(types=frozenset({"close", "syn_sent"})), None),
    ({"after": "0"}, Filter(), 0),
    ({"after": "41", "port": "1"}, Filter(port=1), 41),
    ({"family": "4"}, Filter(family="ipv4"), None),   # the CLI spelling too
    ({"family": "6"}, Filter(family="ipv6"), None),
])
def test_parse_ok(params: dict[str, str], want: Filter, after: int | None) -> None:
    assert parse_filter(params) == (want, after)


@pytest.mark.parametrize(("params", "param"), [
    ({"port": "abc"}, "port"),
    ({"port": "70000"}, "port"),
    ({"port": "0"}, "port"),
    ({"pid": "-3"}, "pid"),
    ({"family": "ipv5"}, "family"),
    ({"role": "x"}, "role"),
    ({"type": "close,bogus"}, "type"),
    ({"type": ","}, "type"),
    ({"after": "-1"}, "after"),
    ({"after": "x"}, "after"),
    ({"colour": "red"}, "colour"),
])
def test_parse_bad_names_param(params: dict[str, str], param: str) -> None:
    with pytest.raises(FilterError) as ei:
        parse_filter(params)
    assert ei.value.param == param
    assert param in str(ei.value)
