"""Event time: the reporter follows its source's watermark, on a task.Clock.

The model and the reporter are the real ones; the source is a plain object whose watermark
the test sets, as the exporter fetcher's heartbeats (protocol 2) or its connection (protocol 1)
would.
"""

from __future__ import annotations

import math

import pytest
from helpers.faults import LogCapture, clock_at
from twisted.logger import globalLogPublisher

from sfive_ngxlua.datasets import datasets
from sfive_ngxlua.model import IntervalModel
from sfive_ngxlua.outbox import DirectOutbox, DurableOutbox
from sfive_ngxlua.records import Record
from sfive_ngxlua.report import ReportService
from sfive_ngxlua.settings import ModelOptions, Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

A = ("av", "hls", "high")
B = ("av", "dash", "low")
D = 10
T0 = 1_800_000_000


class Source:
    """A source whose watermark the test moves; -inf until told."""

    def __init__(self, mark: float = -math.inf) -> None:
        self.mark = mark

    def watermark(self, now: float) -> float:
        return now if self.mark == "now" else self.mark


class Batches:
    """An outbox that keeps each emit's datasets together (as the durable one commits them)
    and, like it, keeps the running interval at a stop."""

    def __init__(self, settings):
        self.settings = settings
        self.commits: list = []

    def emit(self, intervals):
        self.commits.append([d for iv in intervals for d in datasets(iv, self.settings)])

    def at_stop(self, model, now):
        return []


class Broken:
    """A state store whose transactions fail unexpectedly (not a full disk)."""

    def __init__(self):
        self.fail = True
        self.commits = 0
        self.full_next = 0

    def write_all_next(self):
        self.full_next += 1

    def checkpoint(self, model, position, queue=None, items=None):
        if self.fail:
            raise OSError("disk full")
        self.commits += 1
        return True


class Positioned:
    def position(self):
        return None


class Setup:
    def __init__(self, source=None, start=T0 + 0.5, commit=False, held_cap=None, outbox=None,
                 **kw):
        self.settings = Settings(streamers=(A, B), hostname="h", duration=D, grace=1.0, **kw)
        self.clock = clock_at(start)
        self.stats = Stats()
        self.model = IntervalModel(self.settings, self.stats)
        self.out: list = []
        self.batches = Batches(self.settings)
        self.commits = self.batches.commits
        self.source = source
        if outbox is None:
            outbox = (self.batches if commit else
                      DirectOutbox(self.settings, CallableSink(self.out.append), self.stats))
        elif outbox == "durable":
            self.store = Broken()
            outbox = DurableOutbox(self.settings, self.store, self.model, Positioned(),
                                   CallableSink(self.out.append), self.stats)
        self.report = ReportService(
            self.settings, self.clock, self.model, outbox, self.stats, source=source,
            held_cap=held_cap)
        self.report.startService()

    def add(self, t, client="c1", sent=100, streamer=A):
        return self.model.add(Record(t, streamer, client, "ua", sent))

    def to(self, t):
        self.clock.advance(t - self.clock.seconds())

    def starts(self):
        return [d["start-time"][11:19] for d in self.out if d["streamer-id"]["format"] == "hls"]

    def bytes(self):
        return {d["start-time"][11:19]: d["data"]["bytes-sent"] for d in self.out
                if d["streamer-id"]["format"] == "hls"}


def hms(offset):
    """The start time's clock part for T0 + offset (T0 is 2027-01-15T08:00:00Z)."""
    s = T0 + offset
    return f"{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def test_max_delay_option_defaults_to_300_and_is_validated():
    opts = ModelOptions()
    opts.parseOptions(["-S", "a/b/c"])
    assert opts.settings().max_delay == 300.0
    opts = ModelOptions()
    opts.parseOptions(["-S", "a/b/c", "--max-delay", "20.5"])
    assert opts.settings().max_delay == 20.5
    from twisted.python import usage
    with pytest.raises(usage.UsageError, match="--max-delay"):
        ModelOptions().parseOptions(["-S", "a/b/c", "--max-delay", "-1"])


def test_without_a_source_or_with_a_connected_v1_exporter_the_wall_clock_rules():
    for source in (None, Source("now")):
        s = Setup(source)
        s.add(T0 + 12)
        s.to(T0 + 20.9)
        assert s.out == []
        s.to(T0 + 21)
        assert s.starts() == [hms(10)] and s.bytes() == {hms(10): 100}
        assert s.stats.held == 0 and s.stats.watermark_lag == 0.0


def test_intervals_wait_for_the_heartbeat_and_go_as_soon_as_it_passes():
    src = Source(T0 + 15.0)
    s = Setup(src)
    s.add(T0 + 12)
    s.to(T0 + 21)  # due by the clock, but the exporter vouches only up to T0 + 15
    assert s.out == []
    assert s.stats.held == 1 and s.stats.watermark_lag == pytest.approx(6.0)
    s.add(T0 + 19, sent=5)  # a record the exporter was still delivering: in its own interval
    src.mark = T0 + 21.0
    s.report.check()  # the fetcher's on_watermark: no need to wait for the next tick
    assert s.bytes() == {hms(10): 105} and s.stats.late == 0
    assert s.stats.held == 0


def test_an_unreachable_exporter_holds_intervals_instead_of_sending_them_empty():
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    try:
        src = Source(T0 + 11.0)  # the last heartbeat before the exporter went away
        s = Setup(src)
        s.add(T0 + 10)
        s.to(T0 + 61)  # away for 50 s: five intervals due by the clock
        assert s.out == [] and s.stats.held == 5
        assert s.stats.watermark_lag == pytest.approx(50.0)
        assert len(logs.matching("holding the interval starting at")) == 1
        backlog = range(12, 60, 7)
        for t in backlog:  # the backlog comes back: each record in its own interval
            s.add(T0 + t)
        src.mark = T0 + 61.5
        s.report.check()
        assert s.starts() == [hms(k * 10) for k in range(1, 6)]
        assert s.bytes() == {hms(k * 10): 100 * ((k == 1) + sum(1 for t in backlog if t // 10 == k))
                             for k in range(1, 6)}
        assert s.stats.late == 0 and s.stats.held == 0
        assert " held=0 " in logs.matching(") reported: ")[-1]
    finally:
        globalLogPublisher.removeObserver(logs)


def test_past_max_delay_what_is_known_is_reported_and_what_is_unvouched_is_withheld():
    """Issue 17 item 4: past --max-delay the interval the watermark is in is reported as
    partial; those after it, which the source vouched for none of, are withheld (not sent as
    empty), and reported after all once their records come."""
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    src = Source(T0 + 11.0)
    s = Setup(src, max_delay=30.0)
    s.add(T0 + 10)
    s.to(T0 + 51)  # T0+10 is due at 21 by the clock; 21 + 30 = 51: reported with what is known
    assert s.starts() == [hms(10)] and s.bytes() == {hms(10): 100}
    [warning] = logs.matching("without all of the exporter's records")
    assert f"the interval starting at 2027-01-15T{hms(10)}Z" in warning
    assert "waited --max-delay 30s (watermark 40.0s behind)" in warning
    assert "coverage=partial" in logs.matching("reported: coverage=")[-1]
    assert s.stats.intervals_partial == 1 and s.stats.intervals_covered == 0
    assert s.stats.held == 3  # T0+20, 30, 40 (due 31, 41, 51) are still held
    s.to(T0 + 71)
    assert s.starts() == [hms(10)], "T0+20 and T0+30 are withheld, not sent empty"
    assert s.stats.intervals_withheld == 2
    [withheld] = logs.matching("withholding the intervals from")
    assert f"--from 2027-01-15T{hms(20)}Z --until 2027-01-15T{hms(40)}Z" in withheld
    s.add(T0 + 15, sent=7)  # a backlog older than the limit: late, into the oldest open one
    assert s.stats.late == 1
    src.mark = T0 + 80.0
    s.report.check()
    globalLogPublisher.removeObserver(logs)
    assert s.starts() == [hms(k) for k in range(10, 70, 10)]
    assert s.bytes()[hms(20)] == 7
    assert s.stats.held == 0 and s.stats.intervals_covered == 5
    [filled] = logs.matching("are reported after all")
    assert f"from 2027-01-15T{hms(20)}Z to 2027-01-15T{hms(40)}Z" in filled


def test_held_intervals_are_capped_the_oldest_reported_early_and_counted():
    src = Source(T0 + 11.0)
    s = Setup(src, held_cap=5)
    s.to(T0 + 41)  # three held: T0+10, 20, 30
    for n in range(4):
        s.add(T0 + 12, client=f"a{n}")
        s.add(T0 + 22, client=f"b{n}")
    s.report.check()  # 8 entries held > 5: the oldest goes; 4 left
    assert s.starts() == [hms(10)] and s.stats.held_early == 1 and s.stats.held == 2
    s.add(T0 + 32, client="c")
    s.add(T0 + 32, client="d", streamer=B)
    s.report.check()  # 6 > 5: T0+20 goes too
    assert s.starts() == [hms(10), hms(20)] and s.stats.held_early == 2
    assert s.stats.held == 1 and s.stats.late == 0


def test_the_default_held_cap_is_one_interval_at_the_client_cap():
    s = Setup(Source(), max_clients=3)
    assert s.report.held_cap == 6


def test_an_outbox_gets_all_intervals_closed_together_in_one_emit():
    src = Source(T0 + 11.0)
    s = Setup(src, commit=True)
    s.add(T0 + 12)
    s.to(T0 + 41)
    assert s.commits == []
    src.mark = T0 + 41.0
    s.report.check()
    [batch] = s.commits
    assert [(d["start-time"][11:19], d["streamer-id"]["format"]) for d in batch] == [
        (hms(k), f) for k in (10, 20, 30) for f in ("hls", "dash")]
    assert s.out == [], "the outbox sends them, not the reporter"
    assert s.stats.streams[A].bytes_total == 100


def test_a_failing_commit_keeps_the_datasets_is_counted_and_the_loop_goes_on():
    """Out of the model, the intervals' datasets are not dropped: delivered (as after a
    full disk), the next checkpoint writing the whole state; counted as the reporter's."""
    s = Setup(None, outbox="durable")
    s.to(T0 + 21)
    assert s.stats.datasets_dropped == 0 and len(s.out) == 2
    assert s.stats.errors["report"] == 1 and s.store.full_next == 1
    s.out.clear()
    s.store.fail = False
    s.to(T0 + 31)
    assert s.store.commits == 1 and len(s.out) == 2


def test_a_durable_outbox_stops_without_reporting_the_running_interval():
    s = Setup(None, commit=True)
    s.add(T0 + 12)
    s.add(T0 + 23)
    s.to(T0 + 25)
    s.report.stopService()
    assert [d["start-time"][11:19] for batch in s.commits for d in batch
            if d["streamer-id"]["format"] == "hls"] == [hms(10)], \
        "what is due is reported, the running interval is not"
    assert s.model.open_intervals == [(T0 + 20) // D]
    snap = s.model.snapshot()
    assert snap["open"][str((T0 + 20) // D)]["0"]["clients"] == [["c1", "ua", 100]]


def test_a_direct_outbox_stop_reports_the_held_and_the_running_intervals():
    """The stop cuts them short (partial); the held one the source vouched for none of and
    delivered nothing for is withheld, not sent empty (issue 17 item 4)."""
    src = Source(T0 + 11.0)
    s = Setup(src)
    s.add(T0 + 12)
    s.add(T0 + 33)
    s.to(T0 + 35)
    assert s.out == []
    s.report.stopService()
    assert s.starts() == [hms(10), hms(30)]
    assert s.bytes()[hms(30)] == 100
    assert (s.stats.intervals_partial, s.stats.intervals_withheld) == (2, 1)
    assert s.model.given_up == [[(T0 + 20) // D, (T0 + 20) // D]]


def test_a_forward_clock_step_of_an_hour_reports_everything_in_between():
    s = Setup(Source("now"))
    s.add(T0 + 12)
    s.to(T0 + 15)
    s.clock.rightNow += 3600  # NTP steps the clock: a record arrives before any timer runs
    assert s.add(T0 + 3616), "not refused as from the future"
    s.report.check()  # the fetcher's on_watermark after that chunk
    assert len(s.starts()) == 360  # T0+10 .. T0+3600, due at T0+3611 at the latest
    assert s.bytes()[hms(10)] == 100 and sum(s.bytes().values()) == 100
    s.clock.advance(0)  # the timers that the step made due
    s.to(T0 + 3631)
    assert s.bytes()[hms(3610)] == 100
    assert s.stats.rejected["future"] == 0 and s.stats.late == 0
    s.to(T0 + 3641)
    assert len(s.starts()) == 363, "the loop goes on after the step"


@pytest.mark.parametrize("ran", [5, 600])
def test_a_backward_clock_step_of_an_hour_drops_nothing(ran):
    """The clock was an hour ahead when the service started (``ran`` seconds ago) and is set
    back: every record after the step is kept (late, into the oldest open interval)."""
    s = Setup(Source("now"))
    s.add(T0 + 12)
    s.to(T0 + 10 + ran)
    reported = len(s.out)
    s.clock.rightNow -= 3600  # the wall clock goes back; Twisted's timers wait for it
    for t in range(0, 60, 5):
        assert s.add(T0 + ran - 3600 + t)
    s.report.check()
    assert len(s.out) == reported, "nothing becomes due while the clock is behind"
    assert s.stats.before_start == 0 and s.stats.late == 12
    s.to(T0 + 10 + ran + 11)  # caught up: the loop reports again, the late records with it
    assert sum(s.bytes().values()) == 100 * 13


def test_a_gap_is_logged_with_the_time_range_up_to_the_next_record_or_heartbeat():
    from helpers.faults import heartbeat, line
    from helpers.faults import settings as fault_settings

    from sfive_ngxlua.pipeline import Pipeline

    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    try:
        stats = Stats()
        s = fault_settings()
        pipeline = Pipeline(s, stats, IntervalModel(s, stats, start=T0))
        pipeline.feed(line(T0 + 3, seq=4))
        pipeline.feed(b'{"lost":3,"seq":8}\n' + heartbeat(7, T0 + 9.25))
        [text] = logs.matching("the exporter lost")
        assert "lost 3 records (sequence 5 to 7)" in text
        assert "between 2027-01-15T08:00:03Z and 2027-01-15T08:00:10Z" in text
        assert stats.lost == 3 and stats.heartbeats == 1 and stats.lines == 2
        assert pipeline.heartbeat.time == T0 + 9.25 and pipeline.last_seq == 7
    finally:
        globalLogPublisher.removeObserver(logs)


def test_an_unexpected_error_in_a_tick_is_one_traceback_counted_and_reporting_resumes():
    """Issue 17, item 2: the reporting loop does not end at an error it did not expect; it
    starts again at the next due time and reports everything that came due meanwhile."""
    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    try:
        s = Setup(None)
        s.add(T0 + 12)
        real, fails = s.model.close_due, [2]

        def close_due(now):
            if fails[0]:
                fails[0] -= 1
                raise RuntimeError("model on fire")
            return real(now)

        s.model.close_due = close_due
        s.to(T0 + 21)
        assert s.stats.errors["report"] == 1 and s.stats.states["report"] == "retrying"
        assert not s.report.loop.running and s.out == []
        s.to(T0 + 22)  # the retry: at the next due time in phase (T0 + 31), not at once
        assert not s.report.loop.running
        s.to(T0 + 31)
        assert s.stats.errors["report"] == 2, "failed again; retried again"
        assert len([e for e in logs.events if "log_failure" in e]) == 1, "one traceback"
        s.to(T0 + 41)
        assert s.report.loop.running and s.stats.states["report"] == "running"
        assert s.starts() == [hms(10), hms(20), hms(30)], "what came due meanwhile, in order"
        assert s.bytes()[hms(10)] == 100
        s.to(T0 + 51)
        assert s.starts()[-1] == hms(40), "on the interval boundaries again"
    finally:
        globalLogPublisher.removeObserver(logs)


def test_an_unexpected_error_when_the_source_calls_check_takes_the_same_path():
    src = Source(T0 + 11.0)
    s = Setup(src)
    s.add(T0 + 12)
    s.to(T0 + 21)  # held: the watermark is behind
    real = s.model.close_due

    def close_due(now):
        s.model.close_due = real
        raise RuntimeError("once")

    s.model.close_due = close_due
    src.mark = T0 + 22.0
    s.report.check()  # the source's on_watermark: the error must not reach the source
    assert s.stats.errors["report"] == 1 and s.stats.states["report"] == "retrying"
    src.mark = T0 + 23.0
    s.report.check()
    assert s.starts() == [hms(10)] and s.stats.states["report"] == "running"
