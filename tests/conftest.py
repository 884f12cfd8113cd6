"""Shared test set-up: BPF tests are mandatory where CONN_TRACER_REQUIRE_BPF=1 (CI)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache

import pytest

from app.bpf.loader import check_host
from app.config import Settings
from tests.netns import VethPair
from tests.tracestream import TraceStream

# Services started by tests do not pin maps unless a test says so (tests/test_restart.py):
# several run at once and would share the default instance.
os.environ.setdefault("CONN_TRACER_PIN", "0")


@cache
def bpf_unavailable_reason() -> str:
    """Empty if this host can run the tracer, else what is missing."""
    rep = check_host(Settings())
    return "" if rep.ok else rep.first_failure()


@pytest.fixture(autouse=True)
def _require_bpf(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("bpf") is None:
        return
    reason = bpf_unavailable_reason()
    if not reason:
        return
    if os.environ.get("CONN_TRACER_REQUIRE_BPF") == "1":
        pytest.fail(f"BPF is required here (CONN_TRACER_REQUIRE_BPF=1) but unavailable: {reason}")
    pytest.skip(f"BPF unavailable: {reason}")



def require_root() -> None:
    """Skips (fails in CI) unless root; module-scoped fixtures that make namespaces call it first."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CONN_TRACER_REQUIRE_BPF") == "1":
        pytest.fail("root is required here (CONN_TRACER_REQUIRE_BPF=1): run the tests as root")
    pytest.skip("needs root")


@pytest.fixture(autouse=True)
def _require_root(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("root") is not None:
        require_root()


@pytest.fixture(scope="module")
def trace() -> Iterator[TraceStream]:
    """`conn-tracer trace --json` for a whole test module (tests filter its events by port)."""
    stream = TraceStream()
    yield stream
    assert stream.stop() == 0


@pytest.fixture(scope="module")
def net() -> Iterator[VethPair]:
    """Two network namespaces joined by a veth pair, for a whole test module."""
    with VethPair() as pair:
        yield pair
