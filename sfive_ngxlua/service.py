"""``makeService``: the whole importer as one MultiService, for twistd and for embedding."""

from __future__ import annotations

import time
from typing import Any, Callable, List, Optional

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .datasets import Dataset
from .fetch import LogFetchService
from .model import IntervalModel
from .pipeline import Pipeline
from .report import ReportService
from .settings import Options, Settings
from .sinks import DatasetQueue, DiskQueue, HubDatagramSink, HubStreamSink, StdoutSink
from .stats import Stats
from .store import StateLocked, StateStore, StateUnusable

__all__ = ["Options", "makeService", "build", "make_sink", "StateService", "make_source"]

log = Logger()

CHECKPOINT_SECONDS = 1.0
CHECKPOINT_BUDGET = 0.05
"""Share of the reactor's time checkpoints may take: a checkpoint that took longer than this
share of its period (e.g. tens of thousands of clients changing every second) stretches the
period, up to ``CHECKPOINT_MAX_SECONDS``."""
CHECKPOINT_MAX_SECONDS = 10.0


def make_sink(settings: Settings, reactor: Any, stats: Stats,
              clock: Optional[IReactorTime] = None,
              queue: Optional[DatasetQueue] = None) -> Service:
    """The sink the settings ask for: hub datagram socket, hub stream, or standard output.
    The hub sinks queue in ``queue`` (default: in memory, bounded by the settings)."""
    if queue is None and (settings.socket or settings.hub):
        queue = DatasetQueue(settings.queue_limit, stats, settings.queue_bytes)
    if settings.socket:
        return HubDatagramSink(settings.socket, reactor, stats, settings.queue_limit, clock=clock,
                               queue=queue)
    if settings.hub:
        return HubStreamSink(settings.hub, reactor, stats, settings.queue_limit, clock=clock,
                             queue=queue)
    return StdoutSink(stats)


class StateService(Service):
    """Keeps the model, the source's position and the hub queue in the state store.

    A checkpoint every ``period`` seconds (on the injected clock) and at every report, each one
    transaction; the report's datasets are committed with the model's changes and the position
    and only then sent. At the stop (after the reporter, the fetcher and the sink have stopped)
    a last checkpoint saves the running interval, and the store is closed.
    """

    log = Logger()

    def __init__(self, store: StateStore, model: IntervalModel, source: Any, sink: Any,
                 clock: IReactorTime, period: float = CHECKPOINT_SECONDS) -> None:
        self.store = store
        self.model = model
        self.source = source
        self.sink = sink
        self.clock = clock
        self.period = period
        queue = getattr(sink, "queue", None)
        self.queue = queue if isinstance(queue, DiskQueue) else None
        self.loop = LoopingCall(self.checkpoint)
        self.loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self.store.attach()
        pending, self.store.pending = self.store.pending, []
        for dataset in pending:
            self.sink.deliver(dataset)
        self.loop.start(self.period, now=True).addErrback(
            lambda f: self.log.failure("checkpoint loop failed", f))

    def checkpoint(self) -> bool:
        """The model's changes and the position they cover, in one transaction; the period
        adapts so that checkpoints take at most ``CHECKPOINT_BUDGET`` of the time."""
        started = time.perf_counter()
        try:
            ok = self.store.checkpoint(self.model, self.source.position(), self.queue)
            self.store.scrub_wal()
        except Exception as e:  # one error line, counted; never a traceback or a stop
            self.log.error("checkpoint failed ({why}); trying again at the next one",
                           why=f"{type(e).__name__}: {e}")
            self.store.stats.state_errors += 1
            self.store.need_full = True
            ok = False
        cost = time.perf_counter() - started
        self.loop.interval = min(CHECKPOINT_MAX_SECONDS,
                                 max(self.period, cost / CHECKPOINT_BUDGET))
        return ok

    def commit(self, datasets: List[Dataset]) -> None:
        """The report's transaction: the closed intervals' changes, their datasets into the
        queue, the position; then send."""
        if self.queue is not None:
            self.store.checkpoint(self.model, self.source.position(), self.queue,
                                  [self.sink.encode(d) for d in datasets])
            self.sink.flush()
            return
        self.store.checkpoint(self.model, self.source.position())
        for dataset in datasets:
            self.sink.deliver(dataset)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        try:
            if self.store.checkpoint(self.model, self.source.position(), self.queue):
                self.log.info("state saved in {dir}: the running interval is reported after "
                              "the restart", dir=self.store.directory)
            self.store.scrub = True
            self.store.scrub_wal()
        finally:
            self.store.close()


def make_source(settings: Settings, reactor: Any, pipeline: Pipeline, stats: Stats,
                clock: Optional[IReactorTime] = None,
                on_watermark: Optional[Callable[[], Any]] = None) -> Service:
    """The source the settings ask for: the access-log follower (--file) or the exporter."""
    if settings.file:
        from .follow import FileFollowService

        return FileFollowService(settings, reactor, pipeline, stats, clock=clock,
                                 on_watermark=on_watermark)
    return LogFetchService(settings, reactor, pipeline, stats, clock=clock,
                           on_watermark=on_watermark)


def build(settings: Settings, reactor: Any, sink: Optional[Service] = None,
          clock: Optional[IReactorTime] = None, stats: Optional[Stats] = None) -> MultiService:
    """Compose fetcher, model, reporter and sink (and the state store, with a state dir).

    ``reactor`` does the networking; ``clock`` (default: the reactor) drives every timer, so a
    test can use a ``task.Clock``. ``sink`` is any service with ``deliver(dataset)``, e.g. a
    ``CallableSink``; by default the settings choose one. Stop order is reporter, fetcher, sink
    (then the state's last checkpoint): without a state dir the last partial interval is
    reported before the sink drains its queue; with one it is saved instead. Raises
    ``StateLocked`` if another process has the state dir.
    """
    clock = clock if clock is not None else reactor
    stats = stats if stats is not None else Stats()
    store = queue = None
    if settings.state_dir:
        try:
            store = StateStore(settings.state_dir, settings, stats, clock)
        except StateUnusable as e:
            stats.state_errors += 1
            log.error("{why}; running without a saved state (a restart loses the running "
                      "interval and the hub queue)", why=e)
    if store is not None and sink is None and (settings.socket or settings.hub):
        queue = DiskQueue(store, settings.queue_limit, stats, settings.queue_bytes)
    if sink is None:
        sink = make_sink(settings, reactor, stats, clock, queue)
    if getattr(sink, "stats", False) is None:
        sink.stats = stats
    model = store.restore(stats, queue) if store is not None else None
    if model is None:
        model = IntervalModel(settings, stats)
    pipeline = Pipeline(settings, stats, model)
    top = MultiService()
    top.stats = stats
    top.model = model
    top.sink = sink
    fetch = make_source(settings, reactor, pipeline, stats, clock)
    state = None
    if store is not None:
        state = StateService(store, model, fetch, sink, clock)
        state.setName("state")
        state.setServiceParent(top)
        position = store.position()
        if position:
            try:
                fetch.resume(position)
            except ValueError as e:
                store.log.warn("state in {dir}: the saved position does not fit this source "
                               "({why}); reading from now", dir=store.directory, why=e)
    top.store = store
    sink.setName("sink")
    sink.setServiceParent(top)
    fetch.setName("fetch")
    fetch.setServiceParent(top)
    reporter = ReportService(settings, clock, model, sink.deliver, stats, source=fetch,
                             commit=state.commit if state is not None else None)
    reporter.keep_open = state is not None
    reporter.setName("report")
    reporter.setServiceParent(top)
    fetch.on_watermark = reporter.check
    if settings.metrics:
        from .metrics import MetricsService

        metrics = MetricsService(settings, reactor, stats)
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    return top


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """Validated options to the running service tree (twistd reaches it through
    ``sfive_ngxlua.tap``). A state dir that another process holds ends the start with one
    clear line (no traceback)."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        top = build(options.settings(), reactor)
    except StateLocked as e:
        raise SystemExit(f"sfive-ngxlua: {e}") from None
    if top.store is not None:
        top.store.detach()  # twistd may fork into the background before it starts us
    return top
