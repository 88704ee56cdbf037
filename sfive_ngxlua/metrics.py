"""Prometheus metrics, the status page and the health check, on one server endpoint.

A collector reads ``Stats`` at scrape time, so the metrics and the per-interval log line show
the same figures. Labels are the configured streamer ids, the rejection and drop reasons and
the component names only, never clients, so the number of series is fixed by the command line
and every series is there from the start. Each service has its own registry, not the library's
global one, so several services (or tests) can run in one process.
"""

from __future__ import annotations

import platform
from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import twisted

from . import __version__
from .conditions import WARNINGS
from .records import REASONS
from .settings import Settings
from .stats import Stats, StreamFigures
from .status import (
    DROP_REASONS,
    HealthResource,
    StatusPage,
    components,
    health,
)

PREFIX = "sfive_ngxlua_"
STREAM_LABELS = ("content", "format", "quality")


class StatsCollector:
    """A prometheus_client collector over one Stats object and the configured streamers."""

    def __init__(self, settings: Settings, stats: Stats,
                 clock: Optional[IReactorTime] = None, started: Optional[float] = None) -> None:
        self.settings = settings
        self.stats = stats
        self.has_hub = bool(settings.socket or settings.hub)
        self.clock = clock
        self.started = started

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        counters = (
            ("lines", "Source lines read (the exporter's gap lines included).", s.lines),
            ("records_accepted", "Records counted into an interval.", s.accepted),
            ("records_late", "Records for an interval already reported, added to the oldest "
             "open one.", s.late),
            ("records_before_start", "Records older than the first interval, dropped.",
             s.before_start),
            ("records_lost", "Records the exporter reported lost (its ring overran).", s.lost),
            ("clients_folded", "Records of clients beyond --max-clients, folded into one "
             "entry.", s.folded),
            ("datasets_sent", "Datasets handed to the hub (or standard output).",
             s.datasets_sent),
            ("datasets_trimmed", "Datasets whose client list was trimmed to fit a datagram.",
             s.datasets_trimmed),
            ("exporter_reconnects", "Reconnection attempts to the exporter.",
             s.exporter_reconnects),
            ("hub_reconnects", "Reconnection attempts to the sfive hub.", s.hub_reconnects),
            ("state_errors", "State store troubles (--state-dir): a corrupt file moved aside, "
             "a failed write (the state kept in memory).", s.state_errors),
            ("heartbeats", "Exporter heartbeat lines read (protocol 2; not in lines).",
             s.heartbeats),
            ("intervals_held_early", "Held intervals reported before the watermark passed "
             "them, because the held intervals reached their cap.", s.held_early),
            ("intervals_covered", "Intervals reported whole: the watermark passed them and no "
             "announced loss overlaps them.", s.intervals_covered),
            ("intervals_partial", "Intervals reported with what is known (a loss overlaps "
             "them, or --max-delay, the held cap or a stop cut them short).",
             s.intervals_partial),
            ("intervals_withheld", "Intervals not reported: the source never vouched for "
             "them.", s.intervals_withheld),
            ("records_withheld", "Records that arrived for an interval already withheld.",
             s.records_withheld),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)
        yield from self._build_info()
        yield from self._drops()
        yield from self._warnings()
        yield from self._components()
        if self.settings.file:
            yield CounterMetricFamily(PREFIX + "file_rotations", "Times the --file log was "
                                      "renamed or deleted away (then read until quiet).",
                                      value=s.file_rotations)
            yield CounterMetricFamily(PREFIX + "file_truncations", "Times the --file log was "
                                      "truncated in place (copytruncate: its window's lines "
                                      "are lost).", value=s.file_truncations)

        rejected = CounterMetricFamily(PREFIX + "records_rejected", "Lines rejected, by reason.",
                                       labels=("reason",))
        counts = s.rejected
        for reason in REASONS:
            rejected.add_metric((reason,), counts.get(reason, 0))
        for reason in sorted(set(counts) - set(REASONS)):
            rejected.add_metric((reason,), counts[reason])
        yield rejected

        connected = int(s.source_connected)
        yield GaugeMetricFamily(PREFIX + "source_connected", "1 while the source is open (the "
                                "exporter's stream, or the --file log).", value=connected)
        yield GaugeMetricFamily(PREFIX + "exporter_connected", "Deprecated alias of "
                                "sfive_ngxlua_source_connected (removed in the next release).",
                                value=connected)
        yield GaugeMetricFamily(PREFIX + "interval_seconds", "The interval length (--duration).",
                                value=self.settings.duration)
        covered = GaugeMetricFamily(PREFIX + "interval_covered", "1 while the running interval "
                                    "is covered so far, 0 when not; absent while not known.")
        if s.covered is not None:
            covered.add_metric((), int(s.covered))
        yield covered
        if self.clock is not None:
            ok, _ = health(self.settings, s, self.clock.seconds(), self.started)
            yield GaugeMetricFamily(PREFIX + "healthy", "1 while /healthz answers 200.",
                                    value=int(ok))
        if self.has_hub:
            yield GaugeMetricFamily(PREFIX + "hub_connected",
                                    "1 while connected to the sfive hub.",
                                    value=int(s.hub_connected))
            yield GaugeMetricFamily(PREFIX + "hub_queue_length",
                                    "Datasets waiting for the sfive hub.", value=s.queued)
            yield GaugeMetricFamily(PREFIX + "hub_queue_limit",
                                    "Datasets the hub queue holds at most (--queue-limit).",
                                    value=self.settings.queue_limit)
        yield GaugeMetricFamily(PREFIX + "exporter_protocol",
                                "The exporter's stream protocol (1 or 2; 0 before it answered).",
                                value=s.exporter_protocol)
        yield GaugeMetricFamily(PREFIX + "intervals_held",
                                "Intervals due by the clock but held until the exporter's "
                                "records for them are in (at most --max-delay).", value=s.held)
        optional = (
            ("watermark_lag_seconds", "How far the event-time watermark is behind the clock; "
             "absent while unknown.", s.watermark_lag),
            ("ring_size_records", "Records the exporter's ring holds (from its heartbeats).",
             s.ring_size),
            ("ring_history_seconds", "Seconds of traffic the exporter's ring holds (from its "
             "heartbeats): how long an outage or restart may last before records are lost.",
             s.ring_history),
        )
        for name, doc, value in optional:
            family = GaugeMetricFamily(PREFIX + name, doc)
            if value is not None:
                family.add_metric((), value)
            yield family
        last = GaugeMetricFamily(PREFIX + "last_report_timestamp_seconds",
                                 "When the last interval was reported (Unix time); absent "
                                 "before the first report.")
        if s.last_report is not None:
            last.add_metric((), s.last_report)
        yield last

        clients = GaugeMetricFamily(PREFIX + "stream_clients",
                                    "Distinct clients in the last reported interval.",
                                    labels=STREAM_LABELS)
        interval_bytes = GaugeMetricFamily(PREFIX + "stream_interval_bytes",
                                           "Bytes sent in the last reported interval.",
                                           labels=STREAM_LABELS)
        total = CounterMetricFamily(PREFIX + "stream_bytes", "Bytes sent, over all reported "
                                    "intervals.", labels=STREAM_LABELS)
        none = StreamFigures()
        for streamer in self.settings.streamers:
            figures = s.streams.get(streamer, none)
            clients.add_metric(streamer, figures.clients)
            interval_bytes.add_metric(streamer, figures.bytes)
            total.add_metric(streamer, figures.bytes_total)
        yield clients
        yield interval_bytes
        yield total

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(PREFIX + "build_info", "Always 1: the versions running.",
                                 labels=("version", "python", "twisted"))
        info.add_metric((__version__, platform.python_version(), twisted.__version__), 1)
        yield info

    def _drops(self) -> Iterator[Metric]:
        """Dropped datasets by reason; what was counted without a reason is "other"."""
        drops = self.stats.drops
        family = CounterMetricFamily(PREFIX + "datasets_dropped", "Datasets dropped, by "
                                     "reason (see the README).", labels=("reason",))
        unexplained = max(0, self.stats.datasets_dropped - sum(drops.values()))
        for reason in DROP_REASONS:
            family.add_metric((reason,), drops.get(reason, 0) +
                              (unexplained if reason == "other" else 0))
        for reason in sorted(set(drops) - set(DROP_REASONS)):
            family.add_metric((reason,), drops[reason])
        yield family

    def _warnings(self) -> Iterator[Metric]:
        """Misconfiguration warnings raised, by warning (conditions.py; README)."""
        family = CounterMetricFamily(PREFIX + "warnings", "Misconfiguration warnings raised, "
                                     "by warning (once per change of condition).",
                                     labels=("warning",))
        counts = self.stats.warnings
        for name in WARNINGS:
            family.add_metric((name,), counts.get(name, 0))
        for name in sorted(set(counts) - set(WARNINGS)):
            family.add_metric((name,), counts[name])
        yield family

    def _components(self) -> Iterator[Metric]:
        s = self.stats
        errors = CounterMetricFamily(PREFIX + "component_errors", "Unexpected errors, by "
                                     "component (each logged with its traceback, then retried).",
                                     labels=("component",))
        failing = GaugeMetricFamily(PREFIX + "component_failing", "1 while the component is "
                                    "retrying after an unexpected error (or failed).",
                                    labels=("component",))
        state = GaugeMetricFamily(PREFIX + "component_state", "Always 1, for the component's "
                                  "current state.", labels=("component", "state"))
        for name, current, bad in components(self.settings, s):
            errors.add_metric((name,), s.errors.get(name, 0))
            failing.add_metric((name,), int(bad))
            state.add_metric((name, current), 1)
        yield errors
        yield failing
        yield state


class MetricsResource(Resource):
    """Renders a registry in the format the scraper asks for, in the reactor thread.

    prometheus_client's own twisted resource runs the collectors in a thread pool; here they
    read Stats that the reactor thread updates, so they run in the reactor thread instead.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return encoder(self.registry)


class MetricsSite(Site):
    """The metrics site: no access log line per scrape."""

    noisy = False

    def log(self, request: Request) -> None:
        pass


class _Reporting:
    """The metrics endpoint, reporting the port it listens on (for the log and the tests)."""

    def __init__(self, endpoint: Any, listened: Any) -> None:
        self.endpoint = endpoint
        self.listened = listened

    def listen(self, factory: Any) -> Deferred:
        return self.endpoint.listen(factory).addCallback(self.listened)


class MetricsService(MultiService):
    """Serves ``/metrics``, ``/healthz`` and the status page ``/`` on a Twisted server endpoint
    (e.g. ``tcp:9166:interface=127.0.0.1``).

    The listener is Twisted's own ``strports.service``: it listens in
    ``privilegedStartService`` (before twistd drops privileges) and refuses to start when the
    endpoint cannot listen. ``listening`` fires with the port once it listens.
    """

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, stats: Stats,
                 clock: Optional[IReactorTime] = None) -> None:
        super().__init__()
        self.description = settings.metrics
        clock = clock if clock is not None else reactor
        started = clock.seconds()
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(settings, stats, clock, started))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        root = StatusPage(settings, stats, clock, started)
        root.putChild(b"metrics", MetricsResource(self.registry))
        root.putChild(b"healthz", HealthResource(settings, stats, clock, started))
        self.site = MetricsSite(root)
        self.port: Optional[IListeningPort] = None
        self.listening: Deferred = Deferred()
        self.server = strports.service(settings.metrics, self.site, reactor=reactor)
        self.server.endpoint = _Reporting(self.server.endpoint, self._listened)
        self.server.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            self.log.error("cannot serve metrics on {endpoint}: {why}",
                           endpoint=self.description, why=e)
            raise

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("serving Prometheus metrics at {endpoint} (/metrics; status page /, "
                      "health check /healthz)", endpoint=self.description)
        if not self.listening.called:
            self.listening.callback(port)
        return port

    def stopService(self) -> Optional[Deferred]:
        self.port = None
        return super().stopService()
