"""The fleet view (`conn-tracer fleet`): every exporting host's events, read from NATS JetStream.

No BPF and no root: a service like `serve` whose events come from the stream the agents export
to (app/export.py) instead of a tracer, served by the same routers and dashboard. Its table and
hub hold records of many hosts: kernel-shaped tuples (so the same filters apply) rebuilt from
each event's JSON, with the host and the event's text after the kernel's fields.

Ids: a connection's id in the fleet view is `<host>:<id on that host>` (the agent's ids are
unique per host), and each event's `conn_id` is written the same way; events keep the agent's
own seq as `host_seq` and get the fleet view's `seq`.

Reading: a durable push consumer on the stream, positioned at the first message the fleet view
has not applied. At start that is the first message the stream holds: the table is rebuilt from
what the stream still holds, then goes on live in one ordered delivery, so no gap and no
duplicate. After a NATS reconnect, or a hole in the consumer's sequence (a message lost on the
way), the consumer is placed again after the last stream seq applied; anything delivered twice
is dropped by stream seq, and an event stored twice by its (host, run, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import json
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from app.bpf.event import (
    CLOSE_REASON_NAMES,
    CONN_ID,
    EV_SYN_RECV,
    EV_SYN_SENT,
    EVENT_TYPE_NUMBERS,
    FAMILY_NUMBERS,
    RECORD_FIELDS,
    ROLE_NUMBERS,
    START_NS,
    TCP_STATE_NUMBERS,
    TS_NS,
    TYPE,
    EventRecord,
)
from app.config import Settings
from app.export import H_HOST, H_RUN, MAX_MESSAGE_BYTES, connect_options, ensure_stream
from app.filters import FLEET_HOST, Filter, Predicate
from app.hub import EventHub
from app.models import Connection, Event, EventWriter, Texts
from app.pipeline import Pipeline
from app.service import GC_YOUNG_THRESHOLD, Core, Source
from app.table import ConnectionTable, ConnEntry

log = logging.getLogger(__name__)

HOST = FLEET_HOST          # record slot: the host name
TEXT = FLEET_HOST + 1      # record slot: the event's fleet JSON after '{"seq":N,'
FAILED = frozenset({"refused", "timeout", "reset"})
CONNECTION_FIELDS = frozenset(Connection.model_fields)
NATS_MAX_PENDING = 64 << 20   # nats-server's default bound on bytes waiting to be sent to one client
# Messages in flight to us (each up to MAX_MESSAGE_BYTES): half that bound at most, else a fleet view
# that falls behind under churn is cut off as a slow consumer and loops reconnecting (bench/export.py
# at max rate with 256 in flight: five cuts in one run, then no consumer at all).
MAX_ACK_PENDING = NATS_MAX_PENDING // (2 * MAX_MESSAGE_BYTES)   # 64
HEARTBEAT_S = 2.0          # the consumer says it is alive this often when idle
FIRST_CONNECT_S = 3.0      # how long start-up tries to reach NATS before it gives up
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_S = timedelta(seconds=1)

# The order FleetTable.record() writes a record in; a change of the kernel record's fields must change it too.
_FLEET_FIELDS = ("ts_ns", "start_ns", "conn_id", "bytes_sent", "bytes_received", "bytes_retrans", "cgroup_id", "pid",
                 "netns", "srtt_us", "rttvar_us", "retrans_segs", "connect_us", "saddr", "daddr", "sport", "dport",
                 "family", "type", "role", "state", "oldstate", "flags", "close_reason", "comm")
if RECORD_FIELDS != _FLEET_FIELDS:
    raise ImportError("app/fleet.py: FleetTable.record() does not follow app/bpf/event.py's RECORD_FIELDS")
_SYN_TYPES = frozenset({EV_SYN_SENT, EV_SYN_RECV})
_CLOSE_REASONS = {name: n for n, name in CLOSE_REASON_NAMES.items()}
_SECONDS: dict[str, int] = {}   # "2026-11-30T22:30:23" -> its epoch second (events of one second share it)


class FleetDoc(msgspec.Struct, gc=False):
    """What the fleet view reads of an exported event (docs/API.md names); other fields stay in its text.

    Decoded by msgspec straight from the message: a third of the cost of json.loads into dicts here
    (measured), and a field missing or of the wrong type makes the event a bad one, as KeyError did."""

    seq: int
    ts: str
    type: str
    conn_id: str
    state: str
    bytes_sent: int
    bytes_received: int
    pid: int | None
    comm: str | None
    netns: int
    src_port: int
    dst_port: int
    family: str
    role: str
    bytes_retrans: int | None = None
    srtt_us: int | None = None
    rttvar_us: int | None = None
    retrans_segs: int | None = None
    connect_us: int | None = None
    close_reason: str | None = None
    host: str | None = None


_decode_batch = msgspec.json.Decoder(list[FleetDoc]).decode
_decode_one = msgspec.json.Decoder(FleetDoc).decode


def wall_ns(ts: str) -> int:
    """ISO 8601 UTC as the agents write it ("...T22:30:23.123456Z", or without a fraction) -> ns since the epoch."""
    if len(ts) == 27 and ts[19] == ".":   # the agents' own format: the second is cached, 6 digits follow
        sec = _SECONDS.get(ts[:19])
        if sec is not None:
            return sec * 1_000_000_000 + int(ts[20:26]) * 1000
    dot = ts.find(".")
    head = ts[:dot] if dot > 0 else ts.rstrip("Z")
    sec = _SECONDS.get(head)
    if sec is None:
        if len(_SECONDS) > 64:
            _SECONDS.clear()
        sec = _SECONDS[head] = (datetime.fromisoformat(head).replace(tzinfo=UTC) - _EPOCH) // _S
    us = int(ts[dot + 1:].rstrip("Z").ljust(6, "0")[:6]) if dot > 0 else 0
    return sec * 1_000_000_000 + us * 1000


def iso(ns: int) -> datetime:
    return datetime.fromtimestamp(ns // 1_000_000_000, UTC).replace(microsecond=ns // 1000 % 1_000_000)


class FleetWriter(EventWriter):
    """Fleet records keep their JSON: writing an event is adding its fleet seq."""

    def __init__(self) -> None:
        super().__init__(Texts(0))

    def json_many(self, first_seq: int, recs: list[EventRecord]) -> list[str]:
        return [f'{{"seq":{seq},{rec[TEXT]}' for seq, rec in enumerate(recs, first_seq)]

    def event(self, seq: int, rec: EventRecord) -> Event:
        return Event.model_validate_json(self.json_many(seq, [rec])[0])


class FleetTable(ConnectionTable):
    """The connection table over many hosts: keyed by `<host>:<id>`, times in wall-clock ns."""

    def __init__(self, max_closed_connections: int, max_open_connections: int) -> None:
        super().__init__(Texts(0), max_closed_connections, max_open_connections)

    def record(self, host: str, key: str, doc: FleetDoc, text: str) -> EventRecord:
        """A kernel-shaped record of one event, then HOST and TEXT: the fields that filters and the
        table look at are set (names as numbers), the others (addresses, cgroup) are 0: the text has them.

        One tuple display in RECORD_FIELDS order (_FLEET_FIELDS, checked at import), not a list filled
        by position and copied: with cc377cd's other changes, apply_message 5.6-8.6 -> 5.0-6.0 us per event."""
        ts = wall_ns(doc.ts)
        typ = EVENT_TYPE_NUMBERS.get(doc.type, 0)
        if typ in _SYN_TYPES:
            start = ts   # a connection's first event: its start
        else:
            known = self._open.get(key) or self._closed.get(key)  # type: ignore[call-overload]
            start = known.rec[START_NS] if known is not None else ts
        # srtt, rttvar, retrans_segs, connect_us: for the traffic totals (per close), like the agents' own
        return (ts, start, key, doc.bytes_sent, doc.bytes_received, doc.bytes_retrans or 0, 0, doc.pid or 0,
                doc.netns, doc.srtt_us or 0, doc.rttvar_us or 0, doc.retrans_segs or 0, doc.connect_us or 0, 0, 0,
                doc.src_port, doc.dst_port, FAMILY_NUMBERS[doc.family], typ, ROLE_NUMBERS[doc.role],
                TCP_STATE_NUMBERS.get(doc.state, 0), 0, 0, _CLOSE_REASONS.get(doc.close_reason or "", 0),
                doc.comm or "", host, text)

    def _first_sight(self, rec: EventRecord) -> None:
        if rec[TYPE] in _SYN_TYPES:
            # An id seen closed that starts again: an agent restarted without its pinned id counter
            # (--no-pin). A new connection, not a late event of the old one.
            self._closed.pop(rec[CONN_ID], None)  # type: ignore[call-overload]
        super()._first_sight(rec)

    def _model(self, c: ConnEntry, now_ns: int) -> Connection:
        r = c.rec
        doc = json.loads("{" + r[TEXT])
        fields = {k: v for k, v in doc.items() if k in CONNECTION_FIELDS}
        start = r[START_NS]
        closed = c.close_ns != 0
        end = c.close_ns if closed else max(now_ns, start)
        fields.update(id=doc["conn_id"], pid=c.pid or None, comm=c.comm if c.pid else None,
                      started_at=iso(start), closed_at=iso(c.close_ns) if closed else None,
                      duration_ms=(end - start) / 1e6, events=c.events, preexisting=False)
        return Connection.model_validate(fields)

    def get(self, conn_id: str) -> Connection | None:
        c = self._lookup(conn_id)
        return self._model(c, time.time_ns()) if c is not None else None

    def _lookup(self, key: str) -> ConnEntry | None:
        # The base table's dicts are typed by the kernel's int ids; here the keys are "<host>:<id>".
        return self._open.get(key) or self._closed.get(key)  # type: ignore[call-overload,no-any-return]

    def query(self, state: str = "all", pred: Predicate | None = None, limit: int = 1000) -> list[Connection]:
        if limit <= 0:
            return []
        out: list[Connection] = []
        now_ns = time.time_ns()
        # As the base table: each dict is ordered by last activity (open) or close (closed); merge them.
        sources: list[Iterable[ConnEntry]] = []
        if state in ("open", "all"):
            sources.append(reversed(self._open.values()))
        if state in ("closed", "all"):
            sources.append(reversed(self._closed.values()))
        entries = heapq.merge(*sources, key=lambda e: e.rec[TS_NS], reverse=True)
        for c in entries:
            if pred is None or pred(c.rec):
                out.append(self._model(c, now_ns))
                if len(out) >= limit:
                    break
        return out

    def per_host(self) -> dict[str, tuple[int, int]]:
        """host -> (open, closed kept)."""
        out: dict[str, list[int]] = {}
        for i, d in enumerate((self._open, self._closed)):
            for c in d.values():
                out.setdefault(c.rec[HOST], [0, 0])[i] += 1
        return {h: (v[0], v[1]) for h, v in out.items()}


class HostState:
    """What the fleet view knows of one exporting host."""

    __slots__ = ("name", "plain", "events", "failures", "lost_export", "duplicates", "last_seen", "runs")

    def __init__(self, name: str) -> None:
        self.name = name
        self.plain = json.dumps(name) == f'"{name}"'   # written in JSON as it is: no escapes needed
        self.events = 0
        self.failures = 0
        self.lost_export = 0
        self.duplicates = 0
        self.last_seen: str | None = None
        self.runs: dict[str, int] = {}   # the agent's run -> the latest seq applied from it


def _no_tracer(_settings: Settings) -> Source:
    raise RuntimeError("the fleet view has no tracer")


class FleetCore(Core):
    """The fleet view's service: NATS consumer -> table and hub; the same API as `serve` on top."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, _no_tracer)
        self.table = FleetTable(settings.max_closed_connections, settings.max_open_connections)
        self.hub = EventHub(FleetWriter(), settings.replay_events, settings.subscriber_queue_events)
        self.pipeline = Pipeline(self.table, self.hub)   # unused: records come from apply_message()
        self.hosts: dict[str, HostState] = {}
        self.last_stream_seq = 0      # the latest stream message applied
        self.redelivered = 0          # messages delivered again and dropped
        self.bad_events = 0           # lines that are not an event's JSON
        self.apply_errors = 0
        self.repositions = 0
        self.caught_up = False
        self._nc: Any = None
        self._sub: Any = None
        self._next_cseq = 1
        self._last_heard = time.monotonic()
        self._positioning: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._token = uuid.uuid4().hex[:8]
        self._last_error: str | None = None
        self._stream_created: Any = None   # tells the stream we read from one made again under its name

    # --- what the routes ask ---------------------------------------------------------
    @property
    def attach_mode(self) -> str:
        return "fleet"

    @property
    def host_name(self) -> str:
        return "fleet"

    def predicate(self, filt: Filter) -> Predicate | None:
        return filt.predicate()   # fleet records carry their host

    def conn_key(self, conn_id: str) -> Any:
        return conn_id if ":" in conn_id else None   # "<host>:<id>"

    def healthy(self) -> tuple[bool, str | None]:
        if self._nc is None or not self._nc.is_connected:
            return False, f"not connected to NATS at {self.settings.nats_url}"
        if not self.caught_up:
            return False, "rebuilding from the stream"
        return True, None

    def decode_errors(self) -> int:
        return self.bad_events

    def lost_export(self) -> int:
        return sum(h.lost_export for h in self.hosts.values())

    def host_stats(self) -> dict[str, dict[str, Any]] | None:
        counts = self.table.per_host() if isinstance(self.table, FleetTable) else {}
        return {name: {"events": h.events, "connections_open": counts.get(name, (0, 0))[0],
                       "connections_closed_kept": counts.get(name, (0, 0))[1], "failures": h.failures,
                       "lost_export": h.lost_export, "duplicates": h.duplicates, "last_seen": h.last_seen}
                for name, h in sorted(self.hosts.items())}

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Connects to NATS, makes sure of the stream, places the consumer at the stream's start."""
        url = self.settings.nats_url
        try:
            if not url:
                raise ValueError("no NATS server given: conn-tracer fleet --nats nats://HOST:4222")
            try:
                # nats-py retries a first connect as long as later reconnects (forever): bound it here.
                self._nc = await asyncio.wait_for(
                    nats.connect(**connect_options(self.settings, "conn-tracer fleet"),
                                 reconnected_cb=self._on_reconnected, error_cb=self._on_error),
                    FIRST_CONNECT_S)
            except Exception as exc:
                why = self._last_error or str(exc) or type(exc).__name__
                raise RuntimeError(f"cannot reach NATS at {url} ({why}); "
                                   "start nats-server -js there or fix --nats") from None
            await ensure_stream(self._nc.jetstream(), self.settings)
            await self._position()
        except BaseException as exc:
            self.start_error = exc
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.close()
                self._nc = None
            raise
        self._watchdog = asyncio.create_task(self._watch())
        self._history_task = asyncio.create_task(self.history.run())
        # The same allocation pattern as serve's (records kept by the replay buffer): the same tuning.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)

    def stop(self) -> None:
        for t in (self._watchdog, self._positioning, self._history_task):
            if t is not None:
                t.cancel()
        self._watchdog = self._positioning = self._history_task = None

    async def aclose(self) -> None:
        self.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None

    # --- reading the stream -----------------------------------------------------------------
    async def _position(self) -> None:
        """(Re)creates the durable consumer on a new delivery subject, after the last message applied."""
        nc = self._nc
        jsm = nc.jetstream()
        s = self.settings
        self.repositions += 1
        deliver = f"_CONNTRACER.fleet.{s.fleet_durable}.{self._token}.{self.repositions}"
        old = self._sub
        gen = self.repositions

        async def on_msg(msg: Any) -> None:
            if gen == self.repositions:   # else an earlier placement's delivery: ignored
                await self._on_msg(msg)

        self._sub = await nc.subscribe(deliver, cb=on_msg, pending_msgs_limit=4 * MAX_ACK_PENDING,
                                       pending_bytes_limit=1 << 30)
        self._next_cseq = 1
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        with contextlib.suppress(NotFoundError):
            await jsm.delete_consumer(s.nats_stream, s.fleet_durable)
        await ensure_stream(jsm, s)
        info = await jsm.stream_info(s.nats_stream)
        if self._stream_created is not None and info.created != self._stream_created:
            # Another stream of the same name (NATS came back without its store, or it was made
            # again): read it all; events already applied are dropped by their (host, run, seq).
            log.warning("fleet: stream %s was created again; reading it from its start", s.nats_stream)
            self.last_stream_seq = 0
        self._stream_created = info.created
        start = self.last_stream_seq + 1
        cfg = ConsumerConfig(
            durable_name=s.fleet_durable, deliver_subject=deliver, ack_policy=AckPolicy.ALL,
            max_ack_pending=MAX_ACK_PENDING, filter_subject=f"{s.nats_subject_prefix}.>", idle_heartbeat=HEARTBEAT_S,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start > 1 else DeliverPolicy.ALL,
            opt_start_seq=start if start > 1 else None, description="conn-tracer fleet view")
        await jsm.add_consumer(s.nats_stream, cfg)
        info = await jsm.stream_info(s.nats_stream)   # again: what it holds now that we read it
        if info.state.last_seq <= self.last_stream_seq or info.state.messages == 0:
            self.caught_up = True
        self._last_heard = time.monotonic()

    def _reposition(self, why: str) -> None:
        if self._positioning is not None and not self._positioning.done():
            return
        log.warning("fleet: placing the consumer again after stream seq %d: %s", self.last_stream_seq, why)

        async def run() -> None:
            try:
                await self._position()
            except Exception as exc:
                log.warning("fleet: could not place the consumer: %s", exc)

        self._positioning = asyncio.create_task(run())

    async def _on_reconnected(self) -> None:
        # Deliveries in flight during the outage may be lost: carry on from the last one applied.
        self._reposition("reconnected to NATS")

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        # Not while starting (start-up reports in one line), and once per distinct problem.
        if self._nc is not None and text != self._last_error:
            log.warning("fleet: NATS: %s", text)
        self._last_error = text

    async def _watch(self) -> None:
        # A consumer that went away (deleted, NATS restarted without it) sends no heartbeats.
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if (self._nc is not None and self._nc.is_connected
                    and time.monotonic() - self._last_heard > 3 * HEARTBEAT_S):
                self._reposition("no heartbeat from the consumer")

    async def _on_msg(self, msg: Any) -> None:
        self._last_heard = time.monotonic()
        if not msg.reply or (msg.headers and msg.headers.get("Status")):
            return   # an idle heartbeat
        md = msg.metadata
        if md.sequence.consumer != self._next_cseq and md.num_delivered == 1:
            self._reposition(f"consumer sequence {md.sequence.consumer}, expected {self._next_cseq}")
            return
        self._next_cseq = md.sequence.consumer + 1
        sseq = md.sequence.stream
        if sseq <= self.last_stream_seq:
            self.redelivered += 1
        else:
            self.last_stream_seq = sseq
            try:
                self.apply_message(msg.data, msg.headers or {}, msg.subject)
            except Exception:
                # A bug of ours must not stop the consumer; count it, loudly (but boundedly).
                self.apply_errors += 1
                if self.apply_errors <= 10:
                    log.exception("fleet: applying stream message %d failed", sseq)
        if md.num_pending == 0:
            self.caught_up = True
        with contextlib.suppress(Exception):
            await msg.ack()   # AckPolicy.ALL: acknowledges everything before it too

    def apply_message(self, data: bytes, headers: dict[str, str], subject: str) -> None:
        """One exported batch: its events, in order, into the table and the hub (duplicates dropped)."""
        lines = data.decode(errors="replace").split("\n")
        docs: list[FleetDoc | None]
        try:
            docs = list(_decode_batch("[" + ",".join(lines) + "]"))   # one parse for the batch
        except msgspec.MsgspecError:
            docs = [_decode_or_none(line) for line in lines]
        host = headers.get(H_HOST)
        run = headers.get(H_RUN, "")
        recs: list[EventRecord] = []
        table = self.table
        assert isinstance(table, FleetTable)
        record = table.record
        text_of = self._fleet_text
        # One message is one agent's run in seq order: the host's state is looked up once per host
        # seen in it (once, from an agent), its counters written back after the loop.
        state: HostState | None = None
        last = events = failures = 0
        last_ts: str | None = None
        for line, doc in zip(lines, docs, strict=True):
            if doc is None:
                self.bad_events += 1
                continue
            h = host or doc.host or subject.split(".")[-2]
            if state is None or h != state.name:
                if state is not None:
                    self._tally(state, run, last, events, failures, last_ts)
                state = self.hosts.get(h)
                if state is None:
                    state = self.hosts[h] = HostState(h)
                last = state.runs.get(run, 0)
                events = failures = 0
                last_ts = None
            seq = doc.seq
            if seq <= last:
                state.duplicates += 1
                continue
            if last and seq > last + 1:
                state.lost_export += seq - last - 1   # what its exporter could not buffer
            last = seq
            try:
                key = f"{h}:{doc.conn_id}"
                rec = record(h, key, doc, text_of(line, state, key, seq, doc))
            except (ValueError, KeyError, IndexError):   # a bad time, name or text: that event only
                self.bad_events += 1
                continue
            events += 1
            last_ts = doc.ts
            if doc.close_reason in FAILED and doc.type == "close":
                failures += 1
            recs.append(rec)
        if state is not None:
            self._tally(state, run, last, events, failures, last_ts)
        if recs:
            table.apply_many(recs)
            self.hub.publish_many(recs)

    @staticmethod
    def _tally(state: HostState, run: str, last: int, events: int, failures: int, last_ts: str | None) -> None:
        state.runs[run] = last
        state.events += events
        state.failures += failures
        if last_ts is not None:
            state.last_seen = last_ts

    @staticmethod
    def _fleet_text(line: str, host: HostState, key: str, seq: int, doc: FleetDoc) -> str:
        """The event's JSON as the fleet view serves it (without the leading '{"seq":N,')."""
        at = line.find('"conn_id":"') + 11
        cid = doc.conn_id
        if (host.plain and at > 11 and line.startswith(cid, at) and line[at + len(cid)] == '"'
                and doc.host is not None and line.startswith(f'{{"seq":{seq},')):
            # The agents' writer's own format: edit the text rather than write it all again.
            return f'"host_seq":{seq},{line[line.index(",", 7) + 1:at]}{host.name}:{line[at:]}'
        out = {k: v for k, v in json.loads(line).items() if k != "seq"}
        out.update(conn_id=key, host=host.name)
        return f'"host_seq":{seq},' + json.dumps(out, separators=(",", ":"))[1:]


def _decode_or_none(line: str) -> FleetDoc | None:
    try:
        return _decode_one(line)
    except msgspec.MsgspecError:
        return None
