"""Prometheus metrics: the service's own Stats and each configured stream's last interval.

A collector reads ``Stats`` at scrape time, so the metrics and the per-interval log line show
the same figures. Stream labels are the configured streamer ids only, never clients, so the
number of series is fixed by the command line. Each service has its own registry, not the
library's global one, so several services (or tests) can run in one process.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .records import REASONS
from .settings import Settings
from .stats import Stats, StreamFigures

PREFIX = "sfive_ngxlua_"
STREAM_LABELS = ("content", "format", "quality")


class StatsCollector:
    """A prometheus_client collector over one Stats object and the configured streamers."""

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.has_hub = bool(settings.socket or settings.hub)

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        counters = (
            ("lines", "Exporter lines read (gap lines included).", s.lines),
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
            ("datasets_dropped", "Datasets dropped (hub queue full, or too large).",
             s.datasets_dropped),
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
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)

        rejected = CounterMetricFamily(PREFIX + "records_rejected", "Lines rejected, by reason.",
                                       labels=("reason",))
        counts = s.rejected
        for reason in REASONS:
            rejected.add_metric((reason,), counts.get(reason, 0))
        for reason in sorted(set(counts) - set(REASONS)):
            rejected.add_metric((reason,), counts[reason])
        yield rejected

        yield GaugeMetricFamily(PREFIX + "exporter_connected",
                                "1 while the exporter stream is open.",
                                value=int(s.exporter_connected))
        if self.has_hub:
            yield GaugeMetricFamily(PREFIX + "hub_connected",
                                    "1 while connected to the sfive hub.",
                                    value=int(s.hub_connected))
            yield GaugeMetricFamily(PREFIX + "hub_queue_length",
                                    "Datasets waiting for the sfive hub.", value=s.queued)
        yield GaugeMetricFamily(PREFIX + "exporter_protocol",
                                "The exporter's stream protocol (1 or 2; 0 before it answered).",
                                value=s.exporter_protocol)
        yield GaugeMetricFamily(PREFIX + "intervals_held",
                                "Intervals due by the clock but held until the exporter's "
                                "records for them are in (at most --max-delay).", value=s.held)
        optional = (
            ("watermark_lag_seconds", "How far the event-time watermark is behind the clock; "
             "absent while unknown.", s.watermark_lag),
            ("ring_size_records", "Records the exporter's ring holds, if it says.", s.ring_size),
            ("ring_history_seconds", "Seconds of traffic the exporter's ring holds at the last "
             "interval's rate: how long an outage or restart may last before records are lost.",
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


class MetricsService(Service):
    """Serves ``/metrics`` on a Twisted server endpoint (e.g. ``tcp:9166:interface=127.0.0.1``).

    It listens in ``privilegedStartService`` (before twistd drops privileges) and, like
    twistd's own servers, refuses to start when the endpoint cannot listen.
    """

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, stats: Stats) -> None:
        self.description = settings.metrics
        self.endpoint = serverFromString(reactor, settings.metrics)
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(settings, stats))
        root = Resource()
        root.putChild(b"metrics", MetricsResource(self.registry))
        self.site = MetricsSite(root)
        self.port: Optional[IListeningPort] = None
        self.listening: Optional[Deferred] = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        if self.listening is not None:
            return
        starting = True
        at_start: list = []

        def failed(failure: Failure) -> None:
            if starting:
                at_start.append(failure)
            else:
                self.log.failure("cannot serve metrics on {endpoint}", failure,
                                 endpoint=self.description)

        self.listening = self.endpoint.listen(self.site).addCallbacks(self._listened, failed)
        starting = False
        if at_start:
            self.listening = None
            self.log.error("cannot serve metrics on {endpoint}: {why}",
                           endpoint=self.description, why=at_start[0].getErrorMessage())
            at_start[0].raiseException()

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        self.log.info("serving Prometheus metrics at {endpoint} (path /metrics)",
                      endpoint=self.description)
        return port

    def stopService(self) -> Optional[Deferred]:
        super().stopService()
        listening, self.listening = self.listening, None
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        if listening is not None:
            listening.cancel()
        return None
