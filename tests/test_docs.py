"""Docs: /docs and /redoc work with only the service reachable; WS /ws is in OpenAPI; the README covers the CLI."""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.api.app import create_app
from app.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CONN_TRACER = Path(sys.prefix) / "bin" / "conn-tracer"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def commands_section() -> str:
    m = re.search(r"^## Commands\n(.*?)^## ", README, re.M | re.S)
    assert m, "README has no '## Commands' section"
    return m.group(1)


def test_readme_starts_with_make_serve_and_make_test() -> None:
    block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert block
    lines = block.group(1).splitlines()
    assert lines[0].startswith("make serve ") and lines[1].startswith("make test ")


def test_readme_commands_section_names_every_command_and_flag() -> None:
    text = commands_section()
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subs.choices.items():
        if f"conn-tracer {name}" not in text:
            missing.append(name)
        for action in sub._actions:
            for opt in action.option_strings:
                if opt not in ("-h", "--help") and not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                    missing.append(f"{name} {opt}")
    assert "--version" in text
    assert missing == []


def test_readme_websocket_example_uses_the_venvs_client() -> None:
    assert "websocat" not in README
    assert ".venv/bin/python -m websockets 'ws://127.0.0.1:8000/ws" in README
    assert (REPO / "docs" / "API.md").is_file() and "](docs/API.md)" in README


def test_make_lint_brings_its_linters() -> None:
    make = (REPO / "Makefile").read_text()
    target = re.search(r"^lint:(.*?)\n((?:\t.*\n)+)", make, re.M)
    assert target
    assert "setup" in target.group(1)
    assert "pip install" in target.group(2) and "ruff" in target.group(2) and "mypy" in target.group(2)


def test_openapi_describes_the_websocket() -> None:
    schema = create_app().openapi()
    op = schema["paths"]["/ws"]["get"]
    params = {p["name"] for p in op["parameters"]}
    assert {"port", "pid", "family", "role", "type", "after", "batch"} <= params
    for word in ("dropped", "overwritten", "1008", "1001", "1013"):
        assert word in op["description"]
    assert "101" in op["responses"]


# --- /docs in Chromium with everything but the service blocked ----------------------------------

@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("docs") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(CONN_TRACER), "serve", "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"serve did not start: {log.read_text()}"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.bpf
@pytest.mark.browser
@pytest.mark.parametrize(("path", "rendered"), [
    ("/docs", "#swagger-ui .opblock"),
    ("/redoc", "redoc h1, [role='navigation'], .menu-content"),
])
def test_api_docs_load_offline(service_url: str, path: str, rendered: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    blocked: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()

            def route(r: object) -> None:
                req = r.request  # type: ignore[attr-defined]
                if req.url.startswith(f"{service_url}/") or req.url.startswith("data:"):
                    r.continue_()  # type: ignore[attr-defined]
                else:
                    blocked.append(req.url)
                    r.abort()  # type: ignore[attr-defined]

            page.route("**/*", route)
            page.on("requestfailed", lambda req: failed.append(f"{req.url}: {req.failure}"))
            page.on("response", lambda resp: failed.append(f"{resp.url}: {resp.status}") if resp.status >= 400
                    else None)
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{service_url}{path}", wait_until="networkidle")
            page.wait_for_selector(rendered, timeout=15_000)
            body = page.inner_text("body")
            if path == "/docs":
                ops = page.locator("#swagger-ui .opblock").count()
                assert ops >= 7, body[:500]   # every REST operation and the WebSocket's description
                assert page.locator("#operations-events-ws_events").count() == 1
            assert "conn-tracer" in body
        finally:
            browser.close()
    assert blocked == [] and failed == [] and errors == []
