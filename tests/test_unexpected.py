"""Errors nobody expected, injected into the exporter fetcher: each is logged once with its
traceback, counted in ``stats.errors["fetch"]``, the fetcher goes to ``retrying`` and, after
its backoff, reads on after the last record folded into the model: nothing skipped, nothing
counted twice. Real HTTP against the tests' exporter on 127.0.0.1; timers on a task.Clock.
(The follower's counterparts are in test_follow.py.)
"""

from __future__ import annotations

import math

import pytest
import pytest_twisted
from helpers.faults import T0, Exporter, heartbeat, line, settings
from support import wait_for

from sfive_ngxlua import fetch
from sfive_ngxlua.fetch import LogFetchService

pytest_plugins = ("helpers.fixtures",)

RING = "00c0ffee00c0ffee"
BACKOFF = 2.0
"""More than the first retry's delay (1 s and up to 1 s of jitter)."""


def chunk(first: int, last: int) -> bytes:
    """Records ``first`` to ``last`` (sequence numbers; each sends that many bytes) as one
    chunk, so that an error in one line leaves lines after it in the same read."""
    return b"".join(line(T0 + 1, seq=n, sent=n) for n in range(first, last + 1))


def tracebacks(logs, component: str) -> list:
    return [e for e in logs.events if "log_failure" in e and e.get("component") == component]


def after(request) -> int:
    return int(request.args.get(b"after", [b"0"])[0])


@pytest.mark.parametrize("point", ["headers", "data", "model-add"])
@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_is_logged_once_counted_and_retried_without_loss(
        service, logs, monkeypatch, point):
    exporter = Exporter(ring=RING).listen()
    injected = []

    def once(what: str) -> None:
        if not injected:
            injected.append(what)
            raise RuntimeError(f"injected into {what}")

    if point == "headers":
        handshake = LogFetchService._handshake

        def failing_handshake(self, response):
            once("header parsing")
            return handshake(self, response)

        monkeypatch.setattr(LogFetchService, "_handshake", failing_handshake)
    try:
        run = service(settings(url=exporter.url()))
        stats = run.stats
        await wait_for(lambda: exporter.requests)
        if point == "data":
            feed = run.fetch.pipeline.feed

            def failing_feed(data):
                once("data handling")
                feed(data)

            monkeypatch.setattr(run.fetch.pipeline, "feed", failing_feed)
        elif point == "model-add":
            add_records = run.top.model.add_records

            def failing_add(records, due=math.inf):  # the model's one add path
                def each():
                    for record in records:
                        if record[4] == 3:
                            once("the model's add")
                        yield record
                return add_records(each(), due)

            monkeypatch.setattr(run.top.model, "add_records", failing_add)
        if point != "headers":
            await wait_for(lambda: stats.exporter_connected)
            exporter.send(chunk(1, 5))
        await wait_for(lambda: stats.errors["fetch"] == 1)
        assert stats.states["fetch"] == "retrying"
        assert not stats.exporter_connected and not stats.source_connected
        assert len(tracebacks(logs, "fetch")) == 1, "the traceback, once"
        folded = {"headers": 0, "data": 0, "model-add": 2}[point]
        assert stats.accepted == stats.lines == folded, "the failing line and those after it"
        assert run.fetch.pipeline.last_seq == (folded or None)
        assert len(exporter.requests) == 1, "the retry waits for its backoff"

        run.clock.advance(BACKOFF)
        await wait_for(lambda: len(exporter.requests) == 2)
        assert after(exporter.requests[1]) == folded, "resumes after the last record folded"
        await wait_for(lambda: stats.exporter_connected)
        assert stats.states["fetch"] == "streaming"
        exporter.send(chunk(folded + 1, 5))
        await wait_for(lambda: stats.accepted == 5)
        assert stats.lines == 5 and not stats.rejected
        assert stats.errors["fetch"] == 1 and len(tracebacks(logs, "fetch")) == 1
        exporter.send(heartbeat(5, T0 + 12))  # protocol 2: the watermark closes the interval
        run.clock.advance(T0 + 12 - run.clock.seconds())
        await wait_for(lambda: run.datasets)
        assert run.datasets[0]["data"]["bytes-sent"] == 1 + 2 + 3 + 4 + 5
        run.clock.advance(30.0)  # the recovered stream has its idle watchdog too
        run.clock.advance(fetch.IDLE_RECHECK)
        await wait_for(lambda: logs.matching("exporter sent nothing for"))
        await wait_for(lambda: stats.states["fetch"] == "backoff")
    finally:
        await exporter.stop()


@pytest_twisted.ensureDeferred
async def test_the_same_error_again_is_one_line_without_traceback_and_still_retried(
        service, logs, monkeypatch):
    exporter = Exporter(ring=RING).listen()
    failing = [True]
    handshake = LogFetchService._handshake

    def failing_handshake(self, response):
        if failing[0]:
            raise RuntimeError("injected into header parsing")
        return handshake(self, response)

    monkeypatch.setattr(LogFetchService, "_handshake", failing_handshake)
    try:
        run = service(settings(url=exporter.url()))
        for n in (1, 2, 3):
            await wait_for(lambda n=n: run.stats.errors["fetch"] == n)
            run.clock.advance(30.0)  # the longest backoff
        assert len(tracebacks(logs, "fetch")) == 1
        assert len(logs.matching("the same unexpected error again")) >= 2
        failing[0] = False
        await wait_for(lambda: run.stats.exporter_connected)
        exporter.send(chunk(1, 2))
        await wait_for(lambda: run.stats.accepted == 2)
        assert run.stats.states["fetch"] == "streaming"
    finally:
        await exporter.stop()


@pytest.mark.parametrize("path", ["lines", "blocks"])
def test_a_line_that_raises_is_uncounted_and_last_seq_is_the_line_before(path):
    """The pipeline's part (no I/O): the line whose handling raised and those after it are not
    counted, ``handled`` says how many were, and ``last_seq`` is that of the last one handled
    (a heartbeat's here), so that reading on after it neither skips nor repeats a line. On
    both ways in: lines (feed_lines) and chunks decoded as blocks (feed)."""
    from sfive_ngxlua.model import IntervalModel
    from sfive_ngxlua.pipeline import Pipeline
    from sfive_ngxlua.stats import Stats

    s = settings()
    stats = Stats()
    model = IntervalModel(s, stats)
    pipeline = Pipeline(s, stats, model)
    pipeline.resume_after(0)
    lines = [line(T0 + 1, seq=1, sent=1), heartbeat(2, T0 + 1), line(T0 + 1, seq=3, sent=3),
             line(T0 + 1, seq=4, sent=4)]
    lines = [ln.rstrip(b"\n") for ln in lines] + [b"not json"]

    def feed(lines):
        if path == "lines":
            pipeline.feed_lines(lines)
        else:
            pipeline.cut()  # a new connection after the error
            pipeline.feed(b"\n".join(lines) + b"\n")
    add_records = model.add_records

    def failing_add(records, due=math.inf):  # the model's one add path
        def each():
            for record in records:
                if record[4] == 3:
                    raise RuntimeError("injected into the model's add")
                yield record
        return add_records(each(), due)

    model.add_records = failing_add
    with pytest.raises(RuntimeError):
        feed(lines)
    assert pipeline.handled == 2 and pipeline.last_seq == 2
    assert stats.lines == 1 and stats.heartbeats == 1 and not stats.rejected
    assert stats.accepted == 1
    model.add_records = add_records
    feed(lines[pipeline.handled:])
    assert pipeline.handled == 3 and pipeline.last_seq == 4
    assert stats.lines == 4 and stats.heartbeats == 1 and stats.accepted == 3
    assert stats.rejected == {"invalid-json": 1}
