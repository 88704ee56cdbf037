"""Where the reporter's closed intervals go: one ``Outbox`` (``emit``, ``at_stop``), of two
kinds.

- ``DirectOutbox``: their datasets to the sink, one by one; a stop reports the running
  interval too (nothing else would keep it).
- ``DurableOutbox`` (with a state dir): one store transaction holds the model's changes, the
  source's position and the datasets (into the disk queue, for a hub sink); only then does the
  sink send them. A stop keeps the running interval in the model, for the last checkpoint to
  save and the restart to finish.

A dataset that cannot be delivered is counted by reason (``Stats.drop``) and logged with its
traceback; the reporter goes on either way. A report whose transaction fails keeps its datasets
(the next checkpoint writes them and the whole state).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Protocol, Sequence, Union, cast

from twisted.logger import Logger

from .datasets import Dataset, Prepared, as_dict, prepared
from .model import Interval, IntervalModel
from .settings import Settings
from .stats import Stats
from .store import SqliteQueue, StateStore


class Sink(Protocol):
    """What the outboxes need of a sink: ``deliver`` takes dicts; if the sink has a true
    ``takes_prepared``, ``Prepared`` datasets as well (and gets those: no dict is built)."""

    def deliver(self, dataset: Dataset) -> None: ...


class QueueingSink(Sink, Protocol):
    """A hub sink: it sends from a queue that others may fill."""

    def encode(self, dataset: Union[Dataset, Prepared]) -> bytes: ...
    def flush(self) -> None: ...


class Positioned(Protocol):
    """The source, as far as a checkpoint needs it."""

    def position(self) -> Optional[Dict[str, Any]]: ...


class Outbox(Protocol):
    """What the reporter hands closed intervals to."""

    def emit(self, intervals: Sequence[Interval]) -> None:
        """Deliver the closed intervals' datasets (oldest first)."""

    def at_stop(self, model: IntervalModel, now: float) -> List[Interval]:
        """At a stop, after what was due: the intervals the stop closes as well."""


class DirectOutbox:
    """Datasets straight to the sink; a stop reports the running interval."""

    log = Logger()

    def __init__(self, settings: Settings, sink: Sink, stats: Stats) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = stats

    def emit(self, intervals: Sequence[Interval]) -> None:
        for interval in intervals:
            for dataset in prepared(interval, self.settings):
                deliver(self.sink, dataset, self.stats, self.log)

    def at_stop(self, model: IntervalModel, now: float) -> List[Interval]:
        return model.close_all(now)


class DurableOutbox:
    """The report is one transaction (model changes, position, datasets into ``queue``), then
    the sink sends; a stop keeps the running interval. Without ``queue`` (a sink that does
    not queue) the datasets are delivered after the transaction."""

    log = Logger()

    def __init__(self, settings: Settings, store: StateStore, model: IntervalModel,
                 source: Positioned, sink: Sink, stats: Stats,
                 queue: Optional[SqliteQueue] = None) -> None:
        """With ``queue``, ``sink`` is the ``QueueingSink`` that sends from it."""
        self.settings = settings
        self.store = store
        self.model = model
        self.source = source
        self.sink = sink
        self.stats = stats
        self.queue = queue
        self.hub: Optional[QueueingSink] = cast(QueueingSink, sink) if queue is not None else None

    def emit(self, intervals: Sequence[Interval]) -> None:
        batch = [d for interval in intervals for d in prepared(interval, self.settings)]
        queued = len(self.queue) if self.queue is not None else 0
        try:
            if self.hub is not None:
                self.store.checkpoint(self.model, self.source.position(), self.queue,
                                      [self.hub.encode(d) for d in batch])
            else:
                self.store.checkpoint(self.model, self.source.position())
        except Exception:
            self._commit_failed(batch, queued)
        if self.hub is not None:
            self.hub.flush()
            return
        for dataset in batch:
            deliver(self.sink, dataset, self.stats, self.log)

    def _commit_failed(self, batch: List[Prepared], queued: int) -> None:
        """An unexpected error in the report's transaction: the intervals are out of the
        model already, so their datasets are kept as a full disk keeps them (in the queue's
        memory, written by the next checkpoint, which writes the whole model), the error
        counted as the reporter's and logged with its traceback; only a dataset that cannot
        be encoded is dropped. Without a queue the caller delivers them."""
        self.store.write_all_next()
        self.stats.errors["report"] = self.stats.errors.get("report", 0) + 1
        kept, lost = len(batch), 0
        if self.hub is not None and self.queue is not None \
                and len(self.queue) < queued + len(batch):  # not committed after all
            items = []
            for dataset in batch:
                try:
                    items.append(self.hub.encode(dataset))
                except Exception:
                    lost += 1
            self.queue.push_memory(items)
            kept = len(items)
        if lost:
            self.stats.drop("commit-failed", lost)
        self.log.failure("committing the report's {n} datasets failed unexpectedly; {kept} "
                         "kept for the sink and the next checkpoint (which writes the whole "
                         "state), {lost} that cannot be encoded dropped", n=len(batch),
                         kept=kept, lost=lost)

    def at_stop(self, model: IntervalModel, now: float) -> List[Interval]:
        return []


def deliver(sink: Sink, dataset: Union[Dataset, Prepared], stats: Stats, log: Logger) -> None:
    """Hand one dataset to the sink (a prepared one as a dict, unless the sink takes prepared
    ones); a failing sink costs that dataset (counted), not the loop."""
    try:
        sink.deliver(dataset if getattr(sink, "takes_prepared", False) else as_dict(dataset))
    except Exception:
        stats.drop("sink-error")
        log.failure("the sink failed to take a dataset; dropped it")
