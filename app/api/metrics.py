"""Prometheus collectors: the /stats counters read at scrape time, plus process, platform and build info."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from functools import cache
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

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
        lost.add_metric(["subscriber"], hub.dropped_subscribers)
        lost.add_metric(["decode"], core.decode_errors())
        yield lost
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
