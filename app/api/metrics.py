"""Prometheus collector reading the same counters as /stats, at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from app.service import Core


class CoreCollector(Collector):
    """No state of its own: every value is read from the core when scraped."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        core = self.core
        hub, table = core.hub, core.table
        ev = CounterMetricFamily("conn_tracer_events", "Events published, per event type", labels=["type"])
        for t, n in sorted(hub.counts.items()):
            ev.add_metric([t], n)
        yield ev
        lost = CounterMetricFamily("conn_tracer_lost_events", "Events lost, per place (source)", labels=["source"])
        lost.add_metric(["kernel"], core.lost_kernel())
        lost.add_metric(["subscriber"], hub.dropped_subscribers)
        lost.add_metric(["decode"], core.decode_errors())
        yield lost
        yield CounterMetricFamily("conn_tracer_refused_subscribers",
                                  "WebSocket subscribers turned away at max_subscribers", value=hub.refused_subscribers)
        gauges = (
            ("conn_tracer_connections_open", "Open connections in the table", table.open_count),
            ("conn_tracer_connections_closed_kept", "Closed connections held in history", table.closed_count),
            ("conn_tracer_subscribers", "WebSocket subscribers connected", len(hub.subscribers)),
            ("conn_tracer_replay_events_held", "Events held in the replay buffer", hub.held),
            ("conn_tracer_seq", "Seq of the latest event", hub.seq),
            ("conn_tracer_up", "1 while the tracer is attached and reading", int(core.healthy()[0])),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)


def make_registry(core: Core) -> CollectorRegistry:
    """A registry per app (not the global one), so several apps can live in one process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CoreCollector(core))
    return reg
