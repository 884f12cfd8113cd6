"""ConnectionTable: every open connection plus a bounded history of closed ones.

A connection's state is its latest event record: every record carries the whole
connection (tuple, owner, counters, state), so applying an event is a dict lookup
and two stores. Text and the public Connection model are made only when asked for.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Iterable
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any

from app.bpf.event import (
    BYTES_RECEIVED,
    BYTES_RETRANS,
    BYTES_SENT,
    CGROUP_ID,
    CLOSE_REASON,
    CLOSE_REASON_NAMES,
    COMM,
    CONN_ID,
    CR_UNKNOWN,
    DADDR,
    DPORT,
    EV_CLOSE,
    FAMILY,
    FAMILY_NAMES,
    NETNS,
    PID,
    RETRANS_SEGS,
    ROLE,
    ROLE_NAMES,
    RTTVAR_US,
    SADDR,
    SPORT,
    SRTT_US,
    ST_CLOSE,
    START_NS,
    STATE,
    TCP_STATES,
    TS_NS,
    TYPE,
    EventRecord,
)
from app.filters import Predicate
from app.models import Connection, Texts, conn_id_number, conn_id_text, rtt_values
from app.speedups import speedups
from app.traffic import TrafficTotals

ConnKey = tuple[int, int, bytes, int, bytes, int]
"""A socket's identity across sources: netns, family (4|6), local address and port, remote ones."""


def conn_key(rec: EventRecord) -> ConnKey:
    return (rec[NETNS], rec[FAMILY], rec[SADDR], rec[SPORT], rec[DADDR], rec[DPORT])


class ConnEntryPy:
    """One connection: its latest record, plus what records alone do not say. (The reference for the
    C type app._speedups.ConnEntry, which `ConnEntry` names where that is built.)"""

    __slots__ = ("rec", "events", "pid", "comm", "close_ns", "preexisting", "missing")

    def __init__(self, rec: EventRecord, preexisting: bool = False) -> None:
        self.rec = rec
        self.events = 0 if preexisting else 1
        # Once known the owner stays: a later record without one must not erase it.
        self.pid: int = rec[PID]
        self.comm: bytes = rec[COMM]
        self.close_ns = 0
        self.preexisting = preexisting
        self.missing = 0   # sweeps in a row that did not find this socket in the kernel


if TYPE_CHECKING:
    ConnEntry = ConnEntryPy
else:
    ConnEntry = speedups.ConnEntry if speedups is not None else ConnEntryPy


def connection_model(c: ConnEntry, now_ns: int, texts: Texts) -> Connection:
    """The public shape of a table entry; duration runs to now while open."""
    r = c.rec
    fam = r[FAMILY]
    start = r[START_NS]
    closed = c.close_ns != 0
    end = c.close_ns if closed else max(now_ns, start)
    srtt, rttvar, connect = rtt_values(r)
    cgroup, container = texts.cgroup_and_container(r[CGROUP_ID])
    return Connection.model_construct(
        id=conn_id_text(r[CONN_ID]), family=FAMILY_NAMES[fam], role=ROLE_NAMES[r[ROLE]],
        state=TCP_STATES.get(r[STATE], str(r[STATE])),
        src_addr=texts.addr(r[SADDR], fam), src_port=r[SPORT], dst_addr=texts.addr(r[DADDR], fam),
        dst_port=r[DPORT], pid=c.pid or None, comm=texts.comm(c.comm) if c.pid else None,
        bytes_sent=r[BYTES_SENT], bytes_received=r[BYTES_RECEIVED], bytes_retrans=r[BYTES_RETRANS],
        started_at=texts.ts(start), closed_at=texts.ts(c.close_ns) if closed else None,
        duration_ms=(end - start) / 1e6, netns=r[NETNS], preexisting=c.preexisting, events=c.events,
        retrans_segs=r[RETRANS_SEGS], srtt_us=srtt, rttvar_us=rttvar, connect_us=connect,
        close_reason=CLOSE_REASON_NAMES.get(r[CLOSE_REASON]), cgroup=cgroup, container_id=container,
        host=texts.host,
    )


class ConnectionTable:
    """Applies event records; open connections in a dict, closed ones in a bounded, oldest-evicted history.

    `max_open_connections` bounds memory too: if close events are lost (kernel ring buffer
    full), entries for connections that are gone would otherwise stay forever.
    Keys are the kernel's connection numbers (negative for connections found at start-up).
    """

    def __init__(self, texts: Texts, max_closed_connections: int = 10_000,
                 max_open_connections: int = 262_144) -> None:
        self.texts = texts
        self.max_closed = max_closed_connections
        self.max_open = max_open_connections
        # Both ordered by last activity (open: move_to_end on each event; closed: by close time).
        self._open: OrderedDict[int, ConnEntry] = OrderedDict()
        self._closed: OrderedDict[int, ConnEntry] = OrderedDict()
        self.evicted_closed = 0
        self.evicted_open = 0
        # Closed connections' final counters, by role and close reason (also byte_totals()'s closed part).
        self.traffic = TrafficTotals()
        # Key -> id of connections read from sock_diag at start-up, to drop such an entry if the
        # kernel reports the same socket too (it was opening while we attached).
        self._pre_keys: dict[ConnKey, int] = {}
        # Only a connection that began before the sock_diag dump can be such a twin: later ones skip the check.
        self._twins_before_ns = 0

    def apply(self, rec: EventRecord) -> None:
        """Creates or updates the connection of `rec`."""
        self.apply_many([rec])

    def apply_many(self, recs: list[EventRecord]) -> None:
        """Creates or updates the connection of each record, in order (in C where it is built)."""
        if speedups is None:
            self.apply_many_py(recs)
            return
        op, cl = self._open, self._closed
        closes, evicted = speedups.table_apply(recs, op, cl, op.move_to_end, cl.popitem, self._first_sight,
                                               self._twins_before_ns, self.max_open, self.max_closed)
        self.evicted_closed += evicted
        if closes:
            self.traffic.on_closes(closes)

    def apply_many_py(self, recs: list[EventRecord]) -> None:
        """apply_many() in Python: the reference for the C helper. A new connection, an update and a
        close are inlined; the rare first sightings go through _first_sight()."""
        op = self._open
        cl = self._closed
        get = op.get
        move = op.move_to_end
        first_sight = self._first_sight
        max_open = self.max_open
        keep_closed = self._keep_closed
        twins_before = self._twins_before_ns
        closes = []
        for rec in recs:
            cid = rec[CONN_ID]
            c = get(cid)
            if c is None:
                if cid in cl or rec[START_NS] <= twins_before or len(op) >= max_open or rec[TYPE] == EV_CLOSE:
                    first_sight(rec)
                else:
                    op[cid] = ConnEntry(rec)
                continue
            c.rec = rec
            c.events += 1
            if rec[PID]:
                c.pid = rec[PID]
                c.comm = rec[COMM]
            if rec[TYPE] != EV_CLOSE:
                move(cid)
                continue
            c.close_ns = rec[TS_NS] or 1
            del op[cid]
            closes.append(rec)
            keep_closed(cid, c)
        if closes:
            self.traffic.on_closes(closes)

    def _first_sight(self, rec: EventRecord) -> None:
        """A record of a connection that is not open: a late event after its close, or a new one
        that may have a start-up twin, may overfill the table or closes at once."""
        cid = rec[CONN_ID]
        c = self._closed.get(cid)
        if c is not None:
            # A late event after close (records of two CPUs can interleave): the close
            # record already holds the final counters.
            c.events += 1
            return
        op = self._open
        c = op[cid] = ConnEntry(rec)
        if self._pre_keys:
            self._drop_preexisting_twin(c)
        if len(op) > self.max_open:
            op.popitem(last=False)
            self.evicted_open += 1
        if rec[TYPE] == EV_CLOSE:
            c.close_ns = rec[TS_NS] or 1
            del op[cid]
            self.traffic.on_closes([rec])
            self._keep_closed(cid, c)

    def _keep_closed(self, cid: int, c: ConnEntry) -> None:
        """Into the bounded history of closed connections (the oldest leaves)."""
        if self.max_closed <= 0:
            self.evicted_closed += 1
            return
        cl = self._closed
        cl[cid] = c
        while len(cl) > self.max_closed:
            cl.popitem(last=False)
            self.evicted_closed += 1

    def _drop_preexisting_twin(self, c: ConnEntry) -> None:
        pre = self._pre_keys.pop(conn_key(c.rec), None)
        if pre is not None:
            twin = self._open.pop(pre, None)
            if twin is not None and not c.pid:
                c.pid, c.comm = twin.pid, twin.comm

    def restore(self, recs: Iterable[EventRecord]) -> int:
        """Adds open connections the kernel was already tracking (pinned maps of an earlier run); returns how many."""
        n = 0
        for rec in recs:
            c = self._open[rec[CONN_ID]] = ConnEntry(rec)
            c.events = 0
            n += 1
        return n

    def add_preexisting(self, recs: Iterable[EventRecord]) -> int:
        """Adds connections found open at start-up (sock_diag), unless the kernel reported them; returns how many."""
        known = {conn_key(c.rec) for c in self._open.values()}
        n = 0
        for rec in recs:
            key = conn_key(rec)
            if key in known:
                continue
            self._open[rec[CONN_ID]] = ConnEntry(rec, preexisting=True)
            self._pre_keys[key] = rec[CONN_ID]
            self._twins_before_ns = max(self._twins_before_ns, rec[TS_NS])
            n += 1
        return n

    def byte_totals(self) -> tuple[int, int]:
        """Payload bytes sent and received over every connection in the table's life (open ones as of now)."""
        # Once a second, from History: ~13 ms per 100,000 open connections here (most of it memory reads).
        recs = list(map(_rec_of, self._open.values()))
        sent, received = self.traffic.closed_bytes()
        return sent + sum(map(_sent_of, recs)), received + sum(map(_received_of, recs))

    def quiet_keys(self, last_before_ns: int) -> set[ConnKey]:
        """Keys of open connections whose latest record is older than `last_before_ns` (what a sweep asks about)."""
        return {conn_key(c.rec) for c in self._open.values() if c.rec[TS_NS] < last_before_ns}

    def converge(self, kernel: dict[ConnKey, EventRecord], asked: set[ConnKey], before_ns: int,
                 now_ns: int, tracked: Iterable[EventRecord] = ()) -> list[EventRecord]:
        """Brings open connections in line with a sweep of the kernel's sockets (`kernel`, by key): states and
        counters that moved without an event are taken from it.

        `tracked` are the sockets the tracer's own map holds (with their ids): one the table lacks (all
        its records lost) and the sweep found is added, in the state the sweep saw.
        Only connections whose key the sweep `asked` about are judged. One it did not find twice in a row
        (and that began before the sweep) is over although its close never arrived (a full ring): the returned
        close records (reason unknown) end it, for the caller to publish. States the kernel reports
        differently are corrected in place (no event: transitions such as CLOSE_WAIT emit none).
        Preexisting connections also take the sweep's counters.
        """
        closes = []
        op = self._open
        for rec in tracked:
            if rec[CONN_ID] not in op and rec[CONN_ID] not in self._closed:
                k = kernel.get(conn_key(rec))
                if k is not None:
                    self.restore([replaced(rec, {STATE: k[STATE]})])
        for c in list(op.values()):
            r = c.rec
            key = conn_key(r)
            if key not in asked or r[START_NS] >= before_ns:
                continue
            k = kernel.get(key)
            if k is None:
                c.missing += 1
                if c.missing >= 2:
                    if c.preexisting:
                        self._pre_keys.pop(conn_key(r), None)
                    closes.append(replaced(r, {TS_NS: now_ns, TYPE: EV_CLOSE, STATE: ST_CLOSE,
                                               CLOSE_REASON: CR_UNKNOWN}))
                continue
            c.missing = 0
            if c.preexisting:
                c.rec = replaced(r, {i: k[i] for i in (BYTES_SENT, BYTES_RECEIVED, BYTES_RETRANS, SRTT_US,
                                                        RTTVAR_US, RETRANS_SEGS, STATE)})
            else:
                # The kernel coalesces data events, so a connection that went quiet right after
                # moving data shows its last bytes only here; states such as CLOSE_WAIT emit nothing.
                fresh = {i: k[i] for i in (BYTES_SENT, BYTES_RECEIVED, BYTES_RETRANS, RETRANS_SEGS) if k[i] > r[i]}
                if k[STATE] != r[STATE]:
                    fresh[STATE] = k[STATE]
                if fresh:
                    if k[SRTT_US]:
                        fresh.update({SRTT_US: k[SRTT_US], RTTVAR_US: k[RTTVAR_US]})
                    c.rec = replaced(r, fresh)
        return closes

    def knows(self, conn_id: int) -> bool:
        """Whether a connection with this kernel number is open or in the closed history."""
        return conn_id in self._open or conn_id in self._closed

    @property
    def preexisting_count(self) -> int:
        return len(self._pre_keys)

    @property
    def open_count(self) -> int:
        return len(self._open)

    @property
    def closed_count(self) -> int:
        return len(self._closed)

    def get(self, conn_id: str) -> Connection | None:
        cid = conn_id_number(conn_id)
        if cid is None:
            return None
        c = self._open.get(cid) or self._closed.get(cid)
        return connection_model(c, time.monotonic_ns(), self.texts) if c is not None else None

    def query(self, state: str = "all", pred: Predicate | None = None, limit: int = 1000) -> list[Connection]:
        """Connections matching `state` (open|closed|all) and `pred`, newest activity first."""
        sources: list[Iterable[ConnEntry]] = []
        if state in ("open", "all"):
            sources.append(reversed(self._open.values()))
        if state in ("closed", "all"):
            sources.append(reversed(self._closed.values()))
        if limit <= 0:
            return []
        if len(sources) == 1:
            # Open ones are in last-activity order already; closed ones in close order.
            it: Iterable[ConnEntry] = sources[0]
        else:
            it = heapq.merge(*sources, key=_last_ns, reverse=True)
        out: list[Connection] = []
        now_ns = time.monotonic_ns()
        for c in it:
            if pred is None or pred(c.rec):
                out.append(connection_model(c, now_ns, self.texts))
                if len(out) >= limit:
                    break
        return out


_rec_of = attrgetter("rec")
_sent_of = itemgetter(BYTES_SENT)
_received_of = itemgetter(BYTES_RECEIVED)


def replaced(rec: EventRecord, values: dict[int, Any]) -> EventRecord:
    """`rec` with the fields at these positions replaced."""
    out = list(rec)
    for i, v in values.items():
        out[i] = v
    return tuple(out)


def _last_ns(c: ConnEntry) -> Any:
    return c.rec[TS_NS]
