"""Coverage (issue 17 item 4): "not counted" never looks like "no viewers".

Each interval is covered (reported as today: zeros there are the truth), partial (reported,
counted) or withheld (not reported; logged with the replay command that fills it). The
composed service runs on the real reactor against the tests' exporter (a real HTTP server
whose answers the test scripts) or real files, every timer on a task.Clock.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import socket

import pytest
import pytest_twisted
from helpers.faults import T0, Exporter, LogCapture, Running, clock_at, heartbeat, line, settings
from support import exporter_layout, wait_for
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

import lab.nginx as lab_nginx
from sfive_ngxlua.model import IntervalModel
from sfive_ngxlua.outbox import DirectOutbox
from sfive_ngxlua.records import Record
from sfive_ngxlua.replay import ReplayOptions
from sfive_ngxlua.report import ReportService
from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

pytest_plugins = ("helpers.fixtures",)

D = 10
A = ("foo", "hls", "high")


def free_port() -> int:
    """A port nothing listens on (nginx down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def starts(run: Running) -> list:
    return sorted({d["start-time"] for d in run.datasets})


def at(offset: int) -> str:
    from sfive_ngxlua.datasets import start_time
    return start_time(T0 + offset)


def gap(seq: int, lost: int) -> bytes:
    return exporter_layout({"seq": seq, "lost": lost}) + b"\n"


async def advance_to(run: Running, t: float) -> None:
    """Move the clock to ``t`` a second at a time, letting the fetcher's real connection
    attempts settle in between (each is answered or refused on the real reactor)."""
    while run.clock.seconds() < t:
        run.clock.advance(min(1.0, t - run.clock.seconds()))
        await wait_for(lambda: run.fetch.lifecycle.state != "connecting",
                       what="the fetcher's attempt to settle")


def reported(logs: LogCapture) -> list:
    return [t.split(" (")[0].split()[-1] + " " + t.split("coverage=")[1].split()[0]
            for t in logs.matching("reported: clients=")]


@pytest_twisted.ensureDeferred
async def test_nginx_down_from_the_start_withholds_with_the_replay_command(service, logs):
    s = settings(url=f"http://127.0.0.1:{free_port()}/sfive", max_delay=20.0, tags=("t 1",))
    run = service(s)
    await advance_to(run, T0 + 51)  # intervals 0..2 are past --max-delay
    assert run.datasets == [], "no dataset: the exporter vouched for nothing"
    assert run.stats.intervals_withheld == 3 and run.stats.covered is False
    assert (run.stats.intervals_covered, run.stats.intervals_partial) == (0, 0)
    [warning] = logs.matching("withholding the intervals from")
    assert "sfive format (nginx/sfive-log.conf)" in warning
    command = warning[warning.index("sfive-ngxlua-replay"):]
    argv = shlex.split(command)
    assert argv[-1] == "ACCESS_LOG"
    opts = ReplayOptions()
    opts.parseOptions(argv[1:])
    got = opts.settings()
    for name in ("streamers", "hostname", "duration", "tags", "nameformat", "statuses", "grace",
                 "max_clients", "max_ua_length", "max_line_length", "client_ip"):
        assert getattr(got, name) == getattr(s, name), name
    assert opts.window == (T0, T0 + 10), "so far, when the stretch began"
    await run.stop()
    assert run.datasets == [], "a stop sends nothing the source never vouched for"
    [ended] = logs.matching("for good")
    assert f"--from {at(0)} --until {at(60)}" in ended


@pytest_twisted.ensureDeferred
async def test_an_outage_in_the_middle_is_withheld_then_covered_again(service, logs):
    """nginx restarted: the ring changes, which proves the outage's records lost; the
    withheld stretch is given up (logged with its replay command), later intervals are
    covered."""
    exporter = Exporter(ring="aaaa").listen()
    port = exporter.number
    run = service(settings(url=exporter.url(), max_delay=20.0, idle_timeout=300.0))
    run.fetch.retry_policy = lambda failures: 1.0  # a reconnect within a second: no jitter
    try:
        await wait_for(lambda: run.stats.exporter_connected)
        exporter.send(line(T0 + 1, seq=1), heartbeat(1, T0 + 11.5))
        await wait_for(lambda: run.stats.heartbeats == 1)
        await advance_to(run, T0 + 12)
        assert starts(run) == [at(0)] and run.stats.intervals_covered == 1
        await exporter.stop()  # nginx goes down
        await wait_for(lambda: not run.stats.exporter_connected)
        await advance_to(run, T0 + 61)
        assert starts(run) == [at(0), at(10)], "interval 1 cut short by --max-delay: partial"
        assert run.stats.intervals_partial == 1 and run.stats.intervals_withheld == 2
        exporter = Exporter(ring="bbbb").listen(number=port)  # nginx is back, a new ring
        await advance_to(run, T0 + 92)
        await wait_for(lambda: run.stats.exporter_connected)
        assert run.fetch.ring == "bbbb"
        exporter.send(heartbeat(1, T0 + 92.0))
        await wait_for(lambda: run.stats.heartbeats == 2)
        assert run.stats.intervals_withheld == 5  # 20..60: due by --max-delay at 92
        withheld = 5
        [gone] = logs.matching("for good")  # the new ring came at 62: 20..70 proved lost
        assert f"--from {at(20)} --until {at(70)}" in gone
        assert at(20) not in starts(run)
        exporter.send(line(T0 + 101, seq=2), heartbeat(2, T0 + 111.5))
        await wait_for(lambda: run.stats.heartbeats == 3)
        await advance_to(run, T0 + 112)
        sent = {d["start-time"]: d for d in run.datasets if d["streamer-id"]["quality"] == "high"
                and d["streamer-id"]["content-id"] == "foo"}
        assert sent[at(100)]["data"]["bytes-sent"] == 100
        assert reported(logs)[-1] == f"{at(100)} covered"
        after = reported(logs)[2:]  # the new ring's: from before the reconnect, all there
        assert after == [f"{at(k)} covered" for k in range(20 + 10 * withheld, 110, 10)]
        assert run.stats.covered is True
    finally:
        await exporter.stop()


@pytest_twisted.ensureDeferred
async def test_a_gap_line_makes_its_interval_partial(service, logs):
    exporter = Exporter(ring="aaaa").listen()
    run = service(settings(url=exporter.url()))
    try:
        await wait_for(lambda: run.stats.exporter_connected)
        exporter.send(line(T0 + 1, seq=1), gap(5, 3), line(T0 + 4, seq=5),
                      heartbeat(5, T0 + 11.5), line(T0 + 12, seq=6), heartbeat(6, T0 + 21.5))
        await wait_for(lambda: run.stats.heartbeats == 2)
        await advance_to(run, T0 + 22)
        assert run.stats.lost == 3
        assert reported(logs) == [f"{at(0)} partial", f"{at(10)} covered"]
        assert run.stats.intervals_partial == 1 and run.stats.intervals_covered == 1
        foo = [d for d in run.datasets if d["streamer-id"]["content-id"] == "foo"
               and d["streamer-id"]["quality"] == "high"]
        assert [d["data"]["bytes-sent"] for d in foo] == [200, 100], "what is known is sent"
    finally:
        await exporter.stop()


def access_line(t: float, client: str = "10.0.0.1") -> bytes:
    return line(t, client=client)


@pytest_twisted.ensureDeferred
async def test_a_quiet_readable_file_is_covered_and_its_zeros_are_sent(service, tmp_path, logs):
    log = tmp_path / "sfive.log"
    log.write_bytes(b"")
    run = service(settings(file=str(log), url="http://localhost/sfive"))
    run.clock.advance(0)
    for _t in range(32):  # the file vouches for up to the clock minus --flush-period
        run.clock.advance(1)
    assert starts(run) == [at(0), at(10), at(20)]
    assert all(d["data"]["client-count"] == 0 for d in run.datasets)
    assert len(run.datasets) == 3 * 3
    assert run.stats.intervals_covered == 3 and run.stats.intervals_withheld == 0
    assert run.stats.covered is True
    assert reported(logs) == [f"{at(k)} covered" for k in (0, 10, 20)]


@pytest_twisted.ensureDeferred
async def test_an_absent_file_withholds(service, tmp_path, logs):
    log = tmp_path / "sfive.log"
    run = service(settings(file=str(log), url="http://localhost/sfive", max_delay=20.0))
    for _t in range(52):
        run.clock.advance(1)
    assert run.datasets == [] and run.stats.intervals_withheld == 3
    assert run.stats.covered is False
    [warning] = logs.matching("withholding the intervals from")
    assert warning.endswith(f"--from {at(0)} --until {at(10)} {log}")


@pytest_twisted.ensureDeferred
async def test_copytruncate_makes_its_interval_partial(service, tmp_path, logs):
    log = tmp_path / "sfive.log"
    log.write_bytes(b"")
    run = service(settings(file=str(log), url="http://localhost/sfive"))
    run.clock.advance(0)
    run.clock.advance(2)
    with open(log, "ab") as f:
        f.write(access_line(T0 + 2))
    run.clock.advance(1)
    shutil.copy(log, str(log) + ".1")
    os.truncate(log, 0)
    run.clock.advance(1)
    assert run.stats.file_truncations == 1
    with open(log, "ab") as f:
        f.write(access_line(T0 + 5, client="10.0.0.2"))
    for _t in range(20):
        run.clock.advance(1)
    assert reported(logs) == [f"{at(0)} partial", f"{at(10)} covered"]
    foo = [d for d in run.datasets if d["streamer-id"]["content-id"] == "foo"
           and d["streamer-id"]["quality"] == "high"]
    assert foo[0]["data"]["client-count"] == 2


def test_records_after_a_withheld_interval_was_given_up_are_withheld_not_late():
    s = Settings(streamers=(A,), hostname="h", duration=D, grace=1.0, max_delay=20.0)

    class Source:
        mark = -math.inf

        def watermark(self, now):
            return self.mark

    clock, stats, out = clock_at(T0 + 0.5), Stats(), []
    model = IntervalModel(s, stats)
    source = Source()
    report = ReportService(s, clock, model, DirectOutbox(s, CallableSink(out.append), stats),
                           stats, source=source)
    report.startService()
    clock.advance(T0 + 51 - clock.seconds())
    assert out == [] and stats.intervals_withheld == 2  # T0+10, T0+20 (the first is T0+10)
    model.lose(None, T0 + 45)  # e.g. a ring change: their records are proved lost
    source.mark = T0 + 61.5
    report.check()
    assert [d["start-time"] for d in out] == [at(40), at(50)], "T0+30 is lost whole: withheld"
    assert model.given_up == [[(T0 + 10) // D, (T0 + 30) // D]]
    assert not model.add(Record(T0 + 15, A, "10.0.0.9", "ua", 100))
    assert stats.records_withheld == 1 and stats.late == 0
    assert model.add(Record(T0 + 45, A, "10.0.0.9", "ua", 100)), "an ordinary late record"
    assert stats.late == 1
    report.stopService()


@pytest_twisted.ensureDeferred
async def test_coverage_is_kept_in_the_state_dir_across_a_restart(tmp_path):
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    try:
        s = settings(url=f"http://127.0.0.1:{free_port()}/sfive", max_delay=20.0,
                     state_dir=str(tmp_path / "state"))
        run = Running(s).start()
        await advance_to(run, T0 + 51)
        assert run.stats.intervals_withheld == 3
        withheld = list(run.top.model.withheld)
        assert withheld == [T0 // D, T0 // D + 2]
        run.top.model.give_up(T0 // D - 5)  # a stretch given up earlier, long before
        await run.stop()
        assert run.datasets == []
        again = Running(s, clock=clock_at(T0 + 55)).start()
        assert again.top.model.withheld == withheld, "the stretch goes on, not counted again"
        assert again.top.model.is_given_up(T0 // D - 5)
        await advance_to(again, T0 + 66)  # the loop ticks from the restart on
        assert again.stats.intervals_withheld == 1
        assert len(logs.matching("withholding the intervals from")) == 1
        assert again.datasets == []
        await again.stop()
    finally:
        globalLogPublisher.removeObserver(logs)


@pytest.mark.timeout(90)
@pytest_twisted.ensureDeferred
async def test_the_real_exporter_quiet_is_covered_and_down_is_withheld(nginx, monkeypatch, logs):
    """The shipped exporter (real nginx, real time, 1-second intervals): quiet, its
    heartbeats cover the intervals and their zeros are sent; stopped, nothing is sent for the
    outage; started again (a new ring), the outage is given up with its replay command and
    the intervals after it are covered."""
    out: list = []
    stats = Stats()
    s = Settings(streamers=(A,), hostname="h", duration=1, grace=0.5, max_delay=2.0,
                 url=nginx.url("/sfive"), connect_timeout=2.0)
    top = build(s, reactor, sink=CallableSink(out.append, stats), stats=stats)
    top.startService()
    try:
        await wait_for(lambda: stats.exporter_protocol == 2, timeout=20)
        await wait_for(lambda: stats.intervals_covered >= 2, timeout=20, what="two intervals")
        assert stats.covered is True and stats.intervals_withheld == 0
        assert out and all(d["data"]["client-count"] == 0 for d in out)
        ring = top.source.ring
        nginx.stop()
        await wait_for(lambda: stats.intervals_withheld >= 2, timeout=30, what="withholding")
        assert stats.covered is False
        before = len(out)
        [warning] = logs.matching("withholding the intervals from")
        assert "sfive-ngxlua-replay" in warning
        monkeypatch.setattr(lab_nginx, "free_port", lambda: nginx.port)
        nginx.start()
        await wait_for(lambda: logs.matching("for good"), timeout=40, what="the stretch given up")
        assert top.source.ring not in (None, ring)
        covered = stats.intervals_covered
        await wait_for(lambda: stats.intervals_covered >= covered + 2, timeout=20)
        assert stats.covered is True
        sent = {d["start-time"] for d in out[before:]}
        for gone in logs.matching("for good"):
            since = gone[gone.index("--from ") + 7:].split()[0]
            until = gone[gone.index("--until ") + 8:].split()[0]
            assert not any(since <= t < until for t in sent), "nothing sent for the outage"
        assert stats.records_withheld == 0 and stats.late == 0
    finally:
        await top.stopService()


def test_an_interval_a_loss_spans_whole_is_withheld_not_sent_as_zeros():
    """A short outage (within --max-delay) ended by a new ring: the intervals the loss spans
    whole, with no record, are withheld; the one it only overlaps is partial."""
    s = Settings(streamers=(A,), hostname="h", duration=D, grace=1.0)

    class Source:
        mark = T0 + 21.0

        def watermark(self, now):
            return self.mark

    clock, stats, out = clock_at(T0 + 0.5), Stats(), []  # the first interval: T0+10
    model = IntervalModel(s, stats)
    source = Source()
    report = ReportService(s, clock, model, DirectOutbox(s, CallableSink(out.append), stats),
                           stats, source=source)
    report.startService()
    model.add(Record(T0 + 12, A, "10.0.0.1", "ua", 100))
    clock.advance(T0 + 55 - clock.seconds())
    assert [d["start-time"] for d in out] == [at(10)]
    model.lose(T0 + 21.0, T0 + 54.0)  # the new ring's handshake
    source.mark = T0 + 55.0
    report.check()
    assert [d["start-time"] for d in out] == [at(10), at(20)]
    assert (stats.intervals_covered, stats.intervals_partial, stats.intervals_withheld) == (
        1, 1, 2)
    assert model.given_up == [[(T0 + 30) // D, (T0 + 40) // D]]
    report.stopService()


@pytest_twisted.ensureDeferred
async def test_a_file_not_in_the_sfive_format_withholds(service, tmp_path, logs):
    log = tmp_path / "access.log"
    log.write_bytes(b"")
    run = service(settings(file=str(log), url="http://localhost/sfive", max_delay=20.0))
    run.clock.advance(0)
    with open(log, "ab") as f:  # nginx's combined format
        f.write(b'127.0.0.1 - - [15/Jan/2027:08:00:01 +0000] "GET /live/hls/foo-high/1.ts '
                b'HTTP/1.1" 200 100 "-" "curl/8"\n')
    for _t in range(52):
        run.clock.advance(1)
    assert run.stats.lines == 1
    assert run.datasets == [] and run.stats.intervals_withheld == 3
