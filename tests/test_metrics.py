"""The Prometheus endpoint: the real service scraped over real HTTP, checked against the hub."""

from __future__ import annotations

import json
import socket
import sys
from typing import Dict, FrozenSet, Tuple

import pytest
import pytest_twisted
import treq
from helpers.faults import WithMetrics, iso
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor
from twisted.internet.error import CannotListenError
from twisted.python import usage

from sfive_ngxlua import __version__
from sfive_ngxlua.metrics import MetricsService
from sfive_ngxlua.records import REASONS
from sfive_ngxlua.settings import Options, Settings
from sfive_ngxlua.stats import Stats
from sfive_ngxlua.status import DROP_REASONS

T0 = 1_800_000_000  # a multiple of the interval length: the service starts on a boundary
D = 10
STREAMERS = [("foo", "hls", "high"), ("foo", "hls", "low"), ("bar", "hls", "high"),
             ("bar", "hls", "low")]
CLIENT_A = ("198.51.100.7", "LeakCheckPlayer/1.0")
CLIENT_B = ("198.51.100.8", "OtherPlayer/2.0")
CLIENT_C = ("203.0.113.9", "ThirdPlayer/3.0")
Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


def record(t: float, streamer: Tuple[str, str, str], client: Tuple[str, str], sent: int,
           seq: int, status: int = 200) -> bytes:
    content, fmt, quality = streamer
    return json.dumps({
        "seq": seq, "time": iso(t), "client": client[0], "ua": client[1],
        "url": f"/live/{fmt}/{content}-{quality}/seg{seq}.ts", "status": status,
        "bytes-sent": sent,
    }).encode() + b"\n"


def samples(families) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def stream_labels(streamer: Tuple[str, str, str]) -> FrozenSet[Tuple[str, str]]:
    return frozenset(zip(("content", "format", "quality"), streamer))


def key(dataset: dict) -> Tuple[str, str, str]:
    sid = dataset["streamer-id"]
    return (sid["content-id"], sid["format"], sid["quality"])


@defer.inlineCallbacks
def scrape(port: int, accept: str = "text/plain"):
    response = yield treq.get(f"http://127.0.0.1:{port}/metrics", persistent=False,
                              headers={"Accept": accept})
    body = yield treq.text_content(response)
    return response, body


@defer.inlineCallbacks
def run_service(tmp_path):
    """Two intervals through the real service; the hub's datasets and the scrapes after each."""
    run = WithMetrics(tmp_path, T0, D)
    clock, exporter, hub, stats = run.clock, run.exporter, run.hub, run.stats
    out = {}
    try:
        yield run.start()
        port = run.port

        first = [
            record(T0 + 1, STREAMERS[0], CLIENT_A, 1000, 1),
            record(T0 + 2, STREAMERS[0], CLIENT_A, 500, 2),
            record(T0 + 3, STREAMERS[0], CLIENT_B, 300, 3),
            record(T0 + 4, STREAMERS[1], CLIENT_A, 700, 4),
            record(T0 + 5, STREAMERS[2], CLIENT_C, 250, 5),
            record(T0 + 6, STREAMERS[0], CLIENT_B, 999, 6, status=404),
            b"this is not json\n",
            b"[1, 2]\n",
            json.dumps({"seq": 7, "time": "yesterday", "client": "1.2.3.4", "ua": "x",
                        "url": "/live/hls/foo-high/a.ts", "status": 200,
                        "bytes-sent": 5}).encode() + b"\n",
            record(T0 + 7, ("foo", "dash", "high"), CLIENT_A, 11, 8),
            json.dumps({"seq": 9, "time": iso(T0 + 7), "client": "1.2.3.4", "ua": "x",
                        "url": "/elsewhere/x", "status": 200, "bytes-sent": 5}).encode() + b"\n",
            json.dumps({"lost": 3, "seq": 13}).encode() + b"\n",
        ]
        exporter.send(b"".join(first))
        yield wait_for(lambda: stats.lines == len(first))
        clock.advance(D + 1)
        out["first"] = list(hub.read())
        out["first_scrape"] = yield scrape(port)

        second = [
            record(T0 + D + 1, STREAMERS[0], CLIENT_A, 4000, 13),
            record(T0 + D + 2, STREAMERS[3], CLIENT_C, 10, 14),
            record(T0 + 5, STREAMERS[1], CLIENT_A, 60, 15),  # late: its interval is reported
        ]
        exporter.send(b"".join(second))
        yield wait_for(lambda: stats.lines == len(first) + len(second))
        clock.advance(D)
        out["second"] = hub.read()[len(out["first"]):]
        out["scrape"] = yield scrape(port)
        out["openmetrics"] = yield scrape(port, "application/openmetrics-text; version=1.0.0")
        out["lines"] = len(first) + len(second)
        out["now"] = clock.seconds()
    finally:
        yield run.stop()
    return out


@pytest_twisted.inlineCallbacks
def test_scrape_matches_the_datasets_the_hub_received(tmp_path):
    run = yield run_service(tmp_path)
    first, second = run["first"], run["second"]
    assert [key(d) for d in first] == STREAMERS and [key(d) for d in second] == STREAMERS
    assert [(d["data"]["client-count"], d["data"]["bytes-sent"]) for d in first] == \
        [(2, 1800), (1, 700), (1, 250), (0, 0)]
    assert [(d["data"]["client-count"], d["data"]["bytes-sent"]) for d in second] == \
        [(1, 4000), (1, 60), (0, 0), (1, 10)]

    response, body = run["first_scrape"]
    assert response.code == 200
    after_first = samples(text_string_to_metric_families(body))
    for d in first:
        labels = stream_labels(key(d))
        assert after_first[("sfive_ngxlua_stream_clients", labels)] == d["data"]["client-count"]
        assert after_first[("sfive_ngxlua_stream_interval_bytes", labels)] == \
            d["data"]["bytes-sent"]

    response, body = run["scrape"]
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    got = samples(text_string_to_metric_families(body))
    for d in second:
        labels = stream_labels(key(d))
        assert got[("sfive_ngxlua_stream_clients", labels)] == d["data"]["client-count"]
        assert got[("sfive_ngxlua_stream_interval_bytes", labels)] == d["data"]["bytes-sent"]
        assert got[("sfive_ngxlua_stream_bytes_total", labels)] == sum(
            e["data"]["bytes-sent"] for e in first + second if key(e) == key(d))
    stream_series = [k for k in got if k[0].startswith("sfive_ngxlua_stream_")]
    assert len(stream_series) == 3 * len(STREAMERS)

    def value(name: str, **labels: str) -> float:
        return got[(name, frozenset(labels.items()))]

    assert value("sfive_ngxlua_datasets_sent_total") == len(first) + len(second) == 8
    assert value("sfive_ngxlua_lines_total") == run["lines"]
    assert value("sfive_ngxlua_records_accepted_total") == 8
    assert value("sfive_ngxlua_records_late_total") == 1
    assert value("sfive_ngxlua_records_lost_total") == 3
    expected = {"status": 1, "invalid-json": 1, "not-an-object": 1, "bad-time": 1,
                "unknown-streamer": 1, "url-mismatch": 1}
    for reason in REASONS:
        assert value("sfive_ngxlua_records_rejected_total", reason=reason) == \
            expected.get(reason, 0), reason
    assert value("sfive_ngxlua_exporter_connected") == 1
    assert value("sfive_ngxlua_hub_connected") == 1
    assert value("sfive_ngxlua_hub_queue_length") == 0
    for reason in DROP_REASONS:
        assert value("sfive_ngxlua_datasets_dropped_total", reason=reason) == 0
    assert value("sfive_ngxlua_source_connected") == 1
    assert value("sfive_ngxlua_last_report_timestamp_seconds") == run["now"] == T0 + 2 * D + 1

    response, body = run["openmetrics"]
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(
        b"application/openmetrics-text")
    om = samples(openmetrics_families(body))
    assert om[("sfive_ngxlua_datasets_sent_total", frozenset())] == 8


@pytest_twisted.inlineCallbacks
def test_scrape_does_not_reveal_clients(tmp_path):
    run = yield run_service(tmp_path)
    sent = json.dumps(run["first"] + run["second"])
    for ip, ua in (CLIENT_A, CLIENT_B, CLIENT_C):
        assert ip in sent and ua in sent  # the hub does get them ...
        for _, body in (run["first_scrape"], run["scrape"], run["openmetrics"]):
            assert ip not in body and ua not in body  # ... the metrics never do
    labels = {name for f in text_string_to_metric_families(run["scrape"][1])
              for s in f.samples for name in s.labels if s.name.startswith("sfive_ngxlua_")}
    assert labels == {"reason", "content", "format", "quality", "component", "state",
                      "version", "python", "twisted", "warning"}


def scrape_registry(service: MetricsService) -> Samples:
    return samples(text_string_to_metric_families(generate_latest(service.registry).decode()))


def test_every_series_is_there_before_the_first_report():
    settings = Settings(streamers=tuple(STREAMERS), metrics="tcp:0:interface=127.0.0.1")
    got = scrape_registry(MetricsService(settings, reactor, Stats()))
    for reason in REASONS:
        assert got[("sfive_ngxlua_records_rejected_total", frozenset({("reason", reason)}))] == 0
    for streamer in STREAMERS:
        for name in ("stream_clients", "stream_interval_bytes", "stream_bytes_total"):
            assert got[(f"sfive_ngxlua_{name}", stream_labels(streamer))] == 0
    names = {name for name, _ in got}
    assert "sfive_ngxlua_last_report_timestamp_seconds" not in names
    # datasets go to standard output here: no hub whose state could alarm anyone
    assert "sfive_ngxlua_hub_connected" not in names
    assert "sfive_ngxlua_exporter_connected" in names


def test_each_service_has_its_own_registry():
    settings = Settings(streamers=tuple(STREAMERS[:1]), socket="/nonexistent",
                        metrics="tcp:0:interface=127.0.0.1")
    one, two = Stats(), Stats()
    one.lines, two.lines = 5, 7
    two.hub_connected = True
    a = scrape_registry(MetricsService(settings, reactor, one))
    b = scrape_registry(MetricsService(settings, reactor, two))
    assert a[("sfive_ngxlua_lines_total", frozenset())] == 5
    assert b[("sfive_ngxlua_lines_total", frozenset())] == 7
    assert (a[("sfive_ngxlua_hub_connected", frozenset())],
            b[("sfive_ngxlua_hub_connected", frozenset())]) == (0, 1)


def test_metrics_refused_without_prometheus_client(monkeypatch):
    # Simulated absence: prometheus_client is installed here, so hide it from imports.
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    options = Options()
    with pytest.raises(usage.UsageError) as info:
        options.parseOptions(["-S", "foo/hls/high", "--metrics", "tcp:9166"])
    message = str(info.value)
    assert "--metrics" in message and "prometheus_client" in message
    assert "python3-prometheus-client" in message
    Options().parseOptions(["-S", "foo/hls/high"])  # without --metrics it is not needed


def test_endpoint_in_use_refuses_to_start():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        settings = Settings(streamers=tuple(STREAMERS[:1]),
                            metrics=f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
        service = MetricsService(settings, reactor, Stats())
        with pytest.raises(CannotListenError):
            service.privilegedStartService()
        assert service.port is None
    finally:
        taken.close()


def test_event_time_series_show_the_held_intervals_the_lag_and_the_ring():
    settings = Settings(streamers=tuple(STREAMERS), metrics="tcp:0:interface=127.0.0.1")
    stats = Stats()
    service = MetricsService(settings, reactor, stats)
    got = scrape_registry(service)
    assert got[("sfive_ngxlua_exporter_protocol", frozenset())] == 0
    assert got[("sfive_ngxlua_intervals_held", frozenset())] == 0
    assert got[("sfive_ngxlua_intervals_held_early_total", frozenset())] == 0
    assert got[("sfive_ngxlua_heartbeats_total", frozenset())] == 0
    names = {name for name, _ in got}
    for unknown in ("watermark_lag_seconds", "ring_size_records", "ring_history_seconds"):
        assert f"sfive_ngxlua_{unknown}" not in names, "absent while unknown"

    stats.exporter_protocol, stats.heartbeats, stats.held, stats.held_early = 2, 40, 3, 1
    stats.watermark_lag, stats.ring_size, stats.ring_history = 31.5, 10000, 250.0
    got = scrape_registry(service)
    assert got[("sfive_ngxlua_exporter_protocol", frozenset())] == 2
    assert got[("sfive_ngxlua_heartbeats_total", frozenset())] == 40
    assert got[("sfive_ngxlua_intervals_held", frozenset())] == 3
    assert got[("sfive_ngxlua_intervals_held_early_total", frozenset())] == 1
    assert got[("sfive_ngxlua_watermark_lag_seconds", frozenset())] == 31.5
    assert got[("sfive_ngxlua_ring_size_records", frozenset())] == 10000
    assert got[("sfive_ngxlua_ring_history_seconds", frozenset())] == 250.0


def test_new_series_are_there_from_the_start_with_every_label_value():
    settings = Settings(streamers=tuple(STREAMERS), socket="/nonexistent", state_dir="/x",
                        metrics="tcp:0:interface=127.0.0.1")
    stats = Stats()
    got = scrape_registry(MetricsService(settings, reactor, stats))
    for reason in DROP_REASONS:
        assert got[("sfive_ngxlua_datasets_dropped_total", frozenset({("reason", reason)}))] == 0
    for component in ("fetch", "report", "sink", "checkpoint"):
        labels = frozenset({("component", component)})
        assert got[("sfive_ngxlua_component_errors_total", labels)] == 0
        assert got[("sfive_ngxlua_component_failing", labels)] == 0
    for name in ("intervals_covered_total", "intervals_partial_total",
                 "intervals_withheld_total", "records_withheld_total"):
        assert got[(f"sfive_ngxlua_{name}", frozenset())] == 0
    assert got[("sfive_ngxlua_source_connected", frozenset())] == 0
    assert got[("sfive_ngxlua_exporter_connected", frozenset())] == 0  # the old name, kept
    assert got[("sfive_ngxlua_interval_seconds", frozenset())] == settings.duration
    assert got[("sfive_ngxlua_hub_queue_limit", frozenset())] == settings.queue_limit
    assert got[("sfive_ngxlua_healthy", frozenset())] == 0  # the hub is not connected
    names = {name for name, _ in got}
    assert "sfive_ngxlua_interval_covered" not in names, "absent while not known"
    info = [labels for name, labels in got if name == "sfive_ngxlua_build_info"]
    assert len(info) == 1 and ("version", __version__) in info[0]
    # prometheus_client's process and platform collectors, on this service's own registry
    assert got[("process_open_fds", frozenset())] > 0
    assert got[("process_resident_memory_bytes", frozenset())] > 0
    assert ("process_cpu_seconds_total", frozenset()) in got
    assert any(name == "python_info" for name, _ in got)


def test_drops_components_and_coverage_follow_stats():
    settings = Settings(streamers=tuple(STREAMERS[:1]), metrics="tcp:0:interface=127.0.0.1")
    stats = Stats()
    service = MetricsService(settings, reactor, stats)
    stats.drop("queue-full", 3)
    stats.drop("brand-new-reason")
    stats.datasets_dropped += 2  # counted without a reason (a path not yet using drop())
    stats.states.update(fetch="retrying", report="running")
    stats.errors.update(fetch=4)
    stats.intervals_covered, stats.intervals_partial, stats.intervals_withheld = 7, 2, 1
    stats.records_withheld, stats.covered = 5, True
    stats.source_connected = True
    stats.warnings["unknown-streamer"] += 2
    got = scrape_registry(service)

    def value(name: str, **labels: str) -> float:
        return got[(f"sfive_ngxlua_{name}", frozenset(labels.items()))]

    assert value("datasets_dropped_total", reason="queue-full") == 3
    assert value("datasets_dropped_total", reason="brand-new-reason") == 1
    assert value("datasets_dropped_total", reason="other") == 2
    assert value("datasets_dropped_total", reason="too-large") == 0
    assert value("component_errors_total", component="fetch") == 4
    assert value("component_failing", component="fetch") == 1
    assert value("component_failing", component="report") == 0
    assert value("component_state", component="fetch", state="retrying") == 1
    assert value("component_state", component="sink", state="unknown") == 1
    assert (value("intervals_covered_total"), value("intervals_partial_total"),
            value("intervals_withheld_total"), value("records_withheld_total")) == (7, 2, 1, 5)
    assert value("interval_covered") == 1
    assert value("source_connected") == value("exporter_connected") == 1
    assert value("healthy") == 0  # fetch is retrying
    assert value("warnings_total", warning="unknown-streamer") == 2
    assert value("warnings_total", warning="not-sfive-log") == 0, "there from the start"


def test_the_listener_is_twisteds_own():
    settings = Settings(streamers=tuple(STREAMERS[:1]), metrics="tcp:0:interface=127.0.0.1")
    service = MetricsService(settings, reactor, Stats())
    assert isinstance(service.server, StreamServerEndpointService)
    assert service.server.parent is service
