"""Events (the public JSON objects, as dicts) -> lines for people (a fixed-width table) or for tools (CSV, JSON).

Shared by `trace` (events from our own tracer) and `observe` (events from a running agent's API),
so both print the same columns. A field an event lacks, or holds as null, prints as `-`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import select
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

TimeMode = Literal["local", "clock", "relative", "utc"]
OutputFormat = Literal["table", "json", "csv"]

# Control messages of WS /ws, not events: they go to stderr, never into the table.
CONTROL_TYPES = frozenset({"dropped", "overwritten"})

CSV_FIELDS = (
    "seq", "ts", "type", "conn_id", "host", "family", "role", "state", "src_addr", "src_port", "dst_addr", "dst_port",
    "pid", "comm", "bytes_sent", "bytes_received", "bytes_retrans", "duration_ms", "close_reason", "srtt_us",
    "rttvar_us", "retrans_segs", "connect_us", "cgroup", "container_id", "netns",
)

NONE = "-"
MAX_TRACKED_STARTS = 65536   # connections whose start time is remembered for the close's duration


def human_bytes(n: Any) -> str:
    """1023B, 1.0KiB, 12.3MiB, ... ("-" for a missing value)."""
    if not isinstance(n, int):
        return NONE
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return f"{n}B"  # not reached


def human_duration_ms(ms: Any) -> str:
    """Milliseconds as 0.42ms, 153ms, 12.3s, 5m02s, 3h04m ("-" if missing)."""
    if not isinstance(ms, (int, float)):
        return NONE
    if ms < 10:
        return f"{ms:.2f}ms"
    if ms < 1000:
        return f"{ms:.0f}ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def us_as_ms(us: Any) -> str:
    """Microseconds shown in ms with two decimals ("-" if missing)."""
    return f"{us / 1000:.2f}" if isinstance(us, (int, float)) else NONE


def endpoint(addr: Any, port: Any) -> str:
    """`1.2.3.4:80`, `[::1]:80` (brackets as ss prints IPv6)."""
    if addr is None:
        return NONE
    a = str(addr)
    return f"[{a}]:{port}" if ":" in a else f"{a}:{port}"


def text(v: Any) -> str:
    return NONE if v is None or v == "" else str(v)


def zone_label(offset_s: int) -> str:
    """UTC, UTC+01, UTC-03:30: the local zone as the time column's header says it."""
    if offset_s == 0:
        return "UTC"
    sign = "+" if offset_s > 0 else "-"
    h, m = divmod(abs(offset_s) // 60, 60)
    return f"UTC{sign}{h:02d}" + (f":{m:02d}" if m else "")


def parse_ts(ts: Any) -> datetime | None:
    """The API's ISO 8601 UTC timestamp ('...Z') as an aware datetime; None if absent or bad."""
    if not isinstance(ts, str):
        return None
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


@dataclass
class Column:
    title: str
    width: int
    get: Callable[[Mapping[str, Any]], str]
    left: bool = False


@dataclass
class Renderer:
    """Formats events one line each; remembers when each connection started to show the duration on `close`."""

    output: OutputFormat = "table"
    time_mode: TimeMode = "local"
    wide: bool = False
    start_epoch: float = field(default_factory=time.time)
    _starts: dict[str, datetime] = field(default_factory=dict, init=False)
    _columns: list[Column] = field(default_factory=list, init=False)
    _zone: str = field(default="", init=False)

    def __post_init__(self) -> None:
        offset = datetime.now().astimezone().utcoffset()
        self._zone = zone_label(int(offset.total_seconds()) if offset is not None else 0)
        self._columns = self._build_columns()

    # --- columns ---------------------------------------------------------------------------
    def _time_title(self) -> str:
        if self.time_mode == "relative":
            return "TIME(s)"
        return f"TIME({'UTC' if self.time_mode == 'utc' else self._zone})"

    def _time(self, ev: Mapping[str, Any]) -> str:
        dt = parse_ts(ev.get("ts"))
        if dt is None:
            return NONE
        if self.time_mode == "relative":
            return f"{dt.timestamp() - self.start_epoch:.3f}"
        if self.time_mode == "utc":
            return dt.strftime("%H:%M:%S.%f")[:-3]
        local = dt.astimezone()
        return local.strftime("%H:%M:%S") if self.time_mode == "clock" else local.strftime("%H:%M:%S.%f")[:-3]

    def _build_columns(self) -> list[Column]:
        addr_w = 47 if self.wide else 21   # [full IPv6]:65535 / 255.255.255.255:65535
        time_w = {"relative": 10, "clock": 8}.get(self.time_mode, 12)
        cols = [Column(self._time_title(), max(time_w, len(self._time_title())), self._time, left=True)]
        if self.wide:
            cols.append(Column("ID", 10, lambda e: text(e.get("conn_id")), left=True))
        cols += [
            Column("EVENT", 11, lambda e: text(e.get("type")), left=True),
            Column("PID", 7, lambda e: text(e.get("pid"))),
            Column("COMM", 16 if self.wide else 12, self._comm, left=True),
            Column("ROLE", 6, lambda e: text(e.get("role")), left=True),
            Column("LOCAL", addr_w, lambda e: endpoint(e.get("src_addr"), e.get("src_port")), left=True),
            Column("REMOTE", addr_w, lambda e: endpoint(e.get("dst_addr"), e.get("dst_port")), left=True),
            Column("STATE", 11, lambda e: text(e.get("state")), left=True),
            Column("TX", 8, lambda e: human_bytes(e.get("bytes_sent"))),
            Column("RX", 8, lambda e: human_bytes(e.get("bytes_received"))),
            Column("DUR", 8, self._duration),
            Column("RTT_ms", 7, lambda e: us_as_ms(e.get("srtt_us"))),
            Column("RETR", 4, lambda e: text(e.get("retrans_segs"))),
            Column("REASON", 8, lambda e: text(e.get("close_reason")), left=True),
        ]
        if self.wide:
            cols += [Column("CONN_ms", 7, lambda e: us_as_ms(e.get("connect_us"))),   # SYN to ESTABLISHED
                     Column("HOST", 12, lambda e: text(e.get("host")), left=True),
                     Column("CONTAINER", 12, lambda e: text(e.get("container_id"))[:12], left=True)]
        return cols

    def _comm(self, ev: Mapping[str, Any]) -> str:
        c = text(ev.get("comm"))
        w = 16 if self.wide else 12
        return c if len(c) <= w else c[:w]

    def _duration(self, ev: Mapping[str, Any]) -> str:
        """On close: the connection's life, from the event (duration_ms) or from its first event seen here."""
        if ev.get("type") != "close":
            return ""
        if isinstance(ev.get("duration_ms"), (int, float)):
            return human_duration_ms(ev["duration_ms"])
        start = self._starts.get(str(ev.get("conn_id")))
        end = parse_ts(ev.get("ts"))
        if start is None or end is None:
            return NONE
        return human_duration_ms((end - start).total_seconds() * 1000)

    def _remember(self, ev: Mapping[str, Any]) -> None:
        cid = ev.get("conn_id")
        if cid is None:
            return
        key = str(cid)
        if ev.get("type") == "close":
            self._starts.pop(key, None)
            return
        if key not in self._starts:
            ts = parse_ts(ev.get("ts"))
            if ts is not None:
                if len(self._starts) >= MAX_TRACKED_STARTS:
                    self._starts.clear()   # bounded; a close then shows "-" for its duration
                self._starts[key] = ts

    # --- lines -----------------------------------------------------------------------------
    def header(self) -> str | None:
        """The header line (table and CSV), or None for JSON lines."""
        if self.output == "json":
            return None
        if self.output == "csv":
            return ",".join(CSV_FIELDS)
        return self._row([c.title for c in self._columns])

    def _row(self, cells: list[str]) -> str:
        parts = []
        for col, cell in zip(self._columns, cells, strict=True):
            parts.append(cell.ljust(col.width) if col.left else cell.rjust(col.width))
        return " ".join(parts).rstrip()

    def line(self, ev: Mapping[str, Any], raw_json: str | None = None) -> str:
        """One event as one line; `raw_json`, when given, is that event's JSON text (written as is)."""
        if self.output == "json":
            return raw_json if raw_json is not None else json.dumps(ev, separators=(",", ":"))
        if self.output == "csv":
            buf = io.StringIO()
            csv.writer(buf, lineterminator="").writerow(["" if ev.get(k) is None else ev[k] for k in CSV_FIELDS])
            return buf.getvalue()
        cells = [c.get(ev) for c in self._columns]   # the duration is read before this close forgets the start
        self._remember(ev)
        return self._row(cells)


class Output:
    """Writes lines to stdout; a closed reader (`| head`) ends the command quietly instead of raising."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.closed = False
        self.written = 0

    def write(self, lines: list[str]) -> int:
        """Writes the lines; returns how many could not be written (all of them once the reader is gone)."""
        if self.closed:
            return len(lines)
        if not lines:
            return 0
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except BrokenPipeError:
            self.mark_closed()
            return len(lines)   # what reached the pipe before it broke is unknown: count none as printed
        self.written += len(lines)
        return 0

    def mark_closed(self) -> None:
        """The reader went away: point stdout at /dev/null so the interpreter's final flush cannot fail."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)

    def reader_gone(self) -> bool:
        """True if stdout is a pipe whose reading end is closed (poll reports POLLERR on the write end)."""
        with contextlib.suppress(OSError, ValueError):
            p = select.poll()
            p.register(self.stream.fileno(), 0)
            return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
        return False

    def is_pipe(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            return stat.S_ISFIFO(os.fstat(self.stream.fileno()).st_mode)
        return False
