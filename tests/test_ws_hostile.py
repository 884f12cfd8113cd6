"""`serve` against WebSocket clients that misbehave: abandoned handshakes, readers that stop, ping floods, shutdown.

One service for the module, filtered in-kernel to a port only this module uses, so what it holds is
exactly the replay buffer filled here (for `after=0`) and the clients' own cost; tests run in file
order and the last one stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.test_serve import Service, free_port, start_service, wait_for
from tests.wsraw import fd_count, ping_frames, read_close, rss_kib, stuck_subscriber

pytestmark = pytest.mark.bpf
# The README's figures come from these lines:
#   pytest -q tests/test_ws_hostile.py -o log_cli=true --log-cli-level=INFO
log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)

FILL_EXCHANGES = 2000   # 6 events each: 12,000 events (~7 MB of JSON) for every after=0 subscriber
HANDSHAKES = 5000
STUCK = 200
PINGERS = 10
PINGS_EACH = 100_000     # 1M pings in all, 125-byte payloads (the largest a ping may carry)
# Documented in the README ("Security and reliability"): what 200 stuck after=0 subscribers and a
# million unanswered pings may cost at most, above the service's RSS before they came.
STUCK_RSS_BOUND_KIB = 64 * 1024


ABANDON = """
import socket, sys
from tests.wsraw import upgrade_request
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(upgrade_request(port, "after=0"))
"""


def abandon(port: int, n: int) -> None:
    """`n` clients that send the /ws?after=0 upgrade and hang up; in their own process, where they
    do not hold the GIL the prober needs to time the service."""
    subprocess.run([sys.executable, "-c", ABANDON, str(port), str(n)], check=True, timeout=60,
                   cwd=Path(__file__).resolve().parents[1])


def exchanges(port: int, n: int) -> None:
    """`n` short loopback connections on `port`, each carrying a few bytes both ways."""
    with socket.create_server(("127.0.0.1", port)) as ls:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port)) as c:
                s, _ = ls.accept()
                with s:
                    c.sendall(b"x" * 100)
                    s.recv(100)
                    s.sendall(b"y" * 50)
                    c.recv(50)


@dataclass
class Hostile:
    svc: Service
    events: int


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    fport = free_port()
    svc = start_service(tmp_path_factory.mktemp("hostile") / "serve.log", "--filter-port", str(fport),
                "--max-subscribers", str(STUCK + 10))
    try:
        exchanges(fport, FILL_EXCHANGES)
        wait_for(lambda: svc.json("/stats")["events"]["close"] >= 2 * FILL_EXCHANGES, 20, "the fill's closes")
        yield Hostile(svc, svc.json("/stats")["seq"])
    finally:
        svc.stop()


@dataclass
class Prober:
    """GET /healthz every 50 ms on one kept-alive connection (as a monitoring agent does), timing each."""

    url: str
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Prober:
        self._client = httpx.Client(base_url=self.url, timeout=30)
        assert self._client.get("/healthz").status_code == 200   # connected before the flood
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                code = self._client.get("/healthz").status_code
                if code != 200:
                    self.failures.append(f"status {code}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - t)
            self._stop.wait(0.05)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(35)
        self._client.close()


def test_abandoned_handshakes_cost_nothing_lasting(hostile: Hostile) -> None:
    """5,000 clients send the /ws?after=0 upgrade and hang up before reading the 101."""
    svc = hostile.svc
    pid = svc.proc.pid
    # The first WebSocket handshakes of a run allocate what stays for good (imports, caches);
    # the start values are those of a service that has served a few.
    fds_before = fd_count(pid)
    abandon(svc.port, 200)
    # Gone means their sockets closed too, not just unsubscribed: on a busy machine some linger a
    # moment, and a start value that counts them would never be reached again.
    wait_for(lambda: svc.json("/stats")["subscribers"] == 0 and fd_count(pid) <= fds_before + 2, 10,
             "the warm-up handshakes gone")
    log0, fds0, rss0 = svc.log.stat().st_size, fd_count(pid), rss_kib(pid)
    with Prober(f"http://127.0.0.1:{svc.port}") as probe:
        t0 = time.monotonic()
        abandon(svc.port, HANDSHAKES)
        burst_s = time.monotonic() - t0

        def settled() -> bool:
            fds, rss = fd_count(pid), rss_kib(pid)
            return abs(fds - fds0) <= max(2, fds0 // 10) and abs(rss - rss0) <= rss0 // 10

        peak = rss_kib(pid)
        # fds and RSS back within 10 s of the burst's end.
        wait_for(settled, 10, f"fds {fd_count(pid)} (start {fds0}) and RSS {rss_kib(pid)} KiB (start {rss0}) "
                              "back within 10%")
        back_s = time.monotonic() - t0 - burst_s
    lat = sorted(probe.latencies)
    grew = svc.log.stat().st_size - log0
    log.info("%d abandoned handshakes in %.1f s: /healthz max %.3f s (median %.3f, %d probes); log +%d B; "
             "RSS %d -> %d (end of burst) -> %d KiB, fds %d -> %d, settled %.1f s after the burst",
             HANDSHAKES, burst_s, lat[-1], lat[len(lat) // 2], len(lat), grew, rss0, peak, rss_kib(pid), fds0,
             fd_count(pid), back_s)
    assert not probe.failures, probe.failures
    assert len(lat) >= 5 and lat[-1] < 1.0, f"/healthz latencies during a {burst_s:.1f} s burst: {lat[-5:]}"
    assert grew < 100_000, f"log grew {grew} bytes: {svc.log.read_text()[-2000:]}"
    assert svc.json("/stats")["subscribers"] == 0


def test_stuck_subscribers_and_ping_flood_bounded(hostile: Hostile) -> None:
    """200 after=0 subscribers that never read, 10 of them sending 100,000 pings each without reading a pong."""
    svc = hostile.svc
    pid = svc.proc.pid
    rss0 = rss_kib(pid)
    socks: list[socket.socket] = []
    peak = rss0
    try:
        for _ in range(STUCK):
            socks.append(stuck_subscriber(svc.port))
        wait_for(lambda: svc.json("/stats")["subscribers"] == STUCK, 10, f"{STUCK} subscribers")
        flood = ping_frames(PINGS_EACH)
        sent = 0
        deadline = time.monotonic() + 6
        for s in socks[:PINGERS]:
            s.setblocking(False)
        pending = {s: memoryview(flood) for s in socks[:PINGERS]}
        # Push pings while the service takes them; it stops reading once its pongs cannot be written.
        while pending and time.monotonic() < deadline:
            progressed = False
            for s, rest in list(pending.items()):
                with contextlib.suppress(BlockingIOError):
                    n = s.send(rest[:1 << 20])
                    sent += n
                    progressed = True
                    pending[s] = rest = rest[n:]
                if not rest:
                    del pending[s]
            peak = max(peak, rss_kib(pid))
            if not progressed:
                time.sleep(0.02)
        stats = svc.json("/stats")
        assert stats["subscribers"] == STUCK, "a stuck subscriber is not an error before its keepalive runs out"
        assert all(q["queued"] > 0 for q in stats["subscriber_queues"]), "they should be behind: they do not read"
        peak = max(peak, rss_kib(pid))
    finally:
        for s in socks:
            s.close()
    grew = peak - rss0
    log.info("%d stuck after=0 subscribers + %d ping bytes (%d pings) sent: RSS %d -> peak %d KiB (+%d KiB)",
             STUCK, sent, sent // 131, rss0, peak, grew)
    assert grew < STUCK_RSS_BOUND_KIB, f"RSS {rss0} -> {peak} KiB with {STUCK} stuck subscribers, {sent} ping bytes"
    wait_for(lambda: svc.json("/stats")["subscribers"] == 0, 10, "the subscribers to go")
    wait_for(lambda: rss_kib(pid) <= rss0 + rss0 // 10, 10, f"RSS back near {rss0} KiB (now {rss_kib(pid)})")
    log.info("after they left: RSS %d KiB", rss_kib(pid))


def test_sigterm_with_50_stuck_subscribers_exits_0_within_3s(hostile: Hostile) -> None:
    """Last: stops the module's service."""
    svc = hostile.svc
    socks = [stuck_subscriber(svc.port) for _ in range(50)]
    try:
        def all_stuck() -> bool:
            qs = svc.json("/stats")["subscriber_queues"]
            return len(qs) == 50 and all(q["queued"] > 0 for q in qs)

        wait_for(all_stuck, 10, "50 subscribers behind")
        t0 = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        code = svc.proc.wait(10)
        took = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
    text = svc.log.read_text()
    log.info("SIGTERM with 50 stuck subscribers: exit %d after %.2f s", code, took)
    assert code == 0 and took < 3.0, f"exit {code} after {took:.2f} s: {text[-2000:]}"
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


@pytest.fixture(scope="module")
def pinging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service that pings every 0.3 s and gives up on a client after another 0.3 s."""
    svc = start_service(tmp_path_factory.mktemp("pinging") / "serve.log", "--filter-port", str(free_port()),
                env={"CONN_TRACER_WS_PING_INTERVAL_S": "0.3", "CONN_TRACER_WS_PING_TIMEOUT_S": "0.3"})
    try:
        yield svc
    finally:
        assert svc.stop() == 0
        text = svc.log.read_text()
        assert "Traceback" not in text and "ERROR" not in text, text[-3000:]


@pytest.mark.parametrize(("query", "param"), [("family=" + "ü" * 200, "family"), ("port=1_000", "port"),
                                              ("port=%2B80", "port"), ("after=%2010", "after")])
def test_bad_value_closes_1008_cleanly(pinging: Service, query: str, param: str) -> None:
    """A long non-ASCII value used to make the close reason too long (abnormal close, tracebacks)."""
    with pinging.ws(query) as ws, pytest.raises(ConnectionClosed) as ei:
        ws.recv(timeout=5)
    assert ei.value.rcvd is not None and ei.value.rcvd.code == 1008
    assert ei.value.rcvd.reason.startswith(f"invalid {param}") and len(ei.value.rcvd.reason.encode()) <= 123


def test_client_that_does_not_answer_pings_is_closed(pinging: Service) -> None:
    svc = pinging
    deaf = stuck_subscriber(svc.port, "")
    with deaf, svc.ws() as polite:   # the websockets client answers pings from its own thread
        wait_for(lambda: svc.json("/stats")["subscribers"] == 2, 5, "2 subscribers")
        deaf.settimeout(5)
        code, reason = read_close(deaf)   # reads the pings, never answers them
        assert (code, reason) == (1011, "keepalive ping timeout")
        wait_for(lambda: svc.json("/stats")["subscribers"] == 1, 5, "the deaf one gone")
        time.sleep(1.0)   # not a synchronisation: several ping intervals in which nothing may happen
        assert svc.json("/stats")["subscribers"] == 1
        polite.ping().wait(5)
