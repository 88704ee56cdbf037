"""Aligned reporting: close due intervals on the clock's ticks and hand their datasets to a sink."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .datasets import report, start_time
from .model import Interval, IntervalModel
from .settings import Settings
from .stats import Stats


class ReportService(Service):
    """Reports interval k at ``(k+1)*D + grace`` on a LoopingCall; stops with the partial one.

    The loop is started at the first due time and then runs every D seconds from there, so it
    does not drift; each tick closes every interval that is due by the clock, so a late tick
    (a busy or suspended machine) reports all it missed.
    """

    log = Logger()

    def __init__(self, settings: Settings, clock: IReactorTime, model: IntervalModel,
                 deliver: Callable[[dict], Any], stats: Stats) -> None:
        self.settings = settings
        self.clock = clock
        self.model = model
        self.deliver = deliver
        self.stats = stats
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock
        self._start: Optional[IDelayedCall] = None

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
            "each interval's end", start=start_time(first * d), duration=d,
            grace=self.settings.grace,
        )

    def _begin(self) -> None:
        self._start = None
        self.loop.start(self.settings.duration, now=True).addErrback(
            lambda f: self.log.failure("reporting loop failed", f))

    def tick(self) -> None:
        self._emit(self.model.close_due(self.clock.seconds()))

    def _emit(self, intervals: List[Interval]) -> None:
        """Report each interval, record its per-streamer figures in Stats, and log them."""
        for interval in intervals:
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
                " trimmed={trimmed} reconnects: exporter={reconnects} hub={hub_reconnects}",
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
        """Report what is due and the running interval with its true duration."""
        super().stopService()
        if self._start is not None and self._start.active():
            self._start.cancel()
        if self.loop.running:
            self.loop.stop()
        self._emit(self.model.close_all(self.clock.seconds()))
