"""Real fault injectors for the reliability suite.

An exporter (a twisted.web server on 127.0.0.1 that streams what the test tells it, cuts
connections mid-line, goes silent, answers errors, or never sends headers), a unix datagram hub
whose socket the test reads, stalls, closes and reopens, a stream hub (unix or tcp) that can go
away and come back, a capture of every twisted.logger event, and a bounded poll on the real
reactor. Nothing here is a fake: the service under test talks to real sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import deque
from typing import Callable, Deque, List, Optional

import simplejson
import support
from support import v2_headers, wait_for
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Settings
from sfive_ngxlua.sinks import CallableSink
from sfive_ngxlua.stats import Stats

T0 = 1_800_000_000
"""A start time aligned to every interval length the tests use (1, 2, 5, 10, 15 s)."""

URL = "/live/hls/foo-high/seg1.ts"
STREAMERS = (("foo", "hls", "high"), ("foo", "hls", "low"), ("bar", "dash", "high"))


def iso(epoch: float, offset: str = "+00:00", ms: Optional[int] = None) -> str:
    """A record's time stamp (exporter or access log) for the epoch second, in UTC with the
    offset spelled as given, and ``ms`` milliseconds if given."""
    fraction = "" if ms is None else f".{ms:03d}"
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + fraction + offset


def record(t: float, client: str = "10.0.0.1", ua: str = "ua/1", url: str = URL,
           status: object = 200, sent: object = 100, seq: Optional[int] = None) -> dict:
    obj = {"time": iso(t), "client": client, "ua": ua, "url": url, "status": status,
           "bytes-sent": sent}
    if seq is not None:
        obj["seq"] = seq
    return obj


def line(t: float, **kw: object) -> bytes:
    """One exporter line (JSON object and newline)."""
    return simplejson.dumps(record(t, **kw)).encode() + b"\n"


def heartbeat(seq: int, t: float, oldest: Optional[int] = None,
              oldest_time: Optional[float] = None) -> bytes:
    """A protocol 2 heartbeat line (support.heartbeat: as nginx/sfive.lua lays it out)."""
    return support.heartbeat(seq, t, oldest, oldest_time)


def settings(**kw: object) -> Settings:
    base = dict(streamers=STREAMERS, hostname="h", duration=10, grace=1.0, url="http://x/",
                idle_timeout=30.0, connect_timeout=5.0)
    base.update(kw)
    return Settings(**base)


def clock_at(t: float = T0) -> Clock:
    c = Clock()
    c.advance(t)
    return c


def turn(n: int = 3) -> Deferred:
    """Let the real reactor run ``n`` short iterations (pending I/O and callLater(0) calls)."""

    @inlineCallbacks
    def spin():
        for _ in range(n):
            yield deferLater(reactor, 0.001, lambda: None)

    return spin()


class LogCapture:
    """Every twisted.logger event while installed, with its formatted text."""

    def __init__(self) -> None:
        self.events: List[dict] = []

    def __call__(self, event: dict) -> None:
        self.events.append(event)

    def texts(self) -> List[str]:
        return [formatEvent(e) or "" for e in self.events]

    def matching(self, fragment: str) -> List[str]:
        return [t for t in self.texts() if fragment in t]

    def everything(self) -> str:
        """All events' formatted text plus the repr of their keyword data, for secret scans."""
        return "\n".join(f"{formatEvent(e)} {e!r}" for e in self.events)


# -- the exporter ---------------------------------------------------------------------------


class _ExporterResource(Resource):
    isLeaf = True

    def __init__(self, exporter: Exporter) -> None:
        super().__init__()
        self.exporter = exporter

    def render_GET(self, request):  # noqa: ANN001, ANN201
        return self.exporter._answer(request)


class Exporter:
    """A real HTTP exporter on 127.0.0.1 whose answers the test scripts.

    ``plan`` holds one action per coming request: ``("stream", *chunks)`` answers 200 and keeps
    the body open (``send``/``cut``/``end`` act on it), ``("status", code)`` answers an error,
    ``("silent",)`` accepts the request and never sends headers. Without a plan: stream.
    With ``ring`` set, a stream answers with the protocol 2 headers (``X-Sfive-Protocol``,
    ``X-Sfive-Ring``), as nginx/sfive.lua does.
    """

    def __init__(self, ring: Optional[str] = None) -> None:
        self.ring = ring
        self.plan: Deque[tuple] = deque()
        self.requests: List[object] = []
        self.current = None
        self.held: List[object] = []
        self.port = None
        self.tls = False

    def listen(self, context_factory: object = None, number: int = 0) -> Exporter:
        """Listen on 127.0.0.1 (port ``number``, default any), with TLS given a context."""
        site = Site(_ExporterResource(self))
        site.noisy = False
        if context_factory is None:
            self.port = reactor.listenTCP(number, site, interface="127.0.0.1")
        else:
            self.tls = True
            self.port = reactor.listenSSL(number, site, context_factory, interface="127.0.0.1")
        self.number = self.port.getHost().port
        return self

    def url(self, host: str = "127.0.0.1", userinfo: str = "") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{userinfo}{host}:{self.number}/sfive"

    def _answer(self, request):  # noqa: ANN001, ANN201
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: None)
        action = self.plan.popleft() if self.plan else ("stream",)
        kind = action[0]
        if kind == "status":
            request.setResponseCode(action[1])
            return b"error page\n"
        self.held.append(request)
        if kind == "silent":
            return NOT_DONE_YET
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")
        v2_headers(request, self.ring)
        self.current = request
        for chunk in action[1:]:
            request.write(chunk)
        if len(action) == 1:
            request.write(b"")
        return NOT_DONE_YET

    def send(self, *chunks: bytes) -> None:
        """Write chunks to the open stream, each as its own HTTP chunk."""
        for chunk in chunks:
            self.current.write(chunk)

    def cut(self) -> None:
        """Drop the connection without ending the body."""
        request, self.current = self.current, None
        request.transport.abortConnection()

    def stop(self) -> Deferred:
        port, self.port = self.port, None
        for request in self.held:
            if request.channel is not None and request.transport is not None:
                request.transport.abortConnection()
        self.held = []
        self.current = None
        return port.stopListening() if port is not None else succeed(None)


# -- the hubs -------------------------------------------------------------------------------


class DatagramHub:
    """The sfive hub's unix datagram socket, read only when the test says so."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: Optional[socket.socket] = None
        self.received: List[bytes] = []

    def open(self) -> DatagramHub:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        return self

    def read(self) -> int:
        """Take every datagram waiting; return how many there were."""
        n = 0
        while self.sock is not None:
            try:
                data = self.sock.recv(4 << 20)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                raise
            self.received.append(data)
            n += 1
        return n

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    def datasets(self) -> List[dict]:
        return [simplejson.loads(d) for d in self.received]

    def has(self, n: int) -> Callable[[], bool]:
        def check() -> bool:
            self.read()
            return len(self.received) >= n

        return check


class _LineCollector(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        self.factory.lines.extend(lines)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.connections.remove(self)


class StreamHub:
    """A hub listening on a stream server endpoint; collects newline-terminated datasets."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.factory = protocol.Factory.forProtocol(_LineCollector)
        self.factory.noisy = False
        self.factory.lines = []
        self.factory.connections = []
        self.port = None

    @property
    def lines(self) -> List[bytes]:
        return self.factory.lines

    @property
    def connections(self) -> list:
        return self.factory.connections

    def datasets(self) -> List[dict]:
        return [simplejson.loads(d) for d in self.lines]

    @inlineCallbacks
    def start(self):
        self.port = yield serverFromString(reactor, self.description).listen(self.factory)

    @inlineCallbacks
    def stop(self):
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        for conn in list(self.connections):
            conn.transport.abortConnection()
        yield wait_for(lambda: not self.connections)


# -- the service under test ------------------------------------------------------------------


class Running:
    """The whole service (``service.build``) on the real reactor, its timers on a task.Clock."""

    def __init__(self, settings: Settings, sink: object = None, clock: Optional[Clock] = None,
                 stats: Optional[Stats] = None) -> None:
        self.settings = settings
        self.clock = clock if clock is not None else clock_at()
        self.stats = stats if stats is not None else Stats()
        self.datasets: List[dict] = []
        if sink is None:
            sink = CallableSink(self.datasets.append, self.stats)
        self.sink = sink
        self.top = build(settings, reactor, sink=sink, clock=self.clock, stats=self.stats)
        self.fetch = self.top.getServiceNamed("fetch")

    def start(self) -> Running:
        self.top.startService()
        return self

    def stop(self) -> Deferred:
        """Stop; the clock is moved past any drain timeout so that a stalled hub cannot hang it."""
        if not self.top.running:
            return succeed(None)
        d = self.top.stopService()
        self.clock.advance(60)
        return d
