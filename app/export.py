"""Export to NATS JetStream: every event of the hub, in order, in acknowledged batches.

The exporter is a hub subscriber (a cursor, like a WebSocket), so the tracer never waits for the
network: the reader task copies what the hub has into a bounded buffer, the publisher task sends
the oldest events from it as one message per batch and drops them only once JetStream has
acknowledged that message. While NATS is away the buffer fills; beyond its bound new events are
dropped and counted (loss source "export"). A batch that was sent but not acknowledged is sent
again with the same Nats-Msg-Id, so the stream stores it once (JetStream's duplicate window), and
only one batch is in flight at a time, so the stream holds each host's events in seq order.

A message is the JSON of its events, one per line, on subject <prefix>.<host>.events, with
headers naming the host, the agent's run and the first and last seq it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any

import nats
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import NoStreamResponseError, NotFoundError

from app.config import Settings
from app.hub import EventHub, Subscriber

log = logging.getLogger(__name__)

EXPORT_LABEL = "export"
SUBJECT_KIND = "events"
# Headers of every message (besides Nats-Msg-Id): who sent it and which events it holds.
H_HOST, H_RUN, H_SEQS = "Conntracer-Host", "Conntracer-Run", "Conntracer-Seqs"
# Resends of a batch within this window are stored once; the fleet view also drops duplicates.
DUPLICATE_WINDOW_S = 600.0
MAX_MESSAGE_BYTES = 512 * 1024   # under NATS's default max_payload (1 MiB)
# After a batch, wait this long for the next one to fill (unless it is full already): fewer, bigger
# messages. Each message costs a socket write and an acknowledgement; under churn sending as soon
# as the last ack came made ~25-event messages and cost the agent 5.7 us/event (measured).
LINGER_S = 0.02


def subject_token(host: str) -> str:
    """`host` as one NATS subject token (no dots, wildcards or spaces)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", host)


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments from the settings: servers, credentials, TLS."""
    assert settings.nats_url
    opts: dict[str, Any] = {
        "servers": [u.strip() for u in settings.nats_url.split(",") if u.strip()],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,   # an agent outlives any NATS outage; its buffer is bounded
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
    }
    if settings.nats_creds_file is not None:
        opts["user_credentials"] = str(settings.nats_creds_file)
    if settings.nats_tls_ca or settings.nats_tls_cert:
        ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
        if settings.nats_tls_cert:
            ctx.load_cert_chain(str(settings.nats_tls_cert),
                                str(settings.nats_tls_key) if settings.nats_tls_key else None)
        opts["tls"] = ctx
    return opts


async def ensure_stream(js: Any, settings: Settings) -> None:
    """Creates the stream if it is missing (file storage, bounded by age and size); leaves an existing one."""
    name = settings.nats_stream
    try:
        await js.stream_info(name)
        return
    except NotFoundError:
        pass
    cfg = StreamConfig(name=name, subjects=[f"{settings.nats_subject_prefix}.>"], storage=StorageType.FILE,
                       max_age=settings.nats_stream_max_age_s, max_bytes=settings.nats_stream_max_bytes,
                       discard=DiscardPolicy.OLD, duplicate_window=DUPLICATE_WINDOW_S)
    try:
        await js.add_stream(cfg)
    except Exception:
        # Another agent may have created it meanwhile: fine if it is there now.
        await js.stream_info(name)


def event_seq(text: str) -> int:
    """The seq of an event's JSON, which starts with {"seq":N, (the hub's writer)."""
    return int(text[7:text.index(",", 7)])


@dataclass
class ExportCounters:
    """Counters since start (events, not messages, unless named so)."""

    published: int = 0       # events sent to NATS (first attempt)
    acknowledged: int = 0    # events JetStream has acknowledged (stored)
    dropped: int = 0         # events lost: buffer full, or the exporter fell behind the hub
    resent: int = 0          # events sent again after no acknowledgement came
    messages: int = 0        # messages acknowledged
    reconnects: int = 0
    connected: bool = False
    last_error: str | None = None


class Exporter:
    """Hub subscriber -> bounded buffer -> JetStream. start() subscribes at once; stop() flushes (bounded)."""

    def __init__(self, settings: Settings, hub: EventHub, host: str) -> None:
        self.settings = settings
        self.hub = hub
        self.host = host
        self.run_id = uuid.uuid4().hex[:12]   # tells this run's seqs apart from an earlier run's
        self.subject = f"{settings.nats_subject_prefix}.{subject_token(host)}.{SUBJECT_KIND}"
        self.stats = ExportCounters()
        self.buffer: deque[str] = deque()     # event JSON, oldest first, until acknowledged
        self.sub: Subscriber | None = None
        self._inflight: tuple[int, bytes, dict[str, str]] | None = None   # (events, payload, headers)
        self._wake = asyncio.Event()
        self._reconnected = asyncio.Event()
        self._nc: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    @property
    def buffered(self) -> int:
        return len(self.buffer)

    def start(self) -> None:
        """Subscribes to the hub now (no event after this is missed) and starts the tasks."""
        self.sub = self.hub.subscribe(None, None, label=EXPORT_LABEL)
        self._tasks = [asyncio.create_task(self._read(), name="export-read"),
                       asyncio.create_task(self._publish(), name="export-publish")]

    async def _read(self) -> None:
        sub = self.sub
        assert sub is not None
        while True:
            texts = await sub.next_batch()
            if not texts:
                return
            self._absorb(texts)

    def _absorb(self, texts: list[str]) -> None:
        """Takes what the hub handed over into the buffer, up to its bound; counts the rest as dropped."""
        # Control messages ("dropped", "overwritten": the hub let this subscriber fall behind)
        # come first in a batch; they count as export losses.
        i = 0
        while i < len(texts) and not texts[i].startswith('{"seq"'):
            self.stats.dropped += int(json.loads(texts[i]).get("count", 0))
            i += 1
        buf = self.buffer
        n = len(texts) - i
        room = max(self.settings.nats_buffer_events - len(buf), 0)
        if n > room:
            self.stats.dropped += n - room
            n = room
        if n:
            buf.extend(texts[i:i + n])
            self._wake.set()

    def _next_batch(self) -> tuple[int, bytes, dict[str, str]]:
        """The oldest buffered events as one message; its headers name them (fixed for resends)."""
        texts = list(islice(self.buffer, self.settings.nats_batch_events))
        if sum(map(len, texts)) + len(texts) > MAX_MESSAGE_BYTES:   # rare: events of unusual size
            size, n = 0, 0
            for t in texts:
                if n and size + len(t) + 1 > MAX_MESSAGE_BYTES:
                    break
                size += len(t) + 1
                n += 1
            del texts[n:]
        first, last = event_seq(texts[0]), event_seq(texts[-1])
        headers = {"Nats-Msg-Id": f"{self.host}:{self.run_id}:{first}", H_HOST: self.host, H_RUN: self.run_id,
                   H_SEQS: f"{first}-{last}"}
        return len(texts), "\n".join(texts).encode(), headers

    async def _connect(self) -> Any:
        """Connects (retrying with a bounded backoff until it works or we stop) and makes sure of the stream."""
        delay = 0.2
        while not self._stopping:
            nc: Any = None
            try:
                nc = await nats.connect(**connect_options(self.settings, f"conn-tracer {self.host}"),
                                        disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                                        error_cb=self._on_error)
                await ensure_stream(nc.jetstream(), self.settings)
                self.stats.connected = True
                return nc
            except Exception as exc:
                self._note_error(f"cannot reach NATS at {self.settings.nats_url}: {exc or type(exc).__name__}")
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await nc.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        return None

    def _note_error(self, text: str) -> None:
        if text != self.stats.last_error:
            log.warning("export: %s", text)   # once per distinct problem, not per retry
        self.stats.last_error = text

    async def _on_disconnected(self) -> None:
        self.stats.connected = False
        self._reconnected.clear()

    async def _on_reconnected(self) -> None:
        self.stats.connected = True
        self.stats.reconnects += 1
        self._reconnected.set()

    async def _on_error(self, exc: Exception) -> None:
        self._note_error(f"NATS: {exc or type(exc).__name__}")

    async def _publish(self) -> None:
        nc = self._nc = await self._connect()
        if nc is None:
            return
        js = nc.jetstream()
        timeout = self.settings.nats_ack_timeout_s
        while True:
            if not self.buffer:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if not nc.is_connected:
                # nats-py reconnects by itself; sending now would only queue copies in its buffer.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._reconnected.wait(), 1.0)
                continue
            if self._inflight is None:
                self._inflight = self._next_batch()
                self.stats.published += self._inflight[0]
            else:
                self.stats.resent += self._inflight[0]
            count, payload, headers = self._inflight
            try:
                await js.publish(self.subject, payload, timeout=timeout, headers=dict(headers))
            except (NotFoundError, NoStreamResponseError):
                # No stream (e.g. NATS came back with an empty store): make it, then send again.
                with contextlib.suppress(Exception):
                    await ensure_stream(js, self.settings)
                continue
            except Exception as exc:
                self._note_error(f"no acknowledgement from JetStream: {exc or type(exc).__name__}")
                if not nc.is_connected or nc.is_closed:
                    continue
                await asyncio.sleep(0.2)
                continue
            for _ in range(count):
                self.buffer.popleft()
            self._inflight = None
            self.stats.acknowledged += count
            self.stats.messages += 1
            self.stats.last_error = None
            if len(self.buffer) < self.settings.nats_batch_events and not self._stopping:
                await asyncio.sleep(LINGER_S)   # pacing, so that batches fill

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Stops taking events, sends what is buffered (for at most timeout_s), closes the connection."""
        self._stopping = True
        if self.sub is not None:
            # What the hub still has for us (e.g. the tracer's last drain) goes into the buffer first.
            for _ in range(1000):
                texts = self.sub.take(65536)
                if not texts:
                    break
                self._absorb(texts)
            self.hub.unsubscribe(self.sub)
        self._wake.set()
        # Waiting for a NATS that is away would only delay the shutdown.
        deadline = time.monotonic() + (timeout_s if self.stats.connected else 0.2)
        for t in self._tasks:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, max(deadline - time.monotonic(), 0.01))
        for t in self._tasks:
            t.cancel()
        if self.buffer:
            log.warning("export: %d events not sent at shutdown", len(self.buffer))
            self.stats.dropped += len(self.buffer)
            self.buffer.clear()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        self.stats.connected = False

    def cancel(self) -> None:
        """Stops at once, sending nothing more (start-up failed)."""
        self._stopping = True
        if self.sub is not None:
            self.hub.unsubscribe(self.sub)
        for t in self._tasks:
            t.cancel()

    def snapshot(self) -> dict[str, Any]:
        """The figures /stats and /metrics show."""
        s = self.stats
        return {"url": self.settings.nats_url, "subject": self.subject, "stream": self.settings.nats_stream,
                "connected": s.connected, "published": s.published, "acknowledged": s.acknowledged,
                "buffered": self.buffered, "buffer_events": self.settings.nats_buffer_events,
                "dropped": s.dropped, "resent": s.resent, "messages": s.messages, "reconnects": s.reconnects,
                "last_error": s.last_error}
