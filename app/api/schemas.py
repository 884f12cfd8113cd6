"""Public response shapes of the API that are not connections or events."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SubscriberStats(BaseModel):
    """One WebSocket subscriber's queue."""

    id: int = Field(description="subscriber number, in order of connection")
    filter: str = Field(description="its query filter, as given")
    queued: int = Field(description="events published that it has not looked at yet (at most subscriber_queue_events)")
    delivered: int = Field(description="messages handed to its connection")
    dropped: int = Field(description="events dropped because it was too slow")


class ExportStats(BaseModel):
    """Export to NATS JetStream (serve --nats): counts of events, not messages, unless named so."""

    url: str | None = Field(description="the NATS server(s)")
    subject: str = Field(description="the subject events are published on")
    stream: str = Field(description="the JetStream stream")
    connected: bool = Field(description="connected to NATS now")
    published: int = Field(description="events sent to NATS (first attempt)")
    acknowledged: int = Field(description="events JetStream acknowledged (stored)")
    buffered: int = Field(description="events waiting for an acknowledgement now")
    buffer_events: int = Field(description="the buffer's bound (nats_buffer_events)")
    dropped: int = Field(description="events lost: buffer full, or too far behind the hub")
    resent: int = Field(description="events sent again because no acknowledgement came")
    messages: int = Field(description="messages acknowledged")
    reconnects: int = Field(description="reconnections to NATS")
    last_error: str | None = Field(description="the latest problem, null once a batch went through")


class HostStats(BaseModel):
    """One exporting host, as a fleet view sees it."""

    events: int = Field(description="events received from this host")
    connections_open: int = Field(description="its open connections")
    connections_closed_kept: int = Field(description="its closed connections still held")
    failures: int = Field(description="its connections closed as refused, timeout or reset")
    lost_export: int = Field(description="events missing from its sequence (dropped by its exporter)")
    duplicates: int = Field(description="events received twice and dropped")
    last_seen: str | None = Field(description="ISO 8601 UTC of its latest event")


class Stats(BaseModel):
    """Counters since start; losses are counted per place they happen."""

    events: dict[str, int] = Field(description="events published, per event type")
    lost_kernel: int = Field(description="events the kernel could not put in the full ring buffer")
    lost_recursion: int = Field(0, description="program runs the kernel skipped (recursion guard): events never seen")
    dropped_subscribers: int = Field(description="events dropped to slow WebSocket subscribers, all together")
    decode_errors: int = Field(description="ring-buffer records that could not be decoded (skipped)")
    connections_open: int = Field(description="open connections in the table")
    connections_closed_kept: int = Field(description="closed connections still held (max_closed_connections)")
    connections_preexisting: int = Field(description="connections read from sock_diag at start-up, still open")
    subscribers: int = Field(description="WebSocket subscribers connected now")
    refused_subscribers: int = Field(0, description="WebSocket subscribers turned away at max_subscribers (1013)")
    seq: int = Field(description="seq of the latest event")
    replay_events_held: int = Field(description="events held in the replay buffer (replay_events)")
    replay_first_seq: int = Field(description="seq of the oldest event held")
    uptime_s: float = Field(description="seconds since the service started")
    attach_mode: str = Field(description="kernel hooks in use, e.g. which data-queue hook")
    subscriber_queues: list[SubscriberStats] = Field(description="per WebSocket subscriber: queue, deliveries, drops")
    lost_export: int = Field(0, description="events that did not reach NATS (serve --nats) or, in a fleet view, "
                                            "events missing from the hosts' sequences")
    export: ExportStats | None = Field(None, description="export to NATS JetStream, null when not exporting")
    hosts: dict[str, HostStats] | None = Field(None, description="fleet view: per exporting host")


class Health(BaseModel):
    """Liveness: ok while the tracer is attached and reading."""

    status: str = Field(description='"ok", or "unavailable" with a reason')
    attach_mode: str = Field(description="kernel hooks in use")
    reason: str | None = Field(None, description="why not ok")


class Problem(BaseModel):
    """An error answer."""

    detail: object = Field(description="what went wrong")
    message: str | None = Field(None, description="one line naming the bad parameter, for validation errors")
