"""The status page and /healthz: the verdict's rules, real HTTP, and the page in a real browser
(Debian's chromium, headless) against the real service fed by a fake exporter."""

from __future__ import annotations

import math
import os
import random
import shutil
from html.parser import HTMLParser
from typing import Dict, List, Optional, Tuple

import pytest
import pytest_twisted
import treq
from helpers.faults import WithMetrics
from support import wait_for
from test_metrics import CLIENT_A, CLIENT_B, CLIENT_C, STREAMERS, record
from twisted.internet import reactor, task, utils

from sfive_ngxlua import stats as stats_module
from sfive_ngxlua.metrics import MetricsService
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.stats import Stats
from sfive_ngxlua.status import CHART_COLUMNS, columns, health, last_hour, render

T0 = 1_800_000_000
D = 10
HUB = Settings(streamers=tuple(STREAMERS), socket="/run/hub.sock", duration=D, grace=1,
               queue_limit=5)


def tool(name: str, package: str) -> str:
    """The path of a Debian tool the test runs: a skip saying what to install, a failure
    under CI (where scripts/setup installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def healthy_stats() -> Stats:
    stats = Stats()
    stats.hub_connected = True
    stats.last_report = T0
    stats.covered = True
    stats.states.update(fetch="streaming", report="running", sink="connected")
    return stats


def test_healthy_when_covered_hub_taking_recent_report_and_nothing_failing():
    assert health(HUB, healthy_stats(), T0 + 5) == (True, "ok")


@pytest.mark.parametrize("change, reason", [
    (lambda s: s.states.update(fetch="retrying") or s.errors.update(fetch=2),
     "fetch is retrying (2 errors)"),
    (lambda s: s.states.update(sink="failed"), "sink is failed (0 errors)"),
    (lambda s: setattr(s, "covered", False), "the running interval is not covered"),
    (lambda s: setattr(s, "hub_connected", False), "not connected to the hub at /run/hub.sock"),
    (lambda s: setattr(s, "queued", 5), "the hub queue is full (5 datasets)"),
    (lambda s: setattr(s, "last_report", T0 - 3 * D - 2), "no interval reported for 37s"),
])
def test_unhealthy_with_one_line_reason(change, reason):
    stats = healthy_stats()
    change(stats)
    ok, why = health(HUB, stats, T0 + 5)
    assert not ok and why.startswith(reason) and "\n" not in why


def test_coverage_not_known_yet_is_healthy_and_says_so():
    stats = healthy_stats()
    stats.covered = None
    assert health(HUB, stats, T0 + 5) == (
        True, "ok (coverage of the running interval not known yet)")


def test_before_the_first_report_the_start_counts():
    stats = healthy_stats()
    stats.last_report = None
    assert health(HUB, stats, T0 + 3 * D, started=T0)[0]
    ok, why = health(HUB, stats, T0 + 3 * D + 2, started=T0)
    assert not ok and why.startswith("no interval reported since the start for 32s")


def test_standard_output_takes_every_dataset():
    settings = Settings(streamers=tuple(STREAMERS), duration=D)
    stats = healthy_stats()
    stats.hub_connected = False
    assert health(settings, stats, T0 + 5) == (True, "ok")


def test_rejection_samples_are_bounded_and_truncated():
    stats = Stats()
    for i in range(stats_module.SAMPLES_PER_REASON + 5):
        stats.sample_rejection("url-mismatch", f"/elsewhere/{i}")
    stats.sample_rejection("status", "/live/hls/" + "x" * 1000)
    urls = list(stats.rejected_samples["url-mismatch"])
    assert urls == [f"/elsewhere/{i}" for i in range(5, stats_module.SAMPLES_PER_REASON + 5)]
    long = stats.rejected_samples["status"][0]
    assert len(long) == stats_module.SAMPLE_CHARS and long.endswith("\u2026")
    stats.sample_rejection("status", "/live/hls/foo-high/1.ts?md5=SECRET&expires=1")
    assert stats.rejected_samples["status"][-1] == "/live/hls/foo-high/1.ts?\u2026"
    assert set(stats.rejected_samples) == {"url-mismatch", "status"}


def test_stream_history_is_bounded_and_the_chart_shows_the_last_hour():
    stats = Stats()
    streamer = STREAMERS[0]
    for i in range(stats_module.HISTORY_POINTS + 10):
        stats.reported(streamer, i % 7, 100 * i, start=T0 + i * D)
    history = stats.streams[streamer].history
    assert len(history) == stats_module.HISTORY_POINTS
    assert history[0][0] == T0 + 10 * D
    now = T0 + (stats_module.HISTORY_POINTS + 10) * D
    points = last_hour(history, now, D)
    assert len(points) == 3600 // D and points[-1] == history[-1]
    # without start times (a reporter that does not say), the last hour's worth of intervals
    unknown = [(None, 1, 1)] * 1000
    assert len(last_hour(unknown, now, 60)) == 60


@pytest.mark.parametrize("duration", [1, 5, 7, 10, 15, 60, 3600, 7200])
@pytest.mark.parametrize("n", [0, 1, 3, 100, 5000])
def test_chart_columns_hold_the_peak_of_their_intervals(duration, n):
    rng = random.Random(duration * 10_000 + n)
    points = last_hour([(None, rng.randint(0, 100), rng.randint(0, 10**6)) for _ in range(n)],
                       T0, duration)
    slots = max(1, math.ceil(3600 / duration))
    width = min(slots, CHART_COLUMNS)
    expected: Dict[int, Tuple[int, int]] = {}
    for i, (_, clients, sent) in enumerate(points):  # point i sits in slot slots-len+i
        column = (slots - len(points) + i) * width // slots
        old = expected.get(column, (0, 0))
        expected[column] = (max(old[0], clients), max(old[1], sent))
    assert columns(points, duration) == expected
    if points:
        assert max(expected) == width - 1, "the last interval at the right edge"


def test_the_page_escapes_what_it_shows():
    stats = Stats()
    stats.sample_rejection("url-mismatch", "/<script>alert(1)</script>")
    page = render(Settings(streamers=tuple(STREAMERS), duration=D), stats, T0)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest_twisted.inlineCallbacks
def test_healthz_over_http_answers_200_or_503_with_the_reason():
    clock = task.Clock()
    clock.advance(T0 + 5)
    settings = Settings(streamers=tuple(STREAMERS), socket="/run/hub.sock", duration=D,
                        metrics="tcp:0:interface=127.0.0.1")
    stats = healthy_stats()
    service = MetricsService(settings, reactor, stats, clock=clock)
    service.startService()
    try:
        port = (yield service.listening).getHost().port
        url = f"http://127.0.0.1:{port}/healthz"
        response = yield treq.get(url, persistent=False)
        assert response.code == 200 and (yield treq.text_content(response)) == "ok\n"
        stats.hub_connected = False
        response = yield treq.get(url, persistent=False)
        assert response.code == 503
        assert (yield treq.text_content(response)) == \
            "not connected to the hub at /run/hub.sock\n"
        response = yield treq.get(f"http://127.0.0.1:{port}/nothing-here", persistent=False)
        assert response.code == 404
        yield treq.content(response)
    finally:
        yield service.stopService()


class Dom(HTMLParser):
    """The dumped DOM's stream rows (their cells' text), charts and rejection samples."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: Dict[str, List[str]] = {}
        self.charts: Dict[str, Tuple[int, int, int]] = {}
        self.samples: List[str] = []
        self.health = ""
        self._stream: Optional[str] = None
        self._cell: Optional[List[str]] = None
        self._in: List[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._in.append(a.get("id", tag))
        if tag == "tr" and "data-stream" in a:
            self._stream = a["data-stream"]
            self.rows[self._stream] = []
        elif tag == "td" and self._stream is not None:
            self._cell = []
        elif tag == "svg" and self._stream is not None:
            self.charts[self._stream] = (int(a["data-points"]), 0, 0)
        elif tag in ("path", "polyline") and self._stream in self.charts:
            points, bars, lines = self.charts[self._stream]
            if tag == "path" and a.get("class") == "bytes":
                bars += a["d"].count("M")
            if tag == "polyline":
                lines += len(a["points"].split())
            self.charts[self._stream] = (points, bars, lines)

    def handle_endtag(self, tag):
        if self._in:
            self._in.pop()
        if tag == "td" and self._cell is not None and self._stream is not None:
            self.rows[self._stream].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._stream = None

    def handle_data(self, data):
        if self._cell is not None and "title" not in self._in:
            self._cell.append(data)
        if "rejections" in self._in and "code" in self._in:
            self.samples.append(data)
        if "health" in self._in:
            self.health += data


@pytest_twisted.inlineCallbacks
def test_the_page_in_a_real_browser_shows_streams_figures_and_charts(tmp_path):
    chromium = tool("chromium", "chromium")
    run = WithMetrics(tmp_path, T0, D)
    clock, exporter, hub, stats = run.clock, run.exporter, run.hub, run.stats
    try:
        yield run.start()
        port = run.port
        seq = 0
        for n in range(3):  # three intervals: 1, 2 and 3 viewers of foo/hls/high
            lines = []
            for client in (CLIENT_A, CLIENT_B, CLIENT_C)[:n + 1]:
                seq += 1
                lines.append(record(T0 + n * D + 1, STREAMERS[0], client, 1000 * (n + 1), seq))
            seq += 1
            lines.append(record(T0 + n * D + 2, STREAMERS[3], CLIENT_C, 77, seq))
            exporter.send(b"".join(lines))
            yield wait_for(lambda n=seq: stats.lines == n)
            clock.advance(D)
        clock.advance(D)  # the reporting loop runs D after the first report's moment
        yield wait_for(lambda: len(hub.read()) == 3 * len(STREAMERS))
        last = {tuple(d["streamer-id"][k] for k in ("content-id", "format", "quality")): d
                for d in hub.read()[-len(STREAMERS):]}
        # Nothing fills the samples from the pipeline yet: put one in as the pipeline will.
        stats.sample_rejection("url-mismatch", "/elsewhere/not-a-stream.ts")

        url = f"http://127.0.0.1:{port}/"
        common = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  f"--user-data-dir={tmp_path / 'chromium'}"]
        env = dict(os.environ, HOME=str(tmp_path))
        out, err, code = yield utils.getProcessOutputAndValue(
            chromium, common + ["--dump-dom", url], env=env)
        assert code == 0, err.decode(errors="replace")[-2000:]
        dom = Dom()
        dom.feed(out.decode())
        assert sorted(dom.rows) == sorted("/".join(s) for s in STREAMERS)
        for streamer in STREAMERS:
            name = "/".join(streamer)
            cells = dom.rows[name]
            assert cells[0] == name
            assert int(cells[1]) == last[streamer]["data"]["client-count"], name
            assert dom.charts[name][0] == 3, name  # three intervals in the chart
        assert int(dom.rows["foo/hls/high"][1]) == 3
        assert dom.rows["foo/hls/high"][2] == "9.0 kB" and dom.rows["bar/hls/low"][2] == "77 B"
        points, bars, lines = dom.charts["foo/hls/high"]
        # 360 ten-second slots in 180 columns: the three intervals fill the last two
        assert bars == lines == 2
        assert "/elsewhere/not-a-stream.ts" in dom.samples
        assert "healthy" in dom.health
        for ip, ua in (CLIENT_A, CLIENT_B, CLIENT_C):
            assert ip not in out.decode() and ua not in out.decode()

        shot = tmp_path / "status.png"
        out, err, code = yield utils.getProcessOutputAndValue(
            chromium, common + [f"--screenshot={shot}", "--window-size=1100,1400",
                                "--hide-scrollbars", url], env=env)
        assert code == 0, err.decode(errors="replace")[-2000:]
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        if os.environ.get("SFIVE_KEEP_SCREENSHOT"):
            shutil.copy(shot, os.environ["SFIVE_KEEP_SCREENSHOT"])
    finally:
        yield run.stop()

