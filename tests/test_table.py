"""ConnectionTable: applying events, bounded history, queries; no kernel."""

from __future__ import annotations

import socket
import time

import pytest

from app import sockdiag
from app.bpf.event import STATE, TCP_STATE_NUMBERS, TS_NS
from app.filters import Filter
from app.table import ConnectionTable, conn_key, replaced
from tests.evfactory import T0_NS, TEXTS, ev


def lifecycle(table: ConnectionTable, conn: int, t0: float, **kw: object) -> None:
    for i, t in enumerate(("syn_sent", "established", "data_queue", "close")):
        table.apply(ev(t, conn, t0 + i, start_ms=t0, **kw))  # type: ignore[arg-type]


def test_create_update_close() -> None:
    t = ConnectionTable(TEXTS)
    t.apply(ev("syn_recv", 1, 0, role="server", pid=None, comm=None))
    t.apply(ev("established", 1, 1, role="server", pid=None, comm=None))
    t.apply(ev("data_queue", 1, 2, role="server", pid=42, comm="srv", bytes_received=10))
    # pid once known stays: a later event without one must not erase it.
    t.apply(ev("data_queue", 1, 3, role="server", pid=None, comm=None, bytes_received=15, bytes_sent=3))
    c = t.get("c1")
    assert c is not None
    assert (c.state, c.pid, c.comm, c.bytes_received, c.bytes_sent, c.events) == ("ESTABLISHED", 42, "srv", 15, 3, 4)
    assert c.closed_at is None and t.open_count == 1
    t.apply(ev("close", 1, 250.5, role="server", pid=None, comm=None, bytes_received=15, bytes_sent=3))
    c = t.get("c1")
    assert c is not None
    assert (c.state, c.pid, t.open_count, t.closed_count) == ("CLOSE", 42, 0, 1)
    assert c.closed_at is not None and c.duration_ms == pytest.approx(250.5)
    assert (c.closed_at - c.started_at).total_seconds() == pytest.approx(0.2505)


def test_syn_sent_port_taken_from_later_event() -> None:
    t = ConnectionTable(TEXTS)
    t.apply(ev("syn_sent", 1, 0, src_port=0, src_addr="0.0.0.0"))
    t.apply(ev("established", 1, 1, src_port=41000, src_addr="10.0.0.1"))
    c = t.get("c1")
    assert c is not None and (c.src_addr, c.src_port) == ("10.0.0.1", 41000)


def test_late_event_after_close_keeps_closed() -> None:
    # Records of two CPUs can interleave; the close record holds the final counters.
    t = ConnectionTable(TEXTS)
    lifecycle(t, 1, 0, bytes_received=7)
    t.apply(ev("data_queue", 1, 10, bytes_received=5))
    c = t.get("c1")
    assert c is not None and (c.state, c.bytes_received, c.events, t.open_count) == ("CLOSE", 7, 5, 0)


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_closed_history_bounded_oldest_evicted(keep: int) -> None:
    t = ConnectionTable(TEXTS, max_closed_connections=keep)
    for i in range(10):
        lifecycle(t, i, i * 10)
    assert t.closed_count == keep and t.open_count == 0
    assert [c.id for c in t.query("closed")] == [f"c{i}" for i in range(9, 9 - keep, -1)]
    assert t.evicted_closed == 10 - keep


def test_open_bounded() -> None:
    t = ConnectionTable(TEXTS, max_open_connections=5)
    for i in range(8):
        t.apply(ev("established", i, i))
    assert t.open_count == 5 and t.evicted_open == 3 and t.get("c0") is None and t.get("c7") is not None


def test_memory_flat_under_churn() -> None:
    t = ConnectionTable(TEXTS, max_closed_connections=100)
    for i in range(5000):
        lifecycle(t, i, i)
    assert (t.open_count, t.closed_count) == (0, 100)


def build() -> ConnectionTable:
    t = ConnectionTable(TEXTS)
    lifecycle(t, 1, 0, pid=10, src_port=1111, dst_port=80)                      # closed client v4
    t.apply(ev("established", 2, 10, pid=20, role="server", src_port=80, dst_port=2222))
    t.apply(ev("established", 3, 20, pid=10, family="ipv6", src_addr="fd00::1", dst_addr="fd00::2",
               src_port=3333, dst_port=443))
    t.apply(ev("data_queue", 2, 30, pid=20, role="server", src_port=80, dst_port=2222))  # c2 newest
    return t


@pytest.mark.parametrize(("state", "filt", "limit", "want"), [
    ("all", Filter(), 1000, ["c2", "c3", "c1"]),
    ("open", Filter(), 1000, ["c2", "c3"]),
    ("closed", Filter(), 1000, ["c1"]),
    ("all", Filter(port=80), 1000, ["c2", "c1"]),
    ("all", Filter(port=2222), 1000, ["c2"]),
    ("all", Filter(pid=10), 1000, ["c3", "c1"]),
    ("all", Filter(family="ipv6"), 1000, ["c3"]),
    ("all", Filter(role="server"), 1000, ["c2"]),
    ("open", Filter(pid=10, family="ipv4"), 1000, []),
    ("all", Filter(), 2, ["c2", "c3"]),
    ("all", Filter(), 0, []),
])
def test_query(state: str, filt: Filter, limit: int, want: list[str]) -> None:
    assert [c.id for c in build().query(state, filt.predicate(), limit)] == want


def test_get_unknown() -> None:
    assert build().get("c999") is None


def test_preexisting_from_sockdiag_records() -> None:
    socks = [
        sockdiag.DiagSocket(socket.AF_INET, 10, "0.0.0.0", 22, "0.0.0.0", 0, 1, 0, 0),          # LISTEN
        sockdiag.DiagSocket(socket.AF_INET, 1, "10.0.0.1", 22, "10.0.0.9", 5555, 2, 100, 200),   # server
        sockdiag.DiagSocket(socket.AF_INET6, 1, "fd00::1", 6000, "fd00::2", 443, 3, 7, 9),      # client
        sockdiag.DiagSocket(socket.AF_INET, 6, "10.0.0.1", 7000, "10.0.0.9", 80, 0, 0, 0),       # TIME_WAIT
    ]
    items = sockdiag.preexisting(socks, {2: (77, "sshd")})
    t = ConnectionTable(TEXTS)
    assert t.add_preexisting(items) == 2
    got = {c.id: c for c in t.query()}
    assert set(got) == {"p1", "p2"}
    assert (got["p1"].role, got["p1"].pid, got["p1"].comm, got["p1"].bytes_sent) == ("server", 77, "sshd", 100)
    assert (got["p2"].role, got["p2"].family, got["p2"].pid, got["p2"].preexisting) == ("client", "ipv6", None, True)
    # The kernel later reports the same socket (it was opening while we attached): one entry left.
    netns = got["p1"].netns
    # Its times from the dump's clock (ev()'s T0 can be later than this machine's uptime).
    dump_ms = (items[0][TS_NS] - T0_NS) / 1e6
    c9 = ev("data_queue", 9, dump_ms, start_ms=dump_ms - 1, src_addr="10.0.0.1", src_port=22, dst_addr="10.0.0.9",
            dst_port=5555, netns=netns, pid=None, comm=None, role="server")
    t.apply(c9)
    ids = {c.id for c in t.query()}
    assert ids == {"c9", "p2"} and t.get("c9").pid == 77  # type: ignore[union-attr]
    # A sweep that does not see p2 twice in a row ends it with a close of unknown reason.
    later = time.monotonic_ns() + 10**9   # sock_diag records start now
    kernel = {conn_key(c9): c9}
    asked = t.quiet_keys(later)
    assert asked == {conn_key(c9), *(conn_key(r) for r in items if r[STATE] != 6 and r[STATE] != 10)}
    assert t.converge(kernel, asked, later, later) == []
    (close,) = t.converge(kernel, asked, later, later + 1)
    t.apply(close)
    p2 = t.get("p2")
    assert p2 is not None and (p2.state, p2.close_reason) == ("CLOSE", "unknown") and p2.closed_at is not None
    assert t.preexisting_count == 0   # nothing left to twin-check: new connections take the fast path


def test_sweep_corrects_states_and_spares_unreadable_namespaces() -> None:
    t = ConnectionTable(TEXTS)
    t.apply(ev("established", 1, 0, netns=5))
    t.apply(ev("established", 2, 0, netns=6, src_port=41000))
    kernel_view = replaced(ev("established", 1, 0, netns=5), {STATE: TCP_STATE_NUMBERS["CLOSE_WAIT"]})
    later = T0_NS + 10**12
    asked = {conn_key(kernel_view)}   # c2 was not asked about (its namespace could not be read)
    for _ in range(3):   # so it stays open
        assert t.converge({conn_key(kernel_view): kernel_view}, asked, later, later) == []
    got = {c.id: c.state for c in t.query("open")}
    assert got == {"c1": "CLOSE_WAIT", "c2": "ESTABLISHED"}
    # A connection that began after the sweep started is not judged by it.
    c3 = ev("established", 3, 0, start_ms=10**9, netns=5, src_port=42000)
    t.apply(c3)
    asked.add(conn_key(c3))
    assert t.converge({conn_key(kernel_view): kernel_view}, asked, later, later) == []
    assert t.converge({conn_key(kernel_view): kernel_view}, asked, later, later) == []
