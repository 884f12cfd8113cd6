"""The HTTP and WebSocket API over a fake record source (no kernel): shapes, filters, errors."""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import StarletteDeprecationWarning
from starlette.websockets import WebSocketDisconnect

from app.api.app import create_app
from app.bpf.event import FRAME, EventRecord
from app.config import Settings
from tests.evfactory import T0_NS, ev, frames

with warnings.catch_warnings():
    # Starlette asks for the `httpx2` fork; plain httpx still works for its TestClient.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

STARTS = {1: 1_000_000, 2: 1_100_000, 3: 5_000_000}   # when each connection of the fixture began


def record(type_: str, conn: int, *, ts_ns: int, sport: int, dport: int, role: int = 0, pid: int = 100,
           family: int = 4, sent: int = 0, received: int = 0) -> EventRecord:
    """A record as the kernel side writes it."""
    addrs = ("10.1.0.1", "10.1.0.2") if family == 4 else ("fd00::1", "fd00::2")
    start_ns = STARTS.get(conn, ts_ns)
    return ev(type_, conn, (ts_ns - T0_NS) / 1e6, start_ms=(start_ns - T0_NS) / 1e6, src_port=sport, dst_port=dport,
              role=("client", "server")[role], pid=pid, family=f"ipv{family}", bytes_sent=sent,
              bytes_received=received, src_addr=addrs[0], dst_addr=addrs[1], netns=7, comm="proc")


class FakeSource:
    """Stands in for the BPF tracer: same interface, records pushed by the test."""

    attach_mode = "fake"

    def __init__(self, settings: Settings) -> None:
        self.attached = False
        self.reading = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_records: Callable[[bytes, int], None] | None = None
        self.lost = 0

    def open(self) -> None:
        self.attached = True

    def start_reading(self, loop: asyncio.AbstractEventLoop, on_records: Callable[[bytes, int], None]) -> None:
        self.loop, self.on_records, self.reading = loop, on_records, True

    def drain(self) -> int:
        return 0

    resumed = False

    def tracked_sockets(self) -> list[tuple[int, tuple[object, ...]]]:
        return []

    def forget_sockets(self, keys: list[int]) -> None:
        pass

    def wall_offset(self, fresh_ns: int) -> int:
        return fresh_ns

    def pending_connects(self, older_than_ns: int) -> list[object]:
        return []

    def offer_adoption(self, recs: list[tuple[object, ...]]) -> None:
        pass

    def recursion_misses(self) -> int:
        return 0

    def lost_kernel(self) -> int:
        return self.lost

    def bad_records(self) -> int:
        return 0

    def close(self) -> None:
        self.attached = self.reading = False

    def push(self, batch: list[EventRecord | bytes]) -> None:
        """Delivers a batch on the app's loop, as the ring-buffer reader would; returns once done."""
        assert self.loop is not None and self.on_records is not None
        done = threading.Event()
        cb = self.on_records
        raw = b"".join(r if isinstance(r, bytes) else frames(r) for r in batch)

        def run() -> None:
            cb(raw, len(batch))
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(5)


@pytest.fixture
def api() -> Iterator[tuple[TestClient, FakeSource]]:
    sources: list[FakeSource] = []

    def factory(settings: Settings) -> FakeSource:
        sources.append(FakeSource(settings))
        return sources[-1]

    # TestClient says "Host: testserver"; the service answers only to the names it is told.
    settings = Settings(preexisting=False, max_closed_connections=100, replay_events=50, allowed_hosts=["testserver"])
    with TestClient(create_app(settings, tracer_factory=factory)) as client:
        src = sources[0]
        # Two connections on port 8080 (client c1 pid 100 and server c2 pid 200, IPv4, closed),
        # one IPv6 client on port 443 still open.
        src.push([
            record("syn_sent", 1, ts_ns=1_000_000, sport=50000, dport=8080),
            record("syn_recv", 2, ts_ns=1_100_000, sport=8080, dport=50000, role=1, pid=0),
            record("established", 1, ts_ns=1_200_000, sport=50000, dport=8080),
            record("established", 2, ts_ns=1_300_000, sport=8080, dport=50000, role=1, pid=0),
            record("data_queue", 2, ts_ns=2_000_000, sport=8080, dport=50000, role=1, pid=200, received=11),
            record("close", 1, ts_ns=3_000_000, sport=50000, dport=8080, sent=11, received=22),
            record("close", 2, ts_ns=4_000_000, sport=8080, dport=50000, role=1, pid=0, sent=22, received=11),
            record("syn_sent", 3, ts_ns=5_000_000, sport=50001, dport=443, family=6),
            record("established", 3, ts_ns=6_000_000, sport=50001, dport=443, family=6),
            bytes(FRAME.size),   # a record of no known type: counted, skipped
        ])
        yield client, src


def test_connections_and_filters(api: tuple[TestClient, FakeSource]) -> None:
    client, _ = api
    all_ = client.get("/connections").json()
    assert [c["id"] for c in all_] == ["c3", "c2", "c1"]
    c2 = client.get("/connections/c2").json()
    assert c2 == next(c for c in all_ if c["id"] == "c2")
    got = (c2["role"], c2["pid"], c2["state"], c2["bytes_sent"], c2["bytes_received"])
    assert got == ("server", 200, "CLOSE", 22, 11)
    assert c2["duration_ms"] == pytest.approx(2.9) and c2["closed_at"] is not None
    cases = {
        "port=8080": ["c2", "c1"], "port=50000": ["c2", "c1"], "port=443": ["c3"], "state=open": ["c3"],
        "state=closed": ["c2", "c1"], "family=ipv6": ["c3"], "family=6": ["c3"], "role=server": ["c2"],
        "pid=100": ["c3", "c1"],
        "pid=200&role=client": [], "limit=1": ["c3"], "state=all&port=8080&family=ipv4&role=client": ["c1"],
    }
    for q, want in cases.items():
        assert [c["id"] for c in client.get(f"/connections?{q}").json()] == want, q


@pytest.mark.parametrize(("query", "param"), [
    ("port=abc", "port"), ("port=70000", "port"), ("port=0", "port"), ("state=foo", "state"),
    ("family=ipv5", "family"), ("role=x", "role"), ("limit=-1", "limit"), ("pid=-3", "pid"), ("pid=x", "pid"),
])
def test_bad_query_422_names_parameter(api: tuple[TestClient, FakeSource], query: str, param: str) -> None:
    client, _ = api
    r = client.get(f"/connections?{query}")
    assert r.status_code == 422
    body = r.json()
    assert body["detail"][0]["loc"] == ["query", param]
    assert param in body["message"]


def test_unknown_connection_404(api: tuple[TestClient, FakeSource]) -> None:
    assert api[0].get("/connections/c999").status_code == 404


def test_events_and_stats(api: tuple[TestClient, FakeSource]) -> None:
    client, src = api
    evs = client.get("/events").json()
    assert [e["seq"] for e in evs] == list(range(1, 10)) and evs[0]["type"] == "syn_sent"
    assert [e["seq"] for e in client.get("/events?after=7&limit=1").json()] == [8]
    src.lost = 3
    s = client.get("/stats").json()
    assert s["events"] == {"syn_sent": 2, "syn_recv": 1, "established": 3, "data_queue": 1, "close": 2,
                           "state_change": 0}
    assert (s["lost_kernel"], s["decode_errors"], s["connections_open"], s["connections_closed_kept"]) == (3, 1, 1, 2)
    assert (s["seq"], s["subscribers"], s["attach_mode"], s["dropped_subscribers"]) == (9, 0, "fake", 0)


def test_metrics_parse(api: tuple[TestClient, FakeSource]) -> None:
    client, _ = api
    r = client.get("/metrics")
    assert r.status_code == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(r.text) for s in fam.samples}
    assert samples[("conn_tracer_events_total", (("type", "close"),))] == 2
    assert samples[("conn_tracer_lost_events_total", (("source", "decode"),))] == 1
    assert samples[("conn_tracer_lost_events_total", (("source", "subscriber"),))] == 0
    assert samples[("conn_tracer_connections_open", ())] == 1


def test_health_and_index(api: tuple[TestClient, FakeSource]) -> None:
    client, src = api
    assert client.get("/healthz").json() == {"status": "ok", "attach_mode": "fake"}
    src.reading = False
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert client.get("/openapi.json").json()["components"]["schemas"]["Connection"]["properties"]["bytes_sent"][
        "description"]


def test_websocket_filtered_resume_and_bad_params(api: tuple[TestClient, FakeSource]) -> None:
    client, src = api
    with client.websocket_connect("/ws?after=0&port=443") as ws:
        got = [json.loads(ws.receive_text()) for _ in range(2)]
        assert [(e["seq"], e["conn_id"]) for e in got] == [(8, "c3"), (9, "c3")]
        src.push([record("close", 3, ts_ns=7_000_000, sport=50001, dport=443, family=6),
                  record("syn_sent", 4, ts_ns=8_000_000, sport=50002, dport=80)])
        e = json.loads(ws.receive_text())
        assert (e["seq"], e["type"]) == (10, "close")
    with client.websocket_connect("/ws?after=9&type=syn_sent") as ws:
        assert json.loads(ws.receive_text())["seq"] == 11
    for q, param in (("port=abc", "port"), ("family=ipv5", "family"), ("type=nope", "type"), ("after=-1", "after"),
                     ("batch=x", "batch"), ("batch=-2", "batch")):
        with client.websocket_connect(f"/ws?{q}") as ws, pytest.raises(WebSocketDisconnect) as ei:
            ws.receive_text()
        assert ei.value.code == 1008 and param in ei.value.reason


def test_websocket_batch_mode_sends_arrays_in_seq_order(api: tuple[TestClient, FakeSource]) -> None:
    client, _ = api
    with client.websocket_connect("/ws?after=0&batch=4") as ws:
        got: list[dict[str, object]] = []
        while len(got) < 9:
            msg = json.loads(ws.receive_text())
            assert isinstance(msg, list) and 1 <= len(msg) <= 4
            got.extend(msg)
    assert [e["seq"] for e in got] == list(range(1, 10))
