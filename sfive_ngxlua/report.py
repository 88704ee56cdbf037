"""Aligned reporting by event time: close the intervals the source's watermark has passed and
hand them to the outbox (``outbox.py``)."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Protocol, Tuple

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .conditions import Conditions
from .datasets import start_time
from .lifecycle import RETRYING, STOPPED, Lifecycle
from .model import Interval, IntervalModel
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
    is being read) instead of being sent empty; past ``max_delay`` what is known is reported and
    records that come later count as late. Held intervals are bounded: past ``held_cap`` client
    entries in them, the oldest are reported early (counted in ``stats.held_early``).

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
        forces out; update the held and lag figures."""
        now = self.clock.seconds()
        mark = self._source_mark(now)
        by_mark = self.model.due(mark) if math.isfinite(mark) else 0
        intervals = self.model.close_due(max(mark, now - self.max_delay))
        if len(intervals) > by_mark and not self._expired:
            self._expired = True  # once per outage
            self.log.warn(
                "reporting the interval starting at {start} without all of the exporter's "
                "records: waited --max-delay {max_delay:g}s (watermark {lag}); records that "
                "come later count as late", start=start_time(intervals[by_mark].start),
                max_delay=self.max_delay, lag=_lag(now, mark))
        held = self.model.due(now)
        while held and self._held_entries(held) > self.held_cap:
            intervals.extend(self.model.close_due(self.model.due_at))
            self.stats.held_early += 1
            held -= 1
        if held and not self.stats.held:
            self.log.info("holding the interval starting at {start}: the exporter's records up "
                          "to its end are not in yet (watermark {lag})",
                          start=start_time((self.model.reported + 1) * self.settings.duration),
                          lag=_lag(now, mark))
        if not held:
            self._expired = False
        self.stats.held = held
        self.stats.watermark_lag = now - mark if math.isfinite(mark) else None
        self._emit(intervals)
        if self.lifecycle.state == RETRYING:
            self.lifecycle.enter(RUNNING)

    def _held_entries(self, held: int) -> int:
        return self.model.entries(upto=self.model.reported + held)

    def _emit(self, intervals: List[Interval]) -> None:
        """Hand the intervals to the outbox, record their figures in Stats, and log one line
        per interval."""
        if not intervals:
            return
        self.outbox.emit(intervals)
        for interval in intervals:
            for streamer in self.settings.streamers:
                clients = interval.streams[streamer]
                self.stats.reported(streamer, clients.count, clients.total)
            self.stats.last_report = self.clock.seconds()
            pairs = self._pairs()
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
                      warnings=sum(s.warnings.values()))
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
        self._emit(self.outbox.at_stop(self.model, self.clock.seconds()))
        self.lifecycle.enter(STOPPED)


def _lag(now: float, mark: float) -> str:
    return f"{now - mark:.1f}s behind" if math.isfinite(mark) else "unknown"
