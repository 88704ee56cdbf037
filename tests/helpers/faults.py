"""Real fault injectors for the reliability suite.

The exporter (a twisted.web server on 127.0.0.1 that streams what the test tells it, cuts
connections mid-line, goes silent, answers errors, or never sends headers) and the unix datagram
hub whose socket the test reads, stalls, closes and reopens are support's, here too; a stream
hub (unix or tcp) that can go away and come back, a capture of every twisted.logger event, a
bounded poll on the real reactor, and the service run with ``--metrics``. Nothing here is a
fake: the service under test talks to real sockets.
"""

from __future__ import annotations

import time
from typing import List, Optional, Sequence

import simplejson
import support
from support import DatagramHub, Exporter, v2_headers, wait_for  # noqa: F401 (theirs, here too)
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent

from sfive_ngxlua.service import build
from sfive_ngxlua.settings import Options, Settings
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


OURS = {"url": URL, "ua": "ua/1"}
"""This suite's defaults for support's record fields."""


def record(t: float, **kw: object) -> dict:
    """support.record at the epoch second ``t`` (fields: client, ua, url, status, sent, seq)."""
    return support.record(iso(t), **{**OURS, **kw})


def line(t: float, **kw: object) -> bytes:
    """support.line (as nginx/sfive.lua writes it) at the epoch second ``t``."""
    return support.line(iso(t), **{**OURS, **kw})


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


# -- the hubs -------------------------------------------------------------------------------


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


class WithMetrics:
    """The service as the plugin builds it from its options, with ``--metrics`` on a free
    loopback port, a real exporter and hub (``tmp_path/hub.sock``) and its timers on a
    task.Clock at ``start``: ``yield run.start()`` (fires once the metrics port listens and the
    exporter's stream is open; ``run.port``), then ``yield run.stop()`` in a ``finally``."""

    def __init__(self, tmp_path: object, start: float = T0, duration: int = 10,
                 options: Sequence[str] = ()) -> None:
        self.clock = clock_at(start)
        self.exporter = Exporter().listen()
        self.hub = DatagramHub(str(tmp_path / "hub.sock"))
        parsed = Options()
        parsed.parseOptions([
            "-s", self.hub.path, "-n", "edge1", "-d", str(duration), "--grace", "1",
            "-S", "foo,bar/hls/high,low", "-u", self.exporter.url(), *options,
            "--metrics", "tcp:0:interface=127.0.0.1",
        ])
        self.top = build(parsed.settings(), reactor, clock=self.clock)
        self.stats = self.top.stats
        self.port: Optional[int] = None

    @inlineCallbacks
    def start(self):
        self.top.startService()
        self.port = (yield self.top.getServiceNamed("metrics").listening).getHost().port
        yield wait_for(lambda: self.exporter.streams)
        return self

    @inlineCallbacks
    def stop(self):
        yield self.top.stopService()
        yield self.exporter.stop()
        self.hub.close()
