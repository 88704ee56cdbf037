"""Real test peers: an HTTP exporter served by twisted.web, and a hub on a unix datagram socket
(the only ones: helpers.faults takes them from here)."""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from typing import Callable, Deque, List, Optional

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web import resource, server


def record(time: str, url: str = "/live/hls/C1-high/1.ts", client: str = "10.0.0.1",
           ua: str = "player/1", status: object = 200, sent: object = 100,
           seq: Optional[int] = None) -> dict:
    """One exporter record, its keys in nginx/sfive.lua's order; the values as given (a test
    may give wrong types)."""
    obj: dict = {} if seq is None else {"seq": seq}
    obj.update({"time": time, "client": client, "ua": ua, "url": url, "status": status,
                "bytes-sent": sent})
    return obj


def line(time: str, **kw: object) -> bytes:
    """One exporter line (``record``'s fields) as the nginx exporter writes it: the one writer
    of exporter lines in the tests (helpers.faults.line is this at an epoch second)."""
    return exporter_layout(record(time, **kw)) + b"\n"


def heartbeat(seq: int, t: float, oldest: Optional[int] = None,
              oldest_time: Optional[float] = None) -> bytes:
    """A protocol 2 heartbeat line: everything up to ``seq`` delivered, every record before
    ``t`` too; as nginx/sfive.lua writes it once its ring holds a record, with the oldest
    record held and about its time."""
    obj: dict = {"seq": seq, "hb": t}
    if oldest is not None:
        obj["oldest"] = oldest
        if oldest_time is not None:
            obj["oldest-time"] = oldest_time
    return exporter_layout(obj) + b"\n"


def exporter_layout(record: dict) -> bytes:
    """A record laid out as nginx/sfive.lua writes it: compact, in its key order, UTF-8."""
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()


def v2_headers(request: server.Request, ring: Optional[str]) -> None:
    """Answer as a protocol 2 exporter with ring ``ring`` (None: as an exporter of protocol 1,
    without these headers). nginx/sfive.lua sends them to every request, whatever its ``v``
    (only what it streams depends on ``v``), and no other header of its own."""
    if ring is not None:
        request.setHeader(b"X-Sfive-Protocol", b"2")
        request.setHeader(b"X-Sfive-Ring", ring.encode())


class _ExporterResource(resource.Resource):
    isLeaf = True

    def __init__(self, exporter: Exporter) -> None:
        super().__init__()
        self.exporter = exporter

    def render_GET(self, request: server.Request):
        return self.exporter._answer(request)


class Exporter:
    """A real HTTP exporter on 127.0.0.1 whose answers the test scripts.

    ``plan`` holds one action per coming request: ``("stream", *chunks)`` answers 200 and keeps
    the body open (``send``/``cut`` act on the newest stream), ``("status", code)`` answers an
    error, ``("silent",)`` accepts the request and never sends headers. Without a plan: stream,
    or the error ``code`` when it is not 200. With ``ring`` set, a stream answers with the
    protocol 2 headers (``X-Sfive-Protocol``, ``X-Sfive-Ring``) as nginx/sfive.lua does, to
    every request whatever its ``v``; what it streams (records, heartbeats) is up to the test.
    ``on_request(request)`` runs once a stream's headers are out. ``seen_args`` and
    ``seen_headers`` keep every request's query and headers, ``requests`` every request,
    ``streams`` the streams still open.
    """

    def __init__(self, ring: Optional[str] = None) -> None:
        self.ring = ring
        self.code = 200
        self.plan: Deque[tuple] = deque()
        self.on_request: Optional[Callable[[server.Request], None]] = None
        self.requests: List[server.Request] = []
        self.seen_args: List[dict] = []
        self.seen_headers: List[dict] = []
        self.streams: List[server.Request] = []
        self.current: Optional[server.Request] = None
        self.held: List[server.Request] = []
        self.port = None
        self.tls = False

    def listen(self, context_factory: object = None, number: int = 0) -> Exporter:
        """Listen on 127.0.0.1 (port ``number``, default any), with TLS given a context."""
        site = server.Site(_ExporterResource(self))
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

    def _answer(self, request: server.Request):
        self.requests.append(request)
        self.seen_args.append(dict(request.args))
        self.seen_headers.append(dict(request.requestHeaders.getAllRawHeaders()))
        request.notifyFinish().addBoth(lambda _: self._gone(request))
        if self.plan:
            action = self.plan.popleft()
        else:
            action = ("stream",) if self.code == 200 else ("status", self.code)
        kind = action[0]
        if kind == "status":
            request.setResponseCode(action[1])
            return b"error page\n"
        self.held.append(request)
        if kind == "silent":
            return server.NOT_DONE_YET
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/x-ndjson")
        v2_headers(request, self.ring)
        self.current = request
        self.streams.append(request)
        for chunk in action[1:]:
            request.write(chunk)
        if len(action) == 1:
            request.write(b"")
        if self.on_request is not None:
            self.on_request(request)
        return server.NOT_DONE_YET

    def _gone(self, request: server.Request) -> None:
        if request in self.streams:
            self.streams.remove(request)

    def send(self, *chunks: bytes) -> None:
        """Write chunks to the newest stream, each as its own HTTP chunk."""
        for chunk in chunks:
            self.current.write(chunk)

    def cut(self) -> None:
        """Drop the newest stream's connection without ending the body."""
        request, self.current = self.current, None
        request.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        port, self.port = self.port, None
        for request in self.held:
            if request.channel is not None and request.transport is not None:
                request.transport.abortConnection()
        self.held = []
        self.current = None
        return port.stopListening() if port is not None else defer.succeed(None)


class DatagramHub:
    """The sfive hub's unix datagram socket, read only when the test says so (so it can stall).

    Bound at once unless ``bind`` is false (then ``open`` binds it); ``close`` and ``open``
    again take the hub away and bring it back. ``datagrams`` keeps all it has read."""

    def __init__(self, path: str, bind: bool = True) -> None:
        self.path = path
        self.sock: Optional[socket.socket] = None
        self.datagrams: List[bytes] = []
        if bind:
            self.open()

    def open(self) -> DatagramHub:
        if self.sock is not None:
            self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        return self

    def take(self) -> int:
        """Take every datagram waiting; return how many there were."""
        n = 0
        while self.sock is not None:
            try:
                data = self.sock.recv(4 << 20)
            except BlockingIOError:
                break
            self.datagrams.append(data)
            n += 1
        return n

    def read(self) -> List[dict]:
        """Take every datagram waiting; everything received so far, as datasets."""
        self.take()
        return self.datasets()

    def datasets(self) -> List[dict]:
        return [json.loads(d) for d in self.datagrams]

    def has(self, n: int) -> Callable[[], bool]:
        """A predicate for ``wait_for``: ``n`` datagrams received."""

        def check() -> bool:
            self.take()
            return len(self.datagrams) >= n

        return check

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if os.path.exists(self.path):
            os.unlink(self.path)


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, step: float = 0.01,
             what: str = "the condition") -> defer.Deferred:
    """Let the real reactor run until ``predicate()`` holds (fires with its value); fail the
    test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    @defer.inlineCallbacks
    def poll():
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            yield deferLater(reactor, step, lambda: None)

    return poll()
