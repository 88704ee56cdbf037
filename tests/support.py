"""Real test peers: an HTTP exporter served by twisted.web, and a hub on a unix datagram socket."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, List, Optional

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.web import resource, server


def line(time: str, url: str = "/live/hls/C1-high/1.ts", client: str = "10.0.0.1",
         ua: str = "player/1", status: int = 200, sent: int = 100,
         seq: Optional[int] = None) -> bytes:
    """One exporter line as the nginx exporter writes it."""
    obj = {} if seq is None else {"seq": seq}
    obj.update({"time": time, "client": client, "ua": ua, "url": url, "status": status,
                "bytes-sent": sent})
    return exporter_layout(obj) + b"\n"


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


class Exporter(resource.Resource):
    """A streaming exporter endpoint: each GET stays open; ``send`` writes to every open one.

    With ``ring`` set it answers as a protocol 2 exporter: with the ``X-Sfive-Protocol`` and
    ``X-Sfive-Ring`` headers; what it streams is still up to the test."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[server.Request] = []
        self.seen_args: List[dict] = []
        self.seen_headers: List[dict] = []
        self.code = 200
        self.ring: Optional[str] = None
        self.on_request: Optional[Callable[[server.Request], None]] = None

    def render_GET(self, request: server.Request):
        self.seen_args.append(dict(request.args))
        self.seen_headers.append(dict(request.requestHeaders.getAllRawHeaders()))
        if self.code != 200:
            request.setResponseCode(self.code)
            return b"nope\n"
        request.setHeader(b"content-type", b"application/x-ndjson")
        v2_headers(request, self.ring)
        self.requests.append(request)
        request.notifyFinish().addBoth(lambda _: self._gone(request))
        request.write(b"")
        if self.on_request is not None:
            self.on_request(request)
        return server.NOT_DONE_YET

    def _gone(self, request: server.Request) -> None:
        if request in self.requests:
            self.requests.remove(request)

    def send(self, data: bytes) -> None:
        for request in list(self.requests):
            request.write(data)

    def cut(self) -> None:
        """Drop every open connection abruptly."""
        for request in list(self.requests):
            request.transport.abortConnection()


class ExporterServer:
    """The Exporter on a real loopback TCP port."""

    def __init__(self, port: int = 0) -> None:
        self.resource = Exporter()
        self.port = reactor.listenTCP(port, server.Site(self.resource), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/sfive"

    def stop(self) -> defer.Deferred:
        self.resource.cut()
        return defer.maybeDeferred(self.port.stopListening)


class DatagramHub:
    """The sfive hub's end: a bound unix datagram socket, read on demand (so it can stall)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.datagrams: List[bytes] = []

    def read(self) -> List[dict]:
        """Everything received so far, as datasets."""
        while True:
            try:
                self.datagrams.append(self.sock.recv(1 << 20))
            except BlockingIOError:
                break
        return [json.loads(d) for d in self.datagrams]

    def close(self) -> None:
        self.sock.close()
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
