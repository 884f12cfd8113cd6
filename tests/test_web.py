"""Dashboard (web/) end to end: Debian chromium via Playwright against a running `conn-tracer serve`.

The traffic is made here: a real TCP exchange on 127.0.0.1 in this process, so the expected ports,
pid and byte counts are known exactly. Tests share one page and run in file order, like an on-call
engineer keeping the dashboard open. The page runs under a strict Content-Security-Policy (no
'unsafe-inline'), added to the document here, so an inline script or style would show up as a
console error.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.exchange import LocalExchange, local_exchange, recv_exactly

pytestmark = [pytest.mark.browser, pytest.mark.bpf]

sync_api = pytest.importorskip("playwright.sync_api")
Browser = sync_api.Browser
Page = sync_api.Page
Locator = sync_api.Locator
expect = sync_api.expect

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # A document fulfilled by Playwright (to add the CSP header) has no address, so Chromium's Local
    # Network Access checks would block its WebSocket to 127.0.0.1 (ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS).
    "--disable-features=LocalNetworkAccessChecks",
]
STARTUP_TIMEOUT_S = 30.0
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
# Every column of the connection table (web/table.js), by data-col; `host` shows only when the page
# holds connections of several hosts.
COLUMNS = ["role", "local", "remote", "state", "pid", "sent", "recv", "rtt", "retrans", "reason", "workload", "age"]
NARROW_COLUMNS = ["state", "pid", "sent", "recv"]


@dataclass
class Dashboard:
    """The shared page and what it reported while the tests ran."""

    page: Page
    url: str
    errors: list[str] = field(default_factory=list)
    ws_urls: list[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    """Base URL of a running `conn-tracer serve`: $CONN_TRACER_URL, or one started here."""
    if url := os.environ.get("CONN_TRACER_URL"):
        yield url.rstrip("/")
        return
    from app.bpf.loader import check_host
    from app.config import Settings

    report = check_host(Settings())
    if not report.ok:
        # Same rule as conftest's bpf marker; checked here because this fixture runs before it.
        if os.environ.get("CONN_TRACER_REQUIRE_BPF") == "1":
            pytest.fail(f"BPF is required here but unavailable: {report.first_failure()}")
        pytest.skip(f"BPF unavailable: {report.first_failure()}")
    venv_python = REPO / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.exists() else sys.executable
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(
            [python, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"conn-tracer serve did not become healthy on {url}:\n{log.read()[-3000:]}")
                time.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_dashboard(browser: Browser, url: str, width: int = 1280, height: int = 800) -> Dashboard:
    """A new page on the dashboard under CSP, loaded and live, with console errors and WebSocket URLs recorded."""
    context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)

    def with_csp(route: sync_api.Route) -> None:
        resp = route.fetch()
        route.fulfill(response=resp, headers={**resp.headers, "content-security-policy": CSP})

    context.route(f"{url}/", with_csp)
    page = context.new_page()
    page.set_default_timeout(10_000)
    dash = Dashboard(page, url)
    page.on("console", lambda m: dash.errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: dash.errors.append(f"pageerror: {e}"))
    page.on("websocket", lambda ws: dash.ws_urls.append(ws.url))
    page.goto(f"{url}/")
    expect(page.locator("#ws-status")).to_have_text("live", timeout=10_000)
    return dash


@pytest.fixture(scope="module")
def dashboard(browser: Browser, service_url: str) -> Iterator[Dashboard]:
    """The shared page."""
    dash = open_dashboard(browser, service_url)
    try:
        yield dash
    finally:
        dash.page.context.close()


def show_only(page: Page, text: str) -> None:
    page.fill("#filter", text)


def watch_this_process(page: Page) -> None:
    """Filter on our pid before making traffic: on a busy host other connections would push ours
    past the rendered-row cap, and the page evicts filter matches last."""
    show_only(page, f"pid:{os.getpid()}")


@pytest.fixture(scope="module")
def first_exchange(dashboard: Dashboard) -> LocalExchange:
    """Made once the page is live, so its events arrive over the WebSocket."""
    watch_this_process(dashboard.page)
    return local_exchange(3001, 7919)


def loss_report(dash: Dashboard) -> str:
    """Why events may be missing on a busy host: losses the service and the page counted."""
    with urllib.request.urlopen(f"{dash.url}/stats", timeout=5) as resp:
        lost = json.load(resp).get("lost_kernel")
    dropped = dash.page.evaluate("() => window.__connTracer.store.control.get('dropped') ?? 0")
    return f"lost in kernel since start: {lost}, dropped to this page: {dropped}"


def _ms_left(deadline: float) -> float:
    # Playwright treats timeout=0 as "no timeout", so never hand it zero.
    return max(1.0, (deadline - time.monotonic()) * 1000)


def conn_row(page: Page, local_port: int, remote_port: int) -> Locator:
    """The table row whose local and remote ends have exactly these ports."""
    rows = page.locator("#conn-table tr[data-conn-id]")
    local = page.locator('td[data-col="local"]', has_text=re.compile(rf":{local_port}$"))
    remote = page.locator('td[data-col="remote"]', has_text=re.compile(rf":{remote_port}$"))
    return rows.filter(has=local).filter(has=remote)


def expect_both_ends(page: Page, ex: LocalExchange, timeout_ms: float) -> None:
    """Client and server rows with the exact ports, pid and payload byte counts."""
    deadline = time.monotonic() + timeout_ms / 1000
    ends = [
        (ex.client_port, ex.server_port, "client", ex.client_sent, ex.server_sent),
        (ex.server_port, ex.client_port, "server", ex.server_sent, ex.client_sent),
    ]
    for local, remote, role, sent, received in ends:
        row = conn_row(page, local, remote)
        expect(row).to_have_count(1, timeout=_ms_left(deadline))
        expect(row.locator('td[data-col="role"]')).to_have_text(role, timeout=_ms_left(deadline))
        expect(row.locator('td[data-col="pid"]')).to_contain_text(
            re.compile(rf"^{ex.pid}\b"), timeout=_ms_left(deadline)
        )
        expect(row.locator('td[data-col="sent"]')).to_have_text(str(sent), timeout=_ms_left(deadline))
        expect(row.locator('td[data-col="recv"]')).to_have_text(str(received), timeout=_ms_left(deadline))


def test_row_appears_with_ports_pid_and_exact_bytes(dashboard: Dashboard, first_exchange: LocalExchange) -> None:
    expect_both_ends(dashboard.page, first_exchange, timeout_ms=2000)


def test_filter_by_port_leaves_only_that_connection(dashboard: Dashboard, first_exchange: LocalExchange) -> None:
    page = dashboard.page
    port = first_exchange.client_port
    show_only(page, str(port))
    rows = page.locator("#conn-table tr[data-conn-id]")
    expect(rows).to_have_count(2)
    ends = set()
    for i in range(rows.count()):
        row = rows.nth(i)
        local = row.locator('td[data-col="local"]').inner_text()
        remote = row.locator('td[data-col="remote"]').inner_text()
        assert f":{port}" in (local[-6:], remote[-6:]) or local.endswith(f":{port}") or remote.endswith(f":{port}"), (
            local,
            remote,
        )
        ends.add(row.locator('td[data-col="role"]').inner_text())
    assert ends == {"client", "server"}


@pytest.mark.parametrize("role", ["client", "server"])
def test_row_click_shows_state_timeline(dashboard: Dashboard, first_exchange: LocalExchange, role: str) -> None:
    page = dashboard.page
    ex = first_exchange
    show_only(page, str(ex.client_port))
    local, remote = (ex.client_port, ex.server_port) if role == "client" else (ex.server_port, ex.client_port)
    conn_row(page, local, remote).click()
    details = page.locator("#details")
    expect(details).to_contain_text(f":{local}")
    expect(details).to_contain_text("SYN_SENT" if role == "client" else "SYN_RECV")
    expect(details).to_contain_text("ESTABLISHED")
    expect(details).to_contain_text("CLOSE")
    # The timeline lists states in order: opening first, CLOSE last.
    states = details.locator("ol.timeline li[data-state]").all_inner_texts()
    assert states[0] in ("SYN_SENT", "SYN_RECV") and states[-1] == "CLOSE", states


def test_websocket_outage_reconnects_and_resumes(dashboard: Dashboard) -> None:
    page = dashboard.page
    status = page.locator("#ws-status")
    expect(status).to_have_text("live")
    opened_before = len(dashboard.ws_urls)
    # The service exposes no way to drop a client, so the page's own hook closes its socket
    # and holds off reconnecting for a few seconds, long enough to make traffic meanwhile.
    page.evaluate("() => window.__connTracer.simulateOutage(3000)")
    expect(status).to_contain_text("disconnected", timeout=2000)
    seq_when_down = page.evaluate("() => window.__connTracer.store.maxSeq")
    watch_this_process(page)
    assert isinstance(seq_when_down, int)

    ex = local_exchange(4099, 6007)
    assert "disconnected" in status.inner_text(), "the exchange must happen while the page is offline"

    expect(status).to_have_text("live", timeout=20_000)
    show_only(page, str(ex.client_port))
    expect_both_ends(page, ex, timeout_ms=5000)
    reopened = dashboard.ws_urls[opened_before:]
    assert reopened, "the page did not open a new WebSocket"
    assert all(f"after={seq_when_down}" in u for u in reopened), (seq_when_down, reopened)
    # The new connection's events came from the replay after SEQ, not from a gap-filling reload.
    seqs = page.evaluate(
        "(id) => window.__connTracer.store.conns.get(id).events.map((e) => e.seq)",
        conn_row(page, ex.client_port, ex.server_port).get_attribute("data-conn-id"),
    )
    assert seqs and min(seqs) > seq_when_down, (seqs, seq_when_down, loss_report(dashboard))


LAYOUT_JS = """() => {
  const wrap = document.querySelector('.table-wrap');
  const box = wrap.getBoundingClientRect();
  const headers = {};
  for (const th of document.querySelectorAll('#conn-table thead th')) {
    const r = th.getBoundingClientRect();
    const b = th.querySelector('button');
    const br = b.getBoundingClientRect();
    headers[th.dataset.col] = { shown: getComputedStyle(th).display !== 'none', left: r.left, right: r.right,
      inside: r.width > 0 && r.left >= Math.max(0, box.left) - 0.5 && r.right <= Math.min(innerWidth, box.right) + 0.5,
      cut: b.scrollWidth > b.clientWidth || br.left < r.left - 0.5 || br.right > r.right + 0.5 };
  }
  const chart = window.__connTracer.chart;
  const ctx = document.querySelector('#chart').getContext('2d');
  return { scrollWidth: document.documentElement.scrollWidth, innerWidth, headers,
    wrapScrolls: wrap.scrollWidth > wrap.clientWidth, xLabels: chart.xLabels,
    yClipped: chart.yLabels.filter((t) => ctx.measureText(t).width > chart.left - 4) };
}"""


def cells_in_view(row: Locator, cols: list[str]) -> dict[str, bool]:
    """Per column: the row's cell is displayed, has room and lies inside the window."""
    return {col: bool(row.locator(f'td[data-col="{col}"]').evaluate(
        "(td) => { const r = td.getBoundingClientRect(); return getComputedStyle(td).display !== 'none' "
        "&& r.width > 20 && r.left >= 0 && r.right <= innerWidth + 0.5; }")) for col in cols}


def show_exchange(page: Page, ex: LocalExchange) -> Locator:
    """Filters the table to this exchange's two rows (ports are reused on a busy host, so both) and
    returns its client row."""
    show_only(page, f"port:{ex.client_port} port:{ex.server_port}")
    return conn_row(page, ex.client_port, ex.server_port)


@pytest.mark.parametrize("width", [1280, 1440, 1920, 400])
def test_layout_fits_the_window(dashboard: Dashboard, width: int) -> None:
    page = dashboard.page
    watch_this_process(page)
    ex = local_exchange(1000, 2000)   # its own: the page ages closed rows out after a minute
    row = show_exchange(page, ex)
    page.set_viewport_size({"width": width, "height": 900})
    try:
        expect(row).to_have_count(1)
        # The chart redraws on resize (next animation frame); wait for labels drawn at this width.
        page.wait_for_function("(w) => window.__connTracer.chart.canvas.clientWidth <= w", arg=width)
        page.wait_for_timeout(100)
        got = page.evaluate(LAYOUT_JS)
        assert got["scrollWidth"] <= got["innerWidth"], got
        heads = got["headers"]
        if width >= 1280:
            bad = {c: h for c, h in heads.items() if c in COLUMNS and not (h["shown"] and h["inside"] and not h["cut"])}
            assert not bad, f"column headers not fully visible at {width} px: {bad}"
            assert not heads["host"]["shown"], "one host: no host column"
            assert not got["wrapScrolls"], "the table scrolls sideways"
        wanted = NARROW_COLUMNS if width < 1280 else COLUMNS
        assert all(heads[c]["shown"] and heads[c]["inside"] for c in wanted), heads
        assert all(cells_in_view(row, wanted).values()), cells_in_view(row, wanted)
        # Clock times on the x axis; no y label wider than the margin it is drawn in.
        assert len(got["xLabels"]) >= 2 and all(re.fullmatch(r"\d\d:\d\d(:\d\d)?", t) for t in got["xLabels"])
        assert got["yClipped"] == [], got["yClipped"]
    finally:
        page.set_viewport_size({"width": 1280, "height": 800})


def history_json(url: str, **params: int) -> dict[str, list[int]]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    with urllib.request.urlopen(f"{url}/history?{query}", timeout=5) as resp:
        return json.load(resp)  # type: ignore[no-any-return]


def test_reload_keeps_the_chart_history(dashboard: Dashboard) -> None:
    page = dashboard.page
    t0 = int(time.time()) - 1
    ex = local_exchange(300_000, 200_000)
    total = ex.client_sent + ex.server_sent   # both ends are on this host: each byte is received once here
    deadline = time.monotonic() + 5
    while True:
        h = history_json(dashboard.url, after=t0)
        if sum(h["bytes_received"]) >= total:
            break
        assert time.monotonic() < deadline, f"/history never counted {total} bytes: {h}"
        time.sleep(0.2)
    busiest = max(range(len(h["t"])), key=lambda i: h["bytes_received"][i])
    sec, value = h["t"][busiest], h["bytes_received"][busiest]
    assert value > 0

    page.reload()
    expect(page.locator("#ws-status")).to_have_text("live", timeout=10_000)
    # The chart shows that second although this page load never saw its events.
    page.wait_for_function(
        """([sec, value]) => { const c = window.__connTracer.chart;
            return c.range && c.range.first <= sec && sec <= c.range.last
              && c.values.bytesIn[sec - c.range.first] === value; }""", arg=[sec, value], timeout=5000)
    assert page.evaluate("(s) => window.__connTracer.store.rates.get(s, 'bytesIn')", sec) == 0


def test_timeline_has_events_from_before_the_page_opened(browser: Browser, service_url: str) -> None:
    # Still open when the page loads, so a busy host cannot push it out of the server's closed history.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server_port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", server_port), timeout=5)
        server, _ = listener.accept()
    ex = LocalExchange(client.getsockname()[1], server_port, os.getpid(), 2222, 3333)
    dash = None
    try:
        client.sendall(b"x" * ex.client_sent)
        recv_exactly(server, ex.client_sent)
        server.sendall(b"y" * ex.server_sent)
        recv_exactly(client, ex.server_sent)
        dash = open_dashboard(browser, service_url)
        page = dash.page
        row = show_exchange(page, ex)
        expect(row).to_have_count(1)
        seq_at_open = page.evaluate("() => window.__connTracer.store.maxSeq")
        row.click()
        details = page.locator("#details")
        expect(details.locator("ol.timeline li[data-state]")).to_have_text(["SYN_SENT", "ESTABLISHED"])
        expect(details.locator("table.events tbody tr td:nth-child(2)").first).to_have_text("syn_sent")
        expect(details).not_to_contain_text("Only events streamed")
        seqs = page.evaluate("(id) => window.__connTracer.store.conns.get(id).events.map((e) => e.seq)",
                             row.get_attribute("data-conn-id"))
        assert seq_at_open is None or min(seqs) <= seq_at_open, (seqs, seq_at_open)
        for fact in ("rtt", "retransmits", "close reason", "cgroup", "host"):
            expect(details.locator("dt", has_text=re.compile(f"^{fact}$"))).to_have_count(1)
        client.close()
        server.close()
        # ...and the stream carries on where the fetched events end.
        expect(details.locator("ol.timeline li[data-state]").last).to_have_text("CLOSE")
        assert dash.errors == []
    finally:
        client.close()
        server.close()
        if dash is not None:
            dash.page.context.close()


def test_export_csv_and_json(dashboard: Dashboard) -> None:
    page = dashboard.page
    watch_this_process(page)
    ex = local_exchange(1111, 2345)
    show_exchange(page, ex)
    expect(page.locator("#conn-table tr[data-conn-id]")).to_have_count(2)
    want = {(ex.client_port, ex.server_port, "client", ex.client_sent, ex.server_sent),
            (ex.server_port, ex.client_port, "server", ex.server_sent, ex.client_sent)}

    with page.expect_download() as dl:
        page.click("#export-csv")
    assert dl.value.suggested_filename.endswith(".csv")
    rows = list(csv.DictReader(io.StringIO(Path(dl.value.path()).read_text())))
    assert {(int(r["src_port"]), int(r["dst_port"]), r["role"], int(r["bytes_sent"]), int(r["bytes_received"]))
            for r in rows} == want
    assert all(r["pid"] == str(ex.pid) and r["closed_at"] for r in rows)

    with page.expect_download() as dl:
        page.click("#export-json")
    assert dl.value.suggested_filename.endswith(".json")
    objs = json.loads(Path(dl.value.path()).read_text())
    assert {(o["src_port"], o["dst_port"], o["role"], o["bytes_sent"], o["bytes_received"]) for o in objs} == want
    # Fields the server does not report (yet) are null, never missing.
    assert all("srtt_us" in o and "close_reason" in o and "cgroup" in o for o in objs)


def test_no_console_errors_and_screenshot(dashboard: Dashboard) -> None:
    page = dashboard.page
    watch_this_process(page)
    ex = local_exchange(1500, 2500)
    show_only(page, str(ex.client_port))
    row = conn_row(page, ex.client_port, ex.server_port)
    expect(row).to_have_count(1, timeout=5000)
    row.click()
    expect(page.locator("#details")).to_contain_text(f":{ex.client_port}")
    show_only(page, "")  # the screenshot shows the everyday view, with the details still open
    expect(page.locator("#counters")).not_to_contain_text("–")  # stats arrived
    page.locator("#chart").scroll_into_view_if_needed()
    page.evaluate("() => { window.scrollTo(0, 0); document.querySelector('.table-wrap').scrollTop = 0; }")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1440, "height": 900})   # docs/dashboard.png is taken from this
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
    page.set_viewport_size({"width": 420, "height": 900})
    page.screenshot(path=str(ARTIFACTS / "dashboard-narrow.png"))
    page.set_viewport_size({"width": 1280, "height": 800})
    assert dashboard.errors == []
