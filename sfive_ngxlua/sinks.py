"""Where datasets go: the hub's datagram socket, a hub stream, standard output, or a callable.

Every sink is a service with ``deliver(dataset)``. The hub sinks keep an ordered, bounded queue
that outlives connections: datasets wait there while the hub is away or slow and go out in order
when it can take them; past ``--queue-limit`` datasets or ``--queue-bytes`` the oldest are
dropped, counted and warned about (``queues.py``). With a state dir the queue lives in the
state store (``store.queue.SqliteQueue``) and survives restarts and crashes.

Each sink has a ``Lifecycle`` ("sink"); an unexpected error while sending is logged with its
traceback, counted, and the sink reconnects (or sends again) a little later.
"""

from __future__ import annotations

import socket
from errno import (
    EAGAIN,
    EINTR,
    EMSGSIZE,
    ENOBUFS,
    EWOULDBLOCK,
)
from typing import Any, Callable, List, Optional, Union

import simplejson
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import abstract, protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .datasets import Dataset, JsonLinesWriter, Prepared, as_dict, encode, fit, listed, shrink
from .lifecycle import RETRYING, STOPPED, Lifecycle
from .queues import MemoryQueue, Queue
from .stats import Stats

RETRY_SECONDS = 3.0
DRAIN_SECONDS = 5.0
CONNECTING, CONNECTED, AWAY = "connecting", "connected", "away"
"""A hub sink's states (and ``lifecycle.RETRYING`` after an unexpected error)."""
DATAGRAM_SLACK = 4096
"""Bytes under the socket's send buffer (SO_SNDBUF) that a datagram is kept below."""


def datagram_limit() -> int:
    """The largest dataset a unix datagram socket of this host sends whole: a new socket's
    send buffer (the hub port's own is the same, net.core.wmem_default) less some slack."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        return probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - DATAGRAM_SLACK


class CallableSink(Service):
    """Hands each dataset (a dict) to a Python callable: for embedding applications (give
    ``service.build`` the callable itself and it makes one with the service's ``Stats``)."""

    log = Logger()
    takes_prepared = True
    """A ``Prepared`` dataset is made a dict for the callable."""

    def __init__(self, deliver: Callable[[Dataset], Any], stats: Optional[Stats] = None) -> None:
        self._deliver = deliver
        self.stats = stats

    def deliver(self, dataset: Union[Dataset, Prepared]) -> None:
        try:
            self._deliver(as_dict(dataset))
        except Exception:
            self.log.failure("dataset callable failed; dataset dropped")
            if self.stats is not None:
                self.stats.drop("sink-error")
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

    def __init__(self, path: str, proto: _HubProtocol, queue: Queue, reactor: Any) -> None:
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
            self.queue.drop_head("too-large")
            self.log.error("dataset of {size} bytes cannot be sent even without clients; dropped",
                           size=len(data))
            return
        self._limit = limit if len(smaller) <= limit else limit // 2
        self.queue.replace_head(smaller)
        self.protocol.sink.stats.datasets_trimmed += 1
        self.log.warn(
            "dataset of {size} bytes exceeds the datagram limit: client list trimmed to "
            "{newsize} bytes (largest clients kept; totals unchanged)",
            size=len(data), newsize=len(smaller),
        )

    def doWrite(self) -> None:
        """The hub read: go on sending (through the sink, which handles any error)."""
        self.protocol.sink.flush()


class _HubSink(Service):
    """What both hub sinks share: the bounded queue in front of the current connection (anything
    with ``flush()``), the drain on stop, and one warning per outage."""

    log = Logger()
    connection: Any = None
    takes_prepared = True
    """``deliver`` and ``encode`` take ``Prepared`` datasets as well as dicts."""

    def __init__(self, reactor: Any, stats: Stats, queue_limit: int, drain: float,
                 clock: Optional[IReactorTime], queue: Optional[Queue] = None) -> None:
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.stats = stats
        self.queue: Queue = queue if queue is not None else MemoryQueue(queue_limit, stats)
        self.drain = drain
        self._outage = False
        self.lifecycle = Lifecycle("sink", stats, (CONNECTING, CONNECTED, AWAY), self.log)
        self._recovery: Any = None

    def deliver(self, dataset: Union[Dataset, Prepared]) -> None:
        self.queue.push(self.encode(dataset))
        self.flush()

    def flush(self) -> None:
        """Send what the queue holds, as far as the connection takes it; an unexpected error
        takes the one path (traceback once, counted) and the sink recovers later."""
        if self.connection is None or self._recovery is not None:
            return
        try:
            self.connection.flush()
        except Exception:
            self._recovery = self.lifecycle.unexpected(
                Failure(), "sending to the hub", self.clock, RETRY_SECONDS, self._recover)
            self._drop_connection()
            return
        if self.lifecycle.state == RETRYING:
            self.lifecycle.enter(CONNECTED if self.connection is not None else AWAY)

    def _enter(self, state: str) -> None:
        """Enter ``state``, unless retrying after an unexpected error: that stretch ends only
        when sending works again."""
        if self.lifecycle.state != RETRYING:
            self.lifecycle.enter(state)

    def _drop_connection(self) -> None:
        """After an unexpected error: let the connection go (the recovery makes a new one)."""

    def _recover(self) -> None:
        self._recovery = None
        if self.running:
            self._reconnect()

    def _reconnect(self) -> None:
        """Send again (a new connection where the sink makes them)."""
        self.flush()

    def _cancel_recovery(self) -> None:
        if self._recovery is not None and self._recovery.active():
            self._recovery.cancel()
        self._recovery = None

    def encode(self, dataset: Union[Dataset, Prepared]) -> bytes:
        """What goes into the queue for a dataset: its whole wire form."""
        return encode(dataset)

    def wire(self, data: bytes) -> bytes:
        """``encode`` for a dataset already in its wire form (a parallel replay's workers
        spool theirs so): the same."""
        return data

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
                 queue: Optional[Queue] = None) -> None:
        super().__init__(reactor, stats, queue_limit, drain, clock, queue)
        self.path = path
        self.reactor = reactor
        self.retry = retry
        self.limit = datagram_limit()
        self._retrying: Any = None

    def encode(self, dataset: Union[Dataset, Prepared]) -> bytes:
        """The dataset built to fit one datagram from the start (``datasets.fit``): the largest
        clients while they fit, totals exact; trimmed ones are counted and logged."""
        data, kept = fit(dataset, self.limit)
        clients = listed(dataset)
        if kept < clients:
            self.stats.datasets_trimmed += 1
            self.log.warn(
                "dataset of {clients} clients exceeds the datagram limit: client list trimmed "
                "to {newsize} bytes ({kept} largest clients kept; totals unchanged)",
                clients=clients, newsize=len(data), kept=kept,
            )
        return data

    def wire(self, data: bytes) -> bytes:
        """``encode`` for a dataset already in its wire form: as it is where it fits a datagram
        (``fit`` gives the same bytes then), else fitted as ``encode`` fits it."""
        return data if len(data) <= self.limit else self.encode(simplejson.loads(data))

    def startService(self) -> None:
        super().startService()
        self._connect()

    def _connect(self) -> None:
        self._retrying = None
        self._enter(CONNECTING)
        port = HubDatagramPort(self.path, _HubProtocol(self), self.queue, self.reactor)
        self.connection = port
        port.startListening()

    def _drop_connection(self) -> None:
        port, self.connection = self.connection, None
        if port is not None:
            port.stopListening()
        self.stats.hub_connected = False

    def _reconnect(self) -> None:
        if self.connection is None and self._retrying is None:
            self._connect()

    def _connected(self, port: HubDatagramPort) -> None:
        self._enter(CONNECTED)
        self.stats.hub_connected = True
        if self._outage:
            self.log.info("sfive hub at {path} is back; sending {n} queued datasets",
                          path=self.path, n=len(self.queue))
        else:
            self.log.info("connected to the sfive hub at {path}", path=self.path)
        self._outage = False
        self.flush()

    def _lost(self, why: str) -> None:
        self._drop_connection()
        self._enter(AWAY)
        self._outage_begins(
            "sfive hub at {path} unavailable ({why}); retrying every {retry:g}s, "
            "queueing up to {limit} datasets", path=self.path, why=why, retry=self.retry,
            limit=self.queue.limit,
        )
        if self.running and self._retrying is None and self._recovery is None:
            self.stats.hub_reconnects += 1
            self._retrying = self.clock.callLater(self.retry, self._connect)

    def stopService(self) -> Deferred:
        """Give queued datasets up to ``drain`` seconds to reach the hub, then close."""
        super().stopService()
        self._cancel_recovery()
        if self._retrying is not None:
            self._retrying.cancel()
            self._retrying = None
        return self._drained().addBoth(lambda _: self._close())

    def _close(self) -> None:
        self.queue.warn_undelivered()
        self._drop_connection()
        self.lifecycle.enter(STOPPED)


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
        self.sink.flush()

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
                 queue: Optional[Queue] = None) -> None:
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
        self._enter(CONNECTING)
        self.client.startService()

    def _connected(self, stream: _HubStream) -> None:
        self.connection = stream
        self._enter(CONNECTED)
        self.stats.hub_connected = True
        self.log.info("connected to the sfive hub at {hub}; {n} datasets queued",
                      hub=self.description, n=len(self.queue))
        self._outage = False
        self.flush()

    def _lost(self, stream: _HubStream, why: str) -> None:
        if self.connection is stream:
            self.connection = None
            self._enter(AWAY)
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
        self._cancel_recovery()
        d = self._drained()
        d.addBoth(lambda _: self.queue.warn_undelivered())
        d.addBoth(lambda _: self.client.stopService())
        d.addBoth(lambda _: self.lifecycle.enter(STOPPED))
        return d
