"""``makeService``: the whole importer as one MultiService, for twistd and for embedding."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime

from .fetch import LogFetchService
from .model import IntervalModel
from .pipeline import Pipeline
from .report import ReportService
from .settings import Options, Settings
from .sinks import HubDatagramSink, HubStreamSink, StdoutSink
from .stats import Stats

__all__ = ["Options", "makeService", "build", "make_sink"]


def make_sink(settings: Settings, reactor: Any, stats: Stats,
              clock: Optional[IReactorTime] = None) -> Service:
    """The sink the settings ask for: hub datagram socket, hub stream, or standard output."""
    if settings.socket:
        return HubDatagramSink(settings.socket, reactor, stats, settings.queue_limit, clock=clock)
    if settings.hub:
        return HubStreamSink(settings.hub, reactor, stats, settings.queue_limit, clock=clock)
    return StdoutSink(stats)


def build(settings: Settings, reactor: Any, sink: Optional[Service] = None,
          clock: Optional[IReactorTime] = None, stats: Optional[Stats] = None) -> MultiService:
    """Compose fetcher, model, reporter and sink.

    ``reactor`` does the networking; ``clock`` (default: the reactor) drives every timer, so a
    test can use a ``task.Clock``. ``sink`` is any service with ``deliver(dataset)``, e.g. a
    ``CallableSink``; by default the settings choose one. Stop order is reporter, fetcher, sink:
    the last partial interval is reported before the sink drains its queue.
    """
    clock = clock if clock is not None else reactor
    stats = stats if stats is not None else Stats()
    if sink is None:
        sink = make_sink(settings, reactor, stats, clock)
    if getattr(sink, "stats", False) is None:
        sink.stats = stats
    model = IntervalModel(settings, stats)
    pipeline = Pipeline(settings, stats, model)
    top = MultiService()
    top.stats = stats
    top.model = model
    top.sink = sink
    sink.setName("sink")
    sink.setServiceParent(top)
    fetch = LogFetchService(settings, reactor, pipeline, stats, clock=clock)
    fetch.setName("fetch")
    fetch.setServiceParent(top)
    reporter = ReportService(settings, clock, model, sink.deliver, stats, source=fetch)
    reporter.setName("report")
    reporter.setServiceParent(top)
    fetch.on_watermark = reporter.check
    if settings.metrics:
        from .metrics import MetricsService

        metrics = MetricsService(settings, reactor, stats)
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    return top


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """twistd's entry point: validated options to the running service tree."""
    if reactor is None:
        from twisted.internet import reactor
    return build(options.settings(), reactor)
