"""Aligned reporting by event time: close the intervals the source's watermark has passed and
hand them to the outbox (``outbox.py``)."""

from __future__ import annotations

import math
import shlex
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .conditions import Conditions
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

    The watermark is the source's, but never more than ``--max-delay`` behind the clock:
    intervals due by the clock and not yet by the source are held, then reported partial, or
    withheld where the source vouched for none of them (README, "What is counted, and when";
    clock steps: "Restarts and outages"). A LoopingCall in phase with the due times, and the
    source's ``on_watermark``, call ``check``; what one check closes goes to the ``outbox``
    together. An unexpected error is logged, counted, and the loop retried.
    """

    log = Logger()

    def __init__(self, settings: Settings, clock: IReactorTime, model: IntervalModel,
                 outbox: Outbox, stats: Stats, source: Optional[Source] = None,
                 held_cap: Optional[int] = None,
                 conditions: Optional[Conditions] = None) -> None:
        """``held_cap``: client entries allowed in held intervals (default: one interval's
        worth at the client cap, ``max_clients`` times the number of streamers).
        ``conditions``: the misconfiguration warnings, checked at each report (default: its
        own, without the source's parser)."""
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
        self.conditions = conditions if conditions is not None else Conditions(settings)
        self._logged: Dict[str, int] = {}
        self.lifecycle = Lifecycle("report", stats, (WAITING, RUNNING), self.log)
        self._start: Optional[IDelayedCall] = None
        self._retry: Optional[IDelayedCall] = None
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
        return _in(self.model.withheld, k)

    def _resolved(self, interval: Interval, out: Optional[List[Interval]]) -> None:
        resolve(self.model, interval, out, self._filled)

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
        filled, self._filled = self._filled, []
        told_filled(self.log, self.settings, filled)

    def _why(self, mark: float) -> str:
        if not math.isfinite(mark):
            return "it has vouched for nothing yet"
        return f"its watermark is at {start_time(int(mark))}"

    def _gave_up(self, intervals: List[Interval], why: str) -> None:
        gave_up(self.log, self.settings, intervals, why)

    def _held_entries(self, held: int) -> int:
        return self.model.entries(upto=self.model.reported + held)

    def _emit(self, intervals: List[Interval]) -> None:
        """Hand the intervals to the outbox, record their figures in Stats, and log one line
        per interval."""
        if not intervals:
            return
        self.outbox.emit(intervals)
        for interval in intervals:
            if interval.coverage == PARTIAL:
                self.stats.intervals_partial += 1
            else:
                self.stats.intervals_covered += 1
            for streamer in self.settings.streamers:
                clients = interval.streams[streamer]
                self.stats.reported(streamer, clients.count, clients.total)
            self.stats.last_report = self.clock.seconds()
            pairs = [("coverage", interval.coverage)] + self._pairs()
            self.log.info("interval {start} ({duration_ms} ms) reported: {pairs}",
                          start=start_time(interval.start), duration_ms=interval.duration_ms,
                          pairs=" ".join(f"{k}={v}" for k, v in pairs), figures=dict(pairs))
        for change in self.conditions.check(self.stats):
            (self.log.warn if change.raised else self.log.info)(
                "{warning}", warning=change.text, condition=change.condition,
                raised=change.raised)

    def _pairs(self) -> List[Tuple[str, object]]:
        """The per-interval log line's figures as ``key=value`` pairs: ``interval.*`` since
        the last such line, ``total.*`` since start, unprefixed ones as they are now."""
        s = self.stats
        counts = {"lines": s.lines, "accepted": s.accepted,
                  "rejected": sum(s.rejected.values())}
        counts.update((f"rejected.{r}", n) for r, n in sorted(s.rejected.items()) if n)
        counts.update(late=s.late, before_start=s.before_start, lost=s.lost,
                      sent=s.datasets_sent, dropped=s.datasets_dropped,
                      trimmed=s.datasets_trimmed, reconnects=s.exporter_reconnects,
                      hub_reconnects=s.hub_reconnects, held_early=s.held_early,
                      partial=s.intervals_partial, withheld=s.intervals_withheld,
                      records_withheld=s.records_withheld, warnings=sum(s.warnings.values()))
        before, self._logged = self._logged, counts
        pairs: List[Tuple[str, object]] = [
            ("interval.clients", sum(f.clients for f in s.streams.values())),
            ("interval.bytes", sum(f.bytes for f in s.streams.values())),
            ("total.bytes", sum(f.bytes_total for f in s.streams.values()))]
        for key, n in counts.items():
            pairs += [(f"interval.{key}", n - before.get(key, 0)), (f"total.{key}", n)]
        pairs += [("queued", s.queued), ("held", s.held),
                  ("watermark_lag",
                   "-" if s.watermark_lag is None else f"{s.watermark_lag:.1f}s"),
                  ("ring_history", "-" if s.ring_history is None else f"{s.ring_history:.0f}s")]
        return pairs


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
        return at_stop(self.model, intervals, self._source_mark(self.clock.seconds()),
                       self.stats, self.settings, self.log,
                       "the service stops, and the source vouched for none of them")


def at_stop(model: IntervalModel, intervals: Sequence[Interval], mark: float, stats: Stats,
            settings: Settings, log: Logger, why: str) -> List[Interval]:
    """What a stop closes (``intervals``, oldest first), to be reported: partial (cut short),
    or given up, not reported, where the source vouched for none of it (withheld, or ``mark``
    short of its start) and delivered no record for it; each given-up stretch is logged with
    its replay command (``why``: the reason in that line). The service's stop and a saved
    state reported as saved (``service.report_saved``) both go through here."""
    out: List[Interval] = []
    given_up: List[Interval] = []
    filled: List[int] = []
    for interval in intervals:
        k = interval.start // settings.duration
        withheld = _in(model.withheld, k)
        empty = not any(c.bytes for c in interval.streams.values())
        if empty and (withheld or mark < interval.start):
            if not withheld:
                stats.intervals_withheld += 1
            resolve(model, interval, None, filled)
            given_up.append(interval)
        else:
            interval.coverage = PARTIAL
            resolve(model, interval, out, filled)
    told_filled(log, settings, filled)
    gave_up(log, settings, given_up, why)
    return out


def _in(span: Optional[List[int]], k: int) -> bool:
    return span is not None and span[0] <= k <= span[1]


def resolve(model: IntervalModel, interval: Interval, out: Optional[List[Interval]],
            filled: List[int]) -> None:
    """``interval`` is closed: to be reported (into ``out``; a withheld one's start into
    ``filled``) or given up (``out`` None); the model's withheld stretch shrinks by it."""
    k = interval.start // model.duration
    withheld = model.withheld
    if withheld is not None and withheld[0] <= k:
        if out is not None and k <= withheld[1]:
            filled.append(interval.start)
        if k >= withheld[1]:
            model.withheld = None
        else:
            withheld[0] = k + 1
    if out is None:
        model.give_up(k)
    else:
        out.append(interval)


def told_filled(log: Logger, settings: Settings, filled: List[int]) -> None:
    """One line for the withheld intervals (their starts: ``filled``) reported after all."""
    if filled:
        log.info("the withheld intervals from {since} to {until} are reported after all: the "
                 "source's records for them came (no replay needed)",
                 since=start_time(filled[0]),
                 until=start_time(filled[-1] + settings.duration))


def gave_up(log: Logger, settings: Settings, intervals: Sequence[Interval], why: str) -> None:
    """Log each stretch of given-up intervals with its replay command."""
    d = settings.duration
    stretches: List[List[int]] = []
    for interval in intervals:
        if stretches and stretches[-1][1] == interval.start:
            stretches[-1][1] = interval.start + d
        else:
            stretches.append([interval.start, interval.start + d])
    for since, until in stretches:
        log.warn(
            "withheld the intervals from {since_iso} to {until_iso} for good ({why}); records "
            "that still come for them are counted as withheld; to fill them from an access log "
            "in the sfive format (nginx/sfive-log.conf): {command}",
            since_iso=start_time(since), until_iso=start_time(until), why=why,
            command=replay_command(settings, since, until), since=since, until=until)


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
