"""`conn-tracer observe` against a real `serve`: history (--last, --since) with filters; --follow across a restart."""

from __future__ import annotations

import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from app.observe import Query, parse_since
from tests.test_serve import free_port, wait_for

CONN_TRACER = Path(sys.prefix) / "bin" / "conn-tracer"


# --- pure parts ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "ago"), [("90s", 90), ("5m", 300), ("2h", 7200), ("1d", 86400), ("30", 30),
                                            ("1.5m", 90), ("500ms", 0.5)])
def test_since_durations(text: str, ago: float) -> None:
    assert parse_since(text, 1_000_000.0) == pytest.approx(1_000_000.0 - ago)


def test_since_iso_time_and_bad_value() -> None:
    assert parse_since("2026-11-30T10:00:00Z", 0) == 1796032800.0
    assert parse_since("2026-11-30T11:00:00+01:00", 0) == 1796032800.0
    assert parse_since("2026-11-30T10:00:00", 0) == datetime(2026, 11, 30, 10).timestamp()   # local time
    with pytest.raises(ValueError, match="--since 'soon'"):
        parse_since("soon", 0)


EV = {"type": "close", "src_port": 80, "dst_port": 5000, "pid": 7, "family": "ipv4", "role": "server"}


@pytest.mark.parametrize(("query", "matches"), [
    (Query(), True),
    (Query(port=5000), True),
    (Query(port=81), False),
    (Query(local_port=80), True),
    (Query(local_port=5000), False),
    (Query(remote_port=5000), True),
    (Query(pid=7, family="ipv4", role="server"), True),
    (Query(family="ipv6"), False),
    (Query(types=frozenset({"established", "close"})), True),
    (Query(types=frozenset({"syn_recv"})), False),
])
def test_query_matches(query: Query, matches: bool) -> None:
    assert query.matches(EV) is matches


def test_ws_params_send_what_the_server_filters() -> None:
    q = Query(pid=3, local_port=8080, family="ipv6", role="client", types=frozenset({"close", "established"}))
    assert q.ws_params() == {"port": "8080", "pid": "3", "family": "ipv6", "role": "client",
                             "type": "close,established"}


# --- against a real agent -----------------------------------------------------------------------

def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


@dataclass
class Agent:
    """A `conn-tracer serve` on a fixed port, restartable on that port."""

    port: int
    log: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(CONN_TRACER), "serve", "--port", str(self.port), *self.args],
                                         stdout=out, stderr=subprocess.STDOUT)
        wait_for(self.healthy, 30, "serve /healthz 200", interval=0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def events(self) -> list[dict[str, Any]]:
        return list(get_json(f"{self.url}/events?after=0&limit=100000"))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = Agent(free_port(), tmp_path_factory.mktemp("observe") / "serve.log")
    a.start()
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET6) as ls:
        ls.bind(("::1", 0))
        ls.listen(16)
        yield ls


def connect(ls: socket.socket) -> int:
    """One finished connection to `ls`; returns the client's port."""
    host, port = ls.getsockname()[:2]
    with socket.create_connection((host, port)) as c:
        s, _ = ls.accept()
        c.sendall(b"x" * 1000)
        got = 0
        while got < 1000:
            got += len(s.recv(1000))
        s.close()
        return int(c.getsockname()[1])


def observe(agent: Agent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONN_TRACER), "observe", "--url", agent.url, *args],
                          capture_output=True, text=True, timeout=30)


def closes_seen(agent: Agent, port: int, clients: list[int]) -> list[dict[str, Any]]:
    evs = [e for e in agent.events() if port in (e["src_port"], e["dst_port"])]
    done = {e["src_port"] for e in evs if e["type"] == "close" and e["role"] == "client"}
    return evs if set(clients) <= done else []


@pytest.mark.bpf
def test_last_n_with_a_port_filter_gives_the_latest_matching(agent: Agent, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    clients = [connect(listener) for _ in range(3)]
    evs = wait_for(lambda: closes_seen(agent, port, clients), 10, "the connections' close events")
    out = observe(agent, "--last", "4", "-P", str(port), "-o", "json")
    assert out.returncode == 0, out.stderr
    got = [json.loads(line) for line in out.stdout.splitlines()]
    # The latest four of this port's events, oldest first (the agent holds more, from other traffic).
    assert [e["seq"] for e in got] == [e["seq"] for e in evs][-4:]
    assert all(port in (e["src_port"], e["dst_port"]) for e in got)

    out = observe(agent, "--since", "5m", "-P", str(port), "--type", "close", "--role", "client", "-6", "-o", "csv")
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()
    assert rows[0].startswith("seq,ts,type,conn_id")
    assert sorted(int(r.split(",")[9]) for r in rows[1:]) == sorted(clients)   # src_port column
    assert observe(agent, "--last", "5", "-P", str(port), "-4", "-o", "json").stdout == ""


@pytest.mark.bpf
def test_table_output_brackets_ipv6_and_shows_duration(agent: Agent, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    client = connect(listener)
    wait_for(lambda: closes_seen(agent, port, [client]), 10, "the connection's close")
    out = observe(agent, "--since", "1m", "-D", str(port), "--utc", "-w")
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.startswith("TIME(UTC)") and "REMOTE" in header
    assert lines and all(f"[::1]:{port}" in line for line in lines)
    close = next(line for line in lines if " close " in line)
    assert f"[::1]:{client}" in close and "1000B" in close
    end = header.index("DUR") + len("DUR")   # right-aligned, width 8
    assert re.fullmatch(r"\d+(\.\d+)?(ms|s)", close[end - 8:end].strip())   # from its syn_sent, seen in this output


def test_unreachable_agent_is_one_line_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run([str(CONN_TRACER), "observe", "--url", url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"conn-tracer: cannot reach the agent at {url}: [Errno 111] Connection "
                                       f"refused; is `conn-tracer serve` running there? (--url)"]


@dataclass
class Follow:
    """A running `observe --follow -o json`, its stdout lines and stderr collected by threads."""

    proc: subprocess.Popen[str]
    lines: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    errors: list[str] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out, err = self.proc.stdout, self.proc.stderr
        self.readers = [threading.Thread(target=lambda: [self.lines.put(json.loads(x)) for x in out], daemon=True),
                        threading.Thread(target=lambda: [self.errors.append(x) for x in err], daemon=True)]
        for t in self.readers:
            t.start()

    def stop(self) -> int:
        """SIGTERM, as a user's Ctrl-C would end it; returns the exit status once its output is read."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for t in self.readers:
            t.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return self.proc.returncode

    def wait_close_of(self, client_port: int, timeout: float, agent: Agent) -> None:
        deadline = time.monotonic() + timeout
        while not any(e["type"] == "close" and e["src_port"] == client_port for e in self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"observe did not print the close of :{client_port}; its stderr: {self.errors}; "
                            f"serve's log: {agent.log.read_text()[-1500:]}")
            try:
                self.seen.append(self.lines.get(timeout=left))
            except queue.Empty:
                continue


@pytest.mark.bpf
def test_follow_resumes_after_the_agent_restarts(listener: socket.socket, tmp_path: Path) -> None:
    port = listener.getsockname()[1]
    # Its own agent, filtering on this port in the kernel: other traffic on a busy host cannot push
    # this test's events out of the replay buffer while observe is away.
    agent = Agent(free_port(), tmp_path / "serve.log", ("--filter-port", str(port)))
    agent.start()
    proc = subprocess.Popen([str(CONN_TRACER), "observe", "--url", agent.url, "-f", "-o", "json", "-P", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    follow = Follow(proc)
    try:
        wait_for(lambda: get_json(f"{agent.url}/stats")["subscribers"] >= 1, 10, "observe's WebSocket")
        first = connect(listener)
        follow.wait_close_of(first, 10, agent)
        agent.stop()
        agent.start()   # same port, a new run: its seq starts again
        # Made before observe is back: it must come from the replay (after=0 on the new run).
        second = connect(listener)
        follow.wait_close_of(second, 30, agent)
    finally:
        status = follow.stop()
        agent.stop()
    assert status == 0
    mine = [(e["conn_id"], e["type"], e["role"], e["src_port"]) for e in follow.seen]
    assert len(mine) == len(set(mine)), "an event was printed twice"
    for client in (first, second):
        assert {e["type"] for e in follow.seen if client in (e["src_port"], e["dst_port"])} >= {
            "syn_sent", "syn_recv", "established", "close"}
    assert any("stream closed" in x for x in follow.errors), follow.errors
    assert any("the agent restarted" in x for x in follow.errors), follow.errors
