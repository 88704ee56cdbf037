"""The composed service against a real HTTP exporter and a real unix datagram hub.

Networking runs on the real reactor; every timer (reporting, backoff) runs on a task.Clock, so
intervals pass when the test says so.
"""

import pytest_twisted
from helpers.faults import iso
from support import DatagramHub, Exporter, heartbeat, line, wait_for
from twisted.internet import reactor, task

from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

T0 = 1795856400  # 2026-11-28T09:00:00Z
STREAMERS = tuple((c, f, q) for c in ("C1", "C2") for f in ("hls", "dash") for q in ("high", "low"))




def settings(url, **kw):
    return Settings(streamers=STREAMERS, hostname="edge1", duration=2, tags=("tag1",), url=url,
                    **kw)


def empty(streamer, start, duration_ms=2000):
    return dataset(streamer, start, [], duration_ms)


def dataset(streamer, start, clients, duration_ms=2000):
    return {
        "version": 1, "hostname": "edge1", "tags": ["tag1"],
        "streamer-id": {"content-id": streamer[0], "format": streamer[1], "quality": streamer[2]},
        "start-time": start, "duration-ms": duration_ms,
        "data": {"clients": clients, "client-count": len(clients),
                 "bytes-sent": sum(c["bytes-sent"] for c in clients)},
    }


class Running:
    """A started service with its peers; ``stop()`` tears everything down."""

    def __init__(self, tmp_path, **kw):
        self.exporter = Exporter().listen()
        self.hub = DatagramHub(str(tmp_path / "hub.sock"))
        self.clock = task.Clock()
        self.clock.advance(T0 + 0.5)
        self.settings = settings(self.exporter.url(), socket=self.hub.path, **kw)
        self.service = build(self.settings, reactor, clock=self.clock)
        self.stats = self.service.stats
        self.service.startService()

    @property
    def requests(self):
        return self.exporter.streams

    def send(self, data, chunk=7):
        for i in range(0, len(data), chunk):
            self.exporter.send(data[i:i + chunk])

    @pytest_twisted.inlineCallbacks
    def stop(self):
        """Stop, reading the hub meanwhile so that the sink's final drain is not stalled."""
        reader = task.LoopingCall(self.hub.read)
        reader.start(0.01)
        if self.service.running:
            yield self.service.stopService()
        reader.stop()
        yield self.exporter.stop()
        self.hub.close()


@pytest_twisted.inlineCallbacks
def test_exact_datasets_interval_after_interval(tmp_path):
    run = Running(tmp_path)
    try:
        yield wait_for(lambda: run.requests)
        headers = run.exporter.seen_headers[0]
        assert headers[b"User-Agent"][0].startswith(b"sfive-ngxlua/")
        lines = b"".join([
            line(iso(T0 + 1, "Z"), client="10.0.0.9"),                       # before start
            line(iso(T0 + 2, "Z", 5), client="10.0.0.1", ua="A", sent=100),
            line(iso(T0 + 2, "Z", 900), client="10.0.0.1", ua="A", sent=50),
            line(iso(T0 + 3, "Z"), client="10.0.0.1", ua="B", sent=7),
            line(iso(T0 + 3, "Z"), client="10.0.0.2", ua="A", sent=1000, status=206),
            line(iso(T0 + 3, "Z"), client="10.0.0.3", ua="A", sent=5, status=404),
            line(iso(T0 + 3, "Z"), url="/live/dash/C2-low/x.m4s", client="10.0.0.4", sent=3),
            line(iso(T0 + 3, "Z"), url="/live/hls/C3-low/x.ts", client="10.0.0.5", sent=3),
            line(iso(T0 + 4, "Z"), url="/live/hls/C1-high/x.ts", client="10.0.0.6", sent=11),
            b"garbage\n",
        ])
        run.send(lines)
        yield wait_for(lambda: run.stats.lines == 10)
        assert dict(run.stats.rejected) == {"status": 1, "unknown-streamer": 1, "invalid-json": 1}
        assert run.stats.before_start == 1
        run.clock.advance(T0 + 4 + 1 - run.clock.seconds())
        yield wait_for(lambda: len(run.hub.read()) == 8)
        got = run.hub.read()
        start = "2026-11-28T09:00:02Z"
        expected = [empty(s, start) for s in STREAMERS]
        expected[0] = dataset(STREAMERS[0], start, [  # largest first (datasets.fit)
            {"ip": "10.0.0.2", "user-agent": "A", "bytes-sent": 1000},
            {"ip": "10.0.0.1", "user-agent": "A", "bytes-sent": 150},
            {"ip": "10.0.0.1", "user-agent": "B", "bytes-sent": 7},
        ])
        expected[7] = dataset(STREAMERS[7], start, [
            {"ip": "10.0.0.4", "user-agent": "player/1", "bytes-sent": 3}])
        assert got == expected
        run.clock.advance(2)
        yield wait_for(lambda: len(run.hub.read()) == 16)
        got = run.hub.read()[8:]
        assert got[0] == dataset(STREAMERS[0], "2026-11-28T09:00:04Z", [
            {"ip": "10.0.0.6", "user-agent": "player/1", "bytes-sent": 11}])
        assert all(d["data"]["client-count"] == 0 for d in got[1:])
        assert run.stats.datasets_sent == 16
    finally:
        yield run.stop()


@pytest_twisted.inlineCallbacks
def test_exporter_restart_resumes_after_the_last_sequence_number(tmp_path):
    run = Running(tmp_path)
    try:
        yield wait_for(lambda: run.requests)
        run.send(line(iso(T0 + 2, "Z"), seq=41, sent=1) + line(iso(T0 + 2, "Z"), seq=42, sent=2)
                 + b'{"ti')
        yield wait_for(lambda: run.stats.lines == 2)
        run.exporter.cut()
        yield wait_for(lambda: run.stats.exporter_reconnects == 1)
        assert run.stats.exporter_connected is False
        assert not run.requests
        run.clock.advance(3)
        yield wait_for(lambda: run.requests)
        assert run.exporter.seen_args[-1] == {b"v": [b"2"], b"after": [b"42"]}
        run.send(line(iso(T0 + 3, "Z"), seq=43, sent=4))
        yield wait_for(lambda: run.stats.lines == 3)
        assert sum(run.stats.rejected.values()) == 0, "the cut partial line was parsed"
        run.clock.advance(T0 + 5 - run.clock.seconds())
        yield wait_for(lambda: len(run.hub.read()) == 8)
        assert run.hub.read()[0]["data"]["bytes-sent"] == 7
    finally:
        yield run.stop()


@pytest_twisted.inlineCallbacks
def test_non_200_answers_back_off_and_retry(tmp_path):
    run = Running(tmp_path)
    try:
        yield wait_for(lambda: run.requests)
        run.exporter.code = 503
        run.exporter.cut()
        delays = []
        for attempt in range(1, 4):
            yield wait_for(lambda attempt=attempt: run.stats.exporter_reconnects == attempt)
            call = run.service.getServiceNamed("fetch")._retry
            delays.append(call.getTime() - run.clock.seconds())
            run.clock.advance(delays[-1])
            yield wait_for(lambda n=attempt: len(run.exporter.seen_args) == n + 1)
        for n, delay in enumerate(delays):
            assert 1.5 ** n <= delay <= 1.5 ** n + 1, "exponential backoff with jitter in [0, 1)"
        run.exporter.code = 200
        yield wait_for(lambda: run.stats.exporter_reconnects == 4)
        run.clock.advance(run.service.getServiceNamed("fetch")._retry.getTime()
                          - run.clock.seconds())
        yield wait_for(lambda: run.requests)
        assert run.stats.exporter_connected
        # a v1 answer (no protocol header) is an exporter's once it carries a record
        assert run.service.getServiceNamed("fetch").failures == 4
        run.send(line(iso(T0 + 1, "Z"), url="/live/hls/C1-high/1.ts"))
        yield wait_for(lambda: run.service.getServiceNamed("fetch").failures == 0)
    finally:
        yield run.stop()


@pytest_twisted.inlineCallbacks
def test_stop_reports_the_partial_interval_and_late_records(tmp_path):
    run = Running(tmp_path)
    try:
        yield wait_for(lambda: run.requests)
        run.send(line(iso(T0 + 3, "Z"), sent=5))
        yield wait_for(lambda: run.stats.lines == 1)
        run.clock.advance(T0 + 5 - run.clock.seconds())
        yield wait_for(lambda: len(run.hub.read()) == 8)
        run.send(line(iso(T0 + 3, "Z"), sent=6) + line(iso(T0 + 4, "Z", 250), sent=7))
        yield wait_for(lambda: run.stats.lines == 3)
        assert run.stats.late == 1
        run.clock.advance(0.75)
        yield run.service.stopService()
        last = run.hub.read()[8:]
        assert len(last) == 8
        assert last[0]["start-time"] == "2026-11-28T09:00:04Z"
        assert last[0]["duration-ms"] == 1750
        assert last[0]["data"]["bytes-sent"] == 13
    finally:
        yield run.stop()


@pytest_twisted.inlineCallbacks
def test_embedding_with_a_callable_sink():
    exporter = Exporter().listen()
    clock = task.Clock()
    clock.advance(T0)
    got = []
    stats = Stats()
    service = build(settings(exporter.url()), reactor, sink=CallableSink(got.append, stats),
                    clock=clock, stats=stats)
    service.startService()
    try:
        yield wait_for(lambda: exporter.streams)
        exporter.send(line(iso(T0 + 1, "Z"), sent=9))
        yield wait_for(lambda: stats.accepted == 1)
        clock.advance(3)
        assert len(got) == 8
        assert got[0]["data"]["clients"] == [
            {"ip": "10.0.0.1", "user-agent": "player/1", "bytes-sent": 9}]
    finally:
        yield service.stopService()
        yield exporter.stop()


@pytest_twisted.inlineCallbacks
def test_a_failing_sink_costs_datasets_not_the_reporting_loop():
    exporter = Exporter().listen()
    clock = task.Clock()
    clock.advance(T0)
    calls, stats = [], Stats()

    def flaky(dataset):
        calls.append(dataset["start-time"])
        if len(calls) <= 8:
            raise BrokenPipeError("the reader went away")

    service = build(settings(exporter.url()), reactor, sink=flaky, clock=clock,
                    stats=stats)
    service.startService()
    try:
        yield wait_for(lambda: stats.exporter_connected)  # before that, intervals are held
        exporter.send(line(iso(T0 - 60, "Z"), url="/other/site"))  # v1: a first valid line
        yield wait_for(lambda: stats.lines == 1)
        clock.advance(3)
        clock.advance(2)
        assert calls[:8] == ["2026-11-28T09:00:00Z"] * 8
        assert calls[8:] == ["2026-11-28T09:00:02Z"] * 8
        assert stats.datasets_dropped == 8 and stats.datasets_sent == 8
    finally:
        yield service.stopService()
        yield exporter.stop()


@pytest_twisted.inlineCallbacks
def test_a_v2_exporter_away_holds_the_intervals_and_its_backlog_counts_in_them(tmp_path):
    """Protocol 2 through the composed service: intervals go when the heartbeat passes them
    (not at the next tick); while the exporter is away they are held, not sent empty; the
    backlog it sends after the reconnect is counted in its own intervals, not late."""
    run = Running(tmp_path)
    run.exporter.ring = "0123456789abcdef"
    fetch = run.service.getServiceNamed("fetch")
    try:
        yield wait_for(lambda: run.requests)
        run.exporter.cut()  # the first answer was v1 (no ring yet): now a v2 one
        yield wait_for(lambda: run.stats.exporter_reconnects == 1)
        run.clock.advance(fetch._retry.getTime() - run.clock.seconds())
        yield wait_for(lambda: run.stats.exporter_protocol == 2 and run.requests)
        run.send(line(iso(T0 + 2, "Z"), seq=1, sent=1) + heartbeat(1, T0 + 2.5))
        yield wait_for(lambda: run.stats.heartbeats == 1)
        run.clock.advance(T0 + 5 - run.clock.seconds())  # T0+2..4 is due by the clock
        assert run.hub.read() == [] and run.stats.held == 1
        run.send(heartbeat(1, T0 + 5.0))
        yield wait_for(lambda: len(run.hub.read()) == 8)  # on_watermark, no tick needed
        assert run.hub.read()[0]["data"]["bytes-sent"] == 1

        run.exporter.cut()  # away for 10 s while viewers go on
        yield wait_for(lambda: not run.stats.exporter_connected)
        run.clock.advance(10)
        assert len(run.hub.read()) == 8, "held, not sent empty"
        assert run.stats.held == 5
        yield wait_for(lambda: run.requests)  # the backoff's retry (1-2 s) came due
        assert run.exporter.seen_args[-1] == {
            b"v": [b"2"], b"ring": [b"0123456789abcdef"], b"after": [b"1"]}
        run.send(b"".join(line(iso(T0 + t, "Z"), seq=t, sent=t) for t in range(4, 15))
                 + heartbeat(14, T0 + 15.0))
        yield wait_for(lambda: len(run.hub.read()) == 8 * 6)
        got = [d for d in run.hub.read() if d["streamer-id"]["content-id"] == "C1"
               and d["streamer-id"]["format"] == "hls" and d["streamer-id"]["quality"] == "high"]
        assert [d["data"]["bytes-sent"] for d in got] == [1, 4 + 5, 6 + 7, 8 + 9, 10 + 11,
                                                          12 + 13]
        assert run.stats.late == 0 and run.stats.held == 0
    finally:
        yield run.stop()
