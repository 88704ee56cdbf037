"""The exporter stream: one long GET, fed to the pipeline chunk by chunk, reconnected with backoff.

The fetcher never stops the reactor: an answer other than 200, a refused or failed connection,
headers that do not come within the connect timeout, a body that goes idle for longer than the
idle timeout (judged by what arrived: ``IDLE_RECHECK``), or the stream's end all lead to a new
attempt after an exponential backoff with jitter (reset after every good connection: protocol
2's headers, or a first exporter line; a 200 without the header whose body ends holding no
exporter line is "not an exporter"). So does an error nobody expected (its traceback is logged
once and counted: lifecycle.Lifecycle); its states are ``connecting``, ``streaming``,
``backoff`` and ``retrying``. It resumes after the last exporter sequence number it read
(``?after=N``), so records still in the exporter's ring are not lost to a reconnect.

Protocol v2 (nginx/README.md, "Protocol 2"): it asks ``v=2`` and, once it knows the
exporter's ring, sends ``ring=ID``. An exporter that answers ``X-Sfive-Protocol: 2`` names its
ring (``X-Sfive-Ring``) and sends heartbeats (which also say the oldest record the ring holds:
``stats.ring_size`` and ``stats.ring_history``); a ring other than the one the fetcher knew means
nginx was restarted, and the exporter then streams the new ring from its first record (so the
sequence tracking starts again). An exporter without these headers (v1) gets protocol 1's requests
and behaviour.

The event-time watermark (``watermark(now)``): v2, the last heartbeat's time, connected or
not; v1, ``now`` while connected once a first valid line came, and the time it lost such a
connection while not; before, -inf. ``on_watermark`` (if set) is called whenever it may have
moved. A ring change is an announced loss (``Pipeline.lose``) from the last heartbeat on.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import unquote, urlsplit, urlunsplit

import treq
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from . import __version__
from .conditions import records_read
from .lifecycle import RETRYING, STOPPED, Lifecycle
from .pipeline import Pipeline
from .records import Heartbeat
from .settings import Settings
from .stats import Stats

USER_AGENT = f"sfive-ngxlua/{__version__}".encode("ascii")
PROTOCOL = 2
"""The exporter stream protocol this fetcher asks for."""
_RING_ID = re.compile(r"[0-9a-fA-F]{1,64}\Z")
IDLE_RECHECK = 0.1
"""Seconds between the idle watchdog finding the stream silent and its second look, the one
that cuts: the reactor runs its timers before its I/O, so after a stall (a long pause, a slow
disk, a loaded machine) the watchdog fires before the bytes that came meanwhile are read; the
second look comes after they are."""


def _header(response: Any, name: bytes) -> Optional[str]:
    """A response header's last value as text, or None."""
    values = response.headers.getRawHeaders(name)
    if not values:
        return None
    value = values[-1]
    return (value.decode("latin-1") if isinstance(value, bytes) else value).strip()


def split_credentials(url: str) -> Tuple[str, Optional[Tuple[str, str]], str]:
    """(URL without credentials, (user, password) or None, URL safe to log)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None, url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    auth = (unquote(parts.username), unquote(parts.password or ""))
    safe = urlunsplit((parts.scheme, f"{unquote(parts.username)}:***@{netloc}", parts.path,
                       parts.query, parts.fragment))
    return bare, auth, safe


def describe(failure: Failure) -> str:
    """A failure as a phrase for the log; the HTTP client's wrapper exceptions (ResponseFailed,
    ResponseNeverReceived) are replaced by the reasons they wrap."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(describe(r) for r in reasons)
    if type(failure.value).__module__.startswith("OpenSSL"):
        return f"TLS error {failure.getErrorMessage()}"
    return failure.getErrorMessage()


def _cancelled(failure: Failure) -> bool:
    """Whether the request was cancelled (the connect timeout), however wrapped."""
    if failure.check(CancelledError, ConnectingCancelledError):
        return True
    return any(_cancelled(r) for r in getattr(failure.value, "reasons", None) or ())


CONNECTING, STREAMING, BACKOFF = "connecting", "streaming", "backoff"


@implementer(IStreamClientEndpoint)
class _Quiet:
    """An endpoint whose factories say no "Starting factory" / "Stopping factory" line for
    every reconnect (``Factory.noisy``)."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, factory: protocol.Factory) -> Deferred:
        factory.noisy = False
        return self.endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """The endpoints an Agent makes by default (TCP with the connect timeout; TLS by the
    browser-like policy for https), made quiet."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.tls = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:  # noqa: N802 (the interface)
        endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return _Quiet(endpoint)


class _Body(protocol.Protocol):
    def __init__(self, fetcher: LogFetchService) -> None:
        self.fetcher = fetcher

    def dataReceived(self, data: bytes) -> None:
        self.fetcher._data(self, data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.fetcher._ended(self, reason)


class _Discard(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()


class LogFetchService(Service):
    """Streams the exporter's lines into a Pipeline for as long as the service runs."""

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, pipeline: Pipeline, stats: Stats,
                 clock: Optional[IReactorTime] = None, client: Any = None,
                 retry_policy: Optional[Callable[[int], float]] = None,
                 on_watermark: Optional[Callable[[], Any]] = None) -> None:
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.on_watermark = on_watermark
        self.ring: Optional[str] = None
        """The exporter ring's identity (protocol v2), once known."""
        self.protocol = 0
        """The protocol of the current (or last) stream: 1, 2, or 0 before any."""
        self._v1_watermark = -math.inf
        self.pipeline = pipeline
        self.stats = stats
        self.idle_timeout = settings.idle_timeout
        self.connect_timeout = settings.connect_timeout
        self.url, self.auth, self.safe_url = split_credentials(settings.url)
        if client is None:
            client = treq.client.HTTPClient(Agent.usingEndpointFactory(
                reactor, _Endpoints(reactor, settings.connect_timeout),
                HTTPConnectionPool(reactor, persistent=False)))
        self.client = client
        self.retry_policy = retry_policy or backoffPolicy(initialDelay=1.0, maxDelay=30.0)
        self.failures = 0
        self.body: Optional[_Body] = None
        self._request: Optional[Deferred] = None
        self._retry: Optional[IDelayedCall] = None
        self._watchdog: Optional[IDelayedCall] = None
        self._last_data = 0.0
        self._had_connection = False
        self._attempt = 0
        """Counts requests; an answer or failure of an earlier one is not this one's."""
        self._proven = False
        """The current answer is an exporter's: protocol 2's headers, or an exporter line read
        (only then does a v1 stream vouch for now)."""
        self._got = 0
        self._answer = ""
        self._said_not_exporter = False
        self.lifecycle = Lifecycle("fetch", stats, (CONNECTING, STREAMING, BACKOFF),
                                   log=self.log)

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._teardown()
        self.lifecycle.enter(STOPPED)

    def watermark(self, now: float) -> float:
        """Event time up to which every record is in the model (-inf: nothing known)."""
        if self.protocol == 2:
            beat = self.pipeline.heartbeat
            return -math.inf if beat is None else beat.time
        if self.protocol == 1 and self.body is not None and self._proven:
            return now
        return self._v1_watermark

    def position(self) -> Dict[str, Any]:
        """Where the stream stands, for a checkpoint (JSON-able)."""
        return {"kind": "exporter", "ring": self.ring, "seq": self.pipeline.last_seq}

    def resume(self, position: Dict[str, Any]) -> None:
        """Continue from a checkpointed ``position()`` (before the service starts); ValueError
        for a position that is not an exporter's."""
        if not isinstance(position, dict) or position.get("kind") != "exporter":
            raise ValueError(f"not an exporter position: {position!r}")
        ring, seq = position.get("ring"), position.get("seq")
        if ring is not None and not (isinstance(ring, str) and _RING_ID.match(ring)):
            raise ValueError(f"not a ring identity: {ring!r}")
        if seq is not None and type(seq) is not int:
            raise ValueError(f"not a sequence number: {seq!r}")
        self.ring = ring
        self.pipeline.resume_after(seq)

    def _moved(self) -> None:
        if self.on_watermark is not None:
            self.on_watermark()

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        try:
            self._request_stream()
        except Exception:
            self._unexpected(Failure(), "asking the exporter for its stream")

    def _request_stream(self) -> None:
        self._attempt += 1
        attempt = self._attempt
        if self.lifecycle.state != RETRYING:  # a retry stays one until it streams
            self.lifecycle.enter(CONNECTING)
        params = {"v": str(PROTOCOL)}
        if self.ring is not None:
            params["ring"] = self.ring
        if self.pipeline.last_seq is not None:
            params["after"] = str(self.pipeline.last_seq)
        self.log.info("fetching {url}{resume}", url=self.safe_url,
                      resume=f" after sequence {params['after']}" if "after" in params else "")
        d = self._request = self.client.get(
            self.url, params=params, headers={b"User-Agent": [USER_AGENT]}, auth=self.auth,
            unbuffered=True, timeout=self.connect_timeout, reactor=self.clock,
        )
        d.addCallbacks(self._response, self._failed, callbackArgs=(attempt,),
                       errbackArgs=(attempt,))
        d.addErrback(self._unexpected, "reading the exporter's answer")

    def _response(self, response: Any, attempt: int) -> None:
        if attempt != self._attempt:  # torn down meanwhile: not ours any more
            response.deliverBody(_Discard())
            return
        self._request = None
        if response.code != 200:
            response.deliverBody(_Discard())
            self._retry_later(f"HTTP {response.code} {response.phrase.decode('latin-1')}")
            return
        try:
            self._handshake(response)
        except Exception:
            response.deliverBody(_Discard())
            raise
        self._proven = self.protocol == 2
        if self._proven:
            self._exporter_proven()
        self._got = 0
        self._answer = _header(response, b"Content-Type") or "no Content-Type"
        self.stats.exporter_connected = self.stats.source_connected = True
        self.lifecycle.enter(STREAMING)
        self.log.info("{what} to {url}{how}", url=self.safe_url,
                      what="reconnected" if self._had_connection else "connected",
                      how=f" (protocol 2, ring {self.ring})" if self.protocol == 2 else "",
                      protocol=self.protocol, ring=self.ring)
        self._had_connection = True
        body = self.body = _Body(self)
        self._last_data = self.clock.seconds()
        self._watchdog = self.clock.callLater(self.idle_timeout, self._check_idle)
        response.deliverBody(body)
        if body is self.body:  # (what the body already held may have failed)
            self._moved()

    def _handshake(self, response: Any) -> None:
        """Read the protocol headers: v2 and its ring, or v1 (none)."""
        protocol = _header(response, b"X-Sfive-Protocol")
        ring = _header(response, b"X-Sfive-Ring")
        if protocol != "2" or ring is None or not _RING_ID.match(ring):
            if protocol not in (None, "1"):
                self.log.warn("exporter {url}: protocol {protocol!r} with ring {ring!r} is not "
                              "one this service reads; reading it as protocol 1",
                              url=self.safe_url,
                              protocol=protocol, ring=ring)
            self.protocol = self.stats.exporter_protocol = 1
            return
        self.protocol = self.stats.exporter_protocol = 2
        if self.ring is not None and ring != self.ring:
            beat = self.pipeline.heartbeat
            self.pipeline.lose(None if beat is None else beat.time, self.clock.seconds())
            self.log.warn(
                "exporter {url}: a new ring {ring} (was {old}): nginx was restarted; reading "
                "the new ring from its first record", url=self.safe_url, ring=ring,
                old=self.ring)
            self.pipeline.resume_after(None)
        self.ring = ring

    def _failed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._attempt:
            return
        self._request = None
        if not self.running:
            return
        if _cancelled(failure):
            self._retry_later(f"no answer within {self.connect_timeout:g}s")
        else:
            self._retry_later(describe(failure))

    def _data(self, body: _Body, data: bytes) -> None:
        if body is not self.body:
            return
        self._last_data = self.clock.seconds()
        try:
            beat = self.pipeline.heartbeat
            if self._proven:
                self.pipeline.feed(data)
            else:
                self._got += len(data)
                before = records_read(self.stats)
                self.pipeline.feed(data)
                if records_read(self.stats) > before:
                    self._proven = True
                    self._exporter_proven()
            if self.pipeline.heartbeat is not beat:
                self._ring_history(self.pipeline.heartbeat)
            self._moved()
        except Exception:
            self._unexpected(Failure(), "reading the exporter's stream")

    def _ring_history(self, beat: Heartbeat) -> None:
        """The ring's extent from a heartbeat that names its oldest record (nginx/README.md,
        "Protocol 2"): the records from it to the heartbeat's, and their time span."""
        if beat.oldest is None:
            return
        self.stats.ring_size = max(0, beat.seq - beat.oldest + 1)
        if beat.oldest_time is not None:
            self.stats.ring_history = max(0.0, beat.time - beat.oldest_time)

    def _check_idle(self, again: bool = False) -> None:
        """Idle is judged by what has arrived: data since the last look re-arms; silence for
        ``idle_timeout`` is looked at ``again`` (``IDLE_RECHECK``) before it cuts."""
        self._watchdog = None
        try:
            idle = self.clock.seconds() - self._last_data
            if idle < self.idle_timeout:
                self._watchdog = self.clock.callLater(self.idle_timeout - idle,
                                                      self._check_idle)
                return
            if not again:
                self._watchdog = self.clock.callLater(IDLE_RECHECK, self._check_idle, True)
                return
            self.log.warn("exporter sent nothing for {idle:.0f}s; reconnecting", idle=idle)
            # not left to the body's connectionLost (it may never come, or have no transport
            # to come from): let go and retry here; _ended ignores the old body then
            dropped = self._teardown()
            why = f"idle for {idle:.0f}s"
            if dropped:
                why += f"; discarded a partial line of {dropped} bytes"
            self._retry_later(why)
        except Exception:
            self._unexpected(Failure(), "watching the stream for silence")

    def _ended(self, body: _Body, reason: Failure) -> None:
        if body is not self.body:
            return
        try:
            dropped = self._teardown()
            if not self.running:
                return
            why = "stream ended" if reason.check(ResponseDone) else describe(reason)
            if not self._proven and self._got:
                why = self._not_an_exporter(why)
            if dropped:
                why += f"; discarded a partial line of {dropped} bytes"
            self._retry_later(why)
        except Exception:
            self._unexpected(Failure(), "closing the exporter's stream")

    def _exporter_proven(self) -> None:
        """A good connection: the backoff starts again from its first delay."""
        self.failures = 0
        self._said_not_exporter = False

    def _not_an_exporter(self, why: str) -> str:
        """A 200 answer without the protocol header ended after bytes that held no exporter
        line (a web page, say): said once per stretch and counted; the backoff is not reset
        (its "connections" are no good ones)."""
        if not self._said_not_exporter:
            self._said_not_exporter = True
            self.stats.warnings["not-an-exporter"] += 1
            self.log.error(
                "exporter {url} answered 200 but is not an sfive exporter: no X-Sfive-Protocol "
                "header and no record in its answer ({n} bytes, {answer}); -u must name the "
                "exporter's location (nginx/sfive-location.conf, /sfive by default)",
                url=self.safe_url, n=self._got, answer=self._answer)
        return f"not an exporter ({why})"

    def _teardown(self) -> int:
        """Let go of the current request or stream (if any): no timer, no body, the partial
        line discarded (its byte count returned), not connected."""
        self._attempt += 1
        self.stats.exporter_connected = self.stats.source_connected = False
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        request, self._request = self._request, None
        if request is not None:
            request.cancel()
        body, self.body = self.body, None
        if body is not None and self.protocol == 1 and self._proven:
            self._v1_watermark = self.clock.seconds()
        if body is not None:
            if body.transport is not None:
                body.transport.stopProducing()
        return self.pipeline.cut()

    def _retry_later(self, why: str) -> None:
        self.stats.exporter_connected = self.stats.source_connected = False
        if not self.running:
            return
        delay = self.retry_policy(self.failures)
        self.failures += 1
        self.stats.exporter_reconnects += 1
        self.log.warn("exporter {url}: {why}; reconnecting in {delay:.1f}s",
                      url=self.safe_url, why=why, delay=delay)
        self.lifecycle.enter(BACKOFF)
        self._retry = self.clock.callLater(delay, self._connect)

    def _unexpected(self, failure: Failure, doing: str) -> None:
        """The one path of an error nobody expected: whatever was open is let go, the
        traceback logged (once per stretch) and counted, and a new attempt made after the
        backoff, resuming after the last record folded into the model."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        try:
            self._teardown()
        except Exception:
            self.log.failure("fetch: letting go of the stream failed too")
        if not self.running:
            self.log.failure("fetch: unexpected error while {doing} (stopping)", failure,
                             doing=doing)
            return
        delay = self.retry_policy(self.failures)
        self.failures += 1
        self.stats.exporter_reconnects += 1
        self._retry = self.lifecycle.unexpected(failure, doing, self.clock, delay,
                                                self._connect)
