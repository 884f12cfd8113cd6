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
        lost.add_metric(["export"], core.lost_export())
        yield lost
        exp = core.export_stats()
        if exp is not None:
            for key, doc in (("published", "Events sent to NATS JetStream (first attempt)"),
                             ("acknowledged", "Events JetStream acknowledged"),
                             ("resent", "Events sent again after no acknowledgement"),
                             ("messages", "Messages JetStream acknowledged"),
                             ("reconnects", "Reconnections to NATS")):
                yield CounterMetricFamily(f"conn_tracer_export_{key}", doc, value=exp[key])
            yield GaugeMetricFamily("conn_tracer_export_buffered", "Events waiting for an acknowledgement",
                                    value=exp["buffered"])
            yield GaugeMetricFamily("conn_tracer_export_connected", "1 while connected to NATS",
                                    value=int(exp["connected"]))
        hosts = core.host_stats()
        if hosts:
            per = CounterMetricFamily("conn_tracer_fleet_host_events", "Events received per host", labels=["host"])
            fails = CounterMetricFamily("conn_tracer_fleet_host_failures",
                                        "Connections closed as refused, timeout or reset, per host", labels=["host"])
            opened = GaugeMetricFamily("conn_tracer_fleet_host_connections_open", "Open connections per host",
                                       labels=["host"])
            for h, v in sorted(hosts.items()):
                per.add_metric([h], v["events"])
                fails.add_metric([h], v["failures"])
                opened.add_metric([h], v["connections_open"])
            yield per
            yield fails
            yield opened
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
