"""The service lifecycle, outside the HTTP package: settings, tracer, table, hub, pipeline, WebSockets."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from app import sockdiag
from app.bpf.event import (
    CONN_ID,
    EV_SYN_SENT,
    FLAG_PID_FROM_CONNECT,
    NETNS,
    ROLE_CLIENT,
    ST_SYN_SENT,
    STATE,
    EventRecord,
    make_record,
)
from app.config import Settings
from app.filters import Filter, Predicate
from app.history import History, Totals
from app.hub import EventHub
from app.models import EventWriter, Texts, conn_id_number
from app.pipeline import Pipeline
from app.table import ConnectionTable, conn_key

if TYPE_CHECKING:
    from app.export import Exporter

log = logging.getLogger(__name__)

PENDING_POLL_S = 0.25        # how often the kernel's map of unanswered connects is read
PENDING_AGE_NS = 100_000_000  # a connect unanswered this long is listed before its SYN-ACK (or timeout)
GC_YOUNG_THRESHOLD = 10_000   # allocations between young-generation collections (CPython's default: 700)


class Source(Protocol):
    """What the API needs from a tracer (app.bpf.loader.Tracer, or a fake in tests)."""

    @property
    def attach_mode(self) -> str: ...

    @property
    def attached(self) -> bool: ...

    @property
    def reading(self) -> bool: ...

    def open(self) -> None: ...

    def start_reading(self, loop: asyncio.AbstractEventLoop, on_records: Callable[[bytes, int], None]) -> None: ...

    def drain(self) -> int: ...

    def lost_kernel(self) -> int: ...

    @property
    def resumed(self) -> bool: ...

    def tracked_sockets(self) -> list[tuple[int, EventRecord]]: ...

    def forget_sockets(self, keys: list[int]) -> None: ...

    def wall_offset(self, fresh_ns: int) -> int: ...

    def pending_connects(self, older_than_ns: int) -> list[Any]: ...

    def offer_adoption(self, recs: list[EventRecord]) -> None: ...

    def recursion_misses(self) -> int: ...

    def bad_records(self) -> int: ...

    def close(self) -> None: ...


TracerFactory = Callable[[Settings], Source]


def default_tracer_factory(settings: Settings) -> Source:
    from app.bpf.loader import Tracer  # only here: the API itself never imports bcc

    return Tracer(settings)


class Core:
    """Owns the components; the FastAPI lifespan drives start() and stop()."""

    def __init__(self, settings: Settings, tracer_factory: TracerFactory) -> None:
        self.settings = settings
        self.tracer_factory = tracer_factory
        self.tracer: Source | None = None
        # One mapping of the kernel's CLOCK_MONOTONIC to UTC for the whole run.
        self.texts = Texts(time.time_ns() - time.monotonic_ns(), settings.host_name)
        self.table = ConnectionTable(self.texts, settings.max_closed_connections, settings.max_open_connections)
        self.hub = EventHub(EventWriter(self.texts), settings.replay_events, settings.subscriber_queue_events)
        self.pipeline = Pipeline(self.table, self.hub)
        self.history = History(settings.history_seconds, self.totals)
        self._history_task: asyncio.Task[None] | None = None
        self.started_mono = time.monotonic()
        self.websockets: set[Any] = set()
        self.shutting_down = False
        self._refresh_task: asyncio.Task[None] | None = None
        self._pending_task: asyncio.Task[None] | None = None
        self.sweeps = 0
        self.sweep_closed = 0   # connections ended by a sweep: their close was never seen
        self.registry: Any = None  # set by create_app
        self.start_error: BaseException | None = None
        self.exporter: Exporter | None = None   # with settings.nats_url: every event to NATS JetStream

    @property
    def host_name(self) -> str:
        return self.settings.host_name

    def predicate(self, filt: Filter) -> Predicate | None:
        """The test for `filt` on this service's records: one host here, so `host` keeps all or nothing."""
        if filt.host is None:
            return filt.predicate()
        if filt.host != self.host_name:
            return _never
        return replace(filt, host=None).predicate()

    def conn_key(self, conn_id: str) -> Any:
        """A public connection id as the records key it (None if it is not one): the kernel's number here."""
        return conn_id_number(conn_id)

    def export_stats(self) -> dict[str, Any] | None:
        """The exporter's figures, None when not exporting."""
        return self.exporter.snapshot() if self.exporter is not None else None

    def host_stats(self) -> dict[str, dict[str, Any]] | None:
        """Per exporting host (fleet views only)."""
        return None

    def lost_export(self) -> int:
        """Events that did not reach NATS (buffer full, or behind the hub)."""
        return self.exporter.stats.dropped if self.exporter is not None else 0

    @property
    def attach_mode(self) -> str:
        return self.tracer.attach_mode if self.tracer is not None else "detached"

    def lost_kernel(self) -> int:
        return self.tracer.lost_kernel() if self.tracer is not None else 0

    def recursion_misses(self) -> int:
        return self.tracer.recursion_misses() if self.tracer is not None else 0

    def decode_errors(self) -> int:
        """Records that could not be decoded: a foreign size in the ring, or values the decoder rejects."""
        return self.pipeline.decode_errors + (self.tracer.bad_records() if self.tracer is not None else 0)

    def totals(self) -> Totals:
        """The cumulative counters History samples once a second."""
        counts, table = self.hub.counts, self.table
        sent, received = table.byte_totals()
        return Totals(opened=counts["syn_sent"] + counts["syn_recv"], closed=counts["close"], events=self.hub.seq,
                      bytes_sent=sent, bytes_received=received,
                      lost=(self.lost_kernel() + self.hub.dropped_subscribers + self.decode_errors()
                            + self.recursion_misses()),
                      open=table.open_count, subscribers=len(self.hub.subscribers))

    def healthy(self) -> tuple[bool, str | None]:
        t = self.tracer
        if t is None or not t.attached:
            return False, "tracer not attached"
        if not t.reading:
            return False, "tracer not reading"
        return True, None

    async def start(self) -> None:
        """Open (compile+attach), load preexisting connections, start reading; undo on failure."""
        loop = asyncio.get_running_loop()
        try:
            tracer = self.tracer_factory(self.settings)
            tracer.open()
        except Exception as exc:
            self.start_error = exc
            raise
        self.tracer = tracer
        self.texts.wall_offset_ns = tracer.wall_offset(self.texts.wall_offset_ns)
        try:
            if tracer.resumed:
                self._restore(tracer)
            # After attach, so a connection opening meanwhile is either in the dump or seen by the
            # kernel (the table drops the sock_diag twin then); never missed.
            if self.settings.preexisting:
                self._load_preexisting(tracer)
            if self.settings.nats_url:
                from app.export import Exporter  # only here: nats-py is needed only when exporting

                # Subscribed before the first event, so every event of this run is exported.
                self.exporter = Exporter(self.settings, self.hub, self.host_name)
                self.exporter.start()
            tracer.start_reading(loop, self.pipeline.on_records)
        except BaseException as exc:
            self.start_error = exc
            self.tracer = None
            if self.exporter is not None:
                self.exporter.cancel()
                self.exporter = None
            tracer.close()
            raise
        # Every event allocates a record or two that live until the replay buffer lets them go: with
        # the default threshold (700) the collector ran so often that it took ~15% of the CPU
        # under churn (measured). Start-up objects move out of its sight for good.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
        if self.settings.sweep_interval_s > 0:
            self._refresh_task = asyncio.create_task(self._sweep_loop())
        self._pending_task = asyncio.create_task(self._pending_loop())
        self._history_task = asyncio.create_task(self.history.run())

    def _restore(self, tracer: Source) -> None:
        """Lists again the connections an earlier run left in the pinned socket map, with their ids, roles,
        owners and start times, in the state the kernel reports now; entries of sockets that closed meanwhile
        (or whose namespace is gone) are dropped from the map."""
        tracked = tracer.tracked_sockets()
        by_netns: dict[int, list[sockdiag.SocketId]] = {}
        for _key, rec in tracked:
            by_netns.setdefault(rec[NETNS], []).append(conn_key(rec)[1:])
        try:
            found, failed = sockdiag.lookup(by_netns)
            existing = set(sockdiag.namespaces())
        except OSError as exc:
            log.warning("sock_diag failed, restored connections not checked: %s", exc)
            found, failed, existing = {}, dict.fromkeys(by_netns, str(exc)), set(by_netns)
        keep, gone = [], []
        for key, rec in tracked:
            netns = rec[NETNS]
            if netns in failed:
                if netns in existing:
                    keep.append(rec)   # there, but not readable now: the sweep decides later
                else:
                    gone.append(key)   # the namespace itself is gone, and its sockets with it
                continue
            d = found.get((netns, conn_key(rec)[1:]))
            if d is None:
                gone.append(key)
                continue
            keep.append((*rec[:STATE], d.state, *rec[STATE + 1:]))
        tracer.forget_sockets(gone)
        n = self.table.restore(keep)
        log.info("restart: %d connections restored from the pinned socket map, %d gone meanwhile", n, len(gone))

    def _load_preexisting(self, tracer: Source) -> None:
        """Connections open before start-up, in every namespace, from sock_diag; the kernel takes each over
        (with its p-id) at its next event, so bytes and close come live from then on."""
        try:
            sw = sockdiag.sweep(targets=self._netns_targets())
            owners = sockdiag.socket_owners()
        except OSError as exc:
            log.warning("sock_diag dump failed, preexisting connections not loaded: %s", exc)
            return
        recs = sockdiag.preexisting(sw.sockets, owners)
        n = self.table.add_preexisting(recs)
        tracer.offer_adoption([r for r in recs if self.table.knows(r[CONN_ID])])
        log.info("%d preexisting connections from sock_diag", n)

    def _netns_targets(self) -> dict[int, list[str]] | None:
        """With --filter-netns, only that namespace is dumped."""
        ino = self.settings.filter_netns_inode()
        if not ino:
            return None
        v = self.settings.filter_netns or ""
        return {ino: [v] if not v.isdigit() else sockdiag.namespaces().get(ino, [])}

    async def _pending_loop(self) -> None:
        # A connect waiting for its SYN-ACK has no record yet (its syn event rides on its next one):
        # list it from the kernel's `connecting` map, with the port sock_diag knows by its inode.
        announced: set[int] = set()
        while self.tracer is not None:
            await asyncio.sleep(PENDING_POLL_S)
            try:
                pending = self.tracer.pending_connects(PENDING_AGE_NS)
            except Exception:   # never let this side job die silently or loudly in a loop
                log.warning("reading pending connects failed", exc_info=True)
                return
            ids = {p.conn_id for p in pending}
            announced &= ids
            new = [p for p in pending if p.conn_id not in announced and not self.table.knows(p.conn_id)]
            if not new:
                continue
            recs = await asyncio.to_thread(pending_records, new)
            recs = [r for r in recs if not self.table.knows(r[CONN_ID])]
            announced.update(r[CONN_ID] for r in recs)
            if recs:
                self.pipeline.announce_syn(recs)

    async def _sweep_loop(self) -> None:
        # The kernel's records can be lost (a full ring) and some transitions emit none: now and then, ask
        # the kernel about every open connection that has been quiet for an interval (exact sock_diag
        # lookups in its namespace: the cost follows the connections asked about, not the host's sockets)
        # and about sockets the tracer's map holds but the table lacks, and converge.
        interval = self.settings.sweep_interval_s
        while self.tracer is not None:
            await asyncio.sleep(interval)
            before = time.monotonic_ns()
            tracer = self.tracer
            try:
                tracked = [rec for _key, rec in await asyncio.to_thread(tracer.tracked_sockets)]
                ask = self.table.quiet_keys(before - int(interval * 1e9))
                ask.update(conn_key(r) for r in tracked if not self.table.knows(r[CONN_ID]))
                by_netns: dict[int, list[sockdiag.SocketId]] = {}
                for key in ask:
                    by_netns.setdefault(key[0], []).append(key[1:])
                found, _failed = await asyncio.to_thread(sockdiag.lookup, by_netns)
                recs = sockdiag.preexisting(list(found.values()), {})
            except Exception:
                log.warning("sock_diag sweep failed", exc_info=True)
                continue
            self.sweeps += 1
            asked = {k for k in ask if k[0] not in _failed}
            closes = self.table.converge({conn_key(r): r for r in recs}, asked, before, time.monotonic_ns(),
                                         tracked)
            if closes:
                self.sweep_closed += len(closes)
                self.pipeline.publish(closes)

    async def close_websockets(self, code: int = 1001, timeout_s: float = 3.0) -> None:
        """Asks every WebSocket handler to close with `code`, waits (bounded) until they have."""
        self.shutting_down = True
        export_sub = self.exporter.sub if self.exporter is not None else None
        for sub in list(self.hub.subscribers):
            if sub is export_sub:
                continue   # it goes on until the tracer's last events are in (aclose)
            sub.close_code = code
            sub.close()
        deadline = time.monotonic() + timeout_s
        while self.websockets and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Detach everything (safe twice)."""
        for task in (self._refresh_task, self._history_task):
            if task is not None:
                task.cancel()
        self._refresh_task = self._history_task = None
        if self.tracer is not None:
            try:
                # What is still in the ring: bounded, the programs keep writing until detached.
                for _ in range(64):
                    if not self.tracer.drain():
                        break
            finally:
                self.tracer.close()

    async def aclose(self) -> None:
        """After stop(): sends what the exporter still holds (bounded) and disconnects it."""
        if self.exporter is not None:
            await self.exporter.stop()


def _never(_rec: Any) -> bool:
    return False


def pending_records(pending: list[Any]) -> list[EventRecord]:
    """The syn_sent record of each pending connect whose local port sock_diag finds (blocking: run in a thread)."""
    out = []
    for p in pending:
        local = sockdiag.port_of_inode(p.pid, p.inode, 1 << ST_SYN_SENT) if p.inode else None
        if local is None:
            continue   # gone already, or not visible from here: its kernel records will list it
        family, addr, port = local
        out.append(make_record(
            ts_ns=p.start_ns, start_ns=p.start_ns, conn_id=p.conn_id, cgroup_id=p.cgroup_id, pid=p.pid,
            netns=p.netns, saddr=sockdiag.addr16(family, addr), daddr=p.daddr, sport=port, dport=p.dport,
            family=p.family, type=EV_SYN_SENT, role=ROLE_CLIENT, state=ST_SYN_SENT, flags=FLAG_PID_FROM_CONNECT,
            comm=p.comm))
    return out
