"""``makeService``: the whole importer as one MultiService, for twistd and for embedding.

The data's way through the house: source -> pipeline -> model -> reporter -> outbox -> sink,
with the state store beside the model (``Importer`` builds the parts in that order, each with
what it needs).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, Callable, List, Optional, Tuple, Union

from twisted.application.service import MultiService, Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .conditions import Conditions
from .datasets import Dataset, datasets, encode, start_time
from .fetch import LogFetchService
from .lifecycle import STOPPED, Lifecycle
from .model import Interval, IntervalModel, StateMismatch
from .outbox import DirectOutbox, DurableOutbox, Outbox, Positioned, deliver
from .pipeline import Pipeline
from .queues import MemoryQueue, Queue
from .records import DECODER_NAMES
from .report import ReportService, at_stop
from .settings import Options, Settings
from .sinks import CallableSink, HubDatagramSink, HubStreamSink, StdoutSink
from .stats import Stats
from .store import Saved, SqliteQueue, StateLocked, StateStore, StateUnusable

__all__ = ["Options", "makeService", "build", "Importer", "make_sink", "StateService",
           "make_source", "report_saved"]

log = Logger()

CHECKPOINT_SECONDS = 1.0
CHECKPOINT_BUDGET = 0.05
"""Share of the reactor's time checkpoints may take: a checkpoint that took longer than this
share of its period (e.g. tens of thousands of clients changing every second) stretches the
period, up to ``CHECKPOINT_MAX_SECONDS``."""
CHECKPOINT_MAX_SECONDS = 10.0
RUNNING = "running"


def make_sink(settings: Settings, reactor: Any, stats: Stats,
              clock: Optional[IReactorTime] = None, queue: Optional[Queue] = None) -> Service:
    """The sink the settings ask for: hub datagram socket, hub stream, or standard output.
    The hub sinks queue in ``queue`` (default: in memory, bounded by the settings)."""
    if queue is None and (settings.socket or settings.hub):
        queue = MemoryQueue(settings.queue_limit, stats, settings.queue_bytes)
    if settings.socket:
        return HubDatagramSink(settings.socket, reactor, stats, settings.queue_limit, clock=clock,
                               queue=queue)
    if settings.hub:
        return HubStreamSink(settings.hub, reactor, stats, settings.queue_limit, clock=clock,
                             queue=queue)
    return StdoutSink(stats)


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


class StateService(Service):
    """The checkpoint: the model's changes and the source's position in the state store.

    A checkpoint every ``period`` seconds (on the injected clock), one transaction each (the
    outbox makes one at every report). At the stop (after the reporter, the source and the sink
    have stopped) a last checkpoint saves the running interval, and the store is closed. A
    failing write (a full disk) is the store's one counted line; an unexpected error is logged
    with its traceback, counted, and the loop starts again a period later.
    """

    log = Logger()

    def __init__(self, store: StateStore, model: IntervalModel, source: Positioned,
                 clock: IReactorTime, queue: Optional[SqliteQueue] = None,
                 period: float = CHECKPOINT_SECONDS) -> None:
        self.store = store
        self.model = model
        self.source = source
        self.clock = clock
        self.queue = queue
        self.period = period
        self.loop = LoopingCall(self.checkpoint)
        self.loop.clock = clock
        self.lifecycle = Lifecycle("checkpoint", store.stats, (RUNNING,), self.log)
        self._retry: Optional[IDelayedCall] = None

    def startService(self) -> None:
        super().startService()
        self.store.attach()
        self.lifecycle.enter(RUNNING)
        self._run()

    def _run(self) -> None:
        self._retry = None
        if not self.running or self.loop.running:
            return
        self.loop.start(self.loop.interval or self.period, now=True).addErrback(self._failed)

    def checkpoint(self) -> bool:
        """The model's changes and the position they cover, in one transaction; the period
        adapts so that checkpoints take at most ``CHECKPOINT_BUDGET`` of the time."""
        started = time.perf_counter()
        try:
            ok = self.store.checkpoint(self.model, self.source.position(), self.queue)
            self.store.scrub_wal()
            if self.lifecycle.state != RUNNING:
                self.lifecycle.enter(RUNNING)
        except Exception:
            self.store.stats.state_errors += 1
            self.store.write_all_next()  # the next checkpoint that works writes everything
            self._failed(Failure())
            ok = False
        cost = time.perf_counter() - started
        self.loop.interval = min(CHECKPOINT_MAX_SECONDS,
                                 max(self.period, cost / CHECKPOINT_BUDGET))
        return ok

    def _failed(self, failure: Failure) -> None:
        """The one path of an unexpected error: its traceback once, counted, and a retry."""
        if self.loop.running:
            self.loop.stop()
        if self.running and self._retry is None:
            self._retry = self.lifecycle.unexpected(failure, "checkpointing", self.clock,
                                                    self.period, self._run)

    def stopService(self) -> None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self.loop.running:
            self.loop.stop()
        try:
            if self.store.checkpoint(self.model, self.source.position(), self.queue):
                self.log.info("state saved in {dir}: the running interval is reported after "
                              "the restart", dir=self.store.directory)
            self.store.scrub_wal(force=True)
        finally:
            self.store.close()
            self.lifecycle.enter(STOPPED)


def report_saved(store: StateStore, saved: Saved, settings: Settings, why: str,
                 queue: Optional[SqliteQueue] = None) -> Tuple[List[Interval], List[Dataset]]:
    """Report a saved model as it was saved (the running interval cut where it was saved)
    under the settings it was counted with, and clear it: its datasets into ``queue`` in the
    same transaction (without one, they are returned for the caller to deliver). For a state
    saved under other settings (at the start) and for retiring a node. What the source
    vouched for is not saved: as at a stop (``report.at_stop``), an interval without records
    that is withheld, or later than the last interval with records, is given up (logged with
    its replay command), never sent as "no viewers". Returns the intervals reported."""
    try:
        old = replace(settings, **_settings_from(saved.record))
        model = IntervalModel.restore(old, Stats(), saved.snapshot)
        closed = model.close_all(saved.saved_at or store.now())
    except Exception as e:
        store.set_aside(f"{why}, and it cannot be reported as saved", e)
        return [], []
    mark = max((i.start for i in closed if any(c.bytes for c in i.streams.values())),
               default=-math.inf)
    intervals = at_stop(model, closed, mark, model.stats, old, store.log,
                        f"the state {why}, and the source vouched for none of them")
    items = [d for interval in intervals for d in datasets(interval, old)]
    with store.transactions.transaction():
        store.tables.clear()
        if items and queue is not None:
            queue.stage([encode(d) for d in items])
    first = start_time(intervals[0].start) if intervals else "-"
    store.log.warn(
        "state in {dir} {why}: reported its {n} saved intervals from {first} as {m} "
        "datasets under the settings they were counted with ({where}), {left} given up; the "
        "model starts fresh", dir=store.directory, why=why, n=len(intervals), first=first,
        m=len(items), left=len(closed) - len(intervals),
        where="into the hub queue" if queue is not None else "to the sink")
    return intervals, [] if queue is not None else items


def _settings_from(record: dict) -> dict:
    """The settings a saved record names (``store.tables.settings_record``'s inverse)."""
    return {"duration": record["duration"],
            "streamers": tuple(tuple(s) for s in record["streamers"]),
            "hostname": record["hostname"], "tags": tuple(record["tags"]),
            "max_clients": record["max_clients"], "max_ua_length": record["max_ua_length"]}


def restore_model(store: StateStore, settings: Settings, stats: Stats,
                  queue: Optional[SqliteQueue]) -> Tuple[Optional[IntervalModel], List[Dataset]]:
    """The saved model, or None (nothing saved; damaged: set aside; saved under other
    settings: reported as it was saved, see ``report_saved``). The datasets a sink without
    a queue still has to get."""
    saved = store.saved()
    if saved is None:
        return None, []
    try:
        settings.client_ip.check_saved(saved.record, store,
                                       queue.totals()[0] if queue is not None else 0)
        return IntervalModel.restore(settings, stats, saved.snapshot), []
    except StateMismatch as e:
        _, pending = report_saved(store, saved, settings, f"saved under other settings ({e})",
                                  queue)
        return None, pending


class Importer(MultiService):
    """The importer's parts, each built once with what it needs: beside the model the state
    store and its queue; then the model, the pipeline, the source, the sink, the outbox, the
    reporter, the checkpoint and the metrics. Started checkpoint first (so that it stops last),
    then sink, source and reporter. The one signal against the data's direction, the source's
    ``on_watermark``, goes through ``_watermark_moved``."""

    def __init__(self, settings: Settings, reactor: Any,
                 sink: Union[Service, Callable[[Dataset], Any], None] = None,
                 clock: Optional[IReactorTime] = None, stats: Optional[Stats] = None) -> None:
        super().__init__()
        clock = clock if clock is not None else reactor
        self.stats: Stats = stats if stats is not None else Stats()
        self.store: Optional[StateStore] = self._open_store(settings, clock)
        hub = sink is None and bool(settings.socket or settings.hub)
        self.queue: Optional[SqliteQueue] = (
            self.store.queue(settings.queue_limit, settings.queue_bytes)
            if self.store is not None and hub else None)
        self.pending: List[Dataset] = []
        """Datasets of a state saved under other settings, for a sink without a queue."""
        model = None
        if self.store is not None:
            model, self.pending = restore_model(self.store, settings, self.stats, self.queue)
        self.model: IntervalModel = model or IntervalModel(settings, self.stats)
        self.pipeline = Pipeline(settings, self.stats, self.model)
        self.source: Any = make_source(settings, reactor, self.pipeline, self.stats, clock,
                                       on_watermark=self._watermark_moved)
        if self.store is not None:
            self._resume(self.store)
        if sink is None:
            sink = make_sink(settings, reactor, self.stats, clock, self.queue)
        elif not isinstance(sink, Service):
            sink = CallableSink(sink, self.stats)
        self.sink: Service = sink
        self.outbox: Outbox = (
            DurableOutbox(settings, self.store, self.model, self.source, sink, self.stats,
                          self.queue)
            if self.store is not None else DirectOutbox(settings, sink, self.stats))
        self.report = ReportService(settings, clock, self.model, self.outbox, self.stats,
                                    source=self.source,
                                    conditions=Conditions(settings, self.pipeline.parser))
        self.state: Optional[StateService] = None
        if self.store is not None:
            self.state = StateService(self.store, self.model, self.source, clock, self.queue)
            self._add("state", self.state)
        self._add("sink", sink)
        self._add("fetch", self.source)
        self._add("report", self.report)
        self.metrics: Optional[Service] = None
        if settings.metrics:
            from .metrics import MetricsService

            self.metrics = MetricsService(settings, reactor, self.stats)
            self._add("metrics", self.metrics)

    def _open_store(self, settings: Settings, clock: IReactorTime) -> Optional[StateStore]:
        if not settings.state_dir:
            return None
        try:
            return StateStore(settings.state_dir, settings, self.stats, clock)
        except StateUnusable as e:
            self.stats.state_errors += 1
            log.error("{why}; running without a saved state (a restart loses the running "
                      "interval and the hub queue)", why=e)
            return None

    def _resume(self, store: StateStore) -> None:
        position = store.position()
        if position:
            try:
                self.source.resume(position)
            except ValueError as e:
                store.log.warn("state in {dir}: the saved position does not fit this source "
                               "({why}); reading from now", dir=store.directory, why=e)

    def _add(self, name: str, service: Service) -> None:
        service.setName(name)
        service.setServiceParent(self)

    def _watermark_moved(self) -> None:
        """The source's ``on_watermark``: the reporter checks what became due."""
        self.report.check()

    def startService(self) -> None:
        decoder = self.pipeline.parser.decoder
        log.info("lines decoded by {decoder_name} ({decoder})", decoder=decoder,
                 decoder_name=DECODER_NAMES[decoder])
        super().startService()
        pending, self.pending = self.pending, []
        for dataset in pending:
            deliver(self.sink, dataset, self.stats, log)


def build(settings: Settings, reactor: Any,
          sink: Union[Service, Callable[[Dataset], Any], None] = None,
          clock: Optional[IReactorTime] = None, stats: Optional[Stats] = None) -> Importer:
    """Compose source, model, reporter and sink (and the state store, with a state dir).

    ``reactor`` does the networking; ``clock`` (default: the reactor) drives every timer, so a
    test can use a ``task.Clock``. ``sink`` is any service with ``deliver(dataset)`` or a plain
    callable (then a ``CallableSink`` counting in the service's ``stats``); by default the
    settings choose one. Stop order is reporter, source, sink (then the state's last
    checkpoint): without a state dir the last partial interval is reported before the sink
    drains its queue; with one it is saved instead. Raises ``StateLocked`` if another process
    has the state dir.
    """
    return Importer(settings, reactor, sink, clock, stats)


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
