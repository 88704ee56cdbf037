"""Where datasets go: the hub's datagram socket, a hub stream, standard output, or a callable.

Every sink is a service with ``deliver(dataset)``. The hub sinks keep an ordered, bounded queue
that outlives connections: datasets wait there while the hub is away or slow and go out in order
when it can take them; past ``--queue-limit`` datasets or ``--queue-bytes`` the oldest are
dropped, counted and warned about. With a state dir the queue lives in the state store
(``DiskQueue``) and survives restarts and crashes.
"""

from __future__ import annotations

import socket
import sqlite3
from collections import deque
from errno import (
    EAGAIN,
    EINTR,
    EMSGSIZE,
    ENOBUFS,
    EWOULDBLOCK,
)
from typing import Any, Callable, Deque, List, Optional, Tuple

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import abstract, protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .datasets import Dataset, JsonLinesWriter, encode, fit, shrink
from .stats import Stats

RETRY_SECONDS = 3.0
DRAIN_SECONDS = 5.0
DATAGRAM_SLACK = 4096
"""Bytes under the socket's send buffer (SO_SNDBUF) that a datagram is kept below."""


def datagram_limit() -> int:
    """The largest dataset a unix datagram socket of this host sends whole: a new socket's
    send buffer (the hub port's own is the same, net.core.wmem_default) less some slack."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        return probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - DATAGRAM_SLACK


DEFAULT_QUEUE_BYTES = 256 << 20
WINDOW_DATASETS = 64
"""Datasets of a disk queue held in memory at a time (its oldest)."""


class DatasetQueue:
    """Encoded datasets waiting for the hub, oldest first: at most ``limit`` of them and at most
    ``max_bytes`` together (the newest dataset is always kept); past that the oldest are
    dropped, counted and warned about."""

    log = Logger()

    def __init__(self, limit: int, stats: Stats, max_bytes: int = DEFAULT_QUEUE_BYTES) -> None:
        self.items: Deque[bytes] = deque()
        self.limit = limit
        self.max_bytes = max_bytes
        self.size = 0
        self.stats = stats
        self._waiting: List[Deferred] = []

    def push(self, data: bytes) -> None:
        self.items.append(data)
        self.size += len(data)
        self._bound()

    def takes(self, size: int) -> bool:
        """Whether a dataset of ``size`` bytes fits without dropping one (for a producer that
        would rather wait, as replay does)."""
        return not self.items or (len(self) < self.limit and self.size + size <= self.max_bytes)

    def _bound(self) -> None:
        """Drop the oldest while over either limit."""
        while len(self) > 1 and (len(self) > self.limit or self.size > self.max_bytes):
            full = (f"{self.limit} datasets" if len(self) > self.limit
                    else f"{self.max_bytes / (1 << 20):g} MiB")
            self._pop_head()
            self.stats.datasets_dropped += 1
            self.log.warn(
                "hub queue full ({full}): dropped the oldest dataset ({dropped} dropped so far)",
                full=full, dropped=self.stats.datasets_dropped)
        self.stats.queued = len(self)

    def head(self) -> Optional[bytes]:
        """The oldest dataset, the next to send (None if the queue is empty)."""
        return self.items[0] if self.items else None

    def replace_head(self, data: bytes) -> None:
        """The head goes out in this (trimmed) form."""
        self.size += len(data) - len(self.items[0])
        self.items[0] = data

    def _pop_head(self) -> None:
        self.size -= len(self.items.popleft())

    def sent(self) -> None:
        """The head went out."""
        self._pop_head()
        self.stats.datasets_sent += 1
        self._taken()

    def drop_head(self) -> None:
        """The head can never go out."""
        self._pop_head()
        self.stats.datasets_dropped += 1
        self._taken()

    def _taken(self) -> None:
        self.stats.queued = len(self)
        if not len(self) and self._waiting:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def warn_undelivered(self) -> None:
        """At a stop: say what the hub never got."""
        if len(self):
            self.log.warn("stopping with {n} datasets not delivered to the hub", n=len(self))

    def empty(self, timeout: float, clock: IReactorTime) -> Deferred:
        """Fires (with None) once the queue is empty, or after ``timeout`` seconds."""
        if not len(self):
            return succeed(None)
        d = Deferred()
        d.addTimeout(timeout, clock, onTimeoutCancel=lambda *a: None)
        self._waiting.append(d)
        return d

    def __len__(self) -> int:
        return len(self.items)


class DiskQueue(DatasetQueue):
    """The hub queue in the state store: it survives restarts and crashes, in order; memory
    holds only its oldest ``window`` datasets. A dataset is deleted from disk once sent (a crash
    between sending and deleting sends it again after the restart: the only duplicate).

    While the store cannot be written (a full disk), new datasets wait in memory behind those
    on disk (the bounds count both) and are written at the next transaction that works."""

    log = Logger()
    persistent = True

    def __init__(self, store: Any, limit: int, stats: Stats,
                 max_bytes: int = DEFAULT_QUEUE_BYTES, window: int = WINDOW_DATASETS) -> None:
        super().__init__(limit, stats, max_bytes)
        self.store = store
        self.window_size = window
        self.window: Deque[Tuple[int, bytes]] = deque()
        self.on_disk, self.size = store.queue_totals()
        self._last_id = 0
        if self.on_disk:
            self.log.info("{n} datasets ({mib:.1f} MiB) saved in the hub queue, sent first",
                          n=self.on_disk, mib=self.size / (1 << 20))
        self.stats.queued = len(self)

    def __len__(self) -> int:
        return self.on_disk + len(self.items)

    def push(self, data: bytes) -> None:
        """One dataset, in its own transaction."""
        try:
            with self.store.transaction():
                self.stage([data])
        except sqlite3.Error as e:
            self.store.failed(e, "hub queue write")
            self.push_memory([data])

    def stage(self, items: List[bytes]) -> None:
        """Inside the store's transaction: write ``items`` (behind any that waited in memory
        while the store could not be written); they count once it commits."""
        spill = list(self.items)
        rows = spill + items
        ids = self.store.queue_insert(rows)

        def committed() -> None:
            for data in spill:
                self.items.popleft()
                self.size -= len(data)
            self._appended(list(zip(ids, rows)))

        self.store.after_commit(committed)

    def _appended(self, rows: List[Tuple[int, bytes]]) -> None:
        for i, data in rows:
            if len(self.window) == self.on_disk and len(self.window) < self.window_size:
                self.window.append((i, data))
                self._last_id = i
            self.on_disk += 1
            self.size += len(data)
        self._bound()

    def push_memory(self, items: List[bytes]) -> None:
        """Datasets the store could not take: they wait in memory, after those on disk."""
        for data in items:
            self.items.append(data)
            self.size += len(data)
        self._bound()

    def _fill(self) -> None:
        if not self.window and self.on_disk:
            try:
                rows = self.store.queue_after(self._last_id, self.window_size)
            except sqlite3.Error as e:  # the rows stay on disk; the next send tries again
                self.store.failed(e, "hub queue read")
                return
            self.window.extend(rows)
            if rows:
                self._last_id = rows[-1][0]

    def head(self) -> Optional[bytes]:
        self._fill()
        if self.window:
            return self.window[0][1]
        return self.items[0] if self.items else None

    def replace_head(self, data: bytes) -> None:
        if self.window:
            i, old = self.window[0]
            self._write(lambda: self.store.queue_update(i, data))
            self.window[0] = (i, data)
            self.size += len(data) - len(old)
        else:
            super().replace_head(data)

    def _pop_head(self) -> None:
        self._fill()
        if self.window:
            i, data = self.window.popleft()
            self._write(lambda: self.store.queue_delete([i]))
            self.on_disk -= 1
            self.size -= len(data)
        else:
            super()._pop_head()

    def warn_undelivered(self) -> None:
        if self.on_disk:
            self.log.info("stopping with {n} datasets not yet delivered to the hub; kept in "
                          "the state dir, sent after the restart", n=self.on_disk)
        if self.items:
            self.log.warn("stopping with {n} datasets not delivered to the hub that the state "
                          "store could not take: lost", n=len(self.items))

    def _write(self, action: Callable[[], None]) -> None:
        """A single-statement change (it commits on its own); a failure is the store's."""
        try:
            action()
        except sqlite3.Error as e:
            self.store.failed(e, "hub queue update")


class CallableSink(Service):
    """Hands each dataset (a dict) to a Python callable: for embedding applications.

    Without ``stats``, ``service.build`` gives it the service's own, so that its deliveries
    show in the log line and the metrics."""

    log = Logger()

    def __init__(self, deliver: Callable[[Dataset], Any], stats: Optional[Stats] = None) -> None:
        self._deliver = deliver
        self.stats = stats

    def deliver(self, dataset: Dataset) -> None:
        try:
            self._deliver(dataset)
        except Exception:
            self.log.failure("dataset callable failed; dataset dropped")
            if self.stats is not None:
                self.stats.datasets_dropped += 1
        else:
            if self.stats is not None:
                self.stats.datasets_sent += 1


class StdoutSink(JsonLinesWriter, Service):
    """Writes datasets as JSON lines to a binary stream (standard output by default)."""


class _HubProtocol(protocol.ConnectedDatagramProtocol):
    noisy = False

    def __init__(self, sink: HubDatagramSink) -> None:
        self.sink = sink

    def startProtocol(self) -> None:
        self.sink._connected(self.transport)

    def datagramReceived(self, data: bytes) -> None:
        pass

    def connectionFailed(self, failure: Failure) -> None:
        self.sink._lost(failure.getErrorMessage())

    def connectionRefused(self) -> None:
        self.sink._lost("connection refused")


class HubDatagramPort(abstract.FileDescriptor):
    """A connected unix datagram socket that never drops on EAGAIN and never sleeps.

    It sends from the sink's queue in order; when the socket is full (EAGAIN, ENOBUFS) it waits
    for writability and goes on from ``doWrite``; a datagram too large for the socket (EMSGSIZE)
    has its client list trimmed until it fits. (A FileDescriptor of its own: Twisted's
    ConnectedDatagramPort drops a datagram on EAGAIN, and it is never read from.)
    """

    log = Logger()

    def __init__(self, path: str, proto: _HubProtocol, queue: DatasetQueue, reactor: Any) -> None:
        super().__init__(reactor)
        self.path = path
        self.protocol = proto
        self.queue = queue
        self.socket: Optional[socket.socket] = None
        self._limit: Optional[int] = None
        self._stopping = False

    def fileno(self) -> int:
        return self.socket.fileno() if self.socket is not None else -1

    def startListening(self) -> None:
        """Connect, without a log line: a hub that stays away for hours is retried every few
        seconds, and each outage is logged once, by the sink."""
        skt = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        skt.setblocking(False)
        try:
            skt.connect(self.path)
        except OSError as e:
            skt.close()
            self.protocol.connectionFailed(Failure(e))
            return
        self.socket = skt
        self.connected = 1
        self.protocol.makeConnection(self)

    def stopListening(self) -> None:
        """Close; idempotent: a failed connect and the sink may both ask."""
        if self._stopping:
            return
        self._stopping = True
        self.stopWriting()
        self.connected = 0
        self.disconnected = 1
        skt, self.socket = self.socket, None
        if skt is not None:
            skt.close()
            self.protocol.doStop()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor gave up on the socket: the hub is lost (the sink reconnects)."""
        super().connectionLost(reason)
        if not self._stopping:
            self.protocol.connectionFailed(reason)

    def flush(self) -> None:
        """Send queued datasets until the queue is empty or the socket is full."""
        queue = self.queue
        while self.connected and not self._stopping:
            data = queue.head()
            if data is None:
                break
            try:
                self.socket.send(data)
            except OSError as e:
                if e.errno == EINTR:
                    continue
                if e.errno in (EAGAIN, EWOULDBLOCK, ENOBUFS):
                    self.startWriting()
                    return
                if e.errno == EMSGSIZE:
                    self._trim(data)
                    continue
                self.stopWriting()
                self.protocol.connectionFailed(Failure(e))
                return
            self.queue.sent()
        if self.connected and not self._stopping:
            self.stopWriting()

    def _trim(self, data: bytes) -> None:
        if self._limit is None:
            self._limit = self.socket.getsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF) - DATAGRAM_SLACK
        limit = min(self._limit, len(data) - 1)
        smaller = shrink(data, limit)
        if len(smaller) >= len(data):
            self.queue.drop_head()
            self.log.error("dataset of {size} bytes cannot be sent even without clients; dropped",
                           size=len(data))
            return
        self._limit = limit if len(smaller) <= limit else limit // 2
        self.queue.replace_head(smaller)
        self.queue.stats.datasets_trimmed += 1
        self.log.warn(
            "dataset of {size} bytes exceeds the datagram limit: client list trimmed to "
            "{newsize} bytes (largest clients kept; totals unchanged)",
            size=len(data), newsize=len(smaller),
        )

    def doWrite(self) -> None:
        """The hub read: go on sending."""
        self.flush()


class _HubSink(Service):
    """What both hub sinks share: the bounded queue in front of the current connection (anything
    with ``flush()``), the drain on stop, and one warning per outage."""

    log = Logger()
    connection: Any = None

    def __init__(self, reactor: Any, stats: Stats, queue_limit: int, drain: float,
                 clock: Optional[IReactorTime], queue: Optional[DatasetQueue] = None) -> None:
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.stats = stats
        self.queue = queue if queue is not None else DatasetQueue(queue_limit, stats)
        self.drain = drain
        self._outage = False

    def deliver(self, dataset: Dataset) -> None:
        self.queue.push(self.encode(dataset))
        self.flush()

    def flush(self) -> None:
        """Send what the queue holds, as far as the connection takes it."""
        if self.connection is not None:
            self.connection.flush()

    def encode(self, dataset: Dataset) -> bytes:
        """What goes into the queue for a dataset: its whole wire form."""
        return encode(dataset)

    def _outage_begins(self, format: str, **kw: Any) -> None:
        if not self._outage:
            self._outage = True
            self.log.warn(format, **kw)

    def _drained(self) -> Deferred:
        """Up to ``drain`` seconds for the queue to reach the hub, if connected."""
        if self.connection is None or getattr(self.queue, "persistent", False):
            return succeed(None)
        return self.queue.empty(self.drain, self.clock)


class HubDatagramSink(_HubSink):
    """The sfive hub's unix datagram socket, reconnected every few seconds while it is away."""

    def __init__(self, path: str, reactor: Any, stats: Stats, queue_limit: int = 1000,
                 retry: float = RETRY_SECONDS, drain: float = DRAIN_SECONDS,
                 clock: Optional[IReactorTime] = None,
                 queue: Optional[DatasetQueue] = None) -> None:
        super().__init__(reactor, stats, queue_limit, drain, clock, queue)
        self.path = path
        self.reactor = reactor
        self.retry = retry
        self.limit = datagram_limit()
        self._retrying: Any = None

    def encode(self, dataset: Dataset) -> bytes:
        """The dataset built to fit one datagram from the start (``datasets.fit``): the largest
        clients while they fit, totals exact; trimmed ones are counted and logged."""
        data, kept = fit(dataset, self.limit)
        listed = len(dataset["data"]["clients"])
        if kept < listed:
            self.stats.datasets_trimmed += 1
            self.log.warn(
                "dataset of {clients} clients exceeds the datagram limit: client list trimmed "
                "to {newsize} bytes ({kept} largest clients kept; totals unchanged)",
                clients=listed, newsize=len(data), kept=kept,
            )
        return data

    @property
    def port(self) -> Optional[HubDatagramPort]:
        return self.connection

    def startService(self) -> None:
        super().startService()
        self._connect()

    def _connect(self) -> None:
        self._retrying = None
        port = HubDatagramPort(self.path, _HubProtocol(self), self.queue, self.reactor)
        self.connection = port
        port.startListening()

    def _connected(self, port: HubDatagramPort) -> None:
        self.stats.hub_connected = True
        if self._outage:
            self.log.info("sfive hub at {path} is back; sending {n} queued datasets",
                          path=self.path, n=len(self.queue))
        else:
            self.log.info("connected to the sfive hub at {path}", path=self.path)
        self._outage = False
        port.flush()

    def _lost(self, why: str) -> None:
        port, self.connection = self.connection, None
        if port is not None:
            port.stopListening()
        self.stats.hub_connected = False
        self._outage_begins(
            "sfive hub at {path} unavailable ({why}); retrying every {retry:g}s, "
            "queueing up to {limit} datasets", path=self.path, why=why, retry=self.retry,
            limit=self.queue.limit,
        )
        if self.running and self._retrying is None:
            self.stats.hub_reconnects += 1
            self._retrying = self.clock.callLater(self.retry, self._connect)

    def stopService(self) -> Deferred:
        """Give queued datasets up to ``drain`` seconds to reach the hub, then close."""
        super().stopService()
        if self._retrying is not None:
            self._retrying.cancel()
            self._retrying = None
        return self._drained().addBoth(lambda _: self._close())

    def _close(self) -> None:
        self.queue.warn_undelivered()
        port, self.connection = self.connection, None
        if port is not None:
            port.stopListening()
        self.stats.hub_connected = False


class _HubStream(protocol.Protocol):
    """One connection to the hub's stream socket; a push producer-aware writer of the queue."""

    def __init__(self, sink: HubStreamSink) -> None:
        self.sink = sink
        self.paused = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.sink._connected(self)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.flush()

    def stopProducing(self) -> None:
        self.paused = True

    def flush(self) -> None:
        queue = self.sink.queue
        while not self.paused:
            data = queue.head()
            if data is None:
                break
            self.transport.write(data)
            queue.sent()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.sink._lost(self, reason.getErrorMessage())


@implementer(IStreamClientEndpoint)
class _Attempts:
    """The hub's endpoint, tried until it connects: each failed attempt is reported to the sink
    (counted there, logged once per outage) and tried again after a backoff on the sink's
    clock. ClientService, which logs every retry it schedules, so sees a connection or its
    loss, never the attempts of an outage."""

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None],
                 clock: IReactorTime, policy: Callable[[int], float], name: str) -> None:
        self.endpoint = endpoint
        self.failed = failed
        self.clock = clock
        self.policy = policy
        self.name = name

    def __repr__(self) -> str:
        return f"the sfive hub at {self.name}"

    def connect(self, factory: protocol.Factory) -> Deferred:
        current: List[Any] = [None]  # the attempt in flight (a Deferred) or the next (a call)
        cancelled: List[bool] = []

        def cancel(_: Deferred) -> None:
            cancelled.append(True)
            if isinstance(current[0], Deferred):
                current[0].cancel()
            elif current[0] is not None and current[0].active():
                current[0].cancel()

        result = Deferred(cancel)

        def attempt(n: int) -> None:
            d = current[0] = self.endpoint.connect(factory)
            d.addCallbacks(result.callback, failed, errbackArgs=(n,))

        def failed(failure: Failure, n: int) -> None:
            if cancelled:
                return
            self.failed(failure)
            current[0] = self.clock.callLater(self.policy(n), attempt, n + 1)

        attempt(0)
        return result


class HubStreamSink(_HubSink):
    """The hub over a stream endpoint (``unix:path=...``, ``tcp:host=...:port=...``): one dataset
    per line, no size limit, reconnected by a ClientService with backoff."""

    def __init__(self, description: str, reactor: Any, stats: Stats, queue_limit: int = 1000,
                 drain: float = DRAIN_SECONDS, clock: Optional[IReactorTime] = None,
                 queue: Optional[DatasetQueue] = None) -> None:
        super().__init__(reactor, stats, queue_limit, drain, clock, queue)
        self.description = description
        factory = protocol.Factory.forProtocol(lambda: _HubStream(self))
        factory.noisy = False
        policy = backoffPolicy(initialDelay=1.0, maxDelay=RETRY_SECONDS * 10)
        self.client = ClientService(
            _Attempts(clientFromString(reactor, description), self._failed, self.clock, policy,
                      description), factory, retryPolicy=policy, clock=self.clock,
        )

    def startService(self) -> None:
        super().startService()
        self.client.startService()

    def _connected(self, stream: _HubStream) -> None:
        self.connection = stream
        self.stats.hub_connected = True
        self.log.info("connected to the sfive hub at {hub}; {n} datasets queued",
                      hub=self.description, n=len(self.queue))
        self._outage = False
        stream.flush()

    def _lost(self, stream: _HubStream, why: str) -> None:
        if self.connection is stream:
            self.connection = None
        self.stats.hub_connected = False
        if self.running:
            self.stats.hub_reconnects += 1
            self._outage_begins("lost the sfive hub at {hub} ({why}); reconnecting with backoff",
                                hub=self.description, why=why)

    def _failed(self, failure: Failure) -> None:
        """A connection attempt failed: counted each time, logged once per outage."""
        if self.running:
            self.stats.hub_reconnects += 1
            self._outage_begins(
                "sfive hub at {hub} unavailable ({why}); reconnecting with backoff, "
                "queueing up to {limit} datasets", hub=self.description,
                why=failure.getErrorMessage(), limit=self.queue.limit,
            )

    def stopService(self) -> Deferred:
        super().stopService()
        d = self._drained()
        d.addBoth(lambda _: self.queue.warn_undelivered())
        d.addBoth(lambda _: self.client.stopService())
        return d
