"""Prometheus collectors: the /stats counters read at scrape time, plus process, platform and build info."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from app.bpf.event import CLOSE_REASON_NAMES, ROLE_NAMES

if TYPE_CHECKING:
    from app.service import Core


@cache
def version() -> str:
    """The installed package's version ("unknown" when run from a tree that was never installed)."""
    try:
        return metadata.version("conn-tracer")
    except metadata.PackageNotFoundError:
        return "unknown"


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
        lost.add_metric(["recursion"], core.recursion_misses())
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
        # seq only grows (it restarts with the process, which a counter's reset handling expects):
        # a counter, exposed as conn_tracer_seq_total, so rate() works on it.
        yield CounterMetricFamily("conn_tracer_seq", "Seq of the latest event (events numbered since start)",
                                  value=hub.seq)
        yield CounterMetricFamily("conn_tracer_refused_subscribers",
                                  "WebSocket subscribers turned away at max_subscribers", value=hub.refused_subscribers)
        gauges = (
            ("conn_tracer_connections_open", "Open connections in the table", table.open_count),
            ("conn_tracer_connections_closed_kept", "Closed connections held in history", table.closed_count),
            ("conn_tracer_subscribers", "WebSocket subscribers connected", len(hub.subscribers)),
            ("conn_tracer_replay_events_held", "Events held in the replay buffer", hub.held),
            ("conn_tracer_up", "1 while the tracer is attached and reading", int(core.healthy()[0])),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield from traffic_metrics(core)


def traffic_metrics(core: Core) -> Iterator[Metric]:
    """What the network did: connections opened/closed, bytes, retransmissions, connect latency and RTT."""
    tr = core.table.traffic
    tr.fold()
    counts = core.hub.counts
    opened = CounterMetricFamily("conn_tracer_connections_opened", "Connections opened (syn_sent/syn_recv seen)",
                                 labels=["role"])
    opened.add_metric(["client"], counts.get("syn_sent", 0))
    opened.add_metric(["server"], counts.get("syn_recv", 0))
    yield opened
    closed = CounterMetricFamily("conn_tracer_connections_closed", "Connections closed, by role and close reason",
                                 labels=["role", "reason"])
    for role in ROLE_NAMES:
        for reason in CLOSE_REASON_NAMES.values():
            closed.add_metric([role, reason], tr.closed.get((role, reason), 0))
    yield closed
    for name, doc, values in (
        ("conn_tracer_bytes_sent", "Payload bytes sent by closed connections", tr.bytes_sent),
        ("conn_tracer_bytes_received", "Payload bytes received by closed connections", tr.bytes_received),
        ("conn_tracer_bytes_retransmitted", "Bytes retransmitted by closed connections", tr.bytes_retrans),
        ("conn_tracer_retransmitted_segments", "Segments retransmitted by closed connections", tr.retrans_segs),
    ):
        fam = CounterMetricFamily(name, doc, labels=["role"])
        for role, v in values.items():
            fam.add_metric([role], v)
        yield fam
    for name, doc, hists in (
        ("conn_tracer_connect_duration_seconds", "SYN to ESTABLISHED of closed connections", tr.connect),
        ("conn_tracer_rtt_seconds", "Smoothed RTT of closed connections at close", tr.rtt),
    ):
        hf = HistogramMetricFamily(name, doc, labels=["role"])
        for role, h in hists.items():
            hf.add_metric([role], h.cumulative(), h.sum_us / 1e6)
        yield hf


class BuildInfoCollector(Collector):
    """conn_tracer_build_info{version, python}: constant 1, the usual way to chart versions across a fleet."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("conn_tracer_build_info", "conn-tracer version (value is always 1)",
                                 labels=["version", "python"])
        info.add_metric([version(), platform.python_version()], 1)
        yield info


def make_registry(core: Core) -> CollectorRegistry:
    """A registry per app (not the global one), so several apps can live in one process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CoreCollector(core))
    reg.register(BuildInfoCollector())
    # The standard process_* (CPU, RSS, fds, start time) and python_* (version, gc) families.
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg
