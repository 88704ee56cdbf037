"""Misconfiguration is said, once per change of condition (issue 17 item 5).

The reporter, the pipeline and the model are the real ones, on a task.Clock, fed lines as a
source would; nginx writing its ``combined`` log and a web server that is not an exporter are
real too.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import pytest_twisted
from helpers.faults import clock_at
from support import line, wait_for
from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel
from twisted.web import resource, server

from lab.nginx import fetch
from sfive_ngxlua import conditions
from sfive_ngxlua.fetch import LogFetchService
from sfive_ngxlua.follow import FileFollowService
from sfive_ngxlua.model import IntervalModel
from sfive_ngxlua.outbox import DirectOutbox
from sfive_ngxlua.pipeline import Pipeline
from sfive_ngxlua.report import ReportService
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

pytestmark = pytest.mark.timeout(60)
pytest_plugins = ("helpers.fixtures",)

D = 10
T0 = 1_800_000_000
GOOD = "/live/hls/foo-high/seg1.ts"
CLIENT = "10.9.8.7"
UA = "SecretPlayer/4.2"


class Chain:
    """Pipeline -> model -> reporter (with its conditions, as the service composes them) on a
    task.Clock, without a source: the wall clock rules."""

    def __init__(self, streamers=(("foo", "hls", "high"),)):
        self.settings = Settings(streamers=streamers, hostname="h", duration=D, grace=1.0)
        self.clock = clock_at(T0 - D + 0.5)  # the first interval starts at T0
        self.stats = Stats()
        self.model = IntervalModel(self.settings, self.stats)
        self.pipeline = Pipeline(self.settings, self.stats, self.model)
        self.out: list = []
        outbox = DirectOutbox(self.settings, CallableSink(self.out.append), self.stats)
        self.report = ReportService(
            self.settings, self.clock, self.model, outbox, self.stats,
            conditions=conditions.Conditions(self.settings, self.pipeline.parser))
        self.report.startService()
        self.k = 0

    def interval(self, *urls, bad=()):
        """One interval: a read per URL (a record of now), plus the ``bad`` raw lines; then
        the clock to its report."""
        now = T0 + self.k * D + 2
        self.clock.advance(now - self.clock.seconds())
        for url in urls:
            self.pipeline.feed_lines([line(_iso(now), url=url, client=CLIENT, ua=UA)[:-1]])
        if bad:
            self.pipeline.feed_lines(list(bad))
        self.k += 1
        self.clock.advance(T0 + self.k * D + 1.5 - self.clock.seconds())
        assert len(self.out) == self.k * len(self.settings.streamers), "reported"


def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


def warnings(logs, condition):
    return [e for e in logs.events if e.get("condition") == condition and e.get("raised")]


def cleared(logs, condition):
    return [e for e in logs.events if e.get("condition") == condition
            and e.get("raised") is False]


def text(event) -> str:
    return event["warning"]


def test_unknown_streamer_is_said_once_with_examples_and_again_only_after_it_cleared(logs):
    c = Chain()
    unknown = ["/live/hls/bar-720p/1.ts", "/live/hls/bar-720p/2.ts?token=s3cr3t",
               "/live/dash/foo-high/3.m4s", "/live/hls/bar-720p/4.ts"]
    c.interval(GOOD, *unknown)
    assert len(warnings(logs, "unknown-streamer")) == 1
    said = text(warnings(logs, "unknown-streamer")[0])
    assert said.startswith("4 records since the last report are of streams not among -S")
    # three examples, the most recent first, each with what -F made of it; no query string
    assert "unknown-streamer /live/hls/bar-720p/4.ts (parsed as bar/hls/720p, which is not " \
           "among -S)" in said
    assert "/live/dash/foo-high/3.m4s (parsed as foo/dash/high, which is not among -S)" in said
    assert "/live/hls/bar-720p/2.ts?\u2026 (parsed as bar/hls/720p" in said
    assert "1.ts" not in said and "s3cr3t" not in said
    assert logs.events[-1]["log_level"] == LogLevel.warn

    for _ in range(3):  # still there: said no more
        c.interval(GOOD, unknown[0])
    c.interval()  # no lines: neither evidence for nor against
    c.interval(GOOD)
    c.interval(GOOD)
    assert not cleared(logs, "unknown-streamer")
    c.interval()
    c.interval(GOOD)  # the third clean report with lines in a row
    assert len(cleared(logs, "unknown-streamer")) == 1
    assert len(warnings(logs, "unknown-streamer")) == 1
    c.interval(GOOD)
    c.interval(GOOD, unknown[0])  # back
    assert len(warnings(logs, "unknown-streamer")) == 2
    assert c.stats.warnings["unknown-streamer"] == 2
    # nothing else was ever said
    assert {e.get("condition") for e in logs.events if "condition" in e} == {"unknown-streamer"}


def test_nothing_accepted_while_lines_arrive_but_url_mismatch_alone_is_normal(logs):
    c = Chain()
    other = ["/wp-login.php", "/other-site/index.html"]
    for _ in range(3):
        c.interval(GOOD, *other)  # an http{}-level log seeing other sites: fine
    assert not [e for e in logs.events if "condition" in e]

    c.interval(*other)
    assert len(warnings(logs, "nothing-accepted")) == 1
    said = text(warnings(logs, "nothing-accepted")[0])
    assert said.startswith("nothing counted: none of the 2 lines read since the last report "
                           "was accepted (url-mismatch 2); the datasets hold no viewers: "
                           "check -F and -S")
    assert "url-mismatch /other-site/index.html (not matched by -F)" in said
    c.interval(*other)
    c.interval(*other)
    assert len(warnings(logs, "nothing-accepted")) == 1
    for _ in range(3):
        c.interval(GOOD)
    assert len(cleared(logs, "nothing-accepted")) == 1
    c.interval(other[0])
    assert len(warnings(logs, "nothing-accepted")) == 2
    assert c.stats.warnings["nothing-accepted"] == 2


def test_a_format_reason_past_a_small_share_is_said_with_hysteresis(logs):
    c = Chain()
    missing = b'{"url":"/live/hls/foo-high/9.ts","client":"10.9.8.7","status":200}'
    good = [GOOD] * 98
    c.interval(*good[:97], bad=[missing] * 3)  # 3 %
    assert len(warnings(logs, "missing-field")) == 1
    said = text(warnings(logs, "missing-field")[0])
    assert said.startswith("3 of the 100 lines since the last report (3%) were rejected as "
                           "missing-field: records without one of the fields")
    assert "nginx/sfive-log.conf" in said
    assert "missing-field /live/hls/foo-high/9.ts (parsed as foo/hls/high)" in said
    # between the thresholds (0.5 %): neither raised again nor cleared, however long
    for _ in range(4):
        c.interval(*(good * 2)[:199], bad=[missing])
    assert len(warnings(logs, "missing-field")) == 1 and not cleared(logs, "missing-field")
    for _ in range(3):
        c.interval(*good)
    assert len(cleared(logs, "missing-field")) == 1
    c.interval(*good, bad=[b"<html>"] * 2)
    assert len(warnings(logs, "invalid-json")) == 1
    c.interval(*good[:50], bad=[missing] * 2)
    assert len(warnings(logs, "missing-field")) == 2
    assert c.stats.warnings == {"missing-field": 2, "invalid-json": 1}
    assert not warnings(logs, "nothing-accepted")


def test_samples_and_warnings_hold_no_client_address_or_user_agent(logs):
    c = Chain()
    long = "/live/hls/bar-720p/" + "x" * 400 + ".ts"
    combined = (f'{CLIENT} - - [27/Nov/2026:20:00:00 +0000] "GET /live/hls/foo-high/5.ts '
                f'HTTP/1.1" 200 18800 "-" "{UA}"').encode()
    c.interval(long, "/x", bad=[combined] * 3)
    samples = c.stats.rejected_samples
    assert samples["invalid-json"][-1] == "/live/hls/foo-high/5.ts"
    assert len(samples["unknown-streamer"][-1]) == 200, "cut (stats.SAMPLE_CHARS)"
    said = text(warnings(logs, "unknown-streamer")[0])
    example = re.search(r"unknown-streamer (\S+) \(", said).group(1)
    assert len(example) == conditions.EXAMPLE_CHARS and example.endswith("\u2026")
    assert warnings(logs, "invalid-json")
    assert "(invalid-json 3, url-mismatch 1, unknown-streamer 1); the datasets hold no viewers: " \
           "write the log in the sfive format (nginx/sfive-log.conf)" in \
           text(warnings(logs, "nothing-accepted")[0])
    everything = logs.everything() + repr(samples)
    assert CLIENT not in everything and UA not in everything


def test_samples_are_one_per_reason_and_read():
    c = Chain()
    c.pipeline.feed_lines([line(_iso(T0), url=f"/x/{n}")[:-1] for n in range(50)])
    assert list(c.stats.rejected_samples["url-mismatch"]) == ["/x/0"]
    c.pipeline.feed_lines([line(_iso(T0), url="/y")[:-1]])
    assert list(c.stats.rejected_samples["url-mismatch"]) == ["/x/0", "/y"]


def test_the_per_interval_line_is_key_value_pairs_this_intervals_and_since_start(logs):
    c = Chain()
    c.interval(GOOD, GOOD, "/x")
    c.interval(GOOD)
    lines = logs.matching(") reported: ")
    assert len(lines) == 2
    pairs = [dict(p.split("=", 1) for p in t.split(" reported: ")[1].split()) for t in lines]
    assert pairs[0]["interval.lines"] == "3" and pairs[0]["total.lines"] == "3"
    assert pairs[1]["interval.lines"] == "1" and pairs[1]["total.lines"] == "4"
    assert pairs[1]["interval.accepted"] == "1" and pairs[1]["total.accepted"] == "3"
    assert pairs[0]["interval.rejected.url-mismatch"] == "1"
    assert pairs[1]["interval.rejected.url-mismatch"] == "0"
    assert pairs[1]["total.rejected.url-mismatch"] == "1"
    assert pairs[1]["interval.clients"] == "1" and pairs[1]["held"] == "0"
    assert "{" not in lines[1], "no dict repr"


# -- --file on a log in nginx's combined format -----------------------------------------------


def follower(path):
    settings = Settings(streamers=(("foo", "hls", "high"),), file=str(path), flush_period=1.0)
    clock = task.Clock()
    clock.advance(time.time())
    stats = Stats()
    pipeline = Pipeline(settings, stats, IntervalModel(settings, stats))
    service = FileFollowService(settings, None, pipeline, stats, clock=clock, inotify=False)
    service.startService()
    clock.advance(0)
    return service, clock, stats


@defer.inlineCallbacks
def nginx_writes(nginx_factory, tmp_path, log_format):
    """nginx logging ``log_format`` to a log of its own, after a few requests (flushed)."""
    log = tmp_path / "logs" / "site.log"
    log.parent.mkdir()
    conf = "" if log_format == "combined" else f"    include {os.getcwd()}/nginx/sfive-log.conf;\n"
    nginx = nginx_factory(extra_http=conf + f"    access_log {log} {log_format} buffer=64k "
                                             f"flush=1s;\n")
    for path in ("/live/hls/foo-high/seg1.ts", "/live/hls/foo-high/seg2.ts", "/nothing"):
        yield fetch(nginx.url(path), ua=UA)
    yield wait_for(lambda: log.exists() and log.read_bytes().count(b"\n") >= 3,
                   what="nginx to flush its log")
    return nginx, log


def errors(logs):
    return [e for e in logs.events if e.get("log_level") == LogLevel.error]


@pytest_twisted.inlineCallbacks
def test_a_combined_log_given_to_file_is_one_clear_error_and_still_followed(
        nginx_factory, tmp_path, logs):
    nginx, log = yield nginx_writes(nginx_factory, tmp_path, "combined")
    assert log.read_bytes().startswith(b"127.0.0.1 - - [")  # as nginx wrote it
    service, clock, stats = follower(log)
    try:
        for _ in range(8):
            clock.advance(0.25)
        said = errors(logs)
        assert len(said) == 1, logs.texts()
        message = logs.texts()[logs.events.index(said[0])]
        assert f"{log} is not in the sfive format: its lines are in one of nginx's text " \
               "formats (combined?), not JSON" in message
        assert "include nginx/sfive-log.conf" in message
        assert stats.warnings["not-sfive-log"] == 1
        assert service.in_sfive_format is False
        # kept following: new lines are read and rejected (counted), the fix counts at once
        yield fetch(nginx.url("/live/hls/foo-high/seg1.ts"), ua=UA)
        nginx.reload()  # writes its buffer
        yield wait_for(lambda: log.read_bytes().count(b"\n") >= 4, what="the new line")
        clock.advance(0.25)
        assert stats.rejected["invalid-json"] == 1 and stats.lines == 1  # opened at its end
        assert stats.rejected_samples["invalid-json"][-1] == "/live/hls/foo-high/seg1.ts"
        with open(log, "ab") as f:
            f.write(line(_iso(int(time.time())), url=GOOD))
        clock.advance(0.25)
        assert stats.lines == 2 and sum(stats.rejected.values()) == 1
        assert len(errors(logs)) == 1
        assert "127.0.0.1" not in repr(stats.rejected_samples)
    finally:
        service.stopService()


@pytest_twisted.inlineCallbacks
def test_a_log_in_the_sfive_format_is_no_error(nginx_factory, tmp_path, logs):
    _, log = yield nginx_writes(nginx_factory, tmp_path, "sfive")
    service, clock, stats = follower(log)
    try:
        clock.advance(0.25)
        assert service.in_sfive_format is True
        assert not errors(logs) and not stats.warnings
    finally:
        service.stopService()


# -- an exporter URL that answers 200 but is not an exporter ----------------------------------


class Welcome(resource.Resource):
    """A web server's page where the exporter should be: 200, HTML."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hits = 0

    def render_GET(self, request):
        self.hits += 1
        request.setHeader(b"content-type", b"text/html")
        return b"<html><body><h1>Welcome to nginx!</h1></body></html>\n"


@pytest_twisted.ensureDeferred
async def test_a_200_that_is_not_an_exporter_is_said_and_backs_off_growing(logs):
    page = Welcome()
    port = reactor.listenTCP(0, server.Site(page), interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}/"
    settings = Settings(streamers=(("foo", "hls", "high"),), url=url, connect_timeout=5.0)
    stats = Stats()
    clock = clock_at(T0)
    pipeline = Pipeline(settings, stats, IntervalModel(settings, stats))
    fetcher = LogFetchService(settings, reactor, pipeline, stats, clock=clock)
    fetcher.startService()
    try:
        delays = []
        for n in range(4):
            await wait_for(lambda n=n: stats.exporter_reconnects == n + 1, what="a retry")
            delays.append(fetcher._retry.getTime() - clock.seconds())
            clock.advance(delays[-1])
        for n, delay in enumerate(delays):
            assert 1.5 ** n <= delay <= 1.5 ** n + 1, delays
        said = errors(logs)
        assert len(said) == 1, "once per stretch"
        assert logs.texts()[logs.events.index(said[0])] == (
            f"exporter {url} answered 200 but is not an sfive exporter: no X-Sfive-Protocol "
            "header and no record in its answer (53 bytes, text/html); -u must name the "
            "exporter's location (nginx/sfive-location.conf, /sfive by default)")
        assert stats.warnings["not-an-exporter"] == 1
        assert any("not an exporter (stream ended)" in t for t in logs.matching("reconnecting"))
    finally:
        fetcher.stopService()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_composed_service_says_it_through_its_own_parser(logs):
    """build() wires the conditions to the pipeline's parser: an exporter streaming records of
    a stream not among -S, through the real HTTP client, is warned about at the report."""
    from helpers.faults import Exporter, Running
    from helpers.faults import line as exporter_line
    from helpers.faults import settings as service_settings

    exporter = Exporter().listen()
    run = Running(service_settings(url=exporter.url())).start()
    try:
        exporter.plan.append(("stream", exporter_line(T0 + 1, url="/live/hls/zzz-4k/1.ts",
                                                      client=CLIENT, ua=UA, seq=1)))
        await wait_for(lambda: run.stats.rejected["unknown-streamer"] == 1)
        run.clock.advance(T0 + 11 - run.clock.seconds())
        await wait_for(lambda: warnings(logs, "unknown-streamer"))
        assert "/live/hls/zzz-4k/1.ts (parsed as zzz/hls/4k, which is not among -S)" in \
            text(warnings(logs, "unknown-streamer")[0])
        assert CLIENT not in logs.everything() and UA not in logs.everything()
    finally:
        await run.stop()
        await exporter.stop()
