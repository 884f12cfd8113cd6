"""`conn-tracer observe`: a client of a running agent's public API (GET /stats, GET /events, WS /ws); no root.

History comes from the replay buffer (GET /events?after=SEQ&limit=N, oldest first), read backwards in
growing windows from the head seq until --last or --since is satisfied. --follow then streams WS /ws
from that head with after=SEQ, and after a disconnect reconnects (with backoff) from the last seq
printed, so nothing is printed twice and any gap is reported: the server's `dropped` and
`overwritten` messages, a seq jump in an unfiltered stream, or an agent that restarted (its seq
starts again) while we were away.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from app.render import CONTROL_TYPES, Output, Renderer, parse_ts

TOKEN_ENV = "CONN_TRACER_TOKEN"
DEFAULT_LAST = 20
FIRST_WINDOW_EVENTS = 1000   # the first /events page read backwards from the head; doubles each time
MAX_WINDOW_EVENTS = 100_000
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 8.0
# Start times (now - uptime_s) further apart than this mean a new run: two requests' latency is far
# below it, and a restart (compiling and attaching the programs) takes longer.
RESTART_SLACK_S = 0.5
POLICY_VIOLATION = 1008      # WS close code for a bad query parameter: reconnecting cannot help
RECV_POLL_S = 1.0

Event = dict[str, Any]


class ObserveError(Exception):
    """A problem reaching or using the agent; the message is one line with the fix."""


class Stop(Exception):
    """SIGTERM: end like Ctrl-C."""


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_since(text: str, now: float) -> float:
    """'5m', '90s', '2h', '1d', '30' (seconds) or an ISO 8601 time -> epoch seconds. Raises ValueError."""
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration (90s, 5m, 2h, 1d) or an ISO 8601 time") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()   # no zone given: the local time, as a person at this terminal means it
    return dt.timestamp()


@dataclass(frozen=True)
class Query:
    """The filters of one observe run: sent to the server where it has them, and applied here too."""

    pid: int | None = None
    port: int | None = None
    local_port: int | None = None
    remote_port: int | None = None
    family: str | None = None
    role: str | None = None
    types: frozenset[str] | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Query:
        types = None
        if args.types:
            types = frozenset(t.strip() for t in args.types.split(",") if t.strip())
        fam = {4: "ipv4", 6: "ipv6"}.get(args.filter_family) if args.filter_family else None
        return cls(args.pid, args.port, args.local_port, args.remote_port, fam, args.role, types)

    @property
    def filtered(self) -> bool:
        return any(v is not None for v in (self.pid, self.port, self.local_port, self.remote_port, self.family,
                                           self.role, self.types))

    def ws_params(self) -> dict[str, str]:
        """The WS /ws query (the server filters; -L/-D it lacks narrow through `port` and are checked here)."""
        p: dict[str, str] = {}
        port = self.port or self.local_port or self.remote_port
        if port:
            p["port"] = str(port)
        if self.pid:
            p["pid"] = str(self.pid)
        if self.family:
            p["family"] = self.family
        if self.role:
            p["role"] = self.role
        if self.types:
            p["type"] = ",".join(sorted(self.types))
        return p

    def matches(self, ev: Mapping[str, Any]) -> bool:
        if self.port is not None and self.port not in (ev.get("src_port"), ev.get("dst_port")):
            return False
        if self.local_port is not None and ev.get("src_port") != self.local_port:
            return False
        if self.remote_port is not None and ev.get("dst_port") != self.remote_port:
            return False
        if self.pid is not None and ev.get("pid") != self.pid:
            return False
        if self.family is not None and ev.get("family") != self.family:
            return False
        if self.role is not None and ev.get("role") != self.role:
            return False
        return self.types is None or ev.get("type") in self.types


def read_token(token_file: Path | None) -> str | None:
    """--token-file, else $CONN_TRACER_TOKEN, else none."""
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            raise ObserveError(f"cannot read token file {token_file}: {exc.strerror}; fix --token-file") from None
    return os.environ.get(TOKEN_ENV) or None


@dataclass
class Agent:
    """The running agent's API at `url`."""

    url: str
    token: str | None = None
    timeout: float = 10.0

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not re.match(r"^https?://", self.url):
            raise ObserveError(f"--url {self.url!r} must start with http:// or https://")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get_json(self, path: str, **params: Any) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        req = urllib.request.Request(f"{self.url}{path}{query}", headers=self.headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise ObserveError(f"the agent at {self.url} refused access ({exc.code}); give its token with "
                                   f"--token-file PATH or ${TOKEN_ENV}") from None
            raise ObserveError(f"GET {path} at {self.url} answered {exc.code}: {exc.read()[:200]!r}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ObserveError(f"cannot reach the agent at {self.url}: {reason}; is `conn-tracer serve` "
                               f"running there? (--url)") from None
        except ValueError as exc:
            raise ObserveError(f"GET {path} at {self.url} did not answer JSON ({exc}); is --url an agent?") from None

    def ws_url(self, params: Mapping[str, str]) -> str:
        base = "ws" + self.url[len("http"):]
        return f"{base}/ws" + (f"?{urllib.parse.urlencode(params)}" if params else "")

    def head(self) -> tuple[int, int, float]:
        """(seq of the latest event, seq of the oldest still held, when this run of the agent started)."""
        st = self.get_json("/stats")
        started = time.time() - float(st.get("uptime_s", 0))
        return int(st.get("seq", 0)), int(st.get("replay_first_seq", 0) or 0), started


def history(agent: Agent, query: Query, last: int | None, since: float | None) -> tuple[list[Event], int, float]:
    """The latest `last` matching events (and/or those since `since`), oldest first; with the head seq and run start."""
    head, first, started = agent.head()
    found: list[list[Event]] = []   # windows, newest first
    count = 0
    hi = head
    window = max(FIRST_WINDOW_EVENTS, 4 * (last or 0))
    lowest = max(first, 1)
    while hi >= lowest:
        lo = max(lowest - 1, hi - window)
        page = agent.get_json("/events", after=lo, limit=hi - lo)
        if not isinstance(page, list):
            raise ObserveError(f"GET /events at {agent.url} did not answer a list")
        page = [e for e in page if isinstance(e, dict) and e.get("seq", 0) <= hi]
        keep = [e for e in page if query.matches(e)]
        found.append(keep)
        count += len(keep)
        if last is not None and since is None and count >= last:
            break
        if since is not None and page and (ts := parse_ts(page[0].get("ts"))) is not None and ts.timestamp() < since:
            break
        hi = lo
        window = min(window * 2, MAX_WINDOW_EVENTS)
    events = [e for page in reversed(found) for e in page]
    if since is not None:
        events = [e for e in events if (ts := parse_ts(e.get("ts"))) is not None and ts.timestamp() >= since]
    if last is not None:
        events = events[-last:] if last > 0 else []
    return events, head, started


@dataclass
class Follower:
    """Streams WS /ws and prints; survives disconnects and agent restarts, reporting every gap on stderr."""

    agent: Agent
    query: Query
    render: Renderer
    out: Output
    after: int
    started: float
    gaps: int = 0
    printed: int = 0
    _control_since_event: bool = field(default=False, init=False)

    def note(self, text: str) -> None:
        sys.stderr.write(f"observe: {text}\n")
        sys.stderr.flush()

    def handle(self, raw: str) -> bool:
        """Handles one message; False once the output is closed."""
        try:
            msg = json.loads(raw)
        except ValueError:
            self.note(f"skipped a message that is not JSON: {raw[:80]!r}")
            return True
        items = msg if isinstance(msg, list) else [msg]   # batch=N sends arrays
        for ev in items:
            if not isinstance(ev, dict):
                continue
            kind = ev.get("type")
            if kind in CONTROL_TYPES:
                self._control_since_event = True
                n = ev.get("count", "?")
                self.gaps += 1
                why = ("this client fell too far behind" if kind == "dropped"
                       else "they left the agent's replay buffer before they could be sent")
                self.note(f"gap: {n} events {kind} ({why})")
                continue
            seq = ev.get("seq")
            if isinstance(seq, int):
                if (not self.query.filtered and self.after and seq > self.after + 1
                        and not self._control_since_event):
                    self.gaps += 1
                    self.note(f"gap: seq {self.after + 1}..{seq - 1} missing ({seq - self.after - 1} events)")
                self.after = max(self.after, seq)
            self._control_since_event = False
            if not self.query.matches(ev):
                continue
            if self.out.write([self.render.line(ev, json.dumps(ev, separators=(",", ":")))]):
                return False
            self.printed += 1
        return True

    def check_restart(self) -> bool:
        """A new run of the agent numbers from 1 again: resume from its start, and say so. False if unreachable."""
        try:
            head, _first, started = self.agent.head()
        except ObserveError as exc:
            self.note(f"retrying: {exc}")
            return False
        if head < self.after or abs(started - self.started) > RESTART_SLACK_S:
            self.gaps += 1
            self.note(f"the agent restarted (last seq seen {self.after}, its seq is now {head}); events while it "
                      f"was down were not seen; resuming from its first event")
            self.after = 0
        self.started = started
        return True

    def run(self) -> int:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        backoff = BACKOFF_FIRST_S
        first = True
        while True:
            # Reconnect only to an agent whose run is known: connecting first could resume a new run
            # from the old run's seq and skip its events.
            if not first and not self.check_restart():
                backoff = self._sleep(backoff)
                continue
            first = False
            params = {**self.query.ws_params(), "after": str(self.after)}
            try:
                ws = connect(self.agent.ws_url(params), additional_headers=self.agent.headers(),
                             open_timeout=self.agent.timeout, max_size=None, ping_interval=20, ping_timeout=20)
            except InvalidStatus as exc:
                code = exc.response.status_code
                if code in (401, 403):
                    raise ObserveError(f"the agent at {self.agent.url} refused the WebSocket ({code}); give its "
                                       f"token with --token-file PATH or ${TOKEN_ENV}") from None
                self.note(f"WebSocket refused ({code}); retrying in {backoff:.1f}s")
                backoff = self._sleep(backoff)
                continue
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.note(f"cannot connect to {self.agent.url} ({exc}); retrying in {backoff:.1f}s")
                backoff = self._sleep(backoff)
                continue
            with ws:
                try:
                    while True:
                        try:
                            raw = ws.recv(timeout=RECV_POLL_S)
                        except TimeoutError:
                            if self.out.reader_gone():
                                self.out.mark_closed()
                                return 0
                            continue
                        backoff = BACKOFF_FIRST_S   # a working stream: the next outage starts from a short wait
                        if not self.handle(raw if isinstance(raw, str) else raw.decode()):
                            return 0
                except ConnectionClosed as exc:
                    rcvd = exc.rcvd
                    if rcvd is not None and rcvd.code == POLICY_VIOLATION:
                        raise ObserveError(f"the agent rejected the query: {rcvd.reason}") from None
                    what = f"code {rcvd.code}{', ' + rcvd.reason if rcvd.reason else ''}" if rcvd else "no close frame"
                    self.note(f"stream closed ({what}); reconnecting after seq {self.after} in {backoff:.1f}s")
            # Also after a clean close: an agent shutting down accepts and closes (1001) until it is gone.
            backoff = self._sleep(backoff)

    def _sleep(self, backoff: float) -> float:
        time.sleep(backoff)
        return min(backoff * 2, BACKOFF_MAX_S)


def _on_sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise Stop


def observe_main(args: argparse.Namespace, render: Renderer) -> int:
    """Runs `conn-tracer observe`; 0 on success or Ctrl-C/SIGTERM, 1 if the agent cannot be used, 2 on bad input."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    out = Output(sys.stdout)
    try:
        since = parse_since(args.since, time.time()) if args.since else None
        if args.last is not None and args.last < 0:
            raise ValueError(f"--last must be 0 or more, got {args.last}")
        if args.types:
            from app.cli import EVENT_TYPE_CHOICES

            bad = [t for t in args.types.split(",") if t.strip() and t.strip() not in EVENT_TYPE_CHOICES]
            if bad:
                raise ValueError(f"--type {bad[0]!r}: expected one of {', '.join(EVENT_TYPE_CHOICES)}")
    except ValueError as exc:
        sys.stderr.write(f"conn-tracer: {exc}\n")
        return 2
    last = args.last if args.last is not None else (None if args.follow or since is not None else DEFAULT_LAST)
    query = Query.from_args(args)
    try:
        agent = Agent(args.url, read_token(args.token_file), args.timeout)
        if not args.no_header and (head_line := render.header()) is not None:
            out.write([head_line])
        if last is None and since is None:
            events: list[Event] = []
            head, _first, started = agent.head()
        else:
            events, head, started = history(agent, query, last, since)
        for ev in events:
            if out.write([render.line(ev)]):
                return 0
        if not args.follow:
            return 0
        return Follower(agent, query, render, out, head, started).run()
    except ObserveError as exc:
        sys.stderr.write(f"conn-tracer: {exc}\n")
        return 1
    except (KeyboardInterrupt, Stop):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
