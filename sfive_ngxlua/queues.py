"""The hub queue: encoded datasets waiting for the hub, oldest first, bounded in datasets and
bytes (past either bound the oldest are dropped, counted and warned about; the newest is always
kept). ``Queue`` is what the sinks need of one; ``MemoryQueue`` keeps it in memory, and
``store.queue.SqliteQueue`` in the state dir, where it survives restarts and crashes."""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .settings import DEFAULT_QUEUE_BYTES
from .stats import Stats


class Queue(Protocol):
    """What a hub sink needs of its queue."""

    limit: int
    persistent: bool
    """Whether the queue outlives the process (then a stop need not wait for it to drain)."""

    def push(self, data: bytes) -> None: ...
    def takes(self, size: int) -> bool: ...
    def head(self) -> Optional[bytes]: ...
    def replace_head(self, data: bytes) -> None: ...
    def sent(self) -> None: ...
    def drop_head(self, reason: str) -> None: ...
    def empty(self, timeout: float, clock: IReactorTime) -> Deferred: ...
    def warn_undelivered(self) -> None: ...
    def __len__(self) -> int: ...


class BoundedQueue:
    """The bounds, the counting and the waiting that both queues share; a subclass keeps the
    datasets (``head``, ``_pop_head``, ``replace_head``, ``__len__``) and ``size``."""

    log = Logger()
    persistent = False

    def __init__(self, limit: int, stats: Stats, max_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.size = 0
        self.stats = stats
        self._waiting: List[Deferred] = []

    def __len__(self) -> int:
        raise NotImplementedError

    def head(self) -> Optional[bytes]:
        raise NotImplementedError

    def _pop_head(self) -> None:
        raise NotImplementedError

    def takes(self, size: int) -> bool:
        """Whether a dataset of ``size`` bytes fits without dropping one (for a producer that
        would rather wait, as replay does)."""
        return not len(self) or (len(self) < self.limit and self.size + size <= self.max_bytes)

    def _bound(self) -> None:
        """Drop the oldest while over either limit."""
        while len(self) > 1 and (len(self) > self.limit or self.size > self.max_bytes):
            full = (f"{self.limit} datasets" if len(self) > self.limit
                    else f"{self.max_bytes / (1 << 20):g} MiB")
            self._pop_head()
            self.stats.drop("queue-full")
            self.log.warn(
                "hub queue full ({full}): dropped the oldest dataset ({dropped} dropped so far)",
                full=full, dropped=self.stats.datasets_dropped)
        self.stats.queued = len(self)

    def sent(self) -> None:
        """The head went out."""
        self._pop_head()
        self.stats.datasets_sent += 1
        self._taken()

    def drop_head(self, reason: str) -> None:
        """The head can never go out (``reason``: e.g. too-large)."""
        self._pop_head()
        self.stats.drop(reason)
        self._taken()

    def _taken(self) -> None:
        self.stats.queued = len(self)
        if not len(self) and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def empty(self, timeout: float, clock: IReactorTime) -> Deferred:
        """Fires (with None) once the queue is empty, or after ``timeout`` seconds."""
        if not len(self):
            return succeed(None)
        d = Deferred()
        d.addTimeout(timeout, clock, onTimeoutCancel=lambda *a: None)
        self._waiting.append(d)
        return d

    def warn_undelivered(self) -> None:
        """At a stop: say what the hub never got."""
        if len(self):
            self.log.warn("stopping with {n} datasets not delivered to the hub", n=len(self))


class MemoryQueue(BoundedQueue):
    """The hub queue in memory: lost at a stop (which waits a while for it to drain)."""

    def __init__(self, limit: int, stats: Stats, max_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        super().__init__(limit, stats, max_bytes)
        self.items: Deque[bytes] = deque()

    def __len__(self) -> int:
        return len(self.items)

    def push(self, data: bytes) -> None:
        self.items.append(data)
        self.size += len(data)
        self._bound()

    def head(self) -> Optional[bytes]:
        """The oldest dataset, the next to send (None if the queue is empty)."""
        return self.items[0] if self.items else None

    def replace_head(self, data: bytes) -> None:
        """The head goes out in this (trimmed) form."""
        self.size += len(data) - len(self.items[0])
        self.items[0] = data

    def _pop_head(self) -> None:
        self.size -= len(self.items.popleft())
