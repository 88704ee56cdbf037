"""Aligned reporting by event time: close the intervals the source's watermark has passed and
hand them to the outbox (``outbox.py``)."""

from __future__ import annotations

import math
import shlex
from typing import List, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .datasets import start_time
from .lifecycle import RETRYING, STOPPED, Lifecycle
from .model import COVERED, PARTIAL, Interval, IntervalModel
from .outbox import Outbox
from .settings import Settings
from .stats import Stats

WAITING = "waiting"
"""Before the first interval's due time."""
RUNNING = "running"
RETRY_SECONDS = 1.0
"""After an unexpected error, the loop starts again this much later (at the next due time)."""


class Source(Protocol):
    """What the reporter needs of a source (the exporter fetcher, the file follower)."""

    def watermark(self, now: float) -> float:
        """Event time up to which the source vouches everything is in the model."""


class ReportService(Service):
    """Reports interval k once the event-time watermark passes ``(k+1)*D + grace``.

    The watermark is ``effective = max(source.watermark(now), now - max_delay)``: what the
    source vouches for (a v1 exporter while connected, and no source at all: ``now``, the
    wall-clock rule), but never more than ``--max-delay`` behind the clock. Intervals due by the
    clock but not yet by the watermark are *held* (the exporter is unreachable, or its backlog
    is being read) instead of being sent empty; past ``max_delay`` what is known is reported
    (partial) and records that come later count as late, unless the source vouched for none of
    the interval and sent nothing for it: then it is *withheld* (kept open, logged with the
    replay command, reported after all if its records come, given up once a loss announced by
    the source overlaps it). Held intervals are bounded: past ``held_cap`` client entries in
    them, the oldest are reported early (counted in ``stats.held_early``). Each reported
    interval says its coverage (``Interval.coverage``; README, "What is counted").

    A LoopingCall, started at the first due time and then every D seconds from there (so it
    does not drift), closes whatever is due; a late tick (a busy or suspended machine) reports
    all it missed. ``check`` is also called by the source whenever its watermark may have
    moved (``on_watermark``), so held intervals are reported as soon as the backlog is read.

    The intervals closed by one check go to the ``outbox`` together (oldest first); at a stop,
    what is due and then what the outbox's kind closes at a stop (the running interval, or
    nothing when a checkpoint saves it). An unexpected error in a check is logged with its
    traceback, counted, and the loop starts again at the next due time.

    Clock steps: the wall clock may jump (NTP at boot). A forward step makes every interval in
    between due at once: they are reported (empty ones too) in one check, and records go into
    the intervals of their own time as always (a record may lie up to FUTURE_HORIZON, two
    hours, ahead of the reported intervals). A backward step stalls Twisted's timers until the
    clock catches up with them, and nothing new becomes due meanwhile; the records of the hour
    the clock went back are for intervals already reported (or older than the first), so they
    count as late into the oldest open interval, which is reported when the clock reaches its
    end again. Neither crashes or drops a record: a dataset with traffic may come late or
    merged, never lost. (Only the service's clock stepping, with the exporter on another
    host: stepped back, the heartbeats still close the intervals on time; stepped forward,
    ``now - max_delay`` closes the coming hour's intervals at once, and their records count
    as late into the interval after them.)
    """

    log = Logger()

    def __init__(self, settings: Settings, clock: IReactorTime, model: IntervalModel,
                 outbox: Outbox, stats: Stats, source: Optional[Source] = None,
                 held_cap: Optional[int] = None) -> None:
        """``held_cap``: client entries allowed in held intervals (default: one interval's
        worth at the client cap, ``max_clients`` times the number of streamers)."""
        self.settings = settings
        self.clock = clock
        self.model = model
        self.outbox = outbox
        self.stats = stats
        self.source = source
        self.max_delay = settings.max_delay
        self.held_cap = (held_cap if held_cap is not None
                         else settings.max_clients * max(1, len(settings.streamers)))
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock
        self.lifecycle = Lifecycle("report", stats, (WAITING, RUNNING), self.log)
        self._start: Optional[IDelayedCall] = None
        self._retry: Optional[IDelayedCall] = None
        self._lines_at: Optional[tuple] = None
        self._expired = False
        self._filled: List[int] = []
        """Starts of withheld intervals reported after all in the current check."""

    def startService(self) -> None:
        super().startService()
        d = self.settings.duration
        if self.model.first is None:
            self.model.begin(self.clock.seconds())
        first = self.model.first
        self.lifecycle.enter(WAITING)
        self._schedule()
        self.log.info(
            "first interval starts at {start}; reporting every {duration}s, {grace:g}s after "
            "each interval's end (held up to {max_delay:g}s while the exporter's records are "
            "not in)", start=start_time(first * d), duration=d, grace=self.settings.grace,
            max_delay=self.max_delay,
        )

    def _schedule(self) -> None:
        """Start the loop at the next due time (at once if one is due, or in phase with the
        due times after a failure), unless it runs or is about to."""
        self._retry = None
        if not self.running or self.loop.running or (
                self._start is not None and self._start.active()):
            return
        wait = self.model.due_at - self.clock.seconds()
        if wait < 0 and self.lifecycle.state == RETRYING:
            wait %= self.settings.duration
        self._start = self.clock.callLater(max(0.0, wait), self._begin)

    def _begin(self) -> None:
        self._start = None
        if self.lifecycle.state == WAITING:
            self.lifecycle.enter(RUNNING)  # after a failure tick() does, once one works
        self.loop.start(self.settings.duration, now=True).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        """The one path of an unexpected error: its traceback once, counted, and a retry."""
        if self.loop.running:
            self.loop.stop()
        if self.running and self._retry is None:
            self._retry = self.lifecycle.unexpected(failure, "reporting", self.clock,
                                                    RETRY_SECONDS, self._schedule)

    def _source_mark(self, now: float) -> float:
        """The source's watermark (``now`` without a source: the wall-clock rule)."""
        return now if self.source is None else self.source.watermark(now)

    def watermark(self, now: float) -> float:
        """The effective watermark: the source's, but at most ``max_delay`` behind ``now``."""
        return max(self._source_mark(now), now - self.max_delay)

    def check(self) -> None:
        """The source's watermark may have moved: report what it made due (cheap when
        nothing is due, as the source calls this for every chunk it reads)."""
        if not self.running:
            return
        now = self.clock.seconds()
        if self.watermark(now) >= self.model.due_at or self.stats.held:
            try:
                self.tick()
            except Exception:
                self._failed(Failure())

    def tick(self) -> None:
        """Close every interval due by the effective watermark, and what the held cap
        forces out; withhold what the source never vouched for; update the held, lag and
        coverage figures."""
        now = self.clock.seconds()
        mark = self._source_mark(now)
        model, d = self.model, self.settings.duration
        intervals: List[Interval] = []
        given_up: List[Interval] = []
        capped: List[Interval] = []
        for interval in model.close_due(mark) if math.isfinite(mark) else []:
            self._passed(interval, intervals, given_up)
        forced = model.due(now - self.max_delay)
        while forced > 0:
            k = model.reported + 1
            if mark < k * d and not model.has_records(k):  # nothing vouched for: withheld
                self._withhold(k, k + forced - 1, mark)
                break
            [interval] = model.close_due(model.due_at)
            interval.coverage = PARTIAL
            if not self._expired:
                self._expired = True  # once per outage
                self.log.warn(
                    "reporting the interval starting at {start} without all of the exporter's "
                    "records: waited --max-delay {max_delay:g}s (watermark {lag}); records "
                    "that come later count as late", start=start_time(interval.start),
                    max_delay=self.max_delay, lag=_lag(now, mark))
            self._resolved(interval, intervals)
            forced -= 1
        held = model.due(now)
        while held and self._held_entries(held) > self.held_cap:
            k = model.reported + 1
            empty = self._is_withheld(k) and not model.has_records(k)
            [interval] = model.close_due(model.due_at)
            interval.coverage = PARTIAL
            self._resolved(interval, None if empty else intervals)
            if empty:
                capped.append(interval)
            else:
                self.stats.held_early += 1
            held -= 1
        if held and not self.stats.held and model.withheld is None:
            self.log.info("holding the interval starting at {start}: the exporter's records up "
                          "to its end are not in yet (watermark {lag})",
                          start=start_time((model.reported + 1) * d), lag=_lag(now, mark))
        if not held:
            self._expired = False
        self.stats.held = held
        self.stats.watermark_lag = now - mark if math.isfinite(mark) else None
        running = int(now // d)
        self.stats.covered = (math.isfinite(mark) and mark >= now - d - self.settings.grace
                              and model.withheld is None and not model.lost(running))
        self._told_filled()
        self._gave_up(given_up, "the source announced their records lost")
        self._gave_up(capped, "the held intervals after them reached the held cap")
        self._emit(intervals)
        if self.lifecycle.state == RETRYING:
            self.lifecycle.enter(RUNNING)

    def _passed(self, interval: Interval, out: List[Interval],
                given_up: List[Interval]) -> None:
        """The watermark passed ``interval``: covered, or partial where a loss overlaps it; a
        withheld one that a loss overlaps, and one without records that a loss spans whole,
        is given up (proved lost, nothing known: not reported)."""
        k = interval.start // self.settings.duration
        lost = self.model.lost(k)
        withheld = self._is_withheld(k)
        if lost and (withheld or (self.model.lost_whole(k) and not any(
                c.bytes for c in interval.streams.values()))):
            if not withheld:
                self.stats.intervals_withheld += 1
            self._resolved(interval, None)
            given_up.append(interval)
            return
        interval.coverage = PARTIAL if lost else COVERED
        self._resolved(interval, out)

    def _is_withheld(self, k: int) -> bool:
        withheld = self.model.withheld
        return withheld is not None and withheld[0] <= k <= withheld[1]

    def _resolved(self, interval: Interval, out: Optional[List[Interval]]) -> None:
        """``interval`` is closed: to be reported (into ``out``) or given up (``out`` None);
        the withheld stretch shrinks by it."""
        k = interval.start // self.settings.duration
        withheld = self.model.withheld
        if withheld is not None and withheld[0] <= k:
            if out is not None and k <= withheld[1]:
                self._filled.append(interval.start)
            if k >= withheld[1]:
                self.model.withheld = None
            else:
                withheld[0] = k + 1
        if out is None:
            self.model.give_up(k)
        else:
            out.append(interval)

    def _withhold(self, first: int, last: int, mark: float) -> None:
        """Intervals ``first``..``last`` are due by --max-delay and the source vouched for
        none of them: not reported, kept open (their records may still come), counted, and
        logged once per stretch with the replay command that fills them."""
        withheld = self.model.withheld
        if withheld is not None and withheld[1] >= last:
            return
        d = self.settings.duration
        self.stats.intervals_withheld += last - (first - 1 if withheld is None else withheld[1])
        if withheld is None:
            self.model.withheld = [first, last]
            self.log.warn(
                "withholding the intervals from {start} on: the source vouches for none of "
                "them ({why}), so they are not reported as empty; they are reported if their "
                "records still come, and the stretch is logged again when it ends; so far, "
                "from an access log in the sfive format (nginx/sfive-log.conf): {command}",
                start=start_time(first * d), why=self._why(mark),
                command=replay_command(self.settings, first * d, (last + 1) * d),
                since=first * d, until=(last + 1) * d)
        else:
            withheld[1] = last

    def _told_filled(self) -> None:
        """One line for the withheld intervals reported after all in this check."""
        if self._filled:
            first, last = self._filled[0], self._filled[-1]
            self._filled = []
            self.log.info("the withheld intervals from {since} to {until} are reported after "
                          "all: the source's records for them came (no replay needed)",
                          since=start_time(first),
                          until=start_time(last + self.settings.duration))

    def _why(self, mark: float) -> str:
        if not math.isfinite(mark):
            return "it has vouched for nothing yet"
        return f"its watermark is at {start_time(int(mark))}"

    def _gave_up(self, intervals: List[Interval], why: str) -> None:
        """Log each stretch of given-up intervals with its replay command."""
        d = self.settings.duration
        stretches: List[List[int]] = []
        for interval in intervals:
            if stretches and stretches[-1][1] == interval.start:
                stretches[-1][1] = interval.start + d
            else:
                stretches.append([interval.start, interval.start + d])
        for since, until in stretches:
            self.log.warn(
                "withheld the intervals from {since_iso} to {until_iso} for good ({why}); "
                "records that still come for them are counted as withheld; to fill them from "
                "an access log in the sfive format (nginx/sfive-log.conf): {command}",
                since_iso=start_time(since), until_iso=start_time(until), why=why,
                command=replay_command(self.settings, since, until), since=since,
                until=until)

    def _held_entries(self, held: int) -> int:
        return self.model.entries(upto=self.model.reported + held)

    def _emit(self, intervals: List[Interval]) -> None:
        """Hand the intervals to the outbox, record their figures in Stats, and log one line
        per interval."""
        if not intervals:
            return
        self.outbox.emit(intervals)
        self._ring_history()
        for interval in intervals:
            if interval.coverage == PARTIAL:
                self.stats.intervals_partial += 1
            else:
                self.stats.intervals_covered += 1
            for streamer in self.settings.streamers:
                clients = interval.streams[streamer]
                self.stats.reported(streamer, clients.count, clients.total)
            self.stats.last_report = self.clock.seconds()
            self.log.info(
                "interval {start} ({duration_ms} ms) reported: clients={clients} bytes={bytes}"
                " lines={lines} accepted={accepted}"
                " rejected={rejected_total} {rejected} late={late} before_start={before_start}"
                " lost={lost} datasets sent={sent} queued={queued} dropped={dropped}"
                " trimmed={trimmed} reconnects: exporter={reconnects} hub={hub_reconnects}"
                " held={held} held_early={held_early} watermark_lag={lag}"
                " ring_history={history} coverage={coverage}",
                start=start_time(interval.start), duration_ms=interval.duration_ms,
                coverage=interval.coverage,
                **self.stats.summary(),
            )

    def _ring_history(self) -> None:
        """The ring's history in seconds: its size over the line rate since the last report."""
        now, lines = self.clock.seconds(), self.stats.lines
        before, self._lines_at = self._lines_at, (now, lines)
        size = self.stats.ring_size
        if size is None or before is None or now <= before[0]:
            return
        rate = (lines - before[1]) / (now - before[0])
        self.stats.ring_history = size / rate if rate > 0 else math.inf

    def stopService(self) -> None:
        """Report what is due, then what the outbox closes at a stop (the running interval
        with its true duration, or nothing: then it stays in the model)."""
        for call in (self._start, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._start = self._retry = None
        if self.loop.running:
            self.loop.stop()
        try:
            self.tick()
        except Exception:  # stopping: no retry, but the traceback and the count
            self.stats.errors["report"] = self.stats.errors.get("report", 0) + 1
            self.log.failure("reporting what was due at the stop failed")
        super().stopService()
        self._emit(self._at_stop(self.outbox.at_stop(self.model, self.clock.seconds())))
        self.lifecycle.enter(STOPPED)

    def _at_stop(self, intervals: List[Interval]) -> List[Interval]:
        """What a stop closes is partial (cut short), or given up where the source vouched
        for none of it and delivered no record for it."""
        now = self.clock.seconds()
        mark = self._source_mark(now)
        out: List[Interval] = []
        given_up: List[Interval] = []
        for interval in intervals:
            k = interval.start // self.settings.duration
            empty = not any(c.bytes for c in interval.streams.values())
            if empty and (self._is_withheld(k) or mark < interval.start):
                if not self._is_withheld(k):
                    self.stats.intervals_withheld += 1
                self._resolved(interval, None)
                given_up.append(interval)
            else:
                interval.coverage = PARTIAL
                self._resolved(interval, out)
        self._told_filled()
        self._gave_up(given_up, "the service stops, and the source vouched for none of them")
        return out


def replay_command(settings: Settings, since: int, until: int) -> str:
    """The ``sfive-ngxlua-replay`` command that counts ``[since, until)`` as this service
    would, into the same hub (the access log's name: ``--file``'s, or a placeholder)."""
    args = ["sfive-ngxlua-replay", "-n", settings.hostname]
    for tag in settings.tags:
        args += ["-t", tag]
    args += ["-d", str(settings.duration)]
    for streamer in settings.streamers:
        args += ["-S", "/".join(streamer)]
    args += ["-F", settings.nameformat,
             "--status", ",".join(str(s) for s in sorted(settings.statuses)),
             "--grace", f"{settings.grace:g}",
             "--max-clients", str(settings.max_clients),
             "--max-ua-length", str(settings.max_ua_length),
             "--max-line-length", str(settings.max_line_length)]
    ip = settings.client_ip
    args += ["--client-ip", ip.mode if ip.path is None else f"keyed:{ip.path}"]
    if settings.socket:
        args += ["--socket", settings.socket]
    elif settings.hub:
        args += ["--hub", settings.hub]
    args += ["--from", start_time(since), "--until", start_time(until)]
    return " ".join(shlex.quote(a) for a in args) + " " + (
        shlex.quote(settings.file) if settings.file else "ACCESS_LOG")


def _lag(now: float, mark: float) -> str:
    return f"{now - mark:.1f}s behind" if math.isfinite(mark) else "unknown"
