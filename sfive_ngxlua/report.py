"""Aligned reporting by event time: close the intervals the source's watermark has passed and
hand their datasets to a sink (or to a ``commit`` hook)."""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .datasets import Dataset, datasets, report, start_time
from .model import Interval, IntervalModel
from .settings import Settings
from .stats import Stats


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

    ``commit``, when given, is called once per check with the datasets of all intervals just
    closed (oldest first) instead of handing them to ``deliver`` one by one (the state store
    writes them and the model's changes in one transaction, then sends them). With
    ``keep_open`` set, a stop reports only what is due and leaves the running interval in the
    model, for a checkpoint to save.

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
                 deliver: Callable[[dict], Any], stats: Stats, source: Optional[Source] = None,
                 commit: Optional[Callable[[List[Dataset]], Any]] = None,
                 held_cap: Optional[int] = None) -> None:
        """``held_cap``: client entries allowed in held intervals (default: one interval's
        worth at the client cap, ``max_clients`` times the number of streamers)."""
        self.settings = settings
        self.clock = clock
        self.model = model
        self.deliver = deliver
        self.stats = stats
        self.source = source
        self.commit = commit
        self.max_delay = settings.max_delay
        self.held_cap = (held_cap if held_cap is not None
                         else settings.max_clients * max(1, len(settings.streamers)))
        self.keep_open = False
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock
        self._start: Optional[IDelayedCall] = None
        self._expired = False

    def startService(self) -> None:
        super().startService()
        d = self.settings.duration
        if self.model.first is None:
            self.model.begin(self.clock.seconds())
        first = self.model.first
        self._start = self.clock.callLater(
            max(0.0, self.model.due_at - self.clock.seconds()), self._begin)
        self.log.info(
            "first interval starts at {start}; reporting every {duration}s, {grace:g}s after "
            "each interval's end (held up to {max_delay:g}s while the exporter's records are "
            "not in)", start=start_time(first * d), duration=d, grace=self.settings.grace,
            max_delay=self.max_delay,
        )

    def _begin(self) -> None:
        self._start = None
        self.loop.start(self.settings.duration, now=True).addErrback(
            lambda f: self.log.failure("reporting loop failed", f))

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
            self.tick()

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

    def _held_entries(self, held: int) -> int:
        return self.model.entries(upto=self.model.reported + held)

    def _emit(self, intervals: List[Interval]) -> None:
        """Report the intervals (through ``commit`` or ``deliver``), record their figures in
        Stats, and log one line per interval."""
        if not intervals:
            return
        if self.commit is not None:
            batch: List[Dataset] = []
            for interval in intervals:
                batch.extend(datasets(interval, self.settings))
            try:
                self.commit(batch)
            except Exception:
                self.stats.datasets_dropped += len(batch)
                self.log.failure("committing {n} datasets failed; dropped them", n=len(batch))
        for interval in intervals:
            if self.commit is None:
                report([interval], self.settings, self._deliver)
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
                " ring_history={history}",
                start=start_time(interval.start), duration_ms=interval.duration_ms,
                **self.stats.summary(),
            )

    def _deliver(self, dataset: dict) -> None:
        """Hand one dataset to the sink; a failing sink costs that dataset, not the loop."""
        try:
            self.deliver(dataset)
        except Exception:
            self.stats.datasets_dropped += 1
            self.log.failure("the sink failed to take a dataset; dropped it")

    def stopService(self) -> None:
        """Report what is due and the running interval with its true duration (with
        ``keep_open``: only what is due; the rest stays in the model)."""
        if self._start is not None and self._start.active():
            self._start.cancel()
        if self.loop.running:
            self.loop.stop()
        if self.keep_open:
            self.tick()
            super().stopService()
            return
        super().stopService()
        self._emit(self.model.close_all(self.clock.seconds()))


def _lag(now: float, mark: float) -> str:
    return f"{now - mark:.1f}s behind" if math.isfinite(mark) else "unknown"
